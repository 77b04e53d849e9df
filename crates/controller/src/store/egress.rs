//! What the egress audit needs of the bunker rows: which workers may write a bunker's audit
//! batches (the storage proxy asks for any tenant's bunker, so these reads are `admin_`), and
//! which ended bunkers' batches the retention still has to delete.

use sqlx::Row;

use super::{Store, StoreError};

/// Who may write a bunker's audit, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressWriters {
    /// The worker the bunker is placed on.
    pub worker_id: Option<String>,
    /// The worker a passivation (or a failed restore) took it off.
    pub last_worker_id: Option<String>,
    pub terminated_at: Option<i64>,
    /// Its audit objects were deleted by the retention.
    pub purged: bool,
}

impl Store {
    /// The writers of any tenant's bunker `bunker_id`; `None` if there is no such bunker.
    pub async fn admin_egress_writers(
        &self,
        bunker_id: &str,
    ) -> Result<Option<EgressWriters>, StoreError> {
        let row = sqlx::query(
            "SELECT worker_id, last_worker_id, terminated_at, egress_purged_at FROM bunkers \
             WHERE id = ?",
        )
        .bind(bunker_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| EgressWriters {
            worker_id: r.get("worker_id"),
            last_worker_id: r.get("last_worker_id"),
            terminated_at: r.get("terminated_at"),
            purged: r.get::<Option<i64>, _>("egress_purged_at").is_some(),
        }))
    }

    /// Up to `limit` bunkers of any tenant, `(tenant_id, id)`, that ended before `before_ms`
    /// and whose audit objects are not deleted yet, oldest first.
    pub async fn admin_egress_to_purge(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT tenant_id, id FROM bunkers WHERE egress_purged_at IS NULL \
             AND terminated_at < ? AND status IN ('terminated', 'failed') \
             ORDER BY terminated_at LIMIT ?",
        )
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?)
    }

    /// Records that the bunker's audit objects are gone.
    pub async fn mark_egress_purged(
        &self,
        tenant_id: &str,
        bunker_id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE bunkers SET egress_purged_at = ? WHERE tenant_id = ? AND id = ?")
            .bind(now_ms)
            .bind(tenant_id)
            .bind(bunker_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
