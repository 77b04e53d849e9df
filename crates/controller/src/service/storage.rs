//! The storage proxy's use cases: who may touch which object, and capability tokens.
//!
//! Two credentials open the object routes, both verified with no database: a worker's own
//! credential (`scaibunker_proto::worker_auth`, minted by the controllers with the same
//! storage secret), which reads baked images (`images/{id}/rootfs.ext4`), reads and writes
//! snapshots (`snapshots/…`) and writes the egress audit batches of its own bunkers (only with
//! the database: see `service::egress`), and nothing else (no delete, no image sources, no exec
//! output, no tenant objects, no reading the audit); and a capability token:
//! 1. A token is `sbc1.<payload>.<mac>`: `payload` is base64url JSON
//!    `{"p": prefix, "v": [verbs], "exp": unix seconds}`, `mac` the base64url HMAC-SHA256 of
//!    `sbc1.<payload>` under the controller's storage secret (`SCAIBUNKER_STORAGE_SECRET`, the
//!    same on every controller and proxy).
//! 2. Verification checks the MAC in constant time first (a token anyone altered is
//!    `CAPABILITY_INVALID`), then the expiry (`CAPABILITY_EXPIRED`), then the verb
//!    (`CAPABILITY_VERB_DENIED`), then that the key lies under the prefix
//!    (`CAPABILITY_OUT_OF_SCOPE`).
//! 3. Prefixes end in `/` and keys are validated `ObjectKey`s (no `..`, no empty segment), so
//!    plain string-prefix matching cannot be tricked across a segment boundary.
//!
//! Minting needs `scaibunker:images:manage`; without `scaibunker:admin:platform` the prefix must
//! lie under `tenants/{caller tenant}/`, so a tenant admin cannot reach other tenants' objects.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use scaibunker_api::storage::{Capability, CreateCapability, StorageVerb};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use scaibunker_core::ids::AuditId;

use super::auth::{self, Principal};
use super::{RequestContext, Services, random_bytes};
use crate::objects::{KeyPrefix, ObjectKey, Objects};
use crate::store::audit::AuditEvent;
use crate::store::now_ms;

/// Every capability token starts with this (the version of its format).
pub const TOKEN_PREFIX: &str = "sbc1.";
/// Longest lifetime a capability may be minted with.
pub const MAX_TTL_S: u64 = 86_400;

/// What the object routes need: the store, the two credentials and the size cap. It holds no
/// database handle, so the proxy-only mode (`SCAIGRID_MODE=bunker_proxy`) runs on it alone.
#[derive(Clone)]
pub struct Storage {
    pub objects: Objects,
    secret: Arc<[u8]>,
    /// Largest object a `PUT` may store.
    pub max_object_bytes: u64,
    /// Where minted capabilities are recorded (the controllers' proxy): a token whose
    /// capability or minting key was revoked is refused. The proxy alone has none and takes a
    /// token until it expires.
    ledger: Option<crate::store::Store>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("max_object_bytes", &self.max_object_bytes)
            .finish_non_exhaustive()
    }
}

/// What a verified credential lets its bearer do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// A worker's credential: what workers need of the store (see the module doc).
    Worker {
        worker_id: String,
    },
    Capability(CapabilityClaims),
}

/// The signed content of a capability token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityClaims {
    #[serde(rename = "p")]
    pub prefix: String,
    #[serde(rename = "v")]
    pub verbs: Vec<StorageVerb>,
    /// Unix seconds.
    #[serde(rename = "exp")]
    pub expires_at: u64,
    /// The capability's id (`cap_…`), what a revocation names; every token the API mints has
    /// one. A token without one was signed straight with the storage secret (by whoever
    /// holds it) and cannot be revoked.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Why a request to the object routes was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageAuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the token is neither a worker credential nor a capability token")]
    Invalid,
    #[error("a worker credential does not allow {verb:?} on {key}")]
    WorkerDenied { verb: StorageVerb, key: String },
    #[error("this worker may not write the egress audit of bunker {bunker_id}: {why}")]
    AuditDenied {
        bunker_id: String,
        why: &'static str,
    },
    #[error(
        "a storage proxy without a database cannot tell which worker runs a bunker; write the \
         egress audit through a controller"
    )]
    AuditNeedsController,
    #[error("the capability token is malformed or its signature does not verify")]
    CapabilityInvalid,
    #[error("the capability token expired")]
    CapabilityExpired,
    #[error("the capability token does not allow {0:?}")]
    VerbDenied(StorageVerb),
    #[error("the key {key} is outside the capability's prefix {prefix:?}")]
    OutOfScope { key: String, prefix: String },
}

