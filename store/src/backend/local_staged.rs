//! A pack being staged in a local repository: written beside its name, made durable, named.

use std::fs::{self, File};
use std::path::PathBuf;

use super::direct::DirectWriter;
use super::local::{advise, fsync_dir};
use super::Staged;
use crate::error::{Result, StoreError};

/// A pack being written to a temporary file beside its final name, around the page cache.
pub(super) struct LocalStaged {
    out: Option<DirectWriter>,
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    len: u64,
}

impl LocalStaged {
    /// A pack written by `out` to `tmp` in `dir`, named `path` once sealed.
    pub(super) fn new(out: DirectWriter, tmp: PathBuf, path: PathBuf, dir: PathBuf) -> Self {
        LocalStaged {
            out: Some(out),
            tmp,
            path,
            dir,
            len: 0,
        }
    }
}

impl Staged for LocalStaged {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("present until finish");
        out.write_all(bytes)
            .map_err(|e| StoreError::io(&self.tmp, e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let out = self.out.take().expect("present until finish");
        let named = out
            .finish()
            // The data must be on disk before the name says the object is complete (O_DIRECT
            // writes may still sit in the device's cache)…
            .and_then(|file| {
                file.sync_all()?;
                drop_cached(&file);
                Ok(())
            })
            .and_then(|()| fs::rename(&self.tmp, &self.path));
        if let Err(e) = named {
            // A seal that failed (a full disk) leaves nothing behind.
            let _ = fs::remove_file(&self.tmp);
            return Err(StoreError::io(&self.tmp, e));
        }
        // …and the rename itself must be durable before an index file may name the object.
        fsync_dir(&self.dir)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for LocalStaged {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Not finished: abandoned, so the temporary file goes.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Asks the kernel to drop a file's pages from the page cache (advice only). Packs are written
/// around the page cache where the filesystem allows (`direct.rs`); where it does not, a synced
/// pack's pages are clean and nobody reads it back soon; left cached, the packs a backup
/// writes push out what it does read at random, the index table's Bloom filter: under a 256
/// MiB limit, a 2 GiB backup into a repository of 10^8 chunks then waited on a disk read for
/// most of its lookups.
fn drop_cached(file: &File) {
    advise(file, libc::POSIX_FADV_DONTNEED);
}
