//! The state every source of one run shares: the packer, the workers' queue, the segment
//! buffers, and the turns of sources read at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crossbeam_channel::{Receiver, Sender};
use memmap2::MmapMut;
use sbk_chunker::ChunkerParams;
use sbk_store::{ChunkId, Lock, Repository};

use super::segment::Work;
use crate::packer::Packer;
use crate::source::align_up;

/// State shared by the pipelines of all sources backed up in one run.
pub(super) struct RunState<'a> {
    pub(super) repo: &'a Repository,
    /// The run's lock, which pins the parent of an incremental.
    pub(super) lock: &'a Lock,
    pub(super) params: ChunkerParams,
    pub(super) pool: rayon::ThreadPool,
    /// Every source's blobs go into the same packs.
    pub(super) packer: Packer<'a>,
    /// When the run started (seconds since the Unix epoch, this host's clock).
    pub(super) started: i64,
    /// Segment buffers shared by every source: at most `buffers` exist at once.
    pub(super) buf_tx: Sender<MmapMut>,
    pub(super) buf_rx: Receiver<MmapMut>,
    pub(super) buffers: usize,
    pub(super) allocated: AtomicUsize,
    /// Sources being read at once; more wait their turn (a thread pair each).
    pub(super) running: Mutex<usize>,
    pub(super) running_cv: Condvar,
    /// Segments of every source go to the workers through this one queue, so that no source
    /// can hold the workers while another holds the shared buffers; `None` once the run is over.
    pub(super) work: Mutex<Option<Sender<Work>>>,
}

/// Sources backed up at once: each has a reader and a writer thread; the workers are shared.
pub(super) const MAX_CONCURRENT_SOURCES: usize = 4;

impl RunState<'_> {
    /// True when `id` is already stored or being stored by this run.
    pub(super) fn written(&self, id: &ChunkId) -> bool {
        self.packer.knows(id)
    }

    /// A segment buffer from the shared pool: a returned one, a new one while fewer than the
    /// pool's size exist, else the next one returned.
    pub(super) fn buffer(&self, seg_size: u64) -> std::io::Result<Option<MmapMut>> {
        if let Ok(b) = self.buf_rx.try_recv() {
            return Ok(Some(b));
        }
        if self.allocated.fetch_add(1, Ordering::AcqRel) < self.buffers {
            return MmapMut::map_anon(align_up(seg_size) as usize).map(Some);
        }
        self.allocated.fetch_sub(1, Ordering::AcqRel);
        Ok(self.buf_rx.recv().ok())
    }

    /// Waits for a turn to back up a source.
    pub(super) fn start_source(&self) {
        let mut n = self.running.lock().expect("no thread panics holding this");
        while *n >= MAX_CONCURRENT_SOURCES {
            n = self
                .running_cv
                .wait(n)
                .expect("no thread panics holding this");
        }
        *n += 1;
    }

    pub(super) fn end_source(&self) {
        *self.running.lock().expect("no thread panics holding this") -= 1;
        self.running_cv.notify_one();
    }
}
