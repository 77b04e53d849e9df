//! `scaibunker admin …`: operator commands that work on the installation's database directly,
//! with the controller running or not.
//!
//! The database is found as `serve` finds it: `SCAIBUNKER_DATABASE_URL`, else the SQLite file
//! of the data dir (`--data-dir`, default `~/.local/share/scaibunker`, which is also `up`'s).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::service::auth;
use scaibunker_controller::store::Store;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Mint a new super-admin API key (printed once, audited as `api_key.recover`): the way
    /// back in when every super-admin key is lost.
    RecoverKey {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

pub async fn admin(command: AdminCommand, json: bool) -> Result<()> {
    match command {
        AdminCommand::RecoverKey { data_dir } => recover_key(data_dir, json).await,
    }
}

/// The database URL `serve` would use for `data_dir`.
fn database_url(data_dir: &Path) -> Result<String> {
    let listen: SocketAddr = "127.0.0.1:0".parse().context("a literal address")?;
    let config = ControllerConfig::embedded(data_dir.to_path_buf(), listen, String::new());
    Ok(config.with_env().database_url)
}

async fn recover_key(data_dir: Option<PathBuf>, json: bool) -> Result<()> {
    let dir = match data_dir {
        Some(d) => d,
        None => crate::up::default_data_dir()?,
    };
    let url = database_url(&dir)?;
    // Opening a missing SQLite file would create an empty installation: say what is wrong.
    if let Some(path) = url.strip_prefix("sqlite://")
        && !Path::new(path.split('?').next().unwrap_or(path)).exists()
    {
        bail!(
            "no database at {path}; pass the installation's --data-dir or SCAIBUNKER_DATABASE_URL"
        );
    }
    let store = Store::open(&url)
        .await
        .with_context(|| format!("opening the database {}", redact(&url)))?;
    let recovered = auth::recover_key(&store).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "key": recovered.key,
                "id": recovered.key_id,
                "user_id": recovered.user_id,
                "tenant_id": recovered.tenant_id,
            })
        );
    } else {
        println!("super-admin key (shown once): {}", recovered.key);
        eprintln!(
            "key {} of user {} (tenant {}); audited as api_key.recover",
            recovered.key_id, recovered.user_id, recovered.tenant_id
        );
    }
    Ok(())
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("mysql://root:hunter2@db:3306/sb"),
            "mysql://root:***@db:3306/sb"
        );
        assert_eq!(redact("mysql://root@db/sb"), "mysql://root@db/sb");
        assert_eq!(redact("sqlite:///x/y.db"), "sqlite:///x/y.db");
    }
}
