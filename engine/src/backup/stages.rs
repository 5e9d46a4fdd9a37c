//! The stages of the pipeline for one source: the reader, the workers (zero runs, FastCDC,
//! ids, dedup, compression, new blobs into the packer) and the writer (segments into trees, in
//! order).

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver};
use sbk_chunker::{is_zero, split_changed, split_segment, Piece, Span, ZERO_BLOCK};
use sbk_store::{encode_tree, BackupFigures, BlobKind, ChunkId, Extent, Repository};

use super::incremental::Plan;
use super::segment::{Around, ChunkedSegment, Part, Segment, Work};
use super::state::RunState;
use crate::error::{EngineError, Result};
use crate::progress::Progress;
use crate::source::Source;

/// What one pass of the pipeline over a source produced.
pub(super) struct Run {
    pub(super) trees: Vec<ChunkId>,
    pub(super) figures: BackupFigures,
    pub(super) fallback: Option<String>,
    /// A re-read segment's tree differed from the parent's: the changed-block list is wrong.
    pub(super) lied: bool,
    /// Bytes not read because the changed-block list said they had not changed.
    pub(super) skipped: u64,
}

/// Reads, chunks and stores one source by `plan`.
pub(super) fn run_pipeline(
    state: &RunState<'_>,
    task: usize,
    source: &mut Source,
    plan: &Plan,
    progress: &dyn Progress,
) -> Result<Run> {
    let seg_size = state.repo.config().segment_size;
    // A stream's segments are counted as they are read.
    let segments = (!source.is_stream()).then(|| source.size().div_ceil(seg_size));
    let (out_tx, out_rx) = bounded::<Result<ChunkedSegment>>(1);
    let cancel = AtomicBool::new(false);
    let claimed = Arc::new(Mutex::new(HashSet::<ChunkId>::new()));
    let work = state
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
                match segments {
                    Some(n) => read_segments(state, source, seg_size, n, plan, &send, cancel),
                    None => read_stream(state, source, seg_size, &send, cancel),
                }
            })
        };
        let mut written = write_segments(state, task, &out_rx, progress, cancel);
        if written.is_err() {
            cancel.store(true, Ordering::Relaxed);
            // Drained, so that workers and reader can finish. Workers store their blobs: when a
            // pack write fails, the packer hands its cause to the first of them to notice and
            // EarlierWriteFailed to the others, in whatever order their segments come. Report
            // the cause (a storage gone is exit 18, not 12).
            for r in out_rx.iter() {
                if let (Err(EngineError::EarlierWriteFailed), Err(cause)) = (&written, r) {
                    written = Err(cause);
                }
            }
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

/// The reader: segments in order into pooled, aligned buffers. Returns why O_DIRECT was
/// abandoned if that happened during the reads. Long (about 90 lines): one branch per kind of
/// segment (reused unread, read around its changes, read whole, a hole), in one loop that owns
/// the spare buffer.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_segments(
    state: &RunState<'_>,
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
                reuse: Some(tree),
                skipped: len,
                ..Segment::new(index, len)
            };
            if !send(Ok(seg)) {
                break;
            }
            continue;
        }
        let mut buf = match spare
            .take()
            .map(|b| Ok(Some(b)))
            .unwrap_or_else(|| state.buffer(seg_size))
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
        if let Some((tree, changed)) = plan.around.get(&index) {
            let seg = source.try_clone().map(|source| Segment {
                buf: Some(buf),
                around: Some(Around {
                    source,
                    tree: *tree,
                    changed: changed.clone(),
                }),
                ..Segment::new(index, len)
            });
            let failed = seg.is_err();
            if !send(seg) || failed {
                break;
            }
            continue;
        }
        // Checked after the read: a source truncated before or during it reads as a hole.
        let read = source
            .read_segment(start..start + len, &mut buf)
            .and_then(|r| source.check_size().map(|()| r));
        let seg = match read {
            Ok(Some(read)) => Ok(Segment {
                read,
                buf: Some(buf),
                ..Segment::new(index, len)
            }),
            Ok(None) => {
                spare = Some(buf);
                Ok(Segment::new(index, len))
            }
            Err(e) => Err(e),
        };
        let failed = seg.is_err();
        if !send(seg) || failed {
            break;
        }
    }
    if let Some(b) = spare {
        let _ = state.buf_tx.send(b);
    }
    if had_fallback {
        None
    } else {
        source.fallback().map(str::to_owned)
    }
}

/// The reader of a stream: segments in order, each filled to the segment size but the last;
/// a segment of zeros is passed on as a hole (no chunking, no hashing).
pub(super) fn read_stream(
    state: &RunState<'_>,
    source: &mut Source,
    seg_size: u64,
    send: &dyn Fn(Result<Segment>) -> bool,
    cancel: &AtomicBool,
) -> Option<String> {
    for index in 0.. {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        if let Err(e) = crate::interrupt::check() {
            send(Err(e));
            break;
        }
        let mut buf = match state.buffer(seg_size) {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                send(Err(EngineError::SourceRead {
                    path: source.path().to_owned(),
                    offset: source.size(),
                    source: e,
                }));
                break;
            }
        };
        let n = match source.read_stream(&mut buf[..seg_size as usize]) {
            Ok(n) => n,
            Err(e) => {
                let _ = state.buf_tx.send(buf);
                send(Err(e));
                break;
            }
        };
        let last = (n as u64) < seg_size;
        let seg = if n == 0 {
            let _ = state.buf_tx.send(buf);
            break;
        } else if buf[..n].chunks(ZERO_BLOCK).all(is_zero) {
            let _ = state.buf_tx.send(buf);
            Segment::new(index, n as u64)
        } else {
            Segment {
                read: n as u64,
                buf: Some(buf),
                ..Segment::new(index, n as u64)
            }
        };
        if !send(Ok(seg)) || last {
            break;
        }
    }
    None
}

