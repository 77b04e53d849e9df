//! One bunker's supervisor: its state, its VM, its agent channel, and the tasks that boot
//! and watch it.
//!
//! States: `Booting → Running ⇄ Paused → Stopping`, `Running → Snapshotting → Running`, and
//! `Failed` (with a reason) from `Booting`, `Running`, `Paused` or `Snapshotting`.
//!
//! Boot (see [`Bunker::boot`]):
//! 1. Make the bunker directory and bind `agent.sock` in it.
//!    With a bunker snapshot to restore: download and check it into `snapshot/`, restore its
//!    state (`full`: then the identity request) or boot its disk (`disk`), and wait for the
//!    agent as in step 4; a failure fails the bunker (no cold boot of the image instead).
//! 2. With a template of the bunker's shape: restore it through the driver, wait for the
//!    agent's (second) hello and run the identity script with the bunker's host name. If
//!    any of that fails (unless a stop interrupted it), kill the VM, remove the directory,
//!    discard the template, log why, and go on to a cold boot from step 1.
//! 3. Cold: boot the VM through the driver.
//! 4. Wait for the agent's hello, the VM exiting, a stop request, or the boot timeout.
//! 5. On anything but the hello: kill the VM, keep the tail of the console for the reason,
//!    and remove the directory. Nothing is left running or on disk.
//!
//! Snapshot captures: see [`Bunker::capture`].
//!
//! Invariants: the VM lock (`vm`) serialises boot, pause, resume, capture and stop, and owns
//! the VM (a `full` capture replaces it: the watcher of the old one stands down);
//! a bunker whose VM is gone has no directory; a `Failed` bunker stays listed, with its
//! reason, until it is deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use scaibunker_proto::worker::{
    BootSource, BunkerStatusReport, SnapshotKind, SnapshotManifest, VmInfo, VmStatus,
};
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::agent_client::{AgentClient, ExecSpec};
use crate::images::{GuestBoot, Image};
use crate::network::{BunkerNetwork, Nic};
use crate::snapshots::{self, Captured, ObjectClient};
use crate::templates::{Template, Templates, grow_root_fs, refresh_identity};
use crate::vmm::qemu::cmdline::DISK_FILE;
use crate::vmm::qemu::disk_virtual_size;
use crate::vmm::qemu::logs::{self, CONSOLE_LOG, QEMU_LOG, tail_lines};
use crate::vmm::{BootSpec, DiskLayer, Vm, VmExit, Vmm, create_private_dir};

/// File name of the agent channel socket in the bunker directory.
pub const AGENT_SOCKET: &str = "agent.sock";
/// Where a restore puts the snapshot's files, in the bunker directory.
const SNAPSHOT_DIR: &str = "snapshot";
/// Lines of console output kept in a failure reason.
const CONSOLE_TAIL_LINES: usize = 20;
/// How long a closed agent channel waits for QEMU's exit, to report it.
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(2);
/// Longest unix socket path the kernel accepts (`sun_path` minus its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a restored guest may take to say hello again; past it, a cold boot is cheaper.
const RESTORE_HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the guest may take to take its `/etc/resolv.conf`.
const DNS_TIMEOUT: Duration = Duration::from_secs(10);
/// What the agent logs on the console when the host side of its port went away.
const AGENT_REOPENING: &str = "disconnected; reopening";
/// How long the agent may take to notice its channel closed.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest the guest's `sync` before a disk snapshot may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Resources a bunker asked for; they count against the worker's free capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
}

#[derive(Debug, Clone)]
struct State {
    status: VmStatus,
    reason: Option<String>,
    guest_kernel: Option<String>,
    boot_ms: u64,
    boot_source: BootSource,
}

/// One bunker.
pub struct Bunker {
    id: String,
    dir: PathBuf,
    /// The image the create named: a user of it from the create on, so the image cache
    /// never evicts it under a booting or running bunker.
    image_sha256: String,
    resources: Resources,
    hostname: String,
    /// Added to every exec's environment (the exec's own variables win).
    env: BTreeMap<String, String>,
    state: Mutex<State>,
    /// Serialises lifecycle operations and owns the VM while it runs.
    vm: tokio::sync::Mutex<Option<Box<dyn Vm>>>,
    agent: Mutex<Option<AgentClient>>,
    /// Interrupts a boot in progress (a stop arrived).
    cancel_boot: Notify,
    /// How the running VM was started: what a snapshot records and a restart reuses.
    booted: Mutex<Option<Booted>>,
    /// Counts the frozen disk layers full snapshots leave under the running overlay.
    layers: Mutex<u32>,
    /// The bunker's network while its VM may run; released when the VM is gone for good.
    network: Mutex<Option<BunkerNetwork>>,
    /// Serves the guest's calls on each agent channel the bunker gets.
    backchannel: Option<Arc<crate::backchannel::Backchannel>>,
}

