//! Streamed exec over Server-Sent Events: `POST /bunkers/{id}/exec` with `stream: true` and
//! `GET /bunkers/{id}/exec/{exec_id}/events` (resume with `Last-Event-ID`).
//!
//! Each event has an `id:` (1, 2, …); `stdout`/`stderr` carry `{"data": …}` (or `data_b64`),
//! `exit` carries `{exec_id, exit_code, duration_ms, timed_out}`, failures are `error` with
//! `{code, message}`; the stream ends with `data: [DONE]`. Comments keep idle connections alive.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;

use crate::service::exec_stream::{ExecBuffer, Next};

/// The id after which a resumed stream starts: `Last-Event-ID`, else `last_event_id`, else 0.
pub fn resume_point(headers: &HeaderMap, query: Option<u64>) -> u64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .or(query)
        .unwrap_or(0)
}

/// The SSE response following `buffer` after event `after`.
pub fn sse(
    buffer: Arc<ExecBuffer>,
    after: u64,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures_util::stream::unfold(
        (buffer, after, false),
        |(buffer, after, ended)| async move {
            if ended {
                return None;
            }
            match buffer.next_after(after).await {
                Next::Events(events) => {
                    let last = events.last().map(|e| e.id).unwrap_or(after);
                    let batch: Vec<Result<SseEvent, Infallible>> = events
                        .into_iter()
                        .map(|e| {
                            Ok(SseEvent::default()
                                .id(e.id.to_string())
                                .event(e.kind.as_str())
                                .data(e.data))
                        })
                        .collect();
                    Some((futures_util::stream::iter(batch), (buffer, last, false)))
                }
                Next::Gone { oldest_available } => {
                    let data = serde_json::json!({
                        "code": "RESUME_WINDOW_EXCEEDED",
                        "message": format!(
                            "events before id {oldest_available} are no longer kept; resume from there"
                        ),
                    });
                    let batch = vec![
                        Ok(SseEvent::default().event("error").data(data.to_string())),
                        Ok(SseEvent::default().data("[DONE]")),
                    ];
                    Some((futures_util::stream::iter(batch), (buffer, after, true)))
                }
                Next::Finished => {
                    let batch = vec![Ok(SseEvent::default().data("[DONE]"))];
                    Some((futures_util::stream::iter(batch), (buffer, after, true)))
                }
            }
        },
    );
    Sse::new(futures_util::StreamExt::flatten(stream))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
