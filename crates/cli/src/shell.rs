//! `scaibunker shell BUNKER`: an interactive terminal in a bunker.
//!
//! On a terminal, stdin is switched to raw mode for the session (restored however it ends)
//! and the bunker's terminal follows the window's size (`SIGWINCH`). Without a terminal
//! (a pipe, a script), stdin is passed through as it is and the size is 80×24. Exits with
//! the shell's exit code (137 when it was killed).

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use clap::Args;
use rustix::termios::{self, OptionalActions, Termios};
use scaibunker_api::exec::ExecUser;
use scaibunker_sdk::{ShellEvent, ShellOptions};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Args)]
pub struct ShellArgs {
    /// The bunker id.
    bunker: String,
    /// What to run (by `/bin/sh -c`); default `/bin/sh`.
    #[arg(long)]
    command: Option<String>,
    /// Run as root in the guest (needs `scaibunker:root`).
    #[arg(long)]
    root: bool,
}

/// Puts the terminal back as it was when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)
            .context("switching the terminal to raw mode")?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}

fn window_size() -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(std::io::stdout().as_fd()).ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

pub async fn shell(args: ShellArgs) -> Result<i32> {
    let client = crate::commands::client()?;
    let interactive = std::io::stdin().is_terminal();
    let (cols, rows) = window_size().filter(|_| interactive).unwrap_or((80, 24));
    let opts = ShellOptions {
        cols: Some(cols),
        rows: Some(rows),
        command: args.command,
        user: args.root.then_some(ExecUser::Root),
    };
    let (mut keys, mut screen) = client
        .shell(&args.bunker, &opts)
        .await
        .context("opening the shell failed")?;
    let _raw = if interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut winch = signal(SignalKind::window_change()).context("watching the window size")?;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            event = screen.next() => match event {
                Some(Ok(ShellEvent::Output(bytes))) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes)?;
                    out.flush()?;
                }
                Some(Ok(ShellEvent::Exit { exit_code, .. })) => return Ok(exit_code.unwrap_or(137)),
                Some(Err(e)) => return Err(e).context("the shell failed"),
                None => anyhow::bail!("the shell ended without an exit status"),
            },
            n = stdin.read(&mut buf), if stdin_open => match n.context("reading stdin")? {
                // End of input: a pipe ran dry. The shell gets no more keys and ends itself
                // (or is ended by a Ctrl-D sent as a byte by the user on a terminal).
                0 => {
                    stdin_open = false;
                    keys.send(&[0x04]).await?;
                }
                n => keys.send(&buf[..n]).await?,
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = window_size() {
                    keys.resize(cols, rows).await?;
                }
            }
        }
    }
}
