//! Worker records (`GET /workers`, admin).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerCapacity {
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub gpu_count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Worker {
    pub id: String,
    pub name: String,
    pub url: String,
    pub runtime: String,
    /// `online`, `offline`, `draining` or `stopping` (a planned stop until it registers again).
    pub status: String,
    pub capacity: WorkerCapacity,
    pub free: WorkerCapacity,
    pub active_bunkers: u64,
    pub cached_images: Vec<String>,
    pub registered_at: String,
    pub last_heartbeat: String,
}

/// `POST /bridges` (`scaibunker:admin`): a host bridge the worker offers to `transit` bunkers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateBridge {
    /// The bridge's interface name on the worker host: 1–15 of `A-Z a-z 0-9 . _ -`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._-]{1,15}$"))]
    pub name: String,
    pub worker_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bridge {
    pub id: String,
    pub name: String,
    pub worker_id: String,
    pub created_at: String,
}
