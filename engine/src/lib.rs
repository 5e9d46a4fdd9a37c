//! sbk's data movers: sources read through O_DIRECT by extents, and the parallel backup and
//! restore pipelines. This is the only sbk crate that owns threads; it never prints, and
//! reports progress through [`Progress`].

mod backup;
mod error;
mod progress;
mod restore;
mod source;
mod sys;
mod verify;

pub use backup::{backup, chunker_params, BackupOptions, BackupOutcome};
pub use error::{EngineError, Result};
pub use progress::{NoProgress, Progress};
pub use restore::{load_extents, restore, RestoreOptions, RestoreStats, RestoreTarget};
pub use source::{Source, SourceKind, ALIGN};
pub use verify::{verify, Problem, ReadData, VerifyOptions, VerifyReport};
