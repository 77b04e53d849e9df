//! Bunker networks, tier 1 (NETWORK.md §3.3): the worker's network module, unchanged,
//! against a fake guest patched to the bunker's real tap and a fake internet, all inside
//! the test's own network namespace. Needs root.

#![allow(clippy::unwrap_used)]

#[path = "network/sandbox.rs"]
mod network_sandbox;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use network_sandbox::*;
use scaibunker_proto::egress::{EgressLine, Verdict};
use scaibunker_proto::worker::{NetworkProfile, NetworkSpec};
use scaibunker_worker::network::audit::{BatchSink, PutBatchError};
use scaibunker_worker::network::{Cidr, NetworkConfig, Networks, Nic, addr};

fn config(dir: &std::path::Path) -> NetworkConfig {
    NetworkConfig {
        pool: Cidr::parse("10.203.0.0/24").unwrap(),
        deny: Vec::new(),
        allow_private: Vec::new(),
        dns_upstreams: vec![SocketAddr::from((DNS_IP, 53))],
        netns_dir: dir.join("netns"),
        platform: Vec::new(),
        max_flows: 4096,
    }
}

fn unrestricted(bandwidth_mbit: Option<u64>) -> NetworkSpec {
    NetworkSpec {
        profile: NetworkProfile::Unrestricted,
        bandwidth_mbit,
    }
}

fn tap_of(nic: &Nic) -> Arc<std::os::fd::OwnedFd> {
    match nic {
        Nic::Tap(fd) => Arc::clone(fd),
        Nic::Unplugged => panic!("a networked bunker has a tap"),
    }
}

/// Keeps every audit line put.
#[derive(Default)]
struct MemorySink {
    lines: std::sync::Mutex<Vec<EgressLine>>,
}

impl BatchSink for MemorySink {
    fn put(
        &self,
        _key: String,
        body: bytes::Bytes,
    ) -> futures_util::future::BoxFuture<'_, Result<(), PutBatchError>> {
        let mut lines = self.lines.lock().unwrap();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            lines.push(serde_json::from_slice(line).unwrap());
        }
        Box::pin(async { Ok(()) })
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn refused_fast(result: std::io::Result<String>, started: Instant, what: &str) {
    assert!(
        result.is_err(),
        "{what} must be unreachable, got {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{what}: refused at once, not left hanging ({:?})",
        started.elapsed()
    );
}

