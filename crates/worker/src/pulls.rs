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
//! Invariants: a `<sha256>.ext4` here holds bytes whose SHA-256 is its name (checked as they
//! arrive, and at start for any file whose digest cache is stale; a mismatch is deleted); no
//! `.part` file outlives its pull (or, after a crash, the next start); one pull per digest is
//! in flight and every caller that needs it waits on that one; at most
//! [`MAX_CONCURRENT_PULLS`] transfer at once.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use scaibunker_proto::worker::{ImageFailure, ImagePull, PeersResponse, WORKER_API_PREFIX};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::bunker::supervisor::error_chain;
use crate::images::{self, Image};

/// Most pulls transferring at once; more wait their turn.
pub const MAX_CONCURRENT_PULLS: usize = 2;
const IMAGE_SUFFIX: &str = ".ext4";
const PART_SUFFIX: &str = ".ext4.part";
const PEERS_PATH: &str = "/v1/modules/scaibunker/peers";
const OBJECTS_PATH: &str = "/v1/modules/scaibunker/storage/objects";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A source that sends nothing for this long is abandoned (no total timeout: images are large).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const PEERS_TIMEOUT: Duration = Duration::from_secs(10);

/// How this worker reaches the controller for peers and the storage proxy.
#[derive(Debug, Clone)]
pub struct ControllerAccess {
    /// Base URL, without a trailing `/`.
    pub url: String,
    pub worker_token: String,
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

/// Why one source did not deliver the image.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url} announced {announced} bytes, expected {expected}")]
    Length {
        url: String,
        announced: u64,
        expected: u64,
    },
    #[error("more than the expected {expected} bytes arrived")]
    TooLong { expected: u64 },
    #[error("{got} bytes arrived, expected {expected}")]
    TooShort { got: u64, expected: u64 },
    #[error("the bytes hash to {got}")]
    Digest { got: String },
    #[error("write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
enum PullError {
    #[error("sha256 {0:?} is not 64 lowercase hex digits")]
    InvalidDigest(String),
    #[error("no source served the image ({})", tried.join("; "))]
    NoSource { tried: Vec<String> },
    #[error("publish {}", path.display())]
    Publish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where a pull's bytes came from.
#[derive(Debug, Clone)]
enum Source {
    Peer { worker_id: String },
    Proxy,
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

#[derive(Default)]
struct State {
    /// Pulled images, by digest.
    held: BTreeMap<String, Image>,
    in_flight: HashMap<String, watch::Receiver<Option<Outcome>>>,
    /// Failures not yet reported to the controller.
    failures: Vec<ImageFailure>,
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
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update is a few map operations under one guard, which a panic cannot tear.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// 64 lowercase hex digits: what a digest looks like in a path or a file name.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An object key the storage proxy accepts: `/`-separated segments of `A-Z a-z 0-9 . _ - =`,
/// none empty or starting with `.`. Checked here too, so a key never shapes another URL.
fn is_object_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 1024
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'='))
        })
}

