//! `/bunkers`: create, list, get, delete, exec.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use scaibunker_api::bunkers::{Bunker, CreateBunker};
use scaibunker_api::envelope::{DEFAULT_PAGE_LIMIT, List, MAX_PAGE_LIMIT, Ok as Envelope};
use scaibunker_api::exec::{ExecRequest, ExecResult};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{ApiJson, Caller, Ctx};
use crate::service::Services;
use crate::service::bunkers::{self as svc, to_api};
use crate::store::bunkers::BunkerFilter;
use crate::workers::Pause;

pub async fn create(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    ApiJson(req): ApiJson<CreateBunker>,
) -> Result<(StatusCode, Json<Envelope<Bunker>>), ApiError> {
    let row = svc::create(&s, &p, &ctx, req).await?;
    Ok((StatusCode::CREATED, Json(Envelope::new(to_api(&row)))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    lifecycle: Option<String>,
    /// `key=value`; repeatable as a comma-separated list.
    label: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn list(
    State(s): State<Services>,
    Caller(p): Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<List<Bunker>>, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::validation(vec![scaibunker_api::envelope::FieldDetail {
            field: "query".into(),
            message: e.body_text(),
        }])
    })?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(ApiError::validation(vec![
            scaibunker_api::envelope::FieldDetail {
                field: "limit".into(),
                message: format!("must be between 1 and {MAX_PAGE_LIMIT}"),
            },
        ]));
    }
    let labels = q
        .label
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => Err(ApiError::validation(vec![
                scaibunker_api::envelope::FieldDetail {
                    field: "label".into(),
                    message: "use key=value".into(),
                },
            ])),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = BunkerFilter {
        status: q.status,
        lifecycle_mode: q.lifecycle,
        labels,
    };
    let listing = svc::list(&s, &p, &filter, q.cursor.as_deref(), limit).await?;
    Ok(Json(List {
        status: "ok".into(),
        data: listing.rows.iter().map(to_api).collect(),
        has_more: listing.next_cursor.is_some(),
        next_cursor: listing.next_cursor,
    }))
}

pub async fn get(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::get(&s, &p, &id).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}

pub async fn delete(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::delete(&s, &p, &ctx, &id).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}

pub async fn exec(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Json<Envelope<ExecResult>>, ApiError> {
    let out = svc::exec(&s, &p, &ctx, &id, req).await?;
    Ok(Json(Envelope::new(out)))
}

pub async fn pause(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::set_paused(&s, &p, &ctx, &id, Pause::Pause).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}

pub async fn resume(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Bunker>>, ApiError> {
    let row = svc::set_paused(&s, &p, &ctx, &id, Pause::Resume).await?;
    Ok(Json(Envelope::new(to_api(&row))))
}
