//! The worker's HTTP API, which only the controller calls ([`scaibunker_proto::worker`]).
//!
//! Every route under [`WORKER_API_PREFIX`] needs `Authorization: Bearer <credential>`, this
//! worker's credential ([`crate::credentials`]; standalone, its token), compared in constant
//! time; `images/{sha256}` also takes a peer token for that image; `/health` does not. Handlers only parse the request into a
//! [`Command`]; [`execute`] runs every command in one `match`, and errors become
//! `{"code", "message"}` with a status.
//!
//! `exec/stream` answers errors found before the command starts (unknown bunker, not
//! running, a bad request, the agent gone) as plain error responses, like `exec`; after
//! that it is `200` with an NDJSON body
//! ([`ExecStreamEvent`](scaibunker_proto::worker::ExecStreamEvent)) that ends in one `exit`
//! or `error` line. A client that goes away cancels the command.
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
//!
//! The handlers live in a module per resource (`bunkers`, `exec`, `files`, `images`); this
//! one holds the state, the router, the token check, the errors and `execute`.

mod bunkers;
mod exec;
mod files;
mod images;

use std::sync::Arc;

use crate::credentials::Credentials;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use scaibunker_proto::agent::{AgentErrorCode, GuestUser};
use scaibunker_proto::worker::{
    CreateVm, DirListing, ExecRequest, FileWritten, SnapshotVm, WORKER_API_PREFIX, WorkerError,
};

use crate::agent_client::{AgentError, WriteFileError};
use crate::bunker::{BunkerOpError, Bunkers, CreateBunkerError};

use bunkers::{
    create_bunker, delete_bunker, get_bunker, list_bunkers, pause_bunker, resume_bunker,
    snapshot_bunker,
};
pub(crate) use exec::stream_error;
use exec::{exec, exec_result, exec_spec, exec_stream, ndjson, shell, spawn_failed};
use files::{
    BodyError, capped, list_dir, read_archive, read_file, remove_file, too_large, write_archive,
    write_file,
};
use images::read_image;

/// Read size when streaming an image to a peer.
const IMAGE_CHUNK_BYTES: usize = 256 << 10;

/// What the handlers share.
pub struct ApiState {
    pub bunkers: Arc<Bunkers>,
    /// What opens the API: this worker's credential (standalone: its token).
    pub credentials: Arc<Credentials>,
    pub max_file_bytes: u64,
}

impl ApiState {
    pub fn new(bunkers: Arc<Bunkers>, credentials: Arc<Credentials>, max_file_bytes: u64) -> Self {
        Self {
            bunkers,
            credentials,
            max_file_bytes,
        }
    }

    fn token_matches(&self, presented: &str) -> bool {
        self.credentials.accepts(presented)
    }
}

