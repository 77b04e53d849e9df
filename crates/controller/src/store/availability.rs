//! Availability groups: which workers hold which images. Platform-wide (admin) records.

use sqlx::Row;

use super::{Store, StoreError, Tx, now_ms};

#[derive(Debug, Clone)]
pub struct GroupRow {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub worker_ids: Vec<String>,
    pub image_ids: Vec<String>,
    pub created_at: i64,
}

impl Store {
    /// Inserts a group; `false` when the name is taken.
    pub async fn insert_availability_group(
        &self,
        id: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO availability_groups (id, name, description, created_at) \
             SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM availability_groups WHERE name = ?)",
        )
        .bind(id)
        .bind(name)
        .bind(description)
        .bind(now_ms())
        .bind(name)
        .execute(self.pool())
        .await;
        match done {
            Ok(d) => Ok(d.rows_affected() == 1),
            Err(e) => {
                let e = StoreError::from(e);
                if super::identity::is_unique_violation(&e) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    pub async fn availability_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, description, created_at FROM availability_groups ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.availability_group_row(r).await?);
        }
        Ok(out)
    }

    pub async fn availability_group(&self, id: &str) -> Result<Option<GroupRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, description, created_at FROM availability_groups WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        match row {
            Some(r) => Ok(Some(self.availability_group_row(&r).await?)),
            None => Ok(None),
        }
    }

    async fn availability_group_row(&self, r: &sqlx::any::AnyRow) -> Result<GroupRow, StoreError> {
        let id: String = r.get("id");
        let worker_ids = sqlx::query_scalar(
            "SELECT worker_id FROM availability_group_workers WHERE group_id = ? ORDER BY worker_id",
        )
        .bind(&id)
        .fetch_all(self.pool())
        .await?;
        let image_ids = sqlx::query_scalar(
            "SELECT image_id FROM availability_group_images WHERE group_id = ? ORDER BY image_id",
        )
        .bind(&id)
        .fetch_all(self.pool())
        .await?;
        Ok(GroupRow {
            id,
            name: r.get("name"),
            description: r.get("description"),
            worker_ids,
            image_ids,
            created_at: r.get("created_at"),
        })
    }

    /// Deletes a group and its memberships (the images stay where they are cached).
    pub async fn delete_availability_group(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        for table in ["availability_group_workers", "availability_group_images"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE group_id = ?"
            )))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        let done = sqlx::query("DELETE FROM availability_groups WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Adds (`true`) or removes a member row in `table` (`availability_group_workers` with
    /// column `worker_id`, or `availability_group_images` with `image_id`) inside `tx`.
    /// Returns whether anything changed.
    pub async fn set_group_member(
        &self,
        tx: &mut Tx<'_>,
        member: GroupMember,
        group_id: &str,
        member_id: &str,
        present: bool,
    ) -> Result<bool, StoreError> {
        let (table, column) = member.table();
        let done = if present {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} (group_id, {column}) SELECT ?, ? WHERE NOT EXISTS \
                 (SELECT 1 FROM {table} WHERE group_id = ? AND {column} = ?)"
            )))
            .bind(group_id)
            .bind(member_id)
            .bind(group_id)
            .bind(member_id)
            .execute(&mut **tx)
            .await?
        } else {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE group_id = ? AND {column} = ?"
            )))
            .bind(group_id)
            .bind(member_id)
            .execute(&mut **tx)
            .await?
        };
        Ok(done.rows_affected() == 1)
    }

    /// Workers of every group holding `image_id`, with their status: (id, status).
    pub async fn workers_for_image_groups(
        &self,
        image_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT w.id, w.status FROM workers w \
             JOIN availability_group_workers gw ON gw.worker_id = w.id \
             JOIN availability_group_images gi ON gi.group_id = gw.group_id \
             WHERE gi.image_id = ? ORDER BY w.id",
        )
        .bind(image_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Ready images of every group `worker_id` is in: (image id, sha256).
    pub async fn images_for_worker_groups(
        &self,
        worker_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT i.id, i.sha256 FROM images i \
             JOIN availability_group_images gi ON gi.image_id = i.id \
             JOIN availability_group_workers gw ON gw.group_id = gi.group_id \
             WHERE gw.worker_id = ? AND i.status = 'ready' AND i.sha256 IS NOT NULL ORDER BY i.id",
        )
        .bind(worker_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Whether the image is in any availability group.
    pub async fn image_in_any_group(&self, image_id: &str) -> Result<bool, StoreError> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM availability_group_images WHERE image_id = ?")
                .bind(image_id)
                .fetch_one(self.pool())
                .await?;
        Ok(n > 0)
    }
}

/// Which kind of member a group row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupMember {
    Worker,
    Image,
}

impl GroupMember {
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Self::Worker => ("availability_group_workers", "worker_id"),
            Self::Image => ("availability_group_images", "image_id"),
        }
    }
}
