//! Partition tables: GPT (with its backup header when the primary is damaged) and MBR, with
//! the logical partitions of an extended one. Partitions are numbered as Linux numbers them: a
//! GPT entry by its slot, an MBR primary by its slot (1-4), logical partitions from 5 in chain
//! order. A disk with no partition table that holds a filesystem is one partition, number 0.

use crate::detect::{detect, FsKind};
use crate::{le, read_vec, Disk, FsError, ReadAt, Result, Slice};

/// Which kind of partition table a disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A GUID partition table.
    Gpt,
    /// A DOS (MBR) partition table.
    Mbr,
    /// None: the whole disk is one filesystem (partition 0).
    None,
}

impl TableKind {
    /// Its name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            TableKind::Gpt => "gpt",
            TableKind::Mbr => "mbr",
            TableKind::None => "none",
        }
    }
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number, as Linux numbers it (0: the whole disk, no partition table).
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// Its type: the GPT type's name (or GUID), or the MBR type byte's name.
    pub kind: String,
    /// Its GPT name (empty on MBR).
    pub label: String,
    /// An MBR extended partition: a container of logical partitions, no filesystem.
    pub extended: bool,
}

/// A disk's partition table.
#[derive(Debug, Clone)]
pub struct PartitionTable {
    /// The kind of table.
    pub kind: TableKind,
    /// The bytes of a sector the table counts in.
    pub sector: u64,
    /// The partitions, by number.
    pub partitions: Vec<Partition>,
}

impl PartitionTable {
    /// Partition `number`, as a disk of its own.
    pub fn open(&self, disk: &Disk, number: u32) -> Option<Slice> {
        let p = self.partitions.iter().find(|p| p.number == number)?;
        Some(Slice::new(disk.clone(), p.start, p.size))
    }
}

/// GPT entries a table may hold (128 is usual; this bounds a damaged count).
const MAX_GPT_ENTRIES: u64 = 4096;
/// Logical partitions followed along an EBR chain before it counts as a loop.
const MAX_LOGICAL: u32 = 256;

/// Reads `disk`'s partition table. A disk with neither a partition table nor a filesystem
/// sbk recognises is an error that says so.
pub fn partitions(disk: &Disk) -> Result<PartitionTable> {
    // As Linux: a GPT counts only behind a protective MBR (an old GPT left at the end of a
    // disk since re-partitioned with an MBR is not the table).
    if protective_mbr(disk.as_ref()) {
        for sector in [512u64, 4096] {
            if let Some(t) = gpt(disk.as_ref(), sector)? {
                return Ok(t);
            }
        }
    }
    // A FAT or NTFS boot sector ends in 55 AA as an MBR does: such a sector is a filesystem on
    // the whole disk. Other filesystems (ext's superblock at byte 1024) do not hide an MBR.
    let whole = detect(disk.as_ref());
    let boot_sector = matches!(whole, FsKind::Fat(_) | FsKind::Ntfs | FsKind::ExFat);
    if !boot_sector {
        if let Some(t) = mbr(disk.as_ref())? {
            return Ok(t);
        }
    }
    if !matches!(whole, FsKind::Unknown) {
        return Ok(PartitionTable {
            kind: TableKind::None,
            sector: 512,
            partitions: vec![Partition {
                number: 0,
                start: 0,
                size: disk.size(),
                kind: whole.to_string(),
                label: String::new(),
                extended: false,
            }],
        });
    }
    Err(FsError::Unsupported(
        "no partition table (GPT or MBR) and no filesystem sbk recognises on this disk".into(),
    ))
}

/// Whether sector 0 is an MBR with a GPT protective entry (type 0xEE; hybrid MBRs count).
fn protective_mbr(disk: &dyn ReadAt) -> bool {
    let mut s = [0u8; 512];
    disk.size() >= 512
        && disk.read_exact_at(0, &mut s).is_ok()
        && s[510..512] == [0x55, 0xAA]
        && s[446..510].chunks_exact(16).any(|e| e[4] == 0xEE)
}

/// The GPT whose primary header is in the sector after the first, or else its backup in the
/// last sector; `None` when neither carries the signature.
fn gpt(disk: &dyn ReadAt, sector: u64) -> Result<Option<PartitionTable>> {
    if disk.size() < sector * 3 {
        return Ok(None);
    }
    let last = disk.size() / sector - 1;
    let mut damaged = None;
    for lba in [1, last] {
        let h = read_vec(disk, lba * sector, sector as usize)?;
        if &h[..8] != b"EFI PART" {
            continue;
        }
        match gpt_entries(disk, sector, &h) {
            Ok(t) => return Ok(Some(t)),
            Err(e) => damaged = Some(e),
        }
    }
    damaged.map_or(Ok(None), Err)
}

