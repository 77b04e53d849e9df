//! Built-in images: the ext4 files workers ship in their images directory, recorded as
//! platform images (`tenant_id` and `source_kind` null) by name and sha256. One row per
//! (name, sha256): workers built from other inputs report other shas under the same name, and
//! every sha stays usable on the workers holding it.

use sqlx::AssertSqlSafe;
use sqlx::Row;

use super::images::{COLUMNS, ImageRow, from_row};
use super::{Store, StoreError, now_ms};

/// What marks a row as built in.
const BUILTIN: &str = "tenant_id IS NULL AND source_kind IS NULL";

/// A built-in row as the images job sees it.
#[derive(Debug, Clone)]
pub struct BuiltinRow {
    pub id: String,
    pub sha256: String,
    pub status: String,
}

impl Store {
    /// Records a built-in image a worker reports at registration: the row of this name and
    /// sha, made ready again if it was inactive, else a new one. Other shas of the name are
    /// left as they are. Returns the image id.
    pub async fn upsert_builtin_image(
        &self,
        new_id: &str,
        name: &str,
        sha256: &str,
        size_bytes: i64,
    ) -> Result<String, StoreError> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let existing: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT id FROM images WHERE {BUILTIN} AND name = ? AND sha256 = ? \
             ORDER BY created_at, id LIMIT 1"
        )))
        .bind(name)
        .bind(sha256)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = existing {
            sqlx::query(
                "UPDATE images SET status = 'ready', reported_at = ?, retired_at = NULL, \
                 updated_at = CASE WHEN status = 'inactive' THEN ? ELSE updated_at END \
                 WHERE id = ?",
            )
            .bind(now)
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(id);
        }
        sqlx::query(
            "INSERT INTO images (id, tenant_id, name, scope, status, sha256, size_bytes, lazy_pull, \
             reported_at, created_at, updated_at) \
             VALUES (?, NULL, ?, 'platform', 'ready', ?, ?, 0, ?, ?, ?)",
        )
        .bind(new_id)
        .bind(name)
        .bind(sha256)
        .bind(size_bytes)
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(new_id.to_owned())
    }

    /// The ready built-in rows named `name`, newest first: the shas a create by that name
    /// may boot.
    pub async fn ready_builtin_images(&self, name: &str) -> Result<Vec<ImageRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM images WHERE {BUILTIN} AND name = ? AND status = 'ready' \
             ORDER BY created_at DESC, id"
        )))
        .bind(name)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// Every built-in row that is ready or that the images job retired.
    pub async fn tracked_builtin_images(&self) -> Result<Vec<BuiltinRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, sha256, status FROM images WHERE {BUILTIN} \
             AND sha256 IS NOT NULL \
             AND (status = 'ready' OR (status = 'inactive' AND retired_at IS NOT NULL)) \
             ORDER BY id"
        )))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| BuiltinRow {
                id: r.get("id"),
                sha256: r.get("sha256"),
                status: r.get("status"),
            })
            .collect())
    }

    /// Notes that an online worker holds these ready built-in rows now.
    pub async fn builtin_images_reported(&self, ids: &[String]) -> Result<(), StoreError> {
        let now = now_ms();
        for id in ids {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE images SET reported_at = ? WHERE id = ? AND {BUILTIN} AND status = 'ready'"
            )))
            .bind(now)
            .bind(id)
            .execute(self.pool())
            .await?;
        }
        Ok(())
    }

    /// Retires a ready built-in row no online worker has held since `before_ms`: inactive,
    /// with `retired_at` set. False if it was reported since (or is no longer ready).
    pub async fn retire_builtin_image(&self, id: &str, before_ms: i64) -> Result<bool, StoreError> {
        let now = now_ms();
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE images SET status = 'inactive', retired_at = ?, updated_at = ? \
             WHERE id = ? AND {BUILTIN} AND status = 'ready' \
             AND (reported_at IS NULL OR reported_at < ?)"
        )))
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(before_ms)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Brings back a built-in row the images job retired, now that an online worker holds it
    /// again. A row an admin deactivated (no `retired_at`) stays inactive.
    pub async fn unretire_builtin_image(&self, id: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE images SET status = 'ready', retired_at = NULL, reported_at = ?, \
             updated_at = ? WHERE id = ? AND {BUILTIN} AND status = 'inactive' \
             AND retired_at IS NOT NULL"
        )))
        .bind(now)
        .bind(now)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Every (worker id, sha256) a worker's cache ledger holds ready.
    pub async fn ready_cache_entries(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT worker_id, sha256 FROM worker_images WHERE state = 'ready' \
             ORDER BY worker_id, sha256",
        )
        .fetch_all(self.pool())
        .await?)
    }
}
