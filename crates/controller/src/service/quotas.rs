//! Quota profiles, their assignments, enforcement at create and release when a bunker ends.
//!
//! Who may do what: tenant profiles and their assignments need `scaibunker:admin:tenant` (within
//! the tenant; `admin:platform` for any tenant); platform defaults (`tenant_id` null) and every
//! profile a platform admin made (origin `platform`, grants to a tenant) need
//! `scaibunker:admin:platform` to change, delete or assign. Anyone who may read sees their own
//! usage.
//!
//! Tenant admins only narrow what the platform granted. What applies to a user comes in two
//! layers, always evaluated together (every cap must pass, so the strictest wins per limit):
//! - the platform's: assignments of platform-made profiles on the user, its groups or its
//!   whole tenant, or, when there is none, every platform default on the user's own bucket (so
//!   a platform grant may be larger than the default);
//! - the tenant's: assignments of tenant-made profiles on the user, its groups or the tenant.
//!
//! Enforcement, per create:
//! 1. Resolve both layers for the creating user: assignments on the user and on every group the
//!    user is in, directly or through nested groups, and the platform defaults as above.
//! 2. The core's [`quota::plan`] checks per-bunker maxima and lists the charges.
//! 3. Live state checks every cap and increments every counter in one atomic step
//!    ([`LiveState::quota_reserve`](crate::live::LiveState::quota_reserve)); if the counters are
//!    missing (live state wiped), one controller rebuilds them from the `quota_charges` of
//!    bunkers that have not ended, under a lease, and the reservation is retried.
//! 4. The charges are written beside the bunker row, in its transaction; a create that fails
//!    before that releases what it reserved.
//! 5. Every path that ends a bunker calls [`release`], which is exactly-once in live state;
//!    [`reconcile`] (a background job) releases what a crashed controller left and recounts.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use scaibunker_api::quotas as api;
use scaibunker_core::ids::{AuditId, QuotaAssignmentId, QuotaProfileId};
use scaibunker_core::quota::{
    self, Applied, AssignmentMode, Bucket, BucketKind, Caps, Demand, PerBunkerMax, Resource,
};

use super::auth::{self, Principal};
use super::bunkers::rfc3339;
use super::{Services, random_bytes};
use crate::live::{LiveError, QuotaCharge, Reservation, Stash, quota_counter};
use crate::store::audit::AuditEvent;
use crate::store::identity::is_unique_violation;
use crate::store::quotas::{AssignmentRow, ProfileRow};
use crate::store::{StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("missing permission `{0}`")]
    PermissionDenied(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("quota counters are unavailable")]
    Unavailable(#[from] CountersError),
    #[error("store failed")]
    Store(#[from] StoreError),
}

/// The live counters could not be read or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("live state failed")]
    Live(#[from] LiveError),
    #[error("reading the charges of live bunkers failed")]
    Store(#[from] StoreError),
    #[error("the counters were not rebuilt within {0:?} (another controller holds the lease)")]
    RebuildTimedOut(Duration),
}

/// A create refused by a quota: the profile, bucket and resource, and the numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub profile_id: String,
    /// `user:{id}`, `group:{id}`, or `per_bunker` for a per-bunker maximum.
    pub bucket: String,
    pub resource: &'static str,
    pub current: i64,
    pub cap: u64,
    pub requested: u64,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "quota profile {} caps {} of bucket {} at {} (current {}, requested {})",
            self.profile_id, self.resource, self.bucket, self.cap, self.current, self.requested
        )
    }
}

/// Why a create could not reserve its quota.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("{0}")]
    Exceeded(Box<QuotaExceeded>),
    #[error("quota counters are unavailable")]
    Counters(#[from] CountersError),
    #[error("resolving quota profiles failed")]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> QuotaError {
    QuotaError::Invalid {
        field,
        message: message.into(),
    }
}

fn require(p: &Principal, perm: &'static str) -> Result<(), QuotaError> {
    if p.has(perm) {
        Ok(())
    } else {
        Err(QuotaError::PermissionDenied(perm))
    }
}

