//! The worker's bunkers: a registry of per-bunker supervisors ([`supervisor::Bunker`]).
//!
//! Invariants:
//! - One entry per bunker id; a create of a listed id is refused, so two supervisors never
//!   share a directory (`<data>/bunkers/<id>/`).
//! - A failed create leaves no entry, no process and no directory.
//! - A bunker whose VM dies on its own stays listed as `Failed` with a reason (heartbeats
//!   report it) until it is deleted.
//! - A panic in a bunker's boot or watcher task fails that bunker; the daemon keeps running.

pub mod leftovers;
pub mod supervisor;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use scaibunker_proto::worker::{
    BootSource, BunkerStatusReport, CreateVm, ImagePull, NetworkProfile, NetworkSpec,
    SnapshotManifest, SnapshotVm, VmInfo, VmStatus,
};

use self::supervisor::{
    BootPlan, Bunker, Resources, SnapshotRestore, TransitionError, error_chain,
};
use crate::agent_client::AgentClient;
use crate::images::{Image, ImageCache};
use crate::network::Networks;
use crate::pulls::{ImageUsers, Pulls};
use crate::snapshots::{self, ObjectClient};
use crate::templates::{Shape, Templates};
use crate::vmm::Vmm;

/// Smallest guest the kernel, initramfs and agent fit in.
pub const MIN_MEMORY_MB: u64 = 64;
const MAX_BUNKER_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CreateBunkerError {
    #[error("invalid create request: {0}")]
    Invalid(String),
    #[error("bunker {0} already exists")]
    Exists(String),
    #[error("image {0} is not in the local cache")]
    ImageNotCached(String),
    #[error("pull image {sha256}: {reason}")]
    ImagePull { sha256: String, reason: String },
    #[error("bunker {id} failed to boot: {reason}")]
    BootFailed { id: String, reason: String },
    #[error("this worker is stopping and takes no new bunkers")]
    Stopping,
}

#[derive(Debug, thiserror::Error)]
pub enum BunkerOpError {
    #[error("bunker {0} not found")]
    NotFound(String),
    #[error("bunker {id} is {status:?}")]
    NotRunning { id: String, status: VmStatus },
    #[error("bunker {id}: {detail}")]
    Vmm { id: String, detail: String },
    #[error("snapshot of bunker {id}: {detail}")]
    Snapshot { id: String, detail: String },
}

/// Every bunker on this worker.
pub struct Bunkers {
    vmm: Arc<dyn Vmm>,
    images: RwLock<Arc<ImageCache>>,
    pulls: Arc<Pulls>,
    bunkers_dir: PathBuf,
    boot_timeout: Duration,
    templates: Arc<Templates>,
    table: Arc<Table>,
    /// Serialises rescans of the images directory.
    rescan: tokio::sync::Mutex<()>,
    /// The storage proxy, for snapshots; `None` when no controller or proxy is configured.
    objects: Option<ObjectClient>,
    /// Bunker networks; `None` where they cannot be set up (not root): `isolated` only.
    networks: Option<Arc<Networks>>,
    /// Staging directory of snapshot captures (`<data>/snapshots/<snapshot id>/`).
    staging_dir: PathBuf,
    /// Set once the worker is stopping: creates are refused from then on.
    stopping: std::sync::atomic::AtomicBool,
    /// Forwards the bunkers' backchannel calls; `None` without a controller.
    backchannel: Option<Arc<crate::backchannel::Backchannel>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The table is updated by single inserts and removes, which a panic cannot tear.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the image cache must not evict: the image of every bunker that has or is getting a
/// VM (a failed one has none), and of every template, ready or being built.
impl ImageUsers for Bunkers {
    fn images_in_use(&self) -> BTreeSet<String> {
        let mut in_use: BTreeSet<String> = self
            .all()
            .iter()
            .filter(|b| b.status() != VmStatus::Failed)
            .map(|b| b.image_sha256().to_owned())
            .collect();
        in_use.extend(self.templates.images_in_use());
        in_use
    }
}

impl Bunkers {
    pub fn new(
        vmm: Arc<dyn Vmm>,
        images: ImageCache,
        pulls: Arc<Pulls>,
        bunkers_dir: PathBuf,
        boot_timeout: Duration,
        templates: Arc<Templates>,
    ) -> Self {
        Self {
            vmm,
            images: RwLock::new(Arc::new(images)),
            pulls,
            boot_timeout,
            templates,
            table: Arc::new(Mutex::new(HashMap::new())),
            rescan: tokio::sync::Mutex::new(()),
            objects: None,
            networks: None,
            staging_dir: bunkers_dir_sibling(&bunkers_dir, "snapshots"),
            bunkers_dir,
            stopping: std::sync::atomic::AtomicBool::new(false),
            backchannel: None,
        }
    }

