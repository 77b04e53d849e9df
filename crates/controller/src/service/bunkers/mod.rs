//! The bunker use cases, one module each: `create` (validate → resolve image → place →
//! record → boot), `exec`, `files`; here read, list, delete, pause/resume and the failure and
//! activity records they share. `convert` owns the public record and time formats.

mod convert;
mod create;
mod exec;
mod files;

use std::collections::BTreeMap;

use scaibunker_core::ids::{AuditId, BunkerId};
use scaibunker_core::lifecycle::{self, BunkerStatus, LifecycleEvent};
use scaibunker_core::spec::FieldError;

use super::auth::{self, Principal};
use super::{RequestContext, Services, random_bytes};
use crate::store::audit::{self, AuditEvent};
use crate::store::bunkers::{self as bstore, BunkerFilter, BunkerRow, Cursor, StatusChange};
use crate::store::{StoreError, now_ms};
use crate::workers::{Pause, WorkerCallError};

pub use convert::{network_spec, parse_rfc3339, rfc3339, to_api, worker_code_status};
pub(crate) use create::choose_worker;
pub use create::create;
pub use exec::{PreparedExec, exec, prepare_exec, record_exec};
pub use files::{ListPage, Upload, delete_file, list_files, read_file, validate_path, write_file};

#[derive(Debug, thiserror::Error)]
pub enum BunkerError {
    #[error("request is invalid")]
    Validation(Vec<FieldError>),
    #[error("missing permission `{0}`")]
    PermissionDenied(&'static str),
    #[error("lifecycle mode `{0}` needs permission `{1}`")]
    LifecycleModeDenied(&'static str, &'static str),
    #[error("network profile `{0}` needs permission `{1}`")]
    NetworkProfileDenied(&'static str, &'static str),
    #[error("`interfaces` are only allowed with the `transit` network profile")]
    InterfacesNotAllowed,
    #[error("the `transit` network profile needs at least one interface")]
    TransitMissingInterfaces,
    #[error("bridge `{0}` not found")]
    BridgeNotFound(String),
    #[error("image `{0}` not found")]
    ImageNotFound(String),
    #[error("snapshot `{0}` not found")]
    SnapshotNotFound(String),
    #[error("snapshot `{0}` is {1}, not ready")]
    SnapshotNotReady(String, String),
    #[error(
        "snapshot `{0}` is what a passivated bunker comes back from; resume or delete the bunker first"
    )]
    SnapshotInUse(String),
    #[error("bunker not found")]
    NotFound,
    #[error("no streamed exec with this id on this bunker (finished ones are kept 10 minutes)")]
    ExecNotFound,
    #[error(
        "the stream resume buffers of this controller have no room for another streamed exec \
         (the {scope} budget of {limit_bytes} bytes is taken by running execs); retry later, \
         or run the command without `stream`"
    )]
    StreamBudgetExceeded {
        scope: &'static str,
        limit_bytes: u64,
    },
    #[error("bunker is {0}, not running")]
    NotRunning(BunkerStatus),
    #[error("{0}")]
    InvalidTransition(lifecycle::InvalidTransition),
    #[error("no worker has capacity for this bunker now")]
    WorkerUnavailable,
    #[error("no worker can run this image")]
    NoSuitableWorker,
    #[error("{0}")]
    QuotaExceeded(Box<super::quotas::QuotaExceeded>),
    #[error("{0}")]
    StorageQuotaExceeded(Box<super::quotas::QuotaExceeded>),
    #[error("quota counters are unavailable")]
    QuotaUnavailable(#[source] super::quotas::CountersError),
    #[error("invalid path: {0}")]
    InvalidPath(String),
    #[error("file exceeds the upload limit of {limit} bytes")]
    FileTooLarge { limit: u64 },
    #[error(
        "no stored output for this exec and stream (only outputs past the inline limit are stored)"
    )]
    OutputNotFound,
    #[error("object storage failed")]
    Objects(#[source] crate::objects::ObjectError),
    #[error("the exec failed: {code}: {message}")]
    ExecFailed { code: String, message: String },
    #[error("worker call failed")]
    Worker(#[from] WorkerCallError),
    #[error("store failed")]
    Store(#[from] StoreError),
}

pub(crate) fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

fn validate_map(
    errors: &mut Vec<FieldError>,
    name: &'static str,
    map: &BTreeMap<String, String>,
    max_entries: usize,
    max_value: usize,
    env_style_keys: bool,
) {
    if map.len() > max_entries {
        errors.push(field(name, format!("at most {max_entries} entries")));
    }
    for (k, v) in map {
        let key_ok = if env_style_keys {
            !k.is_empty()
                && k.len() <= 256
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        } else {
            !k.is_empty() && k.len() <= 63
        };
        if !key_ok {
            errors.push(field(name, format!("invalid key `{k}`")));
        }
        if v.len() > max_value || v.contains('\0') {
            errors.push(field(
                name,
                format!("value of `{k}` must be at most {max_value} bytes without NUL"),
            ));
        }
    }
}

pub fn audit_event(
    p: &Principal,
    ctx: &RequestContext,
    action: &'static str,
    resource_id: &str,
    status: &'static str,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        id: AuditId::from_random(random_bytes()).to_string(),
        time_ms: now_ms(),
        tenant_id: Some(p.tenant_id.clone()),
        actor_id: Some(p.user_id.clone()),
        actor_type: "user",
        action,
        resource_type: "bunker",
        resource_id: Some(resource_id.to_owned()),
        status,
        ip: ctx.ip.clone(),
        request_id: Some(ctx.request_id.clone()),
        details,
    }
}

/// Moves a live bunker to `failed` with a reason (no-op if it is already terminal).
pub async fn mark_failed(
    s: &Services,
    tenant_id: &str,
    id: &str,
    reason: &str,
) -> Result<(), StoreError> {
    let mut tx = s.store.begin().await?;
    let reason: String = reason.chars().take(4000).collect();
    let moved = bstore::change_status(
        &mut tx,
        tenant_id,
        id,
        &StatusChange {
            from: &[
                "pending",
                "provisioning",
                "running",
                "paused",
                "snapshotting",
            ],
            to: "failed",
            failure_reason: Some(&reason),
            started_at: None,
            terminated_at: Some(now_ms()),
        },
    )
    .await?;
    if moved {
        audit::insert(
            &mut tx,
            &AuditEvent {
                id: AuditId::from_random(random_bytes()).to_string(),
                time_ms: now_ms(),
                tenant_id: Some(tenant_id.to_owned()),
                actor_id: None,
                actor_type: "system",
                action: "bunker.fail",
                resource_type: "bunker",
                resource_id: Some(id.to_owned()),
                status: "success",
                ip: None,
                request_id: None,
                details: serde_json::json!({ "reason": reason }),
            },
        )
        .await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    if moved {
        super::quotas::release(s, id).await;
    }
    Ok(())
}

/// A bunker the caller may see: its own tenant's, or any for a platform admin.
pub async fn get(s: &Services, p: &Principal, id: &str) -> Result<BunkerRow, BunkerError> {
    if !p.can_read() {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    load(s, p, id).await
}

pub(crate) async fn load(s: &Services, p: &Principal, id: &str) -> Result<BunkerRow, BunkerError> {
    if BunkerId::parse(id).is_err() {
        return Err(BunkerError::NotFound);
    }
    let row = if p.is_admin() {
        s.store.admin_bunker(id).await?
    } else {
        s.store.bunker(&p.tenant_id, id).await?
    };
    row.ok_or(BunkerError::NotFound)
}

pub struct Listing {
    pub rows: Vec<BunkerRow>,
    pub next_cursor: Option<String>,
}

pub fn encode_cursor(c: &Cursor) -> String {
    format!("{}.{}", c.created_at, c.id)
}

pub fn decode_cursor(s: &str) -> Option<Cursor> {
    let (ms, id) = s.split_once('.')?;
    BunkerId::parse(id).ok()?;
    Some(Cursor {
        created_at: ms.parse().ok()?,
        id: id.to_owned(),
    })
}

pub async fn list(
    s: &Services,
    p: &Principal,
    filter: &BunkerFilter,
    cursor: Option<&str>,
    limit: u32,
) -> Result<Listing, BunkerError> {
    if !p.can_read() {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    let cursor = match cursor {
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            BunkerError::Validation(vec![field("cursor", "not a cursor this API issued")])
        })?),
        None => None,
    };
    // One extra row tells whether there is a next page.
    let mut rows = if p.is_admin() {
        s.store
            .admin_bunkers(filter, cursor.as_ref(), limit + 1)
            .await?
    } else {
        s.store
            .bunkers(&p.tenant_id, filter, cursor.as_ref(), limit + 1)
            .await?
    };
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| {
            encode_cursor(&Cursor {
                created_at: r.created_at,
                id: r.id.clone(),
            })
        })
    } else {
        None
    };
    Ok(Listing { rows, next_cursor })
}

