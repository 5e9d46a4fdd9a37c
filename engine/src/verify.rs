//! `verify`: proves that what the repository holds can be restored.
//!
//! The structural check (always) decodes every manifest and segment tree, checks that every
//! referenced blob is indexed in a pack that exists and whose trailer lists it where the index
//! says, that every pack trailer agrees with the blob headers in the pack and with the index, and
//! that no index entry points at a missing pack. With `read_data`, the blobs of all packs (or a
//! subset) are read, decompressed and re-hashed. Every problem names the object and the snapshots
//! it affects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use rayon::prelude::*;
use sbk_store::{
    ChunkId, Extent, PackEntry, PackGone, PackId, Repository, SnapshotId, BLOB_HEADER_LEN,
};

use crate::error::Result;
use crate::pool::worker_pool;
use crate::progress::Progress;

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

/// Which snapshots refer to each blob, as indices into a snapshot list.
struct References {
    snapshots: Vec<SnapshotId>,
    by_blob: HashMap<ChunkId, Vec<u32>>,
}

impl References {
    fn affected<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) -> Vec<SnapshotId> {
        let set: BTreeSet<u32> = ids
            .into_iter()
            .filter_map(|id| self.by_blob.get(id))
            .flatten()
            .copied()
            .collect();
        set.into_iter()
            .map(|i| self.snapshots[i as usize])
            .collect()
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

fn verify_in_pool(
    repo: &Repository,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut problems = Vec::new();
    let refs = references(repo, &opts.snapshots, &mut problems)?;
    let by_pack = index_by_pack(repo, &refs, &mut problems)?;
    let mut report = VerifyReport {
        snapshots: refs.snapshots.len(),
        ..VerifyReport::default()
    };

    // Packs: trailer against headers and index.
    let packs = repo.list_packs()?;
    report.packs = packs.len();
    let on_disk: HashSet<PackId> = packs.iter().map(|(id, _)| *id).collect();
    report.packs_unindexed = packs
        .iter()
        .filter(|(id, _)| !by_pack.contains_key(id))
        .count();
    for (pack, entries) in &by_pack {
        // A marked pack may go at any time (a prune beside us), its used blobs elsewhere.
        if !on_disk.contains(pack) && !repo.is_marked(pack) {
            problems.push(missing_pack(pack, entries, &refs));
        }
    }
    progress.start(0, "packs", packs.len() as u64);
    let selected = select(&packs, opts.read_data);
    let checked: Vec<(Vec<Problem>, u64, u64)> = packs
        .par_iter()
        .map(|(pack, _)| {
            let indexed = by_pack.get(pack).map(Vec::as_slice).unwrap_or(&[]);
            let r = check_pack(repo, *pack, indexed, selected.contains(pack), &refs);
            progress.advance(0, 1);
            r
        })
        .collect();
    progress.finish(0);
    for (p, bytes, blobs) in checked {
        problems.extend(p);
        report.bytes_read += bytes;
        report.blobs_read += blobs;
    }
    problems.extend(lost_during_check(repo, &by_pack, &refs)?);
    report.packs_read = selected.len();
    report.problems = problems;
    Ok(report)
}

/// What the snapshots (those of `wanted`, or all) refer to, from their manifests and trees;
/// what cannot be read is a problem.
fn references(
    repo: &Repository,
    wanted: &[SnapshotId],
    problems: &mut Vec<Problem>,
) -> Result<References> {
    let mut refs = References {
        snapshots: Vec::new(),
        by_blob: HashMap::new(),
    };
    // The index is brought up to date after listing the manifests: a snapshot's index file is
    // written before its manifest, so every blob a listed snapshot needs is then known (a
    // backup may have finished since the index was loaded).
    let manifests = repo.snapshots()?;
    repo.refresh_index()?;
    for (id, manifest) in manifests {
        if !wanted.is_empty() && !wanted.contains(&id) {
            continue;
        }
        let manifest = match manifest {
            Ok(m) => m,
            // Forgotten between the listing and the read (a forget beside us).
            Err(sbk_store::StoreError::SnapshotNotFound(_)) if wanted.is_empty() => continue,
            Err(e) => {
                problems.push(Problem {
                    what: format!("snapshot {id}: {e}"),
                    snapshots: vec![id],
                });
                continue;
            }
        };
        let index = refs.snapshots.len() as u32;
        refs.snapshots.push(id);
        let trees: Vec<_> = manifest
            .trees
            .par_iter()
            .enumerate()
            .map(|(i, tree)| (tree, repo.load_tree(tree, manifest.segment_len(i))))
            .collect();
        for (tree, extents) in trees {
            refs.by_blob.entry(*tree).or_default().push(index);
            match extents {
                Ok(extents) => {
                    for x in extents {
                        if let Extent::Data { id: chunk, .. } = x {
                            let users = refs.by_blob.entry(chunk).or_default();
                            if users.last() != Some(&index) {
                                users.push(index);
                            }
                        }
                    }
                }
                Err(e) => problems.push(Problem {
                    what: format!("segment tree {tree}: {e}"),
                    snapshots: vec![id],
                }),
            }
        }
    }
    Ok(refs)
}

/// The index, by pack, from the index files themselves (the repository's truth, not the local
/// cache); a damaged index file, and a referenced blob no index file names, are problems.
fn index_by_pack(
    repo: &Repository,
    refs: &References,
    problems: &mut Vec<Problem>,
) -> Result<HashMap<PackId, Vec<PackEntry>>> {
    let mut by_pack: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
    for (f, file) in read_index_files(repo)? {
        match file {
            Ok(file) => {
                for (pack, entries) in file.packs {
                    by_pack.entry(pack).or_default().extend(entries);
                }
            }
            Err(e) => problems.push(Problem {
                what: format!("index file {f}: {e} (run `sbk repair index`)"),
                snapshots: Vec::new(),
            }),
        }
    }
    let indexed: HashSet<ChunkId> = by_pack.values().flatten().map(|e| e.id).collect();
    let mut missing: Vec<&ChunkId> = refs
        .by_blob
        .keys()
        .filter(|id| !indexed.contains(id))
        .collect();
    missing.sort();
    for id in missing {
        problems.push(Problem {
            what: format!("chunk {id} is referenced but not in the index (missing data, or run `sbk repair index`)"),
            snapshots: refs.affected([id]),
        });
    }
    Ok(by_pack)
}

/// Marked packs that went during the check: deleted by a prune, which first names their used
/// blobs elsewhere and drops them from the index files. One that is gone but still named is
/// lost, not pruned.
fn lost_during_check(
    repo: &Repository,
    by_pack: &HashMap<PackId, Vec<PackEntry>>,
    refs: &References,
) -> Result<Vec<Problem>> {
    let now: HashSet<PackId> = repo.list_packs()?.into_iter().map(|(id, _)| id).collect();
    let gone: Vec<&PackId> = by_pack
        .keys()
        .filter(|p| repo.is_marked(p) && !now.contains(p))
        .collect();
    if gone.is_empty() {
        return Ok(Vec::new());
    }
    let named: HashSet<PackId> = read_index_files(repo)?
        .into_iter()
        .filter_map(|(_, f)| f.ok())
        .flat_map(|f| f.packs.into_iter().map(|(p, _)| p))
        .collect();
    Ok(gone
        .into_iter()
        .filter(|p| named.contains(p))
        .map(|pack| missing_pack(pack, &by_pack[pack], refs))
        .collect())
}

/// The problem of a pack the index names that is not there.
fn missing_pack(pack: &PackId, entries: &[PackEntry], refs: &References) -> Problem {
    Problem {
        what: format!(
            "pack {pack} is missing, but the index names it for {} blobs",
            entries.len()
        ),
        snapshots: refs.affected(entries.iter().map(|e| &e.id)),
    }
}

/// The packs whose data `read` asks for.
fn select(packs: &[(PackId, u64)], read: ReadData) -> HashSet<PackId> {
    match read {
        ReadData::None => HashSet::new(),
        ReadData::All => packs.iter().map(|(id, _)| *id).collect(),
        ReadData::Part { n, m } => packs
            .iter()
            .enumerate()
            .filter(|(i, _)| (*i as u32) % m == n - 1)
            .map(|(_, (id, _))| *id)
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
                .filter(|(id, _)| {
                    u32::from_le_bytes([id.0[0], id.0[1], id.0[2], id.0[3]]).wrapping_sub(offset)
                        <= threshold
                })
                .map(|(id, _)| *id)
                .collect()
        }
    }
}

