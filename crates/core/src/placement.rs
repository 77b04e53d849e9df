//! Placement: which worker gets a new bunker. A pure function over a snapshot of the fleet.
//!
//! Policy: among workers that are online, not draining, hold the image (unless the image is
//! lazily pulled), own every bridge a `transit` bunker's interfaces name, and have room for
//! the request, pick the one with the most free memory
//! (spreading load), ties broken by most free CPU, then by worker id so the choice is
//! deterministic. No worker online and not draining: `WorkerUnavailable` (wait, or add a
//! worker); none of those with the image and bridges: `NoSuitableWorker` (warm the image,
//! `lazy_pull`); some with them but no room: `WorkerUnavailable`.

use crate::spec::Resources;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub worker_id: &'a str,
    pub is_online: bool,
    pub is_draining: bool,
    pub has_image: bool,
    /// Whether the worker owns every bridge the bunker's interfaces name (always true for
    /// bunkers without interfaces).
    pub has_bridges: bool,
    pub free: Resources,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePull {
    /// The image must already be cached on the worker.
    Cached,
    /// The worker may fetch the image at create time.
    Lazy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementError {
    /// No worker is available (none online and not draining), or some could run it but none
    /// has room now.
    WorkerUnavailable,
    /// No schedulable worker holds the image.
    NoSuitableWorker,
}

pub fn place<'a>(
    candidates: &[Candidate<'a>],
    request: &Resources,
    pull: ImagePull,
) -> Result<&'a str, PlacementError> {
    let schedulable: Vec<&Candidate<'a>> = candidates
        .iter()
        .filter(|c| c.is_online && !c.is_draining)
        .collect();
    if schedulable.is_empty() {
        return Err(PlacementError::WorkerUnavailable);
    }
    let eligible: Vec<&Candidate<'a>> = schedulable
        .into_iter()
        .filter(|c| c.has_image || pull == ImagePull::Lazy)
        .filter(|c| c.has_bridges)
        .collect();
    if eligible.is_empty() {
        return Err(PlacementError::NoSuitableWorker);
    }
    eligible
        .into_iter()
        .filter(|c| request.fits_in(&c.free))
        .max_by(|a, b| {
            (a.free.memory_mb, a.free.cpu_millicores)
                .cmp(&(b.free.memory_mb, b.free.cpu_millicores))
                // Reverse on id so the lowest id wins a tie under max_by.
                .then_with(|| b.worker_id.cmp(a.worker_id))
        })
        .map(|c| c.worker_id)
        .ok_or(PlacementError::WorkerUnavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: u64, mem: u64) -> Resources {
        Resources {
            cpu_millicores: cpu,
            memory_mb: mem,
            disk_mb: 10_000,
            gpu_count: 0,
        }
    }

    fn cand(id: &str, online: bool, draining: bool, image: bool, free: Resources) -> Candidate<'_> {
        Candidate {
            worker_id: id,
            is_online: online,
            is_draining: draining,
            has_image: image,
            has_bridges: true,
            free,
        }
    }

    #[test]
    fn placement_table() {
        let req = res(1000, 512);
        let big = res(4000, 8000);
        let small = res(4000, 256);
        type Case<'a> = (
            &'a str,
            Vec<Candidate<'a>>,
            ImagePull,
            Result<&'a str, PlacementError>,
        );
        let table: Vec<Case> = vec![
            (
                // No worker at all is an availability problem (wait, add one), not the image's.
                "no workers",
                vec![],
                ImagePull::Cached,
                Err(PlacementError::WorkerUnavailable),
            ),
            (
                "every worker offline",
                vec![cand("w1", false, false, true, big)],
                ImagePull::Cached,
                Err(PlacementError::WorkerUnavailable),
            ),
            (
                "one fits",
                vec![cand("w1", true, false, true, big)],
                ImagePull::Cached,
                Ok("w1"),
            ),
            (
                "offline skipped",
                vec![
                    cand("w1", false, false, true, big),
                    cand("w2", true, false, true, big),
                ],
                ImagePull::Cached,
                Ok("w2"),
            ),
            (
                "every worker draining",
                vec![cand("w1", true, true, true, big)],
                ImagePull::Cached,
                Err(PlacementError::WorkerUnavailable),
            ),
            (
                "draining skipped, the other lacks the image",
                vec![
                    cand("w1", true, true, true, big),
                    cand("w2", true, false, false, big),
                ],
                ImagePull::Cached,
                Err(PlacementError::NoSuitableWorker),
            ),
            (
                "image missing",
                vec![cand("w1", true, false, false, big)],
                ImagePull::Cached,
                Err(PlacementError::NoSuitableWorker),
            ),
            (
                "image missing but lazy",
                vec![cand("w1", true, false, false, big)],
                ImagePull::Lazy,
                Ok("w1"),
            ),
            (
                "full",
                vec![cand("w1", true, false, true, small)],
                ImagePull::Cached,
                Err(PlacementError::WorkerUnavailable),
            ),
            (
                "most free memory wins",
                vec![
                    cand("w1", true, false, true, res(4000, 1000)),
                    cand("w2", true, false, true, res(4000, 3000)),
                ],
                ImagePull::Cached,
                Ok("w2"),
            ),
            (
                "tie broken by lowest id",
                vec![
                    cand("w2", true, false, true, big),
                    cand("w1", true, false, true, big),
                ],
                ImagePull::Cached,
                Ok("w1"),
            ),
            (
                "bridges missing: not a candidate at all",
                vec![Candidate {
                    has_bridges: false,
                    ..cand("w1", true, false, true, big)
                }],
                ImagePull::Cached,
                Err(PlacementError::NoSuitableWorker),
            ),
            (
                "the worker with the bridges wins over a bigger one without",
                vec![
                    Candidate {
                        has_bridges: false,
                        ..cand("w1", true, false, true, res(8000, 16000))
                    },
                    cand("w2", true, false, true, big),
                ],
                ImagePull::Cached,
                Ok("w2"),
            ),
            (
                "bridges but no room",
                vec![
                    Candidate {
                        has_bridges: false,
                        ..cand("w1", true, false, true, big)
                    },
                    cand("w2", true, false, true, small),
                ],
                ImagePull::Cached,
                Err(PlacementError::WorkerUnavailable),
            ),
            (
                "fitting worker beats bigger full one",
                vec![
                    cand("w1", true, false, true, res(500, 9000)),
                    cand("w2", true, false, true, res(2000, 600)),
                ],
                ImagePull::Cached,
                Ok("w2"),
            ),
        ];
        for (name, cands, pull, want) in table {
            assert_eq!(place(&cands, &req, pull), want, "{name}");
        }
    }
}
