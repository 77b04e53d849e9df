//! The backchannel (NETWORK.md §4): a bunker calling the platform as itself, through the
//! worker that runs it. The worker's credential plus the bunker id in the path are the
//! whole identity; no token is ever in the guest.
//!
//! 1. [`authorize`]: the bunker exists, its `worker_id` is the calling worker (anything
//!    else is `404`, as for another tenant's bunker), and it is `running`; then the
//!    bunker's tenant is counted against [`TENANT_PER_MIN`] and the bunker against
//!    [`BUNKER_PER_MIN`] in the live state's rate windows (`429` past either).
//! 2. The routes: the bunker's own record ([`self_record`]), a label of its own
//!    ([`set_metadata`]: metadata lives in `label_set`, so it shows in the record and
//!    `GET /bunkers?label=`), an event into the audit ([`record_event`]), and child bunkers
//!    ([`create_child`], [`children`], [`delete_child`]).
//! 3. Every call writes one audit row with actor type `bunker` and the bunker as actor.
//!
//! Children: same tenant, created through [`bunkers::create`] as the parent's owner (so
//! charged to the owner's quota, with the owner's permissions, never an admin's reach), a
//! network profile no wider than the parent's ([`profile_within`]), `ephemeral` unless
//! asked otherwise (and the owner may), no snapshot restore and no interfaces, depth at
//! most [`MAX_DEPTH`] and at most [`MAX_LIVE_CHILDREN`] not ended per parent. A parent
//! sees and deletes only its own children: any other id is `404`.

use std::collections::BTreeMap;
use std::time::Duration;

use scaibunker_api::bunkers as api;
use scaibunker_core::ids::{AuditId, BunkerId, encode_random};
use scaibunker_core::lifecycle::BunkerStatus;

use super::auth::{self, Principal};
use super::bunkers::{self, BunkerError};
use super::worker_credentials::WorkerIdentity;
use super::{RequestContext, Services, random_bytes};
use crate::live::RateDecision;
use crate::store::audit::{self, AuditEvent};
use crate::store::bunkers::BunkerRow;
use crate::store::children;
use crate::store::{StoreError, now_ms};

