//! FAT12, FAT16 and FAT32, read-only: the BIOS parameter block, cluster chains through the
//! first FAT, directories with their long (VFAT) names, and modification times (FAT keeps
//! local time to 2 s with no zone; it is read as UTC).
//!
//! Written here rather than taken from the `fatfs` crate: that one needs a writable device and
//! may write the dirty flag, its filesystem is not `Sync`, and it names no entry by a number
//! that finds it again. A node's id here is the byte offset of its directory entry (the root's
//! is 0), so a node is found again by reading 32 bytes.

use std::sync::Mutex;

use crate::detect::{fat_bits, FsKind};
use crate::tree::{no_holes, read_end, Entry, FileData, Filesystem, Kind, Node, Time, Xattrs};
use crate::{le, read_vec, Disk, FsError, Result};

const ATTR_READ_ONLY: u8 = 0x01;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0F;
/// Entries a directory holds at most (the specification's limit), so bytes read per directory.
const MAX_DIR_BYTES: u64 = 65_536 * 32;
/// Bytes of the FAT kept from the last read: chains are mostly sequential.
const FAT_PIECE: u64 = 4096;

/// A FAT filesystem.
pub struct Fat {
    dev: Disk,
    bits: u8,
    cluster_bytes: u64,
    fat_start: u64,
    /// Where FAT12/16's fixed root directory is, and its bytes (FAT32: a cluster chain).
    root_region: (u64, u64),
    root_cluster: u32,
    data_start: u64,
    clusters: u32,
    label: String,
    fat_cache: Mutex<Option<(u64, Vec<u8>)>>,
}

/// A run of a chain: `len` bytes at byte `logical` of the file, on disk at `disk`.
#[derive(Debug, Clone, Copy)]
struct Run {
    logical: u64,
    len: u64,
    disk: u64,
}

impl Fat {
    /// Opens the FAT filesystem on `dev`.
    pub fn open(dev: Disk) -> Result<Fat> {
        let bad = |what: &str| FsError::Damaged(format!("FAT boot sector ({what})"));
        if dev.size() < 512 {
            return Err(bad("shorter than a sector"));
        }
        let s = read_vec(dev.as_ref(), 0, 512)?;
        let bits = fat_bits(&s).ok_or_else(|| bad("not a FAT boot sector"))?;
        let bps = u64::from(le::u16(&s, 11));
        let spc = u64::from(s[13]);
        let reserved = u64::from(le::u16(&s, 14));
        let fats = u64::from(s[16]);
        let root_entries = u64::from(le::u16(&s, 17));
        let total = match le::u16(&s, 19) {
            0 => u64::from(le::u32(&s, 32)),
            n => u64::from(n),
        };
        let fat_size = match le::u16(&s, 22) {
            0 => u64::from(le::u32(&s, 36)),
            n => u64::from(n),
        };
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let first_data = reserved + fats * fat_size + root_sectors;
        let clusters =
            (total.saturating_sub(first_data) / spc).min(u64::from(u32::MAX - 16)) as u32;
        let label_at = if bits == 32 { 71 } else { 43 };
        let mut fat = Fat {
            bits,
            cluster_bytes: bps * spc,
            fat_start: reserved * bps,
            root_region: ((reserved + fats * fat_size) * bps, root_sectors * bps),
            root_cluster: if bits == 32 { le::u32(&s, 44) } else { 0 },
            data_start: first_data * bps,
            clusters,
            label: latin1(&s[label_at..label_at + 11]).trim_end().to_owned(),
            fat_cache: Mutex::new(None),
            dev,
        };
        if fat.label == "NO NAME" {
            fat.label.clear();
        }
        // The volume label entry in the root directory is the one tools keep current.
        if let Ok(root) = fat.dir_runs(0).and_then(|r| fat.dir_bytes(&r)) {
            for e in root.chunks_exact(32) {
                if e[0] == 0 {
                    break;
                }
                if e[0] != 0xE5 && e[11] & 0x1F == ATTR_VOLUME {
                    fat.label = latin1(&e[..11]).trim_end().to_owned();
                }
            }
        }
        Ok(fat)
    }