/// Reads a segment that comes with [`Around`]: only around its changed ranges, re-split against
/// the parent's tree (see [`split_changed`]), which gives the split a whole read would give. When
/// the parent's tree cannot be used (unreadable, or naming a chunk the index does not know), the
/// segment is read whole.
pub(super) fn read_around(state: &RunState<'_>, seg: &mut Segment) -> Result<()> {
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
    let start = seg.index * state.repo.config().segment_size;
    let len = seg.len as u64;
    let Some(parent) = parent_spans(state.repo, &tree, len)? else {
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
    let (pieces, loaded) = split_changed(buf, seg.len, &state.params, &spans, &changed, &mut fill)?;
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
pub(super) fn parent_spans(
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

/// New blobs a worker holds before it hands them to the packer: enough that a pack holds long
/// runs of one segment's chunks in order (a restore reads them in few requests), and little
/// enough that a worker's memory does not grow with the segment size (a segment's blobs used to
/// travel to the writer whole: 16 MiB per segment in flight, for incompressible data).
const HAND_OVER_BYTES: usize = 4 << 20;

/// A worker: zero runs and FastCDC chunks, ids, dedup, compression of new blobs, which it hands
/// to the packer every [`HAND_OVER_BYTES`].
pub(super) fn chunk_segment(
    state: &RunState<'_>,
    claimed: &Mutex<HashSet<ChunkId>>,
    seg: &Segment,
) -> Result<ChunkedSegment> {
    let repo = state.repo;
    let mut done = ChunkedSegment {
        index: seg.index,
        len: seg.len,
        extents: Vec::new(),
        reuse: seg.reuse,
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
    let mut held = Vec::new();
    let mut held_bytes = 0;
    // Stored: the run's unindexed set knows them now, which keeps `claimed` as small as the
    // blobs the workers hold.
    let hand_over = |held: &mut Vec<sbk_store::EncodedBlob>, done: &mut ChunkedSegment| {
        done.figures.new_stored += state.packer.add(held)?;
        let mut claimed = claimed.lock().expect("no thread panics holding this lock");
        for b in held.drain(..) {
            claimed.remove(&b.header.id);
        }
        Ok::<_, EngineError>(())
    };
    // The spans cut anew, and their ids, first; then what looking those up will read is asked
    // for at once. Under a memory limit the index table's pages are mostly on disk, and a
    // lookup that waited for its read stalled the worker: now the reads overlap the encoding
    // of the chunks before them.
    let spans: Vec<Span> = match &seg.parts {
        Some(parts) => parts
            .iter()
            .filter_map(|p| match p {
                Part::New(span) => Some(*span),
                Part::Kept(_) => None,
            })
            .collect(),
        None => split_segment(data, &state.params),
    };
    let ids: Vec<ChunkId> = spans
        .iter()
        .filter_map(|span| match *span {
            Span::Data { offset, len } => Some(repo.blob_id(&data[offset..offset + len])),
            Span::Zero { .. } => None,
        })
        .collect();
    repo.index()?.prefetch(&ids);
    let mut ids = ids.into_iter();
    let mut add = |span: Span, done: &mut ChunkedSegment| -> Result<()> {
        let figures = &mut done.figures;
        match span {
            Span::Zero { len, .. } => {
                figures.bytes_zero += len as u64;
                done.extents.push(Extent::Zero { len: len as u32 });
            }
            Span::Data { offset, len } => {
                let bytes = &data[offset..offset + len];
                let id = ids.next().expect("an id for each data span");
                figures.chunks += 1;
                done.extents.push(Extent::Data {
                    id,
                    len: len as u32,
                });
                // Never dedup against a pack prune marked: a later prune may delete it.
                if !repo.dedup_hit(&id)?
                    && !state.written(&id)
                    && claimed
                        .lock()
                        .expect("no thread panics holding this lock")
                        .insert(id)
                {
                    let blob = repo.encode_blob(id, BlobKind::Data, bytes)?;
                    figures.new_chunks += 1;
                    figures.new_raw += len as u64;
                    held_bytes += blob.data.len();
                    held.push(blob);
                    if held_bytes >= HAND_OVER_BYTES {
                        held_bytes = 0;
                        hand_over(&mut held, done)?;
                    }
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
            for span in spans {
                add(span, &mut done)?;
            }
        }
    }
    hand_over(&mut held, &mut done)?;
    Ok(done)
}

/// The writer: turns segments, in order, into tree blobs and adds up their figures.
pub(super) fn write_segments(
    state: &RunState<'_>,
    task: usize,
    chunked: &Receiver<Result<ChunkedSegment>>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<(Vec<ChunkId>, BackupFigures, u64)> {
    let repo = state.repo;
    let mut figures = BackupFigures::default();
    let mut skipped = 0;
    let mut trees = Vec::new();
    let mut pending = BTreeMap::new();
    let mut tree_ids = HashSet::new();
    for seg in chunked.iter() {
        let seg = seg?;
        let f = &seg.figures;
        figures.new_stored += f.new_stored;
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
            if !repo.dedup_hit(&id)? && !state.written(&id) && tree_ids.insert(id) {
                let blob = repo.encode_blob(id, BlobKind::Tree, &raw)?;
                figures.new_stored += state.packer.add(std::slice::from_ref(&blob))?;
            }
            trees.push(id);
        }
        if cancel.load(Ordering::Relaxed) {
            break;
        }
    }
    Ok((trees, figures, skipped))
}
