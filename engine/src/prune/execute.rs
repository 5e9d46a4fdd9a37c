//! Carrying out a prune plan.
//!
//! Ordering (docs/design.md, "prune"): blobs that stay are copied into new packs, which are
//! sealed (durable) first; then new index files naming every surviving and new pack are
//! written, and only then are the old index files removed; then this run's marks are written;
//! only then are packs deleted, then the marks this run acted on. A crash at any point leaves
//! every snapshot restorable: at worst extra packs (named by no index file, swept by a later
//! prune), index files naming a blob twice, or a marks object naming packs that are gone. A
//! stop is honoured between steps: each leaves the repository as a crash there would.

use sbk_store::{Lock, PackGone, Repository};

use super::liveness::Liveness;
use super::marks::EarlierMarks;
use super::plan::{kept, survivors, PackAction, PrunePlan};
use super::{PruneMode, PruneReport, RepoIndexFiles};
use crate::error::Result;
use crate::packer::Packer;
use crate::progress::Progress;
use crate::repair::IndexWriter;

/// Carries out `plan`, computed from index files `files` and marks `earlier`, filling in what
/// it did in `report`.
#[allow(clippy::too_many_arguments)]
pub(super) fn execute(
    repo: &Repository,
    lock: &Lock,
    plan: &PrunePlan,
    files: &RepoIndexFiles<'_>,
    live: &Liveness,
    earlier: &EarlierMarks,
    mode: PruneMode,
    report: &mut PruneReport,
    progress: &dyn Progress,
) -> Result<()> {
    let beside = matches!(mode, PruneMode::Beside { .. });
    crate::interrupt::check()?;
    // 1. The blobs that stay, copied into new packs (durable, and named by the packer's own
    //    index file).
    let packer = Packer::replaced(repo);
    copy_live(&packer, repo, plan, files, live, progress)?;
    let new_files = packer.index_files();

    // 2. New index files naming the surviving and new packs, then the old index files go (the
    //    packer's among them): from here on no process can find a blob in a pack about to be
    //    deleted.
    crate::interrupt::check()?;
    if plan.rewrite_index {
        let mut writer = IndexWriter::new(repo);
        survivors(plan, files, live, &mut |pack, entries| {
            writer.add(pack, entries)
        })?;
        // The new packs, as the packer's own index files name them (read back one at a time).
        for f in &new_files {
            for (pack, entries) in repo.read_index_file(f)?.packs {
                report.packs_written += 1;
                writer.add(pack, entries)?;
            }
        }
        let mut old = files.names().clone();
        old.extend(new_files);
        report.index_files_written = writer.replace(&old)?.0;
    }

    // 3. The marks of this run, once the copies of repacked blobs are indexed: backups that
    //    start from now on leave the marked packs alone.
    crate::interrupt::check()?;
    if !plan.marks.packs.is_empty() {
        repo.write_marks(&plan.marks)?;
    }

    // 4. Only now packs are deleted, then the marks this run acted on, then the leftovers of
    //    interrupted writes that no live process can still be writing.
    // Beside backups, repacked packs are marked, and a later run deletes them.
    let repacked = plan.acting(PackAction::Repack).filter(|_| !beside);
    for (pack, size) in plan.acting(PackAction::Delete).chain(repacked) {
        crate::interrupt::check()?;
        report.bytes_removed += repo.remove_pack(pack, size)?;
    }
    for name in &earlier.consumed {
        repo.remove_marks(name)?;
    }
    // Best effort: what is left of interrupted writes costs space, never correctness, and a
    // storage that cannot list it (or fails to) must not fail a prune that did its work.
    match repo.remove_leftovers(earlier.leftovers_before) {
        Ok(freed) => report.bytes_leftovers += freed,
        Err(e) => report.notices.push(format!(
            "leftovers of interrupted writes were not removed: {e}"
        )),
    }
    // Pins of processes that are gone protect nothing any more.
    repo.remove_stale_pins(lock.started())?;
    report.bytes_written = packer.packed_bytes();
    report.bytes_reclaimed = report.bytes_removed.saturating_sub(report.bytes_written);
    Ok(())
}

/// Copies the live blobs of the packs to repack into new packs through a [`Packer`], each blob
/// verified before it is written (prune never spreads a damaged blob), and flushes it: the new
/// packs are durable and named by the packer's own index files when this returns.
fn copy_live(
    packer: &Packer<'_>,
    repo: &Repository,
    plan: &PrunePlan,
    files: &RepoIndexFiles<'_>,
    live: &Liveness,
    progress: &dyn Progress,
) -> Result<()> {
    progress.start(0, "repack", plan.bytes_repacked);
    let (mut buf, mut scratch) = (Vec::new(), Vec::new());
    kept(plan, files, live, &mut |pack, keep| {
        crate::interrupt::check()?;
        repo.read_blobs(
            pack,
            &keep,
            PackGone::Fail,
            &mut buf,
            |_, blob| -> Result<()> {
                let blob = blob?.verified_copy(&mut scratch)?;
                progress.advance(0, packer.add(std::slice::from_ref(&blob))?);
                Ok(())
            },
        )
    })?;
    packer.flush()?;
    progress.finish(0);
    Ok(())
}
