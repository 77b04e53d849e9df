//! The worker's HTTP API, which only the controller calls ([`scaibunker_proto::worker`]).
//!
//! Every route under [`WORKER_API_PREFIX`] needs `Authorization: Bearer <worker token>`,
//! compared in constant time; `/health` does not. Handlers only parse the request into a
//! [`Command`]; [`execute`] runs every command in one `match`, and errors become
//! `{"code", "message"}` with a status.
//!
//! `exec/stream` answers errors found before the command starts (unknown bunker, not
//! running, a bad request, the agent gone) as plain error responses, like `exec`; after
//! that it is `200` with an NDJSON body ([`ExecStreamEvent`]) that ends in one `exit` or
//! `error` line. A client that goes away cancels the command.
//!
//! `shell` upgrades to a WebSocket once the session has started (so an unknown or stopped
//! bunker is a plain error response); [`crate::shell`] bridges it to the terminal.
//!
//! `images/{sha256}` streams a cached image (prebuilt or pulled) to a peer worker, with its
//! `Content-Length`; the path must be a digest (64 lowercase hex), never a name. `/metrics`
//! (no token, like `/health`) has the image pull counters in Prometheus text.
//!
//! File bodies stream in both directions: an upload is forwarded to the agent chunk by chunk
//! (never buffered whole) and cut off at the configured cap; a download starts only once the
//! agent has accepted the path, so not-found and is-a-directory are proper statuses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use scaibunker_proto::agent::AgentErrorCode;
use scaibunker_proto::worker::{
    CreateVm, ExecRequest, ExecResult, ExecStreamEvent, FileWritten, ShellQuery, SnapshotVm,
    WORKER_API_PREFIX, WorkerError,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::agent_client::{
    AgentError, ExecEvent, ExecOutcome, ExecSpec, ExecStream, ShellSpec, WriteFileError,
};
use crate::bunker::{BunkerOpError, Bunkers, CreateBunkerError};

/// Read size when streaming an image to a peer.
const IMAGE_CHUNK_BYTES: usize = 256 << 10;

/// Exit code a shell gives a command it cannot run.
const SPAWN_FAILED_EXIT_CODE: i32 = 127;

/// What the handlers share.
pub struct ApiState {
    pub bunkers: Arc<Bunkers>,
    /// SHA-256 of the worker token: comparing digests takes the same time whatever the
    /// presented token's length or content.
    token_digest: [u8; 32],
    pub max_file_bytes: u64,
}

impl ApiState {
    pub fn new(bunkers: Arc<Bunkers>, worker_token: &str, max_file_bytes: u64) -> Self {
        Self {
            bunkers,
            token_digest: Sha256::digest(worker_token.as_bytes()).into(),
            max_file_bytes,
        }
    }

    fn token_matches(&self, presented: &str) -> bool {
        digest_matches(&self.token_digest, presented)
    }
}

/// Compares `presented` with the token whose SHA-256 is `expected`, in constant time.
fn digest_matches(expected: &[u8; 32], presented: &str) -> bool {
    let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    presented
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Every operation of the worker API.
enum Command {
    CreateBunker(CreateVm),
    ListBunkers,
    GetBunker(String),
    DeleteBunker(String),
    PauseBunker(String),
    ResumeBunker(String),
    SnapshotBunker(String, SnapshotVm),
    Exec(String, ExecRequest),
    ExecStream(String, ExecRequest),
    /// A file, or with `archive` a tar stream unpacked into the directory `path`.
    WriteFile {
        id: String,
        path: String,
        mode: u32,
        archive: bool,
        declared_len: Option<u64>,
        body: Body,
    },
    /// A file, or with `archive` the directory `path` as a tar stream.
    ReadFile {
        id: String,
        path: String,
        archive: bool,
    },
    ListDir {
        id: String,
        path: String,
    },
    Remove {
        id: String,
        path: String,
        recursive: bool,
    },
    /// The bytes of a cached image (prebuilt or pulled), for a peer worker.
    ReadImage(String),
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            message,
        )
    }

    /// A failure that is the worker's own: logged here, reported without detail.
    fn internal(what: &str, detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(%detail, "{what}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", what)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = WorkerError {
            code: self.code.to_owned(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<CreateBunkerError> for ApiError {
    fn from(e: CreateBunkerError) -> Self {
        let message = e.to_string();
        match e {
            CreateBunkerError::Invalid(_) => Self::validation(message),
            CreateBunkerError::Exists(_) => {
                Self::new(StatusCode::CONFLICT, "BUNKER_EXISTS", message)
            }
            CreateBunkerError::ImageNotCached(_) => {
                Self::new(StatusCode::NOT_FOUND, "IMAGE_NOT_CACHED", message)
            }
            // No peer or proxy served the image: an upstream failure, with its reason.
            CreateBunkerError::ImagePull { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, "IMAGE_PULL_FAILED", message)
            }
            // The reason (with the console tail) is what the controller needs to show.
            CreateBunkerError::BootFailed { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "BOOT_FAILED", message)
            }
        }
    }
}

impl From<BunkerOpError> for ApiError {
    fn from(e: BunkerOpError) -> Self {
        match e {
            BunkerOpError::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "BUNKER_NOT_FOUND", e.to_string())
            }
            BunkerOpError::NotRunning { .. } => {
                Self::new(StatusCode::CONFLICT, "BUNKER_NOT_RUNNING", e.to_string())
            }
            BunkerOpError::Vmm { .. } => Self::internal("the vmm failed", &e),
            // The detail (a storage proxy status, a qemu-img message) is the controller's to log.
            BunkerOpError::Snapshot { .. } => {
                tracing::error!(error = %e, "snapshot failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "SNAPSHOT_FAILED",
                    e.to_string(),
                )
            }
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Agent { code, message } => {
                let (status, code) = match code {
                    AgentErrorCode::FileNotFound => (StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
                    AgentErrorCode::IsADirectory => (StatusCode::CONFLICT, "IS_A_DIRECTORY"),
                    AgentErrorCode::NotADirectory => (StatusCode::CONFLICT, "NOT_A_DIRECTORY"),
                    AgentErrorCode::DirectoryNotEmpty => {
                        (StatusCode::CONFLICT, "DIRECTORY_NOT_EMPTY")
                    }
                    AgentErrorCode::InvalidPath => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PATH")
                    }
                    AgentErrorCode::InvalidArchive => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_ARCHIVE")
                    }
                    AgentErrorCode::PermissionDenied => {
                        (StatusCode::FORBIDDEN, "PERMISSION_DENIED")
                    }
                    // Guest-side I/O failures (a full disk) are the caller's to see.
                    AgentErrorCode::Io => (StatusCode::INTERNAL_SERVER_ERROR, "GUEST_IO_ERROR"),
                    AgentErrorCode::SpawnFailed | AgentErrorCode::BadRequest => {
                        return Self::internal(
                            "the agent refused the request",
                            &format!("{code:?}: {message}"),
                        );
                    }
                };
                Self::new(status, code, message)
            }
            AgentError::Unavailable(_) | AgentError::Timeout(_) | AgentError::WindowExceeded => {
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "AGENT_UNAVAILABLE",
                    e.to_string(),
                )
            }
            AgentError::Protocol { .. } => Self::internal("the agent broke the protocol", &e),
        }
    }
}