/// The command line a bunker's VM runs with, and the image under its disk.
#[derive(Debug, Clone)]
struct Booted {
    spec: BootSpec,
    image_path: PathBuf,
    image_sha256: String,
}

impl std::fmt::Debug for Bunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bunker")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("state", &*lock(&self.state))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each update of these mutexes is a single assignment, so a panic cannot tear them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the bunker needs from the manager to boot.
pub struct BootPlan<'a> {
    pub vmm: &'a dyn Vmm,
    pub image: &'a Image,
    pub guest: &'a GuestBoot,
    pub timeout: Duration,
    /// A template of the bunker's shape, restored instead of a cold boot if it works.
    pub template: Option<Arc<Template>>,
    pub templates: &'a Templates,
    /// A bunker snapshot to restore instead of booting the image.
    pub snapshot: Option<SnapshotRestore<'a>>,
}

/// A snapshot in object storage and the client that fetches it.
pub struct SnapshotRestore<'a> {
    pub manifest: &'a SnapshotManifest,
    pub objects: &'a ObjectClient,
}

impl Bunker {
    pub fn new(
        id: String,
        dir: PathBuf,
        image_sha256: String,
        resources: Resources,
        hostname: String,
        env: BTreeMap<String, String>,
    ) -> Self {
        Self {
            id,
            dir,
            image_sha256,
            resources,
            hostname,
            env,
            state: Mutex::new(State {
                status: VmStatus::Booting,
                reason: None,
                guest_kernel: None,
                boot_ms: 0,
                boot_source: BootSource::Cold,
            }),
            vm: tokio::sync::Mutex::new(None),
            agent: Mutex::new(None),
            cancel_boot: Notify::new(),
            booted: Mutex::new(None),
            layers: Mutex::new(0),
            network: Mutex::new(None),
            backchannel: None,
        }
    }

    /// Gives the bunker its network (set up before the VM starts).
    pub fn set_network(&self, network: BunkerNetwork) {
        *lock(&self.network) = Some(network);
    }

    /// The host side of the guest's NIC.
    fn nic(&self) -> Nic {
        lock(&self.network)
            .as_ref()
            .map_or(Nic::Unplugged, BunkerNetwork::nic)
    }

    /// The `transit` NICs after it.
    fn extra_nics(&self) -> Vec<crate::vmm::ExtraNic> {
        lock(&self.network)
            .as_ref()
            .map(BunkerNetwork::extra_nics)
            .unwrap_or_default()
    }

    /// The names the bunker's resolver answered, if it has one.
    pub fn names(&self) -> Option<Arc<crate::network::NameTable>> {
        lock(&self.network).as_ref().map(|n| Arc::clone(n.names()))
    }

    /// The namespace of the bunker's network, if it has one.
    pub fn netns_path(&self) -> Option<PathBuf> {
        lock(&self.network)
            .as_ref()
            .and_then(|n| n.netns_path().map(Path::to_owned))
    }

    /// Tears the network down (the VM is gone).
    pub async fn release_network(&self) {
        let network = lock(&self.network).take();
        if let Some(mut network) = network {
            network.teardown().await;
        }
    }