fn gpt_entries(disk: &dyn ReadAt, sector: u64, h: &[u8]) -> Result<PartitionTable> {
    let hsize = le::u32(h, 12) as usize;
    if !(92..=h.len()).contains(&hsize) {
        return Err(FsError::Damaged("GPT header (its size)".into()));
    }
    let mut hdr = h[..hsize].to_vec();
    hdr[16..20].fill(0);
    if crc32(&hdr) != le::u32(h, 16) {
        return Err(FsError::Damaged("GPT header (checksum)".into()));
    }
    let entries_lba = le::u64(h, 72);
    let count = u64::from(le::u32(h, 80));
    let esize = u64::from(le::u32(h, 84));
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&esize) || esize % 8 != 0 {
        return Err(FsError::Damaged("GPT header (its entries)".into()));
    }
    let at = entries_lba
        .checked_mul(sector)
        .filter(|&a| a.saturating_add(count * esize) <= disk.size())
        .ok_or_else(|| FsError::Damaged("GPT header (entries past the disk)".into()))?;
    let raw = read_vec(disk, at, (count * esize) as usize)?;
    if crc32(&raw) != le::u32(h, 88) {
        return Err(FsError::Damaged("GPT partition entries (checksum)".into()));
    }
    let mut partitions = Vec::new();
    for (i, e) in raw.chunks_exact(esize as usize).enumerate() {
        let kind: [u8; 16] = e[..16].try_into().expect("16 bytes");
        if kind == [0; 16] {
            continue;
        }
        let (first, last) = (le::u64(e, 32), le::u64(e, 40));
        let size = last
            .checked_sub(first)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(sector));
        let start = first.checked_mul(sector);
        let (Some(start), Some(size)) = (start, size) else {
            return Err(FsError::Damaged(format!("GPT entry {} (its range)", i + 1)));
        };
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        partitions.push(Partition {
            number: i as u32 + 1,
            start,
            size,
            kind: gpt_type_name(&kind),
            label: String::from_utf16_lossy(&name),
            extended: false,
        });
    }
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        sector,
        partitions,
    })
}

