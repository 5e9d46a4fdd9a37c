//! File-level restore: a snapshot's disk read as partitions and filesystems (sbk-diskfs)
//! through the same random-access reader and verified chunk cache as `sbk serve`, so listing a
//! directory or extracting a file fetches only the chunks that hold them.

mod extract;
mod mount;

use std::io;
use std::sync::Arc;

use sbk_diskfs::{
    detect, open_filesystem, partitions, Disk, Filesystem, FsError, FsKind, Partition,
    PartitionTable, ReadAt,
};
use sbk_nbd::server::{Export, ReadPart};
use sbk_store::SnapshotId;

use crate::serve::{Shared, SnapshotExport};
use crate::{EngineError, Result};

pub use extract::{extract, fuzz_extract, ExtractOptions, ExtractReport};
pub use mount::{Mounted, MountedSnapshot, SnapshotsFs};

/// Bytes asked of the snapshot reader at once (it answers in chunk-sized parts).
const READ_PIECE: usize = 4 << 20;

/// A snapshot as a disk: positioned reads through the verified chunk cache.
struct SnapshotDisk {
    export: SnapshotExport,
}

impl ReadAt for SnapshotDisk {
    fn size(&self) -> u64 {
        self.export.size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size())
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read past the end of the snapshot at byte {offset}"),
            ));
        }
        let mut at = offset;
        for piece in buf.chunks_mut(READ_PIECE) {
            let parts = self
                .export
                .read(at, piece.len() as u32)
                .map_err(|e| io::Error::other(e.message))?;
            for part in parts {
                match part {
                    ReadPart::Hole { offset: o, len } => {
                        let from = (o - at) as usize;
                        piece[from..from + len as usize].fill(0);
                    }
                    ReadPart::Data { offset: o, data } => {
                        let from = (o - at) as usize;
                        let bytes = data.as_slice();
                        piece[from..from + bytes.len()].copy_from_slice(bytes);
                    }
                }
            }
            at += piece.len() as u64;
        }
        Ok(())
    }
}

/// One partition with what it holds.
#[derive(Debug, Clone)]
pub struct PartitionInfo {
    /// The partition (number 0: a disk with no partition table).
    pub partition: Partition,
    /// The filesystem found in it.
    pub filesystem: FsKind,
    /// Its filesystem's label, where sbk reads the filesystem.
    pub label: String,
}

/// A snapshot's disk, open for file-level reads.
pub struct SnapshotFiles {
    disk: Disk,
    table: PartitionTable,
}

impl SnapshotFiles {
    /// Opens snapshot `id` of `shared`'s repository and reads its partition table.
    pub fn open(shared: Arc<Shared>, id: SnapshotId) -> Result<SnapshotFiles> {
        let export = SnapshotExport::open(shared, id)?;
        let disk: Disk = Arc::new(SnapshotDisk { export });
        let table = partitions(&disk).map_err(|e| EngineError::from_fs("the disk", e))?;
        Ok(SnapshotFiles { disk, table })
    }

    /// The partition table's kind.
    pub fn table(&self) -> &PartitionTable {
        &self.table
    }

    /// Every partition with what it holds.
    pub fn partitions(&self) -> Vec<PartitionInfo> {
        self.table
            .partitions
            .iter()
            .map(|p| {
                let (filesystem, label) = if p.extended {
                    (FsKind::Unknown, String::new())
                } else {
                    let dev = self.partition(p.number).expect("listed");
                    let kind = detect(dev.as_ref());
                    let label = open_filesystem(dev).map(|f| f.label()).unwrap_or_default();
                    (kind, label)
                };
                PartitionInfo {
                    partition: p.clone(),
                    filesystem,
                    label,
                }
            })
            .collect()
    }

    /// The whole disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Partition `number`, as a disk of its own.
    pub fn partition(&self, number: u32) -> Option<Disk> {
        let slice = self.table.open(&self.disk, number)?;
        Some(Arc::new(slice))
    }

    /// The filesystem of partition `number`.
    pub fn filesystem(&self, number: u32) -> Result<Box<dyn Filesystem>> {
        let dev = self
            .partition(number)
            .ok_or_else(|| EngineError::NoSuchFile {
                path: format!("{number}:"),
                why: format!(
                    "the disk has no partition {number} (it has {})",
                    self.numbers()
                ),
            })?;
        open_filesystem(dev).map_err(|e| EngineError::from_fs(&format!("partition {number}"), e))
    }

    fn numbers(&self) -> String {
        let n: Vec<String> = self
            .table
            .partitions
            .iter()
            .map(|p| p.number.to_string())
            .collect();
        if n.is_empty() {
            "none".into()
        } else {
            n.join(", ")
        }
    }
}

/// `PART:PATH` split: the partition number and the path inside it (`1:/etc`, `0:/`; `1:` is
/// the root). The partition is always named, never guessed.
pub fn parse_part_path(s: &str) -> std::result::Result<(u32, String), String> {
    let (part, path) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: name a partition and a path, as PART:PATH (1:/etc/fstab; sbk ls SNAPSHOT lists the partitions)"))?;
    let number = part
        .parse::<u32>()
        .map_err(|_| format!("{s:?}: {part:?} is not a partition number"))?;
    let path = if path.is_empty() { "/" } else { path };
    Ok((number, path.to_owned()))
}

impl EngineError {
    /// A filesystem error about `what` (a path, a partition), typed by what the operator must
    /// do about it: a path that names nothing, a filesystem sbk cannot read, or damage.
    pub fn from_fs(what: &str, e: FsError) -> EngineError {
        match e {
            FsError::NotFound(path) => EngineError::NoSuchFile {
                path,
                why: "no such file or directory".into(),
            },
            FsError::NotDirectory(path) => EngineError::NoSuchFile {
                path,
                why: "a file where the path needs a directory".into(),
            },
            FsError::Unsupported(why) => EngineError::FilesystemUnreadable {
                what: what.to_owned(),
                why,
            },
            other => EngineError::FilesystemDamaged {
                what: what.to_owned(),
                why: other.to_string(),
            },
        }
    }
}
