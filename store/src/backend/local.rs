//! The local backend: a repository directory on a filesystem.
//!
//! ```text
//! config                     the config object
//! keys/<name>                key objects
//! packs/<2 hex>/<name>       packs, fanned out so that no directory grows too large
//! index/<name>  snapshots/<name>  locks/<name>
//! ```
//!
//! Durability discipline (the crash model: the process can die at any instruction, the machine
//! can lose power): an object is written under a temporary name, fsynced, then given its name,
//! then its directory is fsynced. A name therefore always holds a whole, durable object.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::direct::{Buffers, DirectWriter};
use super::handles::{handle_capacity, Handles};
use super::local_staged::LocalStaged;
use super::{Backend, Kind, ObjectInfo, Staged, Written};
use crate::error::{Result, StoreError};
use crate::id::to_hex;

/// A repository in a local directory.
pub struct LocalBackend {
    root: PathBuf,
    handles: Mutex<Handles>,
    /// The write buffers of its packs.
    buffers: Arc<Buffers>,
}

pub(super) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

fn tmp_name(name: &str) -> Result<String> {
    let r = crate::id::random_bytes::<8>().map_err(|e| StoreError::io(name, e))?;
    Ok(format!(".{name}.{}.tmp", to_hex(&r)))
}

fn is_tmp(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

impl LocalBackend {
    /// The repository at `root` (which need not exist yet: see [`Backend::create`]).
    pub fn new(root: &Path) -> Self {
        LocalBackend {
            root: root.to_owned(),
            handles: Mutex::new(Handles::new(handle_capacity())),
            buffers: Buffers::new(),
        }
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of objects of `kind` named `name`.
    fn dir_of(&self, kind: Kind, name: &str) -> PathBuf {
        match kind {
            Kind::Config => self.root.clone(),
            Kind::Pack => self
                .root
                .join(kind.dir())
                .join(name.get(..2).unwrap_or("00")),
            _ => self.root.join(kind.dir()),
        }
    }

    /// The file of an object.
    pub fn path_of(&self, kind: Kind, name: &str) -> PathBuf {
        self.dir_of(kind, name).join(name)
    }

    /// Calls `f` with each directory entry of a kind's objects (not `config`), and its name,
    /// leaving out objects being written and what is not a file. The entry's type comes with
    /// the directory entry (no stat on ext4, xfs, btrfs).
    fn scan(
        &self,
        kind: Kind,
        mut f: impl FnMut(&fs::DirEntry, String) -> Result<()>,
    ) -> Result<()> {
        let dirs: Vec<PathBuf> = match kind {
            Kind::Pack => (0..=255u8)
                .map(|i| self.root.join(kind.dir()).join(to_hex(&[i])))
                .collect(),
            _ => vec![self.root.join(kind.dir())],
        };
        for dir in dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if is_tmp(&name) {
                    continue;
                }
                match entry.file_type() {
                    Ok(t) if t.is_file() => f(&entry, name)?,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {} // deleted meanwhile
                    Err(e) => return Err(StoreError::io(entry.path(), e)),
                }
            }
        }
        Ok(())
    }

    fn missing(kind: Kind, name: &str, path: &Path, e: std::io::Error) -> StoreError {
        if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) {
            StoreError::ObjectMissing {
                kind,
                name: name.to_owned(),
            }
        } else {
            StoreError::io(path, e)
        }
    }

    fn handle(&self, kind: Kind, name: &str) -> Result<Arc<File>> {
        let path = self.path_of(kind, name);
        let mut handles = self.handles.lock().expect("no thread panics holding this");
        if let Some(f) = handles.get(&path) {
            return Ok(f);
        }
        let f = Arc::new(File::open(&path).map_err(|e| Self::missing(kind, name, &path, e))?);
        handles.put(path, f.clone());
        Ok(f)
    }

    /// Creates a new temporary file in `dir`, making the directory again if someone removed it
    /// (an operator who deleted `index/` by hand must still be able to run `repair index`).
    fn create_tmp(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
        let tmp = dir.join(tmp_name(name)?);
        let open = || File::options().write(true).create_new(true).open(&tmp);
        let f = match open() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| StoreError::io(dir, e))?;
                open()
            }
            r => r,
        }
        .map_err(|e| StoreError::io(&tmp, e))?;
        Ok((tmp, f))
    }

    /// Writes `bytes` to a fresh temporary file in `dir` and makes it durable.
    fn durable_tmp(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let (tmp, mut f) = Self::create_tmp(dir, name)?;
        let io = |e| StoreError::io(&tmp, e);
        // The bytes must be on disk before any name says the object is there.
        if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(tmp)
    }
}