/// Backchannel calls a minute for all of one tenant's bunkers together.
pub const TENANT_PER_MIN: u32 = 1200;
/// Backchannel calls a minute for one bunker (the worker allows bursts of 40, 20 a second).
pub const BUNKER_PER_MIN: u32 = 600;
/// A child's depth at most: a bunker's child is 1, its grandchild 2.
pub const MAX_DEPTH: i64 = 2;
/// Children of one parent that may not have ended at once.
pub const MAX_LIVE_CHILDREN: i64 = 5;
/// How long a reserved child slot holds without its create finishing (a create's
/// controller died): past it the slot is free again.
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(600);
/// Children one listing returns at most, newest first.
pub const MAX_LISTED_CHILDREN: u32 = 100;
/// Most bytes of an event body.
pub const MAX_EVENT_BYTES: usize = 16 * 1024;
/// Most bytes of one metadata value (the label limit).
pub const MAX_METADATA_VALUE_BYTES: usize = 256;
/// Most labels a bunker carries (the create limit).
pub const MAX_LABELS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BackchannelError {
    #[error("bunker not found")]
    NotFound,
    #[error("bunker is {0}, not running")]
    NotRunning(BunkerStatus),
    #[error("too many backchannel calls a minute for this bunker or its tenant; retry later")]
    RateLimited { retry_after: Duration },
    #[error("request is invalid")]
    Validation(Vec<scaibunker_core::spec::FieldError>),
    #[error("a child may not have a wider network than its parent ({0})")]
    ProfileWider(String),
    #[error("{0}")]
    ChildLimit(String),
    #[error("the bunker's labels kept changing under this write; retry")]
    LabelsBusy,
    #[error("the bunker's owner no longer exists")]
    OwnerGone,
    #[error(transparent)]
    Bunker(#[from] BunkerError),
    #[error("store failed")]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> BackchannelError {
    BackchannelError::Validation(vec![bunkers::field(field, message)])
}

/// Step 1: the bunker `bunker_id` as its worker `ident` may speak for it.
pub async fn authorize(
    s: &Services,
    ident: &WorkerIdentity,
    bunker_id: &str,
) -> Result<BunkerRow, BackchannelError> {
    if BunkerId::parse(bunker_id).is_err() {
        return Err(BackchannelError::NotFound);
    }
    // A worker is not a tenant: which bunker it may speak for is decided by placement.
    let row = s
        .store
        .admin_bunker(bunker_id)
        .await?
        .ok_or(BackchannelError::NotFound)?;
    if row.worker_id.as_deref() != Some(ident.worker_id.as_str()) {
        tracing::warn!(
            worker_id = %ident.worker_id,
            %bunker_id,
            "a worker spoke for a bunker it does not run"
        );
        return Err(BackchannelError::NotFound);
    }
    let status = BunkerStatus::parse(&row.status).ok_or(StoreError::Corrupt {
        id: row.id.clone(),
        column: "status",
    })?;
    if status != BunkerStatus::Running {
        return Err(BackchannelError::NotRunning(status));
    }
    let limits = [
        (
            format!("backchannel:tenant:{}", row.tenant_id),
            TENANT_PER_MIN,
        ),
        (format!("backchannel:bunker:{}", row.id), BUNKER_PER_MIN),
    ];
    match s.live.rate_hit(&limits, Duration::from_secs(60)).await {
        Ok(RateDecision::Allowed) => {}
        Ok(RateDecision::Limited { retry_after }) => {
            return Err(BackchannelError::RateLimited { retry_after });
        }
        // As for every other route: live state being down must not take the API with it.
        Err(e) => {
            tracing::warn!(error = %e, "backchannel rate limit skipped: live state unavailable")
        }
    }
    Ok(row)
}

fn bunker_audit(
    row: &BunkerRow,
    ctx: &RequestContext,
    action: &'static str,
    resource_id: &str,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        id: AuditId::from_random(random_bytes()).to_string(),
        time_ms: now_ms(),
        tenant_id: Some(row.tenant_id.clone()),
        actor_id: Some(row.id.clone()),
        actor_type: "bunker",
        action,
        resource_type: "bunker",
        resource_id: Some(resource_id.to_owned()),
        status: "success",
        ip: None,
        request_id: Some(ctx.request_id.clone()),
        details,
    }
}

async fn audit_alone(s: &Services, event: &AuditEvent) -> Result<(), StoreError> {
    let mut tx = s.store.begin().await?;
    audit::insert(&mut tx, event).await?;
    tx.commit().await.map_err(StoreError::from)
}

/// `GET /v1/self`: the bunker's record as the public API shows it (no env values).
pub async fn self_record(
    s: &Services,
    row: &BunkerRow,
    ctx: &RequestContext,
) -> Result<api::Bunker, BackchannelError> {
    audit_alone(
        s,
        &bunker_audit(row, ctx, "bunker.self.read", &row.id, serde_json::json!({})),
    )
    .await?;
    Ok(bunkers::to_api(row))
}