/// Terminates a bunker and stops its VM. Deleting a bunker that already ended returns it as is.
pub async fn delete(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
) -> Result<BunkerRow, BunkerError> {
    if !p.has(auth::CREATE) {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    let row = load(s, p, id).await?;
    let status = BunkerStatus::parse(&row.status).ok_or(StoreError::Corrupt {
        id: row.id.clone(),
        column: "status",
    })?;
    if status.is_terminal() {
        return Ok(row);
    }
    lifecycle::transition(status, LifecycleEvent::Terminate)
        .map_err(BunkerError::InvalidTransition)?;
    let mut tx = s.store.begin().await?;
    let moved = bstore::change_status(
        &mut tx,
        &row.tenant_id,
        &row.id,
        &StatusChange {
            from: &[status.as_str()],
            to: "terminated",
            failure_reason: None,
            started_at: None,
            terminated_at: Some(now_ms()),
        },
    )
    .await?;
    if moved {
        audit::insert(
            &mut tx,
            &audit_event(
                p,
                ctx,
                "bunker.delete",
                &row.id,
                "success",
                serde_json::json!({}),
            ),
        )
        .await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    if !moved {
        // Someone else moved it meanwhile (a failure, another delete): report what is now.
        return Box::pin(delete(s, p, ctx, id)).await;
    }
    super::quotas::release(s, &row.id).await;
    stop_vm(s, &row).await;
    Ok(s.store
        .bunker(&row.tenant_id, &row.id)
        .await?
        .unwrap_or(row))
}

/// Asks the bunker's worker to stop its VM. Failures are logged, not returned: the next
/// heartbeat lists the VM and gets it back in `stop_bunkers`.
pub async fn stop_vm(s: &Services, row: &BunkerRow) {
    let Some(worker_id) = &row.worker_id else {
        return;
    };
    let worker = match s.store.worker(worker_id).await {
        Ok(Some(w)) => w,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(bunker_id = row.id, error = %e, "looking up the worker failed");
            return;
        }
    };
    if let Err(e) = s
        .workers
        .delete_vm(
            &crate::service::worker_credentials::target(s, &worker),
            &row.id,
        )
        .await
    {
        tracing::warn!(bunker_id = row.id, error = %e, "stopping the VM failed; heartbeat will retry");
    }
}

/// Pauses a running bunker or resumes a paused one, at the VM level. Quota stays held while
/// paused; exec and files on a paused bunker are `409 BUNKER_NOT_RUNNING`.
pub async fn set_paused(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    op: Pause,
) -> Result<BunkerRow, BunkerError> {
    if !p.has(auth::CREATE) {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    let row = load(s, p, id).await?;
    if matches!(op, Pause::Resume)
        && let Some(restored) = super::passivation::reactivate(s, &row).await?
    {
        return Ok(restored);
    }
    let from = BunkerStatus::parse(&row.status).ok_or(StoreError::Corrupt {
        id: row.id.clone(),
        column: "status",
    })?;
    let (event, action) = match op {
        Pause::Pause => (LifecycleEvent::Pause, "bunker.pause"),
        Pause::Resume => (LifecycleEvent::Resume, "bunker.resume"),
    };
    let to = lifecycle::transition(from, event).map_err(BunkerError::InvalidTransition)?;
    let worker_id = row.worker_id.clone().ok_or(BunkerError::NotRunning(from))?;
    let worker = s
        .store
        .worker(&worker_id)
        .await?
        .ok_or(BunkerError::NotRunning(from))?;
    s.workers
        .set_paused(
            &crate::service::worker_credentials::target(s, &worker),
            &row.id,
            op,
        )
        .await?;
    let mut tx = s.store.begin().await?;
    let moved = bstore::change_status(
        &mut tx,
        &row.tenant_id,
        &row.id,
        &StatusChange {
            from: &[from.as_str()],
            to: to.as_str(),
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await?;
    if moved {
        audit::insert(
            &mut tx,
            &audit_event(p, ctx, action, &row.id, "success", serde_json::json!({})),
        )
        .await?;
        bstore::touch_activity(&mut tx, &row.tenant_id, &row.id, now_ms()).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(s.store
        .bunker(&row.tenant_id, &row.id)
        .await?
        .unwrap_or(row))
}

/// A running bunker the caller may act on, and its worker's URL.
pub(crate) async fn running(
    s: &Services,
    p: &Principal,
    id: &str,
) -> Result<(BunkerRow, crate::workers::WorkerTarget), BunkerError> {
    let mut row = load(s, p, id).await?;
    // A passivated bunker comes back transparently on its next request.
    if let Some(restored) = super::passivation::reactivate(s, &row).await? {
        row = restored;
    }
    let status = BunkerStatus::parse(&row.status).unwrap_or(BunkerStatus::Failed);
    if status != BunkerStatus::Running {
        return Err(BunkerError::NotRunning(status));
    }
    let worker_id = row
        .worker_id
        .clone()
        .ok_or(BunkerError::NotRunning(status))?;
    let worker = s
        .store
        .worker(&worker_id)
        .await?
        .ok_or(BunkerError::NotRunning(status))?;
    Ok((row, crate::service::worker_credentials::target(s, &worker)))
}

pub(crate) fn remaining_lifetime_s(row: &BunkerRow, now: i64) -> Option<u64> {
    let max = row.max_lifetime_s?;
    let started = row.started_at.unwrap_or(row.created_at);
    let end = started + max * 1000;
    Some(((end - now).max(1000) / 1000) as u64)
}

pub(crate) async fn record_activity(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    row: &BunkerRow,
    action: &'static str,
    details: serde_json::Value,
) -> Result<(), BunkerError> {
    let mut tx = s.store.begin().await?;
    audit::insert(
        &mut tx,
        &audit_event(p, ctx, action, &row.id, "success", details),
    )
    .await?;
    bstore::touch_activity(&mut tx, &row.tenant_id, &row.id, now_ms()).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            created_at: 42,
            id: "bnk_abc".into(),
        };
        let back = decode_cursor(&encode_cursor(&c)).expect("round trip");
        assert_eq!((back.created_at, back.id), (42, "bnk_abc".to_owned()));
        for bad in ["", "42", "x.bnk_abc", "42.wrk_abc", "42.bnk_A"] {
            assert!(decode_cursor(bad).is_none(), "{bad:?}");
        }
    }
}
