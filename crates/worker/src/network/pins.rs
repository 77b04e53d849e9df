//! Pins in a bunker's nft set `pin4`, written over nfnetlink from a socket opened inside the
//! bunker's namespace: one batch of `NEWSETELEM`, `DELSETELEM`, `NEWSETELEM` (the
//! add-delete-add NETWORK.md §2.2 measured: it sets each timeout afresh, where a plain re-add
//! does not on every kernel) in about a
//! tenth of a millisecond, where spawning `nft` took about 25 ms an answer
//! (`docs/benchmarks.md`, "Name-filtered networks").
//!
//! The messages (`linux/netfilter/nf_tables.h`), each acknowledged, in one datagram:
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN (res_id NFNL_SUBSYS_NFTABLES)
//! NFT_MSG_NEWSETELEM  family inet: TABLE "bk", SET "pin4",
//!                     ELEMENTS [ ELEM { KEY { VALUE ip }, TIMEOUT ms } ... ]
//! NFT_MSG_DELSETELEM  the same keys, no timeouts
//! NFT_MSG_NEWSETELEM  as the first
//! NFNL_MSG_BATCH_END
//! ```
//!
//! The batch is one transaction: it applies whole or not at all.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use super::audit::netlink::{NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, Request, messages};
use super::rules::{BUNKER_TABLE, PIN_SET};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_CREATE: u16 = 0x400;
const NFPROTO_INET: u8 = 1;
const AF_UNSPEC: u8 = 0;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

/// How long the kernel has to acknowledge a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most pins in one batch (an answer holds a few addresses; the set holds
/// [`super::resolver::MAX_PINS`]).
pub const MAX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("the nftables socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the kernel refused the pin batch (errno {0})")]
    Refused(i32),
    #[error("{0} pins in one batch, more than {MAX_BATCH}")]
    TooMany(usize),
}

/// One attribute, padded to 4 bytes (for nesting).
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = u16::try_from(4 + value.len()).expect("a pin attribute is small");
    let mut out = Vec::with_capacity(value.len() + 8);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize((out.len() + 3) & !3, 0);
    out
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn setelem(
    kind: u16,
    flags: u16,
    seq: u32,
    pins: &[(Ipv4Addr, Duration)],
    timeouts: bool,
) -> Vec<u8> {
    let mut elements = Vec::new();
    for (ip, lease) in pins {
        let mut elem = nla(
            NLA_F_NESTED | NFTA_SET_ELEM_KEY,
            &nla(NFTA_DATA_VALUE, &ip.octets()),
        );
        if timeouts {
            let ms = u64::try_from(lease.as_millis())
                .unwrap_or(u64::MAX)
                .max(1000);
            elem.extend_from_slice(&nla(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes()));
        }
        elements.extend_from_slice(&nla(NLA_F_NESTED | NFTA_LIST_ELEM, &elem));
    }
    Request::new(
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        NLM_F_REQUEST | NLM_F_ACK | flags,
        seq,
        NFPROTO_INET,
        0,
    )
    .attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(BUNKER_TABLE))
    .attr(NFTA_SET_ELEM_LIST_SET, &cstr(PIN_SET))
    .attr(NLA_F_NESTED | NFTA_SET_ELEM_LIST_ELEMENTS, &elements)
    .finish()
}

/// The batch pinning `pins`, its messages numbered from `seq` (`seq + 1..=seq + 3` are the
/// three acknowledged ones).
pub fn batch(seq: u32, pins: &[(Ipv4Addr, Duration)]) -> Vec<u8> {
    let subsys = |kind: u16, seq: u32| {
        Request::new(kind, NLM_F_REQUEST, seq, AF_UNSPEC, NFNL_SUBSYS_NFTABLES).finish()
    };
    [
        subsys(NFNL_MSG_BATCH_BEGIN, seq),
        setelem(NFT_MSG_NEWSETELEM, NLM_F_CREATE, seq + 1, pins, true),
        setelem(NFT_MSG_DELSETELEM, 0, seq + 2, pins, false),
        setelem(NFT_MSG_NEWSETELEM, NLM_F_CREATE, seq + 3, pins, true),
        subsys(NFNL_MSG_BATCH_END, seq + 4),
    ]
    .concat()
}

