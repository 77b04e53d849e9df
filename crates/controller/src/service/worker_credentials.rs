//! Per-worker credentials at the controller (the scheme: `scaibunker_proto::worker_auth`;
//! why: `docs/decisions/0010-worker-credentials.md`).
//!
//! - Registration: the shared join token registers a name that holds no credential yet (a new
//!   worker, one registered before credentials existed, or one an admin reset); a name that
//!   holds one registers only with it. Either way the answer carries the worker's current
//!   credential.
//! - Every other worker request (heartbeats, peer lookups) carries the credential, and only
//!   for the worker it names; the join token does nothing else.
//! - Rotation (`POST /workers/{id}/credential/rotate`): the generation moves on; the previous
//!   credential keeps working until the worker has used the new one, which the next heartbeat
//!   answer hands it. Reset (`…/credential/reset`): the credential stops working at once and
//!   the join token may register the name again (a worker whose data directory was lost).
//! - The controllers call a worker with the generation it holds: the current one, or during a
//!   rotation the previous one until it switched.

use scaibunker_core::ids::AuditId;
use scaibunker_proto::worker_auth::{self, CredentialClaims};

use super::auth::Principal;
use super::{RequestContext, Services, random_bytes};
use crate::store::StoreError;
use crate::store::audit::AuditEvent;
use crate::store::now_ms;
use crate::store::workers::WorkerRow;
use crate::workers::WorkerTarget;

/// A worker request's verified sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    pub worker_id: String,
    /// The generation the request carried.
    pub generation: i64,
    /// It carried the previous generation, during a rotation: hand it the current one.
    pub previous: bool,
    /// It carried the current generation while the previous one still works: retire that.
    pub switched: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerAuthError {
    #[error("no worker credential")]
    Missing,
    #[error("the worker credential is invalid, rotated away or reset")]
    Invalid,
    #[error("store failed")]
    Store(#[from] StoreError),
}

/// How a registration authenticated.
#[derive(Debug, Clone)]
pub enum RegisterAuth {
    /// The shared join token.
    Join,
    /// A worker's own credential.
    Worker(WorkerIdentity),
}

fn secret(s: &Services) -> &[u8] {
    s.config.storage_secret.as_bytes()
}

/// The credential of worker `id` at `generation`.
pub fn credential(s: &Services, id: &str, generation: i64) -> String {
    worker_auth::credential(secret(s), id, generation.max(0) as u64)
}

/// The generation a worker holds now: the current one, or during a rotation the previous one
/// until it has used the new one.
pub fn held_generation(w: &WorkerRow) -> i64 {
    w.credential_generation - i64::from(w.credential_previous_ok)
}

/// How the controllers reach `w`: its URL and the credential it holds.
pub fn target(s: &Services, w: &WorkerRow) -> WorkerTarget {
    WorkerTarget {
        url: w.url.clone(),
        credential: credential(s, &w.id, held_generation(w)),
    }
}

/// The worker a credential belongs to, if it is one of its live generations.
pub async fn authenticate(s: &Services, token: &str) -> Result<WorkerIdentity, WorkerAuthError> {
    let CredentialClaims {
        worker_id,
        generation,
    } = worker_auth::verify_credential(secret(s), token).ok_or(WorkerAuthError::Invalid)?;
    let generation = i64::try_from(generation).map_err(|_| WorkerAuthError::Invalid)?;
    let w = s
        .store
        .worker(&worker_id)
        .await?
        .ok_or(WorkerAuthError::Invalid)?;
    let current = w.credential_generation;
    if generation == current && current > 0 {
        Ok(WorkerIdentity {
            worker_id,
            generation,
            previous: false,
            switched: w.credential_previous_ok,
        })
    } else if generation + 1 == current && w.credential_previous_ok && generation > 0 {
        Ok(WorkerIdentity {
            worker_id,
            generation,
            previous: true,
            switched: false,
        })
    } else {
        Err(WorkerAuthError::Invalid)
    }
}

/// A registration's bearer: the join token or a worker's credential.
pub async fn authenticate_register(
    s: &Services,
    token: &str,
) -> Result<RegisterAuth, WorkerAuthError> {
    if worker_auth::constant_time_eq(token.as_bytes(), s.config.worker_token.as_bytes()) {
        return Ok(RegisterAuth::Join);
    }
    authenticate(s, token).await.map(RegisterAuth::Worker)
}

/// Why a rotation or reset was refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialChangeError {
    #[error("changing worker credentials needs {0}")]
    PermissionDenied(&'static str),
    #[error("worker not found")]
    NotFound,
    #[error("store failed")]
    Store(#[from] StoreError),
}

/// Rotates (`reset: false`) or resets a worker's credential; platform admins only, audited.
pub async fn change(
    s: &Services,
    p: &Principal,
    ctx: &RequestContext,
    worker_id: &str,
    reset: bool,
) -> Result<(), CredentialChangeError> {
    if !(p.is_admin() && p.has(super::auth::ADMIN_PLATFORM)) {
        return Err(CredentialChangeError::PermissionDenied(
            super::auth::ADMIN_PLATFORM,
        ));
    }
    let generation = s
        .store
        .bump_worker_credential(worker_id, reset)
        .await?
        .ok_or(CredentialChangeError::NotFound)?;
    let event = AuditEvent {
        id: AuditId::from_random(random_bytes()).to_string(),
        time_ms: now_ms(),
        tenant_id: Some(p.tenant_id.clone()),
        actor_id: Some(p.user_id.clone()),
        actor_type: "user",
        action: if reset {
            "worker.credential.reset"
        } else {
            "worker.credential.rotate"
        },
        resource_type: "worker",
        resource_id: Some(worker_id.to_owned()),
        status: "success",
        ip: ctx.ip.clone(),
        request_id: Some(ctx.request_id.clone()),
        details: serde_json::json!({ "generation": generation }),
    };
    let mut tx = s.store.begin().await?;
    crate::store::audit::insert(&mut tx, &event).await?;
    tx.commit().await.map_err(StoreError::from)?;
    tracing::info!(worker_id, generation, reset, "worker credential changed");
    Ok(())
}
