//! Client commands over the SDK. The API address comes from `SCAIBUNKER_URL` (default
//! `http://127.0.0.1:8080`); the key from `SCAIBUNKER_API_KEY`, else the `up` data dir's
//! `admin.key`.

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use scaibunker_api::bunkers::{Bunker, CreateBunker};
use scaibunker_api::exec::{ExecRequest, ExecUser};
use scaibunker_api::snapshots::{CreateSnapshot, Snapshot, SnapshotKind};
use scaibunker_sdk::{Client, ExecEvent};

#[derive(Subcommand)]
pub enum BunkerCommand {
    /// Create a bunker and wait until it runs.
    Create {
        /// Image name or id (default `default`).
        #[arg(long)]
        image: Option<String>,
        /// Restore this snapshot (`snp_…`) instead of booting an image.
        #[arg(long, conflicts_with = "image")]
        snapshot: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        cpu_millicores: Option<u64>,
        #[arg(long)]
        memory_mb: Option<u64>,
        /// Return at once with the bunker `pending`.
        #[arg(long)]
        no_wait: bool,
    },
    List {
        #[arg(long)]
        status: Option<String>,
    },
    Get {
        id: String,
    },
    Delete {
        id: String,
        /// Take a final `full` snapshot first; its id is printed.
        #[arg(long)]
        snapshot: bool,
    },
    /// Snapshot a running bunker into object storage; prints the snapshot once ready.
    Snapshot {
        id: String,
        /// `full` (memory, devices and disk: a restore resumes the processes) or `disk`.
        #[arg(long, default_value = "full")]
        kind: String,
        /// Delete the snapshot after this many seconds (default: keep it).
        #[arg(long)]
        expires_in_s: Option<u64>,
    },
}

