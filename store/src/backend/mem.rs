//! The in-memory backend: a repository that lives in this process, for fast unit tests of the
//! repository and the pipelines above it (crash orderings, movers side by side, prune's marks).
//!
//! It keeps the contracts of [`Backend`] as the local and S3 backends do (one suite,
//! `backend::contract`, runs against all three): a name is created once, `replace` brings
//! nothing back, staged objects are invisible until finished, and every object carries the
//! time the storage wrote it, from a clock the test sets ([`MemBackend::set_time`]), so that
//! leases and grace periods can be crossed without waiting.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Backend, Kind, ObjectInfo, Staged, Written};
use crate::error::{Result, StoreError};

/// One stored object.
#[derive(Clone)]
struct Object {
    bytes: Arc<Vec<u8>>,
    modified: i64,
}

/// What the backend holds, shared with its staged writers.
#[derive(Default)]
struct State {
    objects: BTreeMap<(Kind, String), Object>,
    /// Staged objects being written, by a serial: their bytes so far and when they were last
    /// written (what `remove_leftovers` weighs).
    staged: BTreeMap<u64, (usize, i64)>,
}

/// A repository held in memory. Clones share the same objects.
#[derive(Clone)]
pub struct MemBackend {
    state: Arc<Mutex<State>>,
    clock: Arc<AtomicI64>,
    serial: Arc<AtomicU64>,
}

impl Default for MemBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemBackend {
    /// An empty place (see [`Backend::create`]), its clock at this host's time.
    pub fn new() -> Self {
        MemBackend {
            state: Arc::default(),
            clock: Arc::new(AtomicI64::new(crate::clock::unix_now())),
            serial: Arc::default(),
        }
    }

    /// A copy of the objects as they are now, which goes its own way from here (its clock
    /// too): a crash test runs each crash on a fork of the same repository.
    pub fn fork(&self) -> MemBackend {
        let objects = self.state().objects.clone();
        MemBackend {
            state: Arc::new(Mutex::new(State {
                objects,
                staged: BTreeMap::new(),
            })),
            clock: Arc::new(AtomicI64::new(self.time())),
            serial: Arc::default(),
        }
    }

    /// The storage's time: what the next write records (seconds since the Unix epoch).
    pub fn time(&self) -> i64 {
        self.clock.load(Ordering::SeqCst)
    }

    /// Sets the storage's clock.
    pub fn set_time(&self, secs: i64) {
        self.clock.store(secs, Ordering::SeqCst)
    }

    /// Moves the storage's clock on by `secs`.
    pub fn advance(&self, secs: i64) {
        self.clock.fetch_add(secs, Ordering::SeqCst);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("no thread panics holding this")
    }

    fn missing(kind: Kind, name: &str) -> StoreError {
        StoreError::ObjectMissing {
            kind,
            name: name.to_owned(),
        }
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Arc<Vec<u8>>> {
        self.state()
            .objects
            .get(&(kind, name.to_owned()))
            .map(|o| o.bytes.clone())
            .ok_or_else(|| Self::missing(kind, name))
    }

    /// Creates `name` unless it exists: the conditional create both `write_once` and a staged
    /// object's `finish` rely on.
    fn create_object(&self, kind: Kind, name: &str, bytes: Vec<u8>) -> Written {
        let modified = self.time();
        let mut s = self.state();
        match s.objects.entry((kind, name.to_owned())) {
            std::collections::btree_map::Entry::Occupied(_) => Written::AlreadyThere,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Object {
                    bytes: Arc::new(bytes),
                    modified,
                });
                Written::Created
            }
        }
    }
}

impl Backend for MemBackend {
    fn location(&self) -> String {
        "memory".into()
    }