    /// FAT entry `n`: the next cluster of a chain.
    fn next(&self, n: u32) -> Result<u32> {
        let (at, width) = match self.bits {
            12 => (u64::from(n) + u64::from(n) / 2, 2),
            16 => (u64::from(n) * 2, 2),
            _ => (u64::from(n) * 4, 4),
        };
        let piece = at / FAT_PIECE * FAT_PIECE;
        // The cache is refilled whole or not at all: a panic caught while it was held leaves it
        // valid.
        let mut cache = self
            .fat_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache
            .as_ref()
            .is_none_or(|(p, b)| *p != piece || b.len() < (at - piece + width) as usize)
        {
            let len = (FAT_PIECE + 4).min(self.dev.size().saturating_sub(self.fat_start + piece));
            *cache = Some((
                piece,
                read_vec(self.dev.as_ref(), self.fat_start + piece, len as usize)?,
            ));
        }
        let (_, b) = cache.as_ref().expect("just filled");
        let i = (at - piece) as usize;
        let v = match self.bits {
            12 => {
                let v = u32::from(le::u16(b, i));
                if n % 2 == 1 {
                    v >> 4
                } else {
                    v & 0xFFF
                }
            }
            16 => u32::from(le::u16(b, i)),
            _ => le::u32(b, i) & 0x0FFF_FFFF,
        };
        Ok(v)
    }

    fn end_of_chain(&self, v: u32) -> bool {
        v >= match self.bits {
            12 => 0xFF8,
            16 => 0xFFF8,
            _ => 0x0FFF_FFF8,
        }
    }

    /// The runs of the chain from cluster `first`, for at most `limit` bytes.
    fn chain(&self, first: u32, limit: u64) -> Result<Vec<Run>> {
        let mut out: Vec<Run> = Vec::new();
        let mut c = first;
        let mut logical = 0u64;
        while logical < limit {
            if c < 2 || c >= self.clusters + 2 {
                return Err(FsError::Damaged(format!("FAT cluster chain (cluster {c})")));
            }
            let disk = self.data_start + u64::from(c - 2) * self.cluster_bytes;
            match out.last_mut() {
                Some(r) if r.disk + r.len == disk => r.len += self.cluster_bytes,
                _ => out.push(Run {
                    logical,
                    len: self.cluster_bytes,
                    disk,
                }),
            }
            logical += self.cluster_bytes;
            // A chain longer than the filesystem has clusters loops.
            if logical / self.cluster_bytes > u64::from(self.clusters) {
                return Err(FsError::Damaged("FAT cluster chain (a loop)".into()));
            }
            let next = self.next(c)?;
            if self.end_of_chain(next) {
                break;
            }
            c = next;
        }
        Ok(out)
    }

    /// Where the directory whose entry is at `id` (0: the root) keeps its entries.
    fn dir_runs(&self, id: u64) -> Result<Vec<Run>> {
        if id == 0 && self.bits != 32 {
            let (disk, len) = self.root_region;
            return Ok(vec![Run {
                logical: 0,
                len: len.min(MAX_DIR_BYTES),
                disk,
            }]);
        }
        let first = if id == 0 {
            self.root_cluster
        } else {
            self.entry(id)?.1
        };
        if first == 0 {
            return Ok(Vec::new());
        }
        self.chain(first, MAX_DIR_BYTES)
    }

    /// The bytes of a directory's runs.
    fn dir_bytes(&self, runs: &[Run]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for r in runs {
            out.extend(read_vec(self.dev.as_ref(), r.disk, r.len as usize)?);
        }
        Ok(out)
    }

