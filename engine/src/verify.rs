//! `verify`: proves that what the repository holds can be restored.
//!
//! The structural check (always) decodes every manifest and segment tree, checks that every
//! referenced blob is indexed in a pack that exists and whose trailer lists it where the index
//! says, that every pack trailer agrees with the blob headers in the pack (not on object storage,
//! where each header would be a request of its own) and with the index, and that no index entry
//! points at a missing pack. With `read_data`, the blobs of all packs (or a
//! subset) are read, decompressed and re-hashed. Every problem names the object and the snapshots
//! it affects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use rayon::prelude::*;
use sbk_store::{
    ChunkId, Extent, IndexFile, IndexId, Lookups, Manifest, PackEntry, PackGone, PackId,
    Repository, SnapshotId, StoreError, BLOB_HEADER_LEN,
};

use crate::error::{EngineError, Result};
use crate::pool::worker_pool;
use crate::progress::Progress;
use crate::snapshot::{windows, TreePlaces};

/// Which packs `verify` reads in full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// None: structure only.
    None,
    /// Every pack.
    All,
    /// A random sample of about this percentage of the packs.
    Percent(f64),
    /// Part `n` of `m` (1-based) of the packs in id order: run n = 1..m in turn to cover all.
    Part {
        /// This part, 1..=m.
        n: u32,
        /// Number of parts.
        m: u32,
    },
}

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Snapshots to check (all when empty).
    pub snapshots: Vec<SnapshotId>,
    /// How much data to read back.
    pub read_data: ReadData,
    /// Worker threads.
    pub threads: usize,
}

/// One problem found.
#[derive(Debug, Clone)]
pub struct Problem {
    /// What is wrong, naming the object (pack, chunk, snapshot, index entry).
    pub what: String,
    /// The snapshots it affects.
    pub snapshots: Vec<SnapshotId>,
}

/// The outcome of `verify`.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Snapshots checked.
    pub snapshots: usize,
    /// Packs checked structurally.
    pub packs: usize,
    /// Bytes of every pack file: the repository's stored size.
    pub pack_bytes: u64,
    /// Packs no index file names (left by an interrupted backup; prune removes them).
    pub packs_unindexed: usize,
    /// Packs whose data was read back.
    pub packs_read: usize,
    /// Bytes of pack data read back.
    pub bytes_read: u64,
    /// Blobs decompressed and re-hashed.
    pub blobs_read: u64,
    /// Everything found wrong.
    pub problems: Vec<Problem>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// A problem as it is found, before the snapshots it affects are known: those are looked up
/// at the end, from its chunk ids, in one more pass over the snapshots' trees (taken only when
/// something is wrong). Keeping who-uses-what for every chunk instead would cost memory in
/// proportion to the repository.
struct Found {
    what: String,
    /// Chunks (data or trees) whose users it affects.
    ids: Vec<ChunkId>,
    /// Snapshots known to be affected already.
    snapshots: Vec<SnapshotId>,
}

impl Found {
    fn new(what: String, ids: Vec<ChunkId>) -> Found {
        Found {
            what,
            ids,
            snapshots: Vec::new(),
        }
    }
}

