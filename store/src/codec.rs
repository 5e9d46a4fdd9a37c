//! Little-endian encoding helpers shared by the on-disk formats, and the checksum they all use.
//!
//! The decoder is a cursor over a byte slice whose every read is bounds-checked and returns a
//! typed [`DecodeError`]: no on-disk format in this crate indexes a slice it has not measured.

use crate::error::DecodeError;

/// Bytes sealing adds to an object in an encrypted repository: a 24-byte salt and a 16-byte
/// tag (docs/format.md, "Encryption"). Here, below both the blob header's length checks and the
/// crypto module that seals.
pub const SEAL_OVERHEAD: usize = 24 + 16;

/// Checksum of on-disk structures: the first 16 bytes of an unkeyed BLAKE3 hash.
pub fn checksum(bytes: &[u8]) -> [u8; 16] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.as_bytes()[..16]);
    out
}

/// Checks that `bytes` ends with the [`checksum`] of what precedes it, and returns what precedes.
pub fn split_checksum(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() < 16 {
        return Err(DecodeError::Truncated {
            needed: 16,
            available: bytes.len(),
        });
    }
    let (body, stored) = bytes.split_at(bytes.len() - 16);
    let computed = checksum(body);
    if computed != stored {
        return Err(DecodeError::ChecksumMismatch {
            got: crate::id::to_hex(&computed),
            expected: crate::id::to_hex(stored),
        });
    }
    Ok(body)
}

/// Appends little-endian fields to a buffer.
#[derive(Default)]
pub struct Encoder {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Encoder {
    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a little-endian `i64`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a string as a `u32` byte length and its UTF-8 bytes.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32).bytes(s.as_bytes())
    }
    /// Appends the [`checksum`] of everything written so far, finishing the structure.
    pub fn finish_with_checksum(mut self) -> Vec<u8> {
        let c = checksum(&self.buf);
        self.buf.extend_from_slice(&c);
        self.buf
    }
}

/// Reads little-endian fields from a slice, failing with [`DecodeError::Truncated`] at its end.
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Reads `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                needed: self.pos.saturating_add(n),
                available: self.buf.len(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }
    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    /// Reads a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `i64`.
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// Reads a length-prefixed UTF-8 string.
    pub fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| DecodeError::Invalid {
            field,
            detail: e.to_string(),
        })
    }
    /// Reads and checks a magic value.
    pub fn magic(&mut self, expected: &[u8]) -> Result<(), DecodeError> {
        let found = self.bytes(expected.len())?;
        if found != expected {
            return Err(DecodeError::BadMagic {
                found: found.to_vec(),
            });
        }
        Ok(())
    }
    /// Fails unless every byte was consumed.
    pub fn end(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::Invalid {
                field: what,
                detail: format!("{} unexpected trailing bytes", self.remaining()),
            });
        }
        Ok(())
    }
}

/// Checks that a reserved field is zero: anything else was written by a format this build does
/// not know, or is damage, and must not be silently dropped (it would not survive re-encoding).
pub fn reserved(value: u64, field: &'static str) -> Result<(), DecodeError> {
    if value != 0 {
        return Err(invalid(
            field,
            format!("reserved, must be 0, holds {value}"),
        ));
    }
    Ok(())
}

/// Shorthand for a [`DecodeError::Invalid`].
pub fn invalid(field: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field,
        detail: detail.into(),
    }
}

/// An optional field of a manifest or index file: a tagged value that a reader which does not
/// know the tag skips, unless the writer marked it required (docs/format.md, "extensions").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// What the value is; tags are assigned in docs/format.md.
    pub tag: u16,
    /// A reader that does not know the tag must refuse the structure instead of skipping it.
    pub required: bool,
    /// The value.
    pub value: Vec<u8>,
}

/// Largest value an extension may carry.
pub const MAX_EXTENSION: usize = 1 << 20;

/// Extension tag of the changed-block record of a manifest (docs/format.md, "extensions").
pub const EXT_CHANGED_BLOCKS: u16 = 1;
/// Manifest extension tag of a copied snapshot's origin: the source repository id (16 bytes) and
/// the source snapshot id (32 bytes).
pub const EXT_ORIGIN: u16 = 2;

/// Extension tags this build understands: 1, the changed-block record of a manifest; 2, the
/// origin of a copied snapshot. A required extension with another tag is refused. (The tags are
/// defined here, beside the extension format, so that the codec needs nothing of the
/// structures that use it.)
const KNOWN_TAGS: &[u16] = &[EXT_CHANGED_BLOCKS, EXT_ORIGIN];

impl Encoder {
    /// Appends an extension list: a u16 count, then per extension u16 tag, u16 flags (bit 0:
    /// required, other bits reserved), u32 length and the value.
    pub fn extensions(&mut self, exts: &[Extension]) -> &mut Self {
        self.u16(exts.len() as u16);
        for x in exts {
            self.u16(x.tag)
                .u16(u16::from(x.required))
                .u32(x.value.len() as u32)
                .bytes(&x.value);
        }
        self
    }
}

impl Decoder<'_> {
    /// Reads an extension list, refusing a required extension this build does not know.
    pub fn extensions(&mut self) -> Result<Vec<Extension>, DecodeError> {
        let n = self.u16()?;
        let mut out = Vec::new();
        for _ in 0..n {
            let tag = self.u16()?;
            let flags = self.u16()?;
            reserved(u64::from(flags & !1), "extension flags")?;
            let len = self.u32()? as usize;
            if len > MAX_EXTENSION {
                return Err(invalid("extension length", format!("{len} bytes")));
            }
            let value = self.bytes(len)?.to_vec();
            let required = flags & 1 == 1;
            if required && !KNOWN_TAGS.contains(&tag) {
                return Err(DecodeError::UnsupportedFeature(format!(
                    "required extension {tag}"
                )));
            }
            out.push(Extension {
                tag,
                required,
                value,
            });
        }
        Ok(out)
    }
}
