//! The backup pipeline.
//!
//! ```text
//! reader thread ──segments──▶ rayon workers ──chunked, hashed, compressed──▶ writer ──▶ uploaders
//!  O_DIRECT, by extents      zero runs, FastCDC,                            packs,     seal packs,
//!  into pooled buffers       BLAKE3, dedup, zstd                            trees      index files
//! ```
//!
//! Channels are bounded and segment buffers come from one pool shared by every source of the
//! run, so memory is bounded by the pipeline depth, never by the source size. Full packs are
//! sealed by uploader threads off the critical path; the [`Packer`] names them in an index file
//! every so many packs and before each manifest. Segments are chunked independently, so the
//! chunk list does not depend on the thread count.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use memmap2::MmapMut;
use rayon::iter::{ParallelBridge, ParallelIterator};
use sbk_chunker::{split_changed, split_segment, ChunkerParams, Piece, Span};
use sbk_store::{
    encode_tree, BackupFigures, BlobKind, ChangedBlocks, ChunkId, EncodedBlob, Extent, Lock,
    Manifest, Repository, SnapshotId, StoreError,
};

use crate::changed::ChangedList;
use crate::error::{EngineError, Result};
use crate::packer::Packer;
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
    /// The source's identity recorded in the snapshot, instead of its canonical path (one
    /// source only): storage snapshots get a new device path every night.
    pub source_name: Option<String>,
    /// This run's storage-side snapshot id (`--cbt-token`), recorded for the next run's list.
    pub cbt_token: Option<String>,
    /// Back up from a changed-block list (one source only).
    pub changed: Option<ChangedOptions>,
}

/// An incremental backup from a changed-block list.
#[derive(Debug, Clone)]
pub struct ChangedOptions {
    /// The byte ranges that changed since the parent.
    pub list: ChangedList,
    /// The parent; default: the newest snapshot of the host and source (or, with `since`, the
    /// newest one carrying that token).
    pub parent: Option<SnapshotId>,
    /// The storage-side state the list starts from (`--cbt-since`).
    pub since: Option<String>,
    /// Percentage of unchanged segments re-read to check the list; at least one segment is
    /// always checked.
    pub verify_percent: f64,
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
    p.validate()?;
    Ok(p)
}

/// Packs handed to the uploaders and not yet sealed: while they seal (fsync, or an upload),
/// chunking goes on.
const UPLOAD_QUEUE: usize = 2;
/// Uploader threads: a couple of seals in flight hide the latency of one.
const UPLOADERS: usize = 2;

/// State shared by the pipelines of all sources backed up in one run.
struct Session<'a> {
    repo: &'a Repository,
    /// The run's lock, which pins the parent of an incremental.
    lock: &'a Lock,
    params: ChunkerParams,
    pool: rayon::ThreadPool,
    /// Every source's blobs go into the same packs.
    packer: Packer<'a>,
    /// Segment buffers shared by every source: at most `buffers` exist at once.
    buf_tx: Sender<MmapMut>,
    buf_rx: Receiver<MmapMut>,
    buffers: usize,
    allocated: AtomicUsize,
    /// Sources being read at once; more wait their turn (a thread pair each).
    running: Mutex<usize>,
    running_cv: Condvar,
    /// Segments of every source go to the workers through this one queue, so that no source
    /// can hold the workers while another holds the shared buffers; `None` once the run is over.
    work: Mutex<Option<Sender<Work>>>,
}

/// A segment for the workers, with where its result goes.
struct Work {
    seg: Result<Segment>,
    /// The source's ids being stored by a worker or the writer and not yet in a pack.
    claimed: Arc<Mutex<HashSet<ChunkId>>>,
    /// The source's writer.
    out: Sender<Result<ChunkedSegment>>,
}

/// Sources backed up at once: each has a reader and a writer thread; the workers are shared.
const MAX_CONCURRENT_SOURCES: usize = 4;

