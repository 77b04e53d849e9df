//! A real Garage S3 server for tests: one single-node process on loopback ports, with a
//! default key and bucket, in a temp dir removed afterwards. The binary is
//! `SCAIBUNKER_TEST_GARAGE_BIN` (`scripts/install-garage.sh` builds it and prints its path);
//! without it the S3 tests fail, saying so.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use scaibunker_controller::objects::{Objects, S3Settings};

pub struct Garage {
    child: Child,
    dir: tempfile::TempDir,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

pub fn garage_bin() -> PathBuf {
    match std::env::var_os("SCAIBUNKER_TEST_GARAGE_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "SCAIBUNKER_TEST_GARAGE_BIN is not set: the S3 tests need a Garage binary. Build it \
             once with `bash scripts/install-garage.sh` (it prints the path; about 22 min the \
             first time) and export SCAIBUNKER_TEST_GARAGE_BIN=<that path>"
        ),
    }
}

impl Garage {
    /// Starts Garage and waits until its default bucket answers.
    pub async fn start() -> Garage {
        let bin = garage_bin();
        assert!(
            bin.exists(),
            "SCAIBUNKER_TEST_GARAGE_BIN={} does not exist; run `bash scripts/install-garage.sh`",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (s3_port, rpc_port) = (free_port(), free_port());
        let config = format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
# sqlite: no extra files to size, fine for a test's few objects.
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
            d = dir.path().display(),
            secret = random_hex(32),
        );
        let config_path = dir.path().join("garage.toml");
        std::fs::write(&config_path, config).expect("write garage.toml");
        let log = std::fs::File::create(dir.path().join("garage.log")).expect("garage.log");
        let access_key = format!("GK{}", random_hex(12));
        let secret_key = random_hex(32);
        let bucket = "scaibunker-test".to_owned();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config_path)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &secret_key)
            .env("GARAGE_DEFAULT_BUCKET", &bucket)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut garage = Garage {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            access_key,
            secret_key,
            bucket,
        };
        garage.wait_ready().await;
        garage
    }

    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint.clone()),
            access_key: Some(self.access_key.clone()),
            secret_key: Some(self.secret_key.clone()),
            region: Some("garage".into()),
        }
    }

    pub fn url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    pub fn objects(&self) -> Objects {
        Objects::open(&self.url(), &self.settings()).expect("s3 object store")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let objects = self.objects();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("garage exited ({status}) at start:\n{}", self.log());
            }
            match objects.list("").await {
                Ok(_) => return,
                Err(e) if started.elapsed() > Duration::from_secs(60) => {
                    panic!("garage did not answer in 60 s ({e:?}):\n{}", self.log())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
