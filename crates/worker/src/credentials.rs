//! This worker's credential (`scaibunker_proto::worker_auth`): what it presents to the
//! controllers and the storage proxy, and what its API accepts from them.
//!
//! - With a controller: the controllers hand the credential over at registration (and a
//!   rotated one in a heartbeat answer); it is kept in `<data>/worker.credential` (mode 0600,
//!   written to a temporary file and renamed) so a restart registers with it. The shared join
//!   token (`SCAIBUNKER_WORKER_TOKEN`) is presented only to register a worker that has no
//!   credential yet (or whose stored one was refused, after an admin reset it); the API never
//!   accepts it. After a rotation the previous credential is still accepted for
//!   [`PREVIOUS_GRACE`], since the controllers use it until they have seen the new one.
//! - Standalone (no controller): the API accepts the configured token, as a shared secret
//!   with whoever drives this worker directly.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use scaibunker_proto::worker_auth::constant_time_eq;

/// How long the credential a rotation replaced keeps opening the API.
pub const PREVIOUS_GRACE: Duration = Duration::from_secs(600);
/// Where the credential is kept, in the data directory.
pub const CREDENTIAL_FILE: &str = "worker.credential";

#[derive(Debug, Default)]
struct Held {
    current: Option<String>,
    previous: Option<(String, Instant)>,
}

#[derive(Debug)]
pub struct Credentials {
    join_token: String,
    /// `None`: standalone, the join token is the API's secret.
    file: Option<PathBuf>,
    held: RwLock<Held>,
}

impl Credentials {
    /// A worker nobody registers: its API takes `token`.
    pub fn standalone(token: &str) -> Self {
        Self {
            join_token: token.to_owned(),
            file: None,
            held: RwLock::default(),
        }
    }

    /// A worker of a controller: its credential from `<data_dir>/worker.credential` if kept.
    pub fn open(join_token: &str, data_dir: &Path) -> Self {
        let file = data_dir.join(CREDENTIAL_FILE);
        let current = std::fs::read_to_string(&file)
            .ok()
            .map(|c| c.trim().to_owned())
            .filter(|c| c.starts_with(scaibunker_proto::worker_auth::CREDENTIAL_PREFIX));
        Self {
            join_token: join_token.to_owned(),
            file: Some(file),
            held: RwLock::new(Held {
                current,
                previous: None,
            }),
        }
    }

    /// The credential, if the controllers gave one.
    pub fn current(&self) -> Option<String> {
        self.held
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .current
            .clone()
    }

    /// What to present to the controllers and the storage proxy: the credential, or before
    /// there is one the join token (which only registers).
    pub fn bearer(&self) -> String {
        self.current().unwrap_or_else(|| self.join_token.clone())
    }

    /// The join token, to register when there is no credential or it was refused.
    pub fn join_token(&self) -> &str {
        &self.join_token
    }

    /// Takes `credential` (from a registration or a rotation) and keeps it on disk.
    pub fn set(&self, credential: &str) -> std::io::Result<()> {
        {
            let mut held = self.held.write().unwrap_or_else(PoisonError::into_inner);
            if held.current.as_deref() == Some(credential) {
                return Ok(());
            }
            if let Some(old) = held.current.replace(credential.to_owned()) {
                held.previous = Some((old, Instant::now()));
            }
        }
        let Some(file) = &self.file else {
            return Ok(());
        };
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = file.with_extension("credential.part");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(credential.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    }

    /// Forgets a credential the controllers refused (an admin reset it).
    pub fn forget(&self) {
        let mut held = self.held.write().unwrap_or_else(PoisonError::into_inner);
        held.current = None;
        held.previous = None;
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(file);
        }
    }

    /// The credentials this worker holds that may still be used with it: the current one and
    /// a replaced one within its grace. Empty for a standalone worker.
    pub fn own(&self) -> Vec<String> {
        let held = self.held.read().unwrap_or_else(PoisonError::into_inner);
        held.current
            .iter()
            .cloned()
            .chain(
                held.previous
                    .iter()
                    .filter(|(_, at)| at.elapsed() < PREVIOUS_GRACE)
                    .map(|(c, _)| c.clone()),
            )
            .collect()
    }

    /// Whether `presented` opens this worker's API.
    pub fn accepts(&self, presented: &str) -> bool {
        if self.file.is_none() {
            return constant_time_eq(presented.as_bytes(), self.join_token.as_bytes());
        }
        self.own()
            .iter()
            .any(|c| constant_time_eq(c.as_bytes(), presented.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_of_a_controller_accepts_its_credential_never_the_join_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Credentials::open("swt_join", dir.path());
        assert_eq!(c.bearer(), "swt_join");
        assert!(!c.accepts("swt_join"), "before any credential");
        c.set("swc_1_aa_wrk_a").expect("set");
        assert!(c.accepts("swc_1_aa_wrk_a"));
        assert!(!c.accepts("swt_join"));
        assert_eq!(c.bearer(), "swc_1_aa_wrk_a");
        // Kept across a restart, mode 0600.
        let again = Credentials::open("swt_join", dir.path());
        assert_eq!(again.current().as_deref(), Some("swc_1_aa_wrk_a"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(CREDENTIAL_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A rotation: both work during the grace.
        c.set("swc_2_bb_wrk_a").expect("rotate");
        assert!(c.accepts("swc_2_bb_wrk_a") && c.accepts("swc_1_aa_wrk_a"));
        c.forget();
        assert!(!c.accepts("swc_2_bb_wrk_a"));
        assert_eq!(c.bearer(), "swt_join");
        assert!(!dir.path().join(CREDENTIAL_FILE).exists());

        let standalone = Credentials::standalone("swt_join");
        assert!(standalone.accepts("swt_join"));
        assert!(!standalone.accepts("swt_other"));
    }
}
