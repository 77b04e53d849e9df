//! A worker's planned stop (SIGTERM): its bunkers are saved, not lost. The worker calls
//! `POST /workers/{id}/stopping` with its own credential and stops its VMs once it answers.
//!
//! 1. The worker becomes `stopping`: placement passes it over until it registers again.
//! 2. Each of its live bunkers, a few at a time:
//!    - `ephemeral`: terminated, its quota released, its VM stopped;
//!    - `session` or `persistent`, `running`: passivated through a `full` snapshot
//!      (`service/passivation.rs`, without the idleness condition), so its next request
//!      restores it on whichever worker placement picks, processes still running;
//!    - `paused`: resumed first (only a running guest can be captured), then as `running`;
//!    - `snapshotting`: waited for, then as whatever the capture left it.
//!
//!    A bunker whose passivation fails is failed with its VM stopped, as a crash would (quota
//!    released). Bunkers still booting are left to their create: the worker refuses new ones
//!    and cancels boots as it stops, so those creates fail cleanly.
//! 3. The answer lists what happened. The work runs in a task of its own: a worker that gives
//!    up waiting (its deadline) does not cancel it, and what it then stops early fails.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use scaibunker_core::lifecycle::BunkerStatus;
use scaibunker_core::spec::LifecycleMode;
use scaibunker_proto::worker::StoppingResponse;

use super::Services;
use super::bunkers::{self, BunkerError, audit_event};
use super::fleet::{FleetError, require_self};
use super::passivation::{self, Reason};
use super::worker_credentials::WorkerIdentity;
use crate::store::audit;
use crate::store::bunkers::{self as bstore, BunkerRow, StatusChange};
use crate::store::{StoreError, now_ms};
use crate::workers::Pause;

/// Bunkers handled at once: each passivation is a state save and an upload on the worker.
const AT_ONCE: usize = 4;
/// How long a capture already under way is waited for.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(300);

/// What became of one bunker.
enum Outcome {
    Passivated,
    Terminated,
    Failed,
    /// Ended or moved elsewhere meanwhile, or still booting: nothing to do here.
    Untouched,
}

/// `POST /workers/{id}/stopping`: see the module docs.
pub async fn stopping(
    s: &Services,
    ident: &WorkerIdentity,
    worker_id: &str,
) -> Result<StoppingResponse, FleetError> {
    require_self(ident, worker_id)?;
    if !s.store.set_worker_stopping(worker_id).await? {
        return Err(FleetError::NotFound);
    }
    let started = Instant::now();
    let rows = s.store.admin_live_bunkers_on_worker(worker_id).await?;
    tracing::info!(
        worker_id,
        bunkers = rows.len(),
        "worker stopping: saving its bunkers"
    );
    let (s2, worker) = (s.clone(), worker_id.to_owned());
    // Its own task, so a caller that stops waiting does not cancel a capture half-way.
    let work = tokio::spawn(async move {
        futures_util::stream::iter(rows)
            .map(|row| {
                let (s, worker) = (&s2, &worker);
                async move {
                    let outcome = settle(s, worker, &row).await;
                    (row.id, outcome)
                }
            })
            .buffer_unordered(AT_ONCE)
            .collect::<Vec<_>>()
            .await
    });
    let outcomes = work.await.map_err(FleetError::Stopping)?;
    let mut answer = StoppingResponse::default();
    for (id, outcome) in outcomes {
        match outcome {
            Outcome::Passivated => answer.passivated.push(id),
            Outcome::Terminated => answer.terminated.push(id),
            Outcome::Failed => answer.failed.push(id),
            Outcome::Untouched => {}
        }
    }
    tracing::info!(
        worker_id,
        passivated = answer.passivated.len(),
        terminated = answer.terminated.len(),
        failed = answer.failed.len(),
        ms = started.elapsed().as_millis() as u64,
        "worker stopping: its bunkers are saved"
    );
    Ok(answer)
}

