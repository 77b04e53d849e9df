//! Workers: registration, heartbeats and reconciliation of bunker state against them.
//!
//! Reconciliation on every heartbeat:
//! 1. A live bunker row (running or paused) on this worker that the worker does not report,
//!    or reports failed, becomes `failed` with a reason.
//! 2. A VM the worker reports whose bunker is terminal or unknown is returned in
//!    `stop_bunkers`: the worker stops it, so no VM outlives its bunker.
//! 3. When the heartbeat carries `cached_images` (the worker's authoritative cache list), the
//!    worker's image ledger is reconciled against it: what the worker lost is evicted (the
//!    scheduler stops sending it bunkers of that image unless the image is `lazy_pull`), what
//!    it gained is added. This runs on every such heartbeat, not only on the ones whose
//!    capacity is written durably, and writes only the difference.
//! 4. Pull failures the worker reports mark its ledger rows `failed`; the answer carries the
//!    pulls still queued for it (see `service/images.rs`).

use std::collections::HashMap;

use crate::store::now_ms;
use crate::store::workers::WorkerRow;

use scaibunker_core::ids::{ImageId, WorkerId};
use scaibunker_core::lifecycle::BunkerStatus;
use scaibunker_proto::worker::{
    Heartbeat, HeartbeatResponse, PROTOCOL_VERSION, RegisterRequest, RegisterResponse, VmStatus,
};

