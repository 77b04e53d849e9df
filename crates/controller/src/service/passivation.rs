//! Passivation of idle persistent bunkers (DESIGN §2): a persistent bunker idle past its
//! `idle_timeout_s` is saved as a `full` snapshot through the storage proxy, its VM stopped,
//! and it stays `paused` with no worker, holding its quota. Its next exec, file or shell
//! request, or a resume, restores it from that snapshot on whichever worker placement picks
//! (processes keep running), and the snapshot then expires.
//!
//! - Passivating is a compare-and-set from `running` that also requires no activity since the
//!   snapshot began, so a request that slipped in meanwhile wins and the bunker stays up. A
//!   worker's planned stop (`service/worker_stop.rs`) passivates its `session` and
//!   `persistent` bunkers the same way, without that condition: their VM goes either way.
//! - Restoring claims the bunker by setting its worker while it is still `paused` with none;
//!   concurrent requests wait for the one restore. A failed restore leaves it passivated.
//! - Its snapshot cannot be deleted while it is passivated (`SNAPSHOT_IN_USE`): recording the
//!   passivation and claiming a delete both lock the snapshot's row, so one of them loses.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use scaibunker_api::snapshots::{CreateSnapshot, SnapshotKind};
use scaibunker_core::lifecycle::BunkerStatus;
use scaibunker_core::spec::Resources;
use scaibunker_proto::worker::CreateVm;

use super::auth::{self, Principal};
use super::bunkers::{BunkerError, audit_event, choose_worker};
use super::{RequestContext, Services};
use crate::store::bunkers::{self as bstore, BunkerRow, StatusChange};
use crate::store::passivation as pstore;
use crate::store::{StoreError, audit, now_ms};

/// How long a request waits for a restore another request started.
const RESTORE_WAIT: Duration = Duration::from_secs(300);

/// The platform acting for the bunker's owner (audit rows name the owner, actor `system`).
pub(crate) fn system(row: &BunkerRow) -> (Principal, RequestContext) {
    (
        Principal {
            tenant_id: row.tenant_id.clone(),
            user_id: row.owner_id.clone(),
            key_id: "system".into(),
            role: "system".into(),
            permissions: [auth::CREATE.to_owned()].into(),
        },
        RequestContext {
            request_id: format!("passivation-{}", row.id),
            ip: None,
        },
    )
}

/// The sweeper's step: passivates every idle persistent bunker, fails passivated bunkers
/// whose snapshot is gone, and expires the snapshots of passivated bunkers that ended.
pub async fn sweep(s: &Services) -> Result<(), StoreError> {
    for row in s.store.admin_idle_persistent_bunkers(now_ms()).await? {
        if let Err(e) = passivate(s, &row, Reason::Idle).await {
            tracing::warn!(bunker_id = row.id, error = %e, "passivation failed; the bunker keeps running");
        }
    }
    // Snapshots were deletable under passivated bunkers before deletes were refused: such a
    // bunker can never come back, so it fails (releasing its quota) rather than stay paused.
    for (bunker_id, tenant_id) in s.store.admin_lost_passivations().await? {
        super::bunkers::mark_failed(
            s,
            &tenant_id,
            &bunker_id,
            "its passivation snapshot was deleted",
        )
        .await?;
    }
    for (bunker_id, tenant_id, snapshot_id) in s.store.admin_ended_passivations().await? {
        let mut tx = s.store.begin().await?;
        pstore::finish(&mut tx, &tenant_id, &bunker_id, &snapshot_id).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Why a bunker is passivated, and so what keeps it up instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Idle past its timeout: work that began since the snapshot, or a busy mark, wins.
    Idle,
    /// Its worker is stopping: the VM goes whatever runs in it.
    WorkerStopping,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::WorkerStopping => "worker_stopping",
        }
    }
}

