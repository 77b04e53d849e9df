//! File handlers: upload (file or tar archive), download, list and remove, the `path` and
//! `mode` query, and the upload body capped at the configured size.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use scaibunker_proto::agent::{GuestUser, MAX_LIST_LIMIT};
use serde::Deserialize;

use super::{ApiError, ApiState, Command, execute, query};

#[derive(Debug, Deserialize)]
pub(super) struct FileQuery {
    path: Option<String>,
    /// Octal, as in `chmod`.
    mode: Option<String>,
    recursive: Option<bool>,
    /// Who acts in the guest; the guest user unless the controller says root.
    #[serde(default)]
    user: GuestUser,
    /// A listing page's size and where it starts.
    limit: Option<u32>,
    cursor: Option<String>,
}

impl FileQuery {
    fn path(&mut self) -> Result<String, ApiError> {
        match self.path.take() {
            Some(p) if !p.is_empty() => Ok(p),
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_PATH",
                "the `path` query parameter is required",
            )),
        }
    }

    fn mode(&self) -> Result<u32, ApiError> {
        let text = self.mode.as_deref().unwrap_or("644");
        u32::from_str_radix(text, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| ApiError::validation(format!("mode {text:?} is not an octal file mode")))
    }
}

pub(super) async fn write_file(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    upload(&s, id, q, &headers, body, false).await
}

pub(super) async fn write_archive(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    upload(&s, id, q, &headers, body, true).await
}

async fn upload(
    s: &ApiState,
    id: String,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
    archive: bool,
) -> Result<Response, ApiError> {
    let mut q = query(q)?;
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let cmd = Command::WriteFile {
        id,
        path: q.path()?,
        mode: q.mode()?,
        user: q.user,
        archive,
        declared_len,
        body,
    };
    execute(s, cmd).await
}

pub(super) async fn read_file(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut q = query(q)?;
    let cmd = Command::ReadFile {
        id,
        path: q.path()?,
        user: q.user,
        archive: false,
    };
    execute(&s, cmd).await
}

pub(super) async fn read_archive(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut q = query(q)?;
    let cmd = Command::ReadFile {
        id,
        path: q.path()?,
        user: q.user,
        archive: true,
    };
    execute(&s, cmd).await
}

pub(super) async fn list_dir(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut q = query(q)?;
    let cmd = Command::ListDir {
        id,
        path: q.path()?,
        user: q.user,
        after_hex: q.cursor.take(),
        limit: q.limit.unwrap_or(MAX_LIST_LIMIT),
    };
    execute(&s, cmd).await
}

pub(super) async fn remove_file(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut q = query(q)?;
    let cmd = Command::Remove {
        id,
        path: q.path()?,
        recursive: q.recursive.unwrap_or(false),
        user: q.user,
    };
    execute(&s, cmd).await
}

pub(super) fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "FILE_TOO_LARGE",
        format!("uploads are limited to {limit} bytes"),
    )
}

/// Why an upload body stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("the body exceeds the upload limit")]
    TooLarge,
    #[error("read the request body")]
    Read(#[source] axum::Error),
}

/// How much of an over-limit upload is still read (and discarded) before the refusal is
/// sent, so that a client still writing its body reads the `413` instead of a reset.
const DRAIN_MAX_BYTES: u64 = 8 << 20;
/// How long that draining may take at most.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// The body as a stream that fails once more than `limit` bytes have passed. Before failing
/// it reads what the client still sends, up to [`DRAIN_MAX_BYTES`] or [`DRAIN_MAX`]: a
/// server that answers and closes while the client is mid-body makes the client see a
/// broken pipe rather than the error.
pub(super) fn capped(
    body: Body,
    limit: u64,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
    let chunks = body.into_data_stream();
    futures_util::stream::unfold(Some((chunks, 0u64)), move |state| async move {
        let (mut chunks, seen) = state?;
        let chunk = match chunks.next().await? {
            Ok(chunk) => chunk,
            Err(e) => return Some((Err(BodyError::Read(e)), None)),
        };
        let seen = seen.saturating_add(chunk.len() as u64);
        if seen <= limit {
            return Some((Ok(chunk), Some((chunks, seen))));
        }
        let drain = async {
            let mut drained = 0u64;
            while let Some(Ok(chunk)) = chunks.next().await {
                drained += chunk.len() as u64;
                if drained > DRAIN_MAX_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_MAX, drain).await;
        Some((Err(BodyError::TooLarge), None))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_octal_modes() {
        let q = |mode: Option<&str>| FileQuery {
            path: None,
            mode: mode.map(str::to_owned),
            recursive: None,
            user: GuestUser::User,
            limit: None,
            cursor: None,
        };
        assert_eq!(q(None).mode().expect("default"), 0o644);
        assert_eq!(q(Some("755")).mode().expect("755"), 0o755);
        assert_eq!(q(Some("0600")).mode().expect("0600"), 0o600);
        assert!(q(Some("999")).mode().is_err());
        assert!(q(Some("17777")).mode().is_err());
        assert!(q(Some("rw")).mode().is_err());
    }

    #[tokio::test]
    async fn capped_body_fails_past_the_limit() {
        let body = Body::from(vec![0u8; 10]);
        let items: Vec<_> = capped(body, 9).collect().await;
        assert!(matches!(items.last(), Some(Err(BodyError::TooLarge))));
        let body = Body::from(vec![0u8; 10]);
        let items: Vec<_> = capped(body, 10).collect().await;
        assert!(items.iter().all(Result::is_ok));

        // Past the limit, the rest of the body is read before the stream fails, and
        // nothing follows the failure.
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = read.clone();
        let chunks = futures_util::stream::iter(0..4).map(move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 6]))
        });
        let mut stream = Box::pin(capped(Body::from_stream(chunks), 10));
        assert!(matches!(stream.next().await, Some(Ok(_))));
        assert!(matches!(
            stream.next().await,
            Some(Err(BodyError::TooLarge))
        ));
        assert_eq!(
            read.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "the rest was read"
        );
        assert!(stream.next().await.is_none());
    }
}
