//! The QEMU command line for one bunker, built as a pure function so it can be tested
//! without QEMU.
//!
//! Every path is absolute: the worker finds leftover QEMU processes after a restart by
//! looking for the bunker directory in `/proc/<pid>/cmdline`.
//!
//! The guest is hostile, so QEMU is confined (see [`SANDBOX`]): a seccomp filter with no
//! fork or exec, no obsolete system calls and no scheduler or resource changes; and, when
//! the worker runs as root, `-runas uid:gid` to the bunker's own unprivileged account once
//! its start-up files are open (kernel, initramfs, sockets, pid file). QEMU opens no disk by
//! path: the worker opens every layer of the chain and QEMU inherits the descriptors
//! (`-add-fd`, one fd set per layer, see [`DiskFd`]), so what QEMU does with its disks later
//! (a migration inactivating them) needs no path the account could not reach. A restore
//! cannot use `exec:cat STATE` either: QEMU starts with `-incoming defer` and the worker
//! hands it the open state file over QMP.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use scaibunker_proto::agent::PORT_NAME;
use serde_json::{Value, json};

use crate::network::addr::GUEST_MAC_TEXT;
use crate::vmm::{Accel, DiskFormat};

/// Files QEMU uses inside the bunker directory.
pub const DISK_FILE: &str = "disk.qcow2";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const PID_FILE: &str = "qemu.pid";

/// The seccomp filter of every QEMU (`-sandbox`). Without `-runas` it also denies the
/// set*id calls (`elevateprivileges=deny`).
///
/// With `-runas` they stay allowed: QEMU 7.2 installs the filter before it drops to the
/// account, so `elevateprivileges=deny` kills it at its own `setgid` (SIGSYS, measured on
/// Debian's 7.2). After the drop they are harmless: all of QEMU's uids and gids are the
/// account's, it holds no capability, `no_new_privs` is set (and exec denied anyway), and
/// QEMU itself checks that `setuid(0)` fails before the guest starts.
pub const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";
/// [`SANDBOX`] for a QEMU that keeps the worker's own (unprivileged) uid.
pub const SANDBOX_NO_RUNAS: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The unprivileged account a QEMU drops to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// One layer of the VM's disk chain as a descriptor QEMU inherits.
///
/// Layer `i` is fd set `i` (`-add-fd fd=FD,set=i`) and block node `d{i}`, whose file is
/// `/dev/fdset/i`. Layer 0 is the VM's overlay, opened read-write; the others are the base
/// chain, top first, opened read-only, so the descriptor QEMU holds cannot write them
/// either. Every qcow2 node names its backing node (`null` at the bottom), so QEMU never
/// follows the backing file name stored in an image.
///
/// QEMU 7.2 matches a `/dev/fdset/N` open to a descriptor of the same access mode. Measured:
/// with `-blockdev` (`auto-read-only` off) a save's `bdrv_inactivate_all` and a restore's
/// activation reopen nothing, so one descriptor per layer suffices; with `-drive` (which
/// turns `auto-read-only` on) the same save under `-runas` fails reopening by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFd {
    pub fd: i32,
    pub format: DiskFormat,
}

/// Whether QEMU boots the guest or waits for a saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Boot,
    /// `-incoming defer`: the VM waits, paused, for `migrate-incoming` and then `cont`.
    Restore,
}

/// Everything the command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand {
    pub accel: Accel,
    /// kHz of the host TSC, given to the guest under TCG.
    pub tsc_khz: Option<u64>,
    pub memory_mb: u64,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub dir: PathBuf,
    pub agent_socket: PathBuf,
    pub hostname: String,
    /// The overlay, then its base chain top first; never empty.
    pub disks: Vec<DiskFd>,
    pub start: Start,
    /// Drop to this account once the files are open; `None` keeps the worker's uid.
    pub runas: Option<RunAs>,
    /// The host side of the guest's NIC.
    pub nic: NicArg,
    /// Inherited tap descriptors and MACs of the `transit` NICs after it.
    pub extra_nics: Vec<(i32, [u8; 6])>,
}

/// The backend of the guest's one NIC (`netdev` `n0`); the device is the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicArg {
    /// A hub port with nothing else on the hub: frames go nowhere.
    Unplugged,
    /// An inherited tap descriptor (made in the bunker's namespace).
    TapFd(i32),
}

