//! Writable exports: a sparse copy-on-write overlay over a read-only snapshot export.
//!
//! An overlay is two files in the overlay folder, named after the export name the client asked
//! for: `<name>.data`, a sparse file of the export's size holding written blocks at their own
//! offsets, and `<name>.map`, which records the snapshot and size the overlay belongs to and a
//! bitmap of the 4 KiB blocks written (byte layout in docs/format.md, "Overlay map"). Reads take
//! written blocks from the data file and the rest from the snapshot. A partial block is
//! completed from the snapshot before it is written. `FLUSH` makes completed writes durable: the
//! data file is fsynced, then the map is written under a temporary name, fsynced and renamed, so
//! a crash leaves the map of the last flush, whose blocks are all in the data file. Reopening an
//! overlay for another snapshot or size is refused (say `latest` moved since it was made).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sbk_nbd::proto::EIO;
use sbk_nbd::server::{Export, ExportError, ReadBytes, ReadPart};
use sbk_store::SnapshotId;

use crate::sys;

/// Overlay block size: writes are tracked per 4 KiB block.
pub const BLOCK: u64 = 4096;
/// Magic of an overlay map.
pub const MAP_MAGIC: &[u8; 8] = b"SBKOVMAP";
/// Overlay map format version.
pub const MAP_VERSION: u32 = 1;
const MAP_HEADER: usize = 8 + 4 + 32 + 8 + 4;

/// Why an overlay map cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Not an overlay map, or damaged.
    #[error("not a valid overlay map: {0}")]
    Invalid(String),
    /// A map of another snapshot or size.
    #[error("the overlay belongs to snapshot {found} ({found_size} bytes), not to {expected} ({expected_size} bytes)")]
    Mismatch {
        /// The snapshot the overlay was made for.
        found: String,
        /// Its size.
        found_size: u64,
        /// The snapshot it was opened with.
        expected: String,
        /// Its size.
        expected_size: u64,
    },
}

/// The decoded contents of an overlay map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayMap {
    /// The snapshot the overlay belongs to.
    pub snapshot: SnapshotId,
    /// The export's size.
    pub size: u64,
    /// One bit per block, block `i` at bit `i % 64` of word `i / 64`.
    pub bits: Vec<u64>,
}

impl OverlayMap {
    fn words(size: u64) -> usize {
        size.div_ceil(BLOCK).div_ceil(64) as usize
    }

    /// An empty map.
    pub fn new(snapshot: SnapshotId, size: u64) -> Self {
        OverlayMap {
            snapshot,
            size,
            bits: vec![0; Self::words(size)],
        }
    }

    /// Encodes the map.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAP_HEADER + self.bits.len() * 8 + 16);
        b.extend_from_slice(MAP_MAGIC);
        b.extend_from_slice(&MAP_VERSION.to_le_bytes());
        b.extend_from_slice(&self.snapshot.0);
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        for w in &self.bits {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(&sum.as_bytes()[..16]);
        b
    }

    /// Decodes a map; a typed error on any bad byte.
    pub fn decode(b: &[u8]) -> Result<Self, MapError> {
        let bad = |s: &str| MapError::Invalid(s.into());
        if b.len() < MAP_HEADER + 16 {
            return Err(bad("too short"));
        }
        let (body, sum) = b.split_at(b.len() - 16);
        if &blake3::hash(body).as_bytes()[..16] != sum {
            return Err(bad("checksum mismatch"));
        }
        if &body[0..8] != MAP_MAGIC {
            return Err(bad("bad magic"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("four bytes"));
        if u32_at(8) != MAP_VERSION {
            return Err(MapError::Invalid(format!("version {}", u32_at(8))));
        }
        let snapshot = SnapshotId(body[12..44].try_into().expect("32 bytes"));
        let size = u64::from_le_bytes(body[44..52].try_into().expect("eight bytes"));
        if u64::from(u32_at(52)) != BLOCK {
            return Err(MapError::Invalid(format!("block size {}", u32_at(52))));
        }
        let words = &body[MAP_HEADER..];
        if words.len() % 8 != 0 || words.len() / 8 != Self::words(size) {
            return Err(bad("bitmap length does not match the size"));
        }
        let bits = words
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("eight bytes")))
            .collect();
        Ok(OverlayMap {
            snapshot,
            size,
            bits,
        })
    }