/// Deals with one bunker of the stopping worker; a failure to save it fails it.
async fn settle(s: &Services, worker_id: &str, row: &BunkerRow) -> Outcome {
    match save(s, worker_id, row).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::warn!(bunker_id = row.id, error = %e, "saving a bunker of a stopping worker failed; it fails");
            let reason = format!("its worker stopped and saving it failed: {e}");
            if let Err(e) = bunkers::mark_failed(s, &row.tenant_id, &row.id, &reason).await {
                tracing::error!(bunker_id = row.id, error = %e, "failing the bunker failed");
            }
            bunkers::stop_vm(s, row).await;
            Outcome::Failed
        }
    }
}

async fn save(s: &Services, worker_id: &str, row: &BunkerRow) -> Result<Outcome, BunkerError> {
    let give_up = Instant::now() + SNAPSHOT_WAIT;
    let mut row = row.clone();
    loop {
        if row.worker_id.as_deref() != Some(worker_id) {
            return Ok(Outcome::Untouched);
        }
        let status = BunkerStatus::parse(&row.status).unwrap_or(BunkerStatus::Failed);
        if status.is_terminal() || matches!(status, BunkerStatus::Pending) {
            return Ok(Outcome::Untouched);
        }
        let mode = LifecycleMode::parse(&row.lifecycle_mode).unwrap_or(LifecycleMode::Ephemeral);
        match (mode, status) {
            (_, BunkerStatus::Provisioning) => return Ok(Outcome::Untouched),
            (LifecycleMode::Ephemeral, _) => return terminate(s, &row).await,
            (_, BunkerStatus::Running) => {
                if passivation::passivate(s, &row, Reason::WorkerStopping).await? {
                    return Ok(Outcome::Passivated);
                }
                // It moved meanwhile (deleted, failed): look again.
            }
            (_, BunkerStatus::Paused) => resume(s, worker_id, &row).await?,
            (_, BunkerStatus::Snapshotting) if Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (_, BunkerStatus::Snapshotting) => {
                return Err(BunkerError::NotRunning(BunkerStatus::Snapshotting));
            }
            _ => return Ok(Outcome::Untouched),
        }
        row = match s.store.bunker(&row.tenant_id, &row.id).await? {
            Some(r) => r,
            None => return Ok(Outcome::Untouched),
        };
    }
}

/// Ends an ephemeral bunker of the stopping worker: terminated, quota released, VM stopped.
async fn terminate(s: &Services, row: &BunkerRow) -> Result<Outcome, BunkerError> {
    let change = StatusChange {
        from: &[row.status.as_str()],
        to: "terminated",
        failure_reason: None,
        started_at: None,
        terminated_at: Some(now_ms()),
    };
    if !change_audited(s, row, &change, "bunker.expire").await? {
        return Ok(Outcome::Untouched);
    }
    super::quotas::release(s, &row.id).await;
    bunkers::stop_vm(s, row).await;
    Ok(Outcome::Terminated)
}

/// Resumes a paused bunker on its worker so it can be captured.
async fn resume(s: &Services, worker_id: &str, row: &BunkerRow) -> Result<(), BunkerError> {
    let worker = s
        .store
        .worker(worker_id)
        .await?
        .ok_or(BunkerError::NotRunning(BunkerStatus::Paused))?;
    s.workers
        .set_paused(
            &super::worker_credentials::target(s, &worker),
            &row.id,
            Pause::Resume,
        )
        .await?;
    let change = StatusChange {
        from: &["paused"],
        to: "running",
        failure_reason: None,
        started_at: None,
        terminated_at: None,
    };
    change_audited(s, row, &change, "bunker.resume").await?;
    Ok(())
}

/// Applies `change` and, if it moved the bunker, its audit row (`action`, by the platform,
/// reason `worker_stopping`) in the same transaction. True if it moved.
async fn change_audited(
    s: &Services,
    row: &BunkerRow,
    change: &StatusChange<'_>,
    action: &'static str,
) -> Result<bool, BunkerError> {
    let (p, ctx) = passivation::system(row);
    let mut tx = s.store.begin().await?;
    let moved = bstore::change_status(&mut tx, &row.tenant_id, &row.id, change).await?;
    if moved {
        audit::insert(
            &mut tx,
            &audit_event(
                &p,
                &ctx,
                action,
                &row.id,
                "success",
                serde_json::json!({"reason": "worker_stopping"}),
            ),
        )
        .await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(moved)
}