/// The router: the authenticated API under [`WORKER_API_PREFIX`] and the open health checks.
pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/bunkers", post(create_bunker).get(list_bunkers))
        .route("/bunkers/{id}", get(get_bunker).delete(delete_bunker))
        .route("/bunkers/{id}/pause", post(pause_bunker))
        .route("/bunkers/{id}/resume", post(resume_bunker))
        .route("/bunkers/{id}/snapshot", post(snapshot_bunker))
        .route("/bunkers/{id}/exec", post(exec))
        .route("/bunkers/{id}/exec/stream", post(exec_stream))
        .route("/bunkers/{id}/shell", get(shell))
        .route(
            "/bunkers/{id}/files",
            get(read_file).put(write_file).delete(remove_file),
        )
        .route("/bunkers/{id}/files/list", get(list_dir))
        .route("/images/{sha256}", get(read_image))
        .route(
            "/bunkers/{id}/files/archive",
            get(read_archive).put(write_archive),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        .route("/health", get(health));
    Router::new()
        .nest(WORKER_API_PREFIX, api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route") })
        .layer(middleware::from_fn(scaibunker_http::close_unread))
        .with_state(state)
}

async fn require_token(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if state.token_matches(token) => next.run(req).await,
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AUTH_TOKEN_INVALID",
            "missing or invalid worker token",
        )
        .into_response(),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Prometheus text: the image pull counters (no secrets, so no token, like `/health`).
async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let c = s.bunkers.pulls().counters();
    let text = format!(
        "# HELP scaibunker_worker_image_pull_bytes_total Bytes of completed image pulls, by source.\n\
         # TYPE scaibunker_worker_image_pull_bytes_total counter\n\
         scaibunker_worker_image_pull_bytes_total{{source=\"peer\"}} {}\n\
         scaibunker_worker_image_pull_bytes_total{{source=\"proxy\"}} {}\n\
         # HELP scaibunker_worker_image_pulls_total Image pulls ended, by outcome.\n\
         # TYPE scaibunker_worker_image_pulls_total counter\n\
         scaibunker_worker_image_pulls_total{{outcome=\"completed\"}} {}\n\
         scaibunker_worker_image_pulls_total{{outcome=\"failed\"}} {}\n",
        c.peer_bytes, c.proxy_bytes, c.completed, c.failed
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::validation(e.body_text()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::validation(e.body_text()))
}

async fn create_bunker(
    State(s): State<Arc<ApiState>>,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::CreateBunker(json_body(body)?)).await
}

