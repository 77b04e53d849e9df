//! Authenticated `GET /v1/modules/scaibunker/bunkers/{id}` throughput and latency on
//! loopback, beside the floor of the same server (`GET /health`: no auth, no database),
//! written to the "API throughput" section of `docs/benchmarks.md`:
//!
//! 1. Wait until the machine is quiet: the 1-minute load average below 1.0, polled every
//!    15 s for at most 10 minutes (the section says when it never got there).
//! 2. Per backend, SQLite with in-process live state (embedded) and MariaDB with Redis
//!    (production): start a controller in-process on a runtime of its own; make a tenant, a
//!    `tenant_user` key, a worker nothing listens on and one bunker, which ends `failed` — a
//!    real row, read through the same path as a running bunker's.
//! 3. Time the pieces of the request path one call at a time: the key lookup, the three
//!    rate-limit windows, the bunker row, and the pool checkout each query starts with.
//! 4. For each request (the floor, then the authenticated GET) and each concurrency C, C
//!    keep-alive HTTP/1.1 connections send it back to back: 2 s of warm-up, then 10 s in
//!    which every response is timed and the CPU time of the controller, the generator,
//!    MariaDB, Redis and the rest of the machine is read from `/proc`. Any answer but 200 is
//!    an error.
//!
//! The load generator shares the process (on its own runtime) and the machine with the
//! controller, MariaDB and Redis, so the figures are a floor of the server's capacity. It
//! writes its requests and parses the responses itself, on raw sockets, so that as little of
//! the machine as possible goes to generating load.
//!
//! Run: `cargo bench -p scaibunker-e2e --bench api_throughput` with MariaDB
//! (`SCAIBUNKER_TEST_MARIADB_URL`, default `mysql://root@127.0.0.1:3306`) and Redis
//! (`SCAIBUNKER_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) up.

use std::fmt::{Display, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use scaibunker_controller::config::ControllerConfig;
use scaibunker_controller::live::RateDecision;
use scaibunker_controller::service::Services;
use scaibunker_controller::service::auth;
use scaibunker_proto::worker::{CachedImage, Capacity, PROTOCOL_VERSION, RegisterRequest};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks.md");
const HEADING: &str = "## API throughput";

const WARMUP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// Connections of the load generator, each with one request in flight. C = 1 is the
/// latency of a lone client.
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// The goal on 2 cores, judged at C ≥ 16.
const GOAL_REQUESTS_PER_S: f64 = 5000.0;
const GOAL_P99: Duration = Duration::from_millis(20);
/// Calls per piece of the request path, after warm-ups.
const PIECE_RUNS: usize = 2000;
const PIECE_WARMUPS: usize = 200;
/// High enough never to refuse a request here (the default is 1,200 a minute per key); the
/// limiter still counts every request, as it does in production.
const RATE_LIMIT_PER_MINUTE: u32 = 100_000_000;
/// The extractor's window (crates/controller/src/http/extract.rs).
const RATE_WINDOW: Duration = Duration::from_secs(60);
const QUIET_BELOW: f64 = 1.0;
const QUIET_POLL: Duration = Duration::from_secs(15);
const QUIET_WAIT: Duration = Duration::from_secs(600);
/// Threads of the load generator's runtime.
const GENERATOR_THREADS: usize = 2;
/// Thread name of the generator's runtime, to tell its CPU time from the controller's.
const GENERATOR_THREAD: &str = "load-generator";
/// Process names of the MariaDB and Redis servers, whose CPU time is counted apart.
const MARIADB_PROCESSES: &[&str] = &["mariadbd", "mysqld"];
const REDIS_PROCESSES: &[&str] = &["redis-server"];
const WORKER_TOKEN: &str = "swt_api_throughput_bench";
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let machine = Machine::probe()?;
    eprintln!("[bench] {machine:?}");
    let quiet = wait_until_quiet();
    eprintln!("[bench] {quiet:?}");
    let mut backends = Vec::new();
    for backend in [Backend::Embedded, Backend::Production] {
        let run = measure(backend).with_context(|| format!("measuring {}", backend.name()))?;
        backends.push(run);
    }
    let load_after = load_average();

    let section = render(&machine, &quiet, &load_after, &backends);
    let old = match std::fs::read_to_string(DOC) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Benchmarks\n\nFigures written by the benchmark binaries; each section belongs \
             to one of them and is replaced when it runs.\n"
                .to_owned()
        }
        Err(e) => return Err(e).context("reading docs/benchmarks.md"),
    };
    let new = scaibunker_e2e::doc::replace_section(&old, HEADING, &section);
    std::fs::write(DOC, new).context("writing docs/benchmarks.md")?;
    println!("{section}");
    eprintln!("[bench] written to {}", Path::new(DOC).display());
    Ok(())
}

