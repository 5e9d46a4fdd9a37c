//! What a partition holds, recognised by its signatures: the filesystems sbk reads, and the
//! ones it only names (so that the message can point to `sbk mount` or `sbk serve`).

use crate::{le, ReadAt};

/// A filesystem or volume format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext2, ext3 or ext4 (by the features its superblock names).
    Ext(u8),
    /// FAT12, FAT16 or FAT32.
    Fat(u8),
    /// exFAT.
    ExFat,
    /// NTFS.
    Ntfs,
    /// XFS.
    Xfs,
    /// Btrfs.
    Btrfs,
    /// An LVM2 physical volume.
    Lvm2,
    /// A LUKS encrypted volume.
    Luks,
    /// Linux swap.
    Swap,
    /// Nothing recognised.
    Unknown,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsKind::Ext(v) => write!(f, "ext{v}"),
            FsKind::Fat(bits) => write!(f, "fat{bits}"),
            FsKind::ExFat => f.write_str("exfat"),
            FsKind::Ntfs => f.write_str("ntfs"),
            FsKind::Xfs => f.write_str("xfs"),
            FsKind::Btrfs => f.write_str("btrfs"),
            FsKind::Lvm2 => f.write_str("LVM2 physical volume"),
            FsKind::Luks => f.write_str("LUKS"),
            FsKind::Swap => f.write_str("swap"),
            FsKind::Unknown => f.write_str("unknown"),
        }
    }
}

/// Reads `len` bytes at `at`, or `None` where the device is shorter or unreadable (detection
/// only looks: an unreadable signature is no signature).
fn peek(dev: &dyn ReadAt, at: u64, len: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; len];
    (at + len as u64 <= dev.size())
        .then(|| dev.read_exact_at(at, &mut b).ok())
        .flatten()
        .map(|()| b)
}

/// What `dev` holds.
pub fn detect(dev: &dyn ReadAt) -> FsKind {
    if let Some(sb) = peek(dev, 1024, 1024) {
        if le::u16(&sb, 0x38) == 0xEF53 {
            return FsKind::Ext(ext_version(&sb));
        }
    }
    let Some(s0) = peek(dev, 0, 512) else {
        return FsKind::Unknown;
    };
    if &s0[3..11] == b"NTFS    " {
        return FsKind::Ntfs;
    }
    if &s0[3..11] == b"EXFAT   " {
        return FsKind::ExFat;
    }
    if &s0[..4] == b"XFSB" {
        return FsKind::Xfs;
    }
    if &s0[..6] == b"LUKS\xba\xbe" {
        return FsKind::Luks;
    }
    if let Some(bits) = fat_bits(&s0) {
        return FsKind::Fat(bits);
    }
    // The LVM2 label sits in one of the first four sectors.
    for n in 0..4 {
        if let Some(s) = peek(dev, n * 512, 512) {
            if &s[..8] == b"LABELONE" && &s[24..32] == b"LVM2 001" {
                return FsKind::Lvm2;
            }
        }
    }
    if peek(dev, 0x10040, 8).is_some_and(|m| m == b"_BHRfS_M") {
        return FsKind::Btrfs;
    }
    if peek(dev, 4086, 10).is_some_and(|m| m == b"SWAPSPACE2" || m == b"SWAP-SPACE") {
        return FsKind::Swap;
    }
    FsKind::Unknown
}

/// ext4 when the superblock names a feature only ext4 has, ext3 with a journal, else ext2.
pub(crate) fn ext_version(sb: &[u8]) -> u8 {
    let (compat, incompat) = (le::u32(sb, 0x5C), le::u32(sb, 0x60));
    const EXT4_ONLY: u32 = 0x40 | 0x80 | 0x200 | 0x8000; // extents, 64bit, flex_bg, inline data
    if incompat & EXT4_ONLY != 0 {
        4
    } else if compat & 0x4 != 0 {
        3
    } else {
        2
    }
}

/// 12, 16 or 32 when sector 0 is a FAT boot sector (its BIOS parameter block is sane), by the
/// count of clusters as the FAT specification decides it.
pub(crate) fn fat_bits(s: &[u8]) -> Option<u8> {
    if s.len() < 512 || s[510..512] != [0x55, 0xAA] {
        return None;
    }
    let bps = u64::from(le::u16(s, 11));
    let spc = u64::from(s[13]);
    let reserved = u64::from(le::u16(s, 14));
    let fats = u64::from(s[16]);
    let root_entries = u64::from(le::u16(s, 17));
    if !matches!(bps, 512 | 1024 | 2048 | 4096)
        || !spc.is_power_of_two()
        || reserved == 0
        || !(1..=2).contains(&fats)
    {
        return None;
    }
    let total = match le::u16(s, 19) {
        0 => u64::from(le::u32(s, 32)),
        n => u64::from(n),
    };
    let fat_size = match le::u16(s, 22) {
        0 => u64::from(le::u32(s, 36)),
        n => u64::from(n),
    };
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data = total.checked_sub(reserved + fats * fat_size + root_sectors)?;
    let clusters = data / spc;
    Some(if clusters < 4085 {
        12
    } else if clusters < 65525 {
        16
    } else {
        32
    })
}
