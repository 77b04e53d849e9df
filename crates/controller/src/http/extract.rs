//! Extractors: the authenticated caller, the worker token, and JSON bodies whose errors become
//! `422 VALIDATION_ERROR` naming the offending field.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use scaibunker_api::codes;
use scaibunker_api::envelope::FieldDetail;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::live::RateDecision;
use crate::service::auth::{self, Principal};
use crate::service::worker_credentials::{self, RegisterAuth, WorkerAuthError, WorkerIdentity};
use crate::service::{RequestContext, Services};

pub(super) fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The caller, authenticated by API key or JWT.
pub struct Caller(pub Principal);

impl FromRequestParts<Services> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Services) -> Result<Self, ApiError> {
        let p = auth::authenticate(&s.store, &s.config, bearer(parts)).await?;
        rate_limit(s, &p).await?;
        Ok(Caller(p))
    }
}

/// The caller of a WebSocket route: authenticated by the `Authorization` header or, for
/// clients that cannot set headers (browsers), a `token` query parameter.
pub struct SocketCaller(pub Principal);

impl FromRequestParts<Services> for SocketCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Services) -> Result<Self, ApiError> {
        let from_query =
            axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(
                &parts.uri,
            )
            .ok()
            .and_then(|q| q.0.get("token").cloned())
            .filter(|t| !t.is_empty());
        let token = bearer(parts).map(str::to_owned).or(from_query);
        let p = auth::authenticate(&s.store, &s.config, token.as_deref()).await?;
        rate_limit(s, &p).await?;
        Ok(SocketCaller(p))
    }
}

/// Counts the request against the key's window, its user's (twice as large) and its tenant's
/// (ten times as large), in one call to live state; a refused request counts in none.
/// Live state being down must not take the API with it: then the request passes, logged.
async fn rate_limit(s: &Services, p: &Principal) -> Result<(), ApiError> {
    let per_key = s.config.rate_limit_per_minute;
    let limits = [
        (format!("key:{}", p.key_id), per_key),
        // All of a user's keys together get twice one key's window; the tenant ten times.
        (format!("user:{}", p.user_id), per_key.saturating_mul(2)),
        (
            format!("tenant:{}", p.tenant_id),
            per_key.saturating_mul(10),
        ),
    ];
    match s
        .live
        .rate_hit(&limits, std::time::Duration::from_secs(60))
        .await
    {
        Ok(RateDecision::Allowed) => Ok(()),
        Ok(RateDecision::Limited { retry_after }) => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                codes::RATE_LIMITED,
                "too many requests a minute for this key, its user or its tenant; retry later",
            );
            e.retry_after_s = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
            Err(e)
        }
        Err(err) => {
            tracing::warn!(error = %err, "rate limiting skipped: live state unavailable");
            Ok(())
        }
    }
}

/// A request from a worker daemon, authenticated by its own credential (the join token does
/// not do here; see `service::worker_credentials`).
pub struct WorkerAuth(pub WorkerIdentity);

impl FromRequestParts<Services> for WorkerAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Services) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(WorkerAuthError::Missing)?;
        Ok(WorkerAuth(
            worker_credentials::authenticate(s, token).await?,
        ))
    }
}

/// A worker registration: the join token, or the worker's own credential.
pub struct RegisterBearer(pub RegisterAuth);

impl FromRequestParts<Services> for RegisterBearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Services) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(WorkerAuthError::Missing)?;
        Ok(RegisterBearer(
            worker_credentials::authenticate_register(s, token).await?,
        ))
    }
}

/// Request id and client address, for audit rows.
pub struct Ctx(pub RequestContext);

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        Ok(Ctx(RequestContext {
            request_id: super::request_id(),
            ip,
        }))
    }
}

/// A JSON body. Unknown fields, wrong types and malformed JSON are `422 VALIDATION_ERROR`
/// with the field path in `details`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Services> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, s: &Services) -> Result<Self, ApiError> {
        let limit = s.config.max_json_bytes;
        let body = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    codes::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {limit} bytes"),
                )
            })?;
        parse_json(&body).map(ApiJson)
    }
}

pub fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    let de = &mut serde_json::Deserializer::from_slice(body);
    let first = serde_path_to_error::deserialize(de);
    // JSON has one number type: `2.0` is the integer 2 to JSON Schema (and so to the OpenAPI
    // document and its clients), but not to serde. Such a body is read again with every whole
    // number written as an integer.
    let parsed = match first {
        Err(e)
            if e.inner()
                .to_string()
                .starts_with("invalid type: floating point") =>
        {
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(mut value) => {
                    whole_numbers_as_integers(&mut value);
                    serde_path_to_error::deserialize(&value).map_err(|e| {
                        let path = e.path().to_string();
                        (path, e.into_inner())
                    })
                }
                Err(_) => Err((e.path().to_string(), e.into_inner())),
            }
        }
        other => other.map_err(|e| (e.path().to_string(), e.into_inner())),
    };
    parsed.map_err(|(path, inner)| {
        let field = if path == "." || path.is_empty() {
            // serde reports an unknown field at the parent level; name it from the message.
            let msg = inner.to_string();
            msg.strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
                .map(str::to_owned)
                .unwrap_or_else(|| "body".to_owned())
        } else {
            path
        };
        let message = inner.to_string();
        let message = match message.split_once(" at line ") {
            Some((m, _)) => m.to_owned(),
            None => message,
        };
        ApiError::validation(vec![FieldDetail { field, message }])
    })
}

/// Rewrites every number that is a whole float exactly representable (|n| ≤ 2^53) as an
/// integer, in place.
fn whole_numbers_as_integers(v: &mut serde_json::Value) {
    use serde_json::Value;
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && f.abs() <= EXACT
            {
                *n = if f < 0.0 {
                    serde_json::Number::from(f as i64)
                } else {
                    serde_json::Number::from(f as u64)
                };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(map) => map.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Body {
        n: u64,
        list: Vec<i64>,
    }

    #[test]
    fn whole_floats_are_integers_and_fractions_are_refused() {
        let ok: Body = parse_json(&Bytes::from_static(br#"{"n": 60.0, "list": [-3.0, 4]}"#))
            .expect("whole numbers written as floats are integers");
        assert_eq!(
            ok,
            Body {
                n: 60,
                list: vec![-3, 4]
            }
        );
        for bad in [r#"{"n": 2.5, "list": []}"#, r#"{"n": 1e300, "list": []}"#] {
            let e = parse_json::<Body>(&Bytes::from(bad)).expect_err(bad);
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
    }
}
