//! `prune`: mark and sweep. Removes the packs that hold only blobs no snapshot refers to, and
//! repacks those whose unused share exceeds a threshold.
//!
//! Ordering (docs/design.md, "prune"): blobs that stay are copied into new packs, which are
//! sealed (durable) first; then new index files naming every surviving and new pack are written,
//! and only then are the old index files removed; only then are the old packs deleted. A crash at
//! any point leaves every snapshot restorable: at worst extra packs (named by no index file, swept
//! by the next prune) or index files naming a blob twice. Prune runs under an exclusive lock
//! (taken by the caller), so no backup can refer to a blob while it is being swept.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use sbk_store::{
    ChunkId, EncodedBlob, Extent, PackEntry, PackId, PackWriter, Repository, BLOB_HEADER_LEN,
};

use crate::error::{EngineError, Result};
use crate::pool::{snapshot_trees, worker_pool};
use crate::progress::Progress;
use crate::repair::replace_index_files;
use crate::restore::windows;

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
    /// Packs deleted because no index file names them (left by a backup that died).
    pub packs_unindexed: usize,
    /// Index files before.
    pub index_files_before: usize,
    /// Index files written (the index is rewritten whenever packs go, or there are many files).
    pub index_files_written: usize,
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

/// Every blob id the snapshots refer to (trees and data), those of snapshots pinned by a
/// server (`sbk serve`) included, forgotten or not. Fails on any snapshot or tree that cannot be
/// read: pruning without knowing what a snapshot needs could delete its data.
pub fn used_blobs(repo: &Repository) -> Result<HashSet<ChunkId>> {
    let mut used = HashSet::new();
    let mut roots = Vec::new();
    for (id, manifest) in repo.snapshots()? {
        let manifest = manifest.map_err(|e| {
            EngineError::Unsafe(format!(
                "snapshot {id} cannot be read ({e}); prune needs every snapshot intact"
            ))
        })?;
        roots.push((id, manifest));
    }
    // Pins are listed after the snapshots: a server copies a manifest to its pin before it
    // checks that the snapshot still exists (Repository::pin_snapshot).
    let pinned = repo.pinned_snapshots().map_err(|e| {
        EngineError::Unsafe(format!(
            "a pinned snapshot cannot be read ({e}); prune needs it intact"
        ))
    })?;
    for (id, manifest) in pinned {
        if !roots.iter().any(|(r, _)| *r == id) {
            roots.push((id, manifest));
        }
    }
    for (id, manifest) in roots {
        used.extend(manifest.trees.iter().copied());
        for segments in windows(&manifest) {
            let trees = snapshot_trees(repo, &manifest, segments).map_err(|e| {
                EngineError::Unsafe(format!(
                    "snapshot {id}: {e}; prune needs every snapshot intact"
                ))
            })?;
            used.extend(trees.into_iter().flatten().filter_map(|x| match x {
                Extent::Data { id, .. } => Some(id),
                Extent::Zero { .. } => None,
            }));
        }
    }
    Ok(used)
}

/// Prune merges the index files whenever there are more than this many, even if it deletes
/// nothing (each backup run writes at least one).
const MERGE_INDEX_FILES_AT: usize = 16;

