//! NTFS, read-only, through the `ntfs` crate (MFT records with their fixups, runlists,
//! attribute lists, index B+ trees): names in the POSIX and Win32 namespaces (the DOS 8.3
//! aliases are left out), file contents from the unnamed $DATA stream, modification times,
//! the read-only attribute, hard links (one MFT record under several names).
//!
//! Not read: alternate data streams, reparse points (symbolic links and junctions show as what
//! they are attached to), Windows security descriptors, and holes (a sparse file is written
//! whole). The metadata files ($MFT, $LogFile…, records below 24) are not listed.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;

use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{NtfsAttributeFlags, NtfsTime};

use crate::detect::FsKind;
use crate::tree::{no_holes, read_end, Entry, FileData, Filesystem, Kind, Node, Time, Xattrs};
use crate::{Disk, FsError, Result};

/// MFT records below this are the filesystem's own (the root directory is 5).
const FIRST_USER_RECORD: u64 = 24;
const ROOT_RECORD: u64 = 5;
/// 100-ns intervals from 1601-01-01 to 1970-01-01.
const EPOCH_DIFF_SECS: u64 = 11_644_473_600;

/// Bytes one call into the `ntfs` crate may read, beyond the data it was asked for. Its index
/// walk follows subnode links with no check for a cycle, so a hostile index that names itself
/// would have one call read (and allocate) for ever: the cursor ends it, as a read error.
const READ_ALLOWANCE: u64 = 64 << 20;

/// The disk as the `ntfs` crate reads it: a cursor over positioned reads, with an allowance.
struct Cursor {
    dev: Disk,
    pos: u64,
    allowance: u64,
}

impl Cursor {
    /// Allows the next call `extra` bytes beyond [`READ_ALLOWANCE`].
    fn allow(&mut self, extra: u64) -> &mut Cursor {
        self.allowance = READ_ALLOWANCE.saturating_add(extra);
        self
    }
}

impl Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.dev.size().saturating_sub(self.pos)) as usize;
        self.allowance = self.allowance.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other("the NTFS structures lead round in a circle (a damaged index)")
        })?;
        self.dev.read_exact_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Cursor {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let base = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.dev.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.pos)
    }
}

/// An NTFS filesystem.
pub struct Ntfs {
    ntfs: ntfs::Ntfs,
    cursor: Mutex<Cursor>,
    label: String,
}

fn damaged(e: ntfs::NtfsError) -> FsError {
    // The crate's read errors carry ours: keep them as read errors (a damaged chunk).
    match e {
        ntfs::NtfsError::Io(source) => FsError::Read { offset: 0, source },
        other => FsError::Damaged(format!("NTFS: {other}")),
    }
}

fn time(t: NtfsTime) -> Time {
    let ticks = t.nt_timestamp();
    let secs = (ticks / 10_000_000) as i64 - EPOCH_DIFF_SECS as i64;
    Time {
        secs,
        nanos: (ticks % 10_000_000) as u32 * 100,
    }
}

impl Ntfs {
    /// Opens the NTFS filesystem on `dev`.
    pub fn open(dev: Disk) -> Result<Ntfs> {
        let mut cursor = Cursor {
            dev,
            pos: 0,
            allowance: READ_ALLOWANCE,
        };
        let ntfs = ntfs::Ntfs::new(&mut cursor).map_err(damaged)?;
        let label = match ntfs.volume_name(&mut cursor) {
            Some(Ok(name)) => name.name().to_string_lossy(),
            _ => String::new(),
        };
        Ok(Ntfs {
            ntfs,
            cursor: Mutex::new(cursor),
            label,
        })
    }

    /// MFT record `id` as a node.
    fn node(&self, c: &mut Cursor, id: u64) -> Result<Node> {
        let file = self.ntfs.file(c, id).map_err(damaged)?;
        let info = file.info().map_err(damaged)?;
        let dir = file.is_directory();
        let size = if dir {
            0
        } else {
            match file.data(c, "") {
                Some(item) => {
                    let item = item.map_err(damaged)?;
                    item.to_attribute().map_err(damaged)?.value_length()
                }
                None => 0,
            }
        };
        let write = if info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::READ_ONLY)
        {
            0
        } else {
            0o200
        };
        Ok(Node {
            id,
            kind: if dir { Kind::Dir } else { Kind::File },
            perm: if dir { 0o555 | write } else { 0o444 | write },
            uid: 0,
            gid: 0,
            size,
            mtime: time(info.modification_time()),
            atime: time(info.access_time()),
            links: u32::from(file.hard_link_count()).max(1),
            rdev: (0, 0),
        })
    }

    /// The cursor, with a fresh allowance for one operation.
    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        // A panic caught while the cursor was held leaves nothing to distrust: its state is
        // reset here for each operation.
        let mut c = self
            .cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.allow(0);
        c
    }
}

