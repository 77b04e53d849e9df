//! Bunker networks on real microVMs (tier 2, NETWORK.md §3.3), through `scaibunker up`, inside
//! the test's own network namespace with the fake internet of the worker's network tests:
//! `isolated` reaches nothing, `unrestricted` reaches the fake hosts by name and address but
//! never the platform or the metadata address, its flows land in the egress audit, and
//! nothing of a bunker's network is left once it is gone. Needs root.

#![allow(clippy::unwrap_used)]

#[path = "../../../crates/worker/tests/network/sandbox.rs"]
mod network_sandbox;

use std::time::{Duration, Instant};

use network_sandbox::*;
use scaibunker_api::bunkers::{CreateBunker, NetworkProfile};
use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::bench::wait_template;
use scaibunker_e2e::{Up, UpOptions, require_images, within};

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: Some(cmd.into()),
        ..Default::default()
    }
}

fn tiny(profile: NetworkProfile, bandwidth_mbit: Option<u64>) -> CreateBunker {
    CreateBunker {
        image: Some("tiny".into()),
        memory_mb: Some(256),
        network_profile: Some(profile),
        bandwidth_mbit,
        ..Default::default()
    }
}

async fn run(c: &scaibunker_sdk::Client, id: &str, cmd: &str) -> (i32, String) {
    let out = c.exec(id, &sh(cmd)).await.expect("exec");
    let text = format!(
        "{}{}",
        out.stdout.clone().unwrap_or_default(),
        out.stderr.clone().unwrap_or_default()
    );
    (out.exit_code.unwrap_or(-1), text)
}

