//! The name-filtered profiles against their floors, without VMs: the worker's network module
//! with a fake guest on the bunker's real tap (tier 1 of the network tests, at native speed,
//! so the network's own costs are not hidden under TCG), in the bench's own network
//! namespace with the fake internet. Written to the "Name-filtered networks" section of
//! `docs/benchmarks.md`:
//!
//! 1. DNS: an A query from the guest, answered (a) straight by the fake internet's server
//!    from an `unrestricted` bunker (the floor: one round trip through the rules and NAT),
//!    (b) by an `unrestricted` bunker's resolver (forwarded), (c) by an `allowlisted`
//!    bunker's resolver for a name with a new address (forwarded, then pinned with one nfnetlink
//!    batch before the answer), (d) the same names again (already pinned: no batch).
//! 2. HTTP: connect, `GET /`, a 1 KiB answer, close, to the same server from an
//!    `unrestricted` bunker (the floor) and through an `allowlisted` bunker's SNI/Host peek.
//! 3. Upload: 64 MiB to the byte sink from an `unrestricted` bunker and through the peek
//!    (raw bytes: the peek lets them through and splices).
//!
//! Run: `cargo bench -p scaibunker-e2e --bench name_filter` (as root).

#![allow(clippy::unwrap_used)]

#[path = "../../../crates/worker/tests/network/sandbox.rs"]
mod network_sandbox;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use network_sandbox::*;
use scaibunker_e2e::bench::{Machine, load_average, median, percentile};
use scaibunker_proto::worker::{NetworkProfile, NetworkSpec};
use scaibunker_worker::network::{Cidr, NamePolicy, NetworkConfig, Networks, Nic, PinLease, addr};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## Name-filtered networks";
const QUERIES: usize = 200;
const GETS: usize = 200;
const UPLOAD_BYTES: usize = 64 * 1024 * 1024;
const UPLOADS: usize = 5;

fn main() -> Result<()> {
    scaibunker_e2e::bench::in_net_sandbox(run)
}

#[derive(Default)]
struct Figures {
    dns_floor: Vec<Duration>,
    dns_forward: Vec<Duration>,
    dns_pin: Vec<Duration>,
    dns_pinned: Vec<Duration>,
    get_floor: Vec<Duration>,
    get_peek: Vec<Duration>,
    up_floor: Vec<f64>,
    up_peek: Vec<f64>,
}

fn spec(profile: NetworkProfile, allowlist: &[&str]) -> NetworkSpec {
    NetworkSpec {
        profile,
        bandwidth_mbit: None,
        allowlist: allowlist.iter().map(|n| (*n).to_owned()).collect(),
        interfaces: Vec::new(),
    }
}

fn tap(nic: &Nic) -> Arc<std::os::fd::OwnedFd> {
    match nic {
        Nic::Tap(fd) => Arc::clone(fd),
        Nic::Unplugged => panic!("a networked bunker has a tap"),
    }
}