use super::worker_credentials::{self as credentials, RegisterAuth, WorkerIdentity};
use super::{Services, random_bytes};
use crate::store::StoreError;
use crate::store::workers::{Committed, Registration};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("worker speaks protocol {got}, controller speaks {PROTOCOL_VERSION}")]
    ProtocolMismatch { got: u32 },
    #[error("field `{field}` is invalid: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("missing permission `{0}`")]
    PermissionDenied(&'static str),
    #[error("worker not found")]
    NotFound,
    #[error("bridge not found")]
    BridgeNotFound,
    #[error("worker {worker_id} already has a bridge named {name:?}")]
    BridgeTaken { worker_id: String, name: String },
    #[error("this credential is worker {credential_of}'s; the request is for worker {named}")]
    WorkerMismatch {
        credential_of: String,
        named: String,
    },
    #[error(
        "worker {worker_id} ({name:?}) holds a credential: it registers with it (kept in its data \
         directory); a platform admin can reset it (POST /workers/{worker_id}/credential/reset) \
         for a worker that lost it"
    )]
    CredentialRequired { worker_id: String, name: String },
    #[error("saving a stopping worker's bunkers failed")]
    Stopping(#[source] tokio::task::JoinError),
    #[error("store failed")]
    Store(#[from] StoreError),
}

fn worker_api(
    w: crate::store::workers::WorkerRow,
    images: Vec<String>,
) -> scaibunker_api::workers::Worker {
    use super::bunkers::rfc3339;
    use scaibunker_api::workers::{Worker, WorkerCapacity};
    Worker {
        id: w.id,
        name: w.name,
        url: w.url,
        runtime: w.runtime,
        status: w.status,
        capacity: WorkerCapacity {
            cpu_millicores: w.cpu_millicores as u64,
            memory_mb: w.memory_mb as u64,
            disk_mb: w.disk_mb as u64,
            gpu_count: w.gpu_count as u64,
        },
        free: WorkerCapacity {
            cpu_millicores: w.free_cpu_millicores as u64,
            memory_mb: w.free_memory_mb as u64,
            disk_mb: w.free_disk_mb as u64,
            gpu_count: w.free_gpu_count as u64,
        },
        active_bunkers: w.active_bunkers as u64,
        cached_images: images,
        registered_at: rfc3339(w.registered_at),
        last_heartbeat: rfc3339(w.last_heartbeat_at),
    }
}

/// Workers are platform infrastructure: only platform admins see or steer them.
fn require_admin(p: &super::auth::Principal) -> Result<(), FleetError> {
    if p.is_admin() {
        Ok(())
    } else {
        Err(FleetError::PermissionDenied(super::auth::ADMIN))
    }
}

pub async fn workers(
    s: &Services,
    p: &super::auth::Principal,
) -> Result<Vec<scaibunker_api::workers::Worker>, FleetError> {
    require_admin(p)?;
    let mut out = Vec::new();
    for w in s.store.workers().await? {
        let images = s.store.worker_images(&w.id).await?;
        out.push(worker_api(w, images));
    }
    Ok(out)
}

pub async fn worker(
    s: &Services,
    p: &super::auth::Principal,
    id: &str,
) -> Result<scaibunker_api::workers::Worker, FleetError> {
    require_admin(p)?;
    let w = s.store.worker(id).await?.ok_or(FleetError::NotFound)?;
    let images = s.store.worker_images(&w.id).await?;
    Ok(worker_api(w, images))
}

/// Drains (no new bunkers are placed; running ones keep running) or resumes a worker.
pub async fn set_draining(
    s: &Services,
    p: &super::auth::Principal,
    id: &str,
    draining: bool,
) -> Result<scaibunker_api::workers::Worker, FleetError> {
    require_admin(p)?;
    if !s.store.set_worker_draining(id, draining).await? {
        return Err(FleetError::NotFound);
    }
    worker(s, p, id).await
}

/// Refuses a request whose credential names another worker than `named`.
pub fn require_self(ident: &WorkerIdentity, named: &str) -> Result<(), FleetError> {
    if ident.worker_id == named {
        Ok(())
    } else {
        Err(FleetError::WorkerMismatch {
            credential_of: ident.worker_id.clone(),
            named: named.to_owned(),
        })
    }
}

pub async fn register(
    s: &Services,
    auth: RegisterAuth,
    req: RegisterRequest,
) -> Result<RegisterResponse, FleetError> {
    if req.protocol_version != PROTOCOL_VERSION {
        return Err(FleetError::ProtocolMismatch {
            got: req.protocol_version,
        });
    }
    if req.name.is_empty() || req.name.len() > 128 {
        return Err(FleetError::Invalid {
            field: "name",
            message: "must be 1 to 128 characters".into(),
        });
    }
    if !(req.url.starts_with("http://") || req.url.starts_with("https://")) {
        return Err(FleetError::Invalid {
            field: "url",
            message: "must be an http(s) URL".into(),
        });
    }
    // The join token registers a name without a credential; a credential, its own worker.
    let existing = s.store.worker_by_name(&req.name).await?;
    match (&auth, &existing) {
        (RegisterAuth::Join, Some(w)) if w.credential_generation > 0 && !w.credential_join_ok => {
            return Err(FleetError::CredentialRequired {
                worker_id: w.id.clone(),
                name: req.name.clone(),
            });
        }
        (RegisterAuth::Join, _) => {}
        (RegisterAuth::Worker(ident), Some(w)) => require_self(ident, &w.id)?,
        (RegisterAuth::Worker(ident), None) => require_self(ident, "(none under this name)")?,
    }
    let new_id = WorkerId::from_random(random_bytes());
    let c = req.capacity;
    let worker_id = s
        .store
        .upsert_worker(&Registration {
            id: new_id.as_str(),
            name: &req.name,
            url: &req.url,
            runtime: &req.runtime,
            cpu_millicores: c.cpu_millicores as i64,
            memory_mb: c.memory_mb as i64,
            disk_mb: c.disk_mb as i64,
            gpu_count: c.gpu_count as i64,
        })
        .await?;
    // Images a worker ships prebuilt become platform images, known by name and hash.
    for img in &req.images {
        s.store
            .upsert_builtin_image(
                ImageId::from_random(random_bytes()).as_str(),
                &img.name,
                &img.sha256,
                img.size_bytes as i64,
            )
            .await?;
    }
    let shas: Vec<String> = req.images.iter().map(|i| i.sha256.clone()).collect();
    // Reconciled, not replaced: pulls queued for the worker survive its re-registration.
    s.store.reconcile_worker_images(&worker_id, &shas).await?;
    tracing::info!(
        worker_id,
        name = req.name,
        url = req.url,
        "worker registered"
    );
    // A new name, one registered before credentials, or one an admin reset gets generation 1
    // or the generation the reset moved to; a worker's own registration gets its current one.
    let generation = existing
        .as_ref()
        .map_or(1, |w| w.credential_generation.max(1));
    s.store
        .set_worker_credential(&worker_id, generation)
        .await?;
    Ok(RegisterResponse {
        credential: credentials::credential(s, &worker_id, generation),
        worker_id,
        heartbeat_interval_s: s.config.heartbeat_interval.as_secs(),
    })
}

/// How long each worker has been silent, in ms. Live state holds every heartbeat; the database
/// holds a copy written at most every three intervals, so when live state has lost a worker's
/// (Redis wiped) its database time is trusted with those three intervals forgiven. Silence is
/// counted from this controller's start at the earliest: after an outage of every controller,
/// no worker looks silent until it has had the intervals to reach one again (a rolling or a
/// full restart fails nothing).
pub async fn silences(s: &Services, workers: &[WorkerRow]) -> HashMap<String, i64> {
    let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
    let live = s.live.heartbeats(&ids).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "live heartbeats unavailable; using the database's");
        HashMap::new()
    });
    let slack = SQL_HEARTBEAT_EVERY * s.config.heartbeat_interval.as_millis() as i64;
    let now = now_ms();
    workers
        .iter()
        .map(|w| {
            let heard = match live.get(&w.id) {
                Some(at) => *at.max(&w.last_heartbeat_at),
                None => w.last_heartbeat_at + slack,
            };
            let silence = (now - heard.max(s.started_at_ms)).max(0);
            (w.id.clone(), silence)
        })
        .collect()
}

