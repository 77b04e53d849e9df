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
