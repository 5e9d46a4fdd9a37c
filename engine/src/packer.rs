//! The one packer: backup, copy and prune's repack all store blobs through it.
//!
//! It fills a pack with encoded blobs, rolls to a new one at the repository's pack size, seals
//! full packs (trailer, durable, named) on uploader threads off the critical path or on the
//! caller's thread, and names sealed packs in an index file every [`INDEX_EVERY`] packs and
//! whenever it is flushed. Write ordering (docs/design.md): a pack is durable before an index
//! file names it, and [`Packer::flush`] returns only once every blob added so far is durable
//! and indexed, so that a manifest written after it may refer to any of them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::Scope;

use crossbeam_channel::{bounded, Receiver, Sender};
use sbk_store::{ChunkId, EncodedBlob, IndexId, PackEntry, PackId, PackWriter, Repository};

use crate::error::{EngineError, Result};

/// An index file is written once this many packs are sealed (and at every flush), so that the
/// set of blobs written but not yet indexed stays bounded: 64 packs of 32 MiB.
pub(crate) const INDEX_EVERY: usize = 64;
/// ... or once the sealed packs hold this many blobs, whichever comes first: packs of small
/// chunks (tens of thousands of blobs each) would otherwise keep millions of ids and entries
/// in memory (about 100 bytes each).
pub(crate) const INDEX_EVERY_BLOBS: usize = 1 << 17;

/// A pack with the blobs it holds, as an index file names it.
pub(crate) type IndexedPack = (PackId, Vec<PackEntry>);

/// What the packer has written that the index does not know yet.
#[derive(Default)]
struct Unindexed {
    /// Ids in packs being filled, sealed or uploaded but not yet named by an index file:
    /// nobody need write them again. Bounded by [`INDEX_EVERY`] packs.
    written: HashSet<ChunkId>,
    /// Sealed, durable packs waiting for an index file.
    sealed: Vec<IndexedPack>,
    /// Blobs in them.
    sealed_blobs: usize,
}

/// Fills, seals and indexes packs for one run.
pub(crate) struct Packer<'r> {
    repo: &'r Repository,
    current: Mutex<Option<PackWriter>>,
    unindexed: Mutex<Unindexed>,
    /// Full packs go to the uploaders through this queue; `None` seals them on the caller's
    /// thread (and, once closed, refuses them).
    uploads: Mutex<Option<Sender<PackWriter>>>,
    /// Whether uploaders were started: a closed queue then refuses packs.
    uploading: AtomicBool,
    /// Packs handed to the uploaders and not yet sealed (or failed).
    in_flight: Mutex<usize>,
    sealed_cv: Condvar,
    /// Held while an index file is written: a flush that finds nothing left to index must not
    /// return while another thread is still writing the index file that names its packs.
    indexing: Mutex<()>,
    /// Set once a pack write, seal or index write failed: what this run wrote is then not
    /// known to be durable, so nothing of this run may rely on any of it.
    failed: AtomicBool,
    /// What made an uploader fail, for the first check that notices.
    upload_error: Mutex<Option<EngineError>>,
    /// Index files this packer wrote.
    index_files: Mutex<Vec<IndexId>>,
    /// Whether its index files are left out of the loaded index ([`Packer::replaced`]).
    replaced: bool,
    /// Bytes of the packs sealed (headers and blobs, without trailers).
    packed: AtomicU64,
    /// The packs sealed, in order.
    written: Mutex<Vec<PackId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("no thread panics holding a packer lock")
}

impl<'r> Packer<'r> {
    /// A packer that seals full packs on the caller's thread.
    pub(crate) fn new(repo: &'r Repository) -> Self {
        Packer {
            repo,
            current: Mutex::new(None),
            unindexed: Mutex::default(),
            uploads: Mutex::new(None),
            uploading: AtomicBool::new(false),
            in_flight: Mutex::new(0),
            sealed_cv: Condvar::new(),
            indexing: Mutex::new(()),
            failed: AtomicBool::new(false),
            upload_error: Mutex::new(None),
            index_files: Mutex::default(),
            replaced: false,
            packed: AtomicU64::new(0),
            written: Mutex::default(),
        }
    }

    /// A packer whose index files are replaced before its caller ends (prune's repack: they
    /// are read back and merged into the rewritten index files), so they are not added to this
    /// process's loaded index ([`Repository::write_replacement_index_file`]): adding them folded
    /// the whole cache table anew every 2^17 blobs copied, 5.7 GB each time at 10^8 chunks.
    /// Nothing added to such a packer is looked up in the loaded index afterwards.
    pub(crate) fn replaced(repo: &'r Repository) -> Self {
        Packer {
            replaced: true,
            ..Packer::new(repo)
        }
    }

