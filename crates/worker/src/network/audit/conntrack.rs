//! Conntrack (ctnetlink) messages: a DESTROY event or a dumped entry read into a [`CtFlow`],
//! and the dump request.
//!
//! A flow is the original tuple (who opened it: source, destination, protocol, ports), the
//! counters of each direction (`CTA_COUNTERS_ORIG` is what the opener sent, `_REPLY` what it
//! received) and the start/stop stamps (`CTA_TIMESTAMP`, ns since the epoch). Counters and
//! stamps exist only when the netns has `nf_conntrack_acct` / `nf_conntrack_timestamp` set
//! at the time the entry was created; without them they read as absent, not as zero.

use std::net::Ipv4Addr;

use super::netlink::{Attrs, Message, NLM_F_DUMP, NLM_F_REQUEST, Request};

/// `NFNL_SUBSYS_CTNETLINK`.
const SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_NEW`: a dumped entry (or a NEW event).
pub const MSG_NEW: u16 = SUBSYS_CTNETLINK << 8;
const MSG_GET: u16 = (SUBSYS_CTNETLINK << 8) | 1;
/// `IPCTNL_MSG_CT_DELETE`: a DESTROY event.
pub const MSG_DELETE: u16 = (SUBSYS_CTNETLINK << 8) | 2;
/// The `NFNLGRP_CONNTRACK_DESTROY` multicast group, as a `bind` group mask.
pub const DESTROY_GROUP_MASK: u32 = 1 << (3 - 1);

const AF_INET: u8 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_TIMESTAMP: u16 = 20;

const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;

const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;

/// Bytes and packets of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// One conntrack entry as the audit needs it (IPv4 only: the bunker path is v4-only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtFlow {
    /// `CTA_ID`, to tell a dumped entry from its own later DESTROY event.
    pub id: Option<u32>,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// For protocols with ports (TCP, UDP, SCTP, DCCP, UDP-Lite).
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub orig: Option<Counters>,
    pub reply: Option<Counters>,
    pub start_ns: Option<u64>,
    pub stop_ns: Option<u64>,
}

/// IP protocols whose tuple carries ports.
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136)
}

/// Reads a DESTROY event or a dumped entry; `None` for anything else (another message type,
/// IPv6, or an entry without an original tuple).
pub fn parse(message: &Message<'_>) -> Option<CtFlow> {
    if message.kind != MSG_DELETE && message.kind != MSG_NEW {
        return None;
    }
    let (family, attrs) = message.netfilter()?;
    if family != AF_INET {
        return None;
    }
    let orig = attrs.nested(CTA_TUPLE_ORIG)?;
    let ip = orig.nested(CTA_TUPLE_IP)?;
    let l4 = orig.nested(CTA_TUPLE_PROTO)?;
    let proto = l4.u8(CTA_PROTO_NUM)?;
    let stamps = attrs.nested(CTA_TIMESTAMP);
    Some(CtFlow {
        id: attrs.be32(CTA_ID),
        proto,
        src: ip.ipv4(CTA_IP_V4_SRC)?,
        dst: ip.ipv4(CTA_IP_V4_DST)?,
        src_port: has_ports(proto)
            .then(|| l4.be16(CTA_PROTO_SRC_PORT))
            .flatten(),
        dst_port: has_ports(proto)
            .then(|| l4.be16(CTA_PROTO_DST_PORT))
            .flatten(),
        orig: attrs.nested(CTA_COUNTERS_ORIG).and_then(counters),
        reply: attrs.nested(CTA_COUNTERS_REPLY).and_then(counters),
        start_ns: stamps.and_then(|s| s.be64(CTA_TIMESTAMP_START)),
        stop_ns: stamps
            .and_then(|s| s.be64(CTA_TIMESTAMP_STOP))
            .filter(|&ns| ns != 0),
    })
}

fn counters(attrs: Attrs<'_>) -> Option<Counters> {
    let packets = attrs
        .be64(CTA_COUNTERS_PACKETS)
        .or_else(|| attrs.be32(CTA_COUNTERS32_PACKETS).map(u64::from))?;
    let bytes = attrs
        .be64(CTA_COUNTERS_BYTES)
        .or_else(|| attrs.be32(CTA_COUNTERS32_BYTES).map(u64::from))?;
    Some(Counters { packets, bytes })
}

/// A request for every IPv4 entry of the socket's netns.
pub fn dump_request(seq: u32) -> Vec<u8> {
    Request::new(MSG_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, AF_INET, 0).finish()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::network::audit::netlink::messages;
    use crate::network::audit::netlink::tests::{message, nla};

    /// Test helper: a DESTROY event as the kernel sends it (nested flags set).
    #[allow(clippy::too_many_arguments)]
    pub fn destroy_event(
        id: u32,
        proto: u8,
        src: [u8; 4],
        dst: [u8; 4],
        dport: u16,
        orig: (u64, u64),
        reply: (u64, u64),
        stamps: Option<(u64, u64)>,
    ) -> Vec<u8> {
        const N: u16 = 0x8000;
        let ip = [nla(CTA_IP_V4_SRC, &src), nla(CTA_IP_V4_DST, &dst)].concat();
        let l4 = [
            nla(CTA_PROTO_NUM, &[proto]),
            nla(CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes()),
            nla(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        let tuple = [nla(N | CTA_TUPLE_IP, &ip), nla(N | CTA_TUPLE_PROTO, &l4)].concat();
        let count = |(p, b): (u64, u64)| {
            [
                nla(CTA_COUNTERS_PACKETS, &p.to_be_bytes()),
                nla(CTA_COUNTERS_BYTES, &b.to_be_bytes()),
            ]
            .concat()
        };
        let mut attrs = [
            nla(N | CTA_TUPLE_ORIG, &tuple),
            nla(N | 2, &tuple),
            nla(3, &8u32.to_be_bytes()),
            nla(N | CTA_COUNTERS_ORIG, &count(orig)),
            nla(N | CTA_COUNTERS_REPLY, &count(reply)),
            nla(CTA_ID, &id.to_be_bytes()),
        ]
        .concat();
        if let Some((start, stop)) = stamps {
            attrs.extend(nla(
                N | CTA_TIMESTAMP,
                &[
                    nla(CTA_TIMESTAMP_START, &start.to_be_bytes()),
                    nla(CTA_TIMESTAMP_STOP, &stop.to_be_bytes()),
                ]
                .concat(),
            ));
        }
        message(MSG_DELETE, AF_INET, &attrs)
    }

    #[test]
    fn reads_tuple_counters_and_stamps_of_a_destroy_event() {
        let event = destroy_event(
            77,
            6,
            [169, 254, 0, 2],
            [198, 18, 0, 10],
            80,
            (12, 10_372),
            (9, 268),
            Some((1_000_000_123, 2_000_000_456)),
        );
        let m = messages(&event)
            .next()
            .expect("one message")
            .expect("well-formed");
        let flow = parse(&m).expect("parse");
        assert_eq!(
            flow,
            CtFlow {
                id: Some(77),
                proto: 6,
                src: Ipv4Addr::new(169, 254, 0, 2),
                dst: Ipv4Addr::new(198, 18, 0, 10),
                src_port: Some(40000),
                dst_port: Some(80),
                orig: Some(Counters {
                    packets: 12,
                    bytes: 10_372
                }),
                reply: Some(Counters {
                    packets: 9,
                    bytes: 268
                }),
                start_ns: Some(1_000_000_123),
                stop_ns: Some(2_000_000_456),
            }
        );
    }

    #[test]
    fn icmp_has_no_port_and_missing_accounting_reads_as_absent() {
        let event = destroy_event(
            1,
            1,
            [169, 254, 0, 2],
            [1, 1, 1, 1],
            0,
            (1, 84),
            (1, 84),
            None,
        );
        let m = messages(&event)
            .next()
            .expect("one message")
            .expect("well-formed");
        let flow = parse(&m).expect("parse");
        assert_eq!(flow.dst_port, None);
        assert_eq!((flow.start_ns, flow.stop_ns), (None, None));
    }

    #[test]
    fn ignores_ipv6_and_other_subsystems() {
        let mut event = destroy_event(
            1,
            6,
            [169, 254, 0, 2],
            [1, 1, 1, 1],
            80,
            (1, 1),
            (1, 1),
            None,
        );
        event[16] = 10; // AF_INET6
        let m = messages(&event)
            .next()
            .expect("one message")
            .expect("well-formed");
        assert_eq!(parse(&m), None);
        let other = message(0x400, AF_INET, &[]);
        let m = messages(&other)
            .next()
            .expect("one message")
            .expect("well-formed");
        assert_eq!(parse(&m), None);
    }

    #[test]
    fn every_truncation_parses_or_is_refused_without_panic() {
        let event = destroy_event(
            5,
            17,
            [169, 254, 0, 2],
            [9, 9, 9, 9],
            53,
            (1, 2),
            (3, 4),
            Some((5, 6)),
        );
        for cut in 16..event.len() {
            let mut short = event[..cut].to_vec();
            short[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            for m in messages(&short).flatten() {
                let _ = parse(&m);
            }
        }
    }
}