/// Why a request to the object routes was not authorized.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error(transparent)]
    Denied(#[from] StorageAuthError),
    #[error("looking up the bunker of an egress audit batch")]
    Store(#[from] crate::store::StoreError),
}

/// Why a verified capability is not taken.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("the capability, or the API key that minted it, was revoked")]
    Revoked,
    #[error("checking the capability failed")]
    Store(#[from] crate::store::StoreError),
}

/// Why a capability could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("minting storage capabilities needs {0}")]
    PermissionDenied(&'static str),
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

type HmacSha256 = Hmac<Sha256>;

/// Unix seconds now.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Storage {
    pub fn new(objects: Objects, secret: &[u8], max_object_bytes: u64) -> Self {
        Self {
            objects,
            secret: secret.into(),
            max_object_bytes,
            ledger: None,
        }
    }

    /// This proxy checks capabilities against the minted ones in `store`.
    pub fn with_ledger(mut self, store: crate::store::Store) -> Self {
        self.ledger = Some(store);
        self
    }

    /// Whether `grant` allows `verb` on `key`: [`authorize`], then, for a worker writing an
    /// egress audit batch, that the bunker is that worker's (`service::egress::may_write`),
    /// which only a proxy with the database can tell.
    pub async fn authorize(
        &self,
        grant: &Grant,
        verb: StorageVerb,
        key: &ObjectKey,
    ) -> Result<(), AuthorizeError> {
        authorize(grant, verb, key)?;
        let Grant::Worker { worker_id } = grant else {
            return Ok(());
        };
        let Some(bunker_id) = super::egress::audit_bunker(key.as_str()) else {
            return Ok(());
        };
        let ledger = self
            .ledger
            .as_ref()
            .ok_or(StorageAuthError::AuditNeedsController)?;
        let writers = ledger.admin_egress_writers(bunker_id).await?;
        super::egress::may_write(writers.as_ref(), bunker_id, worker_id, now_ms())?;
        Ok(())
    }

    /// Largest body a `PUT` to `key` may have.
    pub fn max_put_bytes(&self, key: &ObjectKey) -> u64 {
        match super::egress::audit_bunker(key.as_str()) {
            Some(_) => self.max_object_bytes.min(super::egress::MAX_OBJECT_BYTES),
            None => self.max_object_bytes,
        }
    }

    /// Whether a verified capability still holds: neither it nor its minting key revoked
    /// (only where there is a ledger; elsewhere until it expires).
    pub async fn check_revocation(&self, claims: &CapabilityClaims) -> Result<(), RevocationError> {
        let (Some(ledger), Some(id)) = (&self.ledger, &claims.id) else {
            return Ok(());
        };
        if ledger.capability_live(id).await? {
            Ok(())
        } else {
            Err(RevocationError::Revoked)
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC takes a key of any length")
    }

    /// Signs `claims` into a token.
    pub fn sign(&self, claims: &CapabilityClaims) -> String {
        let json = serde_json::to_vec(claims).expect("claims serialise");
        let signed = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks a capability token's signature and expiry (step 2 of the module doc).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<CapabilityClaims, StorageAuthError> {
        let bad = StorageAuthError::CapabilityInvalid;
        let (signed, tag) = token.rsplit_once('.').ok_or(bad.clone())?;
        let payload = signed.strip_prefix(TOKEN_PREFIX).ok_or(bad.clone())?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| bad.clone())?;
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        mac.verify_slice(&tag).map_err(|_| bad.clone())?;
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| bad.clone())?;
        let claims: CapabilityClaims = serde_json::from_slice(&json).map_err(|_| bad.clone())?;
        if KeyPrefix::parse(&claims.prefix).is_err() {
            return Err(bad);
        }
        if claims.expires_at <= now_s {
            return Err(StorageAuthError::CapabilityExpired);
        }
        Ok(claims)
    }

    /// The grant behind a bearer token.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        now_s: u64,
    ) -> Result<Grant, StorageAuthError> {
        let token = bearer.ok_or(StorageAuthError::Missing)?;
        if token.starts_with(TOKEN_PREFIX) {
            return self.verify(token, now_s).map(Grant::Capability);
        }
        match scaibunker_proto::worker_auth::verify_credential(&self.secret, token) {
            Some(claims) => Ok(Grant::Worker {
                worker_id: claims.worker_id,
            }),
            None => Err(StorageAuthError::Invalid),
        }
    }

    /// Mints a capability for `p` (the rules of the module doc).
    pub fn mint(
        &self,
        p: &Principal,
        req: CreateCapability,
        now_s: u64,
    ) -> Result<Capability, MintError> {
        if !p.has(auth::IMAGES_MANAGE) {
            return Err(MintError::PermissionDenied(auth::IMAGES_MANAGE));
        }
        let invalid = |field, message: &str| MintError::Invalid {
            field,
            message: message.to_owned(),
        };
        let prefix = KeyPrefix::parse(&req.prefix)
            .map_err(|e| invalid("prefix", &format!("{e}; a prefix looks like `dir/sub/`")))?;
        if prefix.as_str().is_empty() {
            return Err(invalid(
                "prefix",
                "must name at least one segment, like `dir/`",
            ));
        }
        if !p.has(auth::ADMIN_PLATFORM) {
            let own = format!("tenants/{}/", p.tenant_id);
            if !prefix.as_str().starts_with(&own) {
                return Err(invalid(
                    "prefix",
                    &format!(
                        "must lie under `{own}` (other prefixes need scaibunker:admin:platform)"
                    ),
                ));
            }
        }
        if req.verbs.is_empty() {
            return Err(invalid(
                "verbs",
                "name at least one of get, head, put, delete",
            ));
        }
        if req.ttl_s == 0 || req.ttl_s > MAX_TTL_S {
            return Err(invalid("ttl_s", &format!("must be 1 to {MAX_TTL_S}")));
        }
        let mut verbs = req.verbs;
        verbs.sort();
        verbs.dedup();
        let id = format!(
            "cap_{}",
            scaibunker_core::ids::encode_random(random_bytes())
        );
        let claims = CapabilityClaims {
            prefix: prefix.as_str().to_owned(),
            verbs: verbs.clone(),
            expires_at: now_s + req.ttl_s,
            id: Some(id.clone()),
        };
        Ok(Capability {
            id,
            token: self.sign(&claims),
            prefix: claims.prefix,
            verbs,
            expires_at: super::bunkers::rfc3339(claims.expires_at as i64 * 1000),
        })
    }
}

