//! The HTTP error envelope and the mapping of every service error to a status and a stable code.
//! 5xx causes are logged once here and never sent to the client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use scaibunker_api::codes;
use scaibunker_api::envelope::{Error, ErrorBody, ErrorMeta, FieldDetail};

use super::request_id;
use crate::objects::ObjectError;
use crate::service::accounting::AccountingError;
use crate::service::auth::AuthError;
use crate::service::bunkers::{BunkerError, worker_code_status};
use crate::service::fleet::FleetError;
use crate::service::identity::IdentityError;
use crate::service::images::ImageError;
use crate::service::quotas::{QuotaError, QuotaExceeded};
use crate::service::storage::{CreateCapabilityError, MintError};
use crate::service::worker_credentials::{CredentialChangeError, WorkerAuthError};
use crate::workers::WorkerCallError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<FieldDetail>,
    /// Seconds, sent as `Retry-After` (rate limits).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after_s: None,
        }
    }

    pub fn validation(details: Vec<FieldDetail>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: codes::VALIDATION_ERROR,
            message: "request is invalid".into(),
            details,
            retry_after_s: None,
        }
    }

    /// A query string that does not parse: `422 VALIDATION_ERROR` on the field `query`.
    pub fn query(e: &axum::extract::rejection::QueryRejection) -> Self {
        Self::validation(vec![FieldDetail {
            field: "query".into(),
            message: e.body_text(),
        }])
    }

    pub(super) fn internal(cause: &dyn std::error::Error) -> Self {
        let mut chain = cause.to_string();
        let mut src = cause.source();
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        tracing::error!(request_id = request_id(), error = chain, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            "internal error; see the server log for this request id",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Error {
            status: "error".into(),
            error: ErrorBody {
                code: self.code.into(),
                message: self.message,
                details: self.details,
            },
            meta: ErrorMeta {
                request_id: request_id(),
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = axum::http::HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<WorkerAuthError> for ApiError {
    fn from(e: WorkerAuthError) -> Self {
        match e {
            WorkerAuthError::Missing => Self::new(
                StatusCode::UNAUTHORIZED,
                codes::AUTH_TOKEN_MISSING,
                "send `Authorization: Bearer <worker credential>`",
            ),
            WorkerAuthError::Invalid => Self::new(
                StatusCode::UNAUTHORIZED,
                codes::AUTH_TOKEN_INVALID,
                e.to_string(),
            ),
            WorkerAuthError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<CredentialChangeError> for ApiError {
    fn from(e: CredentialChangeError) -> Self {
        match e {
            CredentialChangeError::PermissionDenied(_) => Self::new(
                StatusCode::FORBIDDEN,
                codes::AUTHZ_PERMISSION_DENIED,
                e.to_string(),
            ),
            CredentialChangeError::NotFound => Self::new(
                StatusCode::NOT_FOUND,
                codes::WORKER_NOT_FOUND,
                e.to_string(),
            ),
            CredentialChangeError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => Self::new(
                StatusCode::UNAUTHORIZED,
                codes::AUTH_TOKEN_MISSING,
                "send `Authorization: Bearer <api key>`",
            ),
            AuthError::Invalid => Self::new(
                StatusCode::UNAUTHORIZED,
                codes::AUTH_TOKEN_INVALID,
                "the token is invalid or revoked",
            ),
            AuthError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<WorkerCallError> for ApiError {
    fn from(e: WorkerCallError) -> Self {
        match &e {
            WorkerCallError::Worker { body, .. } => {
                let (status, code) = worker_code_status(&body.code);
                if status >= 500 {
                    return Self::internal(&e);
                }
                Self::new(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    code,
                    body.message.clone(),
                )
            }
            _ => {
                tracing::error!(request_id = request_id(), error = %e, "worker call failed");
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    codes::WORKER_ERROR,
                    "the bunker's worker could not complete the operation",
                )
            }
        }
    }
}

impl From<BunkerError> for ApiError {
    fn from(e: BunkerError) -> Self {
        use BunkerError as B;
        let msg = e.to_string();
        match e {
            B::Validation(errs) => Self::validation(
                errs.into_iter()
                    .map(|f| FieldDetail {
                        field: f.field.into(),
                        message: f.message,
                    })
                    .collect(),
            ),
            B::PermissionDenied(_) => {
                Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg)
            }
            B::LifecycleModeDenied(..) => {
                Self::new(StatusCode::FORBIDDEN, codes::LIFECYCLE_MODE_DENIED, msg)
            }
            B::NetworkProfileDenied(..) => {
                Self::new(StatusCode::FORBIDDEN, codes::NETWORK_PROFILE_DENIED, msg)
            }
            B::InterfacesNotAllowed => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::INTERFACES_NOT_ALLOWED,
                msg,
            ),
            B::BridgeNotFound(_) => Self::new(StatusCode::NOT_FOUND, codes::BRIDGE_NOT_FOUND, msg),
            B::TransitMissingInterfaces => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::TRANSIT_MISSING_INTERFACES,
                msg,
            ),
            B::ImageNotFound(_) => Self::new(StatusCode::NOT_FOUND, codes::IMAGE_NOT_FOUND, msg),
            B::SnapshotNotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, codes::SNAPSHOT_NOT_FOUND, msg)
            }
            B::SnapshotNotReady(..) => {
                Self::new(StatusCode::CONFLICT, codes::SNAPSHOT_NOT_READY, msg)
            }
            B::SnapshotInUse(_) => Self::new(StatusCode::CONFLICT, codes::SNAPSHOT_IN_USE, msg),
            B::NotFound => Self::new(StatusCode::NOT_FOUND, codes::BUNKER_NOT_FOUND, msg),
            B::ExecNotFound => Self::new(StatusCode::NOT_FOUND, "EXEC_NOT_FOUND", msg),
            B::StreamBudgetExceeded { scope, limit_bytes } => {
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    codes::STREAM_BUDGET_EXCEEDED,
                    msg,
                );
                e.retry_after_s = Some(STREAM_BUDGET_RETRY_AFTER_S);
                e.details = vec![
                    FieldDetail {
                        field: "budget".into(),
                        message: scope.to_owned(),
                    },
                    FieldDetail {
                        field: "limit_bytes".into(),
                        message: limit_bytes.to_string(),
                    },
                ];
                e
            }
            B::OutputNotFound => Self::new(StatusCode::NOT_FOUND, codes::OUTPUT_NOT_FOUND, msg),
            B::Objects(e) => e.into(),
            B::ExecFailed { code, message } => {
                tracing::error!(
                    request_id = request_id(),
                    code,
                    message,
                    "an exec failed on the platform side"
                );
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    codes::WORKER_ERROR,
                    "the bunker's worker could not complete the exec",
                )
            }
            B::NotRunning(_) => Self::new(StatusCode::CONFLICT, codes::BUNKER_NOT_RUNNING, msg),
            B::InvalidTransition(_) => {
                Self::new(StatusCode::CONFLICT, codes::BUNKER_INVALID_TRANSITION, msg)
            }
            B::WorkerUnavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::WORKER_UNAVAILABLE,
                msg,
            ),
            B::NoSuitableWorker => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::NO_SUITABLE_WORKER,
                msg,
            ),
            B::InvalidPath(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, codes::INVALID_PATH, msg)
            }
            B::FileTooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, codes::FILE_TOO_LARGE, msg)
            }
            B::QuotaExceeded(x) => Self::quota_exceeded(codes::BUNKER_QUOTA_EXCEEDED, &x),
            B::StorageQuotaExceeded(x) => Self::quota_exceeded(codes::STORAGE_QUOTA_EXCEEDED, &x),
            B::QuotaUnavailable(ref c) => Self::internal(c),
            B::Worker(w) => w.into(),
            B::Store(ref s) => Self::internal(s),
        }
    }
}

