//! Changed-block incrementals: choosing the parent, and planning which segments to reuse
//! unread, which to re-read to check the list, and which to read only around their changes.

use std::collections::HashMap;
use std::ops::Range;

use sbk_store::{ChangedBlocks, ChunkId, Manifest, Repository, SnapshotId, StoreError};

use super::{BackupOptions, ChangedOptions, RunState};
use crate::changed::ChangedList;
use crate::error::{EngineError, Result};
use crate::progress::Progress;

/// What a run of one source reads, and what it records of the changed-block list.
pub(super) struct Incremental {
    /// Segments to reuse, re-read and read around their changes.
    pub plan: Plan,
    /// The changed-block record of the snapshot, when a list was given.
    pub info: Option<ChangedBlocks>,
    /// The parent chosen for the list.
    pub parent: Option<SnapshotId>,
}

impl Incremental {
    /// The list lied: the source of `segments` segments is read whole, and the snapshot says
    /// its list was not trusted.
    pub fn distrust(&mut self, segments: u64) {
        self.plan = Plan {
            reuse: vec![None; segments as usize],
            ..Plan::default()
        };
        if let Some(i) = &mut self.info {
            i.trusted = false;
        }
    }
}

/// Chooses the parent of an incremental and plans which segments to reuse unread; a full read
/// when no list was given. The lock was taken before this (by the caller), so prune cannot take
/// the parent's trees meanwhile, and the parent is pinned by it: even forgotten meanwhile,
/// prune keeps what it refers to (a prune beside backups may have marked its packs before we
/// started, if the backup that wrote it started earlier still).
pub(super) fn plan_incremental(
    state: &RunState<'_>,
    label: &str,
    size: u64,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Incremental> {
    let repo = state.repo;
    let seg_size = repo.config().segment_size;
    let Some(c) = &opts.changed else {
        return Ok(Incremental {
            plan: Plan::default(),
            info: None,
            parent: None,
        });
    };
    let parent = choose_and_pin_parent(state, &opts.host, label, c)?;
    let mut info = ChangedBlocks {
        since: c.since.clone(),
        incremental: true,
        trusted: true,
        ..Default::default()
    };
    let mut plan = Plan::default();
    match &parent {
        Some((pid, pm)) => {
            if pm.host != opts.host || pm.source != label {
                return Err(EngineError::ParentUnusable(format!(
                    "parent {pid} is a snapshot of {} on {}, not of {label} on {}",
                    pm.source, pm.host, opts.host
                )));
            }
            if pm.segment_size != seg_size {
                return Err(EngineError::ParentUnusable(format!(
                    "parent {pid} was cut into segments of {} bytes, this repository cuts {seg_size}",
                    pm.segment_size
                )));
            }
            plan = plan_reuse(repo, pm, &c.list, size, seg_size, c.verify_percent)?;
        }
        None => {
            progress.notice(&format!(
                "{label}: no parent snapshot to apply the changed-block list to: reading everything"
            ));
            info.incremental = false;
        }
    }
    Ok(Incremental {
        plan,
        info: Some(info),
        parent: parent.map(|(id, _)| id),
    })
}

/// The parent, pinned under the run's lock. One forgotten since it was chosen (a forget beside
/// us) is chosen again, unless the operator named it.
pub(super) fn choose_and_pin_parent(
    state: &RunState<'_>,
    host: &str,
    label: &str,
    c: &ChangedOptions,
) -> Result<Option<(SnapshotId, Manifest)>> {
    let repo = state.repo;
    let mut parent = choose_parent(repo, host, label, c)?;
    let mut attempts = 0;
    while let Some((id, _)) = &parent {
        match repo.pin_snapshot(state.lock, id) {
            Ok(()) => break,
            Err(StoreError::SnapshotNotFound(_)) if c.parent.is_none() && attempts < 3 => {
                attempts += 1;
                parent = choose_parent(repo, host, label, c)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(parent)
}

/// What a run reads: for each segment, the parent's tree to reuse unread, if any; the segments
/// re-read to check the list, with the tree the parent has for them; and the changed segments
/// that are read only around their changes, with the parent's tree and the changed ranges.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) reuse: Vec<Option<ChunkId>>,
    pub(super) check: HashMap<u64, ChunkId>,
    pub(super) around: HashMap<u64, (ChunkId, Vec<Range<usize>>)>,
}

/// The parent of an incremental: the one named, the newest carrying the `since` token, or the
/// newest of the host and source.
pub(super) fn choose_parent(
    repo: &Repository,
    host: &str,
    source: &str,
    c: &ChangedOptions,
) -> Result<Option<(SnapshotId, Manifest)>> {
    if let Some(id) = c.parent {
        return Ok(Some((id, repo.load_manifest(&id)?)));
    }
    let all = repo.snapshots()?;
    let mine = all.into_iter().rev().filter_map(|(id, m)| {
        m.ok()
            .filter(|m| m.host == host && m.source == source)
            .map(|m| (id, m))
    });
    match &c.since {
        Some(since) => {
            let found = mine.into_iter().find(|(_, m)| {
                m.changed_blocks()
                    .and_then(|r| r.ok())
                    .and_then(|i| i.token)
                    .as_deref()
                    == Some(since.as_str())
            });
            match found {
                Some(p) => Ok(Some(p)),
                None => Err(EngineError::ParentUnusable(format!(
                    "no snapshot of {source} on {host} carries the token {since:?} the list starts from; back up in full (without --changed-blocks) to start a new chain"
                ))),
            }
        }
        None => Ok(mine.into_iter().next()),
    }
}

/// Which segments to reuse from `parent`: those of the same length that no changed range
/// touches and whose tree the index knows; and a random sample of them (`percent`, at least
/// one) to re-read and compare.
pub(super) fn plan_reuse(
    repo: &Repository,
    parent: &Manifest,
    list: &ChangedList,
    size: u64,
    seg_size: u64,
    percent: f64,
) -> Result<Plan> {
    let segments = size.div_ceil(seg_size);
    let touched = list.segments(seg_size, segments);
    let len = |i: u64| (size - i * seg_size).min(seg_size);
    let index = repo.index()?;
    let same_shape =
        |i: u64| (i as usize) < parent.trees.len() && parent.segment_len(i as usize) == len(i);
    let mut reuse: Vec<Option<ChunkId>> = (0..segments)
        .map(|i| {
            // A tree the index does not know (a damaged parent) is read, never referred to.
            (same_shape(i) && !touched[i as usize] && index.contains(&parent.trees[i as usize]))
                .then(|| parent.trees[i as usize])
        })
        .collect();
    // A changed segment of the parent's length is read around its changes only.
    let around = (0..segments)
        .filter(|&i| {
            touched[i as usize] && same_shape(i) && index.contains(&parent.trees[i as usize])
        })
        .map(|i| {
            let start = i * seg_size;
            (
                i,
                (parent.trees[i as usize], list.within(start..start + len(i))),
            )
        })
        .collect();
    let reusable: Vec<u64> = (0..segments)
        .filter(|i| reuse[*i as usize].is_some())
        .collect();
    let mut check = HashMap::new();
    if !reusable.is_empty() {
        let k =
            ((reusable.len() as f64 * percent / 100.0).ceil() as usize).clamp(1, reusable.len());
        // A random sample, so that a list that lies cannot know which segments are checked.
        let mut seed = u64::from_le_bytes(
            sbk_store::PackId::random()
                .map(|p| p.0[..8].try_into().expect("eight bytes"))
                .unwrap_or([7; 8]),
        ) | 1;
        let mut pool = reusable;
        for j in 0..k {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pick = j + (seed % (pool.len() - j) as u64) as usize;
            pool.swap(j, pick);
            let i = pool[j];
            check.insert(i, reuse[i as usize].take().expect("reusable"));
        }
    }
    Ok(Plan {
        reuse,
        check,
        around,
    })
}

/// The newest snapshot of `host` and `source`, the parent of the next one.
pub(super) fn latest_of(
    repo: &Repository,
    host: &str,
    source: &str,
) -> Result<Option<SnapshotId>, StoreError> {
    Ok(repo
        .snapshots()?
        .into_iter()
        .rev()
        .find(|(_, m)| {
            m.as_ref()
                .is_ok_and(|m| m.host == host && m.source == source)
        })
        .map(|(id, _)| id))
}
