//! Redis live state, shared by every controller. Each operation is one Lua script, so it is
//! atomic across controllers. Keys live under a configurable prefix.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use redis::aio::ConnectionManager;

use super::{LiveError, LiveState, RateDecision};

const LEASE: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Sliding window on a sorted set of hit timestamps (ms). Returns 0 when the hit is counted,
/// else the milliseconds until the oldest hit leaves the window.
const RATE: &str = r"
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
";

#[derive(Clone)]
pub struct RedisLive {
    conn: ConnectionManager,
    prefix: String,
    lease: Script,
    rate: Script,
}

impl RedisLive {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, LiveError> {
        let connect_err = |source| LiveError::Connect {
            url: url.to_owned(),
            source,
        };
        let client = redis::Client::open(url).map_err(connect_err)?;
        let conn = ConnectionManager::new(client).await.map_err(connect_err)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            lease: Script::new(LEASE),
            rate: Script::new(RATE),
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl LiveState for RedisLive {
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, LiveError> {
        let mut conn = self.conn.clone();
        let got: i64 = self
            .lease
            .key(format!("{}lease:{name}", self.prefix))
            .arg(holder)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(got == 1)
    }

    async fn put_heartbeat(
        &self,
        worker_id: &str,
        at_ms: i64,
        ttl: Duration,
    ) -> Result<(), LiveError> {
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(format!("{}hb:{worker_id}", self.prefix))
            .arg(at_ms)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn heartbeats(
        &self,
        worker_ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>, LiveError> {
        if worker_ids.is_empty() {
            return Ok(Default::default());
        }
        let mut conn = self.conn.clone();
        let keys: Vec<String> = worker_ids
            .iter()
            .map(|id| format!("{}hb:{id}", self.prefix))
            .collect();
        let values: Vec<Option<i64>> = redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
        Ok(worker_ids
            .iter()
            .zip(values)
            .filter_map(|(id, v)| v.map(|at| (id.clone(), at)))
            .collect())
    }

    async fn rate_hit(
        &self,
        key: &str,
        window: Duration,
        limit: u32,
    ) -> Result<RateDecision, LiveError> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        // A unique member per hit: two hits in one millisecond must both count.
        let member = format!("{now}-{}", rand::random::<u64>());
        let wait_ms: u64 = self
            .rate
            .key(format!("{}rate:{key}", self.prefix))
            .arg(now)
            .arg(window.as_millis() as u64)
            .arg(limit)
            .arg(member)
            .invoke_async(&mut conn)
            .await?;
        Ok(if wait_ms == 0 {
            RateDecision::Allowed
        } else {
            RateDecision::Limited {
                retry_after: Duration::from_millis(wait_ms),
            }
        })
    }
}
