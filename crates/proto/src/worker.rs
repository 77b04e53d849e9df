//! The controller ↔ worker protocol: JSON over HTTP.
//!
//! - Worker → controller (the worker dials out): `POST /v1/modules/scaibunker/workers/register`
//!   (bearer: the worker's credential, or the shared join token for a name that has none yet)
//!   `POST /v1/modules/scaibunker/heartbeat` and, on a planned stop,
//!   `POST /v1/modules/scaibunker/workers/{id}/stopping` ([`StoppingResponse`]) (bearer: the
//!   worker's credential, for its own id only); see [`crate::worker_auth`].
//! - Controller → worker: the routes under [`WORKER_API_PREFIX`] on the worker's own listener,
//!   bearer the worker's credential (a peer presents a peer token, for one image). Errors are
//!   `{"code", "message"}` ([`WorkerError`]) with an HTTP status.
//!
//! Requests carry [`PROTOCOL_VERSION`] at registration; a controller refuses a worker that
//! speaks another version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::agent::{DirEntry, EntryType, GuestUser, Program};

pub const PROTOCOL_VERSION: u32 = 2;

/// Prefix of the worker's HTTP API.
pub const WORKER_API_PREFIX: &str = "/v1/worker";

/// Resources of a worker: total at registration, free in heartbeats.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub gpu_count: u64,
}

/// An image the worker holds in its local cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CachedImage {
    pub name: String,
    pub sha256: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub protocol_version: u32,
    /// Stable name of the worker (host name by default); re-registering keeps its id.
    pub name: String,
    /// Base URL of the worker's HTTP API, as the controller reaches it.
    pub url: String,
    pub capacity: Capacity,
    pub images: Vec<CachedImage>,
    /// The VMM driver and accelerator, e.g. `qemu/tcg`.
    pub runtime: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterResponse {
    pub worker_id: String,
    pub heartbeat_interval_s: u64,
    /// This worker's own credential ([`crate::worker_auth`]): what it sends from now on
    /// (heartbeats, peers, storage proxy, its next registration) and what its API accepts
    /// from the controllers. The worker keeps it across restarts.
    pub credential: String,
}

/// Status of one bunker as the worker sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    Booting,
    Running,
    Paused,
    /// A snapshot is being captured; exec and files wait until it is `running` again.
    Snapshotting,
    Stopping,
    /// The VM process is gone (crashed or killed); `reason` says why.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BunkerStatusReport {
    pub id: String,
    pub status: VmStatus,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub worker_id: String,
    /// Free resources now.
    pub capacity: Capacity,
    pub active_bunkers: u64,
    pub bunkers: Vec<BunkerStatusReport>,
    #[serde(default)]
    pub cached_images: Option<Vec<String>>,
    /// Pulls that failed since the last heartbeat (the controller marks them `failed` in the
    /// worker's cache ledger and stops asking until the image is warmed again).
    #[serde(default)]
    pub image_failures: Vec<ImageFailure>,
}

/// An image the controller asks a worker to hold in its cache. The worker fetches the ext4
/// bytes from a peer that has them (`GET /v1/modules/scaibunker/peers/{sha256}` names them,
/// then `GET {peer}/v1/worker/images/{sha256}`), else through the storage proxy
/// (`GET /v1/modules/scaibunker/storage/objects/{object_key}`, worker token), and keeps
/// them only if their SHA-256 is `sha256`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImagePull {
    /// Lowercase hex.
    pub sha256: String,
    pub size_bytes: u64,
    /// Where the storage proxy holds the bytes; `None` for images only workers hold (the
    /// prebuilt ones), which come from peers or not at all.
    #[serde(default)]
    pub object_key: Option<String>,
}

/// A pull that failed on the worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageFailure {
    pub sha256: String,
    pub reason: String,
}

