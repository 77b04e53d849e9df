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

pub mod cmdline;
pub mod qmp;

use std::path::PathBuf;
use std::process::Stdio;

use futures_util::future::BoxFuture;
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use self::cmdline::{DISK_FILE, QEMU_LOG, QMP_SOCKET, QemuCommand};
use crate::config::AccelChoice;
use crate::vmm::{Accel, BootSpec, HostVirt, Vm, VmExit, Vmm, VmmError};

const QEMU_BINARY: &str = "qemu-system-x86_64";
const QEMU_IMG_BINARY: &str = "qemu-img";

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

    fn command(&self, spec: &BootSpec) -> QemuCommand {
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
        }
    }

    async fn boot_vm(&self, spec: &BootSpec) -> Result<Box<dyn Vm>, VmmError> {
        let overlay = spec.dir.join(DISK_FILE);
        let output = Command::new(QEMU_IMG_BINARY)
            .args(cmdline::overlay_args(&spec.base_image, &overlay))
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
            .args(self.command(spec).args())
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
        Ok(Box::new(QemuVm {
            pid,
            qmp_socket: spec.dir.join(QMP_SOCKET),
            kill: std::sync::Mutex::new(Some(kill_tx)),
            exit: exit_rx,
            monitor: tokio::sync::Mutex::new(()),
        }))
    }
}

impl Vmm for QemuVmm {
    fn runtime(&self) -> String {
        format!("qemu/{}", self.accel)
    }

    fn boot<'a>(&'a self, spec: &'a BootSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(self.boot_vm(spec))
    }
}

/// One QEMU process.
struct QemuVm {
    pid: Option<u32>,
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
            .map_err(|e| VmmError::Monitor {
                command,
                detail: e.to_string(),
            })
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
