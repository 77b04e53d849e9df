//! A bunker's egress audit as `GET /bunkers/{id}/egress` answers it: completed flows and
//! refused attempts, and the gaps where the worker lost events.

use serde::{Deserialize, Serialize};

/// Whether a flow was let through.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EgressVerdict {
    Allowed,
    Denied,
}

/// One flow out of the bunker (allowed) or one refused attempt (denied: no bytes, start = end).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EgressRecord {
    /// `tcp`, `udp`, `icmp` or the IP protocol number; `dns` for a name the bunker's resolver
    /// refused by policy (`dns_name` says which, `dst_ip` is the resolver).
    pub proto: String,
    pub dst_ip: String,
    /// Null for protocols without ports.
    pub dst_port: Option<u16>,
    /// The name the bunker's resolver answered with this address, when it did.
    pub dns_name: Option<String>,
    /// The TLS server name the flow asked for, when it was read.
    pub sni: Option<String>,
    /// RFC 3339 UTC with microseconds.
    pub ts_start: String,
    /// RFC 3339 UTC with microseconds.
    pub ts_end: String,
    /// Guest → destination.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub pkts_out: u64,
    pub pkts_in: u64,
    pub verdict: EgressVerdict,
}

/// Events the worker lost at `ts` (a netlink overrun, a full queue): never a silent hole.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EgressGap {
    /// RFC 3339 UTC with microseconds.
    pub ts: String,
    pub lost: u64,
}

/// One page of a bunker's egress audit, in the order the worker wrote it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EgressPage {
    pub records: Vec<EgressRecord>,
    pub gaps: Vec<EgressGap>,
    /// Lines of the audit objects read for this page that were not valid audit lines of this
    /// bunker (skipped).
    pub skipped_lines: u64,
    pub has_more: bool,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}
