//! Writing a pack file around the page cache: O_DIRECT from aligned buffers, on threads of its
//! own.
//!
//! A buffered `write` copies every pack byte into the page cache: 11-19% of a first backup's
//! CPU, 18% of a changed-block incremental's, and under a memory limit (a cgroup) those dirty
//! pages compete with what the backup does read at random, the index table's Bloom filter, and
//! throttle the writer once they pass the group's dirty limit. O_DIRECT writes go from the
//! buffer to the device. They block until the device has them, so they are made on two threads
//! of the pack's own, from a small pool of buffers per repository, while the caller fills the
//! next one.
//!
//! Durability is unchanged: O_DIRECT bypasses the page cache, not the device's cache, so the
//! caller still fsyncs the file before naming it. On a filesystem without O_DIRECT (tmpfs on
//! older kernels, some FUSE filesystems) the same buffers are written through the page cache.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use memmap2::MmapMut;

/// Bytes per write: large enough that a 32 MiB pack takes 32 writes, small enough that the
/// buffers of a pack in flight stay a few MiB.
const BLOCK: usize = 1 << 20;

/// O_DIRECT's alignment of buffer addresses, file offsets and lengths: the 4096-byte sector of
/// modern disks (a multiple of the 512 bytes of older ones). Buffers are mappings, page-aligned.
const ALIGN: usize = 4096;

/// Threads writing one file: two writes in flight reach 1.6 GB/s on this project's test VM
/// where one reached 1.1 (a synchronous write waits out the device's latency).
const WRITERS: usize = 2;

/// Blocks one pack may have handed to its threads and not seen written: one being written by
/// each thread and one waiting. The pack's writer waits for the oldest beyond that: this is the
/// back-pressure the page cache's dirty limit gave buffered writes.
const IN_FLIGHT: usize = WRITERS + 1;

/// Free buffers a repository keeps for its next packs. Measured (docs/benchmarks.md): 4 stalled
/// the writer at pack boundaries, 8 wrote no faster than 6 and took 2 MiB more; 512 KiB buffers
/// wrote slower (two writes in flight reached 1.4 GB/s).
const POOL: usize = 6;

/// The free write buffers of one repository's packs, reused (a new mapping per pack would fault
/// in every page of it again). Taking one never waits, so no seal can wait on a buffer that a
/// pack queued behind it holds: a pack bounds its own buffers ([`IN_FLIGHT`] plus the one it
/// fills), and the packer bounds the packs open at once.
pub(super) struct Buffers {
    free: Mutex<Vec<MmapMut>>,
}

impl Buffers {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Buffers {
            free: Mutex::new(Vec::new()),
        })
    }

    /// A free buffer, or a new one.
    fn take(&self) -> io::Result<MmapMut> {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match free {
            Some(b) => Ok(b),
            None => MmapMut::map_anon(BLOCK),
        }
    }

    /// Keeps `b` for the next pack, or unmaps it when [`POOL`] are kept already.
    fn give(&self, b: MmapMut) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL {
            free.push(b);
        }
    }
}

/// A buffer handed to the writing threads: its first `len` bytes go to the file at `at`.
struct Block {
    buf: MmapMut,
    len: usize,
    at: u64,
}

/// Appends to a new file through O_DIRECT where the filesystem has it.
///
/// Dropped unfinished (an abandoned pack), it gives its buffer back, closes the threads' queue
/// and leaves them to finish the writes they have into a file its owner removes. After a
/// failure every call fails: the file has a hole.
pub(super) struct DirectWriter {
    file: Arc<File>,
    direct: bool,
    buffers: Arc<Buffers>,
    /// The buffer being filled, and how much of it is.
    buf: Option<MmapMut>,
    filled: usize,
    /// File offset of the buffer's first byte.
    at: u64,
    /// Blocks handed to the threads whose outcome has not been taken yet.
    out: usize,
    writing: Option<Writing>,
    /// Set once a write or a hand-over failed: the file has a hole, and nothing more may be
    /// written to it or claim it whole.
    broken: bool,
}

/// The writing threads and their two queues.
struct Writing {
    to_disk: Sender<Block>,
    back: Receiver<io::Result<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl DirectWriter {
    /// Writes `file`, which must be new and empty, through O_DIRECT when its filesystem allows,
    /// from `buffers`.
    pub(super) fn new(file: File, buffers: Arc<Buffers>) -> Self {
        let direct = set_direct(&file, true).is_ok();
        DirectWriter {
            file: Arc::new(file),
            direct,
            buffers,
            buf: None,
            filled: 0,
            at: 0,
            out: 0,
            writing: None,
            broken: false,
        }
    }

    /// Appends `bytes`; fails with the error of an earlier write that failed, and after any
    /// failure.
    pub(super) fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.check()?;
        let r = self.append(bytes);
        self.broken |= r.is_err();
        r
    }

