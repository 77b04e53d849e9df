//! A bunker's resolver (NETWORK.md §2.3): a task of the worker answering the guest's DNS
//! on `169.254.0.1:53` (UDP and TCP) from sockets made inside the bunker's namespace, and
//! forwarding to the worker's upstreams from the host's.
//!
//! 1. A query must be one well-formed question (else FORMERR) within the bunker's rate
//!    (else REFUSED); the guest is hostile, so nothing it sends is trusted further.
//! 2. The query goes to each upstream in turn (UDP, or TCP for a TCP query) until one
//!    answers with the same id and question.
//! 3. The answer's A records are recorded in the bunker's [`NameTable`] under the queried
//!    name (a CNAME chain's end belongs to the name asked for), for the egress audit; then
//!    the upstream's answer goes back unchanged.
//!
//! `unrestricted` forwards every name. The name-filtering profiles (`allowlisted`,
//! `registry`) answer with a [`Filter`] instead, and never let a name out that their
//! [`NamePolicy`] does not allow:
//!
//! - PTR and ANY: REFUSED; a name the policy does not allow: NXDOMAIN, and the query never
//!   leaves the worker (no data out through DNS names);
//! - an allowed name, AAAA, HTTPS or SVCB (no IPv6, no ECH configuration), or any type
//!   but A: an empty NOERROR;
//! - an allowed name, A: forwarded as above; the answer keeps only its CNAME and A records,
//!   drops A records in the deny set (DNS rebinding) and says NXDOMAIN if none is left, caps
//!   every TTL at the longest pin ([`PinLease::max`]), and each address is **pinned before the
//!   answer is sent**: put in the bunker's nft set `pin4` with a timeout of
//!   `clamp(TTL, min, max) + grace`, so the guest can reach it, and only it, for as long
//!   as it may use the answer. A pin that fails is a SERVFAIL, never an answer the guest
//!   cannot use.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::addr::DenySet;
use super::policy::NamePolicy;

/// How long an upstream has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries per second a bunker may make, and the burst above it.
const QUERIES_PER_SECOND: f64 = 100.0;
const QUERY_BURST: f64 = 200.0;
/// Queries of one bunker in flight at once.
const MAX_IN_FLIGHT: usize = 64;
/// TCP connections of one bunker open at once, and how long one may idle.
const MAX_TCP: usize = 4;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Addresses remembered per bunker, and for how long past an answer's TTL.
const MAX_NAMES: usize = 4096;
const NAME_GRACE: Duration = Duration::from_secs(600);

/// Which names the bunker's resolver answered with each address (several: names on a
/// shared address, a CDN's).
#[derive(Debug, Default)]
pub struct NameTable {
    entries: Mutex<HashMap<Ipv4Addr, Vec<(String, Instant)>>>,
    /// The names flows asked for (the SNI/Host peek), by (guest port, address, port), until
    /// the audit takes them.
    snis: Mutex<HashMap<FlowKey, (super::audit::PeekVerdict, Instant)>>,
}

/// A guest flow: its source port, destination address and port.
type FlowKey = (u16, Ipv4Addr, u16);

/// Flow names remembered at once, and for how long at most (a flow's line takes its own).
const MAX_SNIS: usize = 4096;
const SNI_KEEP: Duration = Duration::from_secs(24 * 3600);

/// Names remembered per address.
const NAMES_PER_ADDRESS: usize = 8;

impl NameTable {
    pub fn insert(&self, ip: Ipv4Addr, name: &str, ttl: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_NAMES && !entries.contains_key(&ip) {
            entries.retain(|_, names| {
                names.retain(|(_, until)| *until > now);
                !names.is_empty()
            });
            if entries.len() >= MAX_NAMES
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, names)| names.iter().map(|(_, u)| *u).max())
                    .map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        let names = entries.entry(ip).or_default();
        names.retain(|(n, until)| n != name && *until > now);
        if names.len() >= NAMES_PER_ADDRESS {
            names.remove(0);
        }
        names.push((name.to_owned(), now + ttl + NAME_GRACE));
    }

    /// The name last answered with `ip`.
    pub fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        entries
            .get(&ip)?
            .iter()
            .rev()
            .find(|(_, until)| *until > now)
            .map(|(name, _)| name.clone())
    }

    /// Whether `name` (any case) was answered with `ip` and is still remembered.
    pub fn resolved(&self, ip: Ipv4Addr, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        entries
            .get(&ip)
            .is_some_and(|names| names.iter().any(|(n, u)| *n == name && *u > now))
    }
}