/// Whether `key` may name a metadata entry: a label key of plain characters.
fn metadata_key_ok(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `PUT /v1/self/metadata/{key}`: the body (UTF-8, at most 256 bytes) becomes the label
/// `key`; the answer is the updated record.
pub async fn set_metadata(
    s: &Services,
    row: &BunkerRow,
    ctx: &RequestContext,
    key: &str,
    value: &[u8],
) -> Result<api::Bunker, BackchannelError> {
    if !metadata_key_ok(key) {
        return Err(invalid(
            "key",
            "1–63 characters of letters, digits, `-`, `_` and `.`",
        ));
    }
    let value = std::str::from_utf8(value)
        .ok()
        .filter(|v| v.len() <= MAX_METADATA_VALUE_BYTES && !v.contains('\0'))
        .ok_or_else(|| {
            invalid(
                "value",
                format!("at most {MAX_METADATA_VALUE_BYTES} bytes of UTF-8 without NUL"),
            )
        })?;
    // Compare-and-set on the labels as read, so two writers never lose each other's key.
    for _ in 0..5 {
        let current = s
            .store
            .bunker(&row.tenant_id, &row.id)
            .await?
            .ok_or(BackchannelError::NotFound)?;
        let mut labels: BTreeMap<String, String> =
            serde_json::from_str(&current.label_set).unwrap_or_default();
        if !labels.contains_key(key) && labels.len() >= MAX_LABELS {
            return Err(invalid(
                "key",
                format!("a bunker has at most {MAX_LABELS} labels"),
            ));
        }
        labels.insert(key.to_owned(), value.to_owned());
        let next = serde_json::to_string(&labels).expect("string maps serialise");
        let mut tx = s.store.begin().await?;
        if children::swap_labels(&mut tx, &row.tenant_id, &row.id, &current.label_set, &next)
            .await?
        {
            audit::insert(
                &mut tx,
                &bunker_audit(
                    row,
                    ctx,
                    "bunker.metadata.set",
                    &row.id,
                    serde_json::json!({ "key": key, "value": value }),
                ),
            )
            .await?;
            tx.commit().await.map_err(StoreError::from)?;
            let updated = s
                .store
                .bunker(&row.tenant_id, &row.id)
                .await?
                .ok_or(BackchannelError::NotFound)?;
            return Ok(bunkers::to_api(&updated));
        }
    }
    Err(BackchannelError::LabelsBusy)
}

/// The body of `POST /v1/self/events`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    /// 1–64 characters of lower-case letters, digits, `.`, `_` and `-`.
    pub kind: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub data: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `POST /v1/self/events`: an event of the bunker's into the audit (`bunker.event`);
/// answers the audit id.
pub async fn record_event(
    s: &Services,
    row: &BunkerRow,
    ctx: &RequestContext,
    body: &[u8],
) -> Result<String, BackchannelError> {
    if body.len() > MAX_EVENT_BYTES {
        return Err(invalid("body", format!("at most {MAX_EVENT_BYTES} bytes")));
    }
    let event: EventBody =
        serde_json::from_slice(body).map_err(|e| invalid("body", e.to_string()))?;
    let kind_ok = !event.kind.is_empty()
        && event.kind.len() <= 64
        && event.kind.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if !kind_ok {
        return Err(invalid(
            "kind",
            "1–64 characters of lower-case letters, digits, `.`, `_` and `-`",
        ));
    }
    let audit_row = bunker_audit(
        row,
        ctx,
        "bunker.event",
        &row.id,
        serde_json::json!({ "kind": event.kind, "message": event.message, "data": event.data }),
    );
    let id = audit_row.id.clone();
    audit_alone(s, &audit_row).await?;
    Ok(id)
}

/// How wide a profile is, for [`profile_within`]; `None` for `transit`, which no child gets.
fn profile_rank(p: api::NetworkProfile) -> Option<u8> {
    match p {
        api::NetworkProfile::Isolated => Some(0),
        api::NetworkProfile::Registry => Some(1),
        api::NetworkProfile::Allowlisted => Some(2),
        api::NetworkProfile::Unrestricted => Some(3),
        api::NetworkProfile::Transit => None,
    }
}

/// Whether a child asking for `child` (with `child_list` when allowlisted) stays within a
/// parent on `parent` (with `parent_list`): isolated < registry < allowlisted (a subset of
/// the parent's list) < unrestricted; transit never, on either side.
pub fn profile_within(
    parent: api::NetworkProfile,
    parent_list: &[String],
    child: api::NetworkProfile,
    child_list: &[String],
) -> bool {
    let (Some(p), Some(c)) = (profile_rank(parent), profile_rank(child)) else {
        return false;
    };
    if c > p {
        return false;
    }
    if child == api::NetworkProfile::Allowlisted && parent == api::NetworkProfile::Allowlisted {
        return child_list.iter().all(|name| parent_list.contains(name));
    }
    true
}

fn parse_profile(s: &str) -> Option<api::NetworkProfile> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// The parent's owner, as a principal that creates and deletes its children: the owner's
/// own permissions (so the owner's quota and powers), never an admin's cross-tenant reach.
async fn owner_principal(s: &Services, row: &BunkerRow) -> Result<Principal, BackchannelError> {
    let user = s
        .store
        .user(&row.tenant_id, &row.owner_id)
        .await?
        .ok_or(BackchannelError::OwnerGone)?;
    let mut permissions =
        auth::effective_permissions(&user.role, user.module_permissions.as_deref(), None);
    for reach in [
        auth::ADMIN,
        auth::ADMIN_PLATFORM,
        auth::ADMIN_TENANT,
        auth::IMAGES_MANAGE,
        auth::NETWORK_TRANSIT,
        auth::L2_TRANSPARENCY,
    ] {
        permissions.remove(reach);
    }
    Ok(Principal {
        tenant_id: row.tenant_id.clone(),
        user_id: user.id,
        key_id: format!("bunker:{}", row.id),
        role: user.role,
        permissions,
    })
}

/// `POST /v1/self/children`: a child bunker (see the module doc).
pub async fn create_child(
    s: &Services,
    row: &BunkerRow,
    ctx: &RequestContext,
    mut req: api::CreateBunker,
) -> Result<BunkerRow, BackchannelError> {
    if req.snapshot_id.is_some() {
        return Err(invalid("snapshot_id", "a child starts from an image"));
    }
    if req.interfaces.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(invalid("interfaces", "a child gets no interfaces"));
    }
    let parent_profile = parse_profile(&row.network_profile).ok_or(StoreError::Corrupt {
        id: row.id.clone(),
        column: "network_profile",
    })?;
    let parent_list: Vec<String> = serde_json::from_str(&row.network_allowlist).unwrap_or_default();
    let child_profile = req.network_profile.unwrap_or_default();
    let child_list = req.network_allowlist.clone().unwrap_or_default();
    if !profile_within(parent_profile, &parent_list, child_profile, &child_list) {
        return Err(BackchannelError::ProfileWider(format!(
            "the parent is `{}`",
            row.network_profile
        )));
    }
    let depth = s
        .store
        .child_link(&row.tenant_id, &row.id)
        .await?
        .map_or(0, |l| l.depth)
        + 1;
    if depth > MAX_DEPTH {
        return Err(BackchannelError::ChildLimit(format!(
            "children may nest {MAX_DEPTH} deep at most"
        )));
    }
    if req.image.is_none() {
        req.image = Some(row.image_id.clone());
    }
    // A caller inside a bunker rarely wants to hold its call open for a boot.
    req.wait = Some(req.wait.unwrap_or(false));
    let owner = owner_principal(s, row).await?;
    let reservation = format!("rsv_{}", encode_random(random_bytes()));
    let now = now_ms();
    let reserved = s
        .store
        .reserve_child(
            &row.tenant_id,
            &row.id,
            &reservation,
            depth,
            MAX_LIVE_CHILDREN,
            now,
            now - RESERVATION_LIFETIME.as_millis() as i64,
        )
        .await?;
    if !reserved {
        return Err(BackchannelError::ChildLimit(format!(
            "a bunker has at most {MAX_LIVE_CHILDREN} children that have not ended"
        )));
    }
    let child = match bunkers::create(s, &owner, ctx, req).await {
        Ok(child) => child,
        Err(e) => {
            if let Err(release) = s.store.release_child(&row.tenant_id, &reservation).await {
                tracing::warn!(error = %release, "a failed child create kept its slot until the reservation lapses");
            }
            return Err(e.into());
        }
    };
    let mut tx = s.store.begin().await?;
    children::bind_child(&mut tx, &row.tenant_id, &reservation, &child.id).await?;
    audit::insert(
        &mut tx,
        &bunker_audit(
            row,
            ctx,
            "bunker.child.create",
            &child.id,
            serde_json::json!({ "parent_id": row.id, "depth": depth }),
        ),
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(child)
}

/// `GET /v1/self/children`: the parent's newest children.
pub async fn children(
    s: &Services,
    row: &BunkerRow,
    ctx: &RequestContext,
) -> Result<Vec<BunkerRow>, BackchannelError> {
    let ids = s
        .store
        .children(&row.tenant_id, &row.id, MAX_LISTED_CHILDREN)
        .await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(child) = s.store.bunker(&row.tenant_id, &id).await? {
            out.push(child);
        }
    }
    audit_alone(
        s,
        &bunker_audit(
            row,
            ctx,
            "bunker.child.list",
            &row.id,
            serde_json::json!({}),
        ),
    )
    .await?;
    Ok(out)
}

