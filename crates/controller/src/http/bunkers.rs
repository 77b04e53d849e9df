//! `/bunkers`: create, list, get, delete, pause, resume, exec. Each handler's `#[utoipa::path]`
//! is its entry in the generated OpenAPI document (`GET /openapi.json`).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use scaibunker_api::bunkers::{Bunker, CreateBunker};
use scaibunker_api::envelope::{DEFAULT_PAGE_LIMIT, Error, List, MAX_PAGE_LIMIT, Ok as Envelope};
use scaibunker_api::exec::{ExecRequest, ExecResult};
use serde::Deserialize;

use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::exec_stream;
use super::extract::{ApiJson, Caller, Ctx};
use crate::service::Services;
use crate::service::bunkers::{self as svc, to_api};
use crate::store::bunkers::BunkerFilter;
use crate::workers::Pause;

/// Creates a bunker; with `wait` (default) answers once it is `running` or `failed`.
#[utoipa::path(
    post,
    path = "/bunkers",
    operation_id = "create_bunker",
    tag = "bunkers",
    request_body = CreateBunker,
    responses(
        (status = 201, description = "The bunker record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`, `LIFECYCLE_MODE_DENIED` or `NETWORK_PROFILE_DENIED`", body = Error),
        (status = 404, description = "`IMAGE_NOT_FOUND` or `SNAPSHOT_NOT_FOUND`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` (one `details` entry per field), `INTERFACES_NOT_ALLOWED` or `TRANSIT_MISSING_INTERFACES`", body = Error),
        (status = 429, description = "`RATE_LIMITED` (see `Retry-After`) or `BUNKER_QUOTA_EXCEEDED`", body = Error),
        (status = 503, description = "`WORKER_UNAVAILABLE` (no capacity) or `NO_SUITABLE_WORKER` (no worker holds the image)", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    ApiJson(req): ApiJson<CreateBunker>,
) -> Result<(StatusCode, Json<Envelope<Bunker>>), ApiError> {
    let row = svc::create(&s, &p, &ctx, req).await?;
    Ok((StatusCode::CREATED, Json(Envelope::new(to_api(&row)))))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only bunkers in this status, e.g. `running`.
    status: Option<String>,
    /// Only bunkers of this lifecycle mode (`ephemeral`, `session`, `persistent`).
    lifecycle: Option<String>,
    /// `key=value`; repeatable as a comma-separated list.
    #[param(pattern = "^([^,]*=[^,]*)?(,([^,]*=[^,]*)?)*$")]
    label: Option<String>,
    /// Page size, 1–500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^-?[0-9]{1,18}\.bnk_[a-z0-9]{1,64}$")]
    cursor: Option<String>,
}

/// Lists the caller's tenant's bunkers, newest first (a platform super admin sees all).
#[utoipa::path(
    get,
    path = "/bunkers",
    operation_id = "list_bunkers",
    tag = "bunkers",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of bunker records", body = List<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(s): State<Services>,
    Caller(p): Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<List<Bunker>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::query(&e))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(ApiError::validation(vec![
            scaibunker_api::envelope::FieldDetail {
                field: "limit".into(),
                message: format!("must be between 1 and {MAX_PAGE_LIMIT}"),
            },
        ]));
    }
    let labels = q
        .label
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => Err(ApiError::validation(vec![
                scaibunker_api::envelope::FieldDetail {
                    field: "label".into(),
                    message: "use key=value".into(),
                },
            ])),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = BunkerFilter {
        status: q.status,
        lifecycle_mode: q.lifecycle,
        labels,
    };
    let listing = svc::list(&s, &p, &filter, q.cursor.as_deref(), limit).await?;
    Ok(Json(List {
        status: "ok".into(),
        data: listing.rows.iter().map(to_api).collect(),
        has_more: listing.next_cursor.is_some(),
        next_cursor: listing.next_cursor,
    }))
}

