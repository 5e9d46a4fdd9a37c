//! A byte-bounded LRU of decompressed, verified chunks, keyed by chunk id, with single-flight
//! misses: threads that want a chunk being loaded wait for that one load instead of reading the
//! pack again. Shared by every export of a server, so that snapshots that share chunks share
//! the cache too.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};

use sbk_store::ChunkId;

/// A chunk's bytes, shared by the cache and its readers.
pub type SharedChunk = Arc<Vec<u8>>;

/// The outcome of a load that waiters share.
type Flight = Arc<(Mutex<Option<Result<SharedChunk, String>>>, Condvar)>;

#[derive(Default)]
struct Inner {
    entries: HashMap<ChunkId, (SharedChunk, u64)>,
    /// Use order: tick → id; the first is the least recently used.
    order: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: u64,
    loading: HashMap<ChunkId, Flight>,
    hits: u64,
    misses: u64,
    /// Buffers of evicted chunks no reader held any more, for the next loads: their memory is
    /// already mapped, so a load neither zeroes nor faults in fresh pages.
    spare: Vec<Vec<u8>>,
}

/// Evicted buffers kept for reuse.
const SPARE_BUFFERS: usize = 32;

/// The cache.
pub struct ChunkCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

impl ChunkCache {
    /// A cache of at most `capacity` bytes of chunks.
    pub fn new(capacity: u64) -> Self {
        ChunkCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The chunk `id`, from the cache or from `load` (called once however many threads ask at
    /// once, with a recycled buffer to fill if there is one; its error goes to all of them, and
    /// is not cached).
    pub fn get(
        &self,
        id: &ChunkId,
        load: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, String>,
    ) -> Result<SharedChunk, String> {
        let flight = {
            let mut g = self.inner.lock().expect("no thread panics holding this");
            let inner = &mut *g;
            inner.tick += 1;
            let tick = inner.tick;
            if let Some((bytes, used)) = inner.entries.get_mut(id) {
                inner.order.remove(used);
                *used = tick;
                inner.order.insert(tick, *id);
                inner.hits += 1;
                return Ok(bytes.clone());
            }
            inner.misses += 1;
            match inner.loading.get(id) {
                Some(f) => Err(f.clone()),
                None => {
                    inner
                        .loading
                        .insert(*id, Arc::new((Mutex::new(None), Condvar::new())));
                    Ok(inner.spare.pop().unwrap_or_default())
                }
            }
        };
        let spare = match flight {
            Ok(spare) => spare,
            Err(f) => {
                let (slot, cv) = &*f;
                let mut g = slot.lock().expect("no thread panics holding this");
                while g.is_none() {
                    g = cv.wait(g).expect("no thread panics holding this");
                }
                return g.clone().expect("set before notified");
            }
        };
        let result = load(spare).map(Arc::new);
        let mut g = self.inner.lock().expect("no thread panics holding this");
        let f = g
            .loading
            .remove(id)
            .expect("this thread registered the load");
        if let Ok(bytes) = &result {
            self.insert(&mut g, *id, bytes.clone());
        }
        drop(g);
        let (slot, cv) = &*f;
        *slot.lock().expect("no thread panics holding this") = Some(result.clone());
        cv.notify_all();
        result
    }

    fn insert(&self, inner: &mut Inner, id: ChunkId, bytes: SharedChunk) {
        // Counted by capacity: a recycled buffer may hold more memory than the chunk needs.
        let len = bytes.capacity() as u64;
        if len > self.capacity {
            return;
        }
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((replaced, old)) = inner.entries.insert(id, (bytes, tick)) {
            inner.order.remove(&old);
            inner.bytes -= replaced.capacity() as u64;
        }
        inner.order.insert(tick, id);
        inner.bytes += len;
        while inner.bytes > self.capacity {
            let Some((_, victim)) = inner.order.pop_first() else {
                break;
            };
            if let Some((b, _)) = inner.entries.remove(&victim) {
                inner.bytes -= b.capacity() as u64;
                if inner.spare.len() < SPARE_BUFFERS {
                    if let Ok(v) = Arc::try_unwrap(b) {
                        inner.spare.push(v);
                    }
                }
            }
        }
    }

    /// SharedChunk held, hits and misses so far.
    pub fn figures(&self) -> (u64, u64, u64) {
        let g = self.inner.lock().expect("no thread panics holding this");
        (g.bytes, g.hits, g.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn evicts_the_least_recently_used_within_its_bytes() {
        let c = ChunkCache::new(300);
        for n in 0..3 {
            c.get(&id(n), |_| Ok(vec![n; 100])).unwrap();
        }
        c.get(&id(0), |_| panic!("cached")).unwrap(); // 0 is now the most recent
        c.get(&id(3), |_| Ok(vec![3; 100])).unwrap(); // evicts 1
        assert_eq!(c.figures().0, 300);
        c.get(&id(0), |_| panic!("still cached")).unwrap();
        c.get(&id(2), |_| panic!("still cached")).unwrap();
        let loads = AtomicUsize::new(0);
        c.get(&id(1), |_| {
            loads.fetch_add(1, Ordering::Relaxed);
            Ok(vec![1; 100])
        })
        .unwrap();
        assert_eq!(loads.load(Ordering::Relaxed), 1, "1 was evicted");
    }

    #[test]
    fn concurrent_misses_load_once_and_errors_are_not_cached() {
        let c = ChunkCache::new(1 << 20);
        let loads = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let b = c
                        .get(&id(9), |_| {
                            loads.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![9; 10])
                        })
                        .unwrap();
                    assert_eq!(*b, vec![9; 10]);
                });
            }
        });
        assert_eq!(loads.load(Ordering::Relaxed), 1);
        assert!(c.get(&id(7), |_| Err("damaged".into())).is_err());
        assert_eq!(*c.get(&id(7), |_| Ok(vec![7])).unwrap(), vec![7]);
    }
}