/// `DELETE /v1/self/children/{id}`: ends one of the parent's own children.
pub async fn delete_child(
    s: &Services,
    row: &BunkerRow,
    ctx: &RequestContext,
    child_id: &str,
) -> Result<BunkerRow, BackchannelError> {
    if BunkerId::parse(child_id).is_err() {
        return Err(BackchannelError::NotFound);
    }
    let link = s
        .store
        .child_link(&row.tenant_id, child_id)
        .await?
        .filter(|l| l.parent_id == row.id)
        .ok_or(BackchannelError::NotFound)?;
    let owner = owner_principal(s, row).await?;
    let ended = bunkers::delete(s, &owner, ctx, &link.child_id).await?;
    audit_alone(
        s,
        &bunker_audit(
            row,
            ctx,
            "bunker.child.delete",
            &link.child_id,
            serde_json::json!({ "parent_id": row.id }),
        ),
    )
    .await?;
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::NetworkProfile as P;

    #[test]
    fn a_child_is_never_wider_than_its_parent() {
        let list = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let parent_list = list(&["a.test", "*.b.test"]);
        let cases = [
            (P::Isolated, P::Isolated, list(&[]), true),
            (P::Isolated, P::Registry, list(&[]), false),
            (P::Isolated, P::Unrestricted, list(&[]), false),
            (P::Registry, P::Isolated, list(&[]), true),
            (P::Registry, P::Registry, list(&[]), true),
            (P::Registry, P::Allowlisted, list(&["a.test"]), false),
            (P::Allowlisted, P::Registry, list(&[]), true),
            (P::Allowlisted, P::Allowlisted, list(&["a.test"]), true),
            (
                P::Allowlisted,
                P::Allowlisted,
                list(&["a.test", "*.b.test"]),
                true,
            ),
            (P::Allowlisted, P::Allowlisted, list(&["evil.test"]), false),
            (P::Allowlisted, P::Allowlisted, list(&["x.b.test"]), false),
            (P::Allowlisted, P::Unrestricted, list(&[]), false),
            (P::Unrestricted, P::Allowlisted, list(&["any.test"]), true),
            (P::Unrestricted, P::Unrestricted, list(&[]), true),
            (P::Unrestricted, P::Transit, list(&[]), false),
            (P::Transit, P::Isolated, list(&[]), false),
            (P::Transit, P::Transit, list(&[]), false),
        ];
        for (parent, child, child_list, want) in cases {
            assert_eq!(
                profile_within(parent, &parent_list, child, &child_list),
                want,
                "{parent:?} → {child:?} {child_list:?}"
            );
        }
    }

    #[test]
    fn metadata_keys_are_plain() {
        assert!(metadata_key_ok("stage"));
        assert!(metadata_key_ok("build.step-2_a"));
        assert!(!metadata_key_ok(""));
        assert!(!metadata_key_ok("a/b"));
        assert!(!metadata_key_ok(&"k".repeat(64)));
    }
}