    /// Serves the bunkers' backchannel calls through `backchannel`.
    pub fn with_backchannel(mut self, backchannel: Arc<crate::backchannel::Backchannel>) -> Self {
        self.backchannel = Some(backchannel);
        self
    }

    /// From now on creates are refused (`WORKER_STOPPING`): the worker is stopping. Bunkers
    /// already here keep being served, so the controller can save them.
    pub fn refuse_creates(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The bunker networks, if this worker sets them up.
    pub fn networks(&self) -> Option<&Arc<Networks>> {
        self.networks.as_ref()
    }

    /// Networked profiles are set up through `networks`.
    pub fn with_networks(mut self, networks: Arc<Networks>) -> Self {
        self.networks = Some(networks);
        self
    }

    /// Snapshots go through this storage proxy client.
    pub fn with_objects(mut self, objects: ObjectClient) -> Self {
        self.objects = Some(objects);
        self
    }

    pub fn runtime(&self) -> String {
        self.vmm.runtime()
    }

    pub fn templates(&self) -> &Arc<Templates> {
        &self.templates
    }

    pub fn images(&self) -> Arc<ImageCache> {
        Arc::clone(&self.images.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn pulls(&self) -> &Arc<Pulls> {
        &self.pulls
    }

    /// Any image this worker holds, prebuilt or pulled, by digest alone (to serve a peer:
    /// not a use of a pulled image).
    pub fn image_by_sha256(&self, sha256: &str) -> Option<Image> {
        self.images()
            .by_sha256(sha256)
            .cloned()
            .or_else(|| self.pulls.peek(sha256))
    }

    /// The digests heartbeats report as `cached_images`: prebuilt and pulled images, none
    /// while nothing can boot (no guest kernel and initramfs).
    pub fn cached_sha256s(&self) -> Vec<String> {
        let images = self.images();
        if images.boot().is_none() {
            return Vec::new();
        }
        let all: BTreeSet<String> = images
            .images()
            .map(|i| i.sha256.clone())
            .chain(self.pulls.held_sha256s())
            .collect();
        all.into_iter().collect()
    }

    /// Asks for the images a heartbeat named to be pulled in the background; those held
    /// (prebuilt or pulled) or already in flight are left alone.
    pub fn pull_in_background(&self, pulls: Vec<ImagePull>) {
        let images = self.images();
        for pull in pulls {
            if images.by_sha256(&pull.sha256).is_none() {
                self.pulls.request(pull);
            }
        }
    }

    /// Boots a bunker (from its shape's template when there is one) and answers once its
    /// agent is ready. A cold boot starts the background build of its shape's template. An
    /// image the worker does not hold is pulled first when the request says from where.
    pub async fn create(&self, mut req: CreateVm) -> Result<VmInfo, CreateBunkerError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CreateBunkerError::Stopping);
        }
        validate_id(&req.bunker_id).map_err(CreateBunkerError::Invalid)?;
        validate_hostname(&req.hostname).map_err(CreateBunkerError::Invalid)?;
        if req.memory_mb < MIN_MEMORY_MB {
            return Err(CreateBunkerError::Invalid(format!(
                "memory_mb must be at least {MIN_MEMORY_MB}"
            )));
        }
        let network_spec = req.network.clone();
        let tenant_id = req.tenant_id.clone();
        let (image, images) = self
            .resolve_image(&req.image_sha256, req.image_pull.take())
            .await?;
        let guest = images
            .boot()
            .cloned()
            .ok_or_else(|| CreateBunkerError::BootFailed {
                id: req.bunker_id.clone(),
                reason: format!(
                    "the images directory {} has no guest kernel and initramfs",
                    images.dir().display()
                ),
            })?;

        if req.disk_mb.saturating_mul(1 << 20) < image.size_bytes {
            return Err(CreateBunkerError::Invalid(format!(
                "disk_mb {} is smaller than the image ({} bytes)",
                req.disk_mb, image.size_bytes
            )));
        }
        let snapshot = req.snapshot.clone();
        if let Some(m) = &snapshot {
            if m.image_sha256 != req.image_sha256 {
                return Err(CreateBunkerError::Invalid(format!(
                    "the snapshot is of image {}, the request names {}",
                    m.image_sha256, req.image_sha256
                )));
            }
            if self.objects.is_none() {
                return Err(CreateBunkerError::Invalid(
                    "this worker has no storage proxy configured to fetch snapshots".to_owned(),
                ));
            }
        }
        let shape = if self.templates.is_on() && snapshot.is_none() {
            Shape::of(
                self.vmm.as_ref(),
                &image,
                &guest,
                req.memory_mb,
                req.cpu_millicores,
                req.disk_mb,
            )
        } else {
            None
        };
        let template = shape.as_ref().and_then(|s| self.templates.lookup(s));

        let bunker = Arc::new(
            Bunker::new(
                req.bunker_id.clone(),
                self.bunkers_dir.join(&req.bunker_id),
                image.sha256.clone(),
                Resources {
                    cpu_millicores: req.cpu_millicores,
                    memory_mb: req.memory_mb,
                    disk_mb: req.disk_mb,
                },
                req.hostname,
                req.env_vars,
            )
            .with_backchannel(self.backchannel.clone()),
        );
        {
            let mut table = lock(&self.table);
            if table.contains_key(&req.bunker_id) {
                return Err(CreateBunkerError::Exists(req.bunker_id));
            }
            table.insert(req.bunker_id.clone(), Arc::clone(&bunker));
        }

        // The boot runs in its own task: a caller that goes away mid-boot neither abandons
        // a half-started VM nor leaves a running one unwatched, and a panic in the boot
        // fails this bunker only.
        let vmm = Arc::clone(&self.vmm);
        let timeout = self.boot_timeout;
        let table = Arc::clone(&self.table);
        let templates = Arc::clone(&self.templates);
        let cpu_millicores = req.cpu_millicores;
        let objects = self.objects.clone();
        let networks = self.networks.clone();
        let task = tokio::spawn(async move {
            if let Err(reason) =
                setup_network(&bunker, &tenant_id, networks.as_ref(), &network_spec).await
            {
                bunker.fail(reason.clone());
                forget(&table, &bunker);
                return Err(CreateBunkerError::BootFailed {
                    id: bunker.id().to_owned(),
                    reason,
                });
            }
            let booting = Arc::clone(&bunker);
            let boot_vmm = Arc::clone(&vmm);
            let boot_templates = Arc::clone(&templates);
            let boot = tokio::spawn(async move {
                let restore = match (&snapshot, &objects) {
                    (Some(manifest), Some(objects)) => Some(SnapshotRestore { manifest, objects }),
                    _ => None,
                };
                let plan = BootPlan {
                    vmm: boot_vmm.as_ref(),
                    image: &image,
                    guest: &guest,
                    timeout,
                    template,
                    templates: &boot_templates,
                    snapshot: restore,
                };
                booting.boot(plan).await
            });
            let booted = match boot.await {
                Ok(result) => result,
                Err(join) => {
                    let reason = format!("the boot task failed: {join}");
                    bunker.fail(reason.clone());
                    bunker.stop().await;
                    Err(reason)
                }
            };
            match booted {
                Ok(source) => {
                    spawn_watcher(&bunker);
                    if source == BootSource::Cold
                        && let Some(shape) = shape
                    {
                        templates.build_in_background(vmm, shape, cpu_millicores);
                    }
                    Ok(bunker.info())
                }
                Err(reason) => {
                    bunker.release_network().await;
                    forget(&table, &bunker);
                    Err(CreateBunkerError::BootFailed {
                        id: bunker.id().to_owned(),
                        reason,
                    })
                }
            }
        });
        task.await.unwrap_or_else(|join| {
            Err(CreateBunkerError::BootFailed {
                id: req.bunker_id,
                reason: format!("the boot supervisor failed: {join}"),
            })
        })
    }

