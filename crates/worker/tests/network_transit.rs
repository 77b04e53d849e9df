//! Transit NICs, tier 1 (NETWORK.md §2.7, §3.4): a fake guest on a transit port's real tap
//! and a peer on the same host bridge, inside the test's own network namespace. The spoof
//! guard lets the guest's own MAC and first address through and drops a forged address or
//! MAC before the peer sees it; with the guard off both pass. Needs root.

#![allow(clippy::unwrap_used)]

#[path = "network/sandbox.rs"]
mod network_sandbox;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use network_sandbox::*;
use scaibunker_worker::network::transit::{self, TransitPort};
use scaibunker_worker::network::{Cidr, NetworkConfig, Networks};

const BRIDGE: &str = "br-t1";

fn config(dir: &std::path::Path) -> NetworkConfig {
    NetworkConfig {
        pool: Cidr::parse("10.203.0.0/24").unwrap(),
        netns_dir: dir.join("netns"),
        ..NetworkConfig::with_defaults()
    }
}

fn reaches_peer(guest: &FakeGuest) -> bool {
    guest.run(|| {
        let to: SocketAddr = (BRIDGE_PEER_IP, 7).into();
        TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok()
    })
}

fn ip_in(guest: &FakeGuest, args: &'static str) {
    guest.run(move || {
        let mut all = vec!["ip"];
        all.extend(args.split(' '));
        sh(&all);
    });
}

/// Packets the guard of `port` dropped, over all its rules.
fn dropped(port: &TransitPort) -> u64 {
    let out = sh_out(&[
        "nft",
        "-j",
        "list",
        "table",
        "bridge",
        &format!("{}{}", transit::GUARD_TABLE_PREFIX, port.tap_name()),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .filter(|expr| expr.iter().any(|e| e.get("drop").is_some()))
        .filter_map(|expr| expr.iter().find_map(|e| e["counter"]["packets"].as_u64()))
        .sum()
}

#[test]
fn the_spoof_guard_locks_a_transit_nic_to_its_mac_and_first_address() {
    sandboxed(
        "the_spoof_guard_locks_a_transit_nic_to_its_mac_and_first_address",
        || {
            sh(&["ip", "link", "set", "lo", "up"]);
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let networks = Networks::start(config(dir.path()), None).await.unwrap();
                let mac = [0x02, 0x5b, 0, 0, 1, 2];
                let mut guarded = networks.attach_transit(BRIDGE, mac, true).await.unwrap();
                let hits = bridge_peer(dir.path(), BRIDGE);
                let guest = FakeGuest::plug_as(
                    dir.path(),
                    "guest-t",
                    &guarded.tap().unwrap(),
                    "02:5b:00:00:01:02",
                    "10.50.0.2/24",
                    None,
                );

                // Its own MAC and its first address: through.
                assert!(
                    reaches_peer(&guest),
                    "the legitimate guest reaches its peer"
                );
                assert_eq!(settled(&hits, 1), 1);
                assert_eq!(dropped(&guarded), 0, "nothing of it was dropped");

                // Another address (the first one is locked): dropped before the peer.
                ip_in(&guest, "addr del 10.50.0.2/24 dev eth0");
                ip_in(&guest, "addr add 10.50.0.3/24 dev eth0");
                assert!(!reaches_peer(&guest), "a forged address is dropped");
                let after_ip = dropped(&guarded);
                assert!(after_ip > 0, "the guard counted the forged address");

                // Its address back, but another MAC: dropped.
                ip_in(&guest, "addr del 10.50.0.3/24 dev eth0");
                ip_in(&guest, "addr add 10.50.0.2/24 dev eth0");
                ip_in(&guest, "link set eth0 address 02:5b:00:00:01:09");
                assert!(!reaches_peer(&guest), "a forged MAC is dropped");
                assert!(dropped(&guarded) > after_ip);
                assert_eq!(settled(&hits, 1), 1, "the peer saw none of it");

                // The guarded NIC's MAC cannot be had twice on its bridge.
                let twin = networks.attach_transit(BRIDGE, mac, true).await;
                assert!(
                    twin.is_err(),
                    "a second NIC with the same MAC on the bridge"
                );

                // Without the guard (`spoof_guard: false`, `scaibunker:l2_transparency`),
                // the same forgeries pass.
                let mut open = networks
                    .attach_transit(BRIDGE, [0x02, 0x5b, 0, 0, 1, 3], false)
                    .await
                    .unwrap();
                let free = FakeGuest::plug_as(
                    dir.path(),
                    "guest-free",
                    &open.tap().unwrap(),
                    "02:5b:00:00:01:03",
                    "10.50.0.4/24",
                    None,
                );
                assert!(reaches_peer(&free));
                ip_in(&free, "addr del 10.50.0.4/24 dev eth0");
                ip_in(&free, "addr add 10.50.0.5/24 dev eth0");
                ip_in(&free, "link set eth0 address 02:5b:00:00:01:0a");
                assert!(
                    reaches_peer(&free),
                    "no guard: another address and MAC pass"
                );
                assert_eq!(settled(&hits, 3), 3);

                // Detached: the tap and the table go.
                let name = guarded.tap_name().to_owned();
                guest.remove();
                free.remove();
                guarded.detach().await;
                open.detach().await;
                let links = sh_out(&["ip", "-o", "link", "show"]);
                assert!(!links.contains(&format!("{name}:")), "{links}");
                let tables = sh_out(&["nft", "list", "tables", "bridge"]);
                assert!(!tables.contains(transit::GUARD_TABLE_PREFIX), "{tables}");

                // A crashed worker's ports: swept at the next start.
                let kept = networks.attach_transit(BRIDGE, mac, true).await.unwrap();
                std::mem::forget(kept);
                drop(networks);
                let _again = Networks::start(config(dir.path()), None).await.unwrap();
                let links = sh_out(&["ip", "-o", "link", "show"]);
                assert!(!links.contains(transit::TRANSIT_TAP_PREFIX), "{links}");
                let tables = sh_out(&["nft", "list", "tables", "bridge"]);
                assert!(!tables.contains(transit::GUARD_TABLE_PREFIX), "{tables}");
            });
        },
    );
}
