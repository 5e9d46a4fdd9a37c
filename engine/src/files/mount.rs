//! `sbk mount`: snapshots as a read-only FUSE filesystem. The root holds one folder per
//! snapshot; each holds `disk.img` (the whole disk), `partN.img` (each partition), and `partN/`
//! (each filesystem sbk reads, as a tree). So `cp`, `rsync`, `diff` and a loop mount all work,
//! as any user, with every chunk verified as it is read.
//!
//! Inode numbers are handed out as names are looked up and kept until unmount (a tree listed
//! whole costs a few dozen bytes per name). Nothing here writes: opening for writing is EROFS.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use sbk_diskfs::{Disk, Filesystem, Kind, Node, Time, Xattrs};

use super::SnapshotFiles;
use crate::serve::OpenGuard;

/// How long the kernel may keep what it was told: a snapshot never changes.
const TTL: Duration = Duration::from_secs(3600);
/// Directory listings kept for the lookups that follow a listing.
const LISTINGS_KEPT: usize = 64;
/// Names those listings hold at most, together.
const NAMES_KEPT: usize = 200_000;

/// A directory's entries: (inode, type, name).
type Listing = Arc<Vec<(u64, FileType, Vec<u8>)>>;

/// One snapshot, open and pinned for as long as it is mounted.
pub struct MountedSnapshot {
    /// The folder's name (the snapshot's id).
    pub name: String,
    /// Its disk.
    pub files: SnapshotFiles,
    /// Keeps it pinned against prune.
    pub guard: OpenGuard,
    /// Its time (the folders' mtime).
    pub time: SystemTime,
}

struct Snap {
    m: MountedSnapshot,
    /// Partition numbers with their filesystem, where sbk reads it.
    parts: Vec<(u32, Option<Box<dyn Filesystem>>)>,
}

/// What an inode is.
#[derive(Clone)]
enum What {
    Root,
    Snapshot(usize),
    Disk(usize),
    Partition(usize, u32),
    /// A node of snapshot `.0`'s partition `.1`'s filesystem.
    Node(usize, u32, Node),
}

#[derive(Default)]
struct Inodes {
    list: Vec<What>,
    by_node: HashMap<(usize, u32, u64), u64>,
}

/// The mounted filesystem.
pub struct SnapshotsFs {
    snaps: Vec<Snap>,
    inodes: Mutex<Inodes>,
    listings: Mutex<HashMap<u64, Listing>>,
    uid: u32,
    gid: u32,
    log: Box<dyn Fn(&str) + Send + Sync>,
}

fn system_time(t: Time) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

