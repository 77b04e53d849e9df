//! What the backchannel keeps of bunkers: the links of child bunkers to the bunker that
//! created them (`bunker_children`; a link is first a reservation of a slot, then bound to
//! the child), and a bunker's labels, which its metadata writes.
//! Tenant id first in every query.

use sqlx::Row;

use sqlx::AssertSqlSafe;

use super::{Backend, Store, StoreError, Tx};

/// A child's link to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildLink {
    pub child_id: String,
    pub parent_id: String,
    pub depth: i64,
}

impl Store {
    /// The link of `child_id`, if a bunker created it.
    pub async fn child_link(
        &self,
        tenant_id: &str,
        child_id: &str,
    ) -> Result<Option<ChildLink>, StoreError> {
        let row = sqlx::query(
            "SELECT child_id, parent_id, depth FROM bunker_children \
             WHERE tenant_id = ? AND child_id = ?",
        )
        .bind(tenant_id)
        .bind(child_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| ChildLink {
            child_id: r.get("child_id"),
            parent_id: r.get("parent_id"),
            depth: r.get("depth"),
        }))
    }

    /// The newest `limit` children of `parent_id`, newest first.
    pub async fn children(
        &self,
        tenant_id: &str,
        parent_id: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT child_id FROM bunker_children WHERE tenant_id = ? AND parent_id = ? \
             ORDER BY created_at DESC, child_id DESC LIMIT ?",
        )
        .bind(tenant_id)
        .bind(parent_id)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?)
    }

    /// Reserves one of `parent_id`'s child slots for a create about to start, unless
    /// `max_live` are taken: children not ended, and reservations newer than
    /// `stale_before_ms` (a create whose controller died stops holding its slot). The parent's
    /// row is locked for the count (`FOR UPDATE` on MariaDB; SQLite's `BEGIN IMMEDIATE`
    /// holds the write lock), so racing creates never pass the limit together. Whether the
    /// slot was taken; the reservation is the link row `reservation_id`, bound to the child
    /// by [`bind_child`] or dropped by [`Store::release_child`].
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve_child(
        &self,
        tenant_id: &str,
        parent_id: &str,
        reservation_id: &str,
        depth: i64,
        max_live: i64,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let lock = match self.backend() {
            Backend::MariaDb => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        sqlx::query(AssertSqlSafe(format!(
            "SELECT id FROM bunkers WHERE tenant_id = ? AND id = ?{lock}"
        )))
        .bind(tenant_id)
        .bind(parent_id)
        .fetch_optional(&mut *tx)
        .await?;
        let taken: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM bunker_children c LEFT JOIN bunkers b \
             ON b.tenant_id = c.tenant_id AND b.id = c.child_id \
             WHERE c.tenant_id = ? AND c.parent_id = ? \
             AND ((b.id IS NULL AND c.created_at >= ?) \
                  OR b.status NOT IN ('terminated', 'failed'))",
        )
        .bind(tenant_id)
        .bind(parent_id)
        .bind(stale_before_ms)
        .fetch_one(&mut *tx)
        .await?;
        if taken >= max_live {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_link(
            &mut tx,
            tenant_id,
            &ChildLink {
                child_id: reservation_id.to_owned(),
                parent_id: parent_id.to_owned(),
                depth,
            },
            now_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Gives a reserved slot back (the create failed).
    pub async fn release_child(
        &self,
        tenant_id: &str,
        reservation_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM bunker_children WHERE tenant_id = ? AND child_id = ?")
            .bind(tenant_id)
            .bind(reservation_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// Binds the reservation `reservation_id` to the child the create made.
pub async fn bind_child(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    reservation_id: &str,
    child_id: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE bunker_children SET child_id = ? WHERE tenant_id = ? AND child_id = ?")
        .bind(child_id)
        .bind(tenant_id)
        .bind(reservation_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Links `child_id` to `parent_id` at `depth`.
async fn insert_link(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    link: &ChildLink,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO bunker_children (child_id, tenant_id, parent_id, depth, created_at) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(&link.child_id)
    .bind(tenant_id)
    .bind(&link.parent_id)
    .bind(link.depth)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets `label_set` (JSON) if it is still `expected`; whether it was.
pub async fn swap_labels(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    id: &str,
    expected: &str,
    label_set: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE bunkers SET label_set = ? WHERE tenant_id = ? AND id = ? AND label_set = ?",
    )
    .bind(label_set)
    .bind(tenant_id)
    .bind(id)
    .bind(expected)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
