//! Worker-only routes: registration and heartbeats (worker token).

use axum::Json;
use axum::extract::{Path, State};
use scaibunker_api::envelope::Ok as Envelope;
use scaibunker_api::workers::Worker;
use scaibunker_proto::worker::{Heartbeat, HeartbeatResponse, RegisterRequest, RegisterResponse};

use super::error::ApiError;
use super::extract::{ApiJson, Caller, WorkerAuth};
use crate::service::{Services, fleet};

pub async fn register(
    State(s): State<Services>,
    _: WorkerAuth,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    Ok(Json(fleet::register(&s, req).await?))
}

pub async fn heartbeat(
    State(s): State<Services>,
    _: WorkerAuth,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    Ok(Json(fleet::heartbeat(&s, hb).await?))
}

pub async fn workers(
    State(s): State<Services>,
    Caller(p): Caller,
) -> Result<Json<Envelope<Vec<Worker>>>, ApiError> {
    Ok(Json(Envelope::new(fleet::workers(&s, &p).await?)))
}

pub async fn worker(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Worker>>, ApiError> {
    Ok(Json(Envelope::new(fleet::worker(&s, &p, &id).await?)))
}

pub async fn drain(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Worker>>, ApiError> {
    Ok(Json(Envelope::new(
        fleet::set_draining(&s, &p, &id, true).await?,
    )))
}

pub async fn resume(
    State(s): State<Services>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Envelope<Worker>>, ApiError> {
    Ok(Json(Envelope::new(
        fleet::set_draining(&s, &p, &id, false).await?,
    )))
}