impl SnapshotsFs {
    /// A filesystem of `snapshots`, owned (its folders and images) by `uid`:`gid`; `log`
    /// gets what fails (a damaged chunk under a read).
    pub fn new(
        snapshots: Vec<MountedSnapshot>,
        uid: u32,
        gid: u32,
        log: Box<dyn Fn(&str) + Send + Sync>,
    ) -> SnapshotsFs {
        let mut inodes = Inodes::default();
        inodes.list.push(What::Root);
        let snaps: Vec<Snap> = snapshots
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                inodes.list.push(What::Snapshot(i));
                inodes.list.push(What::Disk(i));
                let parts = m
                    .files
                    .partitions()
                    .into_iter()
                    .filter(|p| !p.partition.extended)
                    .map(|p| {
                        let n = p.partition.number;
                        inodes.list.push(What::Partition(i, n));
                        (n, m.files.filesystem(n).ok())
                    })
                    .collect();
                Snap { m, parts }
            })
            .collect();
        SnapshotsFs {
            snaps,
            inodes: Mutex::new(inodes),
            listings: Mutex::new(HashMap::new()),
            uid,
            gid,
            log,
        }
    }

    fn what(&self, ino: INodeNo) -> Option<What> {
        let i = u64::from(ino).checked_sub(1)? as usize;
        let g = self.inodes.lock().expect("no thread panics holding this");
        g.list.get(i).cloned()
    }

    /// The inode of a fixed entry (made at start, found by what it is).
    fn fixed(&self, want: impl Fn(&What) -> bool) -> Option<u64> {
        let g = self.inodes.lock().expect("no thread panics holding this");
        g.list.iter().position(want).map(|i| i as u64 + 1)
    }

    /// The inode of a filesystem node, handed out on first sight.
    fn node_ino(&self, s: usize, p: u32, n: &Node) -> u64 {
        let mut g = self.inodes.lock().expect("no thread panics holding this");
        if let Some(&ino) = g.by_node.get(&(s, p, n.id)) {
            return ino;
        }
        g.list.push(What::Node(s, p, n.clone()));
        let ino = g.list.len() as u64;
        g.by_node.insert((s, p, n.id), ino);
        ino
    }

    fn fs(&self, s: usize, p: u32) -> Option<&dyn Filesystem> {
        self.snaps[s]
            .parts
            .iter()
            .find(|(n, _)| *n == p)
            .and_then(|(_, f)| f.as_deref())
    }

    fn dir_attr(&self, ino: u64, time: SystemTime) -> FileAttr {
        self.attr(ino, FileType::Directory, 0o555, 0, time)
    }

    fn attr(&self, ino: u64, kind: FileType, perm: u16, size: u64, time: SystemTime) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// An image of snapshot `s`: read-only, dated as the snapshot.
    fn image_attr(&self, ino: u64, s: usize, size: u64) -> FileAttr {
        let time = self.snaps[s].m.time;
        self.attr(ino, FileType::RegularFile, 0o444, size, time)
    }

    fn node_attr(&self, ino: u64, n: &Node) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: system_time(n.atime),
            mtime: system_time(n.mtime),
            ctime: system_time(n.mtime),
            crtime: system_time(n.mtime),
            kind: file_type(n.kind),
            perm: (n.perm & 0o7777) as u16,
            nlink: n.links.max(1),
            uid: n.uid,
            gid: n.gid,
            rdev: (n.rdev.0 << 8) | (n.rdev.1 & 0xFF) | ((n.rdev.1 & !0xFF) << 12),
            blksize: 4096,
            flags: 0,
        }
    }

    /// The attributes of inode `ino`.
    fn getattr_of(&self, ino: u64) -> Option<FileAttr> {
        Some(match self.what(INodeNo(ino))? {
            What::Root => self.dir_attr(ino, SystemTime::now()),
            What::Snapshot(s) => self.dir_attr(ino, self.snaps[s].m.time),
            What::Disk(s) => {
                let size = self.snaps[s].m.files.disk().size();
                self.image_attr(ino, s, size)
            }
            What::Partition(s, p) => {
                let size = self.snaps[s].m.files.partition(p).map_or(0, |d| d.size());
                self.image_attr(ino, s, size)
            }
            What::Node(_, _, n) => self.node_attr(ino, &n),
        })
    }

    /// The entries of directory `ino`: (inode, type, name); the last listings are kept, as
    /// `ls -l` looks each name up right after listing them.
    fn entries(&self, ino: u64) -> Result<Listing, Errno> {
        if let Some(l) = self
            .listings
            .lock()
            .expect("no thread panics holding this")
            .get(&ino)
        {
            return Ok(l.clone());
        }
        let l = Arc::new(self.list(ino)?);
        let mut g = self.listings.lock().expect("no thread panics holding this");
        // Bounded by names, not listings: 64 huge directories must not stay in memory.
        let held: usize = g.values().map(|l| l.len()).sum();
        if g.len() >= LISTINGS_KEPT || held + l.len() > NAMES_KEPT {
            g.clear();
        }
        if l.len() <= NAMES_KEPT {
            g.insert(ino, l.clone());
        }
        Ok(l)
    }

    fn list(&self, ino: u64) -> Result<Vec<(u64, FileType, Vec<u8>)>, Errno> {
        let what = self.what(INodeNo(ino)).ok_or(Errno::ENOENT)?;
        let mut out = Vec::new();
        match what {
            What::Root => {
                for (s, snap) in self.snaps.iter().enumerate() {
                    let i = self.fixed(|w| matches!(w, What::Snapshot(x) if *x == s));
                    out.push((
                        i.ok_or(Errno::EIO)?,
                        FileType::Directory,
                        snap.m.name.clone().into_bytes(),
                    ));
                }
            }
            What::Snapshot(s) => {
                let disk = self
                    .fixed(|w| matches!(w, What::Disk(x) if *x == s))
                    .ok_or(Errno::EIO)?;
                out.push((disk, FileType::RegularFile, b"disk.img".to_vec()));
                for (p, fs) in &self.snaps[s].parts {
                    let (p, s2) = (*p, s);
                    let img = self
                        .fixed(|w| matches!(w, What::Partition(x, y) if *x == s2 && *y == p))
                        .ok_or(Errno::EIO)?;
                    out.push((
                        img,
                        FileType::RegularFile,
                        format!("part{p}.img").into_bytes(),
                    ));
                    if let Some(fs) = fs {
                        let root = fs
                            .root()
                            .map_err(|e| self.fail(&format!("partition {p}"), e))?;
                        out.push((
                            self.node_ino(s, p, &root),
                            FileType::Directory,
                            format!("part{p}").into_bytes(),
                        ));
                    }
                }
            }
            What::Node(s, p, n) => {
                let fs = self.fs(s, p).ok_or(Errno::EIO)?;
                if n.kind != Kind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                for e in fs.read_dir(&n).map_err(|e| self.fail("a directory", e))? {
                    // A name no path can hold is not shown (a damaged or hostile image).
                    if e.name.is_empty() || e.name.contains(&b'/') || e.name.contains(&0) {
                        continue;
                    }
                    out.push((self.node_ino(s, p, &e.node), file_type(e.node.kind), e.name));
                }
            }
            What::Disk(_) | What::Partition(..) => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    /// Runs one request's work, turning a panic in a filesystem reader (a hostile image that
    /// found a bug) into EIO for that request: the mount goes on.
    fn caught<T>(&self, f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
            (self.log)(
                "a filesystem reader failed (a damaged filesystem); that read fails with EIO",
            );
            Err(Errno::EIO)
        })
    }

    fn fail(&self, what: &str, e: sbk_diskfs::FsError) -> Errno {
        (self.log)(&format!("{what}: {e}"));
        Errno::EIO
    }

    /// Reads `size` bytes at `offset` of a whole-disk or partition image.
    fn read_image(&self, d: &Disk, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let end = offset.saturating_add(u64::from(size)).min(d.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        d.read_exact_at(offset, &mut buf).map_err(|e| {
            (self.log)(&format!("reading byte {offset}: {e}"));
            Errno::EIO
        })?;
        Ok(buf)
    }

    fn xattrs_of(&self, ino: INodeNo) -> Result<Xattrs, Errno> {
        match self.what(ino).ok_or(Errno::ENOENT)? {
            What::Node(s, p, n) => {
                let fs = self.fs(s, p).ok_or(Errno::EIO)?;
                fs.xattrs(&n)
                    .map_err(|e| self.fail("extended attributes", e))
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// Replies with `bytes`, or with their size when `size` is 0, or ERANGE when they do not fit.
fn reply_sized(reply: ReplyXattr, size: u32, bytes: &[u8]) {
    if size == 0 {
        reply.size(bytes.len() as u32);
    } else if bytes.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(bytes);
    }
}

impl fuser::Filesystem for SnapshotsFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.caught(|| {
            let list = self.entries(u64::from(parent))?;
            let (ino, _, _) = list
                .iter()
                .find(|(_, _, n)| n.as_slice() == name.as_bytes())
                .ok_or(Errno::ENOENT)?;
            self.getattr_of(*ino).ok_or(Errno::EIO)
        });
        match found {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.caught(|| self.getattr_of(u64::from(ino)).ok_or(Errno::ENOENT)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = self.caught(|| match self.what(ino) {
            Some(What::Node(s, p, n)) if n.kind == Kind::Symlink => {
                let fs = self.fs(s, p).ok_or(Errno::EIO)?;
                fs.read_link(&n)
                    .map_err(|e| self.fail("a symbolic link", e))
            }
            _ => Err(Errno::EINVAL),
        });
        match target {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let got = self.caught(|| match self.what(ino) {
            Some(What::Disk(s)) => self.read_image(self.snaps[s].m.files.disk(), offset, size),
            Some(What::Partition(s, p)) => match self.snaps[s].m.files.partition(p) {
                Some(d) => self.read_image(&d, offset, size),
                None => Err(Errno::EIO),
            },
            Some(What::Node(s, p, n)) if n.kind == Kind::File => {
                let fs = self.fs(s, p).ok_or(Errno::EIO)?;
                let f = fs.open(&n).map_err(|e| self.fail("a file", e))?;
                let mut buf = vec![0u8; size as usize];
                let k = f
                    .read_at(offset, &mut buf)
                    .map_err(|e| self.fail("a file", e))?;
                buf.truncate(k);
                Ok(buf)
            }
            _ => Err(Errno::EINVAL),
        });
        match got {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.caught(|| self.entries(u64::from(ino))) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let dots = [
            (u64::from(ino), FileType::Directory, b".".to_vec()),
            (u64::from(ino), FileType::Directory, b"..".to_vec()),
        ];
        for (i, (ino, kind, name)) in dots
            .iter()
            .chain(list.iter())
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = self.caught(|| {
            let x = self.xattrs_of(ino)?;
            x.into_iter()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .map(|(_, v)| v)
                .ok_or(Errno::ENODATA)
        });
        match value {
            Ok(v) => reply_sized(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.caught(|| self.xattrs_of(ino)) {
            Ok(x) => {
                let names: Vec<u8> = x
                    .iter()
                    .flat_map(|(k, _)| k.iter().copied().chain([0]))
                    .collect();
                reply_sized(reply, size, &names);
            }
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted [`SnapshotsFs`]; [`Mounted::unmount`] ends it.
pub struct Mounted {
    session: fuser::BackgroundSession,
}

impl Mounted {
    /// Mounts `fs` on `dir`, read-only, for the mounting user only, with the kernel checking
    /// each node's mode and owner (`default_permissions`).
    pub fn mount(fs: SnapshotsFs, dir: &std::path::Path) -> std::io::Result<Mounted> {
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("sbk".into()),
            fuser::MountOption::Subtype("sbk".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        Ok(Mounted {
            session: fuser::spawn_mount(fs, dir, &cfg)?,
        })
    }

    /// True once the filesystem was unmounted from outside (`fusermount3 -u`, `umount`).
    pub fn ended(&self) -> bool {
        self.session.guard.is_finished()
    }
}

impl Mounted {
    /// Unmounts (unless that was done from outside) and waits for the filesystem to be
    /// dropped, so that the snapshots it pinned are unpinned before this returns.
    pub fn unmount(self) -> std::io::Result<()> {
        if self.ended() {
            self.session.join()
        } else {
            self.session.umount_and_join()
        }
    }
}
