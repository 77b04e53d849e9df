//! `/bunkers/{id}/files`: streamed upload and download, listing, removal; directories as tar
//! streams under `/files/archive`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use scaibunker_api::envelope::{
    DEFAULT_PAGE_LIMIT, Error, FieldDetail, List, MAX_PAGE_LIMIT, Ok as Envelope,
};
use scaibunker_api::exec::ExecUser;
use scaibunker_api::files::{FileEntry, FileWritten};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{Caller, Ctx};
use crate::service::Services;
use crate::service::bunkers as svc;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute path in the guest.
    #[param(
        required = true,
        pattern = r"^(/[^/\x00]{0,63})+/?$",
        max_length = 1024
    )]
    path: Option<String>,
    /// Upload only: octal permission bits (default `0644`).
    #[param(pattern = "^0?[0-7]{1,4}$")]
    mode: Option<String>,
    /// Delete only: remove a non-empty directory (default `false`).
    recursive: Option<bool>,
    /// Who acts in the guest: `user` (default) or `root` (needs `scaibunker:root`).
    user: Option<ExecUser>,
    /// List only: page size, 1–500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// List only: the `next_cursor` of the previous page.
    #[param(pattern = "^([0-9a-fA-F]{2}){1,255}$")]
    cursor: Option<String>,
}

type QueryResult = Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>;

fn parse(q: QueryResult) -> Result<(FileQuery, String), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::query(&e))?;
    let path = q.path.clone().ok_or_else(|| {
        ApiError::validation(vec![FieldDetail {
            field: "path".into(),
            message: "required".into(),
        }])
    })?;
    Ok((q, path))
}

/// Uploads a file: the raw body is streamed to the guest and renamed into place (parents
/// created); a failed upload leaves nothing.
#[utoipa::path(
    put,
    path = "/bunkers/{id}/files",
    operation_id = "write_file",
    tag = "files",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), FileQuery),
    request_body(content(("application/octet-stream")), description = "The file's bytes"),
    responses(
        (status = 201, description = "The written file", body = Envelope<FileWritten>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:files`, or `scaibunker:root` for `user=root`) or `FILE_PERMISSION_DENIED` (the guest user may not do this)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING` or `IS_A_DIRECTORY`", body = Error),
        (status = 413, description = "`FILE_TOO_LARGE`", body = Error),
        (status = 422, description = "`INVALID_PATH` (not absolute, NUL, over 4096 bytes) or `VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn write(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Envelope<FileWritten>>), ApiError> {
    upload(&s, &p, &ctx, &id, q, &headers, body, false).await
}

/// Uploads a directory tree as a tar stream, unpacked into the directory `path` (created if
/// missing; merged into if it exists): all or nothing.
#[utoipa::path(
    put,
    path = "/bunkers/{id}/files/archive",
    operation_id = "write_archive",
    tag = "files",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), FileQuery),
    request_body(content(("application/x-tar")), description = "A tar stream; entry paths relative to `path`"),
    responses(
        (status = 201, description = "`size_bytes` is the archive's length", body = Envelope<FileWritten>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:files`, or `scaibunker:root` for `user=root`) or `FILE_PERMISSION_DENIED` (the guest user may not do this)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`, `NOT_A_DIRECTORY` or `IS_A_DIRECTORY` (a directory and a file meet)", body = Error),
        (status = 413, description = "`FILE_TOO_LARGE`: the archive exceeds the upload cap", body = Error),
        (status = 422, description = "`INVALID_PATH`, `INVALID_ARCHIVE` (not tar, or an entry absolute, with `..`, or through a symlink out of the directory) or `VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn write_archive(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Envelope<FileWritten>>), ApiError> {
    upload(&s, &p, &ctx, &id, q, &headers, body, true).await
}

#[allow(clippy::too_many_arguments)]
async fn upload(
    s: &Services,
    p: &crate::service::auth::Principal,
    ctx: &crate::service::RequestContext,
    id: &str,
    q: QueryResult,
    headers: &HeaderMap,
    body: Body,
    archive: bool,
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
    let (stream, rest) = super::upload::split(body);
    let upload = svc::Upload {
        path: &path,
        mode,
        user: q.user,
        content_length,
        archive,
    };
    let written = rest
        .after(svc::write_file(s, p, ctx, id, upload, stream).await)
        .await?;
    Ok((StatusCode::CREATED, Json(Envelope::new(written))))
}

/// Downloads a file's raw bytes, streamed; symlinks are followed.
#[utoipa::path(
    get,
    path = "/bunkers/{id}/files",
    operation_id = "read_file",
    tag = "files",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), FileQuery),
    responses(
        (status = 200, description = "The file's bytes", content(("application/octet-stream"))),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:files`, or `scaibunker:root` for `user=root`) or `FILE_PERMISSION_DENIED` (the guest user may not do this)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND` or `FILE_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING` or `IS_A_DIRECTORY`", body = Error),
        (status = 422, description = "`INVALID_PATH` (not absolute, NUL, over 4096 bytes) or `VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn read(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Response, ApiError> {
    let (q, path) = parse(q)?;
    let upstream = svc::read_file(&s, &p, &ctx, &id, &path, q.user, false).await?;
    let body = Body::from_stream(upstream.bytes_stream());
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// Downloads a directory tree as a tar stream (paths relative to `path`; symlinks kept as
/// symlinks).
#[utoipa::path(
    get,
    path = "/bunkers/{id}/files/archive",
    operation_id = "read_archive",
    tag = "files",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), FileQuery),
    responses(
        (status = 200, description = "A tar stream", content(("application/x-tar"))),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:files`, or `scaibunker:root` for `user=root`) or `FILE_PERMISSION_DENIED` (the guest user may not do this)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND` or `FILE_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING` or `NOT_A_DIRECTORY`", body = Error),
        (status = 422, description = "`INVALID_PATH` or `VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn read_archive(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Response, ApiError> {
    let (q, path) = parse(q)?;
    let upstream = svc::read_file(&s, &p, &ctx, &id, &path, q.user, true).await?;
    let body = Body::from_stream(upstream.bytes_stream());
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], body).into_response())
}

