//! What flows between the stages of the pipeline: segments read, the work handed to the
//! workers, and segments chunked.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use memmap2::MmapMut;
use sbk_chunker::Span;
use sbk_store::{BackupFigures, ChunkId, Extent};

use crate::error::Result;
use crate::source::Source;

/// A segment read from the source; `buf` is `None` for a segment that is one hole, or one whose
/// tree is reused from the parent unread (`reuse`). A segment to be read only around its changes
/// comes with `around` and an empty buffer: the worker reads it (the re-split decides what to
/// read, and is as much work per byte as chunking), and fills in `parts`.
pub(super) struct Segment {
    pub(super) index: u64,
    pub(super) len: usize,
    pub(super) buf: Option<MmapMut>,
    pub(super) read: u64,
    pub(super) reuse: Option<ChunkId>,
    pub(super) around: Option<Around>,
    /// The parent's extents kept unread and the spans cut anew (whose bytes are in `buf`).
    pub(super) parts: Option<Vec<Part>>,
    /// Bytes of the segment that the changed-block list let the reader skip.
    pub(super) skipped: u64,
}

impl Segment {
    /// Segment `index` of `len` bytes, nothing read or planned yet (a hole until `buf` is set).
    pub(super) fn new(index: u64, len: u64) -> Self {
        Segment {
            index,
            len: len as usize,
            buf: None,
            read: 0,
            reuse: None,
            around: None,
            parts: None,
            skipped: 0,
        }
    }
}

/// What a worker needs to read a segment around its changes.
pub(super) struct Around {
    /// A handle of the source for this segment's reads (the reader keeps reading with its own).
    pub(super) source: Source,
    /// The parent's tree of the segment.
    pub(super) tree: ChunkId,
    /// The changed ranges, relative to the segment.
    pub(super) changed: Vec<Range<usize>>,
}

/// A piece of a segment read only around its changes.
pub(super) enum Part {
    /// The parent's extent, whose bytes did not change.
    Kept(Extent),
    /// A span cut anew from bytes read.
    New(Span),
}

/// A segment after chunking: its extents (or the parent's tree, reused); its new blobs are in
/// the packer already.
pub(super) struct ChunkedSegment {
    pub(super) index: u64,
    pub(super) len: usize,
    pub(super) extents: Vec<Extent>,
    pub(super) reuse: Option<ChunkId>,
    pub(super) figures: BackupFigures,
    pub(super) skipped: u64,
}

/// A segment for the workers, with where its result goes.
pub(super) struct Work {
    pub(super) seg: Result<Segment>,
    /// The source's ids a worker has encoded and not yet handed to the packer.
    pub(super) claimed: Arc<Mutex<HashSet<ChunkId>>>,
    /// The source's writer.
    pub(super) out: Sender<Result<ChunkedSegment>>,
}
