//! Template snapshots: a booted guest saved at the agent-ready point, restored instead of
//! cold-booting a bunker of the same shape (about 0.2 s of restore against seconds of boot).
//!
//! A template is keyed by its shape: the image (sha256 and the file's size and mtime), the
//! kernel and initramfs (size and mtime), memory, vCPUs, the VMM runtime and the disk size
//! (the template's filesystem is grown to it before the save, so a restore grows nothing). It
//! lives in
//! `<data>/templates/<key>/`: `vm.state` (memory and device state), `disk.qcow2` (the
//! overlay the template VM wrote, over the image), `template.json` (what it was built from).
//!
//! Build, in the background after the first cold boot of a shape (creates never wait for
//! one; one build at a time per worker; two creates racing for the same shape start one
//! build, through the slot table):
//! 1. Boot the image in `<key>.building/` and wait for the agent's hello.
//! 2. Set an identity once and spawn `/bin/sh -c true` (so the saved page cache holds what
//!    a restored bunker's first exec needs).
//! 3. Close the agent channel and wait for the agent to log that it is reopening its port,
//!    so the saved agent sends a fresh `HELLO` to whichever host connects after a restore.
//! 4. Save the VM state, kill the VM, make the disk read-only, write `template.json`
//!    last, and rename the directory to `<key>`: a template directory is complete.
//!
//! Restore (see `bunker::supervisor`): a private qcow2 overlay whose backing file is the
//! template's `disk.qcow2`, the template's command line plus `-incoming`, `cont`, the
//! agent's hello, then `SetIdentity` with the bunker's host name, a fresh machine id and a
//! seed credited to the guest's entropy pool (with a reseed).
//!
//! Invariants: a template's `disk.qcow2` is never written after its save (its VM is dead
//! before the template is published; restored bunkers only ever use it as a read-only
//! backing file). A template whose image, kernel or initramfs changed is deleted, never
//! restored; a template that fails to restore is deleted, and the bunker cold-boots. A
//! template, ready or building, keeps its image from eviction ([`Templates::images_in_use`]).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use scaibunker_proto::agent::{GuestUser, Program};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent_client::{AgentClient, ExecSpec};
use crate::bunker::leftovers::kill_leftover_vm;
use crate::bunker::supervisor::{AGENT_SOCKET, error_chain};
use crate::images::{GuestBoot, Image};
use crate::vmm::qemu::cmdline::{DISK_FILE, PID_FILE, QMP_SOCKET};
use crate::vmm::qemu::logs::{CONSOLE_LOG, tail_lines};
use crate::vmm::{BootSpec, DiskLayer, Vm, Vmm, create_private_dir};

