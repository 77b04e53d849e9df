//! `init`: what the agent does as PID 1 of a bunker's microVM.
//!
//! The initramfs has mounted `/proc`, `/sys` and `/dev` (devtmpfs) and switched root.
//! Steps, each logged and skipped on failure because PID 1 must never exit (the kernel
//! panics when it does):
//! 1. mount devpts on `/dev/pts`, a tmpfs on `/dev/shm`, and a tmpfs on `/tmp` when `/tmp`
//!    is not writable;
//! 2. set the hostname from `scaibunker.hostname=NAME` on the kernel command line and
//!    write `/etc/hostname` (and a `127.0.1.1` line in `/etc/hosts`);
//! 3. bring `lo` up by running `ip link set lo up` when the image has `ip` (doing it
//!    in-process needs an interface ioctl or netlink, which rustix does not offer safely);
//! 4. make sure the account `user` (uid/gid 1000, home `/home/user`) exists, by appending
//!    to `/etc/passwd`, `/etc/group` (and `/etc/shadow`, locked) directly, since static
//!    glibc cannot use NSS; an image whose uid 1000 has another name gets `user` as a
//!    second name for it;
//! 5. run `/proc/self/exe serve --port auto` as a child, restart it 1 s after it dies,
//!    and reap every zombie reparented to PID 1.
//!
//! Run as any other pid (debugging), steps 1–4 are skipped so that a development
//! machine is never altered; the agent becomes a child subreaper and supervises `serve`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, chown};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use rustix::io::Errno;
use rustix::mount::{MountFlags, mount};
use rustix::process::{Pid, WaitOptions, getpid};

use crate::account::{self, USER_HOME, USER_ID, USER_NAME};
use crate::log;

/// Pause before restarting a `serve` child that died.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// Kernel command-line parameter carrying the hostname.
const HOSTNAME_PARAM: &str = "scaibunker.hostname=";

/// Why one init step failed. None is fatal.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {fstype} on `{target}`")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("invalid hostname `{0}` on the kernel command line")]
    BadHostname(String),
    #[error("{step} `{path}`")]
    File {
        step: &'static str,
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("set the hostname")]
    SetHostname(#[source] io::Error),
    #[error("run `ip link set lo up`")]
    Loopback(#[source] io::Error),
    #[error("start `serve`")]
    SpawnServe(#[source] io::Error),
}

fn file_err(step: &'static str, path: &'static str) -> impl FnOnce(io::Error) -> InitError {
    move |source| InitError::File { step, path, source }
}

/// Runs the init steps, then supervises `serve` for ever.
pub fn run() -> ! {
    let pid = getpid();
    if pid.is_init() {
        setup_system();
    } else {
        log!(
            "init running as pid {} rather than 1: skipping system setup",
            pid.as_raw_nonzero()
        );
        if let Err(e) = rustix::process::set_child_subreaper(Some(pid)) {
            log!("become a child subreaper: {e}");
        }
    }
    supervise()
}

/// One step of [`setup_system`].
type InitStep = fn() -> Result<(), InitError>;

fn setup_system() {
    let steps: [(&str, InitStep); 6] = [
        ("devpts", mount_devpts),
        ("/dev/shm", mount_shm),
        ("/tmp", mount_tmp),
        ("hostname", set_hostname),
        ("loopback", bring_up_loopback),
        ("user account", ensure_user_account),
    ];
    for (name, step) in steps {
        if let Err(e) = step() {
            log!("init step {name}: {}", crate::error_chain(&e));
        }
    }
}

fn is_mountpoint(target: &str) -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some(target))
    })
}