/// `renameat2(RENAME_NOREPLACE)`: a rename that fails with EEXIST when `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    renameat2(from, to, libc::RENAME_NOREPLACE)
}

/// `renameat2` with `flags`.
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call; renameat2 only reads
    // them.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Gives the kernel `advice` (`POSIX_FADV_*`) about the whole of `file` (advice only: an
/// error changes nothing a caller could act on).
pub(crate) fn advise(file: &File, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; the call reads no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice);
    }
}

fn mkdir(p: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::io(p, e)),
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn create(&self) -> Result<()> {
        let path = &self.root;
        match fs::read_dir(path) {
            Ok(mut entries) => {
                if path.join("config").exists() {
                    return Err(StoreError::InitRefused {
                        path: path.to_owned(),
                        reason: "it already holds an sbk repository".into(),
                    });
                }
                if entries.next().is_some() {
                    return Err(StoreError::InitRefused {
                        path: path.to_owned(),
                        reason: "the directory is not empty".into(),
                    });
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => mkdir(path)?,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(StoreError::InitRefused {
                    path: path.to_owned(),
                    reason: "it is a file, not a directory".into(),
                })
            }
            Err(e) => return Err(StoreError::io(path, e)),
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| StoreError::io(path, e))?;
        for kind in [
            Kind::Key,
            Kind::Pack,
            Kind::Index,
            Kind::Snapshot,
            Kind::Lock,
            Kind::Pin,
            Kind::Marks,
        ] {
            mkdir(&path.join(kind.dir()))?;
        }
        let packs = path.join(Kind::Pack.dir());
        for i in 0..=255u8 {
            mkdir(&packs.join(to_hex(&[i])))?;
        }
        // The folders must survive a power loss before the config (written last, by the caller)
        // says the directory is a repository.
        fsync_dir(&packs)?;
        fsync_dir(path)
    }

    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        if kind == Kind::Config {
            return Ok(match fs::metadata(self.root.join("config")) {
                Ok(m) => vec![ObjectInfo {
                    name: "config".into(),
                    size: m.len(),
                    modified: mtime(&m),
                }],
                Err(_) => Vec::new(),
            });
        }
        let mut out = Vec::new();
        self.scan(kind, |entry, name| {
            match entry.metadata() {
                Ok(m) => out.push(ObjectInfo {
                    name,
                    size: m.len(),
                    modified: mtime(&m),
                }),
                Err(e) if e.kind() == ErrorKind::NotFound => {} // deleted meanwhile
                Err(e) => return Err(StoreError::io(entry.path(), e)),
            }
            Ok(())
        })?;
        out.sort();
        Ok(out)
    }

    fn list_names(&self, kind: Kind) -> Result<Vec<String>> {
        if kind == Kind::Config {
            return Ok(self.list(kind)?.into_iter().map(|o| o.name).collect());
        }
        let mut out = Vec::new();
        self.scan(kind, |_, name| {
            out.push(name);
            Ok(())
        })?;
        out.sort();
        Ok(out)
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        let path = self.path_of(kind, name);
        fs::read(&path).map_err(|e| Self::missing(kind, name, &path, e))
    }

    fn will_read(&self, kind: Kind, name: &str) {
        if let Ok(file) = File::open(self.path_of(kind, name)) {
            advise(&file, libc::POSIX_FADV_WILLNEED);
        }
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.handle(kind, name)?;
        file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                StoreError::ShortObject {
                    kind,
                    name: name.to_owned(),
                    needed: offset + buf.len() as u64,
                    size: file.metadata().map(|m| m.len()).unwrap_or(0),
                }
            } else {
                StoreError::io(self.path_of(kind, name), e)
            }
        })
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64> {
        let path = self.path_of(kind, name);
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| Self::missing(kind, name, &path, e))
    }

    fn write_once(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<Written> {
        let dir = self.dir_of(kind, name);
        let tmp = Self::durable_tmp(&dir, name, bytes)?;
        let path = dir.join(name);
        // A hard link, unlike a rename, fails when the name exists: the conditional create that
        // lets two writers race for a name safely.
        let linked = match fs::hard_link(&tmp, &path) {
            // Filesystems without hard links (exFAT, some FUSE and CIFS mounts): a rename
            // that refuses to replace does the same.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK)
                ) =>
            {
                rename_noreplace(&tmp, &path)
            }
            r => r,
        };
        let _ = fs::remove_file(&tmp);
        let written = match linked {
            Ok(()) => Written::Created,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Written::AlreadyThere,
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        // The new name must be durable before anything that relies on the object is written.
        fsync_dir(&dir)?;
        Ok(written)
    }

    fn stage(&self, kind: Kind, name: &str) -> Result<Box<dyn Staged>> {
        let dir = self.dir_of(kind, name);
        let (tmp, file) = Self::create_tmp(&dir, name)?;
        Ok(Box::new(LocalStaged::new(
            DirectWriter::new(file, self.buffers.clone()),
            tmp,
            dir.join(name),
            dir,
        )))
    }

    fn replace(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path_of(kind, name);
        let dir = self.dir_of(kind, name);
        let tmp = Self::durable_tmp(&dir, name, bytes)?;
        // The new bytes are swapped in atomically (RENAME_EXCHANGE), which fails when the old
        // object is gone: a lock that `unlock` removed never comes back, however the two race.
        match renameat2(&tmp, &path, libc::RENAME_EXCHANGE) {
            Ok(()) => {
                // `tmp` now holds the old bytes.
                let _ = fs::remove_file(&tmp);
                fsync_dir(&dir)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let _ = fs::remove_file(&tmp);
                Err(Self::missing(kind, name, &path, e))
            }
            // A file system without the exchange: check, then rename (an `unlock` in the
            // microseconds between the two is undone).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let done = fs::metadata(&path)
                    .map_err(|e| Self::missing(kind, name, &path, e))
                    .and_then(|_| fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e)));
                if done.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                done?;
                fsync_dir(&dir)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(StoreError::io(&path, e))
            }
        }
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        let path = self.path_of(kind, name);
        self.handles
            .lock()
            .expect("no thread panics holding this")
            .open
            .remove(&path);
        fs::remove_file(&path).map_err(|e| Self::missing(kind, name, &path, e))?;
        // A deleted snapshot or index file must not come back after a power loss.
        fsync_dir(&self.dir_of(kind, name))
    }

    fn remove_leftovers(&self, before: i64) -> Result<u64> {
        let mut dirs: Vec<PathBuf> = (0..=255u8)
            .map(|i| self.root.join(Kind::Pack.dir()).join(to_hex(&[i])))
            .collect();
        for kind in [
            Kind::Key,
            Kind::Index,
            Kind::Snapshot,
            Kind::Lock,
            Kind::Pin,
            Kind::Marks,
        ] {
            dirs.push(self.root.join(kind.dir()));
        }
        dirs.push(self.root.clone());
        let mut freed = 0;
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
                if entry.file_name().to_str().is_some_and(is_tmp) {
                    let Ok(m) = entry.metadata() else {
                        continue; // removed meanwhile
                    };
                    // A temporary file still being written is touched by every write: one
                    // written since `before` may belong to a live writer.
                    if mtime(&m) >= before {
                        continue;
                    }
                    freed += m.len();
                    match fs::remove_file(entry.path()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(StoreError::io(entry.path(), e)),
                    }
                }
            }
        }
        Ok(freed)
    }
}