/// An audit event of an administrative change made by `p` (not tied to a request context).
pub(crate) fn audit(
    p: &Principal,
    action: &'static str,
    resource_type: &'static str,
    resource_id: &str,
    tenant_id: Option<&str>,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        id: AuditId::from_random(random_bytes()).to_string(),
        time_ms: now_ms(),
        tenant_id: tenant_id.map(str::to_owned),
        actor_id: Some(p.user_id.clone()),
        actor_type: "user",
        action,
        resource_type,
        resource_id: Some(resource_id.to_owned()),
        status: "success",
        ip: None,
        request_id: Some(crate::http::request_id()),
        details,
    }
}

/// `quota_profiles.origin` of what a platform admin made (defaults and grants to a tenant).
const ORIGIN_PLATFORM: &str = "platform";
/// `quota_profiles.origin` of what a tenant admin made: it only narrows.
const ORIGIN_TENANT: &str = "tenant";

/// Largest cap accepted: far above any real fleet, far below `i64::MAX` so sums cannot wrap.
const MAX_CAP: u64 = 1 << 50;

fn cap(field: &'static str, v: Option<u64>) -> Result<Option<i64>, QuotaError> {
    match v {
        Some(n) if n > MAX_CAP => Err(invalid(field, format!("at most {MAX_CAP}"))),
        Some(n) => Ok(Some(n as i64)),
        None => Ok(None),
    }
}

fn check_name(name: &str) -> Result<(), QuotaError> {
    if name.trim().is_empty() || name.chars().count() > 128 {
        return Err(invalid("name", "must be 1 to 128 characters"));
    }
    Ok(())
}

fn check_description(d: Option<&str>) -> Result<(), QuotaError> {
    if d.is_some_and(|d| d.chars().count() > 1024) {
        return Err(invalid("description", "at most 1024 characters"));
    }
    Ok(())
}

fn u(v: Option<i64>) -> Option<u64> {
    v.map(|n| n.max(0) as u64)
}

pub fn profile_api(r: ProfileRow) -> api::QuotaProfile {
    api::QuotaProfile {
        id: r.id,
        tenant_id: r.tenant_id,
        origin: if r.origin == ORIGIN_PLATFORM {
            api::ProfileOrigin::Platform
        } else {
            api::ProfileOrigin::Tenant
        },
        name: r.name,
        description: r.description,
        max_concurrent_bunkers: u(r.max_concurrent_bunkers),
        max_persistent_bunkers: u(r.max_persistent_bunkers),
        max_cpu_millicores: u(r.max_cpu_millicores),
        max_memory_mb: u(r.max_memory_mb),
        max_disk_mb: u(r.max_disk_mb),
        max_gpu_count: u(r.max_gpu_count),
        per_bunker_max_cpu: u(r.per_bunker_max_cpu),
        per_bunker_max_memory: u(r.per_bunker_max_memory),
        per_bunker_max_disk: u(r.per_bunker_max_disk),
        per_bunker_max_gpu: u(r.per_bunker_max_gpu),
        max_storage_mb: u(r.max_storage_mb),
        created_at: rfc3339(r.created_at),
        updated_at: rfc3339(r.updated_at),
    }
}

fn caps_of(r: &ProfileRow) -> Caps {
    Caps {
        concurrent_bunkers: u(r.max_concurrent_bunkers),
        persistent_bunkers: u(r.max_persistent_bunkers),
        cpu_millicores: u(r.max_cpu_millicores),
        memory_mb: u(r.max_memory_mb),
        disk_mb: u(r.max_disk_mb),
        gpu_count: u(r.max_gpu_count),
    }
}

fn per_bunker_of(r: &ProfileRow) -> PerBunkerMax {
    PerBunkerMax {
        cpu_millicores: u(r.per_bunker_max_cpu),
        memory_mb: u(r.per_bunker_max_memory),
        disk_mb: u(r.per_bunker_max_disk),
        gpu_count: u(r.per_bunker_max_gpu),
    }
}

