//! The backup pipeline.
//!
//! ```text
//! reader thread ──segments──▶ rayon workers ──chunked, hashed, compressed──▶ writer (this thread)
//!  O_DIRECT, by extents      zero runs, FastCDC,                            packs, index,
//!  into pooled buffers       BLAKE3, dedup, zstd                            trees, manifest
//! ```
//!
//! Channels are bounded and segment buffers come from a fixed pool, so memory is bounded by the
//! pipeline depth, never by the source size. Segments are chunked independently, so the chunk
//! list does not depend on the thread count.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use memmap2::MmapMut;
use rayon::iter::{ParallelBridge, ParallelIterator};
use sbk_chunker::{split_segment, ChunkerParams, Span};
use sbk_store::{
    encode_blob, encode_tree, BackupFigures, BlobKind, ChunkId, EncodedBlob, Extent, Manifest,
    PackWriter, Repository, SnapshotId, StoreError, BLOB_HEADER_LEN,
};

use crate::error::{EngineError, Result};
use crate::pool::worker_pool;
use crate::progress::Progress;
use crate::source::{align_up, Source};

/// What a backup is asked to do.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Worker threads for chunking, hashing and compression.
    pub threads: usize,
    /// Host recorded in the snapshots.
    pub host: String,
    /// Tags recorded in the snapshots.
    pub tags: Vec<String>,
}

/// A finished backup of one source.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// The snapshot written.
    pub snapshot: SnapshotId,
    /// Its manifest (figures included).
    pub manifest: Manifest,
    /// Why O_DIRECT was not used, if it was not.
    pub fallback: Option<String>,
}

/// The chunker parameters a repository fixes, checked.
pub fn chunker_params(repo: &Repository) -> Result<ChunkerParams> {
    let c = repo.config();
    let p = ChunkerParams {
        min: c.chunk_min,
        avg: c.chunk_avg,
        max: c.chunk_max,
        seed: c.chunk_seed,
        zero_min: c.zero_min,
    };
    p.validate()
        .map_err(|e| EngineError::ChunkerParams(e.to_string()))?;
    Ok(p)
}

/// Blobs shared by all sources of one run: the open pack and what this run has written.
struct Packer {
    current: Option<PackWriter>,
    /// Ids written by this run, sealed or in `current`: another source need not write them again.
    written: HashSet<ChunkId>,
    /// Set once a pack write or seal failed: the open pack's contents are then unknown, so
    /// nothing written in this run may be relied on any more, by any source.
    failed: bool,
}

/// State shared by the pipelines of all sources backed up in one run.
struct Session<'a> {
    repo: &'a Repository,
    params: ChunkerParams,
    pool: rayon::ThreadPool,
    packer: Mutex<Packer>,
}

impl Session<'_> {
    fn packer(&self) -> Result<std::sync::MutexGuard<'_, Packer>> {
        let packer = self
            .packer
            .lock()
            .expect("no thread panics holding the packer");
        if packer.failed {
            return Err(EngineError::Unsafe(
                "an earlier pack write of this run failed; no snapshot can rely on it".into(),
            ));
        }
        Ok(packer)
    }

    /// Appends blobs to the open pack, sealing it when it reaches the target size. Returns the
    /// bytes written (blobs another source already wrote are skipped).
    fn store(&self, blobs: &[EncodedBlob]) -> Result<u64> {
        let mut packer = self.packer()?;
        let result = self.store_locked(&mut packer, blobs);
        if result.is_err() {
            Self::fail(&mut packer);
        }
        result
    }

    fn store_locked(&self, packer: &mut Packer, blobs: &[EncodedBlob]) -> Result<u64> {
        let mut written = 0;
        for blob in blobs {
            if packer.written.contains(&blob.header.id) {
                continue;
            }
            if packer.current.is_none() {
                packer.current = Some(PackWriter::create(self.repo.path())?);
            }
            let pack = packer.current.as_mut().expect("created above");
            pack.add(blob)?;
            // Only once it is in the pack may another source skip it.
            packer.written.insert(blob.header.id);
            written += (BLOB_HEADER_LEN + blob.data.len()) as u64;
            if pack.len() >= self.repo.config().pack_target {
                self.seal_current(packer)?;
            }
        }
        Ok(written)
    }

    /// A write or seal failed: drop the open pack and refuse everything from now on.
    fn fail(packer: &mut Packer) {
        packer.failed = true;
        if let Some(pack) = packer.current.take() {
            pack.abandon();
        }
    }

    fn seal_current(&self, packer: &mut Packer) -> Result<()> {
        if let Some(pack) = packer.current.take() {
            // The pack is durable (file and directory fsynced) before the index names it.
            let (id, entries) = pack.finish()?;
            self.repo.index().insert_pack(id, &entries)?;
        }
        Ok(())
    }

    /// Seals the open pack and flushes the index: afterwards every blob stored so far is durable
    /// and indexed, and a manifest may refer to it.
    fn seal(&self) -> Result<()> {
        let mut packer = self.packer()?;
        let result = self
            .seal_current(&mut packer)
            .and_then(|()| Ok(self.repo.index().flush()?));
        if result.is_err() {
            Self::fail(&mut packer);
        }
        result
    }
}