/// Where and on what the figures were measured.
#[derive(Debug)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    date: String,
    commit: String,
}

impl Machine {
    fn probe() -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let cpu_model = cpuinfo
            .lines()
            .filter(|l| l.starts_with("model name"))
            .find_map(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let mut commit = output("git", &["rev-parse", "--short", "HEAD"], root)?;
        // The controller is compiled into this binary: uncommitted changes to it are measured.
        let dirty = output(
            "git",
            &["status", "--porcelain", "--", "crates", "Cargo.toml"],
            root,
        )?;
        if !dirty.is_empty() {
            commit.push_str(" with uncommitted changes to the product");
        }
        Ok(Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"], root)?,
            commit,
        })
    }
}

/// A command's trimmed stdout.
fn output(program: &str, args: &[&str], dir: &Path) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(out.status.success(), "{program} {args:?}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[derive(Debug)]
struct Quiet {
    /// Load averages when measuring started.
    load_before: String,
    waited: Duration,
    /// Whether the 1-minute figure fell below [`QUIET_BELOW`] within [`QUIET_WAIT`].
    reached: bool,
}

fn wait_until_quiet() -> Quiet {
    let started = Instant::now();
    loop {
        let one_minute = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
        let reached = one_minute.is_some_and(|l| l < QUIET_BELOW);
        if reached || started.elapsed() >= QUIET_WAIT {
            if !reached {
                eprintln!("[bench] the machine did not get quiet within {QUIET_WAIT:?}");
            }
            return Quiet {
                load_before: load_average(),
                waited: started.elapsed(),
                reached,
            };
        }
        eprintln!(
            "[bench] 1-minute load average {one_minute:?} is not below {QUIET_BELOW}; \
             checking again in {QUIET_POLL:?}"
        );
        std::thread::sleep(QUIET_POLL);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// SQLite in the data directory, live state in-process.
    Embedded,
    /// MariaDB, live state on Redis.
    Production,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "SQLite + in-process",
            Backend::Production => "MariaDB + Redis",
        }
    }
}

