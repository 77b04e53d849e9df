//! The host side of the worker ↔ agent protocol ([`scaibunker_proto::agent`]).
//!
//! 1. [`AgentClient::connect`] accepts QEMU's connection on the bunker's `agent.sock` and
//!    waits for the agent's `HELLO`; a protocol version other than ours is refused.
//! 2. A reader task parses frames and routes each by `stream_id` to that stream's bounded
//!    channel. A `REPLY` ends its stream. A second `HELLO` (the agent reopened its port)
//!    resets every open stream.
//! 3. Operations open a stream with a fresh non-zero id, write frames through one writer
//!    behind a lock (one `write_all` per frame, so frames never interleave), and read their
//!    channel until the `REPLY`.
//! 4. An operation abandoned before its `REPLY` (the caller went away, a deadline passed)
//!    sends `CANCEL`, so the agent kills what the stream runs.
//! 5. When the byte stream ends or breaks, every open stream fails with
//!    [`AgentError::Unavailable`], and so does every later operation.
//! 6. When the byte stream stops parsing (a header of an unknown kind or over the frame
//!    limit), the reader fails the open streams, sends `RESET` and skips to the agent's
//!    next `HELLO` ([`reader`]); operations started meanwhile wait for it (up to
//!    [`RESYNC_WAIT`]). The bunker stays usable while its VM runs.
//! 7. No frame over the limit is ever sent: a request that does not fit one frame fails
//!    with [`AgentError::RequestTooLarge`] before anything is written.
//!
//! Flow control is per stream (the protocol's window, [`STREAM_WINDOW_FRAMES`]): the agent
//! sends a stream's output only as far as the worker has granted, and a stream grants
//! frames back (`CREDIT`) as its consumer takes them. A consumer that stops reading (a slow
//! HTTP download, a slow exec reader, a shell's client) therefore stalls its own stream in
//! the guest and nothing else; the reader task never waits for a consumer. Each stream's
//! buffer holds a whole window, so a frame that does not fit means the agent ignored the
//! window: that stream is cancelled ([`AgentError::WindowExceeded`]).
//!
//! Streams the guest opens (the backchannel, protocol rule 10) live in their own id space
//! and table ([`api`]): the reader assembles each request and hands it, whole, to the
//! receiver [`AgentClient::take_api_calls`] gives out; past the in-flight cap it answers
//! `429` itself.
//!
//! Exec is one code path: [`AgentClient::exec_stream`] yields output frame by frame
//! ([`ExecStream`]); [`AgentClient::exec`] collects that stream up to the output limit;
//! [`AgentClient::shell`] is an exec on a pseudo-terminal whose input ([`ShellInput`]) the
//! caller feeds as it goes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use scaibunker_proto::agent::{
    AgentErrorCode, Frame, FrameError, FrameKind, GUEST_STREAM_BIT, GuestUser, Hello,
    PROTOCOL_VERSION, Program, Reply, Request, STREAM_WINDOW_FRAMES, WindowSize, is_guest_stream,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod api;
mod exec;
mod files;
mod reader;
mod stream;
#[cfg(test)]
mod tests;

pub use self::api::{ApiCall, ApiResponder, error_body};
pub use self::exec::{ExecEvent, ExecExit, ExecStream, ShellInput};
pub use self::files::DirPage;
use self::reader::FrameReader;
use self::stream::{OpenStream, StreamSender};