/// Backs up each source into its own snapshot, the sources in parallel. Returns one result per
/// source, in order: some may fail while others succeed. The outer error is a failure to set up
/// at all (bad chunker parameters, no threads).
pub fn backup(
    repo: &Repository,
    sources: &[PathBuf],
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Vec<Result<BackupOutcome>>> {
    let pool = worker_pool(opts.threads, "backup")?;
    let session = Session {
        repo,
        params: chunker_params(repo)?,
        pool,
        packer: Mutex::new(Packer {
            current: None,
            written: HashSet::new(),
            failed: false,
        }),
    };
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(task, path)| {
                let session = &session;
                s.spawn(move || backup_one(session, task, path, opts, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("backup threads do not panic"))
            .collect()
    });
    // After a failed write the open pack was already dropped and every source reported it.
    let failed = session
        .packer
        .lock()
        .expect("no thread panics holding the packer")
        .failed;
    if !failed {
        if let Err(e) = session.seal() {
            // Every snapshot written sealed its own blobs first; what is lost here is data that
            // no snapshot refers to, which the next backup writes again.
            progress.notice(&format!(
                "sealing the last pack failed: {e}; no snapshot depends on it"
            ));
        }
    }
    Ok(results)
}

/// A segment read from the source; `buf` is `None` for a segment that is one hole.
struct Segment {
    index: u64,
    len: usize,
    buf: Option<MmapMut>,
    read: u64,
}

/// A segment after chunking: its extents and the blobs it adds.
struct ChunkedSegment {
    index: u64,
    len: usize,
    extents: Vec<Extent>,
    blobs: Vec<EncodedBlob>,
    figures: BackupFigures,
}

fn backup_one(
    session: &Session<'_>,
    task: usize,
    path: &Path,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    let time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let repo = session.repo;
    let mut source = Source::open(path)?;
    let label = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_owned())
        .to_string_lossy()
        .into_owned();
    let size = source.size();
    let seg_size = repo.config().segment_size;
    let segments = size.div_ceil(seg_size);
    progress.start(task, &label, size);
    let open_fallback = source.fallback().map(str::to_owned);
    if let Some(why) = &open_fallback {
        progress.notice(&format!(
            "{label}: reading without O_DIRECT: {why}; buffered reads with posix_fadvise(DONTNEED)"
        ));
    }

    // One segment being chunked per worker, one queued and one being read: enough to keep every
    // worker busy, and the whole of the pipeline's buffer memory (measured: docs/benchmarks.md).
    let threads = opts.threads.max(1);
    let buffers = threads + 2;
    let (seg_tx, seg_rx) = bounded::<Result<Segment>>(threads);
    let (out_tx, out_rx) = bounded::<Result<ChunkedSegment>>(1);
    let (buf_tx, buf_rx) = bounded::<MmapMut>(buffers);
    let cancel = AtomicBool::new(false);
    let claimed = Mutex::new(HashSet::<ChunkId>::new());

    let result = std::thread::scope(|s| {
        let cancel = &cancel;
        let reader = s.spawn(move || {
            read_segments(
                &mut source,
                seg_size,
                segments,
                buffers,
                &buf_rx,
                &seg_tx,
                cancel,
            )
        });
        let claimed = &claimed;
        s.spawn(move || {
            session.pool.install(|| {
                seg_rx
                    .into_iter()
                    .par_bridge()
                    .for_each_with(out_tx, |out, seg| {
                        let chunked = seg.and_then(|mut seg| {
                            let r = chunk_segment(session, claimed, &seg);
                            if let Some(buf) = seg.buf.take() {
                                let _ = buf_tx.send(buf);
                            }
                            r
                        });
                        let _ = out.send(chunked);
                    })
            })
        });
        let written = write_segments(session, task, &out_rx, segments, progress, cancel);
        if written.is_err() {
            cancel.store(true, Ordering::Relaxed);
            for _ in out_rx.iter() {} // drain, so that workers and reader can finish
        }
        let fallback = reader.join().expect("the reader does not panic");
        written.map(|w| (w, fallback))
    });
    progress.finish(task);
    let ((trees, mut figures), read_fallback) = result?;
    if trees.len() as u64 != segments {
        // Cannot happen: the reader stops early only with an error, which reached the writer.
        // But a manifest that does not cover its source must never be written.
        return Err(EngineError::SourceShrank {
            path: path.to_owned(),
            expected: size,
            found: trees.len() as u64 * seg_size,
        });
    }
    if let Some(why) = &read_fallback {
        progress.notice(&format!(
            "{label}: reading without O_DIRECT: {why}; buffered reads with posix_fadvise(DONTNEED)"
        ));
    }

    // Ordering: every blob durable and indexed, then the manifest that refers to them.
    session.seal()?;
    figures.duration_ms = started.elapsed().as_millis() as u64;
    let parent = latest_of(repo, &opts.host, &label)?;
    let manifest = Manifest {
        time_ns,
        source: label,
        host: opts.host.clone(),
        tags: opts.tags.clone(),
        size,
        segment_size: seg_size,
        parent,
        figures,
        trees,
    };
    let snapshot = repo.write_manifest(&manifest)?;
    Ok(BackupOutcome {
        snapshot,
        manifest,
        fallback: open_fallback.or(read_fallback),
    })
}