fn mariadb_server() -> String {
    std::env::var("SCAIBUNKER_TEST_MARIADB_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned())
}

fn redis_url() -> String {
    std::env::var("SCAIBUNKER_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A MariaDB database made for one run; [`MariaDb::drop_database`] removes it.
struct MariaDb {
    server: String,
    name: String,
}

impl MariaDb {
    async fn create() -> Result<Self> {
        let server = mariadb_server();
        let name = format!("sbbench_{:016x}", rand::random::<u64>());
        let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(&server)
            .await
            .with_context(|| {
                format!(
                    "MariaDB is not reachable at {server}; start it with `start-stop-daemon \
                     --start --oknodo --background --exec /usr/sbin/mariadbd` or set \
                     SCAIBUNKER_TEST_MARIADB_URL"
                )
            })?;
        sqlx::Executor::execute(
            &mut conn,
            sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
        )
        .await
        .with_context(|| format!("creating database {name}"))?;
        Ok(Self { server, name })
    }

    fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    async fn drop_database(self) -> Result<()> {
        let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(&self.server)
            .await
            .with_context(|| format!("connecting to {}", self.server))?;
        sqlx::Executor::execute(
            &mut conn,
            sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {}", self.name)),
        )
        .await
        .with_context(|| format!("dropping database {}", self.name))?;
        Ok(())
    }
}

/// Everything measured on one backend.
struct BackendRun {
    backend: Backend,
    pieces: Pieces,
    /// Bytes of the authenticated GET's response body.
    body_bytes: usize,
    loads: Vec<LoadRun>,
}

fn measure(backend: Backend) -> Result<BackendRun> {
    // Built as `scaibunker serve` builds its runtime: one worker thread per core.
    let server = tokio::runtime::Builder::new_multi_thread()
        .thread_name("controller")
        .enable_all()
        .build()
        .context("building the controller's runtime")?;
    let generator = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(GENERATOR_THREADS)
        .thread_name(GENERATOR_THREAD)
        .enable_all()
        .build()
        .context("building the load generator's runtime")?;
    let data = tempfile::Builder::new()
        .prefix("sb-api-bench-")
        .tempdir()
        .context("creating the data directory")?;
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config =
        ControllerConfig::embedded(data.path().to_owned(), listen, WORKER_TOKEN.to_owned());
    config.rate_limit_per_minute = RATE_LIMIT_PER_MINUTE;
    let database = match backend {
        Backend::Embedded => None,
        Backend::Production => {
            let db = server.block_on(MariaDb::create())?;
            config.database_url = db.url();
            config.redis_url = Some(redis_url());
            // Every key live state writes carries a TTL: nothing is left behind for long.
            config.redis_prefix = format!("{}:", db.name);
            Some(db)
        }
    };
    let outcome = run_controller(&server, &generator, config, backend);
    if let Some(db) = database
        && let Err(e) = server.block_on(db.drop_database())
    {
        eprintln!("[bench] warning: {e:#}");
    }
    outcome
}

fn run_controller(
    server: &Runtime,
    generator: &Runtime,
    config: ControllerConfig,
    backend: Backend,
) -> Result<BackendRun> {
    let redis = config.redis_url.clone();
    let handle = server
        .block_on(scaibunker_controller::start(config))
        .with_context(|| match redis {
            Some(url) => format!("starting the controller (is Redis up at {url}?)"),
            None => "starting the controller".to_owned(),
        })?;
    let outcome = (|| {
        let admin_key = handle
            .bootstrap_key
            .clone()
            .context("a fresh database bootstraps an admin key")?;
        let setup = generator.block_on(set_up(&handle.url(), &admin_key))?;
        eprintln!(
            "[bench] {}: bunker {} ({} bytes); timing the request path's pieces",
            backend.name(),
            setup.bunker_id,
            setup.body_bytes
        );
        // A task on the controller's runtime, like a request handler: its wake-ups are those
        // of a handler, not of a thread outside the runtime.
        let pieces = server.block_on(server.spawn(time_pieces(
            handle.services.clone(),
            setup.key.clone(),
            setup.bunker_id.clone(),
        )));
        let pieces = pieces.context("the timing task panicked")??;
        let floor = http_request(handle.addr, "/health", None);
        let get = http_request(
            handle.addr,
            &format!("/v1/modules/scaibunker/bunkers/{}", setup.bunker_id),
            Some(&setup.key),
        );
        let mut loads = Vec::new();
        for (target, request) in [(Target::Floor, floor), (Target::Get, get)] {
            for connections in CONCURRENCY {
                eprintln!(
                    "[bench] {}: {} with C = {connections}",
                    backend.name(),
                    target.name()
                );
                let run = generator.block_on(generate(
                    handle.addr,
                    target,
                    request.clone(),
                    connections,
                ))?;
                eprintln!(
                    "[bench]   {:.0} requests/s, p50 {:?}, p99 {:?}, p99.9 {:?}, {} errors{}",
                    run.requests_per_s(),
                    run.percentile(500),
                    run.percentile(990),
                    run.percentile(999),
                    run.errors,
                    run.first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                loads.push(run);
            }
        }
        Ok(BackendRun {
            backend,
            pieces,
            body_bytes: setup.body_bytes,
            loads,
        })
    })();
    let stopped =
        server.block_on(async { tokio::time::timeout(SHUTDOWN_TIMEOUT, handle.shutdown()).await });
    if stopped.is_err() {
        eprintln!("[bench] warning: the controller did not stop within {SHUTDOWN_TIMEOUT:?}");
    }
    outcome
}

/// What the load needs: a tenant's key and a bunker of that tenant.
struct Setup {
    key: String,
    bunker_id: String,
    body_bytes: usize,
}

/// Makes a tenant, a `tenant_user` with a key, a worker nothing listens on and a bunker,
/// through the API, and reads the bunker once.
async fn set_up(base: &str, admin_key: &str) -> Result<Setup> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let call = |method: reqwest::Method, path: &str, key: &str, body: Option<Value>| {
        let mut request = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let path = path.to_owned();
        async move {
            let response = request
                .send()
                .await
                .with_context(|| format!("calling {path}"))?;
            let status = response.status();
            let bytes = response
                .bytes()
                .await
                .with_context(|| format!("reading {path}"))?;
            let value: Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{path} answered {status} without JSON"))?;
            anyhow::Ok((status.as_u16(), value, bytes.len()))
        }
    };
    let data_str = |v: &Value, field: &str| -> Result<String> {
        v["data"][field]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no data.{field} in {v}"))
    };
    let post = reqwest::Method::POST;

    let (status, v, _) = call(
        post.clone(),
        "/v1/tenants",
        admin_key,
        Some(json!({"name": "API throughput", "slug": "api-throughput"})),
    )
    .await?;
    ensure!(status == 201, "creating the tenant: {status} {v}");
    let tenant_id = data_str(&v, "id")?;
    let (status, v, _) = call(
        post.clone(),
        "/v1/users",
        admin_key,
        Some(json!({"email": "bench@example.com", "tenant_id": tenant_id, "role": "tenant_user"})),
    )
    .await?;
    ensure!(status == 201, "creating the user: {status} {v}");
    let user_id = data_str(&v, "id")?;
    let (status, v, _) = call(
        post.clone(),
        "/v1/api-keys",
        admin_key,
        Some(json!({"name": "api-throughput", "user_id": user_id})),
    )
    .await?;
    ensure!(status == 201, "creating the key: {status} {v}");
    let key = data_str(&v, "key")?;

    // A port nothing listens on: the worker is down, so the bunker fails at boot.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port();
    let register = RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        name: "dead".into(),
        url: format!("http://127.0.0.1:{dead_port}"),
        capacity: Capacity {
            cpu_millicores: 8000,
            memory_mb: 8000,
            disk_mb: 100_000,
            gpu_count: 0,
        },
        images: vec![CachedImage {
            name: "default".into(),
            sha256: "a".repeat(64),
            size_bytes: 1 << 30,
        }],
        runtime: "qemu/tcg".into(),
    };
    let (status, v, _) = call(
        post.clone(),
        "/v1/modules/scaibunker/workers/register",
        WORKER_TOKEN,
        Some(serde_json::to_value(register).context("encoding the registration")?),
    )
    .await?;
    ensure!(status == 200, "registering the worker: {status} {v}");

    let (status, v, _) = call(
        post,
        "/v1/modules/scaibunker/bunkers",
        &key,
        Some(json!({"image": "default"})),
    )
    .await?;
    ensure!(status == 201, "creating the bunker: {status} {v}");
    ensure!(
        v["data"]["status"] == "failed",
        "the bunker is not failed: {v}"
    );
    let bunker_id = data_str(&v, "id")?;

    let path = format!("/v1/modules/scaibunker/bunkers/{bunker_id}");
    let (status, v, body_bytes) = call(reqwest::Method::GET, &path, &key, None).await?;
    ensure!(status == 200, "reading the bunker: {status} {v}");
    ensure!(
        v["data"]["id"] == bunker_id.as_str(),
        "read another bunker: {v}"
    );
    Ok(Setup {
        key,
        bunker_id,
        body_bytes,
    })
}

/// The request path's pieces, each timed alone, one call at a time.
#[derive(Default)]
struct Pieces {
    /// `auth::authenticate`: SHA-256 of the key, one SQL query by the hash.
    authenticate: Vec<Duration>,
    /// The key's, the user's and the tenant's rate windows counted, as the extractor does.
    rate_limit: Vec<Duration>,
    /// The bunker row by tenant and id.
    bunker: Vec<Duration>,
    /// Taking a connection from the pool, which every query above does first.
    checkout: Vec<Duration>,
}

impl Pieces {
    /// In the order of the request path.
    fn samples(&self) -> [&[Duration]; 4] {
        [
            &self.authenticate,
            &self.rate_limit,
            &self.bunker,
            &self.checkout,
        ]
    }
}

async fn time_pieces(s: Services, key: String, bunker_id: String) -> Result<Pieces> {
    let principal = auth::authenticate(&s.store, &s.config, Some(&key))
        .await
        .context("authenticating the bench key")?;
    let per_key = s.config.rate_limit_per_minute;
    // The extractor's windows (crates/controller/src/http/extract.rs).
    let windows = [
        (format!("key:{}", principal.key_id), per_key),
        (
            format!("user:{}", principal.user_id),
            per_key.saturating_mul(2),
        ),
        (
            format!("tenant:{}", principal.tenant_id),
            per_key.saturating_mul(10),
        ),
    ];
    let mut pieces = Pieces::default();
    for i in 0..PIECE_WARMUPS + PIECE_RUNS {
        let started = Instant::now();
        auth::authenticate(&s.store, &s.config, Some(&key))
            .await
            .context("authenticating")?;
        let authenticated = started.elapsed();

        let started = Instant::now();
        let decision = s
            .live
            .rate_hit(&windows, RATE_WINDOW)
            .await
            .context("counting the rate windows")?;
        ensure!(
            decision == RateDecision::Allowed,
            "rate limited: {decision:?}"
        );
        let rate_limited = started.elapsed();

        let started = Instant::now();
        s.store
            .bunker(&principal.tenant_id, &bunker_id)
            .await
            .context("reading the bunker row")?
            .context("the bunker row is gone")?;
        let read = started.elapsed();

        let started = Instant::now();
        let conn = s
            .store
            .pool()
            .acquire()
            .await
            .context("taking a pooled connection")?;
        let checked_out = started.elapsed();
        drop(conn);

        if i >= PIECE_WARMUPS {
            pieces.authenticate.push(authenticated);
            pieces.rate_limit.push(rate_limited);
            pieces.bunker.push(read);
            pieces.checkout.push(checked_out);
        }
    }
    for samples in [
        &mut pieces.authenticate,
        &mut pieces.rate_limit,
        &mut pieces.bunker,
        &mut pieces.checkout,
    ] {
        samples.sort_unstable();
    }
    Ok(pieces)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `GET /health`: no auth, no database.
    Floor,
    /// `GET /v1/modules/scaibunker/bunkers/{id}` with the tenant's key.
    Get,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Floor => "GET /health",
            Target::Get => "authenticated GET /bunkers/{id}",
        }
    }
}

