//! The backup pipeline.
//!
//! ```text
//! reader thread ──segments──▶ rayon workers ──extents──▶ writer: trees, in order
//!  O_DIRECT, by extents      zero runs, FastCDC,
//!  into pooled buffers       BLAKE3, dedup, zstd
//!                                   │ new blobs, every few MiB
//!                                   ▼
//!                                 packer ──full packs──▶ uploaders: seal packs, index files
//! ```
//!
//! Channels are bounded and segment buffers come from one pool shared by every source of the
//! run, and the workers hand new blobs to the packer every few MiB instead of a segment's worth
//! at a time, so memory is bounded by the pipeline depth, never by the source or segment size.
//! Full packs are sealed by uploader threads off the critical path; the [`Packer`] names them
//! in an index file every so many packs and before each manifest. Segments are chunked
//! independently, so the chunk list does not depend on the thread count.

mod incremental;
mod segment;
mod stages;
mod state;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::bounded;
use memmap2::MmapMut;
use rayon::iter::{ParallelBridge, ParallelIterator};
use sbk_chunker::ChunkerParams;
use sbk_store::{Lock, Manifest, Repository, SnapshotId};

use crate::changed::ChangedList;
use crate::error::{EngineError, Result};
use crate::packer::Packer;
use crate::pool::worker_pool;
use crate::progress::Progress;
use crate::source::{Source, SourceSpec};
use incremental::{latest_of, plan_incremental, Incremental};
use segment::Work;
use stages::{chunk_segment, read_around, run_pipeline};
use state::RunState;

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

