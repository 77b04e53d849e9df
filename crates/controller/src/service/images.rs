//! Images and availability groups.
//!
//! An uploaded image goes `pending` (created, waiting for content) → `baking` (content stored
//! under `images/{id}/source`, being turned into ext4 by [`crate::bake`]) → `ready` (the ext4
//! at `images/{id}/rootfs.ext4`, its SHA-256 recorded) or `failed` (with the reason; a new
//! upload may follow). `inactive` images are kept for the bunkers that use them but cannot be
//! chosen for new ones.
//!
//! Fan-out: a ready image in availability groups is queued (a `queued` row in the worker's
//! cache ledger) on every online worker of those groups; a worker added to a group gets every
//! ready image of the group. Heartbeat answers carry a worker's queued pulls
//! ([`pulls_for`]) until the worker reports the image cached (the row turns `ready`) or failed.
//! Workers find peers holding an image through [`peers`] and fall back to the storage proxy.
//!
//! Baking runs in its own task: a client that disconnects does not cancel it. A controller
//! that dies mid-bake leaves the image `baking`; the `images` job bakes it again from the
//! stored source once it has been untouched for [`STALE_BAKE`], in a task of its own so that
//! the job loop is not held for the length of a bake.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use scaibunker_api::images as api;
use scaibunker_core::ids::{AvailabilityGroupId, ImageId};
use scaibunker_proto::worker::{ImageFailure, ImagePull, Peer, PeersResponse};
use tokio::io::AsyncWriteExt;

use super::auth::{self, Principal};
use super::bunkers::rfc3339;
use super::quotas::audit;
use super::{Services, random_bytes};
use crate::bake::{self, BakeError, SourceKind};
use crate::objects::ObjectError;
use crate::store::availability::{GroupMember, GroupRow};
use crate::store::images::{ImageRow, NewImage};
use crate::store::{StoreError, now_ms};

