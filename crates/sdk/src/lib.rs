//! The typed Rust client of the ScaiBunker public API. Used by the CLI and the end-to-end
//! tests. Errors carry the API's stable codes.

mod images;
mod shell;
mod stream;

pub use shell::{ShellEvent, ShellOptions, ShellReader, ShellWriter};
pub use stream::{ExecEvent, ExecStream};

use std::time::Duration;

use bytes::Bytes;
use scaibunker_api::MODULE_PREFIX;
use scaibunker_api::bunkers::{Bunker, CreateBunker};
use scaibunker_api::envelope::{Error as ErrorEnvelope, FieldDetail, List, Ok as Envelope};
use scaibunker_api::exec::{ExecRequest, ExecResult};
use scaibunker_api::files::{FileEntry, FileWritten};
use scaibunker_api::snapshots::{CreateSnapshot, Snapshot};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The API answered with an error envelope.
    #[error("{code} ({status}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        details: Vec<FieldDetail>,
        request_id: String,
    },
    #[error("could not reach {url}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the stream of exec {exec_id} broke and could not be resumed")]
    StreamBroken { exec_id: String },
    /// A shell's WebSocket could not be opened or broke.
    #[error("shell: {message}")]
    Shell { message: String },
    /// The server ended a shell session with an error code.
    #[error("shell failed: {code}: {message}")]
    ShellFailed { code: String, message: String },
    #[error("unexpected answer from the API ({status})")]
    Decode {
        status: u16,
        #[source]
        source: reqwest::Error,
    },
}

