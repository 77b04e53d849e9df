//! `scaibunker up` and `scaibunker serve` (`SCAIGRID_MODE=bunker_proxy`: the storage proxy alone).
//!
//! `up`, step by step:
//! 1. Build or refresh the guest artefacts (kernel, initramfs with the agent, `default` and
//!    `tiny` images) with the embedded `images/build.sh`; it prints its own progress and is a
//!    no-op when everything is current.
//! 2. Start the controller in-process on SQLite under the data dir; on first start print the
//!    bootstrap admin key once (it is also in `DIR/admin.key`, mode 0600).
//! 3. Start `scaibunker-worker` as a child process with a per-installation worker token.
//! 4. Wait until the worker registered with the `default` image, then print `ready`.
//! 5. On Ctrl-C or SIGTERM stop the worker, then the controller. The worker first has the
//!    controller save its `session` and `persistent` bunkers as `full` snapshots (they come
//!    back on their next request after the next `up`) and end its `ephemeral` ones, then stops
//!    its VMs; it gets `SCAIBUNKER_STOP_TIMEOUT_S` (default 120 s) for the saving, and a
//!    grace period on top before it is killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scaibunker_controller::config::{ControllerConfig, Mode};

const BUILD_SCRIPT: &str = include_str!("../../../images/build.sh");

pub fn default_data_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/scaibunker"))
}

fn images_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("SCAIBUNKER_IMAGES_DIR") {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/scaibunker/images"))
}

/// A sibling binary of this executable (cargo puts all of a workspace's binaries together).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!("{} not found next to {}", name, exe.display());
    }
    Ok(path)
}

/// The guest agent to bake into the initramfs, checked before anything is built
/// ([`scaibunker_proto::agent_binary`]: a static ELF for this machine speaking this build's
/// protocol): `SCAIBUNKER_AGENT_BIN` when set (and then only it), else the first fit of the
/// agent next to this executable and the static build `scripts/build-agent.sh` leaves in the
/// cache. A workspace `cargo build` puts a dynamically linked agent next to `scaibunker`; it
/// is passed over, never baked in.
fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SCAIBUNKER_AGENT_BIN") {
        let path = PathBuf::from(p);
        return match check_agent(&path) {
            Ok(()) => Ok(path),
            Err(why) => bail!(
                "SCAIBUNKER_AGENT_BIN={} cannot be the guest agent: {why}; {}",
                path.display(),
                scaibunker_proto::agent_binary::BUILD_HINT
            ),
        };
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        candidates.push(exe.with_file_name("scaibunker-agent"));
    }
    let cache = match std::env::var_os("SCAIBUNKER_CACHE") {
        Some(c) => Some(PathBuf::from(c)),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/scaibunker")),
    };
    if let Some(cache) = cache {
        candidates.push(cache.join(format!(
            "target-agent/{}-unknown-linux-gnu/release/scaibunker-agent",
            std::env::consts::ARCH
        )));
    }
    let mut refused = Vec::new();
    for path in candidates {
        match check_agent(&path) {
            Ok(()) => return Ok(path),
            Err(why) => refused.push(format!("{}: {why}", path.display())),
        }
    }
    bail!(
        "no usable guest agent found ({}); {}",
        refused.join("; "),
        scaibunker_proto::agent_binary::BUILD_HINT
    )
}

