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
//! `unrestricted` forwards every name; the name-filtering profiles build on this.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

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

/// Which name the bunker's resolver last answered with each address.
#[derive(Debug, Default)]
pub struct NameTable {
    entries: Mutex<HashMap<Ipv4Addr, (String, Instant)>>,
}

impl NameTable {
    pub fn insert(&self, ip: Ipv4Addr, name: &str, ttl: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_NAMES && !entries.contains_key(&ip) {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= MAX_NAMES
                && let Some(oldest) = entries.iter().min_by_key(|(_, (_, u))| *u).map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(ip, (name.to_owned(), now + ttl + NAME_GRACE));
    }

    pub fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&ip)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(name, _)| name.clone())
    }
}

impl super::audit::NameLookup for NameTable {
    fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
        NameTable::name_of(self, ip)
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

struct Shared {
    upstreams: Vec<SocketAddr>,
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
    pub fn start(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        upstreams: Vec<SocketAddr>,
        names: Arc<NameTable>,
    ) -> std::io::Result<Self> {
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = TcpListener::from_std(tcp)?;
        let shared = Arc::new(Shared {
            upstreams,
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
        record(&shared.names, &query, &parsed);
        return Some(reply);
    }
    refusal(&query, ResponseCode::ServFail)
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
