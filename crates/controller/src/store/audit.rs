//! Audit events. Written inside the transaction of the change they record, so a change and its
//! audit row commit or roll back together.

use super::{StoreError, Tx};

#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub id: String,
    pub time_ms: i64,
    pub tenant_id: Option<String>,
    pub actor_id: Option<String>,
    pub actor_type: &'static str,
    pub action: &'static str,
    pub resource_type: &'static str,
    pub resource_id: Option<String>,
    pub status: &'static str,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub details: serde_json::Value,
}

pub async fn insert(tx: &mut Tx<'_>, e: &AuditEvent) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (id, time, tenant_id, actor_id, actor_type, action, resource_type, \
         resource_id, status, ip, request_id, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&e.id)
    .bind(e.time_ms)
    .bind(&e.tenant_id)
    .bind(&e.actor_id)
    .bind(e.actor_type)
    .bind(e.action)
    .bind(e.resource_type)
    .bind(&e.resource_id)
    .bind(e.status)
    .bind(&e.ip)
    .bind(&e.request_id)
    .bind(e.details.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An audit event as read back.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: String,
    pub time_ms: i64,
    pub tenant_id: Option<String>,
    pub actor_id: Option<String>,
    pub actor_type: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub status: String,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub details: serde_json::Value,
}

/// Filters of an audit listing; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub action: Option<String>,
    pub actor_id: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub status: Option<String>,
}

/// Audit events newest first. `tenant_id` `None` reads every tenant (platform admins only;
/// the caller checks).
pub async fn list(
    store: &super::Store,
    tenant_id: Option<&str>,
    filter: &AuditFilter,
    before: Option<(i64, &str)>,
    limit: u32,
) -> Result<Vec<AuditRecord>, StoreError> {
    use sqlx::Row;
    let mut sql = String::from(
        "SELECT id, time, tenant_id, actor_id, actor_type, action, resource_type, resource_id, \
         status, ip, request_id, details FROM audit_events WHERE 1 = 1",
    );
    let mut texts: Vec<String> = Vec::new();
    let mut ints: Vec<i64> = Vec::new();
    // Order of binds: texts and ints are interleaved as the clauses are added.
    let mut order: Vec<bool> = Vec::new(); // true = text
    let mut text = |sql: &mut String, clause: &str, v: &str| {
        sql.push_str(clause);
        texts.push(v.to_owned());
        order.push(true);
    };
    if let Some(t) = tenant_id {
        text(&mut sql, " AND tenant_id = ?", t);
    }
    for (clause, v) in [
        (" AND action = ?", &filter.action),
        (" AND actor_id = ?", &filter.actor_id),
        (" AND resource_type = ?", &filter.resource_type),
        (" AND resource_id = ?", &filter.resource_id),
        (" AND status = ?", &filter.status),
    ] {
        if let Some(v) = v {
            text(&mut sql, clause, v);
        }
    }
    if let Some(s) = filter.start_ms {
        sql.push_str(" AND time >= ?");
        ints.push(s);
        order.push(false);
    }
    if let Some(e) = filter.end_ms {
        sql.push_str(" AND time < ?");
        ints.push(e);
        order.push(false);
    }
    if let Some((ms, id)) = before {
        sql.push_str(" AND (time < ? OR (time = ? AND id < ?))");
        ints.push(ms);
        order.push(false);
        ints.push(ms);
        order.push(false);
        texts.push(id.to_owned());
        order.push(true);
    }
    sql.push_str(" ORDER BY time DESC, id DESC LIMIT ?");
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    let (mut ti, mut ii) = (texts.into_iter(), ints.into_iter());
    for is_text in order {
        q = if is_text {
            q.bind(ti.next().expect("one text per text clause"))
        } else {
            q.bind(ii.next().expect("one int per int clause"))
        };
    }
    let rows = q.bind(limit as i64).fetch_all(store.pool()).await?;
    Ok(rows
        .iter()
        .map(|r| AuditRecord {
            id: r.get("id"),
            time_ms: r.get("time"),
            tenant_id: r.get("tenant_id"),
            actor_id: r.get("actor_id"),
            actor_type: r.get("actor_type"),
            action: r.get("action"),
            resource_type: r.get("resource_type"),
            resource_id: r.get("resource_id"),
            status: r.get("status"),
            ip: r.get("ip"),
            request_id: r.get("request_id"),
            details: serde_json::from_str(&r.get::<String, _>("details"))
                .unwrap_or(serde_json::Value::Null),
        })
        .collect())
}