/// Frames buffered per stream: a whole window of output and its `REPLY`.
pub const STREAM_BUFFER_FRAMES: usize = STREAM_WINDOW_FRAMES as usize + 1;
/// Frames a consumer takes before they are granted back in one `CREDIT`.
const CREDIT_BATCH: u32 = STREAM_WINDOW_FRAMES / 4;
/// How long a file or directory operation may wait for the agent's next frame.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Slack over an exec's own timeout before the worker stops waiting for the agent, which
/// enforces the timeout itself and then still has to report.
pub const EXEC_GRACE: Duration = Duration::from_secs(30);
/// How long an operation waits for a channel that is resynchronising (rule 6).
pub const RESYNC_WAIT: Duration = Duration::from_secs(10);
/// Fewest seconds between two warnings about one channel's resynchronisations, so a guest
/// that sends garbage cannot flood the worker's log.
const RESYNC_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("accept the agent channel connection")]
    Accept(#[source] std::io::Error),
    #[error("the agent channel closed before the agent said hello")]
    Closed,
    #[error("read the agent's hello")]
    Frame(#[source] FrameError),
    #[error("the agent's hello is malformed")]
    BadHello(#[source] FrameError),
    #[error("the agent speaks protocol version {agent}, this worker speaks {worker}")]
    VersionMismatch { agent: u32, worker: u32 },
}

/// Why an agent operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The channel is gone (VM stopped, agent crashed or restarted).
    #[error("agent unavailable: {0}")]
    Unavailable(String),
    /// The agent answered with an error.
    #[error("agent error {code:?}: {message}")]
    Agent {
        code: AgentErrorCode,
        message: String,
    },
    #[error("agent protocol violation on stream {stream_id}: {detail}")]
    Protocol { stream_id: u32, detail: String },
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// The agent sent more than the stream's window; the stream was cancelled.
    #[error("the agent sent past the stream's flow-control window; the stream was cancelled")]
    WindowExceeded,
    /// The request does not fit one frame; nothing was sent.
    #[error("the request is {0} bytes encoded, over the agent channel's frame limit")]
    RequestTooLarge(usize),
}

/// Why an upload failed: its body, or the agent.
#[derive(Debug, thiserror::Error)]
pub enum WriteFileError<E> {
    #[error("read the upload body")]
    Body(#[source] E),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    pub program: Program,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: GuestUser,
    /// Bytes fed to stdin, then closed; `None` makes stdin `/dev/null`.
    pub stdin: Option<Bytes>,
    pub timeout: Duration,
    /// Each of stdout and stderr is kept up to this many bytes; the rest is only counted.
    pub output_limit_bytes: u64,
}

/// An interactive program on a terminal in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellSpec {
    pub program: Program,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: GuestUser,
    pub size: WindowSize,
    /// The session is killed after this long.
    pub timeout: Duration,
}

/// What an exec produced, collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Guest time from spawn to exit.
    pub duration_ms: u64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_total_bytes: u64,
    pub stderr_total_bytes: u64,
}

/// A file's bytes, as the agent sends them.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, AgentError>> + Send>>;

/// A connected agent. Cheap to clone; the channel closes when the last clone is dropped.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("hello", &self.hello())
            .finish_non_exhaustive()
    }
}

struct Shared {
    writer: Arc<Writer>,
    router: Arc<Router>,
    next_id: AtomicU32,
    reader: JoinHandle<()>,
    /// The guest's calls, until someone takes them to serve.
    api_calls: Mutex<Option<mpsc::Receiver<ApiCall>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

type Writer = tokio::sync::Mutex<OwnedWriteHalf>;

/// The routing table the reader task fills and operations drain.
struct Router {
    table: Mutex<RouteTable>,
    /// Guest-opened streams (rule 10), apart from the worker's.
    api: Mutex<api::ApiTable>,
    hello: Mutex<Hello>,
    /// `false` while the reader skips to the agent's next `HELLO` (rule 6).
    in_sync: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct RouteTable {
    open: HashMap<u32, mpsc::Sender<Frame>>,
    /// Streams cancelled because the agent broke their window, until the consumer learns it.
    stalled: HashSet<u32>,
    /// Set once the channel is gone; says why.
    closed: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The table stays consistent across a panic: every update is a single insert/remove.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Router {
    fn close(&self, reason: String) {
        let mut table = lock(&self.table);
        if table.closed.is_none() {
            table.closed = Some(reason);
        }
        // Dropping the senders wakes every consumer, which then reads `closed`.
        table.open.clear();
        drop(table);
        lock(&self.api).reset();
    }

    /// Fails every open stream (the agent reset them, or is about to).
    fn reset_streams(&self) {
        lock(&self.table).open.clear();
        lock(&self.api).reset();
    }

    /// Waits until the channel is in step, for at most [`RESYNC_WAIT`].
    async fn wait_in_sync(&self) -> Result<(), AgentError> {
        let mut in_sync = self.in_sync.subscribe();
        match tokio::time::timeout(RESYNC_WAIT, in_sync.wait_for(|ok| *ok)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(AgentError::Unavailable(
                "the agent channel is resynchronising".to_owned(),
            )),
        }
    }

    fn unavailable(&self) -> AgentError {
        let reason = lock(&self.table)
            .closed
            .clone()
            .unwrap_or_else(|| "the agent restarted and reset its streams".to_owned());
        AgentError::Unavailable(reason)
    }
}

async fn write_frame(writer: &Writer, frame: &Frame) -> std::io::Result<()> {
    let bytes = frame.encode();
    writer.lock().await.write_all(&bytes).await
}

impl AgentClient {
    /// Accepts the VM's connection on `listener` and waits for the agent's `HELLO`.
    /// Callers bound the wait (the boot timeout) and race it against the VM exiting.
    pub async fn connect(listener: &UnixListener) -> Result<Self, ConnectError> {
        let (stream, _) = listener.accept().await.map_err(ConnectError::Accept)?;
        let (read, write) = stream.into_split();
        let mut read = FrameReader::new(read);
        let hello = loop {
            let frame = read
                .next()
                .await
                .map_err(ConnectError::Frame)?
                .ok_or(ConnectError::Closed)?;
            if frame.stream_id == 0 && frame.kind == FrameKind::Hello {
                break check_hello(&frame)?;
            }
            tracing::warn!(stream_id = frame.stream_id, kind = ?frame.kind, "frame before hello ignored");
        };
        let writer = Arc::new(tokio::sync::Mutex::new(write));
        let (api_table, api_calls) = api::ApiTable::new();
        let router = Arc::new(Router {
            table: Mutex::new(RouteTable::default()),
            api: Mutex::new(api_table),
            hello: Mutex::new(hello),
            in_sync: tokio::sync::watch::Sender::new(true),
        });
        let reader = tokio::spawn(read_loop(read, Arc::clone(&router), Arc::clone(&writer)));
        Ok(Self {
            shared: Arc::new(Shared {
                writer,
                router,
                next_id: AtomicU32::new(1),
                reader,
                api_calls: Mutex::new(Some(api_calls)),
            }),
        })
    }

    /// The agent's latest hello.
    pub fn hello(&self) -> Hello {
        lock(&self.shared.router.hello).clone()
    }

    /// Closes the channel now, whatever other clones (operations in flight) still hold it:
    /// the guest sees the host side go away, its agent resets the session (in-flight
    /// commands are killed) and reopens its port for a new `HELLO`.
    pub async fn close(&self, reason: &str) {
        self.shared.router.close(reason.to_owned());
        self.shared.reader.abort();
        let shutdown = async { self.shared.writer.lock().await.shutdown().await };
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), shutdown).await {
            tracing::debug!(error = %e, "shut down the agent channel");
        }
    }

