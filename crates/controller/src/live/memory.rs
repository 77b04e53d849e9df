//! In-process live state for a single embedded controller. Same semantics as Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{LiveError, LiveState, QuotaCharge, RateDecision, Reservation, Stash};

#[derive(Default)]
pub struct InProcess {
    leases: Mutex<HashMap<String, (String, Instant)>>,
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    heartbeats: Mutex<HashMap<String, (i64, Instant)>>,
    quota: Mutex<Quota>,
}

/// The quota keys of the Redis layout, under one lock instead of one script.
#[derive(Default)]
struct Quota {
    /// The `quota:epoch` sentinel: false until the first rebuild, as after a Redis wipe.
    is_whole: bool,
    counters: HashMap<String, i64>,
    stashes: HashMap<String, (i64, Vec<(String, i64)>)>,
}

impl InProcess {
    fn quota(&self) -> std::sync::MutexGuard<'_, Quota> {
        self.quota.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl LiveState for InProcess {
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, LiveError> {
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.retain(|_, (_, until)| *until > now);
        match leases.get_mut(name) {
            Some((h, until)) if h == holder => {
                *until = now + ttl;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => {
                leases.insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn put_heartbeat(
        &self,
        worker_id: &str,
        at_ms: i64,
        ttl: Duration,
    ) -> Result<(), LiveError> {
        let mut hb = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        hb.insert(worker_id.to_owned(), (at_ms, Instant::now() + ttl));
        Ok(())
    }

    async fn heartbeats(&self, worker_ids: &[String]) -> Result<HashMap<String, i64>, LiveError> {
        let now = Instant::now();
        let mut hb = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        hb.retain(|_, (_, until)| *until > now);
        Ok(worker_ids
            .iter()
            .filter_map(|id| hb.get(id).map(|(at, _)| (id.clone(), *at)))
            .collect())
    }

    async fn rate_hit(
        &self,
        limits: &[(String, u32)],
        window: Duration,
    ) -> Result<RateDecision, LiveError> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = Duration::ZERO;
        for (key, limit) in limits {
            let hits = windows.entry(key.clone()).or_default();
            while hits
                .front()
                .is_some_and(|t| now.duration_since(*t) >= window)
            {
                hits.pop_front();
            }
            if hits.len() >= *limit as usize {
                let until = hits.front().map_or(window, |oldest| {
                    (*oldest + window).saturating_duration_since(now)
                });
                wait = wait.max(until.max(Duration::from_millis(1)));
            }
        }
        if !wait.is_zero() {
            return Ok(RateDecision::Limited { retry_after: wait });
        }
        for (key, _) in limits {
            windows.entry(key.clone()).or_default().push_back(now);
        }
        Ok(RateDecision::Allowed)
    }

    async fn quota_reserve(
        &self,
        bunker_id: &str,
        charges: &[QuotaCharge],
        at_ms: i64,
    ) -> Result<Reservation, LiveError> {
        let mut q = self.quota();
        if !q.is_whole {
            return Ok(Reservation::CountersMissing);
        }
        if q.stashes.contains_key(bunker_id) {
            return Ok(Reservation::AlreadyReserved);
        }
        for (index, c) in charges.iter().enumerate() {
            let current = q.counters.get(&c.counter).copied().unwrap_or(0);
            if c.cap.is_some_and(|cap| current + c.amount > cap) {
                return Ok(Reservation::Exceeded { index, current });
            }
        }
        for c in charges {
            *q.counters.entry(c.counter.clone()).or_default() += c.amount;
        }
        let stash = charges
            .iter()
            .map(|c| (c.counter.clone(), c.amount))
            .collect();
        q.stashes.insert(bunker_id.to_owned(), (at_ms, stash));
        Ok(Reservation::Reserved)
    }

    async fn quota_release(&self, bunker_id: &str) -> Result<bool, LiveError> {
        let mut q = self.quota();
        let Some((_, charges)) = q.stashes.remove(bunker_id) else {
            return Ok(false);
        };
        for (counter, amount) in charges {
            *q.counters.entry(counter).or_default() -= amount;
        }
        Ok(true)
    }

    async fn quota_counters(&self, counters: &[String]) -> Result<Option<Vec<i64>>, LiveError> {
        let q = self.quota();
        if !q.is_whole {
            return Ok(None);
        }
        Ok(Some(
            counters
                .iter()
                .map(|c| q.counters.get(c).copied().unwrap_or(0))
                .collect(),
        ))
    }

    async fn quota_rebuild(&self, stashes: &[Stash]) -> Result<bool, LiveError> {
        let mut q = self.quota();
        if q.is_whole {
            return Ok(false);
        }
        q.counters.clear();
        q.stashes.clear();
        for s in stashes {
            for (counter, amount) in &s.charges {
                *q.counters.entry(counter.clone()).or_default() += amount;
            }
            q.stashes
                .insert(s.bunker_id.clone(), (s.at_ms, s.charges.clone()));
        }
        q.is_whole = true;
        Ok(true)
    }

    async fn quota_stashes(&self) -> Result<Vec<(String, i64)>, LiveError> {
        Ok(self
            .quota()
            .stashes
            .iter()
            .map(|(id, (at, _))| (id.clone(), *at))
            .collect())
    }

    async fn quota_recount(&self) -> Result<u64, LiveError> {
        let mut q = self.quota();
        if !q.is_whole {
            return Ok(0);
        }
        let mut sums: HashMap<String, i64> = HashMap::new();
        for (_, charges) in q.stashes.values() {
            for (counter, amount) in charges {
                *sums.entry(counter.clone()).or_default() += amount;
            }
        }
        let mut changed = 0;
        for (counter, value) in q.counters.iter_mut() {
            let want = sums.remove(counter).unwrap_or(0);
            if *value != want {
                *value = want;
                changed += 1;
            }
        }
        for (counter, value) in sums {
            q.counters.insert(counter, value);
            changed += 1;
        }
        Ok(changed)
    }
}
