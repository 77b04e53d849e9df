//! Live state: what is shared between controllers but need not be durable — worker heartbeats,
//! job leases and rate-limit windows. Behind one trait with two real implementations: Redis (production,
//! shared by every controller) and in-process (embedded, one controller).
//!
//! Losing it loses nothing that matters: heartbeats come back with the next one (and the
//! database keeps a coarser copy meanwhile), a lease is re-taken on the next tick and a rate
//! window starts over.

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

    /// Counts one event under `key` in a sliding window of `window` holding at most `limit`.
    async fn rate_hit(
        &self,
        key: &str,
        window: Duration,
        limit: u32,
    ) -> Result<RateDecision, LiveError>;
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
