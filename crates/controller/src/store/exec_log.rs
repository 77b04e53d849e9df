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
