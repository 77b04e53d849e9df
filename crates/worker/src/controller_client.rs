//! The worker's side of registration and heartbeats with the controller.
//!
//! 1. `POST {controller}/v1/modules/scaibunker/workers/register` with the worker's name,
//!    URL, total capacity, cached images and runtime; retried with a backoff from 0.5 s to
//!    5 s until it succeeds.
//! 2. Every heartbeat interval, `POST {controller}/v1/modules/scaibunker/heartbeat` with the
//!    free capacity, every bunker's status (failed ones with their reason), the digests of
//!    the cached images (prebuilt and pulled) and the pulls that failed since the last one
//!    (put back if the heartbeat does not land, so each is reported once). The answer's
//!    `pull_images` start background pulls ([`crate::pulls`]).
//! 3. A heartbeat answered `known: false` or `401` (the controller lost the worker, or its
//!    credential was reset) goes back to 1.
//!
//! 4. On a planned stop (SIGTERM), [`announce_stop`]:
//!    `POST {controller}/v1/modules/scaibunker/workers/{id}/stopping`, waited for up to the stop
//!    timeout while heartbeats go on, so the controller saves the bunkers (`full` snapshots)
//!    before the worker stops their VMs.
//!
//! Registration carries the worker's credential ([`crate::credentials`]) if it has one, else
//! the join token; a stored credential the controller refuses (`401`: an admin reset it) is
//! forgotten and the join token tried. The answer's credential is kept. Heartbeats carry the
//! credential; a rotated one in the answer replaces it. Failures are logged and retried,
//! never fatal: bunkers keep running while the controller is away.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use scaibunker_proto::worker::{
    Heartbeat, HeartbeatResponse, PROTOCOL_VERSION, RegisterRequest, RegisterResponse,
    StoppingResponse, VmStatus,
};

use crate::bunker::Bunkers;
use crate::capacity::{self, HostResources};
use crate::credentials::Credentials;

const REGISTER_PATH: &str = "/v1/modules/scaibunker/workers/register";
const HEARTBEAT_PATH: &str = "/v1/modules/scaibunker/heartbeat";
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("request to {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
}

/// Everything the loop needs.
pub struct ControllerLink {
    pub controller_url: String,
    pub credentials: Arc<Credentials>,
    pub name: String,
    /// This worker's API base URL, as the controller reaches it.
    pub worker_url: String,
    pub heartbeat_interval: Duration,
    pub host: HostResources,
    pub data_dir: PathBuf,
    pub bunkers: Arc<Bunkers>,
    /// The id the controller knows this worker by, once registered.
    pub registered_as: Arc<std::sync::RwLock<Option<String>>>,
}

