//! Passivated persistent bunkers (see `service/passivation.rs`).

use sqlx::AssertSqlSafe;

use super::bunkers::{BunkerRow, COLUMNS, IDLE_AT, from_row};
use super::{Store, StoreError, Tx, now_ms};

impl Store {
    /// Running persistent bunkers idle past their `idle_timeout_s`.
    pub async fn admin_idle_persistent_bunkers(
        &self,
        now_ms: i64,
    ) -> Result<Vec<BunkerRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM bunkers WHERE status = 'running' \
             AND lifecycle_mode = 'persistent' \
             AND {IDLE_AT}"
        )))
        .bind(now_ms)
        .bind(now_ms)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// The snapshot a passivated bunker comes back from.
    pub async fn passivation(&self, bunker_id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT snapshot_id FROM passivations WHERE bunker_id = ?")
                .bind(bunker_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Passivated bunkers whose snapshot is no longer `ready` (deleted before deletes were
    /// refused): (bunker id, tenant id). They cannot come back.
    pub async fn admin_lost_passivations(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT p.bunker_id, p.tenant_id FROM passivations p \
             JOIN bunkers b ON b.id = p.bunker_id WHERE b.status = 'paused' \
             AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.id = p.snapshot_id \
             AND s.status = 'ready')",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Passivation rows whose bunker has ended: (bunker id, tenant id, snapshot id).
    pub async fn admin_ended_passivations(
        &self,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT p.bunker_id, p.tenant_id, p.snapshot_id FROM passivations p \
             JOIN bunkers b ON b.id = p.bunker_id WHERE b.status IN ('terminated', 'failed')",
        )
        .fetch_all(self.pool())
        .await?)
    }
}

/// Moves a running bunker to `paused` with no worker and records its passivation snapshot.
/// With `idle_since`, only a bunker idle since before then and not busy. False (nothing
/// changed) if it is no longer running, was used meanwhile, is busy, or its snapshot is no
/// longer `ready` (a delete claimed it).
pub async fn passivate(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    bunker_id: &str,
    snapshot_id: &str,
    idle_since: Option<i64>,
) -> Result<bool, StoreError> {
    // First, so the snapshot's row is locked against a delete (see `claim_delete`).
    let recorded = sqlx::query(
        "INSERT INTO passivations (bunker_id, tenant_id, snapshot_id, passivated_at) \
         SELECT ?, ?, ?, ? FROM snapshots WHERE tenant_id = ? AND id = ? AND status = 'ready'",
    )
    .bind(bunker_id)
    .bind(tenant_id)
    .bind(snapshot_id)
    .bind(now_ms())
    .bind(tenant_id)
    .bind(snapshot_id)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if !recorded {
        return Ok(false);
    }
    let moved = match idle_since {
        Some(idle_since) => sqlx::query(
            "UPDATE bunkers SET status = 'paused', \
             last_worker_id = COALESCE(worker_id, last_worker_id), worker_id = NULL \
             WHERE tenant_id = ? AND id = ? AND status = 'running' \
             AND COALESCE(last_activity_at, started_at, created_at) <= ? \
             AND (busy_until IS NULL OR busy_until < ?)",
        )
        .bind(tenant_id)
        .bind(bunker_id)
        .bind(idle_since)
        .bind(now_ms()),
        None => sqlx::query(
            "UPDATE bunkers SET status = 'paused', \
             last_worker_id = COALESCE(worker_id, last_worker_id), worker_id = NULL \
             WHERE tenant_id = ? AND id = ? AND status = 'running'",
        )
        .bind(tenant_id)
        .bind(bunker_id),
    }
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if !moved {
        sqlx::query("DELETE FROM passivations WHERE bunker_id = ? AND tenant_id = ?")
            .bind(bunker_id)
            .bind(tenant_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(moved)
}

/// Claims a passivated bunker for a restore on `worker_id`: false if another request already
/// did (its worker is set) or it is no longer paused.
pub async fn claim_restore(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    bunker_id: &str,
    worker_id: &str,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "UPDATE bunkers SET worker_id = ? WHERE tenant_id = ? AND id = ? AND status = 'paused' \
         AND worker_id IS NULL",
    )
    .bind(worker_id)
    .bind(tenant_id)
    .bind(bunker_id)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// Gives up a claim after a failed restore: the bunker stays passivated.
pub async fn release_claim(
    store: &Store,
    tenant_id: &str,
    bunker_id: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE bunkers SET last_worker_id = COALESCE(worker_id, last_worker_id), \
         worker_id = NULL WHERE tenant_id = ? AND id = ? AND status = 'paused'",
    )
    .bind(tenant_id)
    .bind(bunker_id)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Ends a passivation: the row goes and the snapshot expires now (the snapshots job deletes
/// it and its objects).
pub async fn finish(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    bunker_id: &str,
    snapshot_id: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM passivations WHERE bunker_id = ? AND tenant_id = ?")
        .bind(bunker_id)
        .bind(tenant_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE snapshots SET expires_at = ? WHERE tenant_id = ? AND id = ?")
        .bind(now_ms())
        .bind(tenant_id)
        .bind(snapshot_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