fn mount_fs(
    fstype: &'static str,
    target: &'static str,
    flags: MountFlags,
    data: &'static std::ffi::CStr,
) -> Result<(), InitError> {
    let err = |source: io::Error| InitError::Mount {
        fstype,
        target,
        source,
    };
    match fs::DirBuilder::new().mode(0o755).create(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    mount(fstype, target, fstype, flags, data).map_err(|e| err(e.into()))
}

fn mount_devpts() -> Result<(), InitError> {
    if is_mountpoint("/dev/pts") {
        return Ok(());
    }
    // gid 5 is `tty` on Debian-like images, which terminal programs expect.
    let flags = MountFlags::NOSUID | MountFlags::NOEXEC;
    mount_fs("devpts", "/dev/pts", flags, c"gid=5,mode=620,ptmxmode=666")
}

fn mount_shm() -> Result<(), InitError> {
    if is_mountpoint("/dev/shm") {
        return Ok(());
    }
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_fs("tmpfs", "/dev/shm", flags, c"mode=1777")
}

/// Mounts over `/tmp` whenever it is not writable, be it on a read-only root or a
/// read-only mount of its own.
fn mount_tmp() -> Result<(), InitError> {
    if tmp_is_writable() {
        return Ok(());
    }
    let flags = MountFlags::NOSUID | MountFlags::NODEV;
    mount_fs("tmpfs", "/tmp", flags, c"mode=1777")
}

fn tmp_is_writable() -> bool {
    let probe = Path::new("/tmp").join(format!(".scaibunker-probe-{}", std::process::id()));
    let ok = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// The value of `scaibunker.hostname=` in a kernel command line.
fn hostname_from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .find_map(|param| param.strip_prefix(HOSTNAME_PARAM))
}

/// A hostname is 1–64 bytes of letters, digits, `-` and `.`.
pub(crate) fn is_valid_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn set_hostname() -> Result<(), InitError> {
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(file_err("read", "/proc/cmdline"))?;
    let Some(name) = hostname_from_cmdline(&cmdline) else {
        return Ok(());
    };
    if !is_valid_hostname(name) {
        return Err(InitError::BadHostname(name.to_owned()));
    }
    rustix::system::sethostname(name.as_bytes()).map_err(|e| InitError::SetHostname(e.into()))?;
    fs::write("/etc/hostname", format!("{name}\n")).map_err(file_err("write", "/etc/hostname"))?;
    let hosts = match fs::read_to_string("/etc/hosts") {
        Ok(hosts) => hosts,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(file_err("read", "/etc/hosts")(e)),
    };
    if let Some(line) = hosts_line(&hosts, name) {
        append("/etc/hosts", &hosts, &line)?;
    }
    Ok(())
}

/// The `/etc/hosts` line to append so that `name` resolves, if none names it yet.
pub(crate) fn hosts_line(hosts: &str, name: &str) -> Option<String> {
    let known = hosts.lines().any(|line| {
        let line = line.split('#').next().unwrap_or_default();
        line.split_whitespace().skip(1).any(|alias| alias == name)
    });
    (!known).then(|| format!("127.0.1.1\t{name}\n"))
}

fn bring_up_loopback() -> Result<(), InitError> {
    let Some(ip) = ["/sbin/ip", "/usr/sbin/ip", "/bin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        log!("no `ip` in the image; loopback left as the kernel set it");
        return Ok(());
    };
    let status = Command::new(ip)
        .args(["link", "set", "lo", "up"])
        .stdin(Stdio::null())
        .status()
        .map_err(InitError::Loopback)?;
    if !status.success() {
        return Err(InitError::Loopback(io::Error::other(format!(
            "`{ip}` exited with {status}"
        ))));
    }
    Ok(())
}

/// Appends `line` to the file at `path` whose current content is `content`, adding the
/// newline a last line may lack.
fn append(path: &'static str, content: &str, line: &str) -> Result<(), InitError> {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(file_err("open", path))?;
    let sep = if content.is_empty() || content.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    file.write_all(format!("{sep}{line}").as_bytes())
        .map_err(file_err("append to", path))
}

fn read_or_empty(path: &'static str) -> Result<String, InitError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(file_err("read", path)(e)),
    }
}

/// Lines to append to passwd, group and shadow for `user`; `None` where nothing is needed.
fn missing_account_lines(
    passwd: &str,
    group: &str,
    shadow: Option<&str>,
    shell: &str,
) -> [Option<String>; 3] {
    let users = account::parse_passwd(passwd);
    let passwd_line = (!users.iter().any(|u| u.name == USER_NAME)).then(|| {
        if let Some(other) = users.iter().find(|u| u.uid == USER_ID) {
            // Legal, and what the protocol promises: `user` is uid 1000 in every bunker.
            log!(
                "uid {USER_ID} already belongs to `{}`; adding `{USER_NAME}` as another name",
                other.name
            );
        }
        format!("{USER_NAME}:x:{USER_ID}:{USER_ID}:ScaiBunker user:{USER_HOME}:{shell}\n")
    });
    let groups = account::parse_group(group);
    let group_line = (!groups.iter().any(|(name, _)| name == USER_NAME))
        .then(|| format!("{USER_NAME}:x:{USER_ID}:\n"));
    let shadow_line = shadow.and_then(|shadow| {
        let present = shadow
            .lines()
            .any(|l| l.split(':').next() == Some(USER_NAME));
        // A locked password: the account is reached through the agent, never a login.
        (passwd_line.is_some() && !present).then(|| format!("{USER_NAME}:!:19000:0:99999:7:::\n"))
    });
    [passwd_line, group_line, shadow_line]
}

