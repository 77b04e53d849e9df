//! Images (`/images`) and availability groups (`/availability-groups`).

use serde::{Deserialize, Serialize};

/// Where an image's bytes come from. Only `tar` and `ext4` are accepted: the bytes are then
/// uploaded with `PUT /images/{id}/content`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    /// `tar` (an uncompressed tarball of the root filesystem, baked into ext4) or `ext4` (a
    /// ready ext4 filesystem). `oci` is refused with `IMAGE_SOURCE_UNSUPPORTED`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^(tar|ext4)$"))]
    pub kind: String,
}

/// `POST /images`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    /// 1–64 characters of `a-z 0-9 . _ -`, starting with a letter or digit, not shaped like
    /// an id (three letters and `_`, like `img_…`).
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(?![a-z]{3}_.)[a-z0-9][a-z0-9._-]{0,63}$")
    )]
    pub name: String,
    pub source: ImageSource,
    /// Size of the baked ext4 filesystem, 16–65536 MiB (default 1024). A tarball that does
    /// not fit fails the bake; an uploaded ext4 may not be larger.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 16, maximum = 65536))]
    pub size_mib: Option<u64>,
    /// `tenant` (default), `partner` (every tenant of the caller's partner) or `platform`
    /// (every tenant; `scaibunker:admin:platform`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^(tenant|partner|platform)$"))]
    pub scope: Option<String>,
    /// Place bunkers on workers that do not hold the image yet; they fetch it first.
    #[serde(default)]
    pub lazy_pull: Option<bool>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000000000))]
    pub default_cpu_millicores: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000000000))]
    pub default_memory_mb: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000000000))]
    pub default_disk_mb: Option<u64>,
}

/// How far an image has spread: workers of its availability groups (or the warmed workers)
/// by the state of their cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WarmCounts {
    /// Asked to fetch it, not there yet.
    pub queued: u64,
    /// Holding it, verified.
    pub ready: u64,
    /// The fetch failed (see the worker states on `GET /images/{id}`).
    pub failed: u64,
    /// In one of the image's groups but offline or draining, so not asked.
    pub skipped: u64,
}

/// One worker's cache state for an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageWorkerState {
    pub worker_id: String,
    /// `queued`, `ready` or `failed`.
    pub state: String,
    pub error: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Image {
    pub id: String,
    pub name: String,
    /// `null` for platform images.
    pub tenant_id: Option<String>,
    /// `tenant`, `partner` or `platform`.
    pub scope: String,
    /// `pending` (waiting for content), `baking`, `ready`, `failed` or `inactive`.
    pub status: String,
    /// `tar`, `ext4`, or `null` for images workers ship prebuilt.
    pub source_kind: Option<String>,
    /// Of the ext4 bytes bunkers boot, lowercase hex; set once ready.
    pub sha256: Option<String>,
    pub size_bytes: Option<u64>,
    pub size_mib: Option<u64>,
    pub lazy_pull: bool,
    pub default_cpu_millicores: Option<u64>,
    pub default_memory_mb: Option<u64>,
    pub default_disk_mb: Option<u64>,
    /// Why baking failed.
    pub error: Option<String>,
    pub warm: WarmCounts,
    /// Per-worker cache states (`GET /images/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<ImageWorkerState>>,
    pub created_at: String,
}

/// `POST /availability-groups` (`scaibunker:admin:platform`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateAvailabilityGroup {
    /// 1–64 characters of `a-z 0-9 . _ -`, starting with a letter or digit, not shaped like
    /// an id; unique.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(?![a-z]{3}_.)[a-z0-9][a-z0-9._-]{0,63}$")
    )]
    pub name: String,
    /// At most 1024 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 1024))]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AvailabilityGroup {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub worker_ids: Vec<String>,
    pub image_ids: Vec<String>,
    pub created_at: String,
}