fn http_request(addr: SocketAddr, path: &str, key: Option<&str>) -> Arc<[u8]> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if let Some(key) = key {
        let _ = write!(request, "Authorization: Bearer {key}\r\n");
    }
    request.push_str("\r\n");
    Arc::from(request.into_bytes())
}

/// One load: every response completed inside the measured window.
struct LoadRun {
    target: Target,
    connections: usize,
    /// Of the 200s completed in the window, sorted.
    latencies: Vec<Duration>,
    /// Non-200 answers and transport failures, warm-up included.
    errors: usize,
    first_error: Option<String>,
    cpu: CpuSplit,
}

impl LoadRun {
    fn requests_per_s(&self) -> f64 {
        self.latencies.len() as f64 / MEASURE.as_secs_f64()
    }

    /// Nearest-rank percentile, `per_mille` in 0..=1000.
    fn percentile(&self, per_mille: usize) -> Duration {
        nearest_rank(&self.latencies, per_mille)
    }

    fn meets_goal(&self) -> bool {
        self.errors == 0
            && self.requests_per_s() >= GOAL_REQUESTS_PER_S
            && self.percentile(990) < GOAL_P99
    }

    /// CPU time per request of one share of the machine.
    fn cpu_per_request(&self, share: f64) -> Duration {
        let requests = self.latencies.len().max(1) as f64;
        Duration::from_secs_f64(
            share * self.cpu.cpus as f64 * self.cpu.wall.as_secs_f64() / requests,
        )
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, what: impl Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what.to_string());
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

async fn generate(
    addr: SocketAddr,
    target: Target,
    request: Arc<[u8]>,
    connections: usize,
) -> Result<LoadRun> {
    let from = Instant::now() + WARMUP;
    let until = from + MEASURE;
    // A thread of its own, so that sampling never delays a request.
    let sampler = std::thread::spawn(move || cpu_between(from, until));
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(drive(addr, request.clone(), from, until)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await.context("a connection's task panicked")?);
    }
    let cpu = sampler
        .join()
        .map_err(|_| anyhow!("the CPU sampler panicked"))??;
    tally.latencies.sort_unstable();
    Ok(LoadRun {
        target,
        connections,
        latencies: tally.latencies,
        errors: tally.errors,
        first_error: tally.first_error,
        cpu,
    })
}

