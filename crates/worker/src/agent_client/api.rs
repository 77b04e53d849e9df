//! Guest-opened `api` streams (protocol rule 10): the reader assembles each request, within
//! its bounds, into an [`ApiCall`] for whoever serves the bunker's backchannel
//! ([`crate::backchannel`]), and [`ApiResponder`] writes the answer back.
//!
//! 1. `API_REQUEST` on an id in the guest's space opens a call, unless
//!    [`MAX_API_IN_FLIGHT`] are open or being answered: then it is answered `429` at once
//!    and its later frames fall on no stream. A head that does not decode or breaks
//!    [`ApiRequest::check`] is answered `400` (`413` for its body size).
//! 2. `DATA` adds to the body up to its declared `body_bytes`; more is `400`. `END` with the
//!    whole body hands the call over ([`ApiCall`]); a short one is `400`.
//! 3. Frames of ids the table does not hold (refused, answered, or from before a reset)
//!    are dropped. The reader never waits: answers it makes itself are written by a task.
//!
//! Memory: at most [`MAX_API_IN_FLIGHT`] bodies of at most [`MAX_API_BODY_BYTES`] per
//! channel, and at most [`MAX_PENDING_REFUSALS`] refusals waiting to be written: a guest
//! that floods heads without reading its answers gets no more, rather than a task each.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use scaibunker_proto::agent::{
    ApiHeadError, ApiRequest, ApiResponse, Frame, FrameKind, MAX_API_BODY_BYTES, MAX_API_IN_FLIGHT,
    MAX_FRAME_PAYLOAD,
};
use tokio::sync::mpsc;

use super::{Router, Writer, lock, write_frame};

/// Refusals the reader may have waiting for the writer at once (step 3).
pub const MAX_PENDING_REFUSALS: usize = 16;

/// The guest's calls being assembled, and where finished ones go.
pub(super) struct ApiTable {
    open: HashMap<u32, Inbound>,
    calls: mpsc::Sender<ApiCall>,
    /// Calls open or not yet answered, against [`MAX_API_IN_FLIGHT`].
    in_flight: Arc<AtomicUsize>,
    /// Refusals not yet written, against [`MAX_PENDING_REFUSALS`].
    refusals: Arc<AtomicUsize>,
}

struct Inbound {
    head: ApiRequest,
    body: Vec<u8>,
    slot: Slot,
}

impl ApiTable {
    pub(super) fn new() -> (Self, mpsc::Receiver<ApiCall>) {
        // Every call in the channel holds a slot, so it never holds more than the slots.
        let (calls, rx) = mpsc::channel(MAX_API_IN_FLIGHT);
        let table = Self {
            open: HashMap::new(),
            calls,
            in_flight: Arc::new(AtomicUsize::new(0)),
            refusals: Arc::new(AtomicUsize::new(0)),
        };
        (table, rx)
    }

    /// Forgets the calls being assembled (the agent reset its session).
    pub(super) fn reset(&mut self) {
        self.open.clear();
    }
}

/// One in-flight slot, given back when the call is answered or dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        Self::take_up_to(count, MAX_API_IN_FLIGHT)
    }

    fn take_up_to(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A whole request from the guest, with the way to answer it.
#[derive(Debug)]
pub struct ApiCall {
    pub request: ApiRequest,
    pub body: Bytes,
    pub responder: ApiResponder,
}

/// Answers one guest call; dropped unanswered, it answers `502`.
pub struct ApiResponder {
    id: u32,
    writer: Option<Arc<Writer>>,
    _slot: Option<Slot>,
}

impl std::fmt::Debug for ApiResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiResponder")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A JSON error body in the API's envelope.
pub fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "status": "error",
        "error": {"code": code, "message": message, "details": []},
    }))
    .expect("json values serialise")
}

impl ApiResponder {
    /// Writes `API_RESPONSE`, the body as `DATA` frames and `END`. A body over
    /// [`MAX_API_BODY_BYTES`] is replaced by a `502`.
    pub async fn respond(mut self, status: u16, headers: Vec<(String, String)>, body: &[u8]) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        send(&writer, self.id, status, headers, body).await;
    }

    /// An error answer in the API's envelope.
    pub async fn error(self, status: u16, code: &str, message: &str, extra: Vec<(String, String)>) {
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        headers.extend(extra);
        self.respond(status, headers, &error_body(code, message))
            .await;
    }
}

impl Drop for ApiResponder {
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let id = self.id;
        runtime.spawn(async move {
            let body = error_body("BACKCHANNEL_FAILED", "the worker dropped the call");
            let headers = vec![("content-type".to_owned(), "application/json".to_owned())];
            send(&writer, id, 502, headers, &body).await;
        });
    }
}