async fn list_bunkers(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    execute(&s, Command::ListBunkers).await
}

async fn get_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::GetBunker(id)).await
}

async fn delete_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::DeleteBunker(id)).await
}

async fn pause_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::PauseBunker(id)).await
}

async fn resume_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::ResumeBunker(id)).await
}

async fn snapshot_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Result<Json<SnapshotVm>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::SnapshotBunker(id, json_body(body)?)).await
}

async fn exec(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::Exec(id, json_body(body)?)).await
}

async fn exec_stream(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::ExecStream(id, json_body(body)?)).await
}

/// Largest terminal side accepted, in cells.
const MAX_TERMINAL_CELLS: u16 = 1000;

async fn shell(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<ShellQuery>, QueryRejection>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let sides = [q.cols, q.rows];
    if sides.iter().any(|&n| n == 0 || n > MAX_TERMINAL_CELLS) {
        return Err(ApiError::validation(format!(
            "cols and rows must be 1..={MAX_TERMINAL_CELLS}"
        )));
    }
    if q.timeout_ms == 0 || q.command.is_empty() || q.command.contains('\0') {
        return Err(ApiError::validation(
            "timeout_ms must be positive and command non-empty without NUL",
        ));
    }
    let (agent, env) = s.bunkers.agent(&id)?;
    let (input, output) = agent
        .shell(ShellSpec {
            program: scaibunker_proto::agent::Program::Shell(q.command),
            env,
            cwd: None,
            user: q.user,
            size: scaibunker_proto::agent::WindowSize {
                cols: q.cols,
                rows: q.rows,
            },
            timeout: Duration::from_millis(q.timeout_ms),
        })
        .await?;
    Ok(ws
        .max_message_size(crate::shell::MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| crate::shell::bridge(socket, input, output)))
}

#[derive(Debug, Deserialize)]
struct FileQuery {
    path: Option<String>,
    /// Octal, as in `chmod`.
    mode: Option<String>,
    recursive: Option<bool>,
}

impl FileQuery {
    fn path(&mut self) -> Result<String, ApiError> {
        match self.path.take() {
            Some(p) if !p.is_empty() => Ok(p),
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_PATH",
                "the `path` query parameter is required",
            )),
        }
    }

    fn mode(&self) -> Result<u32, ApiError> {
        let text = self.mode.as_deref().unwrap_or("644");
        u32::from_str_radix(text, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| ApiError::validation(format!("mode {text:?} is not an octal file mode")))
    }
}

async fn write_file(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    upload(&s, id, q, &headers, body, false).await
}

