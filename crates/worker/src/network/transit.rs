//! Transit NICs (NETWORK.md §2.7): a bunker's extra interfaces on a host bridge, each a tap
//! in the host's namespace made a port of the bridge, its descriptor given to QEMU, behind a
//! spoof guard unless the bunker may go without one (`scaibunker:l2_transparency`).
//!
//! The spoof guard is one table `bridge sg_<port>` per port, hooked at bridge `prerouting`,
//! judging only frames that come from the guest (`iifname <port>`):
//!
//! 1. the source MAC must be the NIC's (given, or a generated locally administered one);
//! 2. 802.1Q/802.1ad tags, IPv6 (out of scope in v1, router adverts with it) and DHCP
//!    server replies (UDP source port 67) are dropped;
//! 3. ARP must carry the NIC's MAC; the first non-zero sender address of an ARP or IPv4
//!    frame is learnt into a one-element set and then locked: any other source is dropped
//!    (libvirt nwfilter's `clean-traffic` with learning). An unconfigured guest may still
//!    ask for DHCP (`0.0.0.0:68` → `:67`) and probe (ARP from `0.0.0.0`);
//! 4. RARP passes (QEMU announces a restored NIC with it); anything else is dropped.
//!
//! With the guard off the table only counts what the port sends. Deleting the port's tap
//! (its descriptor closed, the port detached) and its table removes everything; the
//! worker's start sweeps `sbt*` taps and `sg_*` tables a crash left.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

use super::links::{LinkError, Links};
use super::rules::{self, RulesError};
use super::tap;

/// Prefix of transit taps in the host (`sbt<n>`).
pub const TRANSIT_TAP_PREFIX: &str = "sbt";
/// Prefix of the spoof guards' tables (`bridge sg_<tap>`).
pub const GUARD_TABLE_PREFIX: &str = "sg_";

