//! The QEMU driver: `qemu-system-x86_64 -M microvm`, one process per bunker.
//!
//! The guest is hostile: a QEMU escape must not be the worker. Each QEMU starts with an
//! empty environment (none of the worker's variables, its token included), under a seccomp
//! filter that denies fork and exec ([`cmdline::SANDBOX`]), and, when the worker is root,
//! drops to an account of its own ([`accounts`]) once its start-up files are open. Nothing
//! in the bunker directory is the account's: the directory is root's, mode 0700, its files
//! 0600. QEMU opens no disk by path: the worker opens every layer of the chain and QEMU
//! inherits the descriptors ([`cmdline::DiskFd`]), so a save, which inactivates the disks,
//! works under the account. The VM state moves through descriptors the worker passes over
//! QMP (`getfd`), never through a path or a socket QEMU would open.
//!
//! Boot, in the bunker directory:
//! 1. `qemu-img create` makes `disk.qcow2` (mode 0600), a copy-on-write overlay of the
//!    base image, so the base image is never written and the bunker's writes die with its
//!    directory. The worker opens it read-write and every layer of `BootSpec::base`
//!    read-only; the child alone inherits them (`-add-fd`, [`inherit`]).
//! 2. QEMU starts with the command line of [`cmdline::QemuCommand`]: its agent chardev
//!    connects as a client to the socket the worker already listens on, QMP listens on
//!    `qmp.sock`; the serial console (its stdout) and QEMU's own messages (stderr) are pipes
//!    the worker copies into capped rings, `console.log` and `qemu.log` ([`logs`]).
//! 3. A task owns the child process: it waits for the exit, or kills the process when asked
//!    or when the [`QemuVm`] is dropped, and publishes the exit status once both logs have
//!    reached their end, so whoever reads the console tail after an exit reads all of it.
//!    It holds the process's account lease, so the uid is handed out again only once the
//!    process is gone.
//!
//! Pause and resume are the QMP commands `stop` and `cont`; stop is SIGKILL, since the
//! disk is thrown away and nothing in the guest needs a clean shutdown.
//!
//! Save (over QMP, one connection):
//! 1. The worker makes a connected socket pair and copies what arrives on its end to
//!    `<state>.part` (mode 0600).
//! 2. `stop` (which drains and flushes the disk), lift the migration bandwidth cap, `getfd`
//!    the other end as `migrate`, `migrate` to `fd:migrate`, and poll `query-migrate` until
//!    `completed`.
//! 3. Once the copy has seen the end of the stream and synced the file, rename it to
//!    `<state>`: a state file that exists is whole.
//!
//! The recipe's `exec:cat > FILE` is not used for saving (nor could it be, with exec
//! denied): QEMU sends the `exec:` child SIGTERM, then SIGKILL, if it has not exited
//! 10–20 ms after the stream closes, which on a loaded host can cut off the end of the file.
//!
//! Restore: boot's steps 1–3 with the same command line plus `-incoming defer`; the worker
//! opens the state file, `getfd`s it as `incoming`, runs `migrate-incoming fd:incoming`,
//! polls `query-migrate` until `completed`, then `cont`.

pub mod accounts;
pub mod cmdline;
pub mod logs;
pub mod qmp;

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use self::accounts::Accounts;
use self::cmdline::{DISK_FILE, DiskFd, QMP_SOCKET, QemuCommand, Start};
use self::logs::{CONSOLE_LOG, QEMU_LOG, Ring};
use self::qmp::Session;
use crate::config::AccelChoice;
use crate::vmm::{Accel, BootSpec, DiskFormat, DiskLayer, HostVirt, Vm, VmExit, Vmm, VmmError};

