//! The exec log: one row per exec call.

use super::{StoreError, Tx};

#[derive(Debug, Clone)]
pub struct ExecLogRow {
    pub id: String,
    pub tenant_id: String,
    pub bunker_id: String,
    pub actor_id: String,
    pub command: String,
    pub exit_code: Option<i32>,
    pub duration_ms: i64,
    pub timed_out: bool,
    pub output_preview: String,
    pub created_at: i64,
}

pub async fn insert(tx: &mut Tx<'_>, r: &ExecLogRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO exec_log (id, tenant_id, bunker_id, actor_id, command, exit_code, duration_ms, \
         timed_out, output_preview, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&r.id)
    .bind(&r.tenant_id)
    .bind(&r.bunker_id)
    .bind(&r.actor_id)
    .bind(&r.command)
    .bind(r.exit_code)
    .bind(r.duration_ms)
    .bind(r.timed_out as i64)
    .bind(&r.output_preview)
    .bind(r.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One bunker's exec log, newest first.
pub async fn list(
    store: &super::Store,
    tenant_id: &str,
    bunker_id: &str,
    before: Option<(i64, &str)>,
    limit: u32,
) -> Result<Vec<ExecLogRow>, StoreError> {
    use sqlx::Row;
    let (before_ms, before_id) = before.unwrap_or((i64::MAX, ""));
    let rows = sqlx::query(
        "SELECT id, tenant_id, bunker_id, actor_id, command, exit_code, duration_ms, timed_out, \
         output_preview, created_at FROM exec_log WHERE tenant_id = ? AND bunker_id = ? \
         AND (created_at < ? OR (created_at = ? AND id < ?)) \
         ORDER BY created_at DESC, id DESC LIMIT ?",
    )
    .bind(tenant_id)
    .bind(bunker_id)
    .bind(before_ms)
    .bind(before_ms)
    .bind(if before.is_some() {
        before_id
    } else {
        "\u{10FFFF}"
    })
    .bind(limit as i64)
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .iter()
        .map(|r| ExecLogRow {
            id: r.get("id"),
            tenant_id: r.get("tenant_id"),
            bunker_id: r.get("bunker_id"),
            actor_id: r.get("actor_id"),
            command: r.get("command"),
            exit_code: r.get::<Option<i64>, _>("exit_code").map(|c| c as i32),
            duration_ms: r.get("duration_ms"),
            timed_out: r.get::<i64, _>("timed_out") != 0,
            output_preview: r.get("output_preview"),
            created_at: r.get("created_at"),
        })
        .collect())
}