/// Lists a directory in pages, sorted by name (bytewise); symlinks are not followed.
#[utoipa::path(
    get,
    path = "/bunkers/{id}/files/list",
    operation_id = "list_files",
    tag = "files",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), FileQuery),
    responses(
        (status = 200, description = "A page of the directory's entries", body = List<FileEntry>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:files`, or `scaibunker:root` for `user=root`) or `FILE_PERMISSION_DENIED` (the guest user may not do this)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND` or `FILE_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING` or `NOT_A_DIRECTORY`", body = Error),
        (status = 422, description = "`INVALID_PATH` (not absolute, NUL, over 4096 bytes) or `VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Json<List<FileEntry>>, ApiError> {
    let (q, path) = parse(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(ApiError::validation(vec![FieldDetail {
            field: "limit".into(),
            message: format!("must be between 1 and {MAX_PAGE_LIMIT}"),
        }]));
    }
    // Cursors are the hex of a file name (at most 255 bytes).
    if let Some(c) = &q.cursor
        && (c.is_empty()
            || c.len() > 510
            || c.len() % 2 != 0
            || !c.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::validation(vec![FieldDetail {
            field: "cursor".into(),
            message: "not a cursor this listing returned".into(),
        }]));
    }
    let page = svc::ListPage {
        limit,
        cursor: q.cursor.as_deref(),
    };
    let (entries, next_cursor) = svc::list_files(&s, &p, &ctx, &id, &path, q.user, page).await?;
    Ok(Json(List {
        status: "ok".into(),
        data: entries,
        has_more: next_cursor.is_some(),
        next_cursor,
    }))
}

/// Removes a file, or a directory (non-empty ones only with `recursive=true`).
#[utoipa::path(
    delete,
    path = "/bunkers/{id}/files",
    operation_id = "delete_file",
    tag = "files",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)"), FileQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:files`, or `scaibunker:root` for `user=root`) or `FILE_PERMISSION_DENIED` (the guest user may not do this)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND` or `FILE_NOT_FOUND`", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING` or `DIRECTORY_NOT_EMPTY`", body = Error),
        (status = 422, description = "`INVALID_PATH` (not absolute, NUL, over 4096 bytes) or `VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the bunker's worker could not complete the operation", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<StatusCode, ApiError> {
    let (q, path) = parse(q)?;
    let recursive = q.recursive.unwrap_or(false);
    svc::delete_file(&s, &p, &ctx, &id, &path, recursive, q.user).await?;
    Ok(StatusCode::NO_CONTENT)
}
