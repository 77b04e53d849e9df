//! What a bunker is asked to be: lifecycle mode, network profile, resources, and their
//! defaults and limits. Validation returns every problem at once, each naming its field, so the
//! HTTP layer can answer `422 VALIDATION_ERROR` with one detail per field.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LifecycleMode {
    #[default]
    Ephemeral,
    Session,
    Persistent,
}

impl LifecycleMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ephemeral => "ephemeral",
            Self::Session => "session",
            Self::Persistent => "persistent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Ephemeral, Self::Session, Self::Persistent]
            .into_iter()
            .find(|m| m.as_str() == s)
    }

    /// Default maximum lifetime; `None` means no cap (persistent bunkers).
    pub fn default_max_lifetime(self) -> Option<Duration> {
        match self {
            Self::Ephemeral => Some(Duration::from_secs(3600)),
            Self::Session => Some(Duration::from_secs(8 * 3600)),
            Self::Persistent => None,
        }
    }

    pub fn default_idle_timeout(self) -> Duration {
        match self {
            Self::Ephemeral => Duration::from_secs(300),
            Self::Session | Self::Persistent => Duration::from_secs(900),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Isolated,
            Self::Registry,
            Self::Allowlisted,
            Self::Unrestricted,
            Self::Transit,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// Resources a bunker asks for, or a worker has free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub gpu_count: u64,
}

impl Resources {
    /// Whether `self` fits inside `free`.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_millicores <= free.cpu_millicores
            && self.memory_mb <= free.memory_mb
            && self.disk_mb <= free.disk_mb
            && self.gpu_count <= free.gpu_count
    }

    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            cpu_millicores: self.cpu_millicores.saturating_sub(other.cpu_millicores),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
            disk_mb: self.disk_mb.saturating_sub(other.disk_mb),
            gpu_count: self.gpu_count.saturating_sub(other.gpu_count),
        }
    }

    pub fn add(&self, other: &Resources) -> Resources {
        Resources {
            cpu_millicores: self.cpu_millicores + other.cpu_millicores,
            memory_mb: self.memory_mb + other.memory_mb,
            disk_mb: self.disk_mb + other.disk_mb,
            gpu_count: self.gpu_count + other.gpu_count,
        }
    }
}

/// Platform defaults when neither the request nor the image names a value.
pub const DEFAULT_RESOURCES: Resources = Resources {
    cpu_millicores: 1000,
    memory_mb: 512,
    disk_mb: 1024,
    gpu_count: 0,
};

/// Per-field bounds, inclusive, that any single bunker must respect.
pub const CPU_MILLICORES_RANGE: (u64, u64) = (100, 64_000);
pub const MEMORY_MB_RANGE: (u64, u64) = (64, 262_144);
pub const DISK_MB_RANGE: (u64, u64) = (64, 1_048_576);
pub const GPU_COUNT_RANGE: (u64, u64) = (0, 16);
pub const BANDWIDTH_MBIT_RANGE: (u64, u64) = (1, 10_000);
/// Longest lifetime or idle timeout a caller may ask for: 30 days.
pub const MAX_DURATION_S: u64 = 30 * 24 * 3600;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn check_range(
    errors: &mut Vec<FieldError>,
    field: &'static str,
    value: u64,
    (lo, hi): (u64, u64),
) {
    if value < lo || value > hi {
        errors.push(FieldError {
            field,
            message: format!("must be between {lo} and {hi}"),
        });
    }
}

/// Checks each resource against its platform bounds.
pub fn validate_resources(r: &Resources) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_range(
        &mut errors,
        "cpu_millicores",
        r.cpu_millicores,
        CPU_MILLICORES_RANGE,
    );
    check_range(&mut errors, "memory_mb", r.memory_mb, MEMORY_MB_RANGE);
    check_range(&mut errors, "disk_mb", r.disk_mb, DISK_MB_RANGE);
    check_range(&mut errors, "gpu_count", r.gpu_count, GPU_COUNT_RANGE);
    errors
}

/// Checks a lifetime or idle timeout in seconds.
pub fn validate_duration_s(field: &'static str, value: u64) -> Option<FieldError> {
    (value == 0 || value > MAX_DURATION_S).then(|| FieldError {
        field,
        message: format!("must be between 1 and {MAX_DURATION_S} seconds"),
    })
}

/// Checks a bandwidth cap.
pub fn validate_bandwidth_mbit(value: u64) -> Option<FieldError> {
    let mut errors = Vec::new();
    check_range(&mut errors, "bandwidth_mbit", value, BANDWIDTH_MBIT_RANGE);
    errors.pop()
}

