//! What the backchannel keeps of bunkers: the links of child bunkers to the bunker that
//! created them (`bunker_children`), and a bunker's labels, which its metadata writes.
//! Tenant id first in every query.

use sqlx::Row;

use super::{Store, StoreError, Tx};

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

    /// How many of `parent_id`'s children have not ended.
    pub async fn live_children(&self, tenant_id: &str, parent_id: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM bunker_children c JOIN bunkers b \
             ON b.tenant_id = c.tenant_id AND b.id = c.child_id \
             WHERE c.tenant_id = ? AND c.parent_id = ? \
             AND b.status NOT IN ('terminated', 'failed')",
        )
        .bind(tenant_id)
        .bind(parent_id)
        .fetch_one(self.pool())
        .await?)
    }
}

/// Links `child_id` to `parent_id` at `depth`.
pub async fn insert_link(
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