pub async fn create_profile(
    s: &Services,
    p: &Principal,
    req: api::CreateQuotaProfile,
) -> Result<api::QuotaProfile, QuotaError> {
    let tenant_id = match req.tenant_id {
        None => {
            require(p, auth::ADMIN_TENANT)?;
            Some(p.tenant_id.clone())
        }
        Some(None) => {
            require(p, auth::ADMIN_PLATFORM)?;
            None
        }
        Some(Some(t)) => {
            require(p, auth::ADMIN_TENANT)?;
            if t != p.tenant_id
                && (!p.has(auth::ADMIN_PLATFORM) || !s.store.tenant_exists(&t).await?)
            {
                return Err(QuotaError::NotFound("tenant"));
            }
            Some(t)
        }
    };
    check_name(&req.name)?;
    check_description(req.description.as_deref())?;
    let now = now_ms();
    // What a platform admin makes is the platform's, in whatever tenant it is.
    let origin = if p.has(auth::ADMIN_PLATFORM) {
        ORIGIN_PLATFORM
    } else {
        ORIGIN_TENANT
    };
    let row = ProfileRow {
        id: QuotaProfileId::from_random(random_bytes()).to_string(),
        tenant_id,
        origin: origin.to_owned(),
        name: req.name,
        description: req.description,
        max_concurrent_bunkers: cap("max_concurrent_bunkers", req.max_concurrent_bunkers)?,
        max_persistent_bunkers: cap("max_persistent_bunkers", req.max_persistent_bunkers)?,
        max_cpu_millicores: cap("max_cpu_millicores", req.max_cpu_millicores)?,
        max_memory_mb: cap("max_memory_mb", req.max_memory_mb)?,
        max_disk_mb: cap("max_disk_mb", req.max_disk_mb)?,
        max_gpu_count: cap("max_gpu_count", req.max_gpu_count)?,
        per_bunker_max_cpu: cap("per_bunker_max_cpu", req.per_bunker_max_cpu)?,
        per_bunker_max_memory: cap("per_bunker_max_memory", req.per_bunker_max_memory)?,
        per_bunker_max_disk: cap("per_bunker_max_disk", req.per_bunker_max_disk)?,
        per_bunker_max_gpu: cap("per_bunker_max_gpu", req.per_bunker_max_gpu)?,
        max_storage_mb: cap("max_storage_mb", req.max_storage_mb)?,
        created_at: now,
        updated_at: now,
    };
    let event = audit(
        p,
        "quota_profile.create",
        "quota_profile",
        &row.id,
        row.tenant_id.as_deref(),
        serde_json::to_value(profile_api(row.clone())).unwrap_or_default(),
    );
    s.store.insert_quota_profile(&row, &event).await?;
    Ok(profile_api(row))
}

/// A profile the caller may administer: its tenant's or a platform one (any tenant's with
/// `admin:platform`). Another tenant's is not found.
async fn visible_profile(s: &Services, p: &Principal, id: &str) -> Result<ProfileRow, QuotaError> {
    require(p, auth::ADMIN_TENANT)?;
    if QuotaProfileId::parse(id).is_err() {
        return Err(QuotaError::NotFound("quota profile"));
    }
    let row = if p.has(auth::ADMIN_PLATFORM) {
        s.store.admin_quota_profile(id).await?
    } else {
        s.store.quota_profile(&p.tenant_id, id).await?
    };
    row.ok_or(QuotaError::NotFound("quota profile"))
}

/// A profile the caller may change or assign: a default or any other platform-made one needs
/// `admin:platform` (else a tenant admin could widen what the platform granted it).
async fn owned_profile(s: &Services, p: &Principal, id: &str) -> Result<ProfileRow, QuotaError> {
    let row = visible_profile(s, p, id).await?;
    if row.tenant_id.is_none() || row.origin == ORIGIN_PLATFORM {
        require(p, auth::ADMIN_PLATFORM)?;
    }
    Ok(row)
}

pub async fn profiles(s: &Services, p: &Principal) -> Result<Vec<api::QuotaProfile>, QuotaError> {
    require(p, auth::ADMIN_TENANT)?;
    let rows = if p.has(auth::ADMIN_PLATFORM) {
        s.store.admin_quota_profiles().await?
    } else {
        s.store.quota_profiles(&p.tenant_id).await?
    };
    Ok(rows.into_iter().map(profile_api).collect())
}

pub async fn profile(
    s: &Services,
    p: &Principal,
    id: &str,
) -> Result<api::QuotaProfile, QuotaError> {
    Ok(profile_api(visible_profile(s, p, id).await?))
}

