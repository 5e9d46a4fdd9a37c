//! `sbk extract`: files and trees out of a snapshot's filesystem, written under a target
//! directory and never outside it.
//!
//! Everything is created relative to directory descriptors this process opened itself
//! (`openat`, `mkdirat`, `symlinkat` with `O_NOFOLLOW`/`O_EXCL`): a name from the image is one
//! path component or it is refused, a symbolic link the image holds is written as a link and
//! never followed, and a hard link's source is reopened beneath the target with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`. The filesystem being read belongs to whoever owned
//! the disk: its names and links are as hostile as any input.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use sbk_diskfs::{lookup, Filesystem, Kind, Node, Time};

use crate::{EngineError, Result};

/// Bytes of a file read and written at once.
const COPY_PIECE: usize = 1 << 20;

/// How to extract.
#[derive(Debug, Clone, Default)]
pub struct ExtractOptions {
    /// Replace what is already in the target under the names being written.
    pub force: bool,
    /// Give files their owners (only root can).
    pub owners: bool,
}

/// What an extraction wrote and what it could not.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExtractReport {
    /// Regular files written.
    pub files: u64,
    /// Directories written.
    pub dirs: u64,
    /// Symbolic links written.
    pub symlinks: u64,
    /// Names written as hard links of a file written before.
    pub hard_links: u64,
    /// Devices and named pipes written.
    pub specials: u64,
    /// Bytes of file data written (holes and zeros not counted).
    pub bytes: u64,
    /// What could not be extracted because the image is damaged there (a damaged chunk, a
    /// broken structure, an unsafe name), each with why; the rest went on.
    pub failed: Vec<String>,
    /// What was left out on purpose (sockets, devices when not root, attributes the target
    /// filesystem refuses), each with why.
    pub skipped: Vec<String>,
}

/// Extracts `path` (absolute, in `fs`) under `target`: a file or tree named by its last
/// component (`/etc` writes `target/etc`), or for `/` the root directory's entries.
pub fn extract(
    fs: &dyn Filesystem,
    path: &str,
    target: &Path,
    opts: &ExtractOptions,
    report: &mut ExtractReport,
) -> Result<()> {
    let node = lookup(fs, path.as_bytes(), false).map_err(|e| EngineError::from_fs(path, e))?;
    let target_err = |source| EngineError::Target {
        path: target.to_owned(),
        source,
    };
    if target.symlink_metadata().is_ok_and(|m| !m.is_dir()) && !target.is_dir() {
        return Err(EngineError::TargetUnusable {
            path: target.to_owned(),
            reason: "it is not a directory".into(),
        });
    }
    if !target.exists() {
        // Made for the owner only: until the operator looks, what a guest's disk held (set-uid
        // programs, when root restores owners and modes) is no one else's to run.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(target)
            .map_err(target_err)?;
    }
    let root = rustix::fs::open(
        target,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| target_err(e.into()))?;
    let root_id = fs.root().map_err(|e| EngineError::from_fs(path, e))?.id;
    let what: Vec<(Vec<u8>, Node)> = if node.id == root_id && node.kind == Kind::Dir {
        fs.read_dir(&node)
            .map_err(|e| EngineError::from_fs(path, e))?
            .into_iter()
            .map(|e| (e.name, e.node))
            .collect()
    } else {
        let name = path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .ok_or_else(|| EngineError::NoSuchFile {
                path: path.to_owned(),
                why: "name the file or directory itself (a path that ends in . or .. names none)"
                    .into(),
            })?;
        vec![(name.as_bytes().to_vec(), node)]
    };
    if !opts.force {
        for (name, _) in &what {
            if exists(root.as_fd(), name) {
                return Err(EngineError::TargetExists {
                    path: target.join(String::from_utf8_lossy(name).as_ref()),
                });
            }
        }
    }
    let mut w = Writer {
        fs,
        opts,
        report,
        root: root.as_fd(),
        target,
        links: HashMap::new(),
        dirs_seen: HashSet::new(),
    };
    let mut written = HashSet::new();
    for (name, node) in what {
        w.node(root.as_fd(), b"", &name, &node, &mut written)?;
    }
    Ok(())
}

fn exists(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
}

/// Directories deep that `remove_at` goes before it gives up (a tree deeper than this was not
/// made by hand; each level holds a descriptor).
const MAX_REMOVE_DEPTH: usize = 256;

