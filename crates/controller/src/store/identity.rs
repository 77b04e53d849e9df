//! Tenants, users and API keys.

use sqlx::{AssertSqlSafe, Row};

use super::audit::AuditEvent;
use super::{Backend, Store, StoreError, now_ms};

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// No such key in the tenant, or it was revoked already (MariaDB counts changed rows).
    Unchanged,
    /// Refused: it is the last key holding every platform power.
    LastSuperAdminKey,
}

#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub role: String,
    /// Narrowed permissions as JSON text, or `None` for the user's own.
    pub permissions: Option<String>,
    pub user_permissions: Option<String>,
}

pub struct NewTenant<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub slug: &'a str,
}

pub struct NewUser<'a> {
    pub id: &'a str,
    pub tenant_id: &'a str,
    pub email: &'a str,
    pub role: &'a str,
}

pub struct NewApiKey<'a> {
    pub id: &'a str,
    pub tenant_id: &'a str,
    pub user_id: &'a str,
    pub name: &'a str,
    pub key_sha256: &'a str,
    pub permissions: Option<&'a str>,
}

impl Store {
    pub async fn user_count(&self) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(self.pool())
            .await?;
        Ok(n)
    }

    /// Creates a tenant, its first user and a key for that user, all or nothing.
    pub async fn insert_tenant_user_key(
        &self,
        tenant: NewTenant<'_>,
        user: NewUser<'_>,
        key: NewApiKey<'_>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO tenants (id, name, slug, created_at) VALUES (?, ?, ?, ?)")
            .bind(tenant.id)
            .bind(tenant.name)
            .bind(tenant.slug)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO users (id, tenant_id, email, role, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(user.id)
        .bind(user.tenant_id)
        .bind(user.email)
        .bind(user.role)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, user_id, name, key_sha256, permissions, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(key.id)
        .bind(key.tenant_id)
        .bind(key.user_id)
        .bind(key.name)
        .bind(key.key_sha256)
        .bind(key.permissions)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The live (not revoked) key with this hash, joined with its user.
    pub async fn api_key_by_hash(&self, key_sha256: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id, k.tenant_id, k.user_id, u.role, k.permissions, u.module_permissions \
             FROM api_keys k JOIN users u ON u.id = k.user_id \
             WHERE k.key_sha256 = ? AND k.revoked_at IS NULL",
        )
        .bind(key_sha256)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| ApiKeyRow {
            id: r.get("id"),
            tenant_id: r.get("tenant_id"),
            user_id: r.get("user_id"),
            role: r.get("role"),
            permissions: r.get("permissions"),
            user_permissions: r.get("module_permissions"),
        }))
    }
}

#[derive(Debug, Clone)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub partner_id: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: String,
    pub tenant_id: String,
    pub email: String,
    pub role: String,
    pub module_permissions: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct KeyRow {
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub name: String,
    pub permissions: Option<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct GroupRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub parent_group_id: Option<String>,
    pub created_at: i64,
}

/// Whether an error is a unique-constraint violation (by SQLite's extended code, never text).
pub fn is_unique_violation(e: &StoreError) -> bool {
    match e {
        StoreError::Db(sqlx::Error::Database(d)) => {
            matches!(d.kind(), sqlx::error::ErrorKind::UniqueViolation)
        }
        _ => false,
    }
}

impl Store {
    pub async fn insert_tenant(&self, t: &TenantRow, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO tenants (id, name, slug, partner_id, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.slug)
        .bind(&t.partner_id)
        .bind(t.created_at)
        .execute(&mut *tx)
        .await?;
        super::audit::insert(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn tenants(&self) -> Result<Vec<TenantRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, slug, partner_id, created_at FROM tenants ORDER BY created_at, id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| TenantRow {
                id: r.get("id"),
                name: r.get("name"),
                slug: r.get("slug"),
                partner_id: r.get("partner_id"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    pub async fn tenant_exists(&self, id: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tenants WHERE id = ?")
            .bind(id)
            .fetch_one(self.pool())
            .await?;
        Ok(n > 0)
    }

    pub async fn insert_user(&self, u: &UserRow, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO users (id, tenant_id, email, role, module_permissions, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&u.id)
        .bind(&u.tenant_id)
        .bind(&u.email)
        .bind(&u.role)
        .bind(&u.module_permissions)
        .bind(u.created_at)
        .execute(&mut *tx)
        .await?;
        super::audit::insert(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn user(&self, tenant_id: &str, id: &str) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, email, role, module_permissions, created_at FROM users \
             WHERE tenant_id = ? AND id = ?",
        )
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| UserRow {
            id: r.get("id"),
            tenant_id: r.get("tenant_id"),
            email: r.get("email"),
            role: r.get("role"),
            module_permissions: r.get("module_permissions"),
            created_at: r.get("created_at"),
        }))
    }

    /// A user of any tenant (platform admins only; the caller checks).
    pub async fn admin_user(&self, id: &str) -> Result<Option<UserRow>, StoreError> {
        let tenant: Option<String> = sqlx::query_scalar("SELECT tenant_id FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        match tenant {
            Some(t) => self.user(&t, id).await,
            None => Ok(None),
        }
    }

    pub async fn insert_api_key(
        &self,
        k: &NewApiKey<'_>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, user_id, name, key_sha256, permissions, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(k.id)
        .bind(k.tenant_id)
        .bind(k.user_id)
        .bind(k.name)
        .bind(k.key_sha256)
        .bind(k.permissions)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        super::audit::insert(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A tenant's keys, optionally only one user's, newest first (never the hashes).
    pub async fn api_keys(
        &self,
        tenant_id: &str,
        user_id: Option<&str>,
    ) -> Result<Vec<KeyRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, user_id, name, permissions, created_at, revoked_at FROM api_keys \
             WHERE tenant_id = ? AND (? IS NULL OR user_id = ?) ORDER BY created_at DESC, id DESC",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(user_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| KeyRow {
                id: r.get("id"),
                tenant_id: r.get("tenant_id"),
                user_id: r.get("user_id"),
                name: r.get("name"),
                permissions: r.get("permissions"),
                created_at: r.get("created_at"),
                revoked_at: r.get("revoked_at"),
            })
            .collect())
    }

