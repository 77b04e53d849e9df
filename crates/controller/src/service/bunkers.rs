//! The bunker use cases: create (validate → resolve image → place → record → boot), read,
//! list, delete, exec and files.
//!
//! Create, step by step:
//! 1. Validate every field (all problems reported at once) and check the permissions the
//!    lifecycle mode and network profile need.
//! 2. Resolve the image visible to the tenant.
//! 3. Reserve quota (atomically, in live state; see `quotas`): `429` if a cap would be passed.
//! 4. Under the placement lock, in one transaction: lock and read the fleet (the lock
//!    serializes placements across controllers too) and what its live bunkers hold, place with the core's pure policy, insert the `pending` row, its quota charges and
//!    its audit event. If this fails, the reserved quota is released.
//! 5. A spawned task (it survives the client going away) moves the bunker to `provisioning`,
//!    asks the worker to boot it, then to `running` or `failed`. Every status change is a
//!    compare-and-set, so a delete racing a boot wins cleanly and the VM is stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use scaibunker_api::bunkers as api;
use scaibunker_api::codes;
use scaibunker_api::exec::{ExecRequest, ExecResult, ExecUser};
use scaibunker_api::files::{FileEntry, FileType, FileWritten};
use scaibunker_core::ids::{AuditId, BunkerId, ExecId};
use scaibunker_core::lifecycle::{self, BunkerStatus, LifecycleEvent};
use scaibunker_core::placement::{self, Candidate, ImagePull, PlacementError};
use scaibunker_core::spec::{self, FieldError, LifecycleMode, NetworkProfile, Resources};
use scaibunker_proto::worker::{self as wp, CreateVm};

use super::auth::{self, Principal};
use super::exec_output::Pipe;
use super::{RequestContext, Services, random_bytes};
use crate::store::audit::{self, AuditEvent};
use crate::store::bunkers::{self as bstore, BunkerFilter, BunkerRow, Cursor, StatusChange};
use crate::store::exec_log::{self, ExecLogRow};
use crate::store::snapshots::SnapshotRow;
use crate::store::{StoreError, now_ms};
use crate::workers::{Pause, WorkerCallError, WorkerEvent, WorkerEvents};

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
    #[error("image `{0}` not found")]
    ImageNotFound(String),
    #[error("snapshot `{0}` not found")]
    SnapshotNotFound(String),
    #[error("snapshot `{0}` is {1}, not ready")]
    SnapshotNotReady(String, String),
    #[error("bunker not found")]
    NotFound,
    #[error("no streamed exec with this id on this bunker (finished ones are kept 10 minutes)")]
    ExecNotFound,
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

fn mode_of(m: Option<api::LifecycleMode>) -> LifecycleMode {
    match m.unwrap_or_default() {
        api::LifecycleMode::Ephemeral => LifecycleMode::Ephemeral,
        api::LifecycleMode::Session => LifecycleMode::Session,
        api::LifecycleMode::Persistent => LifecycleMode::Persistent,
    }
}

fn profile_of(p: Option<api::NetworkProfile>) -> NetworkProfile {
    match p.unwrap_or_default() {
        api::NetworkProfile::Isolated => NetworkProfile::Isolated,
        api::NetworkProfile::Registry => NetworkProfile::Registry,
        api::NetworkProfile::Allowlisted => NetworkProfile::Allowlisted,
        api::NetworkProfile::Unrestricted => NetworkProfile::Unrestricted,
        api::NetworkProfile::Transit => NetworkProfile::Transit,
    }
}

