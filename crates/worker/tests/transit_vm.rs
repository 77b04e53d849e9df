//! Transit on a real TCG microVM (NETWORK.md §2.7, tier 2 for the worker): a bunker with a
//! NIC on a host bridge boots cold with `eth0` as before and `eth1` with the MAC asked for;
//! configured in the guest, `eth1` reaches a peer on the bridge, and a forged address is
//! dropped by the spoof guard before the peer sees it. Needs root; one VM.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "network/sandbox.rs"]
mod network_sandbox;

use common::{TestWorker, require_artefacts, vm_slot};
use network_sandbox::*;
use scaibunker_proto::worker::{
    BootSource, CreateVm, NetworkProfile, NetworkSpec, TransitInterface, VmInfo,
};

fn stdout(r: &scaibunker_proto::worker::ExecResult) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&r.stdout_b64)
        .expect("b64");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The shell's last `rc=N` line.
fn rc(out: &scaibunker_proto::worker::ExecResult) -> i32 {
    let text = stdout(out);
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("rc="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit code in {text:?}"))
}

#[test]
fn a_transit_bunker_reaches_its_bridge_peer_and_cannot_spoof_there() {
    sandboxed(
        "a_transit_bunker_reaches_its_bridge_peer_and_cannot_spoof_there",
        || {
            sh(&["ip", "link", "set", "lo", "up"]);
            let images = require_artefacts(&["tiny.ext4"]);
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _slot = vm_slot().await;
                let netns_dir = dir.path().join("netns");
                let w = TestWorker::start_with(&images, |c| {
                    c.networks = true;
                    c.egress_audit = false;
                    c.network.netns_dir = netns_dir.clone();
                    c.network.dns_upstreams = Vec::new();
                })
                .await;
                sh(&["ip", "link", "add", "br-lab", "type", "bridge"]);
                sh(&["ip", "link", "set", "br-lab", "up"]);
                let hits = bridge_peer(dir.path(), "br-lab");
                let req = CreateVm {
                    bunker_id: "bnk_transit".into(),
                    image_sha256: "tiny".into(),
                    cpu_millicores: 1000,
                    memory_mb: 256,
                    disk_mb: 1024,
                    hostname: "transit".into(),
                    env_vars: Default::default(),
                    image_pull: None,
                    snapshot: None,
                    tenant_id: "tnt_a".into(),
                    network: NetworkSpec {
                        profile: NetworkProfile::Transit,
                        bandwidth_mbit: None,
                        allowlist: Vec::new(),
                        interfaces: vec![TransitInterface {
                            bridge: "br-lab".into(),
                            mac: Some("02:5b:00:00:07:01".into()),
                            spoof_guard: true,
                        }],
                    },
                };
                let resp = w.post("/bunkers").json(&req).send().await.unwrap();
                let status = resp.status();
                let body = resp.text().await.unwrap();
                assert!(status.is_success(), "{status} {body}");
                let info: VmInfo = serde_json::from_str(&body).unwrap();
                assert_eq!(info.boot_source, BootSource::Cold);

                let out = w
                    .exec_sh(
                        "bnk_transit",
                        "cat /sys/class/net/eth0/address /sys/class/net/eth1/address",
                    )
                    .await;
                assert_eq!(
                    stdout(&out).trim(),
                    "02:5b:00:00:00:02\n02:5b:00:00:07:01",
                    "eth0 is the bunker's own NIC, eth1 the transit one"
                );
                let out = w
                    .exec_sh(
                        "bnk_transit",
                        "ip addr add 10.50.0.2/24 dev eth1 && ip link set eth1 up && \
                         timeout 5 nc 10.50.0.1 7 </dev/null; echo rc=$?",
                    )
                    .await;
                assert_eq!(rc(&out), 0, "{out:?}");
                assert_eq!(settled(&hits, 1), 1, "the peer saw the guest");

                let out = w
                    .exec_sh(
                        "bnk_transit",
                        "ip addr del 10.50.0.2/24 dev eth1 && ip addr add 10.50.0.3/24 dev eth1 && \
                         timeout 3 nc 10.50.0.1 7 </dev/null; echo rc=$?",
                    )
                    .await;
                assert_ne!(rc(&out), 0, "a forged address is dropped: {out:?}");
                assert_eq!(settled(&hits, 1), 1, "the peer saw nothing forged");

                w.delete_bunker("bnk_transit").await;
                let links = sh_out(&["ip", "-o", "link", "show"]);
                assert!(!links.contains("sbt"), "the transit tap went: {links}");
                let tables = sh_out(&["nft", "list", "tables", "bridge"]);
                assert!(!tables.contains("sg_"), "the guard went: {tables}");
                w.shutdown().await;
            });
        },
    );
}
