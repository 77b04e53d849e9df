//! The SNI/Host peek of the name-filtered profiles (NETWORK.md §2.4): a pinned address may
//! be a shared edge (a CDN serving many sites on one IP), so the name a flow asks for is
//! checked too, without intercepting anything (no TLS termination, no CA in the guest).
//!
//! Every new TCP flow of the guest to a pinned address is redirected (`prerouting`) to this
//! proxy, listening on `169.254.0.1:`[`PEEK_PORT`] from a socket made inside the bunker's
//! namespace. For each connection it:
//!
//! 1. reads the original destination (`SO_ORIGINAL_DST`); one that is not pinned for the
//!    bunker, or is in the deny set, is reset;
//! 2. peeks at the guest's first bytes for up to [`PEEK_TIMEOUT`] (at most [`PEEK_MAX`]
//!    bytes): a TLS ClientHello must carry an SNI, an HTTP/1 request one `Host`, and that
//!    name must be allowed **and** have been answered with this address by the bunker's own
//!    resolver ([`NameTable::resolved`]); otherwise the flow is reset. Silence (a protocol
//!    where the server speaks first) or bytes that are neither are let through;
//! 3. connects to the original destination from a socket made inside the namespace (so it
//!    leaves by `up0` like the guest's own traffic: capped, masqueraded, in the host's
//!    rules), replays the peeked bytes and copies both ways until either side closes.

use std::fs::File;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::addr::{DenySet, GATEWAY_IP};
use super::netns;
use super::policy::NamePolicy;
use super::resolver::NameTable;

/// The proxy's port on the guest's gateway.
pub const PEEK_PORT: u16 = 15001;
/// How long the guest has to send its first bytes before the flow counts as server-first.
pub const PEEK_TIMEOUT: Duration = Duration::from_millis(300);
/// Most bytes peeked at (a ClientHello with post-quantum key shares is about 2 KiB).
pub const PEEK_MAX: usize = 16 * 1024;
/// Flows one bunker's peek carries at once, at most (two descriptors each, in the worker);
/// past it a new one is reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// The longest start that may still be an HTTP method and its space.
const MAX_METHOD: usize = 24;
/// How long the upstream has to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the peeked bytes say about a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// More bytes are needed to tell.
    Incomplete,
    /// A TLS ClientHello, with its SNI host name if it has one.
    Tls(Option<String>),
    /// An HTTP/1 request, with its one `Host` (port stripped) if it has exactly one.
    Http(Option<String>),
    /// Neither: let through.
    Other,
}

/// Reads `bytes`, the start of what the guest sent.
pub fn classify(bytes: &[u8]) -> Peeked {
    match bytes.first() {
        None => Peeked::Incomplete,
        Some(0x16) => tls_sni(bytes),
        Some(b) if b.is_ascii_uppercase() => http_host(bytes),
        Some(_) => Peeked::Other,
    }
}