impl Filesystem for Ntfs {
    fn kind(&self) -> FsKind {
        FsKind::Ntfs
    }

    fn label(&self) -> String {
        self.label.clone()
    }

    fn root(&self) -> Result<Node> {
        self.node(&mut self.cursor(), ROOT_RECORD)
    }

    fn read_dir(&self, dir: &Node) -> Result<Vec<Entry>> {
        let c = &mut *self.cursor();
        let file = self.ntfs.file(c, dir.id).map_err(damaged)?;
        if !file.is_directory() {
            return Err(FsError::NotDirectory(format!("NTFS record {}", dir.id)));
        }
        let index = file.directory_index(c).map_err(damaged)?;
        let mut entries = index.entries();
        let mut found = Vec::new();
        // A name met twice in one index means its nodes lead round in a circle (each pass
        // returning entries, which the cursor's allowance alone would not catch).
        let mut seen = std::collections::HashSet::new();
        while let Some(e) = entries.next(c.allow(0)) {
            let e = e.map_err(damaged)?;
            let record = e.file_reference().file_record_number();
            let Some(key) = e.key() else { continue };
            let key = key.map_err(damaged)?;
            let name = key.name().to_string_lossy().into_bytes();
            if !seen.insert((
                record,
                u8::from(key.namespace() == NtfsFileNamespace::Dos),
                name.clone(),
            )) {
                return Err(FsError::Damaged(format!(
                    "NTFS directory {}: its index leads round in a circle",
                    dir.id
                )));
            }
            if key.namespace() == NtfsFileNamespace::Dos
                || record < FIRST_USER_RECORD
                || record == dir.id
            {
                continue;
            }
            found.push((name, record));
        }
        drop(entries);
        found
            .into_iter()
            .map(|(name, record)| {
                Ok(Entry {
                    name,
                    node: self.node(c.allow(0), record)?,
                })
            })
            .collect()
    }

    fn read_link(&self, _link: &Node) -> Result<Vec<u8>> {
        Err(FsError::Unsupported(
            "sbk does not read NTFS reparse points".into(),
        ))
    }

    fn open(&self, file: &Node) -> Result<Box<dyn FileData + '_>> {
        if file.kind != Kind::File {
            return Err(FsError::Damaged(format!(
                "NTFS record {} (not a file)",
                file.id
            )));
        }
        // The crate reads compressed and encrypted streams as stored: their bytes would pass
        // for the file's. Refused, by name.
        let c = &mut *self.cursor();
        let f = self.ntfs.file(c, file.id).map_err(damaged)?;
        if let Some(item) = f.data(c, "") {
            let flags = item
                .map_err(damaged)?
                .to_attribute()
                .map_err(damaged)?
                .flags();
            for (flag, what) in [
                (
                    NtfsAttributeFlags::COMPRESSED,
                    "compressed (NTFS compression)",
                ),
                (NtfsAttributeFlags::ENCRYPTED, "encrypted (EFS)"),
            ] {
                if flags.contains(flag) {
                    return Err(FsError::Unsupported(format!(
                        "NTFS record {}: the file is {what}, which sbk does not read",
                        file.id
                    )));
                }
            }
        }
        Ok(Box::new(NtfsData {
            fs: self,
            id: file.id,
            size: file.size,
        }))
    }

    fn xattrs(&self, _node: &Node) -> Result<Xattrs> {
        Ok(Vec::new())
    }
}

/// A file's unnamed $DATA stream.
struct NtfsData<'a> {
    fs: &'a Ntfs,
    id: u64,
    size: u64,
}

impl FileData for NtfsData<'_> {
    fn data_ranges(&self) -> Vec<(u64, u64)> {
        no_holes(self.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let Some(end) = read_end(offset, buf.len(), self.size) else {
            return Ok(0);
        };
        let c = &mut *self.fs.cursor();
        c.allow(end - offset);
        let file = self.fs.ntfs.file(c, self.id).map_err(damaged)?;
        let item = file
            .data(c, "")
            .ok_or_else(|| FsError::Damaged(format!("NTFS record {}: no data", self.id)))?
            .map_err(damaged)?;
        let attr = item.to_attribute().map_err(damaged)?;
        let mut value = attr.value(c).map_err(damaged)?.attach(c);
        value
            .seek(SeekFrom::Start(offset))
            .map_err(|source| FsError::Read { offset, source })?;
        let want = (end - offset) as usize;
        let mut got = 0;
        while got < want {
            let n = value
                .read(&mut buf[got..want])
                .map_err(|source| FsError::Read {
                    offset: offset + got as u64,
                    source,
                })?;
            if n == 0 {
                return Err(FsError::Damaged(format!(
                    "NTFS record {}: its data ends before its size",
                    self.id
                )));
            }
            got += n;
        }
        Ok(got)
    }
}
