//! Authentication (bearer API keys and JWTs) and permissions.
//!
//! API keys are `sgk_` + 40 random alphanumerics, stored only as their SHA-256. A key carries
//! its user's permissions (from the role and the user's module permissions), optionally
//! narrowed at creation. Revocation is effective on the next request: every request looks the
//! key up.
//!
//! Powers come from the permissions evaluated on each request, never from the role string
//! alone: `scaibunker:admin:platform` is effective only on a `super_admin` user (whatever its
//! module permissions say), and reaching across tenants needs both `scaibunker:admin` and
//! `scaibunker:admin:platform` on the request ([`Principal::is_admin`]), so a key that names a
//! super admin but was narrowed to less holds only what it was narrowed to.
//!
//! Any other bearer token of three dot-separated parts is a JWT, verified like this:
//! 1. The header's `alg` picks the key: HS256 the configured secret, RS256 the configured public
//!    key. Any other algorithm (`none` included), or one whose key is not configured, is refused,
//!    and the verifier accepts only that one algorithm, so a key never serves another family.
//! 2. Signature, `exp` (required, 30 s leeway), `nbf` when present, and `iss`/`aud` as
//!    configured. A token carrying `aud` is refused unless an audience is configured
//!    (RFC 7519 §4.1.3).
//! 3. `sub` must be a user of the tenant named by `tenant_id`; the user is looked up on every
//!    request, like a key. Its permissions are the user's, narrowed by the `permissions` claim
//!    exactly as a narrowed key's are.
//!
//! Every refusal is the same `AuthError::Invalid`; the reason is only logged at debug level.

use std::collections::BTreeSet;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::Rng;
use rand::distr::Alphanumeric;
use scaibunker_core::ids::{ApiKeyId, AuditId, TenantId, UserId};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::random_bytes;
use crate::config::ControllerConfig;
use crate::store::audit::AuditEvent;
use crate::store::identity::{NewApiKey, NewTenant, NewUser};
use crate::store::{Store, StoreError, now_ms};

pub const CREATE: &str = "scaibunker:create";
pub const CREATE_SESSION: &str = "scaibunker:create:session";
pub const CREATE_PERSISTENT: &str = "scaibunker:create:persistent";
pub const EXECUTE: &str = "scaibunker:execute";
pub const SHELL: &str = "scaibunker:shell";
pub const FILES: &str = "scaibunker:files";
pub const ROOT: &str = "scaibunker:root";
pub const NETWORK_REGISTRY: &str = "scaibunker:network:registry";
pub const NETWORK_ALLOWLISTED: &str = "scaibunker:network:allowlisted";
pub const NETWORK_UNRESTRICTED: &str = "scaibunker:network:unrestricted";
pub const NETWORK_TRANSIT: &str = "scaibunker:network:transit";
pub const L2_TRANSPARENCY: &str = "scaibunker:l2_transparency";
pub const IMAGES_MANAGE: &str = "scaibunker:images:manage";
pub const ADMIN: &str = "scaibunker:admin";
pub const ADMIN_TENANT: &str = "scaibunker:admin:tenant";
pub const ADMIN_PLATFORM: &str = "scaibunker:admin:platform";

pub const ALL_PERMISSIONS: &[&str] = &[
    CREATE,
    CREATE_SESSION,
    CREATE_PERSISTENT,
    EXECUTE,
    SHELL,
    FILES,
    ROOT,
    NETWORK_REGISTRY,
    NETWORK_ALLOWLISTED,
    NETWORK_UNRESTRICTED,
    NETWORK_TRANSIT,
    L2_TRANSPARENCY,
    IMAGES_MANAGE,
    ADMIN,
    ADMIN_TENANT,
    ADMIN_PLATFORM,
];

