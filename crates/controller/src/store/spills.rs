//! Spilled exec outputs (one row per stored pipe) and the stored bytes of a tenant.
//!
//! A spill's row is written once its object is whole; the object is deleted before its row, so a
//! row never outlives what it names by more than a failed delete, which the next pass retries.

use sqlx::Row;

use super::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpillRow {
    pub object_key: String,
    pub tenant_id: String,
    pub bunker_id: String,
    pub exec_id: String,
    pub size_bytes: i64,
    pub created_at: i64,
}

const COLUMNS: &str = "object_key, tenant_id, bunker_id, exec_id, size_bytes, created_at";

fn spill_from(r: &sqlx::any::AnyRow) -> SpillRow {
    SpillRow {
        object_key: r.get("object_key"),
        tenant_id: r.get("tenant_id"),
        bunker_id: r.get("bunker_id"),
        exec_id: r.get("exec_id"),
        size_bytes: r.get("size_bytes"),
        created_at: r.get("created_at"),
    }
}

impl Store {
    pub async fn insert_spill(&self, r: &SpillRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO exec_spills (object_key, tenant_id, bunker_id, exec_id, size_bytes, \
             created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.object_key)
        .bind(&r.tenant_id)
        .bind(&r.bunker_id)
        .bind(&r.exec_id)
        .bind(r.size_bytes)
        .bind(r.created_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Every spill of one bunker.
    pub async fn bunker_spills(
        &self,
        tenant_id: &str,
        bunker_id: &str,
    ) -> Result<Vec<SpillRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM exec_spills WHERE tenant_id = ? AND bunker_id = ?"
        )))
        .bind(tenant_id)
        .bind(bunker_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(spill_from).collect())
    }

    /// Up to `limit` spills of any tenant made before `before_ms`, or of a bunker that ended:
    /// what the cleanup job deletes.
    pub async fn admin_spills_to_delete(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<SpillRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM exec_spills s WHERE s.created_at < ? OR EXISTS (\
             SELECT 1 FROM bunkers b WHERE b.tenant_id = s.tenant_id AND b.id = s.bunker_id \
             AND b.status IN ('terminated', 'failed')) \
             ORDER BY s.created_at LIMIT ?"
        )))
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(spill_from).collect())
    }

    pub async fn delete_spill(&self, tenant_id: &str, object_key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM exec_spills WHERE tenant_id = ? AND object_key = ?")
            .bind(tenant_id)
            .bind(object_key)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Bytes the tenant keeps in object storage: its snapshots (what their rows record), its
    /// baked images and its spilled exec outputs.
    pub async fn stored_bytes(&self, tenant_id: &str) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT CAST(\
             COALESCE((SELECT SUM(size_bytes) FROM snapshots WHERE tenant_id = ?), 0) + \
             COALESCE((SELECT SUM(size_bytes) FROM images WHERE tenant_id = ? \
               AND object_key IS NOT NULL), 0) + \
             COALESCE((SELECT SUM(size_bytes) FROM exec_spills WHERE tenant_id = ?), 0) \
             AS SIGNED)",
        )
        .bind(tenant_id)
        .bind(tenant_id)
        .bind(tenant_id)
        .fetch_one(self.pool())
        .await?;
        Ok(n)
    }
}
