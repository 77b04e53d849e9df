//! Tenants, users and API keys.

use sqlx::Row;

use super::{Store, StoreError, now_ms};

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