/// The permissions a role grants, per API.md.
pub fn role_permissions(role: &str) -> BTreeSet<String> {
    let keys: Vec<&str> = match role {
        "super_admin" => ALL_PERMISSIONS.to_vec(),
        "tenant_admin" => ALL_PERMISSIONS
            .iter()
            .copied()
            .filter(|p| *p != ADMIN_PLATFORM)
            .collect(),
        "tenant_user" => vec![CREATE, EXECUTE, FILES, SHELL],
        // Viewers read only: `create` is the key that grants reading own bunkers and images;
        // the create route itself is refused to viewers by their role.
        "tenant_viewer" => vec![],
        _ => vec![],
    };
    keys.into_iter().map(str::to_owned).collect()
}

/// How far a role reaches, for "nobody acts for a user whose role outranks their own":
/// `super_admin` > `tenant_admin` > `tenant_user` > `tenant_viewer` (and unknown roles).
pub fn role_rank(role: &str) -> u8 {
    match role {
        "super_admin" => 3,
        "tenant_admin" => 2,
        "tenant_user" => 1,
        _ => 0,
    }
}

/// The permissions a request carries: the role's, the user's module permissions, narrowed by
/// the key (or the JWT's claim) when it was. `admin:platform` stays only on a super admin.
pub fn effective_permissions(
    role: &str,
    module_permissions: Option<&str>,
    narrowed: Option<&BTreeSet<String>>,
) -> BTreeSet<String> {
    let mut permissions = role_permissions(role);
    if let Some(extra) = parse_permissions(module_permissions) {
        permissions.extend(extra);
    }
    if role != "super_admin" {
        permissions.remove(ADMIN_PLATFORM);
    }
    if let Some(narrowed) = narrowed {
        permissions.retain(|p| narrowed.contains(p));
    }
    permissions
}