const QEMU_BINARY: &str = "qemu-system-x86_64";
const QEMU_IMG_BINARY: &str = "qemu-img";
/// QEMU caps migration at 32 MiB/s by default; a save goes to a local file, so lift it.
const SAVE_BANDWIDTH_BYTES_PER_S: u64 = 16 << 30;
/// Longest a save or a restore may take (a few hundred MB of state under TCG).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `query-migrate` is asked.
const MIGRATION_POLL: Duration = Duration::from_millis(5);
/// How long an exited QEMU's logs may take to reach the disk before the exit is published.
const LOGS_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The `getfd` names of the descriptors a save writes to and a restore reads from.
const SAVE_FD_NAME: &str = "migrate";
const RESTORE_FD_NAME: &str = "incoming";

#[derive(Debug, thiserror::Error)]
pub enum QemuSetupError {
    #[error(
        "TCG needs the host TSC frequency for the guest, but /proc/cpuinfo has no `cpu MHz` line"
    )]
    NoCpuMhz,
}

/// The QEMU driver, with the accelerator fixed at worker start.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    accel: Accel,
    tsc_khz: Option<u64>,
    host_cores: u32,
    /// The accounts QEMU drops to; `None` when the worker is not root (QEMU then keeps the
    /// worker's uid, and the filter denies the set*id calls too).
    accounts: Option<Arc<Accounts>>,
}

impl QemuVmm {
    /// Picks the accelerator: `choice` unless it is `auto`, else what the host supports.
    pub fn new(
        choice: AccelChoice,
        host: &HostVirt,
        host_cores: u32,
    ) -> Result<Self, QemuSetupError> {
        let accel = match choice {
            AccelChoice::Auto => host.detect_accel(),
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Kvm => Accel::Kvm,
        };
        let tsc_khz = host.cpu_khz();
        if accel == Accel::Tcg && tsc_khz.is_none() {
            return Err(QemuSetupError::NoCpuMhz);
        }
        Ok(Self {
            accel,
            tsc_khz,
            host_cores,
            accounts: None,
        })
    }

