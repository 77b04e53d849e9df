//! Bunker networks (DESIGN.md §9, NETWORK.md §2): a network namespace per bunker with the
//! guest's tap inside and a veth to the host, nftables rules per profile, a resolver, the
//! egress audit and a bandwidth cap.
//!
//! - `isolated` has no namespace and no host side at all: QEMU's NIC sits on a hub port
//!   with nothing else on it ([`Nic::Unplugged`]), so no route out can exist, and the agent
//!   channel (virtio-serial) is untouched. The NIC stays so every VM has the same device
//!   model and one template snapshot serves every profile.
//! - `unrestricted`: [`Networks::setup`] runs, in order and undone on failure:
//!   1. a slot `k` of the pool and its `/31` (host end, namespace end);
//!   2. the namespace, held at `<netns_dir>/<bunker_id>` ([`netns`]);
//!   3. the veth `sbk<k>` ↔ `sbu<k>` in the host, `sbu<k>` moved into the namespace, the host
//!      end addressed and up ([`links`]);
//!   4. inside: IPv6 off, forwarding on, the tap `gst0` made ([`tap`]), addressed
//!      `169.254.0.1/30` with its fixed MAC, `sbu<k>` renamed `up0`, addressed, the default
//!      route through the host end, and the resolver's sockets bound on `169.254.0.1:53`;
//!   5. the table `inet bk` ([`rules`]), the `tbf` qdisc for `bandwidth_mbit` ([`shaping`]),
//!      the resolver task ([`resolver`]).
//! - [`BunkerNetwork::teardown`] stops the resolver, deletes the host end (the veth pair
//!   goes with it) and the namespace handle; the kernel frees the namespace, its tap,
//!   rules, conntrack entries and qdiscs once QEMU's tap descriptor closes.
//! - [`Networks::start`] sweeps what a previous run left (every handle in the directory,
//!   every `sbk*`/`sbu*` link) and rewrites the host table `inet scaibunker` from scratch.
//!
//! Invariant: every socket that speaks to a guest is made inside that guest's namespace,
//! so the socket a packet arrives on is the bunker's identity; nothing from a bunker reaches
//! the host's own addresses, another bunker, or the deny set.

pub mod addr;
pub mod audit;
mod links;
pub mod netns;
pub mod peek;
mod pins;
pub mod policy;
pub mod resolver;
pub mod rules;
mod shaping;
pub mod tap;
pub mod transit;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use scaibunker_proto::worker::{NetworkProfile, NetworkSpec};

use audit::{Audit, AuditContext, AuditError, AuditHandle, BatchLimits, BatchSink};

pub use addr::{Cidr, DenySet};
use addr::{
    GATEWAY_IP, GUEST_PREFIX, HOST_LINK_PREFIX, PEER_LINK_PREFIX, TAP_MAC, TAP_NAME, UPLINK_NAME,
};
use links::{LinkError, Links};
use netns::NetnsError;
pub use policy::NamePolicy;
use resolver::{Filter, Pins, Resolver};
pub use resolver::{NameTable, PinLease};

/// How long a stopping bunker's audit may take to put its last batches.
const AUDIT_FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
use rules::RulesError;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Where namespace handles live by default.
pub const DEFAULT_NETNS_DIR: &str = "/run/scaibunker/netns";

