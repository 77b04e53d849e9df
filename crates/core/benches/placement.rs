//! Times one placement decision over fleets of 1,000 and 10,000 candidate workers and prints
//! p50 and p99 per decision (figures go to docs/benchmarks.md, "Placement").
//!
//! The fleet is synthetic and varied: a tenth offline or draining, half holding the image,
//! free memory and CPU spread so the filter and the ordering both do real work.

use std::hint::black_box;
use std::time::{Duration, Instant};

use scaibunker_core::placement::{Candidate, ImagePull, place};
use scaibunker_core::spec::Resources;

const DECISIONS: usize = 2_000;

fn fleet(ids: &[String]) -> Vec<Candidate<'_>> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            // A cheap deterministic scramble so free sizes are not sorted by id.
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            Candidate {
                worker_id: id,
                is_online: i % 20 != 0,
                is_draining: i % 20 == 1,
                has_image: i % 2 == 0,
                has_bridges: true,
                free: Resources {
                    cpu_millicores: 500 + h % 32_000,
                    memory_mb: 256 + (h >> 5) % 64_000,
                    disk_mb: 100_000,
                    gpu_count: 0,
                },
            }
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let request = Resources {
        cpu_millicores: 1000,
        memory_mb: 512,
        disk_mb: 1024,
        gpu_count: 0,
    };
    for n in [1_000usize, 10_000] {
        let ids: Vec<String> = (0..n).map(|i| format!("wrk_{i:08}")).collect();
        let candidates = fleet(&ids);
        for pull in [ImagePull::Cached, ImagePull::Lazy] {
            // Warm-up, then one timing per decision.
            for _ in 0..100 {
                black_box(place(black_box(&candidates), &request, pull).ok());
            }
            let mut times: Vec<Duration> = (0..DECISIONS)
                .map(|_| {
                    let t = Instant::now();
                    black_box(place(black_box(&candidates), &request, pull).ok());
                    t.elapsed()
                })
                .collect();
            times.sort();
            println!(
                "placement workers={n} pull={pull:?} decisions={DECISIONS} p50={:?} p99={:?}",
                percentile(&times, 0.50),
                percentile(&times, 0.99),
            );
        }
    }
}
