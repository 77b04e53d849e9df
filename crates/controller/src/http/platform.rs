//! Platform routes under `/v1`: tenants, users, groups, API keys.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use scaibunker_api::envelope::Ok as Envelope;
use scaibunker_api::platform as api;

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use crate::service::{Services, identity};

type Created<T> = Result<(StatusCode, Json<Envelope<T>>), ApiError>;

fn created<T>(v: T) -> Created<T> {
    Ok((StatusCode::CREATED, Json(Envelope::new(v))))
}

pub async fn create_tenant(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateTenant>,
) -> Created<api::Tenant> {
    created(identity::create_tenant(&s, &p, req).await?)
}

pub async fn tenants(
    State(s): State<Services>,
    Caller(p): Caller,
) -> Result<Json<Envelope<Vec<api::Tenant>>>, ApiError> {
    Ok(Json(Envelope::new(identity::tenants(&s, &p).await?)))
}

pub async fn create_user(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateUser>,
) -> Created<api::User> {
    created(identity::create_user(&s, &p, req).await?)
}

pub async fn create_group(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateGroup>,
) -> Created<api::Group> {
    created(identity::create_group(&s, &p, req).await?)
}

pub async fn add_member(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<api::AddMember>,
) -> Created<api::Group> {
    created(identity::add_member(&s, &p, &id, req).await?)
}

pub async fn create_api_key(
    State(s): State<Services>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<api::CreateApiKey>,
) -> Created<api::ApiKeyCreated> {
    created(identity::create_api_key(&s, &p, req).await?)
}

pub async fn api_keys(
    State(s): State<Services>,
    Caller(p): Caller,
) -> Result<Json<Envelope<Vec<api::ApiKey>>>, ApiError> {
    Ok(Json(Envelope::new(identity::api_keys(&s, &p).await?)))
}

pub async fn revoke_api_key(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    identity::revoke_api_key(&s, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
