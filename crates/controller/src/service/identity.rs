//! Tenants, users, groups and API keys: the minimal platform core.
//!
//! Who may do what:
//! - tenants: `scaibunker:admin:platform` (super admins);
//! - users: super admins in any tenant with any role; tenant admins (`admin:tenant`) in their own
//!   tenant, never `super_admin` and never granting `admin:platform`;
//! - groups and members: `admin:tenant`, within the tenant;
//! - API keys: anyone for themselves, narrowed to at most what the calling key holds (a narrowed
//!   key cannot mint a broader one); `admin:tenant` also for other users of the tenant whose
//!   role does not outrank the caller's, never holding more than the caller's key does; a key
//!   minted for another user is audited with the minter as actor and the user named. Super
//!   admins mint, list and revoke keys of any tenant. Another tenant's user, group or key is not
//!   found. The last key holding every platform power cannot be revoked (`LastSuperAdminKey`),
//!   so the platform never locks itself out.

use std::collections::BTreeSet;

use scaibunker_api::platform as api;
use scaibunker_core::ids::{ApiKeyId, AuditId, GroupId, TenantId, UserId};

use super::auth::{self, ALL_PERMISSIONS, Principal, hash_key, new_api_key, role_permissions};
use super::bunkers::rfc3339;
use super::{Services, random_bytes};
use crate::store::audit::AuditEvent;
use crate::store::identity::{
    GroupRow, KeyRow, NewApiKey, Revocation, TenantRow, UserRow, is_unique_violation,
};
use crate::store::{StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
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
    #[error("user {user_id} has role `{role}`, which outranks the caller's")]
    Outranked { user_id: String, role: String },
    #[error("api key {0} is the last one holding every platform power; mint another first")]
    LastSuperAdminKey(String),
    #[error("store failed")]
    Store(#[from] StoreError),
}

impl IdentityError {
    /// The stable code of a not-found error.
    pub fn not_found_code(kind: &str) -> &'static str {
        match kind {
            "tenant" => "TENANT_NOT_FOUND",
            "user" => "USER_NOT_FOUND",
            "group" => "GROUP_NOT_FOUND",
            _ => "API_KEY_NOT_FOUND",
        }
    }
}

