//! Object versions and retention (S3 Object Lock), for repositories that a stolen mover must
//! not be able to destroy: `object_store` has no calls for them, so these are signed requests
//! of our own (signed.rs). A bucket with Object Lock keeps every version of every object; a
//! delete only adds a delete marker, and a version under retention cannot be deleted by id
//! before its date, by anyone (COMPLIANCE) or without a bypass permission (GOVERNANCE).

use std::sync::atomic::Ordering;

use http::Method;
use sbk_store::backend::{ObjectVersion, Versions};
use sbk_store::{Kind, LockMode, ObjectLock, Result, StoreError};

use crate::signed::{elements, encode, parse_time};
use crate::version_list::{in_order, parse_versions};
use crate::{Inner, Requests, S3Backend};

/// Whether objects of `kind` carry retention: everything that holds backup data or describes
/// it. Locks and pins do not: they are replaced and removed by their holder, and one the
/// storage kept past its holder's life would be litter no one could remove.
pub(crate) fn retained(kind: Kind) -> bool {
    !matches!(kind, Kind::Lock | Kind::Pin)
}

impl Inner {
    /// The key of an object, as a string (for signed requests).
    fn key(&self, kind: Kind, name: &str) -> String {
        self.path(kind, name).to_string()
    }

    /// `?versionId=…` (or nothing) for the query of a request on one version.
    fn version_query(base: &str, version_id: Option<&str>) -> String {
        match version_id {
            Some(v) if base.is_empty() => format!("versionId={}", encode(v)),
            Some(v) => format!("{base}&versionId={}", encode(v)),
            None => base.to_owned(),
        }
    }

    /// Puts retention on a version just written, when the repository writes under retention
    /// and the kind is one that carries it.
    pub(crate) fn retain_written(
        &self,
        kind: Kind,
        name: &str,
        version_id: Option<&str>,
    ) -> Result<()> {
        let lock = *self.write_lock.read().unwrap_or_else(|e| e.into_inner());
        match lock {
            Some(lock) if retained(kind) => {
                // The later clock: a snapshot is dated by its host's, and the objects it
                // writes must be retained at least as long as it is protected.
                let until = lock.until(self.storage_now().max(sbk_store::unix_now()));
                self.put_retention(kind, name, version_id, lock.mode, until)
            }
            _ => Ok(()),
        }
    }

    /// `PutObjectRetention`; a refusal because the version already has a later date is
    /// success (retention never shortens, and a later date covers this one).
    fn put_retention(
        &self,
        kind: Kind,
        name: &str,
        version_id: Option<&str>,
        mode: LockMode,
        until: i64,
    ) -> Result<()> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            mode.s3_name(),
            rfc3339(until)
        )
        .into_bytes();
        // S3 requires an integrity header on every request that sets retention.
        let md5 = {
            use md5::Digest;
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                md5::Md5::digest(&body),
            )
        };
        let what = format!("setting the retention of {kind} {name}");
        Requests::add(&self.requests.put, 1);
        let reply = self.signed(
            Method::PUT,
            &self.url(
                &self.key(kind, name),
                &Self::version_query("retention=", version_id),
            ),
            &[
                ("content-md5", md5),
                ("content-type", "application/xml".into()),
            ],
            body,
            &what,
        )?;
        match reply.status {
            200..=299 => Ok(()),
            403 => match self.get_retention(kind, name, version_id)? {
                Some(has) if has >= until => Ok(()),
                _ => Err(self.refused(&reply, &what)),
            },
            // 405: the current version is a delete marker (a prune removed it meanwhile).
            404 if reply.code() == "NoSuchKey" || reply.code() == "NoSuchVersion" => {
                Err(StoreError::ObjectMissing {
                    kind,
                    name: name.to_owned(),
                })
            }
            405 => Err(StoreError::ObjectMissing {
                kind,
                name: name.to_owned(),
            }),
            _ => Err(self.refused(&reply, &what)),
        }
    }

    /// `GetObjectRetention`: the date, or `None` for a version without retention.
    fn get_retention(
        &self,
        kind: Kind,
        name: &str,
        version_id: Option<&str>,
    ) -> Result<Option<i64>> {
        let what = format!("reading the retention of {kind} {name}");
        Requests::add(&self.requests.get, 1);
        let reply = self.signed(
            Method::GET,
            &self.url(
                &self.key(kind, name),
                &Self::version_query("retention=", version_id),
            ),
            &[],
            Vec::new(),
            &what,
        )?;
        match (reply.status, reply.code()) {
            (200, _) => {
                let date = elements(&reply.body, "RetainUntilDate");
                let date = date.first().ok_or_else(|| {
                    self.unreachable(format!("{what}: no date in {}", reply.body))
                })?;
                parse_time(date)
                    .map(Some)
                    .map_err(|e| self.unreachable(format!("{what}: {e}")))
            }
            // Storage words "this version has none" in several ways.
            (
                404 | 400,
                "NoSuchObjectLockConfiguration"
                | "ObjectLockConfigurationNotFoundError"
                | "InvalidRequest",
            ) => Ok(None),
            (404, "NoSuchKey" | "NoSuchVersion") => Err(StoreError::ObjectMissing {
                kind,
                name: name.to_owned(),
            }),
            _ => Err(self.refused(&reply, &what)),
        }
    }

    /// Whether this repository writes under retention (and so the bucket keeps versions).
    pub(crate) fn versioned(&self) -> bool {
        self.write_lock
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Deletes one version (or delete marker) by id; one already gone is success, a refusal
    /// `StorageDenied` (which `delete_version` tells apart from retention).
    pub(crate) fn drop_version(&self, kind: Kind, name: &str, version_id: &str) -> Result<()> {
        let what = format!("deleting version {version_id} of {kind} {name}");
        Requests::add(&self.requests.delete, 1);
        let reply = self.signed(
            Method::DELETE,
            &self.url(
                &self.key(kind, name),
                &Self::version_query("", Some(version_id)),
            ),
            &[],
            Vec::new(),
            &what,
        )?;
        match reply.status {
            200..=299 | 404 => Ok(()),
            _ => Err(self.refused(&reply, &what)),
        }
    }

    /// The version ids (delete markers included) of exactly one object.
    pub(crate) fn versions_of(&self, kind: Kind, name: &str) -> Result<Vec<String>> {
        let key = self.key(kind, name);
        let what = format!("listing the versions of {kind} {name}");
        Requests::add(&self.requests.list, 1);
        let reply = self.signed(
            Method::GET,
            &self.url("", &format!("prefix={}&versions=", encode(&key))),
            &[],
            Vec::new(),
            &what,
        )?;
        if reply.status != 200 {
            return Err(self.refused(&reply, &what));
        }
        let page =
            parse_versions(&reply.body).map_err(|e| self.unreachable(format!("{what}: {e}")))?;
        Ok(page
            .versions
            .into_iter()
            .filter(|v| v.name == key)
            .map(|v| v.version_id)
            .collect())
    }

    /// The storage's time now, as last heard.
    pub(crate) fn storage_now(&self) -> i64 {
        sbk_store::unix_now() + self.clock_offset.load(Ordering::Relaxed)
    }
}