/// Whether the file at `path` can be the guest agent, and if not why.
fn check_agent(path: &Path) -> std::result::Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    scaibunker_proto::agent_binary::check(&bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs the embedded image build script; it skips every step that is current.
fn build_images(out: &Path) -> Result<()> {
    let agent = agent_binary()?;
    let script = std::env::temp_dir().join(format!("scaibunker-build-{}.sh", std::process::id()));
    std::fs::write(&script, BUILD_SCRIPT).context("writing the image build script")?;
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(out)
        .arg("--agent")
        .arg(&agent)
        .status();
    let _ = std::fs::remove_file(&script);
    let status = status.context("running bash")?;
    if !status.success() {
        bail!("building the guest images failed ({status}); see the [images] lines above");
    }
    Ok(())
}

/// Reads the installation's worker token, creating it (mode 0600) on first start.
fn worker_token(dir: &Path) -> Result<String> {
    let token = scaibunker_controller::service::auth::new_api_key().replacen("sgk_", "swt_", 1);
    persisted_secret(&dir.join("worker.token"), token)
}

/// The storage capability secret: `SCAIBUNKER_STORAGE_SECRET`, else the installation's own,
/// created (mode 0600) on first start so tokens survive restarts.
fn storage_secret(dir: &Path) -> Result<String> {
    if let Ok(s) = std::env::var("SCAIBUNKER_STORAGE_SECRET")
        && !s.is_empty()
    {
        return Ok(s);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let fresh = scaibunker_controller::service::auth::new_api_key().replacen("sgk_", "sss_", 1);
    persisted_secret(&dir.join("storage.secret"), fresh)
}

/// The secret in `path`, or `fresh` written there (mode 0600) when there is none yet.
fn persisted_secret(path: &Path, fresh: String) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(t) = std::fs::read_to_string(path) {
        return Ok(t.trim().to_owned());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(fresh.as_bytes())?;
    Ok(fresh)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler works on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn serve(data_dir: Option<PathBuf>, listen: SocketAddr) -> Result<()> {
    let dir = match data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let token = std::env::var("SCAIBUNKER_WORKER_TOKEN")
        .context("SCAIBUNKER_WORKER_TOKEN must be set for `serve`")?;
    let mode = Mode::from_env().map_err(anyhow::Error::msg)?;
    let mut config = ControllerConfig::embedded(dir.clone(), listen, token);
    config.storage_secret = storage_secret(&dir)?;
    let config = config.with_env();
    if mode == Mode::BunkerProxy {
        let proxy = scaibunker_controller::start_storage_proxy(config).await?;
        println!("storage proxy listening on {}", proxy.url());
        shutdown_signal().await;
        proxy.shutdown().await;
        return Ok(());
    }
    let handle = scaibunker_controller::start(config).await?;
    if let Some(key) = &handle.bootstrap_key {
        println!("admin key (shown once): {key}");
    }
    println!("listening on {}", handle.url());
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

pub async fn up(data_dir: Option<PathBuf>, listen: SocketAddr) -> Result<()> {
    let dir = match data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let images = images_dir()?;

    eprintln!("[up] preparing guest images in {}", images.display());
    let images_for_build = images.clone();
    tokio::task::spawn_blocking(move || build_images(&images_for_build)).await??;

    let token = worker_token(&dir)?;
    let mut config = ControllerConfig::embedded(dir.clone(), listen, token.clone());
    config.storage_secret = storage_secret(&dir)?;
    let config = config.with_env();
    let heartbeat = config.heartbeat_interval;
    let controller = scaibunker_controller::start(config).await?;
    eprintln!("[up] controller listening on {}", controller.url());

    let worker_bin = sibling("scaibunker-worker")?;
    let log_path = dir.join("worker.log");
    let log = std::fs::File::create(&log_path)?;
    let mut worker = tokio::process::Command::new(worker_bin)
        .env("SCAIBUNKER_CONTROLLER_URL", controller.url())
        .env("SCAIBUNKER_WORKER_TOKEN", &token)
        .env("SCAIBUNKER_WORKER_DATA_DIR", dir.join("worker"))
        .env("SCAIBUNKER_IMAGES_DIR", &images)
        .env(
            "WORKER_HEARTBEAT_INTERVAL_S",
            heartbeat.as_secs().to_string(),
        )
        .env("SCAIBUNKER_EXIT_WITH_PARENT", "1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting scaibunker-worker")?;
    eprintln!(
        "[up] worker started (pid {}), log in {}",
        worker.id().unwrap_or(0),
        log_path.display()
    );

    // Ready once the worker registered with this controller holding the default image. On a
    // data directory `up` ran on before, the ledger already names the worker (and a worker
    // that stopped is `stopping`): only a registration of this run (a heartbeat time from
    // after this controller started) means it takes bunkers again.
    let started = Instant::now();
    loop {
        if let Some(status) = worker.try_wait()? {
            bail!("the worker exited ({status}); see {}", log_path.display());
        }
        // Any ready sha of `default`: one from an earlier build may still be listed.
        let svc = &controller.services;
        let shas: Vec<String> = svc
            .store
            .ready_builtin_images("default")
            .await?
            .into_iter()
            .filter_map(|img| img.sha256)
            .collect();
        let mut tx = svc.store.begin().await?;
        let held = svc.store.workers_with_images(&mut tx, &shas).await?;
        drop(tx);
        // A worker of this run: on a data directory used before, old records still name the
        // worker of the previous run.
        let registered = svc.store.workers().await?.into_iter().any(|w| {
            w.last_heartbeat_at >= svc.started_at_ms && held.iter().any(|(id, _)| *id == w.id)
        });
        if registered {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the worker did not register within 120 s; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let url = controller.url();
    if let Some(key) = &controller.bootstrap_key {
        println!(
            "admin key (shown once; also in {}): {key}",
            dir.join("admin.key").display()
        );
    } else {
        println!("admin key: in {}", dir.join("admin.key").display());
    }
    println!("ready {url}");
    println!();
    println!("Create a bunker and run a command:");
    println!(
        "  export SCAIBUNKER_URL={url} SCAIBUNKER_API_KEY=$(cat {})",
        dir.join("admin.key").display()
    );
    println!("  scaibunker bunker create --image default");
    println!("  scaibunker exec <bunker-id> -- python3 -c 'print(6*7)'");
    println!("or with curl:");
    println!(
        "  curl -s -H \"Authorization: Bearer $SCAIBUNKER_API_KEY\" -d '{{\"image\":\"default\"}}' {url}/v1/modules/scaibunker/bunkers"
    );

    tokio::select! {
        _ = shutdown_signal() => {}
        status = worker.wait() => {
            eprintln!("[up] the worker exited ({:?}); shutting down", status.ok());
        }
    }
    eprintln!("[up] stopping: saving the bunkers first");
    let stopping = Instant::now();
    stop_worker(&mut worker, stop_timeout()?).await;
    eprintln!(
        "[up] worker stopped in {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    controller.shutdown().await;
    Ok(())
}

/// How long the worker may spend saving its bunkers when it stops: `SCAIBUNKER_STOP_TIMEOUT_S`,
/// which the worker (inheriting this environment) reads too.
fn stop_timeout() -> Result<Duration> {
    match std::env::var("SCAIBUNKER_STOP_TIMEOUT_S") {
        Ok(v) => Ok(Duration::from_secs(v.trim().parse().with_context(
            || format!("SCAIBUNKER_STOP_TIMEOUT_S={v:?} is not a number of seconds"),
        )?)),
        Err(_) => Ok(Duration::from_secs(
            scaibunker_proto::worker::DEFAULT_STOP_TIMEOUT_S,
        )),
    }
}

/// What the worker's own stop takes once its bunkers are saved: stopping the VMs, finishing
/// in-flight requests.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// SIGTERM, then SIGKILL once the worker had `save` to save its bunkers and [`STOP_GRACE`] to
/// stop its VMs.
async fn stop_worker(worker: &mut tokio::process::Child, save: Duration) {
    if let Some(pid) = worker.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        if tokio::time::timeout(save + STOP_GRACE, worker.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = worker.kill().await;
}
