//! The restore pipeline.
//!
//! To a file or device: the chunks a snapshot needs are read pack by pack, in pack order, with
//! reads coalesced across neighbouring blobs; worker threads decompress and verify each against
//! its id and write it with positioned writes wherever the snapshot has it (O_DIRECT for the
//! block-aligned middle of a chunk, buffered for its edges). Zero extents become holes in a file
//! and zeros on a device. To stdout: extents are fetched in parallel windows and written in order.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use memmap2::MmapMut;
use rayon::prelude::*;
use sbk_store::{
    BlobKind, ChunkId, Extent, Manifest, PackEntry, PackGone, PackId, Repository, SnapshotId,
    StoreError, READ_GAP_BYTES, READ_RUN_BYTES,
};

use crate::error::{EngineError, Result};
use crate::pool::worker_pool;
use crate::progress::Progress;
use crate::snapshot::{load_extents, windows};
use crate::source::{align_down, align_up, ALIGN};
use crate::sys;

/// Where to restore to.
#[derive(Debug, Clone)]
pub enum RestoreTarget {
    /// A regular file (created, or replaced with `force`) or a block device.
    Path(PathBuf),
    /// Standard output, in order.
    Stdout,
}

/// How to restore.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// Worker threads.
    pub threads: usize,
    /// Overwrite a non-empty file or a block device.
    pub force: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreStats {
    /// Bytes of the snapshot (the size of the restored image).
    pub size: u64,
    /// Bytes written from data chunks.
    pub data_bytes: u64,
    /// Bytes of zero extents (holes, or zeros written to a device).
    pub zero_bytes: u64,
    /// Chunk reads, each verified. A chunk is read once per piece of the plan that uses it (a
    /// piece is at most `EXTENTS_AT_ONCE` extents of a window; to standard output, once per
    /// extent): counting distinct chunks across pieces would take memory per chunk.
    pub chunks: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Whether the middles of chunks went through O_DIRECT.
    pub direct_io: bool,
}

/// Restores snapshot `id` to `target`.
pub fn restore(
    repo: &Repository,
    id: &SnapshotId,
    target: &RestoreTarget,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let started = Instant::now();
    let manifest = repo.load_manifest(id)?;
    // The snapshot may be newer than the loaded index (its backup finished since): its index
    // file was written before its manifest, so a refresh now knows every blob it needs.
    repo.refresh_index()?;
    let pool = worker_pool(opts.threads, "restore")?;
    let mut stats = pool.install(|| -> Result<RestoreStats> {
        match target {
            RestoreTarget::Stdout => restore_stream(repo, &manifest, progress),
            RestoreTarget::Path(path) => {
                let out = Output::open(path, manifest.size, opts.force)?;
                progress.start(0, &path.to_string_lossy(), manifest.size);
                let r = windows(&manifest)
                    .try_fold(RestoreStats::default(), |mut total, w| {
                        let extents = load_extents(repo, &manifest, w)?;
                        // At most EXTENTS_AT_ONCE at a time: a window of small chunks holds
                        // millions (a chunk in two pieces is read twice).
                        for piece in extents.chunks(EXTENTS_AT_ONCE) {
                            let s = restore_positioned(repo, piece, &out, progress)?;
                            total.data_bytes += s.data_bytes;
                            total.zero_bytes += s.zero_bytes;
                            total.chunks += s.chunks;
                            total.direct_io = s.direct_io;
                        }
                        Ok(total)
                    })
                    .and_then(|s| out.commit().map(|()| s));
                progress.finish(0);
                if r.is_err() {
                    out.discard();
                }
                r
            }
        }
    })?;
    stats.size = manifest.size;
    stats.duration_ms = started.elapsed().as_millis() as u64;
    Ok(stats)
}

/// Extents a restore plans and reads at once (about 30 MiB of plan): a window of 4 KiB chunks
/// holds millions. (Unit tests use a few, so that every restore of theirs is cut in pieces.)
const EXTENTS_AT_ONCE: usize = if cfg!(test) { 16 } else { 1 << 17 };

/// A file or device being restored to.
struct Output {
    /// Where the result must end up.
    path: PathBuf,
    /// Where it is written: a temporary file beside `path`, or the device itself.
    write_path: PathBuf,
    file: File,
    direct: Option<File>,
    direct_ok: AtomicBool,
    device: bool,
}