pub async fn update_profile(
    s: &Services,
    p: &Principal,
    id: &str,
    req: api::UpdateQuotaProfile,
) -> Result<api::QuotaProfile, QuotaError> {
    let mut row = owned_profile(s, p, id).await?;
    if let Some(name) = req.name {
        check_name(&name)?;
        row.name = name;
    }
    if let Some(d) = req.description {
        check_description(d.as_deref())?;
        row.description = d;
    }
    macro_rules! patch {
        ($($f:ident),*) => {$(
            if let Some(v) = req.$f {
                row.$f = cap(stringify!($f), v)?;
            }
        )*};
    }
    patch!(
        max_concurrent_bunkers,
        max_persistent_bunkers,
        max_cpu_millicores,
        max_memory_mb,
        max_disk_mb,
        max_gpu_count,
        per_bunker_max_cpu,
        per_bunker_max_memory,
        per_bunker_max_disk,
        per_bunker_max_gpu,
        max_storage_mb
    );
    row.updated_at = now_ms();
    let event = audit(
        p,
        "quota_profile.update",
        "quota_profile",
        &row.id,
        row.tenant_id.as_deref(),
        serde_json::to_value(profile_api(row.clone())).unwrap_or_default(),
    );
    if !s
        .store
        .update_quota_profile(row.tenant_id.as_deref(), &row, &event)
        .await?
    {
        return Err(QuotaError::NotFound("quota profile"));
    }
    Ok(profile_api(row))
}

pub async fn delete_profile(s: &Services, p: &Principal, id: &str) -> Result<(), QuotaError> {
    let row = owned_profile(s, p, id).await?;
    let event = audit(
        p,
        "quota_profile.delete",
        "quota_profile",
        &row.id,
        row.tenant_id.as_deref(),
        serde_json::json!({}),
    );
    if !s
        .store
        .delete_quota_profile(row.tenant_id.as_deref(), &row.id, &event)
        .await?
    {
        return Err(QuotaError::NotFound("quota profile"));
    }
    Ok(())
}

fn target_kind_str(k: api::TargetKind) -> &'static str {
    match k {
        api::TargetKind::User => "user",
        api::TargetKind::Group => "group",
        api::TargetKind::Tenant => "tenant",
    }
}

fn mode_of(m: api::AssignmentMode) -> AssignmentMode {
    match m {
        api::AssignmentMode::Individual => AssignmentMode::Individual,
        api::AssignmentMode::Shared => AssignmentMode::Shared,
        api::AssignmentMode::PerUser => AssignmentMode::PerUser,
    }
}

fn assignment_api(a: AssignmentRow) -> api::Assignment {
    api::Assignment {
        id: a.id,
        profile_id: a.profile_id,
        tenant_id: a.tenant_id,
        target_kind: match a.target_kind.as_str() {
            "group" => api::TargetKind::Group,
            "tenant" => api::TargetKind::Tenant,
            _ => api::TargetKind::User,
        },
        target_id: a.target_id,
        mode: match AssignmentMode::parse(&a.mode) {
            Some(AssignmentMode::Shared) => api::AssignmentMode::Shared,
            Some(AssignmentMode::PerUser) => api::AssignmentMode::PerUser,
            _ => api::AssignmentMode::Individual,
        },
        created_at: rfc3339(a.created_at),
    }
}

/// The tenant a profile's assignments live in; platform defaults take none.
fn assignable_tenant(row: &ProfileRow) -> Result<String, QuotaError> {
    // The profile's state, not the request, is what is wrong: 409, as for other conflicts.
    row.tenant_id.clone().ok_or_else(|| {
        QuotaError::Conflict(
            "a platform default applies to everyone the platform granted nothing else; assign a tenant profile".into(),
        )
    })
}

