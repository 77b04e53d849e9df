//! Live state: what is shared between controllers but need not be durable — worker heartbeats,
//! job leases, rate-limit windows and quota counters. Behind one trait with two real
//! implementations: Redis (production, shared by every controller) and in-process (embedded, one
//! controller).
//!
//! Losing it loses nothing that matters: heartbeats come back with the next one (and the
//! database keeps a coarser copy meanwhile), a lease is re-taken on the next tick, a rate
//! window starts over, and quota counters are rebuilt from the database.
//!
//! Quota keys (under the prefix): counters `quota:bucket:{kind}:{id}:{resource}`; per bunker
//! the stash `quota:bunker:{bunker_id}` of what its create charged (field `@at`: when); the
//! sets `quota:bunkers` (stashed bunker ids) and `quota:counters` (counter keys); and the
//! sentinel `quota:epoch`, set when the counters are whole. Protocol:
//! 1. `quota_reserve` checks every cap and increments every counter in one atomic step, and
//!    stashes the charges; nothing changes if any cap would be passed, or if the sentinel is
//!    absent (the counters were lost and must be rebuilt first).
//! 2. `quota_release` applies the stash's decrements and deletes it in one atomic step, so
//!    however many paths end a bunker, its quota is released once.
//! 3. `quota_rebuild` replaces every counter and stash with the given ones and sets the
//!    sentinel, only if the sentinel is absent (so one rebuild wins).
//! 4. `quota_recount` sets every counter to the sum of the stashes (repairs drift).

mod memory;
mod redis;

use std::time::Duration;

pub use memory::InProcess;
pub use redis::RedisLive;

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("redis at {url} is unreachable")]
    Connect {
        url: String,
        #[source]
        source: ::redis::RedisError,
    },
    #[error("redis command failed")]
    Redis(#[from] ::redis::RedisError),
}

/// Outcome of counting one request against a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// Over the limit; a slot frees after this long.
    Limited {
        retry_after: Duration,
    },
}

/// The live counter key of one bucket's resource (without the installation prefix).
pub fn quota_counter(bucket: &str, resource: &str) -> String {
    format!("quota:bucket:{bucket}:{resource}")
}

/// One counter a create increments, and its cap (`None`: no cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCharge {
    /// A key from [`quota_counter`].
    pub counter: String,
    pub amount: i64,
    pub cap: Option<i64>,
}

/// The outcome of [`LiveState::quota_reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Every counter was incremented and the stash written.
    Reserved,
    /// The bunker already holds a reservation; nothing changed.
    AlreadyReserved,
    /// The charge at `index` would pass its cap; nothing changed.
    Exceeded { index: usize, current: i64 },
    /// The counters are missing (live state was wiped): rebuild, then retry.
    CountersMissing,
}

/// What one live bunker was charged, as rebuilt from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stash {
    pub bunker_id: String,
    pub at_ms: i64,
    pub charges: Vec<(String, i64)>,
}

#[async_trait::async_trait]
pub trait LiveState: Send + Sync {
    /// Takes the lease `name` for `holder` for `ttl` unless another holder has it.
    /// Returns whether `holder` holds it now.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, LiveError>;

    /// Records that `worker_id` sent a heartbeat at `at_ms` (Unix ms), kept for `ttl`.
    async fn put_heartbeat(
        &self,
        worker_id: &str,
        at_ms: i64,
        ttl: Duration,
    ) -> Result<(), LiveError>;

    /// The last heartbeat held for each of `worker_ids` (absent: none held).
    async fn heartbeats(
        &self,
        worker_ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>, LiveError>;

    /// Counts one event in every one of `limits` (`(key, limit)`: a sliding window of
    /// `window` under `key` holding at most `limit`), in one step: when any window is full the
    /// event is counted in none and the answer is the longest wait.
    async fn rate_hit(
        &self,
        limits: &[(String, u32)],
        window: Duration,
    ) -> Result<RateDecision, LiveError>;

    /// Checks and increments every counter of `charges` for `bunker_id`, atomically.
    async fn quota_reserve(
        &self,
        bunker_id: &str,
        charges: &[QuotaCharge],
        at_ms: i64,
    ) -> Result<Reservation, LiveError>;

    /// Applies and deletes the bunker's stash. Returns whether there was one to apply.
    async fn quota_release(&self, bunker_id: &str) -> Result<bool, LiveError>;

    /// The current values of `counters` (absent: 0), or `None` when the counters are missing.
    async fn quota_counters(&self, counters: &[String]) -> Result<Option<Vec<i64>>, LiveError>;

    /// Replaces every counter and stash with `stashes` and marks the counters whole, unless
    /// they already are. Returns whether this call rebuilt them.
    async fn quota_rebuild(&self, stashes: &[Stash]) -> Result<bool, LiveError>;

    /// Every stashed bunker and when it was charged.
    async fn quota_stashes(&self) -> Result<Vec<(String, i64)>, LiveError>;

    /// Sets every counter to the sum of the stashes; returns how many counters changed.
    async fn quota_recount(&self) -> Result<u64, LiveError>;
}

/// Opens the live state named by `SCAIBUNKER_REDIS_URL` (unset: in-process).
pub async fn open(
    redis_url: Option<&str>,
    prefix: &str,
) -> Result<std::sync::Arc<dyn LiveState>, LiveError> {
    Ok(match redis_url {
        Some(url) => std::sync::Arc::new(RedisLive::connect(url, prefix).await?),
        None => std::sync::Arc::new(InProcess::default()),
    })
}
