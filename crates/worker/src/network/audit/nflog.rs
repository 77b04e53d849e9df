//! NFLOG (nfnetlink_log): binding a socket to a log group, and reading a logged packet into
//! a [`Denied`] attempt.
//!
//! The packet is the guest's: its bytes are hostile. Only the IPv4 header and the first
//! four bytes of the L4 header (the ports) are read, every offset checked against what was
//! copied; a fragment past the first has no ports; nothing else of the packet is kept.

use std::net::Ipv4Addr;

use super::netlink::{Message, NLM_F_ACK, NLM_F_REQUEST, Request};

/// `NFNL_SUBSYS_ULOG`.
const SUBSYS_ULOG: u16 = 4;
/// `NFULNL_MSG_PACKET`: a logged packet.
pub const MSG_PACKET: u16 = SUBSYS_ULOG << 8;
const MSG_CONFIG: u16 = (SUBSYS_ULOG << 8) | 1;

const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;

const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;

/// Bytes of each packet the kernel copies: the largest IPv4 header (60) and the ports, with
/// room to spare; never the guest's payload beyond that.
pub const COPY_RANGE: u32 = 128;

/// The request binding the socket to `group`, copying [`COPY_RANGE`] bytes of each packet,
/// and sending each packet at once (queue threshold 1) so one lost message is one lost
/// packet and a denial shows up without the kernel's one-second batching delay.
pub fn bind_request(group: u16, seq: u32) -> Vec<u8> {
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    Request::new(MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0, group)
        .attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])
        .attr(NFULA_CFG_MODE, &mode)
        .attr(NFULA_CFG_QTHRESH, &1u32.to_be_bytes())
        .finish()
}

/// A refused packet as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dst_port: Option<u16>,
    /// The rule's `log prefix`, when it set one.
    pub prefix: Option<String>,
}

/// Reads a logged packet; `None` for other messages, non-IPv4 packets and headers that do
/// not hold together.
pub fn parse(message: &Message<'_>) -> Option<Denied> {
    if message.kind != MSG_PACKET {
        return None;
    }
    let (_, attrs) = message.netfilter()?;
    let packet = attrs.find(NFULA_PAYLOAD)?;
    let prefix = attrs.find(NFULA_PREFIX).map(|p| {
        let p = p.split(|&b| b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(p).into_owned()
    });
    let (proto, src, dst, dst_port) = ipv4_header(packet)?;
    Some(Denied {
        proto,
        src,
        dst,
        dst_port,
        prefix,
    })
}

/// `(protocol, source, destination, destination port)` of an IPv4 packet.
fn ipv4_header(p: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, Option<u16>)> {
    let first = *p.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 || header_len > p.len() {
        return None;
    }
    let proto = p[9];
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let fragment_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
    let dst_port = if super::conntrack::has_ports(proto) && fragment_offset == 0 {
        p.get(header_len + 2..header_len + 4)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    } else {
        None
    };
    Some((proto, src, dst, dst_port))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::network::audit::netlink::messages;
    use crate::network::audit::netlink::tests::{message, nla};

    /// Test helper: an IPv4 header (no options) and the first bytes of a TCP header.
    pub fn tcp_syn(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    /// Test helper: an NFLOG packet message carrying `packet`.
    pub fn logged(packet: &[u8], prefix: &str) -> Vec<u8> {
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        let attrs = [
            nla(1, &[0x08, 0x00, 2, 0]),
            nla(NFULA_PREFIX, &p),
            nla(NFULA_PAYLOAD, packet),
        ]
        .concat();
        message(MSG_PACKET, 2, &attrs)
    }

    fn parse_one(datagram: &[u8]) -> Option<Denied> {
        parse(&messages(datagram).next()?.ok()?)
    }

    #[test]
    fn reads_a_logged_syn() {
        let d = parse_one(&logged(
            &tcp_syn([169, 254, 0, 2], [198, 18, 0, 10], 81),
            "deny",
        ));
        assert_eq!(
            d,
            Some(Denied {
                proto: 6,
                src: Ipv4Addr::new(169, 254, 0, 2),
                dst: Ipv4Addr::new(198, 18, 0, 10),
                dst_port: Some(81),
                prefix: Some("deny".to_owned()),
            })
        );
    }

    #[test]
    fn hostile_headers_are_refused_or_read_within_bounds() {
        let syn = tcp_syn([169, 254, 0, 2], [198, 18, 0, 10], 81);
        // A header length beyond what was copied.
        let mut long_ihl = syn.clone();
        long_ihl[0] = 0x4f;
        long_ihl.truncate(40);
        assert_eq!(parse_one(&logged(&long_ihl, "deny")), None);
        // Shorter than the minimum header.
        let mut short_ihl = syn.clone();
        short_ihl[0] = 0x44;
        assert_eq!(parse_one(&logged(&short_ihl, "deny")), None);
        // IPv6, or garbage.
        let mut v6 = syn.clone();
        v6[0] = 0x60;
        assert_eq!(parse_one(&logged(&v6, "deny")), None);
        // A later fragment has no ports even though bytes follow the header.
        let mut fragment = syn.clone();
        fragment[7] = 0x10;
        assert_eq!(
            parse_one(&logged(&fragment, "deny")).map(|d| d.dst_port),
            Some(None)
        );
        // Cut right after the IP header: the address is known, the port is not.
        assert_eq!(
            parse_one(&logged(&syn[..22], "deny")).map(|d| d.dst_port),
            Some(None)
        );
        // A prefix without its terminating NUL, and one that is not UTF-8.
        let attrs = [nla(NFULA_PREFIX, &[0xff, b'x']), nla(NFULA_PAYLOAD, &syn)].concat();
        let d = parse_one(&message(MSG_PACKET, 2, &attrs)).expect("parse one");
        assert_eq!(d.prefix.as_deref(), Some("\u{fffd}x"));
        for cut in 0..syn.len() {
            let _ = parse_one(&logged(&syn[..cut], "deny"));
        }
    }

    #[test]
    fn the_bind_request_names_the_group_and_copy_mode() {
        let req = bind_request(1, 3);
        let m = messages(&req)
            .next()
            .expect("one message")
            .expect("well-formed");
        assert_eq!(m.kind, MSG_CONFIG);
        assert_eq!(&m.payload[2..4], &1u16.to_be_bytes(), "res_id is the group");
        let (_, attrs) = m.netfilter().expect("an nfgenmsg");
        assert_eq!(attrs.u8(NFULA_CFG_CMD), Some(NFULNL_CFG_CMD_BIND));
        let mode = attrs.find(NFULA_CFG_MODE).expect("the mode attribute");
        assert_eq!(mode, &[0, 0, 0, 128, NFULNL_COPY_PACKET, 0]);
        assert_eq!(attrs.be32(NFULA_CFG_QTHRESH), Some(1));
    }
}
