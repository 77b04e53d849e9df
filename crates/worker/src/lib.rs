//! The ScaiBunker worker daemon: runs one microVM per bunker and serves the controller.
//!
//! [`start`] composes the daemon:
//! 1. make `<data>/bunkers/` and clean up what a previous run left there (kill leftover
//!    QEMU processes, remove their directories);
//! 2. scan the images directory, check the agent inside its initramfs ([`initramfs`]: static,
//!    this protocol; a wrong one refuses the start), and `<data>/images/` for pulled images
//!    ([`pulls`], kept within the cache cap and free-disk floor; the bunkers registry, once
//!    made, tells it which images are in use);
//! 3. open `<data>/templates/` (keep complete, current templates; remove the rest);
//! 4. pick the VMM accelerator (KVM only with real hardware virtualisation, else TCG), and,
//!    when the worker is root, the range of uids QEMU processes drop to;
//! 5. bind the HTTP listener and serve the API ([`api`]);
//! 6. with a controller URL, register and heartbeat ([`controller_client`]).
//!
//! [`WorkerHandle::shutdown`] refuses new bunkers, has the controller save the ones it runs
//! (`session` and `persistent` as `full` snapshots, see [`controller_client::announce_stop`]),
//! then stops serving, stops every VM and cancels template builds; nothing outlives the
//! worker.

pub mod agent_client;
pub mod api;
pub mod backchannel;
pub mod bunker;
pub mod capacity;
pub mod config;
pub mod controller_client;
pub mod credentials;
pub mod images;
pub mod initramfs;
pub mod network;
pub mod pulls;
pub mod shell;
pub mod snapshots;
pub mod templates;
pub mod vmm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::bunker::Bunkers;
use crate::capacity::HostResources;
pub use crate::config::WorkerConfig;
use crate::controller_client::ControllerLink;
use crate::images::ImageCache;
use crate::pulls::Pulls;
use crate::templates::{TemplateStatus, Templates};
use crate::vmm::HostVirt;
use crate::vmm::qemu::{QemuSetupError, QemuVmm};

