//! sbk's S3 backend: a repository as objects under `s3://BUCKET/PREFIX` on any S3-compatible
//! object storage (AWS S3, Ceph RGW, MinIO, SeaweedFS), through `object_store`'s S3 client.
//!
//! The engine is synchronous; this backend owns the one small tokio runtime that drives the
//! client (two worker threads), and every [`Backend`] call blocks on it. It is the one place
//! outside the engine (and the NBD server) that owns threads.
//!
//! Names: `PREFIX/config`, `PREFIX/<kind folder>/<name>` (packs are not fanned out into
//! subfolders: object stores need no directory sharding). Writes of immutable objects are
//! conditional creates (`If-None-Match: *`); a lock is replaced only while its ETag is still
//! the one its holder last wrote (`If-Match`), so a lock someone removed never comes back.
//! Packs over 8 MiB are multipart uploads, their parts sent as they fill; they are not
//! conditional: their names are random 128-bit ids, which no other writer picks.
//!
//! Configuration comes from the environment, as the AWS tools read it: `AWS_ENDPOINT_URL` (any
//! S3-compatible server; `http://` is allowed when the endpoint says so), `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (default `us-east-1`); requests
//! are path-style. Errors: a missing object is `ObjectMissing`, credentials or permissions the
//! storage refuses are `StorageDenied`, and a storage that cannot be reached or keeps failing
//! after bounded retries (backoff, timeouts) is `StorageUnreachable`.

mod signed;
mod staged;
mod uploads;
mod version_list;
mod versions;

use staged::S3Staged;
pub use uploads::{fuzz_uploads_listing, Upload};
pub use version_list::fuzz_versions_listing;
pub use versions::rfc3339;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};
use sbk_store::backend::{ObjectInfo, Staged, Written};
use sbk_store::{Backend, Kind, Result, StoreError};

/// Where a repository is on S3: bucket and key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket.
    pub bucket: String,
    /// The key prefix, without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl S3Location {
    /// Whether `s` names an S3 repository (`s3://…`), as opposed to a directory.
    pub fn is_s3(s: &str) -> bool {
        s.starts_with("s3://")
    }

    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(s: &str) -> std::result::Result<S3Location, String> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{s:?} is not an s3://BUCKET/PREFIX location"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{s:?} names no bucket"));
        }
        Ok(S3Location {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// How to reach the storage; [`S3Config::from_env`] reads what the AWS tools read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// The endpoint (`AWS_ENDPOINT_URL`); AWS itself when `None`.
    pub endpoint: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// `AWS_REGION` (`us-east-1` when unset).
    pub region: Option<String>,
}

impl S3Config {
    /// The configuration in the environment.
    pub fn from_env() -> S3Config {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        S3Config {
            endpoint: var("AWS_ENDPOINT_URL"),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
        }
    }
}

/// When set, the backend prints how many requests of each kind it sent when it is dropped (for
/// benches/s3.sh).
pub const STATS_ENV: &str = "SBK_S3_STATS";

/// Requests sent, by kind (retries inside the client not counted).
#[derive(Debug, Default)]
pub struct Requests {
    /// Whole-object GETs.
    pub get: AtomicU64,
    /// Ranged GETs.
    pub get_range: AtomicU64,
    /// HEADs.
    pub head: AtomicU64,
    /// Single PUTs.
    pub put: AtomicU64,
    /// Requests of multipart uploads (create, parts, complete).
    pub multipart: AtomicU64,
    /// DELETEs.
    pub delete: AtomicU64,
    /// LIST pages.
    pub list: AtomicU64,
}

impl Requests {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts as `kind=n` pairs, for a log line.
    pub fn summary(&self) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "get={} get_range={} head={} put={} multipart={} delete={} list={}",
            c(&self.get),
            c(&self.get_range),
            c(&self.head),
            c(&self.put),
            c(&self.multipart),
            c(&self.delete),
            c(&self.list)
        )
    }
}