async fn write_archive(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    upload(&s, id, q, &headers, body, true).await
}

async fn upload(
    s: &ApiState,
    id: String,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
    archive: bool,
) -> Result<Response, ApiError> {
    let mut q = query(q)?;
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let cmd = Command::WriteFile {
        id,
        path: q.path()?,
        mode: q.mode()?,
        archive,
        declared_len,
        body,
    };
    execute(s, cmd).await
}

async fn read_file(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let path = query(q)?.path()?;
    execute(
        &s,
        Command::ReadFile {
            id,
            path,
            archive: false,
        },
    )
    .await
}

async fn read_archive(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let path = query(q)?.path()?;
    execute(
        &s,
        Command::ReadFile {
            id,
            path,
            archive: true,
        },
    )
    .await
}

async fn list_dir(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let path = query(q)?.path()?;
    execute(&s, Command::ListDir { id, path }).await
}

async fn remove_file(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut q = query(q)?;
    let cmd = Command::Remove {
        id,
        path: q.path()?,
        recursive: q.recursive.unwrap_or(false),
    };
    execute(&s, cmd).await
}

async fn read_image(
    State(s): State<Arc<ApiState>>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    if !crate::pulls::is_sha256_hex(&sha256) {
        return Err(ApiError::validation(
            "sha256 must be 64 lowercase hex digits",
        ));
    }
    execute(&s, Command::ReadImage(sha256)).await
}

/// Runs one command.
async fn execute(s: &ApiState, cmd: Command) -> Result<Response, ApiError> {
    let bunkers = &s.bunkers;
    Ok(match cmd {
        Command::CreateBunker(req) => Json(bunkers.create(req).await?).into_response(),
        Command::ListBunkers => Json(bunkers.list()).into_response(),
        Command::GetBunker(id) => Json(bunkers.get(&id)?.info()).into_response(),
        Command::DeleteBunker(id) => {
            bunkers.stop(&id).await?;
            StatusCode::NO_CONTENT.into_response()
        }
        Command::PauseBunker(id) => Json(bunkers.pause(&id).await?).into_response(),
        Command::ResumeBunker(id) => Json(bunkers.resume(&id).await?).into_response(),
        Command::SnapshotBunker(id, req) => Json(bunkers.snapshot(&id, req).await?).into_response(),
        Command::Exec(id, req) => {
            let (agent, bunker_env) = bunkers.agent(&id)?;
            let spec = exec_spec(req, bunker_env)?;
            let outcome = match agent.exec(spec).await {
                Ok(outcome) => outcome,
                // Like a shell: a command that cannot start exits 127 with the reason on stderr.
                Err(AgentError::Agent {
                    code: AgentErrorCode::SpawnFailed,
                    message,
                }) => spawn_failed(message),
                Err(e) => return Err(e.into()),
            };
            Json(exec_result(outcome)).into_response()
        }
        Command::ExecStream(id, req) => {
            let (agent, bunker_env) = bunkers.agent(&id)?;
            let spec = exec_spec(req, bunker_env)?;
            let events = agent.exec_stream(spec).await?;
            (
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                Body::from_stream(ndjson(events)),
            )
                .into_response()
        }
        Command::WriteFile {
            id,
            path,
            mode,
            archive,
            declared_len,
            body,
        } => {
            let limit = s.max_file_bytes;
            if declared_len.is_some_and(|n| n > limit) {
                return Err(too_large(limit));
            }
            let (agent, _) = bunkers.agent(&id)?;
            let body = capped(body, limit);
            let written = if archive {
                agent.write_archive(path, body).await
            } else {
                agent.write_file(path, mode, body).await
            };
            match written {
                Ok(size_bytes) => Json(FileWritten { size_bytes }).into_response(),
                Err(WriteFileError::Body(BodyError::TooLarge)) => return Err(too_large(limit)),
                Err(WriteFileError::Body(BodyError::Read(e))) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BODY_READ_FAILED",
                        format!("reading the upload failed: {e}"),
                    ));
                }
                Err(WriteFileError::Agent(e)) => return Err(e.into()),
            }
        }
        Command::ReadFile { id, path, archive } => {
            let (agent, _) = bunkers.agent(&id)?;
            let (stream, content_type) = if archive {
                (agent.read_archive(path).await?, "application/x-tar")
            } else {
                (agent.read_file(path).await?, "application/octet-stream")
            };
            (
                [(header::CONTENT_TYPE, content_type)],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Command::ListDir { id, path } => {
            let (agent, _) = bunkers.agent(&id)?;
            Json(agent.list_dir(path).await?).into_response()
        }
        Command::Remove {
            id,
            path,
            recursive,
        } => {
            let (agent, _) = bunkers.agent(&id)?;
            agent.remove(path, recursive).await?;
            StatusCode::NO_CONTENT.into_response()
        }
        Command::ReadImage(sha256) => {
            let not_held = || {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "IMAGE_NOT_CACHED",
                    format!("image {sha256} is not in the local cache"),
                )
            };
            let image = bunkers.image_by_sha256(&sha256).ok_or_else(not_held)?;
            let file = match tokio::fs::File::open(&image.path).await {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_held()),
                Err(e) => return Err(ApiError::internal("open a cached image", &e)),
            };
            // The length of the open file, not of the scan: what is sent is what is announced.
            let len = file
                .metadata()
                .await
                .map_err(|e| ApiError::internal("stat a cached image", &e))?
                .len();
            tracing::info!(%sha256, bytes = len, "serving an image to a peer");
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                    file,
                    IMAGE_CHUNK_BYTES,
                )),
            )
                .into_response()
        }
    })
}

