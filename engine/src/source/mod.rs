//! Sources: block devices and disk-image files, read through O_DIRECT by data extents, and NBD
//! exports (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), read through sbk's NBD
//! client by their `base:allocation` extents; and streams (standard input, a command's output),
//! read once, front to back (see [`stream`]).

mod nbd;
mod stream;

pub use nbd::dirty_ranges;
use nbd::nbd_extents;
pub use stream::SourceSpec;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sbk_nbd::client::{Client, NbdUri};
use sbk_nbd::proto::{CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};

use crate::error::{EngineError, Result};
use crate::sys;

/// Alignment of O_DIRECT reads and of their buffers: the page size, which is a multiple of the
/// logical block size of every device sbk accepts for direct reads.
pub const ALIGN: u64 = 4096;

/// Rounds `x` down to [`ALIGN`].
pub fn align_down(x: u64) -> u64 {
    x & !(ALIGN - 1)
}

/// Rounds `x` up to [`ALIGN`].
pub fn align_up(x: u64) -> u64 {
    align_down(x + ALIGN - 1)
}

/// What kind of thing a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A regular file holding a disk image (possibly sparse).
    File,
    /// A block device.
    BlockDevice,
    /// An NBD export.
    Nbd,
    /// Standard input or a command's output, read once: its size is what was read.
    Stream,
}

/// What a source reads from.
enum Backing {
    File(File),
    /// One connection, shared by the clones of the source (reads are pipelined inside it).
    Nbd(Arc<Mutex<Client>>),
    Stream(stream::Stream),
}

/// An open source, read by positioned reads (so a shared reference could read in parallel).
pub struct Source {
    backing: Backing,
    path: PathBuf,
    kind: SourceKind,
    /// The size taken at open; for a stream, the bytes read so far.
    size: u64,
    /// Why O_DIRECT is not in use, when it is not.
    fallback: Option<String>,
    /// Test hook: reads past this offset fail with EIO (see [`FAULT_EIO_ENV`]).
    fail_after: Option<u64>,
}

/// Test hook for fault-injection tests: when this environment variable holds a byte offset, every
/// read of a source that reaches past it fails with EIO, as a failing disk would. Used by the
/// end-to-end tests because device-mapper's `error` target and FUSE are not available on every
/// test machine; it changes nothing when unset.
pub const FAULT_EIO_ENV: &str = "SBK_TEST_SOURCE_EIO_AFTER";

