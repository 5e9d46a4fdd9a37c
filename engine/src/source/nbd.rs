//! NBD block status for sources: an export's extents by metadata context (`base:allocation`
//! for data, a QEMU dirty bitmap for what changed).

use std::io;
use std::ops::Range;

use sbk_nbd::client::Client;
use sbk_nbd::proto::{CONTEXT_DIRTY_BITMAP, STATE_DIRTY};

use super::{Backing, Source};
use crate::error::{EngineError, Result};

/// The ranges of `range` whose `context` flags satisfy `wanted`, from an NBD export's block
/// status (asked again from where each reply ends, as servers may answer short).
pub(super) fn nbd_extents(
    c: &mut Client,
    range: Range<u64>,
    context: &str,
    wanted: impl Fn(u32) -> bool,
) -> io::Result<Vec<Range<u64>>> {
    let id = c.context(context).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the export has no metadata context {context}"),
        )
    })?;
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        // Block status lengths are 32-bit: ask for at most 1 GiB at a time.
        let len = (range.end - pos).min(1 << 30) as u32;
        let mut replies = c.block_status(pos, len)?;
        let extents = replies.remove(&id).unwrap_or_default();
        if extents.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no {context} extents at {pos}"),
            ));
        }
        for (n, flags) in extents {
            if n == 0 {
                // The protocol forbids it; taken, it would have us ask for ever.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an empty {context} extent at {pos}"),
                ));
            }
            let end = (pos + u64::from(n)).min(range.end);
            if wanted(flags) {
                match out.last_mut() {
                    Some(last) if last.end == pos => last.end = end,
                    _ => out.push(pos..end),
                }
            }
            pos = end;
            if pos >= range.end {
                break;
            }
        }
    }
    Ok(out)
}

/// The changed ranges an NBD export's QEMU dirty bitmap `name` records (`qemu-nbd -B NAME`), or
/// `None` when the export has no such bitmap.
pub fn dirty_ranges(source: &Source, name: &str) -> Result<Option<Vec<Range<u64>>>> {
    let Backing::Nbd(c) = &source.backing else {
        return Err(EngineError::SourceUnusable {
            path: source.path.clone(),
            reason: "a dirty bitmap is read from an NBD export (nbd://...)".into(),
        });
    };
    let context = format!("{CONTEXT_DIRTY_BITMAP}{name}");
    let mut c = c.lock().expect("no thread panics holding this");
    if c.context(&context).is_none() {
        return Ok(None);
    }
    nbd_extents(&mut c, 0..source.size, &context, |flags| {
        flags & STATE_DIRTY != 0
    })
    .map(Some)
    .map_err(|e| EngineError::SourceRead {
        path: source.path.clone(),
        offset: 0,
        source: e,
    })
}
