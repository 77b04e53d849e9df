//! Worker configuration, read from the environment.
//!
//! Every setting has a default except the worker token; without a controller URL the
//! worker runs standalone (it serves its API but never registers), which is what tests use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::templates::TemplateMode;

impl std::str::FromStr for TemplateMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(ConfigError::Invalid {
                var: "SCAIBUNKER_TEMPLATES",
                value: other.to_owned(),
                expected: "on or off",
            }),
        }
    }
}

/// Which accelerator the QEMU driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when the host has real hardware virtualisation, TCG otherwise.
    #[default]
    Auto,
    Tcg,
    Kvm,
}

impl std::str::FromStr for AccelChoice {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcg" => Ok(Self::Tcg),
            "kvm" => Ok(Self::Kvm),
            other => Err(ConfigError::Invalid {
                var: "SCAIBUNKER_VMM_ACCEL",
                value: other.to_owned(),
                expected: "auto, tcg or kvm",
            }),
        }
    }
}

/// First uid QEMU processes drop to, by default.
pub const DEFAULT_QEMU_UID_BASE: u32 = 20000;
/// How many VMs may run at once under distinct uids, by default.
pub const DEFAULT_QEMU_UID_COUNT: u32 = 1000;
/// Cap on the pulled images' bytes, by default: twenty 1 GiB images, a few per tenant
/// image on a worker serving many, yet a small share of a worker's disk.
pub const DEFAULT_IMAGE_CACHE_MB: u64 = 20 * 1024;
/// Free disk a pull leaves at least, by default: room for bunkers' overlays to grow a
/// little and for logs, so a pull never fills the disk the VMs write to.
pub const DEFAULT_MIN_FREE_DISK_MB: u64 = 2048;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Base URL of the controller; `None` runs the worker standalone.
    pub controller_url: Option<String>,
    /// Base URL of the storage proxy (snapshots go through it); the controller's by default.
    pub storage_url: Option<String>,
    /// The one credential of the worker: the controller presents it, and the worker
    /// presents it to the controller.
    pub worker_token: String,
    pub listen: SocketAddr,
    /// Base URL the controller reaches this worker at; `http://<bound address>` if unset.
    pub advertised_url: Option<String>,
    /// Bunkers run in `<data_dir>/bunkers/<bunker_id>/`.
    pub data_dir: PathBuf,
    /// `vmlinux`, `initramfs.cpio.gz` and one `<name>.ext4` per image.
    pub images_dir: PathBuf,
    pub heartbeat_interval: Duration,
    /// Stable worker name for registration.
    pub name: String,
    /// How long a boot may take until the agent says hello.
    pub boot_timeout: Duration,
    /// `SCAIBUNKER_STOP_TIMEOUT_S` (default 120 s): on SIGTERM, how long the worker waits
    /// for the controller to save its bunkers before it stops their VMs anyway.
    pub stop_timeout: Duration,
    pub accel: AccelChoice,
    /// Largest file one upload may write.
    pub max_file_bytes: u64,
    /// Template snapshots for fast creates (`<data_dir>/templates/`).
    pub templates: TemplateMode,
    /// The unprivileged accounts QEMU drops to when the worker runs as root: uids (and
    /// gids) `qemu_uid_base .. qemu_uid_base + qemu_uid_count`, one per running VM. They
    /// need no `/etc/passwd` entry, but must belong to nobody else on the host.
    pub qemu_uid_base: u32,
    pub qemu_uid_count: u32,
    /// `SCAIBUNKER_QEMU_RUNAS` (default `on`): drop QEMU to those accounts when the worker
    /// is root. `off` keeps QEMU at the worker's uid, an escape hatch only (see
    /// docs/decisions/0009-qemu-confinement.md).
    pub qemu_runas: bool,
    /// `SCAIBUNKER_IMAGE_CACHE_MB` (MiB, default [`DEFAULT_IMAGE_CACHE_MB`]): most bytes the
    /// pulled images in `<data_dir>/images/` hold together; least recently used images no
    /// bunker or template uses are evicted to stay under it. `0` is no cap (`None`): only
    /// the free-disk floor limits the cache. Prebuilt images are not counted.
    pub image_cache_bytes: Option<u64>,
    /// `SCAIBUNKER_MIN_FREE_DISK_MB` (MiB, default [`DEFAULT_MIN_FREE_DISK_MB`]): free space
    /// the disk under `<data_dir>/images/` keeps once a pull lands; a pull evicts images to
    /// keep it, or fails. `0` still needs the image itself to fit.
    pub min_free_disk_bytes: u64,
    /// Bunker networks (`SCAIBUNKER_NET_POOL`, `SCAIBUNKER_EGRESS_DENY`,
    /// `SCAIBUNKER_EGRESS_ALLOW_PRIVATE`, `SCAIBUNKER_DNS_UPSTREAM`, `SCAIBUNKER_NETNS_DIR`,
    /// `SCAIBUNKER_REGISTRY_HOSTS`).
    pub network: crate::network::NetworkConfig,
    /// `SCAIBUNKER_NETWORKS` (`on`, the default from the environment, or `off`): set up
    /// networks for the profiles that have one. They change the host (the table
    /// `inet scaibunker`, IPv4 forwarding), so a standalone configuration (tests) has them off.
    pub networks: bool,
    /// `SCAIBUNKER_EGRESS_AUDIT` (`on`, the default, or `off`): record the networked bunkers'
    /// flows in the egress audit.
    pub egress_audit: bool,
}

