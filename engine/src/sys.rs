//! The few system calls std does not wrap: block-device ioctls, SEEK_DATA/SEEK_HOLE,
//! posix_fadvise and one allocator setting. Each is a thin, checked wrapper; this is the only
//! module of the engine with `unsafe`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`: the size of a block device in bytes. The libc
/// crate does not export it; this is its value on the generic ioctl layout (x86, arm, riscv).
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::c_ulong = 0x4008_1272;

/// Size of the block device open as `f`, from the `BLKGETSIZE64` ioctl.
pub fn block_device_size(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live u64.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical block size of the block device open as `f` (`BLKSSZGET`): the O_DIRECT alignment.
pub fn logical_block_size(f: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live c_int.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            libc::BLKSSZGET as _,
            &mut size as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size as u32)
}

fn lseek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek takes plain integers and touches no memory of ours.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after the offset, i.e. past the last extent.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Start of the first data extent at or after `offset`, or `None` when only holes follow.
pub fn seek_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(f, offset, libc::SEEK_DATA)
}

/// Start of the first hole at or after `offset` (the end of the file counts as a hole).
pub fn seek_hole(f: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(f, offset, libc::SEEK_HOLE)
}

/// Tells the kernel the range will not be read again, so buffered reads of a large source do
/// not push the rest of the machine's page cache out.
pub fn drop_cache(f: &File, offset: u64, len: u64) {
    // SAFETY: posix_fadvise takes plain integers. Its result is advisory and ignored: failing
    // to drop cache pages is harmless.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// The memory page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes an integer name and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Deallocates `offset..offset + len` of a file, which then reads as zeroes (a trim or write of
/// zeroes to an overlay costs no space and no writing).
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes plain integers and touches no memory of ours.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes allocations of 1 MiB and more (part buffers, blobs of large chunks, pack and restore
/// buffers) go straight to the kernel and back. glibc's default raises that threshold to the
/// size of each large block freed, after which such blocks come from per-thread arenas; blobs
/// made on one thread and freed on another then leave arenas holding freed memory: a first
/// backup with 4 MiB chunks peaked at 137-149 MiB of RSS, 125-127 MiB with this, in the same
/// time. Smaller allocations, the bulk of them, are untouched. Call it first thing in `main`.
pub fn large_allocations_from_the_kernel() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a glibc tunable; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
