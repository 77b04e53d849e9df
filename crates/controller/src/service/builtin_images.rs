//! Built-in images over time: each (name, sha256) a worker reported stays ready while an
//! online worker holds it, and is retired (made inactive) once none has for
//! [`RETIRE_AFTER_INTERVALS`] heartbeat intervals while others are online; a retired sha an
//! online worker holds again (or reports at registration) is ready again.

use std::collections::HashSet;

use super::Services;
use crate::store::{StoreError, now_ms};

/// Heartbeat intervals a built-in sha may go without an online worker holding it before it
/// is retired: as long as a silent worker's bunkers are given before they are failed.
pub const RETIRE_AFTER_INTERVALS: i64 = 6;

/// What one run of [`track`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tracked {
    pub retired: usize,
    pub restored: usize,
}

/// The `builtins` job. A worker counts as online as placement counts it (a heartbeat within
/// three intervals, measured from this controller's start at the earliest, so a restart after
/// an outage retires nothing).
pub async fn track(s: &Services) -> Result<Tracked, StoreError> {
    let interval = s.config.heartbeat_interval.as_millis() as i64;
    let workers = s.store.workers().await?;
    let silences = super::fleet::silences(s, &workers).await;
    let online: HashSet<&str> = workers
        .iter()
        .filter(|w| silences.get(&w.id).is_some_and(|ms| *ms <= 3 * interval))
        .map(|w| w.id.as_str())
        .collect();
    // With no worker online the fleet reports nothing, which says nothing about its images:
    // a create then answers `WORKER_UNAVAILABLE`, not `IMAGE_NOT_FOUND`.
    if online.is_empty() {
        return Ok(Tracked::default());
    }
    let held: HashSet<String> = s
        .store
        .ready_cache_entries()
        .await?
        .into_iter()
        .filter(|(worker, _)| online.contains(worker.as_str()))
        .map(|(_, sha)| sha)
        .collect();
    let before = now_ms() - RETIRE_AFTER_INTERVALS * interval;
    let mut reported = Vec::new();
    let mut tracked = Tracked::default();
    for row in s.store.tracked_builtin_images().await? {
        match (row.status.as_str(), held.contains(&row.sha256)) {
            ("ready", true) => reported.push(row.id),
            ("ready", false) if s.store.retire_builtin_image(&row.id, before).await? => {
                tracing::warn!(
                    image_id = row.id,
                    sha256 = row.sha256,
                    "no online worker holds this built-in image: inactive"
                );
                tracked.retired += 1;
            }
            ("inactive", true) if s.store.unretire_builtin_image(&row.id).await? => {
                tracing::info!(
                    image_id = row.id,
                    sha256 = row.sha256,
                    "an online worker holds this built-in image again: ready"
                );
                tracked.restored += 1;
            }
            _ => {}
        }
    }
    s.store.builtin_images_reported(&reported).await?;
    Ok(tracked)
}
