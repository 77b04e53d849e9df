//! Snapshot use cases: take one of a running bunker, read, list, delete, clean up expired
//! ones, and find a ready one for a restore (`POST /bunkers {"snapshot_id"}`, see `bunkers`).
//!
//! Take, step by step:
//! 1. Check `scaibunker:create`, the bunker (tenant-scoped) and its status (`running`).
//! 2. In one transaction: the bunker `running → snapshotting` (compare-and-set, so a racing
//!    delete or pause wins cleanly), the `pending` snapshot row, the audit event.
//! 3. The worker captures the bunker and uploads it through the storage proxy under
//!    `snapshots/{tenant}/{snapshot_id}/`, and answers with the manifest. Meanwhile the
//!    controller renews the row every activity interval (`renewed_at`).
//! 4. In one transaction: the snapshot `pending → ready` (with its manifest and size) or
//!    `failed` (expiring after `FAILED_KEEP_MS`), and the bunker `snapshotting → running`. A
//!    snapshot deleted meanwhile has its just-uploaded objects deleted.
//!
//! A capture not renewed for three activity intervals lost its controller: the cleanup job
//! fails it and puts its bunker back to `running` (and any bunker left `snapshotting` with no
//! live capture).
//!
//! Objects go before rows: a delete (by the caller or the cleanup job) first marks the
//! snapshot `deleting` (refused with `SNAPSHOT_IN_USE` while a passivated bunker comes back
//! from it), removes the objects, and the row only once they are gone, so a storage outage
//! leaves a row to retry, never unreferenced bytes.

use scaibunker_api::snapshots as api;
use scaibunker_core::ids::{AuditId, SnapshotId};
use scaibunker_core::lifecycle::{self, BunkerStatus, LifecycleEvent};
use scaibunker_proto::worker::{self as wp, SnapshotManifest};

use super::auth::{self, Principal};
use super::bunkers::{BunkerError, audit_event, field, load, rfc3339};
use super::{RequestContext, Services, random_bytes};
use crate::store::audit::{self, AuditEvent};
use crate::store::bunkers::{self as bstore, StatusChange};
use crate::store::snapshots::{self as sstore, DeleteClaim, Finish, SnapshotCursor, SnapshotRow};
use crate::store::{StoreError, now_ms};

/// Longest `expires_in_s`: ten years.
const MAX_EXPIRES_IN_S: u64 = 10 * 365 * 24 * 3600;
/// How long a failed snapshot stays listed (with its reason) before the cleanup job deletes
/// it and whatever its capture uploaded.
const FAILED_KEEP_MS: i64 = 3600 * 1000;
/// A capture not renewed for this many activity intervals lost its controller.
const STALE_INTERVALS: u32 = 3;
/// Rows the cleanup job handles per tick.
const CLEANUP_BATCH: u32 = 100;
/// The object names a snapshot may have (see the worker's `snapshots` module).
const OBJECT_NAMES: [&str; 2] = ["disk.qcow2", "vm.state"];

fn kind_str(k: api::SnapshotKind) -> &'static str {
    match k {
        api::SnapshotKind::Disk => "disk",
        api::SnapshotKind::Full => "full",
    }
}

pub fn to_api(r: &SnapshotRow) -> api::Snapshot {
    api::Snapshot {
        id: r.id.clone(),
        bunker_id: r.bunker_id.clone(),
        tenant_id: r.tenant_id.clone(),
        status: r.status.clone(),
        kind: if r.kind == "disk" {
            api::SnapshotKind::Disk
        } else {
            api::SnapshotKind::Full
        },
        size_bytes: r.size_bytes.max(0) as u64,
        created_at: rfc3339(r.created_at),
        expires_at: r.expires_at.map(rfc3339),
    }
}

fn object_prefix(tenant_id: &str, snapshot_id: &str) -> String {
    format!("snapshots/{tenant_id}/{snapshot_id}")
}

/// Whether a snapshot is held to the tenant's storage cap (`service::storage_quota`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageCheck {
    /// Asked for by a client: refused when the tenant has no room.
    Enforced,
    /// A passivation's: the bunker's state must be kept wherever the tenant stands (it counts).
    Exempt,
}

