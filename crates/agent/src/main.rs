//! `scaibunker-agent`: the guest agent's command line. See the library for the modes.

use std::path::PathBuf;
use std::process::ExitCode;

use scaibunker_agent::backchannel::API_SOCKET;
use scaibunker_agent::serve::{self, Endpoint};
use scaibunker_agent::{AGENT_VERSION, error_chain, guest, init, log};
use scaibunker_proto::agent::PROTOCOL_VERSION;
use scaibunker_proto::agent_binary::{MARKER_LEN, marker};

/// The protocol version in the binary's bytes, read by `scaibunker up` and the worker before
/// they put this agent into a guest (see `scaibunker_proto::agent_binary`).
#[used]
static PROTOCOL_MARKER: [u8; MARKER_LEN] = marker(PROTOCOL_VERSION);

const USAGE: &str = "usage: scaibunker-agent init
       scaibunker-agent serve --port auto|PATH
       scaibunker-agent serve --unix PATH [--api-socket PATH]
       scaibunker-agent guest COMMAND… (also run as `scaibunker-guest COMMAND…`)
       scaibunker-agent --version";

fn main() -> ExitCode {
    // Referenced, so no linker drops it.
    std::hint::black_box(&PROTOCOL_MARKER);
    let argv: Vec<String> = std::env::args().collect();
    let called_as_guest = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "scaibunker-guest");
    let args: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    if called_as_guest {
        return guest::run(&args);
    }
    let in_guest = Some(std::path::Path::new(API_SOCKET));
    match args.as_slice() {
        ["init"] => init::run(),
        ["guest", rest @ ..] => guest::run(rest),
        ["serve", "--port", "auto"] => {
            guest_link();
            run_serve(&Endpoint::AutoPort, in_guest)
        }
        ["serve", "--port", path] => run_serve(&Endpoint::Port(PathBuf::from(path)), in_guest),
        ["serve", "--unix", path] => run_serve(&Endpoint::Unix(PathBuf::from(path)), None),
        ["serve", "--unix", path, "--api-socket", socket] => run_serve(
            &Endpoint::Unix(PathBuf::from(path)),
            Some(std::path::Path::new(socket)),
        ),
        ["--version"] => {
            println!("scaibunker-agent {AGENT_VERSION}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// `scaibunker-guest` next to the agent in the guest's `/run/scaibunker` (a tmpfs the
/// initramfs made), so guest programs find the helper without the image carrying it.
fn guest_link() {
    let dir = std::path::Path::new("/run/scaibunker");
    let link = dir.join("scaibunker-guest");
    if dir.join("scaibunker-agent").is_file()
        && std::fs::symlink_metadata(&link).is_err()
        && let Err(e) = std::os::unix::fs::symlink("scaibunker-agent", &link)
    {
        log!("link {}: {e}", link.display());
    }
}

fn run_serve(endpoint: &Endpoint, api_socket: Option<&std::path::Path>) -> ExitCode {
    match serve::serve(endpoint, api_socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