/// The database's copy of a heartbeat is refreshed once per this many intervals.
const SQL_HEARTBEAT_EVERY: i64 = 3;

pub async fn heartbeat(
    s: &Services,
    ident: &WorkerIdentity,
    hb: Heartbeat,
) -> Result<HeartbeatResponse, FleetError> {
    require_self(ident, &hb.worker_id)?;
    // A rotation: the worker used its previous credential, so hand it the current one; once
    // it uses that, the previous one stops working.
    let rotated = if ident.previous {
        Some(credentials::credential(
            s,
            &ident.worker_id,
            ident.generation + 1,
        ))
    } else {
        if ident.switched {
            s.store
                .worker_credential_switched(&ident.worker_id, ident.generation)
                .await?;
        }
        None
    };
    let mut answer = heartbeat_inner(s, hb).await?;
    answer.credential = rotated;
    Ok(answer)
}

async fn heartbeat_inner(s: &Services, hb: Heartbeat) -> Result<HeartbeatResponse, FleetError> {
    let interval = s.config.heartbeat_interval;
    if let Err(e) = s
        .live
        .put_heartbeat(&hb.worker_id, now_ms(), interval * 10)
        .await
    {
        tracing::warn!(error = %e, "recording the heartbeat in live state failed");
    }
    // One durable write per worker every few intervals, whichever controller gets the claim
    // (a fresh holder each time makes the lease a plain claim).
    let claim = format!("hbsql:{}", hb.worker_id);
    let holder = scaibunker_core::ids::encode_random(random_bytes());
    let write_sql = s
        .live
        .try_lease(&claim, &holder, interval * SQL_HEARTBEAT_EVERY as u32)
        .await
        .unwrap_or(true);
    if write_sql {
        let known = record_durably(s, &hb).await?;
        if !known {
            return Ok(HeartbeatResponse {
                known: false,
                stop_bunkers: Vec::new(),
                pull_images: Vec::new(),
                credential: None,
            });
        }
    }
    if !hb.image_failures.is_empty() {
        super::images::record_failures(s, &hb.worker_id, &hb.image_failures).await?;
    }
    if let Some(cached) = &hb.cached_images {
        let (added, evicted) = s
            .store
            .reconcile_worker_images(&hb.worker_id, cached)
            .await?;
        if added + evicted > 0 {
            tracing::info!(
                worker_id = hb.worker_id,
                added,
                evicted,
                "worker image ledger reconciled"
            );
        }
    }
    reconcile(s, &hb).await
}

