//! The storage proxy: `PUT|GET|HEAD|DELETE /storage/objects/{key…}` (worker token or
//! capability token) and `POST /storage/capabilities` (API key or JWT).
//!
//! Bodies stream both ways: a `PUT` hands the request body to the object store chunk by chunk
//! and a `GET` answers with the store's stream, so the proxy never holds an object in memory.
//! The object routes need only [`Storage`] (no database), which is what lets
//! `SCAIGRID_MODE=bunker_proxy` serve them alone ([`object_routes`]); alone, it refuses the one
//! write that needs the database, a worker's egress audit batch (`service::egress`).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRef, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use scaibunker_api::codes;
use scaibunker_api::envelope::{Error, Ok as Envelope};
use scaibunker_api::storage::{Capability, CreateCapability, ObjectWritten, StorageVerb};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::extract::{ApiJson, Caller, Ctx, bearer};
use crate::objects::{ObjectError, ObjectKey, ObjectMeta};
use crate::service::Services;
use crate::service::storage::{self as svc, Grant, Storage, StorageAuthError};

impl FromRef<Services> for Storage {
    fn from_ref(s: &Services) -> Self {
        s.storage.clone()
    }
}

/// The object routes, for any router state that holds a [`Storage`].
pub(super) fn object_routes<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Storage: FromRef<S>,
{
    OpenApiRouter::default().routes(routes!(put_object, get_object, head_object, delete_object))
}

/// A request to the object routes with a verified credential.
pub struct StorageAuth(pub Grant);

impl<S> FromRequestParts<S> for StorageAuth
where
    S: Send + Sync,
    Storage: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, ApiError> {
        let storage = Storage::from_ref(s);
        let grant = storage
            .authenticate(bearer(parts), svc::now_s())
            .map_err(ApiError::from)?;
        if let Grant::Capability(claims) = &grant {
            storage
                .check_revocation(claims)
                .await
                .map_err(|e| match e {
                    svc::RevocationError::Revoked => ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        codes::CAPABILITY_REVOKED,
                        e.to_string(),
                    ),
                    svc::RevocationError::Store(ref s) => ApiError::internal(s),
                })?;
        }
        Ok(StorageAuth(grant))
    }
}

/// The key of the request, validated, once `grant` was found to allow `verb` on it.
async fn authorized(
    st: &Storage,
    grant: &Grant,
    verb: StorageVerb,
    key: Result<Path<String>, PathRejection>,
) -> Result<ObjectKey, ApiError> {
    let key = key.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::OBJECT_KEY_INVALID,
            e.body_text(),
        )
    })?;
    let key = ObjectKey::parse(&key.0).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::OBJECT_KEY_INVALID,
            format!("invalid object key: {e}"),
        )
    })?;
    st.authorize(grant, verb, &key).await.map_err(|e| match e {
        svc::AuthorizeError::Denied(e) => ApiError::from(e),
        svc::AuthorizeError::Store(ref s) => ApiError::internal(s),
    })?;
    Ok(key)
}

fn object_headers(meta: &ObjectMeta) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size_bytes));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", meta.etag)) {
        h.insert(header::ETAG, v);
    }
    h
}

