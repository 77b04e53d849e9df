//! The nftables rulesets of bunker networks (NETWORK.md §2.2), built as libnftables JSON and
//! applied with `nft -j -f -` (one exec per ruleset; nothing is a shell string, and no value
//! in them comes from a tenant).
//!
//! - [`bunker_ruleset`]: the table `inet bk` inside a bunker's namespace, written once (the
//!   profile is immutable). `input` drops all but loopback, replies, and DNS from the guest
//!   to its resolver; `forward` lets the guest out of `up0` except to the deny set (logged to
//!   NFLOG group [`DENY_LOG_GROUP`](super::audit::DENY_LOG_GROUP), rate-limited, then rejected at once so nothing hangs);
//!   nothing comes in but replies, and those only to the guest's tap; no IPv6; `postrouting` SNATs the guest to the slot's
//!   address. A name-filtered profile ([`PinRules`]) changes three things: every DNS
//!   packet of the guest, whatever server it names, is redirected to its resolver
//!   (`prerouting`); DNS over TLS (853) is reset; and the guest may open only TCP flows to
//!   addresses in the set `pin4` (on the profile's ports), which its resolver fills
//!   ([`super::pins`]) and each new flow renews, and those only through the SNI/Host peek
//!   ([`super::peek`], redirected in `prerouting`); everything else is logged and rejected
//!   at once.
//! - [`host_ruleset`]: the table `inet scaibunker` in the host namespace: nothing from a
//!   bunker's veth reaches the host itself or another bunker's veth, only replies go back
//!   in, and the pool is masqueraded out of whatever interface routes the destination. It is
//!   rewritten whole at start (add, delete, add: a stale table from an earlier run never
//!   survives).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use super::addr::{Cidr, DenySet, GATEWAY_IP, GUEST_IP, HOST_LINK_PREFIX, TAP_NAME, UPLINK_NAME};
use super::peek::PEEK_PORT;

use super::audit::{DENY_LOG_GROUP, DENY_LOG_PREFIX};
/// Denied attempts logged per second per bunker at most (the audit's rate limit).
pub const DENY_LOG_PER_SECOND: u32 = 20;
/// The bunker table's name.
pub const BUNKER_TABLE: &str = "bk";
/// The host table's name.
pub const HOST_TABLE: &str = "scaibunker";

const NFT_BINARY: &str = "nft";
const NSENTER_BINARY: &str = "nsenter";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("spawn {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused the ruleset ({status}): {stderr}")]
    Refused { status: String, stderr: String },
}