    fn create(&self) -> Result<()> {
        let s = self.state();
        if s.objects.contains_key(&(Kind::Config, "config".to_owned())) {
            return Err(StoreError::InitRefused {
                path: "memory".into(),
                reason: "it already holds an sbk repository".into(),
            });
        }
        if !s.objects.is_empty() {
            return Err(StoreError::InitRefused {
                path: "memory".into(),
                reason: "it is not empty".into(),
            });
        }
        Ok(())
    }

    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        // BTreeMap order is name order within a kind: sorted, as the contract asks.
        Ok(self
            .state()
            .objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, name), o)| ObjectInfo {
                name: name.clone(),
                size: o.bytes.len() as u64,
                modified: o.modified,
            })
            .collect())
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.get(kind, name).map(|b| b.as_ref().clone())
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bytes = self.get(kind, name)?;
        let end = offset.saturating_add(buf.len() as u64);
        if end > bytes.len() as u64 {
            return Err(StoreError::ShortObject {
                kind,
                name: name.to_owned(),
                needed: end,
                size: bytes.len() as u64,
            });
        }
        buf.copy_from_slice(&bytes[offset as usize..end as usize]);
        Ok(())
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64> {
        self.get(kind, name).map(|b| b.len() as u64)
    }

    fn write_once(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<Written> {
        Ok(self.create_object(kind, name, bytes.to_vec()))
    }

    fn stage(&self, kind: Kind, name: &str) -> Result<Box<dyn Staged>> {
        let serial = self.serial.fetch_add(1, Ordering::SeqCst);
        self.state().staged.insert(serial, (0, self.time()));
        Ok(Box::new(MemStaged {
            backend: self.clone(),
            kind,
            name: name.to_owned(),
            serial,
            buf: Some(Vec::new()),
        }))
    }

    fn replace(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<()> {
        let modified = self.time();
        let mut s = self.state();
        // Only if present: a lock someone removed must not come back.
        let o = s
            .objects
            .get_mut(&(kind, name.to_owned()))
            .ok_or_else(|| Self::missing(kind, name))?;
        *o = Object {
            bytes: Arc::new(bytes.to_vec()),
            modified,
        };
        Ok(())
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        self.state()
            .objects
            .remove(&(kind, name.to_owned()))
            .map(|_| ())
            .ok_or_else(|| Self::missing(kind, name))
    }

    fn remove_leftovers(&self, before: i64) -> Result<u64> {
        // A staged object of this process is a live writer's (a dead one's staged bytes died
        // with it): only those idle since before `before` are removed, as on a disk.
        let mut s = self.state();
        let old: Vec<u64> = s
            .staged
            .iter()
            .filter(|(_, (_, t))| *t < before)
            .map(|(k, _)| *k)
            .collect();
        Ok(old
            .into_iter()
            .filter_map(|k| s.staged.remove(&k))
            .map(|(len, _)| len as u64)
            .sum())
    }
}

/// An object being written to memory; it appears whole on `finish`.
struct MemStaged {
    backend: MemBackend,
    kind: Kind,
    name: String,
    serial: u64,
    buf: Option<Vec<u8>>,
}

impl MemStaged {
    /// The error of a write to a staged object removed as a leftover.
    fn gone(&self) -> StoreError {
        StoreError::io(
            format!("staged {} {}", self.kind, self.name),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    }
}

impl Staged for MemStaged {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let buf = self.buf.as_mut().expect("present until finish");
        buf.extend_from_slice(bytes);
        let (len, at) = (buf.len(), self.backend.time());
        match self.backend.state().staged.get_mut(&self.serial) {
            Some(entry) => {
                *entry = (len, at);
                Ok(())
            }
            // Removed as a leftover under us: what a real storage would do to a writer that
            // was idle past the cut-off.
            None => Err(self.gone()),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let buf = self.buf.take().expect("present until finish");
        if self.backend.state().staged.remove(&self.serial).is_none() {
            // Removed as a leftover under us, as a disk's temporary file would be: nothing
            // appears.
            return Err(self.gone());
        }
        match self.backend.create_object(self.kind, &self.name, buf) {
            Written::Created => Ok(()),
            Written::AlreadyThere => Err(StoreError::io(
                format!("{} {}", self.kind, self.name),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            )),
        }
    }

    fn len(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.len() as u64)
    }
}

impl Drop for MemStaged {
    fn drop(&mut self) {
        if self.buf.is_some() {
            self.backend.state().staged.remove(&self.serial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_backend_contract() {
        let b = MemBackend::new();
        super::super::contract::check(&b, &|| b.time()).unwrap();
    }

    #[test]
    fn the_clock_is_the_tests_to_set() {
        let b = MemBackend::new();
        b.set_time(1_000);
        b.write_once(Kind::Lock, "a", b"x").unwrap();
        b.advance(60);
        b.write_once(Kind::Lock, "b", b"x").unwrap();
        let times: Vec<i64> = b
            .list(Kind::Lock)
            .unwrap()
            .iter()
            .map(|o| o.modified)
            .collect();
        assert_eq!(times, vec![1_000, 1_060]);
        b.replace(Kind::Lock, "a", b"y").unwrap();
        assert_eq!(b.list(Kind::Lock).unwrap()[0].modified, 1_060);
    }
}