/// Stores the raw body under the key, streamed; the object appears whole or not at all.
#[utoipa::path(
    put,
    path = "/storage/objects/{*key}",
    operation_id = "put_object",
    tag = "storage",
    params(("key" = String, Path, description = "Object key: `/`-separated segments of `A-Z a-z 0-9 . _ - =`, none empty or starting with `.`; at most 1024 bytes")),
    request_body(content(("application/octet-stream")), description = "The object's bytes"),
    responses(
        (status = 201, description = "Stored", body = Envelope<ObjectWritten>),
        (status = 401, description = "`AUTH_TOKEN_MISSING`, `AUTH_TOKEN_INVALID`, `CAPABILITY_INVALID` or `CAPABILITY_EXPIRED`", body = Error),
        (status = 403, description = "`CAPABILITY_VERB_DENIED`, `CAPABILITY_OUT_OF_SCOPE`, `WORKER_STORAGE_DENIED`, `EGRESS_AUDIT_DENIED` (a worker writing the egress audit of a bunker not its own) or `EGRESS_AUDIT_NEEDS_CONTROLLER` (the egress audit on a proxy without a database)", body = Error),
        (status = 413, description = "`OBJECT_TOO_LARGE` (egress audit batches: 8 MiB at most)", body = Error),
        (status = 422, description = "`OBJECT_KEY_INVALID`", body = Error),
        (status = 502, description = "`STORAGE_BACKEND_ERROR`", body = Error),
    ),
    security(("worker_token" = []), ("capability" = []))
)]
pub async fn put_object(
    State(st): State<Storage>,
    StorageAuth(grant): StorageAuth,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Envelope<ObjectWritten>>), ApiError> {
    let key = authorized(&st, &grant, StorageVerb::Put, key).await?;
    let declared: Option<u64> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let max_bytes = st.max_put_bytes(&key);
    if declared.is_some_and(|n| n > max_bytes) {
        return Err(ObjectError::TooLarge {
            key: key.to_string(),
            max_bytes,
        }
        .into());
    }
    let (stream, rest) = super::upload::split(body);
    let put = rest
        .after(
            st.objects
                .store()
                .put(&key, Box::pin(stream), max_bytes)
                .await,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Envelope::new(ObjectWritten {
            key: key.to_string(),
            size_bytes: put.size_bytes,
            sha256: put.sha256,
            etag: put.etag,
        })),
    ))
}

/// Streams the object's bytes, with `Content-Length` and `ETag`.
#[utoipa::path(
    get,
    path = "/storage/objects/{*key}",
    operation_id = "get_object",
    tag = "storage",
    params(("key" = String, Path, description = "Object key")),
    responses(
        (status = 200, description = "The object's bytes", content(("application/octet-stream"))),
        (status = 401, description = "`AUTH_TOKEN_MISSING`, `AUTH_TOKEN_INVALID`, `CAPABILITY_INVALID` or `CAPABILITY_EXPIRED`", body = Error),
        (status = 403, description = "`CAPABILITY_VERB_DENIED` or `CAPABILITY_OUT_OF_SCOPE`", body = Error),
        (status = 404, description = "`OBJECT_NOT_FOUND`", body = Error),
        (status = 422, description = "`OBJECT_KEY_INVALID`", body = Error),
        (status = 502, description = "`STORAGE_BACKEND_ERROR`", body = Error),
    ),
    security(("worker_token" = []), ("capability" = []))
)]
pub async fn get_object(
    State(st): State<Storage>,
    StorageAuth(grant): StorageAuth,
    key: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let key = authorized(&st, &grant, StorageVerb::Get, key).await?;
    let read = st.objects.store().get(&key).await?;
    Ok((object_headers(&read.meta), Body::from_stream(read.body)).into_response())
}

/// The object's size (`Content-Length`) and `ETag`, without its bytes.
#[utoipa::path(
    head,
    path = "/storage/objects/{*key}",
    operation_id = "head_object",
    tag = "storage",
    params(("key" = String, Path, description = "Object key")),
    responses(
        (status = 200, description = "The object exists; `Content-Length` is its size"),
        (status = 401, description = "Bad or missing credential (no body on `HEAD`)"),
        (status = 403, description = "The credential does not cover this key or verb"),
        (status = 404, description = "No such object"),
        (status = 422, description = "Invalid key"),
    ),
    security(("worker_token" = []), ("capability" = []))
)]
pub async fn head_object(
    State(st): State<Storage>,
    StorageAuth(grant): StorageAuth,
    key: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let key = authorized(&st, &grant, StorageVerb::Head, key).await?;
    let meta = st.objects.store().head(&key).await?;
    Ok((object_headers(&meta), Body::empty()).into_response())
}

