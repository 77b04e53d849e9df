//! Exec output past the inline limit: each pipe is returned inline up to the limit, and once
//! a pipe passes it, the whole of that exec's output goes to object storage.
//!
//! 1. Bytes are kept in memory up to the limit ([`Pipe::push`]).
//! 2. The chunk that passes the limit starts an upload of the pipe to
//!    `exec-output/{tenant}/{bunker}/{exec}/{stdout|stderr}`: the kept prefix, then every
//!    chunk as it arrives, through a small bounded channel, so memory stays bounded whatever
//!    the size, and a slow store slows the command (back-pressure to the guest), never the
//!    controller's memory.
//! 3. When the exec ends, a pipe that did not spill while the other did is stored too (from
//!    memory), so `full_output_ref` always names both pipes.
//! 4. A spill that fails (the store is down, past [`MAX_SPILL_BYTES`], past what the tenant's
//!    storage quota leaves, see [`SpillRoom`]) stores nothing, is logged and the result says
//!    `truncated` without `full_output_ref`: the inline part is still right.
//! 5. Each stored pipe is recorded (`store::spills`), so it counts against the tenant's storage
//!    and is deleted with its bunker or after its retention (`service::storage_quota`).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use scaibunker_core::ids::ExecId;
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinHandle;

use super::Services;
use super::auth::{self, Principal};
use super::bunkers::{BunkerError, load};
use crate::objects::{ObjectError, ObjectRead, Objects, PutOutcome};

/// Largest output kept in object storage per pipe.
pub const MAX_SPILL_BYTES: u64 = 8 * 1024 * 1024 * 1024;
/// Chunks in flight between the exec and its upload.
const SPILL_CHANNEL_CHUNKS: usize = 16;

/// The object-key prefix of one exec's full output (its `full_output_ref`).
pub fn output_ref(tenant_id: &str, bunker_id: &str, exec_id: &str) -> String {
    format!("exec-output/{tenant_id}/{bunker_id}/{exec_id}")
}

type Upload = (
    mpsc::Sender<std::io::Result<Bytes>>,
    JoinHandle<Result<PutOutcome, ObjectError>>,
);

/// What the spills of one exec may store together: what the tenant's storage quota leaves,
/// looked up once, when the first of its pipes spills.
pub struct SpillRoom<'a> {
    s: &'a Services,
    tenant_id: &'a str,
    user_id: &'a str,
    left: OnceCell<AtomicU64>,
}

impl<'a> SpillRoom<'a> {
    pub fn new(s: &'a Services, tenant_id: &'a str, user_id: &'a str) -> Self {
        Self {
            s,
            tenant_id,
            user_id,
            left: OnceCell::new(),
        }
    }

    /// Takes `n` bytes of the room; false (and nothing taken) when they do not fit.
    async fn take(&self, n: u64) -> bool {
        let left = self
            .left
            .get_or_init(|| async {
                match super::storage_quota::room(self.s, self.tenant_id, self.user_id).await {
                    Ok(room) => AtomicU64::new(room.remaining_bytes().unwrap_or(u64::MAX)),
                    // Unknown room: no spill rather than an unchecked one.
                    Err(e) => {
                        tracing::warn!(error = ?e, "reading the storage quota failed; not spilling");
                        AtomicU64::new(0)
                    }
                }
            })
            .await;
        left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(n))
            .is_ok()
    }
}

/// One of an exec's output pipes, as it streams.
pub struct Pipe {
    key: String,
    limit: usize,
    kept: Vec<u8>,
    total: u64,
    upload: Option<Upload>,
    failed: bool,
}

/// What a pipe came to.
pub struct PipeEnd {
    pub kept: Vec<u8>,
    pub total: u64,
    /// The whole pipe is in object storage under this key, with this many bytes.
    pub stored: Option<(String, u64)>,
}

impl Pipe {
    pub fn new(key: String, limit: u64) -> Self {
        Self {
            key,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            kept: Vec::new(),
            total: 0,
            upload: None,
            failed: false,
        }
    }

