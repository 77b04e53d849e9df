//! `bandwidth_mbit` (NETWORK.md §2.6): a `tbf` qdisc on the namespace's uplink shapes the
//! guest's egress (queued, not dropped: policing makes TCP saw-tooth). Through the `tc`
//! binary, run inside the namespace; netlink `tbf` support in the crates is unverified.

use std::path::Path;
use std::process::Stdio;

use super::rules::RulesError;

/// Caps `link` in the namespace at `netns` to `mbit` Mbit/s.
pub async fn cap(netns: &Path, link: &str, mbit: u64) -> Result<(), RulesError> {
    let rate = format!("{mbit}mbit");
    // One round of tokens: at least 64 KiB (a TSO-sized burst), else 10 ms of the rate.
    let burst = (mbit.saturating_mul(1250)).max(64 * 1024).to_string();
    let out = tokio::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args([
            "--", "tc", "qdisc", "replace", "dev", link, "root", "tbf", "rate",
        ])
        .args([rate.as_str(), "burst", burst.as_str(), "latency", "50ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| RulesError::Spawn {
            program: "nsenter",
            source,
        })?;
    if !out.status.success() {
        return Err(RulesError::Refused {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