impl SdkError {
    /// The API's error code, if the API answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } | Self::ShellFailed { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::Decode { status, .. } => Some(*status),
            Self::Transport { .. }
            | Self::StreamBroken { .. }
            | Self::Shell { .. }
            | Self::ShellFailed { .. } => None,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:8080`) using `api_key`.
    pub fn new(base: impl Into<String>, api_key: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("a client without TLS always builds");
        Self {
            http,
            base: base.into().trim_end_matches('/').to_owned(),
            token: api_key,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{MODULE_PREFIX}{path}", self.base)
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, SdkError> {
        let resp = self
            .auth(rb)
            .send()
            .await
            .map_err(|source| SdkError::Transport {
                url: self.base.clone(),
                source,
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        match resp.json::<ErrorEnvelope>().await {
            Ok(e) => Err(SdkError::Api {
                status,
                code: e.error.code,
                message: e.error.message,
                details: e.error.details,
                request_id: e.meta.request_id,
            }),
            Err(source) => Err(SdkError::Decode { status, source }),
        }
    }

    /// A list response (`{data, has_more, next_cursor}`) as one [`Page`].
    async fn page<T: DeserializeOwned>(resp: reqwest::Response) -> Result<Page<T>, SdkError> {
        let status = resp.status().as_u16();
        let list: List<T> = resp
            .json()
            .await
            .map_err(|source| SdkError::Decode { status, source })?;
        Ok(Page {
            items: list.data,
            next_cursor: list.next_cursor,
        })
    }

    async fn data<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, SdkError> {
        let status = resp.status().as_u16();
        resp.json::<Envelope<T>>()
            .await
            .map(|e| e.data)
            .map_err(|source| SdkError::Decode { status, source })
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, SdkError> {
        Self::data(self.send(self.http.post(self.url(path)).json(body)).await?).await
    }

    pub async fn create_bunker(&self, req: &CreateBunker) -> Result<Bunker, SdkError> {
        self.post("/bunkers", req).await
    }

    pub async fn bunker(&self, id: &str) -> Result<Bunker, SdkError> {
        Self::data(
            self.send(self.http.get(self.url(&format!("/bunkers/{id}"))))
                .await?,
        )
        .await
    }

    pub async fn bunkers(
        &self,
        status: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<Page<Bunker>, SdkError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(s) = status {
            q.push(("status", s.to_owned()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            q.push(("cursor", c.to_owned()));
        }
        let resp = self
            .send(self.http.get(self.url("/bunkers")).query(&q))
            .await?;
        Self::page(resp).await
    }

    pub async fn delete_bunker(&self, id: &str) -> Result<Bunker, SdkError> {
        Self::data(
            self.send(self.http.delete(self.url(&format!("/bunkers/{id}"))))
                .await?,
        )
        .await
    }

    /// A page of the bunker's egress audit (completed flows and denied attempts), oldest
    /// first; pass the page's `next_cursor` back for the next one.
    pub async fn bunker_egress(
        &self,
        id: &str,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<scaibunker_api::egress::EgressPage, SdkError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            q.push(("cursor", c.to_owned()));
        }
        Self::data(
            self.send(
                self.http
                    .get(self.url(&format!("/bunkers/{id}/egress")))
                    .query(&q),
            )
            .await?,
        )
        .await
    }

    /// Pauses a running bunker (its VM stops; quota stays held).
    pub async fn pause_bunker(&self, id: &str) -> Result<Bunker, SdkError> {
        self.post(&format!("/bunkers/{id}/pause"), &serde_json::json!({}))
            .await
    }

    /// Resumes a paused bunker.
    pub async fn resume_bunker(&self, id: &str) -> Result<Bunker, SdkError> {
        self.post(&format!("/bunkers/{id}/resume"), &serde_json::json!({}))
            .await
    }

    /// Snapshots a running bunker into object storage; returns once the snapshot is ready.
    pub async fn snapshot_bunker(
        &self,
        id: &str,
        req: &CreateSnapshot,
    ) -> Result<Snapshot, SdkError> {
        self.post(&format!("/bunkers/{id}/snapshot"), req).await
    }

    pub async fn snapshot(&self, id: &str) -> Result<Snapshot, SdkError> {
        Self::data(
            self.send(self.http.get(self.url(&format!("/snapshots/{id}"))))
                .await?,
        )
        .await
    }

    /// The first page (up to 500) of the caller's snapshots, optionally of one bunker.
    pub async fn snapshots(&self, bunker_id: Option<&str>) -> Result<Vec<Snapshot>, SdkError> {
        let mut q: Vec<(&str, String)> = vec![("limit", "500".to_owned())];
        if let Some(b) = bunker_id {
            q.push(("bunker_id", b.to_owned()));
        }
        let resp = self
            .send(self.http.get(self.url("/snapshots")).query(&q))
            .await?;
        Ok(Self::page::<Snapshot>(resp).await?.items)
    }

    /// Deletes a snapshot and its objects.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), SdkError> {
        self.send(self.http.delete(self.url(&format!("/snapshots/{id}"))))
            .await
            .map(|_| ())
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, SdkError> {
        self.post(&format!("/bunkers/{id}/exec"), req).await
    }

    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        content: impl Into<reqwest::Body>,
    ) -> Result<FileWritten, SdkError> {
        let mut q = vec![("path", path.to_owned())];
        if let Some(m) = mode {
            q.push(("mode", format!("{m:o}")));
        }
        let rb = self
            .http
            .put(self.url(&format!("/bunkers/{id}/files")))
            .query(&q)
            .body(content);
        Self::data(self.send(rb).await?).await
    }

    /// Starts a download of an exec's whole output (`stream`: `stdout` or `stderr`) when its
    /// result was `truncated` with a `full_output_ref`; read the body as a stream.
    pub async fn exec_output_stream(
        &self,
        id: &str,
        exec_id: &str,
        stream: &str,
    ) -> Result<reqwest::Response, SdkError> {
        let rb = self
            .http
            .get(self.url(&format!("/bunkers/{id}/exec/{exec_id}/output")))
            .query(&[("stream", stream)]);
        self.send(rb).await
    }

    /// Uploads a tar stream, unpacked into the directory `path` (created if missing, merged
    /// into if not), all or nothing.
    pub async fn write_archive(
        &self,
        id: &str,
        path: &str,
        tar: impl Into<reqwest::Body>,
    ) -> Result<FileWritten, SdkError> {
        let rb = self
            .http
            .put(self.url(&format!("/bunkers/{id}/files/archive")))
            .query(&[("path", path)])
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(tar);
        Self::data(self.send(rb).await?).await
    }

    /// Starts a download of the directory `path` as a tar stream; read the body as a stream.
    pub async fn read_archive_stream(
        &self,
        id: &str,
        path: &str,
    ) -> Result<reqwest::Response, SdkError> {
        let rb = self
            .http
            .get(self.url(&format!("/bunkers/{id}/files/archive")))
            .query(&[("path", path)]);
        self.send(rb).await
    }

    /// Starts a streamed exec (`stream` is forced on); read events with [`ExecStream::next`],
    /// which resumes by itself after a broken connection.
    pub async fn exec_stream(&self, id: &str, req: &ExecRequest) -> Result<ExecStream, SdkError> {
        let mut req = req.clone();
        req.stream = Some(true);
        let resp = self
            .send(
                self.http
                    .post(self.url(&format!("/bunkers/{id}/exec")))
                    .json(&req),
            )
            .await?;
        let exec_id = resp
            .headers()
            .get("x-exec-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(ExecStream::new(self.clone(), id.to_owned(), exec_id, resp))
    }

    /// The events of a streamed exec after `last_event_id` (0: from the start).
    pub async fn exec_events(
        &self,
        id: &str,
        exec_id: &str,
        last_event_id: u64,
    ) -> Result<reqwest::Response, SdkError> {
        let rb = self
            .http
            .get(self.url(&format!("/bunkers/{id}/exec/{exec_id}/events")))
            .header("Last-Event-ID", last_event_id.to_string());
        self.send(rb).await
    }

    /// Downloads a file whole. For large files use [`Client::read_file_stream`].
    pub async fn read_file(&self, id: &str, path: &str) -> Result<Bytes, SdkError> {
        let resp = self.read_file_stream(id, path).await?;
        let status = resp.status().as_u16();
        resp.bytes()
            .await
            .map_err(|source| SdkError::Decode { status, source })
    }

    /// Starts a download; read the body as a stream.
    pub async fn read_file_stream(
        &self,
        id: &str,
        path: &str,
    ) -> Result<reqwest::Response, SdkError> {
        let rb = self
            .http
            .get(self.url(&format!("/bunkers/{id}/files")))
            .query(&[("path", path)]);
        self.send(rb).await
    }

    /// One page of a directory (at most `limit`, 1–500, entries after `cursor`).
    pub async fn list_files_page(
        &self,
        id: &str,
        path: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Page<FileEntry>, SdkError> {
        let mut q = vec![("path", path.to_owned()), ("limit", limit.to_string())];
        if let Some(c) = cursor {
            q.push(("cursor", c.to_owned()));
        }
        let resp = self
            .send(
                self.http
                    .get(self.url(&format!("/bunkers/{id}/files/list")))
                    .query(&q),
            )
            .await?;
        Self::page(resp).await
    }

    /// A whole directory, page after page, sorted by name.
    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileEntry>, SdkError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .list_files_page(id, path, 500, cursor.as_deref())
                .await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
    }

    pub async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<(), SdkError> {
        let rb = self
            .http
            .delete(self.url(&format!("/bunkers/{id}/files")))
            .query(&[("path", path), ("recursive", &recursive.to_string())]);
        self.send(rb).await.map(|_| ())
    }

    /// `GET /health`: whether the API answers.
    /// Opens an interactive shell in the bunker: a writer (keystrokes, resizes) and a reader
    /// (output, then the exit).
    pub async fn shell(
        &self,
        id: &str,
        opts: &ShellOptions,
    ) -> Result<(ShellWriter, ShellReader), SdkError> {
        let mut url =
            reqwest::Url::parse(&self.url(&format!("/bunkers/{id}/shell"))).map_err(|e| {
                SdkError::Shell {
                    message: format!("bad base URL {}: {e}", self.base),
                }
            })?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        // http(s) → ws(s) on the same URL is always accepted.
        let _ = url.set_scheme(scheme);
        {
            let mut q = url.query_pairs_mut();
            if let Some(cols) = opts.cols {
                q.append_pair("cols", &cols.to_string());
            }
            if let Some(rows) = opts.rows {
                q.append_pair("rows", &rows.to_string());
            }
            if let Some(command) = &opts.command {
                q.append_pair("command", command);
            }
            if let Some(user) = opts.user {
                q.append_pair(
                    "user",
                    match user {
                        scaibunker_api::exec::ExecUser::User => "user",
                        scaibunker_api::exec::ExecUser::Root => "root",
                    },
                );
            }
        }
        shell::open(url.to_string(), self.token.as_deref()).await
    }

    pub async fn health(&self) -> Result<(), SdkError> {
        let url = format!("{}/health", self.base);
        self.http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map(|_| ())
            .map_err(|source| SdkError::Transport { url, source })
    }
}