    /// The guest's backchannel calls on this channel; `Some` only for the first caller.
    /// Calls nobody takes are answered `503`.
    pub fn take_api_calls(&self) -> Option<mpsc::Receiver<ApiCall>> {
        lock(&self.shared.api_calls).take()
    }

    /// Why the channel closed, once it has.
    pub fn closed_reason(&self) -> Option<String> {
        lock(&self.shared.router.table).closed.clone()
    }
}

impl AgentClient {
    /// Gives a restored guest its own host name and machine id, and credits `seed` to its
    /// entropy pool with a reseed (see [`Request::SetIdentity`]).
    pub async fn set_identity(
        &self,
        hostname: &str,
        machine_id: &str,
        seed: &[u8],
    ) -> Result<(), AgentError> {
        let request = Request::SetIdentity {
            hostname: hostname.to_owned(),
            machine_id: machine_id.to_owned(),
            seed_hex: hex::encode(seed),
        };
        match self.call(&request).await? {
            Reply::Done => Ok(()),
            other => Err(protocol(0, &format!("set_identity answered {other:?}"))),
        }
    }

    /// Grows the guest's root filesystem to fill its disk once the disk is `disk_bytes`
    /// (see [`Request::GrowRootFs`]).
    pub async fn grow_root_fs(&self, disk_bytes: u64) -> Result<(), AgentError> {
        match self.call(&Request::GrowRootFs { disk_bytes }).await? {
            Reply::Done => Ok(()),
            other => Err(protocol(0, &format!("grow_root_fs answered {other:?}"))),
        }
    }

    /// A request without a body whose only answer is its `REPLY`.
    async fn call(&self, request: &Request) -> Result<Reply, AgentError> {
        let mut stream = self.open(request).await?;
        let frame = stream.recv_within(REPLY_TIMEOUT).await?;
        stream.expect_reply(&frame)
    }

    /// Registers a fresh stream and sends its `REQUEST`.
    async fn open(&self, request: &Request) -> Result<OpenStream, AgentError> {
        let mut frame = Frame::try_json(0, FrameKind::Request, request).map_err(|e| match e {
            FrameError::TooLarge(n) => AgentError::RequestTooLarge(n),
            other => protocol(0, &other.to_string()),
        })?;
        self.shared.router.wait_in_sync().await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER_FRAMES);
        let id = {
            let mut table = lock(&self.shared.router.table);
            if let Some(reason) = &table.closed {
                return Err(AgentError::Unavailable(reason.clone()));
            }
            let id = loop {
                // The worker's ids never carry the guest's bit (rule 10).
                let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) & !GUEST_STREAM_BIT;
                if id != 0 && !table.open.contains_key(&id) {
                    break id;
                }
            };
            table.open.insert(id, tx);
            id
        };
        frame.stream_id = id;
        let stream = OpenStream {
            sender: StreamSender {
                id,
                writer: Arc::clone(&self.shared.writer),
                router: Arc::clone(&self.shared.router),
            },
            rx,
            finished: false,
            consumed: 0,
        };
        stream.sender.write(&frame).await?;
        Ok(stream)
    }
}

