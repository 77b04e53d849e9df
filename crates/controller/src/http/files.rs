//! `/bunkers/{id}/files`: streamed upload and download, listing, removal.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use scaibunker_api::envelope::{FieldDetail, Ok as Envelope};
use scaibunker_api::files::{FileEntry, FileWritten};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{Caller, Ctx};
use crate::service::Services;
use crate::service::bunkers as svc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    path: Option<String>,
    mode: Option<String>,
    recursive: Option<bool>,
}

type QueryResult = Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>;

fn parse(q: QueryResult) -> Result<(FileQuery, String), ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::validation(vec![FieldDetail {
            field: "query".into(),
            message: e.body_text(),
        }])
    })?;
    let path = q.path.clone().ok_or_else(|| {
        ApiError::validation(vec![FieldDetail {
            field: "path".into(),
            message: "required".into(),
        }])
    })?;
    Ok((q, path))
}

pub async fn write(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Envelope<FileWritten>>), ApiError> {
    let (q, path) = parse(q)?;
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::validation(vec![FieldDetail {
                    field: "mode".into(),
                    message: "must be octal permission bits, e.g. 644 or 0755".into(),
                }])
            })?,
    };
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    // reqwest wants a `Sync` body stream; the wrapper makes axum's `Send` stream one.
    let stream =
        sync_wrapper::SyncStream::new(body.into_data_stream().map_err(std::io::Error::other));
    let upload = svc::Upload {
        path: &path,
        mode,
        content_length,
    };
    let written = svc::write_file(&s, &p, &ctx, &id, upload, stream).await?;
    Ok((StatusCode::CREATED, Json(Envelope::new(written))))
}

pub async fn read(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Response, ApiError> {
    let (_, path) = parse(q)?;
    let upstream = svc::read_file(&s, &p, &ctx, &id, &path).await?;
    let body = Body::from_stream(upstream.bytes_stream());
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

pub async fn list(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Json<Envelope<Vec<FileEntry>>>, ApiError> {
    let (_, path) = parse(q)?;
    let entries = svc::list_files(&s, &p, &ctx, &id, &path).await?;
    Ok(Json(Envelope::new(entries)))
}

pub async fn remove(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<StatusCode, ApiError> {
    let (q, path) = parse(q)?;
    svc::delete_file(&s, &p, &ctx, &id, &path, q.recursive.unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}