/// One connection sending `request` back to back until `until`, keeping the latencies of
/// the 200s that complete from `from` on. A connection that fails is opened again.
async fn drive(addr: SocketAddr, request: Arc<[u8]>, from: Instant, until: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Connection> = None;
    while Instant::now() < until {
        if conn.is_none() {
            match Connection::open(addr).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tally.error(format_args!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = Instant::now();
        let outcome = c.exchange(&request).await;
        let done = Instant::now();
        match outcome {
            Ok(200) => {
                if done >= from && done <= until {
                    tally.latencies.push(done - sent);
                }
            }
            Ok(status) => tally.error(format_args!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(c.body())
            )),
            Err(e) => {
                tally.error(format_args!("{e:#}"));
                conn = None;
            }
        }
    }
    tally
}

/// A keep-alive HTTP/1.1 connection with one request in flight. Responses must carry a
/// `content-length` (hyper sets it on every body of known size, which all of ours are).
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the last response's body starts in `buf`.
    body_start: usize,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            body_start: 0,
        })
    }

    /// Sends `request` and reads the whole response; returns its status.
    async fn exchange(&mut self, request: &[u8]) -> Result<u16> {
        self.stream
            .write_all(request)
            .await
            .context("sending the request")?;
        self.buf.clear();
        let mut scanned = 0;
        let head_end = loop {
            if let Some(i) = self.buf[scanned..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break scanned + i + 4;
            }
            scanned = self.buf.len().saturating_sub(3);
            self.read_more().await?;
        };
        let head =
            std::str::from_utf8(&self.buf[..head_end]).context("a response head is not UTF-8")?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .with_context(|| format!("malformed status line in {head:?}"))?;
        let length = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim().parse::<usize>())
            .transpose()
            .context("malformed content-length")?
            .with_context(|| format!("a response without content-length: {head:?}"))?;
        let end = head_end + length;
        while self.buf.len() < end {
            self.read_more().await?;
        }
        ensure!(
            self.buf.len() == end,
            "{} bytes after a response; nothing was pipelined",
            self.buf.len() - end
        );
        self.body_start = head_end;
        Ok(status)
    }

    fn body(&self) -> &[u8] {
        &self.buf[self.body_start..]
    }

    async fn read_more(&mut self) -> Result<()> {
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .context("reading the response")?;
        if n == 0 {
            bail!("the server closed the connection mid-response");
        }
        Ok(())
    }
}