/// The saved memory and device state in a template directory.
pub const STATE_FILE: &str = "vm.state";
/// What a template was built from; written last.
pub const META_FILE: &str = "template.json";
/// Suffix of a template directory whose build has not finished.
const BUILDING_SUFFIX: &str = ".building";
/// The template VM's host name; restored bunkers get their own through `SetIdentity`.
const TEMPLATE_HOSTNAME: &str = "scaibunker-template";
/// What the agent logs on the console when the host side of its port went away.
const AGENT_REOPENING: &str = "disconnected; reopening";
/// How long the agent may take to notice its channel closed.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// After a failed build, how long before a cold boot of the shape tries again.
const BUILD_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Longest the identity request and the build's warm-up exec may take.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest growing a guest's root filesystem may take (waiting for the disk included).
const GROW_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the worker builds and restores templates (`SCAIBUNKER_TEMPLATES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemplateMode {
    #[default]
    On,
    Off,
}

/// A file's identity: replacing or rewriting it changes its size or mtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u64,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let mtime_ns = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Ok(Self {
            path: path.to_owned(),
            size: meta.len(),
            mtime_ns,
        })
    }

    fn is_current(&self) -> bool {
        Self::of(&self.path).is_ok_and(|now| now == *self)
    }
}

/// Everything a saved VM depends on; two bunkers of one shape can share a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub image_name: String,
    pub image_sha256: String,
    pub image: FileId,
    pub kernel: FileId,
    pub initramfs: FileId,
    pub memory_mb: u64,
    pub vcpus: u32,
    pub runtime: String,
    /// The guest disk's size: a template's filesystem is already grown to it, so a restore
    /// into a bunker of this `disk_mb` has nothing to grow (0 in templates saved before).
    #[serde(default)]
    pub disk_bytes: u64,
}

impl Shape {
    /// The shape of a bunker of `image` with these resources; `None` if a file is gone.
    pub fn of(
        vmm: &dyn Vmm,
        image: &Image,
        guest: &GuestBoot,
        memory_mb: u64,
        cpu_millicores: u64,
        disk_mb: u64,
    ) -> Option<Self> {
        Some(Self {
            image_name: image.name.clone(),
            image_sha256: image.sha256.clone(),
            image: FileId::of(&image.path).ok()?,
            kernel: FileId::of(&guest.kernel).ok()?,
            initramfs: FileId::of(&guest.initramfs).ok()?,
            memory_mb,
            vcpus: vmm.vcpus(cpu_millicores),
            runtime: vmm.runtime(),
            disk_bytes: disk_mb.saturating_mul(1 << 20).max(image.size_bytes),
        })
    }

    /// 32 hex digits of the SHA-256 of the shape.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("a shape always serialises");
        hex::encode(&Sha256::digest(&json)[..16])
    }

    fn is_current(&self) -> bool {
        self.image.is_current() && self.kernel.is_current() && self.initramfs.is_current()
    }
}

/// `template.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub shape: Shape,
    /// The template VM's requested CPU, kept so a restore's command line is the saved one.
    pub cpu_millicores: u64,
    /// The host name on the template VM's kernel command line.
    pub hostname: String,
    pub state_bytes: u64,
    /// Boot to the agent's hello.
    pub boot_ms: u64,
    pub save_ms: u64,
}

/// A published template.
#[derive(Debug)]
pub struct Template {
    pub key: String,
    pub dir: PathBuf,
    pub meta: TemplateMeta,
}

impl Template {
    /// The frozen disk restored bunkers' overlays sit on.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The boot spec a restore of this template into `dir` uses: the template's command
    /// line, with the bunker's own directory, agent socket and disk size.
    pub fn restore_spec(&self, dir: &Path, agent_socket: &Path, disk_bytes: u64) -> BootSpec {
        BootSpec {
            dir: dir.to_owned(),
            kernel: self.meta.shape.kernel.path.clone(),
            initramfs: self.meta.shape.initramfs.path.clone(),
            base: vec![
                DiskLayer::qcow2(self.disk()),
                DiskLayer::raw(&self.meta.shape.image.path),
            ],
            disk_bytes: disk_bytes.max(self.meta.shape.image.size),
            agent_socket: agent_socket.to_owned(),
            cpu_millicores: self.meta.cpu_millicores,
            memory_mb: self.meta.shape.memory_mb,
            hostname: self.meta.hostname.clone(),
            nic: crate::network::Nic::Unplugged,
            extra_nics: Vec::new(),
        }
    }

    /// Whether its files are there and its inputs unchanged.
    fn check(&self) -> Result<(), String> {
        if !self.meta.shape.is_current() {
            return Err("its image, kernel or initramfs changed".to_owned());
        }
        match std::fs::metadata(self.state()) {
            Ok(m) if m.len() == self.meta.state_bytes => {}
            Ok(m) => {
                return Err(format!(
                    "its state file has {} bytes, {} were saved",
                    m.len(),
                    self.meta.state_bytes
                ));
            }
            Err(e) => return Err(format!("its state file is unreadable: {e}")),
        }
        if !self.disk().is_file() {
            return Err("its disk is missing".to_owned());
        }
        Ok(())
    }
}

/// A template's state, as tests and logs see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateStatus {
    Building,
    Ready { dir: PathBuf, image_sha256: String },
    Failed,
}

#[derive(Debug, Clone)]
enum Slot {
    /// Its VM boots this image.
    Building {
        image_sha256: String,
    },
    Ready(Arc<Template>),
    Failed {
        until: Instant,
    },
}

