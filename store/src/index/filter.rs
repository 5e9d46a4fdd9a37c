//! The Bloom filter in front of a cache table ([`super::table`]): one 64-byte block per id,
//! six bits set in it, about 1% false positives at 10 bits per entry. Byte layout:
//! docs/format.md, "cache table".

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

/// Bytes of one filter block (one cache line).
pub(super) const BLOCK: usize = 64;
/// Filter bits per entry: about 1% false positives with six probes per 512-bit block.
const BITS_PER_ENTRY: u64 = 10;

/// The filter block of an id and the six bits set in it. Ids are keyed hashes, uniformly
/// distributed, so their bytes serve as the filter's hash values directly. The block is the
/// id's first eight bytes scaled to the block count, so it grows with the id: a table written
/// in id order writes its filter front to back, where a block picked at random dirtied every
/// page of a 125 MB filter again and again (119 GB of writeback in a cold 10^8 rebuild).
pub(super) fn probes(id: &[u8], blocks: u64) -> (usize, [u16; 6]) {
    let prefix = u64::from_be_bytes(id[..8].try_into().expect("eight bytes"));
    let b = ((u128::from(prefix) * u128::from(blocks)) >> 64) as u64;
    let mut bits = [0u16; 6];
    for (i, bit) in bits.iter_mut().enumerate() {
        *bit = u16::from_le_bytes([id[8 + 2 * i], id[9 + 2 * i]]) & 511;
    }
    (b as usize, bits)
}

/// Filter blocks for `entries` entries.
pub fn blocks_for(entries: u64) -> u64 {
    (entries * BITS_PER_ENTRY).div_ceil(BLOCK as u64 * 8).max(1)
}

/// The Bloom filter of a table being written, built front to back as sorted ids arrive (their
/// blocks never go back: see [`probes`]) in a scratch file, so that a cold rebuild holds one
/// block in memory whatever the table's size (the filter is 125 MB at 10^8 entries), and its
/// pages are written once, in order, with write(2): under a cgroup v1 limit a mapping's dirty
/// pages would count against the command until written back.
pub(super) struct FilterWriter {
    blocks: u64,
    /// The block ids are being added to, and its bits.
    at: u64,
    block: [u8; BLOCK],
    /// Blocks before `at`, written.
    out: BufWriter<File>,
}

impl FilterWriter {
    pub(super) fn new(blocks: u64, scratch_dir: &Path) -> std::io::Result<FilterWriter> {
        Ok(FilterWriter {
            blocks,
            at: 0,
            block: [0; BLOCK],
            out: BufWriter::with_capacity(1 << 20, tempfile::tempfile_in(scratch_dir)?),
        })
    }

    /// Sets the bits of the id `id`; ids must come in ascending order.
    pub(super) fn add(&mut self, id: &[u8]) -> std::io::Result<()> {
        let (block, bits) = probes(id, self.blocks);
        let block = block as u64;
        if block < self.at {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "table entries out of id order",
            ));
        }
        self.advance_to(block)?;
        for bit in bits {
            self.block[bit as usize / 8] |= 1 << (bit % 8);
        }
        Ok(())
    }

    /// Writes the current block and empty ones up to `block`, which becomes current.
    fn advance_to(&mut self, block: u64) -> std::io::Result<()> {
        if block > self.at {
            self.out.write_all(&self.block)?;
            for _ in self.at + 1..block {
                self.out.write_all(&[0; BLOCK])?;
            }
            self.block = [0; BLOCK];
            self.at = block;
        }
        Ok(())
    }

    /// Hands the whole filter to `f`, `group` blocks at a time (the last group may be
    /// shorter).
    pub(super) fn finish(
        mut self,
        group: u64,
        mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.advance_to(self.blocks)?;
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))?;
        let mut buf = vec![0u8; group as usize * BLOCK];
        let mut left = self.blocks;
        while left > 0 {
            let n = left.min(group);
            let bytes = &mut buf[..n as usize * BLOCK];
            file.read_exact(bytes)?;
            f(bytes)?;
            left -= n;
        }
        Ok(())
    }
}