/// Shares of the machine's CPU time in a window, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSplit {
    /// CPUs counted in `/proc/stat`.
    cpus: usize,
    wall: Duration,
    /// The controller's threads: this process but the generator's.
    controller: f64,
    generator: f64,
    /// The MariaDB and Redis servers (whatever they serve at the time).
    mariadb: f64,
    redis: f64,
    /// Busy elsewhere: the kernel's interrupt work, anything else running on the machine.
    rest: f64,
}

/// Cumulative CPU ticks (`USER_HZ`) at one instant.
struct CpuTicks {
    cpus: usize,
    total: u64,
    idle: u64,
    process: u64,
    generator: u64,
    mariadb: u64,
    redis: u64,
}

fn cpu_between(from: Instant, until: Instant) -> Result<CpuSplit> {
    std::thread::sleep(from.saturating_duration_since(Instant::now()));
    let start = cpu_ticks()?;
    let started = Instant::now();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let end = cpu_ticks()?;
    let wall = started.elapsed();
    let total = end.total.saturating_sub(start.total).max(1) as f64;
    let busy = total - end.idle.saturating_sub(start.idle) as f64;
    let process = end.process.saturating_sub(start.process) as f64;
    let generator = end.generator.saturating_sub(start.generator) as f64;
    let mariadb = end.mariadb.saturating_sub(start.mariadb) as f64;
    let redis = end.redis.saturating_sub(start.redis) as f64;
    Ok(CpuSplit {
        cpus: end.cpus,
        wall,
        controller: (process - generator).max(0.0) / total,
        generator: generator / total,
        mariadb: mariadb / total,
        redis: redis / total,
        rest: (busy - process - mariadb - redis).max(0.0) / total,
    })
}

fn cpu_ticks() -> Result<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let machine: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    ensure!(machine.len() >= 8, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal; guest time is inside user already.
    let total = machine[..8].iter().sum();
    let idle = machine[3] + machine[4];
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    // The process's own line counts the time of threads that have exited too.
    let process = task_ticks(Path::new("/proc/self/stat"))?;
    let mut generator = 0;
    for task in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let task = task.context("listing /proc/self/task")?.path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if comm.trim() == GENERATOR_THREAD {
            // A thread may exit between listing and reading; tokio's workers do not.
            generator += task_ticks(&task.join("stat")).unwrap_or(0);
        }
    }
    Ok(CpuTicks {
        cpus,
        total,
        idle,
        process,
        generator,
        mariadb: process_ticks(MARIADB_PROCESSES),
        redis: process_ticks(REDIS_PROCESSES),
    })
}

/// CPU ticks of the processes on this machine with one of these names; processes that come
/// and go between two readings are not counted.
fn process_ticks(names: &[&str]) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut ticks = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if names.contains(&comm.trim()) {
            ticks += task_ticks(&path.join("stat")).unwrap_or(0);
        }
    }
    ticks
}