/// Runs `cmd` in a shell that reports its exit code (so a crash or a signal is a code too).
async fn rc_of(c: &scaibunker_sdk::Client, id: &str, cmd: &str) -> (i32, String) {
    let (code, out) = run(c, id, &format!("{cmd}; echo rc=$?")).await;
    assert_eq!(code, 0, "the shell ran to the end: {out}");
    let rc = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("rc="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit code in {out:?}"));
    (rc, out)
}

#[test]
fn isolated_and_unrestricted_bunkers_on_real_vms() {
    sandboxed("isolated_and_unrestricted_bunkers_on_real_vms", || {
        require_images(&["tiny.ext4"]).expect("guest images");
        let net = FakeInternet::build();
        let netns_dir = tempfile::tempdir().unwrap();
        let ns = netns_dir.path().display().to_string();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let up = Up::start(UpOptions {
                templates: true,
                ..UpOptions::with_env(&[
                    ("SCAIBUNKER_NETWORKS", "on"),
                    ("SCAIBUNKER_DNS_UPSTREAM", "198.18.1.53"),
                    ("SCAIBUNKER_NETNS_DIR", &ns),
                ])
            })
            .expect("scaibunker up gets ready");
            let c = up.client();

            // isolated: no resolver, no route, the agent works.
            let iso = c
                .create_bunker(&tiny(NetworkProfile::Isolated, None))
                .await
                .unwrap();
            assert_eq!(iso.status, "running", "{:?}", iso.failure_reason);
            let (code, out) = run(&c, &iso.id, "echo agent-ok").await;
            assert_eq!((code, out.trim()), (0, "agent-ok"));
            let (code, out) = run(&c, &iso.id, "nslookup pypi.org 169.254.0.1").await;
            assert_ne!(code, 0, "isolated resolves nothing: {out}");
            let (rc, out) = rc_of(&c, &iso.id, "timeout 5 wget -q -O - http://198.18.0.10/").await;
            assert!(
                rc != 0 && !out.contains("xxxx"),
                "isolated reaches nothing: {rc} {out}"
            );
            assert!(bunker_links().is_empty(), "isolated has no host side");
            c.delete_bunker(&iso.id).await.unwrap();
            wait_template(&up, Duration::from_secs(240)).await.unwrap();

            // unrestricted, restored from the template the isolated boot left.
            let started = Instant::now();
            let b = c
                .create_bunker(&tiny(NetworkProfile::Unrestricted, None))
                .await
                .unwrap();
            let create = started.elapsed();
            assert_eq!(b.status, "running", "{:?}", b.failure_reason);
            println!("unrestricted create from the template: {create:?}");
            let (code, out) = run(&c, &b.id, "cat /etc/resolv.conf").await;
            assert_eq!((code, out.trim()), (0, "nameserver 169.254.0.1"));
            let (code, out) = run(&c, &b.id, "nslookup pypi.org").await;
            assert!(code == 0 && out.contains("198.18.0.10"), "{out}");
            let (code, out) = run(&c, &b.id, "wget -q -O - http://pypi.org/ | wc -c").await;
            assert_eq!((code, out.trim()), (0, "1024"), "by name");
            let (code, out) = run(&c, &b.id, "wget -q -O - http://198.18.0.21/ | wc -c").await;
            assert_eq!((code, out.trim()), (0, "1024"), "by address");
            // Refused at once by the rules (an ICMP admin-prohibited: "No route to host"),
            // not left to time out. (Busybox's `wget -T` crashes; the shell reports the code.)
            for (what, url) in [
                ("the platform", "http://10.99.0.1/"),
                ("the metadata address", "http://169.254.169.254/"),
                ("the host's uplink", "http://198.19.0.1/"),
            ] {
                let (rc, out) = rc_of(&c, &b.id, &format!("wget -q -O - {url}")).await;
                assert!(
                    rc != 0 && out.contains("No route to host"),
                    "{what}: {rc} {out}"
                );
            }
            let (rc, out) = rc_of(&c, &b.id, "timeout 3 wget -q -O - http://169.254.0.1/").await;
            assert_ne!(rc, 0, "the gateway serves nothing but DNS: {out}");
            assert_eq!(net.platform.connections(), 0);
            assert_eq!(
                net.pypi.connections(),
                1,
                "only the unrestricted bunker got through"
            );

            c.delete_bunker(&b.id).await.unwrap();
            within(
                Duration::from_secs(20),
                "the namespace and veth going after delete",
                || async {
                    (bunker_links().is_empty() && std::fs::read_dir(&ns).unwrap().next().is_none())
                        .then_some(())
                },
            )
            .await;

            // Its flows, read back through the API once the last batch landed.
            let page = within(
                Duration::from_secs(30),
                "the flow to pypi.org in the egress audit",
                || async {
                    let page = c.bunker_egress(&b.id, Some(100), None).await.ok()?;
                    page.records
                        .iter()
                        .any(|r| r.dns_name.as_deref() == Some("pypi.org"))
                        .then_some(page)
                },
            )
            .await;
            let pypi = page
                .records
                .iter()
                .find(|r| r.dst_ip == "198.18.0.10" && r.dst_port == Some(80))
                .expect("a record of the flow to pypi.org");
            println!("egress: {pypi:?}");
            assert_eq!(pypi.dns_name.as_deref(), Some("pypi.org"));
            // conntrack counts IP bytes: the 1024-byte body and the 60 bytes of headers the
            // fake server sends, plus 52 bytes of IP and TCP headers per packet.
            // On a loaded host a segment may be sent twice (conntrack counts both): room for
            // one retransmission of the whole response above the 5 %.
            let payload = pypi.bytes_in as f64 - 52.0 * pypi.pkts_in as f64;
            assert!(
                payload > 1084.0 * 0.95 && payload < 1084.0 * 1.05 + 1136.0,
                "{pypi:?}"
            );
            let denied = page
                .records
                .iter()
                .filter(|r| r.dst_ip == "10.99.0.1")
                .count();
            assert!(
                denied >= 1,
                "the refused attempt to the platform is audited: {page:#?}"
            );

            // A VM killed under the worker: the bunker fails and its network goes with it.
            let k = c
                .create_bunker(&tiny(NetworkProfile::Unrestricted, None))
                .await
                .unwrap();
            assert_eq!(k.status, "running", "{:?}", k.failure_reason);
            assert_eq!(bunker_links().len(), 1);
            let qemu = scaibunker_e2e::qemu_processes_for(up.data_dir());
            assert_eq!(qemu.len(), 1, "{qemu:?}");
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(qemu[0].pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            )
            .unwrap();
            within(
                Duration::from_secs(30),
                "the killed bunker's network going",
                || async {
                    (bunker_links().is_empty() && std::fs::read_dir(&ns).unwrap().next().is_none())
                        .then_some(())
                },
            )
            .await;
            c.delete_bunker(&k.id).await.unwrap();

            // A full snapshot of an unrestricted bunker comes back with its network: the
            // restored guest (same address, MAC and gateway) reaches the fake host again.
            let src = c
                .create_bunker(&tiny(NetworkProfile::Unrestricted, None))
                .await
                .unwrap();
            let (code, out) = run(&c, &src.id, "wget -q -O - http://pypi.org/ | wc -c").await;
            assert_eq!((code, out.trim()), (0, "1024"));
            let snap = c
                .snapshot_bunker(
                    &src.id,
                    &scaibunker_api::snapshots::CreateSnapshot {
                        kind: Some(scaibunker_api::snapshots::SnapshotKind::Full),
                        expires_in_s: Some(3600),
                    },
                )
                .await
                .unwrap();
            assert_eq!(snap.status, "ready");
            c.delete_bunker(&src.id).await.unwrap();
            let restored = c
                .create_bunker(&CreateBunker {
                    snapshot_id: Some(snap.id.clone()),
                    // The network is the new bunker's, as asked; the snapshot has none.
                    network_profile: Some(NetworkProfile::Unrestricted),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(restored.status, "running", "{:?}", restored.failure_reason);
            assert_eq!(restored.network_profile, NetworkProfile::Unrestricted);
            let (code, out) = run(&c, &restored.id, "wget -q -O - http://pypi.org/ | wc -c").await;
            assert_eq!(
                (code, out.trim()),
                (0, "1024"),
                "the restored bunker is online"
            );
            c.delete_bunker(&restored.id).await.unwrap();

            // bandwidth_mbit: 2 MB at 4 Mbit/s is 4 s, as the sink sees the bytes arrive.
            let capped = upload_time(&c, &net, NetworkProfile::Unrestricted, Some(4)).await;
            let free = upload_time(&c, &net, NetworkProfile::Unrestricted, None).await;
            println!("2 MB from a TCG guest: capped at 4 Mbit/s {capped:?}, uncapped {free:?}");
            assert!(
                (capped.as_secs_f64() - 4.0).abs() < 0.8,
                "4 Mbit/s: 2 MB took {capped:?}, expected 4 s ± 20 %"
            );
            assert!(free * 2 < capped, "uncapped {free:?} vs capped {capped:?}");
        });
        assert_eq!(
            net.escaped_packets(),
            0,
            "no packet left the fake internet: {}",
            net.escaped_to()
        );
    });
}

#[test]
fn allowlisted_and_registry_bunkers_on_real_vms() {
    sandboxed("allowlisted_and_registry_bunkers_on_real_vms", || {
        require_images(&["tiny.ext4"]).expect("guest images");
        let net = FakeInternet::build();
        let netns_dir = tempfile::tempdir().unwrap();
        let ns = netns_dir.path().display().to_string();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let up = Up::start(UpOptions::with_env(&[
                ("SCAIBUNKER_NETWORKS", "on"),
                ("SCAIBUNKER_DNS_UPSTREAM", "198.18.1.53"),
                ("SCAIBUNKER_NETNS_DIR", &ns),
                ("SCAIBUNKER_REGISTRY_HOSTS", "pypi.org"),
            ]))
            .expect("scaibunker up gets ready");
            let c = up.client();

            let b = c
                .create_bunker(&CreateBunker {
                    network_allowlist: Some(vec!["api.allowed.test".into()]),
                    ..tiny(NetworkProfile::Allowlisted, None)
                })
                .await
                .unwrap();
            assert_eq!(b.status, "running", "{:?}", b.failure_reason);
            assert_eq!(b.network_allowlist, vec!["api.allowed.test".to_owned()]);
            let (code, out) = run(&c, &b.id, "nslookup api.allowed.test").await;
            assert!(code == 0 && out.contains("198.18.0.20"), "{out}");
            let (code, out) = run(&c, &b.id, "wget -q -O - http://api.allowed.test/ | wc -c").await;
            assert_eq!((code, out.trim()), (0, "1024"), "the allowed host");
            let (code, out) = run(&c, &b.id, "nslookup evil.test").await;
            assert!(code != 0 && !out.contains("198.18.0.21"), "{out}");
            assert!(
                !net.dns_log.lock().unwrap().iter().any(|n| n == "evil.test"),
                "a name off the list never goes upstream"
            );
            // A server the guest names itself answers with its resolver's voice.
            let (code, out) = run(&c, &b.id, "nslookup api.allowed.test 198.18.1.54").await;
            assert!(code == 0 && out.contains("198.18.0.20"), "{out}");
            assert!(net.rogue_dns_log.lock().unwrap().is_empty());
            let started = Instant::now();
            let (rc, out) = rc_of(&c, &b.id, "timeout 5 wget -q -O - http://198.18.0.21/").await;
            assert!(
                rc != 0 && !out.contains("xxxx"),
                "a raw address: {rc} {out}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "refused at once, not timed out"
            );
            c.delete_bunker(&b.id).await.unwrap();

            let r = c
                .create_bunker(&tiny(NetworkProfile::Registry, None))
                .await
                .unwrap();
            assert_eq!(r.status, "running", "{:?}", r.failure_reason);
            let (code, out) = run(&c, &r.id, "wget -q -O - http://pypi.org/ | wc -c").await;
            assert_eq!((code, out.trim()), (0, "1024"), "the registry");
            let (rc, out) = rc_of(&c, &r.id, "timeout 5 wget -q -O - http://pypi.org:8080/").await;
            assert!(
                rc != 0 && !out.contains("xxxx"),
                "the registry's address on 8080: {out}"
            );
            let (code, out) = run(&c, &r.id, "nslookup api.allowed.test").await;
            assert!(code != 0 && !out.contains("198.18.0.20"), "{out}");
            c.delete_bunker(&r.id).await.unwrap();
            assert_eq!(net.evil.connections(), 0);
            assert_eq!((net.allowed.connections(), net.pypi.connections()), (1, 1));
            within(Duration::from_secs(20), "the networks going", || async {
                bunker_links().is_empty().then_some(())
            })
            .await;
        });
        assert_eq!(net.escaped_packets(), 0, "escaped: {}", net.escaped_to());
    });
}

