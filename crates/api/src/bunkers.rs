//! Bunker create request and record.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LifecycleMode {
    #[default]
    Ephemeral,
    Session,
    Persistent,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NetworkProfile {
    #[default]
    Isolated,
    Registry,
    Allowlisted,
    Unrestricted,
    Transit,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SessionType {
    #[default]
    Standalone,
    Scaicore,
    Scaiwave,
    Api,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub if_name: String,
    pub bridge_name: String,
    #[serde(default = "default_true")]
    pub spoof_guard: bool,
    #[serde(default)]
    pub mac: Option<String>,
}

fn default_true() -> bool {
    true
}

/// `POST /bunkers`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateBunker {
    /// Image name or id. Required unless `snapshot_id` is given.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub snapshot_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub lifecycle_mode: Option<LifecycleMode>,
    #[serde(default)]
    pub network_profile: Option<NetworkProfile>,
    #[serde(default)]
    pub network_allowlist: Option<Vec<String>>,
    #[serde(default)]
    pub cpu_millicores: Option<u64>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub disk_mb: Option<u64>,
    #[serde(default)]
    pub gpu_count: Option<u64>,
    #[serde(default)]
    pub gpu_type: Option<String>,
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    #[serde(default)]
    pub session_type: Option<SessionType>,
    #[serde(default)]
    pub session_ref: Option<String>,
    #[serde(default)]
    pub label_set: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub interfaces: Option<Vec<Interface>>,
    #[serde(default)]
    pub bandwidth_mbit: Option<u64>,
    #[serde(default)]
    pub wait: Option<bool>,
}

/// The bunker record. `env_vars` are never echoed back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bunker {
    pub id: String,
    pub tenant_id: String,
    pub owner_id: String,
    pub name: Option<String>,
    pub image: String,
    pub image_id: String,
    pub snapshot_id: Option<String>,
    pub lifecycle_mode: LifecycleMode,
    pub status: String,
    pub network_profile: NetworkProfile,
    pub network_allowlist: Vec<String>,
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub gpu_count: u64,
    pub gpu_type: Option<String>,
    pub max_lifetime_s: Option<u64>,
    pub idle_timeout_s: u64,
    pub session_type: SessionType,
    pub session_ref: Option<String>,
    pub label_set: BTreeMap<String, String>,
    pub interfaces: Vec<Interface>,
    pub bandwidth_mbit: Option<u64>,
    pub worker_id: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub last_activity_at: Option<String>,
    pub terminated_at: Option<String>,
}