/// Removes the object; removing a missing object succeeds too.
#[utoipa::path(
    delete,
    path = "/storage/objects/{*key}",
    operation_id = "delete_object",
    tag = "storage",
    params(("key" = String, Path, description = "Object key")),
    responses(
        (status = 204, description = "Removed (or was not there)"),
        (status = 401, description = "`AUTH_TOKEN_MISSING`, `AUTH_TOKEN_INVALID`, `CAPABILITY_INVALID` or `CAPABILITY_EXPIRED`", body = Error),
        (status = 403, description = "`CAPABILITY_VERB_DENIED` or `CAPABILITY_OUT_OF_SCOPE`", body = Error),
        (status = 422, description = "`OBJECT_KEY_INVALID`", body = Error),
        (status = 502, description = "`STORAGE_BACKEND_ERROR`", body = Error),
    ),
    security(("worker_token" = []), ("capability" = []))
)]
pub async fn delete_object(
    State(st): State<Storage>,
    StorageAuth(grant): StorageAuth,
    key: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let key = authorized(&st, &grant, StorageVerb::Delete, key).await?;
    st.objects.store().delete(&key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Mints a capability token: a signed grant of some verbs on the keys under one prefix, until
/// it expires. Verified by any controller or storage proxy sharing the storage secret.
#[utoipa::path(
    post,
    path = "/storage/capabilities",
    operation_id = "create_capability",
    tag = "storage",
    request_body = CreateCapability,
    responses(
        (status = 201, description = "The token (shown once)", body = Envelope<Capability>),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:images:manage`)", body = Error),
        (status = 422, description = "`VALIDATION_ERROR`: a prefix not ending in `/`, outside `tenants/{tenant}/` without `scaibunker:admin:platform`, no verbs, or `ttl_s` outside 1 to 86400", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn create_capability(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    ApiJson(req): ApiJson<CreateCapability>,
) -> Result<(StatusCode, Json<Envelope<Capability>>), ApiError> {
    let cap = svc::create_capability(&s, &p, &ctx, req).await?;
    Ok((StatusCode::CREATED, Json(Envelope::new(cap))))
}

impl From<StorageAuthError> for ApiError {
    fn from(e: StorageAuthError) -> Self {
        use StorageAuthError as E;
        let msg = e.to_string();
        let (status, code) = match e {
            E::Missing => (StatusCode::UNAUTHORIZED, codes::AUTH_TOKEN_MISSING),
            E::Invalid => (StatusCode::UNAUTHORIZED, codes::AUTH_TOKEN_INVALID),
            E::CapabilityInvalid => (StatusCode::UNAUTHORIZED, codes::CAPABILITY_INVALID),
            E::CapabilityExpired => (StatusCode::UNAUTHORIZED, codes::CAPABILITY_EXPIRED),
            E::VerbDenied(_) => (StatusCode::FORBIDDEN, codes::CAPABILITY_VERB_DENIED),
            E::OutOfScope { .. } => (StatusCode::FORBIDDEN, codes::CAPABILITY_OUT_OF_SCOPE),
            E::WorkerDenied { .. } => (StatusCode::FORBIDDEN, codes::WORKER_STORAGE_DENIED),
            E::AuditDenied { .. } => (StatusCode::FORBIDDEN, codes::EGRESS_AUDIT_DENIED),
            E::AuditNeedsController => {
                (StatusCode::FORBIDDEN, codes::EGRESS_AUDIT_NEEDS_CONTROLLER)
            }
        };
        Self::new(status, code, msg)
    }
}

/// Revokes a capability token: the controllers' storage proxy refuses it from now on
/// (`CAPABILITY_REVOKED`); revoking the API key that minted it does the same. A proxy running
/// alone (`SCAIGRID_MODE=bunker_proxy`, no database) takes it until it expires.
#[utoipa::path(
    delete,
    path = "/storage/capabilities/{id}",
    operation_id = "revoke_capability",
    tag = "storage",
    params(("id" = String, Path, description = "Capability id (`cap_…`)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "`AUTH_TOKEN_MISSING` or `AUTH_TOKEN_INVALID`", body = Error),
        (status = 403, description = "`AUTHZ_PERMISSION_DENIED` (`scaibunker:images:manage`)", body = Error),
        (status = 404, description = "`CAPABILITY_NOT_FOUND`: unknown, already revoked or another tenant's", body = Error),
        (status = 429, description = "`RATE_LIMITED`; see `Retry-After`", body = Error),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_capability(
    State(s): State<Services>,
    Caller(p): Caller,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    svc::revoke_capability(&s, &p, &ctx, &id)
        .await
        .map_err(|e| match e {
            svc::RevokeCapabilityError::PermissionDenied(_) => ApiError::new(
                StatusCode::FORBIDDEN,
                codes::AUTHZ_PERMISSION_DENIED,
                e.to_string(),
            ),
            svc::RevokeCapabilityError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                codes::CAPABILITY_NOT_FOUND,
                e.to_string(),
            ),
            svc::RevokeCapabilityError::Store(ref s) => ApiError::internal(s),
        })?;
    Ok(StatusCode::NO_CONTENT)
}
