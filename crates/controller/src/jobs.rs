//! Background jobs, run on a timer by every controller and guarded by a live-state lease so
//! that, across all controllers sharing one database and Redis, each job runs once per tick.
//!
//! Protocol, per job and tick:
//! 1. Every controller wakes every `job_interval` and computes the tick number
//!    `now_ms / interval_ms` (wall clock, so controllers agree on it).
//! 2. It tries the lease `job:{name}:{tick}` (TTL two intervals). Exactly one controller gets it.
//! 3. The holder runs the job; the others skip this tick.
//!
//! If Redis loses its data, the tick in progress may run on a second controller; every job is
//! compare-and-set work on the database, so a repeat changes nothing.
//!
//! Jobs: `sweep` ends bunkers past their lifetime or idle past their timeout (never one busy
//! with an exec or a shell, see `service::activity`) and fails bunkers stuck in
//! `pending`/`provisioning` (a controller that crashed mid-create); `monitor` flips workers
//! whose heartbeats stopped to `offline` (three intervals) and fails the bunkers of workers
//! silent for six; `quota` reconciles the live quota counters with the database;
//! `snapshots` deletes expired snapshots (objects, then rows) and fails abandoned captures;
//! `builtins` retires built-in image shas no online worker holds any more (and brings back
//! those one holds again, see `service::builtin_images`);
//! `spills` deletes the spilled exec outputs of bunkers that ended and those past their retention
//! (objects, then rows; `service::storage_quota`), and the egress audit of bunkers that ended
//! more than `egress_retention` ago (`service::egress`).
//!
//! The usage tick runs on its own interval (`usage_tick_interval`, a minute by default) with the
//! same lease protocol (`job:usage:{tick}`): at tick `t` it records the window of tick `t - 1`
//! for every bunker that ran in it. Its rows are unique per bunker and window start and inserted
//! with insert-ignore, so a tick run twice (Redis wiped mid-tick) counts once.

use std::time::Duration;

use scaibunker_core::ids::AuditId;

use crate::service::{
    Services, accounting, bunkers, quotas, random_bytes, snapshots, storage_quota,
};
use crate::store::admin::{self, Expiry};
use crate::store::audit::AuditEvent;
use crate::store::{StoreError, now_ms};

/// Bunkers still `pending` or `provisioning` this long after creation are failed: the worker's
/// boot timeout (120 s by default) is far shorter, so the create that owned them is gone.
const STUCK_AFTER: Duration = Duration::from_secs(600);

