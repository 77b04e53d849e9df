//! The bunker handlers: create, list, get, delete, pause, resume and snapshot, each parsed
//! into a `Command` for `execute`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use scaibunker_proto::worker::{CreateVm, SnapshotVm};

use super::{ApiError, ApiState, Command, execute, json_body};

pub(super) async fn create_bunker(
    State(s): State<Arc<ApiState>>,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::CreateBunker(Box::new(json_body(body)?))).await
}

pub(super) async fn list_bunkers(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    execute(&s, Command::ListBunkers).await
}

pub(super) async fn get_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::GetBunker(id)).await
}

pub(super) async fn delete_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::DeleteBunker(id)).await
}

pub(super) async fn pause_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::PauseBunker(id)).await
}

pub(super) async fn resume_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    execute(&s, Command::ResumeBunker(id)).await
}

pub(super) async fn snapshot_bunker(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Result<Json<SnapshotVm>, JsonRejection>,
) -> Result<Response, ApiError> {
    execute(&s, Command::SnapshotBunker(id, json_body(body)?)).await
}