/// A bake untouched this long is taken to have lost its controller.
pub const STALE_BAKE: Duration = Duration::from_secs(15 * 60);
const DEFAULT_SIZE_MIB: u64 = 1024;
const SIZE_MIB_RANGE: std::ops::RangeInclusive<u64> = 16..=65_536;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("missing permission `{0}`")]
    PermissionDenied(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("the name {0:?} is taken")]
    NameTaken(String),
    #[error("`partner` scope needs a tenant that belongs to a partner; this one belongs to none")]
    NoPartner,
    #[error("the image is {status}, not waiting for content")]
    NotPending { status: String },
    #[error("the image is {status}; only ready images can be warmed")]
    NotReady { status: String },
    #[error(
        "source kind {0:?} is not supported: upload a tarball (`tar`) or an ext4 filesystem (`ext4`)"
    )]
    Unsupported(String),
    #[error("the content is invalid: {0}")]
    ContentInvalid(String),
    #[error("the content exceeds {max_bytes} bytes")]
    TooLarge { max_bytes: u64 },
    #[error("{0}")]
    StorageQuotaExceeded(Box<super::quotas::QuotaExceeded>),
    #[error("baking failed")]
    Bake(#[source] BakeError),
    #[error("object storage failed")]
    Object(#[source] ObjectError),
    #[error("local scratch space failed")]
    Io(#[from] std::io::Error),
    #[error("store failed")]
    Store(#[from] StoreError),
}

impl From<ObjectError> for ImageError {
    fn from(e: ObjectError) -> Self {
        match e {
            ObjectError::TooLarge { max_bytes, .. } => Self::TooLarge { max_bytes },
            other => Self::Object(other),
        }
    }
}

fn require(p: &Principal, perm: &'static str) -> Result<(), ImageError> {
    if p.has(perm) {
        Ok(())
    } else {
        Err(ImageError::PermissionDenied(perm))
    }
}

/// Names of images and groups: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit.
/// A name: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit, and not shaped like an
/// id (`img_…` and the other three-letter prefixes), which a lookup by name or id would
/// confuse.
fn valid_name(name: &str) -> bool {
    let id_shaped = name.len() > 4
        && name.as_bytes()[3] == b'_'
        && name.as_bytes()[..3].iter().all(u8::is_ascii_lowercase);
    !id_shaped
        && (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

fn invalid(field: &'static str, message: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        field,
        message: message.into(),
    }
}

fn source_kind(row: &ImageRow) -> Option<SourceKind> {
    match row.source_kind.as_deref() {
        Some("tar") => Some(SourceKind::Tar),
        Some("ext4") => Some(SourceKind::Ext4),
        _ => None,
    }
}

fn source_key(id: &str) -> String {
    format!("images/{id}/source")
}

fn rootfs_key(id: &str) -> String {
    format!("images/{id}/rootfs.ext4")
}

/// The API record; `with_workers` adds the per-worker cache states.
async fn image_api(
    s: &Services,
    row: ImageRow,
    with_workers: bool,
) -> Result<api::Image, ImageError> {
    let mut warm = api::WarmCounts::default();
    let mut workers = Vec::new();
    if let Some(sha) = &row.sha256 {
        let states = s.store.image_cache_states(sha).await?;
        for st in &states {
            match st.state.as_str() {
                "queued" => warm.queued += 1,
                "ready" => warm.ready += 1,
                "failed" => warm.failed += 1,
                _ => {}
            }
        }
        for (worker_id, status) in s.store.workers_for_image_groups(&row.id).await? {
            if status != "online" && !states.iter().any(|st| st.worker_id == worker_id) {
                warm.skipped += 1;
            }
        }
        if with_workers {
            workers = states
                .into_iter()
                .map(|st| api::ImageWorkerState {
                    worker_id: st.worker_id,
                    state: st.state,
                    error: st.error,
                    updated_at: rfc3339(st.updated_at),
                })
                .collect();
        }
    }
    Ok(api::Image {
        id: row.id,
        name: row.name,
        tenant_id: row.tenant_id,
        scope: row.scope,
        status: row.status,
        source_kind: row.source_kind,
        sha256: row.sha256,
        size_bytes: row.size_bytes.map(|n| n as u64),
        size_mib: row.size_mib.map(|n| n as u64),
        lazy_pull: row.lazy_pull,
        default_cpu_millicores: row.default_cpu_millicores.map(|n| n as u64),
        default_memory_mb: row.default_memory_mb.map(|n| n as u64),
        default_disk_mb: row.default_disk_mb.map(|n| n as u64),
        error: row.error,
        warm,
        workers: with_workers.then_some(workers),
        created_at: rfc3339(row.created_at),
    })
}

/// `POST /images`.
pub async fn create(
    s: &Services,
    p: &Principal,
    req: api::CreateImage,
) -> Result<api::Image, ImageError> {
    require(p, auth::IMAGES_MANAGE)?;
    if !valid_name(&req.name) {
        return Err(invalid(
            "name",
            "1 to 64 characters of a-z 0-9 . _ -, starting with a letter or digit, not shaped \
             like an id (`img_…`)",
        ));
    }
    let kind = match req.source.kind.as_str() {
        "tar" | "ext4" => req.source.kind.clone(),
        "oci" => return Err(ImageError::Unsupported("oci".into())),
        _ => return Err(invalid("source.kind", "must be tar, ext4 or oci")),
    };
    let size_mib = req.size_mib.unwrap_or(DEFAULT_SIZE_MIB);
    if !SIZE_MIB_RANGE.contains(&size_mib) {
        return Err(invalid("size_mib", "must be 16 to 65536"));
    }
    let scope = req.scope.clone().unwrap_or_else(|| "tenant".into());
    let partner = s.store.tenant_partner(&p.tenant_id).await?;
    let (tenant_id, partner_id) = match scope.as_str() {
        "tenant" => (Some(p.tenant_id.as_str()), None),
        "partner" => {
            require(p, auth::ADMIN_TENANT)?;
            let Some(partner) = partner.as_deref() else {
                return Err(ImageError::NoPartner);
            };
            (Some(p.tenant_id.as_str()), Some(partner))
        }
        "platform" => {
            require(p, auth::ADMIN_PLATFORM)?;
            (None, None)
        }
        _ => return Err(invalid("scope", "must be tenant, partner or platform")),
    };
    let default = |field: &'static str, v: Option<u64>| -> Result<Option<i64>, ImageError> {
        match v {
            Some(0) => Err(invalid(field, "must be positive")),
            Some(n) if n > 1 << 40 => Err(invalid(field, "is too large")),
            other => Ok(other.map(|n| n as i64)),
        }
    };
    let id = ImageId::from_random(random_bytes()).to_string();
    let new = NewImage {
        id: &id,
        tenant_id,
        partner_id,
        name: &req.name,
        scope: &scope,
        source_kind: &kind,
        size_mib: size_mib as i64,
        lazy_pull: req.lazy_pull.unwrap_or(false),
        default_cpu_millicores: default("default_cpu_millicores", req.default_cpu_millicores)?,
        default_memory_mb: default("default_memory_mb", req.default_memory_mb)?,
        default_disk_mb: default("default_disk_mb", req.default_disk_mb)?,
    };
    let event = audit(
        p,
        "image.create",
        "image",
        &id,
        tenant_id,
        serde_json::json!({"name": req.name, "scope": scope, "source_kind": kind, "size_mib": size_mib}),
    );
    if !s.store.insert_image(&new, &event).await? {
        return Err(ImageError::NameTaken(req.name));
    }
    image_api(s, get_row(s, None, &id).await?, false).await
}

async fn get_row(s: &Services, p: Option<&Principal>, id: &str) -> Result<ImageRow, ImageError> {
    if ImageId::parse(id).is_err() {
        return Err(ImageError::NotFound("image"));
    }
    let row = match p {
        Some(p) if !p.is_admin() => {
            let partner = s.store.tenant_partner(&p.tenant_id).await?;
            s.store
                .image(Some(&p.tenant_id), partner.as_deref(), id)
                .await?
        }
        _ => s.store.image(None, None, id).await?,
    };
    row.ok_or(ImageError::NotFound("image"))
}

/// An image the caller may change: its tenant's (`scaibunker:images:manage`) or a platform
/// image (`scaibunker:admin:platform`). One it can only see is refused; one it cannot see is
/// not found.
async fn manageable(s: &Services, p: &Principal, id: &str) -> Result<ImageRow, ImageError> {
    require(p, auth::IMAGES_MANAGE)?;
    let row = get_row(s, Some(p), id).await?;
    match row.tenant_id.as_deref() {
        Some(t) if t == p.tenant_id || p.is_admin() => Ok(row),
        None if p.has(auth::ADMIN_PLATFORM) => Ok(row),
        None => Err(ImageError::PermissionDenied(auth::ADMIN_PLATFORM)),
        Some(_) => Err(ImageError::PermissionDenied(auth::IMAGES_MANAGE)),
    }
}

/// `GET /images`: the caller's, its partner's and the platform's images (all for admins).
pub async fn list(s: &Services, p: &Principal) -> Result<Vec<api::Image>, ImageError> {
    if !p.can_read() {
        return Err(ImageError::PermissionDenied(auth::CREATE));
    }
    let rows = if p.is_admin() {
        s.store.images(None, None).await?
    } else {
        let partner = s.store.tenant_partner(&p.tenant_id).await?;
        s.store
            .images(Some(&p.tenant_id), partner.as_deref())
            .await?
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(image_api(s, row, false).await?);
    }
    Ok(out)
}

/// `GET /images/{id}`; per-worker cache states (worker ids, pull errors) only for platform
/// admins: the fleet is the platform's, tenants see the `warm` counts.
pub async fn get(s: &Services, p: &Principal, id: &str) -> Result<api::Image, ImageError> {
    if !p.can_read() {
        return Err(ImageError::PermissionDenied(auth::CREATE));
    }
    let fleet_view = p.is_admin() && p.has(auth::ADMIN_PLATFORM);
    image_api(s, get_row(s, Some(p), id).await?, fleet_view).await
}

/// `PUT /images/{id}/content`: stores the bytes, bakes them and fans the image out. Answers
/// once the image is ready or failed.
pub async fn upload_content<S>(
    s: &Services,
    p: &Principal,
    id: &str,
    content_length: Option<u64>,
    body: S,
) -> Result<api::Image, ImageError>
where
    S: Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
{
    let row = manageable(s, p, id).await?;
    let max_bytes = upload_cap(s, &row);
    if content_length.is_some_and(|n| n > max_bytes) {
        return Err(ImageError::TooLarge { max_bytes });
    }
    // The baked image takes `size_mib` of the tenant's storage (platform images: no tenant's).
    if let Some(tenant_id) = &row.tenant_id {
        let size = row.size_mib.unwrap_or(0).max(0) as u64 * (1 << 20);
        super::storage_quota::room(s, tenant_id, &p.user_id)
            .await?
            .admit(size)
            .map_err(ImageError::StorageQuotaExceeded)?;
    }
    // A failed image may take a new upload; two concurrent uploads: one wins.
    let from = match row.status.as_str() {
        "pending" | "failed" => row.status.clone(),
        other => {
            return Err(ImageError::NotPending {
                status: other.to_owned(),
            });
        }
    };
    let event = audit(
        p,
        "image.content",
        "image",
        id,
        row.tenant_id.as_deref(),
        serde_json::json!({"content_length": content_length}),
    );
    if !s
        .store
        .set_image_status(id, &from, "baking", None, Some(&event))
        .await?
    {
        let now = get_row(s, None, id).await?;
        return Err(ImageError::NotPending { status: now.status });
    }
    if let Err(e) = s
        .objects()
        .put_stream(&source_key(id), body.boxed(), max_bytes)
        .await
    {
        // Nothing was stored; the image takes a new upload.
        s.store
            .set_image_status(id, "baking", &from, row.error.as_deref(), None)
            .await?;
        return Err(e.into());
    }
    let task = tokio::spawn(bake_and_publish(s.clone(), id.to_owned()));
    match task.await {
        Ok(result) => result?,
        Err(e) => {
            fail(s, id, "baking stopped unexpectedly").await;
            tracing::error!(image_id = id, error = %e, "bake task panicked");
        }
    }
    image_api(s, get_row(s, None, id).await?, true).await
}

/// Most bytes an upload may have: the object cap, and for an ext4 its `size_mib`.
fn upload_cap(s: &Services, row: &ImageRow) -> u64 {
    let cap = s.config.max_object_bytes;
    match source_kind(row) {
        Some(SourceKind::Ext4) => cap.min(row.size_mib.unwrap_or(0) as u64 * (1 << 20)),
        _ => cap,
    }
}

async fn fail(s: &Services, id: &str, reason: &str) {
    if let Err(e) = s
        .store
        .set_image_status(id, "baking", "failed", Some(reason), None)
        .await
    {
        tracing::error!(image_id = id, error = %e, "recording a failed bake");
    }
}

/// Bakes the stored source of a `baking` image, publishes the ext4 and queues the fan-out.
async fn bake_and_publish(s: Services, id: String) -> Result<(), ImageError> {
    let started = std::time::Instant::now();
    match bake_once(&s, &id).await {
        Ok(()) => {
            tracing::info!(
                image_id = id,
                ms = started.elapsed().as_millis() as u64,
                "image baked"
            );
            Ok(())
        }
        Err(ImageError::ContentInvalid(reason)) => {
            fail(&s, &id, &reason).await;
            // Nothing of a refused upload is kept.
            if let Err(e) = s.objects().delete(&source_key(&id)).await {
                tracing::warn!(image_id = id, error = %e, "deleting a refused image source");
            }
            Err(ImageError::ContentInvalid(reason))
        }
        Err(e) => {
            tracing::error!(image_id = id, error = ?e, "baking failed");
            fail(
                &s,
                &id,
                "baking failed on the platform's side; upload again",
            )
            .await;
            Err(e)
        }
    }
}

async fn bake_once(s: &Services, id: &str) -> Result<(), ImageError> {
    let row = get_row(s, None, id).await?;
    let kind = source_kind(&row).ok_or_else(|| ImageError::Unsupported("none".into()))?;
    // Scratch space on the data disk when there is one (an image can be GiBs; /tmp may be RAM).
    let scratch = match &s.config.data_dir {
        Some(dir) => {
            let dir = dir.join("bake");
            tokio::fs::create_dir_all(&dir).await?;
            dir
        }
        None => std::env::temp_dir(),
    };
    let work = tempfile::Builder::new()
        .prefix("scaibunker-bake-")
        .tempdir_in(scratch)?;
    let source = work.path().join("source");
    {
        let mut read = s.objects().get_stream(&source_key(id)).await?;
        let mut file = tokio::fs::File::create(&source).await?;
        while let Some(chunk) = read.body.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await?;
    }
    let size_mib = row.size_mib.unwrap_or(DEFAULT_SIZE_MIB as i64) as u64;
    let baked = bake::bake(kind, &source, work.path(), size_mib)
        .await
        .map_err(|e| match e {
            BakeError::Invalid(m) => ImageError::ContentInvalid(m),
            other => ImageError::Bake(other),
        })?;
    if !baked.setid.is_empty() {
        // Kept on purpose (the microVM is the boundary), but worth a record.
        const SHOWN: usize = 20;
        tracing::info!(
            image_id = id,
            count = baked.setid.len(),
            first = ?&baked.setid[..baked.setid.len().min(SHOWN)],
            "the image keeps setuid or setgid files"
        );
    }
    let file = tokio::fs::File::open(&baked.ext4).await?;
    let len = file.metadata().await?.len();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    let key = rootfs_key(id);
    let put = s.objects().put_stream(&key, stream, len).await?;
    if !s
        .store
        .finish_bake(id, &put.sha256, put.size_bytes as i64, &key)
        .await?
    {
        // Someone else finished (or deactivated) it meanwhile: theirs stands.
        return Ok(());
    }
    if let Err(e) = s.objects().delete(&source_key(id)).await {
        tracing::warn!(image_id = id, error = %e, "deleting the baked image's source");
    }
    fan_out(s, id, &put.sha256).await?;
    Ok(())
}

/// Queues the image on the online workers of its groups. Returns how many were queued.
async fn fan_out(s: &Services, image_id: &str, sha256: &str) -> Result<u64, ImageError> {
    let workers: Vec<String> = s
        .store
        .workers_for_image_groups(image_id)
        .await?
        .into_iter()
        .filter(|(_, status)| status == "online")
        .map(|(id, _)| id)
        .collect();
    queue(s, sha256, &workers).await
}

async fn queue(s: &Services, sha256: &str, workers: &[String]) -> Result<u64, ImageError> {
    let mut tx = s.store.begin().await?;
    let n = s.store.queue_pulls(&mut tx, sha256, workers).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(n)
}

/// `POST /images/{id}/warm`: queues the image on the online workers of its groups, or on every
/// online worker when it is in none. Failed pulls are retried.
pub async fn warm(s: &Services, p: &Principal, id: &str) -> Result<api::Image, ImageError> {
    let row = manageable(s, p, id).await?;
    let sha = match (&row.status[..], &row.sha256) {
        ("ready", Some(sha)) => sha.clone(),
        _ => return Err(ImageError::NotReady { status: row.status }),
    };
    let workers: Vec<String> = if s.store.image_in_any_group(id).await? {
        s.store
            .workers_for_image_groups(id)
            .await?
            .into_iter()
            .filter(|(_, st)| st == "online")
            .map(|(w, _)| w)
            .collect()
    } else {
        s.store
            .workers()
            .await?
            .into_iter()
            .filter(|w| w.status == "online")
            .map(|w| w.id)
            .collect()
    };
    let queued = queue(s, &sha, &workers).await?;
    tracing::info!(image_id = id, queued, "image warm requested");
    image_api(s, get_row(s, None, id).await?, true).await
}

/// `POST /images/{id}/deactivate`: no new bunkers from it; running ones keep it.
pub async fn deactivate(s: &Services, p: &Principal, id: &str) -> Result<api::Image, ImageError> {
    let row = manageable(s, p, id).await?;
    if row.status != "inactive" {
        let event = audit(
            p,
            "image.deactivate",
            "image",
            id,
            row.tenant_id.as_deref(),
            serde_json::json!({"was": row.status}),
        );
        s.store
            .set_image_status(
                id,
                &row.status,
                "inactive",
                row.error.as_deref(),
                Some(&event),
            )
            .await?;
    }
    image_api(s, get_row(s, None, id).await?, true).await
}

/// The `images` job: re-bakes images whose controller died mid-bake, each in its own task
/// (a bake can take many minutes; the job loop runs every other job meanwhile). Returns how
/// many it started.
pub async fn recover_stale_bakes(s: &Services) -> Result<usize, ImageError> {
    let before = now_ms() - STALE_BAKE.as_millis() as i64;
    let stale = s.store.stale_bakes(before).await?;
    for id in &stale {
        // Touch it first so a second controller's tick does not start the same bake.
        if s.store
            .set_image_status(id, "baking", "baking", None, None)
            .await?
        {
            tracing::warn!(
                image_id = id,
                "re-baking an image whose bake was interrupted"
            );
            tokio::spawn(bake_and_publish(s.clone(), id.clone()));
        }
    }
    Ok(stale.len())
}

// ---- worker side: pulls, failures, peers -------------------------------------------------

/// The pulls a heartbeat answer carries for `worker_id`.
pub async fn pulls_for(s: &Services, worker_id: &str) -> Result<Vec<ImagePull>, StoreError> {
    Ok(s.store
        .pending_pulls(worker_id)
        .await?
        .into_iter()
        .map(|r| ImagePull {
            sha256: r.sha256,
            size_bytes: r.size_bytes as u64,
            object_key: r.object_key,
        })
        .collect())
}

/// Records the pull failures a heartbeat reports.
pub async fn record_failures(
    s: &Services,
    worker_id: &str,
    failures: &[ImageFailure],
) -> Result<(), StoreError> {
    for f in failures {
        let reason: String = f.reason.chars().take(1000).collect();
        if s.store.fail_pull(worker_id, &f.sha256, &reason).await? {
            tracing::warn!(worker_id, sha256 = f.sha256, reason, "image pull failed");
        }
    }
    Ok(())
}

/// `GET /peers/{sha256}` (worker token).
/// How long a peer token lets a worker start fetching an image from a peer.
const PEER_TOKEN_TTL_S: u64 = 600;

pub async fn peers(
    s: &Services,
    worker_id: &str,
    sha256: &str,
) -> Result<PeersResponse, ImageError> {
    if sha256.len() != 64
        || !sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid("sha256", "must be 64 lowercase hex digits"));
    }
    let peers = s
        .store
        .image_peers(worker_id, sha256)
        .await?
        .into_iter()
        .map(|(peer_id, url, held_generation)| {
            let peer_credential =
                super::worker_credentials::credential(s, &peer_id, held_generation);
            Peer {
                token: scaibunker_proto::worker_auth::peer_token(
                    &peer_credential,
                    sha256,
                    worker_id,
                    super::storage::now_s() + PEER_TOKEN_TTL_S,
                ),
                worker_id: peer_id,
                url,
            }
        })
        .collect();
    Ok(PeersResponse { peers })
}

// ---- availability groups -----------------------------------------------------------------

fn require_platform(p: &Principal) -> Result<(), ImageError> {
    if p.is_admin() && p.has(auth::ADMIN_PLATFORM) {
        Ok(())
    } else {
        Err(ImageError::PermissionDenied(auth::ADMIN_PLATFORM))
    }
}

fn group_api(g: GroupRow) -> api::AvailabilityGroup {
    api::AvailabilityGroup {
        id: g.id,
        name: g.name,
        description: g.description,
        worker_ids: g.worker_ids,
        image_ids: g.image_ids,
        created_at: rfc3339(g.created_at),
    }
}

pub async fn create_group(
    s: &Services,
    p: &Principal,
    req: api::CreateAvailabilityGroup,
) -> Result<api::AvailabilityGroup, ImageError> {
    require_platform(p)?;
    if !valid_name(&req.name) {
        return Err(invalid(
            "name",
            "1 to 64 characters of a-z 0-9 . _ -, starting with a letter or digit",
        ));
    }
    if req
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > 1024)
    {
        return Err(invalid("description", "at most 1024 bytes"));
    }
    let id = AvailabilityGroupId::from_random(random_bytes()).to_string();
    if !s
        .store
        .insert_availability_group(&id, &req.name, req.description.as_deref())
        .await?
    {
        return Err(ImageError::NameTaken(req.name));
    }
    group(s, p, &id).await
}

