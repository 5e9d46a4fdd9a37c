//! Replication: snapshots copied from one repository to another (`sbk copy`).
//!
//! Chunk ids are keyed per repository, so the same bytes have different ids in two repositories
//! unless they share their chunk-id key. Copy reads each chunk of a snapshot from the source
//! (verified), computes its id in the destination, and stores it there only if the destination
//! lacks it (re-encrypted under the destination's key); then it writes the segment trees with the
//! destination's ids and a manifest that records its origin. When both repositories share the
//! chunk-id key (a probe id agrees), the ids agree too and chunks the destination has are not even
//! read. Ordering is backup's: packs durable, then the index file naming them, then the manifest;
//! a crash leaves at most unindexed packs for prune. A snapshot already copied (a destination
//! manifest with its origin) is skipped, so copy is idempotent; so is a snapshot that is itself
//! a copy of one the destination has (copies going back and forth do not multiply).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use sbk_store::{
    encode_tree, BlobKind, ChunkId, Extent, Manifest, Origin, PackEntry, PackGone, PackId,
    Repository, SnapshotId,
};

use crate::error::{EngineError, Result};
use crate::packer::Packer;
use crate::pool::worker_pool;
use crate::snapshot::snapshot_trees;
use crate::snapshot::windows;

/// What copying one snapshot did.
#[derive(Debug, Clone)]
pub struct CopyOutcome {
    /// The snapshot in the source repository.
    pub source: SnapshotId,
    /// Its copy in the destination; `None` when it had been copied before (`existing` says which).
    pub copy: Option<SnapshotId>,
    /// The earlier copy, when the snapshot was skipped.
    pub existing: Option<SnapshotId>,
    /// Chunks read from the source.
    pub chunks_read: u64,
    /// Chunks the destination lacked, written to it.
    pub chunks_written: u64,
    /// Bytes stored in the destination (compressed, sealed).
    pub bytes_written: u64,
}

/// Whether the destination has blob `id` to refer to: stored by this run, or indexed in a pack
/// no prune has marked (never a marked one: a later prune may delete it).
fn has(packer: &Packer<'_>, dst: &Repository, id: &ChunkId) -> Result<bool> {
    Ok(packer.knows(id) || dst.dedup_hit(id)?)
}

/// The destination's snapshots, and of its copies, the (origin repository, origin snapshot)
/// each came from: read once per run.
fn destination(dst: &Repository) -> Result<(HashSet<SnapshotId>, HashMap<Origin, SnapshotId>)> {
    let mut ids = HashSet::new();
    let mut copies = HashMap::new();
    for (id, m) in dst.snapshots()? {
        ids.insert(id);
        if let Some(Ok(o)) = m.ok().and_then(|m| m.origin()) {
            copies.insert(o, id);
        }
    }
    Ok((ids, copies))
}

/// Copies snapshots `ids` of `src` into `dst`. Both are open with their index loaded; the
/// caller holds a shared lock on each.
pub fn copy(
    src: &Repository,
    dst: &Repository,
    ids: &[SnapshotId],
    threads: usize,
) -> Result<Vec<CopyOutcome>> {
    let pool = worker_pool(threads, "copy")?;
    let origin = src.config().repo_id;
    // Equal keyed ids for a probe: the repositories share the chunk-id key, and every id agrees.
    let same_ids = src.blob_id(b"sbk copy probe") == dst.blob_id(b"sbk copy probe");
    let (dst_ids, mut copies) = destination(dst)?;
    let mut out = Vec::new();
    for id in ids {
        crate::interrupt::check()?;
        let manifest = src.load_manifest(id)?;
        // Copied before, or itself a copy of a snapshot the destination still has.
        let came_from_here = manifest
            .origin()
            .and_then(|o| o.ok())
            .filter(|o| o.repo_id == dst.config().repo_id && dst_ids.contains(&o.snapshot))
            .map(|o| o.snapshot);
        let this = Origin {
            repo_id: origin,
            snapshot: *id,
        };
        if let Some(existing) = came_from_here.or(copies.get(&this).copied()) {
            out.push(CopyOutcome {
                source: *id,
                copy: None,
                existing: Some(existing),
                chunks_read: 0,
                chunks_written: 0,
                bytes_written: 0,
            });
            continue;
        }
        let done = pool.install(|| copy_one(src, dst, id, manifest, same_ids))?;
        if let Some(c) = done.copy {
            copies.insert(this, c);
        }
        out.push(done);
    }
    Ok(out)
}

/// Source-to-destination ids `copy` remembers across a snapshot's windows (about 10 MiB).
const MAP_MAX: usize = 1 << 17;
/// Chunks located in the source's index at once, sorted, in one pass over its table (a search
/// per chunk faults a page at nearly every step once the table is larger than memory).
const LOCATE_AT_ONCE: usize = 1 << 16;