impl Pulls {
    /// Opens `dir` (created if missing): deletes `.part` leftovers and keeps every
    /// `<sha256>.ext4` whose bytes hash to its name, deleting the others. Blocking.
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
        let mut held = BTreeMap::new();
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
                    held.insert(sha256.to_owned(), image);
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
                ..State::default()
            }),
            permits: Semaphore::new(MAX_CONCURRENT_PULLS),
            stats: Stats::default(),
            cancel: CancellationToken::new(),
            worker_id: std::sync::RwLock::new(None),
        })
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

    /// A pulled image, by digest.
    pub fn lookup(&self, sha256: &str) -> Option<Image> {
        lock(&self.state).held.get(sha256).cloned()
    }

    /// The digests of every pulled image still on disk. One deleted by hand is forgotten
    /// here, so the next heartbeat leaves it out and the controller's ledger heals.
    pub fn held_sha256s(&self) -> Vec<String> {
        let mut state = lock(&self.state);
        state.held.retain(|sha, image| {
            let there = image.path.exists();
            if !there {
                tracing::warn!(sha256 = %sha, path = %image.path.display(), "a pulled image disappeared from disk");
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
        if let Some(image) = state.held.get(&pull.sha256) {
            return Joined::Held(image.clone());
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
        match outcome {
            Ok(image) => {
                state.held.insert(sha256.to_owned(), image.clone());
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

    /// Tries every peer, then the storage proxy, until one serves the right bytes.
    async fn fetch(&self, pull: &ImagePull) -> Result<(Image, Source), PullError> {
        if !is_sha256_hex(&pull.sha256) {
            return Err(PullError::InvalidDigest(pull.sha256.clone()));
        }
        let part = self.part_path(&pull.sha256);
        let mut tried = Vec::new();
        let Some(controller) = &self.controller else {
            tried.push("no controller to ask for peers or the storage proxy".to_owned());
            return Err(PullError::NoSource { tried });
        };
        let peers = match self.peers(controller, &pull.sha256).await {
            Ok(peers) => peers.peers,
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(sha256 = %pull.sha256, %reason, "cannot list peers; trying the storage proxy");
                tried.push(format!("peers: {reason}"));
                Vec::new()
            }
        };
        for peer in peers {
            let url = format!(
                "{}{WORKER_API_PREFIX}/images/{}",
                peer.url.trim_end_matches('/'),
                pull.sha256
            );
            match self.download(&url, controller, pull, &part).await {
                Ok(()) => {
                    let image = self.publish(&part, &pull.sha256, pull.size_bytes).await?;
                    return Ok((
                        image,
                        Source::Peer {
                            worker_id: peer.worker_id,
                        },
                    ));
                }
                Err(e) => {
                    let reason = error_chain(&e);
                    tracing::warn!(sha256 = %pull.sha256, peer = %peer.worker_id, %reason, "peer did not serve the image; trying the next source");
                    tried.push(format!("peer {}: {reason}", peer.worker_id));
                }
            }
        }
        match pull.object_key.as_deref() {
            Some(key) if is_object_key(key) => {
                let url = format!("{}{OBJECTS_PATH}/{key}", controller.url);
                match self.download(&url, controller, pull, &part).await {
                    Ok(()) => {
                        let image = self.publish(&part, &pull.sha256, pull.size_bytes).await?;
                        return Ok((image, Source::Proxy));
                    }
                    Err(e) => tried.push(format!("storage proxy: {}", error_chain(&e))),
                }
            }
            Some(key) => tried.push(format!("storage proxy: invalid object key {key:?}")),
            None => tried.push("storage proxy: the image has no object key".to_owned()),
        }
        Err(PullError::NoSource { tried })
    }

    fn part_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}{PART_SUFFIX}"))
    }

    async fn peers(
        &self,
        controller: &ControllerAccess,
        sha256: &str,
    ) -> Result<PeersResponse, FetchError> {
        let worker_id = self
            .worker_id
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        let url = format!(
            "{}{PEERS_PATH}/{sha256}?worker_id={worker_id}",
            controller.url
        );
        let http_err = |source| FetchError::Http {
            url: url.clone(),
            source,
        };
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&controller.worker_token)
            .timeout(PEERS_TIMEOUT)
            .send()
            .await
            .map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url,
                status: resp.status(),
            });
        }
        resp.json().await.map_err(http_err)
    }

    /// Streams `url` into `part`, checking size and digest; on any failure `part` is gone.
    async fn download(
        &self,
        url: &str,
        controller: &ControllerAccess,
        pull: &ImagePull,
        part: &Path,
    ) -> Result<(), FetchError> {
        let result = self.download_into(url, controller, pull, part).await;
        if result.is_err() {
            remove_quietly_async(part).await;
        }
        result
    }

    async fn download_into(
        &self,
        url: &str,
        controller: &ControllerAccess,
        pull: &ImagePull,
        part: &Path,
    ) -> Result<(), FetchError> {
        let http_err = |source| FetchError::Http {
            url: url.to_owned(),
            source,
        };
        let resp = self
            .http
            .get(url)
            .bearer_auth(&controller.worker_token)
            .send()
            .await
            .map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: resp.status(),
            });
        }
        if let Some(announced) = resp.content_length()
            && announced != pull.size_bytes
        {
            return Err(FetchError::Length {
                url: url.to_owned(),
                announced,
                expected: pull.size_bytes,
            });
        }
        let write_err = |source| FetchError::Write {
            path: part.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::create(part).await.map_err(write_err)?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(http_err)?;
            received = received.saturating_add(chunk.len() as u64);
            if received > pull.size_bytes {
                return Err(FetchError::TooLong {
                    expected: pull.size_bytes,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(write_err)?;
        }
        if received != pull.size_bytes {
            return Err(FetchError::TooShort {
                got: received,
                expected: pull.size_bytes,
            });
        }
        let got = hex::encode(hasher.finalize());
        if got != pull.sha256 {
            return Err(FetchError::Digest { got });
        }
        file.sync_all().await.map_err(write_err)?;
        Ok(())
    }

    /// Moves a verified part file into place, read-only, with its digest cached.
    async fn publish(
        &self,
        part: &Path,
        sha256: &str,
        size_bytes: u64,
    ) -> Result<Image, PullError> {
        let dest = self.dir.join(format!("{sha256}{IMAGE_SUFFIX}"));
        let (part, dir, sha) = (part.to_owned(), self.dir.clone(), sha256.to_owned());
        let path = dest.clone();
        let published = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let result = (|| {
                fs::rename(&part, &path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o444))?;
                // The rename is durable once the directory is synced.
                fs::File::open(&dir)?.sync_all()
            })();
            if result.is_err() {
                remove_quietly(&part);
            }
            result?;
            images::record_digest(&path, &sha);
            Ok(())
        })
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join)));
        published.map_err(|source| PullError::Publish {
            path: dest.clone(),
            source,
        })?;
        Ok(Image {
            name: sha256.to_owned(),
            sha256: sha256.to_owned(),
            size_bytes,
            path: dest,
        })
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
mod tests {
    //! Pulls against in-process fakes at the HTTP seam: one fake serves whichever of the
    //! controller's routes (peers, storage objects) and a peer's route (images) a test fills.

    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    use scaibunker_proto::worker::Peer;

