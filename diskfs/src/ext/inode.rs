//! One inode: its metadata, and where its blocks are (an extent tree or a block map).

use std::collections::HashSet;

use super::{Ext, Super};
use crate::tree::{Kind, Node, Time};
use crate::{le, FsError, Result};

const FLAG_ENCRYPT: u32 = 0x800;
const FLAG_HUGE_FILE: u32 = 0x4_0000;
const FLAG_EXTENTS: u32 = 0x8_0000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
/// Depth of an extent tree, at most (the kernel's limit).
const MAX_DEPTH: u16 = 5;

/// A run of a file's blocks: `len` blocks from logical block `logical`, stored from block
/// `physical`; `init` false for preallocated blocks never written (they read as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub logical: u64,
    pub len: u64,
    pub physical: u64,
    pub init: bool,
}

/// The state of one walk of a block map or extent tree.
struct Walk {
    /// Blocks it may still read or name.
    budget: u64,
    /// Tree and pointer blocks read so far.
    seen: HashSet<u64>,
}

impl Walk {
    /// Charges `n` blocks.
    fn charge(&mut self, n: u64, inode: &Inode) -> Result<()> {
        self.budget = self
            .budget
            .checked_sub(n)
            .ok_or_else(|| inode.damaged("more blocks than the filesystem has"))?;
        Ok(())
    }

    /// Reads tree or pointer block `n`, once.
    fn read(&mut self, fs: &Ext, n: u64, inode: &Inode) -> Result<Vec<u8>> {
        self.charge(1, inode)?;
        if !self.seen.insert(n) {
            return Err(inode.damaged("a block map that comes back to one of its blocks"));
        }
        fs.block(n)
    }
}

/// An inode, parsed.
pub(super) struct Inode {
    pub ino: u64,
    pub raw: Vec<u8>,
    pub mode: u16,
    pub size: u64,
    pub flags: u32,
    pub file_acl: u64,
    /// 512-byte sectors it holds (blocks, with `huge_file`).
    blocks: u64,
    block_size: u64,
}

/// A timestamp from its seconds and its `_extra` word (two bits of epoch, 30 of nanoseconds).
fn time(raw: &[u8], at: usize, extra_at: usize, extra_isize: usize) -> Time {
    let secs = i64::from(le::u32(raw, at) as i32);
    if extra_at + 4 > 128 + extra_isize {
        return Time { secs, nanos: 0 };
    }
    let extra = le::u32(raw, extra_at);
    let nanos = extra >> 2;
    Time {
        secs: secs + (i64::from(extra & 3) << 32),
        nanos: if nanos < 1_000_000_000 { nanos } else { 0 },
    }
}

impl Inode {
    pub fn parse(ino: u64, raw: Vec<u8>, sb: &Super) -> Result<Inode> {
        let flags = le::u32(&raw, 0x20);
        let mut blocks = u64::from(le::u32(&raw, 0x1C)) | (u64::from(le::u16(&raw, 0x74)) << 32);
        if flags & FLAG_HUGE_FILE != 0 {
            blocks = blocks.saturating_mul(sb.block_size / 512);
        }
        // A directory's size has its high half only with largedir, as Linux reads it (else
        // those bytes are not a size, and a damaged one would ask for exabytes).
        let mut size = u64::from(le::u32(&raw, 0x04));
        let dir = le::u16(&raw, 0x00) & 0xF000 == 0x4000;
        if !dir || sb.incompat & INCOMPAT_LARGEDIR != 0 {
            size |= u64::from(le::u32(&raw, 0x6C)) << 32;
        }
        Ok(Inode {
            ino,
            mode: le::u16(&raw, 0x00),
            size,
            flags,
            file_acl: u64::from(le::u32(&raw, 0x68)) | (u64::from(le::u16(&raw, 0x76)) << 32),
            blocks,
            block_size: sb.block_size,
            raw,
        })
    }

    /// Bytes of the inode past the first 128 that the kernel uses (the rest holds xattrs).
    pub fn extra_isize(&self) -> usize {
        if self.raw.len() <= 128 {
            return 0;
        }
        usize::from(le::u16(&self.raw, 0x80)).min(self.raw.len() - 128)
    }

    pub fn kind(&self) -> Result<Kind> {
        Ok(match self.mode & 0xF000 {
            0x8000 => Kind::File,
            0x4000 => Kind::Dir,
            0xA000 => Kind::Symlink,
            0x2000 => Kind::CharDevice,
            0x6000 => Kind::BlockDevice,
            0x1000 => Kind::Fifo,
            0xC000 => Kind::Socket,
            _ => {
                return Err(FsError::Damaged(format!(
                    "ext inode {} (file type 0o{:o})",
                    self.ino,
                    self.mode >> 12
                )))
            }
        })
    }

    /// Refuses what this reader cannot read the contents of.
    pub fn readable(&self) -> Result<()> {
        if self.flags & FLAG_ENCRYPT != 0 {
            return Err(FsError::Unsupported(format!(
                "inode {} is encrypted (fscrypt): sbk cannot read its contents",
                self.ino
            )));
        }
        if self.flags & FLAG_INLINE_DATA != 0 {
            return Err(FsError::Unsupported(format!(
                "inode {} keeps its data inline (the inline_data feature), which sbk does not read yet",
                self.ino
            )));
        }
        Ok(())
    }

