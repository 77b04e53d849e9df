//! The network tests' own sandbox and fake internet (NETWORK.md §3).
//!
//! [`sandboxed`] re-runs one test of this binary under `unshare --net --mount --fork`, so the
//! test's root namespace stands for the worker host and nothing it sends can leave the
//! machine. [`FakeInternet::build`] then makes, in a child namespace `inet` reached through
//! the host's only route (a veth), servers at 198.18.0.0/15 (RFC 2544): an authoritative DNS
//! server that logs every query, HTTP servers and a byte sink that count what they get; and,
//! in the host, a "platform" address `10.99.0.1` with a server that must stay unreachable.
//! A counter in `inet` counts packets for anywhere outside the fake internet: it must read 0.

#![allow(dead_code)] // Each test binary uses a different part of the harness.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};
use scaibunker_worker::network::{addr, netns, tap};

const SANDBOX_FLAG: &str = "SCAIBUNKER_IN_NET_SANDBOX";

pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 53);
/// A rogue DNS server a guest may name instead of its resolver: answers every name.
pub const ROGUE_DNS_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 54);
/// `api.allowed.test` (HTTP on 80, 853 and 8080).
pub const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
/// `short.allowed.test`, answered with a 2 s TTL (HTTP on 80).
pub const SHORT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 22);
/// A shared edge: `x.cdn-a.test` and `cdn-b.test` on one address (HTTP on 80; on 443 a
/// server that answers `hello` to whatever first bytes it gets, so a ClientHello's SNI
/// decides only at the bunker's side).
pub const CDN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 31);
/// What `rebind.allowed.test` answers: a private address.
pub const REBIND_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);
pub const PYPI_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const EVIL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 21);
pub const SINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 30);
/// A server-first talker: a byte every 100 ms to whoever connects.
pub const TALKER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 40);
/// The host's uplink address (the worker's own).
pub const HOST_WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// Stands for the platform's private services.
pub const PLATFORM_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// Runs `body` inside a fresh network and mount namespace: re-executes this very test
/// there and checks it ran and passed.
pub fn sandboxed(name: &str, body: impl FnOnce()) {
    if std::env::var_os(SANDBOX_FLAG).is_some() {
        body();
        return;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "the network tests need root (unshare, network namespaces, nftables); run them as root"
    );
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new("unshare")
        .args(["--net", "--mount", "--fork", "--"])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(SANDBOX_FLAG, "1")
        .output()
        .expect("run unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "the sandboxed test failed ({})",
        out.status
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the sandboxed run did not run exactly this test"
    );
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Links of the host whose names start like a bunker's veth ends.
pub fn bunker_links() -> Vec<String> {
    sh_out(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("sbk") || n.starts_with("sbu"))
        .collect()
}

/// Replaces a bunker's table `inet bk` (in the namespace at `netns`) with one masquerade
/// rule: the same tap, veth and routing with no filtering. The floor the rules are measured
/// against, and the proof that the rules (not the routing) keep the platform out.
pub fn replace_rules_with_masquerade(netns: &Path) {
    let ns = format!("--net={}", netns.display());
    sh(&["nsenter", &ns, "nft", "delete", "table", "inet", "bk"]);
    let floor = "table ip floor {\n chain post {\n type nat hook postrouting priority 100;\n oifname \"up0\" masquerade\n }\n}\n";
    let mut nft = Command::new("nsenter")
        .args([ns.as_str(), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(floor.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "the floor's masquerade");
}

/// Counters of one fake server.
#[derive(Debug, Default)]
pub struct Hits {
    pub connections: AtomicU64,
    pub bytes_in: AtomicU64,
}

impl Hits {
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::SeqCst)
    }
}

pub struct FakeInternet {
    pub dns_log: Arc<Mutex<Vec<String>>>,
    pub rogue_dns_log: Arc<Mutex<Vec<String>>>,
    pub pypi: Arc<Hits>,
    pub allowed: Arc<Hits>,
    pub short: Arc<Hits>,
    pub cdn_http: Arc<Hits>,
    pub cdn_tls: Arc<Hits>,
    pub evil: Arc<Hits>,
    pub sink: Arc<Hits>,
    pub platform: Arc<Hits>,
    inet: PathBuf,
}

impl FakeInternet {
    /// Builds the fake internet; call inside [`sandboxed`].
    pub fn build() -> Self {
        sh(&["ip", "link", "set", "lo", "up"]);
        std::fs::create_dir_all("/run/netns").unwrap();
        sh(&["mount", "-t", "tmpfs", "tmpfs", "/run/netns"]);
        sh(&["ip", "netns", "add", "inet"]);
        sh(&[
            "ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1",
        ]);
        sh(&["ip", "link", "set", "wan1", "netns", "inet"]);
        sh(&["ip", "addr", "add", "198.19.0.1/30", "dev", "wan0"]);
        sh(&["ip", "link", "set", "wan0", "up"]);
        sh(&["ip", "route", "add", "default", "via", "198.19.0.2"]);
        for cmd in [
            "link set lo up",
            "addr add 198.19.0.2/30 dev wan1",
            "link set wan1 up",
            "addr add 198.18.1.53/32 dev lo",
            "addr add 198.18.1.54/32 dev lo",
            "addr add 198.18.0.20/32 dev lo",
            "addr add 198.18.0.22/32 dev lo",
            "addr add 198.18.0.31/32 dev lo",
            "addr add 198.18.0.10/32 dev lo",
            "addr add 198.18.0.21/32 dev lo",
            "addr add 198.18.0.30/32 dev lo",
            "addr add 198.18.0.40/32 dev lo",
            "route add default via 198.19.0.1",
        ] {
            let mut args = vec!["ip", "-n", "inet"];
            args.extend(cmd.split(' '));
            sh(&args);
        }
        // Anything routed to `inet` for an address outside the fake internet is counted.
        let watch = r#"table inet watch {
  counter escaped { }
  set escaped_to { type ipv4_addr . inet_proto; flags dynamic; size 1024; }
  chain pre {
    type filter hook prerouting priority -300; policy accept;
    ip daddr != { 198.18.0.0/15 } counter name "escaped" add @escaped_to { ip daddr . meta l4proto }
  }
}"#;
        let mut nft = Command::new("ip")
            .args(["netns", "exec", "inet", "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        nft.stdin
            .take()
            .unwrap()
            .write_all(watch.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "the watch table");
        // The platform, in the host.
        sh(&["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"]);

        let inet = PathBuf::from("/run/netns/inet");
        let handle = netns::open(&inet).unwrap();
        let dns_log = Arc::new(Mutex::new(Vec::new()));
        let records: HashMap<&'static str, (Ipv4Addr, u32)> = [
            ("pypi.org", (PYPI_IP, 60)),
            ("evil.test", (EVIL_IP, 60)),
            ("sink.test", (SINK_IP, 60)),
            ("platform.test", (PLATFORM_IP, 60)),
            ("api.allowed.test", (ALLOWED_IP, 60)),
            ("short.allowed.test", (SHORT_IP, 2)),
            ("rebind.allowed.test", (REBIND_IP, 60)),
            ("x.cdn-a.test", (CDN_IP, 60)),
            ("y.cdn-a.test", (EVIL_IP, 60)),
            ("cdn-b.test", (CDN_IP, 60)),
            ("talk.allowed.test", (TALKER_IP, 60)),
        ]
        .into_iter()
        .collect();
        let dns = netns::run_in(&handle, &inet, || UdpSocket::bind((DNS_IP, 53)))
            .unwrap()
            .unwrap();
        let log = Arc::clone(&dns_log);
        // And `n<k>.bench.test`: a name with an address of its own for every k < 32768
        // (198.18.128.0/17, served by nobody), for the resolver's benchmarks.
        let lookup = move |name: &str| {
            records.get(name).copied().or_else(|| {
                let k: u32 = name
                    .strip_prefix('n')?
                    .strip_suffix(".bench.test")?
                    .parse()
                    .ok()?;
                (k < 32768).then(|| (Ipv4Addr::from(0xc612_8000 + k), 60))
            })
        };
        std::thread::spawn(move || serve_dns(dns, lookup, log));
        let rogue_dns_log = Arc::new(Mutex::new(Vec::new()));
        let rogue = netns::run_in(&handle, &inet, || UdpSocket::bind((ROGUE_DNS_IP, 53)))
            .unwrap()
            .unwrap();
        let log = Arc::clone(&rogue_dns_log);
        std::thread::spawn(move || serve_dns(rogue, |_| Some((EVIL_IP, 60)), log));
        let pypi = serve_http(
            &handle,
            &inet,
            &[
                (PYPI_IP, 80).into(),
                (PYPI_IP, 443).into(),
                (PYPI_IP, 8080).into(),
            ],
        );
        let evil = serve_http(&handle, &inet, &[(EVIL_IP, 80).into()]);
        let allowed = serve_http(
            &handle,
            &inet,
            &[
                (ALLOWED_IP, 80).into(),
                (ALLOWED_IP, 853).into(),
                (ALLOWED_IP, 8080).into(),
            ],
        );
        let short = serve_http(&handle, &inet, &[(SHORT_IP, 80).into()]);
        let cdn_http = serve_http(&handle, &inet, &[(CDN_IP, 80).into()]);
        let cdn_tls = serve_hello(&handle, &inet, (CDN_IP, 443).into());
        let sink = serve_sink(&handle, &inet, (SINK_IP, 9000).into());
        let talker = netns::run_in(&handle, &inet, || TcpListener::bind((TALKER_IP, 7000)))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || {
            for stream in talker.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    while stream.write_all(b"t").is_ok() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
            }
        });
        let platform_listener = TcpListener::bind((PLATFORM_IP, 80)).unwrap();
        let platform = Arc::new(Hits::default());
        spawn_http(platform_listener, Arc::clone(&platform));
        Self {
            dns_log,
            rogue_dns_log,
            pypi,
            allowed,
            short,
            cdn_http,
            cdn_tls,
            evil,
            sink,
            platform,
            inet,
        }
    }

    /// Packets that reached `inet` for a destination outside the fake internet.
    pub fn escaped_packets(&self) -> u64 {
        let out = sh_out(&[
            "ip", "netns", "exec", "inet", "nft", "-j", "list", "counter", "inet", "watch",
            "escaped",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|o| o["counter"]["packets"].as_u64())
            .unwrap()
    }

    /// Where the escaped packets were going (address and protocol), for the failure message.
    pub fn escaped_to(&self) -> String {
        sh_out(&[
            "ip",
            "netns",
            "exec",
            "inet",
            "nft",
            "list",
            "set",
            "inet",
            "watch",
            "escaped_to",
        ])
    }

    pub fn inet_path(&self) -> &Path {
        &self.inet
    }
}

