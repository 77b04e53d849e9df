//! The S3 backend (`s3://bucket`): path-style requests, presigned with SigV4 by `rusty-s3`
//! (docs/decisions/0008) and sent with the controller's `reqwest` client.
//!
//! A put, step by step:
//! 1. Read the body into a buffer until it holds one part ([`part_bytes`]: 8 MiB, more for a
//!    size cap past 80 GB, at most 64 MiB).
//! 2. The body ended first: one `PutObject` of the buffer.
//! 3. Otherwise `CreateMultipartUpload`, then one `UploadPart` per buffer, reading the next part
//!    only after the previous one was sent, so at most one part is in memory; finally
//!    `CompleteMultipartUpload` with the parts' ETags. Any failure aborts the upload, so nothing
//!    half-written stays visible (a crash in between leaves parts for the bucket's lifecycle rule
//!    to reap, never a partial object).
//!
//! The SHA-256 and size of a put are computed from the bytes as they stream through.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use rusty_s3::actions::{
    CompleteMultipartUploadResponse, CreateMultipartUpload, ListObjectsV2, S3Action,
};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use super::{
    ByteStream, Digesting, KeyPrefix, ObjectEntry, ObjectError, ObjectKey, ObjectMeta, ObjectRead,
    ObjectStore, PutOutcome,
};

/// How long a presigned request stays valid; each request is signed just before it is sent.
const SIGN_FOR: Duration = Duration::from_secs(15 * 60);
/// Smallest multipart part (S3's minimum is 5 MiB for every part but the last).
const MIN_PART_BYTES: u64 = 8 * 1024 * 1024;
/// Largest part: one part is what a put holds in memory. 10,000 of them make 640 GiB.
const MAX_PART_BYTES: u64 = 64 * 1024 * 1024;
/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;

/// Connection settings of the S3 backend (`SCAIBUNKER_S3_*`).
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// `http://host:port` of the S3 API.
    pub endpoint: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// `garage` when unset (Garage's default region).
    pub region: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum S3ConfigError {
    #[error("SCAIBUNKER_S3_ENDPOINT is required with an s3:// object store")]
    MissingEndpoint,
    #[error(
        "SCAIBUNKER_S3_ACCESS_KEY and SCAIBUNKER_S3_SECRET_KEY are required with an s3:// object store"
    )]
    MissingCredentials,
    #[error("the bucket name is empty (s3://bucket)")]
    MissingBucket,
    #[error(
        "SCAIBUNKER_S3_ENDPOINT {0:?} is https, which this build does not speak; reach the S3 API over http on a private network"
    )]
    Https(String),
    #[error("SCAIBUNKER_S3_ENDPOINT {0:?} is not an http:// URL")]
    Endpoint(String),
    #[error("building the bucket URL")]
    Bucket(#[from] rusty_s3::BucketError),
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// A failed S3 request.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("request failed")]
    Http(#[from] reqwest::Error),
    #[error("answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unreadable response: {0}")]
    Response(String),
    #[error("more than {MAX_PARTS} parts")]
    TooManyParts,
}

pub struct S3 {
    bucket: Bucket,
    credentials: Credentials,
    http: reqwest::Client,
}

/// The part size for a body of at most `max_bytes`: large enough that it fits in
/// [`MAX_PARTS`] parts, within [`MIN_PART_BYTES`]..=[`MAX_PART_BYTES`] (the memory a put
/// holds).
fn part_bytes(max_bytes: u64) -> usize {
    let needed = max_bytes.div_ceil(MAX_PARTS);
    needed.clamp(MIN_PART_BYTES, MAX_PART_BYTES) as usize
}

fn s3_err(op: &'static str, key: &str) -> impl FnOnce(S3Error) -> ObjectError {
    let key = key.to_owned();
    move |source| ObjectError::S3 { op, key, source }
}

fn etag_of(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned()
}

/// Size and ETag from a `GetObject` or `HeadObject` answer.
fn meta_of(resp: &reqwest::Response) -> ObjectMeta {
    let size_bytes = resp
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ObjectMeta {
        size_bytes,
        etag: etag_of(resp.headers()),
    }
}

/// The response if it is a success, else its status and (the start of) its body.
async fn success(resp: reqwest::Response) -> Result<reqwest::Response, S3Error> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let mut body = resp.text().await.unwrap_or_default();
    body.truncate(512);
    Err(S3Error::Status { status, body })
}