pub(crate) struct Inner {
    store: AmazonS3,
    rt: tokio::runtime::Runtime,
    at: S3Location,
    /// The endpoint's base URL and the region, for the requests the client lacks (uploads.rs).
    endpoint: String,
    region: String,
    requests: Requests,
    /// Pack part buffers, from their first byte until stored (see staged.rs): what bounds a
    /// backup's memory.
    parts: Arc<tokio::sync::Semaphore>,
    /// The client of the signed requests (signed.rs), made on first use.
    http: OnceLock<object_store::client::HttpClient>,
    /// The storage's clock minus ours, seconds, from the last signed answer's `Date`.
    clock_offset: AtomicI64,
    /// The retention every object of backup data is written under (versions.rs), once the
    /// repository's config says so.
    write_lock: RwLock<Option<sbk_store::ObjectLock>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::env::var_os(STATS_ENV).is_some() {
            eprintln!("sbk: s3 requests: {}", self.requests.summary());
        }
    }
}

/// A repository on S3-compatible storage.
pub struct S3Backend {
    inner: Arc<Inner>,
}

impl S3Backend {
    /// The unfinished multipart uploads of this repository's packs (what a mover killed in
    /// the middle of an upload leaves; prune aborts the old ones).
    pub fn unfinished_uploads(&self) -> Result<Vec<Upload>> {
        let i = &self.inner;
        i.list_uploads(&format!("{}/", i.dir(Kind::Pack)))
    }

    /// Connects to `at` with the configuration in the environment (nothing is requested yet).
    pub fn new(at: S3Location) -> Result<S3Backend> {
        S3Backend::with_config(at, &S3Config::from_env())
    }

    /// Connects to `at` with `config` (nothing is requested yet).
    pub fn with_config(at: S3Location, config: &S3Config) -> Result<S3Backend> {
        // rustls has no crypto provider compiled in but ring: make it the process default
        // (once; a second install is refused, which is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&at.bucket)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 5,
                retry_timeout: Duration::from_secs(60),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some(k) = &config.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &config.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        if let Some(t) = &config.session_token {
            b = b.with_token(t);
        }
        let region = config.region.clone().unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(&region);
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let store = b.build().map_err(|e| StoreError::StorageDenied {
            location: at.to_string(),
            detail: format!("the S3 configuration is unusable: {e}"),
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sbk-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("the S3 client's runtime", e))?;
        Ok(S3Backend {
            inner: Arc::new(Inner {
                store,
                rt,
                at,
                endpoint,
                region,
                requests: Requests::default(),
                parts: Arc::new(tokio::sync::Semaphore::new(staged::PART_BUFFERS)),
                http: OnceLock::new(),
                clock_offset: AtomicI64::new(0),
                write_lock: RwLock::new(None),
            }),
        })
    }
}

impl Inner {
    fn path(&self, kind: Kind, name: &str) -> Path {
        let p = &self.at.prefix;
        let key = match (kind, p.is_empty()) {
            (Kind::Config, true) => "config".to_owned(),
            (Kind::Config, false) => format!("{p}/config"),
            (_, true) => format!("{}/{name}", kind.dir()),
            (_, false) => format!("{p}/{}/{name}", kind.dir()),
        };
        Path::from(key)
    }

    fn dir(&self, kind: Kind) -> Path {
        let p = &self.at.prefix;
        Path::from(if p.is_empty() {
            kind.dir().to_owned()
        } else {
            format!("{p}/{}", kind.dir())
        })
    }

    /// Maps a client error on object `name` of `kind` to the store's.
    fn err(&self, e: object_store::Error, kind: Kind, name: &str) -> StoreError {
        let location = self.at.to_string();
        // A missing bucket answers 404 as a missing key does; only the error code in the body
        // tells them apart (matched as the element, so that no object name or prefix passes
        // for it). It is no repository (exit 10), never a missing object or a failure.
        if e.to_string().contains("<Code>NoSuchBucket</Code>") {
            return StoreError::NoBucket {
                bucket: self.at.bucket.clone(),
                location,
            };
        }
        match e {
            object_store::Error::NotFound { .. } => StoreError::ObjectMissing {
                kind,
                name: name.to_owned(),
            },
            e => {
                let detail = e.to_string();
                // The status as the client words it ("... status code: 403 Forbidden"), or the
                // storage's error code: a bare "403" could be part of an object name or a time.
                let denied = [
                    "403 Forbidden",
                    "401 Unauthorized",
                    "AccessDenied",
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "Unauthenticated",
                    "PermissionDenied",
                ];
                if matches!(
                    e,
                    object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                ) || denied.iter().any(|d| detail.contains(d))
                {
                    StoreError::StorageDenied { location, detail }
                } else {
                    StoreError::StorageUnreachable { location, detail }
                }
            }
        }
    }

