//! Minted storage capabilities: what a revocation needs (the token itself is never stored).

use sqlx::Row;

use super::{Store, StoreError, Tx};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityRow {
    pub id: String,
    pub tenant_id: String,
    /// The API key that minted it (`jwt:…` for a JWT caller).
    pub key_id: String,
    pub prefix: String,
    /// Unix milliseconds.
    pub expires_at: i64,
    pub created_at: i64,
}

pub async fn insert(tx: &mut Tx<'_>, c: &CapabilityRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO storage_capabilities (id, tenant_id, key_id, prefix, expires_at, created_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&c.id)
    .bind(&c.tenant_id)
    .bind(&c.key_id)
    .bind(&c.prefix)
    .bind(c.expires_at)
    .bind(c.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Whether the capability `id` was minted here and neither it nor the API key that minted
    /// it is revoked.
    pub async fn capability_live(&self, id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT c.revoked_at AS cap_revoked, k.revoked_at AS key_revoked \
             FROM storage_capabilities c \
             LEFT JOIN api_keys k ON k.id = c.key_id WHERE c.id = ?",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.is_some_and(|r| {
            let cap_revoked: Option<i64> = r.get("cap_revoked");
            let key_revoked: Option<i64> = r.get("key_revoked");
            cap_revoked.is_none() && key_revoked.is_none()
        }))
    }

    /// Revokes the capability `id` of `tenant_id` (any tenant's with `None`); false when there
    /// is no such live capability.
    pub async fn revoke_capability(
        &self,
        tenant_id: Option<&str>,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<CapabilityRow>, StoreError> {
        let found = sqlx::query(
            "SELECT id, tenant_id, key_id, prefix, expires_at, created_at \
             FROM storage_capabilities WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = found else { return Ok(None) };
        let row = CapabilityRow {
            id: r.get("id"),
            tenant_id: r.get("tenant_id"),
            key_id: r.get("key_id"),
            prefix: r.get("prefix"),
            expires_at: r.get("expires_at"),
            created_at: r.get("created_at"),
        };
        if tenant_id.is_some_and(|t| t != row.tenant_id) {
            return Ok(None);
        }
        let done = sqlx::query(
            "UPDATE storage_capabilities SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(now_ms)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok((done.rows_affected() == 1).then_some(row))
    }

    /// Forgets capabilities that expired before `before_ms` (their tokens verify no more).
    pub async fn delete_expired_capabilities(&self, before_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM storage_capabilities WHERE expires_at < ?")
            .bind(before_ms)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}