    fn get(&self, block: u64) -> bool {
        self.bits[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, block: u64) {
        self.bits[(block / 64) as usize] |= 1 << (block % 64);
    }
}

/// Fuzz entry point: decodes an overlay map; what decodes re-encodes to the same bytes.
pub fn fuzz_overlay_map(data: &[u8]) {
    if let Ok(m) = OverlayMap::decode(data) {
        assert_eq!(m.encode(), data);
    }
}

/// One export's overlay, shared by every connection to that export name.
pub struct Overlay {
    data: File,
    map_path: PathBuf,
    map: RwLock<OverlayMap>,
    /// Serializes writers (a partial block is read, completed and written as one step) and
    /// flushes.
    writing: Mutex<()>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> ExportError {
    ExportError::new(EIO, format!("overlay: {what}: {e}"))
}

impl Overlay {
    /// Opens (or creates) the overlay of export `name` in `dir` for snapshot `snapshot` of
    /// `size` bytes; refuses one made for another snapshot or size.
    pub fn open(
        dir: &Path,
        name: &str,
        snapshot: SnapshotId,
        size: u64,
    ) -> Result<Overlay, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let map_path = dir.join(format!("{name}.map"));
        let data_path = dir.join(format!("{name}.data"));
        let map = match std::fs::read(&map_path) {
            Ok(bytes) => {
                let m = OverlayMap::decode(&bytes)
                    .map_err(|e| format!("{}: {e}", map_path.display()))?;
                if m.snapshot != snapshot || m.size != size {
                    return Err(format!(
                        "{}: {}",
                        map_path.display(),
                        MapError::Mismatch {
                            found: m.snapshot.to_hex(),
                            found_size: m.size,
                            expected: snapshot.to_hex(),
                            expected_size: size,
                        }
                    ));
                }
                m
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OverlayMap::new(snapshot, size),
            Err(e) => return Err(format!("{}: {e}", map_path.display())),
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| format!("{}: {e}", data_path.display()))?;
        data.set_len(size)
            .map_err(|e| format!("{}: {e}", data_path.display()))?;
        let overlay = Overlay {
            data,
            map_path,
            map: RwLock::new(map),
            writing: Mutex::new(()),
        };
        // A new overlay's map exists from the start, so a restart finds it bound to its snapshot.
        overlay.flush().map_err(|e| e.message)?;
        Ok(overlay)
    }

    /// Makes every completed write durable: the data first, then the map that points at it.
    pub fn flush(&self) -> Result<(), ExportError> {
        let _w = self.writing.lock().expect("no thread panics holding this");
        self.data
            .sync_all()
            .map_err(|e| io_err("fsync of the data", e))?;
        let bytes = self
            .map
            .read()
            .expect("no thread panics holding this")
            .encode();
        let tmp = self.map_path.with_extension("map.tmp");
        let write = || -> std::io::Result<()> {
            let f = File::create(&tmp)?;
            f.write_all_at(&bytes, 0)?;
            f.sync_all()?;
            // The rename replaces the old map only once the new one is durable; the folder's
            // fsync makes the rename itself survive a power loss.
            std::fs::rename(&tmp, &self.map_path)?;
            if let Some(dir) = self.map_path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| io_err("writing the map", e))
    }

