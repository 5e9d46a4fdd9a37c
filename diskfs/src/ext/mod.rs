//! ext2, ext3 and ext4, read-only: the superblock, the group descriptors (with `meta_bg`), the
//! inode table, extent trees and the older block maps, directories (linearly: an htree's index
//! blocks read as empty entries), fast and slow symbolic links, and extended attributes in the
//! inode and in their block (POSIX ACLs turned into the form `setxattr` takes).
//!
//! Not read: inline data (a feature mke2fs leaves off), encrypted files, and a journal that
//! was not replayed (the disk is read as the last checkpoint left it, as `debugfs` does).
//! Checksums are not checked: the snapshot's chunk ids already prove the bytes are the ones
//! backed up, and a snapshot of a live filesystem may hold stale ones anyway.

mod inode;
mod xattr;

use std::collections::HashMap;
use std::sync::Mutex;

use crate::detect::FsKind;
use crate::tree::{read_end, Entry, FileData, Filesystem, Kind, Node, Xattrs};
use crate::{le, read_vec, Disk, FsError, Result};
use inode::{Inode, Run};

/// `incompat` features that change how the filesystem must be read and that this reader does
/// not implement: compression, a journal device (no filesystem at all), `dirdata`.
const INCOMPAT_REFUSED: u32 = 0x1 | 0x8 | 0x1000;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;

/// The superblock's facts this reader uses.
#[derive(Debug, Clone)]
struct Super {
    block_size: u64,
    blocks: u64,
    inodes: u32,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    groups: u64,
    incompat: u32,
    ro_compat: u32,
    first_meta_bg: u64,
    label: String,
    version: u8,
}

impl Super {
    fn parse(sb: &[u8]) -> Result<Super> {
        let bad = |what: &str| FsError::Damaged(format!("ext superblock ({what})"));
        if le::u16(sb, 0x38) != 0xEF53 {
            return Err(bad("no signature"));
        }
        let log = le::u32(sb, 0x18);
        if log > 6 {
            return Err(bad("block size"));
        }
        let block_size = 1024u64 << log;
        let incompat = le::u32(sb, 0x60);
        if incompat & INCOMPAT_REFUSED != 0 {
            return Err(FsError::Unsupported(format!(
                "this ext filesystem uses features sbk does not read (incompat 0x{:x})",
                incompat & INCOMPAT_REFUSED
            )));
        }
        let mut blocks = u64::from(le::u32(sb, 0x04));
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            blocks |= u64::from(le::u32(sb, 0x150)) << 32;
            u64::from(le::u16(sb, 0xFE))
        } else {
            32
        };
        let inode_size = if le::u32(sb, 0x4C) == 0 {
            128
        } else {
            u64::from(le::u16(sb, 0x58))
        };
        let first_data_block = u64::from(le::u32(sb, 0x14));
        let blocks_per_group = u64::from(le::u32(sb, 0x20));
        let inodes_per_group = le::u32(sb, 0x28);
        if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(bad("descriptor size"));
        }
        if inode_size < 128 || inode_size > block_size || !inode_size.is_power_of_two() {
            return Err(bad("inode size"));
        }
        if blocks_per_group == 0 || inodes_per_group == 0 || first_data_block >= blocks {
            return Err(bad("group geometry"));
        }
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
        let label = String::from_utf8_lossy(&sb[0x78..0x88])
            .trim_end_matches('\0')
            .to_owned();
        Ok(Super {
            block_size,
            blocks,
            inodes: le::u32(sb, 0x00),
            first_data_block,
            blocks_per_group,
            inodes_per_group,
            inode_size,
            desc_size,
            groups,
            incompat,
            ro_compat: le::u32(sb, 0x64),
            first_meta_bg: u64::from(le::u32(sb, 0x104)),
            label,
            version: crate::detect::ext_version(sb),
        })
    }

    /// Whether group `g` holds a copy of the superblock (and so of the descriptors).
    fn has_super(&self, g: u64) -> bool {
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&b| {
            let mut p = b;
            while p < g {
                p *= b;
            }
            p == g
        })
    }
}

/// An ext2/3/4 filesystem.
pub struct Ext {
    dev: Disk,
    sb: Super,
    /// Where each group's inode table starts, as read from its descriptor.
    tables: Mutex<HashMap<u64, u64>>,
}

impl Ext {
    /// Opens the filesystem on `dev`.
    pub fn open(dev: Disk) -> Result<Ext> {
        if dev.size() < 2048 {
            return Err(FsError::Damaged(
                "ext filesystem (shorter than its superblock)".into(),
            ));
        }
        let sb = Super::parse(&read_vec(dev.as_ref(), 1024, 1024)?)?;
        // Every block number is checked against the block count, and so every byte offset
        // against the device: a count larger than the device would let both overflow.
        if sb
            .blocks
            .checked_mul(sb.block_size)
            .is_none_or(|b| b > dev.size())
        {
            return Err(FsError::Damaged(format!(
                "ext superblock (its {} blocks of {} bytes do not fit the {} bytes of the partition)",
                sb.blocks,
                sb.block_size,
                dev.size()
            )));
        }
        Ok(Ext {
            dev,
            sb,
            tables: Mutex::new(HashMap::new()),
        })
    }

