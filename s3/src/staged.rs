//! A pack being written to S3: kept in memory, then one conditional PUT, or a multipart upload
//! of parts sent at once.

use std::sync::Arc;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use sbk_store::backend::{Staged, Written};
use sbk_store::{Kind, Result, StoreError};

use crate::{Inner, Requests};

/// Packs up to this size are one PUT; larger ones a multipart upload in parts of this size.
const PART: usize = 16 << 20;

/// A pack being written grows its buffer by this much at a time.
const GROW: usize = 8 << 20;

/// A pack being written: kept in memory, then one conditional PUT, or a multipart upload for
/// large packs (aborted if it fails).
pub(crate) struct S3Staged {
    pub(crate) inner: Arc<Inner>,
    pub(crate) kind: Kind,
    pub(crate) name: String,
    pub(crate) buf: Vec<u8>,
}

impl Staged for S3Staged {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        // Grown 8 MiB at a time, not doubled: a pack sealed just past its nominal size would
        // otherwise hold room for twice that until it is uploaded (and large reallocations move
        // pages rather than copy them).
        if self.buf.capacity() - self.buf.len() < bytes.len() {
            self.buf.reserve_exact(bytes.len().max(GROW));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let i = &self.inner;
        let len = self.buf.len();
        // The pack's buffer becomes the payload as it is; parts are slices of it, not copies.
        let buf = Bytes::from(self.buf);
        if len <= PART {
            return match i.create(self.kind, &self.name, buf)? {
                Written::Created => Ok(()),
                Written::AlreadyThere => Err(StoreError::StorageUnreachable {
                    location: i.at.to_string(),
                    detail: format!("{} {} exists with other bytes", self.kind, self.name),
                }),
            };
        }
        let path = i.path(self.kind, &self.name);
        Requests::add(&i.requests.multipart, 2 + len.div_ceil(PART) as u64);
        let r: std::result::Result<(), object_store::Error> = i.rt.block_on(async {
            let mut upload = i.store.put_multipart(&path).await?;
            // The parts go up at once; the upload completes only when all of them have.
            let parts: Vec<_> = (0..len)
                .step_by(PART)
                .map(|at| upload.put_part(PutPayload::from(buf.slice(at..(at + PART).min(len)))))
                .collect();
            if let Err(e) = futures_util::future::try_join_all(parts).await {
                let _ = upload.abort().await;
                return Err(e);
            }
            match upload.complete().await {
                Ok(_) => Ok(()),
                Err(e) => {
                    let _ = upload.abort().await;
                    Err(e)
                }
            }
        });
        r.map_err(|e| i.err(e, self.kind, &self.name))
    }

    fn len(&self) -> u64 {
        self.buf.len() as u64
    }
}
