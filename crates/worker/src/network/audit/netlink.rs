//! Netlink framing for the audit: a bounds-checked reader of `nlmsghdr` messages and their
//! attribute (TLV) trees, and the writer of the few requests the audit sends.
//!
//! Written here rather than taken from `netlink-packet-netfilter`: that crate (0.4) parses
//! the tuples but leaves the counters, the timestamps and the conntrack id as raw attributes,
//! so the audit would walk its raw NLAs for half of what it reads anyway, on top of
//! `netlink-packet-core` and an old `derive_more`. The whole format the audit needs is the
//! two framings below, and every read is a checked slice: a short, overlong or misaligned
//! message or attribute ends the walk of that buffer, it never reads past it or panics.
//!
//! Framing (all integers host order unless the attribute says network order):
//! 1. a datagram holds messages, each `len:u32 type:u16 flags:u16 seq:u32 pid:u32` then its
//!    payload, `len` covering the header, the next one at `len` rounded up to 4;
//! 2. a netfilter message's payload opens with `nfgenmsg` (`family:u8 version:u8
//!    res_id:be16`), then attributes `len:u16 type:u16` + value, each padded to 4; the top two
//!    bits of `type` are flags (nested, network byte order) and are masked off.

/// `NLMSG_ERROR`: an acknowledgement (error 0) or the errno of a refused request.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLMSG_OVERRUN`: data lost (not sent by current kernels, handled all the same).
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;

const HEADER_LEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HEADER_LEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One message of a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    /// What follows the 16-byte header.
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// A netfilter message: its `nfgenmsg` family and its attributes; `None` if the payload
    /// is too short for an `nfgenmsg`.
    pub fn netfilter(&self) -> Option<(u8, Attrs<'a>)> {
        let family = *self.payload.first()?;
        let attrs = self.payload.get(NFGENMSG_LEN..)?;
        Some((family, Attrs(attrs)))
    }

    /// For `NLMSG_ERROR`: the (negative) errno, 0 for an acknowledgement.
    pub fn error_code(&self) -> Option<i32> {
        let b = self.payload.get(..4)?;
        Some(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The messages of one datagram, in order; stops at the first malformed header.
pub fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages { rest: datagram }
}

pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = match self.rest.get(..HEADER_LEN) {
            Some(h) => h,
            None => {
                self.rest = &[];
                return Some(Err(Malformed::ShortHeader));
            }
        };
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len < HEADER_LEN || len > self.rest.len() {
            self.rest = &[];
            return Some(Err(Malformed::BadLength(len)));
        }
        let message = Message {
            kind: u16::from_ne_bytes([header[4], header[5]]),
            seq: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            payload: &self.rest[HEADER_LEN..len],
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(message))
    }
}

/// A datagram that could not be walked to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a netlink message header is cut short")]
    ShortHeader,
    #[error("a netlink message claims {0} bytes")]
    BadLength(usize),
}

/// A run of attributes (the top level of a message, or the value of a nested one).
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Attrs<'a> {
    /// The value of the first attribute of type `kind`.
    pub fn find(self, kind: u16) -> Option<&'a [u8]> {
        self.into_iter().find(|(k, _)| *k == kind).map(|(_, v)| v)
    }

    /// The first attribute of type `kind`, read as nested attributes.
    pub fn nested(self, kind: u16) -> Option<Attrs<'a>> {
        self.find(kind).map(Attrs)
    }

    pub fn u8(self, kind: u16) -> Option<u8> {
        self.find(kind)?.first().copied()
    }

    pub fn be16(self, kind: u16) -> Option<u16> {
        let b = self.find(kind)?.get(..2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn be32(self, kind: u16) -> Option<u32> {
        let b = self.find(kind)?.get(..4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn be64(self, kind: u16) -> Option<u64> {
        let b: [u8; 8] = self.find(kind)?.get(..8)?.try_into().ok()?;
        Some(u64::from_be_bytes(b))
    }

    pub fn ipv4(self, kind: u16) -> Option<std::net::Ipv4Addr> {
        let b: [u8; 4] = self.find(kind)?.get(..4)?.try_into().ok()?;
        Some(std::net::Ipv4Addr::from(b))
    }
}

impl<'a> IntoIterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    type IntoIter = AttrIter<'a>;

    fn into_iter(self) -> AttrIter<'a> {
        AttrIter { rest: self.0 }
    }
}

/// `(type, value)` pairs; ends at the first attribute whose length does not fit.
pub struct AttrIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header = self.rest.get(..NLA_HEADER_LEN)?;
        let len = u16::from_ne_bytes([header[0], header[1]]) as usize;
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if len < NLA_HEADER_LEN || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let value = &self.rest[NLA_HEADER_LEN..len];
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some((kind, value))
    }
}