    fn put(
        &self,
        kind: Kind,
        name: &str,
        bytes: Bytes,
        mode: PutMode,
    ) -> std::result::Result<Option<String>, object_store::Error> {
        let path = self.path(kind, name);
        Requests::add(&self.requests.put, 1);
        let payload = PutPayload::from(bytes);
        let done = self.rt.block_on(self.store.put_opts(
            &path,
            payload,
            PutOptions {
                mode,
                ..Default::default()
            },
        ))?;
        // The version written, on a bucket that keeps versions: retention goes on exactly it.
        Ok(done.version)
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        let path = self.path(kind, name);
        Requests::add(&self.requests.get, 1);
        self.rt
            .block_on(async {
                let r = self.store.get(&path).await?;
                r.bytes().await
            })
            .map(|b| b.to_vec())
            .map_err(|e| self.err(e, kind, name))
    }

    /// A conditional create that a retry may have answered with "exists" although the first
    /// attempt created it: the object is ours when it holds exactly our bytes.
    fn create(&self, kind: Kind, name: &str, bytes: Bytes) -> Result<Written> {
        // A clone of `Bytes` shares the buffer: the payload is not copied to keep it.
        match self.put(kind, name, bytes.clone(), PutMode::Create) {
            Ok(version) => {
                self.retain_written(kind, name, version.as_deref())?;
                Ok(Written::Created)
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => match self.read(kind, name) {
                Ok(there) if there[..] == bytes[..] => {
                    self.retain_written(kind, name, None)?;
                    Ok(Written::Created)
                }
                Ok(_) => Ok(Written::AlreadyThere),
                Err(StoreError::ObjectMissing { .. }) => Ok(Written::AlreadyThere),
                Err(e) => Err(e),
            },
            Err(e) => Err(self.err(e, kind, name)),
        }
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.inner.at.to_string()
    }

    fn create(&self) -> Result<()> {
        let i = &self.inner;
        let prefix = (!i.at.prefix.is_empty()).then(|| Path::from(i.at.prefix.as_str()));
        Requests::add(&i.requests.list, 1);
        let first =
            i.rt.block_on(async { i.store.list(prefix.as_ref()).next().await });
        match first {
            None => Ok(()),
            Some(Ok(meta)) => Err(StoreError::InitRefused {
                path: self.location().into(),
                reason: format!("the prefix is not empty (it holds {})", meta.location),
            }),
            Some(Err(e)) => Err(i.err(e, Kind::Config, "config")),
        }
    }

    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let i = &self.inner;
        if kind == Kind::Config {
            let head = {
                Requests::add(&i.requests.head, 1);
                i.rt.block_on(i.store.head(&i.path(kind, "config")))
            };
            return match head.map_err(|e| i.err(e, kind, "config")) {
                Ok(m) => Ok(vec![ObjectInfo {
                    name: "config".into(),
                    size: m.size,
                    modified: m.last_modified.timestamp(),
                }]),
                Err(StoreError::ObjectMissing { .. }) => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        let dir = i.dir(kind);
        let listed: Vec<_> = i.rt.block_on(i.store.list(Some(&dir)).collect());
        // A page holds up to 1000 keys.
        Requests::add(&i.requests.list, 1 + listed.len() as u64 / 1000);
        let mut out = Vec::new();
        for m in listed {
            let m = m.map_err(|e| i.err(e, kind, ""))?;
            let Some(name) = m.location.prefix_match(&dir).and_then(|mut parts| {
                let first = parts.next()?;
                // Only direct children: anything deeper is not ours.
                parts.next().is_none().then(|| first.as_ref().to_owned())
            }) else {
                continue;
            };
            out.push(ObjectInfo {
                name,
                size: m.size,
                modified: m.last_modified.timestamp(),
            });
        }
        out.sort();
        Ok(out)
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.inner.read(kind, name)
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let i = &self.inner;
        if buf.is_empty() {
            return Ok(());
        }
        let path = i.path(kind, name);
        let end = offset + buf.len() as u64;
        Requests::add(&i.requests.get_range, 1);
        let got = i.rt.block_on(i.store.get_range(&path, offset..end));
        let short = |size| StoreError::ShortObject {
            kind,
            name: name.to_owned(),
            needed: end,
            size,
        };
        match got {
            Ok(b) if b.len() == buf.len() => {
                buf.copy_from_slice(&b);
                Ok(())
            }
            Ok(b) => Err(short(offset + b.len() as u64)),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::ObjectMissing {
                kind,
                name: name.to_owned(),
            }),
            Err(e) => {
                // A range past the end is refused by the server: say how long the object is.
                match self.size(kind, name) {
                    Ok(size) if size < end => Err(short(size)),
                    _ => Err(i.err(e, kind, name)),
                }
            }
        }
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64> {
        let i = &self.inner;
        let path = i.path(kind, name);
        {
            Requests::add(&i.requests.head, 1);
            i.rt.block_on(i.store.head(&path))
        }
        .map(|m| m.size)
        .map_err(|e| i.err(e, kind, name))
    }

    fn write_once(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<Written> {
        self.inner.create(kind, name, Bytes::copy_from_slice(bytes))
    }

    fn stage(&self, kind: Kind, name: &str) -> Result<Box<dyn Staged>> {
        Ok(Box::new(S3Staged::new(self.inner.clone(), kind, name)))
    }

    fn replace(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<()> {
        let i = &self.inner;
        let path = i.path(kind, name);
        let meta = {
            Requests::add(&i.requests.head, 1);
            i.rt.block_on(i.store.head(&path))
        }
        .map_err(|e| i.err(e, kind, name))?;
        let old = meta.version.clone();
        let mode = PutMode::Update(UpdateVersion {
            e_tag: meta.e_tag,
            version: meta.version,
        });
        match i.put(kind, name, Bytes::copy_from_slice(bytes), mode) {
            Ok(version) => {
                i.retain_written(kind, name, version.as_deref())?;
                // On a bucket that keeps versions, the replaced version would stay for ever:
                // a lock refreshed every minute would leave a version a minute. Best effort: a
                // bucket whose default retention holds it makes it litter that prune removes
                // later, never a failed refresh.
                if let Some(old) = old.filter(|_| !versions::retained(kind)) {
                    let _ = i.drop_version(kind, name, &old);
                }
                Ok(())
            }
            // Removed (or replaced by someone else) since: never bring it back.
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => Err(StoreError::ObjectMissing {
                kind,
                name: name.to_owned(),
            }),
            Err(e) => Err(i.err(e, kind, name)),
        }
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        let i = &self.inner;
        let path = i.path(kind, name);
        // S3 answers a delete of a missing key with success, so ask first: callers rely on
        // hearing that an object was already gone.
        {
            Requests::add(&i.requests.head, 1);
            i.rt.block_on(i.store.head(&path))
        }
        .map_err(|e| i.err(e, kind, name))?;
        {
            Requests::add(&i.requests.delete, 1);
            i.rt.block_on(i.store.delete(&path))
        }
        .map_err(|e| i.err(e, kind, name))?;
        // On a bucket that keeps versions, the delete only hid the object behind a marker.
        // Locks and pins go for good (their versions carry no retention), so that nothing of
        // a finished command stays behind.
        // Best effort, as the marker already took it out of the repository: under a bucket's
        // default retention the versions stay until prune can remove them.
        if i.versioned() && !versions::retained(kind) {
            for v in i.versions_of(kind, name).unwrap_or_default() {
                let _ = i.drop_version(kind, name, &v);
            }
        }
        Ok(())
    }

    fn reads_are_requests(&self) -> bool {
        true
    }

    fn remove_leftovers(&self, before: i64) -> Result<u64> {
        // Objects appear whole or not at all: nothing half-written is ever listed. What a
        // killed mover leaves is an unfinished multipart upload of a pack, which costs money
        // until it is aborted; one started before `before` is nobody's any more.
        let i = &self.inner;
        for upload in i.list_uploads(&format!("{}/", i.dir(Kind::Pack)))? {
            if upload.initiated < before {
                i.abort_upload(&upload)?;
            }
        }
        // The parts' sizes are not in the listing (a request per upload would tell): freed
        // bytes go uncounted.
        Ok(0)
    }

    fn versions(&self) -> Option<&dyn sbk_store::Versions> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let l = S3Location::parse("s3://b/some/prefix/").unwrap();
        assert_eq!(l.bucket, "b");
        assert_eq!(l.prefix, "some/prefix");
        assert_eq!(l.to_string(), "s3://b/some/prefix");
        let l = S3Location::parse("s3://bucket").unwrap();
        assert_eq!(l.prefix, "");
        assert!(S3Location::parse("s3:///x").is_err());
        assert!(S3Location::parse("/srv/repo").is_err());
    }
}
