//! `GET /bunkers/{id}/exec-log`, `GET /audit` and the platform's `GET /v1/audit-log`.

use axum::Json;
use axum::extract::{Path, Query, State};
use scaibunker_api::audit::AuditEvent;
use scaibunker_api::envelope::{DEFAULT_PAGE_LIMIT, FieldDetail, List, MAX_PAGE_LIMIT};
use scaibunker_api::exec::ExecLogEntry;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Caller;
use crate::service::Services;
use crate::service::bunkers::parse_rfc3339;
use crate::service::records::{self, Page};
use crate::store::audit::AuditFilter;

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::validation(vec![FieldDetail {
            field: "query".into(),
            message: e.body_text(),
        }])
    })
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    start: Option<String>,
    end: Option<String>,
    action: Option<String>,
    actor_id: Option<String>,
    resource_type: Option<String>,
    resource_id: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

fn time_param(field: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
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
