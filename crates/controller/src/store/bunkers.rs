//! Bunker rows. Status changes are compare-and-set on the current status, so two writers racing
//! (a delete against a finishing boot) never both win.

use sqlx::AssertSqlSafe;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, Tx};

/// One bunker as stored. JSON columns stay text here; the service decodes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BunkerRow {
    pub id: String,
    pub tenant_id: String,
    pub owner_id: String,
    pub name: Option<String>,
    pub image_name: String,
    pub image_id: String,
    pub snapshot_id: Option<String>,
    pub lifecycle_mode: String,
    pub status: String,
    pub network_profile: String,
    pub network_allowlist: String,
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub gpu_count: i64,
    pub gpu_type: Option<String>,
    pub max_lifetime_s: Option<i64>,
    pub idle_timeout_s: i64,
    pub session_type: String,
    pub session_ref: Option<String>,
    pub label_set: String,
    pub env_vars: String,
    pub interfaces: String,
    pub bandwidth_mbit: Option<i64>,
    pub worker_id: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub last_activity_at: Option<i64>,
    pub terminated_at: Option<i64>,
}

pub(super) const COLUMNS: &str = "id, tenant_id, owner_id, name, image_name, image_id, snapshot_id, \
    lifecycle_mode, status, network_profile, network_allowlist, cpu_millicores, memory_mb, disk_mb, \
    gpu_count, gpu_type, max_lifetime_s, idle_timeout_s, session_type, session_ref, label_set, \
    env_vars, interfaces, bandwidth_mbit, worker_id, failure_reason, created_at, started_at, \
    last_activity_at, terminated_at";

pub(super) fn from_row(r: &AnyRow) -> BunkerRow {
    BunkerRow {
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        owner_id: r.get("owner_id"),
        name: r.get("name"),
        image_name: r.get("image_name"),
        image_id: r.get("image_id"),
        snapshot_id: r.get("snapshot_id"),
        lifecycle_mode: r.get("lifecycle_mode"),
        status: r.get("status"),
        network_profile: r.get("network_profile"),
        network_allowlist: r.get("network_allowlist"),
        cpu_millicores: r.get("cpu_millicores"),
        memory_mb: r.get("memory_mb"),
        disk_mb: r.get("disk_mb"),
        gpu_count: r.get("gpu_count"),
        gpu_type: r.get("gpu_type"),
        max_lifetime_s: r.get("max_lifetime_s"),
        idle_timeout_s: r.get("idle_timeout_s"),
        session_type: r.get("session_type"),
        session_ref: r.get("session_ref"),
        label_set: r.get("label_set"),
        env_vars: r.get("env_vars"),
        interfaces: r.get("interfaces"),
        bandwidth_mbit: r.get("bandwidth_mbit"),
        worker_id: r.get("worker_id"),
        failure_reason: r.get("failure_reason"),
        created_at: r.get("created_at"),
        started_at: r.get("started_at"),
        last_activity_at: r.get("last_activity_at"),
        terminated_at: r.get("terminated_at"),
    }
}

/// Filters of a bunker listing.
#[derive(Debug, Clone, Default)]
pub struct BunkerFilter {
    pub status: Option<String>,
    pub lifecycle_mode: Option<String>,
    /// `key=value` pairs that must all be in the label set.
    pub labels: Vec<(String, String)>,
}

/// Keyset position: rows strictly older than `(created_at, id)`.
#[derive(Debug, Clone)]
pub struct Cursor {
    pub created_at: i64,
    pub id: String,
}

/// A status change: the row moves to `to` only if it is currently in one of `from`.
pub struct StatusChange<'a> {
    pub from: &'a [&'a str],
    pub to: &'a str,
    pub failure_reason: Option<&'a str>,
    pub started_at: Option<i64>,
    pub terminated_at: Option<i64>,
}