pub async fn create_assignment(
    s: &Services,
    p: &Principal,
    profile_id: &str,
    req: api::CreateAssignment,
) -> Result<api::Assignment, QuotaError> {
    let profile = owned_profile(s, p, profile_id).await?;
    let tenant_id = assignable_tenant(&profile)?;
    let mode = mode_of(req.mode);
    match (req.target_kind, mode) {
        (api::TargetKind::User, AssignmentMode::Individual) => {
            if s.store.user(&tenant_id, &req.target_id).await?.is_none() {
                return Err(QuotaError::NotFound("user"));
            }
        }
        (api::TargetKind::Group, AssignmentMode::Shared | AssignmentMode::PerUser) => {
            if s.store.group(&tenant_id, &req.target_id).await?.is_none() {
                return Err(QuotaError::NotFound("group"));
            }
        }
        // How a platform admin grants a whole tenant more than the default.
        (api::TargetKind::Tenant, AssignmentMode::PerUser) => {
            if req.target_id != tenant_id {
                return Err(QuotaError::NotFound("tenant"));
            }
        }
        (api::TargetKind::User, _) => {
            return Err(invalid("mode", "a user takes `individual`"));
        }
        (api::TargetKind::Group, _) => {
            return Err(invalid("mode", "a group takes `shared` or `per_user`"));
        }
        (api::TargetKind::Tenant, _) => {
            return Err(invalid("mode", "a tenant takes `per_user`"));
        }
    }
    let row = AssignmentRow {
        id: QuotaAssignmentId::from_random(random_bytes()).to_string(),
        profile_id: profile.id.clone(),
        tenant_id: tenant_id.clone(),
        target_kind: target_kind_str(req.target_kind).to_owned(),
        target_id: req.target_id,
        mode: mode.as_str().to_owned(),
        created_at: now_ms(),
    };
    let event = audit(
        p,
        "quota_assignment.create",
        "quota_assignment",
        &row.id,
        Some(&tenant_id),
        serde_json::json!({
            "profile_id": row.profile_id,
            "target_kind": row.target_kind,
            "target_id": row.target_id,
            "mode": row.mode,
        }),
    );
    match s.store.insert_quota_assignment(&row, &event).await {
        Ok(()) => Ok(assignment_api(row)),
        Err(e) if is_unique_violation(&e) => Err(QuotaError::Conflict(format!(
            "{} {} already has a quota profile assignment",
            row.target_kind, row.target_id
        ))),
        Err(e) => Err(e.into()),
    }
}

pub async fn assignments(
    s: &Services,
    p: &Principal,
    profile_id: &str,
) -> Result<Vec<api::Assignment>, QuotaError> {
    let profile = visible_profile(s, p, profile_id).await?;
    let Some(tenant_id) = profile.tenant_id else {
        return Ok(Vec::new());
    };
    Ok(s.store
        .quota_assignments(&tenant_id, &profile.id)
        .await?
        .into_iter()
        .map(assignment_api)
        .collect())
}

pub async fn delete_assignment(
    s: &Services,
    p: &Principal,
    profile_id: &str,
    id: &str,
) -> Result<(), QuotaError> {
    let profile = owned_profile(s, p, profile_id).await?;
    let tenant_id = assignable_tenant(&profile)?;
    let event = audit(
        p,
        "quota_assignment.delete",
        "quota_assignment",
        id,
        Some(&tenant_id),
        serde_json::json!({ "profile_id": profile.id }),
    );
    if !s
        .store
        .delete_quota_assignment(&tenant_id, &profile.id, id, &event)
        .await?
    {
        return Err(QuotaError::NotFound("quota assignment"));
    }
    Ok(())
}

/// Every profile that applies to `user_id`, with the bucket it charges: the platform's layer
/// (its grants on the user or its groups, else the platform defaults) and the tenant's layer,
/// together (see the module docs).
pub(crate) async fn resolve(
    s: &Services,
    tenant_id: &str,
    user_id: &str,
) -> Result<Vec<(ProfileRow, Bucket)>, StoreError> {
    let (direct, parents) = s.store.group_tree(tenant_id, user_id).await?;
    let direct: Vec<&str> = direct.iter().map(String::as_str).collect();
    let groups = quota::with_ancestors(&direct, |g| parents.get(g).map(String::as_str));
    let (platform, tenant): (Vec<_>, Vec<_>) = s
        .store
        .quota_assignments_on(tenant_id, user_id, &groups)
        .await?
        .into_iter()
        .filter_map(|(a, profile)| {
            let mode = AssignmentMode::parse(&a.mode)?;
            Some((profile, quota::bucket_of(mode, &a.target_id, user_id)))
        })
        .partition(|(profile, _)| profile.origin == ORIGIN_PLATFORM);
    let mut applied = if platform.is_empty() {
        s.store
            .platform_quota_profiles()
            .await?
            .into_iter()
            .map(|profile| {
                let bucket = Bucket {
                    kind: BucketKind::User,
                    id: user_id.to_owned(),
                };
                (profile, bucket)
            })
            .collect()
    } else {
        platform
    };
    applied.extend(tenant);
    Ok(applied)
}