#[test]
fn unrestricted_reaches_the_internet_but_never_the_platform_the_host_or_another_bunker() {
    sandboxed(
        "unrestricted_reaches_the_internet_but_never_the_platform_the_host_or_another_bunker",
        || {
            let net = FakeInternet::build();
            let dir = tempfile::tempdir().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let sink = Arc::new(MemorySink::default());
                let networks = Networks::start(config(dir.path()), Some(Arc::clone(&sink) as _))
                    .await
                    .unwrap();
                let mut a = networks
                    .setup("bnk_a", "tnt_a", &unrestricted(None))
                    .await
                    .unwrap();
                let mut b = networks
                    .setup("bnk_b", "tnt_b", &unrestricted(None))
                    .await
                    .unwrap();
                let guest_a = FakeGuest::plug(dir.path(), "guest-a", &tap_of(&a.nic()));
                let guest_b = FakeGuest::plug(dir.path(), "guest-b", &tap_of(&b.nic()));
                let resolver: SocketAddr = (addr::GATEWAY_IP, 53).into();

                // By name through the bunker's resolver, then by address.
                let answer = guest_a.run(move || resolve(resolver, "pypi.org"));
                let (_, ips) = answer.expect("the resolver answers");
                assert_eq!(ips, vec![PYPI_IP]);
                assert_eq!(a.names().name_of(PYPI_IP).as_deref(), Some("pypi.org"));
                assert_eq!(
                    b.names().name_of(PYPI_IP),
                    None,
                    "each bunker has its own names"
                );
                let status = guest_a.run(|| http_get((PYPI_IP, 80).into()));
                assert_eq!(status.unwrap(), "HTTP/1.1 200 OK");
                let status = guest_a.run(|| http_get((EVIL_IP, 80).into()));
                assert_eq!(
                    status.unwrap(),
                    "HTTP/1.1 200 OK",
                    "unrestricted: any public host"
                );

                // The platform, the metadata address, the host's own addresses, the
                // bunker's own uplink, another bunker: rejected at once.
                let (a_host, a_ns) = a.uplink().unwrap();
                let (_, b_ns) = b.uplink().unwrap();
                for (what, ip) in [
                    ("the platform", PLATFORM_IP),
                    ("the metadata address", "169.254.169.254".parse().unwrap()),
                    ("the host's uplink address", HOST_WAN_IP),
                    ("the host end of the uplink", a_host),
                    ("another bunker's uplink", b_ns),
                ] {
                    let started = Instant::now();
                    let got = guest_a.run(move || http_get((ip, 80).into()));
                    refused_fast(got, started, what);
                }
                let started = Instant::now();
                let got = guest_b.run(move || http_get((a_ns, 80).into()));
                refused_fast(got, started, "bunker A's uplink from bunker B");
                assert_eq!(
                    net.platform.connections(),
                    0,
                    "nothing reached the platform"
                );
                assert_eq!(net.evil.connections(), 1);
                // The bunker's namespace itself takes nothing but DNS.
                let got = guest_a.run(|| http_get((addr::GATEWAY_IP, 22).into()));
                assert!(got.is_err(), "the gateway serves nothing but DNS");

                // What kept them out is the rules, not the routing: without the tables the
                // platform answers.
                replace_rules_with_masquerade(a.netns_path().unwrap());
                sh(&["nft", "delete", "table", "inet", "scaibunker"]);
                let got = guest_a.run(|| http_get((PLATFORM_IP, 80).into()));
                assert_eq!(
                    got.unwrap(),
                    "HTTP/1.1 200 OK",
                    "without the rules the platform answers"
                );
                Networks::start(config(dir.path()), None).await.unwrap();

                a.teardown().await;
                b.teardown().await;
                guest_a.remove();
                guest_b.remove();

                // The worker's counters (its `/metrics`): two setups, none left, the audit's
                // lines and batches added up.
                let counters = networks.counters();
                assert_eq!(
                    (counters.setups_ok, counters.setups_failed, counters.active),
                    (2, 0, 0)
                );
                assert!(
                    counters.audit.allowed >= 3 && counters.audit.denied >= 6,
                    "{counters:?}"
                );
                assert!(counters.audit.batches_put >= 2, "{counters:?}");

                // The audit of bunker A: its flows with the names its resolver gave, and the
                // refused attempts; B's apart.
                let lines = sink.lines.lock().unwrap().clone();
                let flows: Vec<_> = lines
                    .iter()
                    .filter_map(|l| match l {
                        EgressLine::Flow(f) => Some(f),
                        EgressLine::Gap { .. } => None,
                    })
                    .collect();
                let pypi = flows
                    .iter()
                    .find(|f| f.bunker_id == "bnk_a" && f.dst_ip == PYPI_IP.to_string())
                    .unwrap_or_else(|| panic!("no flow to pypi in {lines:?}"));
                assert_eq!(pypi.dns_name.as_deref(), Some("pypi.org"));
                assert_eq!(
                    (pypi.tenant_id.as_str(), pypi.dst_port),
                    ("tnt_a", Some(80))
                );
                assert_eq!(pypi.verdict, Verdict::Allowed);
                assert!(pypi.bytes_in > 1024 && pypi.bytes_out > 0, "{pypi:?}");
                assert!(
                    flows.iter().any(|f| f.bunker_id == "bnk_a"
                        && f.dst_ip == PLATFORM_IP.to_string()
                        && f.verdict == Verdict::Denied),
                    "the refused attempt on the platform is audited: {lines:?}"
                );
                assert!(
                    flows
                        .iter()
                        .any(|f| f.bunker_id == "bnk_b" && f.verdict == Verdict::Denied),
                    "B's refused attempt is B's: {lines:?}"
                );
            });
            assert!(bunker_links().is_empty(), "left over: {:?}", bunker_links());
            let handles: Vec<_> = std::fs::read_dir(dir.path().join("netns"))
                .unwrap()
                .collect();
            assert!(handles.is_empty(), "namespace handles left: {handles:?}");
            assert_eq!(
                net.escaped_packets(),
                0,
                "no packet left the fake internet: {}",
                net.escaped_to()
            );
            assert!(net.dns_log.lock().unwrap().contains(&"pypi.org".to_owned()));
        },
    );
}