fn m(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn not(left: Value, right: Value) -> Value {
    json!({"match": {"op": "!=", "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn ct_state_in(states: &[&str]) -> Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": states}})
}

fn accept() -> Value {
    json!({"accept": null})
}

fn drop() -> Value {
    json!({"drop": null})
}

fn reject() -> Value {
    json!({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
}

fn reject_tcp_reset() -> Value {
    json!({"reject": {"type": "tcp reset"}})
}

fn table(name: &str) -> Value {
    json!({"table": {"family": "inet", "name": name}})
}

fn chain(table: &str, name: &str, kind: &str, hook: &str, prio: i32, policy: &str) -> Value {
    json!({"add": {"chain": {
        "family": "inet", "table": table, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": policy,
    }}})
}

fn rule(table: &str, chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": table, "chain": chain, "expr": expr}}})
}

/// The set of pinned addresses in a name-filtered bunker's table.
pub const PIN_SET: &str = "pin4";

/// What a name-filtered profile adds to the bunker table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRules {
    /// The TCP ports a pinned address may be reached on; `None`: any.
    pub ports: Option<Vec<u16>>,
    /// What a new flow renews its address's pin to.
    pub renewal: std::time::Duration,
}

/// The `inet bk` table of a bunker whose guest may leave through `up0` (as `uplink_ip`)
/// except to `deny` — with `pins`, only to pinned addresses — with at most `max_flows`
/// connections open at once (the host's conntrack table is shared by every bunker: one
/// guest must not fill it).
pub fn bunker_ruleset(
    deny: &DenySet,
    uplink_ip: Ipv4Addr,
    max_flows: u32,
    pins: Option<&PinRules>,
) -> Value {
    let t = BUNKER_TABLE;
    let elems: Vec<Value> = deny
        .ranges()
        .map(|(a, b)| {
            if a == b {
                json!(a.to_string())
            } else {
                json!({"range": [a.to_string(), b.to_string()]})
            }
        })
        .collect();
    let from_guest = || m(meta("iifname"), json!(TAP_NAME));
    let to_uplink = || m(meta("oifname"), json!(UPLINK_NAME));
    let mut cmds = vec![json!({"add": table(t)})];
    let mut set = json!({"family": "inet", "table": t, "name": "deny4", "type": "ipv4_addr", "flags": ["interval"]});
    if !elems.is_empty() {
        set["elem"] = json!(elems);
    }
    cmds.push(json!({"add": {"set": set}}));
    if pins.is_some() {
        cmds.push(json!({"add": {"set": {
            "family": "inet", "table": t, "name": PIN_SET, "type": "ipv4_addr",
            "flags": ["timeout"], "size": super::resolver::MAX_PINS,
        }}}));
        // Whatever server the guest names, its DNS goes to its own resolver.
        cmds.push(chain(t, "prerouting", "nat", "prerouting", -100, "accept"));
        for l4 in ["udp", "tcp"] {
            cmds.push(rule(
                t,
                "prerouting",
                vec![
                    from_guest(),
                    m(payload(l4, "dport"), json!(53)),
                    json!({"redirect": {"port": 53}}),
                ],
            ));
        }
    }
    if let Some(pins) = pins {
        // A new TCP flow to a pinned address (on the profile's ports; DNS over TLS goes on
        // to be reset in `forward`) renews the pin and goes to the SNI/Host peek, the only
        // way out there is.
        let mut pinned = vec![
            from_guest(),
            m(payload("ip", "daddr"), json!(format!("@{PIN_SET}"))),
            m(meta("l4proto"), json!("tcp")),
        ];
        if let Some(ports) = &pins.ports {
            pinned.push(m(payload("tcp", "dport"), json!({"set": ports})));
        }
        pinned.push(not(payload("tcp", "dport"), json!(853)));
        pinned.push(ct_state_in(&["new"]));
        pinned.push(json!({"set": {
            "op": "update",
            "elem": {"elem": {
                "val": payload("ip", "daddr"),
                "timeout": pins.renewal.as_secs().max(1),
            }},
            "set": format!("@{PIN_SET}"),
        }}));
        pinned.push(json!({"redirect": {"port": PEEK_PORT}}));
        cmds.push(rule(t, "prerouting", pinned));
    }
    cmds.push(chain(t, "input", "filter", "input", 0, "drop"));
    cmds.push(rule(
        t,
        "input",
        vec![m(meta("iifname"), json!("lo")), accept()],
    ));
    cmds.push(rule(
        t,
        "input",
        vec![ct_state_in(&["established", "related"]), accept()],
    ));
    // From the guest to its gateway: DNS, and with pins the peek proxy, for flows
    // redirected to it only (not a port the guest can name).
    let to_gateway = |l4: &str, port: u16| {
        vec![
            from_guest(),
            m(payload("ip", "saddr"), json!(GUEST_IP.to_string())),
            m(payload("ip", "daddr"), json!(GATEWAY_IP.to_string())),
            m(payload(l4, "dport"), json!(port)),
        ]
    };
    // What the guest opens to its gateway (DNS, and the peek's redirected flows, which never
    // pass `forward`) counts against the same cap: no flood of half-open flows to a pinned
    // address fills the host's conntrack table.
    cmds.push(rule(
        t,
        "input",
        vec![
            from_guest(),
            ct_state_in(&["new"]),
            json!({"ct count": {"val": max_flows, "inv": true}}),
            reject(),
        ],
    ));
    for l4 in ["udp", "tcp"] {
        let mut dns = to_gateway(l4, 53);
        dns.push(accept());
        cmds.push(rule(t, "input", dns));
    }
    if pins.is_some() {
        let mut peek = to_gateway("tcp", PEEK_PORT);
        peek.push(
            json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
        );
        peek.push(accept());
        cmds.push(rule(t, "input", peek));
    }
    cmds.push(chain(t, "forward", "filter", "forward", 0, "drop"));
    cmds.push(rule(
        t,
        "forward",
        vec![m(meta("nfproto"), json!("ipv6")), drop()],
    ));
    // From the uplink only to the guest's tap: once the VM (and so the tap) is gone, replies
    // still in flight for the guest must not be routed back out of `up0`.
    cmds.push(rule(
        t,
        "forward",
        vec![
            m(meta("iifname"), json!(UPLINK_NAME)),
            not(meta("oifname"), json!(TAP_NAME)),
            drop(),
        ],
    ));
    cmds.push(rule(
        t,
        "forward",
        vec![ct_state_in(&["established", "related"]), accept()],
    ));
    // Only the guest's own address leaves: a spoofed source is dropped before NAT.
    cmds.push(rule(
        t,
        "forward",
        vec![
            from_guest(),
            not(payload("ip", "saddr"), json!(GUEST_IP.to_string())),
            drop(),
        ],
    ));
    cmds.push(rule(
        t,
        "forward",
        vec![
            from_guest(),
            to_uplink(),
            m(payload("ip", "daddr"), json!("@deny4")),
            json!({"limit": {"rate": DENY_LOG_PER_SECOND, "per": "second"}}),
            json!({"log": {"group": DENY_LOG_GROUP, "prefix": DENY_LOG_PREFIX}}),
            reject(),
        ],
    ));
    cmds.push(rule(
        t,
        "forward",
        vec![
            from_guest(),
            to_uplink(),
            m(payload("ip", "daddr"), json!("@deny4")),
            reject(),
        ],
    ));
    cmds.push(rule(
        t,
        "forward",
        vec![
            from_guest(),
            ct_state_in(&["new"]),
            json!({"ct count": {"val": max_flows, "inv": true}}),
            reject(),
        ],
    ));
    match pins {
        None => cmds.push(rule(
            t,
            "forward",
            vec![from_guest(), to_uplink(), accept()],
        )),
        Some(_) => {
            let logged = || {
                vec![
                    json!({"limit": {"rate": DENY_LOG_PER_SECOND, "per": "second"}}),
                    json!({"log": {"group": DENY_LOG_GROUP, "prefix": DENY_LOG_PREFIX}}),
                ]
            };
            // DNS over TLS would go around the resolver.
            let dot = || vec![from_guest(), m(payload("tcp", "dport"), json!(853))];
            let mut logged_dot = dot();
            logged_dot.extend(logged());
            logged_dot.push(reject_tcp_reset());
            cmds.push(rule(t, "forward", logged_dot));
            let mut plain_dot = dot();
            plain_dot.push(reject_tcp_reset());
            cmds.push(rule(t, "forward", plain_dot));
            let mut denied = vec![from_guest()];
            denied.extend(logged());
            denied.push(reject());
            cmds.push(rule(t, "forward", denied));
            cmds.push(rule(t, "forward", vec![from_guest(), reject()]));
        }
    }
    cmds.push(chain(t, "postrouting", "nat", "postrouting", 100, "accept"));
    cmds.push(rule(
        t,
        "postrouting",
        vec![
            to_uplink(),
            m(payload("ip", "saddr"), json!(GUEST_IP.to_string())),
            json!({"snat": {"family": "ip", "addr": uplink_ip.to_string()}}),
        ],
    ));
    json!({"nftables": cmds})
}

/// The host's `inet scaibunker` table for bunkers whose uplinks come from `pool`.
pub fn host_ruleset(pool: &Cidr) -> Value {
    let t = HOST_TABLE;
    let bunker_link = format!("{HOST_LINK_PREFIX}*");
    let from_bunker = || m(meta("iifname"), json!(bunker_link));
    let to_bunker = || m(meta("oifname"), json!(bunker_link));
    let cmds = vec![
        json!({"add": table(t)}),
        json!({"delete": table(t)}),
        json!({"add": table(t)}),
        // Ahead of other tables' filters (priority -10), so no other accept lets a bunker in.
        chain(t, "input", "filter", "input", -10, "accept"),
        rule(t, "input", vec![from_bunker(), drop()]),
        chain(t, "forward", "filter", "forward", -10, "accept"),
        rule(t, "forward", vec![from_bunker(), to_bunker(), drop()]),
        rule(
            t,
            "forward",
            vec![
                to_bunker(),
                ct_state_in(&["established", "related"]),
                accept(),
            ],
        ),
        rule(t, "forward", vec![to_bunker(), drop()]),
        // Replies for a bunker whose veth is gone (its flows outlive it in conntrack) are
        // un-NATed to a pool address with no route but the default one: they die here
        // rather than leave through the uplink.
        rule(
            t,
            "forward",
            vec![
                m(
                    payload("ip", "daddr"),
                    json!({"prefix": {"addr": pool.addr().to_string(), "len": pool.prefix()}}),
                ),
                drop(),
            ],
        ),
        rule(t, "forward", vec![from_bunker(), accept()]),
        chain(t, "postrouting", "nat", "postrouting", 100, "accept"),
        rule(
            t,
            "postrouting",
            vec![
                m(
                    payload("ip", "saddr"),
                    json!({"prefix": {"addr": pool.addr().to_string(), "len": pool.prefix()}}),
                ),
                not(meta("oifname"), json!(bunker_link)),
                json!({"masquerade": null}),
            ],
        ),
    ];
    json!({"nftables": cmds})
}

/// Deletes the host table (a worker that stops leaves no rule behind).
pub fn host_cleanup() -> Value {
    json!({"nftables": [{"add": table(HOST_TABLE)}, {"delete": table(HOST_TABLE)}]})
}

/// Applies `ruleset` with `nft -j -f -`, inside the namespace at `netns` (through
/// `nsenter`) or in the worker's own.
pub async fn apply(ruleset: &Value, netns: Option<&Path>) -> Result<(), RulesError> {
    let mut command = match netns {
        Some(path) => {
            let mut c = tokio::process::Command::new(NSENTER_BINARY);
            c.arg(format!("--net={}", path.display()))
                .arg("--")
                .arg(NFT_BINARY);
            c
        }
        None => tokio::process::Command::new(NFT_BINARY),
    };
    let program = if netns.is_some() {
        NSENTER_BINARY
    } else {
        NFT_BINARY
    };
    let mut child = command
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RulesError::Spawn { program, source })?;
    let body = serde_json::to_vec(ruleset).expect("a ruleset always serialises");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&body)
            .await
            .map_err(|source| RulesError::Spawn { program, source })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| RulesError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(RulesError::Refused {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::network::addr::DEFAULT_DENY;

    fn deny() -> DenySet {
        let d: Vec<Cidr> = DEFAULT_DENY
            .iter()
            .map(|c| Cidr::parse(c).unwrap())
            .collect();
        DenySet::new(&d, &[])
    }

    #[test]
    fn the_bunker_table_denies_before_it_accepts_and_snats_the_guest() {
        let r = bunker_ruleset(&deny(), "10.203.0.1".parse().unwrap(), 4096, None);
        let text = r.to_string();
        let reject = text.find("admin-prohibited").unwrap();
        let last_accept = text.rfind(r#"{"accept":null}"#).unwrap();
        assert!(
            reject < last_accept,
            "the deny rules come before the accept"
        );
        assert!(
            text.contains(r#""snat":{"addr":"10.203.0.1","family":"ip"}"#),
            "{text}"
        );
        assert!(text.contains(r#""range":["10.0.0.0","10.255.255.255"]"#));
    }

    #[test]
    fn nft_takes_both_rulesets() {
        if !rustix::process::geteuid().is_root() {
            panic!("this test runs nft in check mode, which needs root");
        }
        let pool = Cidr::parse("10.203.0.0/16").unwrap();
        let pins = PinRules {
            ports: Some(vec![80, 443]),
            renewal: std::time::Duration::from_secs(3900),
        };
        for r in [
            bunker_ruleset(&deny(), "10.203.0.1".parse().unwrap(), 4096, None),
            bunker_ruleset(&deny(), "10.203.0.1".parse().unwrap(), 4096, Some(&pins)),
            host_ruleset(&pool),
        ] {
            nft_accepts(&r);
        }
    }

    /// Asserts that `nft` takes `ruleset` in check mode (nothing is applied).
    pub(crate) fn nft_accepts(ruleset: &Value) {
        let out = std::process::Command::new(NFT_BINARY)
            .args(["-c", "-j", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(ruleset.to_string().as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