impl Session<'_> {
    /// True when `id` is already stored or being stored by this run.
    fn written(&self, id: &ChunkId) -> bool {
        self.packer.knows(id)
    }

    /// A segment buffer from the shared pool: a returned one, a new one while fewer than the
    /// pool's size exist, else the next one returned.
    fn buffer(&self, seg_size: u64) -> std::io::Result<Option<MmapMut>> {
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
    fn start_source(&self) {
        let mut n = self.running.lock().expect("no thread panics holding this");
        while *n >= MAX_CONCURRENT_SOURCES {
            n = self
                .running_cv
                .wait(n)
                .expect("no thread panics holding this");
        }
        *n += 1;
    }

    fn end_source(&self) {
        *self.running.lock().expect("no thread panics holding this") -= 1;
        self.running_cv.notify_one();
    }
}

/// Backs up each source into its own snapshot, the sources in parallel. Returns one result per
/// source, in order: some may fail while others succeed. The outer error is a failure to set up
/// at all (bad chunker parameters, no threads).
pub fn backup(
    repo: &Repository,
    lock: &Lock,
    sources: &[PathBuf],
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Vec<Result<BackupOutcome>>> {
    if sources.len() != 1 && (opts.changed.is_some() || opts.source_name.is_some()) {
        return Err(EngineError::ParentUnusable(
            "a changed-block list and a source name apply to exactly one source".into(),
        ));
    }
    let pool = worker_pool(opts.threads, "backup")?;
    // One segment being chunked per worker, one queued and one being read: enough to keep every
    // worker busy, and the whole of the pipeline's buffer memory (measured: docs/benchmarks.md).
    let buffers = opts.threads.max(1) + 2;
    let (buf_tx, buf_rx) = bounded::<MmapMut>(buffers);
    let (work_tx, work_rx) = bounded::<Work>(opts.threads.max(1));
    let session = Session {
        repo,
        lock,
        params: chunker_params(repo)?,
        pool,
        packer: Packer::new(repo),
        buf_tx,
        buf_rx,
        buffers,
        allocated: AtomicUsize::new(0),
        running: Mutex::new(0),
        running_cv: Condvar::new(),
        work: Mutex::new(Some(work_tx)),
    };
    let results = std::thread::scope(|s| {
        let session = &session;
        session.packer.start_uploaders(s, UPLOADERS, UPLOAD_QUEUE)?;
        // The workers: every source's segments, in whatever order they come.
        s.spawn(move || {
            session.pool.install(|| {
                work_rx.into_iter().par_bridge().for_each(|w| {
                    let Work { seg, claimed, out } = w;
                    let chunked = seg.and_then(|mut seg| {
                        let r = read_around(session, &mut seg)
                            .and_then(|()| chunk_segment(session, &claimed, &seg));
                        if let Some(buf) = seg.buf.take() {
                            let _ = session.buf_tx.send(buf);
                        }
                        r
                    });
                    let _ = out.send(chunked);
                })
            })
        });
        let handles: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(task, path)| {
                s.spawn(move || {
                    session.start_source();
                    let r = backup_one(session, task, path, opts, progress);
                    session.end_source();
                    r
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("backup threads do not panic"))
            .collect();
        if !session.packer.failed() {
            if let Err(e) = session.packer.flush() {
                // Every snapshot written sealed its own blobs first; what is lost here is data
                // that no snapshot refers to, which the next backup writes again.
                progress.notice(&format!(
                    "sealing the last pack failed: {e}; no snapshot depends on it"
                ));
            }
        }
        // Closing the queues ends the workers and the uploaders.
        session
            .work
            .lock()
            .expect("no thread panics holding this")
            .take();
        session.packer.close();
        Ok(results)
    });
    results
}

/// A segment read from the source; `buf` is `None` for a segment that is one hole, or one whose
/// tree is reused from the parent unread (`reuse`). A segment to be read only around its changes
/// comes with `around` and an empty buffer: the worker reads it (the re-split decides what to
/// read, and is as much work per byte as chunking), and fills in `parts`.
struct Segment {
    index: u64,
    len: usize,
    buf: Option<MmapMut>,
    read: u64,
    reuse: Option<ChunkId>,
    around: Option<Around>,
    /// The parent's extents kept unread and the spans cut anew (whose bytes are in `buf`).
    parts: Option<Vec<Part>>,
    /// Bytes of the segment that the changed-block list let the reader skip.
    skipped: u64,
}

/// What a worker needs to read a segment around its changes.
struct Around {
    /// A handle of the source for this segment's reads (the reader keeps reading with its own).
    source: Source,
    /// The parent's tree of the segment.
    tree: ChunkId,
    /// The changed ranges, relative to the segment.
    changed: Vec<Range<usize>>,
}

/// A piece of a segment read only around its changes.
enum Part {
    /// The parent's extent, whose bytes did not change.
    Kept(Extent),
    /// A span cut anew from bytes read.
    New(Span),
}

/// A segment after chunking: its extents (or the parent's tree, reused) and the blobs it adds.
struct ChunkedSegment {
    index: u64,
    len: usize,
    extents: Vec<Extent>,
    reuse: Option<ChunkId>,
    blobs: Vec<EncodedBlob>,
    figures: BackupFigures,
    skipped: u64,
}

/// What a run reads: for each segment, the parent's tree to reuse unread, if any; the segments
/// re-read to check the list, with the tree the parent has for them; and the changed segments
/// that are read only around their changes, with the parent's tree and the changed ranges.
#[derive(Default)]
struct Plan {
    reuse: Vec<Option<ChunkId>>,
    check: HashMap<u64, ChunkId>,
    around: HashMap<u64, (ChunkId, Vec<Range<usize>>)>,
}

fn backup_one(
    session: &Session<'_>,
    task: usize,
    path: &Path,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    let time_ns = sbk_store::unix_now_ns();
    let repo = session.repo;
    let mut source = Source::open(path)?;
    let label = match &opts.source_name {
        Some(name) => name.clone(),
        None => std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_owned())
            .to_string_lossy()
            .into_owned(),
    };
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

    // Incremental: choose the parent and plan which segments to reuse unread. The lock was
    // taken before this (by the caller), so prune cannot take the parent's trees meanwhile,
    // and the parent is pinned by it: even forgotten meanwhile, prune keeps what it refers to
    // (a prune beside backups may have marked its packs before we started, if the backup that
    // wrote it started earlier still).
    let mut info = None;
    let mut plan = Plan::default();
    let mut chosen = None;
    if let Some(c) = &opts.changed {
        let mut parent = choose_parent(repo, &opts.host, &label, c)?;
        let mut attempts = 0;
        while let Some((id, _)) = &parent {
            match repo.pin_snapshot(session.lock, id) {
                Ok(()) => break,
                // Forgotten since it was chosen (a forget beside us): choose again, unless the
                // operator named it.
                Err(StoreError::SnapshotNotFound(_)) if c.parent.is_none() && attempts < 3 => {
                    attempts += 1;
                    parent = choose_parent(repo, &opts.host, &label, c)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        chosen = parent.as_ref().map(|(id, _)| *id);
        let mut i = ChangedBlocks {
            since: c.since.clone(),
            incremental: true,
            trusted: true,
            ..Default::default()
        };
        match &parent {
            Some((pid, pm)) => {
                if pm.host != opts.host || pm.source != label {
                    return Err(EngineError::ParentUnusable(format!(
                        "parent {pid} is a snapshot of {} on {}, not of {label} on {}",
                        pm.source, pm.host, opts.host
                    )));
                }
                if pm.segment_size != seg_size {
                    return Err(EngineError::ParentUnusable(format!(
                        "parent {pid} was cut into segments of {} bytes, this repository cuts {seg_size}",
                        pm.segment_size
                    )));
                }
                plan = plan_reuse(repo, pm, &c.list, size, seg_size, c.verify_percent)?;
            }
            None => {
                progress.notice(&format!(
                    "{label}: no parent snapshot to apply the changed-block list to: reading everything"
                ));
                i.incremental = false;
            }
        }
        info = Some(i);
    }

    let mut run = run_pipeline(session, task, &mut source, &plan, progress)?;
    if run.lied {
        // The list missed a change: the snapshot must not rely on it. Read everything.
        progress.notice(&format!(
            "{label}: THE CHANGED-BLOCK LIST IS WRONG: a segment it calls unchanged differs from the parent; reading the whole source instead"
        ));
        source = Source::open(path)?;
        if source.size() != size {
            return Err(EngineError::SourceShrank {
                path: path.to_owned(),
                expected: size,
                found: source.size(),
            });
        }
        let full = Plan {
            reuse: vec![None; segments as usize],
            ..Plan::default()
        };
        // A new count from zero: what the first pass did is not part of this one.
        progress.finish(task);
        progress.start(task, &format!("{label} (whole)"), size);
        run = run_pipeline(session, task, &mut source, &full, progress)?;
        plan = full;
        if let Some(i) = &mut info {
            i.trusted = false;
        }
    }
    progress.finish(task);
    let Run {
        trees,
        mut figures,
        fallback: read_fallback,
        skipped,
        ..
    } = run;
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

    // A stop requested meanwhile writes no snapshot: the run ends as if it had failed here.
    crate::interrupt::check()?;
    // Ordering: every blob durable and indexed, then the manifest that refers to them.
    session.packer.flush()?;
    figures.duration_ms = started.elapsed().as_millis() as u64;
    let parent = match chosen {
        Some(id) => Some(id),
        None => latest_of(repo, &opts.host, &label)?,
    };
    let mut manifest = Manifest {
        time_ns,
        source: label,
        host: opts.host.clone(),
        tags: opts.tags.clone(),
        size,
        segment_size: seg_size,
        parent,
        figures,
        trees,
        extensions: Vec::new(),
    };
    if info.is_some() || opts.cbt_token.is_some() {
        let mut i = info.unwrap_or_default();
        i.token = opts.cbt_token.clone();
        let reused = plan.reuse.iter().filter(|t| t.is_some()).count() as u64;
        i.segments_reused = reused;
        i.segments_read = segments - reused;
        i.bytes_skipped = skipped;
        manifest.set_changed_blocks(&i);
    }
    crate::interrupt::check()?;
    let snapshot = repo.write_manifest(&manifest)?;
    Ok(BackupOutcome {
        snapshot,
        manifest,
        fallback: open_fallback.or(read_fallback),
    })
}

/// The parent of an incremental: the one named, the newest carrying the `since` token, or the
/// newest of the host and source.
fn choose_parent(
    repo: &Repository,
    host: &str,
    source: &str,
    c: &ChangedOptions,
) -> Result<Option<(SnapshotId, Manifest)>> {
    if let Some(id) = c.parent {
        return Ok(Some((id, repo.load_manifest(&id)?)));
    }
    let all = repo.snapshots()?;
    let mine = all.into_iter().rev().filter_map(|(id, m)| {
        m.ok()
            .filter(|m| m.host == host && m.source == source)
            .map(|m| (id, m))
    });
    match &c.since {
        Some(since) => {
            let found = mine.into_iter().find(|(_, m)| {
                m.changed_blocks()
                    .and_then(|r| r.ok())
                    .and_then(|i| i.token)
                    .as_deref()
                    == Some(since.as_str())
            });
            match found {
                Some(p) => Ok(Some(p)),
                None => Err(EngineError::ParentUnusable(format!(
                    "no snapshot of {source} on {host} carries the token {since:?} the list starts from; back up in full (without --changed-blocks) to start a new chain"
                ))),
            }
        }
        None => Ok(mine.into_iter().next()),
    }
}

/// Which segments to reuse from `parent`: those of the same length that no changed range
/// touches and whose tree the index knows; and a random sample of them (`percent`, at least
/// one) to re-read and compare.
fn plan_reuse(
    repo: &Repository,
    parent: &Manifest,
    list: &ChangedList,
    size: u64,
    seg_size: u64,
    percent: f64,
) -> Result<Plan> {
    let segments = size.div_ceil(seg_size);
    let touched = list.segments(seg_size, segments);
    let len = |i: u64| (size - i * seg_size).min(seg_size);
    let index = repo.index()?;
    let same_shape =
        |i: u64| (i as usize) < parent.trees.len() && parent.segment_len(i as usize) == len(i);
    let mut reuse: Vec<Option<ChunkId>> = (0..segments)
        .map(|i| {
            // A tree the index does not know (a damaged parent) is read, never referred to.
            (same_shape(i) && !touched[i as usize] && index.contains(&parent.trees[i as usize]))
                .then(|| parent.trees[i as usize])
        })
        .collect();
    // A changed segment of the parent's length is read around its changes only.
    let around = (0..segments)
        .filter(|&i| {
            touched[i as usize] && same_shape(i) && index.contains(&parent.trees[i as usize])
        })
        .map(|i| {
            let start = i * seg_size;
            (
                i,
                (parent.trees[i as usize], list.within(start..start + len(i))),
            )
        })
        .collect();
    let reusable: Vec<u64> = (0..segments)
        .filter(|i| reuse[*i as usize].is_some())
        .collect();
    let mut check = HashMap::new();
    if !reusable.is_empty() {
        let k =
            ((reusable.len() as f64 * percent / 100.0).ceil() as usize).clamp(1, reusable.len());
        // A random sample, so that a list that lies cannot know which segments are checked.
        let mut seed = u64::from_le_bytes(
            sbk_store::PackId::random()
                .map(|p| p.0[..8].try_into().expect("eight bytes"))
                .unwrap_or([7; 8]),
        ) | 1;
        let mut pool = reusable;
        for j in 0..k {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pick = j + (seed % (pool.len() - j) as u64) as usize;
            pool.swap(j, pick);
            let i = pool[j];
            check.insert(i, reuse[i as usize].take().expect("reusable"));
        }
    }
    Ok(Plan {
        reuse,
        check,
        around,
    })
}

/// What one pass of the pipeline over a source produced.
struct Run {
    trees: Vec<ChunkId>,
    figures: BackupFigures,
    fallback: Option<String>,
    /// A re-read segment's tree differed from the parent's: the changed-block list is wrong.
    lied: bool,
    /// Bytes not read because the changed-block list said they had not changed.
    skipped: u64,
}

/// Reads, chunks and stores one source by `plan`.
fn run_pipeline(
    session: &Session<'_>,
    task: usize,
    source: &mut Source,
    plan: &Plan,
    progress: &dyn Progress,
) -> Result<Run> {
    let seg_size = session.repo.config().segment_size;
    let segments = source.size().div_ceil(seg_size);
    let (out_tx, out_rx) = bounded::<Result<ChunkedSegment>>(1);
    let cancel = AtomicBool::new(false);
    let claimed = Arc::new(Mutex::new(HashSet::<ChunkId>::new()));
    let work = session
        .work
        .lock()
        .expect("no thread panics holding this")
        .clone()
        .ok_or_else(|| EngineError::Unsafe("the backup run is over".into()))?;

    let result = std::thread::scope(|s| {
        let cancel = &cancel;
        let reader = {
            let claimed = claimed.clone();
            s.spawn(move || {
                // The reader owns this source's result sender; the workers hold clones while
                // they chunk its segments, so the writer sees the end once both are done.
                let send = |seg| {
                    work.send(Work {
                        seg,
                        claimed: claimed.clone(),
                        out: out_tx.clone(),
                    })
                    .is_ok()
                };
                read_segments(session, source, seg_size, segments, plan, &send, cancel)
            })
        };
        let written = write_segments(session, &claimed, task, &out_rx, segments, progress, cancel);
        if written.is_err() {
            cancel.store(true, Ordering::Relaxed);
            for _ in out_rx.iter() {} // drain, so that workers and reader can finish
        }
        let fallback = reader.join().expect("the reader does not panic");
        written.map(|w| (w, fallback))
    });
    let ((trees, figures, skipped), fallback) = result?;
    let lied = plan
        .check
        .iter()
        .any(|(i, expected)| trees.get(*i as usize).is_some_and(|t| t != expected));
    Ok(Run {
        trees,
        figures,
        fallback,
        lied,
        skipped,
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
#[allow(clippy::too_many_arguments)]
fn read_segments(
    session: &Session<'_>,
    source: &mut Source,
    seg_size: u64,
    segments: u64,
    plan: &Plan,
    send: &dyn Fn(Result<Segment>) -> bool,
    cancel: &AtomicBool,
) -> Option<String> {
    let had_fallback = source.fallback().is_some();
    let mut spare = None; // a buffer left unused by a segment that was all hole
    for index in 0..segments {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        if let Err(e) = crate::interrupt::check() {
            send(Err(e));
            break;
        }
        let start = index * seg_size;
        let len = (source.size() - start).min(seg_size);
        if let Some(tree) = plan.reuse.get(index as usize).copied().flatten() {
            // Unchanged since the parent: its tree is reused, nothing is read.
            let seg = Segment {
                index,
                len: len as usize,
                buf: None,
                read: 0,
                reuse: Some(tree),
                around: None,
                parts: None,
                skipped: len,
            };
            if !send(Ok(seg)) {
                break;
            }
            continue;
        }
        let buf = match spare
            .take()
            .map(|b| Ok(Some(b)))
            .unwrap_or_else(|| session.buffer(seg_size))
        {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                send(Err(EngineError::SourceRead {
                    path: source.path().to_owned(),
                    offset: start,
                    source: e,
                }));
                break;
            }
        };
        let mut buf = buf;
        if let Some((tree, changed)) = plan.around.get(&index) {
            let seg = source.try_clone().map(|source| Segment {
                index,
                len: len as usize,
                read: 0,
                buf: Some(buf),
                reuse: None,
                around: Some(Around {
                    source,
                    tree: *tree,
                    changed: changed.clone(),
                }),
                parts: None,
                skipped: 0,
            });
            let failed = seg.is_err();
            if !send(seg) || failed {
                break;
            }
            continue;
        }
        let seg = match source.read_segment(start..start + len, &mut buf) {
            Ok(Some(read)) => Ok(Segment {
                index,
                len: len as usize,
                read,
                buf: Some(buf),
                reuse: None,
                around: None,
                parts: None,
                skipped: 0,
            }),
            Ok(None) => {
                spare = Some(buf);
                Ok(Segment {
                    index,
                    len: len as usize,
                    read: 0,
                    buf: None,
                    reuse: None,
                    around: None,
                    parts: None,
                    skipped: 0,
                })
            }
            Err(e) => Err(e),
        };
        let failed = seg.is_err();
        if !send(seg) || failed {
            break;
        }
    }
    if let Some(b) = spare {
        let _ = session.buf_tx.send(b);
    }
    if had_fallback {
        None
    } else {
        source.fallback().map(str::to_owned)
    }
}

/// Reads a segment that comes with [`Around`]: only around its changed ranges, re-split against
/// the parent's tree (see [`split_changed`]), which gives the split a whole read would give. When
/// the parent's tree cannot be used (unreadable, or naming a chunk the index does not know), the
/// segment is read whole.
fn read_around(session: &Session<'_>, seg: &mut Segment) -> Result<()> {
    let Some(Around {
        mut source,
        tree,
        changed,
    }) = seg.around.take()
    else {
        return Ok(());
    };
    let buf = seg
        .buf
        .as_mut()
        .expect("a segment to read around has a buffer");
    let start = seg.index * session.repo.config().segment_size;
    let len = seg.len as u64;
    let Some(parent) = parent_spans(session.repo, &tree, len)? else {
        match source.read_segment(start..start + len, buf)? {
            Some(read) => seg.read = read,
            None => buf[..seg.len].fill(0),
        }
        return Ok(());
    };
    let spans: Vec<Span> = parent.iter().map(|(span, _)| *span).collect();
    let mut read = 0;
    let mut fill = |r: Range<usize>, data: &mut [u8]| -> Result<()> {
        let at = start + r.start as u64;
        match source.read_segment(at..start + r.end as u64, &mut data[r.start..])? {
            Some(n) => read += n,
            None => data[r].fill(0),
        }
        Ok(())
    };
    let (pieces, loaded) =
        split_changed(buf, seg.len, &session.params, &spans, &changed, &mut fill)?;
    seg.parts = Some(
        pieces
            .into_iter()
            .map(|p| match p {
                Piece::Kept(k) => Part::Kept(parent[k].1),
                Piece::New(span) => Part::New(span),
            })
            .collect(),
    );
    seg.read = read;
    seg.skipped = len - loaded as u64;
    Ok(())
}

/// The parent's segment tree as spans with their extents; `None` when it cannot be used.
fn parent_spans(
    repo: &Repository,
    tree: &ChunkId,
    len: u64,
) -> Result<Option<Vec<(Span, Extent)>>> {
    let Ok(extents) = repo.load_tree(tree, len) else {
        return Ok(None);
    };
    let index = repo.index()?;
    let mut out = Vec::with_capacity(extents.len());
    let mut offset = 0;
    for e in extents {
        let len = e.len() as usize;
        out.push(match e {
            Extent::Zero { .. } => (Span::Zero { offset, len }, e),
            Extent::Data { id, .. } if index.contains(&id) => (Span::Data { offset, len }, e),
            Extent::Data { .. } => return Ok(None),
        });
        offset += len;
    }
    Ok(Some(out))
}

/// A worker: zero runs and FastCDC chunks, ids, dedup, compression of new blobs.
fn chunk_segment(
    session: &Session<'_>,
    claimed: &Mutex<HashSet<ChunkId>>,
    seg: &Segment,
) -> Result<ChunkedSegment> {
    let repo = session.repo;
    let mut done = ChunkedSegment {
        index: seg.index,
        len: seg.len,
        extents: Vec::new(),
        reuse: seg.reuse,
        blobs: Vec::new(),
        figures: BackupFigures {
            bytes_read: seg.read,
            ..Default::default()
        },
        skipped: seg.skipped,
    };
    if seg.reuse.is_some() {
        return Ok(done);
    }
    let Some(buf) = &seg.buf else {
        done.figures.bytes_zero = seg.len as u64;
        done.extents.push(Extent::Zero {
            len: seg.len as u32,
        });
        return Ok(done);
    };
    let data = &buf[..seg.len];
    let add = |span: Span, done: &mut ChunkedSegment| -> Result<()> {
        let figures = &mut done.figures;
        match span {
            Span::Zero { len, .. } => {
                figures.bytes_zero += len as u64;
                done.extents.push(Extent::Zero { len: len as u32 });
            }
            Span::Data { offset, len } => {
                let bytes = &data[offset..offset + len];
                let id = repo.blob_id(bytes);
                figures.chunks += 1;
                done.extents.push(Extent::Data {
                    id,
                    len: len as u32,
                });
                // Never dedup against a pack prune marked: a later prune may delete it.
                if !repo.dedup_hit(&id)?
                    && !session.written(&id)
                    && claimed
                        .lock()
                        .expect("no thread panics holding this lock")
                        .insert(id)
                {
                    let blob = repo.encode_blob(id, BlobKind::Data, bytes)?;
                    figures.new_chunks += 1;
                    figures.new_raw += len as u64;
                    done.blobs.push(blob);
                }
            }
        }
        Ok(())
    };
    match &seg.parts {
        Some(parts) => {
            for part in parts {
                match part {
                    Part::Kept(extent) => done.extents.push(*extent),
                    Part::New(span) => add(*span, &mut done)?,
                }
            }
        }
        None => {
            for span in split_segment(data, &session.params) {
                add(span, &mut done)?;
            }
        }
    }
    Ok(done)
}

/// The writer: stores new blobs, and turns segments, in order, into tree blobs.
fn write_segments(
    session: &Session<'_>,
    claimed: &Mutex<HashSet<ChunkId>>,
    task: usize,
    chunked: &Receiver<Result<ChunkedSegment>>,
    segments: u64,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<(Vec<ChunkId>, BackupFigures, u64)> {
    let repo = session.repo;
    let mut figures = BackupFigures::default();
    let mut skipped = 0;
    let mut trees = Vec::with_capacity(segments as usize);
    let mut pending = BTreeMap::new();
    let mut tree_ids = HashSet::new();
    for seg in chunked.iter() {
        let seg = seg?;
        figures.new_stored += session.packer.add(&seg.blobs)?;
        // Stored: the run's unindexed set knows them now, which keeps `claimed` as small as
        // the segments in flight.
        {
            let mut claimed = claimed.lock().expect("no thread panics holding this lock");
            for b in &seg.blobs {
                claimed.remove(&b.header.id);
            }
        }
        let f = &seg.figures;
        figures.bytes_read += f.bytes_read;
        figures.bytes_zero += f.bytes_zero;
        figures.new_raw += f.new_raw;
        figures.chunks += f.chunks;
        figures.new_chunks += f.new_chunks;
        skipped += seg.skipped;
        progress.advance(task, seg.len as u64);
        pending.insert(seg.index, (seg.reuse, seg.extents));
        while let Some((reuse, extents)) = pending.remove(&(trees.len() as u64)) {
            if let Some(tree) = reuse {
                trees.push(tree);
                continue;
            }
            let raw = encode_tree(&extents);
            let id = repo.blob_id(&raw);
            if !repo.dedup_hit(&id)? && !session.written(&id) && tree_ids.insert(id) {
                let blob = repo.encode_blob(id, BlobKind::Tree, &raw)?;
                figures.new_stored += session.packer.add(std::slice::from_ref(&blob))?;
            }
            trees.push(id);
        }
        if cancel.load(Ordering::Relaxed) {
            break;
        }
    }
    Ok((trees, figures, skipped))
}