/// utime + stime of a `stat` file (fields 14 and 15, counted after the `comm` in parentheses,
/// which may hold spaces).
fn task_ticks(stat: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(stat).with_context(|| format!("reading {}", stat.display()))?;
    let (_, after_comm) = text
        .rsplit_once(')')
        .with_context(|| format!("malformed {}", stat.display()))?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("malformed {}", stat.display()))
    };
    // The field after the parenthesis is the 3rd (state): utime is the 14th.
    Ok(field(11)? + field(12)?)
}

fn render(machine: &Machine, quiet: &Quiet, load_after: &str, backends: &[BackendRun]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{HEADING}\n");
    let _ = writeln!(
        s,
        "<!-- Written by tests/e2e/benches/api_throughput.rs; a run replaces this section. -->\n"
    );
    let waited = if !quiet.reached {
        format!(
            " (it did not fall below {QUIET_BELOW:.1} within {} min of waiting: expect noise)",
            QUIET_WAIT.as_secs() / 60
        )
    } else if quiet.waited >= QUIET_POLL {
        format!(
            " (after waiting {} s for the 1-minute figure to fall below {QUIET_BELOW:.1})",
            quiet.waited.as_secs()
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "Measured {} at commit `{}` (release profile) on {}, nproc {}. Load average \
         (1/5/15 min) {} before{waited}, {load_after} after.\n",
        machine.date, machine.commit, machine.cpu_model, machine.nproc, quiet.load_before
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo bench -p scaibunker-e2e --bench api_throughput` (MariaDB at \
         `SCAIBUNKER_TEST_MARIADB_URL`, default `mysql://root@127.0.0.1:3306`, and Redis at \
         `SCAIBUNKER_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`, must be up).\n"
    );
    let goal_rows: Vec<String> = backends
        .iter()
        .map(|b| {
            let judged: Vec<&LoadRun> = b
                .loads
                .iter()
                .filter(|l| l.target == Target::Get && l.connections >= 16)
                .collect();
            let met: Vec<String> = judged
                .iter()
                .filter(|l| l.meets_goal())
                .map(|l| l.connections.to_string())
                .collect();
            let verdict = if met.len() == judged.len() {
                "met".to_owned()
            } else if met.is_empty() {
                "missed".to_owned()
            } else {
                format!("met only at C = {}", met.join(", "))
            };
            format!("{verdict} on {}", b.backend.name())
        })
        .collect();
    let _ = writeln!(
        s,
        "Goal: at least {} requests/s with p99 under {} ms on 2 cores (C = 16 and 64, no \
         errors): {}.\n",
        thousands(GOAL_REQUESTS_PER_S),
        GOAL_P99.as_millis(),
        goal_rows.join("; ")
    );

    for (target, title) in [
        (
            Target::Get,
            "### Authenticated `GET /v1/modules/scaibunker/bunkers/{id}`",
        ),
        (
            Target::Floor,
            "### Floor: `GET /health` of the same controller (no auth, no database)",
        ),
    ] {
        let _ = writeln!(s, "{title}\n");
        let _ = writeln!(
            s,
            "| backend | C | requests/s | p50 | p99 | p99.9 | errors | CPU per request: controller / generator / MariaDB / Redis / rest |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for b in backends {
            for l in b.loads.iter().filter(|l| l.target == target) {
                let floor = b
                    .loads
                    .iter()
                    .find(|f| f.target == Target::Floor && f.connections == l.connections)
                    .filter(|_| target == Target::Get)
                    .map(|f| {
                        format!(
                            " ({:.0} % of the floor)",
                            100.0 * l.requests_per_s() / f.requests_per_s().max(1.0)
                        )
                    })
                    .unwrap_or_default();
                let errors = match &l.first_error {
                    Some(first) => format!("{} (first: {})", l.errors, first.replace('|', "/")),
                    None => l.errors.to_string(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {}{floor} | {} | {} | {} | {errors} | {} / {} / {} / {} / {} |",
                    b.backend.name(),
                    l.connections,
                    thousands(l.requests_per_s()),
                    ms(l.percentile(500)),
                    ms(l.percentile(990)),
                    ms(l.percentile(999)),
                    us(l.cpu_per_request(l.cpu.controller)),
                    us(l.cpu_per_request(l.cpu.generator)),
                    us(l.cpu_per_request(l.cpu.mariadb)),
                    us(l.cpu_per_request(l.cpu.redis)),
                    us(l.cpu_per_request(l.cpu.rest)),
                );
            }
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(s, "### The request path's pieces, one call at a time\n");
    let _ = writeln!(
        s,
        "| piece | {} |",
        backends
            .iter()
            .map(|b| b.backend.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(backends.len()));
    let names = [
        "key lookup (`auth::authenticate`: SHA-256 of the key, one SQL query by the hash)",
        "rate limit (`LiveState::rate_hit`: the key's, the user's and the tenant's windows in one call)",
        "bunker row (`Store::bunker`: one SQL query by tenant and id)",
        "of which, in each query: a connection from the pool (`Pool::acquire`; no ping \
         first: `test_before_acquire` is off)",
    ];
    for (i, name) in names.into_iter().enumerate() {
        let cells: Vec<String> = backends
            .iter()
            .map(|b| {
                let v = b.pieces.samples()[i];
                format!(
                    "{} / {}",
                    ms(nearest_rank(v, 500)),
                    ms(nearest_rank(v, 990))
                )
            })
            .collect();
        let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
    }
    let cells: Vec<String> = backends
        .iter()
        .map(|b| {
            b.loads
                .iter()
                .find(|l| l.target == Target::Get && l.connections == 1)
                .map_or_else(
                    || "–".to_owned(),
                    |l| format!("{} / {}", ms(l.percentile(500)), ms(l.percentile(990))),
                )
        })
        .collect();
    let _ = writeln!(
        s,
        "| the whole authenticated GET over HTTP, C = 1 (from the table above) | {} |\n",
        cells.join(" | ")
    );
    let _ = writeln!(
        s,
        "p50 / p99 of {PIECE_RUNS} calls each after {PIECE_WARMUPS} warm-ups, made in turn by \
         one task on the controller's runtime with no other load, before the load runs.\n"
    );

    let body = backends
        .iter()
        .map(|b| format!("{} bytes on {}", b.body_bytes, b.backend.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(s, "### How\n");
    let _ = writeln!(
        s,
        "- One process: the controller (`scaibunker_controller::start`, embedded defaults \
         otherwise) on a tokio runtime built like `scaibunker serve`'s (a worker thread per \
         core), the load generator on a second runtime of {GENERATOR_THREADS} threads. Both \
         share the cores with each other and, on MariaDB + Redis, with those servers on \
         loopback: the figures are a floor of the server's capacity, not its ceiling. The CPU \
         columns divide the busy time of each part of the machine in the measured window \
         (from `/proc`) by the requests completed: MariaDB and Redis are the `mariadbd` and \
         `redis-server` processes whatever they serve; the rest is the machine's remaining busy \
         time: the kernel's loopback network work that no process is charged for, and any \
         other work on the host (see the load averages). Process and machine counters are \
         kept differently, so the rest is approximate and shown as 0 when it comes out \
         negative.\n\
         - The load generator: C keep-alive HTTP/1.1 connections on raw sockets, one request in \
         flight on each, sent back to back (a closed loop); latency is from writing the request \
         to reading the last byte of the response. {} s of warm-up, then {} s measured; \
         requests/s counts the 200s completed in the window. Errors are any answer but 200 and \
         any transport failure, warm-up included. Each row is one such run: on a shared host, \
         expect differences between runs, most at C = 64 (the load averages and the rest \
         column show other work).\n\
         - The request: a fresh tenant's `tenant_user` key and a bunker of that tenant (its \
         worker is down, so it is `failed`: a real row, read the same way as a running \
         bunker's); the response body is {body}. Each request looks the key up by its SHA-256 \
         (one SQL query), counts it in the key's, the user's and the tenant's rate windows (live \
         state, one call for the three) and reads the bunker by tenant and id (one SQL query).\n\
         - The rate limiter stays on but its limit is raised from 1,200 to {} requests a \
         minute per key, so that it never refuses; its sliding windows then hold every hit of \
         the last minute (hundreds of thousands of entries, more than a key at the default \
         limit ever has).\n\
         - The floor is `GET /health` of the same controller: routing, the request-id and \
         metrics middleware and a small JSON body, without auth or database.",
        WARMUP.as_secs(),
        MEASURE.as_secs(),
        thousands(f64::from(RATE_LIMIT_PER_MINUTE)),
    );
    s
}

/// Nearest-rank percentile of sorted samples, `per_mille` in 0..=1000.
fn nearest_rank(sorted: &[Duration], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * per_mille).div_ceil(1000).max(1) - 1]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        us(d)
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// `12345.6` → `12,346`.
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
