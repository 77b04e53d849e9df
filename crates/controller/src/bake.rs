//! Baking an uploaded image into the ext4 filesystem bunkers boot.
//!
//! Any tenant admin can upload an image, so the bytes are either parsed in-process under
//! checks or handed to a tool in a sandbox that reaches nothing but the bake's own files.
//!
//! - `tar`:
//!   1. `check_tar` reads the whole archive before anything is unpacked and refuses it
//!      ([`BakeError::Invalid`]) for: a member name or hard-link target that is absolute or
//!      has `..`; a member, or a hard link's target, below a name the archive made a symbolic
//!      link (writing through it could leave the tree); character and block devices (the
//!      host-side tools would make a node for a host device; a guest's `/dev` is a
//!      devtmpfs); member types GNU tar reads differently from this check (volume labels,
//!      dumpdirs, unknown types); a PAX global header setting anything but comments, times or
//!      charsets (GNU tar applies a global `path` or `uid` to every later member, the `tar`
//!      crate does not); PAX `GNU.*` keys (the PAX sparse formats rename and resize a member
//!      in GNU tar only), a key given twice, or a PAX `path`/`linkpath` that disagrees with
//!      a GNU long name (each reader would pick a different one); more than `size_mib` of
//!      declared bytes, a sparse member counted at its full size (512 stored bytes can declare
//!      terabytes). FIFOs are kept (making one needs no privilege and reaches nothing).
//!      Setuid and setgid files are kept too: an image is its owner's content and the microVM
//!      is the boundary; they are returned in [`Baked::setid`] so the bake is logged with them.
//!   2. GNU tar unpacks it into `work/root` with numeric owners and modes kept, without
//!      xattrs, ACLs or SELinux labels (so file capabilities do not reach images), with
//!      `--no-overwrite-dir` and `--delay-directory-restore` (a 0555 directory gets its mode
//!      only once its members are in). GNU tar also makes a symbolic link whose target is
//!      absolute or has `..` only after every other member.
//!   3. `mkfs.ext4 -d` turns the tree into ext4, owners and modes as unpacked.
//! - `ext4`: the bytes must carry the superblock magic, fit `size_mib`, and pass a read-only
//!   `e2fsck -fn` of the file bound read-only.
//!
//! The sandbox (`Sandbox`): each tool runs under bubblewrap in new mount, IPC, PID, network,
//! UTS and cgroup namespaces. Its root is a read-only tmpfs holding `/usr` (and the host's
//! `/bin`, `/sbin`, `/lib*`, as links or read-only binds), `/etc/ld.so.cache`, the e2fsprogs
//! configuration, a read-only minimal `/dev`, its directory read-write at `WORK` (tar:
//! `work/root`; mkfs.ext4: `work`) and its input file read-only at `INPUT`: no other host
//! path, no network. The tool gets a new
//! session, no_new_privs, an environment of `PATH` and `LC_ALL=C` only (plus
//! `EXT2FS_NO_MTAB_OK` for e2fsprogs, as the sandbox has no mount table), `prlimit` limits on
//! file size (`size_mib`), CPU time, open files and processes (the kernel does not apply
//! the process limit to uid 0), and dies with its parent or after [`TOOL_TIMEOUT`].
//! It runs as uid 0 without a user namespace, because one made by root maps uid 0 alone and
//! tar could not give a file to uid 1000 (`chown` fails with EINVAL). Instead every
//! capability is dropped but those a tool needs (see `TAR`, `MKFS`, `E2FSCK`); none
//! keeps CAP_MKNOD, so no device node can be made even past the check. The controller must
//! therefore bake as root, as before.
//!
//! [`BakeError::Invalid`] is the uploader's fault (bad or oversized content); every other
//! error is the platform's.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Longest any one tool may run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(600);
/// Most members a tarball may have.
const MAX_MEMBERS: u64 = 2_000_000;
const MIB: u64 = 1 << 20;
/// Where a sandboxed tool sees its work directory (read-write).
const WORK: &str = "/bake";
/// Where a sandboxed tool sees its input file (read-only).
const INPUT: &str = "/input";
/// `PATH` inside the sandbox.
const SANDBOX_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Most open files per tool: `mkfs.ext4 -d` holds one per directory level it descends.
const MAX_OPEN_FILES: u64 = 1024;
/// Most processes per tool: none of the tools needs more than a few.
const MAX_PROCESSES: u64 = 64;
/// PAX global header keys that change neither names, owners nor sizes of later members.
const GLOBAL_PAX_KEYS: &[&str] = &[
    "comment",
    "charset",
    "hdrcharset",
    "mtime",
    "atime",
    "ctime",
];