/// Why `POST /storage/capabilities` failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateCapabilityError {
    #[error(transparent)]
    Mint(#[from] MintError),
    #[error("recording the audit event")]
    Store(#[from] crate::store::StoreError),
}

/// Mints a capability for `p` and records it as an audit event (the token itself is not
/// recorded, only its scope).
pub async fn create_capability(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    req: CreateCapability,
) -> Result<Capability, CreateCapabilityError> {
    let cap = s.storage.mint(p, req, now_s())?;
    let row = crate::store::capabilities::CapabilityRow {
        id: cap.id.clone(),
        tenant_id: p.tenant_id.clone(),
        key_id: p.key_id.clone(),
        prefix: cap.prefix.clone(),
        expires_at: (now_s() + MAX_TTL_S) as i64 * 1000,
        created_at: now_ms(),
    };
    let event = capability_event(
        p,
        ctx,
        p.tenant_id.clone(),
        (
            "storage.capability.create",
            "storage_prefix",
            cap.prefix.clone(),
        ),
        serde_json::json!({"id": cap.id, "verbs": cap.verbs, "expires_at": cap.expires_at}),
    );
    let mut tx = s.store.begin().await?;
    crate::store::capabilities::insert(&mut tx, &row).await?;
    crate::store::audit::insert(&mut tx, &event).await?;
    tx.commit().await.map_err(crate::store::StoreError::from)?;
    Ok(cap)
}

/// The audit event of a capability use case: `(action, resource type, resource id)` done by
/// `p` in `tenant_id`.
fn capability_event(
    p: &Principal,
    ctx: &RequestContext,
    tenant_id: String,
    (action, resource_type, resource_id): (&'static str, &'static str, String),
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        id: AuditId::from_random(random_bytes()).to_string(),
        time_ms: now_ms(),
        tenant_id: Some(tenant_id),
        actor_id: Some(p.user_id.clone()),
        actor_type: "user",
        action,
        resource_type,
        resource_id: Some(resource_id),
        status: "success",
        ip: ctx.ip.clone(),
        request_id: Some(ctx.request_id.clone()),
        details,
    }
}