/// Answers A queries for the names `lookup` knows (address, TTL), NXDOMAIN for the rest,
/// and logs every name asked.
fn serve_dns(
    socket: UdpSocket,
    lookup: impl Fn(&str) -> Option<(Ipv4Addr, u32)>,
    log: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(q) = query.queries.first().cloned() else {
            continue;
        };
        let name = q.name().to_ascii().trim_end_matches('.').to_owned();
        log.lock().unwrap().push(name.clone());
        let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
        reply.metadata.authoritative = true;
        reply.queries = vec![q.clone()];
        match (lookup(&name), q.query_type()) {
            (Some((ip, ttl)), RecordType::A) => {
                reply
                    .answers
                    .push(Record::from_rdata(q.name().clone(), ttl, RData::A(A(ip))));
            }
            (Some(_), _) => {}
            (None, _) => reply.metadata.response_code = ResponseCode::NXDomain,
        }
        let _ = socket.send_to(&reply.to_vec().unwrap(), from);
    }
}

/// One HTTP server on every address of `at`, counted together.
fn serve_http(handle: &std::fs::File, path: &Path, at: &[SocketAddr]) -> Arc<Hits> {
    let hits = Arc::new(Hits::default());
    for at in at.iter().copied() {
        let listener = netns::run_in(handle, path, move || TcpListener::bind(at))
            .unwrap()
            .unwrap();
        spawn_http(listener, Arc::clone(&hits));
    }
    hits
}