fn check_hello(frame: &Frame) -> Result<Hello, ConnectError> {
    let hello: Hello = frame.decode_json().map_err(ConnectError::BadHello)?;
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(ConnectError::VersionMismatch {
            agent: hello.protocol_version,
            worker: PROTOCOL_VERSION,
        });
    }
    Ok(hello)
}

fn protocol(stream_id: u32, detail: &str) -> AgentError {
    AgentError::Protocol {
        stream_id,
        detail: detail.to_owned(),
    }
}

/// The reader task: routes frames until the byte stream ends, then closes the router.
async fn read_loop(mut read: FrameReader<OwnedReadHalf>, router: Arc<Router>, writer: Arc<Writer>) {
    let mut last_warning: Option<tokio::time::Instant> = None;
    let reason = loop {
        let frame = match read.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the agent channel closed".to_owned(),
            Err(FrameError::Io(e)) => break format!("agent channel read failed: {e}"),
            // A bad header leaves the byte stream out of step: resynchronise (rule 6).
            Err(e) => match resync(&mut read, &router, &writer, &e, &mut last_warning).await {
                Ok(()) => continue,
                Err(reason) => break reason,
            },
        };
        if frame.stream_id == 0 {
            if frame.kind == FrameKind::Hello {
                match check_hello(&frame) {
                    Ok(hello) => {
                        tracing::info!(agent_version = %hello.agent_version, "agent said hello again; open streams reset");
                        *lock(&router.hello) = hello;
                        router.reset_streams();
                        continue;
                    }
                    Err(e) => break format!("agent restarted with a bad hello: {e}"),
                }
            }
            tracing::warn!(kind = ?frame.kind, "ignoring a frame on stream 0");
            continue;
        }
        if is_guest_stream(frame.stream_id) {
            api::route(&router, &writer, frame);
            continue;
        }
        route(&router, &writer, frame);
    };
    tracing::debug!(%reason, "agent channel reader stopped");
    router.close(reason);
}

/// Brings the channel back in step after a frame that did not parse: open streams fail,
/// the agent is asked to reset, and the reader skips to its next `HELLO`. `Err` with the
/// reason when the channel ended instead.
async fn resync(
    read: &mut FrameReader<OwnedReadHalf>,
    router: &Router,
    writer: &Writer,
    cause: &FrameError,
    last_warning: &mut Option<tokio::time::Instant>,
) -> Result<(), String> {
    let now = tokio::time::Instant::now();
    if last_warning.is_none_or(|t| now.duration_since(t) >= RESYNC_LOG_EVERY) {
        *last_warning = Some(now);
        tracing::warn!(error = %cause, "the agent channel is out of step; resetting the agent session");
    }
    router.in_sync.send_replace(false);
    router.reset_streams();
    if let Err(e) = write_frame(writer, &Frame::new(0, FrameKind::Reset, Vec::new())).await {
        return Err(format!("agent channel write failed: {e}"));
    }
    match read.resync().await {
        Ok(Some(hello)) => {
            tracing::info!(agent_version = %hello.agent_version, "the agent channel is back in step");
            *lock(&router.hello) = hello;
            router.in_sync.send_replace(true);
            Ok(())
        }
        Ok(None) => Err("the agent channel closed while resynchronising".to_owned()),
        Err(e) => Err(format!("agent channel read failed: {e}")),
    }
}

fn route(router: &Router, writer: &Arc<Writer>, frame: Frame) {
    let id = frame.stream_id;
    let is_reply = frame.kind == FrameKind::Reply;
    let tx = {
        let mut table = lock(&router.table);
        if is_reply {
            table.open.remove(&id)
        } else {
            table.open.get(&id).cloned()
        }
    };
    // Frames of streams we cancelled or finished are late arrivals: drop them.
    let Some(tx) = tx else { return };
    match tx.try_send(frame) {
        Ok(()) => {}
        // The consumer is gone; its stream guard has cancelled it.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(
                stream_id = id,
                "the agent sent past the stream's window; cancelling the stream"
            );
            {
                let mut table = lock(&router.table);
                table.open.remove(&id);
                table.stalled.insert(id);
            }
            let writer = Arc::clone(writer);
            tokio::spawn(async move {
                let _ = write_frame(&writer, &Frame::new(id, FrameKind::Cancel, Vec::new())).await;
            });
        }
    }
}