/// What the uploaded bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Tar,
    Ext4,
}

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// The content is not what its kind says, or does not fit.
    #[error("{0}")]
    Invalid(String),
    #[error("running {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} did not finish within {TOOL_TIMEOUT:?}")]
    Timeout { tool: &'static str },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("reading the upload")]
    Io(#[from] std::io::Error),
}

/// A baked image.
#[derive(Debug)]
pub struct Baked {
    /// The ext4 file bunkers boot.
    pub ext4: PathBuf,
    /// Regular files with the setuid or setgid bit, kept in the image (a tarball's; an
    /// uploaded ext4 is not listed).
    pub setid: Vec<PathBuf>,
}

/// Turns `source` (a tarball or an ext4 file) into the ext4 file bunkers boot, inside `work`
/// (an empty private directory the caller removes).
pub async fn bake(
    kind: SourceKind,
    source: &Path,
    work: &Path,
    size_mib: u64,
) -> Result<Baked, BakeError> {
    match kind {
        SourceKind::Ext4 => {
            check_ext4(source, size_mib).await?;
            Ok(Baked {
                ext4: source.to_owned(),
                setid: Vec::new(),
            })
        }
        SourceKind::Tar => {
            let src = source.to_owned();
            let checked = tokio::task::spawn_blocking(move || check_tar(&src, size_mib))
                .await
                .map_err(|e| BakeError::Io(std::io::Error::other(e)))??;
            let root = work.join("root");
            std::fs::create_dir(&root)?;
            let limit = size_mib * MIB;
            unpack(source, &root, limit).await?;
            let mut mkfs = Sandbox {
                work: Some(work),
                input: None,
                max_file_bytes: limit,
            }
            .command(MKFS);
            mkfs.args(["-q", "-F", "-L", "rootfs", "-E", "root_owner=0:0", "-d"])
                .arg(format!("{WORK}/root"))
                .arg(format!("{WORK}/rootfs.ext4"))
                .arg(format!("{size_mib}M"));
            run(MKFS.name, mkfs).await.map_err(|e| match e {
                BakeError::Tool { stderr, .. } if stderr.contains("allocate") => {
                    BakeError::Invalid(format!(
                        "the tarball's files do not fit in an ext4 filesystem of {size_mib} MiB"
                    ))
                }
                other => other,
            })?;
            Ok(Baked {
                ext4: work.join("rootfs.ext4"),
                setid: checked.setid,
            })
        }
    }
}

/// Unpacks a checked tarball into the empty directory `root` with GNU tar in the sandbox,
/// which sees only `root` and the tarball.
async fn unpack(source: &Path, root: &Path, max_file_bytes: u64) -> Result<(), BakeError> {
    let mut tar = Sandbox {
        work: Some(root),
        input: Some(source),
        max_file_bytes,
    }
    .command(TAR);
    tar.args([
        "-x",
        "--numeric-owner",
        "--same-owner",
        "--same-permissions",
        "--no-overwrite-dir",
        "--delay-directory-restore",
        "--no-xattrs",
        "--no-acls",
        "--no-selinux",
        "-f",
        INPUT,
        "-C",
        WORK,
    ]);
    run(TAR.name, tar).await
}

/// A program run in the sandbox and the capabilities it keeps; every other one is dropped.
#[derive(Debug, Clone, Copy)]
struct Tool {
    name: &'static str,
    caps: &'static [&'static str],
    /// An e2fsprogs tool, which looks for a mount table the sandbox does not have.
    e2fsprogs: bool,
}

/// GNU tar: CAP_CHOWN to set owners; CAP_FOWNER to set modes and times of files it no longer
/// owns and hard-link them; CAP_FSETID to keep setgid bits for groups it is not in;
/// CAP_DAC_OVERRIDE to write into directories whose modes shut root out (tar running as root
/// makes a 0555 or another user's 0700 directory without adding write bits for itself).
/// The mount namespace, not file modes, bounds what it can reach.
const TAR: Tool = Tool {
    name: "tar",
    caps: &["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID"],
    e2fsprogs: false,
};
/// `mkfs.ext4 -d`: CAP_DAC_READ_SEARCH to read every unpacked file whatever its mode; it
/// writes only its own output, in the root-owned work directory.
const MKFS: Tool = Tool {
    name: "mkfs.ext4",
    caps: &["CAP_DAC_READ_SEARCH"],
    e2fsprogs: true,
};
/// `e2fsck -fn`: reads a file the controller owns; nothing more.
const E2FSCK: Tool = Tool {
    name: "e2fsck",
    caps: &[],
    e2fsprogs: true,
};

/// What a sandboxed tool may reach besides the host's programs and libraries.
struct Sandbox<'a> {
    /// Bound read-write at `WORK`.
    work: Option<&'a Path>,
    /// Bound read-only at `INPUT`.
    input: Option<&'a Path>,
    /// Largest file the tool may write (`RLIMIT_FSIZE`).
    max_file_bytes: u64,
}

impl Sandbox<'_> {
    /// `prlimit … bwrap … -- <tool>`, waiting for the tool's arguments. Stdin and stdout are
    /// null, stderr is piped (for [`run`]), and the process is killed when dropped.
    fn command(&self, tool: Tool) -> Command {
        let mut cmd = Command::new("prlimit");
        cmd.env_clear()
            .env("PATH", SANDBOX_PATH)
            .arg(format!("--fsize={}", self.max_file_bytes))
            .arg(format!("--cpu={}", TOOL_TIMEOUT.as_secs()))
            .arg(format!("--nofile={MAX_OPEN_FILES}"))
            .arg(format!("--nproc={MAX_PROCESSES}"))
            .args(["--", "bwrap"])
            .args(bwrap_args(self, tool))
            .args(["--", tool.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// bubblewrap's options for `tool` in `sandbox` (mounts apply in order).
fn bwrap_args(sandbox: &Sandbox<'_>, tool: Tool) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
        args.extend(items.iter().map(|s| s.as_ref().to_owned()));
    };
    // Every namespace `--unshare-all` gives except the user namespace (see the module doc).
    push(&[
        &"--unshare-ipc",
        &"--unshare-pid",
        &"--unshare-net",
        &"--unshare-uts",
        &"--unshare-cgroup-try",
        &"--die-with-parent",
        &"--new-session",
        &"--clearenv",
        &"--setenv",
        &"PATH",
        &SANDBOX_PATH,
        &"--setenv",
        &"LC_ALL",
        &"C",
    ]);
    if tool.e2fsprogs {
        // Nothing is mounted in the sandbox that the tool could damage.
        push(&[&"--setenv", &"EXT2FS_NO_MTAB_OK", &"1"]);
    }
    push(&[&"--ro-bind", &"/usr", &"/usr"]);
    // Merged-/usr hosts have these as links into /usr; others have real directories.
    for dir in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        match std::fs::read_link(dir) {
            Ok(target) => push(&[&"--symlink", &target, &dir]),
            Err(_) if Path::new(dir).is_dir() => push(&[&"--ro-bind", &dir, &dir]),
            Err(_) => {}
        }
    }
    for file in ["/etc/ld.so.cache", "/etc/mke2fs.conf", "/etc/e2fsck.conf"] {
        push(&[&"--ro-bind-try", &file, &file]);
    }
    push(&[&"--dev", &"/dev"]);
    if let Some(work) = sandbox.work {
        push(&[&"--bind", &work, &WORK]);
    }
    if let Some(input) = sandbox.input {
        push(&[&"--ro-bind", &input, &INPUT]);
    }
    push(&[
        &"--remount-ro",
        &"/dev",
        &"--remount-ro",
        &"/",
        &"--chdir",
        &"/",
        &"--cap-drop",
        &"ALL",
    ]);
    for cap in tool.caps {
        push(&[&"--cap-add", cap]);
    }
    args
}

async fn run(tool: &'static str, mut cmd: Command) -> Result<(), BakeError> {
    let child = cmd
        .spawn()
        .map_err(|source| BakeError::Spawn { tool, source })?;
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| BakeError::Timeout { tool })?
        .map_err(|source| BakeError::Spawn { tool, source })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(2000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(BakeError::Tool {
        tool,
        stderr: tail.trim().to_owned(),
    })
}

/// A member name as a path inside the root (`./a//b/` → `a/b`), or `None` when it is
/// absolute or has `..`.
fn normal(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// The nearest ancestor of `path` that the archive made a symbolic link, if any.
fn link_above<'a>(path: &'a Path, symlinks: &HashSet<PathBuf>) -> Option<&'a Path> {
    path.ancestors()
        .skip(1)
        .find(|a| !a.as_os_str().is_empty() && symlinks.contains(*a))
}

