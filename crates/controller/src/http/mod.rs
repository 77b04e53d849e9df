//! The HTTP API (axum lives only here). One file per resource; a handler parses, calls one
//! service function and maps the result. Every response carries `x-request-id`; error bodies
//! carry it as `meta.request_id`.
//!
//! Every API route is registered with `routes!` from its `#[utoipa::path]` handler, so the
//! router and the OpenAPI document (`GET /openapi.json`) are built from one list. Only `/health`,
//! `/metrics` and `/openapi.json` itself are plain axum routes.

mod backchannel;
mod bunkers;
mod error;
mod exec_stream;
mod extract;
mod files;
mod fleet;
mod images;
mod openapi;
mod platform;
mod quotas;
mod records;
mod shell;
mod snapshots;
mod storage;
mod upload;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use scaibunker_api::MODULE_PREFIX;
use scaibunker_api::codes;
use scaibunker_core::ids::encode_random;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
        // Compared in constant time, like every other secret.
        let matches = given.is_some_and(|g| {
            scaibunker_proto::worker_auth::constant_time_eq(g.as_bytes(), token.as_bytes())
        });
        if !matches {
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

/// Every documented route, with its handler and its OpenAPI operation.
fn api_routes() -> OpenApiRouter<Services> {
    let module = OpenApiRouter::default()
        .routes(routes!(bunkers::create, bunkers::list))
        .routes(routes!(bunkers::get, bunkers::delete))
        .routes(routes!(bunkers::pause))
        .routes(routes!(bunkers::resume))
        .routes(routes!(bunkers::exec))
        .routes(routes!(snapshots::create))
        .routes(routes!(snapshots::list))
        .routes(routes!(snapshots::get, snapshots::delete))
        .routes(routes!(bunkers::exec_events))
        .routes(routes!(bunkers::exec_output))
        .routes(routes!(files::read, files::write, files::remove))
        .routes(routes!(files::list))
        .routes(routes!(files::read_archive, files::write_archive))
        .routes(routes!(shell::open))
        .routes(routes!(records::exec_log))
        .routes(routes!(records::egress))
        .routes(routes!(records::audit))
        .routes(routes!(fleet::register))
        .routes(routes!(fleet::workers))
        .routes(routes!(fleet::worker))
        .routes(routes!(fleet::drain))
        .routes(routes!(fleet::rotate_credential))
        .routes(routes!(fleet::reset_credential))
        .routes(routes!(fleet::resume))
        .routes(routes!(fleet::heartbeat))
        .routes(routes!(fleet::stopping))
        .routes(routes!(backchannel::self_record))
        .routes(routes!(backchannel::set_metadata))
        .routes(routes!(backchannel::event))
        .routes(routes!(backchannel::create_child, backchannel::children))
        .routes(routes!(backchannel::delete_child))
        .routes(routes!(fleet::create_bridge, fleet::bridges))
        .routes(routes!(fleet::delete_bridge))
        .routes(routes!(images::create, images::list))
        .routes(routes!(images::get))
        .routes(routes!(images::upload_content))
        .routes(routes!(images::warm))
        .routes(routes!(images::deactivate))
        .routes(routes!(images::create_group, images::groups))
        .routes(routes!(images::group, images::delete_group))
        .routes(routes!(images::add_worker, images::remove_worker))
        .routes(routes!(images::add_image, images::remove_image))
        .routes(routes!(images::peers))
        .routes(routes!(quotas::create_profile, quotas::profiles))
        .routes(routes!(quotas::usage))
        .routes(routes!(
            quotas::profile,
            quotas::update_profile,
            quotas::delete_profile
        ))
        .routes(routes!(quotas::create_assignment, quotas::assignments))
        .routes(routes!(quotas::delete_assignment))
        .routes(routes!(storage::create_capability))
        .routes(routes!(storage::revoke_capability))
        .merge(storage::object_routes());
    let mut api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .nest(MODULE_PREFIX, module)
        .routes(routes!(records::audit_log))
        .routes(routes!(quotas::accounting_usage))
        .routes(routes!(platform::create_tenant, platform::tenants))
        .routes(routes!(platform::create_user))
        .routes(routes!(platform::create_group))
        .routes(routes!(platform::add_member))
        .routes(routes!(platform::create_api_key, platform::api_keys))
        .routes(routes!(platform::revoke_api_key));
    openapi::reference_envelope_data(api.get_openapi_mut());
    openapi::document_wildcards(api.get_openapi_mut());
    openapi::parameters_never_null(api.get_openapi_mut());
    openapi::body_rules(api.get_openapi_mut());
    openapi::rate_limited_everywhere(api.get_openapi_mut());
    api
}

/// The OpenAPI 3.1 document of the API, as served at `GET /openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().into_openapi()
}

/// The storage proxy alone (`SCAIGRID_MODE=bunker_proxy`): the object routes and `/health`,
/// on nothing but [`Storage`](crate::service::storage::Storage).
pub fn proxy_router(st: crate::service::storage::Storage) -> Router {
    let (api, _) = OpenApiRouter::default()
        .nest(MODULE_PREFIX, storage::object_routes())
        .split_for_parts();
    api.route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(with_request_id))
        .layer(middleware::from_fn(scaibunker_http::close_unread))
        .with_state(st)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

pub fn router(s: Services) -> Router {
    let (api, doc) = api_routes().split_for_parts();
    // Serialised once: the document is fixed for the life of the process.
    let doc = bytes::Bytes::from(
        doc.to_json()
            .expect("the OpenAPI document serialises to JSON"),
    );
    api.route(
        "/openapi.json",
        get(move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                doc,
            )
        }),
    )
    .route("/health", get(health))
    .route("/metrics", get(metrics))
    .fallback(not_found)
    .method_not_allowed_fallback(method_not_allowed)
    .layer(middleware::from_fn_with_state(s.clone(), observe))
    .layer(middleware::from_fn(with_request_id))
    .layer(middleware::from_fn(scaibunker_http::close_unread))
    .with_state(s)
}