/// The worker's network settings.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// `SCAIBUNKER_NET_POOL`: the uplink `/31`s ([`addr::DEFAULT_POOL`]).
    pub pool: Cidr,
    /// `SCAIBUNKER_EGRESS_DENY`: added to the default deny set.
    pub deny: Vec<Cidr>,
    /// `SCAIBUNKER_EGRESS_ALLOW_PRIVATE`: taken out of the deny set (a private mirror).
    pub allow_private: Vec<Cidr>,
    /// `SCAIBUNKER_DNS_UPSTREAM`, or the host's `/etc/resolv.conf` name servers.
    pub dns_upstreams: Vec<SocketAddr>,
    /// `SCAIBUNKER_NETNS_DIR` ([`DEFAULT_NETNS_DIR`]).
    pub netns_dir: PathBuf,
    /// The platform's addresses a bunker must never reach (the controller's, the storage
    /// proxy's), added to the deny set.
    pub platform: Vec<Ipv4Addr>,
    /// `SCAIBUNKER_NET_MAX_FLOWS`: connections one bunker may have open at once
    /// ([`DEFAULT_MAX_FLOWS`]); past it a new one is refused.
    pub max_flows: u32,
    /// `SCAIBUNKER_REGISTRY_HOSTS`: the `registry` profile's names
    /// ([`policy::DEFAULT_REGISTRY_HOSTS`]).
    pub registry: Arc<NamePolicy>,
    /// How long the name-filtered profiles' pins last.
    pub pin_lease: PinLease,
}

/// `transit` NICs a bunker may have after `eth0`.
pub const MAX_TRANSIT_NICS: usize = 8;

/// Connections a bunker may have open at once, by default.
pub const DEFAULT_MAX_FLOWS: u32 = 4096;