/// The audit event of a platform change by `p`.
fn audit(
    p: &Principal,
    action: &'static str,
    resource_type: &'static str,
    resource_id: &str,
    tenant_id: &str,
) -> AuditEvent {
    AuditEvent {
        id: AuditId::from_random(random_bytes()).to_string(),
        time_ms: now_ms(),
        tenant_id: Some(tenant_id.to_owned()),
        actor_id: Some(p.user_id.clone()),
        actor_type: "user",
        action,
        resource_type,
        resource_id: Some(resource_id.to_owned()),
        status: "success",
        ip: None,
        request_id: Some(crate::http::request_id()),
        details: serde_json::json!({}),
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> IdentityError {
    IdentityError::Invalid {
        field,
        message: message.into(),
    }
}

fn require(p: &Principal, perm: &'static str) -> Result<(), IdentityError> {
    if p.has(perm) {
        Ok(())
    } else {
        Err(IdentityError::PermissionDenied(perm))
    }
}

fn check_name(field: &'static str, v: &str) -> Result<(), IdentityError> {
    if v.trim().is_empty() || v.chars().count() > 128 {
        return Err(invalid(field, "must be 1 to 128 characters"));
    }
    Ok(())
}

fn conflict_on_unique(e: StoreError, what: &str) -> IdentityError {
    if is_unique_violation(&e) {
        IdentityError::Conflict(format!("{what} is already taken"))
    } else {
        IdentityError::Store(e)
    }
}

fn permission_set(list: &[String]) -> Result<BTreeSet<String>, IdentityError> {
    let mut out = BTreeSet::new();
    for p in list {
        if !ALL_PERMISSIONS.contains(&p.as_str()) {
            return Err(invalid("permissions", format!("unknown permission `{p}`")));
        }
        out.insert(p.clone());
    }
    Ok(out)
}

pub async fn create_tenant(
    s: &Services,
    p: &Principal,
    req: api::CreateTenant,
) -> Result<api::Tenant, IdentityError> {
    require(p, auth::ADMIN_PLATFORM)?;
    check_name("name", &req.name)?;
    let slug_ok = !req.slug.is_empty()
        && req.slug.len() <= 63
        && req
            .slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !slug_ok {
        return Err(invalid("slug", "1 to 63 of a-z, 0-9 and -"));
    }
    let row = TenantRow {
        id: TenantId::from_random(random_bytes()).to_string(),
        name: req.name,
        slug: req.slug,
        partner_id: req.partner_id,
        created_at: now_ms(),
    };
    s.store
        .insert_tenant(&row, &audit(p, "tenant.create", "tenant", &row.id, &row.id))
        .await
        .map_err(|e| conflict_on_unique(e, "slug"))?;
    Ok(tenant_api(row))
}

fn tenant_api(t: TenantRow) -> api::Tenant {
    api::Tenant {
        id: t.id,
        name: t.name,
        slug: t.slug,
        partner_id: t.partner_id,
        created_at: rfc3339(t.created_at),
    }
}

pub async fn tenants(s: &Services, p: &Principal) -> Result<Vec<api::Tenant>, IdentityError> {
    require(p, auth::ADMIN_PLATFORM)?;
    Ok(s.store
        .tenants()
        .await?
        .into_iter()
        .map(tenant_api)
        .collect())
}

pub async fn create_user(
    s: &Services,
    p: &Principal,
    req: api::CreateUser,
) -> Result<api::User, IdentityError> {
    let platform = p.has(auth::ADMIN_PLATFORM);
    if !platform {
        require(p, auth::ADMIN_TENANT)?;
        if req.tenant_id != p.tenant_id {
            return Err(IdentityError::NotFound("tenant"));
        }
        if req.role == api::Role::SuperAdmin {
            return Err(IdentityError::PermissionDenied(auth::ADMIN_PLATFORM));
        }
    }
    if !s.store.tenant_exists(&req.tenant_id).await? {
        return Err(IdentityError::NotFound("tenant"));
    }
    let email = req.email.trim();
    if email.chars().count() > 254
        || !email.contains('@')
        || email.starts_with('@')
        || email.ends_with('@')
    {
        return Err(invalid("email", "must be an e-mail address"));
    }
    let email = email.to_lowercase();
    let extra = permission_set(req.module_permissions.as_deref().unwrap_or_default())?;
    if !platform && extra.contains(auth::ADMIN_PLATFORM) {
        return Err(IdentityError::PermissionDenied(auth::ADMIN_PLATFORM));
    }
    // It would be ignored on every request (see `auth::effective_permissions`): say so now.
    if req.role != api::Role::SuperAdmin && extra.contains(auth::ADMIN_PLATFORM) {
        return Err(invalid(
            "module_permissions",
            "`scaibunker:admin:platform` is only held by a `super_admin`",
        ));
    }
    let row = UserRow {
        id: UserId::from_random(random_bytes()).to_string(),
        tenant_id: req.tenant_id,
        email,
        role: req.role.as_str().to_owned(),
        module_permissions: (!extra.is_empty())
            .then(|| serde_json::to_string(&extra).expect("strings serialise")),
        created_at: now_ms(),
    };
    s.store
        .insert_user(
            &row,
            &audit(p, "user.create", "user", &row.id, &row.tenant_id),
        )
        .await
        .map_err(|e| conflict_on_unique(e, "email"))?;
    Ok(user_api(row))
}

fn user_api(u: UserRow) -> api::User {
    api::User {
        id: u.id,
        tenant_id: u.tenant_id,
        email: u.email,
        role: u.role,
        module_permissions: u
            .module_permissions
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default(),
        created_at: rfc3339(u.created_at),
    }
}

pub async fn create_group(
    s: &Services,
    p: &Principal,
    req: api::CreateGroup,
) -> Result<api::Group, IdentityError> {
    require(p, auth::ADMIN_TENANT)?;
    check_name("name", &req.name)?;
    if let Some(parent) = &req.parent_group_id
        && s.store.group(&p.tenant_id, parent).await?.is_none()
    {
        return Err(IdentityError::NotFound("group"));
    }
    let row = GroupRow {
        id: GroupId::from_random(random_bytes()).to_string(),
        tenant_id: p.tenant_id.clone(),
        name: req.name,
        parent_group_id: req.parent_group_id,
        created_at: now_ms(),
    };
    s.store
        .insert_group(
            &row,
            &audit(p, "group.create", "group", &row.id, &row.tenant_id),
        )
        .await
        .map_err(|e| conflict_on_unique(e, "group name"))?;
    Ok(group_api(row, Vec::new()))
}

fn group_api(g: GroupRow, members: Vec<String>) -> api::Group {
    api::Group {
        id: g.id,
        tenant_id: g.tenant_id,
        name: g.name,
        parent_group_id: g.parent_group_id,
        members,
        created_at: rfc3339(g.created_at),
    }
}

pub async fn add_member(
    s: &Services,
    p: &Principal,
    group_id: &str,
    req: api::AddMember,
) -> Result<api::Group, IdentityError> {
    require(p, auth::ADMIN_TENANT)?;
    let group = s
        .store
        .group(&p.tenant_id, group_id)
        .await?
        .ok_or(IdentityError::NotFound("group"))?;
    if s.store.user(&p.tenant_id, &req.user_id).await?.is_none() {
        return Err(IdentityError::NotFound("user"));
    }
    s.store
        .add_group_member(
            &p.tenant_id,
            group_id,
            &req.user_id,
            &audit(p, "group.member.add", "group", group_id, &p.tenant_id),
        )
        .await?;
    let members = s.store.group_members(&p.tenant_id, group_id).await?;
    Ok(group_api(group, members))
}

/// Effective permissions of a user row (role plus module permissions).
fn user_permissions(u: &UserRow) -> BTreeSet<String> {
    let mut perms = role_permissions(&u.role);
    if let Some(extra) = u
        .module_permissions
        .as_deref()
        .and_then(|j| serde_json::from_str::<BTreeSet<String>>(j).ok())
    {
        perms.extend(extra);
    }
    perms
}

pub async fn create_api_key(
    s: &Services,
    p: &Principal,
    req: api::CreateApiKey,
) -> Result<api::ApiKeyCreated, IdentityError> {
    check_name("name", &req.name)?;
    let (user_id, tenant_id, ceiling) = match req.user_id.as_deref() {
        None => (
            p.user_id.clone(),
            p.tenant_id.clone(),
            p.permissions.clone(),
        ),
        Some(u) if u == p.user_id => (
            p.user_id.clone(),
            p.tenant_id.clone(),
            p.permissions.clone(),
        ),
        Some(u) => {
            require(p, auth::ADMIN_TENANT)?;
            // Super admins mint keys for any tenant's users (how a new tenant gets its first
            // key); tenant admins only for their own tenant's.
            let user = if p.has(auth::ADMIN_PLATFORM) {
                s.store.admin_user(u).await?
            } else {
                s.store.user(&p.tenant_id, u).await?
            }
            .ok_or(IdentityError::NotFound("user"))?;
            // Acting as someone of a higher role is escalation whatever the key would hold.
            if auth::role_rank(&user.role) > auth::role_rank(&p.role) {
                return Err(IdentityError::Outranked {
                    user_id: user.id,
                    role: user.role,
                });
            }
            // Never more than the caller holds either.
            let ceiling = user_permissions(&user)
                .intersection(&p.permissions)
                .cloned()
                .collect();
            (user.id, user.tenant_id, ceiling)
        }
    };
    let narrowed = match &req.permissions {
        Some(list) => {
            let set = permission_set(list)?;
            // Asking for more than the caller may hand out is a permission it lacks, not a
            // malformed request (every name is known here).
            if let Some(extra) = set.iter().find(|x| !ceiling.contains(*x)) {
                let name = ALL_PERMISSIONS
                    .iter()
                    .find(|p| **p == extra.as_str())
                    .copied()
                    .unwrap_or(auth::ADMIN_PLATFORM);
                return Err(IdentityError::PermissionDenied(name));
            }
            Some(set)
        }
        // A key for oneself from a narrowed key stays as narrow as the calling key.
        None if ceiling != role_permissions(&p.role) || user_id != p.user_id => Some(ceiling),
        None => None,
    };
    let key = new_api_key();
    let id = ApiKeyId::from_random(random_bytes()).to_string();
    let perms_json = narrowed
        .as_ref()
        .map(|n| serde_json::to_string(n).expect("strings serialise"));
    // The actor is the minter; the key's user is named, so a key minted for someone else is
    // never mistaken for one they made.
    let mut event = audit(p, "api_key.create", "api_key", &id, &tenant_id);
    event.details = serde_json::json!({
        "user_id": user_id,
        "name": req.name,
        "permissions": narrowed,
    });
    s.store
        .insert_api_key(
            &NewApiKey {
                id: &id,
                tenant_id: &tenant_id,
                user_id: &user_id,
                name: &req.name,
                key_sha256: &hash_key(&key),
                permissions: perms_json.as_deref(),
            },
            &event,
        )
        .await?;
    Ok(api::ApiKeyCreated {
        id,
        key,
        user_id,
        name: req.name,
        permissions: narrowed.map(|n| n.into_iter().collect()),
    })
}

fn key_api(k: KeyRow) -> api::ApiKey {
    api::ApiKey {
        id: k.id,
        tenant_id: k.tenant_id,
        user_id: k.user_id,
        name: k.name,
        permissions: k.permissions.and_then(|j| serde_json::from_str(&j).ok()),
        created_at: rfc3339(k.created_at),
        revoked_at: k.revoked_at.map(rfc3339),
    }
}

/// The keys of the caller (every one of the tenant's with `admin:tenant`); `tenant_id` names
/// another tenant for super admins (`admin:platform`; to others it is not found).
pub async fn api_keys(
    s: &Services,
    p: &Principal,
    tenant_id: Option<&str>,
) -> Result<Vec<api::ApiKey>, IdentityError> {
    let tenant_id = match tenant_id {
        None => p.tenant_id.as_str(),
        Some(t) if t == p.tenant_id => t,
        Some(t) => {
            if !p.has(auth::ADMIN_PLATFORM) || !s.store.tenant_exists(t).await? {
                return Err(IdentityError::NotFound("tenant"));
            }
            t
        }
    };
    let only = (!p.has(auth::ADMIN_TENANT)).then_some(p.user_id.as_str());
    Ok(s.store
        .api_keys(tenant_id, only)
        .await?
        .into_iter()
        .map(key_api)
        .collect())
}

/// Revokes a key: one's own, the tenant's with `admin:tenant`, any tenant's with
/// `admin:platform`. The last key holding every platform power is refused.
pub async fn revoke_api_key(s: &Services, p: &Principal, id: &str) -> Result<(), IdentityError> {
    let tenant_id = if p.has(auth::ADMIN_PLATFORM) {
        s.store
            .admin_key_tenant(id)
            .await?
            .ok_or(IdentityError::NotFound("api key"))?
    } else {
        p.tenant_id.clone()
    };
    let owner = s
        .store
        .key_owner(&tenant_id, id)
        .await?
        .ok_or(IdentityError::NotFound("api key"))?;
    if owner != p.user_id && !p.has(auth::ADMIN_TENANT) {
        return Err(IdentityError::NotFound("api key"));
    }
    let mut event = audit(p, "api_key.revoke", "api_key", id, &tenant_id);
    event.details = serde_json::json!({ "user_id": owner });
    match s
        .store
        .revoke_api_key(&tenant_id, id, auth::is_full_super_admin_key, &event)
        .await?
    {
        // Revoking a revoked key changes nothing and is not an error.
        Revocation::Revoked | Revocation::Unchanged => Ok(()),
        Revocation::LastSuperAdminKey => Err(IdentityError::LastSuperAdminKey(id.to_owned())),
    }
}