impl Versions for S3Backend {
    fn keeps_versions(&self) -> Result<bool> {
        let i = &self.inner;
        let what = "reading the bucket's versioning";
        let reply = i.signed(
            Method::GET,
            &i.url("", "versioning="),
            &[],
            Vec::new(),
            what,
        )?;
        match reply.status {
            // Suspended versioning keeps the versions it made, but no new ones: not a history
            // to read a past from.
            200 => Ok(elements(&reply.body, "Status").first() == Some(&"Enabled")),
            _ => Err(i.refused(&reply, what)),
        }
    }

    fn object_lock_enabled(&self) -> Result<bool> {
        let i = &self.inner;
        let what = "reading the bucket's Object Lock configuration";
        let reply = i.signed(
            Method::GET,
            &i.url("", "object-lock="),
            &[],
            Vec::new(),
            what,
        )?;
        match (reply.status, reply.code()) {
            (200, _) => Ok(elements(&reply.body, "ObjectLockEnabled").first() == Some(&"Enabled")),
            (
                404 | 400,
                "ObjectLockConfigurationNotFoundError" | "NoSuchObjectLockConfiguration",
            ) => Ok(false),
            _ => Err(i.refused(&reply, what)),
        }
    }

    fn retain_writes(&self, lock: ObjectLock) {
        *self
            .inner
            .write_lock
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(lock);
    }

    fn versions(&self, kind: Kind) -> Result<Vec<ObjectVersion>> {
        let i = &self.inner;
        let prefix = if kind == Kind::Config {
            i.key(Kind::Config, "config")
        } else {
            format!("{}/", i.dir(kind))
        };
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        let what = format!("listing the versions of the {kind} objects");
        // 100 million versions at 1000 a page: a bound, so that a storage handing back pages
        // in a cycle cannot keep us listing for ever.
        for _ in 0..100_000 {
            let mut query = format!("prefix={}&versions=", encode(&prefix));
            if let Some((key, id)) = &markers {
                query += &format!(
                    "&key-marker={}&version-id-marker={}",
                    encode(key),
                    encode(id)
                );
            }
            Requests::add(&i.requests.list, 1);
            let reply = i.signed(Method::GET, &i.url("", &query), &[], Vec::new(), &what)?;
            if reply.status != 200 {
                return Err(i.refused(&reply, &what));
            }
            let page =
                parse_versions(&reply.body).map_err(|e| i.unreachable(format!("{what}: {e}")))?;
            for v in page.versions {
                // Only the kind's direct children (and the config itself) are ours.
                let name = match v.name.strip_prefix(&prefix) {
                    _ if kind == Kind::Config && v.name == prefix => "config".to_owned(),
                    Some(n) if kind != Kind::Config && !n.is_empty() && !n.contains('/') => {
                        n.to_owned()
                    }
                    _ => continue,
                };
                out.push(ObjectVersion { name, ..v });
            }
            match page.next {
                Some(next) if markers.as_ref() == Some(&next) => {
                    return Err(i.unreachable(format!(
                        "{what}: the storage repeats the page after {next:?}"
                    )))
                }
                Some(next) => markers = Some(next),
                None => return Ok(in_order(out)),
            }
        }
        Err(i.unreachable(format!("{what}: more than 100000 pages")))
    }