/// The newest snapshot of `host` and `source`, the parent of the next one.
fn latest_of(
    repo: &Repository,
    host: &str,
    source: &str,
) -> Result<Option<SnapshotId>, StoreError> {
    Ok(repo
        .snapshots()?
        .into_iter()
        .rev()
        .find(|(_, m)| {
            m.as_ref()
                .is_ok_and(|m| m.host == host && m.source == source)
        })
        .map(|(id, _)| id))
}

/// The reader: segments in order into pooled, aligned buffers. Returns why O_DIRECT was
/// abandoned if that happened during the reads.
fn read_segments(
    source: &mut Source,
    seg_size: u64,
    segments: u64,
    pool_size: usize,
    returned: &Receiver<MmapMut>,
    out: &Sender<Result<Segment>>,
    cancel: &AtomicBool,
) -> Option<String> {
    let had_fallback = source.fallback().is_some();
    let mut allocated = 0;
    let mut spare = None; // a buffer left unused by a segment that was all hole
    for index in 0..segments {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let start = index * seg_size;
        let len = (source.size() - start).min(seg_size);
        let buf = match spare.take().map(Ok).unwrap_or_else(|| returned.try_recv()) {
            Ok(b) => b,
            Err(_) if allocated < pool_size => {
                allocated += 1;
                match MmapMut::map_anon(align_up(seg_size) as usize) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = out.send(Err(EngineError::SourceRead {
                            path: source.path().to_owned(),
                            offset: start,
                            source: e,
                        }));
                        break;
                    }
                }
            }
            Err(_) => match returned.recv() {
                Ok(b) => b,
                Err(_) => break,
            },
        };
        let mut buf = buf;
        let seg = match source.read_segment(start..start + len, &mut buf) {
            Ok(Some(read)) => Ok(Segment {
                index,
                len: len as usize,
                read,
                buf: Some(buf),
            }),
            Ok(None) => {
                spare = Some(buf);
                Ok(Segment {
                    index,
                    len: len as usize,
                    read: 0,
                    buf: None,
                })
            }
            Err(e) => Err(e),
        };
        let failed = seg.is_err();
        if out.send(seg).is_err() || failed {
            break;
        }
    }
    if had_fallback {
        None
    } else {
        source.fallback().map(str::to_owned)
    }
}