    /// Every QEMU drops to an account of `accounts` once its files are open.
    pub fn with_accounts(mut self, accounts: Arc<Accounts>) -> Self {
        self.accounts = Some(accounts);
        self
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn command(
        &self,
        spec: &BootSpec,
        disks: Vec<DiskFd>,
        start: Start,
        runas: Option<cmdline::RunAs>,
    ) -> QemuCommand {
        QemuCommand {
            accel: self.accel,
            tsc_khz: self.tsc_khz,
            memory_mb: spec.memory_mb,
            vcpus: cmdline::vcpus_for(self.accel, spec.cpu_millicores, self.host_cores),
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            dir: spec.dir.clone(),
            agent_socket: spec.agent_socket.clone(),
            hostname: spec.hostname.clone(),
            disks,
            start,
            runas,
            nic: match &spec.nic {
                crate::network::Nic::Unplugged => cmdline::NicArg::Unplugged,
                crate::network::Nic::Tap(fd) => cmdline::NicArg::TapFd(fd.as_raw_fd()),
            },
            extra_nics: spec
                .extra_nics
                .iter()
                .map(|n| (n.tap.as_raw_fd(), n.mac))
                .collect(),
        }
    }

    async fn restore_vm(&self, spec: &BootSpec, state: &Path) -> Result<Box<dyn Vm>, VmmError> {
        // The worker opens the state: the QEMU account could not, and may not spawn `cat`.
        let state_file = std::fs::File::open(state).map_err(|source| VmmError::Io {
            step: "open the saved state",
            dir: state.parent().map(Path::to_owned).unwrap_or_default(),
            source,
        })?;
        let base_bytes = spec
            .base
            .first()
            .map(|top| disk_virtual_size(&top.path, top.format))
            .transpose()
            .map_err(|source| VmmError::Io {
                step: "read the base disk's size",
                dir: spec.dir.clone(),
                source,
            })?
            .unwrap_or(0);
        let vm = self.start(spec, Start::Restore).await?;
        let step = "restore the saved state";
        let loaded = async {
            let mut qmp = vm.connect_monitor().await?;
            qmp.send_fd(RESTORE_FD_NAME, state_file.as_fd())
                .await
                .map_err(|e| monitor_error("getfd", e))?;
            qmp.execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("fd:{RESTORE_FD_NAME}") })),
            )
            .await
            .map_err(|e| monitor_error("migrate-incoming", e))?;
            vm.wait_migration(&mut qmp, "query-migrate").await?;
            qmp.execute("cont", None)
                .await
                .map_err(|e| monitor_error("cont", e))?;
            // The overlay came up at the saved disk's size, which the restored guest knows;
            // growing it now raises the device's config change, so the guest sees it too.
            if spec.disk_bytes > base_bytes {
                qmp.execute(
                    "block_resize",
                    Some(json!({ "node-name": "d0", "size": spec.disk_bytes })),
                )
                .await
                .map_err(|e| monitor_error("block_resize", e))?;
            }
            Ok::<_, VmmError>(())
        };
        let mut exited = vm.exited();
        tokio::select! {
            r = tokio::time::timeout(MIGRATION_TIMEOUT, loaded) => r.map_err(|_| VmmError::Timeout {
                step,
                limit: MIGRATION_TIMEOUT,
            })??,
            // QEMU exits when the incoming state cannot be loaded.
            _ = &mut exited => return Err(VmmError::Gone),
        }
        Ok(Box::new(vm))
    }

    async fn boot_vm(&self, spec: &BootSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.start(spec, Start::Boot).await?))
    }

    /// Creates the overlay and spawns QEMU (booting, or waiting for a saved state).
    async fn start(&self, spec: &BootSpec, start: Start) -> Result<QemuVm, VmmError> {
        let lease = match &self.accounts {
            Some(accounts) => Some(accounts.lease().ok_or(VmmError::NoAccount {
                base: accounts.base(),
                count: accounts.count(),
            })?),
            None => None,
        };
        let io_err = |step| {
            let dir = spec.dir.clone();
            move |source| VmmError::Io { step, dir, source }
        };
        let top = spec.base.first().ok_or_else(|| {
            io_err("find the base disk")(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the boot spec names no base disk",
            ))
        })?;
        let overlay = spec.dir.join(DISK_FILE);
        // A boot gets the bunker's disk size at once; a restore starts at the saved disk's
        // size (the guest's state knows that one) and grows once running.
        let size = match start {
            Start::Boot => Some(spec.disk_bytes),
            Start::Restore => None,
        };
        let output = Command::new(QEMU_IMG_BINARY)
            .args(cmdline::overlay_args(&top.path, top.format, &overlay, size))
            .env_clear()
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| VmmError::Spawn {
                program: QEMU_IMG_BINARY.to_owned(),
                source,
            })?;
        if !output.status.success() {
            return Err(VmmError::Overlay {
                path: overlay,
                detail: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }

        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&overlay, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err("make the overlay private"))?;
        }
        let disks = open_disks(&overlay, &spec.base).map_err(io_err("open the disk chain"))?;
        let disk_fds: Vec<DiskFd> = disks
            .iter()
            .map(|(file, format)| DiskFd {
                fd: file.as_raw_fd(),
                format: *format,
            })
            .collect();
        let (console_out, console_in) = std::io::pipe().map_err(io_err("make the console pipe"))?;
        let (log_out, log_in) = std::io::pipe().map_err(io_err("make the qemu log pipe"))?;
        let runas = lease.as_ref().map(accounts::Lease::run_as);
        let mut command = Command::new(QEMU_BINARY);
        let mut inherited: Vec<i32> = disk_fds.iter().map(|d| d.fd).collect();
        if let crate::network::Nic::Tap(tap) = &spec.nic {
            inherited.push(tap.as_raw_fd());
        }
        inherited.extend(spec.extra_nics.iter().map(|n| n.tap.as_raw_fd()));
        inherit(&mut command, inherited);
        let mut child = command
            .args(self.command(spec, disk_fds, start, runas).args())
            // QEMU needs no variable, and must not see the worker's (its token above all).
            .env_clear()
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(console_in))
            .stderr(Stdio::from(log_in))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                program: QEMU_BINARY.to_owned(),
                source,
            })?;
        let pid = child.id();
        // QEMU has its copies (or failed to start): the worker's go.
        drop(disks);
        // The write ends went to QEMU alone (the Command held the only other copies), so
        // each copy ends when QEMU does.
        let logs = [
            keep_log(
                Ring::new(&spec.dir, CONSOLE_LOG, logs::FILE_CAP),
                console_out,
            ),
            keep_log(Ring::new(&spec.dir, QEMU_LOG, logs::FILE_CAP), log_out),
        ];
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                // Asked to stop, or the QemuVm was dropped: either way the VM goes.
                _ = kill_rx => {
                    if let Err(e) = child.start_kill() {
                        tracing::warn!(error = %e, "kill qemu");
                    }
                    child.wait().await
                }
            };
            let exit = match status {
                Ok(status) => VmExit::Exited(status),
                Err(e) => {
                    tracing::warn!(error = %e, "wait for qemu");
                    VmExit::Unknown
                }
            };
            // The process is reaped: its uid may go to the next VM.
            drop(lease);
            let drained =
                tokio::time::timeout(LOGS_DRAIN_TIMEOUT, futures_util::future::join_all(logs))
                    .await;
            if drained.is_err() {
                tracing::warn!("qemu's logs did not reach their end after its exit");
            }
            // Nobody listening is fine: the VM was dropped.
            let _ = exit_tx.send(Some(exit));
        });
        Ok(QemuVm {
            pid,
            dir: spec.dir.clone(),
            qmp_socket: spec.dir.join(QMP_SOCKET),
            kill: std::sync::Mutex::new(Some(kill_tx)),
            exit: exit_rx,
            monitor: tokio::sync::Mutex::new(()),
        })
    }
}