/// Removes `name` from `dir`: a file or link by unlinking it, a directory by emptying it
/// through a descriptor opened with O_NOFOLLOW (so nothing outside it is touched, and no /proc
/// is needed), then removing it.
fn remove_at(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> std::io::Result<()> {
    let is_dir = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory);
    if !is_dir {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    if depth > MAX_REMOVE_DEPTH {
        return Err(std::io::Error::other("a directory tree too deep to remove"));
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let names: Vec<Vec<u8>> = rustix::fs::Dir::read_from(&fd)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    for n in names {
        remove_at(fd.as_fd(), &n, depth + 1)?;
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// A name from the image that is one path component: not empty, not `.` or `..`, no `/` or NUL.
fn safe_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

struct Writer<'a> {
    fs: &'a dyn Filesystem,
    opts: &'a ExtractOptions,
    report: &'a mut ExtractReport,
    root: BorrowedFd<'a>,
    target: &'a Path,
    /// Files with more than one name written so far: their id → their path under the target.
    links: HashMap<u64, Vec<u8>>,
    /// Directories written so far: a directory met twice is a loop or damage.
    dirs_seen: HashSet<u64>,
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

fn ts(t: Time) -> Timespec {
    Timespec {
        tv_sec: t.secs,
        tv_nsec: i64::from(t.nanos),
    }
}

impl Writer<'_> {
    fn shown(&self, rel: &[u8]) -> String {
        self.target
            .join(String::from_utf8_lossy(rel).as_ref())
            .display()
            .to_string()
    }

    /// An error writing the target stops the whole extraction (a full disk, no permission).
    fn target_error(&self, rel: &[u8], e: impl Into<std::io::Error>) -> EngineError {
        EngineError::Target {
            path: self.target.join(String::from_utf8_lossy(rel).as_ref()),
            source: e.into(),
        }
    }

    /// Writes `node` as `name` in `dir` (`parent` is `dir`'s path under the target;
    /// `written` the names this run wrote in `dir` so far).
    fn node(
        &mut self,
        dir: BorrowedFd<'_>,
        parent: &[u8],
        name: &[u8],
        node: &Node,
        written: &mut HashSet<Vec<u8>>,
    ) -> Result<()> {
        let rel = join(parent, name);
        if !safe_name(name) {
            self.report.failed.push(format!(
                "{}: the image holds an unsafe name {:?} here; not extracted",
                self.shown(parent),
                String::from_utf8_lossy(name)
            ));
            return Ok(());
        }
        if !written.insert(name.to_vec()) {
            // Two entries of one name in one directory: a damaged (or crafted) image. The
            // first stays; the second must not replace it.
            self.report.failed.push(format!(
                "{}: a second entry of this name in one directory; not extracted",
                self.shown(&rel)
            ));
            return Ok(());
        }
        if exists(dir, name) {
            // Only --force replaces what was in the target before this run (without it the
            // names at the top were checked before anything was written).
            if !self.opts.force {
                self.report.failed.push(format!(
                    "{}: already exists (use --force to replace it)",
                    self.shown(&rel)
                ));
                return Ok(());
            }
            let keep_dir = node.kind == Kind::Dir
                && rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory);
            if !keep_dir {
                remove_at(dir, name, 0).map_err(|e| self.target_error(&rel, e))?;
            }
        }
        if node.kind != Kind::Dir && node.links > 1 {
            if let Some(first) = self.links.get(&node.id).cloned() {
                if self.hard_link(&first, dir, name).is_ok() {
                    self.report.hard_links += 1;
                    return Ok(());
                }
                // Without openat2 (Linux before 5.6) the name gets a copy of its own.
            }
        }
        match node.kind {
            Kind::Dir => self.dir(dir, &rel, name, node)?,
            Kind::File => {
                if !self.file(dir, &rel, name, node)? {
                    return Ok(());
                }
            }
            Kind::Symlink => {
                let target = match self.fs.read_link(node) {
                    Ok(t) if !t.is_empty() && !t.contains(&0) => t,
                    Ok(_) => {
                        self.report.failed.push(format!(
                            "{}: an empty or invalid link target",
                            self.shown(&rel)
                        ));
                        return Ok(());
                    }
                    Err(e) => {
                        self.report
                            .failed
                            .push(format!("{}: {e}", self.shown(&rel)));
                        return Ok(());
                    }
                };
                rustix::fs::symlinkat(target.as_slice(), dir, name)
                    .map_err(|e| self.target_error(&rel, e))?;
                self.metadata_at(dir, &rel, name, node)?;
                self.report.symlinks += 1;
            }
            Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => {
                let ft = match node.kind {
                    Kind::CharDevice => FileType::CharacterDevice,
                    Kind::BlockDevice => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if ft != FileType::Fifo && !self.opts.owners {
                    self.report.skipped.push(format!(
                        "{}: a device (only root can make one)",
                        self.shown(&rel)
                    ));
                    return Ok(());
                }
                let dev = rustix::fs::makedev(node.rdev.0, node.rdev.1);
                rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), dev)
                    .map_err(|e| self.target_error(&rel, e))?;
                self.metadata_at(dir, &rel, name, node)?;
                self.report.specials += 1;
            }
            Kind::Socket => {
                self.report.skipped.push(format!(
                    "{}: a socket (it means nothing restored)",
                    self.shown(&rel)
                ));
                return Ok(());
            }
        }
        if node.kind != Kind::Dir && node.links > 1 {
            self.links.entry(node.id).or_insert(rel);
        }
        Ok(())
    }

    /// A hard link at `name` in `dir` to the file written at `first` under the target, whose
    /// parent is reopened beneath the target without following any link.
    fn hard_link(&self, first: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<()> {
        let (parent, base) = match first.iter().rposition(|&b| b == b'/') {
            Some(i) => (&first[..i], &first[i + 1..]),
            None => (&b"."[..], first),
        };
        let p = rustix::fs::openat2(
            self.root,
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )?;
        rustix::fs::linkat(p, base, dir, name, AtFlags::empty())
    }

    fn dir(&mut self, parent: BorrowedFd<'_>, rel: &[u8], name: &[u8], node: &Node) -> Result<()> {
        if !self.dirs_seen.insert(node.id) {
            self.report.failed.push(format!(
                "{}: directory {} appears twice (a loop in the image); not extracted again",
                self.shown(rel),
                node.id
            ));
            return Ok(());
        }
        if !exists(parent, name) {
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
                .map_err(|e| self.target_error(rel, e))?;
        }
        let fd: OwnedFd = rustix::fs::openat(
            parent,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.target_error(rel, e))?;
        match self.fs.read_dir(node) {
            Ok(entries) => {
                let mut written = HashSet::new();
                for e in entries {
                    self.node(fd.as_fd(), rel, &e.name, &e.node, &mut written)?;
                }
            }
            Err(e) => self.report.failed.push(format!("{}: {e}", self.shown(rel))),
        }
        // After the entries: writing them changed the directory's times.
        self.metadata_fd(fd.as_fd(), rel, node)?;
        self.report.dirs += 1;
        Ok(())
    }

    /// Writes a regular file; false when the image failed it (reported, nothing left).
    fn file(&mut self, dir: BorrowedFd<'_>, rel: &[u8], name: &[u8], node: &Node) -> Result<bool> {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.target_error(rel, e))?;
        let out = File::from(fd);
        match self.copy(&out, rel, node) {
            Ok(bytes) => self.report.bytes += bytes,
            Err(Copy::Image(why)) => {
                drop(out);
                // Half a file must not pass for the file: it goes, the failure is reported.
                let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
                self.report
                    .failed
                    .push(format!("{}: {why}", self.shown(rel)));
                return Ok(false);
            }
            Err(Copy::Target(e)) => return Err(e),
        }
        self.metadata_fd(out.as_fd(), rel, node)?;
        self.report.files += 1;
        Ok(true)
    }

    /// Copies a file's data (its holes stay holes); the bytes written.
    fn copy(&self, out: &File, rel: &[u8], node: &Node) -> std::result::Result<u64, Copy> {
        let data = self.fs.open(node).map_err(|e| Copy::Image(e.to_string()))?;
        // A size the target cannot hold (a crafted 2^60) fails that file, not the run.
        out.set_len(node.size).map_err(|e| match e.raw_os_error() {
            Some(libc::EFBIG) | Some(libc::EINVAL) | None => Copy::Image(format!(
                "its size ({} bytes) is more than the target holds",
                node.size
            )),
            _ => Copy::Target(self.target_error(rel, e)),
        })?;
        let mut buf = vec![0u8; COPY_PIECE];
        let mut written = 0;
        for (from, to) in data.data_ranges() {
            let mut at = from;
            while at < to {
                let want = ((to - at) as usize).min(COPY_PIECE);
                let n = data
                    .read_at(at, &mut buf[..want])
                    .map_err(|e| Copy::Image(e.to_string()))?;
                if n == 0 {
                    break;
                }
                // Zeros stay holes (set_len made them): a filesystem that reports no holes
                // (FAT, NTFS) or a hostile 1 TiB of nothing costs no disk.
                if buf[..n].iter().any(|&b| b != 0) {
                    out.write_all_at(&buf[..n], at)
                        .map_err(|e| Copy::Target(self.target_error(rel, e)))?;
                    written += n as u64;
                }
                at += n as u64;
            }
        }
        Ok(written)
    }

    /// Owner, mode, attributes and times of an open file or directory.
    fn metadata_fd(&mut self, fd: BorrowedFd<'_>, rel: &[u8], node: &Node) -> Result<()> {
        // The owner first: chown clears the set-uid and set-gid bits chmod sets.
        if self.opts.owners {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(node.uid)),
                Some(rustix::fs::Gid::from_raw(node.gid)),
            )
            .map_err(|e| self.target_error(rel, e))?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(node.perm))
            .map_err(|e| self.target_error(rel, e))?;
        match self.fs.xattrs(node) {
            Ok(attrs) => {
                for (k, v) in attrs {
                    if let Err(e) =
                        rustix::fs::fsetxattr(fd, k.as_slice(), &v, rustix::fs::XattrFlags::empty())
                    {
                        self.report.skipped.push(format!(
                            "{}: attribute {} ({e})",
                            self.shown(rel),
                            String::from_utf8_lossy(&k)
                        ));
                    }
                }
            }
            Err(e) => self
                .report
                .failed
                .push(format!("{}: its attributes: {e}", self.shown(rel))),
        }
        let times = Timestamps {
            last_access: ts(node.atime),
            last_modification: ts(node.mtime),
        };
        rustix::fs::futimens(fd, &times).map_err(|e| self.target_error(rel, e))?;
        Ok(())
    }

    /// Owner and times of a link or special file, by name (a link is never followed).
    fn metadata_at(
        &mut self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        name: &[u8],
        node: &Node,
    ) -> Result<()> {
        if self.opts.owners {
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(node.uid)),
                Some(rustix::fs::Gid::from_raw(node.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.target_error(rel, e))?;
        }
        if node.kind != Kind::Symlink {
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(node.perm), AtFlags::empty())
                .map_err(|e| self.target_error(rel, e))?;
        }
        let times = Timestamps {
            last_access: ts(node.atime),
            last_modification: ts(node.mtime),
        };
        rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.target_error(rel, e))?;
        Ok(())
    }
}