/// How long a stopping worker waits for its bunkers to be saved, by default.
pub const DEFAULT_STOP_TIMEOUT: Duration =
    Duration::from_secs(scaibunker_proto::worker::DEFAULT_STOP_TIMEOUT_S);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{var}={value:?} is invalid: expected {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("HOME is not set, so {0} has no default")]
    NoHome(&'static str),
}

/// The `SCAIBUNKER_NET_*`, `SCAIBUNKER_EGRESS_*` and `SCAIBUNKER_DNS_UPSTREAM` settings.
fn read_network(
    lookup: &impl Fn(&str) -> Option<String>,
    network: &mut crate::network::NetworkConfig,
) -> Result<(), ConfigError> {
    use crate::network::Cidr;
    let cidrs = |var: &'static str, v: String| {
        Cidr::parse_list(&v).map_err(|_| ConfigError::Invalid {
            var,
            value: v,
            expected: "comma-separated IPv4 CIDRs such as 10.1.0.0/16,192.0.2.7",
        })
    };
    if let Some(v) = lookup("SCAIBUNKER_NET_POOL") {
        let pool = cidrs("SCAIBUNKER_NET_POOL", v.clone())?;
        network.pool = match pool.as_slice() {
            [one] if one.prefix() <= 30 => *one,
            _ => {
                return Err(ConfigError::Invalid {
                    var: "SCAIBUNKER_NET_POOL",
                    value: v,
                    expected: "one IPv4 CIDR of /30 or wider",
                });
            }
        };
    }
    if let Some(v) = lookup("SCAIBUNKER_EGRESS_DENY") {
        network.deny = cidrs("SCAIBUNKER_EGRESS_DENY", v)?;
    }
    if let Some(v) = lookup("SCAIBUNKER_EGRESS_ALLOW_PRIVATE") {
        network.allow_private = cidrs("SCAIBUNKER_EGRESS_ALLOW_PRIVATE", v)?;
    }
    if let Some(v) = lookup("SCAIBUNKER_DNS_UPSTREAM") {
        network.dns_upstreams =
            crate::network::resolver::parse_upstreams(&v).map_err(|_| ConfigError::Invalid {
                var: "SCAIBUNKER_DNS_UPSTREAM",
                value: v,
                expected: "comma-separated IP or IP:port",
            })?;
    }
    if let Some(n) = parse_u64(lookup, "SCAIBUNKER_NET_MAX_FLOWS")? {
        network.max_flows =
            u32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or(ConfigError::Invalid {
                    var: "SCAIBUNKER_NET_MAX_FLOWS",
                    value: n.to_string(),
                    expected: "a count from 1 to 2^32 - 1",
                })?;
    }
    if let Some(v) = lookup("SCAIBUNKER_NETNS_DIR") {
        network.netns_dir = PathBuf::from(v);
    }
    if let Some(v) = lookup("SCAIBUNKER_REGISTRY_HOSTS") {
        let policy = crate::network::NamePolicy::registry(&v)
            .ok()
            .filter(|p| !p.is_empty())
            .ok_or(ConfigError::Invalid {
                var: "SCAIBUNKER_REGISTRY_HOSTS",
                value: v,
                expected: "comma-separated host names, each plain or with one leading `*.`",
            })?;
        network.registry = std::sync::Arc::new(policy);
    }
    Ok(())
}