async fn send(writer: &Writer, id: u32, status: u16, headers: Vec<(String, String)>, body: &[u8]) {
    let (status, headers, body) = if body.len() as u64 > MAX_API_BODY_BYTES {
        tracing::warn!(
            stream_id = id,
            bytes = body.len(),
            "a backchannel answer over the limit"
        );
        (
            502,
            vec![("content-type".to_owned(), "application/json".to_owned())],
            error_body(
                "BACKCHANNEL_FAILED",
                "the platform's answer is over the backchannel's 1 MiB",
            ),
        )
    } else {
        (status, headers, body.to_vec())
    };
    let head = ApiResponse {
        status,
        headers,
        body_bytes: body.len() as u64,
    };
    // A failed write closed the channel; the guest's call fails with its session.
    let Ok(head) = Frame::try_json(id, FrameKind::ApiResponse, &head) else {
        return;
    };
    if write_frame(writer, &head).await.is_err() {
        return;
    }
    for chunk in body.chunks(MAX_FRAME_PAYLOAD) {
        // One frame at a time, so exec and terminal frames queued on the writer go between.
        tokio::task::yield_now().await;
        if write_frame(writer, &Frame::new(id, FrameKind::Data, chunk.to_vec()))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = write_frame(writer, &Frame::new(id, FrameKind::End, Vec::new())).await;
}

/// Routes one frame of a guest stream (steps 1–3).
pub(super) fn route(router: &Router, writer: &Arc<Writer>, frame: Frame) {
    let id = frame.stream_id;
    let mut table = lock(&router.api);
    let refusals = Arc::clone(&table.refusals);
    let refuse =
        |status: u16, code: &'static str, message: String, extra: Vec<(String, String)>| {
            let Some(slot) = Slot::take_up_to(&refusals, MAX_PENDING_REFUSALS) else {
                tracing::debug!(
                    stream_id = id,
                    "refusal dropped: the guest is not reading its answers"
                );
                return;
            };
            let responder = ApiResponder {
                id,
                writer: Some(Arc::clone(writer)),
                _slot: None,
            };
            tokio::spawn(async move {
                responder.error(status, code, &message, extra).await;
                drop(slot);
            });
        };
    match frame.kind {
        FrameKind::ApiRequest => {
            if table.open.contains_key(&id) {
                tracing::warn!(
                    stream_id = id,
                    "a second API_REQUEST on an open guest stream"
                );
                return;
            }
            let head = match frame.decode_json::<ApiRequest>() {
                Ok(head) => head,
                Err(e) => {
                    return refuse(
                        400,
                        "VALIDATION_ERROR",
                        format!("malformed request head: {e}"),
                        vec![],
                    );
                }
            };
            if let Err(e) = head.check() {
                let status = if matches!(e, ApiHeadError::BodyTooLarge(_)) {
                    413
                } else {
                    400
                };
                return refuse(status, "VALIDATION_ERROR", e.to_string(), vec![]);
            }
            let Some(slot) = Slot::take(&table.in_flight) else {
                return refuse(
                    429,
                    "RATE_LIMITED",
                    format!("at most {MAX_API_IN_FLIGHT} backchannel calls in flight per bunker"),
                    vec![("retry-after".to_owned(), "1".to_owned())],
                );
            };
            table.open.insert(
                id,
                Inbound {
                    body: Vec::with_capacity(head.body_bytes.min(MAX_API_BODY_BYTES) as usize),
                    head,
                    slot,
                },
            );
        }
        FrameKind::Data => {
            let Some(inbound) = table.open.get_mut(&id) else {
                return;
            };
            if (inbound.body.len() + frame.payload.len()) as u64 > inbound.head.body_bytes {
                table.open.remove(&id);
                return refuse(
                    400,
                    "VALIDATION_ERROR",
                    "more body than declared".into(),
                    vec![],
                );
            }
            inbound.body.extend_from_slice(&frame.payload);
        }
        FrameKind::End => {
            let Some(inbound) = table.open.remove(&id) else {
                return;
            };
            if inbound.body.len() as u64 != inbound.head.body_bytes {
                return refuse(
                    400,
                    "VALIDATION_ERROR",
                    "less body than declared".into(),
                    vec![],
                );
            }
            let call = ApiCall {
                request: inbound.head,
                body: Bytes::from(inbound.body),
                responder: ApiResponder {
                    id,
                    writer: Some(Arc::clone(writer)),
                    _slot: Some(inbound.slot),
                },
            };
            if let Err(e) = table.calls.try_send(call) {
                // Nobody serves this channel's backchannel (a template build), or it stopped.
                let call = match e {
                    mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
                };
                drop(table);
                tokio::spawn(async move {
                    call.responder
                        .error(
                            503,
                            "BACKCHANNEL_UNAVAILABLE",
                            "this bunker's backchannel is not served",
                            vec![],
                        )
                        .await;
                });
            }
        }
        other => {
            tracing::debug!(stream_id = id, kind = ?other, "ignoring a frame on a guest stream");
        }
    }
}
