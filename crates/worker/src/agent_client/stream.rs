//! One stream of the channel: its writing half ([`StreamSender`]) and its receiving end
//! ([`OpenStream`]), which grants credit as frames are taken and cancels the stream when
//! dropped before its `REPLY`.

use std::sync::Arc;
use std::time::Duration;

use scaibunker_proto::agent::{Frame, FrameKind, Reply};
use tokio::sync::mpsc;

use super::{AgentError, CREDIT_BATCH, Router, Writer, lock, protocol, write_frame};

/// The writing half of one stream.
#[derive(Clone)]
pub(super) struct StreamSender {
    pub(super) id: u32,
    pub(super) writer: Arc<Writer>,
    pub(super) router: Arc<Router>,
}

impl StreamSender {
    pub(super) async fn write(&self, frame: &Frame) -> Result<(), AgentError> {
        write_frame(&self.writer, frame).await.map_err(|e| {
            lock(&self.router.table).closed.clone().map_or_else(
                || AgentError::Unavailable(format!("agent channel write failed: {e}")),
                AgentError::Unavailable,
            )
        })
    }

    pub(super) async fn send(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(), AgentError> {
        self.write(&Frame::new(self.id, kind, payload)).await
    }

    /// Whether the stream still waits for its `REPLY` (not answered, cancelled or reset).
    pub(super) fn is_open(&self) -> bool {
        lock(&self.router.table).open.contains_key(&self.id)
    }
}

/// One open stream. Dropped before its `REPLY`, it is cancelled.
pub(super) struct OpenStream {
    pub(super) sender: StreamSender,
    pub(super) rx: mpsc::Receiver<Frame>,
    pub(super) finished: bool,
    /// Output frames taken since the last `CREDIT`.
    pub(super) consumed: u32,
}

impl OpenStream {
    pub(super) fn sender(&self) -> StreamSender {
        self.sender.clone()
    }

    pub(super) async fn recv(&mut self) -> Result<Frame, AgentError> {
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

    pub(super) async fn recv_within(&mut self, timeout: Duration) -> Result<Frame, AgentError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| AgentError::Timeout(timeout))?
    }

    /// Decodes a `REPLY`, turning [`Reply::Error`] into [`AgentError::Agent`].
    pub(super) fn reply(&self, frame: &Frame) -> Result<Reply, AgentError> {
        match frame.decode_json::<Reply>() {
            Ok(Reply::Error { code, message }) => Err(AgentError::Agent { code, message }),
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.unexpected(&format!("malformed reply: {e}"))),
        }
    }

    pub(super) fn expect_reply(&self, frame: &Frame) -> Result<Reply, AgentError> {
        if frame.kind != FrameKind::Reply {
            return Err(self.unexpected(&format!("{:?} frame where a reply was due", frame.kind)));
        }
        self.reply(frame)
    }

    /// A frame that arrived while the request body was still being sent.
    pub(super) fn early_reply(&self, frame: &Frame) -> AgentError {
        match self.expect_reply(frame) {
            Err(e) => e,
            Ok(reply) => self.unexpected(&format!("reply {reply:?} before the body ended")),
        }
    }

    pub(super) fn unexpected(&self, detail: &str) -> AgentError {
        protocol(self.sender.id, detail)
    }

    /// Cancels the stream and waits briefly for the agent's closing `REPLY`, so that its
    /// clean-up (removing a temporary file) has happened when this returns.
    pub(super) async fn cancel_and_drain(&mut self) {
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