impl WorkerConfig {
    /// A standalone configuration: no controller, defaults for everything else.
    pub fn standalone(worker_token: String, data_dir: PathBuf, images_dir: PathBuf) -> Self {
        Self {
            controller_url: None,
            storage_url: None,
            worker_token,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertised_url: None,
            data_dir,
            images_dir,
            heartbeat_interval: Duration::from_secs(10),
            name: host_name(),
            boot_timeout: Duration::from_secs(120),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            accel: AccelChoice::Auto,
            max_file_bytes: 1 << 30,
            templates: TemplateMode::On,
            qemu_uid_base: DEFAULT_QEMU_UID_BASE,
            qemu_uid_count: DEFAULT_QEMU_UID_COUNT,
            qemu_runas: true,
            image_cache_bytes: Some(DEFAULT_IMAGE_CACHE_MB * MIB),
            min_free_disk_bytes: DEFAULT_MIN_FREE_DISK_MB * MIB,
            network: crate::network::NetworkConfig::with_defaults(),
            networks: false,
            egress_audit: true,
        }
    }

    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the configuration through `lookup`, so tests need not touch the environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let home = lookup("HOME").map(PathBuf::from);
        let worker_token = lookup("SCAIBUNKER_WORKER_TOKEN")
            .ok_or(ConfigError::Missing("SCAIBUNKER_WORKER_TOKEN"))?;
        let data_dir = match lookup("SCAIBUNKER_WORKER_DATA_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => home
                .as_ref()
                .ok_or(ConfigError::NoHome("SCAIBUNKER_WORKER_DATA_DIR"))?
                .join(".local/share/scaibunker/worker"),
        };
        let images_dir = match lookup("SCAIBUNKER_IMAGES_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => default_images_dir(home.as_ref())
                .ok_or(ConfigError::NoHome("SCAIBUNKER_IMAGES_DIR"))?,
        };
        let mut config = Self::standalone(worker_token, data_dir, images_dir);
        config.controller_url =
            lookup("SCAIBUNKER_CONTROLLER_URL").map(|url| url.trim_end_matches('/').to_owned());
        config.storage_url = lookup("SCAIBUNKER_STORAGE_URL")
            .map(|url| url.trim_end_matches('/').to_owned())
            .or_else(|| config.controller_url.clone());
        config.advertised_url =
            lookup("SCAIBUNKER_WORKER_URL").map(|url| url.trim_end_matches('/').to_owned());
        if let Some(listen) = lookup("SCAIBUNKER_WORKER_LISTEN") {
            config.listen = listen.parse().map_err(|_| ConfigError::Invalid {
                var: "SCAIBUNKER_WORKER_LISTEN",
                value: listen.clone(),
                expected: "a socket address such as 127.0.0.1:7070",
            })?;
        }
        if let Some(name) = lookup("SCAIBUNKER_WORKER_NAME") {
            config.name = name;
        }
        if let Some(s) = parse_u64(&lookup, "WORKER_HEARTBEAT_INTERVAL_S")? {
            config.heartbeat_interval = Duration::from_secs(s.max(1));
        }
        if let Some(s) = parse_u64(&lookup, "SCAIBUNKER_BOOT_TIMEOUT_S")? {
            config.boot_timeout = Duration::from_secs(s.max(1));
        }
        if let Some(s) = parse_u64(&lookup, "SCAIBUNKER_STOP_TIMEOUT_S")? {
            config.stop_timeout = Duration::from_secs(s);
        }
        if let Some(accel) = lookup("SCAIBUNKER_VMM_ACCEL") {
            config.accel = accel.parse()?;
        }
        if let Some(n) = parse_u64(&lookup, "SCAIBUNKER_MAX_FILE_BYTES")? {
            config.max_file_bytes = n;
        }
        if let Some(mode) = lookup("SCAIBUNKER_TEMPLATES") {
            config.templates = mode.parse()?;
        }
        let uid = |var: &'static str| -> Result<Option<u32>, ConfigError> {
            parse_u64(&lookup, var)?
                .map(|n| {
                    u32::try_from(n).map_err(|_| ConfigError::Invalid {
                        var,
                        value: n.to_string(),
                        expected: "a uid below 2^32",
                    })
                })
                .transpose()
        };
        if let Some(v) = lookup("SCAIBUNKER_QEMU_RUNAS") {
            config.qemu_runas = match v.as_str() {
                "on" => true,
                "off" => false,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "SCAIBUNKER_QEMU_RUNAS",
                        value: v,
                        expected: "on or off",
                    });
                }
            };
        }
        if let Some(base) = uid("SCAIBUNKER_QEMU_UID_BASE")? {
            config.qemu_uid_base = base;
        }
        if let Some(count) = uid("SCAIBUNKER_QEMU_UID_COUNT")? {
            config.qemu_uid_count = count;
        }
        if let Some(mb) = parse_mib(&lookup, "SCAIBUNKER_IMAGE_CACHE_MB")? {
            config.image_cache_bytes = (mb > 0).then_some(mb);
        }
        if let Some(mb) = parse_mib(&lookup, "SCAIBUNKER_MIN_FREE_DISK_MB")? {
            config.min_free_disk_bytes = mb;
        }
        read_network(&lookup, &mut config.network)?;
        config.networks = true;
        if let Some(v) = lookup("SCAIBUNKER_NETWORKS") {
            config.networks = match v.as_str() {
                "on" => true,
                "off" => false,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "SCAIBUNKER_NETWORKS",
                        value: v,
                        expected: "on or off",
                    });
                }
            };
        }
        if let Some(v) = lookup("SCAIBUNKER_EGRESS_AUDIT") {
            config.egress_audit = match v.as_str() {
                "on" => true,
                "off" => false,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "SCAIBUNKER_EGRESS_AUDIT",
                        value: v,
                        expected: "on or off",
                    });
                }
            };
        }
        // Never root, never the kernel's "no uid" (u32::MAX), at least one account.
        let end = u64::from(config.qemu_uid_base) + u64::from(config.qemu_uid_count);
        if config.qemu_uid_base == 0 || config.qemu_uid_count == 0 || end > u64::from(u32::MAX) {
            return Err(ConfigError::Invalid {
                var: "SCAIBUNKER_QEMU_UID_BASE",
                value: format!(
                    "{} (with SCAIBUNKER_QEMU_UID_COUNT={})",
                    config.qemu_uid_base, config.qemu_uid_count
                ),
                expected: "a range of at least one uid above 0 and below 2^32 - 1",
            });
        }
        Ok(config)
    }
}