/// Runs `verify`.
pub fn verify(
    repo: &Repository,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let pool = worker_pool(opts.threads, "verify")?;
    let mut report = pool.install(|| verify_in_pool(repo, opts, progress))?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Memory: the list of packs, one index file and one window of one snapshot's trees at a time;
/// nothing per chunk of the repository.
fn verify_in_pool(
    repo: &Repository,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut found = Vec::new();
    let snapshots = check_snapshots(repo, &opts.snapshots, &mut found)?;
    let mut packs = repo.list_packs()?;
    packs.sort_unstable();
    let selected = select(&packs, opts.read_data);
    let mut report = VerifyReport {
        snapshots: snapshots.len(),
        packs: packs.len(),
        pack_bytes: packs.iter().map(|(_, size)| size).sum(),
        packs_read: selected.iter().filter(|s| **s).count(),
        ..VerifyReport::default()
    };
    progress.start(0, "packs", packs.len() as u64);
    // Per listed pack: whether an index file names it (and so whether it was checked yet).
    let mut named = vec![false; packs.len()];
    let mut gone_marked = Vec::new();
    let mut unlisted = Vec::new();
    for_each_index_file(repo, |f, file| {
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                found.push(Found::new(
                    format!("index file {f}: {e} (run `sbk repair index`)"),
                    Vec::new(),
                ));
                return;
            }
        };
        // Which of its packs to check, and to read: a pack two index files name is checked
        // against each, and read once.
        let mut work = Vec::new();
        for (pack, entries) in &file.packs {
            match packs.binary_search_by_key(pack, |(id, _)| *id) {
                Ok(i) => {
                    let first = !named[i];
                    named[i] = true;
                    if first {
                        progress.advance(0, 1);
                    }
                    work.push((*pack, entries.as_slice(), first && selected[i]));
                }
                // A marked pack may go at any time (a prune beside us), its used blobs
                // elsewhere; whether it was lost is settled at the end.
                Err(_) if repo.is_marked(pack) => gone_marked.push(*pack),
                // Or written since the packs were listed (a backup or a repack beside us):
                // listed again at the end.
                Err(_) => unlisted.push((*pack, entries.clone())),
            }
        }
        let checked = work
            .par_iter()
            .map(|(pack, entries, read)| check_pack(repo, *pack, entries, *read))
            .collect();
        tally(checked, &mut found, &mut report);
    })?;
    // Packs no index file names (left by an interrupted backup; prune removes them) are
    // checked on their own.
    let unindexed: Vec<usize> = (0..packs.len()).filter(|i| !named[*i]).collect();
    report.packs_unindexed = unindexed.len();
    let checked = unindexed
        .par_iter()
        .map(|i| {
            progress.advance(0, 1);
            check_pack(repo, packs[*i].0, &[], selected[*i])
        })
        .collect();
    tally(checked, &mut found, &mut report);
    progress.finish(0);
    if !unlisted.is_empty() || !gone_marked.is_empty() {
        // The packs as they are now, once for both questions.
        let now: HashSet<PackId> = repo.list_packs()?.into_iter().map(|(id, _)| id).collect();
        for (pack, entries) in unlisted {
            if repo.is_marked(&pack) {
                gone_marked.push(pack);
            } else if !now.contains(&pack) {
                found.push(missing_pack(&pack, &entries));
            }
        }
        found.extend(lost_during_check(repo, gone_marked, &now)?);
    }
    report.problems = attribute(repo, &snapshots, found)?;
    Ok(report)
}

/// Adds the outcomes of [`check_pack`] to what was found and to the report.
fn tally(checked: Vec<(Vec<Found>, u64, u64)>, found: &mut Vec<Found>, report: &mut VerifyReport) {
    for (f, bytes, blobs) in checked {
        found.extend(f);
        report.bytes_read += bytes;
        report.blobs_read += blobs;
    }
}