impl Output {
    /// Opens the target. Long (about 90 lines): every refusal (a directory, an existing file
    /// without `--force`, a device too small) comes before anything is created, in the order an
    /// operator reads them.
    fn open(path: &Path, size: u64, force: bool) -> Result<Self> {
        let target_err = |source| EngineError::Target {
            path: path.to_owned(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(target_err(e)),
        };
        let device = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        match &meta {
            Some(m) if m.is_dir() => {
                return Err(EngineError::TargetUnusable {
                    path: path.to_owned(),
                    reason: "it is a directory".into(),
                })
            }
            Some(m) if !m.is_file() && !device => {
                return Err(EngineError::TargetUnusable {
                    path: path.to_owned(),
                    reason: "it is not a regular file or block device".into(),
                })
            }
            // A device always holds something: overwriting one is never implicit.
            Some(_) if device && !force => {
                return Err(EngineError::TargetExists {
                    path: path.to_owned(),
                })
            }
            Some(m) if m.is_file() && m.len() > 0 && !force => {
                return Err(EngineError::TargetExists {
                    path: path.to_owned(),
                })
            }
            _ => {}
        }
        let open = |p: &Path, direct: bool, create: bool| {
            let mut o = File::options();
            o.write(true);
            if create {
                o.create(true).truncate(true);
            }
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(p)
        };
        let write_path = if device {
            path.to_owned()
        } else {
            // A file is restored under a temporary name and renamed into place when complete,
            // so a failed restore never leaves a half-written image under the target's name.
            let name = path
                .file_name()
                .ok_or_else(|| EngineError::TargetUnusable {
                    path: path.to_owned(),
                    reason: "it has no file name".into(),
                })?;
            path.with_file_name(format!(".{}.sbk-restore", name.to_string_lossy()))
        };
        let file = open(&write_path, false, !device).map_err(target_err)?;
        if device {
            let dev_size = sys::block_device_size(&file).map_err(target_err)?;
            if dev_size < size {
                return Err(EngineError::TargetTooSmall {
                    path: path.to_owned(),
                    size: dev_size,
                    needed: size,
                });
            }
        } else {
            // Setting the length leaves every byte a hole; zero extents are simply not written.
            file.set_len(size).map_err(|e| {
                let _ = std::fs::remove_file(&write_path);
                target_err(e)
            })?;
        }
        // O_DIRECT only splits chunks on 4096-byte bounds: with larger pages a direct write and a
        // buffered edge could share a page, which older kernels do not keep coherent.
        let direct = (sys::page_size() == ALIGN as usize)
            .then(|| open(&write_path, true, false).ok())
            .flatten();
        Ok(Output {
            path: path.to_owned(),
            write_path,
            direct_ok: AtomicBool::new(direct.is_some()),
            file,
            direct,
            device,
        })
    }

    fn err(&self, source: std::io::Error) -> EngineError {
        EngineError::Target {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `data` at `offset`. `data`'s address must be congruent to `offset` modulo
    /// [`ALIGN`], so that its block-aligned middle can go out through O_DIRECT.
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let end = offset + data.len() as u64;
        let mid_start = align_up(offset).min(end);
        let mid_end = align_down(end).max(mid_start);
        let slice = |a: u64, b: u64| &data[(a - offset) as usize..(b - offset) as usize];
        if mid_end > mid_start && self.direct_ok.load(Ordering::Relaxed) {
            let direct = self
                .direct
                .as_ref()
                .expect("direct_ok implies a direct handle");
            match direct.write_all_at(slice(mid_start, mid_end), mid_start) {
                Ok(()) => {
                    self.file
                        .write_all_at(slice(offset, mid_start), offset)
                        .map_err(|e| self.err(e))?;
                    return self
                        .file
                        .write_all_at(slice(mid_end, end), mid_end)
                        .map_err(|e| self.err(e));
                }
                // The filesystem took the O_DIRECT open but refuses the write: buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.err(e))
    }

    /// Makes the restored image durable and, for a file, gives it its name.
    fn commit(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| self.err(e))?;
        if !self.device {
            std::fs::rename(&self.write_path, &self.path).map_err(|e| self.err(e))?;
            let dir = self
                .path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn discard(&self) {
        if !self.device {
            let _ = std::fs::remove_file(&self.write_path);
        }
    }
}

/// One coalesced read: neighbouring blobs of one pack, with the target offsets of each.
struct Batch {
    pack: PackId,
    entries: Vec<PackEntry>,
    /// Where each blob of `entries` goes in the target.
    offsets: Vec<Vec<u64>>,
}

fn restore_positioned(
    repo: &Repository,
    extents: &[(u64, Extent)],
    out: &Output,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let mut stats = RestoreStats::default();
    let mut wanted: HashMap<_, Vec<u64>> = HashMap::new();
    let mut zeros = Vec::new();
    for &(offset, x) in extents {
        match x {
            Extent::Data { id, len } => {
                wanted.entry(id).or_default().push(offset);
                stats.data_bytes += u64::from(len);
            }
            Extent::Zero { len } => {
                zeros.push((offset, u64::from(len)));
                stats.zero_bytes += u64::from(len);
            }
        }
    }
    stats.chunks = wanted.len() as u64;
    // Every chunk is located before anything is written: a missing one fails the restore early.
    // Sorted, the ids are looked up in one pass over the index table.
    let mut wanted: Vec<(ChunkId, Vec<u64>)> = wanted.into_iter().collect();
    wanted.sort_unstable_by_key(|(id, _)| *id);
    let ids: Vec<ChunkId> = wanted.iter().map(|(id, _)| *id).collect();
    let mut found = vec![None; ids.len()];
    repo.index()?.get_sorted(&ids, |i, e| found[i] = e);
    if found.iter().any(Option::is_none) {
        // Not in the index as loaded: a damaged block of the local cache (a refresh rebuilds
        // it), or really missing (the lookup after the refresh says so).
        repo.refresh_index()?;
        repo.index()?.get_sorted(&ids, |i, e| found[i] = e);
    }
    let mut located = Vec::with_capacity(ids.len());
    for ((id, offsets), e) in wanted.into_iter().zip(found) {
        let e = e.ok_or(StoreError::BlobMissing(id))?;
        located.push((e.pack, e.entry, offsets));
    }
    located.sort_by_key(|(pack, entry, _)| (*pack, entry.offset));
    let mut batches: Vec<Batch> = Vec::new();
    for (pack, entry, offsets) in located {
        match batches.last_mut() {
            Some(b)
                if b.pack == pack && {
                    let first = &b.entries[0];
                    let last = b.entries.last().expect("batches are never empty");
                    // The read path's own rule for reading blobs together.
                    entry.offset <= last.end() + READ_GAP_BYTES
                        && entry.end() - first.offset <= READ_RUN_BYTES
                } =>
            {
                b.entries.push(entry);
                b.offsets.push(offsets);
            }
            _ => batches.push(Batch {
                pack,
                entries: vec![entry],
                offsets: vec![offsets],
            }),
        }
    }
    let max_raw = batches
        .iter()
        .flat_map(|b| &b.entries)
        .map(|e| e.raw_len as usize)
        .max()
        .unwrap_or(0);
    let buffers = || -> std::io::Result<Buffers> {
        Ok(Buffers {
            run: Run {
                buf: MmapMut::map_anon(RUN_BYTES + max_raw + ALIGN as usize)?,
                start: 0,
                shift: 0,
                len: 0,
            },
            copy: MmapMut::map_anon(max_raw + ALIGN as usize)?,
            read: Vec::new(),
        })
    };
    batches
        .par_iter()
        .try_for_each_init(buffers, |state, batch| {
            let b = state
                .as_mut()
                .map_err(|e| out.err(std::io::Error::new(e.kind(), e.to_string())))?;
            restore_batch(repo, batch, out, b, progress)
        })?;
    if out.device {
        write_zeros(out, &zeros, progress)?;
    } else {
        progress.advance(0, stats.zero_bytes);
    }
    stats.direct_io = out.direct_ok.load(Ordering::Relaxed);
    Ok(stats)
}

/// A run of chunks that follow each other in the target, decoded back to back into one aligned
/// buffer so that they go out in one large write (one O_DIRECT call for the aligned middle)
/// instead of one small synchronous write per chunk.
struct Run {
    buf: MmapMut,
    /// Target offset of the first byte.
    start: u64,
    /// Where the first byte sits in `buf`: `start % ALIGN`, which keeps addresses congruent to
    /// target offsets (see `Output::write_at`).
    shift: usize,
    len: usize,
}

/// Decoded runs are flushed once they reach this size.
const RUN_BYTES: usize = 8 << 20;

impl Run {
    fn flush(&mut self, out: &Output, progress: &dyn Progress) -> Result<()> {
        if self.len > 0 {
            out.write_at(&self.buf[self.shift..self.shift + self.len], self.start)?;
            progress.advance(0, self.len as u64);
            self.len = 0;
        }
        Ok(())
    }

    /// Room for a chunk of `len` bytes at target offset `offset`: the end of the run when the
    /// chunk continues it and fits, else (after flushing) the start of a new run. The caller
    /// fills it and then calls [`Run::commit`].
    fn slot(
        &mut self,
        offset: u64,
        len: usize,
        out: &Output,
        progress: &dyn Progress,
    ) -> Result<&mut [u8]> {
        let continues = offset == self.start + self.len as u64 && self.len + len <= RUN_BYTES;
        if self.len > 0 && !continues {
            self.flush(out, progress)?;
        }
        if self.len == 0 {
            self.start = offset;
            self.shift = (offset % ALIGN) as usize;
        }
        let at = self.shift + self.len;
        Ok(&mut self.buf[at..at + len])
    }

    fn commit(&mut self, len: usize) {
        self.len += len;
    }
}

/// Per-thread buffers of a positioned restore.
struct Buffers {
    run: Run,
    /// For a chunk that the snapshot holds at several offsets: its copies go out from here.
    copy: MmapMut,
    /// The coalesced read of a batch.
    read: Vec<u8>,
}

fn restore_batch(
    repo: &Repository,
    batch: &Batch,
    out: &Output,
    b: &mut Buffers,
    progress: &dyn Progress,
) -> Result<()> {
    let Buffers { run, copy, read } = b;
    repo.read_blobs(
        batch.pack,
        &batch.entries,
        PackGone::FollowIndex,
        read,
        |i, blob| -> Result<()> {
            let blob = blob?;
            let offsets = &batch.offsets[i];
            let len = blob.entry().raw_len as usize;
            let slot = run.slot(offsets[0], len, out, progress)?;
            // Verified before it can be written: a damaged chunk never reaches the target.
            blob.open_into(slot)?;
            for &offset in &offsets[1..] {
                let shift = (offset % ALIGN) as usize;
                copy[shift..shift + len].copy_from_slice(slot);
                out.write_at(&copy[shift..shift + len], offset)?;
                progress.advance(0, len as u64);
            }
            run.commit(len);
            Ok(())
        },
    )?;
    run.flush(out, progress)
}

/// Writes the zero extents to a device, from one aligned buffer of zeros.
fn write_zeros(out: &Output, zeros: &[(u64, u64)], progress: &dyn Progress) -> Result<()> {
    const ZERO_BUF: u64 = 8 << 20;
    let buf = MmapMut::map_anon(ZERO_BUF as usize).map_err(|e| out.err(e))?;
    let pieces: Vec<(u64, u64)> = zeros
        .iter()
        .flat_map(|&(offset, len)| {
            (0..len.div_ceil(ZERO_BUF))
                .map(move |i| (offset + i * ZERO_BUF, (len - i * ZERO_BUF).min(ZERO_BUF)))
        })
        .collect();
    pieces.par_iter().try_for_each(|&(offset, len)| {
        let shift = (offset % ALIGN) as usize;
        // The buffer is page aligned; a zero run that does not start on a block (only possible
        // at the very end of a source) takes its bytes from the same shift into it.
        let len = (len as usize).min(buf.len() - shift);
        out.write_at(&buf[shift..shift + len], offset)?;
        progress.advance(0, len as u64);
        Ok(())
    })
}

/// Streams the snapshot to stdout in order: windows of extents are fetched in parallel and
/// written in sequence.
fn restore_stream(
    repo: &Repository,
    manifest: &Manifest,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    const WINDOW: u64 = 64 << 20;
    let stdout_err = |source| EngineError::Target {
        path: PathBuf::from("-"),
        source,
    };
    let mut stats = RestoreStats::default();
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    let zeros = vec![0u8; 1 << 20];
    progress.start(0, "stdout", manifest.size);
    for segments in windows(manifest) {
        let extents = load_extents(repo, manifest, segments)?;
        let mut rest = &extents[..];
        while !rest.is_empty() {
            let mut n = 0;
            let mut bytes = 0;
            while n < rest.len() && (n == 0 || bytes < WINDOW) {
                bytes += u64::from(rest[n].1.len());
                n += 1;
            }
            let (window, tail) = rest.split_at(n);
            rest = tail;
            let chunks: Vec<Option<Vec<u8>>> = window
                .par_iter()
                .map(|(_, x)| match x {
                    Extent::Data { id, .. } => repo
                        .read_blob(id, BlobKind::Data)
                        .map(Some)
                        .map_err(EngineError::from),
                    Extent::Zero { .. } => Ok(None),
                })
                .collect::<Result<_>>()?;
            for ((_, x), data) in window.iter().zip(chunks) {
                match data {
                    Some(d) => {
                        w.write_all(&d).map_err(stdout_err)?;
                        stats.data_bytes += d.len() as u64;
                        stats.chunks += 1;
                    }
                    None => {
                        let mut left = x.len() as usize;
                        while left > 0 {
                            let k = left.min(zeros.len());
                            w.write_all(&zeros[..k]).map_err(stdout_err)?;
                            left -= k;
                        }
                        stats.zero_bytes += u64::from(x.len());
                    }
                }
                progress.advance(0, u64::from(x.len()));
            }
        }
    }
    w.flush().map_err(stdout_err)?;
    progress.finish(0);
    Ok(stats)
}