pub async fn insert(tx: &mut Tx<'_>, b: &BunkerRow) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO bunkers ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
         ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )))
    .bind(&b.id)
    .bind(&b.tenant_id)
    .bind(&b.owner_id)
    .bind(&b.name)
    .bind(&b.image_name)
    .bind(&b.image_id)
    .bind(&b.snapshot_id)
    .bind(&b.lifecycle_mode)
    .bind(&b.status)
    .bind(&b.network_profile)
    .bind(&b.network_allowlist)
    .bind(b.cpu_millicores)
    .bind(b.memory_mb)
    .bind(b.disk_mb)
    .bind(b.gpu_count)
    .bind(&b.gpu_type)
    .bind(b.max_lifetime_s)
    .bind(b.idle_timeout_s)
    .bind(&b.session_type)
    .bind(&b.session_ref)
    .bind(&b.label_set)
    .bind(&b.env_vars)
    .bind(&b.interfaces)
    .bind(b.bandwidth_mbit)
    .bind(&b.worker_id)
    .bind(&b.failure_reason)
    .bind(b.created_at)
    .bind(b.started_at)
    .bind(b.last_activity_at)
    .bind(b.terminated_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Applies a compare-and-set status change inside `tx`. Returns whether the row moved.
pub async fn change_status(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    id: &str,
    change: &StatusChange<'_>,
) -> Result<bool, StoreError> {
    let placeholders = vec!["?"; change.from.len()].join(", ");
    let sql = format!(
        "UPDATE bunkers SET status = ?, \
         failure_reason = COALESCE(?, failure_reason), \
         started_at = COALESCE(?, started_at), \
         terminated_at = COALESCE(?, terminated_at) \
         WHERE tenant_id = ? AND id = ? AND status IN ({placeholders})"
    );
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(change.to)
        .bind(change.failure_reason)
        .bind(change.started_at)
        .bind(change.terminated_at)
        .bind(tenant_id)
        .bind(id);
    for s in change.from {
        q = q.bind(*s);
    }
    Ok(q.execute(&mut **tx).await?.rows_affected() == 1)
}

/// The condition under which a bunker counts as idle at `now` (bind `now` twice): no activity
/// for `idle_timeout_s`, and no controller marked it busy past `now` (see `mark_busy`).
pub(super) const IDLE_AT: &str = "COALESCE(last_activity_at, started_at, created_at) \
    + idle_timeout_s * 1000 < ? AND (busy_until IS NULL OR busy_until < ?)";

/// Marks a live bunker busy (an exec runs or a shell is open in it) until `until`, never
/// moving an earlier mark back, and records `now` as its last activity.
pub async fn mark_busy(
    store: &Store,
    tenant_id: &str,
    id: &str,
    now: i64,
    until: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE bunkers SET last_activity_at = ?, \
         busy_until = CASE WHEN busy_until IS NULL OR busy_until < ? THEN ? ELSE busy_until END \
         WHERE tenant_id = ? AND id = ? AND status NOT IN ('terminated', 'failed')",
    )
    .bind(now)
    .bind(until)
    .bind(until)
    .bind(tenant_id)
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}

pub async fn touch_activity(
    tx: &mut Tx<'_>,
    tenant_id: &str,
    id: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE bunkers SET last_activity_at = ? WHERE tenant_id = ? AND id = ?")
        .bind(now_ms)
        .bind(tenant_id)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A value bound to a listing query.
pub(super) enum Bind {
    Text(String),
    Int(i64),
}

/// Appends `WHERE`-clause conditions for `filter` and `cursor`, returning the bind values in order.
pub(super) fn filter_sql(
    filter: &BunkerFilter,
    cursor: Option<&Cursor>,
    sql: &mut String,
) -> Vec<Bind> {
    let mut binds = Vec::new();
    if let Some(s) = &filter.status {
        sql.push_str(" AND status = ?");
        binds.push(Bind::Text(s.clone()));
    }
    if let Some(m) = &filter.lifecycle_mode {
        sql.push_str(" AND lifecycle_mode = ?");
        binds.push(Bind::Text(m.clone()));
    }
    for (k, v) in &filter.labels {
        // Labels are stored as compact JSON (`{"k":"v",…}`); matching the encoded pair as a
        // substring is exact (quotes inside keys and values are escaped) and portable across
        // SQLite and MariaDB, whose JSON functions differ.
        sql.push_str(" AND label_set LIKE ? ESCAPE '!'");
        let pair = format!(
            "{}:{}",
            serde_json::Value::String(k.clone()),
            serde_json::Value::String(v.clone())
        );
        let escaped = pair
            .replace('!', "!!")
            .replace('%', "!%")
            .replace('_', "!_");
        binds.push(Bind::Text(format!("%{escaped}%")));
    }
    if let Some(c) = cursor {
        sql.push_str(" AND (created_at < ? OR (created_at = ? AND id < ?))");
        binds.push(Bind::Int(c.created_at));
        binds.push(Bind::Int(c.created_at));
        binds.push(Bind::Text(c.id.clone()));
    }
    binds
}

impl Store {
    pub async fn bunker(&self, tenant_id: &str, id: &str) -> Result<Option<BunkerRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM bunkers WHERE tenant_id = ? AND id = ?"
        )))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(from_row))
    }

    /// Newest first, at most `limit` rows.
    pub async fn bunkers(
        &self,
        tenant_id: &str,
        filter: &BunkerFilter,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<BunkerRow>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM bunkers WHERE tenant_id = ?");
        let binds = filter_sql(filter, cursor, &mut sql);
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(tenant_id);
        for b in &binds {
            q = bind(q, b);
        }
        let rows = q.bind(limit as i64).fetch_all(self.pool()).await?;
        Ok(rows.iter().map(from_row).collect())
    }
}

pub(super) fn bind<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    value: &Bind,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    match value {
        Bind::Text(s) => q.bind(s.clone()),
        Bind::Int(n) => q.bind(*n),
    }
}
