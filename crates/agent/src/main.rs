//! `scaibunker-agent`: the guest agent's command line. See the library for the modes.

use std::path::PathBuf;
use std::process::ExitCode;

use scaibunker_agent::serve::{self, Endpoint};
use scaibunker_agent::{AGENT_VERSION, error_chain, init, log};
use scaibunker_proto::agent::PROTOCOL_VERSION;
use scaibunker_proto::agent_binary::{MARKER_LEN, marker};

/// The protocol version in the binary's bytes, read by `scaibunker up` and the worker before
/// they put this agent into a guest (see `scaibunker_proto::agent_binary`).
#[used]
static PROTOCOL_MARKER: [u8; MARKER_LEN] = marker(PROTOCOL_VERSION);

const USAGE: &str = "usage: scaibunker-agent init
       scaibunker-agent serve --port auto|PATH
       scaibunker-agent serve --unix PATH
       scaibunker-agent --version";

fn main() -> ExitCode {
    // Referenced, so no linker drops it.
    std::hint::black_box(&PROTOCOL_MARKER);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["init"] => init::run(),
        ["serve", "--port", "auto"] => run_serve(&Endpoint::AutoPort),
        ["serve", "--port", path] => run_serve(&Endpoint::Port(PathBuf::from(path))),
        ["serve", "--unix", path] => run_serve(&Endpoint::Unix(PathBuf::from(path))),
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

fn run_serve(endpoint: &Endpoint) -> ExitCode {
    match serve::serve(endpoint) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
