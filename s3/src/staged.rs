//! A pack being written to S3. A pack that stays within one part is kept in memory and sent as
//! one conditional PUT at the end; a larger one becomes a multipart upload as soon as its first
//! part fills, each part sent while the next one fills. At most [`PART_BUFFERS`] part buffers
//! exist per S3 repository, from the first byte written into one until it is stored: the part
//! being filled, the tails of full packs waiting to be sealed and the parts being sent. So a
//! backup holds a few parts, not its packs in flight (each 32 MiB by default, five at a time).
//!
//! Why this cannot deadlock, with the one packer per repository that every writing command
//! has (engine/src/packer.rs): a thread waits for a buffer only when it starts a pack (the
//! packer's filling thread, holding its `current` lock: one such waiter at a time), or right
//! after it sent a full part, whose buffer comes back once stored (the filling thread, or an
//! uploader whose trailer runs past a part). Every buffer held is being sent, or belongs to a
//! pack being filled or sealed by a thread that sends before it waits, or to a full pack queued
//! for an uploader that will seal it that way; and the semaphore serves waiters in order.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::MmapMut;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use sbk_store::backend::{Staged, Written};
use sbk_store::{Kind, Result, StoreError};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use crate::{Inner, Requests};

/// Packs up to this size are one PUT; larger ones a multipart upload in parts of this size
/// (S3 wants every part but the last to be at least 5 MiB).
const PART: usize = 8 << 20;

/// Part buffers per S3 repository (a copy between two has twice as many): enough to send a
/// part while the next one fills and a full pack's tail waits to be sealed, few enough that
/// they are a small part of a backup's memory (24 MiB).
pub(crate) const PART_BUFFERS: usize = 3;

/// A part's bytes, with its share of [`PART_BUFFERS`]. An anonymous mapping of [`PART`] bytes,
/// not a `Vec`: a part is filled on a worker thread and freed on a runtime thread once stored,
/// and glibc's arenas kept 25-30 MiB of such freed `Vec`s resident (measured: a backup to
/// SeaweedFS peaked at 136-144 MiB with them, 113-114 MiB with each part unmapped once stored).
/// Pages never written cost nothing, so a small pack holds only what it needs.
struct Part {
    map: MmapMut,
    len: usize,
    /// Given back when the part is dropped: once stored, or failed.
    _permit: OwnedSemaphorePermit,
}

impl Part {
    /// An empty part, once one of the repository's [`PART_BUFFERS`] is free: a writer waits
    /// here until a part is stored, which is the back-pressure.
    fn new(i: &Inner) -> Result<Part> {
        let permit =
            i.rt.block_on(i.parts.clone().acquire_owned())
                .expect("the semaphore is never closed");
        Ok(Part {
            map: MmapMut::map_anon(PART).map_err(|e| StoreError::io("an S3 part buffer", e))?,
            len: 0,
            _permit: permit,
        })
    }

    /// The part as a payload, uncopied: it lives as long as the request holds it.
    fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Part {
    fn as_ref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

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
    /// The bytes not yet sent, from the first byte after the last part sent.
    part: Option<Part>,
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
            part: None,
            len: 0,
            multipart: None,
        }
    }

    fn err(&self, e: object_store::Error) -> StoreError {
        self.inner.err(e, self.kind, &self.name)
    }

    /// Sends the part filled so far as the next one (starting the upload first if needed).
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
        let part = self.part.take().map_or_else(Bytes::new, Part::into_bytes);
        Requests::add(&i.requests.multipart, 1);
        m.parts.push_back(send(&i, m.upload.as_mut(), part));
        Ok(())
    }
}

/// Sends `part` (its bytes as they are, not a copy).
fn send(
    i: &Inner,
    upload: &mut dyn MultipartUpload,
    part: Bytes,
) -> JoinHandle<object_store::Result<()>> {
    i.rt.spawn(upload.put_part(PutPayload::from(part)))
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
            if self.part.as_ref().is_some_and(|p| p.len == PART) {
                self.send_part()?;
            }
            let part = match &mut self.part {
                Some(p) => p,
                None => self.part.insert(Part::new(&self.inner)?),
            };
            let n = (PART - part.len).min(bytes.len());
            part.map[part.len..part.len + n].copy_from_slice(&bytes[..n]);
            part.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let i = self.inner.clone();
        let Some(mut m) = self.multipart.take() else {
            let buf = self.part.take().map_or_else(Bytes::new, Part::into_bytes);
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
        let last = self.part.take().map_or_else(Bytes::new, Part::into_bytes);
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