fn copy_one(
    src: &Repository,
    dst: &Repository,
    id: &SnapshotId,
    manifest: Manifest,
    same_ids: bool,
) -> Result<CopyOutcome> {
    let packer = Packer::new(dst);
    let started = sbk_store::unix_now();
    let bytes = AtomicU64::new(0);
    let (mut read, mut fresh) = (0u64, 0u64);
    let mut trees = Vec::with_capacity(manifest.trees.len());
    // Source id -> destination id: a chunk used in several segments is read once, as long as
    // the map holds it (it is emptied once it holds MAP_MAX, so that memory stays bounded for
    // a snapshot of millions of small chunks).
    let mut map: HashMap<ChunkId, ChunkId> = HashMap::new();
    for segments in windows(&manifest) {
        crate::interrupt::check()?;
        let mut window = snapshot_trees(src, &manifest, segments)?;
        // Segments a group at a time: the group's distinct chunks not mapped yet (up to
        // LOCATE_AT_ONCE) are located in one sorted pass over the index and copied in
        // parallel, then its trees are rewritten with their ids here.
        let mut at = 0;
        while at < window.len() {
            if map.len() >= MAP_MAX {
                map.clear();
            }
            let mut distinct = HashSet::new();
            let mut end = at;
            while end < window.len() && (end == at || distinct.len() < LOCATE_AT_ONCE) {
                distinct.extend(window[end].iter().filter_map(|x| match x {
                    Extent::Data { id, .. } if !map.contains_key(id) => Some(*id),
                    _ => None,
                }));
                end += 1;
            }
            let distinct: Vec<ChunkId> = distinct.into_iter().collect();
            let mapped = copy_chunks(src, dst, &packer, &bytes, distinct, same_ids)?;
            read += mapped.iter().filter(|m| m.2).count() as u64;
            fresh += mapped.iter().filter(|m| m.3).count() as u64;
            map.extend(mapped.into_iter().map(|(s, d, _, _)| (s, d)));
            for extents in &mut window[at..end] {
                let extents: Vec<Extent> = std::mem::take(extents)
                    .into_iter()
                    .map(|x| match x {
                        Extent::Data { id, len } => Extent::Data { id: map[&id], len },
                        z => z,
                    })
                    .collect();
                let raw = encode_tree(&extents);
                let tid = dst.blob_id(&raw);
                if !has(&packer, dst, &tid)? {
                    let blob = dst.encode_blob(tid, BlobKind::Tree, &raw)?;
                    bytes.fetch_add(packer.add(&[blob])?, Ordering::Relaxed);
                }
                trees.push(tid);
            }
            at = end;
        }
    }
    crate::interrupt::check()?;
    // Ordering: every blob durable and indexed, then the manifest that refers to them.
    packer.flush()?;
    let mut copy = Manifest {
        trees,
        parent: None,
        ..manifest
    };
    drop_foreign_token(src, dst, same_ids, &mut copy);
    copy.set_origin(&Origin {
        repo_id: src.config().repo_id,
        snapshot: *id,
    });
    // Under Object Lock, the packs the copy shares with earlier snapshots are kept as long as
    // it is protected (every blob is either written now or a dedup hit: no parent's trees).
    crate::protect::protect(dst, &copy, None, (&packer.packs_written(), started))?;
    let copy_id = dst.write_manifest(&copy)?;
    Ok(CopyOutcome {
        source: *id,
        copy: Some(copy_id),
        existing: None,
        chunks_read: read,
        chunks_written: fresh,
        bytes_written: bytes.into_inner(),
    })
}