impl NetworkConfig {
    pub fn with_defaults() -> Self {
        Self {
            pool: Cidr::parse(addr::DEFAULT_POOL).expect("the default pool is a CIDR"),
            deny: Vec::new(),
            allow_private: Vec::new(),
            dns_upstreams: resolver::system_upstreams(),
            netns_dir: PathBuf::from(DEFAULT_NETNS_DIR),
            platform: Vec::new(),
            max_flows: DEFAULT_MAX_FLOWS,
            registry: Arc::new(
                NamePolicy::registry(policy::DEFAULT_REGISTRY_HOSTS)
                    .expect("the default registry list parses"),
            ),
            pin_lease: PinLease::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("bunker networks need root (CAP_NET_ADMIN)")]
    NotRoot,
    #[error("the pool {0} has no free slot")]
    PoolExhausted(Cidr),
    #[error("the `{0}` profile is not available on this worker")]
    Unsupported(&'static str),
    #[error("the allowlist")]
    Allowlist(#[from] policy::PatternError),
    #[error("`allowlisted` needs at least one host name")]
    EmptyAllowlist,
    #[error("prepare {}", .0.display())]
    Dir(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the namespace rules")]
    Rules(#[from] RulesError),
    #[error("the bandwidth cap")]
    Shaping(#[source] RulesError),
    #[error("the resolver's sockets")]
    Resolver(#[source] std::io::Error),
    #[error("the tap")]
    Tap(#[source] std::io::Error),
    #[error("the egress audit")]
    Audit(#[from] AuditError),
    #[error("a setup task failed")]
    Task,
    #[error("transit")]
    Transit(#[source] transit::TransitError),
    #[error("a transit NIC's MAC must be a unicast `aa:bb:cc:dd:ee:ff`")]
    BadMac,
}

/// The guest NIC's host side, as the VMM gets it.
#[derive(Debug, Clone)]
pub enum Nic {
    /// No host side (`isolated`, template builds).
    Unplugged,
    /// The tap in the bunker's namespace.
    Tap(Arc<OwnedFd>),
}

impl PartialEq for Nic {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Unplugged, Self::Unplugged) => true,
            (Self::Tap(a), Self::Tap(b)) => a.as_raw_fd() == b.as_raw_fd(),
            _ => false,
        }
    }
}

impl Eq for Nic {}

/// What the worker's `/metrics` shows of its bunkers' networks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkCounters {
    pub setups_ok: u64,
    pub setups_failed: u64,
    /// Milliseconds the successful setups took, together.
    pub setup_ms_total: u64,
    /// Networked bunkers now.
    pub active: u64,
    /// The audits of the bunkers whose networks are gone, added up.
    pub audit: audit::AuditCounters,
}

/// The networks of this worker's bunkers.
pub struct Networks {
    config: NetworkConfig,
    deny: DenySet,
    host: Links,
    slots: Mutex<BTreeSet<u32>>,
    /// Where egress audit batches go; `None`: no audit (a worker without a controller).
    audit_sink: Option<Arc<dyn BatchSink>>,
    audit_limits: BatchLimits,
    /// Whether the host forwarded IPv4 before [`Networks::start`] turned it on.
    forwarding_was_on: bool,
    counters: Mutex<NetworkCounters>,
    transit_claims: Arc<transit::Claims>,
}

impl std::fmt::Debug for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Networks")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Networks {
    /// Prepares the host: sweeps leftovers, rewrites the host table, turns forwarding on.
    pub async fn start(
        config: NetworkConfig,
        audit_sink: Option<Arc<dyn BatchSink>>,
    ) -> Result<Arc<Self>, NetworkError> {
        Self::start_with(config, audit_sink, BatchLimits::default()).await
    }

    /// [`Networks::start`] with the audit's batch limits (tests shrink them).
    pub async fn start_with(
        config: NetworkConfig,
        audit_sink: Option<Arc<dyn BatchSink>>,
        audit_limits: BatchLimits,
    ) -> Result<Arc<Self>, NetworkError> {
        if !rustix::process::geteuid().is_root() {
            return Err(NetworkError::NotRoot);
        }
        std::fs::create_dir_all(&config.netns_dir)
            .map_err(|e| NetworkError::Dir(config.netns_dir.clone(), e))?;
        let host = Links::connect()?;
        // Leftovers: no bunker of a previous run is alive now (their VMs were killed).
        for id in netns::list(&config.netns_dir) {
            netns::delete(&config.netns_dir.join(&id))?;
        }
        for name in host.names().await? {
            if name.starts_with(HOST_LINK_PREFIX) || name.starts_with(PEER_LINK_PREFIX) {
                host.delete(&name).await?;
            }
        }
        transit::sweep(&host).await.map_err(NetworkError::Transit)?;
        rules::apply(&rules::host_ruleset(&config.pool), None).await?;
        let forwarding = std::fs::read_to_string(IP_FORWARD).unwrap_or_default();
        std::fs::write(IP_FORWARD, "1")
            .map_err(|e| NetworkError::Dir(PathBuf::from(IP_FORWARD), e))?;
        let mut deny: Vec<Cidr> = addr::DEFAULT_DENY
            .iter()
            .map(|c| Cidr::parse(c).expect("the default deny set parses"))
            .collect();
        deny.push(config.pool);
        deny.extend(config.deny.iter().copied());
        for ip in host
            .ipv4_addresses()
            .await?
            .into_iter()
            .chain(config.platform.iter().copied())
        {
            deny.push(Cidr::new(ip, 32));
        }
        let deny = DenySet::new(&deny, &config.allow_private);
        tracing::info!(pool = %config.pool, upstreams = ?config.dns_upstreams, "bunker networks ready");
        Ok(Arc::new(Self {
            config,
            deny,
            host,
            slots: Mutex::new(BTreeSet::new()),
            audit_sink,
            audit_limits,
            forwarding_was_on: forwarding.trim() == "1",
            counters: Mutex::new(NetworkCounters::default()),
            transit_claims: Arc::new(transit::Claims::default()),
        }))
    }

    /// The worker stops (its bunkers are gone): the host table goes, and forwarding goes
    /// back to what it was.
    pub async fn stop(&self) {
        if let Err(e) = rules::apply(&rules::host_cleanup(), None).await {
            tracing::warn!(error = %e, "remove the host table");
        }
        if !self.forwarding_was_on
            && let Err(e) = std::fs::write(IP_FORWARD, "0")
        {
            tracing::warn!(error = %e, "turn IPv4 forwarding back off");
        }
    }

    /// A transit NIC on the host bridge `bridge` (made if missing) with `mac`, behind the
    /// spoof guard unless `spoof_guard` is false ([`transit`]).
    pub async fn attach_transit(
        &self,
        bridge: &str,
        mac: [u8; 6],
        spoof_guard: bool,
    ) -> Result<transit::TransitPort, NetworkError> {
        transit::TransitPort::attach(&self.host, &self.transit_claims, bridge, mac, spoof_guard)
            .await
            .map_err(NetworkError::Transit)
    }

    /// The counters for `/metrics`.
    pub fn counters(&self) -> NetworkCounters {
        let mut c = *self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.active = self.slots.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        c
    }

    fn count(&self, f: impl FnOnce(&mut NetworkCounters)) {
        f(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn deny_set(&self) -> &DenySet {
        &self.deny
    }

    pub fn netns_path(&self, bunker_id: &str) -> PathBuf {
        self.config.netns_dir.join(bunker_id)
    }

    fn take_slot(&self) -> Result<u32, NetworkError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let count = addr::slot_count(&self.config.pool);
        let free = (0..count).find(|k| !slots.contains(k));
        let slot = free.ok_or(NetworkError::PoolExhausted(self.config.pool))?;
        slots.insert(slot);
        Ok(slot)
    }

    fn free_slot(&self, slot: u32) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slot);
    }

    /// Sets up the network of `bunker_id` as `spec` asks (see the module doc); on failure
    /// nothing is left behind.
    pub async fn setup(
        self: &Arc<Self>,
        bunker_id: &str,
        tenant_id: &str,
        spec: &NetworkSpec,
    ) -> Result<BunkerNetwork, NetworkError> {
        let policy = match spec.profile {
            NetworkProfile::Isolated => return Ok(BunkerNetwork::isolated()),
            // `transit`: `eth0` as `unrestricted`, its NICs on their bridges after it.
            NetworkProfile::Unrestricted | NetworkProfile::Transit => None,
            NetworkProfile::Registry => Some(Arc::clone(&self.config.registry)),
            NetworkProfile::Allowlisted => {
                let policy = NamePolicy::new(&spec.allowlist, None)?;
                if policy.is_empty() {
                    return Err(NetworkError::EmptyAllowlist);
                }
                Some(Arc::new(policy))
            }
        };
        if spec.profile != NetworkProfile::Transit && !spec.interfaces.is_empty() {
            return Err(NetworkError::Unsupported("interfaces without `transit`"));
        }
        if spec.profile == NetworkProfile::Transit && spec.interfaces.is_empty() {
            return Err(NetworkError::Unsupported("`transit` without interfaces"));
        }
        if spec.interfaces.len() > MAX_TRANSIT_NICS {
            return Err(NetworkError::Unsupported("more than 8 transit interfaces"));
        }
        let nics = spec
            .interfaces
            .iter()
            .map(|nic| {
                let mac = match &nic.mac {
                    Some(text) => transit::parse_mac(text).ok_or(NetworkError::BadMac)?,
                    None => transit::generated_mac(),
                };
                Ok((nic.bridge.clone(), mac, nic.spoof_guard))
            })
            .collect::<Result<Vec<_>, NetworkError>>()?;
        let slot = self.take_slot()?;
        let mut net = BunkerNetwork {
            networks: Some(Arc::clone(self)),
            slot: Some(slot),
            path: Some(self.netns_path(bunker_id)),
            nic: Nic::Unplugged,
            names: Arc::new(NameTable::default()),
            resolver: None,
            peek: None,
            audit: None,
            handle: None,
            transit: Vec::new(),
        };
        let ctx = AuditContext {
            bunker_id: bunker_id.to_owned(),
            tenant_id: tenant_id.to_owned(),
        };
        let started = std::time::Instant::now();
        match self.build(&mut net, slot, spec, policy, nics, ctx).await {
            Ok(()) => {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.count(|c| {
                    c.setups_ok += 1;
                    c.setup_ms_total = c.setup_ms_total.saturating_add(ms);
                });
                Ok(net)
            }
            Err(e) => {
                self.count(|c| c.setups_failed += 1);
                net.teardown().await;
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        net: &mut BunkerNetwork,
        slot: u32,
        spec: &NetworkSpec,
        policy: Option<Arc<NamePolicy>>,
        nics: Vec<(String, [u8; 6], bool)>,
        ctx: AuditContext,
    ) -> Result<(), NetworkError> {
        let path = net
            .path
            .clone()
            .expect("a networked bunker has a namespace path");
        let (host_ip, ns_ip) = addr::slot_pair(&self.config.pool, slot)
            .ok_or(NetworkError::PoolExhausted(self.config.pool))?;
        // A handle left by a crash of this very bunker id goes first.
        netns::delete(&path)?;
        let create_path = path.clone();
        let handle = blocking(move || netns::create(&create_path)).await??;
        let handle = Arc::new(handle);
        net.handle = Some(Arc::clone(&handle));

        let host_link = format!("{HOST_LINK_PREFIX}{slot}");
        let peer_link = format!("{PEER_LINK_PREFIX}{slot}");
        self.host.add_veth(&host_link, &peer_link).await?;
        self.host.move_to(&peer_link, handle.as_raw_fd()).await?;
        self.host.add_address(&host_link, host_ip, 31).await?;
        self.host.up(&host_link).await?;

        let inside_handle = Arc::clone(&handle);
        let inside_path = path.clone();
        let filtered = policy.is_some();
        let (tap, udp, tcp, peek_listener, pin_socket) = blocking(move || {
            netns::run_in(&inside_handle, &inside_path, move || {
                inside(&peer_link, ns_ip, host_ip, filtered)
            })
        })
        .await???;
        net.nic = Nic::Tap(Arc::new(tap));

        let pin_rules = policy.as_ref().map(|p| rules::PinRules {
            ports: p.ports().map(<[u16]>::to_vec),
            renewal: self.config.pin_lease.renewal(),
        });
        rules::apply(
            &rules::bunker_ruleset(&self.deny, ns_ip, self.config.max_flows, pin_rules.as_ref()),
            Some(&path),
        )
        .await?;
        if let Some(mbit) = spec.bandwidth_mbit {
            shaping::cap(&path, UPLINK_NAME, mbit)
                .await
                .map_err(NetworkError::Shaping)?;
        }
        // The audit reads from before the guest's first packet to after its last.
        if let Some(sink) = &self.audit_sink {
            let names: Arc<dyn audit::NameLookup> = Arc::clone(&net.names) as _;
            net.audit = Some(Audit::start(
                &handle,
                ctx,
                names,
                Arc::clone(sink),
                self.audit_limits,
            )?);
        }
        if let (Some(listener), Some(policy)) = (peek_listener, &policy) {
            let ctx = peek::PeekContext {
                policy: Arc::clone(policy),
                names: Arc::clone(&net.names),
                deny: self.deny.clone(),
                netns: Arc::clone(&handle),
                netns_path: path.clone(),
                max_connections: (self.config.max_flows as usize).min(peek::MAX_CONNECTIONS),
                renewal: self.config.pin_lease.renewal(),
            };
            net.peek = Some(peek::Peek::start(listener, ctx).map_err(NetworkError::Resolver)?);
        }
        let filter = policy.map(|policy| Filter {
            policy,
            deny: self.deny.clone(),
            pins: Arc::new(NftPins {
                socket: pin_socket
                    .clone()
                    .expect("a name-filtered bunker has a pin socket"),
            }),
            lease: self.config.pin_lease,
            denied: net.audit.as_ref().map(AuditHandle::denied_names),
        });
        for (bridge, mac, guard) in nics {
            let port = self.attach_transit(&bridge, mac, guard).await?;
            net.transit.push(port);
        }
        let resolver = Resolver::start(
            udp,
            tcp,
            self.config.dns_upstreams.clone(),
            Arc::clone(&net.names),
            filter,
        )
        .map_err(NetworkError::Resolver)?;
        net.resolver = Some(resolver);
        Ok(())
    }
}

/// Pins in the bunker's nft set, over the netlink socket opened in its namespace
/// ([`pins`]).
struct NftPins {
    socket: pins::PinSocket,
}

impl Pins for NftPins {
    fn pin(
        &self,
        pins: Vec<(Ipv4Addr, std::time::Duration)>,
    ) -> futures_util::future::BoxFuture<'_, Result<(), String>> {
        let socket = self.socket.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || socket.pin(&pins))
                .await
                .map_err(|_| "the pin task failed".to_owned())?
                .map_err(|e| crate::bunker::supervisor::error_chain(&e))
        })
    }
}

fn add_audit(total: &mut audit::AuditCounters, one: &audit::AuditCounters) {
    total.allowed += one.allowed;
    total.denied += one.denied;
    total.lost += one.lost;
    total.batches_put += one.batches_put;
    total.lines_put += one.lines_put;
    total.batches_failed += one.batches_failed;
    total.batches_dropped += one.batches_dropped;
    total.put_retries += one.put_retries;
    total.malformed += one.malformed;
}

/// Runs a blocking step (a namespace thread) off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetworkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| NetworkError::Task)
}

type Inside = (
    OwnedFd,
    std::net::UdpSocket,
    std::net::TcpListener,
    Option<std::net::TcpListener>,
    Option<pins::PinSocket>,
);

/// Step 4 of the module doc, on a thread inside the bunker's namespace (with `filtered`,
/// the SNI/Host peek's listener and the pin socket too).
fn inside(
    peer_link: &str,
    ns_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    filtered: bool,
) -> Result<Inside, NetworkError> {
    for (key, value) in [
        ("net/ipv6/conf/all/disable_ipv6", "1"),
        ("net/ipv6/conf/default/disable_ipv6", "1"),
        ("net/ipv4/ip_forward", "1"),
    ] {
        let file = format!("/proc/sys/{key}");
        // IPv6 may be compiled out; forwarding may not.
        if let Err(e) = std::fs::write(&file, value)
            && !key.starts_with("net/ipv6")
        {
            return Err(NetworkError::Dir(PathBuf::from(file), e));
        }
    }
    let tap = tap::open(TAP_NAME).map_err(NetworkError::Tap)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|_| NetworkError::Task)?;
    runtime.block_on(async {
        let links = Links::connect()?;
        links.up("lo").await?;
        links.set_mac(TAP_NAME, TAP_MAC).await?;
        links
            .add_address(TAP_NAME, GATEWAY_IP, GUEST_PREFIX)
            .await?;
        links.up(TAP_NAME).await?;
        links.rename(peer_link, UPLINK_NAME).await?;
        links.add_address(UPLINK_NAME, ns_ip, 31).await?;
        links.up(UPLINK_NAME).await?;
        links.add_default_route(host_ip).await?;
        Ok::<_, NetworkError>(())
    })?;
    let resolver_at = SocketAddr::from((GATEWAY_IP, 53));
    let udp = std::net::UdpSocket::bind(resolver_at).map_err(NetworkError::Resolver)?;
    udp.set_nonblocking(true).map_err(NetworkError::Resolver)?;
    let tcp = std::net::TcpListener::bind(resolver_at).map_err(NetworkError::Resolver)?;
    tcp.set_nonblocking(true).map_err(NetworkError::Resolver)?;
    if !filtered {
        return Ok((tap, udp, tcp, None, None));
    }
    let listener =
        std::net::TcpListener::bind(peek::listen_addr()).map_err(NetworkError::Resolver)?;
    listener
        .set_nonblocking(true)
        .map_err(NetworkError::Resolver)?;
    let pin_socket = pins::PinSocket::open_here().map_err(NetworkError::Resolver)?;
    Ok((tap, udp, tcp, Some(listener), Some(pin_socket)))
}