/// Answers every request with `200` and a body of 1 KiB.
fn spawn_http(listener: TcpListener, hits: Arc<Hits>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            hits.connections.fetch_add(1, Ordering::SeqCst);
            let hits = Arc::clone(&hits);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                hits.bytes_in.fetch_add(got.len() as u64, Ordering::SeqCst);
                let body = vec![b'x'; 1024];
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            });
        }
    });
}

/// Counts the first bytes of each connection and answers `hello`.
fn serve_hello(handle: &std::fs::File, path: &Path, at: SocketAddr) -> Arc<Hits> {
    let listener = netns::run_in(handle, path, move || TcpListener::bind(at))
        .unwrap()
        .unwrap();
    let hits = Arc::new(Hits::default());
    let counted = Arc::clone(&hits);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.connections.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 16 * 1024];
            if let Ok(n) = stream.read(&mut buf) {
                counted.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
                let _ = stream.write_all(b"hello");
            }
        }
    });
    hits
}

/// Reads everything and counts it; answers with the count when the client half-closes.
fn serve_sink(handle: &std::fs::File, path: &Path, at: SocketAddr) -> Arc<Hits> {
    let listener = netns::run_in(handle, path, move || TcpListener::bind(at))
        .unwrap()
        .unwrap();
    let hits = Arc::new(Hits::default());
    let counted = Arc::clone(&hits);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.connections.fetch_add(1, Ordering::SeqCst);
            let hits = Arc::clone(&counted);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n as u64;
                            hits.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
                        }
                    }
                }
                let _ = stream.write_all(&total.to_be_bytes());
            });
        }
    });
    hits
}