    fn check(&self) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other("an earlier write of this pack failed"));
        }
        Ok(())
    }

    fn append(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.buf.is_none() {
                while self.out >= IN_FLIGHT {
                    self.wait_one()?;
                }
                self.buf = Some(self.buffers.take()?);
            }
            let buf = self.buf.as_mut().expect("filled just above");
            let n = bytes.len().min(BLOCK - self.filled);
            buf[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BLOCK {
                self.submit(BLOCK)?;
            }
            // Outcomes of writes done meanwhile: a failure shows at the next write, not only at
            // the end.
            self.take_done()?;
        }
        Ok(())
    }

    /// Writes what is left and waits for every write. Returns the file, whole but not yet
    /// synced: the caller fsyncs it.
    pub(super) fn finish(mut self) -> io::Result<File> {
        self.check()?;
        let len = self.at + self.filled as u64;
        let padded = if self.filled.is_multiple_of(ALIGN) || !self.direct {
            self.filled
        } else {
            // O_DIRECT writes whole sectors: the last one goes out padded with zeros and the
            // file is cut back to its length below.
            let p = self.filled.next_multiple_of(ALIGN);
            self.buf.as_mut().expect("bytes are being filled")[self.filled..p].fill(0);
            p
        };
        let mut failed = if padded > 0 {
            self.submit(padded)
        } else {
            Ok(())
        };
        if let Some(w) = self.writing.take() {
            // Closed first: the threads end once the queue is empty, so that a wait below ends
            // even if one of them died with a block.
            drop(w.to_disk);
            for _ in 0..self.out {
                failed = failed.and(w.back.recv().unwrap_or_else(|_| Err(ended())));
            }
            self.out = 0;
            for t in w.threads {
                let _ = t.join();
            }
        }
        failed?;
        if self.file.metadata()?.len() != len {
            self.file.set_len(len)?;
        }
        let file = self.file.clone();
        drop(self);
        Arc::try_unwrap(file)
            .map_err(|_| io::Error::other("a pack writer's thread still holds the file"))
    }

    /// Hands the current buffer's first `len` bytes to the writing threads.
    fn submit(&mut self, len: usize) -> io::Result<()> {
        if self.writing.is_none() {
            self.writing = Some(self.start()?);
        }
        let w = self.writing.as_ref().expect("started just above");
        let block = Block {
            buf: self.buf.take().expect("a buffer is being filled"),
            len,
            at: self.at,
        };
        // The threads take blocks until the queue closes, whatever they meet.
        if let Err(e) = w.to_disk.send(block) {
            self.buffers.give(e.0.buf);
            return Err(ended());
        }
        self.at += self.filled as u64;
        self.filled = 0;
        self.out += 1;
        Ok(())
    }

    /// Takes the outcomes of the writes done so far; the first failure among them.
    fn take_done(&mut self) -> io::Result<()> {
        let Some(w) = &self.writing else {
            return Ok(());
        };
        let mut r = Ok(());
        while let Ok(done) = w.back.try_recv() {
            self.out -= 1;
            r = r.and(done);
        }
        r
    }

    /// Waits for one more write to be done; its outcome.
    fn wait_one(&mut self) -> io::Result<()> {
        let w = self.writing.as_ref().expect("blocks were handed out");
        self.out -= 1;
        w.back.recv().unwrap_or_else(|_| Err(ended()))
    }

    fn start(&self) -> io::Result<Writing> {
        let (to_disk, blocks) = channel::<Block>();
        let blocks = Arc::new(Mutex::new(blocks));
        let (done, back) = channel();
        let mut threads = Vec::with_capacity(WRITERS);
        for _ in 0..WRITERS {
            let (file, blocks, done) = (self.file.clone(), blocks.clone(), done.clone());
            let (buffers, direct) = (self.buffers.clone(), self.direct);
            threads.push(
                std::thread::Builder::new()
                    .name("pack-writer".into())
                    .spawn(move || write_blocks(&file, direct, &blocks, &buffers, &done))?,
            );
        }
        Ok(Writing {
            to_disk,
            back,
            threads,
        })
    }
}

fn ended() -> io::Error {
    io::Error::other("the pack writer's threads ended")
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.buffers.give(b);
        }
    }
}

