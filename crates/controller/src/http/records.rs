//! `GET /bunkers/{id}/exec-log`, `GET /bunkers/{id}/egress`, `GET /audit` and the platform's
//! `GET /v1/audit-log` (the same query, registered twice because each OpenAPI operation has one
//! path).

use axum::Json;
use axum::extract::{Path, Query, State};
use scaibunker_api::audit::AuditEvent;
use scaibunker_api::egress::EgressPage;
use scaibunker_api::envelope::{
    DEFAULT_PAGE_LIMIT, Error, FieldDetail, List, MAX_PAGE_LIMIT, Ok as Envelope,
};
use scaibunker_api::exec::ExecLogEntry;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Caller;
use crate::service::Services;
use crate::service::bunkers::parse_rfc3339;
use crate::service::egress::{self, EgressQuery};
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

/// Default page size of `GET /bunkers/{id}/egress`.
const EGRESS_DEFAULT_LIMIT: u32 = 100;
/// Largest page of `GET /bunkers/{id}/egress`.
const EGRESS_MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EgressParams {
    /// Flows that ended at or after this RFC 3339 time (gaps at or after it).
    #[param(format = DateTime)]
    start: Option<String>,
    /// Flows that started at or before this RFC 3339 time (gaps at or before it).
    #[param(format = DateTime)]
    end: Option<String>,
    /// Records and gaps per page together, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^[0-9]{16}-[0-9]{1,9}\.[0-9]{1,18}$")]
    cursor: Option<String>,
}

fn time_param_us(field: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|t| {
        egress::parse_rfc3339_us(t).ok_or_else(|| {
            ApiError::validation(vec![FieldDetail {
                field: field.into(),
                message: "must be an RFC 3339 UTC timestamp, e.g. 2026-11-28T10:00:00Z".into(),
            }])
        })
    })
    .transpose()
}

/// The bunker's egress audit.
///
/// Its flows out (allowed) and refused attempts (denied), and the gaps where the worker lost
/// events, in the order the worker wrote them. For the bunker's owner and holders of
/// `scaibunker:admin:tenant`; also after the bunker ended, until the retention
/// (`SCAIBUNKER_EGRESS_RETENTION_DAYS`) deletes it. A page may hold fewer than `limit` items
/// while `has_more` is true (each request reads a bounded amount); lines that are not valid
/// audit lines of this bunker are skipped and counted in `skipped_lines`.
#[utoipa::path(
    get,
    path = "/bunkers/{id}/egress",
    operation_id = "bunker_egress",
    tag = "audit",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), EgressParams),
    responses(
        (status = 200, description = "A page of the egress audit", body = Envelope<EgressPage>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`: neither the bunker's owner nor `scaibunker:admin:tenant`", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown or another tenant's bunker", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`STORAGE_BACKEND_ERROR`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn egress(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
    q: QueryResult<EgressParams>,
) -> Result<Json<Envelope<EgressPage>>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(EGRESS_DEFAULT_LIMIT);
    if limit == 0 || limit > EGRESS_MAX_LIMIT {
        return Err(ApiError::validation(vec![FieldDetail {
            field: "limit".into(),
            message: format!("must be between 1 and {EGRESS_MAX_LIMIT}"),
        }]));
    }
    let egress_query = EgressQuery {
        start_us: time_param_us("start", q.start.as_deref())?,
        end_us: time_param_us("end", q.end.as_deref())?,
        limit,
        cursor: q.cursor,
    };
    let page = egress::read(&s, &p, &id, &egress_query).await?;
    Ok(Json(Envelope::new(page)))
}
