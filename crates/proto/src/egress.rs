//! The egress audit: one NDJSON line per completed flow or denied attempt, written by the
//! worker in batches through the storage proxy to [`object_key`], read back by the
//! controller for `GET /bunkers/{id}/egress` (NETWORK.md §2.5).

use serde::{Deserialize, Serialize};

/// Version of [`EgressFlow`]'s fields (`v`).
pub const EGRESS_LINE_VERSION: u32 = 1;

/// The prefix under which a bunker's audit batches lie (`scaibunker/audit/{bunker_id}/`).
pub fn bunker_prefix(bunker_id: &str) -> String {
    format!("scaibunker/audit/{bunker_id}/")
}

/// The key of one batch: `scaibunker/audit/{bunker_id}/{ts_us}-{worker_pid}.ndjson`, where
/// `ts_us` (zero-padded to 16 digits, so keys sort by time) is when the batch was cut.
pub fn object_key(bunker_id: &str, ts_us: u64, worker_pid: u32) -> String {
    format!(
        "{}{ts_us:016}-{worker_pid}.ndjson",
        bunker_prefix(bunker_id)
    )
}

/// One line of a batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EgressLine {
    Flow(EgressFlow),
    /// Events the worker lost (netlink overrun, a full queue): never a silent hole.
    Gap {
        lost: u64,
        ts_us: u64,
    },
}

/// Whether a flow was let through.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    Denied,
}

/// A completed flow (allowed) or a refused attempt (denied: no bytes, start = end).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EgressFlow {
    pub v: u32,
    pub bunker_id: String,
    pub tenant_id: String,
    /// `tcp`, `udp`, `icmp` or the IP protocol number; `dns` for a refused name.
    pub proto: String,
    pub dst_ip: String,
    /// `None` for protocols without ports.
    pub dst_port: Option<u16>,
    /// The name the bunker's resolver answered with this address, when it did.
    pub dns_name: Option<String>,
    /// The TLS server name the flow asked for, when it was read (phase 2).
    pub sni: Option<String>,
    pub ts_start_us: u64,
    pub ts_end_us: u64,
    /// Guest → destination.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub pkts_out: u64,
    pub pkts_in: u64,
    pub verdict: Verdict,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_tagged_and_keys_sort_by_time() {
        let gap = serde_json::to_string(&EgressLine::Gap { lost: 3, ts_us: 9 }).expect("serialise");
        assert_eq!(gap, r#"{"type":"gap","lost":3,"ts_us":9}"#);
        assert!(object_key("bnk_a", 9, 1) < object_key("bnk_a", 10, 1));
        assert_eq!(
            object_key("bnk_a", 1, 42),
            "scaibunker/audit/bnk_a/0000000000000001-42.ndjson"
        );
    }
}
