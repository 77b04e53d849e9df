//! Images. Platform images (`tenant_id` null) are visible to every tenant.

use sqlx::AssertSqlSafe;
use sqlx::Row;

use super::{Store, StoreError, now_ms};

#[derive(Debug, Clone)]
pub struct ImageRow {
    pub id: String,
    pub tenant_id: Option<String>,
    pub name: String,
    pub scope: String,
    pub status: String,
    pub sha256: Option<String>,
    pub size_bytes: Option<i64>,
    pub lazy_pull: bool,
    pub default_cpu_millicores: Option<i64>,
    pub default_memory_mb: Option<i64>,
    pub default_disk_mb: Option<i64>,
}

const COLUMNS: &str = "id, tenant_id, name, scope, status, sha256, size_bytes, lazy_pull, \
    default_cpu_millicores, default_memory_mb, default_disk_mb";

fn from_row(r: &sqlx::any::AnyRow) -> ImageRow {
    ImageRow {
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        name: r.get("name"),
        scope: r.get("scope"),
        status: r.get("status"),
        sha256: r.get("sha256"),
        size_bytes: r.get("size_bytes"),
        lazy_pull: r.get::<i64, _>("lazy_pull") != 0,
        default_cpu_millicores: r.get("default_cpu_millicores"),
        default_memory_mb: r.get("default_memory_mb"),
        default_disk_mb: r.get("default_disk_mb"),
    }
}

impl Store {
    /// The active image a tenant means by `name_or_id`: its own first, then the platform's.
    pub async fn image_visible_to(
        &self,
        tenant_id: &str,
        name_or_id: &str,
    ) -> Result<Option<ImageRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM images WHERE (id = ? OR name = ?) \
             AND (tenant_id = ? OR tenant_id IS NULL) AND status != 'inactive' \
             ORDER BY CASE WHEN tenant_id IS NULL THEN 1 ELSE 0 END, created_at DESC LIMIT 1"
        )))
        .bind(name_or_id)
        .bind(name_or_id)
        .bind(tenant_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(from_row))
    }

    /// Records a platform image that a worker ships prebuilt (by name and content hash);
    /// a new hash under the same name supersedes the old row. Returns the image id.
    pub async fn upsert_builtin_image(
        &self,
        new_id: &str,
        name: &str,
        sha256: &str,
        size_bytes: i64,
    ) -> Result<String, StoreError> {
        let mut tx = self.begin().await?;
        let existing: Option<String> = sqlx::query_scalar(
            "SELECT id FROM images WHERE tenant_id IS NULL AND name = ? AND sha256 = ?",
        )
        .bind(name)
        .bind(sha256)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = existing {
            sqlx::query("UPDATE images SET status = 'ready' WHERE id = ? AND status = 'inactive'")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(id);
        }
        sqlx::query(
            "UPDATE images SET status = 'inactive' WHERE tenant_id IS NULL AND name = ? AND sha256 != ?",
        )
        .bind(name)
        .bind(sha256)
        .execute(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO images ({COLUMNS}, created_at) VALUES (?, NULL, ?, 'platform', 'ready', ?, ?, 0, NULL, NULL, NULL, ?)"
        )))
        .bind(new_id)
        .bind(name)
        .bind(sha256)
        .bind(size_bytes)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(new_id.to_owned())
    }
}
