//! Redis live state, shared by every controller. Each operation is one Lua script, so it is
//! atomic across controllers. Keys live under a configurable prefix.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use redis::aio::ConnectionManager;

use super::{LiveError, LiveState, QuotaCharge, RateDecision, Reservation, Stash};

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
/// Sliding windows, one per key, all counted or none. KEYS: the windows. ARGV: now (ms), window
/// (ms), the hit's unique member, then each key's limit. Returns 0 (counted everywhere) or the
/// milliseconds until the fullest window has room.
const RATE: &str = r"
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local wait = 0
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[3 + i]) then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local until_free = window
    if oldest[2] then until_free = tonumber(oldest[2]) + window - now end
    wait = math.max(wait, 1, until_free)
  end
end
if wait > 0 then return wait end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[i], window)
end
return 0
";

/// Quota check-and-increment. KEYS: epoch, stash, bunkers set, counters set, then one counter
/// per charge. ARGV: at_ms, bunker id, then amount and cap (-1: none) per charge.
/// Returns {1} reserved, {2} already reserved, {-2} counters missing, {-1, index, current}.
const QUOTA_RESERVE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {2} end
local n = #KEYS - 4
for i = 1, n do
  local cur = tonumber(redis.call('GET', KEYS[4 + i]) or '0')
  local amount = tonumber(ARGV[1 + 2 * i])
  local cap = tonumber(ARGV[2 + 2 * i])
  if cap >= 0 and cur + amount > cap then return {-1, i - 1, cur} end
end
local stash = {'@at', ARGV[1]}
for i = 1, n do
  redis.call('INCRBY', KEYS[4 + i], ARGV[1 + 2 * i])
  redis.call('SADD', KEYS[4], KEYS[4 + i])
  table.insert(stash, KEYS[4 + i])
  table.insert(stash, ARGV[1 + 2 * i])
end
redis.call('HSET', KEYS[2], unpack(stash))
redis.call('SADD', KEYS[3], ARGV[2])
return {1}
";

/// Quota release. KEYS: stash, bunkers set. ARGV: bunker id. Stash fields are full keys.
const QUOTA_RELEASE: &str = r"
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return 0 end
for i = 1, #h, 2 do
  if h[i] ~= '@at' then redis.call('DECRBY', h[i], h[i + 1]) end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
";

/// Quota rebuild. KEYS: epoch, bunkers set, counters set. ARGV: prefix, then a JSON list of
/// `[bunker_id, at_ms, [[counter, amount], …]]` with unprefixed counter keys.
const QUOTA_REBUILD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local prefix = ARGV[1]
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('DEL', prefix .. 'quota:bunker:' .. id)
end
for _, c in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('DEL', c) end
redis.call('DEL', KEYS[2], KEYS[3])
for _, b in ipairs(cjson.decode(ARGV[2])) do
  local stash = prefix .. 'quota:bunker:' .. b[1]
  redis.call('HSET', stash, '@at', b[2])
  for _, c in ipairs(b[3]) do
    local key = prefix .. c[1]
    redis.call('INCRBY', key, c[2])
    redis.call('SADD', KEYS[3], key)
    redis.call('HSET', stash, key, c[2])
  end
  redis.call('SADD', KEYS[2], b[1])
end
redis.call('SET', KEYS[1], ARGV[3])
return 1
";

/// Quota recount. KEYS: epoch, bunkers set, counters set. ARGV: prefix. Returns how many
/// counters changed (-1: counters missing).
const QUOTA_RECOUNT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local sums = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local h = redis.call('HGETALL', ARGV[1] .. 'quota:bunker:' .. id)
  for i = 1, #h, 2 do
    if h[i] ~= '@at' then sums[h[i]] = (sums[h[i]] or 0) + tonumber(h[i + 1]) end
  end
end
for _, c in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if sums[c] == nil then sums[c] = 0 end
end
local changed = 0
for c, v in pairs(sums) do
  if tonumber(redis.call('GET', c) or '0') ~= v then
    redis.call('SET', c, v)
    changed = changed + 1
  end
  redis.call('SADD', KEYS[3], c)
end
return changed
";

/// Every stashed bunker id and its `@at`. KEYS: bunkers set. ARGV: prefix.
const QUOTA_STASHES: &str = r"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', ARGV[1] .. 'quota:bunker:' .. id, '@at') or '0')
end
return out
";

#[derive(Clone)]
pub struct RedisLive {
    conn: ConnectionManager,
    prefix: String,
    lease: Script,
    rate: Script,
    quota_reserve: Script,
    quota_release: Script,
    quota_rebuild: Script,
    quota_recount: Script,
    quota_stashes: Script,
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
            quota_reserve: Script::new(QUOTA_RESERVE),
            quota_release: Script::new(QUOTA_RELEASE),
            quota_rebuild: Script::new(QUOTA_REBUILD),
            quota_recount: Script::new(QUOTA_RECOUNT),
            quota_stashes: Script::new(QUOTA_STASHES),
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    fn epoch(&self) -> String {
        self.key("quota:epoch")
    }

