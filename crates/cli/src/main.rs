//! `scaibunker`: the command people type. Client commands talk to the API through the SDK;
//! `serve` runs a controller; `up` runs a whole embedded installation; `admin` works on the
//! installation's database directly (key recovery).

mod admin;
mod commands;
mod cp;
mod image;
mod shell;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "scaibunker", version, about = "Sandboxed compute in microVMs")]
struct Cli {
    /// Print machine-readable JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run controller + worker + the default image on embedded defaults.
    Up {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Run the controller only (configured by SCAIBUNKER_* variables); with
    /// SCAIGRID_MODE=bunker_proxy only the storage proxy (no database, no Redis).
    Serve {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Create, list, inspect and delete bunkers.
    Bunker {
        #[command(subcommand)]
        command: commands::BunkerCommand,
    },
    /// Run a command in a bunker; exits with the command's exit code.
    Exec(commands::ExecArgs),
    /// Open an interactive shell in a bunker; exits with the shell's exit code.
    Shell(shell::ShellArgs),
    /// Copy files or directories between here and a bunker (`BUNKER:/path` on one side).
    Cp(cp::CpArgs),
    /// Register, upload (tarball or ext4), list, warm and deactivate images.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Operator commands on the installation's database (same settings as `serve`).
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SCAIBUNKER_LOG")
                .unwrap_or_else(|_| "warn,scaibunker_controller=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime builds on any supported host");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up { data_dir, listen } => up::up(data_dir, listen).await.map(|_| 0),
            Command::Serve { data_dir, listen } => up::serve(data_dir, listen).await.map(|_| 0),
            Command::Bunker { command } => commands::bunker(command, cli.json).await.map(|_| 0),
            Command::Exec(args) => commands::exec(args, cli.json).await,
            Command::Shell(args) => shell::shell(args).await,
            Command::Cp(args) => cp::cp(args, cli.json).await.map(|_| 0),
            Command::Image { command } => image::image(command, cli.json).await.map(|_| 0),
            Command::Admin { command } => admin::admin(command, cli.json).await.map(|_| 0),
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
