//! `scaibunker-agent`: the guest agent's command line. See the library for the modes.

use std::path::PathBuf;
use std::process::ExitCode;

use scaibunker_agent::serve::{self, Endpoint};
use scaibunker_agent::{AGENT_VERSION, error_chain, init, log};

const USAGE: &str = "usage: scaibunker-agent init
       scaibunker-agent serve --port auto|PATH
       scaibunker-agent serve --unix PATH
       scaibunker-agent --version";

fn main() -> ExitCode {
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