impl QemuCommand {
    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut line = String::from("console=ttyS0 quiet panic=-1");
        // Under TCG the microvm guest hangs calibrating its TSC unless told the frequency.
        if self.accel == Accel::Tcg {
            if let Some(khz) = self.tsc_khz {
                line.push_str(&format!(" tsc_early_khz={khz}"));
            }
            line.push_str(" tsc=reliable");
        }
        line.push_str(&format!(" scaibunker.hostname={}", self.hostname));
        line
    }

    /// The arguments after `qemu-system-x86_64`.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        match self.accel {
            Accel::Tcg => push(&["-accel", "tcg", "-M", "microvm", "-cpu", "max"]),
            Accel::Kvm => push(&["-accel", "kvm", "-M", "microvm", "-cpu", "host"]),
        }
        let memory = self.memory_mb.to_string();
        let vcpus = self.vcpus.to_string();
        push(&["-m", &memory, "-smp", &vcpus]);
        push(&["-nographic", "-no-reboot", "-nodefaults"]);
        let qmp = file_arg("unix:", &self.dir.join(QMP_SOCKET));
        let pidfile = path_str(&self.dir.join(PID_FILE));
        let kernel = path_str(&self.kernel);
        let initrd = path_str(&self.initramfs);
        let append = self.kernel_cmdline();
        let chardev = format!(
            "socket,id=agent,path={}",
            escape_commas(&path_str(&self.agent_socket))
        );
        let port = format!("virtserialport,chardev=agent,name={PORT_NAME}");
        // The serial console is QEMU's stdout, a pipe the worker keeps a capped copy of
        // (`logs`); QEMU's own messages go to stderr.
        push(&["-serial", "stdio"]);
        push(&["-qmp", &format!("{qmp},server=on,wait=off")]);
        push(&["-pidfile", &pidfile]);
        push(&["-kernel", &kernel, "-initrd", &initrd, "-append", &append]);
        for (set, disk) in self.disks.iter().enumerate() {
            push(&["-add-fd", &format!("fd={},set={set}", disk.fd)]);
        }
        // Bottom first: a node's backing must exist when it is created.
        for node in blockdevs(&self.disks).iter().rev() {
            push(&["-blockdev", &node.to_string()]);
        }
        push(&["-device", "virtio-blk-device,drive=d0"]);
        push(&["-chardev", &chardev]);
        push(&["-device", "virtio-serial-device", "-device", &port]);
        match self.nic {
            NicArg::Unplugged => push(&["-netdev", "hubport,id=n0,hubid=0"]),
            NicArg::TapFd(fd) => push(&["-netdev", &format!("tap,id=n0,fd={fd},vhost=off")]),
        }
        let nic = format!("virtio-net-device,netdev=n0,mac={GUEST_MAC_TEXT}");
        push(&["-device", &nic]);
        for (i, (fd, mac)) in self.extra_nics.iter().enumerate() {
            let mac = crate::network::transit::mac_text(*mac);
            push(&["-netdev", &format!("tap,id=t{i},fd={fd},vhost=off")]);
            push(&[
                "-device",
                &format!("virtio-net-device,netdev=t{i},mac={mac}"),
            ]);
        }
        match self.runas {
            Some(RunAs { uid, gid }) => {
                push(&["-sandbox", SANDBOX, "-runas", &format!("{uid}:{gid}")]);
            }
            None => push(&["-sandbox", SANDBOX_NO_RUNAS]),
        }
        if self.start == Start::Restore {
            push(&["-incoming", "defer"]);
        }
        args
    }
}

/// The `-blockdev` nodes of a disk chain, top first (see [`DiskFd`]).
fn blockdevs(disks: &[DiskFd]) -> Vec<Value> {
    disks
        .iter()
        .enumerate()
        .map(|(i, disk)| {
            let read_only = i > 0;
            let mut node = json!({
                "node-name": format!("d{i}"),
                "read-only": read_only,
                "file": {
                    "driver": "file",
                    "filename": format!("/dev/fdset/{i}"),
                    "read-only": read_only,
                },
            });
            match disk.format {
                DiskFormat::Raw => node["driver"] = json!("raw"),
                DiskFormat::Qcow2 => {
                    node["driver"] = json!("qcow2");
                    node["backing"] = match disks.get(i + 1) {
                        Some(_) => json!(format!("d{}", i + 1)),
                        None => Value::Null,
                    };
                }
            }
            node
        })
        .collect()
}