/// `GET /v1/modules/scaibunker/peers/{sha256}` (worker token): the online workers sharing an
/// availability group with the caller whose cache holds the image, the caller excluded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeersResponse {
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub worker_id: String,
    /// Base URL of the peer's worker API; the image is `GET {url}/v1/worker/images/{sha256}`.
    pub url: String,
    /// The bearer token for that request: a peer token for this image and the asking worker,
    /// valid for a few minutes ([`crate::worker_auth::peer_token`]).
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatResponse {
    /// False when the controller does not know this worker id (it must register again).
    pub known: bool,
    /// Bunkers the worker reported that the controller holds as terminated, failed or unknown:
    /// the worker stops them, so no VM outlives its bunker.
    #[serde(default)]
    pub stop_bunkers: Vec<String>,
    /// Images to fetch into the cache (warmed through an availability group or
    /// `POST /images/{id}/warm`). Repeated every heartbeat until the worker reports the image
    /// in `cached_images` or in `image_failures`; a pull already in flight is not restarted.
    #[serde(default)]
    pub pull_images: Vec<ImagePull>,
    /// A rotated credential: the worker switches to it (and keeps it) at once; the one it
    /// sent stops working once the controllers have seen the new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// How long a stopping worker waits for the controller to save its bunkers unless
/// `SCAIBUNKER_STOP_TIMEOUT_S` says otherwise (read by the worker and by `scaibunker up`,
/// which gives its worker that long and a grace period before it kills it).
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 120;

/// `POST /v1/modules/scaibunker/workers/{worker_id}/stopping` (bearer: the worker's
/// credential, for its own id; no body): the worker is stopping on purpose (SIGTERM) and stops
/// its VMs once this answers. The controller passes it over for new bunkers until it registers
/// again, and answers once each bunker it ran is dealt with. Older controllers answer `404`:
/// the worker then stops as it did before (its bunkers fail).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct StoppingResponse {
    /// `session` and `persistent` bunkers saved as `full` snapshots: `paused` with no worker,
    /// restored on their next request on whichever worker placement picks.
    pub passivated: Vec<String>,
    /// `ephemeral` bunkers, ended (their quota released).
    pub terminated: Vec<String>,
    /// Bunkers whose passivation failed: failed, as in a crash (quota released).
    pub failed: Vec<String>,
}

/// `POST /v1/worker/bunkers`: boot a bunker; answers once the agent is ready or boot failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub bunker_id: String,
    pub image_sha256: String,
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub hostname: String,
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// For a `lazy_pull` image the worker may not hold yet: where to fetch it before booting.
    #[serde(default)]
    pub image_pull: Option<ImagePull>,
    /// Restore this snapshot (of an image with `image_sha256`) instead of booting the image.
    #[serde(default)]
    pub snapshot: Option<SnapshotManifest>,
    /// The bunker's tenant, written into its egress audit lines.
    #[serde(default)]
    pub tenant_id: String,
    /// The bunker's network: profile and bandwidth cap (absent: `isolated`, no cap).
    #[serde(default)]
    pub network: NetworkSpec,
}

/// A bunker's network as the worker sets it up (DESIGN.md §9, NETWORK.md §2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub profile: NetworkProfile,
    /// Egress shaped to this many Mbit/s; `None`: no cap.
    #[serde(default)]
    pub bandwidth_mbit: Option<u64>,
    /// `allowlisted`: the host names the guest may resolve and reach (`network_allowlist`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowlist: Vec<String>,
    /// `transit`: the NICs after `eth0`, in order, each on a host bridge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<TransitInterface>,
}

/// One `transit` NIC (the API's `interfaces` entry, its bridge resolved to the worker's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TransitInterface {
    /// The host bridge the NIC's tap joins (made if missing).
    pub bridge: String,
    /// `aa:bb:cc:dd:ee:ff`, unicast; `None`: a generated locally administered one.
    #[serde(default)]
    pub mac: Option<String>,
    /// `false` (needs `scaibunker:l2_transparency`): no spoof guard.
    pub spoof_guard: bool,
}

/// The network profiles, as the controller names them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NetworkProfile {
    #[default]
    Isolated,
    Registry,
    Allowlisted,
    Unrestricted,
    Transit,
}

impl NetworkProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Isolated => "isolated",
            Self::Registry => "registry",
            Self::Allowlisted => "allowlisted",
            Self::Unrestricted => "unrestricted",
            Self::Transit => "transit",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub bunker_id: String,
    pub status: VmStatus,
    /// Guest kernel release reported by the agent's hello.
    pub guest_kernel: Option<String>,
    pub boot_ms: u64,
    /// How the VM came up; absent from workers that predate templates (cold).
    #[serde(default)]
    pub boot_source: BootSource,
}

/// How a bunker's VM came up.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BootSource {
    /// Booted the kernel from scratch.
    #[default]
    Cold,
    /// Restored from the worker's template snapshot of the bunker's shape.
    Template,
    /// Restored from a bunker snapshot in object storage.
    Snapshot,
}

/// What a bunker snapshot holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// The root disk only; a restore boots it cold.
    Disk,
    /// Memory and device state plus the disk; a restore resumes the processes.
    Full,
}