/// Saves a running bunker as a `full` snapshot, stops its VM and leaves it `paused` with no
/// worker. False (the bunker as it was, its snapshot expiring) if it moved meanwhile: it was
/// used (for [`Reason::Idle`]), deleted, or failed.
pub async fn passivate(s: &Services, row: &BunkerRow, reason: Reason) -> Result<bool, BunkerError> {
    let (p, ctx) = system(row);
    let began = now_ms();
    let started = Instant::now();
    let snap = super::snapshots::create(
        s,
        &p,
        &ctx,
        &row.id,
        CreateSnapshot {
            kind: Some(SnapshotKind::Full),
            expires_in_s: None,
        },
        super::snapshots::StorageCheck::Exempt,
    )
    .await?;
    let mut tx = s.store.begin().await?;
    let idle_since = (reason == Reason::Idle).then_some(began);
    let moved = pstore::passivate(&mut tx, &row.tenant_id, &row.id, &snap.id, idle_since).await?;
    if moved {
        audit::insert(
            &mut tx,
            &audit_event(
                &p,
                &ctx,
                "bunker.passivate",
                &row.id,
                "success",
                serde_json::json!({"snapshot_id": snap.id, "size_bytes": snap.size_bytes,
                    "reason": reason.as_str()}),
            ),
        )
        .await?;
    } else {
        // Used meanwhile: it stays up, and the snapshot is not needed.
        pstore::finish(&mut tx, &row.tenant_id, &row.id, &snap.id).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    if moved {
        // Its row no longer names the worker: should this call fail, the worker's next
        // heartbeat reports a VM whose bunker lives nowhere, and is told to stop it.
        super::bunkers::stop_vm(s, row).await;
        tracing::info!(
            bunker_id = row.id,
            snapshot_id = snap.id,
            ms = started.elapsed().as_millis() as u64,
            reason = reason.as_str(),
            "bunker passivated"
        );
    }
    Ok(moved)
}

/// If `row` is passivated, restores it and returns the running row; `None` if it is not.
pub async fn reactivate(s: &Services, row: &BunkerRow) -> Result<Option<BunkerRow>, BunkerError> {
    if row.status != BunkerStatus::Paused.as_str() {
        return Ok(None);
    }
    let Some(snapshot_id) = s.store.passivation(&row.id).await? else {
        return Ok(None);
    };
    let (p, ctx) = system(row);
    let (snap, manifest) = super::snapshots::for_restore(s, &p, &snapshot_id).await?;
    let resources = Resources {
        cpu_millicores: row.cpu_millicores as u64,
        memory_mb: row.memory_mb as u64,
        disk_mb: row.disk_mb as u64,
        gpu_count: row.gpu_count as u64,
    };
    let claimed = {
        let _guard = s.placement_lock.lock().await;
        let mut tx = s.store.begin().await?;
        let shas = std::slice::from_ref(&manifest.image_sha256);
        let (worker, _) = choose_worker(s, &mut tx, false, shas, &resources, &[]).await?;
        let claimed = pstore::claim_restore(&mut tx, &row.tenant_id, &row.id, &worker.id).await?;
        tx.commit().await.map_err(StoreError::from)?;
        claimed.then_some(worker)
    };
    let Some(worker) = claimed else {
        return wait_for_restore(s, row).await.map(Some);
    };
    let started = Instant::now();
    let req = CreateVm {
        bunker_id: row.id.clone(),
        image_sha256: manifest.image_sha256.clone(),
        cpu_millicores: resources.cpu_millicores,
        memory_mb: resources.memory_mb,
        disk_mb: resources.disk_mb,
        hostname: format!("bunker-{}", &row.id[4..12]),
        env_vars: serde_json::from_str::<BTreeMap<String, String>>(&row.env_vars)
            .unwrap_or_default(),
        snapshot: Some(manifest),
        image_pull: None,
        tenant_id: row.tenant_id.clone(),
        network: crate::service::bunkers::network_spec(row),
    };
    if let Err(e) = s
        .workers
        .create_vm(
            &crate::service::worker_credentials::target(s, &worker),
            &req,
        )
        .await
    {
        pstore::release_claim(&s.store, &row.tenant_id, &row.id).await?;
        return Err(e.into());
    }
    let now = now_ms();
    let mut tx = s.store.begin().await?;
    let moved = bstore::change_status(
        &mut tx,
        &row.tenant_id,
        &row.id,
        &StatusChange {
            from: &["paused"],
            to: "running",
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await?;
    if moved {
        pstore::finish(&mut tx, &row.tenant_id, &row.id, &snap.id).await?;
        bstore::touch_activity(&mut tx, &row.tenant_id, &row.id, now).await?;
        audit::insert(
            &mut tx,
            &audit_event(
                &p,
                &ctx,
                "bunker.reactivate",
                &row.id,
                "success",
                serde_json::json!({"snapshot_id": snap.id, "worker_id": worker.id,
                    "ms": started.elapsed().as_millis() as u64}),
            ),
        )
        .await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    if !moved {
        // Deleted while restoring: the VM must not outlive its bunker.
        let _ = s
            .workers
            .delete_vm(
                &crate::service::worker_credentials::target(s, &worker),
                &row.id,
            )
            .await;
        return Err(BunkerError::NotFound);
    }
    tracing::info!(
        bunker_id = row.id,
        worker_id = worker.id,
        ms = started.elapsed().as_millis() as u64,
        "passivated bunker restored"
    );
    Ok(s.store.bunker(&row.tenant_id, &row.id).await?)
}

/// Waits for another request's restore of `row` to finish.
async fn wait_for_restore(s: &Services, row: &BunkerRow) -> Result<BunkerRow, BunkerError> {
    let give_up = Instant::now() + RESTORE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = s
            .store
            .bunker(&row.tenant_id, &row.id)
            .await?
            .ok_or(BunkerError::NotFound)?;
        let status = BunkerStatus::parse(&now.status).unwrap_or(BunkerStatus::Failed);
        match status {
            BunkerStatus::Running => return Ok(now),
            BunkerStatus::Paused if now.worker_id.is_some() && Instant::now() < give_up => {}
            other => return Err(BunkerError::NotRunning(other)),
        }
    }
}
