//! Scratch files of fixed-size records partitioned by id prefix: how a pass over more ids than
//! fit in memory ([`Lookups`](super::lookups::Lookups), a rebuild of the cache table) keeps its
//! memory bounded. Records are written with write(2), so that the kernel writes them back as it
//! needs to (dirty pages of a written mapping would count against a cgroup v1 limit until
//! written back), and each partition is read back on its own, small enough to sort in memory.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Bytes gathered per partition before they are written, and read at once.
pub(super) const WRITE_BYTES: usize = 1 << 20;

/// A record of a scratch file: fixed size, partitioned and sorted by the id it starts with.
pub(super) trait Record: Sized {
    /// Bytes of a record in a scratch file.
    const LEN: usize;
    /// The id it is partitioned by.
    fn id(&self) -> &[u8; 32];
    /// Appends its bytes.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads it back from [`LEN`](Self::LEN) bytes.
    fn get(raw: &[u8]) -> Self;
}

/// The partition of `id` among `2^bits`, counting prefix bits from bit `from`.
pub(super) fn partition(id: &[u8; 32], from: u32, bits: u32) -> usize {
    if bits == 0 {
        return 0;
    }
    let top = u64::from_be_bytes(id[..8].try_into().expect("eight bytes"));
    (top << from >> (64 - bits)) as usize
}

/// A scratch file of records, unlinked at once.
pub(super) struct Spill {
    file: File,
    /// Records written to it.
    pub(super) records: u64,
}

impl Spill {
    /// `n` empty scratch files in `scratch`.
    pub(super) fn many(scratch: &Path, n: usize) -> std::io::Result<Vec<Spill>> {
        (0..n)
            .map(|_| {
                Ok(Spill {
                    file: tempfile::tempfile_in(scratch)?,
                    records: 0,
                })
            })
            .collect()
    }

    /// Appends `records` records, `bytes`.
    pub(super) fn append(&mut self, bytes: &[u8], records: u64) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.records += records;
        Ok(())
    }

    /// Asks the kernel to start reading the file (advice only): a reader that gets to it a
    /// moment later finds it read while it was busy with the one before.
    pub(super) fn will_need(&self) {
        crate::backend::local::advise(&self.file, libc::POSIX_FADV_WILLNEED);
    }

    /// Reads all its records' bytes into `out`, in place of what it held, with one read (what
    /// `out` held is kept where it will be overwritten: only growth is filled first).
    pub(super) fn read_all<R: Record>(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let len = usize::try_from(self.records * R::LEN as u64)
            .map_err(|_| std::io::Error::other("a scratch file larger than memory"))?;
        out.resize(len, 0);
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_exact(out)
    }

    /// A reader of its records from the first.
    pub(super) fn reader(&mut self) -> std::io::Result<BufReader<&File>> {
        self.file.seek(SeekFrom::Start(0))?;
        Ok(BufReader::with_capacity(WRITE_BYTES, &self.file))
    }
}

/// Appends `records`, grouped by partition in ascending order (sorted by id, say), to the files
/// of their partitions (`bits` prefix bits after the first `from`), a large write(2) at a time.
/// Grouped, each partition's records are one stretch of them, written through one buffer: a
/// buffer per partition held the whole run a second time (40 MiB more at 10^8 chunks, where
/// verify peaked at 223 MiB in 256).
pub(super) fn write_partitioned<R: Record>(
    records: &[R],
    from: u32,
    bits: u32,
    parts: &mut [Spill],
) -> std::io::Result<()> {
    debug_assert!(records
        .windows(2)
        .all(|w| partition(w[0].id(), from, bits) <= partition(w[1].id(), from, bits)));
    let mut buf = Vec::with_capacity(WRITE_BYTES);
    let mut rest = records;
    while let Some(first) = rest.first() {
        let p = partition(first.id(), from, bits);
        let len = rest.partition_point(|r| partition(r.id(), from, bits) == p);
        let (stretch, after) = rest.split_at(len);
        for piece in stretch.chunks(WRITE_BYTES / R::LEN) {
            buf.clear();
            piece.iter().for_each(|r| r.put(&mut buf));
            parts[p].file.write_all(&buf)?;
        }
        parts[p].records += len as u64;
        rest = after;
    }
    Ok(())
}

/// Reads `n` records.
pub(super) fn read_records<R: Record>(reader: &mut impl Read, n: u64) -> std::io::Result<Vec<R>> {
    let mut out = Vec::with_capacity(n as usize);
    read_records_into(reader, n, &mut out)?;
    Ok(out)
}

/// Reads `n` records into `out`, in place of what it held (its memory reused: a fresh buffer
/// of tens of MiB per partition was a page fault per 4 KiB each time).
pub(super) fn read_records_into<R: Record>(
    reader: &mut impl Read,
    n: u64,
    out: &mut Vec<R>,
) -> std::io::Result<()> {
    out.clear();
    out.reserve(n as usize);
    let mut raw = vec![0u8; (WRITE_BYTES / R::LEN).min(n as usize) * R::LEN];
    let mut left = n as usize;
    while left > 0 {
        let bytes = &mut raw[..(left * R::LEN).min(WRITE_BYTES / R::LEN * R::LEN)];
        reader.read_exact(bytes)?;
        out.extend(bytes.chunks_exact(R::LEN).map(R::get));
        left -= bytes.len() / R::LEN;
    }
    Ok(())
}
