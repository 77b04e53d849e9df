//! The HTTP API (axum lives only here). One file per resource; a handler parses, calls one
//! service function and maps the result. Every response carries `x-request-id`; error bodies
//! carry it as `meta.request_id`.

mod bunkers;
mod error;
mod extract;
mod files;
mod fleet;
mod platform;
mod records;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use scaibunker_api::MODULE_PREFIX;
use scaibunker_api::codes;
use scaibunker_core::ids::encode_random;

pub use error::ApiError;

use crate::service::{Services, random_bytes};

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served (empty outside a request).
pub fn request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

async fn with_request_id(req: Request, next: Next) -> Response {
    let id = format!("req_{}", encode_random(random_bytes()));
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Records each request's route template, method, status and latency.
async fn observe(
    axum::extract::State(s): axum::extract::State<Services>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().to_string();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .observe(&route, &method, resp.status().as_u16(), started.elapsed());
    resp
}

/// `GET /metrics`: Prometheus text. Open, or behind `SCAIBUNKER_METRICS_TOKEN` when set.
async fn metrics(
    axum::extract::State(s): axum::extract::State<Services>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if let Ok(token) = std::env::var("SCAIBUNKER_METRICS_TOKEN")
        && !token.is_empty()
    {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                codes::AUTH_TOKEN_INVALID,
                "metrics need the metrics token",
            ));
        }
    }
    let (bunkers, workers) = s
        .store
        .admin_status_counts()
        .await
        .map_err(|e| ApiError::from(crate::service::bunkers::BunkerError::Store(e)))?;
    let body = s.metrics.render(&bunkers, &workers);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such route")
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

pub fn router(s: Services) -> Router {
    let module = Router::new()
        .route("/bunkers", post(bunkers::create).get(bunkers::list))
        .route("/bunkers/{id}", get(bunkers::get).delete(bunkers::delete))
        .route("/bunkers/{id}/pause", post(bunkers::pause))
        .route("/bunkers/{id}/resume", post(bunkers::resume))
        .route("/bunkers/{id}/exec", post(bunkers::exec))
        .route(
            "/bunkers/{id}/files",
            get(files::read).put(files::write).delete(files::remove),
        )
        .route("/bunkers/{id}/files/list", get(files::list))
        .route("/bunkers/{id}/exec-log", get(records::exec_log))
        .route("/audit", get(records::audit))
        .route("/workers/register", post(fleet::register))
        .route("/workers", get(fleet::workers))
        .route("/workers/{id}", get(fleet::worker))
        .route("/workers/{id}/drain", post(fleet::drain))
        .route("/workers/{id}/resume", post(fleet::resume))
        .route("/heartbeat", post(fleet::heartbeat));
    Router::new()
        .nest(MODULE_PREFIX, module)
        .route("/v1/audit-log", get(records::audit))
        .route(
            "/v1/tenants",
            post(platform::create_tenant).get(platform::tenants),
        )
        .route("/v1/users", post(platform::create_user))
        .route("/v1/groups", post(platform::create_group))
        .route("/v1/groups/{id}/members", post(platform::add_member))
        .route(
            "/v1/api-keys",
            post(platform::create_api_key).get(platform::api_keys),
        )
        .route(
            "/v1/api-keys/{id}",
            axum::routing::delete(platform::revoke_api_key),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                codes::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(s.clone(), observe))
        .layer(middleware::from_fn(with_request_id))
        .with_state(s)
}
