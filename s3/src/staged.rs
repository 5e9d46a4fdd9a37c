//! A pack being written to S3. A pack that stays within one part is kept in memory and sent as
//! one conditional PUT at the end; a larger one becomes a multipart upload as soon as its first
//! part fills, each part sent while the next one fills. At most [`PARTS_IN_FLIGHT`] parts are
//! being sent per S3 repository (a writer with a full part waits for one to be stored), so a
//! backup holds a few parts, not its packs in flight (each 32 MiB by default, five at a time).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use sbk_store::backend::{Staged, Written};
use sbk_store::{Kind, Result, StoreError};
use tokio::task::JoinHandle;

use crate::{Inner, Requests};

/// Packs up to this size are one PUT; larger ones a multipart upload in parts of this size
/// (S3 wants every part but the last to be at least 5 MiB).
const PART: usize = 8 << 20;

/// A part being filled grows its buffer by this much at a time (up to [`PART`]): a small pack
/// holds no more than it needs.
const GROW: usize = 2 << 20;

/// Parts being sent at once per S3 repository (a copy between two has twice as many): enough to keep a link busy while the next ones
/// fill, few enough that they are a small part of a backup's memory.
pub(crate) const PARTS_IN_FLIGHT: usize = 4;

/// A multipart upload under way: the parts sent and not yet known to be stored.
struct Multipart {
    upload: Box<dyn MultipartUpload>,
    parts: VecDeque<JoinHandle<object_store::Result<()>>>,
}

/// A pack being written: the part being filled, and the multipart upload once there is one.
pub(crate) struct S3Staged {
    inner: Arc<Inner>,
    kind: Kind,
    name: String,
    /// The bytes not yet sent (at most one part).
    buf: Vec<u8>,
    /// Bytes written so far, sent or not.
    len: u64,
    multipart: Option<Multipart>,
}

impl S3Staged {
    /// An empty pack `name`.
    pub(crate) fn new(inner: Arc<Inner>, kind: Kind, name: &str) -> S3Staged {
        S3Staged {
            inner,
            kind,
            name: name.to_owned(),
            buf: Vec::new(),
            len: 0,
            multipart: None,
        }
    }

    fn err(&self, e: object_store::Error) -> StoreError {
        self.inner.err(e, self.kind, &self.name)
    }

    /// Sends the buffer as the next part (starting the upload first if needed), once fewer
    /// than [`PARTS_IN_FLIGHT`] parts are being sent.
    fn send_part(&mut self) -> Result<()> {
        let i = self.inner.clone();
        if self.multipart.is_none() {
            let path = i.path(self.kind, &self.name);
            Requests::add(&i.requests.multipart, 1);
            let upload =
                i.rt.block_on(i.store.put_multipart(&path))
                    .map_err(|e| self.err(e))?;
            self.multipart = Some(Multipart {
                upload,
                parts: VecDeque::new(),
            });
        }
        let m = self.multipart.as_mut().expect("started above");
        // Parts already stored need not be waited for at the end.
        while m.parts.front().is_some_and(|p| p.is_finished()) {
            let done = i.rt.block_on(m.parts.pop_front().expect("a finished part"));
            joined(done).map_err(|e| i.err(e, self.kind, &self.name))?;
        }
        let part = Bytes::from(std::mem::take(&mut self.buf));
        Requests::add(&i.requests.multipart, 1);
        m.parts.push_back(send(&i, m.upload.as_mut(), part));
        Ok(())
    }
}

/// Sends `part` (the buffer as it is, not a copy) once a permit says fewer than
/// [`PARTS_IN_FLIGHT`] parts are being sent; the permit goes when the part is stored or fails.
fn send(
    i: &Inner,
    upload: &mut dyn MultipartUpload,
    part: Bytes,
) -> JoinHandle<object_store::Result<()>> {
    let permit =
        i.rt.block_on(i.parts.clone().acquire_owned())
            .expect("the semaphore is never closed");
    let sending = upload.put_part(PutPayload::from(part));
    i.rt.spawn(async move {
        let r = sending.await;
        drop(permit);
        r
    })
}

/// A part's outcome, with a panicked or cancelled task as an error of the upload.
fn joined(
    r: std::result::Result<object_store::Result<()>, tokio::task::JoinError>,
) -> object_store::Result<()> {
    r.unwrap_or_else(|e| {
        Err(object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })
    })
}

impl Staged for S3Staged {
    fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            // A full part is sent only once more bytes come: a pack of exactly one part stays
            // one conditional PUT.
            if self.buf.len() == PART {
                self.send_part()?;
            }
            let n = (PART - self.buf.len()).min(bytes.len());
            if self.buf.capacity() - self.buf.len() < n {
                self.buf
                    .reserve_exact(n.max(GROW).min(PART - self.buf.len()));
            }
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let i = self.inner.clone();
        let Some(mut m) = self.multipart.take() else {
            let buf = Bytes::from(std::mem::take(&mut self.buf));
            return match i.create(self.kind, &self.name, buf)? {
                Written::Created => Ok(()),
                Written::AlreadyThere => Err(StoreError::StorageUnreachable {
                    location: i.at.to_string(),
                    detail: format!("{} {} exists with other bytes", self.kind, self.name),
                }),
            };
        };
        // The last part (never empty: it holds at least the trailer), then every part stored,
        // then the upload completed: only then is the pack visible under its name.
        let last = Bytes::from(std::mem::take(&mut self.buf));
        Requests::add(&i.requests.multipart, 2);
        m.parts.push_back(send(&i, m.upload.as_mut(), last));
        let r = i.rt.block_on(async {
            let mut result = Ok(());
            for part in m.parts.drain(..) {
                let done = joined(part.await);
                if result.is_ok() {
                    result = done;
                }
            }
            match result {
                Ok(()) => m.upload.complete().await.map(|done| done.version),
                Err(e) => Err(e),
            }
        });
        match r {
            Ok(version) => i.retain_written(self.kind, &self.name, version.as_deref()),
            Err(e) => {
                // Nothing of it must stay billed and invisible: abort, and say why it failed.
                let _ = i.rt.block_on(m.upload.abort());
                Err(self.err(e))
            }
        }
    }

    fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for S3Staged {
    /// A pack abandoned mid-way (a failed backup) aborts its multipart upload, which would
    /// otherwise stay, invisible and billed, until prune finds it.
    fn drop(&mut self) {
        if let Some(mut m) = self.multipart.take() {
            for part in m.parts.drain(..) {
                part.abort();
            }
            let _ = self.inner.rt.block_on(m.upload.abort());
        }
    }
}
