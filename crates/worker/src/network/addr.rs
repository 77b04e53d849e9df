//! Addresses of a bunker's network (NETWORK.md §2.1): the fixed guest side every bunker
//! shares (so a template snapshot restores into any bunker), the per-slot uplink `/31`s of
//! the pool, and the IPv4 CIDRs of the deny set.

use std::fmt;
use std::net::Ipv4Addr;

/// The guest's `eth0`: the same in every bunker and baked into template snapshots.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
/// The tap `gst0` in the bunker's namespace: the guest's gateway and resolver.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// The guest network's prefix length (`169.254.0.0/30`).
pub const GUEST_PREFIX: u8 = 30;
/// The guest NIC's MAC (QEMU's `virtio-net-device,mac=`).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 0x02];
/// The tap's MAC, fixed so that a restored guest's ARP entry for its gateway stays valid.
pub const TAP_MAC: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 0x01];
/// The guest MAC as QEMU takes it.
pub const GUEST_MAC_TEXT: &str = "02:5b:00:00:00:02";
/// The tap's name in the bunker's namespace.
pub const TAP_NAME: &str = "gst0";
/// The uplink veth's name in the bunker's namespace.
pub const UPLINK_NAME: &str = "up0";
/// Prefix of the host ends of the uplink veths (`sbk<slot>`).
pub const HOST_LINK_PREFIX: &str = "sbk";
/// Prefix of an uplink veth's namespace end before it is moved and renamed `up0`.
pub const PEER_LINK_PREFIX: &str = "sbu";
/// The default pool of uplink `/31`s.
pub const DEFAULT_POOL: &str = "10.203.0.0/16";

/// An IPv4 network in CIDR notation; the address is stored masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IPv4 address or CIDR (a.b.c.d or a.b.c.d/n)")]
pub struct CidrError(pub String);

impl Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    /// `a.b.c.d/n`, or a bare address (`/32`).
    pub fn parse(text: &str) -> Result<Self, CidrError> {
        let bad = || CidrError(text.to_owned());
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (text.trim(), 32),
        };
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Self::new(addr.parse().map_err(|_| bad())?, prefix))
    }

    /// A comma-separated list; empty entries are skipped.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, CidrError> {
        text.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Self::parse)
            .collect()
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn first(&self) -> u32 {
        u32::from(self.addr)
    }

    pub fn last(&self) -> u32 {
        self.first() | !mask(self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// How many addresses it holds.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// What `unrestricted` never reaches, before the operator's additions: private ranges,
/// CGNAT, link-local (the cloud metadata address among them), loopback, "this network",
/// multicast and the reserved range above it. The pool and the host's own addresses are
/// added at start ([`DenySet::new`]).
pub const DEFAULT_DENY: [&str; 9] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The deny set as inclusive ranges of addresses: the default ranges, the pool, the host's
/// addresses and the operator's `SCAIBUNKER_EGRESS_DENY`, minus
/// `SCAIBUNKER_EGRESS_ALLOW_PRIVATE`. Ranges are sorted and disjoint, as an nft interval set
/// wants them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenySet {
    ranges: Vec<(u32, u32)>,
}

impl DenySet {
    pub fn new(deny: &[Cidr], allow: &[Cidr]) -> Self {
        let mut ranges: Vec<(u32, u32)> = deny.iter().map(|c| (c.first(), c.last())).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (a, b) in ranges {
            match merged.last_mut() {
                Some((_, end)) if a <= end.saturating_add(1) => *end = (*end).max(b),
                _ => merged.push((a, b)),
            }
        }
        for hole in allow {
            let (ha, hb) = (hole.first(), hole.last());
            merged = merged
                .into_iter()
                .flat_map(|(a, b)| {
                    let mut out = Vec::new();
                    if hb < a || ha > b {
                        out.push((a, b));
                    } else {
                        if ha > a {
                            out.push((a, ha - 1));
                        }
                        if hb < b {
                            out.push((hb + 1, b));
                        }
                    }
                    out
                })
                .collect();
        }
        Self { ranges: merged }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        self.ranges.iter().any(|&(a, b)| a <= ip && ip <= b)
    }

    /// Inclusive ranges, sorted and disjoint.
    pub fn ranges(&self) -> impl Iterator<Item = (Ipv4Addr, Ipv4Addr)> + '_ {
        self.ranges
            .iter()
            .map(|&(a, b)| (Ipv4Addr::from(a), Ipv4Addr::from(b)))
    }
}

/// The uplink `/31` of slot `k` in `pool`: (host end, namespace end); `None` past the pool.
pub fn slot_pair(pool: &Cidr, slot: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let offset = u64::from(slot) * 2;
    if offset + 1 >= pool.size() {
        return None;
    }
    let host = pool.first() + u32::try_from(offset).ok()?;
    Some((Ipv4Addr::from(host), Ipv4Addr::from(host + 1)))
}

/// How many slots `pool` holds.
pub fn slot_count(pool: &Cidr) -> u32 {
    u32::try_from(pool.size() / 2).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_mask_and_refuse_garbage() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().size(), 1 << 32);
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "a.b.c.d",
            "10.0.0.0/x",
            "::1/128",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cidr::parse_list(" 10.0.0.0/8, ,1.1.1.1").unwrap().len(), 2);
    }

    #[test]
    fn the_deny_set_merges_ranges_and_punches_allowed_holes() {
        let deny: Vec<Cidr> = DEFAULT_DENY
            .iter()
            .map(|c| Cidr::parse(c).unwrap())
            .collect();
        let mirror = Cidr::parse("10.5.5.5").unwrap();
        let set = DenySet::new(&deny, &[mirror]);
        for denied in [
            "10.0.0.1",
            "10.5.5.4",
            "10.5.5.6",
            "169.254.169.254",
            "127.0.0.1",
        ] {
            assert!(set.contains(denied.parse().unwrap()), "{denied}");
        }
        for allowed in ["10.5.5.5", "198.18.0.10", "8.8.8.8", "100.63.255.255"] {
            assert!(!set.contains(allowed.parse().unwrap()), "{allowed}");
        }
        // Disjoint and sorted, as an nft interval set needs.
        let ranges: Vec<_> = set
            .ranges()
            .map(|(a, b)| (u32::from(a), u32::from(b)))
            .collect();
        assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
        // Overlapping inputs merge.
        let two = DenySet::new(
            &[
                Cidr::parse("10.0.0.0/9").unwrap(),
                Cidr::parse("10.0.0.0/8").unwrap(),
            ],
            &[],
        );
        assert_eq!(two.ranges().count(), 1);
    }

    #[test]
    fn slots_are_disjoint_slash_31s_inside_the_pool() {
        let pool = Cidr::parse("10.203.0.0/16").unwrap();
        assert_eq!(
            slot_pair(&pool, 0),
            Some(("10.203.0.0".parse().unwrap(), "10.203.0.1".parse().unwrap()))
        );
        assert_eq!(
            slot_pair(&pool, 200),
            Some((
                "10.203.1.144".parse().unwrap(),
                "10.203.1.145".parse().unwrap()
            ))
        );
        assert_eq!(slot_count(&pool), 32768);
        assert!(slot_pair(&pool, 32767).is_some());
        assert!(slot_pair(&pool, 32768).is_none());
    }
}