/// Takes a snapshot of a running bunker; answers once it is `ready`.
pub async fn create(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    bunker_id: &str,
    req: api::CreateSnapshot,
    storage: StorageCheck,
) -> Result<SnapshotRow, BunkerError> {
    if !p.has(auth::CREATE) {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    if let Some(e) = req.expires_in_s
        && !(1..=MAX_EXPIRES_IN_S).contains(&e)
    {
        return Err(BunkerError::Validation(vec![field(
            "expires_in_s",
            format!("must be between 1 and {MAX_EXPIRES_IN_S}"),
        )]));
    }
    let kind = req.kind.unwrap_or_default();
    let row = load(s, p, bunker_id).await?;
    let status = BunkerStatus::parse(&row.status).unwrap_or(BunkerStatus::Failed);
    if lifecycle::transition(status, LifecycleEvent::SnapshotBegin).is_err() {
        return Err(BunkerError::NotRunning(status));
    }
    let worker = match &row.worker_id {
        Some(w) => s.store.worker(w).await?,
        None => None,
    }
    .ok_or(BunkerError::NotRunning(status))?;
    // Its size is known only once taken: refused while the tenant has no room left at all.
    if storage == StorageCheck::Enforced {
        super::storage_quota::room(s, &row.tenant_id, &p.user_id)
            .await?
            .admit(0)
            .map_err(BunkerError::StorageQuotaExceeded)?;
    }

    let now = now_ms();
    let snap = SnapshotRow {
        id: SnapshotId::from_random(random_bytes()).to_string(),
        tenant_id: row.tenant_id.clone(),
        owner_id: p.user_id.clone(),
        bunker_id: row.id.clone(),
        status: "pending".to_owned(),
        kind: kind_str(kind).to_owned(),
        size_bytes: 0,
        image_name: row.image_name.clone(),
        image_id: row.image_id.clone(),
        cpu_millicores: row.cpu_millicores,
        memory_mb: row.memory_mb,
        disk_mb: row.disk_mb,
        manifest: None,
        failure_reason: None,
        created_at: now,
        expires_at: req
            .expires_in_s
            .map(|e| now.saturating_add((e as i64).saturating_mul(1000))),
    };
    let mut tx = s.store.begin().await?;
    let moved = bstore::change_status(
        &mut tx,
        &row.tenant_id,
        &row.id,
        &StatusChange {
            from: &["running"],
            to: "snapshotting",
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await?;
    if !moved {
        drop(tx);
        let now_status = s
            .store
            .bunker(&row.tenant_id, &row.id)
            .await?
            .and_then(|r| BunkerStatus::parse(&r.status))
            .unwrap_or(BunkerStatus::Failed);
        return Err(BunkerError::NotRunning(now_status));
    }
    sstore::insert(&mut tx, &snap).await?;
    audit::insert(
        &mut tx,
        &audit_event(
            p,
            ctx,
            "bunker.snapshot",
            &row.id,
            "success",
            serde_json::json!({"snapshot_id": snap.id, "kind": snap.kind}),
        ),
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;

    let call = wp::SnapshotVm {
        snapshot_id: snap.id.clone(),
        kind: match kind {
            api::SnapshotKind::Disk => wp::SnapshotKind::Disk,
            api::SnapshotKind::Full => wp::SnapshotKind::Full,
        },
        object_prefix: object_prefix(&snap.tenant_id, &snap.id),
    };
    let target = crate::service::worker_credentials::target(s, &worker);
    let outcome = renewing(s, &snap, s.workers.snapshot_vm(&target, &row.id, &call)).await;
    let (manifest_json, finish_reason) = match &outcome {
        Ok(m) => (
            Some(serde_json::to_string(m).expect("a manifest serialises")),
            None,
        ),
        Err(e) => {
            tracing::error!(bunker_id = row.id, snapshot_id = snap.id, error = %e, "snapshot failed");
            (None, Some(e.to_string()))
        }
    };
    let size = outcome.as_ref().map_or(0, |m| m.size_bytes() as i64);
    let mut tx = s.store.begin().await?;
    let kept = sstore::finish(
        &mut tx,
        &snap.tenant_id,
        &snap.id,
        &Finish {
            status: if outcome.is_ok() { "ready" } else { "failed" },
            size_bytes: size,
            manifest: manifest_json.as_deref(),
            failure_reason: finish_reason.as_deref(),
            expires_at: outcome.is_err().then(|| now_ms() + FAILED_KEEP_MS),
        },
    )
    .await?;
    // If the worker lost the bunker meanwhile, its next heartbeat reports it failed.
    bstore::change_status(
        &mut tx,
        &row.tenant_id,
        &row.id,
        &StatusChange {
            from: &["snapshotting"],
            to: "running",
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    if !kept && let Ok(m) = &outcome {
        // Deleted while it was being taken: what was just uploaded belongs to nobody.
        delete_objects(s, &snap, Some(m)).await;
    }
    outcome?;
    Ok(s.store
        .snapshot(&snap.tenant_id, &snap.id)
        .await?
        .unwrap_or(snap))
}

/// Runs `capture`, renewing the snapshot's row every activity interval meanwhile, so the
/// cleanup job can tell it from a capture whose controller died.
async fn renewing<T>(s: &Services, snap: &SnapshotRow, capture: impl Future<Output = T>) -> T {
    let mut capture = std::pin::pin!(capture);
    let mut timer = tokio::time::interval(s.config.activity_interval);
    // The first tick is now; the row was just written.
    timer.tick().await;
    loop {
        tokio::select! {
            out = &mut capture => return out,
            _ = timer.tick() => {
                if let Err(e) =
                    sstore::renew_capture(&s.store, &snap.tenant_id, &snap.id, now_ms()).await
                {
                    tracing::warn!(snapshot_id = snap.id, error = %e, "renewing a capture failed");
                }
            }
        }
    }
}

/// Captures not renewed since this instant lost their controller.
fn stale_before(s: &Services, now: i64) -> i64 {
    let stale = s.config.activity_interval * STALE_INTERVALS;
    now.saturating_sub(i64::try_from(stale.as_millis()).unwrap_or(i64::MAX))
}

pub async fn get(s: &Services, p: &Principal, id: &str) -> Result<SnapshotRow, BunkerError> {
    if !p.can_read() {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    find(s, p, id).await
}

async fn find(s: &Services, p: &Principal, id: &str) -> Result<SnapshotRow, BunkerError> {
    if SnapshotId::parse(id).is_err() {
        return Err(BunkerError::SnapshotNotFound(id.to_owned()));
    }
    s.store
        .snapshot(&p.tenant_id, id)
        .await?
        .ok_or_else(|| BunkerError::SnapshotNotFound(id.to_owned()))
}

pub struct Listing {
    pub rows: Vec<SnapshotRow>,
    pub next_cursor: Option<String>,
}

/// The caller's tenant's snapshots, newest first, optionally of one bunker.
pub async fn list(
    s: &Services,
    p: &Principal,
    bunker_id: Option<&str>,
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
    let mut rows = s
        .store
        .snapshots(&p.tenant_id, bunker_id, cursor.as_ref(), limit + 1)
        .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| format!("{}.{}", r.created_at, r.id))
    } else {
        None
    };
    Ok(Listing { rows, next_cursor })
}

fn decode_cursor(c: &str) -> Option<SnapshotCursor> {
    let (ms, id) = c.split_once('.')?;
    SnapshotId::parse(id).ok()?;
    Some(SnapshotCursor {
        created_at: ms.parse().ok()?,
        id: id.to_owned(),
    })
}

/// Deletes a snapshot's objects, then its row.
pub async fn delete(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
) -> Result<(), BunkerError> {
    if !p.has(auth::CREATE) {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    let snap = find(s, p, id).await?;
    remove(s, &snap, Some((p, ctx))).await
}

/// The `deleting` mark, the objects, then the row and its audit event.
async fn remove(
    s: &Services,
    snap: &SnapshotRow,
    by: Option<(&Principal, &RequestContext)>,
) -> Result<(), BunkerError> {
    let mut tx = s.store.begin().await?;
    let claim = sstore::claim_delete(&mut tx, &snap.tenant_id, &snap.id).await?;
    tx.commit().await.map_err(StoreError::from)?;
    match claim {
        DeleteClaim::Claimed => {}
        DeleteClaim::InUse => return Err(BunkerError::SnapshotInUse(snap.id.clone())),
        DeleteClaim::Gone => return Err(BunkerError::SnapshotNotFound(snap.id.clone())),
    }
    let manifest = manifest_of(snap);
    for key in object_keys(snap, manifest.as_ref()) {
        s.objects()
            .delete(&key)
            .await
            .map_err(BunkerError::Objects)?;
    }
    let mut tx = s.store.begin().await?;
    if sstore::delete(&mut tx, &snap.tenant_id, &snap.id).await? {
        let mut event = match by {
            Some((p, ctx)) => audit_event(
                p,
                ctx,
                "snapshot.delete",
                &snap.id,
                "success",
                serde_json::json!({"bunker_id": snap.bunker_id}),
            ),
            None => AuditEvent {
                id: AuditId::from_random(random_bytes()).to_string(),
                time_ms: now_ms(),
                tenant_id: Some(snap.tenant_id.clone()),
                actor_id: None,
                actor_type: "system",
                action: "snapshot.expire",
                resource_type: "snapshot",
                resource_id: Some(snap.id.clone()),
                status: "success",
                ip: None,
                request_id: None,
                details: serde_json::json!({"bunker_id": snap.bunker_id, "status": snap.status}),
            },
        };
        event.resource_type = "snapshot";
        audit::insert(&mut tx, &event).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

fn manifest_of(snap: &SnapshotRow) -> Option<SnapshotManifest> {
    snap.manifest
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
}

/// The manifest's keys, or every name a snapshot may have when there is no manifest (a
/// failed or interrupted capture may have uploaded some).
fn object_keys(snap: &SnapshotRow, manifest: Option<&SnapshotManifest>) -> Vec<String> {
    match manifest {
        Some(m) => m.files.iter().map(|f| f.key.clone()).collect(),
        None => OBJECT_NAMES
            .iter()
            .map(|n| format!("{}/{n}", object_prefix(&snap.tenant_id, &snap.id)))
            .collect(),
    }
}

async fn delete_objects(s: &Services, snap: &SnapshotRow, manifest: Option<&SnapshotManifest>) {
    for key in object_keys(snap, manifest) {
        if let Err(e) = s.objects().delete(&key).await {
            tracing::warn!(snapshot_id = snap.id, key, error = %e, "delete a snapshot object");
        }
    }
}

/// The cleanup job: deletes expired snapshots and failed ones past `FAILED_KEEP_MS`
/// (objects, then rows); fails captures whose controller died (not renewed for three
/// activity intervals) and puts their bunker, and any other bunker left `snapshotting` with
/// no live capture, back to `running`. Errors on one snapshot are logged; the next tick
/// retries it. Snapshots a passivation relies on are never deleted.
pub async fn cleanup(s: &Services) -> Result<(), StoreError> {
    let now = now_ms();
    let stale = stale_before(s, now);
    for snap in s
        .store
        .admin_expired_snapshots(now, stale, now - FAILED_KEEP_MS, CLEANUP_BATCH)
        .await?
    {
        if snap.status == "pending" {
            let mut tx = s.store.begin().await?;
            let failed = sstore::fail_abandoned(
                &mut tx,
                &snap.tenant_id,
                &snap.id,
                stale,
                "the capture did not finish (its controller stopped)",
                now + FAILED_KEEP_MS,
            )
            .await?;
            if failed {
                // Its bunker was left `snapshotting` too; the worker has resumed it (or
                // reports it failed on its next heartbeat).
                back_to_running(&mut tx, &snap.tenant_id, &snap.bunker_id).await?;
                tracing::warn!(snapshot_id = snap.id, "abandoned capture failed");
            }
            tx.commit().await?;
            continue;
        }
        match remove(s, &snap, None).await {
            Ok(()) => tracing::info!(snapshot_id = snap.id, "expired snapshot deleted"),
            Err(BunkerError::SnapshotInUse(_)) => {}
            Err(e) => {
                tracing::warn!(snapshot_id = snap.id, error = %e, "deleting an expired snapshot failed")
            }
        }
    }
    for row in s.store.admin_abandoned_snapshotting(stale).await? {
        let mut tx = s.store.begin().await?;
        if back_to_running(&mut tx, &row.tenant_id, &row.id).await? {
            tracing::warn!(
                bunker_id = row.id,
                "bunker left snapshotting by a dead capture"
            );
        }
        tx.commit().await?;
    }
    Ok(())
}

async fn back_to_running(
    tx: &mut crate::store::Tx<'_>,
    tenant_id: &str,
    bunker_id: &str,
) -> Result<bool, StoreError> {
    bstore::change_status(
        tx,
        tenant_id,
        bunker_id,
        &StatusChange {
            from: &["snapshotting"],
            to: "running",
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await
}

/// A ready snapshot of the caller's tenant to restore, with its manifest.
pub async fn for_restore(
    s: &Services,
    p: &Principal,
    id: &str,
) -> Result<(SnapshotRow, SnapshotManifest), BunkerError> {
    let snap = find(s, p, id).await?;
    if snap.status != "ready" {
        return Err(BunkerError::SnapshotNotReady(id.to_owned(), snap.status));
    }
    let manifest = manifest_of(&snap).ok_or(StoreError::Corrupt {
        id: snap.id.clone(),
        column: "manifest",
    })?;
    Ok((snap, manifest))
}
