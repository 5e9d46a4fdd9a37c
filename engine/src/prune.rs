//! `prune`: mark and sweep. Removes the packs that hold only blobs no snapshot refers to, and
//! repacks those whose unused share exceeds a threshold.
//!
//! Ordering (docs/design.md, "prune"): blobs that stay are copied into new packs, which are sealed
//! (fsynced, renamed, directory fsynced) and indexed, and the index flushed, before anything old is
//! touched; then the index entries that point into the old packs are removed and flushed; only then
//! are the old pack files deleted. A crash at any point leaves every snapshot restorable: at worst
//! extra packs or stale index entries for blobs no snapshot needs. Prune runs under an exclusive
//! lock (taken by the caller), so no backup can refer to a blob while it is being swept.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use sbk_store::{
    read_trailer, split_blob, ChunkId, EncodedBlob, Extent, Index, PackEntry, PackId, PackWriter,
    Repository, BLOB_HEADER_LEN,
};

use crate::error::{EngineError, Result};
use crate::pool::{snapshot_trees, worker_pool};
use crate::progress::Progress;

/// How to prune.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Repack a pack once more than this percentage of its bytes is unused.
    pub max_unused_percent: f64,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
    /// Worker threads (marking).
    pub threads: usize,
}

/// What prune did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Packs in the repository before.
    pub packs: usize,
    /// Packs deleted because nothing in them is used.
    pub packs_deleted: usize,
    /// Packs rewritten because too much of them is unused.
    pub packs_repacked: usize,
    /// New packs written by the repack.
    pub packs_written: usize,
    /// Blobs no snapshot refers to, dropped.
    pub blobs_dropped: usize,
    /// Bytes of used blobs copied into new packs.
    pub bytes_repacked: u64,
    /// Bytes of packs (and leftovers of interrupted writes) removed.
    pub bytes_removed: u64,
    /// Net space given back: removed minus written.
    pub bytes_reclaimed: u64,
    /// Bytes in packs before.
    pub bytes_before: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Every blob id the snapshots refer to (trees and data). Fails on any snapshot or tree that
/// cannot be read: pruning without knowing what a snapshot needs could delete its data.
pub fn used_blobs(repo: &Repository) -> Result<HashSet<ChunkId>> {
    let mut used = HashSet::new();
    for (id, manifest) in repo.snapshots()? {
        let manifest = manifest.map_err(|e| {
            EngineError::Unsafe(format!(
                "snapshot {id} cannot be read ({e}); prune needs every snapshot intact"
            ))
        })?;
        let trees = snapshot_trees(repo, &manifest).map_err(|e| {
            EngineError::Unsafe(format!(
                "snapshot {id}: {e}; prune needs every snapshot intact"
            ))
        })?;
        used.extend(manifest.trees.iter().copied());
        used.extend(trees.into_iter().flatten().filter_map(|x| match x {
            Extent::Data { id, .. } => Some(id),
            Extent::Zero { .. } => None,
        }));
    }
    Ok(used)
}

