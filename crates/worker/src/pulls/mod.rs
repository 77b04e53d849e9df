//! Image pulls: ext4 images this worker fetches because the controller asks it to hold them
//! (a heartbeat's `pull_images`) or because a create needs one (`CreateVm.image_pull`). They
//! live in `<data>/images/<sha256>.ext4`, apart from the prebuilt images directory
//! ([`crate::images`]), and are known by digest only: they are reported in heartbeats'
//! `cached_images`, never registered by name.
//!
//! One pull:
//! 1. ask the controller which peers hold the image (`GET /v1/modules/scaibunker/peers/{sha256}`);
//! 2. try each peer's `GET {url}/v1/worker/images/{sha256}` in turn, then, if the image has an
//!    object key, the storage proxy's `GET /v1/modules/scaibunker/storage/objects/{key}`
//!    (every request with the worker token);
//! 3. stream the body into `<sha256>.ext4.part`, hashing as it arrives and refusing more bytes
//!    than announced (memory stays at one chunk whatever the size);
//! 4. check size and digest, fsync, rename to `<sha256>.ext4`, make it read-only and cache its
//!    digest beside it. A source that fails has its part file deleted before the next is tried;
//!    a pull that no source could serve is queued as an [`ImageFailure`] for the next heartbeat.
//!
//! Before a pull transfers, [`room`] makes room for it under the cache cap and the free-disk
//! floor ([`CacheLimits`]), evicting held images no bunker or template uses, least recently
//! used first; a pull that cannot fit fails before any byte moves.
//!
//! Invariants: a `<sha256>.ext4` here holds bytes whose SHA-256 is its name (checked as they
//! arrive, and at start for any file whose digest cache is stale; a mismatch is deleted); no
//! `.part` file outlives its pull (or, after a crash, the next start); one pull per digest is
//! in flight and every caller that needs it waits on that one; at most
//! [`MAX_CONCURRENT_PULLS`] transfer at once; an image with a pull in flight, or one a bunker
//! or template uses, is never evicted.
//!
//! This module holds the set of pulled images and joins and settles pulls; [`fetch`] moves
//! the bytes (peers, the storage proxy, publishing the verified file); [`room`] keeps the
//! cache within its limits.

mod fetch;
mod room;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use scaibunker_proto::worker::{ImageFailure, ImagePull};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use self::fetch::Source;
pub use self::room::{CacheLimits, FreeSpace, ImageUsers, RECENT_USE_GRACE, statvfs_free};
use crate::bunker::supervisor::error_chain;
use crate::images::{self, Image};

/// Most pulls transferring at once; more wait their turn.
pub const MAX_CONCURRENT_PULLS: usize = 2;
const IMAGE_SUFFIX: &str = ".ext4";
const PART_SUFFIX: &str = ".ext4.part";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A source that sends nothing for this long is abandoned (no total timeout: images are large).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How this worker reaches the controller for peers and the storage proxy.
#[derive(Debug, Clone)]
pub struct ControllerAccess {
    /// Base URL, without a trailing `/`.
    pub url: String,
    /// This worker's credential (the join token before it has one).
    pub credentials: std::sync::Arc<crate::credentials::Credentials>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenPullsError {
    #[error("create the pulled images directory {}", dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read the pulled images directory {}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("build the pull http client")]
    Http(#[source] reqwest::Error),
}

/// What waiters of a pull see once it ends: the image, or why it failed.
type Outcome = Result<Image, String>;

/// Counters of the pulls since start.
#[derive(Debug, Default)]
struct Stats {
    peer_bytes: AtomicU64,
    proxy_bytes: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    evicted: AtomicU64,
}

/// A reading of the pull counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullCounters {
    /// Bytes of completed pulls that peers served.
    pub peer_bytes: u64,
    /// Bytes of completed pulls that the storage proxy served.
    pub proxy_bytes: u64,
    pub completed: u64,
    pub failed: u64,
    /// Pulled images evicted to make room for others.
    pub evicted: u64,
}

/// Who asked for a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// A heartbeat's `pull_images`: not restarted while its failure waits to be reported.
    Warm,
    /// A create that needs the image: tried again whatever happened before.
    Create,
}

enum Joined {
    Held(Image),
    Waiting(watch::Receiver<Option<Outcome>>),
    Skipped,
}