async fn run() -> Result<()> {
    let machine = Machine::probe()?;
    let net = FakeInternet::build();
    let dir = tempfile::tempdir()?;
    let config = NetworkConfig {
        pool: Cidr::parse("10.203.0.0/24")?,
        dns_upstreams: vec![SocketAddr::from((DNS_IP, 53))],
        netns_dir: dir.path().join("netns"),
        registry: Arc::new(NamePolicy::registry("pypi.org")?),
        pin_lease: PinLease::default(),
        ..NetworkConfig::with_defaults()
    };
    let networks = Networks::start(config, None).await?;
    let mut open = networks
        .setup(
            "bnk_open",
            "tnt_b",
            &spec(NetworkProfile::Unrestricted, &[]),
        )
        .await?;
    let mut filtered = networks
        .setup(
            "bnk_filtered",
            "tnt_b",
            &spec(
                NetworkProfile::Allowlisted,
                &["*.bench.test", "api.allowed.test", "sink.test"],
            ),
        )
        .await?;
    let open_guest = FakeGuest::plug(dir.path(), "guest-open", &tap(&open.nic()));
    let filtered_guest = FakeGuest::plug(dir.path(), "guest-filtered", &tap(&filtered.nic()));
    let resolver: SocketAddr = (addr::GATEWAY_IP, 53).into();
    let direct: SocketAddr = (DNS_IP, 53).into();
    let mut f = Figures::default();

    let time_queries = |guest: &FakeGuest, server: SocketAddr, first: usize| {
        guest.run(move || {
            (first..first + QUERIES)
                .map(|k| {
                    let started = Instant::now();
                    let (_, ips) = resolve(server, &format!("n{k}.bench.test")).expect("an answer");
                    assert_eq!(ips.len(), 1);
                    started.elapsed()
                })
                .collect::<Vec<_>>()
        })
    };
    f.dns_floor = time_queries(&open_guest, direct, 0);
    f.dns_forward = time_queries(&open_guest, resolver, 0);
    f.dns_pin = time_queries(&filtered_guest, resolver, 1000);
    // The resolver allows a burst of 200 queries, then 100 a second: let it refill.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    f.dns_pinned = time_queries(&filtered_guest, resolver, 1000);

    let (_, ips) = filtered_guest
        .run(move || resolve(resolver, "api.allowed.test"))
        .context("resolve the allowed host")?;
    ensure!(ips == vec![ALLOWED_IP], "{ips:?}");
    let time_gets = |guest: &FakeGuest| {
        guest.run(|| {
            (0..GETS)
                .map(|_| {
                    let started = Instant::now();
                    let status =
                        http_get_as((ALLOWED_IP, 80).into(), "api.allowed.test").expect("a GET");
                    assert_eq!(status, "HTTP/1.1 200 OK");
                    started.elapsed()
                })
                .collect::<Vec<_>>()
        })
    };
    f.get_floor = time_gets(&open_guest);
    f.get_peek = time_gets(&filtered_guest);

    let (_, ips) = filtered_guest
        .run(move || resolve(resolver, "sink.test"))
        .context("resolve the sink")?;
    ensure!(ips == vec![SINK_IP], "{ips:?}");
    for _ in 0..UPLOADS {
        for (guest, into) in [
            (&open_guest, &mut f.up_floor),
            (&filtered_guest, &mut f.up_peek),
        ] {
            let took = guest.run(|| upload((SINK_IP, 9000).into(), UPLOAD_BYTES))?;
            into.push(UPLOAD_BYTES as f64 * 8.0 / took.as_secs_f64() / 1e6);
        }
    }

    open.teardown().await;
    filtered.teardown().await;
    open_guest.remove();
    filtered_guest.remove();
    networks.stop().await;
    ensure!(
        net.escaped_packets() == 0,
        "a packet left the fake internet: {}",
        net.escaped_to()
    );
    let section = render(&machine, &f);
    let old = std::fs::read_to_string(DOC).context("reading docs/benchmarks.md")?;
    std::fs::write(
        DOC,
        scaibunker_e2e::doc::replace_section(&old, HEADING, &section),
    )?;
    println!("{section}");
    Ok(())
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn row(s: &mut String, what: &str, v: &[Duration]) {
    let mut sorted = v.to_vec();
    sorted.sort();
    let _ = writeln!(
        s,
        "| {what} | {} | {} | {} | {} |",
        us(median(v)),
        us(percentile(v, 90)),
        us(sorted[0]),
        us(sorted[sorted.len() - 1]),
    );
}

fn mbit(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn render(m: &Machine, f: &Figures) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/name_filter.rs; a run replaces this section. -->\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` ({} binaries) on {}, nproc {}: the worker's network module \
         with a fake guest on each bunker's real tap (no VM, so the network's own costs are \
         not hidden under TCG), inside the bench's own network namespace with the fake \
         internet (no packet left it). Load average (1/5/15 min) {} before, {} after: the \
         host was {}.\n",
        m.date,
        m.commit,
        m.profile,
        m.cpu_model,
        m.nproc,
        m.load_start,
        load_average(),
        m.load_words(),
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo bench -p scaibunker-e2e --bench name_filter` (as root)\n"
    );
    let _ = writeln!(
        s,
        "| {QUERIES} A queries from the guest | median | p90 | min | max |\n|---|---|---|---|---|"
    );
    row(
        &mut s,
        "floor: straight to the fake internet's DNS server (`unrestricted`)",
        &f.dns_floor,
    );
    row(
        &mut s,
        "`unrestricted` bunker's resolver (forwarded)",
        &f.dns_forward,
    );
    row(
        &mut s,
        "`allowlisted` resolver, a new address each (forwarded, pinned by one nfnetlink batch)",
        &f.dns_pin,
    );
    row(
        &mut s,
        "`allowlisted` resolver, the same names again (already pinned)",
        &f.dns_pinned,
    );
    let _ = writeln!(
        s,
        "\n| {GETS} HTTP GETs (connect, request, 1 KiB answer, close) | median | p90 | min | max |\n|---|---|---|---|---|"
    );
    row(
        &mut s,
        "floor: `unrestricted`, through the rules only",
        &f.get_floor,
    );
    row(
        &mut s,
        "`allowlisted`, through the SNI/Host peek",
        &f.get_peek,
    );
    let (fm, fmin, fmax) = mbit(&f.up_floor);
    let (pm, pmin, pmax) = mbit(&f.up_peek);
    let _ = writeln!(
        s,
        "\n| {UPLOADS} uploads of 64 MiB to the sink | median Mbit/s (min–max) |\n|---|---|\n\
         | floor: `unrestricted`, through the rules only | {fm:.0} ({fmin:.0}–{fmax:.0}) |\n\
         | `allowlisted`, spliced by the peek | {pm:.0} ({pmin:.0}–{pmax:.0}) |"
    );
    let _ = writeln!(
        s,
        "\nA name-filtered answer for a new address costs {} over a forwarded one at the \
         median (one nfnetlink batch from the bunker's namespace; spawning `nft` for it, as \
         the first cut did, cost 24 ms at the median in this bench); an address already \
         pinned costs {} over it. The peek adds {} to a whole HTTP exchange (an \
         accept, the original destination, a socket made in the namespace, a connect), and \
         moves {:.0} % of the floor's upload rate: the guest's flow ends at the worker, a \
         local hop, and a second flow carries the bytes on.\n",
        signed_us(median(&f.dns_pin), median(&f.dns_forward)),
        signed_us(median(&f.dns_pinned), median(&f.dns_forward)),
        signed_us(median(&f.get_peek), median(&f.get_floor)),
        pm / fm * 100.0,
    );
    s
}

fn signed_us(a: Duration, b: Duration) -> String {
    let d = a.as_secs_f64() - b.as_secs_f64();
    format!("{:+.0} µs", d * 1e6)
}