/// A fake guest: a namespace whose `eth0` (a tap with the guest's address and MAC) is
/// patched to the bunker's tap by two copying threads, as QEMU would carry the frames.
pub struct FakeGuest {
    path: PathBuf,
    handle: std::fs::File,
}

impl FakeGuest {
    pub fn plug(dir: &Path, name: &str, bunker_tap: &OwnedFd) -> Self {
        Self::plug_as(
            dir,
            name,
            bunker_tap,
            addr::GUEST_MAC_TEXT,
            "169.254.0.2/30",
            Some("169.254.0.1"),
        )
    }

    /// A fake guest whose `eth0` has `mac` and `cidr` (and a default route via `gateway`).
    pub fn plug_as(
        dir: &Path,
        name: &str,
        bunker_tap: &OwnedFd,
        mac: &str,
        cidr: &str,
        gateway: Option<&str>,
    ) -> Self {
        let path = dir.join(name);
        let handle = netns::create(&path).unwrap();
        let mut cmds = vec![
            "link set lo up".to_owned(),
            format!("link set eth0 address {mac}"),
            format!("addr add {cidr} dev eth0"),
            "link set eth0 up".to_owned(),
        ];
        if let Some(gw) = gateway {
            cmds.push(format!("route add default via {gw}"));
        }
        let eth0 = netns::run_in(&handle, &path, move || {
            let fd = tap::open("eth0").unwrap();
            for cmd in &cmds {
                let mut args = vec!["ip"];
                args.extend(cmd.split(' '));
                sh(&args);
            }
            fd
        })
        .unwrap();
        let guest_side = std::fs::File::from(eth0);
        let bunker_side = std::fs::File::from(bunker_tap.try_clone().unwrap());
        patch(
            guest_side.try_clone().unwrap(),
            bunker_side.try_clone().unwrap(),
        );
        patch(bunker_side, guest_side);
        Self { path, handle }
    }

    /// Runs `f` on a thread inside the guest.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::run_in(&self.handle, &self.path, f).unwrap()
    }

    pub fn remove(self) {
        netns::delete(&self.path).unwrap();
    }
}