/// One bunker's network, for as long as its VM runs.
pub struct BunkerNetwork {
    networks: Option<Arc<Networks>>,
    slot: Option<u32>,
    path: Option<PathBuf>,
    nic: Nic,
    names: Arc<NameTable>,
    resolver: Option<Resolver>,
    peek: Option<peek::Peek>,
    audit: Option<AuditHandle>,
    handle: Option<Arc<File>>,
    transit: Vec<transit::TransitPort>,
}

impl std::fmt::Debug for BunkerNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BunkerNetwork")
            .field("slot", &self.slot)
            .field("path", &self.path)
            .field("nic", &self.nic)
            .finish_non_exhaustive()
    }
}

impl BunkerNetwork {
    /// No network at all (`isolated`).
    pub fn isolated() -> Self {
        Self {
            networks: None,
            slot: None,
            path: None,
            nic: Nic::Unplugged,
            names: Arc::new(NameTable::default()),
            resolver: None,
            peek: None,
            audit: None,
            handle: None,
            transit: Vec::new(),
        }
    }

    pub fn nic(&self) -> Nic {
        self.nic.clone()
    }

    /// The `transit` NICs after `eth0`, for the VMM.
    pub fn extra_nics(&self) -> Vec<crate::vmm::ExtraNic> {
        self.transit
            .iter()
            .filter_map(|p| {
                Some(crate::vmm::ExtraNic {
                    tap: p.tap()?,
                    mac: p.mac(),
                })
            })
            .collect()
    }

