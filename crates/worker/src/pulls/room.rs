//! Room for a pull: the pulled images together stay under a byte cap
//! (`SCAIBUNKER_IMAGE_CACHE_MB`) and the disk under them keeps a floor of free space
//! (`SCAIBUNKER_MIN_FREE_DISK_MB`). Prebuilt images ([`crate::images`]) are the operator's:
//! they are neither counted nor evicted.
//!
//! Before a pull transfers (it holds its turn already):
//! 1. ask the composition which images bunkers and templates use ([`ImageUsers`]);
//! 2. read the free space of the directory and how far the other pulls in flight got;
//! 3. under the state lock, count the held bytes and the bytes other pulls in flight
//!    reserved, and list the eviction candidates: held images no bunker or template uses,
//!    with no pull in flight, not used within [`CacheLimits::grace`] (a create that just
//!    looked one up is not raced), least recently used first;
//! 4. take as few candidates as make the pull fit both limits; if all of them would not,
//!    fail naming what is needed, held and in use, and evict nothing;
//! 5. forget the chosen images (lookups and the next heartbeat's `cached_images` no longer
//!    see them, so the controller's ledger drops them), reserve the pull's bytes until it
//!    ends, and delete the files with their digest sidecars.
//!
//! Last use lives in memory only: a create's lookup or a completed pull is a use, and images
//! found at open are ordered by their files' mtimes. The files' mtimes are never touched:
//! the digest cache ([`crate::images::record_digest`]) keys on them.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use scaibunker_proto::worker::ImagePull;

use super::{Pulls, lock, remove_quietly};
use crate::images;

/// How long after its last use an image may not be evicted: covers a create between looking
/// its image up and its bunker being listed as a user.
pub const RECENT_USE_GRACE: Duration = Duration::from_secs(60);

/// The bytes pulled images may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Most bytes the pulled images may hold together; `None` for no cap.
    pub cap_bytes: Option<u64>,
    /// Free bytes the disk under the pulled images keeps once a pull has landed.
    pub min_free_bytes: u64,
    /// See [`RECENT_USE_GRACE`].
    pub grace: Duration,
}

impl Default for CacheLimits {
    /// No cap and no floor: a pull needs only its own size free on disk.
    fn default() -> Self {
        Self {
            cap_bytes: None,
            min_free_bytes: 0,
            grace: RECENT_USE_GRACE,
        }
    }
}

/// Who uses images: the bunkers registry, set by the composition.
pub trait ImageUsers: Send + Sync {
    /// Digests of the images bunkers run on or are booting from, and templates were built
    /// or are being built from.
    fn images_in_use(&self) -> BTreeSet<String>;
}

/// Free bytes (for an unprivileged writer) of the filesystem holding a directory.
pub type FreeSpace = Arc<dyn Fn(&Path) -> io::Result<u64> + Send + Sync>;

/// [`FreeSpace`] from `statvfs`: available blocks times the fragment size.
pub fn statvfs_free(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Why no room could be made for a pull.
#[derive(Debug, thiserror::Error)]
pub(super) enum NoRoomError {
    #[error(
        "the image is {size}, more than the whole image cache cap of {cap} (SCAIBUNKER_IMAGE_CACHE_MB)"
    )]
    OverCap { size: Bytes, cap: Bytes },
    #[error("no room for the image ({size}): {tally}")]
    Full { size: Bytes, tally: Tally },
    #[error("read the free space of {}", dir.display())]
    FreeSpace {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A byte count, printed for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        if self.0 < MIB {
            write!(f, "{} bytes", self.0)
        } else {
            write!(f, "{:.1} MiB", self.0 as f64 / MIB as f64)
        }
    }
}

/// What the cache and the disk held when a pull did not fit.
#[derive(Debug, Clone)]
pub(super) struct Tally {
    held: u64,
    cap: Option<u64>,
    /// Held bytes of images bunkers or templates use (all of them while users are unknown).
    in_use: u64,
    users_known: bool,
    recent: u64,
    grace: Duration,
    evictable: u64,
    reserved: u64,
    free: u64,
    floor: u64,
    /// Bytes missing under the cap and on disk, with every candidate evicted.
    cap_short: u64,
    disk_short: u64,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |n: u64| -> String {
            if n > 0 {
                format!("{} short", Bytes(n))
            } else {
                "enough".to_owned()
            }
        };
        match self.cap {
            Some(cap) => write!(
                f,
                "the cache holds {} of its {} cap ({} under it; SCAIBUNKER_IMAGE_CACHE_MB)",
                Bytes(self.held),
                Bytes(cap),
                short(self.cap_short),
            )?,
            None => write!(f, "the cache holds {} (no cap)", Bytes(self.held))?,
        }
        let users = if self.users_known {
            "in use by bunkers or templates"
        } else {
            "of unknown use (the bunkers registry is not connected yet)"
        };
        write!(
            f,
            ", {} {users}, {} used in the last {} s, {} evictable; pulls in flight reserve {}; \
             the disk has {} free and keeps {} free ({}; SCAIBUNKER_MIN_FREE_DISK_MB)",
            Bytes(self.in_use),
            Bytes(self.recent),
            self.grace.as_secs(),
            Bytes(self.evictable),
            Bytes(self.reserved),
            Bytes(self.free),
            Bytes(self.floor),
            short(self.disk_short),
        )
    }
}

