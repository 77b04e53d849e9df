//! Snapshot rows. Tenant-scoped reads and writes take the tenant id first; the cleanup job's
//! cross-tenant read is [`Store::admin_expired_snapshots`] in `admin.rs`.

use sqlx::AssertSqlSafe;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, Tx};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: String,
    pub tenant_id: String,
    pub owner_id: String,
    pub bunker_id: String,
    /// `pending`, `ready`, `failed`, or `deleting` (objects going, then the row).
    pub status: String,
    /// `disk` or `full`.
    pub kind: String,
    pub size_bytes: i64,
    pub image_name: String,
    pub image_id: String,
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    /// The worker's manifest (JSON), once ready.
    pub manifest: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

pub(super) const COLUMNS: &str = "id, tenant_id, owner_id, bunker_id, status, kind, size_bytes, \
     image_name, image_id, cpu_millicores, memory_mb, disk_mb, manifest, failure_reason, \
     created_at, expires_at";

pub(super) fn from_row(r: &AnyRow) -> SnapshotRow {
    SnapshotRow {
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        owner_id: r.get("owner_id"),
        bunker_id: r.get("bunker_id"),
        status: r.get("status"),
        kind: r.get("kind"),
        size_bytes: r.get("size_bytes"),
        image_name: r.get("image_name"),
        image_id: r.get("image_id"),
        cpu_millicores: r.get("cpu_millicores"),
        memory_mb: r.get("memory_mb"),
        disk_mb: r.get("disk_mb"),
        manifest: r.get("manifest"),
        failure_reason: r.get("failure_reason"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
    }
}

pub async fn insert(tx: &mut Tx<'_>, s: &SnapshotRow) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO snapshots ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )))
    .bind(&s.id)
    .bind(&s.tenant_id)
    .bind(&s.owner_id)
    .bind(&s.bunker_id)
    .bind(&s.status)
    .bind(&s.kind)
    .bind(s.size_bytes)
    .bind(&s.image_name)
    .bind(&s.image_id)
    .bind(s.cpu_millicores)
    .bind(s.memory_mb)
    .bind(s.disk_mb)
    .bind(&s.manifest)
    .bind(&s.failure_reason)
    .bind(s.created_at)
    .bind(s.expires_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The outcome of a capture: `pending` becomes `ready` (with its manifest) or `failed`.
pub struct Finish<'a> {
    pub status: &'a str,
    pub size_bytes: i64,
    pub manifest: Option<&'a str>,
    pub failure_reason: Option<&'a str>,
    /// A new expiry (a failed snapshot's objects do not stay); `None` keeps the asked one.
    pub expires_at: Option<i64>,
}

/// Moves a `pending` snapshot to its outcome. Returns whether it moved (a delete may have
/// removed it meanwhile).
pub async fn finish(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    id: &str,
    f: &Finish<'_>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE snapshots SET status = ?, size_bytes = ?, manifest = ?, failure_reason = ?, \
         expires_at = COALESCE(?, expires_at) \
         WHERE tenant_id = ? AND id = ? AND status = 'pending'",
    )
    .bind(f.status)
    .bind(f.size_bytes)
    .bind(f.manifest)
    .bind(f.failure_reason)
    .bind(f.expires_at)
    .bind(tenant_id)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Fails a capture nobody renewed since `stale_before` (its controller died), expiring at
/// `expires_at`. False if it finished or was renewed meanwhile.
pub async fn fail_abandoned(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    id: &str,
    stale_before: i64,
    reason: &str,
    expires_at: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE snapshots SET status = 'failed', failure_reason = ?, expires_at = ? \
         WHERE tenant_id = ? AND id = ? AND status = 'pending' \
         AND COALESCE(renewed_at, created_at) < ?",
    )
    .bind(reason)
    .bind(expires_at)
    .bind(tenant_id)
    .bind(id)
    .bind(stale_before)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records that the controller capturing the snapshot is alive (see `fail_abandoned`).
pub async fn renew_capture(
    store: &Store,
    tenant_id: &str,
    id: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE snapshots SET renewed_at = ? WHERE tenant_id = ? AND id = ? \
         AND status IN ('pending', 'deleting')",
    )
    .bind(now_ms)
    .bind(tenant_id)
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Whether a delete may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteClaim {
    /// The snapshot is `deleting` now (or was already: a retry): nothing restores from it.
    Claimed,
    /// A passivated bunker comes back from it.
    InUse,
    Gone,
}

/// Marks a snapshot `deleting` unless a passivation relies on it. A passivation records
/// itself only on a `ready` snapshot, and both statements lock the snapshot's row, so of a
/// racing delete and passivation exactly one wins.
pub async fn claim_delete(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    id: &str,
) -> Result<DeleteClaim, StoreError> {
    let moved = sqlx::query(
        "UPDATE snapshots SET status = 'deleting' WHERE tenant_id = ? AND id = ? \
         AND status != 'deleting' \
         AND NOT EXISTS (SELECT 1 FROM passivations p WHERE p.snapshot_id = ?)",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(id)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if moved {
        return Ok(DeleteClaim::Claimed);
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM snapshots WHERE tenant_id = ? AND id = ?")
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(match status.as_deref() {
        None => DeleteClaim::Gone,
        Some("deleting") => DeleteClaim::Claimed,
        Some(_) => DeleteClaim::InUse,
    })
}

/// Deletes the row. Returns whether it existed.
pub async fn delete(tx: &mut Tx<'_>, tenant_id: &str, id: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM snapshots WHERE tenant_id = ? AND id = ?")
        .bind(tenant_id)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Keyset position of a snapshot listing: rows strictly older than `(created_at, id)`.
#[derive(Debug, Clone)]
pub struct SnapshotCursor {
    pub created_at: i64,
    pub id: String,
}

impl Store {
    pub async fn snapshot(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<SnapshotRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM snapshots WHERE tenant_id = ? AND id = ?"
        )))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(from_row))
    }

    /// Newest first, at most `limit` rows, optionally of one bunker.
    pub async fn snapshots(
        &self,
        tenant_id: &str,
        bunker_id: Option<&str>,
        cursor: Option<&SnapshotCursor>,
        limit: u32,
    ) -> Result<Vec<SnapshotRow>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM snapshots WHERE tenant_id = ?");
        if bunker_id.is_some() {
            sql.push_str(" AND bunker_id = ?");
        }
        if cursor.is_some() {
            sql.push_str(" AND (created_at < ? OR (created_at = ? AND id < ?))");
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(tenant_id);
        if let Some(b) = bunker_id {
            q = q.bind(b);
        }
        if let Some(c) = cursor {
            q = q.bind(c.created_at).bind(c.created_at).bind(c.id.clone());
        }
        let rows = q.bind(limit as i64).fetch_all(self.pool()).await?;
        Ok(rows.iter().map(from_row).collect())
    }
}