/// Builds one netfilter request: header, `nfgenmsg`, then attributes.
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // the kernel fills in our port id
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Self { buf }
    }

    /// Appends one attribute, padded to 4 bytes.
    pub fn attr(mut self, kind: u16, value: &[u8]) -> Self {
        let len = u16::try_from(NLA_HEADER_LEN + value.len())
            .expect("the audit's request attributes are a few bytes long");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("a request of a few bytes");
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Test helper: one attribute, padded.
    pub fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
        out
    }

    /// Test helper: one message with an `nfgenmsg` of `family` and `attrs`.
    pub fn message(kind: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((16 + 4 + attrs.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[family, 0, 0, 0]);
        out.extend_from_slice(attrs);
        out
    }

    #[test]
    fn walks_messages_and_nested_attributes() {
        let inner = [nla(1, &[10, 0, 0, 1]), nla(2, &[10, 0, 0, 2])].concat();
        // The nested flag on the outer attribute is masked off.
        let attrs = [nla(0x8000 | 1, &inner), nla(7, &5u32.to_be_bytes())].concat();
        let datagram = [message(0x102, 2, &attrs), message(0x102, 2, &[])].concat();
        let all: Vec<_> = messages(&datagram)
            .collect::<Result<_, _>>()
            .expect("well-formed messages");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].kind, 0x102);
        let (family, top) = all[0].netfilter().expect("an nfgenmsg");
        assert_eq!(family, 2);
        let ip = top.nested(1).expect("nested attribute");
        assert_eq!(ip.ipv4(2), Some(std::net::Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(top.be32(7), Some(5));
        assert_eq!(top.be64(7), None, "a 4-byte value is not read as 8");
    }

    #[test]
    fn a_lying_length_ends_the_walk_without_reading_past_the_buffer() {
        let mut datagram = message(0x102, 2, &nla(1, &[1, 2, 3, 4]));
        datagram[0..4].copy_from_slice(&4096u32.to_ne_bytes());
        let got: Vec<_> = messages(&datagram).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].expect_err("a lying length"),
            Malformed::BadLength(4096)
        );

        // An attribute claiming more than its message holds yields nothing.
        let mut attr = nla(1, &[1, 2, 3, 4]);
        attr[0..2].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(Attrs(&attr).into_iter().count(), 0);
        // One claiming less than its own header, likewise.
        attr[0..2].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(Attrs(&attr).into_iter().count(), 0);
    }

    #[test]
    fn every_truncation_of_a_message_is_walked_without_panic() {
        let inner = [nla(1, &[10, 0, 0, 1]), nla(2, &[10, 0, 0, 2])].concat();
        let datagram = message(0x102, 2, &nla(0x8000 | 1, &inner));
        for cut in 0..datagram.len() {
            for m in messages(&datagram[..cut]).flatten() {
                if let Some((_, a)) = m.netfilter() {
                    let _ = a.nested(1).and_then(|n| n.ipv4(2));
                }
            }
        }
    }

    #[test]
    fn requests_carry_their_length_and_padding() {
        let req = Request::new(0x401, NLM_F_REQUEST | NLM_F_ACK, 7, 0, 1)
            .attr(1, &[1])
            .finish();
        assert_eq!(req.len(), 16 + 4 + 8);
        let m = messages(&req)
            .next()
            .expect("one message")
            .expect("well-formed");
        assert_eq!((m.kind, m.seq), (0x401, 7));
        assert_eq!(&m.payload[..4], &[0, 0, 0, 1]);
        let (_, attrs) = m.netfilter().expect("an nfgenmsg");
        assert_eq!(attrs.u8(1), Some(1));
    }
}
