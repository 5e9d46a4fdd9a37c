//! Entry points for fuzzing the readers of untrusted disks; the cargo-fuzz targets in `fuzz/`
//! call these, and so does the corpus replay test, so that a saved input that once broke a
//! reader fails `cargo test`.

use std::sync::Arc;

use crate::tree::{Filesystem, Kind};
use crate::{open_filesystem, partitions, Disk};

/// Nodes a walk of a fuzzed filesystem visits at most (a hostile image may hold many).
const MAX_NODES: usize = 4096;
/// Bytes of each file a walk reads at most.
const MAX_READ: usize = 1 << 20;

/// A disk image: its partitions, what each holds, and a walk of each readable filesystem
/// (directories, links, attributes, file contents). Never panics on any bytes.
pub fn disk(data: &[u8]) {
    let disk: Disk = Arc::new(data.to_vec());
    if let Ok(t) = partitions(&disk) {
        for p in &t.partitions {
            if let Some(slice) = t.open(&disk, p.number) {
                filesystem(Arc::new(slice));
            }
        }
    }
}

/// A filesystem image (no partition table), walked as [`disk`] walks each partition.
pub fn filesystem_image(data: &[u8]) {
    filesystem(Arc::new(data.to_vec()));
}

fn filesystem(dev: Disk) {
    let Ok(fs) = open_filesystem(dev) else { return };
    walk(fs.as_ref());
}

fn walk(fs: &dyn Filesystem) {
    let _ = fs.label();
    let Ok(root) = fs.root() else { return };
    let mut todo = vec![root];
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 64 << 10];
    while let Some(n) = todo.pop() {
        if seen.len() >= MAX_NODES || !seen.insert(n.id) {
            continue;
        }
        let _ = fs.xattrs(&n);
        match n.kind {
            Kind::Dir => {
                if let Ok(entries) = fs.read_dir(&n) {
                    todo.extend(entries.into_iter().map(|e| e.node));
                }
            }
            Kind::Symlink => {
                let _ = fs.read_link(&n);
            }
            Kind::File => {
                if let Ok(f) = fs.open(&n) {
                    let _ = f.data_ranges();
                    let mut at = 0u64;
                    while at < MAX_READ as u64 {
                        match f.read_at(at, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => at += k as u64,
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let _ = crate::lookup(fs, b"/a/../b/./c", true);
}