/// Name of the lease one controller holds while rebuilding the counters.
const REBUILD_LEASE: &str = "quota:rebuild";
/// How long a rebuild may take before another controller may try.
const REBUILD_LEASE_TTL: Duration = Duration::from_secs(30);
/// How long a create waits for another controller's rebuild.
const REBUILD_WAIT: Duration = Duration::from_secs(35);

/// Makes sure the live counters are whole: if they are missing, rebuilds them from the
/// charges of the bunkers that have not ended (one controller does, under a lease; the others
/// wait for it).
pub async fn ensure_counters(s: &Services) -> Result<(), CountersError> {
    let started = std::time::Instant::now();
    loop {
        if s.live.quota_counters(&[]).await?.is_some() {
            return Ok(());
        }
        if s.live
            .try_lease(REBUILD_LEASE, &s.controller_id, REBUILD_LEASE_TTL)
            .await?
        {
            let stashes = live_stashes(s).await?;
            if s.live.quota_rebuild(&stashes).await? {
                tracing::warn!(
                    bunkers = stashes.len(),
                    "quota counters were missing; rebuilt from the database"
                );
            }
            return Ok(());
        }
        if started.elapsed() > REBUILD_WAIT {
            return Err(CountersError::RebuildTimedOut(REBUILD_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The charges of every bunker that has not ended, as stashes.
async fn live_stashes(s: &Services) -> Result<Vec<Stash>, StoreError> {
    let mut by_bunker: BTreeMap<String, Stash> = BTreeMap::new();
    for (bunker_id, at_ms, counter, amount) in s.store.admin_live_charges().await? {
        by_bunker
            .entry(bunker_id.clone())
            .or_insert_with(|| Stash {
                bunker_id,
                at_ms,
                charges: Vec::new(),
            })
            .charges
            .push((counter, amount));
    }
    Ok(by_bunker.into_values().collect())
}

/// Reserves the quota of a new bunker; returns the charges to record with its row (empty when
/// no profile applies).
pub async fn reserve(
    s: &Services,
    tenant_id: &str,
    user_id: &str,
    bunker_id: &str,
    demand: &Demand,
) -> Result<Vec<(String, i64)>, ReserveError> {
    let resolved = resolve(s, tenant_id, user_id).await?;
    if resolved.is_empty() {
        return Ok(Vec::new());
    }
    let applied: Vec<Applied> = resolved
        .iter()
        .map(|(profile, bucket)| Applied {
            profile_id: &profile.id,
            caps: caps_of(profile),
            per_bunker: per_bunker_of(profile),
            bucket: bucket.clone(),
        })
        .collect();
    let charges = quota::plan(&applied, demand).map_err(|e| {
        ReserveError::Exceeded(Box::new(QuotaExceeded {
            profile_id: e.profile_id.to_owned(),
            bucket: "per_bunker".into(),
            resource: e.resource.as_str(),
            current: 0,
            cap: e.max,
            requested: e.requested,
        }))
    })?;
    let live: Vec<QuotaCharge> = charges
        .iter()
        .map(|c| QuotaCharge {
            counter: quota_counter(&c.bucket.to_string(), c.resource.as_str()),
            amount: c.amount as i64,
            cap: c.cap.map(|n| n as i64),
        })
        .collect();
    // A wipe between the check and the script is met by rebuilding again; a few rounds at most.
    for _ in 0..5 {
        ensure_counters(s).await?;
        match s
            .live
            .quota_reserve(bunker_id, &live, now_ms())
            .await
            .map_err(CountersError::from)?
        {
            Reservation::Reserved | Reservation::AlreadyReserved => {
                return Ok(live.into_iter().map(|c| (c.counter, c.amount)).collect());
            }
            Reservation::Exceeded { index, current } => {
                let c = &charges[index];
                return Err(ReserveError::Exceeded(Box::new(QuotaExceeded {
                    profile_id: c.profile_id.to_owned(),
                    bucket: c.bucket.to_string(),
                    resource: c.resource.as_str(),
                    current,
                    cap: c.cap.unwrap_or_default(),
                    requested: c.amount,
                })));
            }
            Reservation::CountersMissing => continue,
        }
    }
    Err(CountersError::RebuildTimedOut(REBUILD_WAIT).into())
}

/// Releases a bunker's quota (exactly once, however often it is called). Failures are logged:
/// the reconciliation job releases what is left.
pub async fn release(s: &Services, bunker_id: &str) {
    match s.live.quota_release(bunker_id).await {
        Ok(true) => tracing::debug!(bunker_id, "quota released"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(bunker_id, error = %e, "releasing quota failed; reconciliation will")
        }
    }
}

/// `GET /quota-profiles/usage`: what applies to `user_id` (the caller by default), per bucket
/// and resource.
pub async fn usage(
    s: &Services,
    p: &Principal,
    user_id: Option<&str>,
) -> Result<Vec<api::QuotaUsage>, QuotaError> {
    if !p.can_read() {
        return Err(QuotaError::PermissionDenied(auth::CREATE));
    }
    let user_id = match user_id {
        Some(u) if u != p.user_id => {
            require(p, auth::ADMIN_TENANT)?;
            if s.store.user(&p.tenant_id, u).await?.is_none() {
                return Err(QuotaError::NotFound("user"));
            }
            u
        }
        _ => p.user_id.as_str(),
    };
    let resolved = resolve(s, &p.tenant_id, user_id).await?;
    let mut rows: Vec<(String, String, Resource, Option<u64>)> = Vec::new();
    for (profile, bucket) in &resolved {
        let caps = caps_of(profile);
        for r in Resource::ALL {
            rows.push((profile.id.clone(), bucket.to_string(), r, caps.of(r)));
        }
    }
    let counters: Vec<String> = rows
        .iter()
        .map(|(_, b, r, _)| quota_counter(b, r.as_str()))
        .collect();
    ensure_counters(s).await?;
    let values = s
        .live
        .quota_counters(&counters)
        .await
        .map_err(CountersError::from)?
        .unwrap_or_else(|| vec![0; counters.len()]);
    let mut out: Vec<api::QuotaUsage> = rows
        .into_iter()
        .zip(values)
        .map(|((profile_id, bucket, r, cap), current)| api::QuotaUsage {
            profile_id,
            bucket,
            resource: r.as_str().to_owned(),
            current,
            cap,
            remaining: cap.map(|c| (c as i64 - current).max(0) as u64),
        })
        .collect();
    out.extend(super::storage_quota::usage(s, &p.tenant_id, &resolved).await?);
    Ok(out)
}

/// A stash with no bunker row this old belongs to a create that died before recording it.
const ORPHAN_STASH_AFTER: Duration = Duration::from_secs(120);

/// The reconciliation job: rebuilds missing counters, releases the stashes of bunkers that
/// ended (or never got a row), re-charges live bunkers that lost theirs, and recounts every
/// counter from the stashes. Returns how many repairs it made.
pub async fn reconcile(s: &Services) -> Result<u64, CountersError> {
    if s.live.quota_counters(&[]).await?.is_none() {
        ensure_counters(s).await?;
        return Ok(0);
    }
    let mut repairs = 0;
    let stashed = s.live.quota_stashes().await?;
    let ids: Vec<String> = stashed.iter().map(|(id, _)| id.clone()).collect();
    let statuses = s.store.admin_bunker_statuses(&ids).await?;
    let now = now_ms();
    for (id, at) in &stashed {
        let ended = match statuses.get(id).map(String::as_str) {
            Some("terminated" | "failed") => true,
            Some(_) => false,
            None => now - at > ORPHAN_STASH_AFTER.as_millis() as i64,
        };
        if ended && s.live.quota_release(id).await? {
            tracing::warn!(
                bunker_id = id,
                "reconciliation released a leftover quota stash"
            );
            repairs += 1;
        }
    }
    let stashed: HashSet<&String> = ids.iter().collect();
    for stash in live_stashes(s).await? {
        if stashed.contains(&stash.bunker_id) {
            continue;
        }
        let charges: Vec<QuotaCharge> = stash
            .charges
            .iter()
            .map(|(counter, amount)| QuotaCharge {
                counter: counter.clone(),
                amount: *amount,
                cap: None,
            })
            .collect();
        if s.live
            .quota_reserve(&stash.bunker_id, &charges, stash.at_ms)
            .await?
            == Reservation::Reserved
        {
            tracing::warn!(
                bunker_id = stash.bunker_id,
                "reconciliation re-charged a live bunker"
            );
            repairs += 1;
        }
    }
    let recounted = s.live.quota_recount().await?;
    if recounted > 0 {
        tracing::warn!(
            counters = recounted,
            "reconciliation corrected drifted quota counters"
        );
    }
    Ok(repairs + recounted)
}