/// The bearer token of a request.
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Every operation of the worker API.
enum Command {
    CreateBunker(Box<CreateVm>),
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
        user: GuestUser,
        archive: bool,
        declared_len: Option<u64>,
        body: Body,
    },
    /// A file, or with `archive` the directory `path` as a tar stream.
    ReadFile {
        id: String,
        path: String,
        user: GuestUser,
        archive: bool,
    },
    /// One page of a directory.
    ListDir {
        id: String,
        path: String,
        user: GuestUser,
        after_hex: Option<String>,
        limit: u32,
    },
    Remove {
        id: String,
        path: String,
        recursive: bool,
        user: GuestUser,
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
            CreateBunkerError::Stopping => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "WORKER_STOPPING", message)
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
                        (StatusCode::FORBIDDEN, "FILE_PERMISSION_DENIED")
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
            AgentError::RequestTooLarge(n) => Self::validation(format!(
                "the request is {n} bytes once encoded, over the agent channel's frame limit; send large scripts as a file or through stdin"
            )),
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
        .route(
            "/bunkers/{id}/files/archive",
            get(read_archive).put(write_archive),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        // Peers fetch images with a peer token for that image; the handler checks it.
        .route("/images/{sha256}", get(read_image))
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
    match bearer(req.headers()) {
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

/// Prometheus text: the image pull and cache counters (no secrets, so no token, like `/health`).
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
         scaibunker_worker_image_pulls_total{{outcome=\"failed\"}} {}\n\
         # HELP scaibunker_worker_image_evictions_total Pulled images evicted to make room for a pull.\n\
         # TYPE scaibunker_worker_image_evictions_total counter\n\
         scaibunker_worker_image_evictions_total {}\n\
         # HELP scaibunker_worker_image_cache_bytes Bytes of the pulled images held.\n\
         # TYPE scaibunker_worker_image_cache_bytes gauge\n\
         scaibunker_worker_image_cache_bytes {}\n",
        c.peer_bytes,
        c.proxy_bytes,
        c.completed,
        c.failed,
        c.evicted,
        s.bunkers.pulls().held_bytes()
    );
    let mut text = text;
    if let Some(networks) = s.bunkers.networks() {
        text.push_str(&network_metrics(&networks.counters()));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The bunker networks' part of `/metrics`.
fn network_metrics(c: &crate::network::NetworkCounters) -> String {
    let a = &c.audit;
    format!(
        "# HELP scaibunker_worker_network_setups_total Bunker network setups, by outcome.\n\
         # TYPE scaibunker_worker_network_setups_total counter\n\
         scaibunker_worker_network_setups_total{{outcome=\"ok\"}} {}\n\
         scaibunker_worker_network_setups_total{{outcome=\"failed\"}} {}\n\
         # HELP scaibunker_worker_network_setup_seconds_total Time the successful setups took.\n\
         # TYPE scaibunker_worker_network_setup_seconds_total counter\n\
         scaibunker_worker_network_setup_seconds_total {:.3}\n\
         # HELP scaibunker_worker_networked_bunkers Bunkers with a network now.\n\
         # TYPE scaibunker_worker_networked_bunkers gauge\n\
         scaibunker_worker_networked_bunkers {}\n\
         # HELP scaibunker_worker_egress_lines_total Egress audit lines of ended bunker networks, by verdict.\n\
         # TYPE scaibunker_worker_egress_lines_total counter\n\
         scaibunker_worker_egress_lines_total{{verdict=\"allowed\"}} {}\n\
         scaibunker_worker_egress_lines_total{{verdict=\"denied\"}} {}\n\
         # HELP scaibunker_worker_egress_lost_events_total Events reported lost in gap lines.\n\
         # TYPE scaibunker_worker_egress_lost_events_total counter\n\
         scaibunker_worker_egress_lost_events_total {}\n\
         # HELP scaibunker_worker_egress_batches_total Audit batches, by outcome.\n\
         # TYPE scaibunker_worker_egress_batches_total counter\n\
         scaibunker_worker_egress_batches_total{{outcome=\"put\"}} {}\n\
         scaibunker_worker_egress_batches_total{{outcome=\"failed\"}} {}\n\
         scaibunker_worker_egress_batches_total{{outcome=\"dropped\"}} {}\n",
        c.setups_ok,
        c.setups_failed,
        c.setup_ms_total as f64 / 1000.0,
        c.active,
        a.allowed,
        a.denied,
        a.lost,
        a.batches_put,
        a.batches_failed,
        a.batches_dropped,
    )
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::validation(e.body_text()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::validation(e.body_text()))
}

/// Runs one command.
async fn execute(s: &ApiState, cmd: Command) -> Result<Response, ApiError> {
    let bunkers = &s.bunkers;
    Ok(match cmd {
        Command::CreateBunker(req) => Json(bunkers.create(*req).await?).into_response(),
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
            user,
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
                agent.write_archive(path, user, body).await
            } else {
                agent.write_file(path, mode, user, body).await
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
        Command::ReadFile {
            id,
            path,
            user,
            archive,
        } => {
            let (agent, _) = bunkers.agent(&id)?;
            let (stream, content_type) = if archive {
                (agent.read_archive(path, user).await?, "application/x-tar")
            } else {
                (
                    agent.read_file(path, user).await?,
                    "application/octet-stream",
                )
            };
            (
                [(header::CONTENT_TYPE, content_type)],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Command::ListDir {
            id,
            path,
            user,
            after_hex,
            limit,
        } => {
            let (agent, _) = bunkers.agent(&id)?;
            let page = agent.list_dir(path, user, after_hex, limit).await?;
            Json(DirListing {
                entries: page.entries,
                next_cursor: page.next_after_hex,
            })
            .into_response()
        }
        Command::Remove {
            id,
            path,
            recursive,
            user,
        } => {
            let (agent, _) = bunkers.agent(&id)?;
            agent.remove(path, recursive, user).await?;
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
            (
                AgentErrorCode::PermissionDenied,
                403,
                "FILE_PERMISSION_DENIED",
            ),
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
}