    fn read_version_at(
        &self,
        kind: Kind,
        name: &str,
        version_id: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let got = self.get_version(kind, name, version_id, Some((offset, end)))?;
        if got.len() != buf.len() {
            return Err(StoreError::ShortObject {
                kind,
                name: name.to_owned(),
                needed: end,
                size: offset + got.len() as u64,
            });
        }
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn read_version(&self, kind: Kind, name: &str, version_id: &str) -> Result<Vec<u8>> {
        self.get_version(kind, name, version_id, None)
    }

    fn delete_version(&self, kind: Kind, name: &str, version_id: &str) -> Result<()> {
        let i = &self.inner;
        match i.drop_version(kind, name, version_id) {
            // AccessDenied is both "under retention" and "no permission": the retention
            // date tells them apart.
            Err(StoreError::StorageDenied { location, detail }) => {
                match i.get_retention(kind, name, Some(version_id)) {
                    Ok(Some(until)) if until > i.storage_now() => Err(StoreError::Retained {
                        kind,
                        name: name.to_owned(),
                        until: rfc3339(until),
                    }),
                    _ => Err(StoreError::StorageDenied { location, detail }),
                }
            }
            r => r,
        }
    }

    fn retention(&self, kind: Kind, name: &str, version_id: Option<&str>) -> Result<Option<i64>> {
        self.inner.get_retention(kind, name, version_id)
    }

    fn extend_retention(
        &self,
        kind: Kind,
        name: &str,
        version_id: Option<&str>,
        until: i64,
    ) -> Result<()> {
        let i = &self.inner;
        let lock = *i.write_lock.read().unwrap_or_else(|e| e.into_inner());
        let Some(lock) = lock else {
            return Err(StoreError::NoVersions {
                location: i.at.to_string(),
                what: format!("extending the retention of {kind} {name}"),
                why: "the repository is not under Object Lock".into(),
            });
        };
        i.put_retention(kind, name, version_id, lock.mode, until)
    }

    fn storage_now(&self) -> i64 {
        self.inner.storage_now()
    }
}

impl S3Backend {
    /// GETs one version of an object, or a byte range `start..end` of it.
    fn get_version(
        &self,
        kind: Kind,
        name: &str,
        version_id: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Vec<u8>> {
        let i = &self.inner;
        let what = format!("reading version {version_id} of {kind} {name}");
        let headers: Vec<(&str, String)> = match range {
            Some((start, end)) => {
                Requests::add(&i.requests.get_range, 1);
                vec![("range", format!("bytes={start}-{}", end - 1))]
            }
            None => {
                Requests::add(&i.requests.get, 1);
                Vec::new()
            }
        };
        let reply = i.signed_bytes(
            Method::GET,
            &i.url(
                &i.key(kind, name),
                &Inner::version_query("", Some(version_id)),
            ),
            &headers,
            Vec::new(),
            &what,
        )?;
        match reply.0 {
            200 | 206 => Ok(reply.1),
            404 if !String::from_utf8_lossy(&reply.1).contains("<Code>NoSuchBucket</Code>") => {
                Err(StoreError::ObjectMissing {
                    kind,
                    name: name.to_owned(),
                })
            }
            416 => Err(StoreError::ShortObject {
                kind,
                name: name.to_owned(),
                needed: range.map_or(0, |r| r.1),
                size: 0,
            }),
            status => {
                let reply = crate::signed::Reply {
                    status,
                    body: String::from_utf8_lossy(&reply.1).into_owned(),
                };
                Err(i.refused(&reply, &what))
            }
        }
    }
}

/// Seconds since the Unix epoch as RFC 3339 in UTC (`2026-12-07T00:12:39Z`).
pub fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_dates_print_as_s3_reads_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(parse_time("2026-12-07T00:12:39Z").unwrap()),
            "2026-12-07T00:12:39Z"
        );
    }
}