    pub fn node(&self) -> Result<Node> {
        let r = &self.raw;
        let x = self.extra_isize();
        let kind = self.kind()?;
        let rdev = if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            let (old, new) = (le::u32(r, 0x28), le::u32(r, 0x2C));
            if old != 0 {
                ((old >> 8) & 0xFF, old & 0xFF)
            } else {
                (
                    (new & 0xF_FF00) >> 8,
                    (new & 0xFF) | ((new >> 12) & 0xF_FF00),
                )
            }
        } else {
            (0, 0)
        };
        Ok(Node {
            id: self.ino,
            kind,
            perm: u32::from(self.mode & 0o7777),
            uid: u32::from(le::u16(r, 0x02)) | (u32::from(le::u16(r, 0x78)) << 16),
            gid: u32::from(le::u16(r, 0x18)) | (u32::from(le::u16(r, 0x7A)) << 16),
            size: self.size,
            mtime: time(r, 0x10, 0x88, x),
            atime: time(r, 0x08, 0x8C, x),
            links: u32::from(le::u16(r, 0x1A)),
            rdev,
        })
    }

    /// A fast symbolic link's target, kept in the inode itself.
    pub fn fast_symlink(&self, sb: &Super) -> Option<Vec<u8>> {
        let xattr_sectors = if self.file_acl != 0 {
            sb.block_size / 512
        } else {
            0
        };
        let fast = self.size < 60
            && self.flags & (FLAG_EXTENTS | FLAG_INLINE_DATA) == 0
            && self.blocks.saturating_sub(xattr_sectors) == 0;
        fast.then(|| self.raw[0x28..0x28 + self.size as usize].to_vec())
    }

    /// Where the inode's blocks are.
    pub fn runs(&self, fs: &Ext) -> Result<Vec<Run>> {
        // Every block a mapping reads or names costs from a budget of the filesystem's blocks,
        // and no tree or pointer block may be met twice: a damaged or hostile map that points
        // at itself ends as damage, never as a hang or a flood of runs.
        let mut walk = Walk {
            budget: fs.sb.blocks.saturating_add(16),
            seen: HashSet::new(),
        };
        let mut out = Vec::new();
        if self.flags & FLAG_EXTENTS != 0 {
            let root = &self.raw[0x28..0x64];
            self.extents(fs, root, None, &mut walk, &mut out)?;
        } else {
            let last = self.size.div_ceil(self.block_size);
            let ptrs: Vec<u64> = (0..15)
                .map(|i| u64::from(le::u32(&self.raw, 0x28 + 4 * i)))
                .collect();
            let mut logical = 0u64;
            for (i, &p) in ptrs.iter().enumerate() {
                let level = i.saturating_sub(11) as u32; // 0 for the 12 direct pointers
                self.map_level(fs, p, level, &mut logical, last, &mut walk, &mut out)?;
                if logical >= last {
                    break;
                }
            }
        }
        for r in &out {
            if r.physical
                .checked_add(r.len)
                .is_none_or(|e| e > fs.sb.blocks)
            {
                return Err(self.damaged("a block past the filesystem"));
            }
        }
        Ok(out)
    }

    pub fn damaged(&self, what: &str) -> FsError {
        FsError::Damaged(format!("ext inode {}: {what}", self.ino))
    }

    /// An extent tree node (`depth` is what its parent says it must be).
    fn extents(
        &self,
        fs: &Ext,
        node: &[u8],
        depth: Option<u16>,
        walk: &mut Walk,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        let (count, max, d) = (le::u16(node, 2), le::u16(node, 4), le::u16(node, 6));
        if le::u16(node, 0) != 0xF30A
            || count > max
            || 12 + 12 * usize::from(count) > node.len()
            || d > MAX_DEPTH
            || depth.is_some_and(|want| want != d)
        {
            return Err(self.damaged("extent tree"));
        }
        for i in 0..usize::from(count) {
            let e = &node[12 + 12 * i..24 + 12 * i];
            if d == 0 {
                let raw_len = u64::from(le::u16(e, 4));
                let (len, init) = if raw_len > 32768 {
                    (raw_len - 32768, false)
                } else {
                    (raw_len, true)
                };
                let run = Run {
                    logical: u64::from(le::u32(e, 0)),
                    len,
                    physical: u64::from(le::u32(e, 8)) | (u64::from(le::u16(e, 6)) << 32),
                    init,
                };
                if out
                    .last()
                    .is_some_and(|p: &Run| p.logical + p.len > run.logical)
                {
                    return Err(self.damaged("extents out of order"));
                }
                if len == 0 {
                    return Err(self.damaged("an empty extent"));
                }
                walk.charge(len, self)?;
                out.push(run);
            } else {
                let child = u64::from(le::u32(e, 4)) | (u64::from(le::u16(e, 8)) << 32);
                let b = walk.read(fs, child, self)?;
                self.extents(fs, &b, Some(d - 1), walk, out)?;
            }
        }
        Ok(())
    }

    /// One pointer of a block map: a data block (`level` 0) or a block of pointers.
    #[allow(clippy::too_many_arguments)] // a recursion's state, passed down as it is
    fn map_level(
        &self,
        fs: &Ext,
        ptr: u64,
        level: u32,
        logical: &mut u64,
        last: u64,
        walk: &mut Walk,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        let per = fs.sb.block_size / 4;
        let span = per.pow(level);
        if ptr == 0 {
            *logical += span; // a hole
            return Ok(());
        }
        if level == 0 {
            walk.charge(1, self)?;
            match out.last_mut() {
                Some(r) if r.logical + r.len == *logical && r.physical + r.len == ptr => r.len += 1,
                _ => out.push(Run {
                    logical: *logical,
                    len: 1,
                    physical: ptr,
                    init: true,
                }),
            }
            *logical += 1;
            return Ok(());
        }
        let b = walk.read(fs, ptr, self)?;
        for i in 0..per as usize {
            if *logical >= last {
                break;
            }
            let p = u64::from(le::u32(&b, 4 * i));
            self.map_level(fs, p, level - 1, logical, last, walk, out)?;
        }
        Ok(())
    }
}
