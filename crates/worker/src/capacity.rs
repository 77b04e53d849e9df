//! The worker's resources: totals read from the host, and what is free once running
//! bunkers' requests are taken off.
//!
//! - CPU: one thousand millicores per host core.
//! - Memory: `MemTotal` less [`HOST_RESERVE_MB`] for the host, QEMU and the worker.
//! - Disk: free space of the data directory, measured again for every report.

use std::path::Path;

use scaibunker_proto::worker::Capacity;

use crate::bunker::supervisor::Resources;

/// Memory kept back for the host itself.
pub const HOST_RESERVE_MB: u64 = 1024;

/// CPU and memory of the host; disk is measured per report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub cores: u32,
    pub memory_mb: u64,
}

impl HostResources {
    pub fn probe() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cores,
            memory_mb: mem_total_mb(&meminfo)
                .unwrap_or(0)
                .saturating_sub(HOST_RESERVE_MB),
        }
    }

    /// Totals, with the data directory's free space as disk.
    pub fn total(&self, data_dir: &Path) -> Capacity {
        Capacity {
            cpu_millicores: u64::from(self.cores) * 1000,
            memory_mb: self.memory_mb,
            disk_mb: free_disk_mb(data_dir),
            gpu_count: 0,
        }
    }
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
fn mem_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Space available to unprivileged writers in the file system holding `dir`, in MiB.
pub fn free_disk_mb(dir: &Path) -> u64 {
    match rustix::fs::statvfs(dir) {
        Ok(st) => st.f_bavail.saturating_mul(st.f_frsize) / (1024 * 1024),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "statvfs");
            0
        }
    }
}

/// What is left of `total` after `reserved`.
pub fn free(total: Capacity, reserved: Resources) -> Capacity {
    Capacity {
        cpu_millicores: total.cpu_millicores.saturating_sub(reserved.cpu_millicores),
        memory_mb: total.memory_mb.saturating_sub(reserved.memory_mb),
        disk_mb: total.disk_mb.saturating_sub(reserved.disk_mb),
        gpu_count: total.gpu_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total() {
        let meminfo = "MemTotal:       24684000 kB\nMemFree:        100 kB\n";
        assert_eq!(mem_total_mb(meminfo), Some(24105));
        assert_eq!(mem_total_mb("nothing"), None);
    }

    #[test]
    fn free_capacity_subtracts_requests_and_never_underflows() {
        let total = Capacity {
            cpu_millicores: 2000,
            memory_mb: 1000,
            disk_mb: 50,
            gpu_count: 0,
        };
        let reserved = Resources {
            cpu_millicores: 500,
            memory_mb: 1500,
            disk_mb: 10,
        };
        assert_eq!(
            free(total, reserved),
            Capacity {
                cpu_millicores: 1500,
                memory_mb: 0,
                disk_mb: 40,
                gpu_count: 0
            }
        );
    }

    #[test]
    fn measures_the_disk_of_a_real_directory() {
        assert!(free_disk_mb(Path::new("/")) > 0);
        assert_eq!(free_disk_mb(Path::new("/nonexistent/dir")), 0);
    }
}
