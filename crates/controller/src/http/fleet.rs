//! Worker-only routes: registration and heartbeats (worker token).

use axum::Json;
use axum::extract::State;
use scaibunker_proto::worker::{Heartbeat, HeartbeatResponse, RegisterRequest, RegisterResponse};

use super::error::ApiError;
use super::extract::{ApiJson, WorkerAuth};
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