    /// Whether the guest gets a resolver (and so a `/etc/resolv.conf` naming it).
    pub fn has_dns(&self) -> bool {
        self.resolver.is_some()
    }

    /// The names the bunker's resolver answered, by address.
    pub fn names(&self) -> &Arc<NameTable> {
        &self.names
    }

    /// The namespace's handle file, if the bunker has one.
    pub fn netns_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The slot's uplink addresses (host end, namespace end).
    pub fn uplink(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        let networks = self.networks.as_ref()?;
        addr::slot_pair(&networks.config.pool, self.slot?)
    }

    /// Removes everything [`Networks::setup`] made; safe to call on a half-built network.
    pub async fn teardown(&mut self) {
        // The guest is gone: what is left in the conntrack table and the sockets goes into
        // the last batch before the namespace (and its table) goes.
        if let Some(audit) = self.audit.take() {
            match tokio::time::timeout(AUDIT_FINISH_TIMEOUT, audit.finish()).await {
                Ok(Ok(done)) => {
                    if let Some(networks) = &self.networks {
                        networks.count(|c| add_audit(&mut c.audit, &done));
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "finish a bunker's egress audit"),
                Err(_) => tracing::warn!(
                    "a bunker's egress audit did not finish in time; its last batch is lost"
                ),
            }
        }
        self.resolver.take();
        self.peek.take();
        for mut port in self.transit.drain(..) {
            port.detach().await;
        }
        self.nic = Nic::Unplugged;
        self.handle.take();
        let Some(networks) = self.networks.clone() else {
            return;
        };
        if let Some(slot) = self.slot.take() {
            for name in [
                format!("{HOST_LINK_PREFIX}{slot}"),
                format!("{PEER_LINK_PREFIX}{slot}"),
            ] {
                if let Err(e) = networks.host.delete(&name).await {
                    tracing::error!(link = name, error = %e, "delete a bunker's veth");
                }
            }
            networks.free_slot(slot);
        }
        if let Some(path) = self.path.take()
            && let Err(e) = netns::delete(&path)
        {
            tracing::error!(path = %path.display(), error = %e, "delete a bunker's namespace");
        }
    }
}