/// Why a file's copy stopped.
enum Copy {
    /// The image failed (a damaged chunk, a broken structure): that file fails.
    Image(String),
    /// The target failed: the whole extraction stops.
    Target(EngineError),
}

/// Extracts every partition's whole tree of a fuzzed disk image into a fresh directory and
/// checks that nothing was written outside it: the fuzz target of a hostile disk.
pub fn fuzz_extract(data: &[u8]) {
    use std::sync::Arc;
    let disk: sbk_diskfs::Disk = Arc::new(data.to_vec());
    let Ok(table) = sbk_diskfs::partitions(&disk) else {
        return;
    };
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outer = std::env::temp_dir().join(format!("sbk-fuzz-extract-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&outer);
    if std::fs::create_dir(&outer).is_err() {
        return;
    }
    let target = outer.join("target");
    for p in &table.partitions {
        let Some(slice) = table.open(&disk, p.number) else {
            continue;
        };
        let Ok(fs) = sbk_diskfs::open_filesystem(Arc::new(slice)) else {
            continue;
        };
        let mut report = ExtractReport::default();
        let opts = ExtractOptions {
            force: true,
            owners: false,
        };
        let _ = extract(fs.as_ref(), "/", &target, &opts, &mut report);
    }
    let outside: Vec<_> = std::fs::read_dir(&outer)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&outer);
    assert!(
        outside.iter().all(|n| n == "target"),
        "written outside the target: {outside:?}"
    );
}
