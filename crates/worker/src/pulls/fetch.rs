//! One pull's transfer: ask the controller for peers, stream each source in turn into the
//! part file while hashing it, and publish the verified file read-only with its digest
//! cached. Every failure of a source deletes the part file before the next is tried.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use std::time::Duration;

use futures_util::StreamExt as _;
use scaibunker_proto::worker::{ImagePull, PeersResponse, WORKER_API_PREFIX};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::room::NoRoomError;
use super::{
    ControllerAccess, IMAGE_SUFFIX, PART_SUFFIX, Pulls, is_sha256_hex, remove_quietly,
    remove_quietly_async,
};
use crate::bunker::supervisor::error_chain;
use crate::images::{self, Image};

const PEERS_PATH: &str = "/v1/modules/scaibunker/peers";
const OBJECTS_PATH: &str = "/v1/modules/scaibunker/storage/objects";
const PEERS_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one source did not deliver the image.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url} announced {announced} bytes, expected {expected}")]
    Length {
        url: String,
        announced: u64,
        expected: u64,
    },
    #[error("more than the expected {expected} bytes arrived")]
    TooLong { expected: u64 },
    #[error("{got} bytes arrived, expected {expected}")]
    TooShort { got: u64, expected: u64 },
    #[error("the bytes hash to {got}")]
    Digest { got: String },
    #[error("write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum PullError {
    #[error("sha256 {0:?} is not 64 lowercase hex digits")]
    InvalidDigest(String),
    #[error("make room in the image cache")]
    NoRoom(#[source] NoRoomError),
    #[error("no source served the image ({})", tried.join("; "))]
    NoSource { tried: Vec<String> },
    #[error("publish {}", path.display())]
    Publish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where a pull's bytes came from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    Peer { worker_id: String },
    Proxy,
}

/// An object key the storage proxy accepts: `/`-separated segments of `A-Z a-z 0-9 . _ - =`,
/// none empty or starting with `.`. Checked here too, so a key never shapes another URL.
pub(super) fn is_object_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 1024
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'='))
        })
}