/// The host recorded in snapshots when none is given: this machine's host name.
pub fn default_host() -> String {
    sbk_store::host_name()
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

/// Backs up each source into its own snapshot, the sources in parallel. Returns one result per
/// source, in order: some may fail while others succeed. The outer error is a failure to set up
/// at all (bad chunker parameters, no threads).
pub fn backup(
    repo: &Repository,
    lock: &Lock,
    sources: &[SourceSpec],
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
    let state = RunState {
        repo,
        lock,
        params: chunker_params(repo)?,
        pool,
        packer: Packer::new(repo),
        started: sbk_store::unix_now(),
        buf_tx,
        buf_rx,
        buffers,
        allocated: AtomicUsize::new(0),
        running: Mutex::new(0),
        running_cv: Condvar::new(),
        work: Mutex::new(Some(work_tx)),
    };
    let results = std::thread::scope(|s| {
        let state = &state;
        state.packer.start_uploaders(s, UPLOADERS, UPLOAD_QUEUE)?;
        // The workers: every source's segments, in whatever order they come.
        s.spawn(move || {
            state.pool.install(|| {
                work_rx.into_iter().par_bridge().for_each(|w| {
                    let Work { seg, claimed, out } = w;
                    let chunked = seg.and_then(|mut seg| {
                        let r = read_around(state, &mut seg)
                            .and_then(|()| chunk_segment(state, &claimed, &seg));
                        if let Some(buf) = seg.buf.take() {
                            let _ = state.buf_tx.send(buf);
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
            .map(|(task, spec)| {
                s.spawn(move || {
                    state.start_source();
                    let r = backup_one(state, task, spec, opts, progress);
                    state.end_source();
                    r
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("backup threads do not panic"))
            .collect();
        if !state.packer.failed() {
            if let Err(e) = state.packer.flush() {
                // Every snapshot written sealed its own blobs first; what is lost here is data
                // that no snapshot refers to, which the next backup writes again.
                progress.notice(&format!(
                    "sealing the last pack failed: {e}; no snapshot depends on it"
                ));
            }
        }
        // Closing the queues ends the workers and the uploaders.
        state
            .work
            .lock()
            .expect("no thread panics holding this")
            .take();
        state.packer.close();
        Ok(results)
    });
    results
}

/// Backs up one source: plans an incremental, runs the pipeline (again, whole, if the
/// changed-block list lied), then writes the snapshot.
fn backup_one(
    state: &RunState<'_>,
    task: usize,
    spec: &SourceSpec,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    let time_ns = sbk_store::unix_now_ns();
    let mut source = Source::open_spec(spec)?;
    let path = source.path().to_owned();
    let label = match (&opts.source_name, spec) {
        (Some(name), _) => name.clone(),
        (None, SourceSpec::Path(path)) => std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_owned())
            .to_string_lossy()
            .into_owned(),
        (None, _) => {
            return Err(EngineError::SourceUnusable {
                path,
                reason: "a stream has no path to name it by: give it a source name".into(),
            })
        }
    };
    if source.is_stream() && opts.changed.is_some() {
        return Err(EngineError::ParentUnusable(
            "a stream is read whole: a changed-block list cannot skip parts of it".into(),
        ));
    }
    // For a stream, 0 until it was read: progress shows bytes without a total.
    let size = source.size();
    progress.start(task, &label, size);
    let open_fallback = source.fallback().map(str::to_owned);
    if let Some(why) = &open_fallback {
        progress.notice(&format!(
            "{label}: reading without O_DIRECT: {why}; buffered reads with posix_fadvise(DONTNEED)"
        ));
    }
    let mut incremental = plan_incremental(state, &label, size, opts, progress)?;
    let mut run = run_pipeline(state, task, &mut source, &incremental.plan, progress)?;
    if run.lied {
        // The list missed a change: the snapshot must not rely on it. Read everything.
        progress.notice(&format!(
            "{label}: THE CHANGED-BLOCK LIST IS WRONG: a segment it calls unchanged differs from the parent; reading the whole source instead"
        ));
        source = Source::open_spec(spec)?;
        if source.size() != size {
            return Err(EngineError::SourceResized {
                path: path.to_owned(),
                expected: size,
                found: source.size(),
            });
        }
        incremental.distrust(size.div_ceil(state.repo.config().segment_size));
        // A new count from zero: what the first pass did is not part of this one.
        progress.finish(task);
        progress.start(task, &format!("{label} (whole)"), size);
        run = run_pipeline(state, task, &mut source, &incremental.plan, progress)?;
    }
    progress.finish(task);
    // Whatever the reads saw, a source whose size moved, or a stream whose command failed, is
    // not one consistent disk.
    source.finish()?;
    let size = source.size();
    if source.is_stream() && size == 0 {
        // Most likely a producer that failed without saying so (a pipeline without pipefail).
        return Err(EngineError::SourceUnusable {
            path,
            reason: "it gave no bytes: there is nothing to back up".into(),
        });
    }
    if let Some(why) = &run.fallback {
        progress.notice(&format!(
            "{label}: reading without O_DIRECT: {why}; buffered reads with posix_fadvise(DONTNEED)"
        ));
    }
    let fallback = open_fallback.or(run.fallback.take());
    let (snapshot, manifest) = write_snapshot(
        state,
        &path,
        Manifest {
            time_ns,
            source: label,
            host: opts.host.clone(),
            tags: opts.tags.clone(),
            size,
            segment_size: state.repo.config().segment_size,
            parent: incremental.parent,
            figures: run.figures,
            trees: run.trees,
            extensions: Vec::new(),
        },
        incremental,
        run.skipped,
        opts,
        started,
    )?;
    Ok(BackupOutcome {
        snapshot,
        manifest,
        fallback,
    })
}

/// Writes the manifest of a run whose trees are all there: once every blob it refers to is
/// durable and indexed (the write ordering), with the changed-block record and the figures.
#[allow(clippy::too_many_arguments)]
fn write_snapshot(
    state: &RunState<'_>,
    path: &Path,
    mut manifest: Manifest,
    incremental: Incremental,
    skipped: u64,
    opts: &BackupOptions,
    started: Instant,
) -> Result<(SnapshotId, Manifest)> {
    let repo = state.repo;
    let segments = manifest.size.div_ceil(manifest.segment_size);
    if manifest.trees.len() as u64 != segments {
        // Cannot happen: the reader stops early only with an error, which reached the writer.
        // But a manifest that does not cover its source must never be written.
        return Err(EngineError::SourceResized {
            path: path.to_owned(),
            expected: manifest.size,
            found: manifest.trees.len() as u64 * manifest.segment_size,
        });
    }
    // A stop requested meanwhile writes no snapshot: the run ends as if it had failed here.
    crate::interrupt::check()?;
    // Ordering: every blob durable and indexed, then the manifest that refers to them.
    state.packer.flush()?;
    manifest.figures.duration_ms = started.elapsed().as_millis() as u64;
    if manifest.parent.is_none() {
        manifest.parent = latest_of(repo, &opts.host, &manifest.source)?;
    }
    if incremental.info.is_some() || opts.cbt_token.is_some() {
        let mut i = incremental.info.unwrap_or_default();
        i.token = opts.cbt_token.clone();
        let reused = incremental
            .plan
            .reuse
            .iter()
            .filter(|t| t.is_some())
            .count() as u64;
        i.segments_reused = reused;
        i.segments_read = segments - reused;
        i.bytes_skipped = skipped;
        manifest.set_changed_blocks(&i);
    }
    crate::interrupt::check()?;
    // Under Object Lock, what the snapshot needs is kept as long as it is protected, before
    // the manifest that makes it a snapshot.
    if repo.config().object_lock.is_some() {
        let parent = match incremental.parent {
            Some(id) => Some(repo.load_manifest(&id)?),
            None => None,
        };
        let written = state.packer.packs_written();
        crate::protect::protect(repo, &manifest, parent.as_ref(), (&written, state.started))?;
    }
    let snapshot = repo.write_manifest(&manifest)?;
    Ok((snapshot, manifest))
}