impl Vmm for QemuVmm {
    fn runtime(&self) -> String {
        format!("qemu/{}", self.accel)
    }

    fn vcpus(&self, cpu_millicores: u64) -> u32 {
        cmdline::vcpus_for(self.accel, cpu_millicores, self.host_cores)
    }

    fn boot<'a>(&'a self, spec: &'a BootSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(self.boot_vm(spec))
    }

    fn restore<'a>(
        &'a self,
        spec: &'a BootSpec,
        state: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(self.restore_vm(spec, state))
    }
}

/// One QEMU process.
struct QemuVm {
    pid: Option<u32>,
    dir: PathBuf,
    qmp_socket: PathBuf,
    /// Taken by the first stop; dropping it (with the VM) kills QEMU too.
    kill: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    exit: watch::Receiver<Option<VmExit>>,
    /// QMP serves one client at a time.
    monitor: tokio::sync::Mutex<()>,
}

impl QemuVm {
    fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    async fn monitor_command(&self, command: &'static str) -> Result<(), VmmError> {
        let _one_at_a_time = self.monitor.lock().await;
        if self.has_exited() {
            return Err(VmmError::Gone);
        }
        qmp::execute(&self.qmp_socket, command)
            .await
            .map_err(|e| monitor_error(command, e))
    }

    /// Connects to QMP, retrying while QEMU has not created the socket yet.
    async fn connect_monitor(&self) -> Result<Session, VmmError> {
        loop {
            if self.has_exited() {
                return Err(VmmError::Gone);
            }
            match Session::connect(&self.qmp_socket).await {
                Ok(session) => return Ok(session),
                Err(qmp::QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    tokio::time::sleep(MIGRATION_POLL).await;
                }
                Err(e) => return Err(monitor_error("qmp_capabilities", e)),
            }
        }
    }

