//! `scaibunker image …`: register an image and upload its tarball or ext4 (streamed from the
//! file), list, inspect, warm and deactivate.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use scaibunker_api::images::{CreateImage, Image, ImageSource};

use crate::commands::{client, emit};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Register an image and upload its root filesystem: a tarball (`--tar`, baked into ext4)
    /// or an ext4 file (`--ext4`). Waits until the image is ready.
    Create {
        name: String,
        /// An uncompressed tarball of the root filesystem.
        #[arg(long, conflicts_with = "ext4", required_unless_present = "ext4")]
        tar: Option<PathBuf>,
        /// A ready ext4 filesystem.
        #[arg(long)]
        ext4: Option<PathBuf>,
        /// Size of the ext4 filesystem in MiB (default 1024).
        #[arg(long)]
        size_mib: Option<u64>,
        /// `tenant` (default), `partner` or `platform`.
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        memory_mb: Option<u64>,
        #[arg(long)]
        cpu_millicores: Option<u64>,
        /// Let bunkers start on workers that do not hold the image yet.
        #[arg(long)]
        lazy_pull: bool,
    },
    List,
    /// One image with its per-worker cache states.
    Get {
        id: String,
    },
    /// Ask the workers of the image's availability groups (all online workers if none) to
    /// fetch it.
    Warm {
        id: String,
    },
    /// No new bunkers from this image.
    Deactivate {
        id: String,
    },
}

fn print_image(i: &Image) {
    println!(
        "{}  {:<16} {:<8} scope={} sha256={} warm: {} ready, {} queued, {} failed{}",
        i.id,
        i.name,
        i.status,
        i.scope,
        i.sha256.as_deref().map_or("-", |s| &s[..12.min(s.len())]),
        i.warm.ready,
        i.warm.queued,
        i.warm.failed,
        i.error
            .as_deref()
            .map(|e| format!("\n  error: {e}"))
            .unwrap_or_default()
    );
    for w in i.workers.iter().flatten() {
        println!(
            "  {}  {}{}",
            w.worker_id,
            w.state,
            w.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
}

pub async fn image(cmd: ImageCommand, json: bool) -> Result<()> {
    let c = client()?;
    match cmd {
        ImageCommand::Create {
            name,
            tar,
            ext4,
            size_mib,
            scope,
            memory_mb,
            cpu_millicores,
            lazy_pull,
        } => {
            let (kind, path) = match (tar, ext4) {
                (Some(p), None) => ("tar", p),
                (None, Some(p)) => ("ext4", p),
                _ => bail!("give exactly one of --tar and --ext4"),
            };
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let image = c
                .create_image(&CreateImage {
                    name,
                    source: ImageSource { kind: kind.into() },
                    size_mib,
                    scope,
                    lazy_pull: Some(lazy_pull),
                    default_cpu_millicores: cpu_millicores,
                    default_memory_mb: memory_mb,
                    default_disk_mb: None,
                })
                .await?;
            if !json {
                eprintln!(
                    "uploading {} and baking image {}…",
                    path.display(),
                    image.id
                );
            }
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let ready = c.upload_image_content(&image.id, body).await?;
            emit(json, &ready, print_image)?;
        }
        ImageCommand::List => {
            let all = c.images().await?;
            emit(json, &all, |is| is.iter().for_each(print_image))?;
        }
        ImageCommand::Get { id } => emit(json, &c.image(&id).await?, print_image)?,
        ImageCommand::Warm { id } => emit(json, &c.warm_image(&id).await?, print_image)?,
        ImageCommand::Deactivate { id } => {
            emit(json, &c.deactivate_image(&id).await?, print_image)?
        }
    }
    Ok(())
}
