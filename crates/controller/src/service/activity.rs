//! Live work as activity: a bunker with an exec running or a shell open on this controller is
//! *busy*, and the sweeper neither ends nor passivates a busy bunker, whatever its idle timeout.
//!
//! Protocol, with `T` the configured `activity_interval`:
//! 1. Before an exec or shell reaches the worker, [`hold`] counts it against its bunker here.
//!    If this controller has not marked the bunker within `T`, it writes the mark now: the row's
//!    `busy_until` becomes `now + 3T` (never moved back, so several controllers holding one
//!    bunker do not undo each other) and `last_activity_at` becomes `now`.
//! 2. Every `T`, [`spawn`]'s ticker renews the mark of each bunker still held here and last
//!    marked over `T/2` ago, so a mark never lapses while its work lasts: one write per bunker
//!    and controller per `T`, however many execs and shells share it.
//! 3. Dropping the [`ActivityGuard`] ends the hold; the bunker's idle clock then runs from its
//!    last activity (the exec's or shell's end records one), once the last mark has lapsed.
//!
//! A controller that dies stops renewing: its marks lapse within `3T` and the bunker idles as
//! usual. The sweeper's reads and its compare-and-set both check the mark (`store::bunkers::IDLE_AT`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Services;
use crate::store::bunkers::{self as bstore, BunkerRow};
use crate::store::{StoreError, now_ms};

/// How many activity intervals a busy mark lasts.
const MARK_INTERVALS: u32 = 3;

/// The bunkers this controller runs live work in.
#[derive(Default)]
pub struct Activity {
    bunkers: Mutex<HashMap<String, Held>>,
}

struct Held {
    tenant_id: String,
    /// Execs and shells running now.
    holds: usize,
    /// When this controller last wrote the bunker's mark.
    marked: Option<Instant>,
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.bunkers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, bunker_id: &str) {
        if let Some(h) = self.lock().get_mut(bunker_id) {
            h.holds = h.holds.saturating_sub(1);
        }
    }

    fn marked(&self, bunker_id: &str, at: Instant) {
        if let Some(h) = self.lock().get_mut(bunker_id) {
            h.marked = Some(at);
        }
    }

    /// Bunkers held here whose mark is due (last written `renew_after` ago or more); forgets
    /// the ones no longer held whose mark is older than `forget_after`.
    fn due(&self, renew_after: Duration, forget_after: Duration) -> Vec<(String, String)> {
        let mut map = self.lock();
        map.retain(|_, h| h.holds > 0 || h.marked.is_some_and(|m| m.elapsed() < forget_after));
        map.iter()
            .filter(|(_, h)| h.holds > 0 && h.marked.is_none_or(|m| m.elapsed() >= renew_after))
            .map(|(id, h)| (h.tenant_id.clone(), id.clone()))
            .collect()
    }
}

/// One exec or shell in flight; its bunker stays busy until every guard of it is dropped.
pub struct ActivityGuard {
    activity: Arc<Activity>,
    bunker_id: String,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.activity.release(&self.bunker_id);
    }
}

async fn mark(s: &Services, tenant_id: &str, bunker_id: &str) -> Result<(), StoreError> {
    let now = now_ms();
    let lease = s.config.activity_interval * MARK_INTERVALS;
    let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
    bstore::mark_busy(&s.store, tenant_id, bunker_id, now, until).await
}

/// Counts an exec or shell against `row` until the guard is dropped, marking the bunker busy
/// first unless this controller did within the last interval.
pub async fn hold(s: &Services, row: &BunkerRow) -> Result<ActivityGuard, StoreError> {
    let due = {
        let mut map = s.activity.lock();
        let h = map.entry(row.id.clone()).or_insert_with(|| Held {
            tenant_id: row.tenant_id.clone(),
            holds: 0,
            marked: None,
        });
        h.holds += 1;
        h.marked
            .is_none_or(|m| m.elapsed() >= s.config.activity_interval)
    };
    // Built before the write, so a failed write still ends the hold.
    let guard = ActivityGuard {
        activity: Arc::clone(&s.activity),
        bunker_id: row.id.clone(),
    };
    if due {
        let at = Instant::now();
        mark(s, &row.tenant_id, &row.id).await?;
        s.activity.marked(&row.id, at);
    }
    Ok(guard)
}

/// The ticker renewing the marks of bunkers held here (step 2).
pub fn spawn(s: Services) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let interval = s.config.activity_interval;
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            for (tenant_id, bunker_id) in s.activity.due(interval / 2, interval) {
                let at = Instant::now();
                match mark(&s, &tenant_id, &bunker_id).await {
                    Ok(()) => s.activity.marked(&bunker_id, at),
                    Err(e) => {
                        tracing::warn!(bunker_id, error = %e, "renewing a busy mark failed")
                    }
                }
            }
        }
    })
}