/// Decodes the manifests and segment trees of the snapshots (those of `wanted`, or all), and
/// checks that every chunk they refer to is indexed; what cannot be read is a problem. Returns
/// the snapshots checked.
fn check_snapshots(
    repo: &Repository,
    wanted: &[SnapshotId],
    found: &mut Vec<Found>,
) -> Result<Vec<(SnapshotId, Manifest)>> {
    // The index is brought up to date after listing the manifests: a snapshot's index file is
    // written before its manifest, so every blob a listed snapshot needs is then known (a
    // backup may have finished since the index was loaded). The index checks itself against
    // the index files when it is brought up to date: one that cannot be read is left out of
    // it (and reported below, when the index files are read).
    // As stored: a manifest damaged in the repository is a problem even when the local cache
    // holds a sound copy.
    let manifests = repo.snapshots_as_stored()?;
    repo.refresh_index()?;
    let rows = repo.index_rows()?;
    let mut checked = Vec::new();
    // Every chunk referred to, looked up once, in id order, partition by partition (the
    // table can be far larger than memory).
    // Only the snapshots wanted, and readable, have trees to locate.
    let manifests: Vec<_> = manifests
        .into_iter()
        .filter(|(id, _)| wanted.is_empty() || wanted.contains(id))
        .collect();
    let mut places = TreePlaces::new(&manifests, |(_, m)| m.as_ref().ok());
    let mut lookups = Lookups::new(&rows, repo.index()?.cache_dir(), true);
    for (n, (id, manifest)) in manifests.iter().enumerate() {
        let id = *id;
        let manifest = match manifest {
            Ok(m) => m,
            // Forgotten between the listing and the read (a forget beside us).
            Err(sbk_store::StoreError::SnapshotNotFound(_)) if wanted.is_empty() => continue,
            Err(e) => {
                let mut f = Found::new(format!("snapshot {id}: {e}"), Vec::new());
                f.snapshots.push(id);
                found.push(f);
                continue;
            }
        };
        places.enter(repo, &rows, n)?;
        for segments in windows(manifest) {
            let trees: Vec<_> = manifest.trees[segments.clone()]
                .par_iter()
                .zip(segments)
                .map(|(tree, i)| (tree, places.load(repo, tree, manifest.segment_len(i))))
                .collect();
            for (tree, extents) in trees {
                let extents = match extents {
                    Ok(extents) => extents,
                    Err(e) => {
                        let mut f = Found::new(format!("segment tree {tree}: {e}"), Vec::new());
                        f.snapshots.push(id);
                        found.push(f);
                        continue;
                    }
                };
                for x in extents {
                    if let Extent::Data { id, .. } = x {
                        lookups.push(id, 0)?;
                    }
                }
            }
        }
        checked.push((id, manifest.clone()));
    }
    lookups.resolve::<EngineError>(|row, records| {
        let chunk = records[0].0;
        if row.is_none() {
            found.push(Found::new(
                format!("chunk {chunk} is referenced but not in the index (missing data, or run `sbk repair index`)"),
                vec![chunk],
            ));
        }
        Ok(())
    })?;
    Ok(checked)
}

/// Turns what was found into problems, each naming the snapshots it affects: those that refer
/// to its chunks (one more pass over the trees, only when a problem names chunks).
fn attribute(
    repo: &Repository,
    snapshots: &[(SnapshotId, Manifest)],
    mut found: Vec<Found>,
) -> Result<Vec<Problem>> {
    let wanted: HashSet<ChunkId> = found.iter().flat_map(|f| f.ids.iter().copied()).collect();
    let mut users: HashMap<ChunkId, BTreeSet<usize>> = HashMap::new();
    if !wanted.is_empty() {
        for (n, (_, manifest)) in snapshots.iter().enumerate() {
            let mut note = |id: &ChunkId| {
                if wanted.contains(id) {
                    users.entry(*id).or_default().insert(n);
                }
            };
            manifest.trees.iter().for_each(&mut note);
            for segments in windows(manifest) {
                // A tree that cannot be read is a problem of its own already.
                for tree in (segments.clone())
                    .into_par_iter()
                    .map(|i| repo.load_tree(&manifest.trees[i], manifest.segment_len(i)))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .flatten()
                {
                    for x in tree {
                        if let Extent::Data { id, .. } = x {
                            note(&id);
                        }
                    }
                }
            }
        }
    }
    Ok(found
        .iter_mut()
        .map(|f| {
            let by_ids = f.ids.iter().filter_map(|id| users.get(id)).flatten();
            let mut affected: BTreeSet<SnapshotId> = by_ids.map(|n| snapshots[*n].0).collect();
            affected.extend(f.snapshots.iter().copied());
            Problem {
                what: std::mem::take(&mut f.what),
                snapshots: affected.into_iter().collect(),
            }
        })
        .collect())
}

