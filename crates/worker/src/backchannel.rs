//! The worker's part of the backchannel (NETWORK.md §4): a bunker's guest calls the
//! platform as itself, and the channel it calls on is the credential.
//!
//! 1. [`Backchannel::serve_bunker`] takes the calls of one bunker's agent channel (the
//!    worker spawned that QEMU, so every call on it is that bunker's).
//! 2. Each call is counted against the bunker's token bucket ([`RATE_PER_S`] a second,
//!    burst [`RATE_BURST`]), and each child create (`POST /v1/self/children`) also against
//!    [`SPAWNS_PER_MIN`] a minute; past either, `429` with `Retry-After`, and the controller
//!    is not called. The agent channel already bounds calls in flight to
//!    `MAX_API_IN_FLIGHT`.
//! 3. The path must be `/v1/self` or below it, in plain segments ([`controller_path`]);
//!    anything else is `404` here. No guest header is forwarded but `content-type`: an
//!    `Authorization`, `X-Bunker-Id` or any other identity a guest makes up never leaves
//!    the worker.
//! 4. The call goes to `{controller}/v1/modules/scaibunker/internal/bunkers/{id}/self…` with
//!    the worker's own credential; the controller checks the bunker is this worker's and
//!    running. Its answer (status, `content-type`, `retry-after`, at most
//!    `MAX_API_BODY_BYTES` of body) goes back to the guest.

use std::sync::Arc;
use std::time::Duration;

use scaibunker_proto::agent::MAX_API_BODY_BYTES;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::agent_client::ApiCall;
use crate::credentials::Credentials;

/// Calls a second a bunker may make, sustained.
pub const RATE_PER_S: f64 = 20.0;
/// Calls a bunker may make at once after a quiet spell.
pub const RATE_BURST: f64 = 40.0;
/// Child creates a minute a bunker may make (and at once).
pub const SPAWNS_PER_MIN: f64 = 10.0;
/// How long one forwarded call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The controller's routes for bunkers' calls, under its module prefix.
const INTERNAL_PREFIX: &str = "/v1/modules/scaibunker/internal/bunkers";

/// Forwards every bunker's calls to the controller.
pub struct Backchannel {
    http: reqwest::Client,
    controller_url: String,
    credentials: Arc<Credentials>,
}

impl std::fmt::Debug for Backchannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backchannel")
            .field("controller_url", &self.controller_url)
            .finish_non_exhaustive()
    }
}

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    /// The bucket of every call: [`RATE_PER_S`], burst [`RATE_BURST`].
    pub fn calls(now: Instant) -> Self {
        Self::new(now, RATE_PER_S, RATE_BURST)
    }

    /// The bucket of child creates: [`SPAWNS_PER_MIN`] a minute, as many at once.
    pub fn spawns(now: Instant) -> Self {
        Self::new(now, SPAWNS_PER_MIN / 60.0, SPAWNS_PER_MIN)
    }

    fn new(now: Instant, rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            at: now,
            rate,
            burst,
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Whether a guest call creates a child bunker (counted against [`SPAWNS_PER_MIN`]).
fn is_spawn(method: &str, path: &str) -> bool {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    method == "POST" && path == "/v1/self/children"
}

/// The controller path for a guest's path, or `None` for anything not at or below
/// `/v1/self` in plain segments (no dot segments, no escapes that could name another).
pub fn controller_path(bunker_id: &str, guest_path: &str) -> Option<String> {
    let (path, query) = match guest_path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (guest_path, None),
    };
    let rest = path.strip_prefix("/v1/self")?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    let plain = |seg: &str| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
    };
    if !rest.is_empty() && !rest[1..].split('/').all(plain) {
        return None;
    }
    let query_ok = |q: &str| {
        q.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'=' | b'&')
        })
    };
    let mut out = format!("{INTERNAL_PREFIX}/{bunker_id}/self{rest}");
    if let Some(q) = query {
        if !query_ok(q) {
            return None;
        }
        if !q.is_empty() {
            out.push('?');
            out.push_str(q);
        }
    }
    Some(out)
}