    /// A spill started and has not failed.
    pub fn spilling(&self) -> bool {
        self.upload.is_some() && !self.failed
    }

    /// Takes the next chunk of the pipe.
    pub async fn push(&mut self, room: &SpillRoom<'_>, bytes: Bytes) {
        // Until a spill starts, `kept` holds every byte so far: the upload begins with it.
        if self.upload.is_none()
            && !self.failed
            && self.total + bytes.len() as u64 > self.limit as u64
        {
            self.start(room).await;
        }
        self.total += bytes.len() as u64;
        let kept_room = self.limit.saturating_sub(self.kept.len());
        self.kept
            .extend_from_slice(&bytes[..bytes.len().min(kept_room)]);
        if self.upload.is_some() {
            self.send(room, bytes).await;
        }
    }

    /// Starts the upload with everything kept so far.
    async fn start(&mut self, room: &SpillRoom<'_>) {
        let (tx, mut rx) = mpsc::channel(SPILL_CHANNEL_CHUNKS);
        let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let objects: Objects = room.s.objects().clone();
        let key = self.key.clone();
        let handle =
            tokio::spawn(async move { objects.put_stream(&key, body, MAX_SPILL_BYTES).await });
        self.upload = Some((tx, handle));
        self.send(room, Bytes::copy_from_slice(&self.kept)).await;
    }

    async fn send(&mut self, room: &SpillRoom<'_>, bytes: Bytes) {
        if self.failed {
            return;
        }
        // Past the tenant's storage quota the upload is failed, so nothing of it is kept.
        let item = if room.take(bytes.len() as u64).await {
            Ok(bytes)
        } else {
            self.failed = true;
            Err(std::io::Error::other(
                "the tenant's storage quota has no room for this output",
            ))
        };
        if let Some((tx, _)) = &self.upload
            && tx.send(item).await.is_err()
        {
            // The upload ended early; `finish` reports why.
            self.failed = true;
        }
    }

    /// Ends the pipe; with `store`, a pipe that did not spill is stored from memory.
    pub async fn finish(mut self, room: &SpillRoom<'_>, store: bool) -> PipeEnd {
        if store && self.upload.is_none() && !self.failed {
            self.start(room).await;
        }
        let mut stored = None;
        if let Some((tx, handle)) = self.upload.take() {
            drop(tx);
            match handle.await {
                Ok(Ok(put)) if !self.failed => stored = Some((self.key.clone(), put.size_bytes)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(key = self.key, error = %e, "spilling exec output failed")
                }
                Err(e) => tracing::warn!(key = self.key, error = %e, "the spill task failed"),
            }
        }
        PipeEnd {
            kept: self.kept,
            total: self.total,
            stored,
        }
    }
}

/// Which pipe `GET …/exec/{exec_id}/output` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPipe {
    Stdout,
    Stderr,
}

impl OutputPipe {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stdout" => Some(Self::Stdout),
            "stderr" => Some(Self::Stderr),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// The stored output of one pipe of one exec of the caller's tenant's bunker (any status).
pub async fn read(
    s: &Services,
    p: &Principal,
    bunker_id: &str,
    exec_id: &str,
    pipe: OutputPipe,
) -> Result<ObjectRead, BunkerError> {
    if !p.has(auth::EXECUTE) {
        return Err(BunkerError::PermissionDenied(auth::EXECUTE));
    }
    let row = load(s, p, bunker_id).await?;
    if ExecId::parse(exec_id).is_err() {
        return Err(BunkerError::OutputNotFound);
    }
    let key = format!(
        "{}/{}",
        output_ref(&row.tenant_id, &row.id, exec_id),
        pipe.as_str()
    );
    match s.objects().get_stream(&key).await {
        Ok(read) => Ok(read),
        Err(ObjectError::NotFound(_)) => Err(BunkerError::OutputNotFound),
        Err(e) => Err(BunkerError::Objects(e)),
    }
}