/// What `STREAM_BUDGET_EXCEEDED` tells a client to wait: the budget frees up as running
/// streamed execs end, which the controller cannot foresee.
const STREAM_BUDGET_RETRY_AFTER_S: u64 = 5;

impl ApiError {
    /// `429 BUNKER_QUOTA_EXCEEDED` or `429 STORAGE_QUOTA_EXCEEDED`, its details naming the
    /// profile, bucket, resource and the numbers (one `{field, message}` each, as every error
    /// detail).
    fn quota_exceeded(code: &'static str, x: &QuotaExceeded) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, code, x.to_string());
        e.details = [
            ("profile_id", x.profile_id.clone()),
            ("bucket", x.bucket.clone()),
            ("resource", x.resource.to_owned()),
            ("current", x.current.to_string()),
            ("cap", x.cap.to_string()),
            ("requested", x.requested.to_string()),
        ]
        .into_iter()
        .map(|(field, message)| FieldDetail {
            field: field.into(),
            message,
        })
        .collect();
        e
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        let msg = e.to_string();
        match e {
            QuotaError::Invalid { field, message } => Self::validation(vec![FieldDetail {
                field: field.into(),
                message,
            }]),
            QuotaError::PermissionDenied(_) => {
                Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg)
            }
            QuotaError::NotFound(kind) => {
                let code = match kind {
                    "quota profile" => codes::QUOTA_PROFILE_NOT_FOUND,
                    "quota assignment" => codes::QUOTA_ASSIGNMENT_NOT_FOUND,
                    other => IdentityError::not_found_code(other),
                };
                Self::new(StatusCode::NOT_FOUND, code, msg)
            }
            QuotaError::Conflict(_) => Self::new(StatusCode::CONFLICT, codes::CONFLICT, msg),
            QuotaError::Unavailable(ref c) => Self::internal(c),
            QuotaError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<AccountingError> for ApiError {
    fn from(e: AccountingError) -> Self {
        let msg = e.to_string();
        match e {
            AccountingError::Invalid { field, message } => Self::validation(vec![FieldDetail {
                field: field.into(),
                message,
            }]),
            AccountingError::PermissionDenied(_) => {
                Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg)
            }
            AccountingError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        let msg = e.to_string();
        match e {
            IdentityError::Invalid { field, message } => Self::validation(vec![FieldDetail {
                field: field.into(),
                message,
            }]),
            IdentityError::PermissionDenied(_) => {
                Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg)
            }
            IdentityError::NotFound(kind) => Self::new(
                StatusCode::NOT_FOUND,
                IdentityError::not_found_code(kind),
                msg,
            ),
            IdentityError::Conflict(_) => Self::new(StatusCode::CONFLICT, codes::CONFLICT, msg),
            IdentityError::Outranked { .. } => {
                Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg)
            }
            IdentityError::LastSuperAdminKey(_) => {
                Self::new(StatusCode::CONFLICT, codes::LAST_SUPER_ADMIN_KEY, msg)
            }
            IdentityError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::ProtocolMismatch { .. } => {
                Self::new(StatusCode::CONFLICT, "PROTOCOL_MISMATCH", e.to_string())
            }
            FleetError::Invalid { field, ref message } => Self::validation(vec![FieldDetail {
                field: field.into(),
                message: message.clone(),
            }]),
            FleetError::PermissionDenied(_) => Self::new(
                StatusCode::FORBIDDEN,
                codes::AUTHZ_PERMISSION_DENIED,
                e.to_string(),
            ),
            FleetError::NotFound => Self::new(
                StatusCode::NOT_FOUND,
                codes::WORKER_NOT_FOUND,
                e.to_string(),
            ),
            FleetError::BridgeNotFound => Self::new(
                StatusCode::NOT_FOUND,
                codes::BRIDGE_NOT_FOUND,
                e.to_string(),
            ),
            FleetError::BridgeTaken { .. } => {
                Self::new(StatusCode::CONFLICT, codes::NAME_TAKEN, e.to_string())
            }
            FleetError::WorkerMismatch { .. } => {
                Self::new(StatusCode::FORBIDDEN, codes::WORKER_MISMATCH, e.to_string())
            }
            FleetError::CredentialRequired { .. } => Self::new(
                StatusCode::CONFLICT,
                codes::WORKER_CREDENTIAL_REQUIRED,
                e.to_string(),
            ),
            FleetError::Stopping(ref e) => Self::internal(e),
            FleetError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<ObjectError> for ApiError {
    fn from(e: ObjectError) -> Self {
        let msg = e.to_string();
        match e {
            ObjectError::InvalidKey { ref source, .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::OBJECT_KEY_INVALID,
                format!("{msg}: {source}"),
            ),
            ObjectError::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, codes::OBJECT_NOT_FOUND, msg)
            }
            ObjectError::TooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, codes::OBJECT_TOO_LARGE, msg)
            }
            ObjectError::Body { .. } => Self::new(
                StatusCode::BAD_REQUEST,
                codes::OBJECT_UPLOAD_INCOMPLETE,
                "the request body broke off before its end; nothing was stored",
            ),
            ObjectError::S3 { .. } => {
                let mut chain = msg;
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    chain.push_str(": ");
                    chain.push_str(&s.to_string());
                    src = s.source();
                }
                tracing::error!(
                    request_id = request_id(),
                    error = chain,
                    "object store failed"
                );
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    codes::STORAGE_BACKEND_ERROR,
                    "the object store failed the operation; see the server log for this request id",
                )
            }
            ObjectError::Io { .. } => Self::internal(&e),
        }
    }
}

