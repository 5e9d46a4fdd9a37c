//! sbk's data movers: sources read through O_DIRECT by extents, the parallel backup and restore
//! pipelines, and snapshots served as NBD exports. With the NBD server's connection threads,
//! this is the only sbk crate that owns threads; it never prints, and reports progress through
//! [`Progress`].

mod backup;
mod changed;
mod chunk_cache;
mod copy;
mod diff;
mod error;
mod files;
#[cfg(test)]
mod interleave_tests;
mod interrupt;
mod overlay;
mod packer;
mod pool;
mod progress;
mod protect;
mod prune;
mod repair;
mod restore;
mod retention;
mod serve;
mod snapshot;
mod source;
mod stats;
mod sys;
#[cfg(test)]
mod testkit;
mod unlock;
mod verify;

pub use backup::{
    backup, chunker_params, default_host, BackupOptions, BackupOutcome, ChangedOptions,
};
pub use changed::{fuzz_changed_list, ChangedList, ListError};
pub use chunk_cache::ChunkCache;
pub use copy::{check_compatible, copy, CopyOutcome};
pub use diff::{diff, SnapshotDiff};
pub use error::{EngineError, Result};
pub use files::{
    extract, fuzz_extract, parse_part_path, ExtractOptions, ExtractReport, Mounted,
    MountedSnapshot, PartitionInfo, SnapshotFiles, SnapshotsFs,
};
pub use interrupt::{request_stop, stop_requested};
pub use overlay::{fuzz_overlay_map, OverlayMap};
pub use progress::{NoProgress, Progress};
pub use prune::{
    prune, Expired, PackAction, PackPlan, PackReason, PruneMode, PruneOptions, PruneReport,
};
pub use repair::{repair_index, RepairReport};
pub use restore::{restore, RestoreOptions, RestoreStats, RestoreTarget};
pub use retention::{
    apply as apply_retention, civil_from_days, select_forget, Candidate, ForgetSelection,
    ForgetVerdict, Policy, Verdict, Within,
};
pub use serve::{
    OpenGuard, OpenHook, ServePins, Shared as ServeShared, SnapshotCatalog, SnapshotExport,
};
pub use snapshot::load_extents;
pub use source::{dirty_ranges, Source, SourceKind, SourceSpec, ALIGN, FAULT_EIO_ENV};
pub use stats::{stats, RepoStats, SnapshotStats};
pub use sys::large_allocations_from_the_kernel;
pub use unlock::unlock;
pub use verify::{verify, Problem, ReadData, VerifyOptions, VerifyReport};