/// `$HOME/.cache/scaibunker/images`, where `images/build.sh` puts the guest artefacts.
pub fn default_images_dir(home: Option<&PathBuf>) -> Option<PathBuf> {
    home.map(|h| h.join(".cache/scaibunker/images"))
}

fn parse_u64(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<u64>, ConfigError> {
    lookup(var)
        .map(|value| {
            value.trim().parse().map_err(|_| ConfigError::Invalid {
                var,
                value,
                expected: "a non-negative integer",
            })
        })
        .transpose()
}

/// A size in MiB, as bytes.
fn parse_mib(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<u64>, ConfigError> {
    parse_u64(lookup, var)?
        .map(|mb| {
            mb.checked_mul(MIB).ok_or_else(|| ConfigError::Invalid {
                var,
                value: mb.to_string(),
                expected: "a size in MiB below 2^44",
            })
        })
        .transpose()
}

/// The kernel's host name, or `worker` if it is not valid UTF-8.
pub fn host_name() -> String {
    let uname = rustix::system::uname();
    uname
        .nodename()
        .to_str()
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or("worker")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup_in(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_apply_when_only_token_and_home_are_set() {
        let c = WorkerConfig::from_lookup(lookup_in(&[
            ("HOME", "/home/w"),
            ("SCAIBUNKER_WORKER_TOKEN", "t"),
        ]))
        .expect("valid");
        assert_eq!(c.controller_url, None);
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(
            c.data_dir,
            PathBuf::from("/home/w/.local/share/scaibunker/worker")
        );
        assert_eq!(
            c.images_dir,
            PathBuf::from("/home/w/.cache/scaibunker/images")
        );
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.boot_timeout, Duration::from_secs(120));
        assert_eq!(c.stop_timeout, DEFAULT_STOP_TIMEOUT);
        assert_eq!(c.accel, AccelChoice::Auto);
        assert_eq!(c.max_file_bytes, 1 << 30);
        assert_eq!(c.templates, TemplateMode::On);
        assert_eq!((c.qemu_uid_base, c.qemu_uid_count), (20000, 1000));
        assert!(
            c.qemu_runas,
            "qemu drops to a uid of its own unless told not to"
        );
        assert_eq!(c.image_cache_bytes, Some(20 << 30), "a 20 GiB image cache");
        assert_eq!(c.min_free_disk_bytes, 2 << 30, "2 GiB of disk kept free");
    }

    #[test]
    fn rejects_missing_token_and_bad_values() {
        assert!(matches!(
            WorkerConfig::from_lookup(lookup_in(&[("HOME", "/h")])),
            Err(ConfigError::Missing("SCAIBUNKER_WORKER_TOKEN"))
        ));
        let bad = [
            ("SCAIBUNKER_VMM_ACCEL", "hvf"),
            ("SCAIBUNKER_WORKER_LISTEN", "nowhere"),
            ("SCAIBUNKER_BOOT_TIMEOUT_S", "-1"),
            ("SCAIBUNKER_TEMPLATES", "maybe"),
            // QEMU must never run as root, and the range must fit in a uid.
            ("SCAIBUNKER_QEMU_UID_BASE", "0"),
            ("SCAIBUNKER_QEMU_UID_BASE", "4294967295"),
            ("SCAIBUNKER_QEMU_UID_COUNT", "0"),
            ("SCAIBUNKER_QEMU_RUNAS", "yes"),
            ("SCAIBUNKER_IMAGE_CACHE_MB", "20G"),
            ("SCAIBUNKER_IMAGE_CACHE_MB", "-1"),
            // Overflows u64 once in bytes.
            ("SCAIBUNKER_IMAGE_CACHE_MB", "17592186044416"),
            ("SCAIBUNKER_MIN_FREE_DISK_MB", "lots"),
            ("SCAIBUNKER_REGISTRY_HOSTS", "https://pypi.org/simple"),
            ("SCAIBUNKER_REGISTRY_HOSTS", " , "),
        ];
        for (var, value) in bad {
            let r = WorkerConfig::from_lookup(lookup_in(&[
                ("HOME", "/h"),
                ("SCAIBUNKER_WORKER_TOKEN", "t"),
                (var, value),
            ]));
            assert!(
                matches!(r, Err(ConfigError::Invalid { .. })),
                "{var}={value}"
            );
        }
    }

    #[test]
    fn reads_every_setting() {
        let c = WorkerConfig::from_lookup(lookup_in(&[
            ("SCAIBUNKER_WORKER_TOKEN", "t"),
            ("SCAIBUNKER_CONTROLLER_URL", "http://c:1/"),
            ("SCAIBUNKER_WORKER_URL", "http://w:2"),
            ("SCAIBUNKER_WORKER_LISTEN", "0.0.0.0:7070"),
            ("SCAIBUNKER_WORKER_DATA_DIR", "/d"),
            ("SCAIBUNKER_IMAGES_DIR", "/i"),
            ("WORKER_HEARTBEAT_INTERVAL_S", "3"),
            ("SCAIBUNKER_WORKER_NAME", "w1"),
            ("SCAIBUNKER_BOOT_TIMEOUT_S", "30"),
            ("SCAIBUNKER_STOP_TIMEOUT_S", "45"),
            ("SCAIBUNKER_VMM_ACCEL", "tcg"),
            ("SCAIBUNKER_MAX_FILE_BYTES", "1024"),
            ("SCAIBUNKER_TEMPLATES", "off"),
            ("SCAIBUNKER_QEMU_UID_BASE", "300000"),
            ("SCAIBUNKER_QEMU_UID_COUNT", "64"),
            ("SCAIBUNKER_QEMU_RUNAS", "off"),
            ("SCAIBUNKER_IMAGE_CACHE_MB", "512"),
            ("SCAIBUNKER_MIN_FREE_DISK_MB", "100"),
            ("SCAIBUNKER_REGISTRY_HOSTS", "mirror.internal,*.pkg.test"),
        ]))
        .expect("valid");
        assert!(c.network.registry.allows("mirror.internal"));
        assert!(c.network.registry.allows("a.pkg.test"));
        assert!(
            !c.network.registry.allows("pypi.org"),
            "the list replaces the default"
        );
        assert_eq!(c.image_cache_bytes, Some(512 << 20));
        assert_eq!(c.min_free_disk_bytes, 100 << 20);
        assert_eq!((c.qemu_uid_base, c.qemu_uid_count), (300000, 64));
        assert!(!c.qemu_runas);
        assert_eq!(c.controller_url.as_deref(), Some("http://c:1"));
        assert_eq!(c.advertised_url.as_deref(), Some("http://w:2"));
        assert_eq!(c.listen, SocketAddr::from(([0, 0, 0, 0], 7070)));
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.images_dir, PathBuf::from("/i"));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(c.name, "w1");
        assert_eq!(c.boot_timeout, Duration::from_secs(30));
        assert_eq!(c.stop_timeout, Duration::from_secs(45));
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.max_file_bytes, 1024);
        assert_eq!(c.templates, TemplateMode::Off);
        assert_eq!(
            c.storage_url.as_deref(),
            Some("http://c:1"),
            "snapshots go through the controller's storage proxy by default"
        );
    }

    #[test]
    fn a_zero_image_cache_cap_is_no_cap_and_a_zero_floor_is_no_floor() {
        let c = WorkerConfig::from_lookup(lookup_in(&[
            ("HOME", "/h"),
            ("SCAIBUNKER_WORKER_TOKEN", "t"),
            ("SCAIBUNKER_IMAGE_CACHE_MB", "0"),
            ("SCAIBUNKER_MIN_FREE_DISK_MB", "0"),
        ]))
        .expect("valid");
        assert_eq!(c.image_cache_bytes, None);
        assert_eq!(c.min_free_disk_bytes, 0);
    }

    #[test]
    fn a_separate_storage_proxy_may_be_named() {
        let c = WorkerConfig::from_lookup(lookup_in(&[
            ("SCAIBUNKER_WORKER_TOKEN", "t"),
            ("SCAIBUNKER_WORKER_DATA_DIR", "/d"),
            ("SCAIBUNKER_IMAGES_DIR", "/i"),
            ("SCAIBUNKER_CONTROLLER_URL", "http://c:1"),
            ("SCAIBUNKER_STORAGE_URL", "http://proxy:9/"),
        ]))
        .expect("valid");
        assert_eq!(c.storage_url.as_deref(), Some("http://proxy:9"));
    }
}