/// Chunks of a snapshot, into the destination: (source id, destination id, read from the
/// source, written to the destination) for each. A destination that names chunks as the source
/// does and has one already does not even read it. The others are read pack by pack, in runs of
/// neighbours (on S3 one request per run, not per chunk: a snapshot of 263,158 chunks took
/// 263,223 range reads), each verified, then named, compressed and sealed for the destination
/// on the workers (that is the work of a copy). `ids` must be distinct: a blob twice in one
/// pack's read would be two overlapping entries.
fn copy_chunks(
    src: &Repository,
    dst: &Repository,
    packer: &Packer<'_>,
    bytes: &AtomicU64,
    mut ids: Vec<ChunkId>,
    same_ids: bool,
) -> Result<Vec<(ChunkId, ChunkId, bool, bool)>> {
    let mut out = Vec::with_capacity(ids.len());
    if same_ids {
        let mut kept = Vec::with_capacity(ids.len());
        for sid in ids {
            if has(packer, dst, &sid)? {
                out.push((sid, sid, false, false));
            } else {
                kept.push(sid);
            }
        }
        ids = kept;
    }
    // Sorted, the ids are located in one pass over the source's table; one it does not find
    // (or finds as another kind) is located again the careful way, which refreshes the index
    // and names the problem.
    ids.sort_unstable();
    let mut found = vec![None; ids.len()];
    src.index()?.get_sorted(&ids, |i, e| found[i] = e);
    let mut by_pack: BTreeMap<PackId, Vec<PackEntry>> = BTreeMap::new();
    for (sid, e) in ids.iter().zip(found) {
        let at = match e {
            Some(e) if e.entry.kind == BlobKind::Data => e,
            _ => src.locate_kind(sid, BlobKind::Data)?,
        };
        by_pack.entry(at.pack).or_default().push(at.entry);
    }
    // Pieces small enough that the workers share a segment's chunks evenly even when they sit
    // in one pack (64 chunks of 256 KiB: 16 pieces of 4, where 4 pieces of 16 made a local
    // copy 20% slower), large enough that each is one read of several chunks.
    let piece = (ids.len() / (8 * rayon::current_num_threads())).max(4);
    let mut pieces = Vec::new();
    for (pack, mut entries) in by_pack {
        entries.sort_unstable_by_key(|e| e.offset);
        pieces.extend(entries.chunks(piece).map(|c| (pack, c.to_vec())));
    }
    let copied = pieces
        .par_iter()
        // Each worker keeps its buffers: fresh ones cost a page fault per 4 KiB.
        .map_init(
            || (Vec::new(), Vec::new()),
            |(buf, raw), (pack, entries)| -> Result<Vec<_>> {
                let mut done = Vec::with_capacity(entries.len());
                src.read_blobs(*pack, entries, PackGone::FollowIndex, buf, |_, blob| {
                    let blob = blob?;
                    let sid = blob.entry().id;
                    raw.resize(blob.entry().raw_len as usize, 0);
                    blob.open_into(raw)?;
                    let did = dst.blob_id(raw);
                    let fresh = !has(packer, dst, &did)?;
                    if fresh {
                        let blob = dst.encode_blob(did, BlobKind::Data, raw)?;
                        bytes.fetch_add(packer.add(&[blob])?, Ordering::Relaxed);
                    }
                    done.push((sid, did, true, fresh));
                    Ok::<_, EngineError>(())
                })?;
                Ok(done)
            },
        )
        .collect::<Result<Vec<_>>>()?;
    out.extend(copied.into_iter().flatten());
    Ok(out)
}

/// A storage token names the state a changed-block list starts from; an incremental in the
/// destination may follow it only if the destination cuts chunks as the source did (else its
/// check would find every reused tree "wrong"), so the token goes with a foreign cut.
fn drop_foreign_token(src: &Repository, dst: &Repository, same_ids: bool, copy: &mut Manifest) {
    let c = (src.config(), dst.config());
    let same_cuts = same_ids
        && c.0.chunk_seed == c.1.chunk_seed
        && (c.0.chunk_min, c.0.chunk_avg, c.0.chunk_max, c.0.zero_min)
            == (c.1.chunk_min, c.1.chunk_avg, c.1.chunk_max, c.1.zero_min);
    if !same_cuts {
        if let Some(Ok(mut cb)) = copy.changed_blocks() {
            cb.token = None;
            copy.set_changed_blocks(&cb);
        }
    }
}

/// Fails when `dst` cannot take copies of `src`'s snapshots as they are cut (another segment
/// size would make trees that do not match the destination's own backups).
pub fn check_compatible(src: &Repository, dst: &Repository) -> Result<()> {
    if src.config().segment_size != dst.config().segment_size {
        return Err(EngineError::Unsafe(format!(
            "the repositories cut segments of {} and {} bytes",
            src.config().segment_size,
            dst.config().segment_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sbk_store::LockKind;

    use super::copy;
    use crate::testkit::{backup_one, lock, mem_repository, open, restored, source};

    #[test]
    fn a_copy_restores_byte_identical_and_a_second_copy_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (mem_repository(), mem_repository());
        let src = open(Arc::new(from.clone())).unwrap();
        let (path, bytes) = source(dir.path(), "disk", 5, 2 << 20);
        let id = backup_one(&src, &path).unwrap();
        let dst = open(Arc::new(to.clone())).unwrap();
        let _locks = (
            lock(&src, LockKind::Shared).unwrap(),
            lock(&dst, LockKind::Shared).unwrap(),
        );
        let done = copy(&src, &dst, &[id], 2).unwrap();
        let copied = done[0].copy.expect("copied");
        assert!(done[0].chunks_written > 0 && done[0].bytes_written > 0);
        assert_eq!(restored(&dst, &copied), bytes);
        // Idempotent: the copy is found by its origin, nothing is read or written again.
        let again = copy(&src, &dst, &[id], 2).unwrap();
        assert_eq!(again[0].existing, Some(copied));
        assert_eq!((again[0].chunks_read, again[0].chunks_written), (0, 0));
    }
}