/// What `check_tar` found in a tarball it passed.
#[derive(Debug)]
struct CheckedTar {
    /// Regular files with the setuid or setgid bit.
    setid: Vec<PathBuf>,
}

/// Checks a tarball before anything is unpacked (see the module doc). Blocking.
fn check_tar(path: &Path, size_mib: u64) -> Result<CheckedTar, BakeError> {
    use tar::EntryType as T;
    let file = std::fs::File::open(path)?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let invalid = |e: std::io::Error| BakeError::Invalid(format!("not a valid tarball: {e}"));
    let refuse = |m: String| Err(BakeError::Invalid(m));
    let (mut members, mut bytes) = (0u64, 0u64);
    let mut symlinks = HashSet::new();
    let mut setid = Vec::new();
    for entry in archive.entries().map_err(invalid)? {
        let mut entry = entry.map_err(invalid)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            check_global_pax(&mut entry)?;
            continue;
        }
        let raw = entry.path().map_err(invalid)?.into_owned();
        let shown = raw.display();
        let Some(name) = normal(&raw) else {
            return refuse(format!("member {shown} is absolute or has `..`"));
        };
        check_local_pax(&mut entry, &raw)?;
        match kind {
            T::Regular | T::Continuous | T::GNUSparse | T::Directory | T::Fifo => {}
            T::Symlink | T::Link if name.as_os_str().is_empty() => {
                return refuse(format!("member {shown} would replace the root with a link"));
            }
            T::Symlink | T::Link => {}
            T::Char | T::Block => {
                return refuse(format!(
                    "member {shown} is a device node; images may not carry devices (a bunker's /dev is made at boot)"
                ));
            }
            other => {
                return refuse(format!(
                    "member {shown} has type {:?}, which is not unpacked into images",
                    other.as_byte() as char
                ));
            }
        }
        if name.as_os_str().is_empty() && !kind.is_dir() {
            return refuse(format!("member {shown} would replace the root"));
        }
        if let Some(link) = link_above(&name, &symlinks) {
            return refuse(format!(
                "member {shown} is below {}, which the tarball made a symbolic link",
                link.display()
            ));
        }
        if kind.is_hard_link() {
            let target = entry.link_name().map_err(invalid)?.unwrap_or_default();
            let Some(target) = normal(&target) else {
                return refuse(format!("hard link {shown} points outside the archive"));
            };
            if let Some(link) = link_above(&target, &symlinks) {
                return refuse(format!(
                    "hard link {shown} points below {}, which the tarball made a symbolic link",
                    link.display()
                ));
            }
            // A hard link to a symbolic link is one too.
            if symlinks.contains(&target) {
                symlinks.insert(name.clone());
            }
        }
        if kind.is_symlink() {
            symlinks.insert(name.clone());
        }
        let is_file = matches!(kind, T::Regular | T::Continuous | T::GNUSparse);
        if is_file && entry.header().mode().map_err(invalid)? & 0o6000 != 0 {
            setid.push(name);
        }
        members += 1;
        if members > MAX_MEMBERS {
            return refuse(format!("more than {MAX_MEMBERS} members"));
        }
        // A sparse member's size is its full size, not the bytes stored.
        bytes = bytes.saturating_add(entry.size());
        if bytes > size_mib * MIB {
            return refuse(format!("the tarball's files do not fit in {size_mib} MiB"));
        }
        // Reading to the end verifies the member is complete.
        std::io::copy(&mut entry, &mut std::io::sink()).map_err(invalid)?;
    }
    if members == 0 {
        return refuse("the tarball is empty".into());
    }
    Ok(CheckedTar { setid })
}