pub fn spawn(s: Services) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let interval = s.config.job_interval;
        let usage_interval = s.config.usage_tick_interval;
        let mut timer = tokio::time::interval(interval.min(usage_interval));
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The wall-clock tick and this timer drift apart, so the timer can fire twice within
        // one tick; the lease holder may re-take its own lease, so remember what ran here.
        let mut last_tick: Option<u128> = None;
        let mut last_usage_tick: Option<u128> = None;
        loop {
            timer.tick().await;
            let usage_tick = now_ms() as u128 / usage_interval.as_millis().max(1);
            if last_usage_tick.is_none_or(|t| t < usage_tick) {
                last_usage_tick = Some(usage_tick);
                let lease = format!("job:usage:{usage_tick}");
                match s
                    .live
                    .try_lease(&lease, &s.controller_id, usage_interval * 2)
                    .await
                {
                    Ok(true) => {
                        record_run(&s, "usage", usage_tick);
                        if let Err(e) =
                            accounting::tick(&s, usage_tick as i64, usage_interval).await
                        {
                            tracing::error!(job = "usage", error = ?e, "background job failed");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(job = "usage", error = %e, "lease unavailable"),
                }
            }
            let tick = now_ms() as u128 / interval.as_millis().max(1);
            if last_tick.is_some_and(|t| t >= tick) {
                continue;
            }
            last_tick = Some(tick);
            for job in [
                Job::Sweep,
                Job::Monitor,
                Job::Quota,
                Job::Images,
                Job::Builtins,
                Job::Snapshots,
                Job::Spills,
            ] {
                let lease = format!("job:{}:{tick}", job.name());
                match s
                    .live
                    .try_lease(&lease, &s.controller_id, interval * 2)
                    .await
                {
                    Ok(true) => {
                        record_run(&s, job.name(), tick);
                        if let Err(e) = job.run(&s).await {
                            tracing::error!(job = job.name(), error = ?e, "background job failed");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(job = job.name(), error = %e, "lease unavailable"),
                }
            }
        }
    })
}

/// Remembers that this controller ran `job` for `tick` (the last 4096 runs).
fn record_run(s: &Services, job: &'static str, tick: u128) {
    let mut runs = s.job_runs.lock().unwrap_or_else(|p| p.into_inner());
    if runs.len() >= 4096 {
        runs.pop_front();
    }
    runs.push_back((job, tick));
}

#[derive(Debug, Clone, Copy)]
enum Job {
    Sweep,
    Monitor,
    Quota,
    /// Re-bakes images whose controller died mid-bake.
    Images,
    /// Retires built-in image shas no online worker holds.
    Builtins,
    Snapshots,
    Spills,
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("store failed")]
    Store(#[from] StoreError),
    #[error("quota counters failed")]
    Quota(#[from] quotas::CountersError),
    #[error("image recovery failed")]
    Images(#[from] crate::service::images::ImageError),
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Self::Sweep => "sweep",
            Self::Monitor => "monitor",
            Self::Quota => "quota",
            Self::Images => "images",
            Self::Builtins => "builtins",
            Self::Snapshots => "snapshots",
            Self::Spills => "spills",
        }
    }

    async fn run(self, s: &Services) -> Result<(), JobError> {
        match self {
            Self::Sweep => Ok(sweep(s).await?),
            Self::Monitor => Ok(monitor(s).await?),
            Self::Quota => {
                quotas::reconcile(s).await?;
                Ok(())
            }
            Self::Images => {
                crate::service::images::recover_stale_bakes(s).await?;
                Ok(())
            }
            Self::Builtins => {
                crate::service::builtin_images::track(s).await?;
                Ok(())
            }
            Self::Snapshots => Ok(snapshots::cleanup(s).await?),
            Self::Spills => {
                storage_quota::delete_spills(s, s.config.spill_retention).await?;
                crate::service::egress::purge(s, s.config.egress_retention).await?;
                // Expired capabilities verify no more: their rows can go.
                s.store
                    .delete_expired_capabilities(crate::store::now_ms())
                    .await?;
                Ok(())
            }
        }
    }
}

/// Workers silent for this many heartbeat intervals are gone for good as far as their bunkers
/// are concerned: the bunkers are failed (a returning worker is told to stop their VMs).
const GONE_AFTER_INTERVALS: i64 = 6;

async fn monitor(s: &Services) -> Result<(), StoreError> {
    let interval = s.config.heartbeat_interval.as_millis() as i64;
    let workers = s.store.workers().await?;
    let silences = crate::service::fleet::silences(s, &workers).await;
    for w in &workers {
        let silence = silences.get(&w.id).copied().unwrap_or(i64::MAX);
        if silence > 3 * interval && w.status == "online" {
            s.store.set_worker_offline(&w.id).await?;
            tracing::warn!(worker_id = w.id, "worker missed three heartbeats: offline");
        }
        if silence > GONE_AFTER_INTERVALS * interval {
            for row in s.store.admin_live_bunkers_on_worker(&w.id).await? {
                let reason = format!("worker {} stopped sending heartbeats", w.id);
                bunkers::mark_failed(s, &row.tenant_id, &row.id, &reason).await?;
            }
        }
    }
    Ok(())
}

async fn sweep(s: &Services) -> Result<(), StoreError> {
    let now = now_ms();
    for (row, expiry) in s.store.admin_expired_bunkers(now).await? {
        let reason = expiry.as_str();
        let mut tx = s.store.begin().await?;
        let moved = match expiry {
            Expiry::Lifetime => {
                crate::store::bunkers::change_status(
                    &mut tx,
                    &row.tenant_id,
                    &row.id,
                    &crate::store::bunkers::StatusChange {
                        from: &[row.status.as_str()],
                        to: "terminated",
                        failure_reason: None,
                        started_at: None,
                        terminated_at: Some(now),
                    },
                )
                .await?
            }
            // Rechecked in the update: work that began since the read keeps the bunker.
            Expiry::Idle => {
                admin::admin_end_idle(&mut tx, &row.tenant_id, &row.id, &row.status, now).await?
            }
        };
        if moved {
            crate::store::audit::insert(
                &mut tx,
                &AuditEvent {
                    id: AuditId::from_random(random_bytes()).to_string(),
                    time_ms: now,
                    tenant_id: Some(row.tenant_id.clone()),
                    actor_id: None,
                    actor_type: "system",
                    action: "bunker.expire",
                    resource_type: "bunker",
                    resource_id: Some(row.id.clone()),
                    status: "success",
                    ip: None,
                    request_id: None,
                    details: serde_json::json!({ "reason": reason }),
                },
            )
            .await?;
        }
        tx.commit().await?;
        if moved {
            tracing::info!(bunker_id = row.id, reason, "bunker expired");
            quotas::release(s, &row.id).await;
            bunkers::stop_vm(s, &row).await;
        }
    }
    crate::service::passivation::sweep(s).await?;
    let stuck_before = now - STUCK_AFTER.as_millis() as i64;
    for row in s.store.admin_stuck_bunkers(stuck_before).await? {
        bunkers::mark_failed(
            s,
            &row.tenant_id,
            &row.id,
            "provisioning did not finish (the controller handling it stopped)",
        )
        .await?;
        bunkers::stop_vm(s, &row).await;
    }
    Ok(())
}