    /// The short entry at byte `id`: its bytes and first cluster.
    fn entry(&self, id: u64) -> Result<(Vec<u8>, u32)> {
        let e = read_vec(self.dev.as_ref(), id, 32)?;
        let first = u32::from(le::u16(&e, 26))
            | if self.bits == 32 {
                u32::from(le::u16(&e, 20)) << 16
            } else {
                0
            };
        Ok((e, first))
    }

    fn root_node(&self) -> Node {
        node(0, ATTR_DIR, 0, Time::default())
    }
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A FAT date and time (2-second resolution) as seconds since the epoch, read as UTC.
fn fat_time(date: u16, time: u16) -> Time {
    let (y, m, d) = (
        1980 + i64::from(date >> 9),
        i64::from((date >> 5) & 15),
        i64::from(date & 31),
    );
    if !(1..=12).contains(&m) || d == 0 {
        return Time::default();
    }
    let secs = days_from_civil(y, m, d) * 86_400
        + i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 63) * 60
        + i64::from(time & 31) * 2;
    Time { secs, nanos: 0 }
}

fn node(id: u64, attr: u8, size: u64, mtime: Time) -> Node {
    let dir = attr & ATTR_DIR != 0;
    let write = if attr & ATTR_READ_ONLY != 0 { 0 } else { 0o200 };
    Node {
        id,
        kind: if dir { Kind::Dir } else { Kind::File },
        perm: if dir { 0o555 | write } else { 0o444 | write },
        uid: 0,
        gid: 0,
        size: if dir { 0 } else { size },
        mtime,
        atime: mtime,
        links: 1,
        rdev: (0, 0),
    }
}

/// The 8.3 name of a short entry, with the lowercase flags Windows NT sets.
fn short_name(e: &[u8]) -> Vec<u8> {
    let mut base = e[..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xE5;
    }
    let mut ext = e[8..11].to_vec();
    if e[12] & 0x08 != 0 {
        base.make_ascii_lowercase();
    }
    if e[12] & 0x10 != 0 {
        ext.make_ascii_lowercase();
    }
    let trim = |v: &[u8]| latin1(v).trim_end_matches(' ').to_owned();
    let (b, x) = (trim(&base), trim(&ext));
    if x.is_empty() { b } else { format!("{b}.{x}") }.into_bytes()
}

/// The pieces of a long name met so far: the checksum of the short entry they belong to, and
/// each piece's order with its 13 UTF-16 units.
type LongName = (u8, Vec<(u8, [u16; 13])>);

fn lfn_checksum(short: &[u8]) -> u8 {
    short[..11]
        .iter()
        .fold(0u8, |s, &c| s.rotate_right(1).wrapping_add(c))
}

impl Filesystem for Fat {
    fn kind(&self) -> FsKind {
        FsKind::Fat(self.bits)
    }

    fn label(&self) -> String {
        self.label.clone()
    }

    fn root(&self) -> Result<Node> {
        Ok(self.root_node())
    }

