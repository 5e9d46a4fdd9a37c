//! The byte ranges where two snapshots differ, from their segment trees alone (no data read):
//! segments with the same tree are the same; elsewhere an extent is the same when the other
//! snapshot has the same chunk (or zero run) at the same offset with the same length. The result
//! is at chunk granularity, a superset of the bytes that changed, and in the changed-block list's
//! `OFFSET LENGTH` form, so that it can check a storage-side list or size a replication.

use std::ops::Range;

use sbk_store::{Extent, Manifest, Repository, SnapshotId};

use crate::error::Result;
use crate::snapshot::load_extents;

/// Where two snapshots differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDiff {
    /// Size of the first snapshot.
    pub size_a: u64,
    /// Size of the second.
    pub size_b: u64,
    /// Byte ranges that differ, sorted and merged (a grown or shrunk tail included).
    pub ranges: Vec<Range<u64>>,
    /// Segments compared extent by extent (their trees differed).
    pub segments_compared: u64,
}

impl SnapshotDiff {
    /// Bytes in the differing ranges.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// Adds `r` to sorted, merged `ranges`.
fn push(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    match ranges.last_mut() {
        Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
        _ => ranges.push(r),
    }
}

/// The ranges of segment `i` where `a` and `b` differ; both have the segment.
fn segment(
    repo: &Repository,
    a: &Manifest,
    b: &Manifest,
    i: usize,
    out: &mut Vec<Range<u64>>,
) -> Result<()> {
    let start = i as u64 * a.segment_size;
    let xa = load_extents(repo, a, i..i + 1)?;
    let xb = load_extents(repo, b, i..i + 1)?;
    // Extents present identically in the other list (both lists are sorted by offset).
    let same = |x: &(u64, Extent), other: &[(u64, Extent)]| {
        other
            .binary_search_by_key(&x.0, |y| y.0)
            .is_ok_and(|j| other[j] == *x)
    };
    let mut diff: Vec<Range<u64>> = xa
        .iter()
        .filter(|x| !same(x, &xb))
        .chain(xb.iter().filter(|x| !same(x, &xa)))
        .map(|(o, x)| *o..o + u64::from(x.len()))
        .collect();
    diff.sort_by_key(|r| r.start);
    let end = start + a.segment_len(i).min(b.segment_len(i));
    for r in diff {
        push(out, r.start..r.end.min(end));
    }
    Ok(())
}

/// Where snapshots `a` and `b` differ.
pub fn diff(repo: &Repository, a: &SnapshotId, b: &SnapshotId) -> Result<SnapshotDiff> {
    let (ma, mb) = (repo.load_manifest(a)?, repo.load_manifest(b)?);
    let mut ranges = Vec::new();
    let mut compared = 0;
    if ma.segment_size == mb.segment_size {
        let common = ma.trees.len().min(mb.trees.len());
        for i in 0..common {
            let same_len = ma.segment_len(i) == mb.segment_len(i);
            if same_len && ma.trees[i] == mb.trees[i] {
                continue;
            }
            compared += 1;
            segment(repo, &ma, &mb, i, &mut ranges)?;
            if !same_len {
                // One of them ends inside this segment: the rest of the longer one differs.
                let start = i as u64 * ma.segment_size;
                let (short, long) = (
                    ma.segment_len(i).min(mb.segment_len(i)),
                    ma.segment_len(i).max(mb.segment_len(i)),
                );
                push(&mut ranges, start + short..start + long);
            }
        }
        let (shorter, longer) = (ma.size.min(mb.size), ma.size.max(mb.size));
        let covered = common as u64 * ma.segment_size;
        push(&mut ranges, shorter.max(covered)..longer);
    } else {
        // Cut differently: nothing lines up, all of it may differ.
        push(&mut ranges, 0..ma.size.max(mb.size));
    }
    Ok(SnapshotDiff {
        size_a: ma.size,
        size_b: mb.size,
        ranges,
        segments_compared: compared,
    })
}