/// The SNI of a ClientHello that may span several TLS records; bounds-checked throughout.
fn tls_sni(bytes: &[u8]) -> Peeked {
    // The handshake message, gathered from the records that carry it.
    let mut handshake = Vec::new();
    let mut rest = bytes;
    loop {
        if rest.len() < 5 {
            return Peeked::Incomplete;
        }
        if rest[0] != 0x16 || rest[1] != 0x03 {
            return Peeked::Tls(None);
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let Some(body) = rest.get(5..5 + len) else {
            if rest.len() >= PEEK_MAX {
                return Peeked::Tls(None);
            }
            return Peeked::Incomplete;
        };
        handshake.extend_from_slice(body);
        rest = &rest[5 + len..];
        if handshake.len() >= 4 {
            if handshake[0] != 0x01 {
                return Peeked::Tls(None);
            }
            let need = 4
                + (usize::from(handshake[1]) << 16
                    | usize::from(handshake[2]) << 8
                    | usize::from(handshake[3]));
            if handshake.len() >= need {
                return Peeked::Tls(client_hello_sni(&handshake[4..need]));
            }
        }
    }
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

fn client_hello_sni(body: &[u8]) -> Option<String> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy version, random
    let n = r.u8()?;
    r.take(n)?; // session id
    let n = r.u16()?;
    r.take(n)?; // cipher suites
    let n = r.u8()?;
    r.take(n)?; // compression methods
    let n = r.u16()?;
    let mut exts = Reader(r.take(n)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let n = exts.u16()?;
        let data = exts.take(n)?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let n = list.u16()?;
        let mut names = Reader(list.take(n)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let n = names.u16()?;
            let name = names.take(n)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(name.to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

fn http_host(bytes: &[u8]) -> Peeked {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        // No method and its space yet: a method is short, so long bytes are something else
        // (uppercase binary, a text protocol).
        Ok(httparse::Status::Partial) if req.method.is_none() => {
            if bytes.len() <= MAX_METHOD {
                Peeked::Incomplete
            } else {
                Peeked::Other
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() < PEEK_MAX => Peeked::Incomplete,
        Ok(httparse::Status::Partial) => Peeked::Http(None),
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let host = match (hosts.next(), hosts.next()) {
                (Some(h), None) => std::str::from_utf8(h.value).ok().map(|v| {
                    let v = v.trim();
                    v.rsplit_once(':')
                        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                        .map_or(v, |(name, _)| name)
                        .to_ascii_lowercase()
                }),
                _ => None,
            };
            Peeked::Http(host)
        }
        // Not HTTP after all (a method-looking start, then garbage).
        Err(_) if req.method.is_none() => Peeked::Other,
        Err(_) => Peeked::Http(None),
    }
}

/// What one bunker's proxy checks against.
pub struct PeekContext {
    pub policy: Arc<NamePolicy>,
    pub names: Arc<NameTable>,
    pub deny: DenySet,
    /// The bunker's namespace, for the upstream sockets.
    pub netns: Arc<File>,
    pub netns_path: PathBuf,
    /// Connections at once; past it a new one is reset.
    pub max_connections: usize,
    /// What a new flow renews its address's pin to (the name is kept as long).
    pub renewal: Duration,
}

/// The running proxy of one bunker; dropping it stops it (open flows are cut).
pub struct Peek {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Peek {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Peek {
    /// Serves on `listener` (made inside the bunker's namespace, non-blocking).
    pub fn start(listener: std::net::TcpListener, ctx: PeekContext) -> std::io::Result<Self> {
        let listener = TcpListener::from_std(listener)?;
        let task = tokio::spawn(serve(listener, Arc::new(ctx)));
        Ok(Self { task })
    }
}

async fn serve(listener: TcpListener, ctx: Arc<PeekContext>) {
    let connections = Arc::new(Semaphore::new(ctx.max_connections));
    let mut flows = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(error = %e, "peek: accept");
                    continue;
                }
            },
            // Reap finished flows so the set stays small.
            Some(_) = flows.join_next(), if !flows.is_empty() => continue,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            reset(stream);
            continue;
        };
        let ctx = Arc::clone(&ctx);
        flows.spawn(async move {
            let _permit = permit;
            if let Err(e) = flow(stream, &ctx).await {
                tracing::debug!(error = %e, "peek: flow");
            }
        });
    }
}

/// Closes `stream` with a RST rather than a FIN, so the guest's client fails at once (a
/// zero linger aborts the connection on close; nothing blocks).
fn reset(stream: TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO));
    drop(stream);
}

async fn flow(mut guest: TcpStream, ctx: &PeekContext) -> std::io::Result<()> {
    let dst = rustix::net::sockopt::ip_original_dst(&guest)?;
    let ip = *dst.ip();
    if ip == GATEWAY_IP || ctx.deny.contains(ip) {
        reset(guest);
        return Ok(());
    }
    let mut peeked = Vec::with_capacity(2048);
    let verdict = peek(&mut guest, &mut peeked).await?;
    let name = match verdict {
        Peeked::Tls(name) | Peeked::Http(name) => match name {
            Some(name) if ctx.policy.allows(&name) && ctx.names.resolved(ip, &name) => {
                // A flow in use keeps its name with its address as long as it keeps the pin.
                ctx.names.insert(ip, &name, ctx.renewal);
                Some(name)
            }
            other => {
                tracing::info!(dst = %dst, name = ?other, "peek: a flow asked for a name not resolved to its address; reset");
                record(ctx, &guest, dst, other, true);
                reset(guest);
                return Ok(());
            }
        },
        Peeked::Other | Peeked::Incomplete => None,
    };
    let mut upstream = match connect(ctx, dst).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(dst = %dst, error = %e, "peek: connect upstream");
            reset(guest);
            return Ok(());
        }
    };
    // The guest's and the server's stacks already coalesce; a second Nagle here would hold
    // a reply's tail for the peer's delayed ACK (measured: 9 ms a small exchange).
    guest.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    tracing::trace!(dst = %dst, name = ?name, "peek: through");
    if name.is_some() {
        record(ctx, &guest, dst, name, false);
    }
    upstream.write_all(&peeked).await?;
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
    Ok(())
}

/// Leaves the verdict and the name for the flow's audit line.
fn record(
    ctx: &PeekContext,
    guest: &TcpStream,
    dst: SocketAddrV4,
    sni: Option<String>,
    refused: bool,
) {
    if let Ok(SocketAddr::V4(from)) = guest.peer_addr() {
        ctx.names
            .peeked(from.port(), dst, super::audit::PeekVerdict { sni, refused });
    }
}

