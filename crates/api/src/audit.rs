//! Audit events (`GET /v1/audit-log`, `GET /v1/modules/scaibunker/audit`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEvent {
    pub id: String,
    pub time: String,
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