fn exec_spec(req: ExecRequest, bunker_env: BTreeMap<String, String>) -> Result<ExecSpec, ApiError> {
    if req.timeout_ms == 0 {
        return Err(ApiError::validation("timeout_ms must be positive"));
    }
    let stdin = req
        .stdin_b64
        .map(|b64| BASE64.decode(b64.as_bytes()).map(Bytes::from))
        .transpose()
        .map_err(|e| ApiError::validation(format!("stdin_b64 is not base64: {e}")))?;
    let mut env = bunker_env;
    env.extend(req.env);
    Ok(ExecSpec {
        program: req.program,
        env,
        cwd: req.cwd,
        user: req.user,
        stdin,
        timeout: Duration::from_millis(req.timeout_ms),
        output_limit_bytes: req.output_limit_bytes,
    })
}

fn spawn_failed(message: String) -> ExecOutcome {
    let mut stderr = message.into_bytes();
    stderr.push(b'\n');
    ExecOutcome {
        exit_code: Some(SPAWN_FAILED_EXIT_CODE),
        signal: None,
        timed_out: false,
        duration_ms: 0,
        stdout_total_bytes: 0,
        stderr_total_bytes: stderr.len() as u64,
        stdout: Vec::new(),
        stderr,
    }
}

fn exec_result(o: ExecOutcome) -> ExecResult {
    ExecResult {
        exit_code: o.exit_code,
        signal: o.signal,
        timed_out: o.timed_out,
        guest_duration_ms: o.duration_ms,
        stdout_b64: BASE64.encode(&o.stdout),
        stderr_b64: BASE64.encode(&o.stderr),
        stdout_total_bytes: o.stdout_total_bytes,
        stderr_total_bytes: o.stderr_total_bytes,
    }
}