    use super::*;

    const TOKEN: &str = "pull-test-token";

    #[derive(Default)]
    struct Fake {
        peers: Vec<Peer>,
        objects: HashMap<String, Vec<u8>>,
        images: HashMap<String, Vec<u8>>,
        /// Every authorised request's path, in order.
        hits: Mutex<Vec<String>>,
        delay: Duration,
        active: AtomicUsize,
        max_active: AtomicUsize,
    }

    fn authorised(headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"))
    }

    impl Fake {
        async fn answer(
            &self,
            headers: &HeaderMap,
            path: String,
            bytes: Option<&Vec<u8>>,
        ) -> Result<Vec<u8>, StatusCode> {
            if !authorised(headers) {
                return Err(StatusCode::UNAUTHORIZED);
            }
            self.hits.lock().expect("lock").push(path);
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.active.fetch_sub(1, Ordering::SeqCst);
            bytes.cloned().ok_or(StatusCode::NOT_FOUND)
        }

        fn hits(&self) -> Vec<String> {
            self.hits.lock().expect("lock").clone()
        }
    }

    async fn peers(
        State(f): State<Arc<Fake>>,
        headers: HeaderMap,
        UrlPath(sha): UrlPath<String>,
    ) -> Result<axum::Json<PeersResponse>, StatusCode> {
        f.answer(&headers, format!("peers/{sha}"), Some(&Vec::new()))
            .await?;
        Ok(axum::Json(PeersResponse {
            peers: f.peers.clone(),
        }))
    }

    async fn object(
        State(f): State<Arc<Fake>>,
        headers: HeaderMap,
        UrlPath(key): UrlPath<String>,
    ) -> Result<Vec<u8>, StatusCode> {
        f.answer(&headers, format!("objects/{key}"), f.objects.get(&key))
            .await
    }

    async fn image(
        State(f): State<Arc<Fake>>,
        headers: HeaderMap,
        UrlPath(sha): UrlPath<String>,
    ) -> Result<Vec<u8>, StatusCode> {
        f.answer(&headers, format!("images/{sha}"), f.images.get(&sha))
            .await
    }