/// Every template of this worker.
pub struct Templates {
    dir: PathBuf,
    mode: TemplateMode,
    boot_timeout: Duration,
    slots: Mutex<HashMap<String, Slot>>,
    /// One build at a time: each is a VM beside the bunkers.
    build_one: tokio::sync::Mutex<()>,
    builds: Mutex<Vec<JoinHandle<()>>>,
    cancel: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single insert, remove or push, which a panic cannot tear.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, thiserror::Error)]
#[error("create the templates directory {}", dir.display())]
pub struct OpenTemplatesError {
    dir: PathBuf,
    #[source]
    source: std::io::Error,
}

impl Templates {
    /// Opens `dir`: removes unfinished builds (killing their VMs), loads the templates that
    /// are complete and current, and deletes the others. Blocking.
    pub fn open(
        dir: PathBuf,
        mode: TemplateMode,
        boot_timeout: Duration,
    ) -> Result<Self, OpenTemplatesError> {
        create_private_dir(&dir).map_err(|source| OpenTemplatesError {
            dir: dir.clone(),
            source,
        })?;
        let mut slots = HashMap::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if mode == TemplateMode::On
                && let Some(template) = load(&path, &name)
            {
                match template.check() {
                    Ok(()) => {
                        tracing::info!(key = %name, image = %template.meta.shape.image_name, "template loaded");
                        slots.insert(name, Slot::Ready(Arc::new(template)));
                        continue;
                    }
                    Err(why) => tracing::info!(key = %name, %why, "stale template removed"),
                }
            } else {
                kill_leftover_vm(&path);
            }
            remove_dir(&path);
        }
        let (cancel, _) = watch::channel(false);
        Ok(Self {
            dir,
            mode,
            boot_timeout,
            slots: Mutex::new(slots),
            build_one: tokio::sync::Mutex::new(()),
            builds: Mutex::new(Vec::new()),
            cancel,
        })
    }

    pub fn is_on(&self) -> bool {
        self.mode == TemplateMode::On
    }

    /// The ready template of `shape`, if any. Deletes templates whose inputs changed.
    pub fn lookup(&self, shape: &Shape) -> Option<Arc<Template>> {
        if !self.is_on() {
            return None;
        }
        let key = shape.key();
        let found = match lock(&self.slots).get(&key) {
            Some(Slot::Ready(t)) => Some(Arc::clone(t)),
            _ => None,
        };
        match found {
            Some(t) => match t.check() {
                Ok(()) => Some(t),
                Err(why) => {
                    self.discard(&t, &why);
                    None
                }
            },
            None => {
                self.prune();
                None
            }
        }
    }

    /// Deletes a template that could not be used; the next cold boot of its shape builds
    /// it again.
    pub fn discard(&self, template: &Arc<Template>, why: &str) {
        let mut slots = lock(&self.slots);
        if matches!(slots.get(&template.key), Some(Slot::Ready(t)) if Arc::ptr_eq(t, template)) {
            slots.remove(&template.key);
            drop(slots);
            tracing::warn!(key = %template.key, image = %template.meta.shape.image_name, %why, "template discarded");
            // Bunkers restored from it keep reading its disk through their open descriptors.
            remove_dir(&template.dir);
        }
    }

    /// Deletes every ready template whose image, kernel or initramfs changed.
    fn prune(&self) {
        let ready: Vec<Arc<Template>> = lock(&self.slots)
            .values()
            .filter_map(|s| match s {
                Slot::Ready(t) => Some(Arc::clone(t)),
                _ => None,
            })
            .collect();
        for t in ready {
            if !t.meta.shape.is_current() {
                self.discard(&t, "its image, kernel or initramfs changed");
            }
        }
    }

    /// Claims the build of `key`: true for exactly one caller while no template, build or
    /// recent failure exists for it.
    fn claim(&self, key: &str, image_sha256: &str) -> bool {
        let mut slots = lock(&self.slots);
        let free = match slots.get(key) {
            None => true,
            Some(Slot::Failed { until }) => Instant::now() >= *until,
            Some(Slot::Building { .. } | Slot::Ready(_)) => false,
        };
        if free {
            slots.insert(
                key.to_owned(),
                Slot::Building {
                    image_sha256: image_sha256.to_owned(),
                },
            );
        }
        free
    }

    /// After a cold boot of `shape`: builds its template in the background unless one
    /// exists, is being built, or failed recently.
    pub fn build_in_background(
        self: &Arc<Self>,
        vmm: Arc<dyn Vmm>,
        shape: Shape,
        cpu_millicores: u64,
    ) {
        if !self.is_on() || *self.cancel.borrow() {
            return;
        }
        self.prune();
        let key = shape.key();
        if !self.claim(&key, &shape.image_sha256) {
            return;
        }
        let templates = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _one_build = templates.build_one.lock().await;
            let outcome = templates
                .build(vmm.as_ref(), &key, &shape, cpu_millicores)
                .await;
            let mut slots = lock(&templates.slots);
            match outcome {
                Ok(template) => {
                    tracing::info!(
                        %key,
                        image = %shape.image_name,
                        boot_ms = template.meta.boot_ms,
                        save_ms = template.meta.save_ms,
                        state_bytes = template.meta.state_bytes,
                        "template ready"
                    );
                    slots.insert(key, Slot::Ready(Arc::new(template)));
                }
                Err(why) => {
                    tracing::warn!(%key, image = %shape.image_name, %why, "template build failed");
                    slots.insert(
                        key,
                        Slot::Failed {
                            until: Instant::now() + BUILD_RETRY_AFTER,
                        },
                    );
                }
            }
        });
        let mut builds = lock(&self.builds);
        builds.retain(|b| !b.is_finished());
        builds.push(task);
    }

    /// Every template, by key.
    pub fn list(&self) -> Vec<(String, TemplateStatus)> {
        let mut all: Vec<(String, TemplateStatus)> = lock(&self.slots)
            .iter()
            .map(|(key, slot)| {
                let status = match slot {
                    Slot::Building { .. } => TemplateStatus::Building,
                    Slot::Ready(t) => TemplateStatus::Ready {
                        dir: t.dir.clone(),
                        image_sha256: t.meta.shape.image_sha256.clone(),
                    },
                    Slot::Failed { .. } => TemplateStatus::Failed,
                };
                (key.clone(), status)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Digests of the images templates were built from (ready ones: restored bunkers' disks
    /// rest on them) or are being built from.
    pub fn images_in_use(&self) -> BTreeSet<String> {
        lock(&self.slots)
            .values()
            .filter_map(|slot| match slot {
                Slot::Building { image_sha256 } => Some(image_sha256.clone()),
                Slot::Ready(t) => Some(t.meta.shape.image_sha256.clone()),
                Slot::Failed { .. } => None,
            })
            .collect()
    }

    /// Cancels builds in progress and waits until their VMs are gone.
    pub async fn shutdown(&self) {
        self.cancel.send_replace(true);
        let builds = std::mem::take(&mut *lock(&self.builds));
        for build in builds {
            let _ = build.await;
        }
    }

    async fn build(
        &self,
        vmm: &dyn Vmm,
        key: &str,
        shape: &Shape,
        cpu_millicores: u64,
    ) -> Result<Template, String> {
        let building = self.dir.join(format!("{key}{BUILDING_SUFFIX}"));
        let mut cancel = self.cancel.subscribe();
        let mut slot: Option<Box<dyn Vm>> = None;
        let result = tokio::select! {
            r = build_in(vmm, shape, cpu_millicores, &building, self.boot_timeout, &mut slot) => r,
            _ = cancel.wait_for(|stop| *stop) => Err("the worker is shutting down".to_owned()),
        };
        if let Some(vm) = slot.take() {
            vm.stop().await;
        }
        let meta = match result {
            Ok(meta) => meta,
            Err(why) => {
                let console = tail_lines(&building, CONSOLE_LOG, 10);
                remove_dir(&building);
                return Err(format!("{why}; console tail:\n{console}"));
            }
        };
        let dir = self.dir.join(key);
        remove_dir(&dir);
        std::fs::rename(&building, &dir).map_err(|e| {
            remove_dir(&building);
            format!("publish the template: {e}")
        })?;
        Ok(Template {
            key: key.to_owned(),
            dir,
            meta,
        })
    }
}

/// Steps 1–4 of a build in `dir`, up to writing `template.json`. The VM is left in `slot`
/// for the caller to stop on failure.
async fn build_in(
    vmm: &dyn Vmm,
    shape: &Shape,
    cpu_millicores: u64,
    dir: &Path,
    boot_timeout: Duration,
    slot: &mut Option<Box<dyn Vm>>,
) -> Result<TemplateMeta, String> {
    remove_dir(dir);
    create_private_dir(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let socket = dir.join(AGENT_SOCKET);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| format!("bind agent socket {}: {e}", socket.display()))?;
    let spec = BootSpec {
        dir: dir.to_owned(),
        kernel: shape.kernel.path.clone(),
        initramfs: shape.initramfs.path.clone(),
        base: vec![DiskLayer::raw(&shape.image.path)],
        // The bunker's disk size, grown before the save: restores of it grow nothing.
        disk_bytes: shape.disk_bytes.max(shape.image.size),
        agent_socket: socket,
        cpu_millicores,
        memory_mb: shape.memory_mb,
        hostname: TEMPLATE_HOSTNAME.to_owned(),
        nic: crate::network::Nic::Unplugged,
        extra_nics: Vec::new(),
    };
    let started = Instant::now();
    let vm = vmm
        .boot(&spec)
        .await
        .map_err(|e| format!("start the vm: {}", error_chain(&e)))?;
    let mut exited = vm.exited();
    let vm = &**slot.insert(vm);
    let agent = tokio::select! {
        agent = tokio::time::timeout(boot_timeout, AgentClient::connect(&listener)) => agent
            .map_err(|_| format!("no agent hello within {boot_timeout:?}"))?
            .map_err(|e| format!("agent channel: {}", error_chain(&e)))?,
        exit = &mut exited => return Err(format!("qemu exited ({exit}) during boot")),
    };
    let boot_ms = millis(started.elapsed());
    refresh_identity(&agent, TEMPLATE_HOSTNAME).await?;
    if spec.disk_bytes > shape.image.size {
        grow_root_fs(&agent, spec.disk_bytes).await?;
    }
    // One spawn of the shell, so the saved page cache already holds what a bunker's first
    // exec after a restore needs.
    let warm = agent
        .exec(ExecSpec {
            program: Program::Argv(vec!["/bin/sh".into(), "-c".into(), "true".into()]),
            env: Default::default(),
            cwd: None,
            user: GuestUser::Root,
            stdin: None,
            timeout: IDENTITY_TIMEOUT,
            output_limit_bytes: 4096,
        })
        .await
        .map_err(|e| format!("warm-up exec: {}", error_chain(&e)))?;
    if warm.exit_code != Some(0) {
        return Err(format!("warm-up exec exited with {:?}", warm.exit_code));
    }

    // Step 3: the agent must be between sessions when the state is saved.
    drop(agent);
    drop(listener);
    let reopening = async {
        while !tail_lines(dir, CONSOLE_LOG, 20).contains(AGENT_REOPENING) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(REOPEN_TIMEOUT, reopening)
        .await
        .map_err(|_| format!("the agent did not reopen its port within {REOPEN_TIMEOUT:?}"))?;

    let save_started = Instant::now();
    let state = dir.join(STATE_FILE);
    vm.save(&state)
        .await
        .map_err(|e| format!("save the vm: {}", error_chain(&e)))?;
    let save_ms = millis(save_started.elapsed());
    if let Some(vm) = slot.take() {
        vm.stop().await;
    }
    for stale in [AGENT_SOCKET, QMP_SOCKET, PID_FILE] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let disk = dir.join(DISK_FILE);
    freeze(&disk).map_err(|e| format!("make {} read-only: {e}", disk.display()))?;
    let state_bytes = std::fs::metadata(&state)
        .map_err(|e| format!("stat {}: {e}", state.display()))?
        .len();
    let meta = TemplateMeta {
        shape: shape.clone(),
        cpu_millicores,
        hostname: TEMPLATE_HOSTNAME.to_owned(),
        state_bytes,
        boot_ms,
        save_ms,
    };
    let json = serde_json::to_vec_pretty(&meta).expect("template metadata serialises");
    write_synced(&dir.join(META_FILE), &json).map_err(|e| format!("write {META_FILE}: {e}"))?;
    Ok(meta)
}

/// Gives a restored guest its own identity: host name, a fresh machine id, and 64 bytes of
/// host randomness credited to its entropy pool with a forced reseed, so no two restores of
/// one saved state share random numbers. One agent request (no process is spawned).
pub async fn refresh_identity(agent: &AgentClient, hostname: &str) -> Result<(), String> {
    let mut random = [0u8; 80];
    {
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .map_err(|e| format!("read randomness from /dev/urandom: {e}"))?;
    }
    let (machine_id, seed) = random.split_at(16);
    tokio::time::timeout(
        IDENTITY_TIMEOUT,
        agent.set_identity(hostname, &hex::encode(machine_id), seed),
    )
    .await
    .map_err(|_| format!("the identity request took longer than {IDENTITY_TIMEOUT:?}"))?
    .map_err(|e| format!("set the identity: {}", error_chain(&e)))
}

/// Grows the guest's root filesystem to fill its disk of `disk_bytes` (a no-op when it
/// does already; see [`AgentClient::grow_root_fs`]).
pub async fn grow_root_fs(agent: &AgentClient, disk_bytes: u64) -> Result<(), String> {
    tokio::time::timeout(GROW_TIMEOUT, agent.grow_root_fs(disk_bytes))
        .await
        .map_err(|_| format!("growing the root filesystem took longer than {GROW_TIMEOUT:?}"))?
        .map_err(|e| format!("grow the root filesystem: {}", error_chain(&e)))
}

/// Reads `<dir>/template.json`, if `dir` is a published template named `key`.
fn load(dir: &Path, key: &str) -> Option<Template> {
    if key.ends_with(BUILDING_SUFFIX) {
        return None;
    }
    let meta: TemplateMeta = serde_json::from_slice(&std::fs::read(dir.join(META_FILE)).ok()?)
        .inspect_err(|e| tracing::warn!(dir = %dir.display(), error = %e, "bad template.json"))
        .ok()?;
    (meta.shape.key() == key).then(|| Template {
        key: key.to_owned(),
        dir: dir.to_owned(),
        meta,
    })
}

/// Makes the template's disk read-only: to its owner too, as a guard against mistakes (root
/// ignores modes; what keeps it unwritten is that only read-only backing files use it).
fn freeze(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::File::open(path)?.sync_all()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(dir = %dir.display(), error = %e, "remove template directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dir: &Path, memory_mb: u64) -> Shape {
        let file = |name: &str| {
            let path = dir.join(name);
            if !path.exists() {
                std::fs::write(&path, name).expect("write");
            }
            FileId::of(&path).expect("stat")
        };
        Shape {
            image_name: "tiny".into(),
            image_sha256: "ab".repeat(32),
            image: file("tiny.ext4"),
            kernel: file("vmlinux"),
            initramfs: file("initramfs.cpio.gz"),
            memory_mb,
            vcpus: 1,
            runtime: "qemu/tcg".into(),
            disk_bytes: 1 << 30,
        }
    }

    #[test]
    fn keys_differ_by_every_part_of_the_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = shape(dir.path(), 256);
        let mut other_sha = base.clone();
        other_sha.image_sha256 = "cd".repeat(32);
        let mut other_vcpus = base.clone();
        other_vcpus.vcpus = 2;
        let mut other_kernel = base.clone();
        other_kernel.kernel.size += 1;
        let mut other_disk = base.clone();
        other_disk.disk_bytes = 2 << 30;
        let keys = [
            base.key(),
            shape(dir.path(), 512).key(),
            other_sha.key(),
            other_vcpus.key(),
            other_kernel.key(),
            other_disk.key(),
        ];
        assert_eq!(keys[0], base.key(), "stable");
        assert_eq!(keys[0].len(), 32);
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn a_rewritten_input_makes_the_shape_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = shape(dir.path(), 256);
        assert!(s.is_current());
        std::fs::write(dir.path().join("initramfs.cpio.gz"), b"rebuilt, longer").expect("w");
        assert!(!s.is_current());
    }

    #[test]
    fn only_one_racing_create_claims_a_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let templates = Templates::open(
            dir.path().join("templates"),
            TemplateMode::On,
            Duration::from_secs(1),
        )
        .expect("open");
        let claims: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| templates.claim("k1", "sha")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        assert_eq!(claims.iter().filter(|c| **c).count(), 1);
        // A failed build may be retried only once its back-off has passed.
        lock(&templates.slots).insert(
            "k1".into(),
            Slot::Failed {
                until: Instant::now() + Duration::from_secs(60),
            },
        );
        assert!(!templates.claim("k1", "sha"));
        lock(&templates.slots).insert(
            "k1".into(),
            Slot::Failed {
                until: Instant::now(),
            },
        );
        assert!(templates.claim("k1", "sha"));
    }

    #[test]
    fn images_in_use_are_those_of_ready_and_building_templates() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("templates");
        let s = shape(data.path(), 256);
        let t = dir.join(s.key());
        std::fs::create_dir_all(&t).expect("mkdir");
        std::fs::write(t.join(STATE_FILE), b"state").expect("w");
        std::fs::write(t.join(DISK_FILE), b"disk").expect("w");
        let meta = TemplateMeta {
            shape: s.clone(),
            cpu_millicores: 1000,
            hostname: TEMPLATE_HOSTNAME.into(),
            state_bytes: 5,
            boot_ms: 1,
            save_ms: 1,
        };
        std::fs::write(t.join(META_FILE), serde_json::to_vec(&meta).expect("json")).expect("w");
        let templates =
            Templates::open(dir, TemplateMode::On, Duration::from_secs(1)).expect("open");
        assert!(templates.claim("building", &"cd".repeat(32)));
        lock(&templates.slots).insert(
            "failed".into(),
            Slot::Failed {
                until: Instant::now(),
            },
        );
        let expected: BTreeSet<String> = [s.image_sha256, "cd".repeat(32)].into();
        assert_eq!(templates.images_in_use(), expected);
    }

    #[test]
    fn open_keeps_complete_current_templates_and_removes_the_rest() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("templates");
        let s = shape(data.path(), 256);
        let key = s.key();
        let write_template = |name: &str, state_bytes: u64| {
            let t = dir.join(name);
            std::fs::create_dir_all(&t).expect("mkdir");
            std::fs::write(t.join(STATE_FILE), b"state").expect("w");
            std::fs::write(t.join(DISK_FILE), b"disk").expect("w");
            let meta = TemplateMeta {
                shape: s.clone(),
                cpu_millicores: 1000,
                hostname: TEMPLATE_HOSTNAME.into(),
                state_bytes,
                boot_ms: 1,
                save_ms: 1,
            };
            std::fs::write(t.join(META_FILE), serde_json::to_vec(&meta).expect("json")).expect("w");
        };
        write_template(&key, 5);
        // Truncated state, a key that does not match its contents, an unfinished build.
        let mut other = s.clone();
        other.memory_mb = 512;
        write_template(&other.key(), 4);
        write_template("0123", 5);
        std::fs::create_dir_all(dir.join(format!("{key}{BUILDING_SUFFIX}"))).expect("mkdir");

        let templates =
            Templates::open(dir.clone(), TemplateMode::On, Duration::from_secs(1)).expect("open");
        let keys: Vec<String> = templates.list().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, std::slice::from_ref(&key));
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, std::slice::from_ref(&key));
        assert!(templates.lookup(&s).is_some());

        // A rewritten image invalidates it.
        std::fs::write(data.path().join("tiny.ext4"), b"a new image").expect("w");
        let mut changed = s.clone();
        changed.image = FileId::of(&data.path().join("tiny.ext4")).expect("stat");
        assert!(templates.lookup(&changed).is_none());
        assert!(templates.list().is_empty());
        assert!(!dir.join(&key).exists());
    }
}
