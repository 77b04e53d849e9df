//! Which names and ports a name-filtered bunker may reach (NETWORK.md §2.3, §5): the
//! `allowlisted` profile's `network_allowlist`, or the `registry` profile's host list.
//!
//! A pattern is a host name (`api.example.com`, matched exactly) or one leading wildcard
//! label (`*.example.com`, matching every name below the apex but not the apex). Names are
//! compared without case and without a trailing dot.

use std::collections::BTreeSet;

/// The `registry` profile's default host list, versioned in the repository.
pub const DEFAULT_REGISTRY_HOSTS: &str = include_str!("registry-hosts.txt");

/// The TCP ports the `registry` profile may use.
pub const REGISTRY_PORTS: [u16; 2] = [80, 443];

/// The names one bunker may resolve, and the ports it may use on their addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePolicy {
    exact: BTreeSet<String>,
    /// `.example.com` for `*.example.com`.
    below: BTreeSet<String>,
    /// `None`: any TCP port (`allowlisted`); otherwise only these.
    ports: Option<Vec<u16>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{pattern}` is not a host name pattern: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

impl NamePolicy {
    /// The policy of `patterns` on `ports` (`None`: any TCP port).
    pub fn new<S: AsRef<str>>(
        patterns: &[S],
        ports: Option<Vec<u16>>,
    ) -> Result<Self, PatternError> {
        let mut exact = BTreeSet::new();
        let mut below = BTreeSet::new();
        for pattern in patterns {
            let pattern = pattern.as_ref();
            scaibunker_core::spec::validate_allowlist_host(pattern).map_err(|reason| {
                PatternError {
                    pattern: pattern.to_owned(),
                    reason,
                }
            })?;
            let lower = pattern.to_ascii_lowercase();
            match lower.strip_prefix('*') {
                Some(suffix) => below.insert(suffix.to_owned()),
                None => exact.insert(lower),
            };
        }
        Ok(Self {
            exact,
            below,
            ports,
        })
    }

    /// The `registry` profile's policy over a host list in [`DEFAULT_REGISTRY_HOSTS`]'s
    /// format (one name per line, `#` comments) or comma-separated.
    pub fn registry(list: &str) -> Result<Self, PatternError> {
        let names: Vec<&str> = list
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default())
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        Self::new(&names, Some(REGISTRY_PORTS.to_vec()))
    }

    /// Whether the guest may resolve `name` (as asked: any case, trailing dot or not).
    pub fn allows(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.exact.contains(&name) {
            return true;
        }
        // Every proper suffix starting at a dot, so `a.b.example.com` tries
        // `.b.example.com` and `.example.com`; the apex itself is never a suffix.
        name.match_indices('.')
            .any(|(i, _)| i > 0 && self.below.contains(&name[i..]))
    }

    /// The TCP ports pinned addresses may be reached on (`None`: any).
    pub fn ports(&self) -> Option<&[u16]> {
        self.ports.as_deref()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.below.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_matches_below_the_apex_and_never_the_apex_or_a_lookalike() {
        let p = NamePolicy::new(&["api.allowed.test", "*.cdn-a.test"], None).unwrap();
        for (name, ok) in [
            ("api.allowed.test", true),
            ("API.Allowed.Test.", true),
            ("allowed.test", false),
            ("x.api.allowed.test", false),
            ("x.cdn-a.test", true),
            ("a.b.cdn-a.test", true),
            ("cdn-a.test", false),
            ("xcdn-a.test", false),
            ("x.cdn-a.test.evil.test", false),
            ("evil.test", false),
            ("", false),
            (".cdn-a.test", false),
        ] {
            assert_eq!(p.allows(name), ok, "{name:?}");
        }
        assert_eq!(p.ports(), None);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "*",
            "**.a.test",
            "a.*.test",
            "http://a.test",
            "a.test:80",
            "a/b",
        ] {
            assert!(NamePolicy::new(&[bad], None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_registry_list_parses_and_names_the_big_registries() {
        let p = NamePolicy::registry(DEFAULT_REGISTRY_HOSTS).unwrap();
        for name in [
            "pypi.org",
            "files.pythonhosted.org",
            "registry.npmjs.org",
            "static.crates.io",
            "repo1.maven.org",
            "rubygems.org",
            "huggingface.co",
            "deb.debian.org",
            "de.archive.ubuntu.com",
            "dl-cdn.alpinelinux.org",
        ] {
            assert!(p.allows(name), "{name}");
        }
        assert!(!p.allows("github.com"));
        assert_eq!(p.ports(), Some(&[80, 443][..]));
        let custom = NamePolicy::registry("mirror.internal, pypi.org").unwrap();
        assert!(custom.allows("mirror.internal") && !custom.allows("crates.io"));
    }
}