/// The body of a streamed exec: one [`ExecStreamEvent`] per line, each output frame as it
/// arrives, then one `exit` or `error` line, then the end. The body pulls from the exec's
/// bounded buffer, so a slow reader holds the agent back instead of filling memory; the
/// body dropped (the client went away) drops the exec stream, which cancels the command.
fn ndjson(events: ExecStream) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures_util::stream::unfold(Some(events), |events| async move {
        let mut events = events?;
        let (lines, more) = match events.next().await? {
            Ok(ExecEvent::Stdout(bytes)) => (
                vec![ExecStreamEvent::Stdout {
                    data_b64: BASE64.encode(&bytes),
                }],
                true,
            ),
            Ok(ExecEvent::Stderr(bytes)) => (
                vec![ExecStreamEvent::Stderr {
                    data_b64: BASE64.encode(&bytes),
                }],
                true,
            ),
            Ok(ExecEvent::Exited(exit)) => (
                vec![ExecStreamEvent::Exit {
                    exit_code: exit.exit_code,
                    signal: exit.signal,
                    timed_out: exit.timed_out,
                    guest_duration_ms: exit.duration_ms,
                    stdout_total_bytes: exit.stdout_total_bytes,
                    stderr_total_bytes: exit.stderr_total_bytes,
                }],
                false,
            ),
            // As in the inline route: a command that cannot start exits 127, reason on stderr.
            Err(AgentError::Agent {
                code: AgentErrorCode::SpawnFailed,
                message,
            }) => (spawn_failed_events(message), false),
            Err(e) => (vec![stream_error(e)], false),
        };
        let mut chunk = Vec::new();
        for line in &lines {
            serde_json::to_writer(&mut chunk, line).expect("stream events always serialise");
            chunk.push(b'\n');
        }
        Some((Ok(Bytes::from(chunk)), more.then_some(events)))
    })
}

fn spawn_failed_events(message: String) -> Vec<ExecStreamEvent> {
    let o = spawn_failed(message);
    vec![
        ExecStreamEvent::Stderr {
            data_b64: BASE64.encode(&o.stderr),
        },
        ExecStreamEvent::Exit {
            exit_code: o.exit_code,
            signal: o.signal,
            timed_out: o.timed_out,
            guest_duration_ms: o.duration_ms,
            stdout_total_bytes: o.stdout_total_bytes,
            stderr_total_bytes: o.stderr_total_bytes,
        },
    ]
}

/// The `error` line that ends a stream whose exec failed after the response began.
pub(crate) fn stream_error(e: AgentError) -> ExecStreamEvent {
    let code = match &e {
        AgentError::Timeout(_) => "TIMEOUT",
        AgentError::WindowExceeded => "AGENT_PROTOCOL_ERROR",
        _ => {
            // The same codes as the inline route; 5xx details are logged there, not sent.
            let api = ApiError::from(e);
            return ExecStreamEvent::Error {
                code: api.code.to_owned(),
                message: api.message,
            };
        }
    };
    ExecStreamEvent::Error {
        code: code.to_owned(),
        message: e.to_string(),
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "FILE_TOO_LARGE",
        format!("uploads are limited to {limit} bytes"),
    )
}

/// Why an upload body stopped.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body exceeds the upload limit")]
    TooLarge,
    #[error("read the request body")]
    Read(#[source] axum::Error),
}