/// Runs prune. The caller holds an exclusive lock.
pub fn prune(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    let started = Instant::now();
    let pool = worker_pool(opts.threads, "prune")?;
    // The index slot was brought up to date when the repository was opened, before the caller
    // took the exclusive lock: a backup may have sealed packs since. Catch up again now that no
    // one else writes.
    repo.catch_up_index()?;
    let used = pool.install(|| used_blobs(repo))?;
    let mut report = PruneReport::default();

    // Where the index says each used blob lives; a used blob missing from the index could be in
    // any pack, so nothing may be deleted until the index is repaired.
    let mut live_in: HashMap<PackId, Vec<ChunkId>> = HashMap::new();
    for id in &used {
        let e = repo.index().get(id)?.ok_or_else(|| {
            EngineError::Unsafe(format!(
                "chunk {id} is used but not in the index; run `sbk repair index` first"
            ))
        })?;
        live_in.entry(e.pack).or_default().push(*id);
    }

    // Sweep plan, pack by pack, from the trailers (the truth about what each pack holds).
    let packs = repo.list_packs()?;
    report.packs = packs.len();
    // (pack, its size) to delete; (pack, its size, the blobs that stay) to repack.
    let mut delete: Vec<(PackId, u64)> = Vec::new();
    let mut repack: Vec<(PackId, u64, Vec<PackEntry>)> = Vec::new();
    for (pack, path) in &packs {
        let entries = read_trailer(path, *pack).map_err(|e| {
            EngineError::Unsafe(format!(
                "{e}; prune leaves damaged packs alone: run `sbk verify`"
            ))
        })?;
        let size = std::fs::metadata(path)
            .map_err(|e| EngineError::Store(sbk_store::StoreError::io(path, e)))?
            .len();
        report.bytes_before += size;
        let live: HashSet<&ChunkId> = live_in
            .get(pack)
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let (keep, drop): (Vec<PackEntry>, Vec<PackEntry>) =
            entries.into_iter().partition(|e| live.contains(&e.id));
        if keep.is_empty() {
            report.blobs_dropped += drop.len();
            delete.push((*pack, size));
            continue;
        }
        let live_bytes: u64 = keep
            .iter()
            .map(|e| BLOB_HEADER_LEN as u64 + u64::from(e.stored_len))
            .sum();
        let unused = 100.0 * (1.0 - live_bytes as f64 / size as f64);
        if !drop.is_empty() && unused > opts.max_unused_percent {
            report.blobs_dropped += drop.len();
            report.bytes_repacked += live_bytes;
            repack.push((*pack, size, keep));
        }
    }
    report.packs_deleted = delete.len();
    report.packs_repacked = repack.len();
    if opts.dry_run {
        report.bytes_removed = delete
            .iter()
            .map(|(_, size)| size)
            .chain(repack.iter().map(|(_, size, _)| size))
            .sum();
        report.bytes_reclaimed = report.bytes_removed.saturating_sub(report.bytes_repacked);
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    // 1. Copy the blobs that stay into new packs; seal and index them; flush the index.
    progress.start(0, "repack", report.bytes_repacked);
    let mut writer: Option<PackWriter> = None;
    let mut written = 0u64;
    let seal = |w: PackWriter, written: &mut u64| -> Result<()> {
        let (id, entries) = w.finish()?;
        repo.index().insert_pack(id, &entries)?;
        *written += std::fs::metadata(repo.pack_path(id))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(())
    };
    for (pack, _, keep) in &repack {
        let file = repo.open_pack(*pack)?;
        let path = repo.pack_path(*pack);
        let mut raw = Vec::new();
        for e in keep {
            let mut buf = vec![0u8; BLOB_HEADER_LEN + e.stored_len as usize];
            sbk_store::read_range(&file, &path, e.offset, &mut buf)?;
            let stored = split_blob(&buf, e, &path)?;
            // Verified before it is copied: prune never spreads a damaged blob.
            raw.resize(e.raw_len as usize, 0);
            repo.decode_verified(*pack, e, stored, &mut raw)?;
            let header =
                sbk_store::BlobHeader::decode(&buf[..BLOB_HEADER_LEN]).map_err(|source| {
                    sbk_store::StoreError::Corrupt {
                        path: path.clone(),
                        what: "blob header",
                        source,
                    }
                })?;
            let blob = EncodedBlob {
                header,
                data: stored.to_vec(),
            };
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(PackWriter::create(repo.path())?),
            };
            w.add(&blob)?;
            progress.advance(0, (BLOB_HEADER_LEN + blob.data.len()) as u64);
            if w.len() >= repo.config().pack_target {
                seal(writer.take().expect("just used"), &mut written)?;
                report.packs_written += 1;
            }
        }
    }
    if let Some(w) = writer.take() {
        seal(w, &mut written)?;
        report.packs_written += 1;
    }
    repo.index().flush()?;
    progress.finish(0);

    // 2. Drop the old packs from our index slot, and flush, so no backup can find their blobs.
    let old: Vec<PackId> = delete
        .iter()
        .map(|(p, _)| *p)
        .chain(repack.iter().map(|(p, _, _)| *p))
        .collect();
    for pack in &old {
        repo.index().forget_pack(*pack)?;
    }
    repo.index().flush()?;
    // Other slots may name another copy of a blob (a chunk two concurrent backups both stored),
    // so forgetting packs in them could leave a live blob unindexed there. They are caches of
    // processes that cannot be running (we hold the exclusive lock): drop them; they are rebuilt
    // from the packs when next needed.
    for slot in Index::slots(&repo.path().join("index"))? {
        if slot != repo.index().path() {
            std::fs::remove_dir_all(&slot)
                .map_err(|e| EngineError::Store(sbk_store::StoreError::io(&slot, e)))?;
        }
    }

    // 3. Only now delete the old packs, and the leftovers of interrupted writes.
    for pack in &old {
        report.bytes_removed += repo.remove_pack(*pack)?;
    }
    report.bytes_removed += repo.remove_leftovers()?;
    report.bytes_reclaimed = report.bytes_removed.saturating_sub(written);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}
