//! Serving a cached image to a peer worker: the `images/{sha256}` handler checks the digest;
//! `execute` streams the file.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;

use super::{ApiError, ApiState, Command, execute};

pub(super) async fn read_image(
    State(s): State<Arc<ApiState>>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    if !crate::pulls::is_sha256_hex(&sha256) {
        return Err(ApiError::validation(
            "sha256 must be 64 lowercase hex digits",
        ));
    }
    execute(&s, Command::ReadImage(sha256)).await
}