impl From<CreateCapabilityError> for ApiError {
    fn from(e: CreateCapabilityError) -> Self {
        match e {
            CreateCapabilityError::Mint(MintError::PermissionDenied(_)) => Self::new(
                StatusCode::FORBIDDEN,
                codes::AUTHZ_PERMISSION_DENIED,
                e.to_string(),
            ),
            CreateCapabilityError::Mint(MintError::Invalid { field, message }) => {
                Self::validation(vec![FieldDetail {
                    field: field.into(),
                    message,
                }])
            }
            CreateCapabilityError::Store(ref s) => Self::internal(s),
        }
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        let msg = e.to_string();
        match e {
            ImageError::Invalid { field, message } => Self::validation(vec![FieldDetail {
                field: field.into(),
                message,
            }]),
            ImageError::PermissionDenied(_) => {
                Self::new(StatusCode::FORBIDDEN, codes::AUTHZ_PERMISSION_DENIED, msg)
            }
            ImageError::NotFound(kind) => {
                let code = match kind {
                    "availability group" => codes::AVAILABILITY_GROUP_NOT_FOUND,
                    "worker" => codes::WORKER_NOT_FOUND,
                    _ => codes::IMAGE_NOT_FOUND,
                };
                Self::new(StatusCode::NOT_FOUND, code, msg)
            }
            ImageError::NameTaken(_) => Self::new(StatusCode::CONFLICT, codes::NAME_TAKEN, msg),
            ImageError::StorageQuotaExceeded(x) => {
                Self::quota_exceeded(codes::STORAGE_QUOTA_EXCEEDED, &x)
            }
            ImageError::NoPartner => {
                Self::new(StatusCode::CONFLICT, codes::TENANT_HAS_NO_PARTNER, msg)
            }
            ImageError::NotPending { .. } | ImageError::NotReady { .. } => {
                Self::new(StatusCode::CONFLICT, codes::IMAGE_NOT_PENDING, msg)
            }
            ImageError::Unsupported(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::IMAGE_SOURCE_UNSUPPORTED,
                msg,
            ),
            ImageError::ContentInvalid(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::IMAGE_CONTENT_INVALID,
                msg,
            ),
            ImageError::TooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, codes::IMAGE_TOO_LARGE, msg)
            }
            ImageError::Object(o) => match o {
                ObjectError::Body { .. } => o.into(),
                ObjectError::S3 { .. } => o.into(),
                other => Self::internal(&other),
            },
            ImageError::Bake(ref b) => Self::internal(b),
            ImageError::Io(ref io) => Self::internal(io),
            ImageError::Store(ref st) => Self::internal(st),
        }
    }
}