/// Writes the heartbeat's capacity and time to the database. False if the worker is unknown.
async fn record_durably(s: &Services, hb: &Heartbeat) -> Result<bool, FleetError> {
    let free = Committed {
        cpu_millicores: hb.capacity.cpu_millicores as i64,
        memory_mb: hb.capacity.memory_mb as i64,
        disk_mb: hb.capacity.disk_mb as i64,
        gpu_count: hb.capacity.gpu_count as i64,
    };
    let known = s
        .store
        .record_heartbeat(&hb.worker_id, &free, hb.active_bunkers as i64)
        .await?;
    Ok(known)
}

/// Reconciles bunker rows against what the worker reports (see the module docs).
async fn reconcile(s: &Services, hb: &Heartbeat) -> Result<HeartbeatResponse, FleetError> {
    let reported: HashMap<&str, _> = hb.bunkers.iter().map(|b| (b.id.as_str(), b)).collect();
    for row in s.store.admin_live_bunkers_on_worker(&hb.worker_id).await? {
        let status = BunkerStatus::parse(&row.status);
        if !matches!(status, Some(BunkerStatus::Running | BunkerStatus::Paused)) {
            continue;
        }
        let reason = match reported.get(row.id.as_str()) {
            // Being restored from its passivation snapshot onto this worker.
            None if s.store.passivation(&row.id).await?.is_some() => None,
            None => Some("the worker no longer runs this bunker's VM".to_owned()),
            Some(r) if r.status == VmStatus::Failed => Some(
                r.reason
                    .clone()
                    .unwrap_or_else(|| "the VM failed".to_owned()),
            ),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            super::bunkers::mark_failed(s, &row.tenant_id, &row.id, &reason).await?;
        }
    }

    let ids: Vec<String> = hb.bunkers.iter().map(|b| b.id.clone()).collect();
    let live = s.store.admin_live_bunker_ids(&hb.worker_id, &ids).await?;
    let stop_bunkers = ids.into_iter().filter(|id| !live.contains(id)).collect();
    Ok(HeartbeatResponse {
        known: true,
        stop_bunkers,
        pull_images: super::images::pulls_for(s, &hb.worker_id).await?,
        credential: None,
    })
}

fn bridge_api(b: crate::store::workers::BridgeRow) -> scaibunker_api::workers::Bridge {
    scaibunker_api::workers::Bridge {
        id: b.id,
        name: b.name,
        worker_id: b.worker_id,
        created_at: super::bunkers::rfc3339(b.created_at),
    }
}

/// Bridge names are host interface names: 1–15 of `A-Z a-z 0-9 . _ -`.
pub fn valid_bridge_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `POST /bridges`: records that a worker offers a host bridge to `transit` bunkers.
pub async fn create_bridge(
    s: &Services,
    p: &super::auth::Principal,
    req: scaibunker_api::workers::CreateBridge,
) -> Result<scaibunker_api::workers::Bridge, FleetError> {
    require_admin(p)?;
    if !valid_bridge_name(&req.name) {
        return Err(FleetError::Invalid {
            field: "name",
            message: "1 to 15 characters of A-Z a-z 0-9 . _ -".into(),
        });
    }
    s.store
        .worker(&req.worker_id)
        .await?
        .ok_or(FleetError::NotFound)?;
    let row = crate::store::workers::BridgeRow {
        id: scaibunker_core::ids::BridgeId::from_random(random_bytes()).to_string(),
        name: req.name.clone(),
        worker_id: req.worker_id.clone(),
        created_at: now_ms(),
    };
    if !s.store.insert_bridge(&row).await? {
        return Err(FleetError::BridgeTaken {
            worker_id: req.worker_id,
            name: req.name,
        });
    }
    Ok(bridge_api(row))
}

pub async fn bridges(
    s: &Services,
    p: &super::auth::Principal,
) -> Result<Vec<scaibunker_api::workers::Bridge>, FleetError> {
    require_admin(p)?;
    Ok(s.store
        .bridges()
        .await?
        .into_iter()
        .map(bridge_api)
        .collect())
}

/// Removes a bridge record; bunkers already attached keep running.
pub async fn delete_bridge(
    s: &Services,
    p: &super::auth::Principal,
    id: &str,
) -> Result<(), FleetError> {
    require_admin(p)?;
    if !s.store.delete_bridge(id).await? {
        return Err(FleetError::BridgeNotFound);
    }
    Ok(())
}