    /// The image `key` names (a digest, or a prebuilt image's name) and the prebuilt cache
    /// (for the guest kernel): prebuilt, else pulled, else prebuilt after a rescan, else
    /// pulled now if the create says from where (a `lazy_pull` image).
    async fn resolve_image(
        &self,
        key: &str,
        pull: Option<ImagePull>,
    ) -> Result<(Image, Arc<ImageCache>), CreateBunkerError> {
        let images = self.images();
        if let Some(image) = images.lookup(key) {
            return Ok((image.clone(), images));
        }
        if let Some(image) = self.pulls.lookup(key) {
            return Ok((image, images));
        }
        let images = self.images_with(key).await;
        if let Some(image) = images.lookup(key) {
            return Ok((image.clone(), images));
        }
        let Some(pull) = pull else {
            return Err(CreateBunkerError::ImageNotCached(key.to_owned()));
        };
        if pull.sha256 != key {
            return Err(CreateBunkerError::Invalid(format!(
                "image_pull.sha256 {} is not image_sha256 {key}",
                pull.sha256
            )));
        }
        let image = self
            .pulls
            .pull(pull)
            .await
            .map_err(|reason| CreateBunkerError::ImagePull {
                sha256: key.to_owned(),
                reason,
            })?;
        Ok((image, images))
    }

