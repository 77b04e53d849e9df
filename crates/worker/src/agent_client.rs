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
//!
//! Flow control is per stream (the protocol's window, [`STREAM_WINDOW_FRAMES`]): the agent
//! sends a stream's output only as far as the worker has granted, and a stream grants
//! frames back (`CREDIT`) as its consumer takes them. A consumer that stops reading (a slow
//! HTTP download, a slow exec reader, a shell's client) therefore stalls its own stream in
//! the guest and nothing else; the reader task never waits for a consumer. Each stream's
//! buffer holds a whole window, so a frame that does not fit means the agent ignored the
//! window: that stream is cancelled ([`AgentError::WindowExceeded`]).
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
use futures_util::{Stream, StreamExt};
use scaibunker_proto::agent::{
    AgentErrorCode, DirEntry, Frame, FrameError, FrameKind, GuestUser, HEADER_LEN, Hello,
    MAX_FRAME_PAYLOAD, PROTOCOL_VERSION, Program, Reply, Request, STREAM_WINDOW_FRAMES, Stdin,
    WindowSize,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Frames buffered per stream: a whole window of output and its `REPLY`.
pub const STREAM_BUFFER_FRAMES: usize = STREAM_WINDOW_FRAMES as usize + 1;
/// Frames a consumer takes before they are granted back in one `CREDIT`.
const CREDIT_BATCH: u32 = STREAM_WINDOW_FRAMES / 4;
/// How long a file or directory operation may wait for the agent's next frame.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Slack over an exec's own timeout before the worker stops waiting for the agent, which
/// enforces the timeout itself and then still has to report.
pub const EXEC_GRACE: Duration = Duration::from_secs(30);

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
    hello: Mutex<Hello>,
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

/// Reads one frame; `Ok(None)` when the peer closed the stream.
async fn read_frame(reader: &mut OwnedReadHalf) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let (stream_id, kind, len) = Frame::parse_header(&header)?;
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .await
        .map_err(FrameError::Io)?;
    Ok(Some(Frame::new(stream_id, kind, payload)))
}

