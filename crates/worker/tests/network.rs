//! Bunker networks, tier 1 (NETWORK.md §3.3): the worker's network module, unchanged,
//! against a fake guest patched to the bunker's real tap and a fake internet, all inside
//! the test's own network namespace. Needs root.

#![allow(clippy::unwrap_used)]

#[path = "network/sandbox.rs"]
mod network_sandbox;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use network_sandbox::*;
use scaibunker_proto::egress::{EgressLine, Verdict};
use scaibunker_proto::worker::{NetworkProfile, NetworkSpec};
use scaibunker_worker::network::audit::{BatchSink, PutBatchError};
use scaibunker_worker::network::{Cidr, NamePolicy, NetworkConfig, Networks, Nic, PinLease, addr};

fn config(dir: &std::path::Path) -> NetworkConfig {
    NetworkConfig {
        pool: Cidr::parse("10.203.0.0/24").unwrap(),
        deny: Vec::new(),
        allow_private: Vec::new(),
        dns_upstreams: vec![SocketAddr::from((DNS_IP, 53))],
        netns_dir: dir.join("netns"),
        platform: Vec::new(),
        max_flows: 4096,
        registry: Arc::new(NamePolicy::registry("pypi.org").unwrap()),
        // Short pins, so the test sees one expire: an answer's TTL is capped at 5 s and
        // pinned for 1 s more; a new flow renews its address's pin to 6 s.
        pin_lease: PinLease {
            min: Duration::from_secs(1),
            max: Duration::from_secs(5),
            grace: Duration::from_secs(1),
        },
    }
}

fn unrestricted(bandwidth_mbit: Option<u64>) -> NetworkSpec {
    NetworkSpec {
        profile: NetworkProfile::Unrestricted,
        bandwidth_mbit,
        allowlist: Vec::new(),
        interfaces: Vec::new(),
    }
}

