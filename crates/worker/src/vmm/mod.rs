//! The VMM seam: the closed set of operations the worker needs from a virtual machine
//! monitor, and the accelerator decision shared by drivers.
//!
//! - [`Vmm::boot`] starts a VM from a [`BootSpec`] and returns a [`Vm`].
//! - [`Vm::save`] freezes a VM and writes its memory and device state to a file;
//!   [`Vmm::restore`] starts a VM from such a file, with the same [`BootSpec`] shape (memory,
//!   vCPUs, kernel, initramfs, command line) and a disk that holds what the saved guest saw.
//! - [`Vm::pause`], [`Vm::resume`] and [`Vm::stop`] act on it; [`Vm::exited`] resolves when
//!   its process is gone, for whatever reason.
//!
//! Invariants: a driver writes only inside `BootSpec::dir` (and the state file a save is
//! given) and never writes the base disk; dropping a [`Vm`] kills its process, so no VM
//! outlives the handle that owns it. The guest is hostile: `BootSpec::dir` is private to
//! the worker ([`create_private_dir`]), and a VM process gets none of the worker's
//! environment (its token) and none of its privileges once the guest runs.
//! The agent channel is not the driver's: the supervisor binds `BootSpec::agent_socket`
//! before boot, and the driver only connects the guest's port to it.

pub mod qemu;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use futures_util::future::BoxFuture;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    /// The bunker's private directory; exists and is empty but for the agent socket.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The disk chain the VM's private copy-on-write overlay sits on, top first: the
    /// image's ext4 file alone, or a template's frozen overlay over it, or a bunker's frozen
    /// layers over either. Read-only to the driver, and never empty.
    ///
    /// The whole chain, not just its top: the driver opens every layer itself and gives the
    /// VMM exactly these, so it never follows a backing file name stored in a layer (which
    /// a compromised VMM could have rewritten) and never opens a disk by path.
    pub base: Vec<DiskLayer>,
    /// The size of the guest's disk (the bunker's `disk_mb`), at least the top base layer's:
    /// a boot's overlay has it from the start; a restore's grows to it once the VM runs.
    pub disk_bytes: u64,
    /// A unix socket the worker already listens on; the guest's agent port connects to it.
    pub agent_socket: PathBuf,
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    /// Already validated as a host name (letters, digits, `-` and `.`).
    pub hostname: String,
    /// The host side of the guest's one NIC (every VM has the same NIC, so a template
    /// restores into any bunker): none, or the bunker's tap.
    pub nic: crate::network::Nic,
    /// `transit` NICs after it, in order: a tap on a host bridge and the guest's MAC. A VM
    /// with any boots cold (a template has one NIC).
    pub extra_nics: Vec<ExtraNic>,
}

/// A `transit` NIC as the VMM gets it.
#[derive(Debug, Clone)]
pub struct ExtraNic {
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    pub mac: [u8; 6],
}

impl PartialEq for ExtraNic {
    fn eq(&self, other: &Self) -> bool {
        use std::os::fd::AsRawFd as _;
        self.tap.as_raw_fd() == other.tap.as_raw_fd() && self.mac == other.mac
    }
}

impl Eq for ExtraNic {}

/// Creates `dir` (and missing parents) readable by the worker alone (mode 0700), so that no
/// VM process, whatever account it dropped to, can open what lies inside by path.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // An existing directory keeps its mode otherwise.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// One read-only layer of a base disk chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayer {
    pub path: PathBuf,
    pub format: DiskFormat,
}

impl DiskLayer {
    /// An image's raw ext4 file: always the bottom of a chain.
    pub fn raw(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: DiskFormat::Raw,
        }
    }

    /// A frozen qcow2 overlay (a template's disk, a bunker's earlier layer).
    pub fn qcow2(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: DiskFormat::Qcow2,
        }
    }
}

/// The format of a base disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// An image's raw ext4 file.
    Raw,
    /// A template's overlay (itself over an image).
    Qcow2,
}

/// How a VM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    Exited(ExitStatus),
    /// The driver could not learn the status (waiting on the process failed).
    Unknown,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(status) => write!(f, "{status}"),
            Self::Unknown => write!(f, "unknown exit status"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("create the disk overlay {}: {detail}", path.display())]
    Overlay { path: PathBuf, detail: String },
    #[error("spawn {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} in {}", dir.display())]
    Io {
        step: &'static str,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("monitor command `{command}` failed: {detail}")]
    Monitor {
        command: &'static str,
        detail: String,
    },
    #[error("the vm process has exited")]
    Gone,
    #[error("migration {status}: {detail}")]
    Migration { status: String, detail: String },
    #[error("every one of the {count} qemu accounts from uid {base} is in use")]
    NoAccount { base: u32, count: u32 },
    #[error("{step} did not finish within {limit:?}")]
    Timeout {
        step: &'static str,
        limit: std::time::Duration,
    },
}

