//! Serving a cached image to a peer worker: the `images/{sha256}` handler checks the bearer
//! (this worker's credential, or a peer token for this image) and the digest;
//! `execute` streams the file.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;

use super::{ApiError, ApiState, Command, execute};

/// A cached image, for a controller (this worker's credential) or a peer (a peer token the
/// controller made for this image and that peer, `scaibunker_proto::worker_auth`).
pub(super) async fn read_image(
    State(s): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    let presented = super::bearer(&headers).unwrap_or_default();
    let own = s.credentials.own();
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if !(s.token_matches(presented)
        || scaibunker_proto::worker_auth::verify_peer_token(&own, presented, &sha256, now_s))
    {
        return Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "AUTH_TOKEN_INVALID",
            "missing or invalid worker credential or peer token",
        ));
    }
    if !crate::pulls::is_sha256_hex(&sha256) {
        return Err(ApiError::validation(
            "sha256 must be 64 lowercase hex digits",
        ));
    }
    execute(&s, Command::ReadImage(sha256)).await
}
