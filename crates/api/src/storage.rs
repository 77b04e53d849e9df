//! Storage proxy routes: `PUT|GET|HEAD|DELETE /storage/objects/{key…}` and
//! `POST /storage/capabilities`.

use serde::{Deserialize, Serialize};

/// What a capability token allows on the objects under its prefix.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StorageVerb {
    /// Read an object (`GET`, and `HEAD`).
    Get,
    /// Read an object's metadata (`HEAD`).
    Head,
    /// Write an object (`PUT`).
    Put,
    /// Remove an object (`DELETE`).
    Delete,
}

/// `POST /storage/capabilities`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateCapability {
    /// Key prefix the token covers, ending in `/` (`tenants/tnt_…/images/`). Callers without
    /// `scaibunker:admin:platform` may only name prefixes under `tenants/{their tenant id}/`.
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^([A-Za-z0-9_=-][A-Za-z0-9._=-]{0,199}/)+$",
            max_length = 1024
        )
    )]
    pub prefix: String,
    /// At least one verb.
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub verbs: Vec<StorageVerb>,
    /// Lifetime in seconds, 1 to 86400.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
    pub ttl_s: u64,
}

/// A minted capability token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capability {
    /// `cap_…`: what `DELETE /storage/capabilities/{id}` revokes.
    pub id: String,
    /// Send as `Authorization: Bearer <token>` to the object routes.
    pub token: String,
    pub prefix: String,
    pub verbs: Vec<StorageVerb>,
    pub expires_at: String,
}

/// The result of `PUT /storage/objects/{key}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ObjectWritten {
    pub key: String,
    pub size_bytes: u64,
    /// SHA-256 of the bytes received, lowercase hex.
    pub sha256: String,
    /// The store's version tag of the object (also the `ETag` of `GET` and `HEAD`).
    pub etag: String,
}