/// A writing thread: writes each block it takes where it belongs, gives its buffer back and
/// says how it went, until the queue closes. After a write of its own failed it writes no more
/// (the writer fails from then on, and its file is abandoned) but still gives every buffer back.
fn write_blocks(
    file: &File,
    mut direct: bool,
    blocks: &Mutex<Receiver<Block>>,
    buffers: &Buffers,
    done: &Sender<io::Result<()>>,
) {
    let mut failed = false;
    loop {
        let next = blocks.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(Block { buf, len, at }) = next else {
            return;
        };
        let mut r = if failed {
            Err(io::Error::other("an earlier write of this pack failed"))
        } else {
            file.write_all_at(&buf[..len], at)
        };
        if direct && matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            // The filesystem took the flag but not the write (a device with larger sectors):
            // through the page cache from here on, which takes any length and offset.
            direct = false;
            r = set_direct(file, false).and_then(|()| file.write_all_at(&buf[..len], at));
        }
        failed |= r.is_err();
        buffers.give(buf);
        // The writer may be gone (dropped unfinished): the buffers still come back.
        let _ = done.send(r);
    }
}

/// Sets or clears O_DIRECT on `file` (fails with EINVAL where the filesystem has no O_DIRECT).
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor that is open for the duration of the call; it reads no
    // memory of ours.
    #[allow(unsafe_code)]
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let r = unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length around the block and sector edges comes back byte for byte, in writes of
    /// odd sizes, with the file exactly as long as what was written.
    #[test]
    fn writes_come_back_whole() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let buffers = Buffers::new();
        for (i, len) in [
            0,
            1,
            4095,
            4096,
            4097,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK + 12_345,
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("f{i}"));
            let data: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
            let mut w = DirectWriter::new(File::create(&path).unwrap(), buffers.clone());
            for piece in data.chunks(77_777) {
                w.write_all(piece).unwrap();
            }
            let f = w.finish().unwrap();
            f.sync_all().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}");
        }
    }

    /// Writers dropped unfinished give their buffers back, and the repository keeps at most
    /// [`POOL`] of them.
    #[test]
    fn abandoned_writers_give_their_buffers_back() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let buffers = Buffers::new();
        let data = vec![5u8; BLOCK + 10];
        for i in 0..3 * POOL {
            let f = File::create(dir.path().join(format!("a{i}"))).unwrap();
            let mut w = DirectWriter::new(f, buffers.clone());
            w.write_all(&data).unwrap();
        }
        // The threads of the abandoned writers give the rest back as they finish.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let kept = buffers.free.lock().unwrap().len();
        assert!((1..=POOL).contains(&kept), "{kept} buffers kept");
    }

    /// Packs waiting to be sealed each hold the buffer they were filling; sealing another pack
    /// whose trailer needs a new buffer still goes on (a bounded pool that made it wait for
    /// them hung a backup of several sources: each source's flush parks a pack).
    #[test]
    fn a_seal_never_waits_for_parked_packs() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let buffers = Buffers::new();
        let mut parked: Vec<_> = (0..2 * POOL)
            .map(|i| {
                let f = File::create(dir.path().join(format!("p{i}"))).unwrap();
                let mut w = DirectWriter::new(f, buffers.clone());
                w.write_all(&[i as u8; 100]).unwrap();
                w
            })
            .collect();
        let path = dir.path().join("sealed");
        let mut w = DirectWriter::new(File::create(&path).unwrap(), buffers.clone());
        let mut whole = vec![9u8; BLOCK];
        w.write_all(&whole).unwrap();
        w.write_all(b"trailer").unwrap();
        whole.extend_from_slice(b"trailer");
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        for (i, w) in parked.drain(..).enumerate() {
            w.finish().unwrap();
            assert_eq!(
                std::fs::read(dir.path().join(format!("p{i}"))).unwrap(),
                vec![i as u8; 100]
            );
        }
    }

    /// A write that fails (a full disk) fails the writer, not later but at a write or at
    /// finish, and nothing claims the file is whole.
    #[test]
    fn a_failed_write_fails_the_writer() {
        // /dev/full takes no byte: every write fails with ENOSPC.
        let full = File::options().write(true).open("/dev/full").unwrap();
        let buffers = Buffers::new();
        let mut w = DirectWriter::new(full, buffers.clone());
        let block = vec![7u8; BLOCK];
        // A pack with IN_FLIGHT blocks out waits for the oldest before it fills another.
        let e = (0..IN_FLIGHT + 2)
            .find_map(|_| w.write_all(&block).err())
            .expect("the failure shows within IN_FLIGHT + 2 blocks");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        // From then on the writer fails: its file has a hole.
        assert!(w.write_all(b"more").is_err());
        assert!(w.finish().is_err());
    }
}