#[derive(Args)]
pub struct ExecArgs {
    /// The bunker id.
    bunker: String,
    #[arg(long)]
    timeout_s: Option<u64>,
    /// Run as root in the guest (needs `scaibunker:root`).
    #[arg(long)]
    root: bool,
    #[arg(long)]
    cwd: Option<String>,
    /// The command and its arguments (after `--`), run without a shell.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

pub fn client() -> Result<Client> {
    let url =
        std::env::var("SCAIBUNKER_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".to_owned());
    let key = match std::env::var("SCAIBUNKER_API_KEY") {
        Ok(k) if !k.is_empty() => Some(k),
        _ => {
            let path = crate::up::default_data_dir()?.join("admin.key");
            std::fs::read_to_string(&path)
                .ok()
                .map(|k| k.trim().to_owned())
        }
    };
    Ok(Client::new(url, key))
}

fn print_bunker(b: &Bunker) {
    println!(
        "{}  {:<12} image={} cpu={}m mem={}MiB worker={}{}",
        b.id,
        b.status,
        b.image,
        b.cpu_millicores,
        b.memory_mb,
        b.worker_id.as_deref().unwrap_or("-"),
        b.failure_reason
            .as_deref()
            .map(|r| format!("\n  failure: {r}"))
            .unwrap_or_default()
    );
}

fn print_snapshot(s: &Snapshot) {
    println!(
        "{}  {:<8} kind={} bunker={} size={}B{}",
        s.id,
        s.status,
        match s.kind {
            SnapshotKind::Disk => "disk",
            SnapshotKind::Full => "full",
        },
        s.bunker_id,
        s.size_bytes,
        s.expires_at
            .as_deref()
            .map(|e| format!(" expires={e}"))
            .unwrap_or_default()
    );
}

pub fn emit<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

pub async fn bunker(cmd: BunkerCommand, json: bool) -> Result<()> {
    let c = client()?;
    match cmd {
        BunkerCommand::Create {
            image,
            snapshot,
            name,
            cpu_millicores,
            memory_mb,
            no_wait,
        } => {
            let image = match (&image, &snapshot) {
                (None, None) => Some("default".to_owned()),
                _ => image,
            };
            if !json && !no_wait {
                match (&image, &snapshot) {
                    (_, Some(snap)) => eprintln!("restoring snapshot `{snap}`…"),
                    (Some(image), None) => eprintln!(
                        "creating a bunker from `{image}` (a cold boot takes a few seconds)…"
                    ),
                    (None, None) => {}
                }
            }
            let b = c
                .create_bunker(&CreateBunker {
                    image,
                    snapshot_id: snapshot,
                    name,
                    cpu_millicores,
                    memory_mb,
                    wait: Some(!no_wait),
                    ..Default::default()
                })
                .await?;
            emit(json, &b, print_bunker)?;
            if b.status == "failed" {
                anyhow::bail!("bunker {} failed to start", b.id);
            }
        }
        BunkerCommand::List { status } => {
            let mut cursor: Option<String> = None;
            let mut all = Vec::new();
            loop {
                let page = c
                    .bunkers(status.as_deref(), Some(500), cursor.as_deref())
                    .await?;
                all.extend(page.items);
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            emit(json, &all, |bs| bs.iter().for_each(print_bunker))?;
        }
        BunkerCommand::Get { id } => {
            let b = c.bunker(&id).await?;
            emit(json, &b, print_bunker)?;
        }
        BunkerCommand::Delete { id, snapshot } => {
            if snapshot {
                let snap = c
                    .snapshot_bunker(&id, &CreateSnapshot::default())
                    .await
                    .context("final snapshot failed; the bunker was not deleted")?;
                if !json {
                    print_snapshot(&snap);
                }
            }
            let b = c.delete_bunker(&id).await?;
            emit(json, &b, print_bunker)?;
        }
        BunkerCommand::Snapshot {
            id,
            kind,
            expires_in_s,
        } => {
            let kind = match kind.as_str() {
                "full" => SnapshotKind::Full,
                "disk" => SnapshotKind::Disk,
                other => anyhow::bail!("--kind must be `full` or `disk`, not `{other}`"),
            };
            let snap = c
                .snapshot_bunker(
                    &id,
                    &CreateSnapshot {
                        kind: Some(kind),
                        expires_in_s,
                    },
                )
                .await?;
            emit(json, &snap, print_snapshot)?;
        }
    }
    Ok(())
}

/// Runs the command, streaming its output as it is produced (it resumes by itself if the
/// connection breaks), and returns its exit code: 124 on timeout, 137 when killed, 1 when the
/// platform failed the exec. With `--json` it waits and prints the whole result instead.
pub async fn exec(args: ExecArgs, json: bool) -> Result<i32> {
    let c = client()?;
    let req = ExecRequest {
        argv: Some(args.argv),
        timeout_s: args.timeout_s,
        cwd: args.cwd,
        user: args.root.then_some(ExecUser::Root),
        ..Default::default()
    };
    if json {
        let out = c.exec(&args.bunker, &req).await.context("exec failed")?;
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(match (out.exit_code, out.timed_out) {
            (_, true) => 124,
            (Some(code), _) => code,
            (None, _) => 137,
        });
    }
    let mut stream = c
        .exec_stream(&args.bunker, &req)
        .await
        .context("exec failed")?;
    let mut code = 1;
    while let Some(event) = stream.next().await {
        match event.context("exec stream failed")? {
            ExecEvent::Stdout(bytes) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
            }
            ExecEvent::Stderr(bytes) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&bytes)?;
                err.flush()?;
            }
            ExecEvent::Exit {
                exit_code,
                timed_out,
                ..
            } => {
                code = match (exit_code, timed_out) {
                    (_, true) => {
                        eprintln!("scaibunker: command timed out");
                        124
                    }
                    (Some(c), _) => c,
                    (None, _) => 137,
                };
            }
            ExecEvent::Error { code: c, message } => {
                anyhow::bail!("exec failed: {c}: {message}");
            }
        }
    }
    Ok(code)
}
