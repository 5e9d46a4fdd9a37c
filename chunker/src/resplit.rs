//! Re-splitting a segment after a few of its blocks changed, reading only around the changes.
//!
//! FastCDC restarts at every chunk boundary (a cut depends only on the bytes since the previous
//! cut) and zero runs are found block by block, so the split of a changed segment agrees with the
//! split of its previous version before the changes and, once a cut falls on one of the old cuts
//! after them, again from there on. [`split_changed`] finds, for each changed range, the last old
//! boundary that the change cannot have moved, splits from there over a window of bytes it reads
//! through a callback, and stops at the first new boundary past the change that is an old one
//! too. The result is exactly what [`split_segment`](crate::split_segment) gives for the whole new
//! segment (the property tests compare the two), at the cost of reading a chunk or two around
//! each change instead of the segment.

use std::ops::Range;

use crate::{split_from, ChunkerParams, Span, ZERO_BLOCK};

/// A span of a re-split segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// The previous version's span of this index, unchanged (its bytes were not read).
    Kept(usize),
    /// A span cut anew; its bytes are in the buffer.
    New(Span),
}

impl Piece {
    /// The span this piece stands for, given the previous version's spans.
    pub fn span(self, parent: &[Span]) -> Span {
        match self {
            Piece::Kept(k) => parent[k],
            Piece::New(span) => span,
        }
    }
}

/// How [`split_changed`] asks for bytes: fill `data[range]` (the second argument is the whole
/// segment buffer) with the segment's bytes.
pub type Fill<'a, E> = dyn FnMut(Range<usize>, &mut [u8]) -> Result<(), E> + 'a;

/// Tracks which blocks of the buffer hold the segment's bytes, and reads the others on demand.
struct Loader<'a, E> {
    loaded: Vec<bool>,
    len: usize,
    fill: &'a mut Fill<'a, E>,
}

impl<E> Loader<'_, E> {
    /// Makes `range` (rounded out to blocks, clipped to the segment) readable in `data`, reading
    /// each run of missing blocks with one call.
    fn ensure(&mut self, range: Range<usize>, data: &mut [u8]) -> Result<(), E> {
        let first = range.start / ZERO_BLOCK;
        let last = range.end.min(self.len).div_ceil(ZERO_BLOCK);
        let mut b = first;
        while b < last {
            if self.loaded[b] {
                b += 1;
                continue;
            }
            let run = b;
            while b < last && !self.loaded[b] {
                self.loaded[b] = true;
                b += 1;
            }
            (self.fill)(run * ZERO_BLOCK..(b * ZERO_BLOCK).min(self.len), data)?;
        }
        Ok(())
    }

    /// Bytes loaded so far.
    fn loaded_bytes(&self) -> usize {
        let blocks = self.loaded.iter().filter(|l| **l).count();
        let short_tail = self.loaded.last() == Some(&true) && !self.len.is_multiple_of(ZERO_BLOCK);
        blocks * ZERO_BLOCK
            - if short_tail {
                ZERO_BLOCK - self.len % ZERO_BLOCK
            } else {
                0
            }
    }
}