fn open_file(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = File::options();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl Source {
    /// Opens a block device or regular file for reading, with O_DIRECT when the filesystem and
    /// device allow it.
    pub fn open(path: &Path) -> Result<Self> {
        Source::open_with(path, &[])
    }

    /// Opens what `spec` names: a path as [`Source::open`] does, standard input, or a command
    /// started now.
    pub fn open_spec(spec: &SourceSpec) -> Result<Self> {
        let backing = match spec {
            SourceSpec::Path(p) => return Source::open(p),
            SourceSpec::Stdin => stream::Stream::stdin(),
            SourceSpec::Command(c) => {
                stream::Stream::command(c).map_err(|source| EngineError::SourceOpen {
                    path: PathBuf::from(spec.to_string()),
                    source,
                })?
            }
        };
        Ok(Source {
            backing: Backing::Stream(backing),
            path: PathBuf::from(spec.to_string()),
            kind: SourceKind::Stream,
            size: 0,
            fallback: None,
            fail_after: None,
        })
    }

    /// [`Source::open`], also selecting the metadata contexts `meta` when `path` is an NBD URI
    /// (a dirty bitmap's, say).
    pub fn open_with(path: &Path, meta: &[&str]) -> Result<Self> {
        let open_err = |source| EngineError::SourceOpen {
            path: path.to_owned(),
            source,
        };
        if let Some(uri) = path.to_str().filter(|s| NbdUri::is_uri(s)) {
            let uri = NbdUri::parse(uri).map_err(|reason| EngineError::SourceUnusable {
                path: path.to_owned(),
                reason,
            })?;
            let mut contexts = vec![CONTEXT_BASE_ALLOCATION];
            contexts.extend_from_slice(meta);
            let client = Client::connect(&uri, &contexts).map_err(open_err)?;
            return Ok(Source {
                size: client.size(),
                backing: Backing::Nbd(Arc::new(Mutex::new(client))),
                path: path.to_owned(),
                kind: SourceKind::Nbd,
                fallback: None,
                fail_after: None,
            });
        }
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            SourceKind::File
        } else if ft.is_block_device() {
            SourceKind::BlockDevice
        } else {
            let what = if ft.is_dir() {
                "it is a directory"
            } else if ft.is_char_device() {
                "it is a character device"
            } else {
                "it is not a regular file or block device"
            };
            return Err(EngineError::SourceUnusable {
                path: path.to_owned(),
                reason: format!("{what}; sbk backs up block devices and disk-image files"),
            });
        };
        let (file, mut fallback) = match open_file(path, true) {
            Ok(f) => (f, None),
            // EINVAL: the filesystem does not support O_DIRECT (ramfs, some FUSE filesystems).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                open_file(path, false).map_err(open_err)?,
                Some(format!("O_DIRECT refused at open ({e})")),
            ),
            Err(e) => return Err(open_err(e)),
        };
        let size = if kind == SourceKind::File {
            meta.len()
        } else {
            sys::block_device_size(&file).map_err(open_err)?
        };
        if kind == SourceKind::BlockDevice && fallback.is_none() {
            let lbs = sys::logical_block_size(&file).map_err(open_err)?;
            if u64::from(lbs) > ALIGN || !ALIGN.is_multiple_of(u64::from(lbs.max(1))) {
                fallback = Some(format!("logical block size {lbs} does not divide {ALIGN}"));
            }
        }
        let mut source = Source {
            backing: Backing::File(file),
            path: path.to_owned(),
            kind,
            size,
            fallback: None,
            fail_after: std::env::var(FAULT_EIO_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
        };
        if let Some(reason) = fallback {
            source.use_buffered(reason)?;
        }
        Ok(source)
    }

    fn use_buffered(&mut self, reason: String) -> Result<()> {
        let file = open_file(&self.path, false).map_err(|source| EngineError::SourceOpen {
            path: self.path.clone(),
            source,
        })?;
        self.backing = Backing::File(file);
        self.fallback = Some(reason);
        Ok(())
    }

    /// A second handle of the same open source (a duplicated descriptor, O_DIRECT or not as
    /// this one; the same NBD connection), for reads from another thread.
    pub fn try_clone(&self) -> Result<Source> {
        if let Backing::Stream(_) = self.backing {
            return Err(self.not_seekable());
        }
        Ok(Source {
            backing: match &self.backing {
                Backing::File(f) => {
                    Backing::File(f.try_clone().map_err(|source| EngineError::SourceOpen {
                        path: self.path.clone(),
                        source,
                    })?)
                }
                Backing::Nbd(c) => Backing::Nbd(c.clone()),
                Backing::Stream(_) => unreachable!("refused above"),
            },
            path: self.path.clone(),
            kind: self.kind,
            size: self.size,
            fallback: self.fallback.clone(),
            fail_after: self.fail_after,
        })
    }

    /// Size in bytes, as taken when the source was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fails with [`EngineError::SourceResized`] when the source no longer has the size it was
    /// opened with. A file truncated under the reader would otherwise read as a hole (SEEK_DATA
    /// finds nothing past its new end) and a grown one would lose its tail, both silently. An
    /// NBD export's size is fixed for the connection.
    pub fn check_size(&self) -> Result<()> {
        let file = match &self.backing {
            Backing::File(f) => f,
            Backing::Nbd(_) | Backing::Stream(_) => return Ok(()),
        };
        let now = match self.kind {
            SourceKind::BlockDevice => sys::block_device_size(file),
            _ => file.metadata().map(|m| m.len()),
        }
        .map_err(|source| EngineError::SourceOpen {
            path: self.path.clone(),
            source,
        })?;
        if now != self.size {
            return Err(EngineError::SourceResized {
                path: self.path.clone(),
                expected: self.size,
                found: now,
            });
        }
        Ok(())
    }

    /// File or block device.
    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a stream: read by [`Source::read_stream`] only, its size known at its end.
    pub fn is_stream(&self) -> bool {
        self.kind == SourceKind::Stream
    }

    fn not_seekable(&self) -> EngineError {
        EngineError::SourceUnusable {
            path: self.path.clone(),
            reason: "a stream is read once, front to back, and cannot seek".into(),
        }
    }

    /// Reads the next bytes of a stream into `buf`, to its end or the stream's: returns the
    /// bytes read, fewer than `buf.len()` only at the end.
    pub fn read_stream(&mut self, buf: &mut [u8]) -> Result<usize> {
        let Backing::Stream(s) = &mut self.backing else {
            return Err(EngineError::SourceUnusable {
                path: self.path.clone(),
                reason: "not a stream".into(),
            });
        };
        let n = s.fill(buf).map_err(|source| EngineError::SourceRead {
            path: self.path.clone(),
            offset: self.size,
            source,
        })?;
        self.size += n as u64;
        Ok(n)
    }

    /// After the last read: fails when what was read is not the whole source as it was at the
    /// start: a file or device whose size moved ([`Source::check_size`]), or a stream whose
    /// command exited non-zero (a pipe cut short looks like a smaller disk).
    pub fn finish(&mut self) -> Result<()> {
        let Backing::Stream(s) = &mut self.backing else {
            return self.check_size();
        };
        let failed = s.finish().map_err(|source| EngineError::SourceOpen {
            path: self.path.clone(),
            source,
        })?;
        match failed {
            None => Ok(()),
            Some(status) => Err(EngineError::SourceIncomplete {
                path: self.path.clone(),
                status,
            }),
        }
    }

    /// Why reads are buffered instead of O_DIRECT, if they are.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// The data extents of `range` (holes excluded), clipped to it. A block device is all data;
    /// an NBD export's holes and zero extents are what `base:allocation` says.
    pub fn data_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let start = range.start;
        let err = |source| EngineError::SourceRead {
            path: self.path.clone(),
            offset: start,
            source,
        };
        let file = match &self.backing {
            _ if self.kind == SourceKind::BlockDevice => return Ok(vec![range]),
            Backing::File(f) => f,
            Backing::Stream(_) => return Err(self.not_seekable()),
            Backing::Nbd(c) => {
                let mut c = c.lock().expect("no thread panics holding this");
                return nbd_extents(&mut c, range, CONTEXT_BASE_ALLOCATION, |flags| {
                    flags & (STATE_HOLE | STATE_ZERO) == 0
                })
                .map_err(err);
            }
        };
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let Some(data) = sys::seek_data(file, pos).map_err(err)? else {
                break;
            };
            if data >= range.end {
                break;
            }
            let hole = sys::seek_hole(file, data)
                .map_err(err)?
                .unwrap_or(range.end);
            out.push(data..hole.min(range.end));
            pos = hole;
        }
        Ok(out)
    }

    /// Fills `buf` from `offset`, which must be [`ALIGN`]ed, as must `buf`'s address; `buf`'s
    /// length is a multiple of [`ALIGN`] except that a read may end at the end of the source.
    /// Returns the bytes read (short only at the end of the source). Falls back to buffered
    /// reads, once, when the kernel refuses O_DIRECT on the first read.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if self
            .fail_after
            .is_some_and(|at| offset + buf.len() as u64 > at)
        {
            return Err(EngineError::SourceRead {
                path: self.path.clone(),
                offset,
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        if let Backing::Nbd(c) = &self.backing {
            // The export ends where it ends: the aligned buffer's tail past it stays zero.
            let n = (self.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
            let mut c = c.lock().expect("no thread panics holding this");
            c.read(offset, &mut buf[..n])
                .map_err(|source| EngineError::SourceRead {
                    path: self.path.clone(),
                    offset,
                    source,
                })?;
            buf[n..].fill(0);
            return Ok(n);
        }
        let mut done = 0;
        while done < buf.len() {
            // Looked up each time: a refused O_DIRECT read replaces the file below.
            let read = match &self.backing {
                Backing::File(file) => file.read_at(&mut buf[done..], offset + done as u64),
                Backing::Nbd(_) => unreachable!("NBD reads return above"),
                Backing::Stream(_) => return Err(self.not_seekable()),
            };
            match read {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.fallback.is_none() => {
                    self.use_buffered(format!("O_DIRECT read refused ({e})"))?;
                }
                Err(source) => {
                    return Err(EngineError::SourceRead {
                        path: self.path.clone(),
                        offset: offset + done as u64,
                        source,
                    })
                }
            }
        }
        if let (Some(_), Backing::File(file)) = (&self.fallback, &self.backing) {
            sys::drop_cache(file, offset, done as u64);
        }
        let expected = (self.size.saturating_sub(offset)).min(buf.len() as u64);
        if (done as u64) < expected {
            // It ended early: it shrank. Its size now, if it can be taken, says by how much.
            self.check_size()?;
            return Err(EngineError::SourceResized {
                path: self.path.clone(),
                expected: self.size,
                found: offset + done as u64,
            });
        }
        Ok(done)
    }

    /// Reads the segment `range` into `buf` (at least `range` long rounded up to [`ALIGN`], and
    /// aligned): data extents are read, holes between them are zeroed. Returns the bytes read
    /// from the source, or `None` when the whole segment is a hole and `buf` was not touched.
    pub fn read_segment(&mut self, range: Range<u64>, buf: &mut [u8]) -> Result<Option<u64>> {
        let extents = self.data_ranges(range.clone())?;
        if extents.is_empty() {
            return Ok(None);
        }
        let len = (range.end - range.start) as usize;
        let mut filled = 0usize; // buf[..filled] is final
        let mut read = 0u64;
        for ext in extents {
            let start = align_down(ext.start - range.start) as usize;
            let end = (align_up(ext.end - range.start) as usize).min(buf.len());
            if start < filled {
                // Two extents met inside one aligned block: it was read with the first.
                if end <= filled {
                    continue;
                }
            }
            let start = start.max(filled);
            buf[filled..start].fill(0);
            let n = self.read_at(&mut buf[start..end], range.start + start as u64)?;
            read += n as u64;
            filled = start + n;
            if n < end - start {
                break; // end of the source
            }
        }
        if filled < len {
            buf[filled..len].fill(0);
        }
        Ok(Some(read))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_file_is_read_by_extents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut f = File::create(&path).unwrap();
        f.set_len(10 << 20).unwrap();
        f.write_all_at(&[7u8; 5000], 3 << 20).unwrap();
        f.write_all_at(&[9u8; 100], (10 << 20) - 100).unwrap();
        f.flush().unwrap();
        drop(f);
        let mut s = Source::open(&path).unwrap();
        assert_eq!(s.size(), 10 << 20);
        let ranges = s.data_ranges(0..10 << 20).unwrap();
        assert!(ranges.len() >= 2, "{ranges:?}");
        assert!(
            ranges.iter().map(|r| r.end - r.start).sum::<u64>() < 1 << 20,
            "holes are not data: {ranges:?}"
        );
        let mut buf = memmap2::MmapMut::map_anon(10 << 20).unwrap();
        buf.fill(0xee);
        let read = s.read_segment(0..10 << 20, &mut buf).unwrap().unwrap();
        assert!(read < 1 << 20);
        let expected = std::fs::read(&path).unwrap();
        assert!(buf[..] == expected[..]);
        // A range inside a hole reads nothing.
        assert_eq!(s.read_segment(0..1 << 20, &mut buf).unwrap(), None);
    }

    #[test]
    fn unaligned_size_reads_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..12_345u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        let mut s = Source::open(&path).unwrap();
        let mut buf = memmap2::MmapMut::map_anon(16384).unwrap();
        assert_eq!(s.read_segment(0..12_345, &mut buf).unwrap(), Some(12_345));
        assert!(buf[..12_345] == data[..]);
    }

    #[test]
    fn directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Source::open(dir.path()),
            Err(EngineError::SourceUnusable { .. })
        ));
    }
}