/// A virtual machine monitor driver.
pub trait Vmm: Send + Sync + 'static {
    /// Driver and accelerator, e.g. `qemu/tcg`.
    fn runtime(&self) -> String;

    /// vCPUs a VM asking for `cpu_millicores` gets: part of a saved VM's shape.
    fn vcpus(&self, cpu_millicores: u64) -> u32;

    /// Starts the VM; returns as soon as the process runs (not when the guest is ready).
    fn boot<'a>(&'a self, spec: &'a BootSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>>;

    /// Starts a VM from the state [`Vm::save`] wrote to `state`; returns once the guest
    /// runs again. `spec` must have the saved VM's shape, and its base disk must hold what
    /// the saved guest saw.
    fn restore<'a>(
        &'a self,
        spec: &'a BootSpec,
        state: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>>;
}

/// One running VM. Dropping it kills the VM.
pub trait Vm: Send + Sync {
    /// The host process id, for diagnostics and tests.
    fn pid(&self) -> Option<u32>;

    /// Freezes the guest's vCPUs; memory and devices stay.
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>>;

    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>>;

    /// Freezes the guest and writes its memory and device state to `state`, once its disk
    /// writes are flushed. The VM stays frozen; stop it, or resume it.
    fn save<'a>(&'a self, state: &'a Path) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Kills the VM and waits until its process is gone. Idempotent.
    fn stop(&self) -> BoxFuture<'_, VmExit>;

    /// Resolves when the VM process has exited.
    fn exited(&self) -> BoxFuture<'static, VmExit>;
}

/// The accelerator a driver runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// What the host offers, read from the system by [`HostVirt::probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVirt {
    pub cpuinfo: String,
    /// `/sys/module/kvm_pvm` exists: `/dev/kvm` is PVM, which runs stock guests at
    /// emulation speed and crashes them.
    pub kvm_pvm_loaded: bool,
    pub dev_kvm_exists: bool,
}

impl HostVirt {
    pub fn probe() -> Self {
        Self {
            cpuinfo: std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            kvm_pvm_loaded: std::path::Path::new("/sys/module/kvm_pvm").exists(),
            dev_kvm_exists: std::path::Path::new("/dev/kvm").exists(),
        }
    }

    /// KVM only with `vmx` or `svm` as a whole word in the CPU flags, no PVM module and a
    /// `/dev/kvm`; TCG otherwise.
    pub fn detect_accel(&self) -> Accel {
        let hardware_virt = self
            .cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ':'))
            .any(|w| w == "vmx" || w == "svm");
        if hardware_virt && !self.kvm_pvm_loaded && self.dev_kvm_exists {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// The first `cpu MHz` of `/proc/cpuinfo` in kHz, for the guest's TSC under TCG.
    pub fn cpu_khz(&self) -> Option<u64> {
        self.cpuinfo
            .lines()
            .filter(|l| l.starts_with("cpu MHz"))
            .find_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .filter(|mhz| mhz.is_finite() && *mhz > 0.0)
            .map(|mhz| (mhz * 1000.0).round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(flags: &str, pvm: bool, dev_kvm: bool) -> HostVirt {
        HostVirt {
            cpuinfo: format!(
                "processor\t: 0\ncpu MHz\t\t: 2100.000\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
            ),
            kvm_pvm_loaded: pvm,
            dev_kvm_exists: dev_kvm,
        }
    }

    #[test]
    fn chooses_kvm_only_with_real_hardware_virtualisation() {
        let cases = [
            ("fpu vme vmx sse", false, true, Accel::Kvm),
            ("fpu svm sse", false, true, Accel::Kvm),
            ("fpu vmx sse", true, true, Accel::Tcg),
            ("fpu vmx sse", false, false, Accel::Tcg),
            ("fpu sse hypervisor", false, true, Accel::Tcg),
            // Words that merely contain the letters do not count.
            ("fpu vmxe svmx_ext tsc", false, true, Accel::Tcg),
            ("", false, true, Accel::Tcg),
        ];
        for (flags, pvm, dev_kvm, want) in cases {
            assert_eq!(
                host(flags, pvm, dev_kvm).detect_accel(),
                want,
                "{flags} {pvm} {dev_kvm}"
            );
        }
    }

    #[test]
    fn reads_cpu_khz_from_the_first_mhz_line() {
        assert_eq!(host("", false, false).cpu_khz(), Some(2_100_000));
        let odd = HostVirt {
            cpuinfo: "cpu MHz\t: 2399.998\ncpu MHz\t: 100\n".into(),
            kvm_pvm_loaded: false,
            dev_kvm_exists: false,
        };
        assert_eq!(odd.cpu_khz(), Some(2_399_998));
        let none = HostVirt {
            cpuinfo: "processor: 0\n".into(),
            kvm_pvm_loaded: false,
            dev_kvm_exists: false,
        };
        assert_eq!(none.cpu_khz(), None);
    }
}