/// Changed ranges rounded out to whole blocks, clipped to `len`, sorted and merged.
fn blocks_of(changed: &[Range<usize>], len: usize) -> Vec<Range<usize>> {
    let mut r: Vec<Range<usize>> = changed
        .iter()
        .filter(|c| c.start < c.end && c.start < len)
        .map(|c| {
            c.start - c.start % ZERO_BLOCK
                ..c.end
                    .div_ceil(ZERO_BLOCK)
                    .saturating_mul(ZERO_BLOCK)
                    .min(len)
        })
        .collect();
    r.sort_by_key(|c| c.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(r.len());
    for c in r {
        match out.last_mut() {
            Some(last) if c.start <= last.end => last.end = last.end.max(c.end),
            _ => out.push(c),
        }
    }
    out
}

/// Splits a segment of `len` bytes whose previous version split into `parent`, given the byte
/// ranges (`changed`, relative to the segment) outside which its bytes are the previous
/// version's. Returns what [`split_segment`](crate::split_segment) of the whole new segment
/// returns, as previous spans kept and spans cut anew, and the bytes it had to load.
///
/// `data` is the segment's buffer (at least `len` bytes); only blocks that `fill(range, data)`
/// was asked to load into `data[range]` are looked at. Ranges asked for start on a
/// [`ZERO_BLOCK`] and end on one or at `len`; each block is asked for once. `parent` must cover
/// `len` bytes exactly (as a segment tree of the same length does).
pub fn split_changed<E>(
    data: &mut [u8],
    len: usize,
    params: &ChunkerParams,
    parent: &[Span],
    changed: &[Range<usize>],
    fill: &mut Fill<'_, E>,
) -> Result<(Vec<Piece>, usize), E> {
    // A first window of two margins past the change usually holds the resync point.
    let lookahead = 2 * (params.max as usize + params.zero_min as usize);
    split_changed_with(data, len, params, parent, changed, fill, lookahead)
}

/// [`split_changed`] with the first window reaching `lookahead` bytes past each change (the
/// tests set it to 0 to make every window grow). Long (about 100 lines): one loop over the
/// changed ranges whose window, parent spans and cut points are carried from one iteration to
/// the next; the invariants that make the result equal a whole re-chunk read best in one place.
fn split_changed_with<E>(
    data: &mut [u8],
    len: usize,
    params: &ChunkerParams,
    parent: &[Span],
    changed: &[Range<usize>],
    fill: &mut Fill<'_, E>,
    lookahead: usize,
) -> Result<(Vec<Piece>, usize), E> {
    let mut loader = Loader {
        loaded: vec![false; len.div_ceil(ZERO_BLOCK)],
        len,
        fill,
    };
    let ends: Vec<usize> = parent.iter().map(Span::end).collect();
    let is_old_boundary = |x: usize| x == 0 || ends.binary_search(&x).is_ok();
    let changes = blocks_of(changed, len);
    // Beyond the window's end, a zero run may start that qualifies (zero_min) and ends the data
    // stretch, and a chunk may be cut short by it (max): spans ending this far before the
    // window's end are those of the whole segment.
    let margin = params.max as usize + params.zero_min as usize;

    let mut out = Vec::new();
    let mut pos = 0; // a boundary of the new split; `out` covers [0, pos)
    let mut kept = 0; // the first previous span not yet passed
    let mut j = 0; // the first change not yet passed
    while j < changes.len() {
        let a = changes[j].start;
        // Restart at the last previous boundary before the run of zero blocks that ends at the
        // change: the change may extend that run into a zero span or shorten one, which moves
        // the end of the data stretch before it, but no cut that ends before the run.
        let mut limit = a;
        let restart = loop {
            let Some(k) = (kept..parent.len()).rev().find(|&k| ends[k] < limit) else {
                break pos;
            };
            let cand = ends[k];
            let from = cand - cand % ZERO_BLOCK;
            loader.ensure(from..a, data)?;
            let mut z = a;
            while z > from && crate::is_zero(&data[z - ZERO_BLOCK..z]) {
                z -= ZERO_BLOCK;
            }
            if z > from {
                break cand; // z is a block boundary past `from`, so past `cand` too
            }
            limit = cand;
        };
        while kept < parent.len() && ends[kept] <= restart {
            out.push(Piece::Kept(kept));
            kept += 1;
        }
        // Split windows from `from` (the restart, then the end of the last span known to be
        // exact) until a span ends past every change it met, on an old boundary.
        let mut from = restart;
        let mut end = (changes[j].end + lookahead).min(len);
        let mut need = changes[j].end;
        let mut next = j + 1;
        let mut resync = None;
        while resync.is_none() {
            loader.ensure(from..end, data)?;
            let safe = if end == len {
                len
            } else {
                end.saturating_sub(margin)
            };
            split_from(&data[..end], from, params, &mut |span| {
                let x = span.end();
                if x > safe {
                    return false;
                }
                out.push(Piece::New(span));
                from = x;
                while next < changes.len() && changes[next].start < x {
                    need = need.max(changes[next].end);
                    next += 1;
                }
                if x >= need && is_old_boundary(x) {
                    resync = Some(x);
                    return false;
                }
                true
            });
            // The segment's end is an old boundary past every change, so this ends.
            end = (from + 2 * (end - from).max(margin)).min(len);
        }
        let resync = resync.expect("the loop ends with a resync point");
        while kept < parent.len() && ends[kept] <= resync {
            kept += 1;
        }
        pos = resync;
        j = next;
    }
    out.extend((kept..parent.len()).map(Piece::Kept));
    Ok((out, loader.loaded_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split_segment;
    use crate::testing::{params, pseudo_random as noise};
    use proptest::prelude::*;

    /// Re-splits `new` against the split of `old` with `changed`, over a buffer whose unloaded
    /// bytes are garbage, and returns the spans and the bytes loaded.
    fn resplit(old: &[u8], new: &[u8], changed: &[Range<usize>]) -> (Vec<Span>, usize) {
        let p = params();
        resplit_with(old, new, changed, 2 * (p.max + p.zero_min) as usize)
    }

    fn resplit_with(
        old: &[u8],
        new: &[u8],
        changed: &[Range<usize>],
        lookahead: usize,
    ) -> (Vec<Span>, usize) {
        let p = params();
        let parent = split_segment(old, &p);
        let mut buf = vec![0xa5u8; new.len().div_ceil(ZERO_BLOCK) * ZERO_BLOCK];
        let mut asked = vec![false; buf.len() / ZERO_BLOCK];
        let mut fill = |r: Range<usize>, data: &mut [u8]| -> Result<(), ()> {
            assert_eq!(r.start % ZERO_BLOCK, 0, "{r:?} starts off a block");
            assert!(
                r.end.is_multiple_of(ZERO_BLOCK) || r.end == new.len(),
                "{r:?} ends off a block"
            );
            for (b, seen) in asked
                .iter_mut()
                .enumerate()
                .take(r.end.div_ceil(ZERO_BLOCK))
                .skip(r.start / ZERO_BLOCK)
            {
                assert!(!*seen, "block {b} asked for twice");
                *seen = true;
            }
            data[r.clone()].copy_from_slice(&new[r]);
            Ok(())
        };
        let (pieces, loaded) = split_changed_with(
            &mut buf,
            new.len(),
            &p,
            &parent,
            changed,
            &mut fill,
            lookahead,
        )
        .unwrap();
        let spans = pieces.into_iter().map(|p| p.span(&parent)).collect();
        (spans, loaded)
    }

    #[test]
    fn a_small_change_in_a_large_segment_reads_little() {
        let old = noise(1 << 20, 3);
        let mut new = old.clone();
        new[500_000..500_100].fill(7);
        let (spans, loaded) = resplit(&old, &new, std::slice::from_ref(&(500_000..500_100)));
        assert_eq!(spans, split_segment(&new, &params()));
        assert!(loaded < 200 << 10, "loaded {loaded} bytes");
    }

    #[test]
    fn no_change_reads_nothing() {
        let old = noise(100_000, 4);
        let (spans, loaded) = resplit(&old, &old, &[]);
        assert_eq!(spans, split_segment(&old, &params()));
        assert_eq!(loaded, 0);
    }

    #[test]
    fn zeroing_data_between_zero_runs_merges_them() {
        let mut old = noise(200_000, 5);
        old[40_960..61_440].fill(0);
        old[65_536..90_112].fill(0);
        let mut new = old.clone();
        new[61_440..65_536].fill(0);
        let (spans, _) = resplit(&old, &new, std::slice::from_ref(&(61_440..65_536)));
        assert_eq!(spans, split_segment(&new, &params()));
    }

    #[test]
    fn writing_into_a_zero_span_splits_it() {
        let mut old = noise(200_000, 6);
        old[40_960..90_112].fill(0);
        let mut new = old.clone();
        new[50_000..50_001].fill(1);
        let (spans, _) = resplit(&old, &new, std::slice::from_ref(&(50_000..50_001)));
        assert_eq!(spans, split_segment(&new, &params()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn resplit_equals_a_full_split(
            seed in any::<u64>(),
            len in 1usize..150_000,
            zeros in proptest::collection::vec((0usize..150_000, 0usize..30_000), 0..4),
            edits in proptest::collection::vec((0usize..150_000, 1usize..20_000, 0u8..3), 1..5),
            extra in proptest::collection::vec((0usize..150_000, 0usize..5_000), 0..2),
        ) {
            let mut old = noise(len, seed);
            for (s, n) in zeros {
                let s = s.min(len);
                old[s..(s + n).min(len)].fill(0);
            }
            let mut new = old.clone();
            let mut changed = Vec::new();
            for (i, (s, n, how)) in edits.into_iter().enumerate() {
                let s = s.min(len - 1);
                let e = (s + n).min(len);
                match how {
                    0 => new[s..e].fill(0),
                    1 => new[s..e].copy_from_slice(&noise(e - s, seed ^ i as u64 ^ 0xabc)),
                    _ => new[s..e].fill(0x33),
                }
                changed.push(s..e);
            }
            // A list may name more than what changed (a block written with the same bytes).
            for (s, n) in extra {
                changed.push(s.min(len)..(s + n).min(len));
            }
            let full = split_segment(&new, &params());
            let (spans, loaded) = resplit(&old, &new, &changed);
            prop_assert_eq!(&spans, &full);
            prop_assert!(loaded <= len);
            // Windows that start at the change's end and must grow.
            let (spans, _) = resplit_with(&old, &new, &changed, 0);
            prop_assert_eq!(&spans, &full);
        }
    }
}