/// Whether a live key of a `super_admin` user, narrowed to `narrowed_json` (its stored
/// permissions), still holds every platform power: what the lock-out guard counts.
pub fn is_full_super_admin_key(narrowed_json: Option<&str>) -> bool {
    match narrowed_json {
        None => true,
        Some(_) => parse_permissions(narrowed_json)
            .is_some_and(|n| n.contains(ADMIN) && n.contains(ADMIN_PLATFORM)),
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant_id: String,
    pub user_id: String,
    pub key_id: String,
    pub role: String,
    pub permissions: BTreeSet<String>,
}

impl Principal {
    pub fn has(&self, permission: &str) -> bool {
        self.permissions.contains(permission)
    }

    /// Whether the caller reaches across tenants (every bunker, workers, other tenants'
    /// images): both admin permissions on this request. `admin:platform` is only ever
    /// effective for super admins (see [`effective_permissions`]).
    pub fn is_admin(&self) -> bool {
        self.has(ADMIN) && self.has(ADMIN_PLATFORM)
    }

    /// Read access: viewers and anyone holding `scaibunker:create`.
    pub fn can_read(&self) -> bool {
        self.role == "tenant_viewer" || self.has(CREATE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("token is invalid or revoked")]
    Invalid,
    #[error("looking up the api key failed")]
    Store(#[from] StoreError),
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub fn new_api_key() -> String {
    let body: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("sgk_{body}")
}

fn parse_permissions(json: Option<&str>) -> Option<BTreeSet<String>> {
    json.and_then(|j| serde_json::from_str::<BTreeSet<String>>(j).ok())
}

/// The caller behind a bearer token: an API key, or a JWT as `config` allows.
pub async fn authenticate(
    store: &Store,
    config: &ControllerConfig,
    token: Option<&str>,
) -> Result<Principal, AuthError> {
    let token = token.ok_or(AuthError::Missing)?;
    if token.starts_with("sgk_") {
        authenticate_key(store, token).await
    } else if looks_like_jwt(token) {
        authenticate_jwt(store, config, token).await
    } else {
        Err(AuthError::Invalid)
    }
}

async fn authenticate_key(store: &Store, token: &str) -> Result<Principal, AuthError> {
    if token.len() < 36 {
        return Err(AuthError::Invalid);
    }
    let row = store
        .api_key_by_hash(&hash_key(token))
        .await?
        .ok_or(AuthError::Invalid)?;
    let narrowed = parse_permissions(row.permissions.as_deref());
    let permissions = effective_permissions(
        &row.role,
        row.user_permissions.as_deref(),
        narrowed.as_ref(),
    );
    Ok(Principal {
        tenant_id: row.tenant_id,
        user_id: row.user_id,
        key_id: row.id,
        role: row.role,
        permissions,
    })
}

/// Clock skew tolerated on `exp` and `nbf`.
const JWT_LEEWAY_S: u64 = 30;

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
const MIN_HS256_SECRET_BYTES: usize = 32;

/// The claims ScaiBunker reads; others (`iat`, `iss`, `aud`, …) may be present.
#[derive(Debug, Deserialize)]
struct JwtClaims {
    sub: String,
    tenant_id: String,
    #[serde(default)]
    jti: Option<String>,
    /// Narrows the user's permissions; strings of other modules are simply not granted.
    #[serde(default)]
    permissions: Option<BTreeSet<String>>,
}

/// Why a JWT was refused; logged, never sent (the client sees `AUTH_TOKEN_INVALID`).
#[derive(Debug, thiserror::Error)]
enum JwtRejection {
    #[error("header is not a supported JWT header")]
    Header(#[source] jsonwebtoken::errors::Error),
    #[error("algorithm {0:?} is not configured")]
    AlgorithmNotConfigured(Algorithm),
    #[error("configured RS256 public key is not an RSA public key in PEM")]
    BadPublicKey(#[source] jsonwebtoken::errors::Error),
    #[error("signature or claims rejected")]
    Token(#[source] jsonwebtoken::errors::Error),
    #[error("user {sub} does not exist in tenant {tenant_id}")]
    UnknownUser { sub: String, tenant_id: String },
}

/// Three non-empty base64url parts separated by dots (a JWS in compact form).
fn looks_like_jwt(token: &str) -> bool {
    let mut parts = 0;
    for part in token.split('.') {
        let b64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if part.is_empty() || !part.chars().all(b64url) {
            return false;
        }
        parts += 1;
    }
    parts == 3
}

async fn authenticate_jwt(
    store: &Store,
    config: &ControllerConfig,
    token: &str,
) -> Result<Principal, AuthError> {
    let claims = verify_jwt(config, token).map_err(refuse)?;
    let user = store
        .user(&claims.tenant_id, &claims.sub)
        .await?
        .ok_or_else(|| {
            refuse(JwtRejection::UnknownUser {
                sub: claims.sub.clone(),
                tenant_id: claims.tenant_id.clone(),
            })
        })?;
    let permissions = effective_permissions(
        &user.role,
        user.module_permissions.as_deref(),
        claims.permissions.as_ref(),
    );
    // The rate limit is keyed by this: one window per token id, else per user.
    let handle = claims.jti.filter(|j| !j.is_empty()).unwrap_or(claims.sub);
    Ok(Principal {
        tenant_id: user.tenant_id,
        user_id: user.id,
        key_id: format!("jwt:{handle}"),
        role: user.role,
        permissions,
    })
}

fn refuse(why: JwtRejection) -> AuthError {
    tracing::debug!(reason = %why, "bearer jwt refused");
    AuthError::Invalid
}

/// Checks the signature and the registered claims; see the module docs for the rules.
fn verify_jwt(config: &ControllerConfig, token: &str) -> Result<JwtClaims, JwtRejection> {
    // An `alg` outside the enum (`none` among them) fails to parse here.
    let header = jsonwebtoken::decode_header(token).map_err(JwtRejection::Header)?;
    let key = match header.alg {
        Algorithm::HS256 => match config.jwt_hs256_secret.as_deref() {
            Some(secret) if secret.len() >= MIN_HS256_SECRET_BYTES => {
                DecodingKey::from_secret(secret.as_bytes())
            }
            Some(_) => {
                tracing::error!(
                    "SCAIBUNKER_JWT_HS256_SECRET is shorter than {MIN_HS256_SECRET_BYTES} bytes; \
                     HS256 tokens are refused"
                );
                return Err(JwtRejection::AlgorithmNotConfigured(header.alg));
            }
            None => return Err(JwtRejection::AlgorithmNotConfigured(header.alg)),
        },
        Algorithm::RS256 => match config.jwt_rs256_public_pem.as_deref() {
            Some(pem) => DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                tracing::error!(error = %e, "the configured RS256 public key cannot be read");
                JwtRejection::BadPublicKey(e)
            })?,
            None => return Err(JwtRejection::AlgorithmNotConfigured(header.alg)),
        },
        other => return Err(JwtRejection::AlgorithmNotConfigured(other)),
    };
    let mut validation = Validation::new(header.alg);
    validation.leeway = JWT_LEEWAY_S;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(iss) = &config.jwt_issuer {
        validation.set_issuer(&[iss]);
        required.push("iss");
    }
    if let Some(aud) = &config.jwt_audience {
        validation.set_audience(&[aud]);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    jsonwebtoken::decode::<JwtClaims>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(JwtRejection::Token)
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("configured bootstrap key must start with `sgk_` and hold at least 32 more characters")]
    BadConfiguredKey,
    #[error("writing the admin key to {path}")]
    WriteKey {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the platform tenant")]
    Store(#[from] StoreError),
}

/// On first start (no users), creates the platform tenant and a super admin with an API key:
/// the configured one, or a fresh one that is returned (to be printed once) and written to
/// `key_file` with mode 0600. Later starts return `None`.
pub async fn bootstrap(
    store: &Store,
    configured_key: Option<&str>,
    key_file: Option<&Path>,
) -> Result<Option<String>, BootstrapError> {
    if store.user_count().await? > 0 {
        return Ok(None);
    }
    let key = match configured_key {
        Some(k) if k.starts_with("sgk_") && k.len() >= 36 => k.to_owned(),
        Some(_) => return Err(BootstrapError::BadConfiguredKey),
        None => new_api_key(),
    };
    if let Some(path) = key_file {
        write_secret(path, &key).map_err(|source| BootstrapError::WriteKey {
            path: path.display().to_string(),
            source,
        })?;
    }
    let tenant_id = TenantId::from_random(random_bytes());
    let user_id = UserId::from_random(random_bytes());
    let key_id = ApiKeyId::from_random(random_bytes());
    store
        .insert_tenant_user_key(
            NewTenant {
                id: tenant_id.as_str(),
                name: "Platform",
                slug: "platform",
            },
            NewUser {
                id: user_id.as_str(),
                tenant_id: tenant_id.as_str(),
                email: "admin@localhost",
                role: "super_admin",
            },
            NewApiKey {
                id: key_id.as_str(),
                tenant_id: tenant_id.as_str(),
                user_id: user_id.as_str(),
                name: "bootstrap",
                key_sha256: &hash_key(&key),
                permissions: None,
            },
        )
        .await?;
    Ok(Some(key))
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverKeyError {
    #[error("the database holds no super admin; start the controller once to bootstrap one")]
    NoSuperAdmin,
    #[error("minting the recovery key")]
    Store(#[from] StoreError),
}

/// A key minted by [`recover_key`]; `key` is shown once.
#[derive(Debug, Clone)]
pub struct RecoveredKey {
    pub key: String,
    pub key_id: String,
    pub user_id: String,
    pub tenant_id: String,
}

/// `scaibunker admin recover-key`: a new full key for the oldest super admin, for an operator
/// who lost every super-admin key. It runs against the database directly (whoever can reach
/// it owns the installation anyway) and is audited as `api_key.recover` by the `system`.
pub async fn recover_key(store: &Store) -> Result<RecoveredKey, RecoverKeyError> {
    let user = store
        .admin_oldest_super_admin()
        .await?
        .ok_or(RecoverKeyError::NoSuperAdmin)?;
    let key = new_api_key();
    let key_id = ApiKeyId::from_random(random_bytes()).to_string();
    let event = AuditEvent {
        id: AuditId::from_random(random_bytes()).to_string(),
        time_ms: now_ms(),
        tenant_id: Some(user.tenant_id.clone()),
        actor_id: None,
        actor_type: "system",
        action: "api_key.recover",
        resource_type: "api_key",
        resource_id: Some(key_id.clone()),
        status: "success",
        ip: None,
        request_id: None,
        details: serde_json::json!({ "user_id": user.id, "name": "recovery" }),
    };
    store
        .insert_api_key(
            &NewApiKey {
                id: &key_id,
                tenant_id: &user.tenant_id,
                user_id: &user.id,
                name: "recovery",
                key_sha256: &hash_key(&key),
                permissions: None,
            },
            &event,
        )
        .await?;
    Ok(RecoveredKey {
        key,
        key_id,
        user_id: user.id,
        tenant_id: user.tenant_id,
    })
}

/// Writes a secret atomically with mode 0600 from the start (never world-readable).
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_to_api_md_permissions() {
        assert_eq!(role_permissions("super_admin").len(), ALL_PERMISSIONS.len());
        let ta = role_permissions("tenant_admin");
        assert!(ta.contains(ADMIN_TENANT) && !ta.contains(ADMIN_PLATFORM));
        let tu = role_permissions("tenant_user");
        let want: BTreeSet<String> = [CREATE, EXECUTE, FILES, SHELL]
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(tu, want);
        assert!(role_permissions("tenant_viewer").is_empty());
        assert!(role_permissions("nobody").is_empty());
    }

    #[test]
    fn admin_platform_is_effective_only_on_a_super_admin() {
        let extra = format!("[\"{ADMIN_PLATFORM}\"]");
        for role in ["tenant_admin", "tenant_user", "tenant_viewer", "nobody"] {
            let p = effective_permissions(role, Some(&extra), None);
            assert!(!p.contains(ADMIN_PLATFORM), "{role}");
        }
        assert!(effective_permissions("super_admin", None, None).contains(ADMIN_PLATFORM));
        let narrowed: BTreeSet<String> = [CREATE.to_owned()].into();
        assert_eq!(
            effective_permissions("super_admin", None, Some(&narrowed)),
            narrowed
        );
    }

    #[test]
    fn roles_rank_super_admin_over_tenant_admin_over_user_over_viewer() {
        let ranks: Vec<u8> = [
            "super_admin",
            "tenant_admin",
            "tenant_user",
            "tenant_viewer",
        ]
        .into_iter()
        .map(role_rank)
        .collect();
        assert_eq!(ranks, [3, 2, 1, 0]);
        assert_eq!(role_rank("made_up"), 0);
    }

    #[test]
    fn only_unnarrowed_or_fully_privileged_keys_are_full_super_admin_keys() {
        assert!(is_full_super_admin_key(None));
        let full = format!("[\"{ADMIN}\",\"{ADMIN_PLATFORM}\",\"{CREATE}\"]");
        assert!(is_full_super_admin_key(Some(&full)));
        assert!(!is_full_super_admin_key(Some(&format!("[\"{ADMIN}\"]"))));
        assert!(!is_full_super_admin_key(Some("not json")));
    }

    #[test]
    fn only_three_base64url_parts_look_like_a_jwt() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("a-_0.b.c"));
        for not in [
            "a.b", "a.b.c.d", "a.b.", ".b.c", "a..c", "a.b+.c", "a.b=.c", "a b.c.d", "",
        ] {
            assert!(!looks_like_jwt(not), "{not}");
        }
    }

    #[test]
    fn keys_have_the_documented_shape_and_hash_stably() {
        let k = new_api_key();
        assert!(k.starts_with("sgk_") && k.len() == 44);
        assert_ne!(k, new_api_key());
        assert_eq!(hash_key("sgk_x"), hash_key("sgk_x"));
        assert_eq!(hash_key("sgk_x").len(), 64);
    }
}
