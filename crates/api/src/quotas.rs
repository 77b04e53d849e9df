//! Quota profiles, their assignments and usage (`/quota-profiles`), and accounting
//! (`GET /v1/accounting/usage`).

use serde::{Deserialize, Deserializer, Serialize};

/// Keeps "absent" (`None`) apart from "null" (`Some(None)`): on a profile, null means no cap
/// (or the platform default for `tenant_id`) while absent means unchanged or the default.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /quota-profiles`. Every cap is optional; absent or `null` means no cap.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateQuotaProfile {
    /// 1–128 characters, not all white space.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 128, pattern = r"[^\s\u0085]")
    )]
    pub name: String,
    /// At most 1024 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 1024))]
    pub description: Option<String>,
    /// Absent: the caller's tenant. `null`: the platform default (`scaibunker:admin:platform`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub tenant_id: Option<Option<String>>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub max_concurrent_bunkers: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub max_persistent_bunkers: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub max_cpu_millicores: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub max_memory_mb: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub max_disk_mb: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub max_gpu_count: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub per_bunker_max_cpu: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub per_bunker_max_memory: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub per_bunker_max_disk: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub per_bunker_max_gpu: Option<u64>,
    /// MiB the tenant of whoever the profile applies to may keep in object storage: its
    /// snapshots, images and spilled exec outputs together (bucket `tenant:{id}`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 1125899906842624.0))]
    pub max_storage_mb: Option<u64>,
}

/// `PATCH /quota-profiles/{id}`: absent fields stay, `null` removes a cap.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateQuotaProfile {
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 128, pattern = r"[^\s\u0085]")
    )]
    pub name: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, max_length = 1024))]
    pub description: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub max_concurrent_bunkers: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub max_persistent_bunkers: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub max_cpu_millicores: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub max_memory_mb: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub max_disk_mb: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub max_gpu_count: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub per_bunker_max_cpu: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub per_bunker_max_memory: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub per_bunker_max_disk: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub per_bunker_max_gpu: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, maximum = 1125899906842624.0))]
    pub max_storage_mb: Option<Option<u64>>,
}

/// A quota profile; `null` caps are no cap, `tenant_id: null` is the platform default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuotaProfile {
    pub id: String,
    pub tenant_id: Option<String>,
    /// Who made it: `platform` (a platform admin: a default, or a grant to a tenant that lifts
    /// the default) or `tenant` (a tenant admin: it only narrows what the platform set).
    pub origin: ProfileOrigin,
    pub name: String,
    pub description: Option<String>,
    pub max_concurrent_bunkers: Option<u64>,
    pub max_persistent_bunkers: Option<u64>,
    pub max_cpu_millicores: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub max_disk_mb: Option<u64>,
    pub max_gpu_count: Option<u64>,
    pub per_bunker_max_cpu: Option<u64>,
    pub per_bunker_max_memory: Option<u64>,
    pub per_bunker_max_disk: Option<u64>,
    pub per_bunker_max_gpu: Option<u64>,
    /// MiB of object storage (snapshots, images, spilled exec outputs) for the whole tenant.
    pub max_storage_mb: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ProfileOrigin {
    Platform,
    Tenant,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    User,
    Group,
    /// Every user of the profile's tenant (`target_id` is the tenant id; mode `per_user`).
    Tenant,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AssignmentMode {
    /// A user's own bucket (`target_kind: user` only).
    Individual,
    /// One bucket shared by every member of the group and its nested groups.
    Shared,
    /// Each member of the group (and its nested groups), or each user of the tenant, gets its
    /// own copy.
    PerUser,
}

/// `POST /quota-profiles/{id}/assignments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateAssignment {
    pub target_kind: TargetKind,
    pub target_id: String,
    pub mode: AssignmentMode,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub id: String,
    pub profile_id: String,
    pub tenant_id: String,
    pub target_kind: TargetKind,
    pub target_id: String,
    pub mode: AssignmentMode,
    pub created_at: String,
}

/// One row of `GET /quota-profiles/usage`: a profile's cap on one resource of one bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuotaUsage {
    pub profile_id: String,
    /// `user:{user_id}` or `group:{group_id}`; `tenant:{tenant_id}` for `storage_mb`.
    pub bucket: String,
    /// `concurrent_bunkers`, `persistent_bunkers`, `cpu_millicores`, `memory_mb`, `disk_mb`,
    /// `gpu_count` or `storage_mb` (MiB stored, rounded up).
    pub resource: String,
    pub current: i64,
    /// `null`: no cap.
    pub cap: Option<u64>,
    /// `null` when there is no cap; never below zero.
    pub remaining: Option<u64>,
}

/// One row of `GET /v1/accounting/usage`; the grouping columns not asked for are `null`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccountingUsage {
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    /// Start of the period (RFC 3339) when grouped by `hour` or `day`.
    pub period_start: Option<String>,
    pub cpu_millicore_seconds: i64,
    pub memory_mb_seconds: i64,
    pub disk_mb_seconds: i64,
    pub gpu_seconds: i64,
    /// How many per-bunker usage ticks the row sums.
    pub ticks: i64,
}
