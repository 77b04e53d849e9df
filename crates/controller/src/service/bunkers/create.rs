//! Creating a bunker: validate → resolve image → place → record → boot.
//!
//! Step by step:
//! 1. Validate every field (all problems reported at once) and check the permissions the
//!    lifecycle mode and network profile need.
//! 2. Resolve the image visible to the tenant. A built-in image named by name may be active
//!    in several shas (workers built from other inputs); each is a candidate and the worker
//!    placement picks boots the one it holds. By id, or for a restore, it is that one sha.
//! 3. Reserve quota (atomically, in live state; see `quotas`): `429` if a cap would be passed.
//! 4. Under the placement lock, in one transaction: lock and read the fleet (the lock
//!    serializes placements across controllers too) and what its live bunkers hold, place with the core's pure policy, insert the `pending` row, its quota charges and
//!    its audit event. If this fails, the reserved quota is released.
//! 5. A spawned task (it survives the client going away) moves the bunker to `provisioning`,
//!    asks the worker to boot it, then to `running` or `failed`. Every status change is a
//!    compare-and-set, so a delete racing a boot wins cleanly and the VM is stopped.

use std::collections::BTreeMap;

use scaibunker_api::bunkers as api;
use scaibunker_core::ids::BunkerId;
use scaibunker_core::lifecycle::BunkerStatus;
use scaibunker_core::placement::{self, Candidate, ImagePull, PlacementError};
use scaibunker_core::spec::{self, LifecycleMode, NetworkProfile, Resources};
use scaibunker_proto::worker::{self as wp, CreateVm};

use super::{BunkerError, audit_event, field, mark_failed, validate_map};
use crate::service::auth::{self, Principal};
use crate::service::{RequestContext, Services, random_bytes};
use crate::store::audit;
use crate::store::bunkers::{self as bstore, BunkerRow, StatusChange};
use crate::store::images::ImageRow;
use crate::store::snapshots::SnapshotRow;
use crate::store::{StoreError, now_ms};
use crate::workers::WorkerCallError;

