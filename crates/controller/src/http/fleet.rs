//! Worker-only routes (registration and heartbeats, worker token) and the admin worker routes.

use axum::Json;
use axum::extract::{Path, State};
use scaibunker_api::envelope::{Error, Ok as Envelope};
use scaibunker_api::workers::Worker;
use scaibunker_proto::worker::{
    Heartbeat, HeartbeatResponse, RegisterRequest, RegisterResponse, StoppingResponse,
};

use super::error::ApiError;
use super::extract::{ApiJson, Caller, Ctx, RegisterBearer, WorkerAuth};
use crate::service::{Services, fleet, worker_credentials, worker_stop};

/// A worker daemon announces itself (the join token for a name without a credential, else the
/// worker's own credential); the body is `RegisterRequest` of `crates/proto/src/worker.rs`.
#[utoipa::path(
    post,
    path = "/workers/register",
    operation_id = "register_worker",
    tag = "internal",
    request_body = Object,
    responses(
        (status = 200, description = "`RegisterResponse`: the worker's id and credential", body = Object),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID` (the join token or the worker's credential)", body = Error),
        (status = 403, description = "`WORKER_MISMATCH`: the credential is another worker's", body = Error),
        (status = 409, description = "`PROTOCOL_MISMATCH`, or `WORKER_CREDENTIAL_REQUIRED`: the join token for a name that holds a credential", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn register(
    State(s): State<Services>,
    RegisterBearer(auth): RegisterBearer,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    Ok(Json(fleet::register(&s, auth, req).await?))
}

/// A worker daemon reports its capacity and bunkers (its own credential, for its own id); the
/// body is `Heartbeat` of `crates/proto/src/worker.rs`.
#[utoipa::path(
    post,
    path = "/heartbeat",
    operation_id = "heartbeat",
    tag = "internal",
    request_body = Object,
    responses(
        (status = 200, description = "`HeartbeatResponse`: bunkers the worker must stop; `known: false` tells an unknown worker to register again", body = Object),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID` (the worker's credential)", body = Error),
        (status = 403, description = "`WORKER_MISMATCH`: the credential is another worker's", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn heartbeat(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    Ok(Json(fleet::heartbeat(&s, &ident, hb).await?))
}

/// A worker daemon stopping on purpose (SIGTERM) asks for its bunkers to be saved (its own
/// credential, for its own id): `session` and `persistent` ones are passivated through `full`
/// snapshots, `ephemeral` ones end; it answers once each is dealt with, and the worker then
/// stops its VMs.
#[utoipa::path(
    post,
    path = "/workers/{id}/stopping",
    operation_id = "worker_stopping",
    tag = "internal",
    params(("id" = String, Path, description = "Worker id (`wrk_…`)")),
    responses(
        (status = 200, description = "`StoppingResponse`: the bunkers passivated, terminated and failed", body = Object),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID` (the worker's credential)", body = Error),
        (status = 403, description = "`WORKER_MISMATCH`: the credential is another worker's", body = Error),
        (status = 404, description = "`WORKER_NOT_FOUND`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn stopping(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Path(id): Path<String>,
) -> Result<Json<StoppingResponse>, ApiError> {
    Ok(Json(worker_stop::stopping(&s, &ident, &id).await?))
}

/// Lists workers (`scaibunker:admin`).
#[utoipa::path(
    get,
    path = "/workers",
    operation_id = "list_workers",
    tag = "workers",
    responses(
        (status = 200, description = "Every worker", body = Envelope<Vec<Worker>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin`)", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn workers(
    State(s): State<Services>,
    Caller(p): Caller,
) -> Result<Json<Envelope<Vec<Worker>>>, ApiError> {
    Ok(Json(Envelope::new(fleet::workers(&s, &p).await?)))
}

/// One worker (`scaibunker:admin`).
#[utoipa::path(
    get,
    path = "/workers/{id}",
    operation_id = "get_worker",
    tag = "workers",
    params(("id" = String, Path, description = "Worker id (`wrk_…`)")),
    responses(
        (status = 200, description = "The worker", body = Envelope<Worker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin`)", body = Error),
        (status = 404, description = "`WORKER_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn worker(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Worker>>, ApiError> {
    Ok(Json(Envelope::new(fleet::worker(&s, &p, &id).await?)))
}

/// Stops placing new bunkers on a worker; running ones keep running.
#[utoipa::path(
    post,
    path = "/workers/{id}/drain",
    operation_id = "drain_worker",
    tag = "workers",
    params(("id" = String, Path, description = "Worker id (`wrk_…`)")),
    responses(
        (status = 200, description = "The draining worker", body = Envelope<Worker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin`)", body = Error),
        (status = 404, description = "`WORKER_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn drain(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Worker>>, ApiError> {
    Ok(Json(Envelope::new(
        fleet::set_draining(&s, &p, &id, true).await?,
    )))
}

/// Places bunkers on a drained worker again.
#[utoipa::path(
    post,
    path = "/workers/{id}/resume",
    operation_id = "resume_worker",
    tag = "workers",
    params(("id" = String, Path, description = "Worker id (`wrk_…`)")),
    responses(
        (status = 200, description = "The worker", body = Envelope<Worker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin`)", body = Error),
        (status = 404, description = "`WORKER_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Worker>>, ApiError> {
    Ok(Json(Envelope::new(
        fleet::set_draining(&s, &p, &id, false).await?,
    )))
}

/// Records a host bridge a worker offers to `transit` bunkers (`scaibunker:admin`).
#[utoipa::path(
    post,
    path = "/bridges",
    operation_id = "create_bridge",
    tag = "workers",
    request_body = scaibunker_api::workers::CreateBridge,
    responses(
        (status = 201, description = "The bridge", body = Envelope<scaibunker_api::workers::Bridge>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin`)", body = Error),
        (status = 404, description = "`WORKER_NOT_FOUND`", body = Error),
        (status = 409, description = "`NAME_TAKEN`: the worker has a bridge of that name", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_bridge(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<scaibunker_api::workers::CreateBridge>,
) -> super::platform::Created<scaibunker_api::workers::Bridge> {
    super::platform::created(fleet::create_bridge(&s, &p, req).await?)
}

/// Lists bridges by worker (`scaibunker:admin`).
#[utoipa::path(
    get,
    path = "/bridges",
    operation_id = "list_bridges",
    tag = "workers",
    responses(
        (status = 200, description = "The bridges", body = Envelope<Vec<scaibunker_api::workers::Bridge>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin`)", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn bridges(
    State(s): State<Services>,
    Caller(p): Caller,
) -> Result<Json<Envelope<Vec<scaibunker_api::workers::Bridge>>>, ApiError> {
    Ok(Json(Envelope::new(fleet::bridges(&s, &p).await?)))
}

/// Removes a bridge record (`scaibunker:admin`); new `transit` bunkers naming it no longer
/// land on that worker.
#[utoipa::path(
    delete,
    path = "/bridges/{id}",
    operation_id = "delete_bridge",
    tag = "workers",
    params(("id" = String, Path, description = "Bridge id (`brg_…`)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin`)", body = Error),
        (status = 404, description = "`BRIDGE_NOT_FOUND`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn delete_bridge(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    fleet::delete_bridge(&s, &p, &id).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Rotates a worker's credential (`scaibunker:admin:platform`): the previous one works until
/// the worker has used the new one, which its next heartbeat answer hands it.
#[utoipa::path(
    post,
    path = "/workers/{id}/credential/rotate",
    operation_id = "rotate_worker_credential",
    tag = "workers",
    params(("id" = String, Path, description = "Worker id")),
    responses(
        (status = 204, description = "Rotated"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:platform`)", body = Error),
        (status = 404, description = "`WORKER_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn rotate_credential(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    worker_credentials::change(&s, &p, &ctx, &id, false).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Resets a worker's credential (`scaibunker:admin:platform`): it stops working at once, and
/// the join token may register the worker's name again (a worker that lost its data directory).
#[utoipa::path(
    post,
    path = "/workers/{id}/credential/reset",
    operation_id = "reset_worker_credential",
    tag = "workers",
    params(("id" = String, Path, description = "Worker id")),
    responses(
        (status = 204, description = "Reset"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:platform`)", body = Error),
        (status = 404, description = "`WORKER_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn reset_credential(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    worker_credentials::change(&s, &p, &ctx, &id, true).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
