//! Request bodies of uploads. A handler that refuses an upload while the client is still
//! sending it (over a cap, the bunker gone, a bad path found late) must read a bounded
//! remainder before answering: a server that answers and closes mid-body makes the client see
//! a broken pipe instead of the error.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

/// How much of a refused upload is still read (and discarded) before the answer.
const DRAIN_MAX_BYTES: u64 = 8 << 20;
/// How long that may take at most.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// An upload's bytes as a `Send + Sync` stream, plus a handle to whatever of it the consumer
/// left unread.
pub struct UploadBody(Arc<Mutex<BodyDataStream>>);

/// What [`UploadBody`] leaves behind once its consumer is done with it.
pub struct Remainder(Arc<Mutex<BodyDataStream>>);

/// Splits a request body into the stream a service consumes and the handle that drains it.
pub fn split(body: Body) -> (UploadBody, Remainder) {
    let shared = Arc::new(Mutex::new(body.into_data_stream()));
    (UploadBody(shared.clone()), Remainder(shared))
}

fn poll_chunk(
    chunks: &Mutex<BodyDataStream>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, axum::Error>>> {
    chunks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .poll_next_unpin(cx)
}

impl Stream for UploadBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        poll_chunk(&self.0, cx).map(|c| c.map(|c| c.map_err(std::io::Error::other)))
    }
}

impl Remainder {
    /// Reads and discards what the client still sends, up to [`DRAIN_MAX_BYTES`] or
    /// [`DRAIN_MAX`], whichever comes first.
    pub async fn drain(self) {
        let chunks = self.0;
        let drain = async {
            let mut drained = 0u64;
            while let Some(Ok(chunk)) =
                futures_util::future::poll_fn(|cx| poll_chunk(&chunks, cx)).await
            {
                drained += chunk.len() as u64;
                if drained > DRAIN_MAX_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_MAX, drain).await;
    }

    /// Drains the remainder when `result` is an error, then passes it on.
    pub async fn after<T, E>(self, result: Result<T, E>) -> Result<T, E> {
        if result.is_err() {
            self.drain().await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_refusal_reads_the_rest_of_the_body_first() {
        let read = Arc::new(AtomicUsize::new(0));
        let counter = read.clone();
        let chunks = futures_util::stream::iter(0..5).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(b"chunk"))
        });
        let (mut stream, rest) = split(Body::from_stream(chunks));
        assert!(stream.next().await.is_some());
        drop(stream);
        let refused: Result<(), &str> = rest.after(Err("no")).await;
        assert_eq!(refused, Err("no"));
        assert_eq!(read.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_success_leaves_the_body_alone() {
        let read = Arc::new(AtomicUsize::new(0));
        let counter = read.clone();
        let chunks = futures_util::stream::iter(0..5).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(b"chunk"))
        });
        let (_stream, rest) = split(Body::from_stream(chunks));
        assert_eq!(rest.after(Ok::<_, ()>(1)).await, Ok(1));
        assert_eq!(read.load(Ordering::SeqCst), 0);
    }
}