/// How long shutdown waits for in-flight requests once the VMs are gone.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("create the bunkers directory {}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scan the images directory")]
    Images(#[from] images::ImageScanError),
    #[error("check the guest agent")]
    GuestAgent(#[from] initramfs::InitramfsAgentError),
    #[error("open the pulled images directory")]
    Pulls(#[from] pulls::OpenPullsError),
    #[error("open the templates directory")]
    Templates(#[from] templates::OpenTemplatesError),
    #[error("set up the qemu driver")]
    Vmm(#[from] QemuSetupError),
    #[error("listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a start-up task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("wait for a shutdown signal")]
    Signal(#[source] std::io::Error),
}

/// A running worker.
pub struct WorkerHandle {
    addr: SocketAddr,
    url: String,
    runtime: String,
    bunkers: Arc<Bunkers>,
    pulls: Arc<Pulls>,
    credentials: Arc<credentials::Credentials>,
    stop_serving: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
    controller: Option<Controller>,
    networks: Option<Arc<network::Networks>>,
}

/// The link to the controller: its heartbeat task, and what a planned stop needs.
struct Controller {
    url: String,
    task: JoinHandle<()>,
    registered_as: Arc<std::sync::RwLock<Option<String>>>,
    stop_timeout: Duration,
}

impl WorkerHandle {
    /// This worker's credential (what its API accepts).
    pub fn credentials(&self) -> &Arc<credentials::Credentials> {
        &self.credentials
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL advertised to the controller.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The VMM driver and accelerator, e.g. `qemu/tcg`.
    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    /// Every bunker's status as heartbeats report it (failed ones with their reason).
    pub fn reports(&self) -> Vec<scaibunker_proto::worker::BunkerStatusReport> {
        self.bunkers.reports()
    }

    /// Every template snapshot (built, being built, or failed), by key.
    pub fn templates(&self) -> Vec<(String, TemplateStatus)> {
        self.bunkers.templates().list()
    }

    /// The image pulls: pulled images, pulls in flight, counters.
    pub fn pulls(&self) -> &Arc<Pulls> {
        &self.pulls
    }

    /// Refuses new bunkers, has the controller save the ones here (up to the stop timeout,
    /// heartbeats going on meanwhile), then stops heartbeating, stops serving, stops every VM,
    /// cancels template builds and pulls.
    pub async fn shutdown(self) {
        if let Some(controller) = self.controller {
            self.bunkers.refuse_creates();
            let worker_id = controller
                .registered_as
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            match worker_id {
                Some(id) if !self.bunkers.reports().is_empty() => {
                    controller_client::announce_stop(
                        &controller.url,
                        &self.credentials,
                        &id,
                        controller.stop_timeout,
                    )
                    .await;
                }
                Some(_) => {}
                None => tracing::warn!("never registered: no controller to save the bunkers"),
            }
            controller.task.abort();
        }
        // Stop accepting first, so no new bunker starts while the others stop.
        let _ = self.stop_serving.send(());
        self.bunkers.stop_all().await;
        if let Some(networks) = &self.networks {
            networks.stop().await;
        }
        self.bunkers.templates().shutdown().await;
        self.pulls.shutdown();
        let mut server = self.server;
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server"),
            Ok(Err(e)) => tracing::warn!(error = %e, "http server task"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish; dropping them");
                server.abort();
            }
        }
        tracing::info!("worker stopped");
    }
}

/// Starts the worker: cleans up, binds, serves and (with a controller URL) registers.
pub async fn start(config: WorkerConfig) -> Result<WorkerHandle, StartError> {
    let bunkers_dir = std::path::absolute(config.data_dir.join("bunkers"))
        .unwrap_or_else(|_| config.data_dir.join("bunkers"));
    vmm::create_private_dir(&bunkers_dir).map_err(|source| StartError::DataDir {
        path: bunkers_dir.clone(),
        source,
    })?;
    let leftovers_dir = bunkers_dir.clone();
    let removed =
        tokio::task::spawn_blocking(move || bunker::leftovers::clean_leftovers(&leftovers_dir))
            .await?;
    if removed > 0 {
        tracing::warn!(removed, "cleaned up leftovers of a previous run");
    }
    let images_dir = config.images_dir.clone();
    let images = tokio::task::spawn_blocking(move || ImageCache::scan(&images_dir)).await??;
    tracing::info!(
        dir = %images.dir().display(),
        images = ?images.images().map(|i| &i.name).collect::<Vec<_>>(),
        "image cache scanned"
    );
    if let Some(boot) = images.boot() {
        let initramfs = boot.initramfs.clone();
        let protocol =
            tokio::task::spawn_blocking(move || initramfs::check_agent(&initramfs)).await??;
        tracing::info!(
            protocol,
            "the initramfs carries a static agent of this protocol"
        );
    }
    // This worker's credential, kept in the data directory; standalone, the token alone.
    let credentials = Arc::new(if config.controller_url.is_some() {
        credentials::Credentials::open(&config.worker_token, &config.data_dir)
    } else {
        credentials::Credentials::standalone(&config.worker_token)
    });
    let pulls_dir = config.data_dir.join("images");
    let access = config
        .controller_url
        .clone()
        .map(|url| pulls::ControllerAccess {
            url,
            credentials: Arc::clone(&credentials),
        });
    let limits = pulls::CacheLimits {
        cap_bytes: config.image_cache_bytes,
        min_free_bytes: config.min_free_disk_bytes,
        grace: pulls::RECENT_USE_GRACE,
    };
    let pulls = Arc::new(
        tokio::task::spawn_blocking(move || {
            Pulls::open(&pulls_dir, access).map(|p| p.with_limits(limits))
        })
        .await??,
    );
    tracing::info!(
        dir = %pulls.dir().display(),
        images = pulls.held_sha256s().len(),
        bytes = pulls.held_bytes(),
        cap_bytes = ?config.image_cache_bytes,
        min_free_disk_bytes = config.min_free_disk_bytes,
        "pulled images scanned"
    );

    let templates_dir = std::path::absolute(config.data_dir.join("templates"))
        .unwrap_or_else(|_| config.data_dir.join("templates"));
    let (mode, boot_timeout) = (config.templates, config.boot_timeout);
    let templates =
        tokio::task::spawn_blocking(move || Templates::open(templates_dir, mode, boot_timeout))
            .await??;
    tracing::info!(mode = ?config.templates, templates = templates.list().len(), "templates opened");

    let host = HostResources::probe();
    let mut vmm = QemuVmm::new(config.accel, &HostVirt::probe(), host.cores)?;
    if !config.qemu_runas {
        tracing::warn!("qemu runs as the worker's uid (SCAIBUNKER_QEMU_RUNAS=off)");
    } else if rustix::process::geteuid().is_root() {
        vmm = vmm.with_accounts(vmm::qemu::accounts::Accounts::new(
            config.qemu_uid_base,
            config.qemu_uid_count,
        ));
        tracing::info!(
            base = config.qemu_uid_base,
            count = config.qemu_uid_count,
            "qemu drops to a uid of its own per vm"
        );
    } else {
        tracing::warn!("the worker is not root: qemu runs as the worker's own uid");
    }
    let runtime = vmm::Vmm::runtime(&vmm);
    tracing::info!(%runtime, "vmm ready");
    // Captures left half-done by a previous run are of no use.
    let _ = std::fs::remove_dir_all(config.data_dir.join("snapshots"));
    let mut bunkers = Bunkers::new(
        Arc::new(vmm),
        images,
        Arc::clone(&pulls),
        bunkers_dir,
        config.boot_timeout,
        Arc::new(templates),
    );
    // Audit batches go to a controller's proxy: a standalone one cannot tell whose bunker a
    // batch is of, and refuses them.
    let audit_url = config
        .controller_url
        .as_ref()
        .filter(|_| config.egress_audit);
    let audit_sink = audit_url.and_then(|url| {
        match snapshots::ObjectClient::new(url, Arc::clone(&credentials)) {
            Ok(objects) => Some(Arc::new(network::audit::StorageSink::new(objects))
                as Arc<dyn network::audit::BatchSink>),
            Err(e) => {
                tracing::warn!(error = %e, "no storage proxy client: the egress audit is off");
                None
            }
        }
    });
    let mut networks = None;
    if config.networks {
        match network::Networks::start(network_config(&config).await, audit_sink).await {
            Ok(n) => {
                bunkers = bunkers.with_networks(Arc::clone(&n));
                networks = Some(n);
            }
            Err(e) => tracing::warn!(
                error = %bunker::supervisor::error_chain(&e),
                "bunker networks are off: only `isolated` bunkers run here"
            ),
        }
    } else {
        tracing::info!(
            "bunker networks are off (SCAIBUNKER_NETWORKS=off): only `isolated` bunkers run here"
        );
    }
    if let Some(url) = config
        .storage_url
        .as_ref()
        .or(config.controller_url.as_ref())
    {
        match snapshots::ObjectClient::new(url, Arc::clone(&credentials)) {
            Ok(objects) => bunkers = bunkers.with_objects(objects),
            Err(e) => tracing::warn!(error = %e, "no storage proxy client: snapshots are off"),
        }
    }
    // The bunkers' own calls to the platform go to the controller, with this worker's
    // credential (the channel is the bunker's identity, `backchannel.rs`).
    if let Some(url) = config.controller_url.as_ref() {
        match backchannel::Backchannel::new(url, Arc::clone(&credentials)) {
            Ok(bc) => bunkers = bunkers.with_backchannel(Arc::new(bc)),
            Err(e) => {
                tracing::warn!(error = %e, "no backchannel client: bunkers cannot call the platform")
            }
        }
    }
    let bunkers = Arc::new(bunkers);
    // Only images no bunker or template uses may be evicted to make room for a pull.
    let users: std::sync::Weak<Bunkers> = Arc::downgrade(&bunkers);
    pulls.set_users(users);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let url = config
        .advertised_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let state = Arc::new(api::ApiState::new(
        Arc::clone(&bunkers),
        Arc::clone(&credentials),
        config.max_file_bytes,
    ));
    let (stop_serving, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, %url, "worker api listening");

    let controller = config.controller_url.clone().map(|controller_url| {
        let registered_as = Arc::new(std::sync::RwLock::new(None));
        let link = ControllerLink {
            controller_url: controller_url.clone(),
            credentials: Arc::clone(&credentials),
            name: config.name.clone(),
            worker_url: url.clone(),
            heartbeat_interval: config.heartbeat_interval,
            host,
            data_dir: config.data_dir.clone(),
            bunkers: Arc::clone(&bunkers),
            registered_as: Arc::clone(&registered_as),
        };
        Controller {
            url: controller_url,
            task: tokio::spawn(link.run()),
            registered_as,
            stop_timeout: config.stop_timeout,
        }
    });
    if controller.is_none() {
        tracing::info!("no controller url: running standalone");
    }
    Ok(WorkerHandle {
        addr,
        url,
        runtime,
        bunkers,
        pulls,
        credentials,
        stop_serving,
        server,
        controller,
        networks,
    })
}

/// Runs the worker until SIGINT or SIGTERM, then shuts it down. With
/// `SCAIBUNKER_EXIT_WITH_PARENT=1` (set by `scaibunker up`) it also shuts down when the process
/// that started it goes away, even by SIGKILL, so an embedded installation never leaves VMs
/// behind.
pub async fn run(config: WorkerConfig) -> Result<(), StartError> {
    raise_open_files_limit();
    let handle = start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(StartError::Signal)?;
    let watch_parent = std::env::var("SCAIBUNKER_EXIT_WITH_PARENT").is_ok_and(|v| v == "1");
    let parent_gone = async move {
        if !watch_parent {
            return std::future::pending::<()>().await;
        }
        let parent = rustix::process::getppid();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            // Orphans are re-parented (to init or a subreaper), so a changed ppid means the
            // parent is gone.
            if rustix::process::getppid() != parent {
                tracing::warn!("parent process exited");
                return;
            }
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(StartError::Signal)?,
        _ = term.recv() => {}
        _ = parent_gone => {}
    }
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

/// Lifts the soft limit on open descriptors to the hard one (systemd's soft default is
/// 1024): every bunker's VM, agent channel, disk layers and proxied flows hold descriptors
/// of the worker, and running out would fail every bunker, not the one that used them.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "raise the open files limit");
        }
    }
}

/// The network settings with the platform's own addresses (the controller's and the storage
/// proxy's, resolved now) added to what bunkers never reach.
async fn network_config(config: &WorkerConfig) -> network::NetworkConfig {
    let mut net = config.network.clone();
    for url in [&config.controller_url, &config.storage_url]
        .into_iter()
        .flatten()
    {
        let Ok(parsed) = reqwest::Url::parse(url) else {
            continue;
        };
        let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
            continue;
        };
        if let Ok(addrs) = tokio::net::lookup_host((host, port)).await {
            for addr in addrs {
                if let std::net::IpAddr::V4(ip) = addr.ip() {
                    net.platform.push(ip);
                }
            }
        }
    }
    net
}