impl NameTable {
    /// Remembers what the peek made of the guest's flow from `src_port` to `dst`.
    pub fn peeked(
        &self,
        src_port: u16,
        dst: std::net::SocketAddrV4,
        peeked: super::audit::PeekVerdict,
    ) {
        let now = Instant::now();
        let mut snis = self.snis.lock().unwrap_or_else(|p| p.into_inner());
        if snis.len() >= MAX_SNIS {
            snis.retain(|_, (_, at)| now.duration_since(*at) < SNI_KEEP);
            if snis.len() >= MAX_SNIS {
                return;
            }
        }
        snis.insert((src_port, *dst.ip(), dst.port()), (peeked, now));
    }
}

impl super::audit::NameLookup for NameTable {
    fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
        NameTable::name_of(self, ip)
    }

    fn take_peeked(
        &self,
        src_port: u16,
        dst: Ipv4Addr,
        dst_port: u16,
    ) -> Option<super::audit::PeekVerdict> {
        let mut snis = self.snis.lock().unwrap_or_else(|p| p.into_inner());
        snis.remove(&(src_port, dst, dst_port)).map(|(p, _)| p)
    }
}

/// A token bucket.
struct Rate {
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * QUERIES_PER_SECOND;
        self.tokens = (self.tokens + refill).min(QUERY_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long pins last (NETWORK.md §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinLease {
    /// The shortest pin, whatever the answer's TTL.
    pub min: Duration,
    /// The longest pin; answers' TTLs are capped to it.
    pub max: Duration,
    /// Added to every pin, so a guest that uses an answer at the end of its TTL still gets
    /// through.
    pub grace: Duration,
}

impl Default for PinLease {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(30),
            max: Duration::from_secs(3600),
            grace: Duration::from_secs(300),
        }
    }
}

impl PinLease {
    /// The pin for an answer with `ttl`.
    pub fn pin_for(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min, self.max) + self.grace
    }

    /// What a new flow to a pinned address renews its pin to: the longest pin there is, so
    /// a renewal never shortens a pin an answer made.
    pub fn renewal(&self) -> Duration {
        self.max + self.grace
    }
}

/// Puts addresses in the bunker's pin set (the nft set in production, a fake in unit tests).
pub trait Pins: Send + Sync {
    fn pin(&self, pins: Vec<(Ipv4Addr, Duration)>) -> BoxFuture<'_, Result<(), String>>;
}

/// A name-filtering profile's resolver settings.
pub struct Filter {
    pub policy: Arc<NamePolicy>,
    /// Answers in it are dropped (rebinding).
    pub deny: DenySet,
    pub pins: Arc<dyn Pins>,
    pub lease: PinLease,
    /// Where refused names go into the egress audit (none: no audit).
    pub denied: Option<super::audit::DeniedNames>,
}

/// Most pins one bunker holds at once (the nft set's size).
pub const MAX_PINS: usize = 8192;

struct Shared {
    upstreams: Vec<SocketAddr>,
    filter: Option<Filter>,
    /// Until when each address is pinned, as far as this resolver knows (the kernel's pin
    /// lasts at least that long: a flow's renewal only lengthens it).
    pinned: Mutex<HashMap<Ipv4Addr, Instant>>,
    names: Arc<NameTable>,
    rate: Mutex<Rate>,
    in_flight: Arc<Semaphore>,
}

/// The running resolver of one bunker; dropping it stops it.
pub struct Resolver {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Resolver {
    /// Serves on `udp` and `tcp` (made inside the bunker's namespace, non-blocking).
    /// With a `filter`, only the names it allows are answered (see the module doc).
    pub fn start(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        upstreams: Vec<SocketAddr>,
        names: Arc<NameTable>,
        filter: Option<Filter>,
    ) -> std::io::Result<Self> {
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = TcpListener::from_std(tcp)?;
        let shared = Arc::new(Shared {
            upstreams,
            filter,
            pinned: Mutex::new(HashMap::new()),
            names,
            rate: Mutex::new(Rate {
                tokens: QUERY_BURST,
                at: Instant::now(),
            }),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        });
        let udp_task = tokio::spawn(serve_udp(udp, Arc::clone(&shared)));
        let tcp_task = tokio::spawn(serve_tcp(tcp, shared));
        Ok(Self {
            tasks: vec![udp_task, tcp_task],
        })
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "resolver: receive");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&shared.in_flight).try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let socket = Arc::clone(&socket);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = answer(&shared, &query, Transport::Udp).await {
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let connections = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(TCP_IDLE * 6, serve_tcp_stream(stream, &shared)).await;
        });
    }
}