/// Marked packs that went during the check: deleted by a prune, which first names their used
/// blobs elsewhere and drops them from the index files. One that is gone but still named (by
/// the index files as they are now, beside the packs as they are `now`) is lost, not pruned.
fn lost_during_check(
    repo: &Repository,
    gone: Vec<PackId>,
    now: &HashSet<PackId>,
) -> Result<Vec<Found>> {
    if gone.is_empty() {
        return Ok(Vec::new());
    }
    let gone: HashSet<PackId> = gone.into_iter().collect();
    let mut lost = Vec::new();
    for_each_index_file(repo, |_, file| {
        for (pack, entries) in file.map(|f| f.packs).unwrap_or_default() {
            if gone.contains(&pack) && !now.contains(&pack) {
                lost.push(missing_pack(&pack, &entries));
            }
        }
    })?;
    Ok(lost)
}

/// The problem of a pack the index names that is not there.
fn missing_pack(pack: &PackId, entries: &[PackEntry]) -> Found {
    Found::new(
        format!(
            "pack {pack} is missing, but the index names it for {} blobs",
            entries.len()
        ),
        entries.iter().map(|e| e.id).collect(),
    )
}

/// Which of `packs` (in id order) `read` asks to read, position by position.
fn select(packs: &[(PackId, u64)], read: ReadData) -> Vec<bool> {
    match read {
        ReadData::None => vec![false; packs.len()],
        ReadData::All => vec![true; packs.len()],
        ReadData::Part { n, m } => (0..packs.len())
            .map(|i| (i as u64) % u64::from(m) == u64::from(n - 1))
            .collect(),
        // Pack ids are random: taking those whose first bytes fall under the threshold is a random
        // sample, and a different one each time a fresh threshold offset is used.
        ReadData::Percent(p) => {
            let offset = u32::from_le_bytes(
                sbk_store::PackId::random()
                    .map(|id| [id.0[0], id.0[1], id.0[2], id.0[3]])
                    .unwrap_or([0; 4]),
            );
            let threshold = (p.clamp(0.0, 100.0) / 100.0 * f64::from(u32::MAX)) as u32;
            packs
                .iter()
                .map(|(id, _)| {
                    u32::from_le_bytes([id.0[0], id.0[1], id.0[2], id.0[3]]).wrapping_sub(offset)
                        <= threshold
                })
                .collect()
        }
    }
}

/// Calls `f` with each index file and its contents (or why they could not be read), one at a
/// time. A file that vanishes between listing and reading was replaced by a prune (which
/// writes the new files before it removes the old ones): the files are then listed again, and
/// those not seen yet read.
fn for_each_index_file(
    repo: &Repository,
    mut f: impl FnMut(IndexId, std::result::Result<IndexFile, StoreError>),
) -> Result<()> {
    let mut seen = HashSet::new();
    for attempt in 1..=5 {
        let mut replaced = false;
        for id in repo.index_files()? {
            if !seen.insert(id) {
                continue;
            }
            match repo.read_index_file(&id) {
                Err(StoreError::ObjectMissing { .. }) if attempt < 5 => replaced = true,
                file => f(id, file),
            }
        }
        if !replaced {
            break;
        }
    }
    Ok(())
}