/// One bunker record.
#[utoipa::path(
    get,
    path = "/bunkers/{id}",
    operation_id = "get_bunker",
    tag = "bunkers",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)")),
    responses(
        (status = 200, description = "The bunker record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown or another tenant's bunker", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::get(&s, &p, &id).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Take a final `full` snapshot first (the bunker must be running); its id is in the
    /// `x-snapshot-id` header. If the snapshot fails, the bunker is not deleted.
    snapshot: Option<bool>,
}

/// Stops the bunker's VM and answers with the `terminated` record; quota is released.
#[utoipa::path(
    delete,
    path = "/bunkers/{id}",
    operation_id = "delete_bunker",
    tag = "bunkers",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), DeleteQuery),
    responses(
        (status = 200, description = "The terminated bunker record; with `snapshot=true` the final snapshot's id is in the `x-snapshot-id` header", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown or another tenant's bunker", body = Error),
        (status = 409, description = "`BUNKER_INVALID_TRANSITION`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::query(&e))?;
    let snapshot = if q.snapshot == Some(true) {
        let req = scaibunker_api::snapshots::CreateSnapshot::default();
        let check = crate::service::snapshots::StorageCheck::Enforced;
        match crate::service::snapshots::create(&s, &p, &ctx, &id, req, check).await {
            Ok(snap) => Some(snap),
            // A bunker that already ended has nothing to snapshot; its delete answers as usual.
            Err(svc::BunkerError::NotRunning(status)) if status.is_terminal() => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let row = svc::delete(&s, &p, &ctx, &id).await?;
    let mut resp = Json(Envelope::new(to_api(&row))).into_response();
    if let Some(snap) = snapshot
        && let Ok(v) = axum::http::HeaderValue::from_str(&snap.id)
    {
        resp.headers_mut().insert("x-snapshot-id", v);
    }
    Ok(resp)
}

/// Runs a command in the bunker and answers with its exit code and output.
///
/// Inline (`{"status":"ok","data": result}`) or, with `stream: true`, Server-Sent Events whose
/// exec id is also in the `x-exec-id` header (for resuming).
#[utoipa::path(
    post,
    path = "/bunkers/{id}/exec",
    operation_id = "exec",
    tag = "exec",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "The finished command (JSON), or with `stream: true` Server-Sent Events `stdout`, `stderr`, `exit`, `error`, each with an `id:`, ending with `data: [DONE]`; the exec id is in the `x-exec-id` header", content(
            (Envelope<ExecResult> = "application/json"),
            (String = "text/event-stream")
        )),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:execute`, or `scaibunker:root` for `user: root`)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown or another tenant's bunker", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`, or with `stream: true` `STREAM_BUDGET_EXCEEDED` (the controller's stream resume buffers, in total or the tenant's, are taken by running streamed execs; nothing started); see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn exec(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Response, ApiError> {
    if req.stream == Some(true) {
        let buffer = crate::service::exec_stream::start(&s, &p, &ctx, &id, req).await?;
        let exec_id = buffer.exec_id.clone();
        let mut resp = exec_stream::sse(buffer, 0).into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(&exec_id) {
            resp.headers_mut().insert("x-exec-id", v);
        }
        return Ok(resp);
    }
    let out: ExecResult = svc::exec(&s, &p, &ctx, &id, req).await?;
    Ok(Json(Envelope::new(out)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Alternative to the `Last-Event-ID` header.
    last_event_id: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/bunkers/{id}/exec/{exec_id}/events",
    operation_id = "exec_events",
    tag = "exec",
    params(
        ("id" = String, Path, description = "Bunker id (`bnk_…`)"),
        ("exec_id" = String, Path, description = "Exec id (`exe_…`) from the `x-exec-id` header"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id"),
        EventsQuery
    ),
    responses(
        (status = 200, description = "The exec's Server-Sent Events after `Last-Event-ID` (all of them without it), live until `data: [DONE]`; a resume from before the kept window gets an `error` event `RESUME_WINDOW_EXCEEDED`", content_type = "text/event-stream", body = String),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:execute`)", body = Error),
        (status = 404, description = "`EXEC_NOT_FOUND`: unknown, another tenant's, or finished more than 10 minutes ago on this controller", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
/// Resumes a streamed exec after `Last-Event-ID`.
pub async fn exec_events(
    State(s): State<Services>,
    Caller(p): Caller,
    Path((id, exec_id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    q: super::records::QueryResult<EventsQuery>,
) -> Result<Response, ApiError> {
    let q = super::records::query(q)?;
    let buffer = crate::service::exec_stream::find(&s, &p, &id, &exec_id)?;
    let after = exec_stream::resume_point(&headers, q.last_event_id);
    Ok(exec_stream::sse(buffer, after).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OutputQuery {
    /// `stdout` (default) or `stderr`.
    #[param(pattern = "^(stdout|stderr)$")]
    stream: Option<String>,
}

/// Streams the whole output of an exec whose result was `truncated` (its `full_output_ref`).
#[utoipa::path(
    get,
    path = "/bunkers/{id}/exec/{exec_id}/output",
    operation_id = "exec_output",
    tag = "exec",
    params(
        ("id" = String, Path, description = "Bunker id (`bnk_…`)"),
        ("exec_id" = String, Path, description = "The exec's id"),
        OutputQuery
    ),
    responses(
        (status = 200, description = "The pipe's bytes, streamed", content(("application/octet-stream"))),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:execute`)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND` or `OUTPUT_NOT_FOUND` (the output fit inline, or no such exec)", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`: `stream` is not `stdout` or `stderr`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`STORAGE_BACKEND_ERROR`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn exec_output(
    State(s): State<Services>,
    Caller(p): Caller,
    Path((id, exec_id)): Path<(String, String)>,
    q: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    use crate::service::exec_output::{self, OutputPipe};
    let Query(q) = q.map_err(|e| ApiError::query(&e))?;
    let pipe = OutputPipe::parse(q.stream.as_deref().unwrap_or("stdout")).ok_or_else(|| {
        ApiError::validation(vec![scaibunker_api::envelope::FieldDetail {
            field: "stream".into(),
            message: "must be `stdout` or `stderr`".into(),
        }])
    })?;
    let read = exec_output::read(&s, &p, &id, &exec_id, pipe).await?;
    let len = read.meta.size_bytes.to_string();
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_owned(),
            ),
            (axum::http::header::CONTENT_LENGTH, len),
        ],
        axum::body::Body::from_stream(read.body),
    )
        .into_response())
}

/// Pauses the bunker's VM.
#[utoipa::path(
    post,
    path = "/bunkers/{id}/pause",
    operation_id = "pause_bunker",
    tag = "bunkers",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)")),
    responses(
        (status = 200, description = "The paused bunker record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown or another tenant's bunker", body = Error),
        (status = 409, description = "`BUNKER_INVALID_TRANSITION`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn pause(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::set_paused(&s, &p, &ctx, &id, Pause::Pause).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}

/// Resumes a paused bunker's VM.
#[utoipa::path(
    post,
    path = "/bunkers/{id}/resume",
    operation_id = "resume_bunker",
    tag = "bunkers",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)")),
    responses(
        (status = 200, description = "The running bunker record", body = Envelope<Bunker>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown or another tenant's bunker", body = Error),
        (status = 409, description = "`BUNKER_INVALID_TRANSITION`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::set_paused(&s, &p, &ctx, &id, Pause::Resume).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}