    /// Writes `data` at `offset` over `base`.
    fn write(&self, base: &dyn Export, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        let _w = self.writing.lock().expect("no thread panics holding this");
        let end = offset + data.len() as u64;
        let first = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        // Complete partial edge blocks not yet in the overlay from the snapshot.
        let mut head = Vec::new();
        let mut tail = Vec::new();
        let edge = |block: u64| -> Result<Vec<u8>, ExportError> {
            let start = block * BLOCK;
            let len = BLOCK.min(base.size() - start) as u32;
            self.read_into(base, start, len)
        };
        if !offset.is_multiple_of(BLOCK) || (last - first == 1 && !end.is_multiple_of(BLOCK)) {
            head = edge(first)?;
        }
        if !end.is_multiple_of(BLOCK) && last - 1 != first {
            tail = edge(last - 1)?;
        }
        let start = first * BLOCK;
        let mut buf = Vec::with_capacity(((last - first) * BLOCK) as usize);
        buf.extend_from_slice(&head);
        buf.resize(
            ((last - first) * BLOCK).min(base.size() - start) as usize,
            0,
        );
        if !tail.is_empty() {
            let at = ((last - 1 - first) * BLOCK) as usize;
            buf[at..at + tail.len()].copy_from_slice(&tail);
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.data
            .write_all_at(&buf, start)
            .map_err(|e| io_err("write", e))?;
        let mut map = self.map.write().expect("no thread panics holding this");
        for b in first..last {
            map.set(b);
        }
        Ok(())
    }

    /// Zeroes `offset..offset + len` over `base` (whole blocks become holes in the data file).
    fn zero(&self, base: &dyn Export, offset: u64, len: u64) -> Result<(), ExportError> {
        let end = offset + len;
        let inner_start = offset.div_ceil(BLOCK) * BLOCK;
        let inner_end = (end / BLOCK * BLOCK).max(inner_start);
        // Partial edge blocks: ordinary writes of zeroes.
        for (a, b) in [(offset, inner_start.min(end)), (inner_end.max(offset), end)] {
            if b > a {
                self.write(base, a, &vec![0u8; (b - a) as usize])?;
            }
        }
        if inner_end > inner_start {
            let _w = self.writing.lock().expect("no thread panics holding this");
            sys::punch_hole(&self.data, inner_start, inner_end - inner_start)
                .map_err(|e| io_err("punching a hole", e))?;
            let mut map = self.map.write().expect("no thread panics holding this");
            for b in inner_start / BLOCK..inner_end / BLOCK {
                map.set(b);
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`: overlay blocks from the data file, the rest from `base`.
    fn read_into(&self, base: &dyn Export, offset: u64, len: u32) -> Result<Vec<u8>, ExportError> {
        let mut buf = vec![0u8; len as usize];
        for c in base.read(offset, len)? {
            if let ReadPart::Data { offset: o, data } = c {
                let data = data.as_slice();
                let at = (o - offset) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
            }
        }
        let map = self.map.read().expect("no thread panics holding this");
        let end = offset + u64::from(len);
        let mut b = offset / BLOCK;
        while b * BLOCK < end {
            if !map.get(b) {
                b += 1;
                continue;
            }
            let run = b;
            while b * BLOCK < end && map.get(b) {
                b += 1;
            }
            let from = (run * BLOCK).max(offset);
            let to = (b * BLOCK).min(end);
            let at = (from - offset) as usize;
            self.data
                .read_exact_at(&mut buf[at..at + (to - from) as usize], from)
                .map_err(|e| io_err("read", e))?;
        }
        Ok(buf)
    }

    /// Whether any block of `offset..end` is in the overlay.
    fn touches(&self, offset: u64, end: u64) -> bool {
        let map = self.map.read().expect("no thread panics holding this");
        (offset / BLOCK..end.div_ceil(BLOCK)).any(|b| map.get(b))
    }
}

/// A snapshot export with an overlay: writable.
pub struct OverlayExport {
    base: Arc<dyn Export>,
    overlay: Arc<Overlay>,
}

impl OverlayExport {
    /// `base` with writes going to `overlay`.
    pub fn new(base: Arc<dyn Export>, overlay: Arc<Overlay>) -> Self {
        OverlayExport { base, overlay }
    }
}

impl Export for OverlayExport {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn writable(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadPart>, ExportError> {
        if !self.overlay.touches(offset, offset + u64::from(len)) {
            return self.base.read(offset, len);
        }
        let data = self.overlay.read_into(&*self.base, offset, len)?;
        Ok(vec![ReadPart::Data {
            offset,
            data: ReadBytes::Owned(data),
        }])
    }

    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, ExportError> {
        let base = self.base.block_status(offset, len)?;
        let map = self
            .overlay
            .map
            .read()
            .expect("no thread panics holding this");
        // Split the snapshot's extents into blocks: a written block is data (its contents are
        // not known to be zero), the others keep the snapshot's flags.
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        for (n, flags) in base {
            let end = pos + u64::from(n);
            let mut at = pos;
            while at < end {
                let next = ((at / BLOCK) + 1) * BLOCK;
                let piece_end = next.min(end);
                let f = if map.get(at / BLOCK) { 0 } else { flags };
                let n = (piece_end - at) as u32;
                match out.last_mut() {
                    Some((l, lf)) if *lf == f => *l += n,
                    _ => out.push((n, f)),
                }
                at = piece_end;
            }
            pos = end;
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.base.cache(offset, len)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        if data.is_empty() {
            return Ok(());
        }
        self.overlay.write(&*self.base, offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.overlay.zero(&*self.base, offset, u64::from(len))
    }

    fn trim(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        // A trimmed range reads as zeroes (allowed: the protocol leaves its contents open).
        self.overlay.zero(&*self.base, offset, u64::from(len))
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.overlay.flush()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // The last connection is gone (or the server stops): keep what was written.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sbk_nbd::proto::EINVAL;

    /// A base export of `size` bytes, every byte its offset's low byte.
    struct Pattern(u64);

    impl Export for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadPart>, ExportError> {
            if offset + u64::from(len) > self.0 {
                return Err(ExportError::new(EINVAL, "past the end"));
            }
            Ok(vec![ReadPart::Data {
                offset,
                data: ReadBytes::Owned(
                    (offset..offset + u64::from(len)).map(|i| i as u8).collect(),
                ),
            }])
        }
        fn block_status(&self, _: u64, len: u32) -> Result<Vec<(u32, u32)>, ExportError> {
            Ok(vec![(len, 0)])
        }
    }

    fn read_all(e: &dyn Export) -> Vec<u8> {
        let mut out = vec![0u8; e.size() as usize];
        for c in e.read(0, e.size() as u32).unwrap() {
            match c {
                ReadPart::Data { offset, data } => {
                    let data = data.as_slice();
                    out[offset as usize..offset as usize + data.len()].copy_from_slice(data)
                }
                ReadPart::Hole { offset, len } => {
                    out[offset as usize..(offset + u64::from(len)) as usize].fill(0)
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any sequence of writes, zeroes and flushes reads back as the same operations on a
        /// plain buffer, and again after the overlay is reopened.
        #[test]
        fn overlay_matches_a_buffer(
            size in 1u64..40_000,
            ops in proptest::collection::vec((0u64..40_000, 1usize..9000, 0u8..3), 1..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let base: Arc<dyn Export> = Arc::new(Pattern(size));
            let id = SnapshotId([3; 32]);
            let mut model: Vec<u8> = (0..size).map(|i| i as u8).collect();
            {
                let ov = Arc::new(Overlay::open(dir.path(), "x", id, size).unwrap());
                let e = OverlayExport::new(base.clone(), ov);
                for (i, (at, n, kind)) in ops.into_iter().enumerate() {
                    let at = at % size;
                    let n = (n as u64).min(size - at) as usize;
                    match kind {
                        0 => {
                            let data = vec![i as u8 ^ 0xa5; n];
                            e.write(at, &data).unwrap();
                            model[at as usize..at as usize + n].copy_from_slice(&data);
                        }
                        1 => {
                            e.write_zeroes(at, n as u32).unwrap();
                            model[at as usize..at as usize + n].fill(0);
                        }
                        _ => e.flush().unwrap(),
                    }
                }
                prop_assert_eq!(read_all(&e), model.clone());
            }
            let ov = Arc::new(Overlay::open(dir.path(), "x", id, size).unwrap());
            let e = OverlayExport::new(base, ov);
            prop_assert_eq!(read_all(&e), model);
        }
    }

    #[test]
    fn another_snapshot_or_a_damaged_map_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Overlay::open(dir.path(), "latest", SnapshotId([1; 32]), 8192).unwrap());
        let e = Overlay::open(dir.path(), "latest", SnapshotId([2; 32]), 8192)
            .err()
            .unwrap();
        assert!(e.contains("belongs to snapshot"), "{e}");
        assert!(Overlay::open(dir.path(), "latest", SnapshotId([1; 32]), 4096).is_err());
        let map = dir.path().join("latest.map");
        let mut b = std::fs::read(&map).unwrap();
        b[20] ^= 1;
        std::fs::write(&map, &b).unwrap();
        let e = Overlay::open(dir.path(), "latest", SnapshotId([1; 32]), 8192)
            .err()
            .unwrap();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn map_decoder_refuses_every_truncation() {
        let m = OverlayMap::new(SnapshotId([9; 32]), 100_000);
        let b = m.encode();
        assert_eq!(OverlayMap::decode(&b).unwrap(), m);
        for n in 0..b.len() {
            assert!(OverlayMap::decode(&b[..n]).is_err());
        }
    }
}
