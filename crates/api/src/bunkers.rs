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
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub image: Option<String>,
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// 1–128 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub name: Option<String>,
    #[serde(default)]
    pub lifecycle_mode: Option<LifecycleMode>,
    /// Only `isolated` on this release; the other profiles (`registry`, `allowlisted`,
    /// `unrestricted`, `transit`) are refused with `VALIDATION_ERROR` until bunker networking
    /// lands.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, pattern = "^isolated$"))]
    pub network_profile: Option<NetworkProfile>,
    /// Only with `allowlisted` (not available yet): empty.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 0))]
    pub network_allowlist: Option<Vec<String>>,
    /// 100–64,000.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 100, maximum = 64000))]
    pub cpu_millicores: Option<u64>,
    /// 64–262,144.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 64, maximum = 262144))]
    pub memory_mb: Option<u64>,
    /// 64–1,048,576, and at least the image's (or the snapshot's) disk.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 64, maximum = 1048576))]
    pub disk_mb: Option<u64>,
    /// 0–16.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 16))]
    pub gpu_count: Option<u64>,
    /// At most 64 bytes.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 16))]
    pub gpu_type: Option<String>,
    /// Seconds, 1 to 2,592,000 (30 days).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2592000))]
    pub max_lifetime_s: Option<u64>,
    /// Seconds, 1 to 2,592,000 (30 days).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2592000))]
    pub idle_timeout_s: Option<u64>,
    #[serde(default)]
    pub session_type: Option<SessionType>,
    /// At most 256 bytes.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub session_ref: Option<String>,
    #[serde(default)]
    pub label_set: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Only with `transit` (not available yet): empty.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 0))]
    pub interfaces: Option<Vec<Interface>>,
    /// 1–10,000.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10000))]
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
