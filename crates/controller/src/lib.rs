//! The ScaiBunker controller: HTTP API, auth, bunker service, scheduler, worker registry and
//! the SQL store. Stateless apart from the database: run as many as you like.
//!
//! [`start`] opens the store (migrating it) and the object store, bootstraps the platform
//! tenant on first start, binds the listener and serves until the handle is shut down.
//! [`start_storage_proxy`] serves only the storage proxy, with no database or Redis.

pub mod bake;
pub mod config;
pub mod http;
pub mod jobs;
pub mod live;
pub mod metrics;
pub mod objects;
pub mod service;
pub mod store;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use config::ControllerConfig;
use service::Services;
use store::Store;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use workers::WorkerClient;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the database")]
    Store(#[from] store::StoreError),
    #[error("opening live state")]
    Live(#[from] live::LiveError),
    #[error("bootstrapping the platform tenant")]
    Bootstrap(#[from] service::auth::BootstrapError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the object store")]
    Objects(#[from] objects::OpenError),
    #[error("creating the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A running controller.
pub struct ControllerHandle {
    pub addr: SocketAddr,
    /// The bootstrap admin key, only on the start that created it.
    pub bootstrap_key: Option<String>,
    pub services: Services,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    jobs: JoinHandle<()>,
    activity: JoinHandle<()>,
}

impl ControllerHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The ticks this controller ran `job` for.
    pub fn job_ticks(&self, job: &str) -> Vec<u128> {
        let runs = self
            .services
            .job_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        runs.iter()
            .filter(|(j, _)| *j == job)
            .map(|(_, t)| *t)
            .collect()
    }

    /// Stops accepting requests and waits for in-flight ones.
    pub async fn shutdown(mut self) {
        self.jobs.abort();
        self.activity.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server stops on its own (it does not, short of an error).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

fn open_storage(config: &ControllerConfig) -> Result<service::storage::Storage, StartError> {
    let objects = objects::Objects::open(&config.object_store, &config.s3)?;
    Ok(service::storage::Storage::new(
        objects,
        config.storage_secret.as_bytes(),
        config.max_object_bytes,
    ))
}

/// A running storage proxy (`SCAIGRID_MODE=bunker_proxy`).
pub struct ProxyHandle {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ProxyHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests and waits for in-flight ones.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Serves only the storage proxy's object routes and `/health`: it opens the object store and
/// nothing else (no database, no Redis), so any number of proxies scale out beside the
/// controllers. Worker credentials and capability tokens verify against
/// `config.storage_secret`.
pub async fn start_storage_proxy(config: ControllerConfig) -> Result<ProxyHandle, StartError> {
    let storage = open_storage(&config)?;
    let (listener, addr) = bind(config.listen).await?;
    let (tx, task) = serve(listener, http::proxy_router(storage), "storage proxy");
    tracing::info!(%addr, "storage proxy listening");
    Ok(ProxyHandle {
        addr,
        shutdown: Some(tx),
        task,
    })
}

/// Serves `app` on `listener` until the returned sender fires (graceful shutdown).
fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    what: &'static str,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "{what} stopped");
        }
    });
    (tx, task)
}

async fn bind(listen: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind {
        addr: listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    Ok((listener, addr))
}

pub async fn start(config: ControllerConfig) -> Result<ControllerHandle, StartError> {
    if let Some(dir) = &config.data_dir {
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let store = Store::open(&config.database_url).await?;
    let storage = open_storage(&config)?.with_ledger(store.clone());
    let key_file = config.data_dir.as_ref().map(|d| d.join("admin.key"));
    let bootstrap_key =
        service::auth::bootstrap(&store, config.bootstrap_key.as_deref(), key_file.as_deref())
            .await?;
    let (listener, addr) = bind(config.listen).await?;
    let live = live::open(config.redis_url.as_deref(), &config.redis_prefix).await?;
    let stream_budget = service::exec_budget::Limits {
        total_bytes: config.stream_buffer_bytes,
        tenant_bytes: config.stream_buffer_tenant_bytes,
    };
    let services = Services {
        store,
        workers: WorkerClient::new(),
        config: Arc::new(config),
        placement_lock: Arc::new(tokio::sync::Mutex::new(())),
        live,
        job_runs: Arc::default(),
        metrics: Arc::default(),
        exec_hub: Arc::new(service::exec_stream::ExecHub::new(stream_budget)),
        activity: Arc::default(),
        controller_id: format!(
            "ctl_{}",
            scaibunker_core::ids::encode_random(service::random_bytes())
        ),
        storage,
        started_at_ms: store::now_ms(),
    };
    let jobs = jobs::spawn(services.clone());
    let activity = service::activity::spawn(services.clone());
    let (tx, task) = serve(
        listener,
        http::router(services.clone()),
        "controller server",
    );
    tracing::info!(%addr, "controller listening");
    Ok(ControllerHandle {
        addr,
        bootstrap_key,
        services,
        shutdown: Some(tx),
        task,
        jobs,
        activity,
    })
}
