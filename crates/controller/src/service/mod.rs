//! Use cases of the controller. No axum and no SQL text here: handlers call these, these call
//! the store, the worker client and the core.

pub mod accounting;
pub mod activity;
pub mod auth;
pub mod backchannel;
pub mod builtin_images;
pub mod bunkers;
pub mod egress;
pub mod exec_budget;
pub mod exec_output;
pub mod exec_stream;
pub mod fleet;
pub mod identity;
pub mod images;
pub mod passivation;
pub mod quotas;
pub mod records;
pub mod shell;
pub mod snapshots;
pub mod storage;
pub mod storage_quota;
pub mod worker_credentials;
pub mod worker_stop;

use std::sync::Arc;

use rand::RngCore;

use crate::config::ControllerConfig;
use crate::store::Store;
use crate::workers::WorkerClient;

/// Everything a request handler needs, cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub workers: WorkerClient,
    pub config: Arc<ControllerConfig>,
    /// Serialises placement within this controller so two concurrent creates never both take
    /// the last free slot of a worker.
    pub placement_lock: Arc<tokio::sync::Mutex<()>>,
    /// Leases and rate windows (Redis, or in-process when embedded).
    pub live: Arc<dyn crate::live::LiveState>,
    /// This controller's identity as a lease holder.
    pub controller_id: String,
    /// Streamed execs of this controller, resumable by id.
    pub exec_hub: Arc<exec_stream::ExecHub>,
    /// Bunkers with an exec running or a shell open on this controller (busy, not idle).
    pub activity: Arc<activity::Activity>,
    /// HTTP request metrics of this controller.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The ticks this controller ran each job for (newest last, bounded): observability.
    pub job_runs: Arc<std::sync::Mutex<std::collections::VecDeque<(&'static str, u128)>>>,
    /// Object storage and the storage proxy's credentials.
    pub storage: storage::Storage,
    /// When this controller started (ms since the epoch): a worker's silence is counted from
    /// no earlier, since heartbeats sent while no controller ran could not have arrived.
    pub started_at_ms: i64,
}

impl Services {
    /// Object storage (images, snapshots, large exec outputs):
    /// `services.objects().put_stream(key, stream, max_bytes)` and `.get_stream(key)`.
    pub fn objects(&self) -> &crate::objects::Objects {
        &self.storage.objects
    }
}

/// Who made a request and from where, for audit rows.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub request_id: String,
    pub ip: Option<String>,
}

/// 16 bytes from the OS's CSPRNG.
pub fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b
}
