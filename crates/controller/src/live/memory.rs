//! In-process live state for a single embedded controller. Same semantics as Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{LiveError, LiveState, RateDecision};

#[derive(Default)]
pub struct InProcess {
    leases: Mutex<HashMap<String, (String, Instant)>>,
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    heartbeats: Mutex<HashMap<String, (i64, Instant)>>,
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
        key: &str,
        window: Duration,
        limit: u32,
    ) -> Result<RateDecision, LiveError> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let hits = windows.entry(key.to_owned()).or_default();
        while hits
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            hits.pop_front();
        }
        if hits.len() < limit as usize {
            hits.push_back(now);
            return Ok(RateDecision::Allowed);
        }
        let oldest = *hits.front().expect("a full window has an oldest hit");
        let retry_after = (oldest + window).saturating_duration_since(now);
        Ok(RateDecision::Limited {
            retry_after: retry_after.max(Duration::from_millis(1)),
        })
    }
}