    /// Block `n`'s bytes.
    fn block(&self, n: u64) -> Result<Vec<u8>> {
        if n >= self.sb.blocks {
            return Err(FsError::Damaged(format!(
                "ext block number {n} (past the filesystem)"
            )));
        }
        read_vec(
            self.dev.as_ref(),
            n * self.sb.block_size,
            self.sb.block_size as usize,
        )
    }

    /// Reads `buf.len()` bytes at byte `at` of the filesystem.
    fn read_bytes(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let end = at.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.sb.blocks.saturating_mul(self.sb.block_size)) {
            return Err(FsError::Damaged(format!(
                "ext read at byte {at} (past the filesystem)"
            )));
        }
        self.dev
            .read_exact_at(at, buf)
            .map_err(|source| FsError::Read { offset: at, source })
    }

    /// The first block of group `g`'s inode table.
    fn inode_table(&self, g: u64) -> Result<u64> {
        if let Some(&t) = self
            .tables
            .lock()
            .expect("no thread panics holding this")
            .get(&g)
        {
            return Ok(t);
        }
        let sb = &self.sb;
        let per_block = sb.block_size / sb.desc_size;
        let meta = g / per_block;
        let block = if sb.incompat & INCOMPAT_META_BG != 0 && meta >= sb.first_meta_bg {
            // meta_bg: a block of descriptors lives in the first group of its meta group.
            let first = meta * per_block;
            sb.first_data_block + first * sb.blocks_per_group + u64::from(sb.has_super(first))
        } else {
            sb.first_data_block + 1 + meta
        };
        let mut d = vec![0u8; sb.desc_size as usize];
        self.read_bytes(
            block * sb.block_size + (g % per_block) * sb.desc_size,
            &mut d,
        )?;
        let mut t = u64::from(le::u32(&d, 0x08));
        if sb.desc_size >= 64 {
            t |= u64::from(le::u32(&d, 0x28)) << 32;
        }
        self.tables
            .lock()
            .expect("no thread panics holding this")
            .insert(g, t);
        Ok(t)
    }

    /// Inode `ino`.
    fn inode(&self, ino: u64) -> Result<Inode> {
        let sb = &self.sb;
        if ino == 0 || ino > u64::from(sb.inodes) {
            return Err(FsError::Damaged(format!(
                "ext inode number {ino} (out of range)"
            )));
        }
        let ipg = u64::from(sb.inodes_per_group);
        let g = (ino - 1) / ipg;
        if g >= sb.groups {
            return Err(FsError::Damaged(format!(
                "ext inode number {ino} (past the last group)"
            )));
        }
        let table = self.inode_table(g)?;
        let at = table
            .checked_mul(sb.block_size)
            .and_then(|t| t.checked_add(((ino - 1) % ipg) * sb.inode_size))
            .ok_or_else(|| FsError::Damaged(format!("ext group {g}'s inode table")))?;
        let mut raw = vec![0u8; sb.inode_size as usize];
        self.read_bytes(at, &mut raw)?;
        Inode::parse(ino, raw, sb)
    }

    /// The inode a node names.
    fn inode_of(&self, node: &Node) -> Result<Inode> {
        self.inode(node.id)
    }

    /// `inode`'s blocks, mapped.
    fn runs(&self, inode: &Inode) -> Result<Vec<Run>> {
        inode.runs(self)
    }
}

impl Filesystem for Ext {
    fn kind(&self) -> FsKind {
        FsKind::Ext(self.sb.version)
    }

    fn label(&self) -> String {
        self.sb.label.clone()
    }

    fn root(&self) -> Result<Node> {
        self.inode(2)?.node()
    }

    fn read_dir(&self, dir: &Node) -> Result<Vec<Entry>> {
        let inode = self.inode_of(dir)?;
        if inode.kind()? != Kind::Dir {
            return Err(FsError::NotDirectory(format!("inode {}", dir.id)));
        }
        inode.readable()?;
        let bs = self.sb.block_size;
        let last = inode.size.div_ceil(bs);
        let mut out = Vec::new();
        // A directory's blocks are its own: one met twice is a hostile map (it would list
        // the same names again and again).
        let mut seen = std::collections::HashSet::new();
        for run in self.runs(&inode)? {
            for i in 0..run.len {
                if run.logical + i >= last || !run.init {
                    break;
                }
                if !seen.insert(run.physical + i) {
                    return Err(inode.damaged("a directory block met twice"));
                }
                let b = self.block(run.physical + i)?;
                for (name, ino) in dir_entries(&b, dir.id)? {
                    let entry = self.inode(ino)?;
                    // An entry whose inode was never written (a snapshot of a live filesystem,
                    // its journal not replayed) names nothing yet.
                    if entry.mode == 0 {
                        continue;
                    }
                    out.push(Entry {
                        name,
                        node: entry.node()?,
                    });
                }
            }
        }
        Ok(out)
    }