impl ControllerLink {
    /// Registers, then heartbeats forever.
    pub async fn run(self) {
        let http = match reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build() {
            Ok(http) => http,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the controller http client; not registering");
                return;
            }
        };
        loop {
            let registered = self.register(&http).await;
            tracing::info!(worker_id = %registered.worker_id, "registered with the controller");
            *self
                .registered_as
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(registered.worker_id.clone());
            self.bunkers.pulls().set_worker_id(&registered.worker_id);
            self.heartbeat_until_unknown(&http, &registered.worker_id)
                .await;
            tracing::warn!("the controller no longer knows this worker; registering again");
        }
    }

    async fn register(&self, http: &reqwest::Client) -> RegisterResponse {
        let mut backoff = BACKOFF_START;
        loop {
            let images = self.bunkers.images();
            let req = RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: self.name.clone(),
                url: self.worker_url.clone(),
                capacity: self.host.total(&self.data_dir),
                images: images.cached_images(),
                runtime: self.bunkers.runtime(),
            };
            let bearer = self.credentials.bearer();
            match self
                .post::<_, RegisterResponse>(http, REGISTER_PATH, &bearer, &req)
                .await
            {
                Ok(resp) => {
                    if let Err(e) = self.credentials.set(&resp.credential) {
                        tracing::error!(error = %e, "cannot keep the worker credential; a restart will need an admin to reset it");
                    }
                    return resp;
                }
                Err(CallError::Status { status, .. })
                    if status == reqwest::StatusCode::UNAUTHORIZED
                        && bearer != self.credentials.join_token() =>
                {
                    tracing::warn!(
                        "the controller refused this worker's credential; registering with the join token"
                    );
                    self.credentials.forget();
                }
                Err(e) => {
                    tracing::warn!(error = %crate::bunker::supervisor::error_chain(&e), retry_in = ?backoff, "register with the controller");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn heartbeat_until_unknown(&self, http: &reqwest::Client, worker_id: &str) {
        let mut ticker = tokio::time::interval(self.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let beat = self.heartbeat(worker_id);
            let bearer = self.credentials.bearer();
            match self
                .post::<_, HeartbeatResponse>(http, HEARTBEAT_PATH, &bearer, &beat)
                .await
            {
                Ok(HeartbeatResponse {
                    known: true,
                    stop_bunkers,
                    pull_images,
                    credential,
                }) => {
                    if let Some(rotated) = credential {
                        match self.credentials.set(&rotated) {
                            Ok(()) => tracing::info!("the worker credential was rotated"),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot keep the rotated worker credential")
                            }
                        }
                    }
                    self.stop_orphans(stop_bunkers);
                    self.bunkers.pull_in_background(pull_images);
                }
                Ok(HeartbeatResponse { known: false, .. }) => {
                    // Failures go to whichever worker id the controller knows next.
                    self.bunkers.pulls().requeue_failures(beat.image_failures);
                    return;
                }
                Err(CallError::Status { status, .. })
                    if status == reqwest::StatusCode::UNAUTHORIZED =>
                {
                    // The credential was reset (or the controller lost this worker): register
                    // again, which falls back to the join token if the credential is refused.
                    self.bunkers.pulls().requeue_failures(beat.image_failures);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::bunker::supervisor::error_chain(&e), "heartbeat");
                    self.bunkers.pulls().requeue_failures(beat.image_failures);
                }
            }
        }
    }

    /// Stops the bunkers the controller no longer holds as live. A bunker still booting is
    /// left alone: its create call is in flight and answers the controller itself, and if
    /// the controller has given up on it, the next heartbeat names it again once it runs.
    fn stop_orphans(&self, ids: Vec<String>) {
        for id in ids {
            let Ok(bunker) = self.bunkers.get(&id) else {
                continue;
            };
            if bunker.status() == VmStatus::Booting {
                continue;
            }
            tracing::warn!(bunker_id = %id, "the controller holds this bunker as gone; stopping it");
            let bunkers = Arc::clone(&self.bunkers);
            tokio::spawn(async move {
                // Stopping an id that is already gone is fine.
                let _ = bunkers.stop(&id).await;
            });
        }
    }

    fn heartbeat(&self, worker_id: &str) -> Heartbeat {
        let free = capacity::free(self.host.total(&self.data_dir), self.bunkers.reserved());
        Heartbeat {
            worker_id: worker_id.to_owned(),
            capacity: free,
            active_bunkers: self.bunkers.active_count(),
            bunkers: self.bunkers.reports(),
            cached_images: Some(self.bunkers.cached_sha256s()),
            image_failures: self.bunkers.pulls().take_failures(),
        }
    }

    async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        http: &reqwest::Client,
        path: &str,
        bearer: &str,
        body: &B,
    ) -> Result<R, CallError> {
        post(
            http.post(format!("{}{path}", self.controller_url))
                .bearer_auth(bearer)
                .json(body),
        )
        .await
    }
}

/// Sends `rb` and reads a JSON answer; any status but success is an error with its body.
async fn post<R: serde::de::DeserializeOwned>(rb: reqwest::RequestBuilder) -> Result<R, CallError> {
    let (client, req) = rb.build_split();
    let req = req.map_err(|source| CallError::Http {
        url: "(unbuildable request)".into(),
        source,
    })?;
    let url = req.url().to_string();
    let http_err = |source| CallError::Http {
        url: url.clone(),
        source,
    };
    let resp = client.execute(req).await.map_err(http_err)?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(CallError::Status {
            url,
            status,
            body: body.chars().take(500).collect(),
        });
    }
    resp.json::<R>().await.map_err(http_err)
}

/// Step 4 of the module docs: tells the controller this worker (`worker_id`) is stopping and
/// waits, up to `timeout`, for it to have saved the bunkers. Logs what happened; the caller
/// stops the VMs either way.
pub async fn announce_stop(
    controller_url: &str,
    credentials: &Credentials,
    worker_id: &str,
    timeout: Duration,
) {
    let started = std::time::Instant::now();
    let http = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the controller http client; bunkers are not saved");
            return;
        }
    };
    let rb = http
        .post(format!(
            "{controller_url}/v1/modules/scaibunker/workers/{worker_id}/stopping"
        ))
        .bearer_auth(credentials.bearer());
    match post::<StoppingResponse>(rb).await {
        Ok(saved) => tracing::info!(
            passivated = saved.passivated.len(),
            terminated = saved.terminated.len(),
            failed = saved.failed.len(),
            ms = started.elapsed().as_millis() as u64,
            "the controller saved this worker's bunkers"
        ),
        Err(e) => tracing::warn!(
            error = %crate::bunker::supervisor::error_chain(&e),
            ms = started.elapsed().as_millis() as u64,
            "the controller did not save this worker's bunkers; those left fail"
        ),
    }
}
