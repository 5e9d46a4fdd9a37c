//! Partition tables and filesystems inside a disk image, read-only, through positioned reads.
//!
//! sbk restores single files out of disk snapshots without restoring the disk: it reads the
//! partition table ([`parts`]), recognises what each partition holds ([`detect`]), and walks
//! the filesystems it can read ([`ext`] for ext2/3/4, [`fat`] for FAT12/16/32, [`ntfs`] through the `ntfs` crate) through the [`Filesystem`] trait. Every
//! byte comes through [`ReadAt`], so only the blocks that hold what was asked for are read: a
//! snapshot fetches just those chunks.
//!
//! The bytes are untrusted (a guest owned the disk): every decoder returns a typed [`FsError`]
//! on bad bytes, bounds every loop and allocation by what the image can hold, and never panics
//! (fuzzed through [`fuzz`]).

use std::io;
use std::sync::Arc;

pub mod detect;
pub mod ext;
pub mod fat;
pub mod fuzz;
pub mod ntfs;
pub mod parts;
pub mod tree;

pub use detect::{detect, FsKind};
pub use parts::{partitions, Partition, PartitionTable, TableKind};
pub use tree::{lookup, open_filesystem, Entry, FileData, Filesystem, Kind, Node, Time, Xattrs};

/// Something read at byte offsets: a disk image, a partition of one, a snapshot.
pub trait ReadAt: Send + Sync {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from byte `offset`; reading past the end is an error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A shared disk.
pub type Disk = Arc<dyn ReadAt>;

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let from = usize::try_from(offset).map_err(|_| past_end(offset))?;
        let src = from
            .checked_add(buf.len())
            .and_then(|to| self.get(from..to))
            .ok_or_else(|| past_end(offset))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

fn past_end(offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read past the end at byte {offset}"),
    )
}

/// `len` bytes of `disk` from `start`: a partition.
pub struct Slice {
    disk: Disk,
    start: u64,
    len: u64,
}

impl Slice {
    /// The part of `disk` from `start` on, `len` bytes long (cut at the disk's end).
    pub fn new(disk: Disk, start: u64, len: u64) -> Slice {
        let len = len.min(disk.size().saturating_sub(start));
        Slice { disk, start, len }
    }
}

impl ReadAt for Slice {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.disk.read_exact_at(self.start + offset, buf),
            _ => Err(past_end(offset)),
        }
    }
}

/// What goes wrong reading a disk's partitions or filesystems.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The disk could not be read (a damaged chunk of a snapshot, say).
    #[error("reading byte {offset} of the disk: {source}")]
    Read {
        /// Where, in the disk or partition read.
        offset: u64,
        /// Why.
        source: io::Error,
    },
    /// The structures on the disk contradict themselves.
    #[error("damaged {0}")]
    Damaged(String),
    /// Something this reader does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// No such file or directory.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// A path goes through something that is not a directory.
    #[error("{0}: not a directory")]
    NotDirectory(String),
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, FsError>;

/// Reads `len` bytes at `offset` into a new buffer.
pub(crate) fn read_vec(dev: &dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    dev.read_exact_at(offset, &mut buf)
        .map_err(|source| FsError::Read { offset, source })?;
    Ok(buf)
}

/// Little-endian fields out of a byte slice; out of range reads as zero (the callers check
/// lengths where a short structure means damage).
pub(crate) mod le {
    /// u16 at `at`.
    pub fn u16(b: &[u8], at: usize) -> u16 {
        at.checked_add(2)
            .and_then(|e| b.get(at..e))
            .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
    }
    /// u32 at `at`.
    pub fn u32(b: &[u8], at: usize) -> u32 {
        at.checked_add(4)
            .and_then(|e| b.get(at..e))
            .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// u64 at `at`.
    pub fn u64(b: &[u8], at: usize) -> u64 {
        u64::from(u32(b, at)) | (u64::from(u32(b, at + 4)) << 32)
    }
}