/// The records of a PAX header, refusing non-UTF-8 keys and a key given twice (readers
/// differ on which one wins).
fn pax_records<R: Read>(
    entry: &mut tar::Entry<'_, R>,
) -> Result<Vec<(String, Vec<u8>)>, BakeError> {
    let invalid = |e: std::io::Error| BakeError::Invalid(format!("not a valid tarball: {e}"));
    let Some(exts) = entry.pax_extensions().map_err(invalid)? else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for ext in exts {
        let ext = ext.map_err(invalid)?;
        let key = ext
            .key()
            .map_err(|_| BakeError::Invalid("a PAX header has a key that is not UTF-8".into()))?;
        if out.iter().any(|(k, _)| k == key) {
            return Err(BakeError::Invalid(format!(
                "a PAX header gives `{key}` twice"
            )));
        }
        out.push((key.to_owned(), ext.value_bytes().to_vec()));
    }
    Ok(out)
}

/// A PAX global header may only set keys that leave later members' names, owners and sizes
/// alone (GNU tar applies the rest to every later member; the `tar` crate ignores them).
fn check_global_pax<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<(), BakeError> {
    for (key, _) in pax_records(entry)? {
        if !GLOBAL_PAX_KEYS.contains(&key.as_str()) {
            return Err(BakeError::Invalid(format!(
                "a PAX global header sets `{key}`, which would apply to every later member; only {} may be set",
                GLOBAL_PAX_KEYS.join(", ")
            )));
        }
    }
    Ok(())
}

/// A member's own PAX header must mean the same to GNU tar as to this check.
fn check_local_pax<R: Read>(entry: &mut tar::Entry<'_, R>, name: &Path) -> Result<(), BakeError> {
    let records = pax_records(entry)?;
    let shown = name.display();
    for (key, value) in &records {
        if key.starts_with("GNU.") {
            return Err(BakeError::Invalid(format!(
                "member {shown} has the PAX key `{key}`; PAX sparse and GNU incremental members are not supported"
            )));
        }
        // The `tar` crate prefers a GNU long name or link to the PAX one, GNU tar the
        // opposite: both must agree.
        let agrees = match key.as_str() {
            "path" => entry.path_bytes().as_ref() == value.as_slice(),
            "linkpath" => entry.link_name_bytes().as_deref() == Some(value.as_slice()),
            _ => true,
        };
        if !agrees {
            return Err(BakeError::Invalid(format!(
                "member {shown} has a PAX `{key}` that disagrees with its GNU long name"
            )));
        }
    }
    Ok(())
}