/// `POST /v1/worker/bunkers/{id}/snapshot`: capture the bunker and upload it through the
/// storage proxy under `object_prefix`; answers with the manifest once every object is
/// stored. The bunker is running again before the upload starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotVm {
    pub snapshot_id: String,
    pub kind: SnapshotKind,
    /// Object key prefix, without a trailing `/` (`snapshots/{tenant}/{snapshot_id}`).
    pub object_prefix: String,
}

/// One object of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    /// `disk.qcow2` or `vm.state`.
    pub name: String,
    pub key: String,
    pub size_bytes: u64,
    pub sha256: String,
}

/// Everything a worker needs to restore a snapshot, and to check it can.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    pub kind: SnapshotKind,
    /// The disk is a qcow2 overlay over this image (raw ext4), which the restoring worker
    /// must hold.
    pub image_sha256: String,
    /// The saved VM's shape: a `full` restore must use the same.
    pub memory_mb: u64,
    pub cpu_millicores: u64,
    pub vcpus: u32,
    /// The host name on the saved VM's kernel command line (not the guest's host name).
    pub cmdline_hostname: String,
    /// VMM driver and accelerator that saved the state, e.g. `qemu/tcg`.
    pub runtime: String,
    /// Sizes of the guest kernel and initramfs the saved VM booted.
    pub kernel_bytes: u64,
    pub initramfs_bytes: u64,
    pub files: Vec<SnapshotFile>,
}

impl SnapshotManifest {
    /// Bytes stored for the snapshot.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// Query of `GET /v1/worker/bunkers/{id}/shell`, a WebSocket: binary messages carry terminal
/// bytes both ways, text messages a [`ShellControl`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShellQuery {
    pub cols: u16,
    pub rows: u16,
    /// Run by `/bin/sh -c`.
    pub command: String,
    #[serde(default)]
    pub user: GuestUser,
    /// The session is killed after this long.
    pub timeout_ms: u64,
}

/// The text messages of a shell WebSocket. The controller sends `resize`; the worker ends
/// the session with one `exit` or `error`, then closes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShellControl {
    Resize {
        cols: u16,
        rows: u16,
    },
    Exit {
        /// `None` when the shell was killed by a signal.
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Error {
        code: String,
        message: String,
    },
}

/// `POST /v1/worker/bunkers/{id}/exec`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub program: Program,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: GuestUser,
    /// Base64 of the bytes fed to stdin; `None` means stdin is `/dev/null`.
    #[serde(default)]
    pub stdin_b64: Option<String>,
    pub timeout_ms: u64,
    /// Each of stdout and stderr is kept up to this many bytes; the rest is counted, not kept.
    pub output_limit_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Time inside the guest from spawn to exit.
    pub guest_duration_ms: u64,
    /// Base64 of the kept stdout bytes.
    pub stdout_b64: String,
    pub stderr_b64: String,
    pub stdout_total_bytes: u64,
    pub stderr_total_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileWritten {
    pub size_bytes: u64,
}

/// One page of a directory (`GET …/files/list?path=&user=&limit=&cursor=`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DirListing {
    pub entries: Vec<DirEntry>,
    /// Opaque; passed back as `cursor` for the next page. `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Error body of every worker route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerError {
    /// A stable code: the API's codes where one fits (`BUNKER_NOT_FOUND`, `FILE_NOT_FOUND`,
    /// `IS_A_DIRECTORY`, `INVALID_PATH`, `FILE_TOO_LARGE`, ...), else `BOOT_FAILED`,
    /// `AGENT_UNAVAILABLE`, `IMAGE_NOT_CACHED`, `WORKER_STOPPING` (a create on a worker that
    /// is stopping), `INTERNAL`.
    pub code: String,
    pub message: String,
}

/// One line of `POST /v1/worker/bunkers/{id}/exec/stream` (NDJSON, `application/x-ndjson`):
/// output as it is produced, then exactly one `exit` or `error` line, then the body ends.
/// The request body is an [`ExecRequest`] (its `output_limit_bytes` is ignored: nothing is
/// kept, everything is forwarded). The command keeps running if the reader goes away only
/// until the worker notices the closed connection: then it is cancelled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecStreamEvent {
    Stdout {
        data_b64: String,
    },
    Stderr {
        data_b64: String,
    },
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        guest_duration_ms: u64,
        stdout_total_bytes: u64,
        stderr_total_bytes: u64,
    },
    Error {
        code: String,
        message: String,
    },
}