/// Checks one pack: its trailer, each blob header, agreement with the index, and (when `read`)
/// every blob's contents. Returns the problems, bytes read and blobs re-hashed.
fn check_pack(
    repo: &Repository,
    pack: PackId,
    indexed: &[PackEntry],
    read: bool,
) -> (Vec<Found>, u64, u64) {
    let mut problems = Vec::new();
    let trailer = match repo.read_trailer(pack) {
        Ok(t) => t,
        // Deleted since it was listed by a prune beside us (docs/design.md, "prune").
        Err(sbk_store::StoreError::PackMissing { .. }) if repo.is_marked(&pack) => {
            return (problems, 0, 0);
        }
        Err(e) => {
            problems.push(Found::new(
                format!("pack {pack}: {e}"),
                indexed.iter().map(|e| e.id).collect(),
            ));
            return (problems, 0, 0);
        }
    };
    let by_id: HashMap<ChunkId, &PackEntry> = trailer.iter().map(|e| (e.id, e)).collect();
    for e in indexed {
        if by_id.get(&e.id).is_none_or(|t| *t != e) {
            problems.push(Found::new(
                format!("index entry of chunk {} points at pack {pack} offset {}, which the pack's trailer does not list", e.id, e.offset),
                vec![e.id],
            ));
        }
    }
    let (mut bytes, mut blobs) = (0u64, 0u64);
    let problem = |e: &PackEntry, err: &sbk_store::StoreError| {
        Found::new(format!("chunk {} in pack {pack}: {err}", e.id), vec![e.id])
    };
    // Deleted meanwhile by a prune beside us, its used blobs elsewhere.
    let pruned = |err: &sbk_store::StoreError| {
        matches!(err, sbk_store::StoreError::PackMissing { .. }) && repo.is_marked(&pack)
    };
    if !read {
        // On object storage a header is a request of its own: the trailer (authenticated where
        // the repository is encrypted) has been checked against the index, and the headers are
        // checked with the blobs themselves by `--read-data`.
        if repo.backend().reads_are_requests() {
            return (problems, 0, 0);
        }
        for e in &trailer {
            if let Err(err) = repo.check_blob_header_at(pack, e) {
                if pruned(&err) {
                    return (problems, 0, 0);
                }
                problems.push(problem(e, &err));
            }
        }
        return (problems, 0, 0);
    }
    let (mut buf, mut raw, mut handed) = (Vec::new(), Vec::new(), 0);
    // Each blob read back is opened and re-hashed; what fails is that blob's problem.
    let mut outcomes: Vec<(usize, sbk_store::Result<()>)> = Vec::new();
    let whole = repo.read_blobs(pack, &trailer, PackGone::Fail, &mut buf, |i, blob| {
        handed += 1;
        outcomes.push((i, open_checked(&trailer[i], blob, &mut raw)));
        Ok::<(), sbk_store::StoreError>(())
    });
    if let Err(err) = whole {
        if pruned(&err) {
            return (problems, 0, 0);
        }
        // A read of several blobs failed (a pack cut short, an I/O error): the blobs not read
        // yet are read one by one, so that only those that cannot be read are named.
        for (i, e) in trailer.iter().enumerate().skip(handed) {
            let one = repo.read_blobs(
                pack,
                std::slice::from_ref(e),
                PackGone::Fail,
                &mut buf,
                |_, blob| {
                    outcomes.push((i, open_checked(e, blob, &mut raw)));
                    Ok::<(), sbk_store::StoreError>(())
                },
            );
            match one {
                Ok(()) => {}
                Err(err) if pruned(&err) => return (problems, 0, 0),
                Err(err) => outcomes.push((i, Err(err))),
            }
        }
    }
    for (i, outcome) in outcomes {
        let e = &trailer[i];
        match outcome {
            Ok(()) => {
                bytes += BLOB_HEADER_LEN as u64 + u64::from(e.stored_len);
                blobs += 1;
            }
            Err(err) => problems.push(problem(e, &err)),
        }
    }
    (problems, bytes, blobs)
}

/// Opens a blob read back into `raw` and re-hashes it.
fn open_checked(
    e: &PackEntry,
    blob: sbk_store::Result<sbk_store::StoredBlob<'_>>,
    raw: &mut Vec<u8>,
) -> sbk_store::Result<()> {
    let blob = blob?;
    raw.resize(e.raw_len as usize, 0);
    blob.open_into(raw)
}
