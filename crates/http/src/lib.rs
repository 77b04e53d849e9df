//! HTTP server pieces shared by the controller and the worker.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

/// Middleware: a response to a request whose body was not read to its end says
/// `Connection: close`.
///
/// A server that answers before reading the body (an upload refused on its declared length, a
/// bad token, a missing bunker) cannot reuse the connection: the unread bytes are still on it,
/// so the server closes it after the answer. Without the header the client has no way to know
/// and puts the connection back in its pool, and its next request on it fails with an
/// incomplete message. With the header, the client drops the connection instead.
pub async fn close_unread(req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(Watched {
            inner: body,
            ended: Arc::clone(&ended),
        })
    });
    let mut response = next.run(req).await;
    if !ended.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that records when it has been read to its end.
struct Watched {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::put;

    async fn serve() -> String {
        let app = Router::new()
            .route("/ignore", put(|| async { "ignored" }))
            .route(
                "/read",
                put(|body: Bytes| async move { body.len().to_string() }),
            )
            .layer(axum::middleware::from_fn(close_unread));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn connection(resp: &reqwest::Response) -> Option<&str> {
        resp.headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn an_unread_body_closes_the_connection_and_a_read_one_keeps_it() {
        let url = serve().await;
        let client = reqwest::Client::new();
        let resp = client
            .put(format!("{url}/ignore"))
            .body(vec![0u8; 300_000])
            .send()
            .await
            .expect("put");
        assert_eq!(connection(&resp), Some("close"));

        let resp = client
            .put(format!("{url}/read"))
            .body(vec![0u8; 300_000])
            .send()
            .await
            .expect("put");
        assert_eq!(connection(&resp), None);
        assert_eq!(resp.text().await.expect("body"), "300000");

        // No body at all: nothing left on the connection.
        let resp = client
            .put(format!("{url}/ignore"))
            .send()
            .await
            .expect("put");
        assert_eq!(connection(&resp), None);
    }
}
