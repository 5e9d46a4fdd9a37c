//! What the server serves: exports, their reads as data and holes, and the catalog that names
//! them.

use std::sync::Arc;

use crate::proto::EPERM;

/// Bytes a read answers with: owned, or a range of a buffer shared with a cache (sent from
/// there, without a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadBytes {
    /// ReadBytes of the reply's own.
    Owned(Vec<u8>),
    /// `range` of a shared buffer.
    Shared(Arc<Vec<u8>>, std::ops::Range<usize>),
}

impl ReadBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReadBytes::Owned(v) => v,
            ReadBytes::Shared(b, r) => &b[r.clone()],
        }
    }
}

/// Part of the answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPart {
    /// ReadBytes at an offset of the export.
    Data {
        /// Offset in the export.
        offset: u64,
        /// The bytes.
        data: ReadBytes,
    },
    /// Zeroes at an offset of the export.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Length.
        len: u32,
    },
}

/// Why an export could not do what it was asked: an NBD error code and a message for the client
/// (and the server's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    /// One of the protocol's error values (`proto::EIO`, ...).
    pub code: u32,
    /// What went wrong.
    pub message: String,
}

impl ExportError {
    /// An error with `code` and `message`.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        ExportError {
            code,
            message: message.into(),
        }
    }
}

/// One export: a size, reads, block status and, for a writable one, writes.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are taken.
    fn writable(&self) -> bool {
        false
    }
    /// Reads `len` bytes at `offset` (inside the export) as data and hole chunks that cover the
    /// range exactly, in any order.
    fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadPart>, ExportError>;
    /// `base:allocation` descriptors (length, `STATE_*` flags) from `offset`, covering at least
    /// the first byte and at most a little past `offset + len`.
    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, ExportError>;
    /// A hint that `offset..offset + len` will be read soon.
    fn cache(&self, _offset: u64, _len: u32) -> Result<(), ExportError> {
        Ok(())
    }
    /// Writes `data` at `offset`.
    fn write(&self, _offset: u64, _data: &[u8]) -> Result<(), ExportError> {
        Err(ExportError::new(EPERM, "the export is read-only"))
    }
    /// Writes `len` zeroes at `offset`.
    fn write_zeroes(&self, _offset: u64, _len: u32) -> Result<(), ExportError> {
        Err(ExportError::new(EPERM, "the export is read-only"))
    }
    /// Discards `offset..offset + len` (reads as zeroes after).
    fn trim(&self, _offset: u64, _len: u32) -> Result<(), ExportError> {
        Err(ExportError::new(EPERM, "the export is read-only"))
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
}

/// How a catalog names an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The canonical name.
    pub name: String,
    /// A description for humans.
    pub description: String,
}

/// The exports a server offers; asked again at every listing and every connection.
pub trait Catalog: Send + Sync {
    /// The exports, for `NBD_OPT_LIST`.
    fn list(&self) -> Result<Vec<ExportInfo>, String>;
    /// Opens the export `name` for one connection; the error says why there is none.
    fn open(&self, name: &str) -> Result<(Arc<dyn Export>, ExportInfo), String>;
}
