//! The backchannel's routes: what a bunker's guest calls as `/v1/self…` on its socket,
//! forwarded by the bunker's worker to `/internal/bunkers/{id}/self…` with the worker's own
//! credential (`service::backchannel`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use scaibunker_api::bunkers::{Bunker, CreateBunker};
use scaibunker_api::codes;
use scaibunker_api::envelope::{Error, Ok as Envelope};

use super::error::ApiError;
use super::extract::{ApiJson, Ctx, WorkerAuth};
use crate::service::Services;
use crate::service::backchannel::{self as svc, BackchannelError};
use crate::service::bunkers::{BunkerError, to_api};

impl From<BackchannelError> for ApiError {
    fn from(e: BackchannelError) -> Self {
        use BackchannelError as B;
        let msg = e.to_string();
        match e {
            // The bunker's own outcomes read as they do on the public routes.
            B::NotFound => BunkerError::NotFound.into(),
            B::NotRunning(status) => BunkerError::NotRunning(status).into(),
            B::Validation(errs) => BunkerError::Validation(errs).into(),
            B::RateLimited { retry_after } => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, codes::RATE_LIMITED, msg);
                e.retry_after_s = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
                e
            }
            B::ProfileWider(_) => {
                Self::new(StatusCode::FORBIDDEN, codes::NETWORK_PROFILE_DENIED, msg)
            }
            B::ChildLimit(_) => {
                Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg)
            }
            B::LabelsBusy => Self::new(StatusCode::CONFLICT, codes::CONFLICT, msg),
            B::OwnerGone => Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg),
            B::Bunker(e) => e.into(),
            B::Store(e) => BunkerError::Store(e).into(),
        }
    }
}

/// The event an audit row records.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct EventRecorded {
    /// The audit row's id (`aud_…`).
    pub id: String,
}

/// The calling bunker's own record, as the public API shows it (no `env_vars` values).
#[utoipa::path(
    get,
    path = "/internal/bunkers/{id}/self",
    operation_id = "backchannel_self",
    tag = "internal",
    params(("id" = String, Path, description = "The calling bunker (`bnk_…`), which must run on the calling worker")),
    responses(
        (status = 200, description = "The bunker record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID` (the worker's credential)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown, or not on this worker", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn self_record(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::authorize(&s, &ident, &id).await?;
    Ok(Json(Envelope::new(svc::self_record(&s, &row, &ctx).await?)))
}

/// Sets one metadata entry of the calling bunker: the raw body (UTF-8, at most 256 bytes)
/// becomes its label `key`.
#[utoipa::path(
    put,
    path = "/internal/bunkers/{id}/self/metadata/{key}",
    operation_id = "backchannel_set_metadata",
    tag = "internal",
    params(
        ("id" = String, Path, description = "The calling bunker (`bnk_…`)"),
        ("key" = String, Path, description = "1–63 letters, digits, `-`, `_`, `.`"),
    ),
    request_body(content = String, content_type = "text/plain"),
    responses(
        (status = 200, description = "The updated bunker record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn set_metadata(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Ctx(ctx): Ctx,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::authorize(&s, &ident, &id).await?;
    Ok(Json(Envelope::new(
        svc::set_metadata(&s, &row, &ctx, &key, &body).await?,
    )))
}

/// Records an event of the calling bunker in the audit (`bunker.event`, actor type
/// `bunker`). Body: `{kind, message?, data?}`, at most 16 KiB.
#[utoipa::path(
    post,
    path = "/internal/bunkers/{id}/self/events",
    operation_id = "backchannel_event",
    tag = "internal",
    params(("id" = String, Path, description = "The calling bunker (`bnk_…`)")),
    request_body = Object,
    responses(
        (status = 201, description = "The audit row's id", body = Envelope<EventRecorded>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn event(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Envelope<EventRecorded>>), ApiError> {
    let row = svc::authorize(&s, &ident, &id).await?;
    let id = svc::record_event(&s, &row, &ctx, &body).await?;
    Ok((
        StatusCode::CREATED,
        Json(Envelope::new(EventRecorded { id })),
    ))
}

/// Creates a child bunker of the calling bunker: same tenant, as its owner, a network
/// profile no wider than its own, `ephemeral` and `wait: false` unless asked, the parent's
/// image unless one is named.
#[utoipa::path(
    post,
    path = "/internal/bunkers/{id}/self/children",
    operation_id = "backchannel_create_child",
    tag = "internal",
    params(("id" = String, Path, description = "The calling bunker (`bnk_…`)")),
    request_body = CreateBunker,
    responses(
        (status = 201, description = "The child's record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`NETWORK_PROFILE_DENIED` (wider than the parent's), `AUTHZ_PERMISSION_DENIED` (depth or count limit), `LIFECYCLE_MODE_DENIED`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND` or `IMAGE_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED` or `BUNKER_QUOTA_EXCEEDED`", body = Error),
        (status = 503, description = "`WORKER_UNAVAILABLE` or `NO_SUITABLE_WORKER`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn create_child(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateBunker>,
) -> Result<(StatusCode, Json<Envelope<Bunker>>), ApiError> {
    let row = svc::authorize(&s, &ident, &id).await?;
    let child = svc::create_child(&s, &row, &ctx, req).await?;
    Ok((StatusCode::CREATED, Json(Envelope::new(to_api(&child)))))
}

/// The calling bunker's children, newest first (at most 100).
#[utoipa::path(
    get,
    path = "/internal/bunkers/{id}/self/children",
    operation_id = "backchannel_children",
    tag = "internal",
    params(("id" = String, Path, description = "The calling bunker (`bnk_…`)")),
    responses(
        (status = 200, description = "The children's records", body = Envelope<Vec<Bunker>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn children(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Vec<Bunker>>>, ApiError> {
    let row = svc::authorize(&s, &ident, &id).await?;
    let rows = svc::children(&s, &row, &ctx).await?;
    Ok(Json(Envelope::new(rows.iter().map(to_api).collect())))
}

/// Ends one of the calling bunker's own children; any other bunker is `404`.
#[utoipa::path(
    delete,
    path = "/internal/bunkers/{id}/self/children/{child_id}",
    operation_id = "backchannel_delete_child",
    tag = "internal",
    params(
        ("id" = String, Path, description = "The calling bunker (`bnk_…`)"),
        ("child_id" = String, Path, description = "One of its children (`bnk_…`)"),
    ),
    responses(
        (status = 200, description = "The child's terminated record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: not the caller's child", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn delete_child(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Ctx(ctx): Ctx,
    Path((id, child_id)): Path<(String, String)>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::authorize(&s, &ident, &id).await?;
    let ended = svc::delete_child(&s, &row, &ctx, &child_id).await?;
    Ok(Json(Envelope::new(to_api(&ended))))
}
