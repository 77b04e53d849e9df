//! `/images` (upload, baking, warm), `/availability-groups` and the worker-only
//! `GET /peers/{sha256}`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use scaibunker_api::envelope::{Error, Ok as Envelope};
use scaibunker_api::images as api;
use scaibunker_proto::worker::PeersResponse;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{ApiJson, Caller, WorkerAuth};
use super::platform::{Created, created};
use crate::service::{Services, images};
use crate::store::availability::GroupMember;

type One<T> = Result<Json<Envelope<T>>, ApiError>;

/// Registers an image (`scaibunker:images:manage`; scope `partner` also needs
/// `scaibunker:admin:tenant`, `platform` needs `scaibunker:admin:platform`). Its bytes follow
/// with `PUT /images/{id}/content`.
#[utoipa::path(
    post,
    path = "/images",
    operation_id = "create_image",
    tag = "images",
    request_body = api::CreateImage,
    responses(
        (status = 201, description = "The image, `pending`", body = Envelope<api::Image>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 409, description = "`NAME_TAKEN`, or `TENANT_HAS_NO_PARTNER` for `partner` scope", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` or `IMAGE_SOURCE_UNSUPPORTED` (`oci`)", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateImage>,
) -> Created<api::Image> {
    created(images::create(&s, &p, req).await?)
}

/// Images the caller can use: its tenant's, its partner's and the platform's (all for
/// platform admins), newest first.
#[utoipa::path(
    get,
    path = "/images",
    operation_id = "list_images",
    tag = "images",
    responses(
        (status = 200, description = "The images", body = Envelope<Vec<api::Image>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(s): State<Services>, Caller(p): Caller) -> One<Vec<api::Image>> {
    Ok(Json(Envelope::new(images::list(&s, &p).await?)))
}

/// One image, with its per-worker cache states.
#[utoipa::path(
    get,
    path = "/images/{id}",
    operation_id = "get_image",
    tag = "images",
    params(("id" = String, Path, description = "Image id (`img_…`)")),
    responses(
        (status = 200, description = "The image", body = Envelope<api::Image>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`IMAGE_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> One<api::Image> {
    Ok(Json(Envelope::new(images::get(&s, &p, &id).await?)))
}

/// Uploads the image's bytes (a tarball or an ext4 filesystem, as its `source.kind` says),
/// streamed to object storage, then bakes them and fans the image out to its availability
/// groups. Answers when the image is `ready`; bad content leaves it `failed` with the reason
/// (a new upload may follow).
#[utoipa::path(
    put,
    path = "/images/{id}/content",
    operation_id = "upload_image_content",
    tag = "images",
    params(("id" = String, Path, description = "Image id (`img_…`)")),
    request_body(content(("application/octet-stream")), description = "The tarball or ext4 bytes"),
    responses(
        (status = 200, description = "The image, `ready`", body = Envelope<api::Image>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`IMAGE_NOT_FOUND`", body = Error),
        (status = 409, description = "`IMAGE_NOT_PENDING`: baking, ready or inactive", body = Error),
        (status = 413, description = "`IMAGE_TOO_LARGE`", body = Error),
        (status = 422, description = "`IMAGE_CONTENT_INVALID`: not a tarball / not ext4 / a member outside the root / does not fit `size_mib`", body = Error),
        (status = 429, description = "`RATE_LIMITED` (see `Retry-After`), or `STORAGE_QUOTA_EXCEEDED`: the image's `size_mib` does not fit the tenant's storage cap (`max_storage_mb`)", body = Error),
        (status = 502, description = "`STORAGE_BACKEND_ERROR`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn upload_content(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> One<api::Image> {
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (stream, rest) = super::upload::split(body);
    let image = rest
        .after(images::upload_content(&s, &p, &id, content_length, stream).await)
        .await?;
    Ok(Json(Envelope::new(image)))
}

/// Asks the workers of the image's availability groups (every online worker when it is in
/// none) to fetch it; failed fetches are retried.
#[utoipa::path(
    post,
    path = "/images/{id}/warm",
    operation_id = "warm_image",
    tag = "images",
    params(("id" = String, Path, description = "Image id (`img_…`)")),
    responses(
        (status = 200, description = "The image with its cache states", body = Envelope<api::Image>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`IMAGE_NOT_FOUND`", body = Error),
        (status = 409, description = "`IMAGE_NOT_PENDING`: the image is not ready", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn warm(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> One<api::Image> {
    Ok(Json(Envelope::new(images::warm(&s, &p, &id).await?)))
}

/// Deactivates an image: no new bunkers from it; running ones are unaffected.
#[utoipa::path(
    post,
    path = "/images/{id}/deactivate",
    operation_id = "deactivate_image",
    tag = "images",
    params(("id" = String, Path, description = "Image id (`img_…`)")),
    responses(
        (status = 200, description = "The image, `inactive`", body = Envelope<api::Image>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`IMAGE_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn deactivate(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> One<api::Image> {
    Ok(Json(Envelope::new(images::deactivate(&s, &p, &id).await?)))
}

/// Creates an availability group (`scaibunker:admin:platform`).
#[utoipa::path(
    post,
    path = "/availability-groups",
    operation_id = "create_availability_group",
    tag = "images",
    request_body = api::CreateAvailabilityGroup,
    responses(
        (status = 201, description = "The group", body = Envelope<api::AvailabilityGroup>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 409, description = "`NAME_TAKEN`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_group(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateAvailabilityGroup>,
) -> Created<api::AvailabilityGroup> {
    created(images::create_group(&s, &p, req).await?)
}

/// Lists availability groups with their workers and images (`scaibunker:admin:platform`).
#[utoipa::path(
    get,
    path = "/availability-groups",
    operation_id = "list_availability_groups",
    tag = "images",
    responses(
        (status = 200, description = "The groups, by name", body = Envelope<Vec<api::AvailabilityGroup>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn groups(
    State(s): State<Services>,
    Caller(p): Caller,
) -> One<Vec<api::AvailabilityGroup>> {
    Ok(Json(Envelope::new(images::groups(&s, &p).await?)))
}

/// One availability group (`scaibunker:admin:platform`).
#[utoipa::path(
    get,
    path = "/availability-groups/{id}",
    operation_id = "get_availability_group",
    tag = "images",
    params(("id" = String, Path, description = "Group id (`ag_…`)")),
    responses(
        (status = 200, description = "The group", body = Envelope<api::AvailabilityGroup>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`AVAILABILITY_GROUP_NOT_FOUND`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn group(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> One<api::AvailabilityGroup> {
    Ok(Json(Envelope::new(images::group(&s, &p, &id).await?)))
}

/// Deletes an availability group; cached images stay on the workers.
#[utoipa::path(
    delete,
    path = "/availability-groups/{id}",
    operation_id = "delete_availability_group",
    tag = "images",
    params(("id" = String, Path, description = "Group id (`ag_…`)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`AVAILABILITY_GROUP_NOT_FOUND`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn delete_group(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    images::delete_group(&s, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a worker to a group; the worker is asked to fetch every ready image of the group.
#[utoipa::path(
    post,
    path = "/availability-groups/{id}/workers/{worker_id}",
    operation_id = "add_availability_group_worker",
    tag = "images",
    params(("id" = String, Path, description = "Group id"), ("worker_id" = String, Path, description = "Worker id")),
    responses(
        (status = 200, description = "The group", body = Envelope<api::AvailabilityGroup>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`AVAILABILITY_GROUP_NOT_FOUND` or `WORKER_NOT_FOUND`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn add_worker(
    State(s): State<Services>,
    Caller(p): Caller,
    Path((id, worker_id)): Path<(String, String)>,
) -> One<api::AvailabilityGroup> {
    let g = images::set_member(&s, &p, &id, GroupMember::Worker, &worker_id, true).await?;
    Ok(Json(Envelope::new(g)))
}

/// Removes a worker from a group; what it cached stays.
#[utoipa::path(
    delete,
    path = "/availability-groups/{id}/workers/{worker_id}",
    operation_id = "remove_availability_group_worker",
    tag = "images",
    params(("id" = String, Path, description = "Group id"), ("worker_id" = String, Path, description = "Worker id")),
    responses(
        (status = 200, description = "The group", body = Envelope<api::AvailabilityGroup>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`AVAILABILITY_GROUP_NOT_FOUND` or `WORKER_NOT_FOUND`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn remove_worker(
    State(s): State<Services>,
    Caller(p): Caller,
    Path((id, worker_id)): Path<(String, String)>,
) -> One<api::AvailabilityGroup> {
    let g = images::set_member(&s, &p, &id, GroupMember::Worker, &worker_id, false).await?;
    Ok(Json(Envelope::new(g)))
}

/// Adds an image to a group; every online worker of the group is asked to fetch it.
#[utoipa::path(
    post,
    path = "/availability-groups/{id}/images/{image_id}",
    operation_id = "add_availability_group_image",
    tag = "images",
    params(("id" = String, Path, description = "Group id"), ("image_id" = String, Path, description = "Image id")),
    responses(
        (status = 200, description = "The group", body = Envelope<api::AvailabilityGroup>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`AVAILABILITY_GROUP_NOT_FOUND` or `IMAGE_NOT_FOUND`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn add_image(
    State(s): State<Services>,
    Caller(p): Caller,
    Path((id, image_id)): Path<(String, String)>,
) -> One<api::AvailabilityGroup> {
    let g = images::set_member(&s, &p, &id, GroupMember::Image, &image_id, true).await?;
    Ok(Json(Envelope::new(g)))
}

/// Removes an image from a group; caches keep it.
#[utoipa::path(
    delete,
    path = "/availability-groups/{id}/images/{image_id}",
    operation_id = "remove_availability_group_image",
    tag = "images",
    params(("id" = String, Path, description = "Group id"), ("image_id" = String, Path, description = "Image id")),
    responses(
        (status = 200, description = "The group", body = Envelope<api::AvailabilityGroup>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 404, description = "`AVAILABILITY_GROUP_NOT_FOUND` or `IMAGE_NOT_FOUND`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn remove_image(
    State(s): State<Services>,
    Caller(p): Caller,
    Path((id, image_id)): Path<(String, String)>,
) -> One<api::AvailabilityGroup> {
    let g = images::set_member(&s, &p, &id, GroupMember::Image, &image_id, false).await?;
    Ok(Json(Envelope::new(g)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PeersQuery {
    /// The asking worker: peers are the online workers sharing one of its availability groups.
    pub worker_id: String,
}

/// Which peers of the asking worker hold an image (its own credential, for its own id), each
/// with a peer token for the download; the body is `PeersResponse` of
/// `crates/proto/src/worker.rs`.
#[utoipa::path(
    get,
    path = "/peers/{sha256}",
    operation_id = "image_peers",
    tag = "internal",
    params(("sha256" = String, Path, description = "The image's SHA-256, lowercase hex"), PeersQuery),
    responses(
        (status = 200, description = "`PeersResponse`", body = Object),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID` (the worker's credential)", body = Error),
        (status = 403, description = "`WORKER_MISMATCH`: the credential is another worker's", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
    ),
    security(("worker_token" = []))
)]
pub async fn peers(
    State(s): State<Services>,
    WorkerAuth(ident): WorkerAuth,
    Path(sha256): Path<String>,
    q: Result<Query<PeersQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PeersResponse>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::query(&e))?;
    crate::service::fleet::require_self(&ident, &q.worker_id)?;
    Ok(Json(images::peers(&s, &q.worker_id, &sha256).await?))
}