#[test]
fn a_bandwidth_cap_shapes_egress_and_uncapped_is_faster() {
    sandboxed(
        "a_bandwidth_cap_shapes_egress_and_uncapped_is_faster",
        || {
            let _net = FakeInternet::build();
            let dir = tempfile::tempdir().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let networks = Networks::start(config(dir.path()), None).await.unwrap();
                let mut capped = networks
                    .setup("bnk_capped", "tnt_a", &unrestricted(Some(8)))
                    .await
                    .unwrap();
                let guest = FakeGuest::plug(dir.path(), "guest-c", &tap_of(&capped.nic()));
                let bytes = 4_000_000;
                let took = guest
                    .run(move || upload((SINK_IP, 9000).into(), bytes))
                    .unwrap();
                // 4 MB at 8 Mbit/s is 4 s.
                let expected = bytes as f64 * 8.0 / 8e6;
                println!(
                    "capped: {bytes} bytes in {:.2} s (expected {expected:.2} s)",
                    took.as_secs_f64()
                );
                assert!(
                    (took.as_secs_f64() - expected).abs() < expected * 0.2,
                    "8 Mbit/s: {bytes} bytes took {took:?}, expected {expected} s ± 20 %"
                );
                capped.teardown().await;
                guest.remove();

                let mut free = networks
                    .setup("bnk_free", "tnt_a", &unrestricted(None))
                    .await
                    .unwrap();
                let guest = FakeGuest::plug(dir.path(), "guest-f", &tap_of(&free.nic()));
                let uncapped = guest
                    .run(move || upload((SINK_IP, 9000).into(), bytes))
                    .unwrap();
                println!("uncapped: {bytes} bytes in {:.2} s", uncapped.as_secs_f64());
                assert!(
                    uncapped * 2 < took,
                    "uncapped {uncapped:?} vs capped {took:?}"
                );
                free.teardown().await;
                guest.remove();
            });
        },
    );
}

#[test]
fn a_failed_setup_and_a_crashed_worker_leave_nothing_behind() {
    sandboxed(
        "a_failed_setup_and_a_crashed_worker_leave_nothing_behind",
        || {
            let _net = FakeInternet::build();
            let dir = tempfile::tempdir().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let networks = Networks::start(config(dir.path()), None).await.unwrap();
                // `tc` refuses a zero rate after the namespace, veth and rules exist.
                let err = networks
                    .setup("bnk_bad", "tnt_a", &unrestricted(Some(0)))
                    .await
                    .expect_err("a zero rate is refused");
                println!("refused: {err}");
                assert_eq!(networks.counters().setups_failed, 1);
                assert!(bunker_links().is_empty(), "left over: {:?}", bunker_links());
                assert!(!dir.path().join("netns/bnk_bad").exists());

                // A worker that dies keeps its bunkers' namespaces and links: the next start
                // sweeps them and rewrites the host table.
                let kept = networks
                    .setup("bnk_crash", "tnt_a", &unrestricted(None))
                    .await
                    .unwrap();
                std::mem::forget(kept);
                assert!(!bunker_links().is_empty());
                drop(networks);
                let _again = Networks::start(config(dir.path()), None).await.unwrap();
                assert!(bunker_links().is_empty(), "left over: {:?}", bunker_links());
                assert!(!dir.path().join("netns/bnk_crash").exists());
                let tables = sh_out(&["nft", "list", "tables"]);
                assert_eq!(tables.matches("inet scaibunker").count(), 1, "{tables}");
            });
        },
    );
}