    /// Points the guest's `/etc/resolv.conf` at its resolver, for networks that have one.
    async fn configure_dns(&self, agent: &AgentClient) -> Result<(), String> {
        let has_dns = lock(&self.network)
            .as_ref()
            .is_some_and(BunkerNetwork::has_dns);
        if !has_dns {
            return Ok(());
        }
        let body = bytes::Bytes::from(format!("nameserver {}\n", crate::network::addr::GATEWAY_IP));
        let write = agent.write_file(
            "/etc/resolv.conf".to_owned(),
            0o644,
            scaibunker_proto::agent::GuestUser::Root,
            futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) }),
        );
        tokio::time::timeout(DNS_TIMEOUT, write)
            .await
            .map_err(|_| "writing /etc/resolv.conf took too long".to_owned())?
            .map(|_| ())
            .map_err(|e| format!("write /etc/resolv.conf: {}", error_chain(&e)))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image_sha256(&self) -> &str {
        &self.image_sha256
    }

    pub fn resources(&self) -> Resources {
        self.resources
    }

    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    pub fn status(&self) -> VmStatus {
        lock(&self.state).status
    }

    fn set_status(&self, status: VmStatus) {
        lock(&self.state).status = status;
    }

    pub fn info(&self) -> VmInfo {
        let state = lock(&self.state);
        VmInfo {
            bunker_id: self.id.clone(),
            status: state.status,
            guest_kernel: state.guest_kernel.clone(),
            boot_ms: state.boot_ms,
            boot_source: state.boot_source,
        }
    }

    pub fn report(&self) -> BunkerStatusReport {
        let state = lock(&self.state);
        BunkerStatusReport {
            id: self.id.clone(),
            status: state.status,
            reason: state.reason.clone(),
        }
    }

    /// The agent, if the bunker is running.
    pub fn running_agent(&self) -> Result<AgentClient, VmStatus> {
        let status = self.status();
        if status != VmStatus::Running {
            return Err(status);
        }
        lock(&self.agent).clone().ok_or(status)
    }

    /// Marks the bunker failed: keeps the reason, drops the agent channel.
    pub fn fail(&self, reason: String) {
        tracing::warn!(bunker_id = %self.id, %reason, "bunker failed");
        {
            let mut state = lock(&self.state);
            state.status = VmStatus::Failed;
            state.reason = Some(reason);
        }
        lock(&self.agent).take();
    }

    /// Boots the VM (restoring the plan's template if it can) and waits until the agent is
    /// ready. On failure nothing is left running or on disk, and the error is the reason
    /// (with the console tail).
    pub async fn boot(&self, plan: BootPlan<'_>) -> Result<BootSource, String> {
        let mut slot = self.vm.lock().await;
        let started = Instant::now();
        if let Some(snapshot) = &plan.snapshot {
            let result = self
                .restore_snapshot_locked(&plan, snapshot, &mut slot)
                .await;
            if let Err(what) = result {
                if let Some(vm) = slot.take() {
                    vm.stop().await;
                }
                let reason = format!("{what}{}", diagnostics(&self.dir));
                remove_dir(&self.dir);
                self.fail(reason.clone());
                return Err(reason);
            }
            return Ok(self.running(started, BootSource::Snapshot));
        }
        // A template has one NIC: a bunker with `transit` NICs boots cold.
        let template = plan
            .template
            .as_ref()
            .filter(|_| self.extra_nics().is_empty());
        if let Some(template) = template {
            match self.restore_locked(plan.vmm, template, &mut slot).await {
                Ok(()) => return Ok(self.running(started, BootSource::Template)),
                Err(what) => {
                    if let Some(vm) = slot.take() {
                        vm.stop().await;
                    }
                    let reason = format!("{what}{}", diagnostics(&self.dir));
                    remove_dir(&self.dir);
                    if self.status() == VmStatus::Booting {
                        tracing::warn!(
                            bunker_id = %self.id,
                            template = %template.key,
                            %reason,
                            "restore from the template failed; booting cold"
                        );
                        plan.templates.discard(template, &what);
                    }
                }
            }
        }
        let result = self.boot_locked(&plan, &mut slot).await;
        if let Err(what) = &result {
            if let Some(vm) = slot.take() {
                vm.stop().await;
            }
            let reason = format!("{what}{}", diagnostics(&self.dir));
            remove_dir(&self.dir);
            self.fail(reason.clone());
            return Err(reason);
        }
        Ok(self.running(started, BootSource::Cold))
    }

    fn running(&self, started: Instant, source: BootSource) -> BootSource {
        let boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut state = lock(&self.state);
        state.status = VmStatus::Running;
        state.boot_ms = boot_ms;
        state.boot_source = source;
        tracing::info!(bunker_id = %self.id, boot_ms, ?source, "bunker running");
        source
    }

    /// Makes an empty bunker directory and binds the agent socket in it.
    fn prepare_dir(&self) -> Result<(UnixListener, PathBuf), String> {
        if self.status() != VmStatus::Booting {
            return Err("stopped during boot".to_owned());
        }
        if self.dir.exists() {
            // Only a failed clean-up leaves a directory behind; it belongs to nobody now.
            remove_dir(&self.dir);
        }
        create_private_dir(&self.dir)
            .map_err(|e| format!("create bunker directory {}: {e}", self.dir.display()))?;
        let socket = self.dir.join(AGENT_SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "agent socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter data directory",
                socket.display()
            ));
        }
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("bind agent socket {}: {e}", socket.display()))?;
        Ok((listener, socket))
    }

    /// Waits for the agent's hello, the VM exiting, a stop request, or `timeout`.
    async fn await_agent(
        &self,
        listener: &UnixListener,
        mut exited: futures_util::future::BoxFuture<'static, VmExit>,
        timeout: Duration,
    ) -> Result<AgentClient, String> {
        let wait = async {
            tokio::select! {
                agent = AgentClient::connect(listener) => match agent {
                    Ok(agent) => Ok(agent),
                    Err(e) => {
                        // A guest that powers off closes the channel just before QEMU exits:
                        // name the exit if it follows.
                        let channel = format!("agent channel: {}", error_chain(&e));
                        match tokio::time::timeout(EXIT_AFTER_CLOSE, &mut exited).await {
                            Ok(exit) => Err(format!(
                                "qemu exited ({exit}) before the agent was ready ({channel})"
                            )),
                            Err(_) => Err(channel),
                        }
                    }
                },
                exit = &mut exited => Err(format!("qemu exited ({exit}) before the agent was ready")),
                () = self.cancel_boot.notified() => Err("stopped during boot".to_owned()),
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            format!(
                "the agent did not say hello within {}s of the vm starting",
                timeout.as_secs()
            )
        })?
    }

    fn agent_ready(&self, agent: AgentClient) {
        let hello = agent.hello();
        tracing::debug!(
            bunker_id = %self.id,
            agent_version = %hello.agent_version,
            "agent ready"
        );
        lock(&self.state).guest_kernel = Some(hello.kernel);
        // The channel is this bunker's (its own QEMU's), so its calls are this bunker's.
        if let Some(bc) = &self.backchannel
            && let Some(calls) = agent.take_api_calls()
        {
            tokio::spawn(Arc::clone(bc).serve_bunker(self.id.clone(), calls));
        }
        *lock(&self.agent) = Some(agent);
    }

    /// Serves the backchannel of this bunker's agent channels through `backchannel`.
    pub fn with_backchannel(
        mut self,
        backchannel: Option<Arc<crate::backchannel::Backchannel>>,
    ) -> Self {
        self.backchannel = backchannel;
        self
    }

    async fn restore_locked(
        &self,
        vmm: &dyn Vmm,
        template: &Template,
        slot: &mut Option<Box<dyn Vm>>,
    ) -> Result<(), String> {
        let (listener, socket) = self.prepare_dir()?;
        let spec = BootSpec {
            nic: self.nic(),
            extra_nics: self.extra_nics(),
            ..template.restore_spec(&self.dir, &socket, self.disk_bytes())
        };
        self.set_booted(
            &spec,
            &template.meta.shape.image.path,
            &template.meta.shape.image_sha256,
        );
        let restore = async {
            let vm = vmm
                .restore(&spec, &template.state())
                .await
                .map_err(|e| format!("restore the template: {}", error_chain(&e)))?;
            let exited = vm.exited();
            *slot = Some(vm);
            let agent = self
                .await_agent(&listener, exited, RESTORE_HELLO_TIMEOUT)
                .await?;
            refresh_identity(&agent, &self.hostname).await?;
            self.grow_disk(&agent, &spec).await?;
            self.configure_dns(&agent).await?;
            Ok::<_, String>(agent)
        };
        let agent = tokio::select! {
            agent = restore => agent?,
            () = self.cancel_boot.notified() => return Err("stopped during boot".to_owned()),
        };
        self.agent_ready(agent);
        Ok(())
    }

    async fn boot_locked(
        &self,
        plan: &BootPlan<'_>,
        slot: &mut Option<Box<dyn Vm>>,
    ) -> Result<(), String> {
        let (listener, socket) = self.prepare_dir()?;
        let spec = BootSpec {
            dir: self.dir.clone(),
            kernel: plan.guest.kernel.clone(),
            initramfs: plan.guest.initramfs.clone(),
            base: vec![DiskLayer::raw(&plan.image.path)],
            disk_bytes: self.disk_bytes(),
            agent_socket: socket,
            cpu_millicores: self.resources.cpu_millicores,
            memory_mb: self.resources.memory_mb,
            hostname: self.hostname.clone(),
            nic: self.nic(),
            extra_nics: self.extra_nics(),
        };
        self.set_booted(&spec, &plan.image.path, &plan.image.sha256);
        let vm = plan
            .vmm
            .boot(&spec)
            .await
            .map_err(|e| format!("start the vm: {}", error_chain(&e)))?;
        let exited = vm.exited();
        *slot = Some(vm);
        let agent = self.await_agent(&listener, exited, plan.timeout).await?;
        // Its own machine id and a credited seed, whatever the image carries.
        refresh_identity(&agent, &self.hostname).await?;
        self.grow_disk(&agent, &spec).await?;
        self.configure_dns(&agent).await?;
        self.agent_ready(agent);
        Ok(())
    }

    /// Waits for the VM of a running bunker to exit; an exit nobody asked for fails the
    /// bunker and removes its directory.
    pub async fn watch_vm(self: Arc<Self>) {
        let (exited, pid) = {
            let slot = self.vm.lock().await;
            match slot.as_ref() {
                Some(vm) => (vm.exited(), vm.pid()),
                None => return,
            }
        };
        let exit = exited.await;
        let mut slot = self.vm.lock().await;
        if !matches!(self.status(), VmStatus::Running | VmStatus::Paused) {
            // A stop is (or was) in charge of the VM and its directory.
            return;
        }
        if slot.as_ref().map(|vm| vm.pid()) != Some(pid) {
            // A full snapshot replaced the VM; a watcher of the new one is running.
            return;
        }
        slot.take();
        let reason = format!(
            "qemu exited unexpectedly ({exit}){}",
            diagnostics(&self.dir)
        );
        remove_dir(&self.dir);
        self.fail(reason);
        drop(slot);
        self.release_network().await;
    }

    /// Grows the guest's root filesystem to the bunker's disk when the disk is bigger than
    /// the layer the VM started from (an image smaller than `disk_mb`, a template of it, a
    /// snapshot restored into a bigger disk); a filesystem that fills its disk is left be.
    async fn grow_disk(&self, agent: &AgentClient, spec: &BootSpec) -> Result<(), String> {
        let started_from = match spec.base.first() {
            Some(top) => disk_virtual_size(&top.path, top.format)
                .map_err(|e| format!("read the size of {}: {e}", top.path.display()))?,
            None => 0,
        };
        if spec.disk_bytes > started_from {
            grow_root_fs(agent, spec.disk_bytes).await?;
        }
        Ok(())
    }

    /// The guest disk's size: the bunker's `disk_mb`.
    fn disk_bytes(&self) -> u64 {
        self.resources.disk_mb.saturating_mul(1 << 20)
    }

    fn set_booted(&self, spec: &BootSpec, image_path: &Path, image_sha256: &str) {
        *lock(&self.booted) = Some(Booted {
            spec: spec.clone(),
            image_path: image_path.to_owned(),
            image_sha256: image_sha256.to_owned(),
        });
    }

    /// Downloads a bunker snapshot into the bunker directory, then restores its memory
    /// state (`full`, with a fresh identity as after a template restore) or boots its disk
    /// cold (`disk`). No cold boot of the image on failure: the caller asked for this state.
    async fn restore_snapshot_locked(
        &self,
        plan: &BootPlan<'_>,
        snapshot: &SnapshotRestore<'_>,
        slot: &mut Option<Box<dyn Vm>>,
    ) -> Result<(), String> {
        let manifest = snapshot.manifest;
        snapshots::check_compatible(
            manifest,
            &plan.vmm.runtime(),
            &plan.guest.kernel,
            &plan.guest.initramfs,
        )
        .map_err(|e| error_chain(&e))?;
        if manifest.kind == SnapshotKind::Full
            && plan.vmm.vcpus(manifest.cpu_millicores) != manifest.vcpus
        {
            return Err(format!(
                "the snapshot was saved with {} vCPUs, this worker would give {}",
                manifest.vcpus,
                plan.vmm.vcpus(manifest.cpu_millicores)
            ));
        }
        let (listener, socket) = self.prepare_dir()?;
        let files = self.dir.join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&files).map_err(|e| format!("create {}: {e}", files.display()))?;
        let fetched = tokio::select! {
            r = snapshots::download(snapshot.objects, manifest, &files, &plan.image.path) => r,
            () = self.cancel_boot.notified() => return Err("stopped during boot".to_owned()),
        };
        let (disk, state) =
            fetched.map_err(|e| format!("fetch the snapshot: {}", error_chain(&e)))?;
        let saved_bytes = disk_virtual_size(&disk, crate::vmm::DiskFormat::Qcow2)
            .map_err(|e| format!("read the snapshot disk's size: {e}"))?;
        if saved_bytes > self.disk_bytes() {
            return Err(format!(
                "the snapshot's disk is {saved_bytes} bytes, more than this bunker's disk_mb {}",
                self.resources.disk_mb
            ));
        }
        let mut spec = BootSpec {
            dir: self.dir.clone(),
            kernel: plan.guest.kernel.clone(),
            initramfs: plan.guest.initramfs.clone(),
            // `download` pointed the disk's backing file at this image.
            base: vec![DiskLayer::qcow2(disk), DiskLayer::raw(&plan.image.path)],
            disk_bytes: self.disk_bytes(),
            agent_socket: socket,
            cpu_millicores: self.resources.cpu_millicores,
            memory_mb: self.resources.memory_mb,
            hostname: self.hostname.clone(),
            nic: self.nic(),
            extra_nics: self.extra_nics(),
        };
        let start = async {
            let (vm, timeout) = match &state {
                Some(state) => {
                    // The saved VM's command line, so the state fits it.
                    spec.cpu_millicores = manifest.cpu_millicores;
                    spec.memory_mb = manifest.memory_mb;
                    spec.hostname = manifest.cmdline_hostname.clone();
                    let vm = plan
                        .vmm
                        .restore(&spec, state)
                        .await
                        .map_err(|e| format!("restore the snapshot: {}", error_chain(&e)))?;
                    (vm, RESTORE_HELLO_TIMEOUT)
                }
                None => {
                    let vm = plan
                        .vmm
                        .boot(&spec)
                        .await
                        .map_err(|e| format!("start the vm: {}", error_chain(&e)))?;
                    (vm, plan.timeout)
                }
            };
            self.set_booted(&spec, &plan.image.path, &plan.image.sha256);
            let exited = vm.exited();
            *slot = Some(vm);
            let agent = self.await_agent(&listener, exited, timeout).await?;
            // A fresh identity whether the saved memory or only the saved disk came back:
            // a disk keeps the machine id it was saved with otherwise.
            refresh_identity(&agent, &self.hostname).await?;
            self.grow_disk(&agent, &spec).await?;
            self.configure_dns(&agent).await?;
            if let Some(state) = &state {
                // Loaded: QEMU no longer reads it.
                let _ = std::fs::remove_file(state);
            }
            Ok::<_, String>(agent)
        };
        let agent = tokio::select! {
            agent = start => agent?,
            () = self.cancel_boot.notified() => return Err("stopped during boot".to_owned()),
        };
        self.agent_ready(agent);
        Ok(())
    }

    /// Captures the running bunker into `staging` (`disk.qcow2`, and `vm.state` for
    /// `full`) and leaves it running again; see [`crate::snapshots`] for what happens next.
    ///
    /// `disk`: `sync` in the guest, pause, copy the overlay, resume. Nothing else changes.
    ///
    /// `full`, as a template build but on a live bunker:
    /// 1. Close the agent channel (in-flight commands end) and wait for the agent to
    ///    reopen its port, so the saved agent greets whichever host connects next.
    /// 2. Save the VM state; the VM stays frozen, so its overlay is what the state saw.
    /// 3. Rename the overlay to a frozen layer, kill the VM, and restore the bunker from
    ///    the state just saved on a new overlay over that layer: the same path a restore
    ///    elsewhere takes. Its processes go on where they were.
    ///
    /// A `full` capture that fails after step 1 fails the bunker: its agent is gone.
    pub async fn capture(
        &self,
        vmm: &dyn Vmm,
        kind: SnapshotKind,
        staging: &Path,
    ) -> Result<Captured, TransitionError> {
        let mut slot = self.vm.lock().await;
        let status = self.status();
        let booted = lock(&self.booted).clone();
        let booted = match (slot.as_ref(), booted) {
            (Some(_), Some(booted)) if status == VmStatus::Running => booted,
            _ => return Err(TransitionError::WrongState(status)),
        };
        self.set_status(VmStatus::Snapshotting);
        let captured = Captured {
            kind,
            dir: staging.to_owned(),
            image_path: booted.image_path.clone(),
            image_sha256: booted.image_sha256.clone(),
            memory_mb: booted.spec.memory_mb,
            cpu_millicores: booted.spec.cpu_millicores,
            vcpus: vmm.vcpus(booted.spec.cpu_millicores),
            cmdline_hostname: booted.spec.hostname.clone(),
            runtime: vmm.runtime(),
            kernel: booted.spec.kernel.clone(),
            initramfs: booted.spec.initramfs.clone(),
        };
        let result = match kind {
            SnapshotKind::Disk => self.capture_disk(&slot, staging).await,
            SnapshotKind::Full => {
                let r = self.capture_full(vmm, &booted, &mut slot, staging).await;
                if let Err(what) = &r {
                    if let Some(vm) = slot.take() {
                        vm.stop().await;
                    }
                    let reason = format!("full snapshot failed: {what}{}", diagnostics(&self.dir));
                    remove_dir(&self.dir);
                    self.fail(reason);
                    return Err(TransitionError::Vmm(what.clone()));
                }
                r
            }
        };
        self.set_status(VmStatus::Running);
        result.map_err(TransitionError::Vmm)?;
        Ok(captured)
    }

    async fn capture_disk(&self, slot: &Option<Box<dyn Vm>>, staging: &Path) -> Result<(), String> {
        let agent = lock(&self.agent)
            .clone()
            .ok_or_else(|| "the agent is not connected".to_owned())?;
        // Written data may sit in the guest's page cache; put it on the disk first.
        let synced = agent
            .exec(ExecSpec {
                program: scaibunker_proto::agent::Program::Shell("sync".to_owned()),
                env: Default::default(),
                cwd: None,
                user: scaibunker_proto::agent::GuestUser::Root,
                stdin: None,
                timeout: SYNC_TIMEOUT,
                output_limit_bytes: 4096,
            })
            .await
            .map_err(|e| format!("sync the guest: {}", error_chain(&e)))?;
        if synced.exit_code != Some(0) {
            return Err(format!("sync in the guest exited {:?}", synced.exit_code));
        }
        let vm = slot.as_ref().ok_or_else(|| "the vm is gone".to_owned())?;
        // QEMU's `stop` drains and flushes the disk before it returns.
        vm.pause()
            .await
            .map_err(|e| format!("pause: {}", error_chain(&e)))?;
        let copied = tokio::fs::copy(
            self.dir.join(DISK_FILE),
            staging.join(snapshots::DISK_OBJECT),
        )
        .await
        .map_err(|e| format!("copy the disk: {e}"));
        let resumed = vm
            .resume()
            .await
            .map_err(|e| format!("resume: {}", error_chain(&e)));
        copied?;
        resumed
    }

    async fn capture_full(
        &self,
        vmm: &dyn Vmm,
        booted: &Booted,
        slot: &mut Option<Box<dyn Vm>>,
        staging: &Path,
    ) -> Result<(), String> {
        // Step 1.
        let seen = logs::position(&self.dir, CONSOLE_LOG);
        let agent = lock(&self.agent).take();
        if let Some(agent) = agent {
            agent.close("a full snapshot is being taken").await;
        }
        let reopening = async {
            while !logs::since(&self.dir, CONSOLE_LOG, seen).contains(AGENT_REOPENING) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(REOPEN_TIMEOUT, reopening)
            .await
            .map_err(|_| format!("the agent did not reopen its port within {REOPEN_TIMEOUT:?}"))?;

        // Step 2.
        let state = staging.join(snapshots::STATE_OBJECT);
        {
            let vm = slot.as_ref().ok_or_else(|| "the vm is gone".to_owned())?;
            vm.save(&state)
                .await
                .map_err(|e| format!("save the vm: {}", error_chain(&e)))?;
        }

        // Step 3.
        let layer = {
            let mut layers = lock(&self.layers);
            *layers += 1;
            self.dir.join(format!("disk.{}.qcow2", *layers))
        };
        std::fs::rename(self.dir.join(DISK_FILE), &layer)
            .map_err(|e| format!("freeze the disk as {}: {e}", layer.display()))?;
        if let Some(vm) = slot.take() {
            vm.stop().await;
        }
        let socket = self.dir.join(AGENT_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("bind agent socket {}: {e}", socket.display()))?;
        // The frozen layer over the chain the old overlay sat on.
        let spec = BootSpec {
            base: std::iter::once(DiskLayer::qcow2(&layer))
                .chain(booted.spec.base.iter().cloned())
                .collect(),
            ..booted.spec.clone()
        };
        let vm = vmm
            .restore(&spec, &state)
            .await
            .map_err(|e| format!("restore the bunker from its state: {}", error_chain(&e)))?;
        let exited = vm.exited();
        *slot = Some(vm);
        let agent = self
            .await_agent(&listener, exited, RESTORE_HELLO_TIMEOUT)
            .await?;
        self.agent_ready(agent);
        self.set_booted(&spec, &booted.image_path, &booted.image_sha256);
        // The layer is read-only now (the new overlay's backing file): copy it at leisure.
        tokio::fs::copy(&layer, staging.join(snapshots::DISK_OBJECT))
            .await
            .map_err(|e| format!("copy the disk: {e}"))?;
        Ok(())
    }

    /// Pauses a running bunker.
    pub async fn pause(&self) -> Result<(), TransitionError> {
        self.transition(VmStatus::Running, VmStatus::Paused).await
    }

    /// Resumes a paused bunker.
    pub async fn resume(&self) -> Result<(), TransitionError> {
        self.transition(VmStatus::Paused, VmStatus::Running).await
    }

    async fn transition(&self, from: VmStatus, to: VmStatus) -> Result<(), TransitionError> {
        let slot = self.vm.lock().await;
        let status = self.status();
        let vm = match slot.as_ref() {
            Some(vm) if status == from => vm,
            _ => return Err(TransitionError::WrongState(status)),
        };
        let done = if to == VmStatus::Paused {
            vm.pause().await
        } else {
            vm.resume().await
        };
        done.map_err(|e| TransitionError::Vmm(error_chain(&e)))?;
        self.set_status(to);
        Ok(())
    }

    /// Kills the VM and removes the directory; waits for a boot in progress to give up.
    pub async fn stop(&self) {
        self.cancel_boot.notify_one();
        let mut slot = self.vm.lock().await;
        if self.status() != VmStatus::Failed {
            self.set_status(VmStatus::Stopping);
        }
        lock(&self.agent).take();
        if let Some(vm) = slot.take() {
            let exit = vm.stop().await;
            tracing::info!(bunker_id = %self.id, %exit, "bunker stopped");
        }
        remove_dir(&self.dir);
        self.release_network().await;
    }

    /// The QEMU pid, for tests and diagnostics.
    pub async fn pid(&self) -> Option<u32> {
        self.vm.lock().await.as_ref().and_then(|vm| vm.pid())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("the bunker is {0:?}")]
    WrongState(VmStatus),
    #[error("{0}")]
    Vmm(String),
}

/// An error and its sources, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(dir = %dir.display(), error = %e, "remove bunker directory"),
    }
}

/// The console tail, and QEMU's own complaints if any, for a failure reason.
fn diagnostics(dir: &Path) -> String {
    let mut out = String::new();
    let qemu = tail_lines(dir, QEMU_LOG, CONSOLE_TAIL_LINES);
    if !qemu.trim().is_empty() {
        out.push_str("; qemu said:\n");
        out.push_str(&qemu);
    }
    let console = tail_lines(dir, CONSOLE_LOG, CONSOLE_TAIL_LINES);
    if console.trim().is_empty() {
        out.push_str("; the console is empty");
    } else {
        out.push_str("; console tail:\n");
        out.push_str(&console);
    }
    out
}