#[test]
fn a_transit_bunker_on_a_real_vm_reaches_its_bridge_and_cannot_spoof_there() {
    sandboxed(
        "a_transit_bunker_on_a_real_vm_reaches_its_bridge_and_cannot_spoof_there",
        || {
            require_images(&["tiny.ext4"]).expect("guest images");
            let net = FakeInternet::build();
            let netns_dir = tempfile::tempdir().unwrap();
            let ns = netns_dir.path().display().to_string();
            sh_host(&["ip", "link", "add", "br-lab", "type", "bridge"]);
            sh_host(&["ip", "link", "set", "br-lab", "up"]);
            let peer = bridge_peer(netns_dir.path(), "br-lab");
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let up = Up::start(UpOptions::with_env(&[
                    ("SCAIBUNKER_NETWORKS", "on"),
                    ("SCAIBUNKER_DNS_UPSTREAM", "198.18.1.53"),
                    ("SCAIBUNKER_NETNS_DIR", &ns),
                ]))
                .expect("scaibunker up gets ready");
                let c = up.client();
                let worker = up.workers().await.remove(0);
                let http = reqwest::Client::new();
                let api = format!("{}/v1/modules/scaibunker", up.url());
                let resp = http
                    .post(format!("{api}/bridges"))
                    .bearer_auth(up.key())
                    .json(&serde_json::json!({"name": "br-lab", "worker_id": worker.id}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());

                let nic = |mac: &str, spoof_guard: bool| scaibunker_api::bunkers::Interface {
                    if_name: "eth1".into(),
                    bridge_name: "br-lab".into(),
                    spoof_guard,
                    mac: Some(mac.into()),
                };
                let b = c
                    .create_bunker(&CreateBunker {
                        interfaces: Some(vec![nic("02:5b:00:00:07:01", true)]),
                        ..tiny(NetworkProfile::Transit, None)
                    })
                    .await
                    .unwrap();
                assert_eq!(b.status, "running", "{:?}", b.failure_reason);
                let (code, out) = run(&c, &b.id, "cat /sys/class/net/eth1/address").await;
                assert_eq!((code, out.trim()), (0, "02:5b:00:00:07:01"));
                // eth0 is `unrestricted` as ever.
                let (code, out) = run(&c, &b.id, "wget -q -O - http://pypi.org/ | wc -c").await;
                assert_eq!((code, out.trim()), (0, "1024"));
                let (rc, out) = root_rc(
                    &c,
                    &b.id,
                    "ip addr add 10.50.0.2/24 dev eth1 && ip link set eth1 up && timeout 5 nc 10.50.0.1 7 </dev/null",
                )
                .await;
                assert_eq!(rc, 0, "the guest reaches its bridge peer: {out}");
                assert_eq!(settled(&peer, 1), 1);
                let (rc, out) = root_rc(
                    &c,
                    &b.id,
                    "ip addr del 10.50.0.2/24 dev eth1 && ip addr add 10.50.0.3/24 dev eth1 && timeout 3 nc 10.50.0.1 7 </dev/null",
                )
                .await;
                assert_ne!(rc, 0, "a forged address is dropped: {out}");
                assert_eq!(settled(&peer, 1), 1);
                c.delete_bunker(&b.id).await.unwrap();

                // Without the guard (the admin holds `scaibunker:l2_transparency`): audited.
                let open = c
                    .create_bunker(&CreateBunker {
                        interfaces: Some(vec![nic("02:5b:00:00:07:02", false)]),
                        ..tiny(NetworkProfile::Transit, None)
                    })
                    .await
                    .unwrap();
                assert_eq!(open.status, "running", "{:?}", open.failure_reason);
                let audit: serde_json::Value = http
                    .get(format!("{api}/audit?action=bunker.transit.spoof_guard_disabled"))
                    .bearer_auth(up.key())
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert!(
                    audit.to_string().contains(&open.id),
                    "the unguarded NIC is audited: {audit}"
                );
                c.delete_bunker(&open.id).await.unwrap();
                within(Duration::from_secs(20), "the transit taps going", || async {
                    (!sh_out(&["ip", "-o", "link", "show"]).contains("sbt")).then_some(())
                })
                .await;
            });
            assert_eq!(net.escaped_packets(), 0, "escaped: {}", net.escaped_to());
        },
    );
}