    /// The image cache, rescanned once if it does not know `key` (images may have been
    /// added since the worker started; digests already computed are reused).
    async fn images_with(&self, key: &str) -> Arc<ImageCache> {
        let images = self.images();
        if images.lookup(key).is_some() {
            return images;
        }
        let _one_scan = self.rescan.lock().await;
        let dir = images.dir().to_owned();
        match tokio::task::spawn_blocking(move || ImageCache::scan(&dir)).await {
            Ok(Ok(fresh)) => {
                let fresh = Arc::new(fresh);
                *self.images.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&fresh);
                fresh
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %supervisor::error_chain(&e), "rescan images");
                images
            }
            Err(e) => {
                tracing::warn!(error = %e, "rescan images task");
                images
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Bunker>, BunkerOpError> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| BunkerOpError::NotFound(id.to_owned()))
    }

    /// Every bunker, by id.
    pub fn list(&self) -> Vec<VmInfo> {
        let mut all: Vec<VmInfo> = self.all().iter().map(|b| b.info()).collect();
        all.sort_by(|a, b| a.bunker_id.cmp(&b.bunker_id));
        all
    }

    fn all(&self) -> Vec<Arc<Bunker>> {
        lock(&self.table).values().cloned().collect()
    }

    pub fn reports(&self) -> Vec<BunkerStatusReport> {
        let mut all: Vec<BunkerStatusReport> = self.all().iter().map(|b| b.report()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Resources held by bunkers that have (or are getting) a VM.
    pub fn reserved(&self) -> Resources {
        self.all()
            .iter()
            .filter(|b| b.status() != VmStatus::Failed)
            .map(|b| b.resources())
            .fold(Resources::default(), |acc, r| Resources {
                cpu_millicores: acc.cpu_millicores.saturating_add(r.cpu_millicores),
                memory_mb: acc.memory_mb.saturating_add(r.memory_mb),
                disk_mb: acc.disk_mb.saturating_add(r.disk_mb),
            })
    }

    /// Bunkers that are not failed.
    pub fn active_count(&self) -> u64 {
        self.all()
            .iter()
            .filter(|b| b.status() != VmStatus::Failed)
            .count() as u64
    }

    /// Stops and forgets a bunker (a booting one gives up its boot first).
    pub async fn stop(&self, id: &str) -> Result<(), BunkerOpError> {
        let bunker = self.get(id)?;
        bunker.stop().await;
        forget(&self.table, &bunker);
        Ok(())
    }

    /// Stops every bunker, for shutdown.
    pub async fn stop_all(&self) {
        let all = self.all();
        futures_util::future::join_all(all.iter().map(|b| async move {
            b.stop().await;
            forget(&self.table, b);
        }))
        .await;
    }

    pub async fn pause(&self, id: &str) -> Result<VmInfo, BunkerOpError> {
        let bunker = self.get(id)?;
        bunker.pause().await.map_err(|e| transition_error(id, e))?;
        Ok(bunker.info())
    }

    pub async fn resume(&self, id: &str) -> Result<VmInfo, BunkerOpError> {
        let bunker = self.get(id)?;
        bunker.resume().await.map_err(|e| transition_error(id, e))?;
        Ok(bunker.info())
    }

    /// Captures a running bunker and uploads it under the request's prefix; answers once
    /// every object is stored (the bunker runs again before the upload starts).
    pub async fn snapshot(
        &self,
        id: &str,
        req: SnapshotVm,
    ) -> Result<SnapshotManifest, BunkerOpError> {
        let bunker = self.get(id)?;
        let failed = |detail: String| BunkerOpError::Snapshot {
            id: id.to_owned(),
            detail,
        };
        let objects = self
            .objects
            .as_ref()
            .ok_or_else(|| failed(snapshots::SnapshotError::NoStorage.to_string()))?;
        validate_id(&req.snapshot_id).map_err(failed)?;
        let staging = self.staging_dir.join(&req.snapshot_id);
        let _ = std::fs::remove_dir_all(&staging);
        crate::vmm::create_private_dir(&staging)
            .map_err(|e| failed(format!("create {}: {e}", staging.display())))?;
        let result = async {
            let captured = bunker.capture(self.vmm.as_ref(), req.kind, &staging).await;
            if req.kind == scaibunker_proto::worker::SnapshotKind::Full
                && bunker.status() == VmStatus::Running
            {
                // The bunker runs in a new VM now.
                spawn_watcher(&bunker);
            }
            let captured = captured.map_err(|e| transition_error(id, e))?;
            snapshots::upload(objects, &captured, &req.object_prefix)
                .await
                .map_err(|e| failed(supervisor::error_chain(&e)))
        }
        .await;
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    /// The agent of a running bunker, with the bunker's default environment.
    pub fn agent(
        &self,
        id: &str,
    ) -> Result<(AgentClient, BTreeMap<String, String>), BunkerOpError> {
        let bunker = self.get(id)?;
        let agent = bunker
            .running_agent()
            .map_err(|status| BunkerOpError::NotRunning {
                id: id.to_owned(),
                status,
            })?;
        Ok((agent, bunker.env().clone()))
    }
}

type Table = Mutex<HashMap<String, Arc<Bunker>>>;

/// `<parent of the bunkers directory>/<name>`.
fn bunkers_dir_sibling(bunkers_dir: &std::path::Path, name: &str) -> PathBuf {
    bunkers_dir
        .parent()
        .map_or_else(|| bunkers_dir.join(name), |p| p.join(name))
}

/// Removes `bunker` from the table, if that entry is still this bunker.
fn forget(table: &Table, bunker: &Arc<Bunker>) {
    let mut table = lock(table);
    if table
        .get(bunker.id())
        .is_some_and(|b| Arc::ptr_eq(b, bunker))
    {
        table.remove(bunker.id());
    }
}

fn transition_error(id: &str, e: TransitionError) -> BunkerOpError {
    match e {
        TransitionError::WrongState(status) => BunkerOpError::NotRunning {
            id: id.to_owned(),
            status,
        },
        TransitionError::Vmm(detail) => BunkerOpError::Vmm {
            id: id.to_owned(),
            detail,
        },
    }
}

/// Watches the VM of a running bunker; if the watcher itself panics, the bunker fails.
fn spawn_watcher(bunker: &Arc<Bunker>) {
    let watched = Arc::clone(bunker);
    let task = tokio::spawn(Arc::clone(bunker).watch_vm());
    tokio::spawn(async move {
        if let Err(join) = task.await
            && join.is_panic()
        {
            watched.fail(format!("the bunker's watcher task panicked: {join}"));
            watched.stop().await;
        }
    });
}

/// Ids name directories: letters, digits, `-` and `_`, not starting with `-`.
fn validate_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_BUNKER_ID_LEN
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bunker_id {id:?} must be 1-{MAX_BUNKER_ID_LEN} letters, digits, '-' or '_', not starting with '-'"
        ))
    }
}