impl Pulls {
    /// Tries every peer, then the storage proxy, until one serves the right bytes.
    pub(super) async fn fetch(&self, pull: &ImagePull) -> Result<(Image, Source), PullError> {
        if !is_sha256_hex(&pull.sha256) {
            return Err(PullError::InvalidDigest(pull.sha256.clone()));
        }
        let part = self.part_path(&pull.sha256);
        let mut tried = Vec::new();
        let Some(controller) = &self.controller else {
            tried.push("no controller to ask for peers or the storage proxy".to_owned());
            return Err(PullError::NoSource { tried });
        };
        // Before any byte moves, so a pull that cannot fit leaves nothing behind.
        self.make_room(pull).await.map_err(PullError::NoRoom)?;
        let peers = match self.peers(controller, &pull.sha256).await {
            Ok(peers) => peers.peers,
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(sha256 = %pull.sha256, %reason, "cannot list peers; trying the storage proxy");
                tried.push(format!("peers: {reason}"));
                Vec::new()
            }
        };
        for peer in peers {
            let url = format!(
                "{}{WORKER_API_PREFIX}/images/{}",
                peer.url.trim_end_matches('/'),
                pull.sha256
            );
            match self.download(&url, &peer.token, pull, &part).await {
                Ok(()) => {
                    let image = self.publish(&part, &pull.sha256, pull.size_bytes).await?;
                    return Ok((
                        image,
                        Source::Peer {
                            worker_id: peer.worker_id,
                        },
                    ));
                }
                Err(e) => {
                    let reason = error_chain(&e);
                    tracing::warn!(sha256 = %pull.sha256, peer = %peer.worker_id, %reason, "peer did not serve the image; trying the next source");
                    tried.push(format!("peer {}: {reason}", peer.worker_id));
                }
            }
        }
        match pull.object_key.as_deref() {
            Some(key) if is_object_key(key) => {
                let url = format!("{}{OBJECTS_PATH}/{key}", controller.url);
                match self
                    .download(&url, &controller.credentials.bearer(), pull, &part)
                    .await
                {
                    Ok(()) => {
                        let image = self.publish(&part, &pull.sha256, pull.size_bytes).await?;
                        return Ok((image, Source::Proxy));
                    }
                    Err(e) => tried.push(format!("storage proxy: {}", error_chain(&e))),
                }
            }
            Some(key) => tried.push(format!("storage proxy: invalid object key {key:?}")),
            None => tried.push("storage proxy: the image has no object key".to_owned()),
        }
        Err(PullError::NoSource { tried })
    }

    pub(super) fn part_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}{PART_SUFFIX}"))
    }

    async fn peers(
        &self,
        controller: &ControllerAccess,
        sha256: &str,
    ) -> Result<PeersResponse, FetchError> {
        let worker_id = self
            .worker_id
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        let url = format!(
            "{}{PEERS_PATH}/{sha256}?worker_id={worker_id}",
            controller.url
        );
        let http_err = |source| FetchError::Http {
            url: url.clone(),
            source,
        };
        let resp = self
            .http
            .get(&url)
            .bearer_auth(controller.credentials.bearer())
            .timeout(PEERS_TIMEOUT)
            .send()
            .await
            .map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url,
                status: resp.status(),
            });
        }
        resp.json().await.map_err(http_err)
    }

    /// Streams `url` into `part`, checking size and digest; on any failure `part` is gone.
    async fn download(
        &self,
        url: &str,
        bearer: &str,
        pull: &ImagePull,
        part: &Path,
    ) -> Result<(), FetchError> {
        let result = self.download_into(url, bearer, pull, part).await;
        if result.is_err() {
            remove_quietly_async(part).await;
        }
        result
    }

    async fn download_into(
        &self,
        url: &str,
        bearer: &str,
        pull: &ImagePull,
        part: &Path,
    ) -> Result<(), FetchError> {
        let http_err = |source| FetchError::Http {
            url: url.to_owned(),
            source,
        };
        let resp = self
            .http
            .get(url)
            .bearer_auth(bearer)
            .send()
            .await
            .map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: resp.status(),
            });
        }
        if let Some(announced) = resp.content_length()
            && announced != pull.size_bytes
        {
            return Err(FetchError::Length {
                url: url.to_owned(),
                announced,
                expected: pull.size_bytes,
            });
        }
        let write_err = |source| FetchError::Write {
            path: part.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::create(part).await.map_err(write_err)?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(http_err)?;
            received = received.saturating_add(chunk.len() as u64);
            if received > pull.size_bytes {
                return Err(FetchError::TooLong {
                    expected: pull.size_bytes,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(write_err)?;
        }
        if received != pull.size_bytes {
            return Err(FetchError::TooShort {
                got: received,
                expected: pull.size_bytes,
            });
        }
        let got = hex::encode(hasher.finalize());
        if got != pull.sha256 {
            return Err(FetchError::Digest { got });
        }
        file.sync_all().await.map_err(write_err)?;
        Ok(())
    }

    /// Moves a verified part file into place, read-only, with its digest cached.
    async fn publish(
        &self,
        part: &Path,
        sha256: &str,
        size_bytes: u64,
    ) -> Result<Image, PullError> {
        let dest = self.dir.join(format!("{sha256}{IMAGE_SUFFIX}"));
        let (part, dir, sha) = (part.to_owned(), self.dir.clone(), sha256.to_owned());
        let path = dest.clone();
        let published = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let result = (|| {
                fs::rename(&part, &path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o444))?;
                // The rename is durable once the directory is synced.
                fs::File::open(&dir)?.sync_all()
            })();
            if result.is_err() {
                remove_quietly(&part);
            }
            result?;
            images::record_digest(&path, &sha);
            Ok(())
        })
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join)));
        published.map_err(|source| PullError::Publish {
            path: dest.clone(),
            source,
        })?;
        Ok(Image {
            name: sha256.to_owned(),
            sha256: sha256.to_owned(),
            size_bytes,
            path: dest,
        })
    }
}