fn allowlisted(names: &[&str]) -> NetworkSpec {
    NetworkSpec {
        profile: NetworkProfile::Allowlisted,
        bandwidth_mbit: None,
        allowlist: names.iter().map(|n| (*n).to_owned()).collect(),
        interfaces: Vec::new(),
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
            // Asked for with nothing to allow or attach, or a bad NIC.
            let nic = |mac: &str| scaibunker_proto::worker::TransitInterface {
                bridge: "br-x".into(),
                mac: Some(mac.into()),
                spoof_guard: true,
            };
            for (refused, allowlist, interfaces) in [
                (NetworkProfile::Transit, vec![], vec![]),
                (
                    NetworkProfile::Transit,
                    vec![],
                    vec![nic("01:00:5e:00:00:01")],
                ),
                (
                    NetworkProfile::Unrestricted,
                    vec![],
                    vec![nic("02:5b:00:00:07:01")],
                ),
                (NetworkProfile::Allowlisted, vec![], vec![]),
                (
                    NetworkProfile::Allowlisted,
                    vec!["http://a.test/".to_owned()],
                    vec![],
                ),
            ] {
                let spec = NetworkSpec {
                    profile: refused,
                    bandwidth_mbit: None,
                    allowlist,
                    interfaces,
                };
                assert!(
                    networks.setup("bnk_x", "tnt_a", &spec).await.is_err(),
                    "{refused:?}"
                );
            }
            assert!(bunker_links().is_empty(), "a refused setup leaves nothing");
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
            // Directly out, and through the peek (its flows go to the gateway, not forward).
            for (id, spec) in [
                ("bnk_flood", unrestricted(None)),
                ("bnk_flood_al", allowlisted(&["sink.test"])),
            ] {
                let mut a = networks.setup(id, "tnt_a", &spec).await.unwrap();
                let guest = FakeGuest::plug(dir.path(), &format!("guest-{id}"), &tap_of(&a.nic()));
                let resolver: SocketAddr = (addr::GATEWAY_IP, 53).into();
                let (_, ips) = guest.run(move || resolve(resolver, "sink.test")).unwrap();
                assert_eq!(ips, vec![SINK_IP]);
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
                // The DNS query above is one flow of the eight while its entry lives.
                assert!(
                    (opened, refused) == (8, 4) || (opened, refused) == (7, 5),
                    "{id}: eight flows at once, then refused: {opened} opened, {refused} refused"
                );
                a.teardown().await;
                guest.remove();
            }
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

/// `GET /` from the guest must be refused at once.
fn refused_in(guest: &FakeGuest, to: SocketAddr, what: &str) {
    let started = Instant::now();
    let got = guest.run(move || http_get(to));
    refused_fast(got, started, what);
}

fn ok_in(guest: &FakeGuest, to: SocketAddr, host: &'static str, what: &str) {
    let got = guest.run(move || http_get_as(to, host));
    assert_eq!(
        got.unwrap_or_else(|e| panic!("{what}: {e}")),
        "HTTP/1.1 200 OK",
        "{what}"
    );
}

#[test]
fn allowlisted_resolves_and_reaches_only_its_names_and_no_name_leaves_through_dns() {
    sandboxed(
        "allowlisted_resolves_and_reaches_only_its_names_and_no_name_leaves_through_dns",
        || {
            let net = FakeInternet::build();
            let dir = tempfile::tempdir().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let sink = Arc::new(MemorySink::default());
                let networks = Networks::start(config(dir.path()), Some(Arc::clone(&sink) as _))
                    .await
                    .unwrap();
                let spec = allowlisted(&[
                    "api.allowed.test",
                    "short.allowed.test",
                    "rebind.allowed.test",
                    "*.cdn-a.test",
                ]);
                let mut a = networks.setup("bnk_al", "tnt_a", &spec).await.unwrap();
                assert!(a.has_dns());
                let guest = FakeGuest::plug(dir.path(), "guest-al", &tap_of(&a.nic()));
                let resolver: SocketAddr = (addr::GATEWAY_IP, 53).into();

                // Nothing is reachable before its name is resolved, not even an allowed
                // host's address.
                refused_in(&guest, (ALLOWED_IP, 80).into(), "an allowed host not yet resolved");

                // An allowed name: answered, then reachable on any TCP port but 853.
                let (code, ips) = guest.run(move || resolve(resolver, "api.allowed.test")).unwrap();
                assert_eq!((code, ips), (ResponseCode::NoError, vec![ALLOWED_IP]));
                ok_in(&guest, (ALLOWED_IP, 80).into(), "api.allowed.test", "the allowed host on 80");
                ok_in(&guest, (ALLOWED_IP, 8080).into(), "api.allowed.test:8080", "the allowed host on 8080");
                refused_in(&guest, (ALLOWED_IP, 853).into(), "DNS over TLS to an allowed host");

                // Other names: NXDOMAIN, and never asked upstream (no data out in a name).
                for name in ["evil.test", "secret123.evil.test", "allowed.test", "cdn-a.test"] {
                    let got = guest.run(move || resolve(resolver, name)).unwrap();
                    assert_eq!(got, (ResponseCode::NXDomain, vec![]), "{name}");
                }
                let asked = net.dns_log.lock().unwrap().clone();
                for name in ["evil.test", "secret123.evil.test", "allowed.test", "cdn-a.test"] {
                    assert!(!asked.iter().any(|n| n == name), "{name} went upstream: {asked:?}");
                }
                // Raw addresses: rejected at once.
                refused_in(&guest, (EVIL_IP, 80).into(), "a host by its raw address");
                refused_in(&guest, (PYPI_IP, 80).into(), "a host never resolved");
                refused_in(&guest, (PLATFORM_IP, 80).into(), "the platform");

                // A guest that names its own DNS server still gets its resolver's answers.
                let (code, ips) = guest
                    .run(|| resolve((ROGUE_DNS_IP, 53).into(), "api.allowed.test"))
                    .unwrap();
                assert_eq!((code, ips), (ResponseCode::NoError, vec![ALLOWED_IP]));
                let got = guest.run(|| resolve((ROGUE_DNS_IP, 53).into(), "evil.test")).unwrap();
                assert_eq!(got.0, ResponseCode::NXDomain, "the rogue server was not asked");
                assert!(
                    net.rogue_dns_log.lock().unwrap().is_empty(),
                    "the rogue server saw {:?}",
                    net.rogue_dns_log.lock().unwrap()
                );

                // No IPv6 and no ECH configuration: empty answers; no reverse lookups.
                for kind in [RecordType::AAAA, RecordType::HTTPS, RecordType::SVCB, RecordType::TXT] {
                    let got = guest.run(move || query(resolver, "api.allowed.test", kind)).unwrap();
                    assert_eq!(got, (ResponseCode::NoError, vec![]), "{kind:?}");
                }
                let got = guest
                    .run(move || query(resolver, "20.0.18.198.in-addr.arpa", RecordType::PTR))
                    .unwrap();
                assert_eq!(got.0, ResponseCode::Refused);

                // An allowed name that answers with a private address (rebinding): NXDOMAIN.
                let got = guest.run(move || resolve(resolver, "rebind.allowed.test")).unwrap();
                assert_eq!(got, (ResponseCode::NXDomain, vec![]));

                // A 2 s TTL: pinned for 3 s. Unused past that, the address is refused until
                // its name is resolved again; a reconnect within the lease goes through.
                let (_, ips) = guest.run(move || resolve(resolver, "short.allowed.test")).unwrap();
                assert_eq!(ips, vec![SHORT_IP]);
                tokio::time::sleep(Duration::from_millis(4500)).await;
                refused_in(&guest, (SHORT_IP, 80).into(), "an address past its pin");
                let (_, ips) = guest.run(move || resolve(resolver, "short.allowed.test")).unwrap();
                assert_eq!(ips, vec![SHORT_IP]);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ok_in(&guest, (SHORT_IP, 80).into(), "short.allowed.test", "a reconnect within the lease");
                assert_eq!(net.short.connections(), 1);

                // Only what was allowed arrived.
                assert_eq!(net.allowed.connections(), 2, "80 and 8080, not 853");
                assert_eq!(net.evil.connections(), 0);
                assert_eq!(net.pypi.connections(), 0);
                assert_eq!(net.platform.connections(), 0);

                a.teardown().await;
                guest.remove();
                let lines = sink.lines.lock().unwrap().clone();
                let flows: Vec<_> = lines
                    .iter()
                    .filter_map(|l| match l {
                        EgressLine::Flow(f) => Some(f),
                        EgressLine::Gap { .. } => None,
                    })
                    .collect();
                assert!(
                    flows.iter().any(|f| f.dst_ip == ALLOWED_IP.to_string()
                        && f.verdict == Verdict::Allowed
                        && f.dns_name.as_deref() == Some("api.allowed.test")),
                    "the allowed flow is audited with its name: {lines:?}"
                );
                for name in ["evil.test", "secret123.evil.test"] {
                    assert!(
                        flows.iter().any(|f| f.proto == "dns"
                            && f.verdict == Verdict::Denied
                            && f.dns_name.as_deref() == Some(name)),
                        "the refused name {name} is audited: {lines:?}"
                    );
                }
                for denied in [EVIL_IP, ALLOWED_IP] {
                    assert!(
                        flows.iter().any(|f| f.dst_ip == denied.to_string() && f.verdict == Verdict::Denied),
                        "the refused attempt on {denied} is audited: {lines:?}"
                    );
                }
            });
            assert!(bunker_links().is_empty(), "left over: {:?}", bunker_links());
            assert_eq!(net.escaped_packets(), 0, "escaped: {}", net.escaped_to());
        },
    );
}