fn patch(mut from: std::fs::File, mut to: std::fs::File) {
    std::thread::spawn(move || {
        let mut frame = vec![0u8; 65536];
        loop {
            match from.read(&mut frame) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&frame[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Asks `server` for the A record of `name` over UDP; `None` if nothing answered in time.
pub fn resolve(server: SocketAddr, name: &str) -> Option<(ResponseCode, Vec<Ipv4Addr>)> {
    let (code, records) = query(server, name, RecordType::A)?;
    let ips = records
        .iter()
        .filter_map(|r| match r {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Some((code, ips))
}

/// Asks `server` for `name`'s records of `kind` over UDP: the answer's code and records.
pub fn query(
    server: SocketAddr,
    name: &str,
    kind: RecordType,
) -> Option<(ResponseCode, Vec<RData>)> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut q = Message::new(0x5b5b, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.queries.push(Query::query(
        Name::from_ascii(format!("{name}.")).ok()?,
        kind,
    ));
    socket.send_to(&q.to_vec().ok()?, server).ok()?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).ok()?;
    assert_eq!(from, server, "the answer comes from the server asked");
    let reply = Message::from_vec(&buf[..n]).ok()?;
    let records = reply.answers.iter().map(|r| r.data.clone()).collect();
    Some((reply.metadata.response_code, records))
}

/// `GET /` from `to`; the status line, or the error.
pub fn http_get(to: SocketAddr) -> Result<String, std::io::Error> {
    http_get_as(to, "x")
}

/// `GET /` from `to` for the site `host`; the status line, or the error (an empty status
/// line is a refusal too: nothing came back).
pub fn http_get_as(to: SocketAddr, host: &str) -> Result<String, std::io::Error> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(stream, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
    let mut got = String::new();
    stream.read_to_string(&mut got)?;
    match got.lines().next() {
        Some(line) if !line.is_empty() => Ok(line.to_owned()),
        _ => Err(std::io::ErrorKind::ConnectionAborted.into()),
    }
}

/// Opens a TLS connection to `to` as far as its ClientHello (with `sni` if given) and
/// returns what the server sent back, or the error (a reset).
pub fn tls_hello(to: SocketAddr, sni: Option<&str>) -> Result<String, std::io::Error> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(&client_hello(sni))?;
    let mut got = String::new();
    stream.read_to_string(&mut got)?;
    if got.is_empty() {
        return Err(std::io::ErrorKind::ConnectionAborted.into());
    }
    Ok(got)
}

/// A TLS 1.3 ClientHello record, with `sni` as its server name if given (after a padding
/// extension, as clients that randomise their extensions' order may send it).
pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut exts = vec![0x00, 0x15, 0x00, 0x10];
    exts.extend_from_slice(&[0u8; 16]);
    if let Some(name) = sni {
        let name = name.as_bytes();
        let list = 3 + name.len() as u16;
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&(list + 2).to_be_bytes());
        exts.extend_from_slice(&list.to_be_bytes());
        exts.push(0);
        exts.extend_from_slice(&(name.len() as u16).to_be_bytes());
        exts.extend_from_slice(name);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x5b; 32]);
    body.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(body.len() as u16 + 4).to_be_bytes());
    record.push(0x01);
    record.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&body);
    record
}

/// Sends `bytes` to the sink and waits for its count; how long it took.
pub fn upload(to: SocketAddr, bytes: usize) -> std::io::Result<Duration> {
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.read_exact(&mut count)?;
    assert_eq!(
        u64::from_be_bytes(count),
        bytes as u64,
        "the sink got every byte"
    );
    Ok(started.elapsed())
}

/// The address of [`bridge_peer`].
pub const BRIDGE_PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 1);

/// A peer on the host bridge `bridge` (which must exist) at 10.50.0.1/24, in a namespace of
/// its own under `dir`, with a TCP listener on :7 counting connections.
pub fn bridge_peer(dir: &Path, bridge: &str) -> Arc<AtomicU64> {
    let path = dir.join("peer");
    let handle = netns::create(&path).unwrap();
    sh(&[
        "ip", "link", "add", "pr0", "type", "veth", "peer", "name", "pr1",
    ]);
    sh(&["ip", "link", "set", "pr1", "netns", path.to_str().unwrap()]);
    sh(&["ip", "link", "set", "pr0", "master", bridge]);
    sh(&["ip", "link", "set", "pr0", "up"]);
    let listener = netns::run_in(&handle, &path, || {
        for cmd in [
            "link set lo up",
            "addr add 10.50.0.1/24 dev pr1",
            "link set pr1 up",
        ] {
            let mut args = vec!["ip"];
            args.extend(cmd.split(' '));
            sh(&args);
        }
        TcpListener::bind((BRIDGE_PEER_IP, 7)).unwrap()
    })
    .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_ok() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    count
}

/// The count once it reaches `want`, or after 2 s whatever it is (a server thread counts a
/// connection a moment after the client's connect returns).
pub fn settled(count: &AtomicU64, want: u64) -> u64 {
    let until = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = count.load(Ordering::SeqCst);
        if now == want || std::time::Instant::now() > until {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
