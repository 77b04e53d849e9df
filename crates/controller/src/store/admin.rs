//! Cross-tenant reads, visibly apart: platform admins' listings and the controller's own
//! fleet-wide bookkeeping (heartbeat reconciliation). Nothing here serves a tenant's request
//! without a prior permission check for `scaibunker:admin`.

use super::bunkers::{
    BunkerFilter, BunkerRow, COLUMNS, Cursor, IDLE_AT, bind, filter_sql, from_row,
};
use super::identity::UserRow;
use super::{Store, StoreError, Tx};
use sqlx::AssertSqlSafe;

impl Store {
    /// The tenant of any tenant's API key (platform admins revoking a leaked key).
    pub async fn admin_key_tenant(&self, key_id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE id = ?")
                .bind(key_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// The oldest user with role `super_admin`, in any tenant (key recovery).
    pub async fn admin_oldest_super_admin(&self) -> Result<Option<UserRow>, StoreError> {
        let found: Option<(String, String)> = sqlx::query_as(
            "SELECT tenant_id, id FROM users WHERE role = 'super_admin' \
             ORDER BY created_at, id LIMIT 1",
        )
        .fetch_optional(self.pool())
        .await?;
        match found {
            Some((tenant_id, id)) => self.user(&tenant_id, &id).await,
            None => Ok(None),
        }
    }

    /// Any tenant's bunker by id.
    pub async fn admin_bunker(&self, id: &str) -> Result<Option<BunkerRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM bunkers WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(from_row))
    }

    pub async fn admin_bunkers(
        &self,
        filter: &BunkerFilter,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<BunkerRow>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM bunkers WHERE 1 = 1");
        let binds = filter_sql(filter, cursor, &mut sql);
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for b in &binds {
            q = bind(q, b);
        }
        let rows = q.bind(limit as i64).fetch_all(self.pool()).await?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// Bunkers placed on a worker that are not terminal.
    pub async fn admin_live_bunkers_on_worker(
        &self,
        worker_id: &str,
    ) -> Result<Vec<BunkerRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM bunkers WHERE worker_id = ? \
             AND status NOT IN ('terminated', 'failed')"
        )))
        .bind(worker_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// Of `ids`, those that exist, are not terminal and live on `worker_id` (a VM of a bunker
    /// placed elsewhere, or passivated, is an orphan there).
    pub async fn admin_live_bunker_ids(
        &self,
        worker_id: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; ids.len()].join(", ");
        let sql = format!(
            "SELECT id FROM bunkers WHERE id IN ({placeholders}) \
             AND status NOT IN ('terminated', 'failed') AND worker_id = ?"
        );
        let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql));
        for id in ids {
            q = q.bind(id);
        }
        Ok(q.bind(worker_id).fetch_all(self.pool()).await?)
    }
}

/// Why the sweeper ends a bunker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Past `max_lifetime_s`: ended whatever it is doing.
    Lifetime,
    /// Idle past `idle_timeout_s` and not busy.
    Idle,
}

impl Expiry {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lifetime => "max_lifetime_s reached",
            Self::Idle => "idle_timeout_s reached",
        }
    }
}

impl Store {
    /// Running or paused bunkers past their lifetime or idle timeout, with the reason.
    /// Persistent bunkers have no lifetime cap and are not ended for idleness (they are
    /// passivated by snapshot once snapshots exist).
    pub async fn admin_expired_bunkers(
        &self,
        now_ms: i64,
    ) -> Result<Vec<(BunkerRow, Expiry)>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM bunkers WHERE status IN ('running', 'paused') AND ( \
             (max_lifetime_s IS NOT NULL AND COALESCE(started_at, created_at) + max_lifetime_s * 1000 < ?) \
             OR (lifecycle_mode != 'persistent' AND {IDLE_AT}))"
        )))
        .bind(now_ms)
        .bind(now_ms)
        .bind(now_ms)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(from_row)
            .map(|b| {
                let lifetime_over = b
                    .max_lifetime_s
                    .is_some_and(|m| b.started_at.unwrap_or(b.created_at) + m * 1000 < now_ms);
                let reason = if lifetime_over {
                    Expiry::Lifetime
                } else {
                    Expiry::Idle
                };
                (b, reason)
            })
            .collect())
    }

    /// Bunkers still pending or provisioning that were created before `created_before`.
    pub async fn admin_stuck_bunkers(
        &self,
        created_before: i64,
    ) -> Result<Vec<BunkerRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM bunkers WHERE status IN ('pending', 'provisioning') \
             AND created_at < ?"
        )))
        .bind(created_before)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// Bunkers per status and workers per status, fleet-wide (for metrics).
    pub async fn admin_status_counts(
        &self,
    ) -> Result<(Vec<(String, i64)>, Vec<(String, i64)>), StoreError> {
        let bunkers = sqlx::query_as::<_, (String, i64)>(
            "SELECT status, COUNT(*) FROM bunkers GROUP BY status ORDER BY status",
        )
        .fetch_all(self.pool())
        .await?;
        let workers = sqlx::query_as::<_, (String, i64)>(
            "SELECT status, COUNT(*) FROM workers GROUP BY status ORDER BY status",
        )
        .fetch_all(self.pool())
        .await?;
        Ok((bunkers, workers))
    }
}

impl Store {
    /// Snapshots of any tenant that expired before `now_ms`, or are still `pending` though
    /// created before `pending_before` (the controller capturing them died), oldest first.
    pub async fn admin_expired_snapshots(
        &self,
        now_ms: i64,
        stale_before: i64,
        failed_before: i64,
        limit: u32,
    ) -> Result<Vec<super::snapshots::SnapshotRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM snapshots WHERE (expires_at IS NOT NULL AND expires_at < ?) \
             OR (status = 'pending' AND COALESCE(renewed_at, created_at) < ?) \
             OR (status = 'failed' AND expires_at IS NULL AND created_at < ?) \
             ORDER BY created_at LIMIT ?",
            super::snapshots::COLUMNS
        )))
        .bind(now_ms)
        .bind(stale_before)
        .bind(failed_before)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(super::snapshots::from_row).collect())
    }
}

impl Store {
    /// Bunkers `snapshotting` with no capture renewed since `stale_before` (their controller
    /// died, or their snapshot was deleted and nobody finished the capture).
    pub async fn admin_abandoned_snapshotting(
        &self,
        stale_before: i64,
    ) -> Result<Vec<BunkerRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM bunkers b WHERE b.status = 'snapshotting' AND NOT EXISTS ( \
             SELECT 1 FROM snapshots s WHERE s.bunker_id = b.id \
             AND s.status IN ('pending', 'deleting') \
             AND COALESCE(s.renewed_at, s.created_at) >= ?)"
        )))
        .bind(stale_before)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(from_row).collect())
    }
}

/// Ends a bunker the sweeper found idle (a compare-and-set on `from`), unless it was used or
/// marked busy since: an exec or shell that began after the sweeper's read keeps it.
pub async fn admin_end_idle(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    id: &str,
    from: &str,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let sql = format!(
        "UPDATE bunkers SET status = 'terminated', terminated_at = ? \
         WHERE tenant_id = ? AND id = ? AND status = ? AND lifecycle_mode != 'persistent' \
         AND {IDLE_AT}"
    );
    Ok(sqlx::query(AssertSqlSafe(sql))
        .bind(now_ms)
        .bind(tenant_id)
        .bind(id)
        .bind(from)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1)
}
