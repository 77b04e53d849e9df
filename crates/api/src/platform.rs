//! Platform routes (`/v1/tenants`, `/v1/users`, `/v1/groups`, `/v1/api-keys`): the minimal
//! ScaiGrid core ScaiBunker needs.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1–128 characters, not all white space.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 128, pattern = r"[^\s\u0085]")
    )]
    pub name: String,
    /// 1–63 of `a-z`, `0-9` and `-`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9-]{1,63}$"))]
    pub slug: String,
    #[serde(default)]
    pub partner_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub partner_id: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    SuperAdmin,
    TenantAdmin,
    TenantUser,
    TenantViewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SuperAdmin => "super_admin",
            Self::TenantAdmin => "tenant_admin",
            Self::TenantUser => "tenant_user",
            Self::TenantViewer => "tenant_viewer",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// An e-mail address: at most 254 characters with an `@` inside, no white space; stored
    /// lower-cased.
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 254, pattern = r"^[^@\s\u0085]\S*@\S*[^@\s\u0085]$")
    )]
    pub email: String,
    pub tenant_id: String,
    pub role: Role,
    /// Extra `scaibunker:*` permissions on top of the role's.
    #[serde(default)]
    pub module_permissions: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct User {
    pub id: String,
    pub tenant_id: String,
    pub email: String,
    pub role: String,
    pub module_permissions: Vec<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// 1–128 characters, not all white space.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 128, pattern = r"[^\s\u0085]")
    )]
    pub name: String,
    #[serde(default)]
    pub parent_group_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Group {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub parent_group_id: Option<String>,
    pub members: Vec<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub user_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// 1–128 characters, not all white space.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 128, pattern = r"[^\s\u0085]")
    )]
    pub name: String,
    /// Defaults to the caller; another user of the tenant needs `scaibunker:admin:tenant`.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Narrows the key to these permissions (each must be one the user holds).
    #[serde(default)]
    pub permissions: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKey {
    pub id: String,
    pub tenant_id: String,
    pub user_id: String,
    pub name: String,
    pub permissions: Option<Vec<String>>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// The answer to `POST /v1/api-keys`: the only time `key` is shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKeyCreated {
    pub id: String,
    pub key: String,
    pub user_id: String,
    pub name: String,
    pub permissions: Option<Vec<String>>,
}