    /// Serves `fake` on a random port; its base URL.
    async fn serve(fake: Arc<Fake>) -> String {
        let app = axum::Router::new()
            .route("/v1/modules/scaibunker/peers/{sha}", get(peers))
            .route("/v1/modules/scaibunker/storage/objects/{*key}", get(object))
            .route("/v1/worker/images/{sha}", get(image))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// Deterministic bytes of `len`, different for each `seed`.
    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn digest(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn pull_of(b: &[u8], key: Option<&str>) -> ImagePull {
        ImagePull {
            sha256: digest(b),
            size_bytes: b.len() as u64,
            object_key: key.map(str::to_owned),
        }
    }

    fn open(dir: &Path, controller: &str) -> Arc<Pulls> {
        Arc::new(
            Pulls::open(
                dir,
                Some(ControllerAccess {
                    url: controller.to_owned(),
                    worker_token: TOKEN.to_owned(),
                }),
            )
            .expect("open"),
        )
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn peer(id: &str, url: &str) -> Peer {
        Peer {
            worker_id: id.to_owned(),
            url: url.to_owned(),
        }
    }

    #[tokio::test]
    async fn prefers_a_peer_over_the_proxy() {
        let image = bytes(300_000, 1);
        let pull = pull_of(&image, Some("images/img_1.ext4"));
        let peer_fake = Arc::new(Fake {
            images: [(pull.sha256.clone(), image.clone())].into(),
            ..Fake::default()
        });
        let peer_url = serve(Arc::clone(&peer_fake)).await;
        let controller = Arc::new(Fake {
            peers: vec![peer("wrk_peer", &peer_url)],
            objects: [("images/img_1.ext4".to_owned(), image.clone())].into(),
            ..Fake::default()
        });
        let controller_url = serve(Arc::clone(&controller)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pulls = open(dir.path(), &controller_url);

        let got = pulls.pull(pull.clone()).await.expect("pulled");
        assert_eq!(got.sha256, pull.sha256);
        assert_eq!(fs::read(&got.path).expect("read"), image);
        assert!(
            fs::metadata(&got.path)
                .expect("meta")
                .permissions()
                .readonly()
        );
        assert_eq!(controller.hits(), [format!("peers/{}", pull.sha256)]);
        assert_eq!(peer_fake.hits(), [format!("images/{}", pull.sha256)]);
        let c = pulls.counters();
        assert_eq!((c.peer_bytes, c.proxy_bytes), (image.len() as u64, 0));
        assert_eq!((c.completed, c.failed), (1, 0));
        assert_eq!(pulls.held_sha256s(), std::slice::from_ref(&pull.sha256));
        assert!(pulls.take_failures().is_empty());
        assert_eq!(
            files_in(dir.path()),
            [
                format!("{}.ext4", pull.sha256),
                format!("{}.ext4.sha256", pull.sha256)
            ]
        );

        // Held now: asking again fetches nothing, and a restart finds it without hashing
        // (its digest cache is current) and keeps it.
        pulls.request(pull.clone());
        assert_eq!(pulls.pull(pull.clone()).await.expect("held"), got);
        assert_eq!(peer_fake.hits().len(), 1);
        let reopened = open(dir.path(), &controller_url);
        assert_eq!(reopened.lookup(&pull.sha256), Some(got));
    }

    #[tokio::test]
    async fn falls_back_to_the_proxy_when_no_peer_serves_the_right_bytes() {
        let image = bytes(100_000, 2);
        let pull = pull_of(&image, Some("images/img_2.ext4"));
        // One peer does not hold it (404), one serves other bytes of the same length, one
        // serves too many bytes, one is not listening at all.
        let missing = serve(Arc::new(Fake::default())).await;
        let wrong = serve(Arc::new(Fake {
            images: [(pull.sha256.clone(), bytes(100_000, 3))].into(),
            ..Fake::default()
        }))
        .await;
        let long = serve(Arc::new(Fake {
            images: [(pull.sha256.clone(), bytes(100_001, 2))].into(),
            ..Fake::default()
        }))
        .await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            format!("http://{}", l.local_addr().expect("addr"))
        };
        let controller = Arc::new(Fake {
            peers: vec![
                peer("wrk_missing", &missing),
                peer("wrk_wrong", &wrong),
                peer("wrk_long", &long),
                peer("wrk_closed", &closed),
            ],
            objects: [("images/img_2.ext4".to_owned(), image.clone())].into(),
            ..Fake::default()
        });
        let controller_url = serve(Arc::clone(&controller)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pulls = open(dir.path(), &controller_url);

        let got = pulls.pull(pull.clone()).await.expect("pulled");
        assert_eq!(fs::read(&got.path).expect("read"), image);
        assert_eq!(
            controller.hits(),
            [
                format!("peers/{}", pull.sha256),
                "objects/images/img_2.ext4".to_owned()
            ]
        );
        let c = pulls.counters();
        assert_eq!((c.peer_bytes, c.proxy_bytes), (0, image.len() as u64));
        assert!(!files_in(dir.path()).iter().any(|f| f.ends_with(".part")));
    }

    #[tokio::test]
    async fn refuses_wrong_bytes_leaves_nothing_and_reports_the_failure_once() {
        let image = bytes(50_000, 4);
        let pull = pull_of(&image, Some("images/bad.ext4"));
        let controller = Arc::new(Fake {
            // The proxy holds other bytes under the key.
            objects: [("images/bad.ext4".to_owned(), bytes(50_000, 5))].into(),
            ..Fake::default()
        });
        let controller_url = serve(Arc::clone(&controller)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pulls = open(dir.path(), &controller_url);

        let reason = pulls.pull(pull.clone()).await.expect_err("refused");
        assert!(reason.contains("hash to"), "{reason}");
        assert!(
            files_in(dir.path()).is_empty(),
            "{:?}",
            files_in(dir.path())
        );
        assert!(pulls.lookup(&pull.sha256).is_none());
        assert_eq!(pulls.counters().failed, 1);

        // A heartbeat asking again before the failure is reported starts nothing.
        pulls.request(pull.clone());
        assert!(!pulls.is_in_flight(&pull.sha256));
        let failures = pulls.take_failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].sha256, pull.sha256);
        assert!(pulls.take_failures().is_empty(), "reported once");
        assert_eq!(controller.hits().len(), 2, "peers + one object fetch");

        // Once reported, a new request (the image was warmed again) tries again.
        pulls.request(pull.clone());
        assert!(pulls.is_in_flight(&pull.sha256));
    }

    #[tokio::test]
    async fn refuses_short_bodies_bad_digests_and_missing_sources() {
        let image = bytes(10_000, 6);
        let controller = Arc::new(Fake {
            objects: [("images/short.ext4".to_owned(), image[..9_999].to_vec())].into(),
            ..Fake::default()
        });
        let controller_url = serve(Arc::clone(&controller)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pulls = open(dir.path(), &controller_url);

        let short = pull_of(&image, Some("images/short.ext4"));
        let reason = pulls.pull(short).await.expect_err("short");
        assert!(reason.contains("announced 9999 bytes"), "{reason}");
        let no_key = pull_of(&image, None);
        let reason = pulls.pull(no_key).await.expect_err("no source");
        assert!(reason.contains("no object key"), "{reason}");
        let bad_key = pull_of(&image, Some("../etc/passwd"));
        let reason = pulls.pull(bad_key).await.expect_err("bad key");
        assert!(reason.contains("invalid object key"), "{reason}");
        let mut upper = pull_of(&image, Some("images/short.ext4"));
        upper.sha256 = upper.sha256.to_uppercase();
        let reason = pulls.pull(upper).await.expect_err("bad digest");
        assert!(reason.contains("lowercase hex"), "{reason}");
        assert!(files_in(dir.path()).is_empty());

        // Standalone (no controller): nowhere to pull from.
        let alone = Arc::new(Pulls::open(dir.path(), None).expect("open"));
        let reason = alone
            .pull(pull_of(&image, Some("k")))
            .await
            .expect_err("alone");
        assert!(reason.contains("no controller"), "{reason}");
    }

    #[tokio::test]
    async fn callers_share_one_pull_and_at_most_two_run_at_once() {
        let images: Vec<Vec<u8>> = (0..4).map(|i| bytes(20_000, 10 + i)).collect();
        let controller = Arc::new(Fake {
            objects: images
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("images/{i}.ext4"), b.clone()))
                .collect(),
            delay: Duration::from_millis(300),
            ..Fake::default()
        });
        let controller_url = serve(Arc::clone(&controller)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pulls = open(dir.path(), &controller_url);
        let key = |i: usize| format!("images/{i}.ext4");
        let first = pull_of(&images[0], Some(&key(0)));

        // A heartbeat and two creates want the same image at once.
        pulls.request(first.clone());
        assert!(pulls.is_in_flight(&first.sha256));
        let (a, b) = tokio::join!(pulls.pull(first.clone()), pulls.pull(first.clone()));
        assert_eq!(a.expect("a"), b.expect("b"));
        let object_hits = |k: &str| controller.hits().iter().filter(|h| h.ends_with(k)).count();
        assert_eq!(object_hits(&key(0)), 1, "one transfer");

        // Three more images at once: the third waits for a turn.
        let all = (1..4).map(|i| {
            let pulls = Arc::clone(&pulls);
            let p = pull_of(&images[i], Some(&key(i)));
            async move { pulls.pull(p).await }
        });
        let _ = futures_util::future::join_all(all).await;
        for i in 1..4 {
            assert_eq!(object_hits(&key(i)), 1);
        }
        assert_eq!(
            controller.max_active.load(Ordering::SeqCst),
            MAX_CONCURRENT_PULLS
        );
        assert_eq!(pulls.held_sha256s().len(), 4);
    }

    #[tokio::test]
    async fn open_keeps_matching_images_and_deletes_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = bytes(1000, 20);
        let good_sha = digest(&good);
        fs::write(dir.path().join(format!("{good_sha}.ext4")), &good).expect("w");
        let liar = "0".repeat(64);
        fs::write(
            dir.path().join(format!("{liar}.ext4")),
            b"not what the name says",
        )
        .expect("w");
        fs::write(
            dir.path().join(format!("{}.ext4.part", "1".repeat(64))),
            b"half",
        )
        .expect("w");
        fs::write(dir.path().join("notes.txt"), b"left alone").expect("w");

        let pulls = Pulls::open(dir.path(), None).expect("open");
        assert_eq!(pulls.held_sha256s(), std::slice::from_ref(&good_sha));
        assert_eq!(
            files_in(dir.path()),
            [
                format!("{good_sha}.ext4"),
                format!("{good_sha}.ext4.sha256"),
                "notes.txt".to_owned()
            ]
        );
    }

    #[tokio::test]
    async fn shutdown_stops_a_pull_and_deletes_its_part_file() {
        let image = bytes(10_000, 30);
        let controller = Arc::new(Fake {
            objects: [("images/slow.ext4".to_owned(), image.clone())].into(),
            delay: Duration::from_secs(30),
            ..Fake::default()
        });
        let controller_url = serve(Arc::clone(&controller)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pulls = open(dir.path(), &controller_url);
        let waiter = {
            let pulls = Arc::clone(&pulls);
            let pull = pull_of(&image, Some("images/slow.ext4"));
            tokio::spawn(async move { pulls.pull(pull).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        pulls.shutdown();
        let reason = waiter.await.expect("join").expect_err("cancelled");
        assert!(reason.contains("shutting down"), "{reason}");
        assert!(files_in(dir.path()).is_empty());
    }

    #[test]
    fn validates_digests_and_object_keys() {
        assert!(is_sha256_hex(&"ab".repeat(32)));
        for bad in [
            "",
            "AB".repeat(32).as_str(),
            &"a".repeat(63),
            &"g".repeat(64),
        ] {
            assert!(!is_sha256_hex(bad), "{bad}");
        }
        for ok in ["images/img_1/v=2.ext4", "a"] {
            assert!(is_object_key(ok), "{ok}");
        }
        for bad in ["", "a//b", "../x", "a/.hidden", "a b", "a?b", "/a"] {
            assert!(!is_object_key(bad), "{bad}");
        }
    }
}