/// A file's modification time in seconds since the Unix epoch (0 if the file system has none).
fn mtime(m: &fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.mtime()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_backend_contract() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(&dir.path().join("r"));
        super::super::contract::check(&b, &crate::clock::unix_now).unwrap();
    }

    #[test]
    fn temporary_files_go_and_live_writers_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(&dir.path().join("r"));
        b.create().unwrap();
        let now = crate::clock::unix_now();
        // A temporary file written since `before` may be a live writer's: left alone.
        let mut live = b.stage(Kind::Pack, "ab01").unwrap();
        live.write(b"in flight").unwrap();
        assert_eq!(b.remove_leftovers(now - 60).unwrap(), 0);
        live.finish().unwrap();
        assert_eq!(b.read(Kind::Pack, "ab01").unwrap(), b"in flight");
        drop(b.stage(Kind::Pack, "ab00").unwrap());
        assert_eq!(
            b.remove_leftovers(i64::MAX).unwrap(),
            0,
            "a dropped stage cleans up"
        );
        b.write_once(Kind::Lock, "l", b"x").unwrap();
        b.replace(Kind::Lock, "l", b"y").unwrap();
        // The old bytes, swapped out, are gone too: nothing is left beside the lock.
        assert_eq!(
            fs::read_dir(dir.path().join("r").join("locks"))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn more_packs_than_handles_can_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(&dir.path().join("r"));
        b.create().unwrap();
        b.handles.lock().unwrap().capacity = 3;
        for i in 0..10u8 {
            b.write_once(Kind::Pack, &format!("{i:02x}ff"), &[i; 4])
                .unwrap();
        }
        for round in 0..2 {
            for i in 0..10u8 {
                let mut buf = [0u8; 1];
                b.read_at(Kind::Pack, &format!("{i:02x}ff"), 3, &mut buf)
                    .unwrap();
                assert_eq!(buf[0], i, "round {round}");
            }
        }
        assert!(b.handles.lock().unwrap().open.len() <= 3);
    }
}