fn ensure_user_account() -> Result<(), InitError> {
    let passwd = read_or_empty("/etc/passwd")?;
    let group = read_or_empty("/etc/group")?;
    // Images without shadow passwords have no /etc/shadow to keep in step.
    let shadow = fs::read_to_string("/etc/shadow").ok();
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let [passwd_line, group_line, shadow_line] =
        missing_account_lines(&passwd, &group, shadow.as_deref(), shell);
    if let Some(line) = group_line {
        append("/etc/group", &group, &line)?;
    }
    if let Some(line) = passwd_line {
        append("/etc/passwd", &passwd, &line)?;
    }
    if let (Some(line), Some(shadow)) = (shadow_line, shadow.as_deref()) {
        append("/etc/shadow", shadow, &line)?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(USER_HOME)
        .map_err(file_err("create", USER_HOME))?;
    chown(USER_HOME, Some(USER_ID), Some(USER_ID)).map_err(file_err("chown", USER_HOME))
}

fn spawn_serve() -> Result<Pid, InitError> {
    let child = Command::new("/proc/self/exe")
        .args(["serve", "--port", "auto"])
        .stdin(Stdio::null())
        .spawn()
        .map_err(InitError::SpawnServe)?;
    i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| InitError::SpawnServe(io::Error::other("the kernel returned pid 0")))
}

/// Keeps one `serve` child running and reaps every child, for ever.
fn supervise() -> ! {
    let mut serve: Option<Pid> = None;
    loop {
        if serve.is_none() {
            match spawn_serve() {
                Ok(pid) => serve = Some(pid),
                Err(e) => {
                    log!("{}", crate::error_chain(&e));
                    thread::sleep(RESTART_DELAY);
                    continue;
                }
            }
        }
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if Some(pid) == serve => {
                log!("serve exited ({status:?}); restarting in {RESTART_DELAY:?}");
                serve = None;
                thread::sleep(RESTART_DELAY);
            }
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                // ECHILD cannot happen while `serve` runs; back off rather than spin.
                log!("wait for children: {e}");
                thread::sleep(RESTART_DELAY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hostname_from_cmdline() {
        let cmdline = "console=ttyS0 root=/dev/vda scaibunker.hostname=bk-42 quiet\n";
        assert_eq!(hostname_from_cmdline(cmdline), Some("bk-42"));
        assert_eq!(hostname_from_cmdline("console=ttyS0 quiet"), None);
        assert!(is_valid_hostname("bk-42.example"));
        assert!(!is_valid_hostname(""));
        assert!(!is_valid_hostname("a b"));
        assert!(!is_valid_hostname("x/y"));
        assert!(!is_valid_hostname(&"a".repeat(65)));
    }

    #[test]
    fn adds_a_hosts_line_only_when_missing() {
        assert_eq!(
            hosts_line("127.0.0.1 localhost\n", "bk"),
            Some("127.0.1.1\tbk\n".into())
        );
        assert_eq!(hosts_line("127.0.1.1 bk # me\n", "bk"), None);
        assert_eq!(
            hosts_line("127.0.0.1 localhost # bk\n", "bk"),
            Some("127.0.1.1\tbk\n".into())
        );
    }

    #[test]
    fn adds_only_the_missing_account_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n";
        let group = "root:x:0:\n";
        let [p, g, s] = missing_account_lines(passwd, group, Some("root:*::::::\n"), "/bin/sh");
        assert_eq!(
            p.as_deref(),
            Some("user:x:1000:1000:ScaiBunker user:/home/user:/bin/sh\n")
        );
        assert_eq!(g.as_deref(), Some("user:x:1000:\n"));
        assert_eq!(s.as_deref(), Some("user:!:19000:0:99999:7:::\n"));

        let passwd = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n";
        let group = "root:x:0:\nuser:x:1000:\n";
        assert_eq!(
            missing_account_lines(passwd, group, None, "/bin/sh"),
            [None, None, None]
        );

        // Images with a uid 1000 account of their own still get `user`, as another name.
        let passwd = "debian:x:1000:1000::/home/debian:/bin/sh\n";
        let [p, g, s] = missing_account_lines(passwd, "debian:x:1000:\n", None, "/bin/sh");
        assert!(p.is_some_and(|p| p.starts_with("user:x:1000:1000:")));
        assert_eq!(g.as_deref(), Some("user:x:1000:\n"));
        assert_eq!(s, None);
    }
}