fn sh_host(args: &[&str]) {
    network_sandbox::sh(args);
}

/// Runs `cmd` as root in the guest (configuring a NIC needs it); its exit code and output.
async fn root_rc(c: &scaibunker_sdk::Client, id: &str, cmd: &str) -> (i32, String) {
    let req = ExecRequest {
        command: Some(format!("{cmd}; echo rc=$?")),
        user: Some(scaibunker_api::exec::ExecUser::Root),
        ..Default::default()
    };
    let out = c.exec(id, &req).await.expect("exec");
    let text = format!(
        "{}{}",
        out.stdout.clone().unwrap_or_default(),
        out.stderr.clone().unwrap_or_default()
    );
    let rc = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("rc="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit code in {text:?}"));
    (rc, text)
}

/// How long 2 MB sent by a new bunker's guest take to reach the sink (first to last byte,
/// as the sink counts them).
async fn upload_time(
    c: &scaibunker_sdk::Client,
    net: &FakeInternet,
    profile: NetworkProfile,
    bandwidth_mbit: Option<u64>,
) -> Duration {
    const BYTES: u64 = 2 * 1024 * 1024;
    let b = c
        .create_bunker(&tiny(profile, bandwidth_mbit))
        .await
        .unwrap();
    assert_eq!(b.status, "running", "{:?}", b.failure_reason);
    let before = net.sink.bytes_in();
    let (code, out) = run(
        c,
        &b.id,
        "setsid sh -c 'dd if=/dev/zero bs=65536 count=32 2>/dev/null | nc 198.18.0.30 9000' >/dev/null 2>&1 &",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let first = within(
        Duration::from_secs(30),
        "the first bytes at the sink",
        || async { (net.sink.bytes_in() > before).then(Instant::now) },
    )
    .await;
    within(Duration::from_secs(60), "2 MB at the sink", || async {
        (net.sink.bytes_in() >= before + BYTES).then_some(())
    })
    .await;
    let took = first.elapsed();
    c.delete_bunker(&b.id).await.unwrap();
    took
}

#[tokio::test]
async fn a_worker_without_networks_fails_networked_bunkers_with_the_reason() {
    require_images(&["tiny.ext4"]).expect("guest images");
    // The harness starts `up` with SCAIBUNKER_NETWORKS=off (nothing on the host changes).
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let c = up.client();
    let b = c
        .create_bunker(&tiny(NetworkProfile::Unrestricted, None))
        .await
        .unwrap();
    assert_eq!(b.status, "failed");
    let reason = b.failure_reason.unwrap_or_default();
    assert!(reason.contains("network setup:"), "{reason}");
    assert!(scaibunker_e2e::qemu_processes_for(up.data_dir()).is_empty());
    // Isolated bunkers still run there.
    let iso = up.tiny_bunker().await;
    let (code, out) = run(&c, &iso.id, "echo ok").await;
    assert_eq!((code, out.trim()), (0, "ok"));
}

#[test]
fn a_persistent_unrestricted_bunker_comes_back_online_after_a_restart() {
    sandboxed(
        "a_persistent_unrestricted_bunker_comes_back_online_after_a_restart",
        || {
            require_images(&["tiny.ext4"]).expect("guest images");
            let net = FakeInternet::build();
            let netns_dir = tempfile::tempdir().unwrap();
            let ns = netns_dir.path().display().to_string();
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let mut up = Up::start(UpOptions::with_env(&[
                    ("SCAIBUNKER_NETWORKS", "on"),
                    ("SCAIBUNKER_DNS_UPSTREAM", "198.18.1.53"),
                    ("SCAIBUNKER_NETNS_DIR", &ns),
                    ("WORKER_HEARTBEAT_INTERVAL_S", "1"),
                ]))
                .expect("scaibunker up gets ready");
                let c = up.client();
                let b = c
                    .create_bunker(&CreateBunker {
                        lifecycle_mode: Some(scaibunker_api::bunkers::LifecycleMode::Persistent),
                        ..tiny(NetworkProfile::Unrestricted, None)
                    })
                    .await
                    .unwrap();
                assert_eq!(b.status, "running", "{:?}", b.failure_reason);
                let (code, out) = run(&c, &b.id, "wget -q -O - http://pypi.org/ | wc -c").await;
                assert_eq!((code, out.trim()), (0, "1024"));

                // A planned stop saves it (its VM and network go); the next exec brings it
                // back on the restarted worker with a network of its own again.
                up.restart().expect("`up` stops and starts again");
                let c = up.client();
                assert_eq!(c.bunker(&b.id).await.unwrap().status, "paused");
                within(
                    Duration::from_secs(30),
                    "the saved VM's network going",
                    || async { bunker_links().is_empty().then_some(()) },
                )
                .await;
                let (code, out) = run(&c, &b.id, "wget -q -O - http://pypi.org/ | wc -c").await;
                assert_eq!(
                    (code, out.trim()),
                    (0, "1024"),
                    "online again after the restart"
                );
                let (code, out) =
                    run(&c, &b.id, "wget -q -O - http://10.99.0.1/; echo rc=$?").await;
                assert!(code == 0 && out.contains("No route to host"), "{out}");
                assert_eq!(bunker_links().len(), 1);
                c.delete_bunker(&b.id).await.unwrap();
                within(
                    Duration::from_secs(20),
                    "the network going after delete",
                    || async { bunker_links().is_empty().then_some(()) },
                )
                .await;
                assert_eq!(net.pypi.connections(), 2);
            });
            assert_eq!(
                net.escaped_packets(),
                0,
                "no packet left the fake internet: {}",
                net.escaped_to()
            );
        },
    );
}
