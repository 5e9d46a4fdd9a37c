//! Progress reporting: the library never prints; it calls a [`Progress`] that the caller renders
//! (a bar on a terminal, JSON lines, or nothing).

/// Receives progress of long work. Every method has an empty default, so an implementation
/// takes only what it shows. Calls come from several threads at once.
pub trait Progress: Send + Sync {
    /// Work on `task` (a source being backed up, a snapshot being restored) starts; `total` bytes,
    /// or 0 when the total is known only at the end (a stream).
    fn start(&self, _task: usize, _label: &str, _total: u64) {}
    /// `bytes` more of `task` are done.
    fn advance(&self, _task: usize, _bytes: u64) {}
    /// `task` is finished (successfully or not).
    fn finish(&self, _task: usize) {}
    /// Something the operator should know that is not an error (a fallback taken, say).
    fn notice(&self, _message: &str) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
