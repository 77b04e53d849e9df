//! Read-only records: a bunker's exec log and the audit log.
//!
//! The audit log is tenant-scoped: `scaibunker:admin:tenant` (tenant admins) reads its own
//! tenant's events; a platform super admin reads every tenant's.

use scaibunker_api::audit::AuditEvent;
use scaibunker_api::exec::ExecLogEntry;

use super::Services;
use super::auth::{self, Principal};
use super::bunkers::{BunkerError, get, rfc3339};
use crate::store::audit::{self, AuditFilter};
use crate::store::exec_log;

/// A page of records and the cursor of the next one.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Cuts a listing fetched with one extra row to `limit`, and names the cursor of the next page
/// (`<ms>.<id>` of the last row kept) when there is one.
fn paginate<R, T>(
    mut rows: Vec<R>,
    limit: u32,
    cursor_of: impl Fn(&R) -> String,
    to_api: impl FnMut(R) -> T,
) -> Page<T> {
    let next_cursor = (rows.len() > limit as usize).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(&cursor_of).unwrap_or_default()
    });
    Page {
        items: rows.into_iter().map(to_api).collect(),
        next_cursor,
    }
}

fn parse_cursor(c: Option<&str>) -> Result<Option<(i64, String)>, BunkerError> {
    let Some(c) = c else { return Ok(None) };
    let bad = || {
        BunkerError::Validation(vec![scaibunker_core::spec::FieldError {
            field: "cursor",
            message: "not a cursor this API issued".into(),
        }])
    };
    let (ms, id) = c.split_once('.').ok_or_else(bad)?;
    Ok(Some((ms.parse().map_err(|_| bad())?, id.to_owned())))
}

pub async fn exec_log(
    s: &Services,
    p: &Principal,
    bunker_id: &str,
    cursor: Option<&str>,
    limit: u32,
) -> Result<Page<ExecLogEntry>, BunkerError> {
    let bunker = get(s, p, bunker_id).await?;
    let before = parse_cursor(cursor)?;
    let rows = exec_log::list(
        &s.store,
        &bunker.tenant_id,
        &bunker.id,
        before.as_ref().map(|(ms, id)| (*ms, id.as_str())),
        limit + 1,
    )
    .await?;
    Ok(paginate(
        rows,
        limit,
        |r| format!("{}.{}", r.created_at, r.id),
        |r| ExecLogEntry {
            exec_id: r.id,
            command: r.command,
            exit_code: r.exit_code,
            duration_ms: r.duration_ms as u64,
            timed_out: r.timed_out,
            output_preview: r.output_preview,
            actor_id: r.actor_id,
            created_at: rfc3339(r.created_at),
        },
    ))
}

pub async fn audit_log(
    s: &Services,
    p: &Principal,
    filter: &AuditFilter,
    cursor: Option<&str>,
    limit: u32,
) -> Result<Page<AuditEvent>, BunkerError> {
    if !(p.has(auth::ADMIN_TENANT) || p.is_admin()) {
        return Err(BunkerError::PermissionDenied(auth::ADMIN_TENANT));
    }
    let tenant = if p.is_admin() {
        None
    } else {
        Some(p.tenant_id.as_str())
    };
    let before = parse_cursor(cursor)?;
    let rows = audit::list(
        &s.store,
        tenant,
        filter,
        before.as_ref().map(|(ms, id)| (*ms, id.as_str())),
        limit + 1,
    )
    .await?;
    Ok(paginate(
        rows,
        limit,
        |r| format!("{}.{}", r.time_ms, r.id),
        |r| AuditEvent {
            id: r.id,
            time: rfc3339(r.time_ms),
            tenant_id: r.tenant_id,
            actor_id: r.actor_id,
            actor_type: r.actor_type,
            action: r.action,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            status: r.status,
            ip: r.ip,
            request_id: r.request_id,
            details: r.details,
        },
    ))
}