/// How much of an over-limit upload is still read (and discarded) before the refusal is
/// sent, so that a client still writing its body reads the `413` instead of a reset.
const DRAIN_MAX_BYTES: u64 = 8 << 20;
/// How long that draining may take at most.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// The body as a stream that fails once more than `limit` bytes have passed. Before failing
/// it reads what the client still sends, up to [`DRAIN_MAX_BYTES`] or [`DRAIN_MAX`]: a
/// server that answers and closes while the client is mid-body makes the client see a
/// broken pipe rather than the error.
fn capped(body: Body, limit: u64) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
    let chunks = body.into_data_stream();
    futures_util::stream::unfold(Some((chunks, 0u64)), move |state| async move {
        let (mut chunks, seen) = state?;
        let chunk = match chunks.next().await? {
            Ok(chunk) => chunk,
            Err(e) => return Some((Err(BodyError::Read(e)), None)),
        };
        let seen = seen.saturating_add(chunk.len() as u64);
        if seen <= limit {
            return Some((Ok(chunk), Some((chunks, seen))));
        }
        let drain = async {
            let mut drained = 0u64;
            while let Some(Ok(chunk)) = chunks.next().await {
                drained += chunk.len() as u64;
                if drained > DRAIN_MAX_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_MAX, drain).await;
        Some((Err(BodyError::TooLarge), None))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_agent_errors_to_statuses() {
        let cases = [
            (AgentErrorCode::FileNotFound, 404, "FILE_NOT_FOUND"),
            (AgentErrorCode::IsADirectory, 409, "IS_A_DIRECTORY"),
            (AgentErrorCode::NotADirectory, 409, "NOT_A_DIRECTORY"),
            (
                AgentErrorCode::DirectoryNotEmpty,
                409,
                "DIRECTORY_NOT_EMPTY",
            ),
            (AgentErrorCode::InvalidPath, 422, "INVALID_PATH"),
            (AgentErrorCode::PermissionDenied, 403, "PERMISSION_DENIED"),
            (AgentErrorCode::Io, 500, "GUEST_IO_ERROR"),
            (AgentErrorCode::BadRequest, 500, "INTERNAL"),
        ];
        for (code, status, api_code) in cases {
            let e = ApiError::from(AgentError::Agent {
                code,
                message: "m".into(),
            });
            assert_eq!((e.status.as_u16(), e.code), (status, api_code), "{code:?}");
        }
        let gone = ApiError::from(AgentError::Unavailable("closed".into()));
        assert_eq!(
            (gone.status.as_u16(), gone.code),
            (503, "AGENT_UNAVAILABLE")
        );
    }

    #[test]
    fn parses_octal_modes() {
        let q = |mode: Option<&str>| FileQuery {
            path: None,
            mode: mode.map(str::to_owned),
            recursive: None,
        };
        assert_eq!(q(None).mode().expect("default"), 0o644);
        assert_eq!(q(Some("755")).mode().expect("755"), 0o755);
        assert_eq!(q(Some("0600")).mode().expect("0600"), 0o600);
        assert!(q(Some("999")).mode().is_err());
        assert!(q(Some("17777")).mode().is_err());
        assert!(q(Some("rw")).mode().is_err());
    }

    #[test]
    fn spawn_failure_looks_like_a_shell() {
        let r = exec_result(spawn_failed("nosuchcmd: not found".into()));
        assert_eq!(r.exit_code, Some(127));
        assert_eq!(
            BASE64.decode(r.stderr_b64).expect("b64"),
            b"nosuchcmd: not found\n"
        );
    }

    #[test]
    fn stream_errors_keep_the_inline_codes_and_name_timeouts() {
        let code = |e| match stream_error(e) {
            ExecStreamEvent::Error { code, .. } => code,
            other => panic!("not an error: {other:?}"),
        };
        assert_eq!(
            code(AgentError::Unavailable("gone".into())),
            "AGENT_UNAVAILABLE"
        );
        assert_eq!(code(AgentError::Timeout(Duration::from_secs(1))), "TIMEOUT");
        assert_eq!(code(AgentError::WindowExceeded), "AGENT_PROTOCOL_ERROR");
        let events = spawn_failed_events("nosuchcmd: not found".into());
        match &events[..] {
            [
                ExecStreamEvent::Stderr { data_b64 },
                ExecStreamEvent::Exit {
                    exit_code: Some(127),
                    stderr_total_bytes: 21,
                    ..
                },
            ] => assert_eq!(
                BASE64.decode(data_b64).expect("b64"),
                b"nosuchcmd: not found\n"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn token_comparison_accepts_only_the_token() {
        let expected: [u8; 32] = Sha256::digest(b"secret").into();
        assert!(digest_matches(&expected, "secret"));
        assert!(!digest_matches(&expected, "secret "));
        assert!(!digest_matches(&expected, ""));
    }

    #[tokio::test]
    async fn capped_body_fails_past_the_limit() {
        let body = Body::from(vec![0u8; 10]);
        let items: Vec<_> = capped(body, 9).collect().await;
        assert!(matches!(items.last(), Some(Err(BodyError::TooLarge))));
        let body = Body::from(vec![0u8; 10]);
        let items: Vec<_> = capped(body, 10).collect().await;
        assert!(items.iter().all(Result::is_ok));

        // Past the limit, the rest of the body is read before the stream fails, and
        // nothing follows the failure.
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = read.clone();
        let chunks = futures_util::stream::iter(0..4).map(move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 6]))
        });
        let mut stream = Box::pin(capped(Body::from_stream(chunks), 10));
        assert!(matches!(stream.next().await, Some(Ok(_))));
        assert!(matches!(
            stream.next().await,
            Some(Err(BodyError::TooLarge))
        ));
        assert_eq!(
            read.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "the rest was read"
        );
        assert!(stream.next().await.is_none());
    }
}
