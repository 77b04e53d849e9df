//! Stored bytes per tenant, capped by quota profiles (`max_storage_mb`), and the deletion of
//! spilled exec outputs.
//!
//! What counts: the sizes the tenant's snapshot rows record, its baked images and its spilled
//! exec outputs (`store::spills`). A user's cap is the strictest `max_storage_mb` of every
//! profile that applies to them (both layers of `service::quotas`, so a tenant admin only
//! narrows what the platform granted), and it caps the stored bytes of the user's whole tenant
//! (bucket `tenant:{id}`): stored objects outlive the bunkers and users that made them.
//!
//! Enforcement, against the database, when each write starts:
//! - a snapshot is refused while the tenant is at or over its cap (a snapshot's size is only
//!   known once it is taken; it counts from then on);
//! - an image upload is refused when the image's `size_mib` would take the tenant past its cap;
//! - an exec's spills get what is left; a spill that would pass it is not kept (the result is
//!   `truncated` without `full_output_ref`), the exec itself runs to its end.
//!
//! Writes that start at the same time each see the room left before the others, so together
//! they may pass the cap by what they store.
//!
//! Spills are deleted by the `spills` job ([`delete_spills`]): those of bunkers that ended, and
//! any older than the retention; the object first, then its row, so a failed delete is retried.

use std::collections::HashSet;
use std::time::Duration;

use scaibunker_api::quotas as api;
use scaibunker_core::quota::Bucket;

use super::Services;
use super::quotas::{QuotaError, QuotaExceeded, resolve};
use crate::store::quotas::ProfileRow;
use crate::store::{StoreError, now_ms};

const MIB: u64 = 1024 * 1024;
/// The resource name of stored bytes in usage rows and refusals.
pub const RESOURCE: &str = "storage_mb";
/// Spills deleted per job run; the rest wait for the next tick.
const DELETE_BATCH: u32 = 1000;

fn bucket(tenant_id: &str) -> String {
    format!("tenant:{tenant_id}")
}

/// The strictest storage cap among `resolved` and the profile that sets it.
fn strictest(resolved: &[(ProfileRow, Bucket)]) -> Option<(&str, u64)> {
    resolved
        .iter()
        .filter_map(|(p, _)| p.max_storage_mb.map(|c| (p.id.as_str(), c.max(0) as u64)))
        .min_by_key(|(_, cap)| *cap)
}

/// What a tenant stores against the cap that applies to one of its users.
#[derive(Debug, Clone)]
pub struct Room {
    tenant_id: String,
    /// The profile whose cap is the strictest, and that cap in MiB; `None`: no cap.
    cap: Option<(String, u64)>,
    used_bytes: u64,
}

impl Room {
    /// Bytes that may still be stored; `None`: no cap.
    pub fn remaining_bytes(&self) -> Option<u64> {
        self.cap
            .as_ref()
            .map(|(_, mb)| (mb * MIB).saturating_sub(self.used_bytes))
    }

    /// Refuses a write of `requested` bytes that would pass the cap (0: one that needs any room).
    pub fn admit(&self, requested: u64) -> Result<(), Box<QuotaExceeded>> {
        let Some((profile_id, cap_mb)) = &self.cap else {
            return Ok(());
        };
        let fits = match requested {
            0 => self.used_bytes < cap_mb * MIB,
            n => self.used_bytes.saturating_add(n) <= cap_mb * MIB,
        };
        if fits {
            return Ok(());
        }
        Err(Box::new(QuotaExceeded {
            profile_id: profile_id.clone(),
            bucket: bucket(&self.tenant_id),
            resource: RESOURCE,
            current: self.used_bytes.div_ceil(MIB) as i64,
            cap: *cap_mb,
            requested: requested.div_ceil(MIB),
        }))
    }
}

/// The room `user_id` has to store more for `tenant_id`.
pub async fn room(s: &Services, tenant_id: &str, user_id: &str) -> Result<Room, StoreError> {
    let resolved = resolve(s, tenant_id, user_id).await?;
    let cap = strictest(&resolved).map(|(id, mb)| (id.to_owned(), mb));
    // Without a cap nothing needs counting.
    let used_bytes = match cap {
        Some(_) => s.store.stored_bytes(tenant_id).await?.max(0) as u64,
        None => 0,
    };
    Ok(Room {
        tenant_id: tenant_id.to_owned(),
        cap,
        used_bytes,
    })
}

/// The `storage_mb` rows of `GET /quota-profiles/usage`: one per profile that applies.
pub async fn usage(
    s: &Services,
    tenant_id: &str,
    resolved: &[(ProfileRow, Bucket)],
) -> Result<Vec<api::QuotaUsage>, QuotaError> {
    if resolved.is_empty() {
        return Ok(Vec::new());
    }
    let current = s.store.stored_bytes(tenant_id).await?.max(0) as u64;
    let current_mb = current.div_ceil(MIB) as i64;
    let mut seen = HashSet::new();
    Ok(resolved
        .iter()
        .filter(|(p, _)| seen.insert(p.id.clone()))
        .map(|(p, _)| {
            let cap = p.max_storage_mb.map(|c| c.max(0) as u64);
            api::QuotaUsage {
                profile_id: p.id.clone(),
                bucket: bucket(tenant_id),
                resource: RESOURCE.to_owned(),
                current: current_mb,
                cap,
                remaining: cap.map(|c| (c as i64 - current_mb).max(0) as u64),
            }
        })
        .collect())
}

/// The `spills` job: deletes the spilled outputs of bunkers that ended and those older than
/// `retention`. Returns how many it deleted.
pub async fn delete_spills(s: &Services, retention: Duration) -> Result<u64, StoreError> {
    let before = now_ms().saturating_sub(retention.as_millis() as i64);
    let mut deleted = 0;
    for spill in s.store.admin_spills_to_delete(before, DELETE_BATCH).await? {
        match s.objects().delete(&spill.object_key).await {
            Ok(()) => {
                s.store
                    .delete_spill(&spill.tenant_id, &spill.object_key)
                    .await?;
                deleted += 1;
            }
            // The row stays, so the next run tries again.
            Err(e) => tracing::warn!(
                key = spill.object_key,
                error = %e,
                "deleting a spilled exec output failed"
            ),
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "spilled exec outputs deleted");
    }
    Ok(deleted)
}