/// A netfilter netlink socket in one bunker's namespace, for its pins.
#[derive(Debug, Clone)]
pub struct PinSocket {
    inner: Arc<Mutex<(OwnedFd, u32)>>,
}

impl PinSocket {
    /// Opens the socket on the calling thread, which must be inside the bunker's namespace.
    pub fn open_here() -> std::io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(rustix::net::netlink::NETFILTER),
        )?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(ACK_TIMEOUT),
        )?;
        Ok(Self {
            inner: Arc::new(Mutex::new((fd, 1))),
        })
    }

    /// Pins `pins` (blocking; bounded by the acknowledgement timeout).
    pub fn pin(&self, pins: &[(Ipv4Addr, Duration)]) -> Result<(), PinError> {
        if pins.len() > MAX_BATCH {
            return Err(PinError::TooMany(pins.len()));
        }
        if pins.is_empty() {
            return Ok(());
        }
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let seq = guard.1;
        guard.1 = guard.1.wrapping_add(8);
        let fd = &guard.0;
        rustix::net::send(fd, &batch(seq, pins), SendFlags::empty())
            .map_err(|e| PinError::Socket(e.into()))?;
        // An acknowledgement for each of the three element messages; an error on any of
        // them means the transaction was not applied.
        let mut acked = 0;
        let mut buf = vec![0u8; 8192];
        while acked < 3 {
            let (n, _) = rustix::net::recv(fd, &mut buf[..], RecvFlags::empty())
                .map_err(|e| PinError::Socket(e.into()))?;
            for message in messages(&buf[..n]) {
                let Ok(message) = message else { break };
                if message.kind != NLMSG_ERROR || !(seq + 1..=seq + 3).contains(&message.seq) {
                    continue;
                }
                match message.error_code() {
                    Some(0) => acked += 1,
                    Some(errno) => {
                        drain(fd, &mut buf);
                        return Err(PinError::Refused(-errno));
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

/// Reads what is left of a refused batch's acknowledgements, so the next batch starts clean.
fn drain(fd: &OwnedFd, buf: &mut [u8]) {
    while rustix::net::recv(fd, &mut *buf, RecvFlags::DONTWAIT).is_ok_and(|(n, _)| n > 0) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_five_messages_with_the_keys_and_millisecond_timeouts() {
        let pins = [(Ipv4Addr::new(198, 18, 0, 20), Duration::from_secs(330))];
        let b = batch(7, &pins);
        let all: Vec<_> = messages(&b).collect::<Result<_, _>>().unwrap();
        let kinds: Vec<_> = all.iter().map(|m| (m.kind, m.seq)).collect();
        assert_eq!(
            kinds,
            [
                (0x10, 7),
                (0x0a0c, 8),
                (0x0a0e, 9),
                (0x0a0c, 10),
                (0x11, 11)
            ]
        );
        let (family, attrs) = all[1].netfilter().unwrap();
        assert_eq!(family, NFPROTO_INET);
        assert_eq!(attrs.find(NFTA_SET_ELEM_LIST_TABLE), Some(&b"bk\0"[..]));
        let elem = attrs
            .nested(NFTA_SET_ELEM_LIST_ELEMENTS)
            .and_then(|e| e.nested(NFTA_LIST_ELEM))
            .unwrap();
        assert_eq!(
            elem.nested(NFTA_SET_ELEM_KEY)
                .and_then(|k| k.ipv4(NFTA_DATA_VALUE)),
            Some(pins[0].0)
        );
        assert_eq!(elem.be64(NFTA_SET_ELEM_TIMEOUT), Some(330_000));
        let (_, del) = all[2].netfilter().unwrap();
        let del_elem = del
            .nested(NFTA_SET_ELEM_LIST_ELEMENTS)
            .and_then(|e| e.nested(NFTA_LIST_ELEM))
            .unwrap();
        assert_eq!(del_elem.be64(NFTA_SET_ELEM_TIMEOUT), None);
    }
}
