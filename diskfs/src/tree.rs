//! What every filesystem reader offers: nodes, directories, symbolic links, file data with its
//! holes, extended attributes; and path lookup over them.

use crate::detect::{detect, FsKind};
use crate::{Disk, FsError, Result};

/// A file's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl Kind {
    /// One letter, as `ls -l` shows it.
    pub fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::CharDevice => 'c',
            Kind::BlockDevice => 'b',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
        }
    }

    /// Its name, as `--json` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::CharDevice => "char",
            Kind::BlockDevice => "block",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// A point in time: seconds since the Unix epoch and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Time {
    /// Seconds since 1970-01-01 UTC (negative before).
    pub secs: i64,
    /// Nanoseconds, below 10^9.
    pub nanos: u32,
}

/// A file, directory or other node of a filesystem, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its number in the filesystem (the inode number on ext): two names with one id are hard
    /// links of one file.
    pub id: u64,
    /// Its type.
    pub kind: Kind,
    /// Permission bits, with set-uid, set-gid and sticky (`mode & 0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Bytes (a symbolic link: its target's length).
    pub size: u64,
    /// Last modification.
    pub mtime: Time,
    /// Last access.
    pub atime: Time,
    /// How many names it has.
    pub links: u32,
    /// A device's major and minor numbers.
    pub rdev: (u32, u32),
}

/// One name in a directory.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name's bytes, as stored (never `.` or `..`; a reader does not judge the rest).
    pub name: Vec<u8>,
    /// What it names.
    pub node: Node,
}

/// Extended attributes: (name, value) pairs, names as `getxattr` takes them.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A regular file's contents, open for reading.
pub trait FileData {
    /// Byte ranges that hold data, in order; the rest of the file reads as zeros (holes).
    fn data_ranges(&self) -> Vec<(u64, u64)>;
    /// Reads up to `buf.len()` bytes at `offset` (fewer only at the end of the file).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize>;
}

/// The data ranges of a file with no holes.
pub(crate) fn no_holes(size: u64) -> Vec<(u64, u64)> {
    if size == 0 {
        Vec::new()
    } else {
        vec![(0, size)]
    }
}

/// Where a read of `len` bytes at `offset` of a file of `size` bytes ends; `None` when it
/// reads nothing (at or past the end).
pub(crate) fn read_end(offset: u64, len: usize, size: u64) -> Option<u64> {
    let end = offset.saturating_add(len as u64).min(size);
    (offset < end).then_some(end)
}

/// A filesystem, read-only.
pub trait Filesystem: Send + Sync {
    /// Its kind (ext4, fat32…).
    fn kind(&self) -> FsKind;
    /// Its label, if it has one.
    fn label(&self) -> String;
    /// The root directory.
    fn root(&self) -> Result<Node>;
    /// The names in directory `dir`, in the order stored.
    fn read_dir(&self, dir: &Node) -> Result<Vec<Entry>>;
    /// A symbolic link's target.
    fn read_link(&self, link: &Node) -> Result<Vec<u8>>;
    /// A regular file's contents.
    fn open(&self, file: &Node) -> Result<Box<dyn FileData + '_>>;
    /// Extended attributes, as `getxattr` names them (`user.x`, `security.selinux`…).
    fn xattrs(&self, node: &Node) -> Result<Xattrs>;
}

/// The filesystem on `dev`, when sbk can read it; otherwise a message naming what is there.
pub fn open_filesystem(dev: Disk) -> Result<Box<dyn Filesystem>> {
    match detect(dev.as_ref()) {
        FsKind::Ext(_) => Ok(Box::new(crate::ext::Ext::open(dev)?)),
        FsKind::Fat(_) => Ok(Box::new(crate::fat::Fat::open(dev)?)),
        FsKind::Ntfs => Ok(Box::new(crate::ntfs::Ntfs::open(dev)?)),
        FsKind::Unknown => Err(FsError::Unsupported(
            "no filesystem sbk recognises here; sbk mount or sbk serve give the raw image".into(),
        )),
        other => Err(FsError::Unsupported(format!(
            "sbk cannot read {other} filesystems; sbk mount or sbk serve give the raw image to a tool that can"
        ))),
    }
}

/// Symbolic links followed while resolving one path, as Linux's limit.
const MAX_FOLLOW: usize = 40;

/// The node at `path` (absolute inside the filesystem; `.` and `..` are resolved, and
/// symbolic links on the way are followed inside the filesystem, never out of it). The last
/// component is followed too when `follow_last`.
pub fn lookup(fs: &dyn Filesystem, path: &[u8], follow_last: bool) -> Result<Node> {
    let mut stack = vec![fs.root()?];
    let mut pending: Vec<Vec<u8>> = components(path);
    pending.reverse();
    let mut follows = 0;
    let shown = || String::from_utf8_lossy(path).into_owned();
    while let Some(name) = pending.pop() {
        let dir = stack.last().expect("the root is never popped").clone();
        if name == b".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDirectory(shown()));
        }
        let found = fs
            .read_dir(&dir)?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| FsError::NotFound(shown()))?;
        let last = pending.is_empty();
        if found.node.kind == Kind::Symlink && (!last || follow_last) {
            follows += 1;
            if follows > MAX_FOLLOW {
                return Err(FsError::Damaged(format!(
                    "{}: a loop of symbolic links",
                    shown()
                )));
            }
            let target = fs.read_link(&found.node)?;
            if target.first() == Some(&b'/') {
                stack.truncate(1);
            }
            let mut more = components(&target);
            more.reverse();
            pending.extend(more);
            continue;
        }
        stack.push(found.node);
    }
    Ok(stack.pop().expect("the root is never popped"))
}

/// `path`'s components, without empty ones and `.`.
fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}
