//! The controller's client of worker daemons (their `/v1/worker` API), authenticated with each
//! worker's own credential (see [`WorkerTarget`]). One `reqwest::Client` (connection pool)
//! for every worker.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use scaibunker_proto::worker::{
    CreateVm, DirListing, ExecRequest, ExecResult, ExecStreamEvent as E, FileWritten, GuestUser,
    ShellQuery, VmInfo, WORKER_API_PREFIX, WorkerError,
};
use serde::de::DeserializeOwned;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Debug, thiserror::Error)]
pub enum WorkerCallError {
    /// The worker answered with an error body.
    #[error("worker answered {status}: {}: {}", .body.code, .body.message)]
    Worker { status: u16, body: WorkerError },
    #[error("worker unreachable at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("worker sent a malformed answer")]
    Malformed(#[source] reqwest::Error),
    #[error("opening a WebSocket to the worker at {url} failed")]
    WebSocket {
        url: String,
        #[source]
        source: Box<tungstenite::Error>,
    },
}

/// One step of a streamed exec, as decoded from the worker's NDJSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit {
        exit_code: Option<i32>,
        timed_out: bool,
    },
    /// The exec failed on the platform side, or the stream broke (`WORKER_ERROR`).
    Error {
        code: String,
        message: String,
    },
}

/// The events of a streamed exec ([`WorkerClient::exec_stream`]'s body): output as it comes,
/// then exactly one `Exit` or `Error`, then `None`. A broken or malformed stream, or one that
/// ends without an exit, ends with an `Error` whose code is `WORKER_ERROR`.
pub struct WorkerEvents {
    body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    pending: Vec<u8>,
    done: bool,
}

impl WorkerEvents {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            pending: Vec::new(),
            done: false,
        }
    }

    pub async fn next(&mut self) -> Option<WorkerEvent> {
        if self.done {
            return None;
        }
        let broken = |message: String| WorkerEvent::Error {
            code: "WORKER_ERROR".into(),
            message,
        };
        let event = loop {
            if let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=nl).collect();
                let decoded = serde_json::from_slice::<E>(&line[..line.len() - 1]);
                break match decoded {
                    Ok(E::Stdout { data_b64 }) => match B64.decode(&data_b64) {
                        Ok(bytes) => WorkerEvent::Stdout(bytes.into()),
                        Err(_) => broken("malformed worker output".into()),
                    },
                    Ok(E::Stderr { data_b64 }) => match B64.decode(&data_b64) {
                        Ok(bytes) => WorkerEvent::Stderr(bytes.into()),
                        Err(_) => broken("malformed worker output".into()),
                    },
                    Ok(E::Exit {
                        exit_code,
                        timed_out,
                        ..
                    }) => WorkerEvent::Exit {
                        exit_code,
                        timed_out,
                    },
                    Ok(E::Error { code, message }) => WorkerEvent::Error { code, message },
                    Err(e) => broken(format!("malformed worker event: {e}")),
                };
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.pending.extend_from_slice(&chunk),
                Some(Err(e)) => break broken(format!("worker stream broke: {e}")),
                None => break broken("the worker ended the stream without an exit".into()),
            }
        };
        if matches!(event, WorkerEvent::Exit { .. } | WorkerEvent::Error { .. }) {
            self.done = true;
        }
        Some(event)
    }
}

fn files_route(bunker_id: &str, archive: bool) -> String {
    if archive {
        format!("/bunkers/{bunker_id}/files/archive")
    } else {
        format!("/bunkers/{bunker_id}/files")
    }
}

/// A shell session's WebSocket to a worker.
pub type WorkerSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Largest message taken from a worker's shell socket (the worker sends at most 64 KiB).
const MAX_SHELL_MESSAGE_BYTES: usize = 1024 * 1024;
/// How long opening a shell on a worker may take.
const SHELL_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

impl WorkerCallError {
    /// The worker's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Worker { body, .. } => Some(&body.code),
            _ => None,
        }
    }
}

/// Which way a pause call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    Pause,
    Resume,
}

/// Where a call goes: a worker's base URL and the credential it holds
/// (`service::worker_credentials::target`).
#[derive(Debug, Clone)]
pub struct WorkerTarget {
    pub url: String,
    pub credential: String,
}

#[derive(Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
}

impl Default for WorkerClient {
    fn default() -> Self {
        Self::new()
    }
}

