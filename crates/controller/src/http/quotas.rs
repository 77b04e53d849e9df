//! `/quota-profiles` (profiles, their assignments, usage) and the platform's
//! `GET /v1/accounting/usage`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use scaibunker_api::envelope::{Error, Ok as Envelope};
use scaibunker_api::quotas as api;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::platform::{Created, created};
use super::records::{QueryResult, query, time_param};
use crate::service::{Services, accounting, quotas};

/// Creates a quota profile: the caller's tenant's (`scaibunker:admin:tenant`), another tenant's
/// or, with `tenant_id: null`, the platform default (`scaibunker:admin:platform`).
#[utoipa::path(
    post,
    path = "/quota-profiles",
    operation_id = "create_quota_profile",
    tag = "quotas",
    request_body = api::CreateQuotaProfile,
    responses(
        (status = 201, description = "The profile", body = Envelope<api::QuotaProfile>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`, or `:admin:platform` for a platform default)", body = Error),
        (status = 404, description = "`TENANT_NOT_FOUND`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_profile(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateQuotaProfile>,
) -> Created<api::QuotaProfile> {
    created(quotas::create_profile(&s, &p, req).await?)
}

/// Lists the tenant's profiles and the platform defaults (every profile for platform admins).
#[utoipa::path(
    get,
    path = "/quota-profiles",
    operation_id = "list_quota_profiles",
    tag = "quotas",
    responses(
        (status = 200, description = "The profiles, oldest first", body = Envelope<Vec<api::QuotaProfile>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn profiles(
    State(s): State<Services>,
    Caller(p): Caller,
) -> Result<Json<Envelope<Vec<api::QuotaProfile>>>, ApiError> {
    Ok(Json(Envelope::new(quotas::profiles(&s, &p).await?)))
}

/// One quota profile.
#[utoipa::path(
    get,
    path = "/quota-profiles/{id}",
    operation_id = "get_quota_profile",
    tag = "quotas",
    params(("id" = String, Path, description = "Quota profile id (`qp_…`)")),
    responses(
        (status = 200, description = "The profile", body = Envelope<api::QuotaProfile>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 404, description = "`QUOTA_PROFILE_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn profile(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<api::QuotaProfile>>, ApiError> {
    Ok(Json(Envelope::new(quotas::profile(&s, &p, &id).await?)))
}

/// Changes a profile: absent fields stay, `null` removes a cap. Takes effect on the next create.
#[utoipa::path(
    patch,
    path = "/quota-profiles/{id}",
    operation_id = "update_quota_profile",
    tag = "quotas",
    params(("id" = String, Path, description = "Quota profile id (`qp_…`)")),
    request_body = api::UpdateQuotaProfile,
    responses(
        (status = 200, description = "The profile", body = Envelope<api::QuotaProfile>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`, or `:admin:platform` for a platform default)", body = Error),
        (status = 404, description = "`QUOTA_PROFILE_NOT_FOUND`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn update_profile(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<api::UpdateQuotaProfile>,
) -> Result<Json<Envelope<api::QuotaProfile>>, ApiError> {
    Ok(Json(Envelope::new(
        quotas::update_profile(&s, &p, &id, req).await?,
    )))
}

/// Deletes a profile and its assignments. Bunkers it charged keep their charges until they end.
#[utoipa::path(
    delete,
    path = "/quota-profiles/{id}",
    operation_id = "delete_quota_profile",
    tag = "quotas",
    params(("id" = String, Path, description = "Quota profile id (`qp_…`)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`, or `:admin:platform` for a platform default)", body = Error),
        (status = 404, description = "`QUOTA_PROFILE_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn delete_profile(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    quotas::delete_profile(&s, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Assigns a tenant profile to a user (`individual`) or a group (`shared` or `per_user`).
/// A target holds at most one assignment.
#[utoipa::path(
    post,
    path = "/quota-profiles/{id}/assignments",
    operation_id = "create_quota_assignment",
    tag = "quotas",
    params(("id" = String, Path, description = "Quota profile id (`qp_…`)")),
    request_body = api::CreateAssignment,
    responses(
        (status = 201, description = "The assignment", body = Envelope<api::Assignment>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 404, description = "`QUOTA_PROFILE_NOT_FOUND`, `USER_NOT_FOUND` or `GROUP_NOT_FOUND`", body = Error),
        (status = 409, description = "`CONFLICT`: the target already has an assignment, or the profile is a platform default (not assigned)", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` (a mode the target kind does not take)", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_assignment(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<api::CreateAssignment>,
) -> Created<api::Assignment> {
    created(quotas::create_assignment(&s, &p, &id, req).await?)
}

/// The profile's assignments.
#[utoipa::path(
    get,
    path = "/quota-profiles/{id}/assignments",
    operation_id = "list_quota_assignments",
    tag = "quotas",
    params(("id" = String, Path, description = "Quota profile id (`qp_…`)")),
    responses(
        (status = 200, description = "The assignments, oldest first", body = Envelope<Vec<api::Assignment>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 404, description = "`QUOTA_PROFILE_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn assignments(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Vec<api::Assignment>>>, ApiError> {
    Ok(Json(Envelope::new(quotas::assignments(&s, &p, &id).await?)))
}

/// Removes an assignment. Bunkers it charged keep their charges until they end.
#[utoipa::path(
    delete,
    path = "/quota-profiles/{id}/assignments/{assignment_id}",
    operation_id = "delete_quota_assignment",
    tag = "quotas",
    params(
        ("id" = String, Path, description = "Quota profile id (`qp_…`)"),
        ("assignment_id" = String, Path, description = "Assignment id (`qpa_…`)"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:admin:tenant`)", body = Error),
        (status = 404, description = "`QUOTA_PROFILE_NOT_FOUND` or `QUOTA_ASSIGNMENT_NOT_FOUND`", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn delete_assignment(
    State(s): State<Services>,
    Caller(p): Caller,
    Path((id, assignment_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    quotas::delete_assignment(&s, &p, &id, &assignment_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Another user of the tenant (`scaibunker:admin:tenant`); default the caller.
    user_id: Option<String>,
}

/// Current usage, cap and remaining per bucket and resource of every profile that applies to
/// the caller (or to `user_id`).
#[utoipa::path(
    get,
    path = "/quota-profiles/usage",
    operation_id = "quota_usage",
    tag = "quotas",
    params(UsageQuery),
    responses(
        (status = 200, description = "One row per profile, bucket and resource", body = Envelope<Vec<api::QuotaUsage>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:create`; `:admin:tenant` for another user)", body = Error),
        (status = 404, description = "`USER_NOT_FOUND`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn usage(
    State(s): State<Services>,
    Caller(p): Caller,
    q: QueryResult<UsageQuery>,
) -> Result<Json<Envelope<Vec<api::QuotaUsage>>>, ApiError> {
    let q = query(q)?;
    Ok(Json(Envelope::new(
        quotas::usage(&s, &p, q.user_id.as_deref()).await?,
    )))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AccountingQuery {
    /// One tenant; another than the caller's needs `scaibunker:admin:platform`, whose default is
    /// every tenant.
    tenant_id: Option<String>,
    /// One user; another than the caller needs `scaibunker:admin:tenant`, whose default is every
    /// user of the tenant.
    user_id: Option<String>,
    /// Ticks starting at or after this RFC 3339 time.
    #[param(format = DateTime)]
    start: Option<String>,
    /// Ticks starting before this RFC 3339 time.
    #[param(format = DateTime)]
    end: Option<String>,
    /// Comma-separated `tenant`, `user`, and at most one of `hour`, `day`; default `tenant,user`.
    #[param(pattern = "^((tenant|user)?,)*(tenant|user|hour|day)?(,(tenant|user)?)*$")]
    group_by: Option<String>,
}

/// Bunker usage (CPU millicore-seconds, memory and disk MB-seconds, GPU-seconds), summed from
/// per-bunker ticks and grouped per tenant, user and period.
#[utoipa::path(
    get,
    path = "/v1/accounting/usage",
    operation_id = "accounting_usage",
    tag = "platform",
    params(AccountingQuery),
    responses(
        (status = 200, description = "One row per group", body = Envelope<Vec<api::AccountingUsage>>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED`", body = Error),
        (status = 422, description = "`VALIDATION_ERROR` on a query parameter", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn accounting_usage(
    State(s): State<Services>,
    Caller(p): Caller,
    q: QueryResult<AccountingQuery>,
) -> Result<Json<Envelope<Vec<api::AccountingUsage>>>, ApiError> {
    let q = query(q)?;
    let filter = accounting::UsageFilter {
        tenant_id: q.tenant_id,
        user_id: q.user_id,
        start_ms: time_param("start", q.start.as_deref())?,
        end_ms: time_param("end", q.end.as_deref())?,
        group_by: q.group_by,
    };
    Ok(Json(Envelope::new(
        accounting::usage(&s, &p, filter).await?,
    )))
}