/// Reads until the bytes tell what the flow is, [`PEEK_MAX`] bytes, the guest's EOF, or
/// [`PEEK_TIMEOUT`] (silence: [`Peeked::Incomplete`] with nothing read).
async fn peek(guest: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Peeked> {
    let deadline = tokio::time::Instant::now() + PEEK_TIMEOUT;
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, guest.read(&mut chunk)).await {
            Ok(read) => read?,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        match classify(buf) {
            Peeked::Incomplete if buf.len() < PEEK_MAX => continue,
            Peeked::Incomplete => return Ok(Peeked::Other),
            decided => return Ok(decided),
        }
    }
    // Out of time or bytes: a started ClientHello or request head that never finished has
    // no name to check, so it does not get through; anything else does.
    Ok(match classify(buf) {
        Peeked::Incomplete if buf.first() == Some(&0x16) => Peeked::Tls(None),
        Peeked::Incomplete if !buf.is_empty() => Peeked::Http(None),
        other => other,
    })
}

/// Connects to `dst` from a socket made inside the bunker's namespace.
async fn connect(ctx: &PeekContext, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let socket = netns::run_in(&ctx.netns, &ctx.netns_path, tokio::net::TcpSocket::new_v4)
        .map_err(std::io::Error::other)??;
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(SocketAddr::V4(dst)))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// The address the proxy listens on in the namespace.
pub fn listen_addr() -> SocketAddr {
    SocketAddr::from((GATEWAY_IP, PEEK_PORT))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A ClientHello record as clients send it, with `sni` as its server name if given.
    pub fn client_hello(sni: Option<&str>, padding: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        // Another extension before the SNI (clients randomise the order).
        exts.extend_from_slice(&[0x00, 0x15]);
        exts.extend_from_slice(&(padding as u16).to_be_bytes());
        exts.extend(std::iter::repeat_n(0u8, padding));
        if let Some(name) = sni {
            let name = name.as_bytes();
            let list_len = 3 + name.len();
            exts.extend_from_slice(&[0x00, 0x00]);
            exts.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
            exts.extend_from_slice(&(list_len as u16).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&(name.len() as u16).to_be_bytes());
            exts.extend_from_slice(name);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        // Split into records of at most 1 KiB, as a long ClientHello may be.
        let mut out = Vec::new();
        for part in hs.chunks(1024) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn a_client_hello_gives_its_sni_whole_or_across_records() {
        let hello = client_hello(Some("X.CDN-A.test"), 40);
        assert_eq!(classify(&hello), Peeked::Tls(Some("x.cdn-a.test".into())));
        for cut in [1, 4, 5, 30, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut]), Peeked::Incomplete, "cut at {cut}");
        }
        let long = client_hello(Some("a.test"), 3000);
        assert!(long.len() > 3000);
        assert_eq!(classify(&long), Peeked::Tls(Some("a.test".into())));
        assert_eq!(classify(&client_hello(None, 10)), Peeked::Tls(None));
    }

    #[test]
    fn http_requests_give_their_one_host() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: Api.Allowed.Test:8080\r\n\r\n"),
            Peeked::Http(Some("api.allowed.test".into()))
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a"), Peeked::Incomplete);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n"), Peeked::Http(None));
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Peeked::Http(None),
            "two hosts: which one the server takes is its choice"
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Peeked::Other);
        assert_eq!(classify(b"ZZZZ"), Peeked::Incomplete);
        assert_eq!(
            classify(&[b'Z'; 64]),
            Peeked::Other,
            "uppercase bytes, no method"
        );
        assert_eq!(
            classify(b"PROPFIND / HTTP/1.1\r\nHost: b.test\r\n\r\n"),
            Peeked::Http(Some("b.test".into())),
            "any method is checked, not a list of them"
        );
        assert_eq!(classify(b"\x00\x01binary"), Peeked::Other);
    }

    #[test]
    fn garbage_never_panics_and_never_passes_as_a_named_hello() {
        // A deterministic sweep over truncations and corruptions of a real hello.
        let hello = client_hello(Some("a.test"), 20);
        let mut state = 0x2545_f491_u32;
        for i in 0..5000 {
            let mut bytes = hello.clone();
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let at = (state as usize) % bytes.len();
            bytes[at] = (state >> 8) as u8;
            bytes.truncate(bytes.len() - (i % bytes.len()));
            if let Peeked::Tls(Some(name)) = classify(&bytes) {
                assert!(name.is_ascii() || !name.is_empty());
            }
        }
    }
}
