//! The marks of earlier runs: which are due (acted on by this run) and which wait.

use std::collections::{HashMap, HashSet};

use sbk_store::{Lock, LockKind, MarkReason, PackId, Repository};

use super::PruneMode;
use crate::error::{EngineError, Result};

/// What the marks objects of earlier runs allow.
#[derive(Default)]
pub(crate) struct EarlierMarks {
    /// Marked packs this run may delete (when still not needed), with the reason.
    pub due: HashMap<PackId, MarkReason>,
    /// Marked packs whose mark waits.
    pub waiting: HashSet<PackId>,
    /// Names of the marks objects this run acts on (removed at its end).
    pub consumed: Vec<String>,
    /// How many marks objects wait, and why the first does.
    pub waiting_objects: usize,
    pub because: Option<String>,
    /// Leftovers of interrupted writes last written before this (storage time) are nobody's:
    /// older than every live lock but ours and pins (a pin's holder writes only small objects,
    /// done in moments), and than the grace period. Under an exclusive lock, all of them. (A
    /// process that takes its lock after the listing this comes from writes nothing older than
    /// our own lock.)
    pub leftovers_before: i64,
}

/// Sorts the marks objects into those this run acts on and those that wait. A mark is acted on
/// once `grace` has passed since the storage wrote it and every live lock but ours and pins was
/// taken more than `grace` after it (storage times both): a process that took its lock later
/// read the mark before it could dedup against a marked pack. In exclusive mode every mark is
/// consumed: nobody else is there to honour it.
pub(crate) fn sort_marks(repo: &Repository, lock: &Lock, mode: PruneMode) -> Result<EarlierMarks> {
    let mut out = EarlierMarks {
        leftovers_before: i64::MAX,
        ..EarlierMarks::default()
    };
    let found = repo.list_marks()?;
    let PruneMode::Beside { grace_secs } = mode else {
        for m in found {
            if let Ok(marks) = m.marks {
                out.due.extend(marks.packs);
            }
            out.consumed.push(m.name);
        }
        return Ok(out);
    };
    // Marks first, locks second; no marks object appears meanwhile (prune locks exclude each
    // other), and a lock taken after this listing postdates every mark.
    let others = live_others(repo, lock)?;
    // Our own lock's time is the storage's "now".
    let now = lock.started();
    out.leftovers_before = others
        .iter()
        .map(|l| l.started())
        .min()
        .unwrap_or(i64::MAX)
        .min(now - grace_secs);
    for m in found {
        let marks = m.marks.map_err(|e| {
            EngineError::Unsafe(format!(
                "{e}; which packs it marks is unknown: run `sbk prune --exclusive` when no backup runs"
            ))
        })?;
        let age = now - m.modified;
        let wait = if age < grace_secs {
            Some(format!(
                "marked {age} s ago; the grace period is {grace_secs} s"
            ))
        } else {
            // One second more than the grace: storage times have one-second resolution, and
            // an object's time is when its write began, a moment before it can be listed.
            others
                .iter()
                .find(|l| l.started() <= m.modified + grace_secs + 1)
                .map(|l| match &l.info {
                    Ok(i) => format!(
                        "{} lock of process {} on {} ({}) was taken before the mark",
                        i.kind.article(),
                        i.pid,
                        i.host,
                        i.purpose
                    ),
                    Err(e) => format!("lock {} cannot be read ({e})", l.name),
                })
        };
        match wait {
            Some(why) => {
                out.waiting.extend(marks.packs.iter().map(|(p, _)| *p));
                out.waiting_objects += 1;
                out.because.get_or_insert(why);
            }
            None => {
                out.due.extend(marks.packs);
                out.consumed.push(m.name);
            }
        }
    }
    // A pack in a waiting mark waits, whatever another mark says.
    out.due.retain(|p, _| !out.waiting.contains(p));
    Ok(out)
}

/// The locks but ours and pins that may still be held ([`sbk_store::FoundLock::live`], at our
/// own lock's storage time: no host's clock decides it, since taking a live backup for gone
/// could delete what it refers to). A server's reads that find a pack gone refresh the index
/// and read on: pins do not count.
fn live_others(repo: &Repository, lock: &Lock) -> Result<Vec<sbk_store::FoundLock>> {
    Ok(repo
        .live_locks(lock.started())?
        .into_iter()
        .filter(|l| l.name != lock.name())
        .filter(|l| l.info.as_ref().map_or(true, |i| i.kind != LockKind::Pin))
        .collect())
}