impl Backchannel {
    pub fn new(
        controller_url: &str,
        credentials: Arc<Credentials>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(CALL_TIMEOUT).build()?,
            controller_url: controller_url.trim_end_matches('/').to_owned(),
            credentials,
        })
    }

    /// Serves one agent channel's calls until the channel goes (steps 1–2).
    pub async fn serve_bunker(
        self: Arc<Self>,
        bunker_id: String,
        mut calls: mpsc::Receiver<ApiCall>,
    ) {
        let mut bucket = Bucket::calls(Instant::now());
        let mut spawns = Bucket::spawns(Instant::now());
        while let Some(call) = calls.recv().await {
            let now = Instant::now();
            let limited = bucket
                .take(now)
                .map_err(|wait| {
                    (
                        wait,
                        format!(
                            "at most {RATE_PER_S} backchannel calls a second per bunker (burst {RATE_BURST})"
                        ),
                    )
                })
                .and_then(|()| {
                    if !is_spawn(&call.request.method, &call.request.path) {
                        return Ok(());
                    }
                    spawns.take(now).map_err(|wait| {
                        (
                            wait,
                            format!("at most {SPAWNS_PER_MIN} child creates a minute per bunker"),
                        )
                    })
                });
            if let Err((wait, message)) = limited {
                let retry = wait.as_secs_f64().ceil().max(1.0) as u64;
                let extra = vec![("retry-after".to_owned(), retry.to_string())];
                tokio::spawn(async move {
                    call.responder
                        .error(429, "RATE_LIMITED", &message, extra)
                        .await;
                });
                continue;
            }
            let this = Arc::clone(&self);
            let bunker_id = bunker_id.clone();
            tokio::spawn(async move { this.forward(&bunker_id, call).await });
        }
        tracing::debug!(%bunker_id, "backchannel of the bunker's channel ended");
    }

    /// Steps 3–4.
    async fn forward(&self, bunker_id: &str, call: ApiCall) {
        let ApiCall {
            request,
            body,
            responder,
        } = call;
        let Some(path) = controller_path(bunker_id, &request.path) else {
            return responder
                .error(
                    404,
                    "NOT_FOUND",
                    "the backchannel serves /v1/self and below only",
                    vec![],
                )
                .await;
        };
        let Ok(method) = reqwest::Method::from_bytes(request.method.as_bytes()) else {
            return responder
                .error(405, "METHOD_NOT_ALLOWED", "unknown method", vec![])
                .await;
        };
        let content_type = request
            .headers
            .iter()
            .find(|(name, _)| name == "content-type")
            .map(|(_, v)| v.clone());
        let url = format!("{}{path}", self.controller_url);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(self.credentials.bearer())
            .body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(%bunker_id, error = %e, "backchannel call to the controller failed");
                return responder
                    .error(
                        502,
                        "BACKCHANNEL_FAILED",
                        "the platform could not be reached",
                        vec![],
                    )
                    .await;
            }
        };
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> = ["content-type", "retry-after"]
            .iter()
            .filter_map(|name| {
                resp.headers()
                    .get(*name)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| ((*name).to_owned(), v.to_owned()))
            })
            .collect();
        match read_bounded(resp).await {
            Some(body) => responder.respond(status, headers, &body).await,
            None => {
                responder
                    .error(
                        502,
                        "BACKCHANNEL_FAILED",
                        "the platform's answer was cut off or over 1 MiB",
                        vec![],
                    )
                    .await;
            }
        }
    }
}

async fn read_bounded(mut resp: reqwest::Response) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.ok()? {
        if (body.len() + chunk.len()) as u64 > MAX_API_BODY_BYTES {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn maps_only_paths_at_or_below_self() {
        let p = |g: &str| controller_path("bnk_a", g);
        assert_eq!(
            p("/v1/self").as_deref(),
            Some("/v1/modules/scaibunker/internal/bunkers/bnk_a/self")
        );
        assert_eq!(
            p("/v1/self/children/bnk_b").as_deref(),
            Some("/v1/modules/scaibunker/internal/bunkers/bnk_a/self/children/bnk_b")
        );
        assert_eq!(
            p("/v1/self/children?limit=5").as_deref(),
            Some("/v1/modules/scaibunker/internal/bunkers/bnk_a/self/children?limit=5")
        );
        for bad in [
            "/v1/selfish",
            "/v1/self/",
            "/v1/self//children",
            "/v1/self/../../bunkers/bnk_b",
            "/v1/self/./children",
            "/v1/self/%2e%2e/x",
            "/v1/self/children/bnk_b%2F..",
            "/v1/self?x=%2F",
            "/v1/bunkers",
            "/v1/modules/scaibunker/bunkers",
            "//evil/v1/self",
            "/v1/self#frag",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::calls(t0);
        for _ in 0..RATE_BURST as usize {
            b.take(t0).unwrap();
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(50));
        let later = t0 + Duration::from_millis(100);
        b.take(later).unwrap();
        b.take(later).unwrap();
        assert!(
            b.take(later).is_err(),
            "two tokens in 100 ms at 20 a second"
        );
    }

    #[test]
    fn child_creates_have_a_bucket_of_their_own() {
        assert!(is_spawn("POST", "/v1/self/children"));
        assert!(is_spawn("POST", "/v1/self/children?x=1"));
        assert!(!is_spawn("GET", "/v1/self/children"));
        assert!(!is_spawn("DELETE", "/v1/self/children/bnk_a"));
        let t0 = Instant::now();
        let mut b = Bucket::spawns(t0);
        for _ in 0..SPAWNS_PER_MIN as usize {
            b.take(t0).unwrap();
        }
        let wait = b.take(t0).unwrap_err();
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(6),
            "{wait:?}"
        );
        b.take(t0 + Duration::from_secs(6)).unwrap();
    }
}