async fn serve_tcp_stream(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    loop {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await else {
            return Ok(());
        };
        let Some(answer) = answer(shared, &query?, Transport::Tcp).await else {
            return Ok(());
        };
        write_framed(&mut stream, &answer).await?;
    }
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut body = vec![0u8; usize::from(len)];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

async fn write_framed(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(body.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut framed = Vec::with_capacity(body.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(body);
    stream.write_all(&framed).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

fn refusal(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    reply.queries = query.queries.clone();
    reply.to_vec().ok()
}

/// The answer to one query, or `None` to stay silent (garbage, or no upstream answered).
async fn answer(shared: &Shared, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
        return refusal(&query, ResponseCode::FormErr);
    }
    let allowed = shared.rate.lock().unwrap_or_else(|p| p.into_inner()).take();
    if !allowed {
        return refusal(&query, ResponseCode::Refused);
    }
    if let Some(filter) = &shared.filter {
        return answer_filtered(shared, filter, &query, bytes, transport).await;
    }
    let Some((reply, parsed)) = ask_upstreams(shared, &query, bytes, transport).await else {
        return refusal(&query, ResponseCode::ServFail);
    };
    record(&shared.names, &query, &parsed);
    Some(reply)
}

/// The first upstream answer to `query` that matches it, raw and parsed.
async fn ask_upstreams(
    shared: &Shared,
    query: &Message,
    bytes: &[u8],
    transport: Transport,
) -> Option<(Vec<u8>, Message)> {
    for upstream in &shared.upstreams {
        let reply = match transport {
            Transport::Udp => {
                tokio::time::timeout(UPSTREAM_TIMEOUT, ask_udp(*upstream, bytes)).await
            }
            Transport::Tcp => {
                tokio::time::timeout(UPSTREAM_TIMEOUT, ask_tcp(*upstream, bytes)).await
            }
        };
        let Ok(Ok(reply)) = reply else {
            continue;
        };
        let Ok(parsed) = Message::from_vec(&reply) else {
            continue;
        };
        if parsed.metadata.id != query.metadata.id || parsed.queries != query.queries {
            continue;
        }
        return Some((reply, parsed));
    }
    None
}

/// A name-filtering profile's answer (the module doc's list).
async fn answer_filtered(
    shared: &Shared,
    filter: &Filter,
    query: &Message,
    bytes: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let question = query.queries.first()?;
    let qtype = question.query_type();
    if matches!(qtype, RecordType::PTR | RecordType::ANY) {
        return refusal(query, ResponseCode::Refused);
    }
    let name = question.name().to_ascii();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if !filter.policy.allows(&name) {
        if let Some(denied) = &filter.denied {
            denied.report(&name);
        }
        return refusal(query, ResponseCode::NXDomain);
    }
    if qtype != RecordType::A || question.query_class() != DNSClass::IN {
        return refusal(query, ResponseCode::NoError);
    }
    let Some((_, upstream)) = ask_upstreams(shared, query, bytes, transport).await else {
        return refusal(query, ResponseCode::ServFail);
    };
    let cap = u32::try_from(filter.lease.max.as_secs()).unwrap_or(u32::MAX);
    let mut reply = Message::error_msg(
        query.metadata.id,
        OpCode::Query,
        upstream.metadata.response_code,
    );
    reply.queries = query.queries.clone();
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.truncation = upstream.metadata.truncation;
    let mut dropped = 0usize;
    let mut pins = Vec::new();
    for mut rec in upstream.answers {
        rec.ttl = rec.ttl.min(cap);
        match &rec.data {
            RData::A(a) if filter.deny.contains(a.0) => {
                dropped += 1;
                continue;
            }
            RData::A(a) => pins.push((a.0, Duration::from_secs(u64::from(rec.ttl)))),
            RData::CNAME(_) => {}
            _ => continue,
        }
        reply.answers.push(rec);
    }
    if pins.is_empty() && dropped > 0 {
        tracing::info!(
            name,
            dropped,
            "resolver: an allowed name answered with denied addresses only"
        );
        return refusal(query, ResponseCode::NXDomain);
    }
    if pin(shared, filter, &pins).await.is_err() {
        return refusal(query, ResponseCode::ServFail);
    }
    for (ip, ttl) in &pins {
        shared.names.insert(*ip, &name, *ttl);
    }
    reply.to_vec().ok()
}

/// Pins every address for its answer's lease, unless it is already pinned at least as long.
async fn pin(shared: &Shared, filter: &Filter, answers: &[(Ipv4Addr, Duration)]) -> Result<(), ()> {
    let now = Instant::now();
    let wanted: Vec<(Ipv4Addr, Duration)> = {
        let pinned = shared.pinned.lock().unwrap_or_else(|p| p.into_inner());
        answers
            .iter()
            .map(|(ip, ttl)| (*ip, filter.lease.pin_for(*ttl)))
            // What the guest may still use: its TTL plus the grace, from now.
            .filter(|(ip, lease)| {
                pinned
                    .get(ip)
                    .is_none_or(|until| *until < now + (*lease - filter.lease.grace / 2))
            })
            .collect()
    };
    if wanted.is_empty() {
        return Ok(());
    }
    if let Err(e) = filter.pins.pin(wanted.clone()).await {
        tracing::warn!(error = %e, "resolver: pin the answer's addresses");
        return Err(());
    }
    let mut pinned = shared.pinned.lock().unwrap_or_else(|p| p.into_inner());
    if pinned.len() + wanted.len() > MAX_PINS {
        pinned.retain(|_, until| *until > now);
    }
    for (ip, lease) in wanted {
        pinned.insert(ip, now + lease);
    }
    Ok(())
}

fn record(names: &NameTable, query: &Message, reply: &Message) {
    let Some(question) = query.queries.first() else {
        return;
    };
    let name = question.name().to_ascii();
    let name = name.trim_end_matches('.');
    for rec in &reply.answers {
        if let RData::A(a) = &rec.data {
            names.insert(a.0, name, Duration::from_secs(u64::from(rec.ttl)));
        }
    }
}

async fn ask_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let n = socket.recv(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream).await
}

/// The name servers of `/etc/resolv.conf` (port 53), the default upstreams.
pub fn system_upstreams() -> Vec<SocketAddr> {
    parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()?
                .parse::<std::net::IpAddr>()
                .ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// `IP[:port]` entries, comma-separated (`SCAIBUNKER_DNS_UPSTREAM`).
pub fn parse_upstreams(text: &str) -> Result<Vec<SocketAddr>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| format!("`{s}` is not IP or IP:port"))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_come_from_the_environment_or_resolv_conf() {
        assert_eq!(
            parse_upstreams("198.18.1.53, 10.0.0.1:5353").unwrap(),
            vec![
                "198.18.1.53:53".parse().unwrap(),
                "10.0.0.1:5353".parse().unwrap()
            ]
        );
        assert!(parse_upstreams("dns.example").is_err());
        assert_eq!(
            parse_resolv_conf(
                "# x\nnameserver 1.1.1.1\nsearch a\nnameserver ::1\nnameserver bad\n"
            ),
            vec!["1.1.1.1:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }

    #[test]
    fn the_name_table_forgets_expired_and_stays_bounded() {
        let t = NameTable::default();
        t.insert(Ipv4Addr::new(1, 1, 1, 1), "a.test", Duration::from_secs(5));
        assert_eq!(
            t.name_of(Ipv4Addr::new(1, 1, 1, 1)).as_deref(),
            Some("a.test")
        );
        assert_eq!(t.name_of(Ipv4Addr::new(1, 1, 1, 2)), None);
        for i in 0..(MAX_NAMES as u32 + 10) {
            t.insert(Ipv4Addr::from(i), "b.test", Duration::from_secs(1));
        }
        assert!(t.entries.lock().unwrap().len() <= MAX_NAMES);
    }
}