/// A held image that may be evicted.
struct Candidate {
    last_use: u64,
    sha256: String,
    bytes: u64,
    path: PathBuf,
}

impl Pulls {
    /// Makes room for `pull` (see the module comment) and reserves its bytes until the pull
    /// ends ([`Pulls::settle`] releases them).
    pub(super) async fn make_room(&self, pull: &ImagePull) -> Result<(), NoRoomError> {
        let size = pull.size_bytes;
        let limits = self.limits;
        if let Some(cap) = limits.cap_bytes
            && size > cap
        {
            return Err(NoRoomError::OverCap {
                size: Bytes(size),
                cap: Bytes(cap),
            });
        }
        // Asked before the state lock: the registry takes its own locks.
        let in_use: Option<BTreeSet<String>> = self
            .users
            .get()
            .and_then(Weak::upgrade)
            .map(|users| users.images_in_use());
        let others: Vec<String> = lock(&self.state).reserved.keys().cloned().collect();
        let (free, written) = self.measure(others).await?;

        let evicted = {
            let mut state = lock(&self.state);
            let held: u64 = state.held.values().map(|h| h.image.size_bytes).sum();
            let reserved: u64 = state.reserved.values().sum();
            // What other pulls still have to write: their reservations less their part files.
            let reserved_left: u64 = state
                .reserved
                .iter()
                .map(|(sha, bytes)| bytes.saturating_sub(written.get(sha).copied().unwrap_or(0)))
                .sum();
            let (mut in_use_bytes, mut recent) = (0, 0);
            let mut candidates = Vec::new();
            for (sha, h) in &state.held {
                let bytes = h.image.size_bytes;
                let used = in_use.as_ref().is_none_or(|users| users.contains(sha));
                if used || state.in_flight.contains_key(sha) {
                    in_use_bytes += bytes;
                } else if h.used_at.is_some_and(|at| at.elapsed() < limits.grace) {
                    recent += bytes;
                } else {
                    candidates.push(Candidate {
                        last_use: h.last_use,
                        sha256: sha.clone(),
                        bytes,
                        path: h.image.path.clone(),
                    });
                }
            }
            candidates.sort_by_key(|c| c.last_use);
            let cap_need = limits
                .cap_bytes
                .map_or(0, |cap| (held + reserved + size).saturating_sub(cap));
            let disk_need = (size + limits.min_free_bytes + reserved_left).saturating_sub(free);
            // An evicted file frees its bytes under the cap and on disk alike.
            let need = cap_need.max(disk_need);
            let evictable: u64 = candidates.iter().map(|c| c.bytes).sum();
            if evictable < need {
                return Err(NoRoomError::Full {
                    size: Bytes(size),
                    tally: Tally {
                        held,
                        cap: limits.cap_bytes,
                        in_use: in_use_bytes,
                        users_known: in_use.is_some(),
                        recent,
                        grace: limits.grace,
                        evictable,
                        reserved,
                        free,
                        floor: limits.min_free_bytes,
                        cap_short: cap_need.saturating_sub(evictable),
                        disk_short: disk_need.saturating_sub(evictable),
                    },
                });
            }
            let (mut chosen, mut freed) = (Vec::new(), 0);
            for c in candidates {
                if freed >= need {
                    break;
                }
                freed += c.bytes;
                chosen.push(c);
            }
            for c in &chosen {
                state.held.remove(&c.sha256);
            }
            state.reserved.insert(pull.sha256.clone(), size);
            chosen
        };
        if evicted.is_empty() {
            return Ok(());
        }
        self.stats
            .evicted
            .fetch_add(evicted.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for c in &evicted {
            tracing::info!(sha256 = %c.sha256, bytes = c.bytes, for_sha256 = %pull.sha256, "evicting a pulled image to make room");
        }
        // A peer still being served an evicted file keeps its blocks until it is done; the
        // floor is a margin, and a write that finds the disk full still fails the pull cleanly.
        let _ = tokio::task::spawn_blocking(move || {
            for c in &evicted {
                remove_quietly(&c.path);
                remove_quietly(&images::digest_path(&c.path));
            }
        })
        .await;
        Ok(())
    }

    /// The free space of the directory, and the part file sizes of the pulls `others`.
    async fn measure(
        &self,
        others: Vec<String>,
    ) -> Result<(u64, HashMap<String, u64>), NoRoomError> {
        let dir = self.dir.clone();
        let free_space = Arc::clone(&self.free_space);
        let parts: Vec<(String, PathBuf)> = others
            .into_iter()
            .map(|sha| {
                let part = self.part_path(&sha);
                (sha, part)
            })
            .collect();
        let measured = tokio::task::spawn_blocking(move || {
            let free = free_space(&dir)?;
            let written = parts
                .into_iter()
                .filter_map(|(sha, part)| Some((sha, std::fs::metadata(part).ok()?.len())))
                .collect();
            Ok((free, written))
        })
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join)));
        measured.map_err(|source| NoRoomError::FreeSpace {
            dir: self.dir.clone(),
            source,
        })
    }
}