/// `transit` interfaces a bunker may have after `eth0`.
pub const MAX_TRANSIT_INTERFACES: usize = 8;

/// Whether `text` is a unicast MAC written `aa:bb:cc:dd:ee:ff` (not all zeros).
pub fn valid_unicast_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
        && parts.iter().any(|p| *p != "00")
}

/// Whether a valid MAC (see [`valid_unicast_mac`]) is locally administered (its first
/// octet's second bit set): not a physical device's.
pub fn locally_administered_mac(text: &str) -> bool {
    text.get(..2)
        .and_then(|b| u8::from_str_radix(b, 16).ok())
        .is_some_and(|b| b & 2 == 2)
}

/// Checks one `network_allowlist` entry: a plain host name, or one leading `*.` wildcard;
/// no scheme, path, port, `**`, or `*` inside a label; labels 1–63 characters.
pub fn validate_allowlist_host(host: &str) -> Result<(), String> {
    if host.is_empty() || host.len() > 253 {
        return Err("must be a host name of 1 to 253 characters".into());
    }
    let rest = host.strip_prefix("*.").unwrap_or(host);
    if rest.contains('*') {
        return Err("`*` is allowed only as one leading `*.` label".into());
    }
    for label in rest.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1 to 63 characters".into());
        }
        let ok = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "label `{label}` may hold only letters, digits and inner hyphens (no scheme, path or port)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_must_be_unicast_and_written_in_full() {
        assert!(valid_unicast_mac("02:5b:00:00:07:01"));
        assert!(locally_administered_mac("02:5b:00:00:07:01"));
        assert!(
            !locally_administered_mac("00:11:22:33:44:55"),
            "a vendor's MAC"
        );
        for bad in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "02:5b:00:00:07",
            "02-5b-00-00-07-01",
            "2:5b:0:0:7:1",
            "zz:5b:00:00:07:01",
        ] {
            assert!(!valid_unicast_mac(bad), "{bad}");
        }
    }

    #[test]
    fn lifecycle_defaults_follow_the_design() {
        use LifecycleMode::*;
        let table = [
            (Ephemeral, Some(3600), 300),
            (Session, Some(28800), 900),
            (Persistent, None, 900),
        ];
        for (mode, lifetime, idle) in table {
            assert_eq!(
                mode.default_max_lifetime().map(|d| d.as_secs()),
                lifetime,
                "{mode:?}"
            );
            assert_eq!(mode.default_idle_timeout().as_secs(), idle, "{mode:?}");
            assert_eq!(LifecycleMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(LifecycleMode::parse("forever"), None);
    }

    #[test]
    fn resource_bounds_name_each_bad_field() {
        assert!(validate_resources(&DEFAULT_RESOURCES).is_empty());
        let bad = Resources {
            cpu_millicores: 50,
            memory_mb: 512,
            disk_mb: 10_000_000,
            gpu_count: 0,
        };
        let fields: Vec<_> = validate_resources(&bad).iter().map(|e| e.field).collect();
        assert_eq!(fields, ["cpu_millicores", "disk_mb"]);
    }

    #[test]
    fn allowlist_host_rules() {
        let table = [
            ("example.com", true),
            ("*.example.com", true),
            ("pypi.org", true),
            ("a-b.c", true),
            ("", false),
            ("https://example.com", false),
            ("example.com/path", false),
            ("example.com:443", false),
            ("**.example.com", false),
            ("ex*ample.com", false),
            ("a.*.com", false),
            ("-a.com", false),
            ("a..com", false),
        ];
        for (host, ok) in table {
            assert_eq!(validate_allowlist_host(host).is_ok(), ok, "{host:?}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(validate_allowlist_host(&long_label).is_err());
    }

    #[test]
    fn durations_and_bandwidth_bounds() {
        assert!(validate_duration_s("idle_timeout_s", 0).is_some());
        assert!(validate_duration_s("idle_timeout_s", 60).is_none());
        assert!(validate_duration_s("max_lifetime_s", MAX_DURATION_S + 1).is_some());
        assert!(validate_bandwidth_mbit(0).is_some());
        assert!(validate_bandwidth_mbit(10_000).is_none());
        assert!(validate_bandwidth_mbit(10_001).is_some());
    }

    #[test]
    fn fits_and_arithmetic() {
        let small = Resources {
            cpu_millicores: 500,
            memory_mb: 256,
            disk_mb: 100,
            gpu_count: 0,
        };
        assert!(small.fits_in(&DEFAULT_RESOURCES));
        assert!(!DEFAULT_RESOURCES.fits_in(&small));
        assert_eq!(small.add(&small).saturating_sub(&small), small);
    }
}