#[derive(Debug, thiserror::Error)]
pub enum TransitError {
    #[error("the transit tap")]
    Tap(#[source] std::io::Error),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the spoof guard")]
    Guard(#[from] RulesError),
    #[error("a setup task failed")]
    Task,
    #[error("MAC {0} is already on bridge `{1}`")]
    MacTaken(String, String),
}

/// A locally administered unicast MAC for a NIC that was given none: `02:5b` and 32 bits of
/// the system's randomness.
pub fn generated_mac() -> [u8; 6] {
    use std::io::Read as _;
    let mut mac = [0x02, 0x5b, 0, 0, 0, 0];
    let mut seed = [0u8; 4];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    if read.is_err() {
        // No randomness: still unique within this worker.
        static NEXT: AtomicU32 = AtomicU32::new(1);
        seed = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    }
    mac[2..].copy_from_slice(&seed);
    mac
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`; a guest NIC's MAC must be unicast (even first octet).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

fn m(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn field(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn counted_drop() -> [Value; 2] {
    [json!({"counter": null}), json!({"drop": null})]
}

/// The spoof guard of the port `port` for a NIC with `mac`; with `guard` false, a table
/// that only counts.
pub fn guard_ruleset(port: &str, mac: [u8; 6], guard: bool) -> Value {
    let t = format!("{GUARD_TABLE_PREFIX}{port}");
    let mac = mac_text(mac);
    let table = json!({"table": {"family": "bridge", "name": t}});
    let rule = |expr: Vec<Value>| json!({"add": {"rule": {"family": "bridge", "table": t, "chain": "pre", "expr": expr}}});
    let with_drop = |mut expr: Vec<Value>| {
        expr.extend(counted_drop());
        rule(expr)
    };
    let mut cmds = vec![
        // Add, delete, add: a table left by an earlier life of this port never survives.
        json!({"add": table}),
        json!({"delete": table}),
        json!({"add": table}),
        json!({"add": {"set": {"family": "bridge", "table": t, "name": "ip4", "type": "ipv4_addr", "size": 1}}}),
        json!({"add": {"chain": {
            "family": "bridge", "table": t, "name": "pre",
            "type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept",
        }}}),
        rule(vec![
            m("!=", json!({"meta": {"key": "iifname"}}), json!(port)),
            json!({"accept": null}),
        ]),
    ];
    if !guard {
        cmds.push(rule(vec![
            json!({"counter": null}),
            json!({"accept": null}),
        ]));
        return json!({"nftables": cmds});
    }
    let ether_type = || field("ether", "type");
    cmds.extend([
        with_drop(vec![m("!=", field("ether", "saddr"), json!(mac))]),
        with_drop(vec![m(
            "==",
            ether_type(),
            json!({"set": ["8021q", "8021ad"]}),
        )]),
        // RARP: QEMU's announcement of a restored NIC.
        rule(vec![
            m("==", ether_type(), json!(0x8035)),
            json!({"accept": null}),
        ]),
        with_drop(vec![m("==", ether_type(), json!("ip6"))]),
        with_drop(vec![m("==", field("udp", "sport"), json!(67))]),
        with_drop(vec![m("!=", field("arp", "saddr ether"), json!(mac))]),
        // Learn the first sender address (a full set makes the `add` fail, so the rule
        // stops there), then lock it.
        rule(vec![
            m("!=", field("arp", "saddr ip"), json!("0.0.0.0")),
            json!({"set": {"op": "add", "elem": field("arp", "saddr ip"), "set": "@ip4"}}),
        ]),
        with_drop(vec![
            m("!=", field("arp", "saddr ip"), json!("0.0.0.0")),
            m("!=", field("arp", "saddr ip"), json!("@ip4")),
        ]),
        rule(vec![
            m("==", ether_type(), json!("arp")),
            json!({"accept": null}),
        ]),
        rule(vec![
            m("==", field("ip", "saddr"), json!("0.0.0.0")),
            m("==", field("udp", "sport"), json!(68)),
            m("==", field("udp", "dport"), json!(67)),
            json!({"accept": null}),
        ]),
        rule(vec![
            json!({"set": {"op": "add", "elem": field("ip", "saddr"), "set": "@ip4"}}),
        ]),
        with_drop(vec![m("!=", field("ip", "saddr"), json!("@ip4"))]),
        rule(vec![
            m("==", ether_type(), json!("ip")),
            json!({"accept": null}),
        ]),
        with_drop(vec![]),
    ]);
    json!({"nftables": cmds})
}

/// Deletes the guard table of `port`, if there is one.
pub fn guard_cleanup(port: &str) -> Value {
    let table =
        json!({"table": {"family": "bridge", "name": format!("{GUARD_TABLE_PREFIX}{port}")}});
    json!({"nftables": [{"add": table}, {"delete": table}]})
}

/// Removes what a crashed worker left: every `sbt*` tap and every `sg_*` guard table.
pub async fn sweep(links: &Links) -> Result<(), TransitError> {
    for name in links.names().await? {
        if name.starts_with(TRANSIT_TAP_PREFIX) {
            links.delete(&name).await?;
        }
    }
    let out = tokio::process::Command::new("nft")
        .args(["-j", "list", "tables", "bridge"])
        .output()
        .await
        .map_err(|source| RulesError::Spawn {
            program: "nft",
            source,
        })?;
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let tables = listed["nftables"].as_array().cloned().unwrap_or_default();
    for t in tables {
        if let Some(name) = t["table"]["name"].as_str()
            && let Some(port) = name.strip_prefix(GUARD_TABLE_PREFIX)
        {
            rules::apply(&guard_cleanup(port), None).await?;
        }
    }
    Ok(())
}

/// The (bridge, MAC) pairs this worker's transit NICs hold: two NICs with one MAC on one
/// bridge would let a guest take its neighbour's frames, whatever each guard pins.
#[derive(Debug, Default)]
pub struct Claims(std::sync::Mutex<std::collections::HashSet<(String, [u8; 6])>>);

impl Claims {
    fn take(&self, bridge: &str, mac: [u8; 6]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((bridge.to_owned(), mac))
    }

    fn give_back(&self, bridge: &str, mac: [u8; 6]) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(bridge.to_owned(), mac));
    }
}

/// One transit NIC of a running bunker.
pub struct TransitPort {
    links: Links,
    tap_name: String,
    mac: [u8; 6],
    tap: Option<Arc<OwnedFd>>,
    claim: Option<(Arc<Claims>, String)>,
}

impl std::fmt::Debug for TransitPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransitPort")
            .field("tap", &self.tap_name)
            .field("mac", &mac_text(self.mac))
            .finish_non_exhaustive()
    }
}

static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

impl TransitPort {
    /// Makes a tap on `bridge` (made if missing) for a NIC with `mac`, behind the spoof
    /// guard unless `guard` is false; nothing is left behind on failure.
    pub async fn attach(
        links: &Links,
        claims: &Arc<Claims>,
        bridge: &str,
        mac: [u8; 6],
        guard: bool,
    ) -> Result<Self, TransitError> {
        if !claims.take(bridge, mac) {
            return Err(TransitError::MacTaken(mac_text(mac), bridge.to_owned()));
        }
        let tap_name = format!(
            "{TRANSIT_TAP_PREFIX}{}",
            NEXT_PORT.fetch_add(1, Ordering::Relaxed)
        );
        let mut port = Self {
            links: links.clone(),
            tap_name: tap_name.clone(),
            mac,
            tap: None,
            claim: Some((Arc::clone(claims), bridge.to_owned())),
        };
        match port.build(bridge, guard).await {
            Ok(()) => Ok(port),
            Err(e) => {
                port.detach().await;
                Err(e)
            }
        }
    }

    async fn build(&mut self, bridge: &str, guard: bool) -> Result<(), TransitError> {
        // The guard first: the port carries nothing before it is judged.
        rules::apply(&guard_ruleset(&self.tap_name, self.mac, guard), None).await?;
        let name = self.tap_name.clone();
        let tap = tokio::task::spawn_blocking(move || tap::open(&name))
            .await
            .map_err(|_| TransitError::Task)?
            .map_err(TransitError::Tap)?;
        self.tap = Some(Arc::new(tap));
        self.links.ensure_bridge(bridge).await?;
        self.links.set_master(&self.tap_name, bridge).await?;
        self.links.up(&self.tap_name).await?;
        Ok(())
    }

    /// The tap's descriptor, for QEMU.
    pub fn tap(&self) -> Option<Arc<OwnedFd>> {
        self.tap.clone()
    }

    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Removes the tap (once QEMU's descriptor is closed too) and the guard.
    pub async fn detach(&mut self) {
        self.tap.take();
        if let Some((claims, bridge)) = self.claim.take() {
            claims.give_back(&bridge, self.mac);
        }
        if let Err(e) = self.links.delete(&self.tap_name).await {
            tracing::warn!(tap = self.tap_name, error = %e, "delete a transit tap");
        }
        if let Err(e) = rules::apply(&guard_cleanup(&self.tap_name), None).await {
            tracing::warn!(tap = self.tap_name, error = %e, "delete a spoof guard");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_unicast_only_and_generated_ones_are_local() {
        assert_eq!(parse_mac("02:5b:00:00:01:02"), Some([2, 0x5b, 0, 0, 1, 2]));
        for bad in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "02:5b:00:00:01",
            "zz:5b:00:00:01:02",
            "02:5b:00:00:01:02:03",
            "2:5b:0:0:1:2",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let g = generated_mac();
        assert_eq!(g[0], 0x02, "locally administered, unicast");
        assert_eq!(parse_mac(&mac_text(g)), Some(g));
    }

    #[test]
    fn nft_takes_the_guard_on_and_off() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test runs nft in check mode, which needs root"
        );
        for guard in [true, false] {
            crate::network::rules::tests::nft_accepts(&guard_ruleset(
                "sbt0",
                [2, 0x5b, 0, 0, 1, 2],
                guard,
            ));
        }
    }
}
