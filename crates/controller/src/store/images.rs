//! Images. Platform images (`tenant_id` null) are visible to every tenant.

use sqlx::AssertSqlSafe;
use sqlx::Row;

use super::Tx;
use super::audit::AuditEvent;

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
    pub partner_id: Option<String>,
    pub source_kind: Option<String>,
    pub size_mib: Option<i64>,
    pub object_key: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
}

pub(super) const COLUMNS: &str = "id, tenant_id, name, scope, status, sha256, size_bytes, lazy_pull, \
    default_cpu_millicores, default_memory_mb, default_disk_mb, partner_id, source_kind, \
    size_mib, object_key, error, created_at";

pub(super) fn from_row(r: &sqlx::any::AnyRow) -> ImageRow {
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
        partner_id: r.get("partner_id"),
        source_kind: r.get("source_kind"),
        size_mib: r.get("size_mib"),
        object_key: r.get("object_key"),
        error: r.get("error"),
        created_at: r.get("created_at"),
    }
}

/// Who may see an image: its tenant, the tenants of its partner (scope `partner`), or everyone
/// (platform images, `tenant_id` null).
const VISIBLE: &str =
    "(tenant_id = ? OR tenant_id IS NULL OR (scope = 'partner' AND partner_id = ?))";

impl Store {
    /// The active image a tenant means by `name_or_id`: the image with that id, else by name
    /// its own first, then the platform's, then its partner's (a partner cannot shadow a
    /// platform image for its tenants).
    pub async fn image_visible_to(
        &self,
        tenant_id: &str,
        partner_id: Option<&str>,
        name_or_id: &str,
    ) -> Result<Option<ImageRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM images WHERE (id = ? OR name = ?) AND {VISIBLE} \
             AND status != 'inactive' \
             ORDER BY CASE WHEN id = ? THEN 0 WHEN tenant_id = ? THEN 1 \
             WHEN tenant_id IS NULL THEN 2 ELSE 3 END, created_at DESC LIMIT 1"
        )))
        .bind(name_or_id)
        .bind(name_or_id)
        .bind(tenant_id)
        .bind(partner_id.unwrap_or(""))
        .bind(name_or_id)
        .bind(tenant_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(from_row))
    }
}

/// A new uploaded image, waiting for its content.
pub struct NewImage<'a> {
    pub id: &'a str,
    /// `None` for platform images.
    pub tenant_id: Option<&'a str>,
    pub partner_id: Option<&'a str>,
    pub name: &'a str,
    pub scope: &'a str,
    pub source_kind: &'a str,
    pub size_mib: i64,
    pub lazy_pull: bool,
    pub default_cpu_millicores: Option<i64>,
    pub default_memory_mb: Option<i64>,
    pub default_disk_mb: Option<i64>,
}

/// One worker's cache row for an image.
#[derive(Debug, Clone)]
pub struct CacheStateRow {
    pub worker_id: String,
    pub worker_status: String,
    pub state: String,
    pub error: Option<String>,
    pub updated_at: i64,
}

/// An image a worker is asked to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRow {
    pub sha256: String,
    pub size_bytes: i64,
    pub object_key: Option<String>,
}