/// Reads the body until `part` bytes are buffered or it ends; `true` when it ended.
async fn fill(
    body: &mut ByteStream,
    digest: &mut Digesting,
    part: usize,
) -> Result<(Bytes, bool), ObjectError> {
    let mut buf = BytesMut::new();
    while buf.len() < part {
        match digest.take(body.next().await)? {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => return Ok((buf.freeze(), true)),
        }
    }
    Ok((buf.freeze(), false))
}

impl S3 {
    pub fn new(bucket: &str, settings: &S3Settings) -> Result<Self, S3ConfigError> {
        if bucket.is_empty() {
            return Err(S3ConfigError::MissingBucket);
        }
        let endpoint = settings
            .endpoint
            .as_deref()
            .ok_or(S3ConfigError::MissingEndpoint)?;
        if endpoint.starts_with("https://") {
            return Err(S3ConfigError::Https(endpoint.to_owned()));
        }
        let url: reqwest::Url = endpoint
            .parse()
            .ok()
            .filter(|u: &reqwest::Url| u.scheme() == "http")
            .ok_or_else(|| S3ConfigError::Endpoint(endpoint.to_owned()))?;
        let (Some(key), Some(secret)) = (&settings.access_key, &settings.secret_key) else {
            return Err(S3ConfigError::MissingCredentials);
        };
        let region = settings.region.clone().unwrap_or_else(|| "garage".into());
        let bucket = Bucket::new(url, UrlStyle::Path, bucket.to_owned(), region)?;
        Ok(Self {
            bucket,
            credentials: Credentials::new(key.clone(), secret.clone()),
            http: reqwest::Client::builder()
                // A stalled S3 fails the request instead of holding it (and its client) forever;
                // the read timeout is per read, so long streams are fine.
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(120))
                .build()
                .map_err(S3ConfigError::Client)?,
        })
    }

    /// Sends `req`: the response if it succeeded, `None` if S3 answered 404.
    async fn found(
        &self,
        req: reqwest::RequestBuilder,
        op: &'static str,
        key: &str,
    ) -> Result<Option<reqwest::Response>, ObjectError> {
        let resp = req.send().await.map_err(|e| s3_err(op, key)(e.into()))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        success(resp).await.map(Some).map_err(s3_err(op, key))
    }

    async fn put_single(&self, key: &str, bytes: Bytes) -> Result<String, S3Error> {
        let url = self
            .bucket
            .put_object(Some(&self.credentials), key)
            .sign(SIGN_FOR);
        let resp = success(self.http.put(url).body(bytes).send().await?).await?;
        Ok(etag_of(resp.headers()))
    }

    async fn create_multipart(&self, key: &str) -> Result<String, S3Error> {
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.credentials), key)
            .sign(SIGN_FOR);
        let resp = success(self.http.post(url).send().await?).await?;
        let text = resp.text().await?;
        let created = CreateMultipartUpload::parse_response(&text)
            .map_err(|e| S3Error::Response(e.to_string()))?;
        Ok(created.upload_id().to_owned())
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        bytes: Bytes,
    ) -> Result<String, S3Error> {
        let url = self
            .bucket
            .upload_part(Some(&self.credentials), key, number, upload_id)
            .sign(SIGN_FOR);
        let resp = success(self.http.put(url).body(bytes).send().await?).await?;
        Ok(etag_of(resp.headers()))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<String, S3Error> {
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGN_FOR);
        let resp = success(self.http.post(url).body(action.body()).send().await?).await?;
        let text = resp.text().await?;
        // S3 may answer 200 and still report an error in the body.
        let done = CompleteMultipartUploadResponse::parse(&text)
            .map_err(|e| S3Error::Response(format!("{e}: {text}")))?;
        Ok(done.etag().trim_matches('"').to_owned())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) {
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.credentials), key, upload_id)
            .sign(SIGN_FOR);
        if let Err(error) = self.http.delete(url).send().await {
            tracing::warn!(%key, %error, "aborting a multipart upload failed");
        }
    }

    /// Steps 3 of the module doc: the parts after `first`, then completion.
    async fn put_multipart(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        first: Bytes,
        body: &mut ByteStream,
        digest: &mut Digesting,
        part: usize,
    ) -> Result<String, ObjectError> {
        let k = key.as_str();
        let mut etags = Vec::new();
        let mut bytes = first;
        let mut ended = false;
        loop {
            let number = u16::try_from(etags.len() + 1)
                .ok()
                .filter(|n| u64::from(*n) <= MAX_PARTS)
                .ok_or(S3Error::TooManyParts)
                .map_err(s3_err("uploading a part of", k))?;
            let etag = self
                .upload_part(k, upload_id, number, bytes)
                .await
                .map_err(s3_err("uploading a part of", k))?;
            etags.push(etag);
            if ended {
                break;
            }
            let (next, end) = fill(body, digest, part).await?;
            if next.is_empty() {
                break;
            }
            (bytes, ended) = (next, end);
        }
        self.complete_multipart(k, upload_id, &etags)
            .await
            .map_err(s3_err("completing the upload of", k))
    }
}