#[test]
fn isolated_has_no_host_side_at_all() {
    sandboxed("isolated_has_no_host_side_at_all", || {
        let dir = tempfile::tempdir().unwrap();
        sh(&["ip", "link", "set", "lo", "up"]);
        let rt = runtime();
        rt.block_on(async {
            let networks = Networks::start(config(dir.path()), None).await.unwrap();
            let spec = NetworkSpec::default();
            let net = networks.setup("bnk_iso", "tnt_a", &spec).await.unwrap();
            assert_eq!(net.nic(), Nic::Unplugged);
            assert!(!net.has_dns());
            assert!(net.netns_path().is_none());
            assert!(bunker_links().is_empty());
            for refused in [
                NetworkProfile::Allowlisted,
                NetworkProfile::Registry,
                NetworkProfile::Transit,
            ] {
                let spec = NetworkSpec {
                    profile: refused,
                    bandwidth_mbit: None,
                };
                assert!(
                    networks.setup("bnk_x", "tnt_a", &spec).await.is_err(),
                    "{refused:?}"
                );
            }
        });
    });
}

#[test]
fn one_bunker_cannot_fill_the_hosts_connection_table() {
    sandboxed("one_bunker_cannot_fill_the_hosts_connection_table", || {
        let _net = FakeInternet::build();
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let mut cfg = config(dir.path());
            cfg.max_flows = 8;
            let networks = Networks::start(cfg, None).await.unwrap();
            let mut a = networks
                .setup("bnk_flood", "tnt_a", &unrestricted(None))
                .await
                .unwrap();
            let guest = FakeGuest::plug(dir.path(), "guest-flood", &tap_of(&a.nic()));
            let (opened, refused) = guest.run(|| {
                let mut open = Vec::new();
                let mut refused = 0;
                for _ in 0..12 {
                    let to: SocketAddr = (SINK_IP, 9000).into();
                    match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                        Ok(s) => open.push(s),
                        Err(_) => refused += 1,
                    }
                }
                (open.len(), refused)
            });
            assert_eq!(
                (opened, refused),
                (8, 4),
                "eight flows at once, then refused"
            );
            a.teardown().await;
            guest.remove();
        });
    });
}

#[test]
fn replies_for_a_guest_that_is_gone_do_not_leave_through_the_uplink() {
    sandboxed(
        "replies_for_a_guest_that_is_gone_do_not_leave_through_the_uplink",
        || {
            let net = FakeInternet::build();
            let dir = tempfile::tempdir().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let networks = Networks::start(config(dir.path()), None).await.unwrap();
                let mut a = networks
                    .setup("bnk_gone", "tnt_a", &unrestricted(None))
                    .await
                    .unwrap();
                let guest = FakeGuest::plug(dir.path(), "guest-gone", &tap_of(&a.nic()));
                // A connection the far side keeps talking on; then the VM goes (its tap with it).
                let stream = guest.run(|| {
                    let mut s = std::net::TcpStream::connect_timeout(
                        &(TALKER_IP, 7000).into(),
                        Duration::from_secs(2),
                    )
                    .unwrap();
                    let mut byte = [0u8; 1];
                    std::io::Read::read_exact(&mut s, &mut byte).unwrap();
                    s
                });
                let ns = format!("--net={}", a.netns_path().unwrap().display());
                sh(&["nsenter", &ns, "ip", "link", "del", "gst0"]);
                tokio::time::sleep(Duration::from_millis(800)).await;
                assert_eq!(
                    net.escaped_packets(),
                    0,
                    "the talker's bytes for the gone guest went back out: {}",
                    net.escaped_to()
                );
                drop(stream);
                a.teardown().await;
                guest.remove();
            });
        },
    );
}