fn session_type_str(t: api::SessionType) -> &'static str {
    match t {
        api::SessionType::Standalone => "standalone",
        api::SessionType::Scaicore => "scaicore",
        api::SessionType::Scaiwave => "scaiwave",
        api::SessionType::Api => "api",
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

/// Checks permissions for the mode and profile, then every field.
fn check_create(p: &Principal, req: &api::CreateBunker) -> Result<(), BunkerError> {
    if !p.has(auth::CREATE) {
        return Err(BunkerError::PermissionDenied(auth::CREATE));
    }
    match mode_of(req.lifecycle_mode) {
        LifecycleMode::Session if !p.has(auth::CREATE_SESSION) => {
            return Err(BunkerError::LifecycleModeDenied(
                "session",
                auth::CREATE_SESSION,
            ));
        }
        LifecycleMode::Persistent if !p.has(auth::CREATE_PERSISTENT) => {
            return Err(BunkerError::LifecycleModeDenied(
                "persistent",
                auth::CREATE_PERSISTENT,
            ));
        }
        _ => {}
    }
    let profile = profile_of(req.network_profile);
    let needed = match profile {
        NetworkProfile::Isolated => None,
        NetworkProfile::Registry => Some(auth::NETWORK_REGISTRY),
        NetworkProfile::Allowlisted => Some(auth::NETWORK_ALLOWLISTED),
        NetworkProfile::Unrestricted => Some(auth::NETWORK_UNRESTRICTED),
        NetworkProfile::Transit => Some(auth::NETWORK_TRANSIT),
    };
    if let Some(perm) = needed
        && !p.has(perm)
    {
        return Err(BunkerError::NetworkProfileDenied(profile.as_str(), perm));
    }
    let interfaces = req.interfaces.as_deref().unwrap_or_default();
    if profile != NetworkProfile::Transit && !interfaces.is_empty() {
        return Err(BunkerError::InterfacesNotAllowed);
    }
    if profile == NetworkProfile::Transit && interfaces.is_empty() {
        return Err(BunkerError::TransitMissingInterfaces);
    }

    let mut errors = Vec::new();
    match (&req.image, &req.snapshot_id) {
        (None, None) => errors.push(field("image", "required (an image name or id)")),
        (Some(i), _) if i.is_empty() || i.len() > 128 => {
            errors.push(field("image", "must be 1 to 128 characters"))
        }
        _ => {}
    }
    if let Some(n) = &req.name
        && (n.is_empty() || n.len() > 128)
    {
        errors.push(field("name", "must be 1 to 128 characters"));
    }
    if profile != NetworkProfile::Isolated {
        // Egress policy enforcement (namespaces, nftables) is not in this release: refuse
        // rather than silently run with a different network than asked for.
        errors.push(field(
            "network_profile",
            format!(
                "`{}` is not available on this deployment yet; use `isolated`",
                profile.as_str()
            ),
        ));
    }
    match (&req.network_allowlist, profile) {
        (None, NetworkProfile::Allowlisted) => {
            errors.push(field("network_allowlist", "required with `allowlisted`"))
        }
        (Some(list), NetworkProfile::Allowlisted) => {
            if list.is_empty() || list.len() > 256 {
                errors.push(field("network_allowlist", "must hold 1 to 256 host names"));
            }
            for host in list {
                if let Err(m) = spec::validate_allowlist_host(host) {
                    errors.push(field("network_allowlist", format!("`{host}`: {m}")));
                }
            }
        }
        (Some(list), _) if !list.is_empty() => errors.push(field(
            "network_allowlist",
            "only allowed with the `allowlisted` network profile",
        )),
        _ => {}
    }
    for (name, value) in [
        ("max_lifetime_s", req.max_lifetime_s),
        ("idle_timeout_s", req.idle_timeout_s),
    ] {
        if let Some(v) = value
            && let Some(e) = spec::validate_duration_s(name, v)
        {
            errors.push(e);
        }
    }
    if let Some(b) = req.bandwidth_mbit
        && let Some(e) = spec::validate_bandwidth_mbit(b)
    {
        errors.push(e);
    }
    if let Some(r) = &req.session_ref
        && r.len() > 256
    {
        errors.push(field("session_ref", "at most 256 characters"));
    }
    if let Some(t) = &req.gpu_type
        && t.len() > 64
    {
        errors.push(field("gpu_type", "at most 64 characters"));
    }
    validate_map(
        &mut errors,
        "label_set",
        req.label_set.as_ref().unwrap_or(&BTreeMap::new()),
        64,
        256,
        false,
    );
    validate_map(
        &mut errors,
        "env_vars",
        req.env_vars.as_ref().unwrap_or(&BTreeMap::new()),
        128,
        32 * 1024,
        true,
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(BunkerError::Validation(errors))
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

/// Creates a bunker. With `wait` (the default) returns once it is running or failed.
pub async fn create(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    req: api::CreateBunker,
) -> Result<BunkerRow, BunkerError> {
    check_create(p, &req)?;
    let restore = match &req.snapshot_id {
        Some(id) => Some(restorable(s, p, id, &req).await?),
        None => None,
    };
    let image_ref = match &restore {
        Some((snap, _)) => snap.image_id.clone(),
        None => req.image.clone().unwrap_or_default(),
    };
    let partner = s.store.tenant_partner(&p.tenant_id).await?;
    let image = s
        .store
        .image_visible_to(&p.tenant_id, partner.as_deref(), &image_ref)
        .await?
        .filter(|i| i.status == "ready")
        .ok_or_else(|| BunkerError::ImageNotFound(image_ref.clone()))?;
    let image_sha = image
        .sha256
        .clone()
        .ok_or_else(|| BunkerError::ImageNotFound(image_ref.clone()))?;

    if let Some((snap, manifest)) = &restore
        && manifest.image_sha256 != image_sha
    {
        return Err(BunkerError::SnapshotNotReady(
            snap.id.clone(),
            "of an image whose content changed since".to_owned(),
        ));
    }

    let pick = |asked: Option<u64>, image_default: Option<i64>, platform: u64| {
        asked.unwrap_or_else(|| image_default.map(|d| d as u64).unwrap_or(platform))
    };
    // A restore defaults to the snapshotted bunker's resources.
    let snap_default = |of: fn(&SnapshotRow) -> i64| restore.as_ref().map(|(snap, _)| of(snap));
    let resources = Resources {
        cpu_millicores: pick(
            req.cpu_millicores,
            snap_default(|s| s.cpu_millicores).or(image.default_cpu_millicores),
            spec::DEFAULT_RESOURCES.cpu_millicores,
        ),
        memory_mb: pick(
            req.memory_mb,
            snap_default(|s| s.memory_mb).or(image.default_memory_mb),
            spec::DEFAULT_RESOURCES.memory_mb,
        ),
        disk_mb: pick(
            req.disk_mb,
            snap_default(|s| s.disk_mb).or(image.default_disk_mb),
            spec::DEFAULT_RESOURCES.disk_mb,
        ),
        gpu_count: req.gpu_count.unwrap_or(0),
    };
    let errors = spec::validate_resources(&resources);
    if !errors.is_empty() {
        return Err(BunkerError::Validation(errors));
    }

    let mode = mode_of(req.lifecycle_mode);
    let now = now_ms();
    let id = BunkerId::from_random(random_bytes());
    let mut row = BunkerRow {
        id: id.to_string(),
        tenant_id: p.tenant_id.clone(),
        owner_id: p.user_id.clone(),
        name: req.name.clone(),
        image_name: image.name.clone(),
        image_id: image.id.clone(),
        snapshot_id: req.snapshot_id.clone(),
        lifecycle_mode: mode.as_str().to_owned(),
        status: BunkerStatus::Pending.as_str().to_owned(),
        network_profile: profile_of(req.network_profile).as_str().to_owned(),
        network_allowlist: serde_json::to_string(
            &req.network_allowlist.clone().unwrap_or_default(),
        )
        .expect("strings serialise"),
        cpu_millicores: resources.cpu_millicores as i64,
        memory_mb: resources.memory_mb as i64,
        disk_mb: resources.disk_mb as i64,
        gpu_count: resources.gpu_count as i64,
        gpu_type: req.gpu_type.clone(),
        max_lifetime_s: req
            .max_lifetime_s
            .or(mode.default_max_lifetime().map(|d| d.as_secs()))
            .map(|v| v as i64),
        idle_timeout_s: req
            .idle_timeout_s
            .unwrap_or(mode.default_idle_timeout().as_secs()) as i64,
        session_type: session_type_str(req.session_type.unwrap_or_default()).to_owned(),
        session_ref: req.session_ref.clone(),
        label_set: serde_json::to_string(&req.label_set.clone().unwrap_or_default())
            .expect("maps serialise"),
        env_vars: serde_json::to_string(&req.env_vars.clone().unwrap_or_default())
            .expect("maps serialise"),
        interfaces: serde_json::to_string(&req.interfaces.clone().unwrap_or_default())
            .expect("interfaces serialise"),
        bandwidth_mbit: req.bandwidth_mbit.map(|b| b as i64),
        worker_id: None,
        failure_reason: None,
        created_at: now,
        started_at: None,
        last_activity_at: None,
        terminated_at: None,
    };

    let demand = scaibunker_core::quota::Demand {
        resources,
        is_persistent: mode == LifecycleMode::Persistent,
    };
    let charges = super::quotas::reserve(s, &p.tenant_id, &p.user_id, &row.id, &demand)
        .await
        .map_err(|e| match e {
            super::quotas::ReserveError::Exceeded(x) => BunkerError::QuotaExceeded(x),
            super::quotas::ReserveError::Counters(c) => BunkerError::QuotaUnavailable(c),
            super::quotas::ReserveError::Store(e) => BunkerError::Store(e),
        })?;
    let placed = place_and_record(
        s, p, ctx, &mut row, &image, &image_sha, &resources, &charges,
    )
    .await;
    let worker_url = match placed {
        Ok(url) => url,
        Err(e) => {
            // Nothing was recorded: the quota this create reserved goes back.
            super::quotas::release(s, &row.id).await;
            return Err(e);
        }
    };

    let create_vm = CreateVm {
        bunker_id: row.id.clone(),
        image_sha256: image_sha.clone(),
        cpu_millicores: resources.cpu_millicores,
        memory_mb: resources.memory_mb,
        disk_mb: resources.disk_mb,
        hostname: format!("bunker-{}", &row.id[4..12]),
        env_vars: req.env_vars.clone().unwrap_or_default(),
        snapshot: restore.map(|(_, manifest)| manifest),
        // A lazy image may land on a worker without it: tell the worker where the bytes are.
        image_pull: image
            .lazy_pull
            .then(|| scaibunker_proto::worker::ImagePull {
                sha256: image_sha.clone(),
                size_bytes: image.size_bytes.unwrap_or(0) as u64,
                object_key: image.object_key.clone(),
            }),
    };
    let task = tokio::spawn(provision(s.clone(), row.clone(), worker_url, create_vm));
    if req.wait.unwrap_or(true) {
        // The task owns the boot; a panic there is a bug but must not leave the row pending.
        if task.await.is_err() {
            mark_failed(
                s,
                &row.tenant_id,
                &row.id,
                "internal error while provisioning",
            )
            .await?;
        }
        return Ok(s
            .store
            .bunker(&row.tenant_id, &row.id)
            .await?
            .unwrap_or(row));
    }
    Ok(row)
}

/// The ready snapshot a create restores, checked against the request: a `full` snapshot
/// resumes a saved VM, so its memory and CPU cannot change.
async fn restorable(
    s: &Services,
    p: &Principal,
    id: &str,
    req: &api::CreateBunker,
) -> Result<(SnapshotRow, wp::SnapshotManifest), BunkerError> {
    let (snap, manifest) = super::snapshots::for_restore(s, p, id).await?;
    let mut errors = Vec::new();
    if let Some(image) = &req.image
        && *image != snap.image_name
        && *image != snap.image_id
    {
        errors.push(field(
            "image",
            format!(
                "the snapshot is of image `{}`; leave `image` out or name that one",
                snap.image_name
            ),
        ));
    }
    if manifest.kind == wp::SnapshotKind::Full {
        if req.memory_mb.is_some_and(|m| m as i64 != snap.memory_mb) {
            errors.push(field(
                "memory_mb",
                format!(
                    "a full snapshot resumes with the memory it was saved with ({} MB)",
                    snap.memory_mb
                ),
            ));
        }
        if req
            .cpu_millicores
            .is_some_and(|c| c as i64 != snap.cpu_millicores)
        {
            errors.push(field(
                "cpu_millicores",
                format!(
                    "a full snapshot resumes with the CPU it was saved with ({} millicores)",
                    snap.cpu_millicores
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(BunkerError::Validation(errors));
    }
    Ok((snap, manifest))
}

/// Places the bunker and records it (row, quota charges, audit event) in one transaction,
/// under the placement lock. Returns the chosen worker's URL.
#[allow(clippy::too_many_arguments)]
async fn place_and_record(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    row: &mut BunkerRow,
    image: &crate::store::images::ImageRow,
    image_sha: &str,
    resources: &Resources,
    charges: &[(String, i64)],
) -> Result<String, BunkerError> {
    {
        let _guard = s.placement_lock.lock().await;
        let mut tx = s.store.begin().await?;
        let workers = s.store.workers_for_placement(&mut tx).await?;
        let committed = s.store.committed_by_worker(&mut tx).await?;
        let with_image = s.store.workers_with_image(&mut tx, image_sha).await?;
        // `transit` interfaces name host bridges; only workers owning all of them qualify.
        let interfaces: Vec<api::Interface> =
            serde_json::from_str(&row.interfaces).unwrap_or_default();
        let bridge_names: Vec<String> = interfaces.iter().map(|i| i.bridge_name.clone()).collect();
        let with_bridges = s.store.workers_with_bridges(&mut tx, &bridge_names).await?;
        let stale_after = s.config.heartbeat_interval.as_millis() as i64 * 3;
        let silences = super::fleet::silences(s, &workers).await;
        let frees: Vec<Resources> = workers
            .iter()
            .map(|w| {
                let used = committed
                    .iter()
                    .find(|(id, _)| *id == w.id)
                    .map(|(_, c)| Resources {
                        cpu_millicores: c.cpu_millicores as u64,
                        memory_mb: c.memory_mb as u64,
                        disk_mb: c.disk_mb as u64,
                        gpu_count: c.gpu_count as u64,
                    })
                    .unwrap_or_default();
                Resources {
                    cpu_millicores: w.cpu_millicores as u64,
                    memory_mb: w.memory_mb as u64,
                    disk_mb: w.disk_mb as u64,
                    gpu_count: w.gpu_count as u64,
                }
                .saturating_sub(&used)
            })
            .collect();
        let candidates: Vec<Candidate> = workers
            .iter()
            .zip(&frees)
            .map(|(w, free)| Candidate {
                worker_id: &w.id,
                is_online: silences.get(&w.id).is_some_and(|ms| *ms <= stale_after),
                is_draining: w.status == "draining",
                has_image: with_image.contains(&w.id),
                has_bridges: bridge_names.is_empty() || with_bridges.contains(&w.id),
                free: *free,
            })
            .collect();
        let pull = if image.lazy_pull {
            ImagePull::Lazy
        } else {
            ImagePull::Cached
        };
        let chosen = placement::place(&candidates, resources, pull).map_err(|e| match e {
            PlacementError::WorkerUnavailable => BunkerError::WorkerUnavailable,
            PlacementError::NoSuitableWorker => BunkerError::NoSuitableWorker,
        })?;
        let worker = workers
            .iter()
            .find(|w| w.id == chosen)
            .expect("placement picks among the candidates");
        row.worker_id = Some(worker.id.clone());
        bstore::insert(&mut tx, row).await?;
        crate::store::quotas::insert_charges(&mut tx, &row.id, charges).await?;
        audit::insert(
            &mut tx,
            &audit_event(
                p,
                ctx,
                "bunker.create",
                &row.id,
                "success",
                serde_json::json!({"image": image.name, "worker_id": worker.id}),
            ),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(worker.url.clone())
    }
}

/// Boots the VM on its worker and records the outcome.
async fn provision(s: Services, row: BunkerRow, worker_url: String, req: CreateVm) {
    let result = provision_inner(&s, &row, &worker_url, &req).await;
    if let Err(e) = result {
        tracing::error!(bunker_id = row.id, error = ?e, "provisioning failed");
        let _ = mark_failed(
            &s,
            &row.tenant_id,
            &row.id,
            "internal error while provisioning",
        )
        .await;
    }
}

async fn provision_inner(
    s: &Services,
    row: &BunkerRow,
    worker_url: &str,
    req: &CreateVm,
) -> Result<(), BunkerError> {
    let mut tx = s.store.begin().await?;
    let moved = bstore::change_status(
        &mut tx,
        &row.tenant_id,
        &row.id,
        &StatusChange {
            from: &["pending"],
            to: "provisioning",
            failure_reason: None,
            started_at: None,
            terminated_at: None,
        },
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    if !moved {
        return Ok(()); // deleted before it started
    }
    match s.workers.create_vm(worker_url, req).await {
        Ok(info) => {
            let now = now_ms();
            let mut tx = s.store.begin().await?;
            let moved = bstore::change_status(
                &mut tx,
                &row.tenant_id,
                &row.id,
                &StatusChange {
                    from: &["provisioning"],
                    to: "running",
                    failure_reason: None,
                    started_at: Some(now),
                    terminated_at: None,
                },
            )
            .await?;
            bstore::touch_activity(&mut tx, &row.tenant_id, &row.id, now).await?;
            tx.commit().await.map_err(StoreError::from)?;
            tracing::info!(bunker_id = row.id, boot_ms = info.boot_ms, "bunker running");
            if !moved {
                // Deleted while booting: the VM must not outlive its bunker.
                s.workers.delete_vm(worker_url, &row.id).await?;
            }
            Ok(())
        }
        Err(e) => {
            let reason = match &e {
                WorkerCallError::Worker { body, .. } => format!("{}: {}", body.code, body.message),
                other => other.to_string(),
            };
            mark_failed(s, &row.tenant_id, &row.id, &reason).await?;
            // The worker cleans up a failed boot itself; this covers a lost answer.
            if let Err(e) = s.workers.delete_vm(worker_url, &row.id).await {
                tracing::warn!(bunker_id = row.id, error = %e, "cleanup after failed boot");
            }
            Ok(())
        }
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
    if let Err(e) = s.workers.delete_vm(&worker.url, &row.id).await {
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
    s.workers.set_paused(&worker.url, &row.id, op).await?;
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
) -> Result<(BunkerRow, String), BunkerError> {
    let row = load(s, p, id).await?;
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
    Ok((row, worker.url))
}

pub(crate) fn remaining_lifetime_s(row: &BunkerRow, now: i64) -> Option<u64> {
    let max = row.max_lifetime_s?;
    let started = row.started_at.unwrap_or(row.created_at);
    let end = started + max * 1000;
    Some(((end - now).max(1000) / 1000) as u64)
}

const DEFAULT_EXEC_TIMEOUT_S: u64 = 60;
const MAX_STDIN_BYTES: usize = 1024 * 1024;
const OUTPUT_PREVIEW_CHARS: usize = 512;

/// An exec request checked and ready to send to the bunker's worker.
pub struct PreparedExec {
    pub row: BunkerRow,
    pub worker_url: String,
    pub request: wp::ExecRequest,
    /// The command as the exec log records it.
    pub command_text: String,
}

/// Checks permissions and every field, and that the bunker runs; builds the worker request.
pub async fn prepare_exec(
    s: &Services,
    p: &Principal,
    id: &str,
    req: &ExecRequest,
) -> Result<PreparedExec, BunkerError> {
    if !p.has(auth::EXECUTE) {
        return Err(BunkerError::PermissionDenied(auth::EXECUTE));
    }
    let user = req.user.unwrap_or_default();
    if user == ExecUser::Root && !p.has(auth::ROOT) {
        return Err(BunkerError::PermissionDenied(auth::ROOT));
    }
    let mut errors = Vec::new();
    let program = match (&req.command, &req.argv) {
        (Some(c), None) if !c.is_empty() && !c.contains('\0') => {
            Some(wp::Program::Shell(c.clone()))
        }
        (None, Some(a)) if !a.is_empty() && a.iter().all(|x| !x.contains('\0')) => {
            Some(wp::Program::Argv(a.clone()))
        }
        (Some(_), Some(_)) => {
            errors.push(field(
                "command",
                "give either `command` or `argv`, not both",
            ));
            None
        }
        (None, None) => {
            errors.push(field("command", "one of `command` and `argv` is required"));
            None
        }
        _ => {
            errors.push(field("command", "must be non-empty and without NUL bytes"));
            None
        }
    };
    if req.timeout_s == Some(0) {
        errors.push(field("timeout_s", "must be at least 1"));
    }
    let stdin = match (&req.stdin, &req.stdin_b64) {
        (Some(_), Some(_)) => {
            errors.push(field(
                "stdin",
                "give either `stdin` or `stdin_b64`, not both",
            ));
            None
        }
        (Some(t), None) => Some(t.as_bytes().to_vec()),
        (None, Some(b)) => match B64.decode(b) {
            Ok(v) => Some(v),
            Err(_) => {
                errors.push(field("stdin_b64", "not valid base64"));
                None
            }
        },
        (None, None) => None,
    };
    if stdin.as_ref().is_some_and(|v| v.len() > MAX_STDIN_BYTES) {
        errors.push(field("stdin", format!("at most {MAX_STDIN_BYTES} bytes")));
    }
    if let Some(cwd) = &req.cwd
        && validate_path(cwd).is_err()
    {
        errors.push(field("cwd", "must be an absolute path without NUL bytes"));
    }
    let env = req.env.clone().unwrap_or_default();
    validate_map(&mut errors, "env", &env, 128, 32 * 1024, true);
    let Some(program) = program.filter(|_| errors.is_empty()) else {
        return Err(BunkerError::Validation(errors));
    };

    let (row, worker_url) = running(s, p, id).await?;
    let now = now_ms();
    let mut timeout_s = req.timeout_s.unwrap_or(DEFAULT_EXEC_TIMEOUT_S);
    if let Some(left) = remaining_lifetime_s(&row, now) {
        timeout_s = timeout_s.min(left);
    }
    let limit = s.config.exec_inline_limit_bytes;
    let command_text = match &program {
        wp::Program::Shell(c) => c.clone(),
        wp::Program::Argv(a) => a.join(" "),
    };
    let wreq = wp::ExecRequest {
        program,
        env,
        cwd: req.cwd.clone(),
        user: match user {
            ExecUser::User => wp::GuestUser::User,
            ExecUser::Root => wp::GuestUser::Root,
        },
        stdin_b64: stdin.map(|v| B64.encode(v)),
        timeout_ms: timeout_s * 1000,
        output_limit_bytes: limit,
    };
    Ok(PreparedExec {
        row,
        worker_url,
        request: wreq,
        command_text,
    })
}

/// Records a finished exec: its exec-log row, its audit event and the bunker's activity.
pub async fn record_exec(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    row: &BunkerRow,
    entry: ExecLogRow,
) -> Result<(), BunkerError> {
    let mut tx = s.store.begin().await?;
    let details = serde_json::json!({
        "exec_id": entry.id,
        "exit_code": entry.exit_code,
        "timed_out": entry.timed_out,
    });
    exec_log::insert(&mut tx, &entry).await?;
    audit::insert(
        &mut tx,
        &audit_event(p, ctx, "bunker.exec", &row.id, "success", details),
    )
    .await?;
    bstore::touch_activity(&mut tx, &row.tenant_id, &row.id, now_ms()).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

/// Runs a command and answers with its whole result (`stream: false`).
pub async fn exec(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    req: ExecRequest,
) -> Result<ExecResult, BunkerError> {
    let PreparedExec {
        row,
        worker_url,
        request: wreq,
        command_text,
    } = prepare_exec(s, p, id, &req).await?;
    let now = now_ms();
    let started = std::time::Instant::now();
    let exec_id = ExecId::from_random(random_bytes()).to_string();
    let full_ref = super::exec_output::output_ref(&row.tenant_id, &row.id, &exec_id);
    let limit = s.config.exec_inline_limit_bytes;
    let objects = s.objects();
    let mut out_pipe = Pipe::new(format!("{full_ref}/stdout"), limit);
    let mut err_pipe = Pipe::new(format!("{full_ref}/stderr"), limit);
    // The streaming route even inline: output past the limit is spilled as it arrives
    // instead of being cut off at the worker.
    let upstream = s.workers.exec_stream(&worker_url, &row.id, &wreq).await?;
    let mut events = WorkerEvents::new(upstream);
    let mut exit = None;
    let mut failure = None;
    while let Some(event) = events.next().await {
        match event {
            WorkerEvent::Stdout(bytes) => out_pipe.push(objects, bytes).await,
            WorkerEvent::Stderr(bytes) => err_pipe.push(objects, bytes).await,
            WorkerEvent::Exit {
                exit_code,
                timed_out,
            } => exit = Some((exit_code, timed_out)),
            WorkerEvent::Error { code, message } => failure = Some((code, message)),
        }
    }
    let spilled = out_pipe.spilled() || err_pipe.spilled();
    let out = out_pipe.finish(objects, spilled).await;
    let err = err_pipe.finish(objects, spilled).await;
    let Some((exit_code, timed_out)) = exit else {
        let (code, message) = failure.unwrap_or_else(|| ("WORKER_ERROR".into(), "no exit".into()));
        let (status, _) = worker_code_status(&code);
        return Err(if status < 500 {
            BunkerError::Worker(WorkerCallError::Worker {
                status,
                body: wp::WorkerError { code, message },
            })
        } else {
            BunkerError::ExecFailed { code, message }
        });
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let truncated = out.total > out.kept.len() as u64 || err.total > err.kept.len() as u64;
    let full_output_ref = (truncated && out.stored && err.stored).then_some(full_ref);
    let (stdout_text, stdout_b64) = text_or_b64(out.kept);
    let (stderr_text, stderr_b64) = text_or_b64(err.kept);
    let preview: String = stdout_text
        .as_deref()
        .unwrap_or("<binary>")
        .chars()
        .take(OUTPUT_PREVIEW_CHARS)
        .collect();

    record_exec(
        s,
        p,
        ctx,
        &row,
        ExecLogRow {
            id: exec_id.clone(),
            tenant_id: row.tenant_id.clone(),
            bunker_id: row.id.clone(),
            actor_id: p.user_id.clone(),
            command: command_text.chars().take(4096).collect(),
            exit_code,
            duration_ms: duration_ms as i64,
            timed_out,
            output_preview: preview,
            created_at: now,
        },
    )
    .await?;

    Ok(ExecResult {
        exec_id,
        exit_code,
        stdout: stdout_text,
        stderr: stderr_text,
        stdout_b64,
        stderr_b64,
        duration_ms,
        timed_out,
        truncated,
        full_output_ref,
    })
}

fn text_or_b64(bytes: Vec<u8>) -> (Option<String>, Option<String>) {
    match String::from_utf8(bytes) {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(B64.encode(e.into_bytes()))),
    }
}

/// Checks a guest path: absolute, no NUL, at most 4096 bytes.
pub fn validate_path(path: &str) -> Result<(), BunkerError> {
    if !path.starts_with('/') {
        return Err(BunkerError::InvalidPath(format!(
            "`{path}` is not absolute"
        )));
    }
    if path.contains('\0') {
        return Err(BunkerError::InvalidPath("path contains a NUL byte".into()));
    }
    if path.len() > 4096 {
        return Err(BunkerError::InvalidPath(
            "path is longer than 4096 bytes".into(),
        ));
    }
    Ok(())
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

/// Where an upload goes and what the client declared about it.
pub struct Upload<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub content_length: Option<u64>,
    /// The body is a tar stream unpacked into the directory `path`.
    pub archive: bool,
}

/// Streams an upload into the bunker; the agent writes it atomically.
pub async fn write_file<S>(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    upload: Upload<'_>,
    body: S,
) -> Result<FileWritten, BunkerError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
{
    let Upload {
        path,
        mode,
        content_length,
        archive,
    } = upload;
    if !p.has(auth::FILES) {
        return Err(BunkerError::PermissionDenied(auth::FILES));
    }
    validate_path(path)?;
    let limit = s.config.max_file_bytes;
    if content_length.is_some_and(|n| n > limit) {
        return Err(BunkerError::FileTooLarge { limit });
    }
    let (row, worker_url) = running(s, p, id).await?;
    // Count bytes as they pass; past the limit the stream errors, the worker cancels the
    // upload and the agent removes its temporary file.
    let over = Arc::new(AtomicBool::new(false));
    let over_flag = over.clone();
    let mut seen = 0u64;
    let capped = body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > limit {
            over_flag.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other("upload exceeds the file size limit"));
        }
        Ok(chunk)
    });
    let result = s
        .workers
        .write_file(&worker_url, &row.id, path, mode, archive, capped)
        .await;
    if over.load(Ordering::SeqCst) {
        return Err(BunkerError::FileTooLarge { limit });
    }
    let written = result?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        if archive {
            "bunker.file.archive.write"
        } else {
            "bunker.file.write"
        },
        serde_json::json!({"path": path, "size_bytes": written.size_bytes}),
    )
    .await?;
    Ok(FileWritten {
        path: path.to_owned(),
        size_bytes: written.size_bytes,
    })
}

/// The running bunker a file operation targets: checks the permission and the path first.
async fn file_target(
    s: &Services,
    p: &Principal,
    id: &str,
    path: &str,
) -> Result<(BunkerRow, String), BunkerError> {
    if !p.has(auth::FILES) {
        return Err(BunkerError::PermissionDenied(auth::FILES));
    }
    validate_path(path)?;
    running(s, p, id).await
}

/// Starts a download: the worker's response, whose body streams the file.
pub async fn read_file(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
    archive: bool,
) -> Result<reqwest::Response, BunkerError> {
    let (row, worker_url) = file_target(s, p, id, path).await?;
    let resp = s
        .workers
        .read_file(&worker_url, &row.id, path, archive)
        .await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        if archive {
            "bunker.file.archive.read"
        } else {
            "bunker.file.read"
        },
        serde_json::json!({"path": path}),
    )
    .await?;
    Ok(resp)
}

pub async fn list_files(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
) -> Result<Vec<FileEntry>, BunkerError> {
    let (row, worker_url) = file_target(s, p, id, path).await?;
    let entries = s.workers.list_dir(&worker_url, &row.id, path).await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        "bunker.file.list",
        serde_json::json!({"path": path}),
    )
    .await?;
    Ok(entries
        .into_iter()
        .map(|e| FileEntry {
            name: e.name,
            path: e.path,
            file_type: match e.entry_type {
                wp::EntryType::File => FileType::File,
                wp::EntryType::Dir => FileType::Dir,
                wp::EntryType::Symlink => FileType::Symlink,
                wp::EntryType::Other => FileType::Other,
            },
            size_bytes: e.size_bytes,
            mode: format!("{:04o}", e.mode),
            modified_at: rfc3339(e.modified_unix_s * 1000),
        })
        .collect())
}

pub async fn delete_file(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
    path: &str,
    recursive: bool,
) -> Result<(), BunkerError> {
    let (row, worker_url) = file_target(s, p, id, path).await?;
    s.workers
        .remove_file(&worker_url, &row.id, path, recursive)
        .await?;
    record_activity(
        s,
        p,
        ctx,
        &row,
        "bunker.file.delete",
        serde_json::json!({"path": path, "recursive": recursive}),
    )
    .await
}

/// Unix milliseconds as RFC 3339 UTC (`2026-11-28T10:33:54.123Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC only) into Unix milliseconds.
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    let t = t.strip_suffix('Z').or_else(|| t.strip_suffix("+00:00"))?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = match time.split_once('.') {
        Some((h, f)) => (h, f),
        None => (time, "0"),
    };
    let mut h = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms)
}

/// The public record of a bunker row. `env_vars` are never included.
pub fn to_api(r: &BunkerRow) -> api::Bunker {
    let parse_mode = |m: &str| match m {
        "session" => api::LifecycleMode::Session,
        "persistent" => api::LifecycleMode::Persistent,
        _ => api::LifecycleMode::Ephemeral,
    };
    let parse_profile = |m: &str| match m {
        "registry" => api::NetworkProfile::Registry,
        "allowlisted" => api::NetworkProfile::Allowlisted,
        "unrestricted" => api::NetworkProfile::Unrestricted,
        "transit" => api::NetworkProfile::Transit,
        _ => api::NetworkProfile::Isolated,
    };
    let parse_session = |m: &str| match m {
        "scaicore" => api::SessionType::Scaicore,
        "scaiwave" => api::SessionType::Scaiwave,
        "api" => api::SessionType::Api,
        _ => api::SessionType::Standalone,
    };
    api::Bunker {
        id: r.id.clone(),
        tenant_id: r.tenant_id.clone(),
        owner_id: r.owner_id.clone(),
        name: r.name.clone(),
        image: r.image_name.clone(),
        image_id: r.image_id.clone(),
        snapshot_id: r.snapshot_id.clone(),
        lifecycle_mode: parse_mode(&r.lifecycle_mode),
        status: r.status.clone(),
        network_profile: parse_profile(&r.network_profile),
        network_allowlist: serde_json::from_str(&r.network_allowlist).unwrap_or_default(),
        cpu_millicores: r.cpu_millicores as u64,
        memory_mb: r.memory_mb as u64,
        disk_mb: r.disk_mb as u64,
        gpu_count: r.gpu_count as u64,
        gpu_type: r.gpu_type.clone(),
        max_lifetime_s: r.max_lifetime_s.map(|v| v as u64),
        idle_timeout_s: r.idle_timeout_s as u64,
        session_type: parse_session(&r.session_type),
        session_ref: r.session_ref.clone(),
        label_set: serde_json::from_str(&r.label_set).unwrap_or_default(),
        interfaces: serde_json::from_str(&r.interfaces).unwrap_or_default(),
        bandwidth_mbit: r.bandwidth_mbit.map(|v| v as u64),
        worker_id: r.worker_id.clone(),
        failure_reason: r.failure_reason.clone(),
        created_at: rfc3339(r.created_at),
        started_at: r.started_at.map(rfc3339),
        last_activity_at: r.last_activity_at.map(rfc3339),
        terminated_at: r.terminated_at.map(rfc3339),
    }
}

/// The API code a worker's error code maps to, with its HTTP status.
pub fn worker_code_status(code: &str) -> (u16, &'static str) {
    match code {
        "FILE_NOT_FOUND" => (404, codes::FILE_NOT_FOUND),
        "IS_A_DIRECTORY" => (409, codes::IS_A_DIRECTORY),
        "NOT_A_DIRECTORY" => (409, codes::NOT_A_DIRECTORY),
        "DIRECTORY_NOT_EMPTY" => (409, codes::DIRECTORY_NOT_EMPTY),
        "INVALID_PATH" => (422, codes::INVALID_PATH),
        "INVALID_ARCHIVE" => (422, codes::INVALID_ARCHIVE),
        "PERMISSION_DENIED" => (403, codes::PERMISSION_DENIED),
        "FILE_TOO_LARGE" => (413, codes::FILE_TOO_LARGE),
        "BUNKER_NOT_RUNNING" | "BUNKER_NOT_FOUND" => (409, codes::BUNKER_NOT_RUNNING),
        _ => (502, codes::WORKER_ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_862_034_123), "2026-11-28T10:33:54.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn rfc3339_parses_what_it_formats() {
        for ms in [0, 951_782_400_000, 1_795_862_034_123] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339("2026-11-28T10:33:54Z"),
            Some(1_795_862_034_000)
        );
        for bad in [
            "",
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-11-28T10:33:54+02:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

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

    #[test]
    fn paths_must_be_absolute_without_nul() {
        assert!(validate_path("/tmp/x").is_ok());
        for bad in ["tmp/x", "", "/a\0b"] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_path(&format!("/{}", "a".repeat(5000))).is_err());
    }
}