pub async fn groups(
    s: &Services,
    p: &Principal,
) -> Result<Vec<api::AvailabilityGroup>, ImageError> {
    require_platform(p)?;
    Ok(s.store
        .availability_groups()
        .await?
        .into_iter()
        .map(group_api)
        .collect())
}

pub async fn group(
    s: &Services,
    p: &Principal,
    id: &str,
) -> Result<api::AvailabilityGroup, ImageError> {
    require_platform(p)?;
    s.store
        .availability_group(id)
        .await?
        .map(group_api)
        .ok_or(ImageError::NotFound("availability group"))
}

pub async fn delete_group(s: &Services, p: &Principal, id: &str) -> Result<(), ImageError> {
    require_platform(p)?;
    if !s.store.delete_availability_group(id).await? {
        return Err(ImageError::NotFound("availability group"));
    }
    Ok(())
}

/// Adds or removes a worker or an image. Adding warms: a new image on every online worker of
/// the group, a new worker with every ready image of the group. Removing leaves caches as
/// they are.
pub async fn set_member(
    s: &Services,
    p: &Principal,
    group_id: &str,
    member: GroupMember,
    member_id: &str,
    present: bool,
) -> Result<api::AvailabilityGroup, ImageError> {
    require_platform(p)?;
    let group = s
        .store
        .availability_group(group_id)
        .await?
        .ok_or(ImageError::NotFound("availability group"))?;
    match member {
        GroupMember::Worker => {
            s.store
                .worker(member_id)
                .await?
                .ok_or(ImageError::NotFound("worker"))?;
        }
        GroupMember::Image => {
            get_row(s, None, member_id).await?;
        }
    }
    let mut tx = s.store.begin().await?;
    let changed = s
        .store
        .set_group_member(&mut tx, member, &group.id, member_id, present)
        .await?;
    tx.commit().await.map_err(StoreError::from)?;
    if changed && present {
        let queued = match member {
            GroupMember::Image => {
                let row = get_row(s, None, member_id).await?;
                match (&row.status[..], &row.sha256) {
                    ("ready", Some(sha)) => fan_out(s, member_id, sha).await?,
                    _ => 0,
                }
            }
            GroupMember::Worker => {
                let mut n = 0;
                for (_, sha) in s.store.images_for_worker_groups(member_id).await? {
                    n += queue(s, &sha, &[member_id.to_owned()]).await?;
                }
                n
            }
        };
        tracing::info!(
            group_id,
            member_id,
            queued,
            "availability group member added"
        );
    }
    s.store
        .availability_group(group_id)
        .await?
        .map(group_api)
        .ok_or(ImageError::NotFound("availability group"))
}