/// Most bytes a bunker's `env_vars` may take as JSON: half of what one exec can carry to the
/// agent ([`scaibunker_proto::agent::MAX_EXEC_FIELDS_BYTES`]), the rest for the command.
pub const MAX_ENV_VARS_BYTES: usize = 32 * 1024;

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
    if interfaces.iter().any(|i| !i.spoof_guard) && !p.has(auth::L2_TRANSPARENCY) {
        return Err(BunkerError::NetworkProfileDenied(
            "transit without a spoof guard",
            auth::L2_TRANSPARENCY,
        ));
    }
    // A globally administered MAC is a physical device's (the bridge's router, say): taking
    // one is impersonation, whatever the guard then pins.
    if interfaces.iter().any(|i| {
        i.mac
            .as_deref()
            .is_some_and(|m| spec::valid_unicast_mac(m) && !spec::locally_administered_mac(m))
    }) && !p.has(auth::L2_TRANSPARENCY)
    {
        return Err(BunkerError::NetworkProfileDenied(
            "transit with a globally administered MAC",
            auth::L2_TRANSPARENCY,
        ));
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
    // Transit NICs come after `eth0` in the order the guest names them: `eth1`, `eth2`, …
    for (i, nic) in interfaces.iter().enumerate() {
        let want = format!("eth{}", i + 1);
        if nic.if_name != want {
            errors.push(field(
                "interfaces",
                format!(
                    "interface {} must be named `{want}` (the guest names its NICs in order after `eth0`)",
                    i + 1
                ),
            ));
        }
        if !crate::service::fleet::valid_bridge_name(&nic.bridge_name) {
            errors.push(field(
                "interfaces",
                format!(
                    "`{}`: a bridge name is 1 to 15 characters of A-Z a-z 0-9 . _ -",
                    nic.bridge_name
                ),
            ));
        }
        if let Some(mac) = &nic.mac
            && !spec::valid_unicast_mac(mac)
        {
            errors.push(field(
                "interfaces",
                format!("`{mac}`: a MAC is a unicast `aa:bb:cc:dd:ee:ff`"),
            ));
        }
    }
    if interfaces.len() > spec::MAX_TRANSIT_INTERFACES {
        errors.push(field(
            "interfaces",
            format!("at most {} interfaces", spec::MAX_TRANSIT_INTERFACES),
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
    // Every exec carries the bunker's variables to the agent in one frame; leave room for
    // the command itself.
    let env_json = serde_json::to_vec(req.env_vars.as_ref().unwrap_or(&BTreeMap::new()))
        .map_or(usize::MAX, |v| v.len());
    if env_json > MAX_ENV_VARS_BYTES {
        errors.push(field(
            "env_vars",
            format!("at most {MAX_ENV_VARS_BYTES} bytes in all (JSON-encoded)"),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(BunkerError::Validation(errors))
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
    let choices = image_choices(s, &image, &image_ref).await?;

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
    // The guest's disk holds the image (or the snapshot's disk) and grows to `disk_mb`; it
    // never shrinks. Without an explicit `disk_mb`, the smallest that fits is taken.
    let min_disk_mb = choices
        .iter()
        .filter_map(|c| c.size_bytes)
        .map(|b| (b.max(0) as u64).div_ceil(1 << 20))
        .max()
        .unwrap_or(0)
        .max(
            restore
                .as_ref()
                .map_or(0, |(snap, _)| snap.disk_mb.max(0) as u64),
        );
    let mut resources = resources;
    if req.disk_mb.is_none() {
        resources.disk_mb = resources.disk_mb.max(min_disk_mb);
    }
    let mut errors = spec::validate_resources(&resources);
    if resources.disk_mb < min_disk_mb {
        errors.push(field(
            "disk_mb",
            format!(
                "must be at least {min_disk_mb}: the {} is that big",
                if restore.is_some() {
                    "snapshot's disk"
                } else {
                    "image"
                }
            ),
        ));
    }
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
    let charges = crate::service::quotas::reserve(s, &p.tenant_id, &p.user_id, &row.id, &demand)
        .await
        .map_err(|e| match e {
            crate::service::quotas::ReserveError::Exceeded(x) => BunkerError::QuotaExceeded(x),
            crate::service::quotas::ReserveError::Counters(c) => BunkerError::QuotaUnavailable(c),
            crate::service::quotas::ReserveError::Store(e) => BunkerError::Store(e),
        })?;
    let placed = place_and_record(s, p, ctx, &mut row, &choices, &resources, &charges).await;
    let (worker_url, image) = match placed {
        Ok(placed) => placed,
        Err(e) => {
            // Nothing was recorded: the quota this create reserved goes back.
            crate::service::quotas::release(s, &row.id).await;
            return Err(e);
        }
    };

    let image_sha = image.sha256.clone().unwrap_or_default();
    let create_vm = CreateVm {
        bunker_id: row.id.clone(),
        image_sha256: image_sha.clone(),
        cpu_millicores: resources.cpu_millicores,
        memory_mb: resources.memory_mb,
        disk_mb: resources.disk_mb,
        hostname: format!("bunker-{}", &row.id[4..12]),
        env_vars: req.env_vars.clone().unwrap_or_default(),
        // A lazy image may land on a worker without it: tell the worker where the bytes are.
        image_pull: image
            .lazy_pull
            .then(|| scaibunker_proto::worker::ImagePull {
                sha256: image_sha.clone(),
                size_bytes: image.size_bytes.unwrap_or(0) as u64,
                object_key: image.object_key.clone(),
            }),
        snapshot: restore.map(|(_, manifest)| manifest),
        tenant_id: row.tenant_id.clone(),
        network: crate::service::bunkers::network_spec(&row),
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
    let (snap, manifest) = crate::service::snapshots::for_restore(s, p, id).await?;
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

/// The image rows a create may boot, preferred first: for a built-in image named by name,
/// every ready sha of that name (newest first); otherwise the one row resolved.
async fn image_choices(
    s: &Services,
    image: &ImageRow,
    image_ref: &str,
) -> Result<Vec<ImageRow>, BunkerError> {
    let is_builtin = image.tenant_id.is_none() && image.source_kind.is_none();
    if !is_builtin || image_ref == image.id {
        return Ok(vec![image.clone()]);
    }
    let mut choices = s.store.ready_builtin_images(&image.name).await?;
    choices.retain(|c| c.sha256.is_some());
    if choices.is_empty() {
        choices.push(image.clone());
    }
    Ok(choices)
}

/// Picks the worker for a bunker needing `resources` of one of the images `image_shas` and
/// the bridges `bridge_names`, reading the fleet inside `tx` with its rows locked (see
/// `workers_for_placement`); the caller holds `placement_lock` and records its choice in the
/// same transaction. Also answers which of `image_shas` (the first in their order) the
/// worker holds; `None` only for a lazily pulled image it has yet to fetch.
pub(crate) async fn choose_worker(
    s: &Services,
    tx: &mut crate::store::Tx<'_>,
    lazy_pull: bool,
    image_shas: &[String],
    resources: &Resources,
    bridge_names: &[String],
) -> Result<(crate::store::workers::WorkerRow, Option<String>), BunkerError> {
    let workers = s.store.workers_for_placement(tx).await?;
    let committed = s.store.committed_by_worker(tx).await?;
    let held = s.store.workers_with_images(tx, image_shas).await?;
    let with_bridges = s.store.workers_with_bridges(tx, bridge_names).await?;
    let stale_after = s.config.heartbeat_interval.as_millis() as i64 * 3;
    let silences = crate::service::fleet::silences(s, &workers).await;
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
            // A stopping worker takes nothing new, as a draining one.
            is_draining: w.status == "draining" || w.status == "stopping",
            has_image: held.iter().any(|(id, _)| *id == w.id),
            has_bridges: bridge_names.is_empty() || with_bridges.contains(&w.id),
            free: *free,
        })
        .collect();
    let pull = if lazy_pull {
        ImagePull::Lazy
    } else {
        ImagePull::Cached
    };
    let chosen = placement::place(&candidates, resources, pull)
        .map_err(|e| match e {
            PlacementError::WorkerUnavailable => BunkerError::WorkerUnavailable,
            PlacementError::NoSuitableWorker => BunkerError::NoSuitableWorker,
        })?
        .to_owned();
    drop(candidates);
    let image_sha = image_shas
        .iter()
        .find(|sha| held.iter().any(|(id, h)| *id == chosen && h == *sha))
        .cloned();
    let worker = workers
        .into_iter()
        .find(|w| w.id == chosen)
        .expect("placement picks among the candidates");
    Ok((worker, image_sha))
}

/// Places the bunker on a worker holding one of `choices` and records it (row with the image
/// the worker boots, quota charges, audit event) in one transaction, under the placement
/// lock. Returns the chosen worker's URL and that image.
async fn place_and_record(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    row: &mut BunkerRow,
    choices: &[ImageRow],
    resources: &Resources,
    charges: &[(String, i64)],
) -> Result<(crate::workers::WorkerTarget, ImageRow), BunkerError> {
    {
        let _guard = s.placement_lock.lock().await;
        let mut tx = s.store.begin().await?;
        // `transit` interfaces name host bridges; only workers owning all of them qualify.
        let interfaces: Vec<api::Interface> =
            serde_json::from_str(&row.interfaces).unwrap_or_default();
        let bridge_names: Vec<String> = interfaces.iter().map(|i| i.bridge_name.clone()).collect();
        if !bridge_names.is_empty() {
            let known = s.store.bridges().await?;
            if let Some(missing) = bridge_names
                .iter()
                .find(|n| !known.iter().any(|b| &b.name == *n))
            {
                return Err(BunkerError::BridgeNotFound(missing.clone()));
            }
        }
        let shas: Vec<String> = choices.iter().filter_map(|c| c.sha256.clone()).collect();
        let lazy_pull = choices.iter().any(|c| c.lazy_pull);
        let (worker, held) =
            choose_worker(s, &mut tx, lazy_pull, &shas, resources, &bridge_names).await?;
        let image = held
            .and_then(|sha| choices.iter().find(|c| c.sha256.as_deref() == Some(&sha)))
            .unwrap_or(&choices[0])
            .clone();
        row.image_id = image.id.clone();
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
        let unguarded: Vec<&str> = interfaces
            .iter()
            .filter(|i| !i.spoof_guard)
            .map(|i| i.if_name.as_str())
            .collect();
        if !unguarded.is_empty() {
            audit::insert(
                &mut tx,
                &audit_event(
                    p,
                    ctx,
                    "bunker.transit.spoof_guard_disabled",
                    &row.id,
                    "success",
                    serde_json::json!({"interfaces": unguarded, "worker_id": worker.id}),
                ),
            )
            .await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok((
            crate::service::worker_credentials::target(s, &worker),
            image,
        ))
    }
}

/// Boots the VM on its worker and records the outcome.
async fn provision(
    s: Services,
    row: BunkerRow,
    worker_url: crate::workers::WorkerTarget,
    req: CreateVm,
) {
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
    worker_url: &crate::workers::WorkerTarget,
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
