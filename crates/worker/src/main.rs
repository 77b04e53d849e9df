//! `scaibunker-worker`: the worker daemon. Configuration comes from the environment
//! (see [`scaibunker_worker::config`]).

use anyhow::Context as _;
use scaibunker_worker::{WorkerConfig, run};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = WorkerConfig::from_env().context("read the worker configuration")?;
    run(config).await.context("run the worker")
}