    fn stash(&self, bunker_id: &str) -> String {
        self.key(&format!("quota:bunker:{bunker_id}"))
    }

    fn bunkers_set(&self) -> String {
        self.key("quota:bunkers")
    }

    fn counters_set(&self) -> String {
        self.key("quota:counters")
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
        limits: &[(String, u32)],
        window: Duration,
    ) -> Result<RateDecision, LiveError> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        let mut inv = self.rate.prepare_invoke();
        for (key, _) in limits {
            inv.key(format!("{}rate:{key}", self.prefix));
        }
        // A unique member per hit: two hits in one millisecond must both count.
        inv.arg(now)
            .arg(window.as_millis() as u64)
            .arg(format!("{now}-{}", rand::random::<u64>()));
        for (_, limit) in limits {
            inv.arg(*limit);
        }
        let wait_ms: u64 = inv.invoke_async(&mut conn).await?;
        Ok(if wait_ms == 0 {
            RateDecision::Allowed
        } else {
            RateDecision::Limited {
                retry_after: Duration::from_millis(wait_ms),
            }
        })
    }

    async fn quota_reserve(
        &self,
        bunker_id: &str,
        charges: &[QuotaCharge],
        at_ms: i64,
    ) -> Result<Reservation, LiveError> {
        let mut conn = self.conn.clone();
        let mut inv = self.quota_reserve.prepare_invoke();
        inv.key(self.epoch())
            .key(self.stash(bunker_id))
            .key(self.bunkers_set())
            .key(self.counters_set())
            .arg(at_ms)
            .arg(bunker_id);
        for c in charges {
            inv.key(self.key(&c.counter))
                .arg(c.amount)
                .arg(c.cap.unwrap_or(-1));
        }
        let out: Vec<i64> = inv.invoke_async(&mut conn).await?;
        Ok(match out.as_slice() {
            [1] => Reservation::Reserved,
            [2] => Reservation::AlreadyReserved,
            [-1, index, current] => Reservation::Exceeded {
                index: *index as usize,
                current: *current,
            },
            _ => Reservation::CountersMissing,
        })
    }

    async fn quota_release(&self, bunker_id: &str) -> Result<bool, LiveError> {
        let mut conn = self.conn.clone();
        let done: i64 = self
            .quota_release
            .key(self.stash(bunker_id))
            .key(self.bunkers_set())
            .arg(bunker_id)
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }

    async fn quota_counters(&self, counters: &[String]) -> Result<Option<Vec<i64>>, LiveError> {
        let mut conn = self.conn.clone();
        let mut keys = vec![self.epoch()];
        keys.extend(counters.iter().map(|c| self.key(c)));
        let values: Vec<Option<i64>> = redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
        if values.first().is_none_or(Option::is_none) {
            return Ok(None);
        }
        Ok(Some(values[1..].iter().map(|v| v.unwrap_or(0)).collect()))
    }

    async fn quota_rebuild(&self, stashes: &[Stash]) -> Result<bool, LiveError> {
        let mut conn = self.conn.clone();
        let payload: Vec<serde_json::Value> = stashes
            .iter()
            .map(|s| serde_json::json!([s.bunker_id, s.at_ms, s.charges]))
            .collect();
        // An empty Lua table encodes as an object, so the list is never sent empty-as-`{}`.
        let payload = serde_json::to_string(&payload).expect("json values serialise");
        let done: i64 = self
            .quota_rebuild
            .key(self.epoch())
            .key(self.bunkers_set())
            .key(self.counters_set())
            .arg(&self.prefix)
            .arg(payload)
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }

    async fn quota_stashes(&self) -> Result<Vec<(String, i64)>, LiveError> {
        let mut conn = self.conn.clone();
        let flat: Vec<String> = self
            .quota_stashes
            .key(self.bunkers_set())
            .arg(&self.prefix)
            .invoke_async(&mut conn)
            .await?;
        Ok(flat
            .chunks(2)
            .filter_map(|p| match p {
                [id, at] => Some((id.clone(), at.parse().unwrap_or(0))),
                _ => None,
            })
            .collect())
    }

    async fn quota_recount(&self) -> Result<u64, LiveError> {
        let mut conn = self.conn.clone();
        let changed: i64 = self
            .quota_recount
            .key(self.epoch())
            .key(self.bunkers_set())
            .key(self.counters_set())
            .arg(&self.prefix)
            .invoke_async(&mut conn)
            .await?;
        Ok(changed.max(0) as u64)
    }
}