/// Runs prune. The caller holds an exclusive lock.
pub fn prune(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    let started = Instant::now();
    let pool = worker_pool(opts.threads, "prune")?;
    let mut report = PruneReport::default();

    // What the index files say each pack holds: the repository's own truth, not the cache. A
    // damaged index file could hide where a used blob lives, so prune stops on one.
    let files = repo.index_files()?;
    report.index_files_before = files.len();
    let mut indexed: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
    for f in &files {
        let file = repo.read_index_file(f).map_err(|e| {
            EngineError::Unsafe(format!(
                "{e}; prune needs every index file intact: run `sbk repair index` first"
            ))
        })?;
        for (pack, entries) in file.packs {
            let known = indexed.entry(pack).or_default();
            let seen: HashSet<ChunkId> = known.iter().map(|e| e.id).collect();
            known.extend(entries.into_iter().filter(|e| !seen.contains(&e.id)));
        }
    }
    let sizes: HashMap<PackId, u64> = repo.list_packs()?.into_iter().collect();
    report.packs = sizes.len();
    report.bytes_before = sizes.values().sum();

    let used = pool.install(|| used_blobs(repo))?;

    // One existing pack for each used blob; a used blob in no existing pack means the index
    // files or the packs are damaged, and nothing may be deleted until that is repaired.
    let mut home: HashMap<ChunkId, PackId> = HashMap::new();
    let mut by_id: Vec<(&PackId, &Vec<PackEntry>)> = indexed.iter().collect();
    by_id.sort_by_key(|(p, _)| **p);
    for (pack, entries) in &by_id {
        if sizes.contains_key(pack) {
            for e in entries.iter() {
                if used.contains(&e.id) {
                    home.entry(e.id).or_insert(**pack);
                }
            }
        }
    }
    if let Some(id) = used.iter().find(|id| !home.contains_key(id)) {
        return Err(EngineError::Unsafe(format!(
            "chunk {id} is used but no index file names an existing pack holding it; run `sbk verify`, then `sbk repair index`"
        )));
    }
    let mut live_in: HashMap<PackId, HashSet<ChunkId>> = HashMap::new();
    for (id, pack) in &home {
        live_in.entry(*pack).or_default().insert(*id);
    }

    // Sweep plan, pack by pack.
    let mut delete: Vec<(PackId, u64)> = Vec::new();
    let mut repack: Vec<(PackId, u64, Vec<PackEntry>)> = Vec::new();
    let mut survivors: Vec<(PackId, Vec<PackEntry>)> = Vec::new();
    let mut ids: Vec<(&PackId, &u64)> = sizes.iter().collect();
    ids.sort();
    for (pack, &size) in ids {
        let Some(entries) = indexed.get(pack) else {
            // Named by no index file: left by a backup that died before indexing it. Under the
            // exclusive lock no backup is writing, so nothing can still come to refer to it.
            report.packs_unindexed += 1;
            delete.push((*pack, size));
            continue;
        };
        let live = live_in.get(pack);
        let (keep, drop): (Vec<PackEntry>, Vec<PackEntry>) = entries
            .iter()
            .partition(|e| live.is_some_and(|l| l.contains(&e.id)));
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
        } else {
            survivors.push((*pack, entries.clone()));
        }
    }
    report.packs_deleted = delete.len() - report.packs_unindexed;
    report.packs_repacked = repack.len();
    let changes = !delete.is_empty() || !repack.is_empty();
    let rewrite_index =
        changes || files.len() > MERGE_INDEX_FILES_AT || indexed.len() > survivors.len();
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

    // A stop is honoured between steps: each leaves the repository as a crash there would,
    // which the ordering below makes safe (new packs unindexed until step 2, old packs named by
    // no index after it; the next prune removes either).
    crate::interrupt::check()?;
    // 1. Copy the blobs that stay into new packs, verified, and seal them (durable).
    progress.start(0, "repack", report.bytes_repacked);
    let mut writer: Option<PackWriter> = None;
    let mut written = 0u64;
    let mut new_packs: Vec<(PackId, Vec<PackEntry>)> = Vec::new();
    let mut seal = |w: PackWriter, new_packs: &mut Vec<_>| -> Result<()> {
        written += w.len();
        new_packs.push(w.finish()?);
        Ok(())
    };
    for (pack, _, keep) in &repack {
        crate::interrupt::check()?;
        let mut raw = Vec::new();
        for e in keep {
            let mut buf = vec![0u8; BLOB_HEADER_LEN + e.stored_len as usize];
            repo.read_pack(*pack, e.offset, &mut buf)?;
            let header = repo.check_blob_header(&buf, e, *pack)?;
            // Copied as stored (sealed, when encrypted: the associated data binds a blob to
            // its id, not its pack), before verifying opens it in place…
            let blob = EncodedBlob {
                header,
                data: repo.split_blob(&buf, e, *pack)?.to_vec(),
            };
            // …and verified before it is written: prune never spreads a damaged blob.
            raw.resize(e.raw_len as usize, 0);
            repo.decode_verified(*pack, e, repo.split_blob_mut(&mut buf, e, *pack)?, &mut raw)?;
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(repo.new_pack()?),
            };
            w.add(&blob)?;
            progress.advance(0, (BLOB_HEADER_LEN + blob.data.len()) as u64);
            if w.len() >= repo.config().pack_size {
                seal(writer.take().expect("just used"), &mut new_packs)?;
            }
        }
    }
    if let Some(w) = writer.take() {
        seal(w, &mut new_packs)?;
    }
    report.packs_written = new_packs.len();
    progress.finish(0);

    // 2. New index files naming the surviving and new packs, then the old index files go: from
    //    here on no process can find a blob in an old pack.
    crate::interrupt::check()?;
    if rewrite_index {
        let mut all = survivors;
        all.extend(new_packs);
        report.index_files_written = replace_index_files(repo, &all, &files)?.0;
    }

    // 3. Only now delete the old packs, and the leftovers of interrupted writes.
    for (pack, size) in delete
        .iter()
        .copied()
        .chain(repack.iter().map(|(p, size, _)| (*p, *size)))
    {
        crate::interrupt::check()?;
        report.bytes_removed += repo.remove_pack(pack, size)?;
    }
    report.bytes_removed += repo.remove_leftovers()?;
    // Pins of servers that are gone protect nothing any more.
    repo.remove_stale_pins()?;
    report.bytes_reclaimed = report.bytes_removed.saturating_sub(written);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}