    /// Polls `query-migrate` until the migration (outgoing or incoming) completes.
    async fn wait_migration(
        &self,
        qmp: &mut Session,
        command: &'static str,
    ) -> Result<(), VmmError> {
        loop {
            let info = qmp
                .execute(command, None)
                .await
                .map_err(|e| monitor_error(command, e))?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    return Err(VmmError::Migration {
                        status: status.to_owned(),
                        detail: info
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("no detail")
                            .to_owned(),
                    });
                }
                // Not started yet, or in progress.
                _ => tokio::time::sleep(MIGRATION_POLL).await,
            }
        }
    }

    async fn save_state(&self, state: &Path) -> Result<(), VmmError> {
        let _one_at_a_time = self.monitor.lock().await;
        if self.has_exited() {
            return Err(VmmError::Gone);
        }
        let io_err = |step| {
            let dir = self.dir.clone();
            move |source| VmmError::Io { step, dir, source }
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(io_err("make the migration socket pair"))?;
        ours.set_nonblocking(true)
            .map_err(io_err("make the migration socket non-blocking"))?;
        let mut stream = tokio::net::UnixStream::from_std(ours)
            .map_err(io_err("register the migration socket"))?;
        let mut part = state.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&part)
            .await
            .map_err(io_err("create the state file"))?;
        let receive = tokio::spawn(async move {
            let bytes = tokio::io::copy(&mut stream, &mut file).await?;
            file.sync_all().await?;
            Ok::<u64, std::io::Error>(bytes)
        });
        // Aborting the copy on every early return drops its half-written file handle.
        let mut receive = AbortOnDrop(receive);
        let migrate = async {
            let mut qmp = Session::connect(&self.qmp_socket)
                .await
                .map_err(|e| monitor_error("qmp_capabilities", e))?;
            qmp.execute("stop", None)
                .await
                .map_err(|e| monitor_error("stop", e))?;
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": SAVE_BANDWIDTH_BYTES_PER_S })),
            )
            .await
            .map_err(|e| monitor_error("migrate-set-parameters", e))?;
            qmp.send_fd(SAVE_FD_NAME, theirs.as_fd())
                .await
                .map_err(|e| monitor_error("getfd", e))?;
            // QEMU has its own copy now: the stream ends when QEMU closes it.
            drop(theirs);
            qmp.execute(
                "migrate",
                Some(json!({ "uri": format!("fd:{SAVE_FD_NAME}") })),
            )
            .await
            .map_err(|e| monitor_error("migrate", e))?;
            self.wait_migration(&mut qmp, "query-migrate").await
        };
        let saved = async {
            migrate.await?;
            let bytes = (&mut receive.0)
                .await
                .map_err(|e| io_err("receive the state")(std::io::Error::other(e)))?
                .map_err(io_err("receive the state"))?;
            tracing::debug!(bytes, state = %state.display(), "vm state saved");
            Ok::<_, VmmError>(())
        };
        let result = tokio::time::timeout(MIGRATION_TIMEOUT, saved)
            .await
            .map_err(|_| VmmError::Timeout {
                step: "save the vm state",
                limit: MIGRATION_TIMEOUT,
            })
            .and_then(|r| r);
        match result {
            Ok(()) => std::fs::rename(&part, state).map_err(io_err("rename the state file")),
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }
}

/// The size the guest sees of a disk layer: a raw file's length, a qcow2's virtual size
/// (big-endian at byte 24 of its header).
pub fn disk_virtual_size(path: &Path, format: DiskFormat) -> std::io::Result<u64> {
    match format {
        DiskFormat::Raw => Ok(std::fs::metadata(path)?.len()),
        DiskFormat::Qcow2 => {
            use std::io::Read as _;
            let mut header = [0u8; 32];
            std::fs::File::open(path)?.read_exact(&mut header)?;
            if &header[..4] != b"QFI\xfb" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a qcow2 file", path.display()),
                ));
            }
            let size: [u8; 8] = header[24..32].try_into().expect("8 bytes");
            Ok(u64::from_be_bytes(size))
        }
    }
}