    /// Revokes a key of `tenant_id`, unless it is the last live key of a super admin that
    /// `is_full_super_admin_key` (given the key's stored permissions) says holds every platform
    /// power: then nothing changes. The super admins' keys are read with their rows locked
    /// (`FOR UPDATE` on MariaDB; SQLite's `BEGIN IMMEDIATE` holds the write lock), so two
    /// revocations racing for the last two keys are serialized and the second is refused.
    pub async fn revoke_api_key(
        &self,
        tenant_id: &str,
        id: &str,
        is_full_super_admin_key: fn(Option<&str>) -> bool,
        audit: &AuditEvent,
    ) -> Result<Revocation, StoreError> {
        let mut tx = self.begin().await?;
        let lock = match self.backend() {
            Backend::MariaDb => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        // Cross-tenant on purpose: a super admin may live in any tenant.
        let supers: Vec<(String, Option<String>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT k.id, k.permissions FROM api_keys k JOIN users u ON u.id = k.user_id \
             WHERE u.role = 'super_admin' AND k.revoked_at IS NULL ORDER BY k.id{lock}"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let mut full = supers
            .iter()
            .filter(|(_, perms)| is_full_super_admin_key(perms.as_deref()));
        if let (Some((only, _)), None) = (full.next(), full.next())
            && only == id
        {
            tx.rollback().await?;
            return Ok(Revocation::LastSuperAdminKey);
        }
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE tenant_id = ? AND id = ?",
        )
        .bind(now_ms())
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let revoked = done.rows_affected() == 1;
        if revoked {
            super::audit::insert(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(if revoked {
            Revocation::Revoked
        } else {
            Revocation::Unchanged
        })
    }

    pub async fn key_owner(&self, tenant_id: &str, id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT user_id FROM api_keys WHERE tenant_id = ? AND id = ?")
                .bind(tenant_id)
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    pub async fn insert_group(&self, g: &GroupRow, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO user_groups (id, tenant_id, name, parent_group_id, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&g.id)
        .bind(&g.tenant_id)
        .bind(&g.name)
        .bind(&g.parent_group_id)
        .bind(g.created_at)
        .execute(&mut *tx)
        .await?;
        super::audit::insert(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn group(&self, tenant_id: &str, id: &str) -> Result<Option<GroupRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, parent_group_id, created_at FROM user_groups \
             WHERE tenant_id = ? AND id = ?",
        )
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| GroupRow {
            id: r.get("id"),
            tenant_id: r.get("tenant_id"),
            name: r.get("name"),
            parent_group_id: r.get("parent_group_id"),
            created_at: r.get("created_at"),
        }))
    }

    /// Adds a member; adding one twice is a no-op.
    pub async fn add_group_member(
        &self,
        tenant_id: &str,
        group_id: &str,
        user_id: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        // The tenant check rides in the statement so the row cannot cross tenants.
        let inserted = sqlx::query(
            "INSERT INTO group_members (group_id, user_id, created_at) \
             SELECT g.id, u.id, ? FROM user_groups g JOIN users u ON u.tenant_id = g.tenant_id \
             WHERE g.tenant_id = ? AND g.id = ? AND u.id = ?",
        )
        .bind(now_ms())
        .bind(tenant_id)
        .bind(group_id)
        .bind(user_id)
        .execute(&mut *tx)
        .await;
        match inserted.map_err(StoreError::from) {
            Ok(_) => {
                super::audit::insert(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }
            Err(e) if is_unique_violation(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn group_members(
        &self,
        tenant_id: &str,
        group_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT m.user_id FROM group_members m JOIN user_groups g ON g.id = m.group_id \
             WHERE g.tenant_id = ? AND g.id = ? ORDER BY m.user_id",
        )
        .bind(tenant_id)
        .bind(group_id)
        .fetch_all(self.pool())
        .await?)
    }
}