/// Boots under TCG take seconds and a loaded host can take a minute; the worker enforces its
/// own boot timeout, this only guards against a hung connection.
const BOOT_CALL_TIMEOUT: Duration = Duration::from_secs(300);

impl WorkerClient {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a client without TLS always builds");
        Self { http }
    }

    fn url(base: &str, path: &str) -> String {
        format!("{}{WORKER_API_PREFIX}{path}", base.trim_end_matches('/'))
    }

    async fn send(
        &self,
        to: &WorkerTarget,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, WorkerCallError> {
        let resp = req
            .bearer_auth(&to.credential)
            .send()
            .await
            .map_err(|source| WorkerCallError::Unreachable {
                url: to.url.clone(),
                source,
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.json::<WorkerError>().await.unwrap_or(WorkerError {
            code: "INTERNAL".into(),
            message: format!("worker answered {status} without an error body"),
        });
        Err(WorkerCallError::Worker { status, body })
    }

    async fn json<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, WorkerCallError> {
        resp.json::<T>().await.map_err(WorkerCallError::Malformed)
    }

    pub async fn create_vm(
        &self,
        base: &WorkerTarget,
        req: &CreateVm,
    ) -> Result<VmInfo, WorkerCallError> {
        let r = self
            .http
            .post(Self::url(&base.url, "/bunkers"))
            .json(req)
            .timeout(BOOT_CALL_TIMEOUT);
        Self::json(self.send(base, r).await?).await
    }

    /// Stops and removes a VM. A VM the worker does not know counts as removed.
    pub async fn delete_vm(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
    ) -> Result<(), WorkerCallError> {
        let r = self
            .http
            .delete(Self::url(&base.url, &format!("/bunkers/{bunker_id}")))
            .timeout(Duration::from_secs(60));
        match self.send(base, r).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUNKER_NOT_FOUND") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Pauses (`stop`) or resumes (`cont`) a VM.
    /// Captures a bunker and uploads it; answers with the manifest once it is stored.
    pub async fn snapshot_vm(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        req: &scaibunker_proto::worker::SnapshotVm,
    ) -> Result<scaibunker_proto::worker::SnapshotManifest, WorkerCallError> {
        let r = self
            .http
            .post(Self::url(
                &base.url,
                &format!("/bunkers/{bunker_id}/snapshot"),
            ))
            .json(req)
            // A save, a copy and an upload of a few GiB of state through the proxy.
            .timeout(Duration::from_secs(1800));
        Self::json(self.send(base, r).await?).await
    }

    pub async fn set_paused(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        paused: Pause,
    ) -> Result<VmInfo, WorkerCallError> {
        let verb = match paused {
            Pause::Pause => "pause",
            Pause::Resume => "resume",
        };
        let r = self
            .http
            .post(Self::url(
                &base.url,
                &format!("/bunkers/{bunker_id}/{verb}"),
            ))
            .timeout(Duration::from_secs(60));
        Self::json(self.send(base, r).await?).await
    }

    pub async fn exec(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        req: &ExecRequest,
    ) -> Result<ExecResult, WorkerCallError> {
        // The command's own timeout is enforced in the guest; allow it plus a margin here.
        let timeout = Duration::from_millis(req.timeout_ms) + Duration::from_secs(30);
        let r = self
            .http
            .post(Self::url(&base.url, &format!("/bunkers/{bunker_id}/exec")))
            .json(req)
            .timeout(timeout);
        Self::json(self.send(base, r).await?).await
    }

    /// Starts a streamed exec; the response body is NDJSON `ExecStreamEvent` lines.
    pub async fn exec_stream(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        req: &ExecRequest,
    ) -> Result<reqwest::Response, WorkerCallError> {
        // The command's own timeout is enforced in the guest; this only bounds a hung worker.
        let timeout = Duration::from_millis(req.timeout_ms) + Duration::from_secs(60);
        let r = self
            .http
            .post(Self::url(
                &base.url,
                &format!("/bunkers/{bunker_id}/exec/stream"),
            ))
            .json(req)
            .timeout(timeout);
        self.send(base, r).await
    }

    /// Opens a shell session on the worker. Errors before the upgrade (unknown bunker, not
    /// running) come back as [`WorkerCallError::Worker`] with the worker's code.
    pub async fn open_shell(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        q: &ShellQuery,
    ) -> Result<WorkerSocket, WorkerCallError> {
        let http_url = Self::url(&base.url, &format!("/bunkers/{bunker_id}/shell"));
        let ws_error = |source: tungstenite::Error| WorkerCallError::WebSocket {
            url: base.url.clone(),
            source: Box::new(source),
        };
        let mut url = reqwest::Url::parse(&http_url).map_err(|e| {
            ws_error(tungstenite::Error::Url(
                tungstenite::error::UrlError::UnableToConnect(e.to_string()),
            ))
        })?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        // Only http(s) → ws(s) on the same URL, which `set_scheme` always accepts.
        let _ = url.set_scheme(scheme);
        let user = serde_json::to_value(q.user)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "user".into());
        url.query_pairs_mut()
            .append_pair("cols", &q.cols.to_string())
            .append_pair("rows", &q.rows.to_string())
            .append_pair("command", &q.command)
            .append_pair("user", &user)
            .append_pair("timeout_ms", &q.timeout_ms.to_string());
        let mut req = url.as_str().into_client_request().map_err(ws_error)?;
        let auth = format!("Bearer {}", base.credential)
            .parse()
            .expect("the worker token is a valid header value");
        req.headers_mut()
            .insert(tungstenite::http::header::AUTHORIZATION, auth);
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_SHELL_MESSAGE_BYTES));
        let connect = tokio_tungstenite::connect_async_with_config(req, Some(config), true);
        match tokio::time::timeout(SHELL_OPEN_TIMEOUT, connect).await {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<WorkerError>(b).ok())
                    .unwrap_or(WorkerError {
                        code: "INTERNAL".into(),
                        message: format!("worker answered {status} without an error body"),
                    });
                Err(WorkerCallError::Worker { status, body })
            }
            Ok(Err(e)) => Err(ws_error(e)),
            Err(_) => Err(ws_error(tungstenite::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "opening the shell timed out",
            )))),
        }
    }

    /// Streams a file (or with `archive`, a tar stream unpacked into the directory `path`).
    pub async fn write_file<S>(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        to: UploadTo<'_>,
        body: S,
    ) -> Result<FileWritten, WorkerCallError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let r = self
            .http
            .put(Self::url(&base.url, &files_route(bunker_id, to.archive)))
            .query(&[
                ("path", to.path),
                ("mode", &format!("{:o}", to.mode)),
                ("user", user_param(to.user)),
            ])
            .body(reqwest::Body::wrap_stream(body));
        Self::json(self.send(base, r).await?).await
    }

    /// Starts a download; the response body streams the file (or with `archive`, the
    /// directory as a tar stream).
    pub async fn read_file(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        path: &str,
        user: GuestUser,
        archive: bool,
    ) -> Result<reqwest::Response, WorkerCallError> {
        let r = self
            .http
            .get(Self::url(&base.url, &files_route(bunker_id, archive)))
            .query(&[("path", path), ("user", user_param(user))]);
        self.send(base, r).await
    }

    /// One page of a directory: at most `limit` entries after `cursor`.
    pub async fn list_dir(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        path: &str,
        user: GuestUser,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<DirListing, WorkerCallError> {
        let limit = limit.to_string();
        let mut query = vec![
            ("path", path),
            ("user", user_param(user)),
            ("limit", &limit),
        ];
        if let Some(c) = cursor {
            query.push(("cursor", c));
        }
        let r = self
            .http
            .get(Self::url(
                &base.url,
                &format!("/bunkers/{bunker_id}/files/list"),
            ))
            .query(&query)
            .timeout(Duration::from_secs(60));
        Self::json(self.send(base, r).await?).await
    }

    pub async fn remove_file(
        &self,
        base: &WorkerTarget,
        bunker_id: &str,
        path: &str,
        recursive: bool,
        user: GuestUser,
    ) -> Result<(), WorkerCallError> {
        let r = self
            .http
            .delete(Self::url(&base.url, &format!("/bunkers/{bunker_id}/files")))
            .query(&[
                ("path", path),
                ("recursive", if recursive { "true" } else { "false" }),
                ("user", user_param(user)),
            ])
            .timeout(Duration::from_secs(120));
        self.send(base, r).await.map(|_| ())
    }
}

/// Where an upload lands in the guest, and as whom.
pub struct UploadTo<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub user: GuestUser,
    /// A tar stream unpacked into the directory `path`.
    pub archive: bool,
}

/// The worker's `user` query value.
fn user_param(user: GuestUser) -> &'static str {
    match user {
        GuestUser::User => "user",
        GuestUser::Root => "root",
    }
}