/// A worker: zero runs and FastCDC chunks, ids, dedup, compression of new blobs.
fn chunk_segment(
    session: &Session<'_>,
    claimed: &Mutex<HashSet<ChunkId>>,
    seg: &Segment,
) -> Result<ChunkedSegment> {
    let repo = session.repo;
    let mut figures = BackupFigures {
        bytes_read: seg.read,
        ..Default::default()
    };
    let Some(buf) = &seg.buf else {
        figures.bytes_zero = seg.len as u64;
        return Ok(ChunkedSegment {
            index: seg.index,
            len: seg.len,
            extents: vec![Extent::Zero {
                len: seg.len as u32,
            }],
            blobs: Vec::new(),
            figures,
        });
    };
    let data = &buf[..seg.len];
    let spans = split_segment(data, &session.params);
    let mut extents = Vec::with_capacity(spans.len());
    let mut blobs = Vec::new();
    for span in spans {
        match span {
            Span::Zero { len, .. } => {
                figures.bytes_zero += len as u64;
                extents.push(Extent::Zero { len: len as u32 });
            }
            Span::Data { offset, len } => {
                let bytes = &data[offset..offset + len];
                let id = repo.blob_id(bytes);
                figures.chunks += 1;
                extents.push(Extent::Data {
                    id,
                    len: len as u32,
                });
                if !repo.index().contains(&id)?
                    && claimed
                        .lock()
                        .expect("no thread panics holding this lock")
                        .insert(id)
                {
                    let blob = encode_blob(id, BlobKind::Data, bytes, repo.config().zstd_level)
                        .map_err(|e| EngineError::Store(StoreError::io(repo.path(), e)))?;
                    figures.new_chunks += 1;
                    figures.new_raw += len as u64;
                    blobs.push(blob);
                }
            }
        }
    }
    Ok(ChunkedSegment {
        index: seg.index,
        len: seg.len,
        extents,
        blobs,
        figures,
    })
}

/// The writer: stores new blobs, and turns segments, in order, into tree blobs.
fn write_segments(
    session: &Session<'_>,
    task: usize,
    chunked: &Receiver<Result<ChunkedSegment>>,
    segments: u64,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<(Vec<ChunkId>, BackupFigures)> {
    let repo = session.repo;
    let mut figures = BackupFigures::default();
    let mut trees = Vec::with_capacity(segments as usize);
    let mut pending = BTreeMap::new();
    let mut tree_ids = HashSet::new();
    for seg in chunked.iter() {
        let seg = seg?;
        figures.new_stored += session.store(&seg.blobs)?;
        let f = &seg.figures;
        figures.bytes_read += f.bytes_read;
        figures.bytes_zero += f.bytes_zero;
        figures.new_raw += f.new_raw;
        figures.chunks += f.chunks;
        figures.new_chunks += f.new_chunks;
        progress.advance(task, seg.len as u64);
        pending.insert(seg.index, seg.extents);
        while let Some(extents) = pending.remove(&(trees.len() as u64)) {
            let raw = encode_tree(&extents);
            let id = repo.blob_id(&raw);
            if !repo.index().contains(&id)? && tree_ids.insert(id) {
                let blob = encode_blob(id, BlobKind::Tree, &raw, repo.config().zstd_level)
                    .map_err(|e| StoreError::io(repo.path(), e))?;
                figures.new_stored += session.store(std::slice::from_ref(&blob))?;
            }
            trees.push(id);
        }
        if cancel.load(Ordering::Relaxed) {
            break;
        }
    }
    Ok((trees, figures))
}