/// A pulled image and when it was last used.
struct Held {
    image: Image,
    /// Position in the order of uses: the smallest was used least recently.
    last_use: u64,
    /// When a create last looked it up or a pull completed it in this run; `None` for an
    /// image found at open and not used since.
    used_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    /// Pulled images, by digest.
    held: BTreeMap<String, Held>,
    /// The last value given out as a [`Held::last_use`].
    uses: u64,
    in_flight: HashMap<String, watch::Receiver<Option<Outcome>>>,
    /// Bytes each pull in flight made room for: counted against the limits until it ends.
    reserved: HashMap<String, u64>,
    /// Failures not yet reported to the controller.
    failures: Vec<ImageFailure>,
}

impl State {
    /// Records a use of a held image now.
    fn touch(&mut self, sha256: &str) -> Option<Image> {
        self.uses += 1;
        let last_use = self.uses;
        let held = self.held.get_mut(sha256)?;
        held.last_use = last_use;
        held.used_at = Some(Instant::now());
        Some(held.image.clone())
    }
}

/// The pulled images and the pulls in flight.
pub struct Pulls {
    dir: PathBuf,
    controller: Option<ControllerAccess>,
    http: reqwest::Client,
    state: Mutex<State>,
    permits: Semaphore,
    stats: Stats,
    /// Cancelled at shutdown: pulls in flight stop and delete their part files.
    cancel: CancellationToken,
    /// This worker's id at the controller (set once registered): peers are the workers
    /// sharing an availability group with it.
    worker_id: std::sync::RwLock<Option<String>>,
    limits: CacheLimits,
    /// Who uses images, set once by the composition; until then nothing is evicted.
    users: OnceLock<Weak<dyn ImageUsers>>,
    free_space: FreeSpace,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update is a few map operations under one guard, which a panic cannot tear.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// 64 lowercase hex digits: what a digest looks like in a path or a file name.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Pulls {
    /// Opens `dir` (created if missing): deletes `.part` leftovers and keeps every
    /// `<sha256>.ext4` whose bytes hash to its name, deleting the others. Images kept are
    /// ordered for eviction by their files' mtimes. Until [`Self::with_limits`], a pull only
    /// needs its own size free on disk. Blocking.
    pub fn open(dir: &Path, controller: Option<ControllerAccess>) -> Result<Self, OpenPullsError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        fs::create_dir_all(&dir).map_err(|source| OpenPullsError::CreateDir {
            dir: dir.clone(),
            source,
        })?;
        let read_err = |source| OpenPullsError::ReadDir {
            dir: dir.clone(),
            source,
        };
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.ends_with(PART_SUFFIX) {
                tracing::warn!(path = %path.display(), "deleting the leftover of an interrupted pull");
                remove_quietly(&path);
                continue;
            }
            let Some(sha256) = name.strip_suffix(IMAGE_SUFFIX) else {
                continue;
            };
            if !is_sha256_hex(sha256) {
                continue;
            }
            match images::hash_image(sha256, &path) {
                Ok(image) if image.sha256 == sha256 => {
                    let mtime = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, image));
                }
                Ok(image) => {
                    tracing::warn!(path = %path.display(), actual = %image.sha256, "pulled image does not match its name; deleting it");
                    remove_quietly(&path);
                    remove_quietly(&images::digest_path(&path));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %error_chain(&e), "cannot hash a pulled image; deleting it");
                    remove_quietly(&path);
                    remove_quietly(&images::digest_path(&path));
                }
            }
        }
        // The oldest file was used least recently, as far as this run knows.
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.sha256.cmp(&b.1.sha256)));
        let uses = found.len() as u64;
        let held = found
            .into_iter()
            .zip(1..)
            .map(|((_, image), last_use)| {
                let held = Held {
                    image,
                    last_use,
                    used_at: None,
                };
                (held.image.sha256.clone(), held)
            })
            .collect();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(OpenPullsError::Http)?;
        Ok(Self {
            dir,
            controller,
            http,
            state: Mutex::new(State {
                held,
                uses,
                ..State::default()
            }),
            permits: Semaphore::new(MAX_CONCURRENT_PULLS),
            stats: Stats::default(),
            cancel: CancellationToken::new(),
            worker_id: std::sync::RwLock::new(None),
            limits: CacheLimits::default(),
            users: OnceLock::new(),
            free_space: Arc::new(statvfs_free),
        })
    }

    /// Keeps the pulled images within `limits`.
    pub fn with_limits(mut self, limits: CacheLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Reads free disk space through `free_space` instead of `statvfs`.
    #[cfg(test)]
    fn with_free_space(mut self, free_space: FreeSpace) -> Self {
        self.free_space = free_space;
        self
    }

    /// Names who uses images (the bunkers registry); only images it does not name may be
    /// evicted. Weak, because the registry holds these pulls. Set once; later calls are
    /// ignored.
    pub fn set_users(&self, users: Weak<dyn ImageUsers>) {
        let _ = self.users.set(users);
    }

    /// Records the id the controller gave this worker; peers are asked for under it.
    pub fn set_worker_id(&self, id: &str) {
        *self
            .worker_id
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(id.to_owned());
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A pulled image a create is about to boot, by digest: counts as a use, so it is the
    /// last to be evicted and safe from eviction for [`CacheLimits::grace`].
    pub fn lookup(&self, sha256: &str) -> Option<Image> {
        lock(&self.state).touch(sha256)
    }

    /// A pulled image, by digest, without counting a use (serving it to a peer is not one:
    /// the open file outlives an eviction).
    pub fn peek(&self, sha256: &str) -> Option<Image> {
        lock(&self.state)
            .held
            .get(sha256)
            .map(|held| held.image.clone())
    }

    /// Bytes of every pulled image held.
    pub fn held_bytes(&self) -> u64 {
        lock(&self.state)
            .held
            .values()
            .map(|held| held.image.size_bytes)
            .sum()
    }

    /// The digests of every pulled image still on disk. One deleted by hand is forgotten
    /// here, so the next heartbeat leaves it out and the controller's ledger heals.
    pub fn held_sha256s(&self) -> Vec<String> {
        let mut state = lock(&self.state);
        state.held.retain(|sha, held| {
            let there = held.image.path.exists();
            if !there {
                tracing::warn!(sha256 = %sha, path = %held.image.path.display(), "a pulled image disappeared from disk");
            }
            there
        });
        state.held.keys().cloned().collect()
    }

    /// Whether a pull of `sha256` is transferring or waiting for its turn.
    pub fn is_in_flight(&self, sha256: &str) -> bool {
        lock(&self.state).in_flight.contains_key(sha256)
    }

    pub fn counters(&self) -> PullCounters {
        PullCounters {
            peer_bytes: self.stats.peer_bytes.load(Ordering::Relaxed),
            proxy_bytes: self.stats.proxy_bytes.load(Ordering::Relaxed),
            completed: self.stats.completed.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            evicted: self.stats.evicted.load(Ordering::Relaxed),
        }
    }

    /// Starts pulling `pull` in the background, unless it is held, in flight, or failed and
    /// not yet reported (the controller stops asking once it hears of the failure).
    pub fn request(self: &Arc<Self>, pull: ImagePull) {
        let _ = self.join(pull, Trigger::Warm);
    }

    /// The image `pull` names: held already, or pulled now (joining a pull in flight).
    /// Errors carry the reason, which is also queued for the next heartbeat.
    pub async fn pull(self: &Arc<Self>, pull: ImagePull) -> Result<Image, String> {
        let mut rx = match self.join(pull, Trigger::Create) {
            Joined::Held(image) => return Ok(image),
            Joined::Waiting(rx) => rx,
            // Only warm requests are skipped; a create always joins or starts a pull.
            Joined::Skipped => return Err("the pull was not started".to_owned()),
        };
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome
                .clone()
                .unwrap_or_else(|| Err("the pull ended without an outcome".to_owned())),
            Err(_) => Err("the pull ended without an outcome".to_owned()),
        }
    }

    /// Stops every pull in flight (each deletes its part file); no pull starts after this.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Takes the failures to report in the next heartbeat.
    pub fn take_failures(&self) -> Vec<ImageFailure> {
        std::mem::take(&mut lock(&self.state).failures)
    }

    /// Puts back failures whose heartbeat did not reach the controller.
    pub fn requeue_failures(&self, failures: Vec<ImageFailure>) {
        let mut state = lock(&self.state);
        for f in failures {
            let superseded = state.held.contains_key(&f.sha256)
                || state.failures.iter().any(|g| g.sha256 == f.sha256);
            if !superseded {
                state.failures.push(f);
            }
        }
    }

    fn join(self: &Arc<Self>, pull: ImagePull, trigger: Trigger) -> Joined {
        let mut state = lock(&self.state);
        if state.held.contains_key(&pull.sha256) {
            // A heartbeat naming an image is not a use; a create about to boot it is.
            let image = match trigger {
                Trigger::Create => state.touch(&pull.sha256),
                Trigger::Warm => state.held.get(&pull.sha256).map(|h| h.image.clone()),
            };
            if let Some(image) = image {
                return Joined::Held(image);
            }
        }
        if let Some(rx) = state.in_flight.get(&pull.sha256) {
            return Joined::Waiting(rx.clone());
        }
        if trigger == Trigger::Warm && state.failures.iter().any(|f| f.sha256 == pull.sha256) {
            return Joined::Skipped;
        }
        let (tx, rx) = watch::channel(None);
        state.in_flight.insert(pull.sha256.clone(), rx.clone());
        drop(state);

        let this = Arc::clone(self);
        tokio::spawn(async move {
            let sha256 = pull.sha256.clone();
            // The transfer runs in its own task so that a panic in it still ends the pull
            // (and releases the digest) instead of leaving waiters forever.
            let worker = Arc::clone(&this);
            let outcome = match tokio::spawn(async move { worker.run(&pull).await }).await {
                Ok(outcome) => outcome,
                Err(join) => Err(format!("the pull task failed: {join}")),
            };
            this.settle(&sha256, &outcome);
            tx.send_replace(Some(outcome));
        });
        Joined::Waiting(rx)
    }

    /// Records the end of a pull: the image joins the held set, or the failure is queued.
    fn settle(&self, sha256: &str, outcome: &Outcome) {
        let mut state = lock(&self.state);
        state.in_flight.remove(sha256);
        state.reserved.remove(sha256);
        match outcome {
            Ok(image) => {
                // Just pulled, most likely for a create about to boot it: a use.
                state.uses += 1;
                let held = Held {
                    image: image.clone(),
                    last_use: state.uses,
                    used_at: Some(Instant::now()),
                };
                state.held.insert(sha256.to_owned(), held);
                state.failures.retain(|f| f.sha256 != sha256);
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                state.failures.retain(|f| f.sha256 != sha256);
                state.failures.push(ImageFailure {
                    sha256: sha256.to_owned(),
                    reason: reason.clone(),
                });
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn run(&self, pull: &ImagePull) -> Outcome {
        let fetched = tokio::select! {
            // Cancellation first, so a pull asked for after shutdown never starts.
            biased;
            () = self.cancel.cancelled() => {
                // The transfer was dropped mid-way: its part file is this pull's to delete.
                if is_sha256_hex(&pull.sha256) {
                    remove_quietly_async(&self.part_path(&pull.sha256)).await;
                }
                return Err("the worker is shutting down".to_owned());
            }
            fetched = async {
                let _turn = self
                    .permits
                    .acquire()
                    .await
                    .expect("the pull semaphore is never closed");
                let started = Instant::now();
                (self.fetch(pull).await, started)
            } => fetched,
        };
        let (fetched, started) = fetched;
        match fetched {
            Ok((image, source)) => {
                let (counter, peer) = match &source {
                    Source::Peer { worker_id } => (&self.stats.peer_bytes, Some(&worker_id[..])),
                    Source::Proxy => (&self.stats.proxy_bytes, None),
                };
                counter.fetch_add(image.size_bytes, Ordering::Relaxed);
                tracing::info!(
                    sha256 = %pull.sha256,
                    source = if peer.is_some() { "peer" } else { "proxy" },
                    peer = peer.unwrap_or("-"),
                    bytes = image.size_bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "image pulled"
                );
                Ok(image)
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(sha256 = %pull.sha256, %reason, "image pull failed");
                Err(reason)
            }
        }
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot delete");
    }
}

async fn remove_quietly_async(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot delete");
    }
}

#[cfg(test)]
mod tests;