/// Opens the VM's disk chain for QEMU to inherit: the overlay read-write, every base layer
/// read-only (the worker's descriptors are close-on-exec; [`inherit`] hands them over).
fn open_disks(
    overlay: &Path,
    base: &[DiskLayer],
) -> std::io::Result<Vec<(std::fs::File, DiskFormat)>> {
    let top = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(overlay)?;
    let mut disks = vec![(top, DiskFormat::Qcow2)];
    for layer in base {
        let file = std::fs::File::open(&layer.path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("open {}: {e}", layer.path.display()))
        })?;
        disks.push((file, layer.format));
    }
    Ok(disks)
}

/// Lets the QEMU child inherit `fds` (for `-add-fd`) under the numbers they have here.
///
/// The worker's descriptors are all close-on-exec, so no other child (another VM's QEMU, a
/// `qemu-img` started meanwhile by another task) inherits them; only this child clears the
/// flag, between its fork and its exec.
#[allow(unsafe_code)]
fn inherit(command: &mut Command, fds: Vec<i32>) {
    // SAFETY: the closure runs in the forked child before exec and makes only fcntl calls
    // (async-signal-safe); it allocates nothing and takes no lock (the Vec was built before
    // the fork and is only read). The descriptors are open: the caller keeps their files
    // until spawn has returned. None is 0-2 (those are open in the worker), so std's stdio
    // setup, which runs before pre_exec hooks, cannot have replaced them.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
}

/// Copies a QEMU output pipe into `ring` on a thread of its own; the receiver resolves when
/// the pipe has reached its end (or the copy failed, which is logged).
fn keep_log(ring: Ring, from: std::io::PipeReader) -> oneshot::Receiver<()> {
    let (done, finished) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("qemu-log".to_owned())
        .spawn(move || {
            if let Err(e) = ring.keep(from) {
                tracing::warn!(log = %ring.current.display(), error = %e, "copy a qemu log");
            }
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        // The pipe is dropped with the closure: QEMU's writes to it fail, nothing blocks.
        tracing::warn!(error = %e, "start the qemu log copy");
    }
    finished
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn monitor_error(command: &'static str, e: qmp::QmpError) -> VmmError {
    VmmError::Monitor {
        command,
        detail: e.to_string(),
    }
}

async fn wait_exit(mut exit: watch::Receiver<Option<VmExit>>) -> VmExit {
    match exit.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(VmExit::Unknown),
        // The owner task is gone without a word: only at runtime shutdown.
        Err(_) => VmExit::Unknown,
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(self.monitor_command("stop"))
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(self.monitor_command("cont"))
    }

    fn save<'a>(&'a self, state: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(self.save_state(state))
    }

    fn stop(&self) -> BoxFuture<'_, VmExit> {
        let kill = self
            .kill
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(kill) = kill {
            // The owner task may have finished already; then the exit is published.
            let _ = kill.send(());
        }
        Box::pin(wait_exit(self.exit.clone()))
    }

    fn exited(&self) -> BoxFuture<'static, VmExit> {
        Box::pin(wait_exit(self.exit.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_without_cpu_mhz_is_refused_and_forced_accel_wins() {
        let no_mhz = HostVirt {
            cpuinfo: "flags : fpu vmx\n".into(),
            kvm_pvm_loaded: false,
            dev_kvm_exists: true,
        };
        assert!(QemuVmm::new(AccelChoice::Tcg, &no_mhz, 2).is_err());
        let kvm = QemuVmm::new(AccelChoice::Auto, &no_mhz, 2).expect("kvm needs no MHz");
        assert_eq!(kvm.runtime(), "qemu/kvm");
        let pvm = HostVirt {
            cpuinfo: "cpu MHz : 2100.000\nflags : fpu\n".into(),
            kvm_pvm_loaded: true,
            dev_kvm_exists: true,
        };
        assert_eq!(
            QemuVmm::new(AccelChoice::Auto, &pvm, 2)
                .expect("tcg")
                .runtime(),
            "qemu/tcg"
        );
        assert_eq!(
            QemuVmm::new(AccelChoice::Kvm, &pvm, 2)
                .expect("forced")
                .accel(),
            Accel::Kvm
        );
    }
}