#[test]
fn registry_reaches_its_hosts_on_80_and_443_only() {
    sandboxed("registry_reaches_its_hosts_on_80_and_443_only", || {
        let net = FakeInternet::build();
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let networks = Networks::start(config(dir.path()), None).await.unwrap();
            let spec = NetworkSpec {
                profile: NetworkProfile::Registry,
                bandwidth_mbit: None,
                allowlist: Vec::new(),
                interfaces: Vec::new(),
            };
            let mut r = networks.setup("bnk_reg", "tnt_a", &spec).await.unwrap();
            let guest = FakeGuest::plug(dir.path(), "guest-reg", &tap_of(&r.nic()));
            let resolver: SocketAddr = (addr::GATEWAY_IP, 53).into();
            let (_, ips) = guest.run(move || resolve(resolver, "pypi.org")).unwrap();
            assert_eq!(ips, vec![PYPI_IP]);
            ok_in(
                &guest,
                (PYPI_IP, 80).into(),
                "pypi.org",
                "the registry on 80",
            );
            ok_in(
                &guest,
                (PYPI_IP, 443).into(),
                "pypi.org",
                "the registry on 443",
            );
            refused_in(
                &guest,
                (PYPI_IP, 8080).into(),
                "the registry's address on 8080",
            );
            let got = guest
                .run(move || resolve(resolver, "api.allowed.test"))
                .unwrap();
            assert_eq!(
                got.0,
                ResponseCode::NXDomain,
                "a name off the registry list"
            );
            refused_in(&guest, (ALLOWED_IP, 80).into(), "a host off the list");
            assert_eq!(net.pypi.connections(), 2);
            assert_eq!(net.allowed.connections(), 0);
            r.teardown().await;
            guest.remove();
        });
        assert_eq!(net.escaped_packets(), 0, "escaped: {}", net.escaped_to());
    });
}