/// Host names go on the kernel command line: RFC 1123 labels only, so nothing else can.
fn validate_hostname(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!("hostname {name:?} is not a valid host name"))
    }
}

/// Sets up the network `spec` asks for and hands it to `bunker`; the error is the reason
/// the bunker fails with (nothing is left behind).
async fn setup_network(
    bunker: &Bunker,
    tenant_id: &str,
    networks: Option<&Arc<Networks>>,
    spec: &NetworkSpec,
) -> Result<(), String> {
    if spec.profile == NetworkProfile::Isolated {
        return Ok(());
    }
    let networks = networks.ok_or_else(|| {
        format!(
            "network setup: this worker cannot set up `{}` networks (bunker networks need the worker to run as root with nftables)",
            spec.profile.as_str()
        )
    })?;
    let started = std::time::Instant::now();
    let network = networks
        .setup(bunker.id(), tenant_id, spec)
        .await
        .map_err(|e| format!("network setup: {}", error_chain(&e)))?;
    tracing::info!(
        bunker_id = bunker.id(),
        profile = spec.profile.as_str(),
        setup_ms = started.elapsed().as_millis() as u64,
        "bunker network ready"
    );
    bunker.set_network(network);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccelChoice;
    use crate::templates::TemplateMode;
    use crate::vmm::HostVirt;
    use crate::vmm::qemu::QemuVmm;

    #[test]
    fn images_in_use_are_those_of_bunkers_with_a_vm_or_getting_one() {
        let data = tempfile::tempdir().expect("tempdir");
        // KVM named outright: nothing is probed, and no VM is booted here.
        let vmm = QemuVmm::new(AccelChoice::Kvm, &HostVirt::probe(), 1).expect("vmm");
        let images = ImageCache::scan(&data.path().join("none")).expect("scan");
        let pulls = Pulls::open(&data.path().join("images"), None).expect("pulls");
        let templates = Templates::open(
            data.path().join("templates"),
            TemplateMode::On,
            Duration::from_secs(1),
        )
        .expect("templates");
        let bunkers = Bunkers::new(
            Arc::new(vmm),
            images,
            Arc::new(pulls),
            data.path().join("bunkers"),
            Duration::from_secs(1),
            Arc::new(templates),
        );
        let bunker = |id: &str, sha: &str| {
            Arc::new(Bunker::new(
                id.to_owned(),
                data.path().join("bunkers").join(id),
                sha.to_owned(),
                Resources::default(),
                "h".to_owned(),
                BTreeMap::new(),
            ))
        };
        let booting = bunker("b1", &"ab".repeat(32));
        let failed = bunker("b2", &"cd".repeat(32));
        failed.fail("qemu exited".to_owned());
        for b in [booting, failed] {
            lock(&bunkers.table).insert(b.id().to_owned(), b);
        }
        let expected: BTreeSet<String> = ["ab".repeat(32)].into();
        assert_eq!(bunkers.images_in_use(), expected);
    }

    #[test]
    fn bunker_ids_must_be_safe_directory_names() {
        for ok in ["b1", "bk_01HZX", "a-b", &"x".repeat(64)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", "a/b", "-x", "a b", "a.b", &"x".repeat(65), "é"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames_cannot_smuggle_kernel_arguments() {
        for ok in ["box", "my-box.example", "a1"] {
            assert!(validate_hostname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "box init=/bin/sh",
            "-a",
            "a-",
            "a..b",
            "a_b",
            &"x".repeat(64),
        ] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }
}