/// Why `DELETE /storage/capabilities/{id}` failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeCapabilityError {
    #[error("revoking storage capabilities needs {0}")]
    PermissionDenied(&'static str),
    #[error("no such live capability")]
    NotFound,
    #[error("store failed")]
    Store(#[from] crate::store::StoreError),
}

/// Revokes a capability of the caller's tenant (any tenant's with
/// `scaibunker:admin:platform`): from now on the controllers' proxy refuses its token with
/// `CAPABILITY_REVOKED`. Audited.
pub async fn revoke_capability(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    id: &str,
) -> Result<(), RevokeCapabilityError> {
    if !p.has(auth::IMAGES_MANAGE) {
        return Err(RevokeCapabilityError::PermissionDenied(auth::IMAGES_MANAGE));
    }
    let tenant = (!p.has(auth::ADMIN_PLATFORM)).then_some(p.tenant_id.as_str());
    let row = s
        .store
        .revoke_capability(tenant, id, now_ms())
        .await?
        .ok_or(RevokeCapabilityError::NotFound)?;
    let event = capability_event(
        p,
        ctx,
        row.tenant_id.clone(),
        (
            "storage.capability.revoke",
            "storage_capability",
            row.id.clone(),
        ),
        serde_json::json!({"prefix": row.prefix, "minted_by_key": row.key_id}),
    );
    let mut tx = s.store.begin().await?;
    crate::store::audit::insert(&mut tx, &event).await?;
    tx.commit().await.map_err(crate::store::StoreError::from)?;
    Ok(())
}

/// Whether `grant` allows `verb` on `key` (steps 2 and 3 of the module doc), as far as the
/// grant and the key tell (see [`Storage::authorize`] for the rest).
pub fn authorize(
    grant: &Grant,
    verb: StorageVerb,
    key: &ObjectKey,
) -> Result<(), StorageAuthError> {
    let c = match grant {
        Grant::Capability(c) => c,
        Grant::Worker { .. } => {
            let k = key.to_string();
            let reads = matches!(verb, StorageVerb::Get | StorageVerb::Head);
            let image = k.starts_with("images/") && k.ends_with("/rootfs.ext4");
            let snapshot = k.starts_with("snapshots/");
            // Whose bunker it is, `Storage::authorize` checks.
            let audit = super::egress::audit_bunker(&k).is_some();
            let writes = verb == StorageVerb::Put && (snapshot || audit);
            return if (reads && (image || snapshot)) || writes {
                Ok(())
            } else {
                Err(StorageAuthError::WorkerDenied { verb, key: k })
            };
        }
    };
    // Reading an object includes reading its metadata.
    let allowed = c.verbs.contains(&verb)
        || (verb == StorageVerb::Head && c.verbs.contains(&StorageVerb::Get));
    if !allowed {
        return Err(StorageAuthError::VerbDenied(verb));
    }
    let prefix = KeyPrefix::parse(&c.prefix).map_err(|_| StorageAuthError::CapabilityInvalid)?;
    if !key.is_under(&prefix) {
        return Err(StorageAuthError::OutOfScope {
            key: key.to_string(),
            prefix: c.prefix.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(secret: &[u8]) -> Storage {
        let dir = std::env::temp_dir().join("scaibunker-storage-unit");
        let objects = Objects::open(
            &format!("file://{}", dir.display()),
            &crate::objects::S3Settings::default(),
        )
        .expect("local store");
        Storage::new(objects, secret, 1 << 20)
    }

    fn claims(prefix: &str, verbs: &[StorageVerb], expires_at: u64) -> CapabilityClaims {
        CapabilityClaims {
            prefix: prefix.into(),
            verbs: verbs.to_vec(),
            expires_at,
            id: None,
        }
    }

    fn key(k: &str) -> ObjectKey {
        ObjectKey::parse(k).expect("valid key")
    }

    #[test]
    fn verifies_its_own_tokens_and_refuses_tampered_or_foreign_ones() {
        let s = storage(b"secret-one");
        let token = s.sign(&claims("a/", &[StorageVerb::Get], 1000));
        assert_eq!(
            s.authenticate(Some(&token), 999),
            Ok(Grant::Capability(claims("a/", &[StorageVerb::Get], 1000)))
        );
        assert_eq!(
            s.authenticate(Some(&token), 1000),
            Err(StorageAuthError::CapabilityExpired)
        );
        // Signed under another secret.
        let other = storage(b"secret-two").sign(&claims("a/", &[StorageVerb::Get], 1000));
        assert_eq!(
            s.authenticate(Some(&other), 0),
            Err(StorageAuthError::CapabilityInvalid)
        );
        // A payload swapped for a wider one keeps the old signature.
        let (_, tag) = token.rsplit_once('.').expect("dot");
        let wider = s.sign(&claims("", &[StorageVerb::Put], 5000));
        let (wider_signed, _) = wider.rsplit_once('.').expect("dot");
        let forged = format!("{wider_signed}.{tag}");
        assert_eq!(
            s.authenticate(Some(&forged), 0),
            Err(StorageAuthError::CapabilityInvalid)
        );
        for junk in ["sbc1.", "sbc1.x.y", "sbc1..", &format!("{token}x")] {
            assert_eq!(
                s.authenticate(Some(junk), 0),
                Err(StorageAuthError::CapabilityInvalid),
                "{junk}"
            );
        }
        // A worker credential minted with this secret; the shared join token opens nothing.
        let credential = scaibunker_proto::worker_auth::credential(b"secret-one", "wrk_a", 1);
        assert_eq!(
            s.authenticate(Some(&credential), 0),
            Ok(Grant::Worker {
                worker_id: "wrk_a".into()
            })
        );
        let foreign = scaibunker_proto::worker_auth::credential(b"secret-two", "wrk_a", 1);
        for refused in ["swt_worker", foreign.as_str()] {
            assert_eq!(
                s.authenticate(Some(refused), 0),
                Err(StorageAuthError::Invalid)
            );
        }
        assert_eq!(s.authenticate(None, 0), Err(StorageAuthError::Missing));
    }

    #[test]
    fn capabilities_allow_only_their_verbs_under_their_prefix() {
        let g = Grant::Capability(claims("t/a/", &[StorageVerb::Get, StorageVerb::Put], 9));
        assert_eq!(authorize(&g, StorageVerb::Get, &key("t/a/x")), Ok(()));
        assert_eq!(authorize(&g, StorageVerb::Head, &key("t/a/x/y")), Ok(()));
        assert_eq!(authorize(&g, StorageVerb::Put, &key("t/a/x")), Ok(()));
        assert_eq!(
            authorize(&g, StorageVerb::Delete, &key("t/a/x")),
            Err(StorageAuthError::VerbDenied(StorageVerb::Delete))
        );
        for outside in ["t/ab/x", "t/a", "t/b/x", "x/t/a/y"] {
            assert!(
                matches!(
                    authorize(&g, StorageVerb::Get, &key(outside)),
                    Err(StorageAuthError::OutOfScope { .. })
                ),
                "{outside}"
            );
        }
        let head_only = Grant::Capability(claims("t/", &[StorageVerb::Head], 9));
        assert_eq!(
            authorize(&head_only, StorageVerb::Get, &key("t/x")),
            Err(StorageAuthError::VerbDenied(StorageVerb::Get))
        );
        // A worker reads baked images and reads and writes snapshots, and nothing else.
        let w = Grant::Worker {
            worker_id: "wrk_a".into(),
        };
        for (verb, k) in [
            (StorageVerb::Get, "images/img_a/rootfs.ext4"),
            (StorageVerb::Head, "images/img_a/rootfs.ext4"),
            (StorageVerb::Get, "snapshots/tnt_a/snp_a/disk.qcow2"),
            (StorageVerb::Put, "snapshots/tnt_a/snp_a/state.bin"),
            (
                StorageVerb::Put,
                "scaibunker/audit/bnk_a/0000000000000001-7.ndjson",
            ),
        ] {
            assert_eq!(authorize(&w, verb, &key(k)), Ok(()), "{verb:?} {k}");
        }
        for (verb, k) in [
            (StorageVerb::Delete, "snapshots/tnt_a/snp_a/disk.qcow2"),
            (StorageVerb::Put, "images/img_a/rootfs.ext4"),
            (StorageVerb::Get, "images/img_a/source"),
            (StorageVerb::Get, "exec-output/tnt_a/bnk_a/exe_a/stdout"),
            (StorageVerb::Get, "tenants/tnt_a/private"),
            // The audit is written, never read, and only in the worker's key shape.
            (
                StorageVerb::Get,
                "scaibunker/audit/bnk_a/0000000000000001-7.ndjson",
            ),
            (
                StorageVerb::Head,
                "scaibunker/audit/bnk_a/0000000000000001-7.ndjson",
            ),
            (
                StorageVerb::Delete,
                "scaibunker/audit/bnk_a/0000000000000001-7.ndjson",
            ),
            (StorageVerb::Put, "scaibunker/audit/bnk_a/notes.txt"),
            (
                StorageVerb::Put,
                "scaibunker/audit/events/tnt_a/0000000000000001-7.ndjson",
            ),
        ] {
            assert!(
                matches!(
                    authorize(&w, verb, &key(k)),
                    Err(StorageAuthError::WorkerDenied { .. })
                ),
                "{verb:?} {k}"
            );
        }
    }

    fn principal(permissions: &[&str]) -> Principal {
        Principal {
            tenant_id: "tnt_a".into(),
            user_id: "usr_a".into(),
            key_id: "key_a".into(),
            role: "tenant_admin".into(),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn request(prefix: &str, verbs: &[StorageVerb], ttl_s: u64) -> CreateCapability {
        CreateCapability {
            prefix: prefix.into(),
            verbs: verbs.to_vec(),
            ttl_s,
        }
    }

    #[test]
    fn minting_checks_permission_prefix_verbs_and_ttl() {
        let s = storage(b"k");
        let get = [StorageVerb::Get];
        let tenant = principal(&[auth::IMAGES_MANAGE]);
        let cap = s
            .mint(&tenant, request("tenants/tnt_a/img/", &get, 60), 100)
            .expect("minted");
        assert_eq!(cap.prefix, "tenants/tnt_a/img/");
        assert_eq!(s.verify(&cap.token, 159).map(|c| c.expires_at), Ok(160));
        assert_eq!(
            s.mint(&principal(&[]), request("tenants/tnt_a/", &get, 60), 0),
            Err(MintError::PermissionDenied(auth::IMAGES_MANAGE))
        );
        let field = |r: Result<Capability, MintError>| match r {
            Err(MintError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        };
        for bad_prefix in [
            "tenants/tnt_b/",
            "tenants/tnt_a",
            "tenants/tnt_a/../",
            "",
            "images/",
        ] {
            assert_eq!(
                field(s.mint(&tenant, request(bad_prefix, &get, 60), 0)),
                "prefix",
                "{bad_prefix:?}"
            );
        }
        assert_eq!(
            field(s.mint(&tenant, request("tenants/tnt_a/", &[], 60), 0)),
            "verbs"
        );
        assert_eq!(
            field(s.mint(&tenant, request("tenants/tnt_a/", &get, 0), 0)),
            "ttl_s"
        );
        assert_eq!(
            field(s.mint(&tenant, request("tenants/tnt_a/", &get, MAX_TTL_S + 1), 0)),
            "ttl_s"
        );
        let platform = principal(&[auth::IMAGES_MANAGE, auth::ADMIN_PLATFORM]);
        assert!(s.mint(&platform, request("images/", &get, 60), 0).is_ok());
    }
}
