//! `GET /bunkers/{id}/exec-log`, `GET /audit` and the platform's `GET /v1/audit-log` (the same
//! query, registered twice because each OpenAPI operation has one path).

use axum::Json;
use axum::extract::{Path, Query, State};
use scaibunker_api::audit::AuditEvent;
use scaibunker_api::envelope::{DEFAULT_PAGE_LIMIT, Error, FieldDetail, List, MAX_PAGE_LIMIT};
use scaibunker_api::exec::ExecLogEntry;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Caller;
use crate::service::Services;
use crate::service::bunkers::parse_rfc3339;
use crate::service::records::{self, Page};
use crate::store::audit::AuditFilter;

pub(super) type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

pub(super) fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::query(&e))
}

fn limit(l: Option<u32>) -> Result<u32, ApiError> {
    let l = l.unwrap_or(DEFAULT_PAGE_LIMIT);
    if l == 0 || l > MAX_PAGE_LIMIT {
        return Err(ApiError::validation(vec![FieldDetail {
            field: "limit".into(),
            message: format!("must be between 1 and {MAX_PAGE_LIMIT}"),
        }]));
    }
    Ok(l)
}

fn list<T>(page: Page<T>) -> Json<List<T>> {
    Json(List {
        status: "ok".into(),
        data: page.items,
        has_more: page.next_cursor.is_some(),
        next_cursor: page.next_cursor,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1–500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^-?[0-9]{1,18}\.[^\x00]*$")]
    cursor: Option<String>,
}

/// The bunker's exec log, newest first.
#[utoipa::path(
    get,
    path = "/bunkers/{id}/exec-log",
    operation_id = "exec_log",
    tag = "exec",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), PageQuery),
    responses(
        (status = 200, description = "A page of exec-log rows", body = List<ExecLogEntry>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn exec_log(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
    q: QueryResult<PageQuery>,
) -> Result<Json<List<ExecLogEntry>>, ApiError> {
    let q = query(q)?;
    let page = records::exec_log(&s, &p, &id, q.cursor.as_deref(), limit(q.limit)?).await?;
    Ok(list(page))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Events at or after this RFC 3339 time.
    #[param(format = DateTime)]
    start: Option<String>,
    /// Events before this RFC 3339 time.
    #[param(format = DateTime)]
    end: Option<String>,
    /// e.g. `bunker.exec`.
    action: Option<String>,
    actor_id: Option<String>,
    resource_type: Option<String>,
    resource_id: Option<String>,
    /// e.g. `success`.
    status: Option<String>,
    /// Page size, 1–500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^-?[0-9]{1,18}\.[^\x00]*$")]
    cursor: Option<String>,
}

pub(super) fn time_param(field: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|t| {
        parse_rfc3339(t).ok_or_else(|| {
            ApiError::validation(vec![FieldDetail {
                field: field.into(),
                message: "must be an RFC 3339 UTC timestamp, e.g. 2026-11-28T10:00:00Z".into(),
            }])
        })
    })
    .transpose()
}

/// The module's audit events, newest first.
#[utoipa::path(
    get,
    path = "/audit",
    operation_id = "module_audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of audit events", body = List<AuditEvent>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn audit(
    State(s): State<Services>,
    Caller(p): Caller,
    q: QueryResult<AuditQuery>,
) -> Result<Json<List<AuditEvent>>, ApiError> {
    let q = query(q)?;
    let filter = AuditFilter {
        start_ms: time_param("start", q.start.as_deref())?,
        end_ms: time_param("end", q.end.as_deref())?,
        action: q.action,
        actor_id: q.actor_id,
        resource_type: q.resource_type,
        resource_id: q.resource_id,
        status: q.status,
    };
    let page = records::audit_log(&s, &p, &filter, q.cursor.as_deref(), limit(q.limit)?).await?;
    Ok(list(page))
}

/// The platform's audit log, newest first: the same events and filters as the module's `/audit`.
#[utoipa::path(
    get,
    path = "/v1/audit-log",
    operation_id = "audit_log",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of audit events", body = List<AuditEvent>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn audit_log(
    s: State<Services>,
    caller: Caller,
    q: QueryResult<AuditQuery>,
) -> Result<Json<List<AuditEvent>>, ApiError> {
    audit(s, caller, q).await
}