#[async_trait::async_trait]
impl ObjectStore for S3 {
    async fn put(
        &self,
        key: &ObjectKey,
        mut body: ByteStream,
        max_bytes: u64,
    ) -> Result<PutOutcome, ObjectError> {
        let k = key.as_str();
        let part = part_bytes(max_bytes);
        let mut digest = Digesting::new(key, max_bytes);
        let (first, ended) = fill(&mut body, &mut digest, part).await?;
        let etag = if ended {
            self.put_single(k, first)
                .await
                .map_err(s3_err("putting", k))?
        } else {
            let upload_id = self
                .create_multipart(k)
                .await
                .map_err(s3_err("starting the upload of", k))?;
            match self
                .put_multipart(key, &upload_id, first, &mut body, &mut digest, part)
                .await
            {
                Ok(etag) => etag,
                Err(e) => {
                    self.abort_multipart(k, &upload_id).await;
                    return Err(e);
                }
            }
        };
        debug_assert!(digest.size() <= max_bytes);
        let (size_bytes, sha256) = digest.finish();
        Ok(PutOutcome {
            size_bytes,
            sha256,
            etag,
        })
    }

    async fn get(&self, key: &ObjectKey) -> Result<ObjectRead, ObjectError> {
        let k = key.as_str();
        let url = self
            .bucket
            .get_object(Some(&self.credentials), k)
            .sign(SIGN_FOR);
        let resp = self
            .found(self.http.get(url), "getting", k)
            .await?
            .ok_or_else(|| ObjectError::NotFound(k.to_owned()))?;
        let meta = meta_of(&resp);
        let body = resp.bytes_stream().map_err(std::io::Error::other);
        Ok(ObjectRead {
            meta,
            body: Box::pin(body),
        })
    }

    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, ObjectError> {
        let k = key.as_str();
        let url = self
            .bucket
            .head_object(Some(&self.credentials), k)
            .sign(SIGN_FOR);
        let resp = self
            .found(self.http.head(url), "reading metadata of", k)
            .await?
            .ok_or_else(|| ObjectError::NotFound(k.to_owned()))?;
        Ok(meta_of(&resp))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), ObjectError> {
        let k = key.as_str();
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), k)
            .sign(SIGN_FOR);
        // A missing object is already deleted.
        self.found(self.http.delete(url), "deleting", k).await?;
        Ok(())
    }

    async fn list(&self, prefix: &KeyPrefix) -> Result<Vec<ObjectEntry>, ObjectError> {
        let p = prefix.as_str();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, Some(&self.credentials));
            if !p.is_empty() {
                action.with_prefix(p);
            }
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGN_FOR);
            let page = async {
                let resp = success(self.http.get(url).send().await?).await?;
                let text = resp.text().await?;
                ListObjectsV2::parse_response(&text).map_err(|e| S3Error::Response(e.to_string()))
            }
            .await
            .map_err(s3_err("listing", p))?;
            out.extend(page.contents.into_iter().map(|c| ObjectEntry {
                key: c.key,
                size_bytes: c.size.unwrap_or(0),
            }));
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_8_mib_unless_the_cap_needs_more_and_never_past_64_mib() {
        const MIB: usize = 1024 * 1024;
        assert_eq!(part_bytes(0), 8 * MIB);
        assert_eq!(part_bytes(32 << 30), 8 * MIB);
        assert_eq!(part_bytes(200 << 30), 200 * 1024 * MIB / 10_000 + 1);
        assert_eq!(part_bytes(u64::MAX), 64 * MIB);
    }
}