#[test]
fn a_shared_edge_serves_only_the_names_the_bunker_resolved_there() {
    sandboxed(
        "a_shared_edge_serves_only_the_names_the_bunker_resolved_there",
        || {
            let net = FakeInternet::build();
            let dir = tempfile::tempdir().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let sink = Arc::new(MemorySink::default());
                let networks = Networks::start(config(dir.path()), Some(Arc::clone(&sink) as _))
                    .await
                    .unwrap();
                let spec = allowlisted(&["*.cdn-a.test", "talk.allowed.test", "sink.test"]);
                let mut a = networks.setup("bnk_cdn", "tnt_a", &spec).await.unwrap();
                let guest = FakeGuest::plug(dir.path(), "guest-cdn", &tap_of(&a.nic()));
                let resolver: SocketAddr = (addr::GATEWAY_IP, 53).into();
                let (_, ips) = guest
                    .run(move || resolve(resolver, "x.cdn-a.test"))
                    .unwrap();
                assert_eq!(
                    ips,
                    vec![CDN_IP],
                    "the edge is pinned through an allowed name"
                );
                let edge_tls: SocketAddr = (CDN_IP, 443).into();
                let edge_http: SocketAddr = (CDN_IP, 80).into();

                // The name it resolved there: through, both ways.
                let got = guest.run(move || tls_hello(edge_tls, Some("x.cdn-a.test")));
                assert_eq!(got.unwrap(), "hello");
                ok_in(
                    &guest,
                    edge_http,
                    "X.cdn-a.test",
                    "HTTP for the resolved name",
                );
                assert_eq!(
                    (net.cdn_tls.connections(), net.cdn_http.connections()),
                    (1, 1)
                );

                // Another site on the same address, a name allowed but resolved elsewhere,
                // no SNI, or a Host that is not the name: reset before the edge sees a byte.
                for (what, sni) in [
                    ("another site on the edge", Some("cdn-b.test")),
                    (
                        "an allowed name never resolved to the edge",
                        Some("y.cdn-a.test"),
                    ),
                    ("no SNI", None),
                ] {
                    let started = Instant::now();
                    let got = guest.run(move || tls_hello(edge_tls, sni));
                    refused_fast(got, started, what);
                }
                for host in ["cdn-b.test", "198.18.0.31", "y.cdn-a.test"] {
                    let started = Instant::now();
                    let got = guest.run(move || http_get_as(edge_http, host));
                    refused_fast(got, started, host);
                }
                assert_eq!(
                    (net.cdn_tls.connections(), net.cdn_http.connections()),
                    (1, 1),
                    "the edge never saw the refused flows"
                );

                // A server that speaks first: the guest's silence lets it through.
                let (_, ips) = guest
                    .run(move || resolve(resolver, "talk.allowed.test"))
                    .unwrap();
                assert_eq!(ips, vec![TALKER_IP]);
                let byte = guest.run(|| {
                    let mut s = std::net::TcpStream::connect_timeout(
                        &(TALKER_IP, 7000).into(),
                        Duration::from_secs(2),
                    )?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    let mut byte = [0u8; 1];
                    std::io::Read::read_exact(&mut s, &mut byte)?;
                    Ok::<_, std::io::Error>(byte[0])
                });
                assert_eq!(byte.unwrap(), b't');

                // Bytes that are neither (these look like the start of an HTTP method but
                // are not one): through, whole.
                let (_, ips) = guest.run(move || resolve(resolver, "sink.test")).unwrap();
                assert_eq!(ips, vec![SINK_IP]);
                guest
                    .run(|| upload((SINK_IP, 9000).into(), 256 * 1024))
                    .expect("raw bytes pass the peek");
                a.teardown().await;
                guest.remove();
                // The audit names what each flow asked for.
                let lines = sink.lines.lock().unwrap().clone();
                for port in [443, 80] {
                    assert!(
                        lines.iter().any(|l| matches!(l, EgressLine::Flow(f)
                            if f.dst_ip == CDN_IP.to_string()
                                && f.dst_port == Some(port)
                                && f.verdict == Verdict::Allowed
                                && f.sni.as_deref() == Some("x.cdn-a.test")
                                && f.dns_name.as_deref() == Some("x.cdn-a.test"))),
                        "the flow on {port} with its name: {lines:?}"
                    );
                }
                // The flows the peek reset are refusals, with the name they asked for.
                for (port, sni) in [
                    (443, Some("cdn-b.test")),
                    (443, None),
                    (80, Some("cdn-b.test")),
                ] {
                    assert!(
                        lines.iter().any(|l| matches!(l, EgressLine::Flow(f)
                            if f.dst_ip == CDN_IP.to_string()
                                && f.dst_port == Some(port)
                                && f.verdict == Verdict::Denied
                                && f.sni.as_deref() == sni)),
                        "the reset flow on {port} asking for {sni:?}: {lines:?}"
                    );
                }
            });
            assert_eq!(net.escaped_packets(), 0, "escaped: {}", net.escaped_to());
        },
    );
}