/// The `qemu-img` arguments that make `overlay` a copy-on-write layer over `base`, of
/// `size_bytes` (what the guest sees; past the base it reads as zeros) or the base's size.
pub fn overlay_args(
    base: &Path,
    format: DiskFormat,
    overlay: &Path,
    size_bytes: Option<u64>,
) -> Vec<OsString> {
    let base = path_str(base);
    let format = match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    // `-b` takes a file name, not an option string: commas need no escaping here.
    ["create", "-q", "-f", "qcow2", "-F", format, "-b", &base]
        .iter()
        .map(OsString::from)
        .chain([overlay.as_os_str().to_owned()])
        .chain(size_bytes.map(|n| OsString::from(n.to_string())))
        .collect()
}

/// vCPUs for a request: one per started 1000 millicores, at most the host's cores.
/// Under TCG always one: TCG emulates each vCPU in a host thread, so on the 2-core hosts we
/// run on, a second vCPU only competes with QEMU's own I/O thread and the other VM.
pub fn vcpus_for(accel: Accel, cpu_millicores: u64, host_cores: u32) -> u32 {
    match accel {
        Accel::Tcg => 1,
        Accel::Kvm => {
            let wanted = cpu_millicores.div_ceil(1000).max(1);
            u32::try_from(wanted)
                .unwrap_or(u32::MAX)
                .min(host_cores.max(1))
        }
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn file_arg(prefix: &str, path: &Path) -> String {
    format!("{prefix}{}", path_str(path))
}

/// QEMU option values separate keys by commas; a literal comma is written twice.
fn escape_commas(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(accel: Accel) -> QemuCommand {
        QemuCommand {
            accel,
            tsc_khz: Some(2_100_000),
            memory_mb: 256,
            vcpus: 1,
            kernel: "/img/vmlinux".into(),
            initramfs: "/img/initramfs.cpio.gz".into(),
            dir: "/data/bunkers/b1".into(),
            agent_socket: "/data/bunkers/b1/agent.sock".into(),
            hostname: "box".into(),
            disks: vec![
                DiskFd {
                    fd: 7,
                    format: DiskFormat::Qcow2,
                },
                DiskFd {
                    fd: 8,
                    format: DiskFormat::Raw,
                },
            ],
            start: Start::Boot,
            runas: Some(RunAs {
                uid: 20003,
                gid: 20003,
            }),
            nic: NicArg::Unplugged,
            extra_nics: Vec::new(),
        }
    }

    #[test]
    fn every_vm_has_the_same_nic_on_a_hub_port_or_its_tap() {
        let mut c = command(Accel::Tcg);
        let line = joined(&c);
        assert!(line.contains("-netdev hubport,id=n0,hubid=0"), "{line}");
        assert!(line.contains("-device virtio-net-device,netdev=n0,mac=02:5b:00:00:00:02"));
        c.nic = NicArg::TapFd(9);
        let line = joined(&c);
        assert!(line.contains("-netdev tap,id=n0,fd=9,vhost=off"), "{line}");
        assert!(line.contains("-device virtio-net-device,netdev=n0,mac=02:5b:00:00:00:02"));
    }

    fn joined(c: &QemuCommand) -> String {
        c.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn builds_the_tcg_microvm_command_line() {
        let c = command(Accel::Tcg);
        assert_eq!(
            joined(&c),
            "-accel tcg -M microvm -cpu max -m 256 -smp 1 -nographic -no-reboot -nodefaults \
             -serial stdio \
             -qmp unix:/data/bunkers/b1/qmp.sock,server=on,wait=off \
             -pidfile /data/bunkers/b1/qemu.pid \
             -kernel /img/vmlinux -initrd /img/initramfs.cpio.gz \
             -append console=ttyS0 quiet panic=-1 tsc_early_khz=2100000 tsc=reliable scaibunker.hostname=box \
             -add-fd fd=7,set=0 -add-fd fd=8,set=1 \
             -blockdev {\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"/dev/fdset/1\",\"read-only\":true},\"node-name\":\"d1\",\"read-only\":true} \
             -blockdev {\"backing\":\"d1\",\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"/dev/fdset/0\",\"read-only\":false},\"node-name\":\"d0\",\"read-only\":false} \
             -device virtio-blk-device,drive=d0 \
             -chardev socket,id=agent,path=/data/bunkers/b1/agent.sock \
             -device virtio-serial-device -device virtserialport,chardev=agent,name=scaibunker.agent \
             -netdev hubport,id=n0,hubid=0 -device virtio-net-device,netdev=n0,mac=02:5b:00:00:00:02 \
             -sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny \
             -runas 20003:20003"
        );
        // The agent socket is the worker's listener: QEMU must connect, never serve.
        assert!(!joined(&c).contains("agent.sock,server"));
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_tsc_hints() {
        let c = command(Accel::Kvm);
        let line = joined(&c);
        assert!(line.starts_with("-accel kvm -M microvm -cpu host "));
        assert!(!line.contains("tsc"));
        assert_eq!(
            c.kernel_cmdline(),
            "console=ttyS0 quiet panic=-1 scaibunker.hostname=box"
        );
    }

    #[test]
    fn escapes_commas_in_option_values() {
        let mut c = command(Accel::Tcg);
        c.dir = "/data/a,b".into();
        c.agent_socket = "/data/a,b/agent.sock".into();
        let line = joined(&c);
        assert!(line.contains("path=/data/a,,b/agent.sock"));
    }

    #[test]
    fn every_layer_is_an_fd_set_and_names_its_backing_node() {
        let mut c = command(Accel::Tcg);
        c.disks = [
            (3, DiskFormat::Qcow2),
            (4, DiskFormat::Qcow2),
            (5, DiskFormat::Raw),
        ]
        .map(|(fd, format)| DiskFd { fd, format })
        .into();
        let nodes = blockdevs(&c.disks);
        assert_eq!(nodes[0]["backing"], "d1");
        assert_eq!(nodes[1]["backing"], "d2");
        assert!(nodes[2].get("backing").is_none(), "raw has no backing");
        assert_eq!(nodes[0]["read-only"], false);
        for (i, node) in nodes.iter().enumerate() {
            assert_eq!(node["file"]["filename"], format!("/dev/fdset/{i}"));
            if i > 0 {
                assert_eq!(node["read-only"], true);
                assert_eq!(node["file"]["read-only"], true);
            }
        }
        // A qcow2 at the bottom gets no backing rather than the name stored in it.
        c.disks.truncate(2);
        assert_eq!(blockdevs(&c.disks)[1]["backing"], Value::Null);
        let line = joined(&c);
        assert!(line.contains("-add-fd fd=3,set=0 -add-fd fd=4,set=1 -blockdev"));
        // No disk path at all: QEMU opens no disk by name.
        assert!(!line.contains(".qcow2") && !line.contains(".ext4"));
        assert!(!line.contains("-drive"));
    }

    #[test]
    fn overlay_points_at_the_raw_base_with_the_bunkers_disk_size() {
        let args: Vec<String> = overlay_args(
            Path::new("/img/tiny.ext4"),
            DiskFormat::Raw,
            Path::new("/d/disk.qcow2"),
            Some(2 << 30),
        )
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
        assert_eq!(
            args,
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                "/img/tiny.ext4",
                "/d/disk.qcow2",
                "2147483648"
            ]
        );
    }

    #[test]
    fn a_restore_is_the_same_command_line_waiting_for_the_state() {
        let boot = command(Accel::Tcg);
        let mut restore = boot.clone();
        restore.start = Start::Restore;
        let (boot, restore) = (boot.args(), restore.args());
        assert_eq!(restore[..boot.len()], boot[..]);
        // Nothing to spawn: the state file comes over QMP (`getfd`).
        assert_eq!(
            restore[boot.len()..],
            ["-incoming", "defer"].map(OsString::from)
        );
    }

    #[test]
    fn without_an_account_qemu_also_loses_the_set_id_calls() {
        let mut c = command(Accel::Tcg);
        c.runas = None;
        let line = joined(&c);
        assert!(line.ends_with(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(!line.contains("-runas"));
    }

    #[test]
    fn overlay_names_the_backing_format() {
        let args = overlay_args(
            Path::new("/t/disk.qcow2"),
            DiskFormat::Qcow2,
            Path::new("/d/disk.qcow2"),
            None,
        );
        assert_eq!(args[5], "qcow2");
        assert_eq!(args[7], "/t/disk.qcow2");
        // No size: the base's, as a restore needs.
        assert_eq!(args.len(), 9);
    }

    #[test]
    fn vcpus_round_up_cap_at_host_and_stay_one_under_tcg() {
        assert_eq!(vcpus_for(Accel::Tcg, 4000, 8), 1);
        assert_eq!(vcpus_for(Accel::Kvm, 500, 8), 1);
        assert_eq!(vcpus_for(Accel::Kvm, 1000, 8), 1);
        assert_eq!(vcpus_for(Accel::Kvm, 1001, 8), 2);
        assert_eq!(vcpus_for(Accel::Kvm, 16000, 8), 8);
        assert_eq!(vcpus_for(Accel::Kvm, 0, 8), 1);
    }
}
