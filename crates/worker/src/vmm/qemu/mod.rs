//! The QEMU driver: `qemu-system-x86_64 -M microvm`, one process per bunker.
//!
//! Boot, in the bunker directory:
//! 1. `qemu-img create` makes `disk.qcow2`, a copy-on-write overlay of the base image, so
//!    the base image is never written and the bunker's writes die with its directory.
//! 2. QEMU starts with the command line of [`cmdline::QemuCommand`]: its agent chardev
//!    connects as a client to the socket the worker already listens on, QMP listens on
//!    `qmp.sock`, the serial console goes to `console.log`, QEMU's own output to `qemu.log`.
//! 3. A task owns the child process: it waits for the exit, or kills the process when asked
//!    or when the [`QemuVm`] is dropped, and publishes the exit status.
//!
//! Pause and resume are the QMP commands `stop` and `cont`; stop is SIGKILL, since the
//! disk is thrown away and nothing in the guest needs a clean shutdown.
//!
//! Save (over QMP, one connection):
//! 1. The worker listens on `migrate.sock` in the VM directory and copies what arrives to
//!    `<state>.part`.
//! 2. `stop` (which drains and flushes the disk), lift the migration bandwidth cap,
//!    `migrate` to `unix:migrate.sock`, and poll `query-migrate` until `completed`.
//! 3. Once the copy has seen the end of the stream and synced the file, rename it to
//!    `<state>`: a state file that exists is whole.
//!
//! The recipe's `exec:cat > FILE` is not used for saving: QEMU sends the `exec:` child
//! SIGTERM, then SIGKILL, if it has not exited 10–20 ms after the stream closes, which on a
//! loaded host can cut off the end of the file.
//!
//! Restore: boot's steps 1–3 with the same command line plus `-incoming "exec:cat STATE"`;
//! poll `query-migrate` until `completed`, then `cont`.

pub mod cmdline;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use self::cmdline::{DISK_FILE, MIGRATE_SOCKET, QEMU_LOG, QMP_SOCKET, QemuCommand};
use self::qmp::Session;
use crate::config::AccelChoice;
use crate::vmm::{Accel, BootSpec, HostVirt, Vm, VmExit, Vmm, VmmError};

const QEMU_BINARY: &str = "qemu-system-x86_64";
const QEMU_IMG_BINARY: &str = "qemu-img";
/// QEMU caps migration at 32 MiB/s by default; a save goes to a local file, so lift it.
const SAVE_BANDWIDTH_BYTES_PER_S: u64 = 16 << 30;
/// Longest a save or a restore may take (a few hundred MB of state under TCG).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `query-migrate` is asked.
const MIGRATION_POLL: Duration = Duration::from_millis(5);

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
        })
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn command(&self, spec: &BootSpec, incoming: Option<&Path>) -> QemuCommand {
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
            incoming: incoming.map(Path::to_owned),
        }
    }

    async fn restore_vm(&self, spec: &BootSpec, state: &Path) -> Result<Box<dyn Vm>, VmmError> {
        let vm = self.start(spec, Some(state)).await?;
        let step = "restore the saved state";
        let loaded = async {
            let mut qmp = vm.connect_monitor().await?;
            vm.wait_migration(&mut qmp, "query-migrate").await?;
            qmp.execute("cont", None)
                .await
                .map_err(|e| monitor_error("cont", e))?;
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
        Ok(Box::new(self.start(spec, None).await?))
    }

    /// Creates the overlay and spawns QEMU (booting, or loading `incoming`).
    async fn start(&self, spec: &BootSpec, incoming: Option<&Path>) -> Result<QemuVm, VmmError> {
        let overlay = spec.dir.join(DISK_FILE);
        let output = Command::new(QEMU_IMG_BINARY)
            .args(cmdline::overlay_args(
                &spec.base_image,
                spec.base_format,
                &overlay,
            ))
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

        let io_err = |step| {
            let dir = spec.dir.clone();
            move |source| VmmError::Io { step, dir, source }
        };
        let log =
            std::fs::File::create(spec.dir.join(QEMU_LOG)).map_err(io_err("create qemu.log"))?;
        let log_err = log.try_clone().map_err(io_err("duplicate qemu.log"))?;
        let mut child = Command::new(QEMU_BINARY)
            .args(self.command(spec, incoming).args())
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                program: QEMU_BINARY.to_owned(),
                source,
            })?;
        let pid = child.id();
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
        let socket = self.dir.join(MIGRATE_SOCKET);
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("remove an old migrate.sock")(e));
            }
            _ => {}
        }
        let listener =
            tokio::net::UnixListener::bind(&socket).map_err(io_err("bind migrate.sock"))?;
        let mut part = state.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let mut file = tokio::fs::File::create(&part)
            .await
            .map_err(io_err("create the state file"))?;
        let receive = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
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
            let uri = format!("unix:{}", socket.to_string_lossy());
            qmp.execute("migrate", Some(json!({ "uri": uri })))
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
        let _ = std::fs::remove_file(&socket);
        match result {
            Ok(()) => std::fs::rename(&part, state).map_err(io_err("rename the state file")),
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }
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