/// Checks an uploaded ext4 filesystem.
async fn check_ext4(path: &Path, size_mib: u64) -> Result<(), BakeError> {
    let len = std::fs::metadata(path)?.len();
    if len > size_mib * MIB {
        return Err(BakeError::Invalid(format!(
            "the filesystem is {len} bytes, more than size_mib ({size_mib} MiB)"
        )));
    }
    let mut superblock = [0u8; 1082];
    let mut file = std::fs::File::open(path)?;
    if file.read_exact(&mut superblock).is_err() || superblock[1080..1082] != [0x53, 0xEF] {
        return Err(BakeError::Invalid("not an ext4 filesystem".into()));
    }
    let mut fsck = Sandbox {
        work: None,
        input: Some(path),
        max_file_bytes: MIB,
    }
    .command(E2FSCK);
    fsck.args(["-f", "-n", INPUT]);
    run(E2FSCK.name, fsck).await.map_err(|e| match e {
        BakeError::Tool { stderr, .. } => {
            BakeError::Invalid(format!("the filesystem has errors: {stderr}"))
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path, members: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("src.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).expect("create"));
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`; write the raw name to build hostile archives.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.finish().expect("finish");
        path
    }

    /// One member of a hand-built (possibly hostile) tarball.
    struct Member {
        name: String,
        kind: tar::EntryType,
        data: Vec<u8>,
        mode: u32,
        owner: (u64, u64),
        link: String,
        /// A PAX extended header (local, or global for `XGlobalHeader`) written before it.
        pax: Vec<(String, String)>,
    }

    fn member(name: &str, kind: tar::EntryType) -> Member {
        Member {
            name: name.into(),
            kind,
            data: Vec::new(),
            mode: if kind.is_dir() { 0o755 } else { 0o644 },
            owner: (0, 0),
            link: String::new(),
            pax: Vec::new(),
        }
    }

    fn file(name: &str, data: &[u8]) -> Member {
        Member {
            data: data.to_vec(),
            ..member(name, tar::EntryType::Regular)
        }
    }

    fn link(name: &str, kind: tar::EntryType, target: &str) -> Member {
        Member {
            link: target.into(),
            ..member(name, kind)
        }
    }

    fn pax_records(records: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in records {
            // "<len> <key>=<value>\n", where <len> counts its own digits too.
            let rest = format!(" {k}={v}\n");
            let mut len = rest.len() + 1;
            while len != rest.len() + len.to_string().len() {
                len = rest.len() + len.to_string().len();
            }
            out.extend_from_slice(format!("{len}{rest}").as_bytes());
        }
        out
    }

    /// Writes raw GNU headers, so names and link targets reach the archive exactly as given
    /// (the `tar` crate's setters refuse `..` and absolute paths).
    fn raw_tarball(path: &Path, members: &[Member]) {
        let mut b = tar::Builder::new(std::fs::File::create(path).expect("create"));
        for m in members {
            if !m.pax.is_empty() && m.kind != tar::EntryType::XGlobalHeader {
                let data = pax_records(&m.pax);
                let mut h = tar::Header::new_ustar();
                h.set_path("PaxHeaders/x").expect("pax name");
                h.set_entry_type(tar::EntryType::XHeader);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append(&h, &data[..]).expect("append pax");
            }
            let data = if m.kind == tar::EntryType::XGlobalHeader {
                pax_records(&m.pax)
            } else {
                m.data.clone()
            };
            let mut h = if m.kind == tar::EntryType::XGlobalHeader {
                tar::Header::new_ustar()
            } else {
                tar::Header::new_gnu()
            };
            h.set_entry_type(m.kind);
            h.set_size(data.len() as u64);
            h.set_mode(m.mode);
            h.set_uid(m.owner.0);
            h.set_gid(m.owner.1);
            h.set_mtime(1_700_000_000);
            let old = h.as_old_mut();
            old.name[..m.name.len()].copy_from_slice(m.name.as_bytes());
            old.linkname[..m.link.len()].copy_from_slice(m.link.as_bytes());
            if m.kind.is_character_special() || m.kind.is_block_special() {
                h.set_device_major(if m.kind.is_block_special() { 8 } else { 1 })
                    .expect("major");
                h.set_device_minor(if m.kind.is_block_special() { 0 } else { 1 })
                    .expect("minor");
            }
            h.set_cksum();
            b.append(&h, &data[..]).expect("append");
        }
        b.finish().expect("finish");
    }

    /// A GNU sparse member claiming `real_size` bytes with only its last 512 stored.
    fn sparse_bomb(path: &Path, real_size: u64) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(512);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        let gnu = h.as_gnu_mut().expect("gnu header");
        let octal = |dst: &mut [u8], v: u64| {
            let s = format!("{v:0w$o}", w = dst.len() - 1);
            dst[..s.len()].copy_from_slice(s.as_bytes());
        };
        gnu.name[..4].copy_from_slice(b"bomb");
        octal(&mut gnu.realsize, real_size);
        octal(&mut gnu.sparse[0].offset, real_size - 512);
        octal(&mut gnu.sparse[0].numbytes, 512);
        h.set_cksum();
        let mut b = tar::Builder::new(std::fs::File::create(path).expect("create"));
        b.append(&h, &[0x42u8; 512][..]).expect("append");
        b.finish().expect("finish");
    }

    /// Every path under `dir` with its type, mode, owner and bytes (or link target).
    fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, String> {
        use std::os::unix::fs::MetadataExt;
        let mut out = std::collections::BTreeMap::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(p) = todo.pop() {
            let meta = std::fs::symlink_metadata(&p).expect("lstat");
            let body = if meta.is_dir() {
                for e in std::fs::read_dir(&p).expect("readdir") {
                    todo.push(e.expect("entry").path());
                }
                String::new()
            } else if meta.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).expect("readlink").display())
            } else {
                format!("{:?}", std::fs::read(&p).expect("read"))
            };
            let line = format!(
                "{:o} {}:{} {} {} {body}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.nlink(),
                meta.mtime()
            );
            out.insert(p, line);
        }
        out
    }

    /// A scratch directory holding `work/` (what a bake may touch) and `canary/` beside it.
    struct Scene {
        dir: tempfile::TempDir,
    }

    impl Scene {
        fn new() -> Scene {
            let dir = tempfile::tempdir().expect("tmp");
            let canary = dir.path().join("canary");
            std::fs::create_dir(&canary).expect("mkdir");
            std::fs::write(canary.join("file"), b"precious\n").expect("write");
            std::fs::create_dir(dir.path().join("work")).expect("mkdir");
            Scene { dir }
        }
        fn canary(&self) -> PathBuf {
            self.dir.path().join("canary")
        }
        fn work(&self) -> PathBuf {
            self.dir.path().join("work")
        }
        fn source(&self) -> PathBuf {
            self.dir.path().join("src.tar")
        }
    }

    /// Tarballs that try to write outside the root, plant devices, or rename members behind
    /// the pre-check's back: each is refused as the uploader's fault, and nothing beside the
    /// work directory changes.
    #[tokio::test]
    async fn hostile_tarballs_are_refused_and_touch_nothing_outside_the_work_dir() {
        use tar::EntryType as T;
        type Build = Box<dyn Fn(&Path, &Path)>;
        let cases: Vec<(&str, Build)> = vec![
            (
                "absolute path",
                Box::new(|src: &Path, canary: &Path| {
                    let name = format!("{}/abs", canary.display());
                    raw_tarball(src, &[file(&name, b"x")]);
                }),
            ),
            (
                "dot-dot",
                Box::new(|src: &Path, _: &Path| {
                    raw_tarball(src, &[file("a/../../../canary/dotdot", b"x")]);
                }),
            ),
            (
                "file through an absolute symlink",
                Box::new(|src: &Path, canary: &Path| {
                    let target = canary.display().to_string();
                    raw_tarball(
                        src,
                        &[link("esc", T::Symlink, &target), file("esc/through", b"x")],
                    );
                }),
            ),
            (
                "file through a relative symlink",
                Box::new(|src: &Path, _: &Path| {
                    raw_tarball(
                        src,
                        &[
                            link("esc", T::Symlink, "../../canary"),
                            file("esc/through", b"x"),
                        ],
                    );
                }),
            ),
            (
                "directory through a symlink",
                Box::new(|src: &Path, canary: &Path| {
                    let target = canary.display().to_string();
                    raw_tarball(
                        src,
                        &[
                            link("esc", T::Symlink, &target),
                            member("esc/sub", T::Directory),
                        ],
                    );
                }),
            ),
            (
                "hard link out of the tree",
                Box::new(|src: &Path, _: &Path| {
                    raw_tarball(src, &[link("hl", T::Link, "../../canary/file")]);
                }),
            ),
            (
                "hard link to an absolute path",
                Box::new(|src: &Path, canary: &Path| {
                    let target = format!("{}/file", canary.display());
                    raw_tarball(src, &[link("hl", T::Link, &target)]);
                }),
            ),
            (
                "hard link through a symlink",
                Box::new(|src: &Path, canary: &Path| {
                    let target = canary.display().to_string();
                    raw_tarball(
                        src,
                        &[
                            link("esc", T::Symlink, &target),
                            link("hl", T::Link, "esc/file"),
                        ],
                    );
                }),
            ),
            (
                "character device",
                Box::new(|src: &Path, _: &Path| {
                    raw_tarball(
                        src,
                        &[file("etc/motd", b"hi\n"), member("dev/mem", T::Char)],
                    );
                }),
            ),
            (
                "block device",
                Box::new(|src: &Path, _: &Path| {
                    raw_tarball(
                        src,
                        &[file("etc/motd", b"hi\n"), member("dev/sda", T::Block)],
                    );
                }),
            ),
            (
                "PAX global header renaming later members",
                Box::new(|src: &Path, canary: &Path| {
                    let target = canary.display().to_string();
                    raw_tarball(
                        src,
                        &[
                            link("esc", T::Symlink, &target),
                            Member {
                                pax: vec![("path".into(), "esc/pwned".into())],
                                ..member("pax_global_header", T::XGlobalHeader)
                            },
                            file("innocent", b"x"),
                        ],
                    );
                }),
            ),
            (
                "PAX global header changing owners",
                Box::new(|src: &Path, _: &Path| {
                    raw_tarball(
                        src,
                        &[
                            Member {
                                pax: vec![("uid".into(), "0".into())],
                                ..member("pax_global_header", T::XGlobalHeader)
                            },
                            file("innocent", b"x"),
                        ],
                    );
                }),
            ),
            (
                "PAX sparse name",
                Box::new(|src: &Path, _: &Path| {
                    raw_tarball(
                        src,
                        &[Member {
                            pax: vec![
                                ("GNU.sparse.name".into(), "esc/pwned".into()),
                                ("GNU.sparse.realsize".into(), "1".into()),
                            ],
                            ..file("GNUSparseFile.0/x", b"x")
                        }],
                    );
                }),
            ),
            (
                "GNU long name and PAX path disagreeing",
                Box::new(|src: &Path, canary: &Path| {
                    let target = canary.display().to_string();
                    let mut b = tar::Builder::new(std::fs::File::create(src).expect("create"));
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(T::Symlink);
                    h.set_path("esc").expect("path");
                    h.set_link_name(&target).expect("link");
                    h.set_size(0);
                    h.set_cksum();
                    b.append(&h, &[][..]).expect("append");
                    let pax = pax_records(&[("path".into(), "esc/pwned".into())]);
                    let mut x = tar::Header::new_ustar();
                    x.set_path("PaxHeaders/x").expect("pax name");
                    x.set_entry_type(T::XHeader);
                    x.set_size(pax.len() as u64);
                    x.set_cksum();
                    b.append(&x, &pax[..]).expect("pax");
                    let long = b"innocent-long-name\0";
                    let mut l = tar::Header::new_gnu();
                    l.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
                    l.set_entry_type(T::GNULongName);
                    l.set_size(long.len() as u64);
                    l.set_cksum();
                    b.append(&l, &long[..]).expect("long name");
                    let mut f = tar::Header::new_gnu();
                    f.set_path("short").expect("path");
                    f.set_size(1);
                    f.set_mode(0o644);
                    f.set_cksum();
                    b.append(&f, &b"x"[..]).expect("file");
                    b.finish().expect("finish");
                }),
            ),
            (
                "sparse file bomb",
                Box::new(|src: &Path, _: &Path| sparse_bomb(src, (8 << 30) - 1)),
            ),
            (
                "declared size bomb",
                Box::new(|src: &Path, _: &Path| {
                    // The header claims 8 GiB; the bytes stop after one block.
                    let mut h = tar::Header::new_gnu();
                    h.set_path("bomb").expect("path");
                    h.set_size((8 << 30) - 1);
                    h.set_mode(0o644);
                    h.set_cksum();
                    let mut bytes = h.as_bytes().to_vec();
                    bytes.extend_from_slice(&[0u8; 512 * 3]);
                    std::fs::write(src, bytes).expect("write");
                }),
            ),
        ];
        let mut failures = Vec::new();
        for (what, build) in &cases {
            let scene = Scene::new();
            build(&scene.source(), &scene.canary());
            let before = snapshot(&scene.canary());
            let result = bake(SourceKind::Tar, &scene.source(), &scene.work(), 16).await;
            let after = snapshot(&scene.canary());
            let beside: Vec<_> = std::fs::read_dir(scene.dir.path())
                .expect("readdir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            if before != after {
                failures.push(format!("{what}: the canary changed: {after:?}"));
            }
            if beside.len() != 3 {
                failures.push(format!(
                    "{what}: something appeared beside work: {beside:?}"
                ));
            }
            match result {
                Err(BakeError::Invalid(m)) => eprintln!("{what}: refused: {m}"),
                other => failures.push(format!("{what}: not refused as invalid: {other:?}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Were the pre-check to miss something, the sandbox still holds: GNU tar run on hostile
    /// tarballs directly can make no device node and reach nothing beside its root.
    #[tokio::test]
    async fn the_sandbox_holds_where_the_check_is_bypassed() {
        use tar::EntryType as T;
        type Build = Box<dyn Fn(&Path, &Path)>;
        let cases: Vec<(&str, Build)> = vec![
            (
                "block device",
                Box::new(|src: &Path, _: &Path| raw_tarball(src, &[member("sda", T::Block)])),
            ),
            (
                "hard link to an absolute path",
                Box::new(|src: &Path, canary: &Path| {
                    let target = format!("{}/file", canary.display());
                    raw_tarball(src, &[link("hl", T::Link, &target)]);
                }),
            ),
            (
                "file through an absolute symlink",
                Box::new(|src: &Path, canary: &Path| {
                    let target = canary.display().to_string();
                    raw_tarball(
                        src,
                        &[link("esc", T::Symlink, &target), file("esc/through", b"x")],
                    );
                }),
            ),
        ];
        for (what, build) in &cases {
            let scene = Scene::new();
            build(&scene.source(), &scene.canary());
            let root = scene.work().join("root");
            std::fs::create_dir(&root).expect("mkdir");
            let before = snapshot(&scene.canary());
            let result = unpack(&scene.source(), &root, 16 * MIB).await;
            assert!(
                matches!(result, Err(BakeError::Tool { .. })),
                "{what}: {result:?}"
            );
            assert_eq!(
                before,
                snapshot(&scene.canary()),
                "{what}: the canary changed"
            );
            for (path, line) in snapshot(&root) {
                // Directories (mode 040…), regular files (0100…) and symlinks (0120…) only.
                assert!(
                    line.starts_with("40") || line.starts_with("100") || line.starts_with("120"),
                    "{what}: {} is {line}",
                    path.display()
                );
            }
        }
    }

    fn debugfs_stat(ext4: &Path, path: &str) -> (u32, u32, u32) {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("stat {path}")])
            .arg(ext4)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let tokens: Vec<&str> = text.split_whitespace().collect();
        let after = |key: &str| {
            let at = tokens
                .iter()
                .position(|t| *t == key)
                .unwrap_or_else(|| panic!("no {key} for {path}: {text}"));
            tokens[at + 1]
        };
        (
            u32::from_str_radix(after("Mode:"), 8).expect("mode"),
            after("User:").parse().expect("uid"),
            after("Group:").parse().expect("gid"),
        )
    }

    /// Owners and modes survive the bake exactly: root's files stay uid 0, a user's stay
    /// uid 1000, setuid and setgid bits are kept.
    #[tokio::test]
    async fn a_tarball_bakes_with_its_owners_and_modes() {
        use tar::EntryType as T;
        let scene = Scene::new();
        let owned = |m: Member, mode: u32, uid: u64, gid: u64| Member {
            mode,
            owner: (uid, gid),
            ..m
        };
        raw_tarball(
            &scene.source(),
            &[
                owned(member("etc", T::Directory), 0o755, 0, 0),
                owned(
                    file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
                    0o644,
                    0,
                    0,
                ),
                owned(file("etc/shadow", b"root:*:1::::::\n"), 0o640, 0, 42),
                owned(member("home", T::Directory), 0o755, 0, 0),
                owned(member("home/user", T::Directory), 0o750, 1000, 1000),
                owned(file("home/user/notes", b"mine\n"), 0o600, 1000, 1000),
                owned(
                    link("home/user/notes.hl", T::Link, "home/user/notes"),
                    0o600,
                    1000,
                    1000,
                ),
                owned(member("usr/bin", T::Directory), 0o755, 0, 0),
                owned(file("usr/bin/su", b"\x7fELF"), 0o4755, 0, 0),
                owned(file("usr/bin/wall", b"\x7fELF"), 0o2755, 0, 5),
                owned(file("usr/bin/mine", b"\x7fELF"), 0o4750, 1000, 1000),
                owned(member("ro", T::Directory), 0o555, 0, 0),
                owned(file("ro/inside", b"x"), 0o444, 0, 0),
                owned(link("bin", T::Symlink, "usr/bin"), 0o777, 0, 0),
                owned(member("run/initctl", T::Fifo), 0o600, 0, 0),
            ],
        );
        let baked = bake(SourceKind::Tar, &scene.source(), &scene.work(), 16)
            .await
            .expect("bake");
        assert_eq!(
            baked.setid,
            ["usr/bin/su", "usr/bin/wall", "usr/bin/mine"].map(PathBuf::from)
        );
        let out = baked.ext4;
        let want: &[(&str, u32, u32, u32)] = &[
            ("/etc/passwd", 0o100644, 0, 0),
            ("/etc/shadow", 0o100640, 0, 42),
            ("/home/user", 0o40750, 1000, 1000),
            ("/home/user/notes", 0o100600, 1000, 1000),
            ("/home/user/notes.hl", 0o100600, 1000, 1000),
            ("/usr/bin/su", 0o104755, 0, 0),
            ("/usr/bin/wall", 0o102755, 0, 5),
            ("/usr/bin/mine", 0o104750, 1000, 1000),
            ("/ro", 0o40555, 0, 0),
            ("/ro/inside", 0o100444, 0, 0),
            ("/bin", 0o120777, 0, 0),
            ("/run/initctl", 0o10600, 0, 0),
        ];
        for (path, mode, uid, gid) in want {
            let (m, u, g) = debugfs_stat(&out, path);
            // debugfs prints the permission bits only; the type is checked by the listing.
            assert_eq!(
                (m, u, g),
                (mode & 0o7777, *uid, *gid),
                "{path}: mode {m:o} owner {u}:{g}"
            );
        }
        check_ext4(&out, 16).await.expect("clean ext4");
    }

    /// What a sandboxed tool sees: only PATH and LC_ALL of the environment handed to the
    /// sandbox, none of the host's files beyond the programs, and the work directory.
    #[tokio::test]
    async fn sandboxed_tools_see_a_cleared_environment_and_no_host_paths() {
        let scene = Scene::new();
        let script = format!(
            "env; for p in /root /home /tmp /var /etc/passwd /etc/shadow /proc/1 {} {} {}; do \
             [ -e \"$p\" ] && echo \"present:$p\"; done; echo done",
            scene.canary().display(),
            scene.work().display(),
            std::env::current_dir().expect("cwd").display(),
        );
        let shell = Tool {
            name: "sh",
            caps: &[],
            e2fsprogs: false,
        };
        let mut cmd = Sandbox {
            work: Some(&scene.work()),
            input: Some(&scene.source()),
            max_file_bytes: MIB,
        }
        .command(shell);
        std::fs::write(scene.source(), b"input\n").expect("write");
        std::fs::write(scene.work().join("mine"), b"work\n").expect("write");
        // The work directory and the input are there, under their sandbox names.
        let script = format!("cat {INPUT} {WORK}/mine; {script}");
        cmd.args(["-c", &script])
            .env("SCAIBUNKER_CANARY", "leaked")
            .stdout(Stdio::piped());
        let out = cmd.output().await.expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout} {:?}", out.stderr);
        assert!(stdout.starts_with("input\nwork\n"), "{stdout}");
        assert!(stdout.ends_with("done\n"), "{stdout}");
        let mut vars: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains('=') && !l.starts_with("present:"))
            .map(|l| l.split('=').next().unwrap_or(""))
            .collect();
        vars.sort();
        // `sh` itself sets PWD.
        assert_eq!(vars, ["LC_ALL", "PATH", "PWD"], "{stdout}");
        let present: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("present:"))
            .collect();
        assert!(present.is_empty(), "host paths visible: {present:?}");
    }

    #[test]
    fn member_names_must_stay_inside() {
        assert_eq!(normal(Path::new("bin/sh")), Some(PathBuf::from("bin/sh")));
        assert_eq!(
            normal(Path::new("./etc//passwd/")),
            Some(PathBuf::from("etc/passwd"))
        );
        assert_eq!(normal(Path::new("./")), Some(PathBuf::new()));
        assert_eq!(normal(Path::new("/etc/passwd")), None);
        assert_eq!(normal(Path::new("a/../../x")), None);
    }

    /// Setuid and setgid files pass and are listed; a comment-only PAX global header (what
    /// `git archive` writes) and FIFOs pass too.
    #[test]
    fn setid_files_are_kept_and_listed() {
        use tar::EntryType as T;
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("src.tar");
        raw_tarball(
            &src,
            &[
                Member {
                    pax: vec![("comment".into(), "0123abcd".into())],
                    ..member("pax_global_header", T::XGlobalHeader)
                },
                Member {
                    mode: 0o4755,
                    ..file("./usr/bin/su", b"x")
                },
                Member {
                    mode: 0o2755,
                    ..file("usr/bin/wall", b"x")
                },
                Member {
                    mode: 0o755,
                    ..file("usr/bin/ls", b"x")
                },
                Member {
                    mode: 0o4755,
                    ..link("usr/bin/su2", T::Link, "usr/bin/su")
                },
                member("run/initctl", T::Fifo),
            ],
        );
        let checked = check_tar(&src, 1).expect("fine");
        assert_eq!(
            checked.setid,
            [PathBuf::from("usr/bin/su"), PathBuf::from("usr/bin/wall")]
        );
    }

    #[test]
    fn hostile_or_oversized_tarballs_are_refused_before_unpacking() {
        let dir = tempfile::tempdir().expect("tmp");
        let ok = tarball(dir.path(), &[("bin/hello", b"#!/bin/sh\necho hi\n")]);
        check_tar(&ok, 1).expect("fine");
        let up = tarball(dir.path(), &[("../escape", b"x")]);
        assert!(matches!(check_tar(&up, 1), Err(BakeError::Invalid(m)) if m.contains("..")));
        let abs = tarball(dir.path(), &[("/etc/evil", b"x")]);
        assert!(matches!(check_tar(&abs, 1), Err(BakeError::Invalid(_))));
        let big = tarball(dir.path(), &[("big", &vec![0u8; 2 * MIB as usize])]);
        assert!(matches!(check_tar(&big, 1), Err(BakeError::Invalid(m)) if m.contains("fit")));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![7u8; 4096]).expect("write");
        assert!(matches!(check_tar(&junk, 1), Err(BakeError::Invalid(_))));
    }

    #[tokio::test]
    async fn a_tarball_bakes_into_a_clean_ext4_that_keeps_modes() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = tarball(dir.path(), &[("bin/hello", b"#!/bin/sh\necho hi\n")]);
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("mkdir");
        let out = bake(SourceKind::Tar, &src, &work, 16)
            .await
            .expect("bake")
            .ext4;
        assert_eq!(std::fs::metadata(&out).expect("stat").len(), 16 * MIB);
        // The result passes the same check an uploaded ext4 gets.
        check_ext4(&out, 16).await.expect("clean ext4");
        let listing = std::process::Command::new("debugfs")
            .args(["-R", "stat /bin/hello"])
            .arg(&out)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(text.contains("Mode:  0755"), "{text}");
        // Too small a filesystem for the files: the uploader's fault, said plainly.
        let big = tarball(dir.path(), &[("big", &vec![1u8; 15 * MIB as usize])]);
        let work2 = dir.path().join("work2");
        std::fs::create_dir(&work2).expect("mkdir");
        let err = bake(SourceKind::Tar, &big, &work2, 16)
            .await
            .expect_err("too big");
        assert!(
            matches!(err, BakeError::Invalid(ref m) if m.contains("fit")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn only_clean_ext4_within_the_size_is_accepted() {
        let dir = tempfile::tempdir().expect("tmp");
        let junk = dir.path().join("junk.ext4");
        std::fs::write(&junk, vec![0u8; 2 * MIB as usize]).expect("write");
        assert!(
            matches!(check_ext4(&junk, 16).await, Err(BakeError::Invalid(m)) if m.contains("not an ext4"))
        );
        let fs = dir.path().join("fs.ext4");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&fs)
            .arg("8M")
            .status()
            .expect("mkfs");
        assert!(made.success());
        check_ext4(&fs, 8).await.expect("clean");
        assert!(
            matches!(check_ext4(&fs, 4).await, Err(BakeError::Invalid(m)) if m.contains("size_mib"))
        );
        // Corrupt the superblock's block count: e2fsck must object.
        let mut bytes = std::fs::read(&fs).expect("read");
        bytes[1024 + 4..1024 + 8].copy_from_slice(&[0xff, 0xff, 0xff, 0x00]);
        std::fs::write(&fs, &bytes).expect("write");
        assert!(matches!(
            check_ext4(&fs, 8).await,
            Err(BakeError::Invalid(_))
        ));
    }
}