/// A GUID as it is written (the first three fields are stored little-endian).
fn guid(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

fn gpt_type_name(g: &[u8; 16]) -> String {
    let s = guid(g);
    let name = match s.as_str() {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        _ => return s,
    };
    name.to_owned()
}

/// The MBR, or `None` when sector 0 is no partition table.
fn mbr(disk: &dyn ReadAt) -> Result<Option<PartitionTable>> {
    if disk.size() < 512 {
        return Ok(None);
    }
    let s = read_vec(disk, 0, 512)?;
    if s[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = s[446..510].chunks_exact(16).collect();
    if entries.iter().any(|e| e[0] & 0x7F != 0) {
        return Ok(None); // a boot flag other than 0 or 0x80: not a partition table
    }
    let mut partitions = Vec::new();
    // Logical partitions are numbered from 5 across every extended partition, as Linux does.
    let mut next_logical = 5;
    for (i, e) in entries.iter().enumerate() {
        let (kind, first, count) = (e[4], le::u32(e, 8), le::u32(e, 12));
        if kind == 0 || count == 0 {
            continue;
        }
        let extended = matches!(kind, 0x05 | 0x0F | 0x85);
        partitions.push(Partition {
            number: i as u32 + 1,
            start: u64::from(first) * 512,
            size: u64::from(count) * 512,
            kind: mbr_type_name(kind),
            label: String::new(),
            extended,
        });
        if extended {
            logical(disk, u64::from(first), &mut next_logical, &mut partitions)?;
        }
    }
    if partitions.is_empty() {
        return Ok(None);
    }
    Ok(Some(PartitionTable {
        kind: TableKind::Mbr,
        sector: 512,
        partitions,
    }))
}

/// The logical partitions along the EBR chain of the extended partition at sector `base`:
/// each EBR's first entry is a partition (relative to that EBR), its second the next EBR
/// (relative to the extended partition).
fn logical(disk: &dyn ReadAt, base: u64, number: &mut u32, out: &mut Vec<Partition>) -> Result<()> {
    let mut ebr = base;
    // Every EBR visited, whether or not it holds a partition: a chain that comes back to one is
    // a loop, and the count of links is bounded too.
    let mut seen = std::collections::HashSet::new();
    loop {
        if !seen.insert(ebr) || seen.len() > MAX_LOGICAL as usize {
            return Err(FsError::Damaged(
                "MBR extended partition (a loop of EBRs)".into(),
            ));
        }
        let at = ebr.saturating_mul(512);
        if at.saturating_add(512) > disk.size() {
            return Err(FsError::Damaged(format!(
                "EBR at sector {ebr} (past the disk)"
            )));
        }
        let s = read_vec(disk, at, 512)?;
        if s[510..512] != [0x55, 0xAA] {
            return Err(FsError::Damaged(format!(
                "EBR at sector {ebr} (no signature)"
            )));
        }
        let (e, next) = (&s[446..462], &s[462..478]);
        if e[4] != 0 && le::u32(e, 12) != 0 {
            out.push(Partition {
                number: *number,
                start: (ebr + u64::from(le::u32(e, 8))) * 512,
                size: u64::from(le::u32(e, 12)) * 512,
                kind: mbr_type_name(e[4]),
                label: String::new(),
                extended: false,
            });
            *number += 1;
        }
        if next[4] == 0 || le::u32(next, 8) == 0 {
            return Ok(());
        }
        ebr = base + u64::from(le::u32(next, 8));
    }
}

fn mbr_type_name(t: u8) -> String {
    let name = match t {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0E => "FAT16",
        0x05 | 0x0F | 0x85 => "extended",
        0x07 => "NTFS/exFAT",
        0x0B | 0x0C => "FAT32",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8E => "Linux LVM",
        0xEE => "GPT protective",
        0xEF => "EFI System",
        0xFD => "Linux RAID",
        _ => return format!("type 0x{t:02x}"),
    };
    name.to_owned()
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses it.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn guid_fields_are_little_endian_then_bytes() {
        let g = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        assert_eq!(guid(&g), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(gpt_type_name(&g), "Linux filesystem");
    }

    fn mbr_entry(s: &mut [u8], slot: usize, kind: u8, first: u32, count: u32) {
        let e = &mut s[446 + slot * 16..446 + slot * 16 + 16];
        e[4] = kind;
        e[8..12].copy_from_slice(&first.to_le_bytes());
        e[12..16].copy_from_slice(&count.to_le_bytes());
    }

    fn ebr(d: &mut [u8], sector: usize, logical: (u32, u32), next: u32) {
        let s = &mut d[sector * 512..sector * 512 + 512];
        s[510] = 0x55;
        s[511] = 0xAA;
        mbr_entry(s, 0, 0x83, logical.0, logical.1);
        mbr_entry(s, 1, if next == 0 { 0 } else { 0x05 }, next, 8);
    }

    #[test]
    fn logical_partitions_are_numbered_from_5_and_a_looping_chain_is_damage() {
        let mut d = vec![0u8; 64 * 512];
        d[510] = 0x55;
        d[511] = 0xAA;
        mbr_entry(&mut d, 0, 0x83, 40, 8);
        mbr_entry(&mut d, 1, 0x05, 2, 30); // extended, from sector 2
        ebr(&mut d, 2, (1, 3), 4); // logical at 3..6, next EBR at 2 + 4
        ebr(&mut d, 6, (1, 2), 0); // logical at 7..9, the end
        let disk: Disk = std::sync::Arc::new(d.clone());
        let t = partitions(&disk).unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        let got: Vec<(u32, u64, u64, bool)> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.size / 512, p.extended))
            .collect();
        assert_eq!(
            got,
            [
                (1, 40, 8, false),
                (2, 2, 30, true),
                (5, 3, 3, false),
                (6, 7, 2, false)
            ]
        );
        // The second EBR names itself as the next one.
        ebr(&mut d, 6, (1, 2), 4);
        let disk: Disk = std::sync::Arc::new(d.clone());
        assert!(matches!(partitions(&disk), Err(FsError::Damaged(_))));
        // ... and so with no partition in it: the loop is found by the EBRs seen, not the
        // partitions counted.
        ebr(&mut d, 6, (0, 0), 4);
        d[6 * 512 + 446 + 4] = 0;
        let disk: Disk = std::sync::Arc::new(d);
        assert!(matches!(partitions(&disk), Err(FsError::Damaged(_))));
    }
}
