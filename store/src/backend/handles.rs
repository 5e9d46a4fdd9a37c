//! A bounded set of open file handles, least recently used evicted first: the local backend's
//! pack handles, so that reading a repository of any number of packs works under a low
//! open-file limit.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A bounded set of open pack handles, least recently used evicted first, so that reading a
/// repository of any number of packs works under a low open-file limit.
pub(super) struct Handles {
    pub(super) open: HashMap<PathBuf, (Arc<File>, u64)>,
    tick: u64,
    pub(super) capacity: usize,
}

impl Handles {
    /// An empty set of at most `capacity` handles.
    pub(super) fn new(capacity: usize) -> Self {
        Handles {
            open: HashMap::new(),
            tick: 0,
            capacity,
        }
    }

    pub(super) fn get(&mut self, path: &Path) -> Option<Arc<File>> {
        self.tick += 1;
        let tick = self.tick;
        self.open.get_mut(path).map(|(f, t)| {
            *t = tick;
            f.clone()
        })
    }

    pub(super) fn put(&mut self, path: PathBuf, file: Arc<File>) {
        if self.open.len() >= self.capacity {
            if let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(p, _)| p.clone())
            {
                self.open.remove(&oldest);
            }
        }
        self.tick += 1;
        self.open.insert(path, (file, self.tick));
    }
}

/// How many pack handles to keep open: a quarter of the soft open-file limit, so that sources,
/// targets, cache files and the rest of the process always have room, between 2 and 128.
pub(super) fn handle_capacity() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `lim` is.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let soft = if ok { lim.rlim_cur } else { 1024 };
    (soft / 4).clamp(2, 128) as usize
}