    /// Seals full packs on `n` uploader threads of `scope` instead, at most `queue` packs
    /// waiting for them: while they seal (an fsync, an upload), the caller goes on filling the
    /// next pack. They end at [`Packer::close`].
    pub(crate) fn start_uploaders<'s>(
        &'s self,
        scope: &'s Scope<'s, '_>,
        n: usize,
        queue: usize,
    ) -> Result<()> {
        let (tx, rx) = bounded::<PackWriter>(queue);
        *lock(&self.uploads) = Some(tx);
        self.uploading.store(true, Ordering::Release);
        for i in 0..n {
            let rx = rx.clone();
            if let Err(e) = std::thread::Builder::new()
                .name(format!("sbk-upload-{i}"))
                .spawn_scoped(scope, move || self.upload(rx))
            {
                // Closing the queue lets the uploaders already started end.
                self.close();
                return Err(EngineError::Thread(e));
            }
        }
        Ok(())
    }

    /// Ends the uploaders once they have sealed what they were handed.
    pub(crate) fn close(&self) {
        lock(&self.uploads).take();
    }

    /// Fails once a write of this packer failed (the first caller to notice gets the error an
    /// uploader ran into, so that its exit code says what happened), or the lock is lost.
    pub(crate) fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            if let Some(e) = lock(&self.upload_error).take() {
                return Err(e);
            }
            return Err(EngineError::EarlierWriteFailed);
        }
        Ok(self.repo.check_lease()?)
    }

    /// True once a write of this packer failed.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// True when this packer has `id` in a pack that no index file names yet (the index does
    /// not know it, but nobody need store it again).
    pub(crate) fn knows(&self, id: &ChunkId) -> bool {
        lock(&self.unindexed).written.contains(id)
    }

    /// Appends blobs to the open pack, rolling to a new pack at the pack size. Blobs this
    /// packer already holds are skipped; returns the bytes written. A failure poisons the
    /// packer ([`Packer::check`]) and abandons the open pack.
    pub(crate) fn add(&self, blobs: &[EncodedBlob]) -> Result<u64> {
        self.check()?;
        let mut current = lock(&self.current);
        let result = self.add_locked(&mut current, blobs);
        if result.is_err() {
            self.fail();
            if let Some(pack) = current.take() {
                pack.abandon();
            }
        }
        result
    }

    fn add_locked(&self, current: &mut Option<PackWriter>, blobs: &[EncodedBlob]) -> Result<u64> {
        let mut written = 0;
        for blob in blobs {
            if !lock(&self.unindexed).written.insert(blob.header.id) {
                continue;
            }
            let pack = match current {
                Some(p) => p,
                None => current.insert(self.repo.new_pack()?),
            };
            let before = pack.len();
            pack.add(blob)?;
            written += pack.len() - before;
            if pack.len() >= self.repo.config().pack_size {
                self.hand_over(current.take().expect("present"))?;
            }
        }
        Ok(written)
    }

    /// Seals a full pack: queued for the uploaders (blocking while the queue is full, which is
    /// the back-pressure), or here.
    fn hand_over(&self, pack: PackWriter) -> Result<()> {
        if !self.uploading.load(Ordering::Acquire) {
            let r = self.seal(pack);
            if r.is_err() {
                self.fail();
            }
            return r;
        }
        *lock(&self.in_flight) += 1;
        let queue = lock(&self.uploads).clone();
        if queue.is_none_or(|tx| tx.send(pack).is_err()) {
            self.upload_done();
            self.fail();
            return Err(EngineError::Unsafe("the pack uploaders stopped".into()));
        }
        Ok(())
    }

    fn upload_done(&self) {
        *lock(&self.in_flight) -= 1;
        self.sealed_cv.notify_all();
    }

    /// An uploader: seals the packs it is handed until the queue closes.
    fn upload(&self, rx: Receiver<PackWriter>) {
        for pack in rx {
            if let Err(e) = self.seal(pack) {
                lock(&self.upload_error).get_or_insert(e);
                self.fail();
            }
            self.upload_done();
        }
    }

    /// Writes a pack's trailer and makes it durable under its name, then writes an index file
    /// once [`INDEX_EVERY`] packs wait for one.
    fn seal(&self, pack: PackWriter) -> Result<()> {
        let len = pack.len();
        let sealed = pack.finish()?;
        self.packed.fetch_add(len, Ordering::Relaxed);
        lock(&self.written).push(sealed.0);
        let full = {
            let mut u = lock(&self.unindexed);
            u.sealed_blobs += sealed.1.len();
            u.sealed.push(sealed);
            u.sealed.len() >= INDEX_EVERY || u.sealed_blobs >= INDEX_EVERY_BLOBS
        };
        if full {
            self.write_index()?;
        }
        Ok(())
    }

    /// Names the sealed packs in an index file, then forgets their blobs (the index knows
    /// them now). A failure poisons the packer before the index lock is released, so that a
    /// flush waiting for it sees the failure.
    fn write_index(&self) -> Result<()> {
        let _indexing = lock(&self.indexing);
        let r = self.write_index_locked();
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn write_index_locked(&self) -> Result<()> {
        let sealed = {
            let mut u = lock(&self.unindexed);
            u.sealed_blobs = 0;
            std::mem::take(&mut u.sealed)
        };
        if sealed.is_empty() {
            return Ok(());
        }
        let ids: Vec<ChunkId> = sealed
            .iter()
            .flat_map(|(_, e)| e.iter().map(|e| e.id))
            .collect();
        let file = if self.replaced {
            self.repo.write_replacement_index_file(sealed)?
        } else {
            self.repo.write_index_file(sealed)?
        };
        lock(&self.index_files).push(file);
        let mut u = lock(&self.unindexed);
        for id in ids {
            u.written.remove(&id);
        }
        Ok(())
    }

    /// Seals the open pack, waits for every pack in flight, and names them all in an index
    /// file: afterwards every blob added so far is durable and indexed, and a manifest may
    /// refer to it.
    pub(crate) fn flush(&self) -> Result<()> {
        self.check()?;
        let current = lock(&self.current).take();
        if let Some(pack) = current {
            self.hand_over(pack)?;
        }
        let mut n = lock(&self.in_flight);
        while *n > 0 {
            n = self
                .sealed_cv
                .wait(n)
                .expect("no thread panics holding a packer lock");
        }
        drop(n);
        self.check()?;
        self.write_index()
    }

    /// The packs this packer sealed.
    pub(crate) fn packs_written(&self) -> Vec<PackId> {
        lock(&self.written).clone()
    }

    /// The index files this packer wrote.
    pub(crate) fn index_files(&self) -> Vec<IndexId> {
        lock(&self.index_files).clone()
    }

    /// Bytes of the packs sealed so far, without their trailers.
    pub(crate) fn packed_bytes(&self) -> u64 {
        self.packed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sbk_store::{BlobKind, EncodedBlob, Repository};

    use super::{Packer, INDEX_EVERY};
    use crate::testkit::{mem_repository, open, random_bytes};

    /// `n` blobs of about a pack each (incompressible), so that every blob rolls a new pack.
    fn big_blobs(repo: &Repository, n: usize) -> Vec<(Vec<u8>, EncodedBlob)> {
        (0..n as u64)
            .map(|i| {
                let raw = random_bytes(i, (1 << 20) + 1);
                let id = repo.blob_id(&raw);
                let blob = repo.encode_blob(id, BlobKind::Data, &raw).unwrap();
                (raw, blob)
            })
            .collect()
    }

    #[test]
    fn an_index_file_names_every_so_many_packs_and_a_flush_names_the_rest() {
        let mem = mem_repository();
        let repo = open(Arc::new(mem.clone())).unwrap();
        let blobs = big_blobs(&repo, INDEX_EVERY + 3);
        let packer = Packer::new(&repo);
        let packs_named = |packer: &Packer<'_>| -> usize {
            packer
                .index_files()
                .iter()
                .map(|f| repo.read_index_file(f).unwrap().packs.len())
                .sum()
        };
        for (_, blob) in &blobs[..INDEX_EVERY + 1] {
            assert!(packer.add(std::slice::from_ref(blob)).unwrap() > 1 << 20);
        }
        // Every blob fills a pack of its own, sealed at once: an index file names the first 64;
        // the 65th waits for the next.
        assert_eq!(packer.index_files().len(), 1);
        assert_eq!(packs_named(&packer), INDEX_EVERY);
        assert!(packer.knows(&blobs[INDEX_EVERY].1.header.id));
        assert!(
            !packer.knows(&blobs[0].1.header.id),
            "indexed: the index knows it now"
        );
        // A blob already added is not stored again.
        assert_eq!(
            packer
                .add(std::slice::from_ref(&blobs[INDEX_EVERY].1))
                .unwrap(),
            0
        );
        for (_, blob) in &blobs[INDEX_EVERY + 1..] {
            packer.add(std::slice::from_ref(blob)).unwrap();
        }
        packer.flush().unwrap();
        assert_eq!(packer.index_files().len(), 2);
        assert_eq!(packs_named(&packer), INDEX_EVERY + 3);
        // A new process finds every blob through the index files alone.
        let fresh = open(Arc::new(mem)).unwrap();
        for (raw, blob) in &blobs {
            assert_eq!(
                &fresh.read_blob(&blob.header.id, BlobKind::Data).unwrap(),
                raw
            );
        }
    }

    #[test]
    fn uploaders_seal_off_the_callers_thread_and_a_flush_waits_for_them() {
        let mem = mem_repository();
        let repo = open(Arc::new(mem.clone())).unwrap();
        let blobs = big_blobs(&repo, 6);
        let packer = Packer::new(&repo);
        std::thread::scope(|s| {
            packer.start_uploaders(s, 2, 1).unwrap();
            for (_, blob) in &blobs {
                packer.add(std::slice::from_ref(blob)).unwrap();
            }
            packer.flush().unwrap();
            packer.close();
        });
        assert_eq!(packer.index_files().len(), 1, "one index file at the flush");
        let fresh = open(Arc::new(mem)).unwrap();
        for (raw, blob) in &blobs {
            assert_eq!(
                &fresh.read_blob(&blob.header.id, BlobKind::Data).unwrap(),
                raw
            );
        }
    }
}