    fn read_link(&self, link: &Node) -> Result<Vec<u8>> {
        let inode = self.inode_of(link)?;
        if inode.kind()? != Kind::Symlink {
            return Err(FsError::Damaged(format!(
                "inode {} (not a symbolic link)",
                link.id
            )));
        }
        if let Some(target) = inode.fast_symlink(&self.sb) {
            return Ok(target);
        }
        inode.readable()?;
        let data = ExtFile::new(self, &inode)?;
        let len = usize::try_from(inode.size)
            .ok()
            .filter(|&n| n as u64 <= self.sb.block_size)
            .ok_or_else(|| FsError::Damaged(format!("inode {}: symbolic link size", link.id)))?;
        let mut target = vec![0u8; len];
        let n = data.read_at(0, &mut target)?;
        target.truncate(n);
        Ok(target)
    }

    fn open(&self, file: &Node) -> Result<Box<dyn FileData + '_>> {
        let inode = self.inode_of(file)?;
        if inode.kind()? != Kind::File {
            return Err(FsError::Damaged(format!(
                "inode {} (not a regular file)",
                file.id
            )));
        }
        inode.readable()?;
        Ok(Box::new(ExtFile::new(self, &inode)?))
    }

    fn xattrs(&self, node: &Node) -> Result<Xattrs> {
        xattr::read(self, &self.inode_of(node)?)
    }
}

/// The names in one directory block, with their inode numbers (without `.` and `..`).
fn dir_entries(b: &[u8], dir: u64) -> Result<Vec<(Vec<u8>, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= b.len() {
        let ino = le::u32(b, pos);
        // With 64 KiB blocks, 0 and 65535 stand for 65536 and the low bits carry bits 16-17.
        let raw = usize::from(le::u16(b, pos + 4));
        let rec_len = if b.len() >= 65536 {
            if raw == 0 || raw == 65535 {
                65536
            } else {
                (raw & 65532) | ((raw & 3) << 16)
            }
        } else {
            raw
        };
        let name_len = usize::from(b[pos + 6]);
        if rec_len < 8 || rec_len % 4 != 0 || pos + rec_len > b.len() || 8 + name_len > rec_len {
            return Err(FsError::Damaged(format!("ext directory (inode {dir})")));
        }
        let name = &b[pos + 8..pos + 8 + name_len];
        if ino != 0 && name != b"." && name != b".." {
            out.push((name.to_vec(), u64::from(ino)));
        }
        pos += rec_len;
    }
    Ok(out)
}

/// A regular file's (or slow symbolic link's) contents.
struct ExtFile<'a> {
    fs: &'a Ext,
    runs: Vec<Run>,
    size: u64,
}

impl<'a> ExtFile<'a> {
    fn new(fs: &'a Ext, inode: &Inode) -> Result<ExtFile<'a>> {
        Ok(ExtFile {
            fs,
            runs: fs.runs(inode)?,
            size: inode.size,
        })
    }
}

impl FileData for ExtFile<'_> {
    fn data_ranges(&self) -> Vec<(u64, u64)> {
        let bs = self.fs.sb.block_size;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in self.runs.iter().filter(|r| r.init) {
            let from = (r.logical * bs).min(self.size);
            let to = ((r.logical + r.len) * bs).min(self.size);
            if from >= to {
                continue;
            }
            match out.last_mut() {
                Some((_, end)) if *end == from => *end = to,
                _ => out.push((from, to)),
            }
        }
        out
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let bs = self.fs.sb.block_size;
        let Some(end) = read_end(offset, buf.len(), self.size) else {
            return Ok(0);
        };
        let n = (end - offset) as usize;
        buf[..n].fill(0);
        let first = self
            .runs
            .partition_point(|r| (r.logical + r.len) * bs <= offset);
        for r in self.runs[first..]
            .iter()
            .take_while(|r| r.logical * bs < end)
        {
            if !r.init {
                continue; // allocated but never written: zeros
            }
            let from = (r.logical * bs).max(offset);
            let to = ((r.logical + r.len) * bs).min(end);
            let disk = r.physical * bs + (from - r.logical * bs);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.fs.read_bytes(disk, dst)?;
        }
        Ok(n)
    }
}
