//! Snapshot request and record: `POST /bunkers/{id}/snapshot`, `/snapshots`.

use serde::{Deserialize, Serialize};

/// What a snapshot captures.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// The root disk; a restore boots it (processes start fresh, files are kept).
    Disk,
    /// Memory and device state plus the disk; a restore resumes the running processes.
    #[default]
    Full,
}

/// `POST /bunkers/{id}/snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// `full` (default) or `disk`.
    #[serde(default)]
    pub kind: Option<SnapshotKind>,
    /// Seconds until the cleanup job deletes the snapshot (1 to 315 360 000); absent: kept
    /// until deleted.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315360000))]
    pub expires_in_s: Option<u64>,
}

/// The snapshot record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    pub id: String,
    pub bunker_id: String,
    pub tenant_id: String,
    /// `pending` (being captured), `ready` (restorable) or `failed`.
    pub status: String,
    pub kind: SnapshotKind,
    /// Bytes stored in object storage (0 until ready).
    pub size_bytes: u64,
    pub created_at: String,
    pub expires_at: Option<String>,
}