/// Every index file with its contents (or why they could not be read). A file that vanishes
/// between listing and reading was replaced by a prune (which writes the new files before it
/// removes the old ones): the files are then listed and read again.
fn read_index_files(
    repo: &Repository,
) -> Result<
    Vec<(
        sbk_store::IndexId,
        std::result::Result<sbk_store::IndexFile, sbk_store::StoreError>,
    )>,
> {
    let mut attempts = 0;
    loop {
        let files: Vec<_> = repo
            .index_files()?
            .into_iter()
            .map(|f| (f, repo.read_index_file(&f)))
            .collect();
        let replaced = files
            .iter()
            .any(|(_, r)| matches!(r, Err(sbk_store::StoreError::ObjectMissing { .. })));
        attempts += 1;
        if !replaced || attempts == 5 {
            return Ok(files);
        }
    }
}

/// Checks one pack: its trailer, each blob header, agreement with the index, and (when `read`)
/// every blob's contents. Returns the problems, bytes read and blobs re-hashed.
fn check_pack(
    repo: &Repository,
    pack: PackId,
    indexed: &[PackEntry],
    read: bool,
    refs: &References,
) -> (Vec<Problem>, u64, u64) {
    let mut problems = Vec::new();
    let in_pack = |ids: &mut dyn Iterator<Item = &ChunkId>| refs.affected(ids.collect::<Vec<_>>());
    let trailer = match repo.read_trailer(pack) {
        Ok(t) => t,
        // Deleted since it was listed by a prune beside us (docs/design.md, "prune").
        Err(sbk_store::StoreError::PackMissing { .. }) if repo.is_marked(&pack) => {
            return (problems, 0, 0);
        }
        Err(e) => {
            problems.push(Problem {
                what: format!("pack {pack}: {e}"),
                snapshots: in_pack(&mut indexed.iter().map(|e| &e.id)),
            });
            return (problems, 0, 0);
        }
    };
    let by_id: HashMap<ChunkId, &PackEntry> = trailer.iter().map(|e| (e.id, e)).collect();
    for e in indexed {
        if by_id.get(&e.id).is_none_or(|t| *t != e) {
            problems.push(Problem {
                what: format!("index entry of chunk {} points at pack {pack} offset {}, which the pack's trailer does not list", e.id, e.offset),
                snapshots: refs.affected([&e.id]),
            });
        }
    }
    let (mut bytes, mut blobs) = (0u64, 0u64);
    let problem = |e: &PackEntry, err: &sbk_store::StoreError| Problem {
        what: format!("chunk {} in pack {pack}: {err}", e.id),
        snapshots: refs.affected([&e.id]),
    };
    // Deleted meanwhile by a prune beside us, its used blobs elsewhere.
    let pruned = |err: &sbk_store::StoreError| {
        matches!(err, sbk_store::StoreError::PackMissing { .. }) && repo.is_marked(&pack)
    };
    if !read {
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