    fn read_dir(&self, dir: &Node) -> Result<Vec<Entry>> {
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDirectory(format!(
                "FAT entry at byte {}",
                dir.id
            )));
        }
        let runs = self.dir_runs(dir.id)?;
        let bytes = self.dir_bytes(&runs)?;
        let mut out = Vec::new();
        // Long-name pieces gathered before their short entry.
        let mut long: Option<LongName> = None;
        for (i, e) in bytes.chunks_exact(32).enumerate() {
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xE5 {
                long = None;
                continue;
            }
            if e[11] & 0x3F == ATTR_LFN {
                let mut units = [0u16; 13];
                for (k, at) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                    .iter()
                    .enumerate()
                {
                    units[k] = le::u16(e, *at);
                }
                if e[0] & 0x40 != 0 {
                    long = Some((e[13], Vec::new()));
                }
                if let Some((sum, parts)) = &mut long {
                    if *sum == e[13] {
                        parts.push((e[0] & 0x1F, units));
                    } else {
                        long = None;
                    }
                }
                continue;
            }
            let name = match long.take() {
                Some((sum, mut parts)) if sum == lfn_checksum(e) => {
                    parts.sort_by_key(|(ord, _)| *ord);
                    let units: Vec<u16> = parts
                        .iter()
                        .flat_map(|(_, u)| u.iter().copied())
                        .take_while(|&u| u != 0)
                        .collect();
                    String::from_utf16_lossy(&units).into_bytes()
                }
                _ => short_name(e),
            };
            if e[11] & ATTR_VOLUME != 0 || name == b"." || name == b".." {
                continue;
            }
            // The entry's place on the disk is the node's id.
            let at = i as u64 * 32;
            let r = runs
                .iter()
                .find(|r| r.logical <= at && at < r.logical + r.len)
                .ok_or_else(|| FsError::Damaged("FAT directory".into()))?;
            let id = r.disk + (at - r.logical);
            let mtime = fat_time(le::u16(e, 24), le::u16(e, 22));
            out.push(Entry {
                name,
                node: node(id, e[11], u64::from(le::u32(e, 28)), mtime),
            });
        }
        Ok(out)
    }

    fn read_link(&self, _link: &Node) -> Result<Vec<u8>> {
        Err(FsError::Unsupported("FAT has no symbolic links".into()))
    }

    fn open(&self, file: &Node) -> Result<Box<dyn FileData + '_>> {
        if file.kind != Kind::File {
            return Err(FsError::Damaged(format!(
                "FAT entry at byte {} (not a file)",
                file.id
            )));
        }
        let (e, first) = self.entry(file.id)?;
        let size = u64::from(le::u32(&e, 28));
        let runs = if size == 0 {
            Vec::new()
        } else {
            self.chain(first, size)?
        };
        let mapped: u64 = runs.iter().map(|r| r.len).sum();
        if mapped < size {
            return Err(FsError::Damaged(format!(
                "FAT file at byte {}: its chain is shorter than its size",
                file.id
            )));
        }
        Ok(Box::new(FatFile {
            fat: self,
            runs,
            size,
        }))
    }

    fn xattrs(&self, _node: &Node) -> Result<Xattrs> {
        Ok(Vec::new())
    }
}

struct FatFile<'a> {
    fat: &'a Fat,
    runs: Vec<Run>,
    size: u64,
}

impl FileData for FatFile<'_> {
    fn data_ranges(&self) -> Vec<(u64, u64)> {
        no_holes(self.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let Some(end) = read_end(offset, buf.len(), self.size) else {
            return Ok(0);
        };
        let first = self.runs.partition_point(|r| r.logical + r.len <= offset);
        for r in self.runs[first..].iter().take_while(|r| r.logical < end) {
            let from = r.logical.max(offset);
            let to = (r.logical + r.len).min(end);
            let at = r.disk + (from - r.logical);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.fat
                .dev
                .read_exact_at(at, dst)
                .map_err(|source| FsError::Read { offset: at, source })?;
        }
        Ok((end - offset) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_from_1980_in_two_second_steps() {
        // 2026-12-06 21:23:04
        let date = ((2026 - 1980) << 9) | (12 << 5) | 6;
        let time = (21 << 11) | (23 << 5) | 2;
        assert_eq!(fat_time(date, time).secs, 1_796_592_184);
        assert_eq!(fat_time(0, 0), Time::default(), "month 0 is no date");
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }

    #[test]
    fn short_names_and_their_checksum() {
        let mut e = [b' '; 32];
        e[..11].copy_from_slice(b"README  TXT");
        e[12] = 0x08 | 0x10;
        assert_eq!(short_name(&e), b"readme.txt");
        e[12] = 0;
        e[8..11].copy_from_slice(b"   ");
        assert_eq!(short_name(&e), b"README");
        assert_eq!(lfn_checksum(b"README  TXT"), 0x73);
    }
}