impl AgentClient {
    /// Accepts the VM's connection on `listener` and waits for the agent's `HELLO`.
    /// Callers bound the wait (the boot timeout) and race it against the VM exiting.
    pub async fn connect(listener: &UnixListener) -> Result<Self, ConnectError> {
        let (stream, _) = listener.accept().await.map_err(ConnectError::Accept)?;
        let (mut read, write) = stream.into_split();
        let hello = loop {
            let frame = read_frame(&mut read)
                .await
                .map_err(ConnectError::Frame)?
                .ok_or(ConnectError::Closed)?;
            if frame.stream_id == 0 && frame.kind == FrameKind::Hello {
                break check_hello(&frame)?;
            }
            tracing::warn!(stream_id = frame.stream_id, kind = ?frame.kind, "frame before hello ignored");
        };
        let writer = Arc::new(tokio::sync::Mutex::new(write));
        let router = Arc::new(Router {
            table: Mutex::new(RouteTable::default()),
            hello: Mutex::new(hello),
        });
        let reader = tokio::spawn(read_loop(read, Arc::clone(&router), Arc::clone(&writer)));
        Ok(Self {
            shared: Arc::new(Shared {
                writer,
                router,
                next_id: AtomicU32::new(1),
                reader,
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

    /// Why the channel closed, once it has.
    pub fn closed_reason(&self) -> Option<String> {
        lock(&self.shared.router.table).closed.clone()
    }

    /// Runs a command and collects its output, keeping each pipe up to the spec's limit.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecOutcome, AgentError> {
        let limit = spec.output_limit_bytes;
        let mut events = self.exec_stream(spec).await?;
        let mut stdout = Kept::default();
        let mut stderr = Kept::default();
        loop {
            match events.next().await {
                Some(Ok(ExecEvent::Stdout(bytes))) => stdout.push(&bytes, limit),
                Some(Ok(ExecEvent::Stderr(bytes))) => stderr.push(&bytes, limit),
                Some(Ok(ExecEvent::Exited(exit))) => {
                    return Ok(ExecOutcome {
                        exit_code: exit.exit_code,
                        signal: exit.signal,
                        timed_out: exit.timed_out,
                        duration_ms: exit.duration_ms,
                        stdout: stdout.0,
                        stderr: stderr.0,
                        stdout_total_bytes: exit.stdout_total_bytes,
                        stderr_total_bytes: exit.stderr_total_bytes,
                    });
                }
                Some(Err(e)) => return Err(e),
                None => return Err(protocol(events.id(), "exec stream ended without an exit")),
            }
        }
    }

    /// Starts a command and hands back its output as it is produced ([`ExecStream`]).
    /// Fails here only if the request cannot be sent; everything after, including a
    /// program that cannot be spawned, comes through the stream. The spec's
    /// `output_limit_bytes` is not applied: every byte is passed on.
    pub async fn exec_stream(&self, spec: ExecSpec) -> Result<ExecStream, AgentError> {
        let request = Request::Exec {
            program: spec.program,
            env: spec.env,
            cwd: spec.cwd,
            user: spec.user,
            stdin: if spec.stdin.is_some() {
                Stdin::Stream
            } else {
                Stdin::Null
            },
            timeout_ms: millis(spec.timeout),
            pty: None,
        };
        let stream = self.open(&request).await?;
        if let Some(stdin) = spec.stdin {
            // stdin and output flow at once: a command may fill its output before reading
            // its input. The feed runs on its own so that a consumer that reads slowly
            // never leaves it parked holding the writer lock halfway through a frame.
            tokio::spawn(feed_stdin(stream.sender(), stdin));
        }
        Ok(ExecStream::new(stream, spec.timeout))
    }

    /// Starts an interactive program on a new terminal of `spec.size`. The terminal's output
    /// comes through the [`ExecStream`] (as `Stdout`), then the exit; keystrokes and resizes
    /// go through the [`ShellInput`]. Dropping the stream ends the session (its whole
    /// process group is killed).
    pub async fn shell(&self, spec: ShellSpec) -> Result<(ShellInput, ExecStream), AgentError> {
        let request = Request::Exec {
            program: spec.program,
            env: spec.env,
            cwd: spec.cwd,
            user: spec.user,
            stdin: Stdin::Stream,
            timeout_ms: millis(spec.timeout),
            pty: Some(spec.size),
        };
        let stream = self.open(&request).await?;
        let input = ShellInput {
            sender: stream.sender(),
        };
        Ok((input, ExecStream::new(stream, spec.timeout)))
    }

    /// Streams `body` into `path` (written atomically by the agent). If the body fails, the
    /// upload is cancelled so the agent removes its temporary file.
    pub async fn write_file<S, E>(
        &self,
        path: String,
        mode: u32,
        body: S,
    ) -> Result<u64, WriteFileError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
    {
        self.upload(&Request::WriteFile { path, mode }, body).await
    }

    /// Streams a tar `body` into the directory `path`; the agent unpacks it all or nothing.
    /// Returns the number of archive bytes sent.
    pub async fn write_archive<S, E>(&self, path: String, body: S) -> Result<u64, WriteFileError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
    {
        self.upload(&Request::WriteArchive { path }, body).await
    }

    /// Sends `request` and `body` as its `DATA` frames; cancels the stream if the body fails.
    async fn upload<S, E>(&self, request: &Request, body: S) -> Result<u64, WriteFileError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
    {
        let mut stream = self.open(request).await?;
        let sender = stream.sender();
        let mut body = std::pin::pin!(body);
        loop {
            tokio::select! {
                biased;
                // The agent may refuse before the body ends (bad path, full disk).
                frame = stream.recv() => {
                    let frame = frame?;
                    return Err(stream.early_reply(&frame).into());
                }
                chunk = body.next() => match chunk {
                    Some(Ok(bytes)) => {
                        for part in bytes.chunks(MAX_FRAME_PAYLOAD) {
                            sender.send(FrameKind::Data, part.to_vec()).await?;
                        }
                    }
                    Some(Err(e)) => {
                        stream.cancel_and_drain().await;
                        return Err(WriteFileError::Body(e));
                    }
                    None => break,
                },
            }
        }
        sender.send(FrameKind::End, Vec::new()).await?;
        let frame = stream.recv_within(REPLY_TIMEOUT).await?;
        match stream.expect_reply(&frame)? {
            Reply::Written { size_bytes } => Ok(size_bytes),
            other => Err(stream.unexpected(&format!("reply {other:?}")).into()),
        }
    }

    /// Opens `path` for reading. Errors the agent reports before the first byte (not found,
    /// a directory) come back here, so callers can answer before they start streaming.
    pub async fn read_file(&self, path: String) -> Result<ByteStream, AgentError> {
        self.download(&Request::ReadFile { path }).await
    }

    /// A tar stream of the directory `path`; errors before the first byte come back here.
    pub async fn read_archive(&self, path: String) -> Result<ByteStream, AgentError> {
        self.download(&Request::ReadArchive { path }).await
    }

    async fn download(&self, request: &Request) -> Result<ByteStream, AgentError> {
        let mut stream = self.open(request).await?;
        let first = stream.recv_within(REPLY_TIMEOUT).await?;
        let first = match first.kind {
            FrameKind::Data => Some(Bytes::from(first.payload)),
            FrameKind::Reply => match stream.reply(&first)? {
                Reply::Read { .. } => None,
                other => return Err(stream.unexpected(&format!("reply {other:?}"))),
            },
            other => return Err(stream.unexpected(&format!("{other:?} frame"))),
        };
        let Some(first) = first else {
            return Ok(Box::pin(futures_util::stream::empty()));
        };
        let rest = futures_util::stream::unfold(Some(stream), |state| async move {
            let mut stream = state?;
            let item = match stream.recv_within(REPLY_TIMEOUT).await {
                Ok(frame) if frame.kind == FrameKind::Data => Ok(Some(Bytes::from(frame.payload))),
                Ok(frame) if frame.kind == FrameKind::Reply => match stream.reply(&frame) {
                    Ok(Reply::Read { .. }) => Ok(None),
                    Ok(other) => Err(stream.unexpected(&format!("reply {other:?}"))),
                    Err(e) => Err(e),
                },
                Ok(frame) => Err(stream.unexpected(&format!("{:?} frame", frame.kind))),
                Err(e) => Err(e),
            };
            match item {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(stream))),
                Ok(None) => None,
                // One error, then the end; dropping the stream cancels it if still open.
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(Box::pin(
            futures_util::stream::once(async move { Ok(first) }).chain(rest),
        ))
    }

    pub async fn list_dir(&self, path: String) -> Result<Vec<DirEntry>, AgentError> {
        match self.call(&Request::ListDir { path }).await? {
            Reply::Listing { entries } => Ok(entries),
            other => Err(protocol(0, &format!("list_dir answered {other:?}"))),
        }
    }

    pub async fn remove(&self, path: String, recursive: bool) -> Result<(), AgentError> {
        match self.call(&Request::Remove { path, recursive }).await? {
            Reply::Removed => Ok(()),
            other => Err(protocol(0, &format!("remove answered {other:?}"))),
        }
    }

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

    /// A request without a body whose only answer is its `REPLY`.
    async fn call(&self, request: &Request) -> Result<Reply, AgentError> {
        let mut stream = self.open(request).await?;
        let frame = stream.recv_within(REPLY_TIMEOUT).await?;
        stream.expect_reply(&frame)
    }

    /// Registers a fresh stream and sends its `REQUEST`.
    async fn open(&self, request: &Request) -> Result<OpenStream, AgentError> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER_FRAMES);
        let id = {
            let mut table = lock(&self.shared.router.table);
            if let Some(reason) = &table.closed {
                return Err(AgentError::Unavailable(reason.clone()));
            }
            let id = loop {
                let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                if id != 0 && !table.open.contains_key(&id) {
                    break id;
                }
            };
            table.open.insert(id, tx);
            id
        };
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
        stream
            .sender
            .write(&Frame::json(id, FrameKind::Request, request))
            .await?;
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
async fn read_loop(mut read: OwnedReadHalf, router: Arc<Router>, writer: Arc<Writer>) {
    let reason = loop {
        let frame = match read_frame(&mut read).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the agent channel closed".to_owned(),
            Err(FrameError::Io(e)) => break format!("agent channel read failed: {e}"),
            // A bad header leaves the byte stream out of step: nothing after it can be trusted.
            Err(e) => break format!("agent sent a malformed frame: {e}"),
        };
        if frame.stream_id == 0 {
            if frame.kind == FrameKind::Hello {
                match check_hello(&frame) {
                    Ok(hello) => {
                        tracing::info!(agent_version = %hello.agent_version, "agent said hello again; open streams reset");
                        *lock(&router.hello) = hello;
                        lock(&router.table).open.clear();
                        continue;
                    }
                    Err(e) => break format!("agent restarted with a bad hello: {e}"),
                }
            }
            tracing::warn!(kind = ?frame.kind, "ignoring a frame on stream 0");
            continue;
        }
        route(&router, &writer, frame);
    };
    tracing::debug!(%reason, "agent channel reader stopped");
    router.close(reason);
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

/// The kept prefix of one exec pipe.
#[derive(Default)]
struct Kept(Vec<u8>);

impl Kept {
    fn push(&mut self, bytes: &[u8], limit: u64) {
        let room = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.0.len());
        self.0.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// Sends an exec's stdin as `DATA` frames and one `END`. Stops early once the stream is
/// over (the command exited, or the stream was cancelled), always between frames.
async fn feed_stdin(sender: StreamSender, stdin: Bytes) {
    let frames = stdin
        .chunks(MAX_FRAME_PAYLOAD)
        .map(|chunk| (FrameKind::Data, chunk))
        .chain([(FrameKind::End, &[][..])]);
    for (kind, payload) in frames {
        if !sender.is_open() {
            tracing::debug!(
                stream_id = sender.id,
                "exec ended before its stdin was sent"
            );
            return;
        }
        if let Err(e) = sender.send(kind, payload.to_vec()).await {
            // The consumer sees the same failure on its side of the stream.
            tracing::debug!(stream_id = sender.id, error = %e, "feeding stdin failed");
            return;
        }
    }
}

/// One step of a running exec, in the order the agent sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// One `STDOUT` frame's bytes.
    Stdout(Bytes),
    /// One `STDERR` frame's bytes.
    Stderr(Bytes),
    /// The last event.
    Exited(ExecExit),
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecExit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Guest time from spawn to exit.
    pub duration_ms: u64,
    pub stdout_total_bytes: u64,
    pub stderr_total_bytes: u64,
}

/// A running exec's output, frame by frame, then its exit or one error.
///
/// Reading is pulling: the agent channel's reader pushes into this stream's bounded buffer
/// ([`STREAM_BUFFER_FRAMES`]), and waits while it is full (see the module's flow control).
/// Dropped before its end, the exec is cancelled.
pub struct ExecStream {
    stream: OpenStream,
    /// When the worker stops waiting: the exec's timeout plus [`EXEC_GRACE`] from its start.
    deadline: tokio::time::Instant,
    limit: Duration,
    stdout_total_bytes: u64,
    stderr_total_bytes: u64,
    ended: bool,
}

impl ExecStream {
    fn new(stream: OpenStream, timeout: Duration) -> Self {
        let limit = timeout.saturating_add(EXEC_GRACE);
        Self {
            stream,
            deadline: tokio::time::Instant::now() + limit,
            limit,
            stdout_total_bytes: 0,
            stderr_total_bytes: 0,
            ended: false,
        }
    }

    /// The next event; `None` after [`ExecEvent::Exited`] or an error.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, AgentError>> {
        if self.ended {
            return None;
        }
        let event = self.next_event().await;
        if !matches!(event, Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_))) {
            self.ended = true;
        }
        Some(event)
    }

    fn id(&self) -> u32 {
        self.stream.sender.id
    }

    async fn next_event(&mut self) -> Result<ExecEvent, AgentError> {
        let frame = tokio::time::timeout_at(self.deadline, self.stream.recv())
            .await
            .map_err(|_| AgentError::Timeout(self.limit))??;
        let len = frame.payload.len() as u64;
        match frame.kind {
            FrameKind::Stdout => {
                self.stdout_total_bytes = self.stdout_total_bytes.saturating_add(len);
                Ok(ExecEvent::Stdout(Bytes::from(frame.payload)))
            }
            FrameKind::Stderr => {
                self.stderr_total_bytes = self.stderr_total_bytes.saturating_add(len);
                Ok(ExecEvent::Stderr(Bytes::from(frame.payload)))
            }
            FrameKind::Reply => match self.stream.reply(&frame)? {
                Reply::Exited {
                    exit_code,
                    signal,
                    timed_out,
                    duration_ms,
                } => Ok(ExecEvent::Exited(ExecExit {
                    exit_code,
                    signal,
                    timed_out,
                    duration_ms,
                    stdout_total_bytes: self.stdout_total_bytes,
                    stderr_total_bytes: self.stderr_total_bytes,
                })),
                other => Err(self.stream.unexpected(&format!("reply {other:?}"))),
            },
            other => Err(self.stream.unexpected(&format!("{other:?} frame"))),
        }
    }
}

/// The keyboard of a [`AgentClient::shell`] session.
pub struct ShellInput {
    sender: StreamSender,
}

impl ShellInput {
    /// Types `bytes` into the terminal.
    pub async fn write(&self, bytes: &[u8]) -> Result<(), AgentError> {
        for chunk in bytes.chunks(MAX_FRAME_PAYLOAD) {
            self.sender.send(FrameKind::Data, chunk.to_vec()).await?;
        }
        Ok(())
    }

    /// Changes the terminal's size; the program gets `SIGWINCH`.
    pub async fn resize(&self, size: WindowSize) -> Result<(), AgentError> {
        self.sender
            .write(&Frame::json(self.sender.id, FrameKind::Resize, &size))
            .await
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The writing half of one stream.
#[derive(Clone)]
struct StreamSender {
    id: u32,
    writer: Arc<Writer>,
    router: Arc<Router>,
}

impl StreamSender {
    async fn write(&self, frame: &Frame) -> Result<(), AgentError> {
        write_frame(&self.writer, frame).await.map_err(|e| {
            lock(&self.router.table).closed.clone().map_or_else(
                || AgentError::Unavailable(format!("agent channel write failed: {e}")),
                AgentError::Unavailable,
            )
        })
    }

    async fn send(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(), AgentError> {
        self.write(&Frame::new(self.id, kind, payload)).await
    }

    /// Whether the stream still waits for its `REPLY` (not answered, cancelled or reset).
    fn is_open(&self) -> bool {
        lock(&self.router.table).open.contains_key(&self.id)
    }
}

/// One open stream. Dropped before its `REPLY`, it is cancelled.
struct OpenStream {
    sender: StreamSender,
    rx: mpsc::Receiver<Frame>,
    finished: bool,
    /// Output frames taken since the last `CREDIT`.
    consumed: u32,
}

impl OpenStream {
    fn sender(&self) -> StreamSender {
        self.sender.clone()
    }

    async fn recv(&mut self) -> Result<Frame, AgentError> {
        match self.rx.recv().await {
            Some(frame) => {
                if frame.kind == FrameKind::Reply {
                    self.finished = true;
                } else {
                    self.consumed += 1;
                    if self.consumed >= CREDIT_BATCH {
                        let credit = Frame::credit(self.sender.id, self.consumed);
                        self.consumed = 0;
                        // A failed write closed the channel; the next recv reports it.
                        let _ = self.sender.write(&credit).await;
                    }
                }
                Ok(frame)
            }
            None => {
                // Whatever ended the stream (channel gone, agent reset, a stall) also ended it
                // at the agent.
                self.finished = true;
                let id = self.sender.id;
                if lock(&self.sender.router.table).stalled.remove(&id) {
                    return Err(AgentError::WindowExceeded);
                }
                Err(self.sender.router.unavailable())
            }
        }
    }

    async fn recv_within(&mut self, timeout: Duration) -> Result<Frame, AgentError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| AgentError::Timeout(timeout))?
    }

    /// Decodes a `REPLY`, turning [`Reply::Error`] into [`AgentError::Agent`].
    fn reply(&self, frame: &Frame) -> Result<Reply, AgentError> {
        match frame.decode_json::<Reply>() {
            Ok(Reply::Error { code, message }) => Err(AgentError::Agent { code, message }),
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.unexpected(&format!("malformed reply: {e}"))),
        }
    }

    fn expect_reply(&self, frame: &Frame) -> Result<Reply, AgentError> {
        if frame.kind != FrameKind::Reply {
            return Err(self.unexpected(&format!("{:?} frame where a reply was due", frame.kind)));
        }
        self.reply(frame)
    }

    /// A frame that arrived while the request body was still being sent.
    fn early_reply(&self, frame: &Frame) -> AgentError {
        match self.expect_reply(frame) {
            Err(e) => e,
            Ok(reply) => self.unexpected(&format!("reply {reply:?} before the body ended")),
        }
    }

    fn unexpected(&self, detail: &str) -> AgentError {
        protocol(self.sender.id, detail)
    }

    /// Cancels the stream and waits briefly for the agent's closing `REPLY`, so that its
    /// clean-up (removing a temporary file) has happened when this returns.
    async fn cancel_and_drain(&mut self) {
        if self
            .sender
            .send(FrameKind::Cancel, Vec::new())
            .await
            .is_err()
        {
            return;
        }
        let drain = async {
            while let Ok(frame) = self.recv().await {
                if frame.kind == FrameKind::Reply {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let id = self.sender.id;
        {
            let mut table = lock(&self.sender.router.table);
            table.open.remove(&id);
            table.stalled.remove(&id);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let writer = Arc::clone(&self.sender.writer);
        runtime.spawn(async move {
            let _ = write_frame(&writer, &Frame::new(id, FrameKind::Cancel, Vec::new())).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio::net::UnixStream;

    use super::*;

    /// The guest side of a channel, scripted by each test.
    struct FakeAgent {
        read: OwnedReadHalf,
        write: OwnedWriteHalf,
    }

    impl FakeAgent {
        async fn recv(&mut self) -> Frame {
            read_frame(&mut self.read)
                .await
                .expect("frame")
                .expect("not closed")
        }

        async fn send(&mut self, frame: Frame) {
            self.write.write_all(&frame.encode()).await.expect("send");
        }

        async fn reply(&mut self, id: u32, reply: &Reply) {
            self.send(Frame::json(id, FrameKind::Reply, reply)).await;
        }

        async fn hello(&mut self, version: u32) {
            let hello = Hello {
                protocol_version: version,
                agent_version: "test".into(),
                kernel: "6.1.0-test".into(),
            };
            self.send(Frame::json(0, FrameKind::Hello, &hello)).await;
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        path: PathBuf,
        listener: UnixListener,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        Harness {
            _dir: dir,
            path,
            listener,
        }
    }

    async fn connected() -> (AgentClient, FakeAgent, Harness) {
        let h = harness();
        let stream = UnixStream::connect(&h.path).await.expect("connect");
        let (read, write) = stream.into_split();
        let mut agent = FakeAgent { read, write };
        agent.hello(PROTOCOL_VERSION).await;
        let client = AgentClient::connect(&h.listener).await.expect("hello");
        (client, agent, h)
    }

    fn exec_spec(cmd: &str, stdin: Option<&'static [u8]>, limit: u64) -> ExecSpec {
        ExecSpec {
            program: Program::Shell(cmd.into()),
            env: BTreeMap::new(),
            cwd: None,
            user: GuestUser::Root,
            stdin: stdin.map(Bytes::from_static),
            timeout: Duration::from_secs(5),
            output_limit_bytes: limit,
        }
    }

    #[tokio::test]
    async fn refuses_an_agent_of_another_protocol_version() {
        let h = harness();
        let stream = UnixStream::connect(&h.path).await.expect("connect");
        let (read, write) = stream.into_split();
        let mut agent = FakeAgent { read, write };
        agent.hello(PROTOCOL_VERSION + 1).await;
        let err = AgentClient::connect(&h.listener)
            .await
            .expect_err("mismatch");
        let text = err.to_string();
        assert!(text.contains(&(PROTOCOL_VERSION + 1).to_string()), "{text}");
        assert!(text.contains(&PROTOCOL_VERSION.to_string()), "{text}");
    }

    #[tokio::test]
    async fn exec_feeds_stdin_and_keeps_output_up_to_the_limit() {
        let (client, mut agent, _h) = connected().await;
        let guest = tokio::spawn(async move {
            let req = agent.recv().await;
            assert_eq!(req.kind, FrameKind::Request);
            let id = req.stream_id;
            assert_ne!(id, 0);
            match req.decode_json::<Request>().expect("request") {
                Request::Exec {
                    stdin, timeout_ms, ..
                } => {
                    assert_eq!(stdin, Stdin::Stream);
                    assert_eq!(timeout_ms, 5000);
                }
                other => panic!("unexpected {other:?}"),
            }
            let data = agent.recv().await;
            assert_eq!(
                (data.kind, &data.payload[..]),
                (FrameKind::Data, &b"input"[..])
            );
            assert_eq!(agent.recv().await.kind, FrameKind::End);
            agent
                .send(Frame::new(id, FrameKind::Stdout, b"hello ".to_vec()))
                .await;
            agent
                .send(Frame::new(id, FrameKind::Stderr, b"oops".to_vec()))
                .await;
            agent
                .send(Frame::new(id, FrameKind::Stdout, b"world".to_vec()))
                .await;
            let exited = Reply::Exited {
                exit_code: Some(3),
                signal: None,
                timed_out: false,
                duration_ms: 12,
            };
            agent.reply(id, &exited).await;
            agent
        });
        let outcome = client
            .exec(exec_spec("cat", Some(b"input"), 8))
            .await
            .expect("exec");
        assert_eq!(outcome.exit_code, Some(3));
        assert_eq!(outcome.duration_ms, 12);
        assert_eq!(outcome.stdout, b"hello wo");
        assert_eq!(outcome.stdout_total_bytes, 11);
        assert_eq!(outcome.stderr, b"oops");
        assert_eq!(outcome.stderr_total_bytes, 4);
        guest.await.expect("guest");
    }

    #[tokio::test]
    async fn exec_stream_yields_each_frame_as_it_arrives_and_cancels_when_dropped() {
        let (client, mut agent, _h) = connected().await;
        // The output limit is for collecting; a stream passes every byte on.
        let mut events = client
            .exec_stream(exec_spec("x", None, 0))
            .await
            .expect("opens");
        let id = agent.recv().await.stream_id;
        for (kind, text) in [
            (FrameKind::Stdout, "ab"),
            (FrameKind::Stderr, "c"),
            (FrameKind::Stdout, "d"),
        ] {
            agent.send(Frame::new(id, kind, text.into())).await;
            let expected = match kind {
                FrameKind::Stdout => ExecEvent::Stdout(Bytes::from(text)),
                _ => ExecEvent::Stderr(Bytes::from(text)),
            };
            // Each frame is handed over before the agent has sent anything more.
            assert_eq!(
                events.next().await.expect("an event").expect("ok"),
                expected
            );
        }
        let exited = Reply::Exited {
            exit_code: Some(1),
            signal: None,
            timed_out: false,
            duration_ms: 7,
        };
        agent.reply(id, &exited).await;
        let exit = ExecExit {
            exit_code: Some(1),
            signal: None,
            timed_out: false,
            duration_ms: 7,
            stdout_total_bytes: 3,
            stderr_total_bytes: 1,
        };
        assert_eq!(
            events.next().await.expect("an event").expect("ok"),
            ExecEvent::Exited(exit)
        );
        assert!(events.next().await.is_none(), "nothing after the exit");

        // A stream dropped before its exit cancels the command.
        let events = client
            .exec_stream(exec_spec("sleep 100", None, 0))
            .await
            .expect("opens");
        let id = agent.recv().await.stream_id;
        drop(events);
        let cancel = agent.recv().await;
        assert_eq!((cancel.stream_id, cancel.kind), (id, FrameKind::Cancel));
    }

    #[tokio::test]
    async fn concurrent_streams_are_routed_by_id() {
        let (client, mut agent, _h) = connected().await;
        let guest = tokio::spawn(async move {
            let a = agent.recv().await.stream_id;
            let b = agent.recv().await.stream_id;
            assert_ne!(a, b);
            // Answer in reverse order, interleaved.
            for (id, text) in [(b, "B"), (a, "A"), (b, "B")] {
                agent
                    .send(Frame::new(id, FrameKind::Stdout, text.into()))
                    .await;
            }
            for id in [b, a] {
                let exited = Reply::Exited {
                    exit_code: Some(0),
                    signal: None,
                    timed_out: false,
                    duration_ms: 1,
                };
                agent.reply(id, &exited).await;
            }
            agent
        });
        let (x, y) = tokio::join!(
            client.exec(exec_spec("x", None, 100)),
            client.exec(exec_spec("y", None, 100))
        );
        let mut outs = [x.expect("x").stdout, y.expect("y").stdout];
        outs.sort();
        assert_eq!(outs, [b"A".to_vec(), b"BB".to_vec()]);
        guest.await.expect("guest");
    }

    #[tokio::test]
    async fn an_unread_stream_holds_back_only_itself_and_reading_grants_credit() {
        let (client, mut agent, _h) = connected().await;
        // Stream a: its consumer does not read. Stream b: read as it comes.
        let mut a = client
            .exec_stream(exec_spec("a", None, 0))
            .await
            .expect("open a");
        let a_id = agent.recv().await.stream_id;
        let mut b = client
            .exec_stream(exec_spec("b", None, 0))
            .await
            .expect("open b");
        let b_id = agent.recv().await.stream_id;
        for _ in 0..STREAM_WINDOW_FRAMES {
            agent
                .send(Frame::new(a_id, FrameKind::Stdout, b"a".to_vec()))
                .await;
        }
        // a's whole window is buffered; b still flows at once.
        for i in 0..3u8 {
            agent
                .send(Frame::new(b_id, FrameKind::Stdout, vec![i]))
                .await;
            let got = tokio::time::timeout(Duration::from_secs(2), b.next())
                .await
                .expect("b is not held back by a");
            assert_eq!(
                got.expect("event").expect("ok"),
                ExecEvent::Stdout(Bytes::from(vec![i]))
            );
        }
        // Reading a grants its frames back in batches.
        for _ in 0..CREDIT_BATCH {
            a.next().await.expect("event").expect("ok");
        }
        let credit = agent.recv().await;
        assert_eq!((credit.stream_id, credit.kind), (a_id, FrameKind::Credit));
        assert_eq!(credit.credit_frames(), Some(CREDIT_BATCH));
    }

    #[tokio::test]
    async fn an_agent_that_ignores_the_window_loses_that_stream_only() {
        let (client, mut agent, _h) = connected().await;
        let mut a = client
            .exec_stream(exec_spec("a", None, 0))
            .await
            .expect("open a");
        let a_id = agent.recv().await.stream_id;
        let b = client.exec(exec_spec("b", None, 10));
        let guest = tokio::spawn(async move {
            let b_id = agent.recv().await.stream_id;
            for _ in 0..=STREAM_BUFFER_FRAMES {
                agent
                    .send(Frame::new(a_id, FrameKind::Stdout, b"a".to_vec()))
                    .await;
            }
            let cancel = agent.recv().await;
            assert_eq!((cancel.stream_id, cancel.kind), (a_id, FrameKind::Cancel));
            agent
                .send(Frame::new(b_id, FrameKind::Stdout, b"fine".to_vec()))
                .await;
            let exited = Reply::Exited {
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 1,
            };
            agent.reply(b_id, &exited).await;
            agent
        });
        assert_eq!(b.await.expect("b completes").stdout, b"fine");
        let mut last = None;
        while let Some(event) = a.next().await {
            last = Some(event);
        }
        assert!(
            matches!(last, Some(Err(AgentError::WindowExceeded))),
            "{last:?}"
        );
        guest.await.expect("guest");
    }

    #[tokio::test]
    async fn spawn_failure_is_an_agent_error() {
        let (client, mut agent, _h) = connected().await;
        let guest = tokio::spawn(async move {
            let id = agent.recv().await.stream_id;
            let err = Reply::Error {
                code: AgentErrorCode::SpawnFailed,
                message: "no such file".into(),
            };
            agent.reply(id, &err).await;
            agent
        });
        let err = client
            .exec(exec_spec("nope", None, 10))
            .await
            .expect_err("fails");
        assert!(
            matches!(
                err,
                AgentError::Agent {
                    code: AgentErrorCode::SpawnFailed,
                    ..
                }
            ),
            "{err}"
        );
        guest.await.expect("guest");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("client went away")]
    struct BodyGone;

    #[tokio::test]
    async fn upload_is_split_into_frames_and_cancelled_when_the_body_fails() {
        let (client, mut agent, _h) = connected().await;
        let guest = tokio::spawn(async move {
            // First upload: a body larger than one frame.
            let req = agent.recv().await;
            let id = req.stream_id;
            assert!(matches!(
                req.decode_json::<Request>().expect("json"),
                Request::WriteFile { mode: 0o600, .. }
            ));
            let mut got = 0;
            loop {
                let f = agent.recv().await;
                match f.kind {
                    FrameKind::Data => {
                        assert!(f.payload.len() <= MAX_FRAME_PAYLOAD);
                        got += f.payload.len();
                    }
                    FrameKind::End => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            agent
                .reply(
                    id,
                    &Reply::Written {
                        size_bytes: got as u64,
                    },
                )
                .await;
            // Second upload: the body breaks after one chunk.
            let id = agent.recv().await.stream_id;
            assert_eq!(agent.recv().await.kind, FrameKind::Data);
            let cancel = agent.recv().await;
            assert_eq!((cancel.stream_id, cancel.kind), (id, FrameKind::Cancel));
            let err = Reply::Error {
                code: AgentErrorCode::Io,
                message: "cancelled".into(),
            };
            agent.reply(id, &err).await;
            agent
        });
        let big = Bytes::from(vec![7u8; MAX_FRAME_PAYLOAD * 2 + 5]);
        let body = futures_util::stream::iter([Ok::<_, BodyGone>(big)]);
        let size = client
            .write_file("/f".into(), 0o600, body)
            .await
            .expect("written");
        assert_eq!(size, (MAX_FRAME_PAYLOAD * 2 + 5) as u64);

        let body = futures_util::stream::iter([Ok(Bytes::from_static(b"x")), Err(BodyGone)]);
        let err = client
            .write_file("/g".into(), 0o644, body)
            .await
            .expect_err("body failed");
        assert!(matches!(err, WriteFileError::Body(BodyGone)));
        guest.await.expect("guest");
    }

    #[tokio::test]
    async fn read_file_reports_errors_before_streaming() {
        let (client, mut agent, _h) = connected().await;
        let guest = tokio::spawn(async move {
            let id = agent.recv().await.stream_id;
            let err = Reply::Error {
                code: AgentErrorCode::FileNotFound,
                message: "/missing".into(),
            };
            agent.reply(id, &err).await;
            let id = agent.recv().await.stream_id;
            agent
                .send(Frame::new(id, FrameKind::Data, b"ab".to_vec()))
                .await;
            agent
                .send(Frame::new(id, FrameKind::Data, b"cd".to_vec()))
                .await;
            agent.reply(id, &Reply::Read { size_bytes: 4 }).await;
            let id = agent.recv().await.stream_id;
            agent.reply(id, &Reply::Read { size_bytes: 0 }).await;
            agent
        });
        let err = client
            .read_file("/missing".into())
            .await
            .err()
            .expect("fails");
        assert!(matches!(
            err,
            AgentError::Agent {
                code: AgentErrorCode::FileNotFound,
                ..
            }
        ));
        let mut stream = client.read_file("/f".into()).await.expect("opens");
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(got, b"abcd");
        let mut empty = client.read_file("/empty".into()).await.expect("opens");
        assert!(empty.next().await.is_none());
        guest.await.expect("guest");
    }

    #[tokio::test]
    async fn a_dead_channel_fails_pending_and_later_operations() {
        let (client, mut agent, _h) = connected().await;
        let guest = tokio::spawn(async move {
            let _request = agent.recv().await;
            // The VM dies: the socket closes with the stream still open.
            drop(agent);
        });
        let err = client.list_dir("/".into()).await.expect_err("channel died");
        assert!(matches!(err, AgentError::Unavailable(_)), "{err}");
        guest.await.expect("guest");
        let err = client
            .remove("/x".into(), false)
            .await
            .expect_err("still dead");
        assert!(matches!(err, AgentError::Unavailable(_)), "{err}");
        assert!(client.closed_reason().is_some());
    }

    #[tokio::test]
    async fn an_abandoned_operation_is_cancelled() {
        let (client, mut agent, _h) = connected().await;
        let pending = {
            let client = client.clone();
            tokio::spawn(async move { client.exec(exec_spec("sleep 100", None, 10)).await })
        };
        let req = agent.recv().await;
        pending.abort();
        let cancel = agent.recv().await;
        assert_eq!(
            (cancel.stream_id, cancel.kind),
            (req.stream_id, FrameKind::Cancel)
        );
        // A late reply to the cancelled stream is ignored, and the channel still works.
        let exited = Reply::Exited {
            exit_code: None,
            signal: Some(9),
            timed_out: false,
            duration_ms: 5,
        };
        agent.reply(req.stream_id, &exited).await;
        let guest = tokio::spawn(async move {
            let id = agent.recv().await.stream_id;
            agent.reply(id, &Reply::Removed).await;
            agent
        });
        client.remove("/x".into(), true).await.expect("removed");
        guest.await.expect("guest");
    }
}
