//! Platform routes under `/v1`: tenants, users, groups, API keys.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use scaibunker_api::envelope::{Error, Ok as Envelope};
use scaibunker_api::platform as api;

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::records::{QueryResult, query};
use crate::service::{Services, identity};

pub(super) type Created<T> = Result<(StatusCode, Json<Envelope<T>>), ApiError>;

pub(super) fn created<T>(v: T) -> Created<T> {
    Ok((StatusCode::CREATED, Json(Envelope::new(v))))
}

/// Creates a tenant (platform super admins).
#[utoipa::path(
    post,
    path = "/v1/tenants",
    operation_id = "create_tenant",
    tag = "platform",
    request_body = api::CreateTenant,
    responses(
        (status = 201, description = "The tenant", body = Envelope<api::Tenant>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:platform`)", body = Error),
        (status = 409, description = "`CONFLICT`: the slug, e-mail or name is taken", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_tenant(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateTenant>,
) -> Created<api::Tenant> {
    created(identity::create_tenant(&s, &p, req).await?)
}

/// Lists tenants (platform super admins).
#[utoipa::path(
    get,
    path = "/v1/tenants",
    operation_id = "list_tenants",
    tag = "platform",
    responses(
        (status = 200, description = "Every tenant", body = Envelope<Vec<api::Tenant>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:platform`)", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn tenants(
    State(s): State<Services>,
    Caller(p): Caller,
) -> Result<Json<Envelope<Vec<api::Tenant>>>, ApiError> {
    Ok(Json(Envelope::new(identity::tenants(&s, &p).await?)))
}

/// Creates a user in a tenant (super admins anywhere, tenant admins in their own tenant).
#[utoipa::path(
    post,
    path = "/v1/users",
    operation_id = "create_user",
    tag = "platform",
    request_body = api::CreateUser,
    responses(
        (status = 201, description = "The user", body = Envelope<api::User>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 404, description = "`TENANT_NOT_FOUND`", body = Error),
        (status = 409, description = "`CONFLICT`: the slug, e-mail or name is taken", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_user(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateUser>,
) -> Created<api::User> {
    created(identity::create_user(&s, &p, req).await?)
}

/// Creates a group in the caller's tenant.
#[utoipa::path(
    post,
    path = "/v1/groups",
    operation_id = "create_group",
    tag = "platform",
    request_body = api::CreateGroup,
    responses(
        (status = 201, description = "The group", body = Envelope<api::Group>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 404, description = "`GROUP_NOT_FOUND` (the parent)", body = Error),
        (status = 409, description = "`CONFLICT`: the slug, e-mail or name is taken", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_group(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateGroup>,
) -> Created<api::Group> {
    created(identity::create_group(&s, &p, req).await?)
}

/// Adds a user of the caller's tenant to a group.
#[utoipa::path(
    post,
    path = "/v1/groups/{id}/members",
    operation_id = "add_group_member",
    tag = "platform",
    params(("id" = String, Path, description = "Group id (`grp_…`)")),
    request_body = api::AddMember,
    responses(
        (status = 201, description = "The group with its members", body = Envelope<api::Group>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 404, description = "`GROUP_NOT_FOUND` or `USER_NOT_FOUND`", body = Error),
        (status = 409, description = "`CONFLICT`: the slug, e-mail or name is taken", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn add_member(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<api::AddMember>,
) -> Created<api::Group> {
    created(identity::add_member(&s, &p, &id, req).await?)
}

/// Mints an API key; the answer is the only time `key` is shown.
#[utoipa::path(
    post,
    path = "/v1/api-keys",
    operation_id = "create_api_key",
    tag = "platform",
    request_body = api::CreateApiKey,
    responses(
        (status = 201, description = "The key, shown once", body = Envelope<api::ApiKeyCreated>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`: another user needs `scaibunker:admin:tenant` and a role that does not outrank the caller's", body = Error),
        (status = 404, description = "`USER_NOT_FOUND`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_api_key(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateApiKey>,
) -> Created<api::ApiKeyCreated> {
    created(identity::create_api_key(&s, &p, req).await?)
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ApiKeysQuery {
    /// Another tenant's keys (super admins only; to anyone else `404 TENANT_NOT_FOUND`).
    tenant_id: Option<String>,
}

/// Lists one's own API keys (all the tenant's with `scaibunker:admin:tenant`, any tenant's
/// with `scaibunker:admin:platform`), never secrets.
#[utoipa::path(
    get,
    path = "/v1/api-keys",
    operation_id = "list_api_keys",
    tag = "platform",
    params(ApiKeysQuery),
    responses(
        (status = 200, description = "The keys", body = Envelope<Vec<api::ApiKey>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 404, description = "`TENANT_NOT_FOUND`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn api_keys(
    State(s): State<Services>,
    Caller(p): Caller,
    q: QueryResult<ApiKeysQuery>,
) -> Result<Json<Envelope<Vec<api::ApiKey>>>, ApiError> {
    let q = query(q)?;
    Ok(Json(Envelope::new(
        identity::api_keys(&s, &p, q.tenant_id.as_deref()).await?,
    )))
}

/// Revokes an API key at once.
#[utoipa::path(
    delete,
    path = "/v1/api-keys/{id}",
    operation_id = "revoke_api_key",
    tag = "platform",
    params(("id" = String, Path, description = "Key id (`key_…`)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 404, description = "`API_KEY_NOT_FOUND` (another user's key without `scaibunker:admin:tenant`, another tenant's without `scaibunker:admin:platform`)", body = Error),
        (status = 409, description = "`LAST_SUPER_ADMIN_KEY`: the last key holding every platform power; nothing changed", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_api_key(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    identity::revoke_api_key(&s, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