impl Store {
    /// Inserts an image; `false` when its name is taken in its scope (same tenant, or among
    /// platform images).
    pub async fn insert_image(
        &self,
        img: &NewImage<'_>,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT id FROM images WHERE name = ? AND status != 'inactive' AND \
             ((tenant_id IS NULL AND ? IS NULL) OR tenant_id = ?)",
        )
        .bind(img.name)
        .bind(img.tenant_id)
        .bind(img.tenant_id)
        .fetch_optional(&mut *tx)
        .await?;
        if taken.is_some() {
            return Ok(false);
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO images (id, tenant_id, partner_id, name, scope, status, source_kind, \
             size_mib, lazy_pull, default_cpu_millicores, default_memory_mb, default_disk_mb, \
             created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(img.id)
        .bind(img.tenant_id)
        .bind(img.partner_id)
        .bind(img.name)
        .bind(img.scope)
        .bind(img.source_kind)
        .bind(img.size_mib)
        .bind(i64::from(img.lazy_pull))
        .bind(img.default_cpu_millicores)
        .bind(img.default_memory_mb)
        .bind(img.default_disk_mb)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        super::audit::insert(&mut tx, event).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// An image by id as a tenant sees it (platform admins: `tenant_id` = `None`, every image).
    pub async fn image(
        &self,
        tenant_id: Option<&str>,
        partner_id: Option<&str>,
        id: &str,
    ) -> Result<Option<ImageRow>, StoreError> {
        let row = match tenant_id {
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM images WHERE id = ?"
                )))
                .bind(id)
                .fetch_optional(self.pool())
                .await?
            }
            Some(t) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM images WHERE id = ? AND {VISIBLE}"
                )))
                .bind(id)
                .bind(t)
                .bind(partner_id.unwrap_or(""))
                .fetch_optional(self.pool())
                .await?
            }
        };
        Ok(row.as_ref().map(from_row))
    }

    /// Images a tenant sees (all for `None`), newest first.
    pub async fn images(
        &self,
        tenant_id: Option<&str>,
        partner_id: Option<&str>,
    ) -> Result<Vec<ImageRow>, StoreError> {
        let rows = match tenant_id {
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM images ORDER BY created_at DESC, id"
                )))
                .fetch_all(self.pool())
                .await?
            }
            Some(t) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM images WHERE {VISIBLE} ORDER BY created_at DESC, id"
                )))
                .bind(t)
                .bind(partner_id.unwrap_or(""))
                .fetch_all(self.pool())
                .await?
            }
        };
        Ok(rows.iter().map(from_row).collect())
    }

    /// Moves an image from `from` to `to` (compare-and-set), with the audit event of the
    /// change if it is one a caller made; false if it was not in `from`.
    pub async fn set_image_status(
        &self,
        id: &str,
        from: &str,
        to: &str,
        error: Option<&str>,
        event: Option<&AuditEvent>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE images SET status = ?, error = ?, updated_at = ? WHERE id = ? AND status = ?",
        )
        .bind(to)
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .bind(from)
        .execute(&mut *tx)
        .await?;
        let changed = done.rows_affected() == 1;
        if let (true, Some(event)) = (changed, event) {
            super::audit::insert(&mut tx, event).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Records a baked image: `baking` → `ready` with its bytes' hash, size and object key.
    pub async fn finish_bake(
        &self,
        id: &str,
        sha256: &str,
        size_bytes: i64,
        object_key: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE images SET status = 'ready', sha256 = ?, size_bytes = ?, object_key = ?, \
             error = NULL, updated_at = ? WHERE id = ? AND status = 'baking'",
        )
        .bind(sha256)
        .bind(size_bytes)
        .bind(object_key)
        .bind(now_ms())
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Images left in `baking` since before `before_ms` (their controller died mid-bake).
    pub async fn stale_bakes(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM images WHERE status = 'baking' AND updated_at < ? ORDER BY id",
        )
        .bind(before_ms)
        .fetch_all(self.pool())
        .await?)
    }

    /// Every worker's cache row for `sha256`, with the worker's status.
    pub async fn image_cache_states(&self, sha256: &str) -> Result<Vec<CacheStateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT wi.worker_id, w.status, wi.state, wi.error, wi.updated_at \
             FROM worker_images wi JOIN workers w ON w.id = wi.worker_id \
             WHERE wi.sha256 = ? ORDER BY wi.worker_id",
        )
        .bind(sha256)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| CacheStateRow {
                worker_id: r.get(0),
                worker_status: r.get(1),
                state: r.get(2),
                error: r.get(3),
                updated_at: r.get(4),
            })
            .collect())
    }

    /// Asks `worker_ids` to fetch `sha256`: a `queued` row where the worker has none or a
    /// failed one (a warm retries failures). Returns how many were queued.
    pub async fn queue_pulls(
        &self,
        tx: &mut Tx<'_>,
        sha256: &str,
        worker_ids: &[String],
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut queued = 0;
        for w in worker_ids {
            sqlx::query(
                "DELETE FROM worker_images WHERE worker_id = ? AND sha256 = ? AND state = 'failed'",
            )
            .bind(w)
            .bind(sha256)
            .execute(&mut **tx)
            .await?;
            let done = sqlx::query(
                "INSERT INTO worker_images (worker_id, sha256, state, updated_at) \
                 SELECT ?, ?, 'queued', ? FROM workers WHERE id = ? AND NOT EXISTS \
                 (SELECT 1 FROM worker_images WHERE worker_id = ? AND sha256 = ?)",
            )
            .bind(w)
            .bind(sha256)
            .bind(now)
            .bind(w)
            .bind(w)
            .bind(sha256)
            .execute(&mut **tx)
            .await?;
            queued += done.rows_affected();
        }
        Ok(queued)
    }

    /// The pulls a worker still owes: its `queued` rows, with where the bytes are.
    pub async fn pending_pulls(&self, worker_id: &str) -> Result<Vec<PullRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT wi.sha256, MAX(i.size_bytes), MAX(i.object_key) FROM worker_images wi \
             JOIN images i ON i.sha256 = wi.sha256 \
             WHERE wi.worker_id = ? AND wi.state = 'queued' AND i.status = 'ready' \
             GROUP BY wi.sha256 ORDER BY wi.sha256",
        )
        .bind(worker_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| PullRow {
                sha256: r.get(0),
                size_bytes: r.get::<Option<i64>, _>(1).unwrap_or(0),
                object_key: r.get(2),
            })
            .collect())
    }

    /// Marks a worker's pull of `sha256` failed (only a row still `queued`).
    pub async fn fail_pull(
        &self,
        worker_id: &str,
        sha256: &str,
        error: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE worker_images SET state = 'failed', error = ?, updated_at = ? \
             WHERE worker_id = ? AND sha256 = ? AND state = 'queued'",
        )
        .bind(error)
        .bind(now_ms())
        .bind(worker_id)
        .bind(sha256)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Online workers other than `worker_id` that share an availability group with it and
    /// hold `sha256` ready: (id, url, the credential generation it holds).
    pub async fn image_peers(
        &self,
        worker_id: &str,
        sha256: &str,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT w.id, w.url, w.credential_generation - w.credential_previous_ok \
             FROM workers w \
             JOIN worker_images wi ON wi.worker_id = w.id AND wi.sha256 = ? AND wi.state = 'ready' \
             JOIN availability_group_workers mine ON mine.worker_id = ? \
             JOIN availability_group_workers theirs ON theirs.group_id = mine.group_id \
                AND theirs.worker_id = w.id \
             WHERE w.id != ? AND w.status = 'online' ORDER BY w.id",
        )
        .bind(sha256)
        .bind(worker_id)
        .bind(worker_id)
        .fetch_all(self.pool())
        .await?)
    }
}

impl Store {
    /// The partner a tenant belongs to, if any.
    pub async fn tenant_partner(&self, tenant_id: &str) -> Result<Option<String>, StoreError> {
        let partner: Option<Option<String>> =
            sqlx::query_scalar("SELECT partner_id FROM tenants WHERE id = ?")
                .bind(tenant_id)
                .fetch_optional(self.pool())
                .await?;
        Ok(partner.flatten())
    }
}
