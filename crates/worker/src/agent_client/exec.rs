//! Exec on the agent: collected ([`AgentClient::exec`]), streamed frame by frame
//! ([`ExecStream`]) or on a terminal ([`AgentClient::shell`] with its [`ShellInput`]).

use std::time::Duration;

use bytes::Bytes;
use scaibunker_proto::agent::{
    Frame, FrameKind, MAX_FRAME_PAYLOAD, Reply, Request, Stdin, WindowSize,
};

use super::stream::{OpenStream, StreamSender};
use super::{AgentClient, AgentError, EXEC_GRACE, ExecOutcome, ExecSpec, ShellSpec, protocol};

impl AgentClient {
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
}

/// The kept prefix of one exec pipe.
#[derive(Default)]
pub(super) struct Kept(Vec<u8>);

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
    pub(super) fn new(stream: OpenStream, timeout: Duration) -> Self {
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

    pub(super) fn id(&self) -> u32 {
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

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
