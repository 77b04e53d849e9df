//! `/snapshots` and `POST /bunkers/{id}/snapshot`. Errors share the bunkers' mapping.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use scaibunker_api::envelope::{DEFAULT_PAGE_LIMIT, Error, List, MAX_PAGE_LIMIT, Ok as Envelope};
use scaibunker_api::snapshots::{CreateSnapshot, Snapshot};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{ApiJson, Caller, Ctx};
use crate::service::Services;
use crate::service::snapshots::{self as svc, to_api};

/// Snapshots a running bunker (`running → snapshotting → running`) into object storage and
/// answers once the snapshot is `ready`.
#[utoipa::path(
    post,
    path = "/bunkers/{id}/snapshot",
    operation_id = "snapshot_bunker",
    tag = "snapshots",
    params(("id" = String, Path, description = "Bunker id (`bnk_…`)")),
    request_body = CreateSnapshot,
    responses(
        (status = 201, description = "The `ready` snapshot record", body = Envelope<Snapshot>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:create`)", body = Error),
        (status = 404, description = "`BUNKER_NOT_FOUND`: unknown or another tenant's bunker", body = Error),
        (status = 409, description = "`BUNKER_NOT_RUNNING`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED` (see `Retry-After`), or `STORAGE_QUOTA_EXCEEDED`: the tenant's storage cap (`max_storage_mb`) is reached", body = Error),
        (status = 502, description = "`WORKER_ERROR`: the capture or upload failed; the snapshot is `failed`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<Envelope<Snapshot>>), ApiError> {
    let row = svc::create(&s, &p, &ctx, &id, req, svc::StorageCheck::Enforced).await?;
    Ok((StatusCode::CREATED, Json(Envelope::new(to_api(&row)))))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only snapshots of this bunker.
    bunker_id: Option<String>,
    /// Page size, 1–500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^-?[0-9]{1,18}\.snp_[a-z0-9]{1,64}$")]
    cursor: Option<String>,
}

/// Lists the caller's tenant's snapshots, newest first.
#[utoipa::path(
    get,
    path = "/snapshots",
    operation_id = "list_snapshots",
    tag = "snapshots",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of snapshot records", body = List<Snapshot>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(s): State<Services>,
    Caller(p): Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<List<Snapshot>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::query(&e))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(ApiError::validation(vec![
            scaibunker_api::envelope::FieldDetail {
                field: "limit".into(),
                message: format!("must be between 1 and {MAX_PAGE_LIMIT}"),
            },
        ]));
    }
    let listing = svc::list(&s, &p, q.bunker_id.as_deref(), q.cursor.as_deref(), limit).await?;
    Ok(Json(List {
        status: "ok".into(),
        data: listing.rows.iter().map(to_api).collect(),
        has_more: listing.next_cursor.is_some(),
        next_cursor: listing.next_cursor,
    }))
}

/// One snapshot record.
#[utoipa::path(
    get,
    path = "/snapshots/{id}",
    operation_id = "get_snapshot",
    tag = "snapshots",
    params(("id" = String, Path, description = "Snapshot id (`snp_…`)")),
    responses(
        (status = 200, description = "The snapshot record", body = Envelope<Snapshot>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`SNAPSHOT_NOT_FOUND`: unknown or another tenant's snapshot", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Snapshot>>, ApiError> {
    let row = svc::get(&s, &p, &id).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}

/// Deletes the snapshot's objects, then the snapshot.
#[utoipa::path(
    delete,
    path = "/snapshots/{id}",
    operation_id = "delete_snapshot",
    tag = "snapshots",
    params(("id" = String, Path, description = "Snapshot id (`snp_…`)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:create`)", body = Error),
        (status = 404, description = "`SNAPSHOT_NOT_FOUND`: unknown or another tenant's snapshot", body = Error),
        (status = 409, description = "`SNAPSHOT_IN_USE`: a passivated bunker comes back from this snapshot; resume or delete the bunker first", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
        (status = 502, description = "`STORAGE_BACKEND_ERROR`: object storage failed; the snapshot is kept, retry", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    svc::delete(&s, &p, &ctx, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
