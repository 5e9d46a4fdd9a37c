//! Snapshots as NBD exports: random-access reads of a snapshot, served from segment trees loaded
//! on demand and a shared cache of verified chunks, never the whole snapshot in memory.
//!
//! A read walks the extents of the segments it touches: zero extents become hole chunks, data
//! extents are cut out of their chunk, which comes from the [`ChunkCache`] or from a positioned
//! read of just that blob from its pack, decompressed and verified against its id before it is
//! served. A damaged chunk fails that request (EIO, logged with the chunk and pack); the
//! server goes on. Reads that continue where the previous one ended prefetch the next chunks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use sbk_nbd::proto::{EIO, STATE_HOLE, STATE_ZERO};
use sbk_nbd::server::{Catalog, Export, ExportError, ExportInfo, Log, ReadBytes, ReadPart};
use sbk_store::{BlobKind, ChunkId, Extent, Lock, Manifest, Repository, SnapshotId, StoreError};

use crate::chunk_cache::{ChunkCache, SharedChunk};
use crate::overlay::{Overlay, OverlayExport};
use crate::snapshot::load_extents;

/// Segment trees an export keeps decoded (a tree of a 16 MiB segment is a few KiB).
const TREES_KEPT: usize = 256;
/// Bytes of chunks a sequential reader gets ahead of itself.
const PREFETCH_BYTES: u64 = 8 << 20;

/// What every export of one server shares: the repository, the chunk cache, the prefetchers.
pub struct Shared {
    repo: Arc<Repository>,
    cache: ChunkCache,
    log: Log,
    prefetch: Mutex<Option<SyncSender<ChunkId>>>,
}

impl Shared {
    /// Shares `repo` with a chunk cache of `cache_bytes`, and starts `prefetchers` threads that
    /// load chunks sequential readers will want next.
    pub fn new(
        repo: Arc<Repository>,
        cache_bytes: u64,
        prefetchers: usize,
        log: Log,
    ) -> Arc<Shared> {
        let (tx, rx) = sync_channel::<ChunkId>(256);
        let shared = Arc::new(Shared {
            repo,
            cache: ChunkCache::new(cache_bytes),
            log,
            prefetch: Mutex::new(Some(tx)),
        });
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..prefetchers {
            let weak = Arc::downgrade(&shared);
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("sbk-prefetch-{i}"))
                .spawn(move || prefetcher(&weak, &rx));
        }
        shared
    }

    /// Stops the prefetchers.
    pub fn stop(&self) {
        self.prefetch
            .lock()
            .expect("no thread panics holding this")
            .take();
    }

    /// The chunk cache (for figures).
    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The verified bytes of chunk `id`.
    fn chunk(&self, id: &ChunkId) -> Result<SharedChunk, String> {
        thread_local! {
            /// Room for stored bytes, reused by every load of this thread.
            static STORED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        self.cache.get(id, |mut out| {
            // A chunk that prune moved since the index was loaded is found again by the read
            // itself (Repository::read_blob_with).
            STORED.with_borrow_mut(|stored| {
                self.repo
                    .read_blob_with(id, BlobKind::Data, stored, &mut out)
                    .map_err(|e| e.to_string())
            })?;
            Ok(out)
        })
    }
}

fn prefetcher(shared: &std::sync::Weak<Shared>, rx: &Mutex<Receiver<ChunkId>>) {
    loop {
        let id = match rx.lock().expect("no thread panics holding this").recv() {
            Ok(id) => id,
            Err(_) => return,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // A failure here is reported when a reader asks for the chunk.
        let _ = shared.chunk(&id);
    }
}

/// What a catalog's `opened` hook returns with a snapshot: kept as long as the export is open
/// (dropping it unpins the snapshot, say).
pub type OpenGuard = Box<dyn std::any::Any + Send + Sync>;

/// Called with each snapshot a connection opens, before it is read; may refuse it.
pub type OpenHook = Box<dyn Fn(&SnapshotId) -> Result<OpenGuard, String> + Send + Sync>;

/// One snapshot, open for one connection.
pub struct SnapshotExport {
    _guard: Option<OpenGuard>,
    shared: Arc<Shared>,
    id: SnapshotId,
    manifest: Manifest,
    trees: Mutex<TreeCache>,
    /// Where the last read ended: a read that starts there is sequential.
    last_end: AtomicU64,
    /// How far the prefetchers were asked to read: a sequential reader queues only what lies
    /// beyond it, not the same 8 MiB again at every read.
    prefetched: AtomicU64,
}

/// A segment's extents with their offsets in the export.
type Tree = Arc<Vec<(u64, Extent)>>;

#[derive(Default)]
struct TreeCache {
    trees: HashMap<usize, (Tree, u64)>,
    order: BTreeMap<u64, usize>,
    tick: u64,
}

impl SnapshotExport {
    /// Opens snapshot `id`.
    pub fn open(shared: Arc<Shared>, id: SnapshotId) -> Result<SnapshotExport, StoreError> {
        let manifest = shared.repo.load_manifest(&id)?;
        Ok(SnapshotExport {
            _guard: None,
            shared,
            id,
            manifest,
            trees: Mutex::new(TreeCache::default()),
            last_end: AtomicU64::new(u64::MAX),
            prefetched: AtomicU64::new(0),
        })
    }

    /// The snapshot's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Segment `i`'s extents with their offsets in the export.
    fn tree(&self, i: usize) -> Result<Tree, ExportError> {
        {
            let mut g = self.trees.lock().expect("no thread panics holding this");
            let c = &mut *g;
            c.tick += 1;
            if let Some((t, used)) = c.trees.get_mut(&i) {
                c.order.remove(used);
                *used = c.tick;
                c.order.insert(c.tick, i);
                return Ok(t.clone());
            }
        }
        // A tree that prune moved since the index was loaded is found again by the read itself.
        let tree: Tree = Arc::new(
            load_extents(&self.shared.repo, &self.manifest, i..i + 1)
                .map_err(|e| self.failed(format!("segment {i}: {e}")))?,
        );
        let mut g = self.trees.lock().expect("no thread panics holding this");
        let c = &mut *g;
        c.tick += 1;
        let tick = c.tick;
        if let Some((_, old)) = c.trees.insert(i, (tree.clone(), tick)) {
            c.order.remove(&old); // another reader loaded it meanwhile
        } else if c.trees.len() > TREES_KEPT {
            if let Some((_, victim)) = c.order.pop_first() {
                c.trees.remove(&victim);
            }
        }
        c.order.insert(tick, i);
        Ok(tree)
    }

    /// The extents overlapping `offset..end`, in order.
    fn extents(&self, offset: u64, end: u64) -> Result<Vec<(u64, Extent)>, ExportError> {
        let seg = self.manifest.segment_size;
        let mut out = Vec::new();
        for i in (offset / seg) as usize..end.div_ceil(seg) as usize {
            let tree = self.tree(i)?;
            let first = tree.partition_point(|(at, x)| at + u64::from(x.len()) <= offset);
            out.extend(
                tree[first..]
                    .iter()
                    .take_while(|(at, _)| *at < end)
                    .copied(),
            );
        }
        Ok(out)
    }

    fn failed(&self, what: String) -> ExportError {
        let msg = format!("snapshot {}: {what}", self.id.to_hex());
        (self.shared.log)(&msg);
        ExportError::new(EIO, msg)
    }

    /// Queues the chunks after `end` for the prefetchers.
    fn prefetch_after(&self, end: u64) {
        let stop = (end + PREFETCH_BYTES).min(self.manifest.size);
        // Within the window already queued: only the part beyond it. A jump elsewhere (a new
        // sequential run) queues its whole window.
        let prev = self.prefetched.swap(stop, Ordering::Relaxed);
        let from = if (end..=stop).contains(&prev) {
            prev
        } else {
            end
        };
        if from >= stop {
            return;
        }
        let Ok(extents) = self.extents(from, stop) else {
            return;
        };
        let tx = self
            .shared
            .prefetch
            .lock()
            .expect("no thread panics holding this")
            .clone();
        let Some(tx) = tx else { return };
        for (_, x) in extents {
            if let Extent::Data { id, .. } = x {
                // A full queue means the prefetchers are behind already: skip, never block.
                if tx.try_send(id).is_err() {
                    break;
                }
            }
        }
    }
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.manifest.size
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadPart>, ExportError> {
        let end = offset + u64::from(len);
        let mut out: Vec<ReadPart> = Vec::new();
        for (at, x) in self.extents(offset, end)? {
            let from = at.max(offset);
            let to = (at + u64::from(x.len())).min(end);
            match x {
                Extent::Zero { .. } => match out.last_mut() {
                    Some(ReadPart::Hole { offset: o, len }) if *o + u64::from(*len) == from => {
                        *len += (to - from) as u32;
                    }
                    _ => out.push(ReadPart::Hole {
                        offset: from,
                        len: (to - from) as u32,
                    }),
                },
                Extent::Data { id, .. } => {
                    // Sent straight from the cached chunk: one reply chunk per piece, no copy.
                    let bytes = self.shared.chunk(&id).map_err(|e| self.failed(e))?;
                    out.push(ReadPart::Data {
                        offset: from,
                        data: ReadBytes::Shared(bytes, (from - at) as usize..(to - at) as usize),
                    });
                }
            }
        }
        if self.last_end.swap(end, Ordering::Relaxed) == offset {
            self.prefetch_after(end);
        }
        Ok(out)
    }

    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, ExportError> {
        let end = offset + u64::from(len);
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (at, x) in self.extents(offset, end)? {
            let n = ((at + u64::from(x.len())).min(end) - at.max(offset)) as u32;
            let flags = match x {
                Extent::Zero { .. } => STATE_HOLE | STATE_ZERO,
                Extent::Data { .. } => 0,
            };
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += n,
                _ => out.push((n, flags)),
            }
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        for (_, x) in self.extents(offset, offset + u64::from(len))? {
            if let Extent::Data { id, .. } = x {
                self.shared.chunk(&id).map_err(|e| self.failed(e))?;
            }
        }
        Ok(())
    }
}

/// The overlays open now, by export name (shared by the connections to that export).
type OpenOverlays = Mutex<HashMap<String, std::sync::Weak<Overlay>>>;

/// The snapshots a server offers: every snapshot, or those named when it started; each by its
/// id (any unique prefix opens it) and `latest`, the newest of them, resolved at each connect.
pub struct SnapshotCatalog {
    shared: Arc<Shared>,
    only: Option<Vec<SnapshotId>>,
    opened: OpenHook,
    /// Where writable exports keep their overlays, and the overlays open now, by name.
    overlays: Option<(std::path::PathBuf, OpenOverlays)>,
}

impl SnapshotCatalog {
    /// A catalog of `only` (every snapshot when `None`); `opened` is called with each snapshot
    /// a connection opens before it is read (to pin it against prune), and may refuse it; what
    /// it returns lives as long as the connection's export.
    pub fn new(shared: Arc<Shared>, only: Option<Vec<SnapshotId>>, opened: OpenHook) -> Self {
        SnapshotCatalog {
            shared,
            only,
            opened,
            overlays: None,
        }
    }

    /// Makes the exports writable, each through an overlay in `dir` named after the export
    /// (`latest`, or the snapshot's full id), shared by every connection to it.
    pub fn with_overlays(mut self, dir: std::path::PathBuf) -> Self {
        self.overlays = Some((dir, Mutex::new(HashMap::new())));
        self
    }

    /// The served snapshots, oldest first, with their manifests.
    fn served(&self) -> Result<Vec<(SnapshotId, Manifest)>, String> {
        let repo = &self.shared.repo;
        let all = repo.snapshots().map_err(|e| e.to_string())?;
        Ok(all
            .into_iter()
            .filter_map(|(id, m)| m.ok().map(|m| (id, m)))
            .filter(|(id, _)| self.only.as_ref().is_none_or(|o| o.contains(id)))
            .collect())
    }
}

fn describe(m: &Manifest) -> String {
    format!("{} on {}, {} bytes", m.source, m.host, m.size)
}

impl Catalog for SnapshotCatalog {
    fn list(&self) -> Result<Vec<ExportInfo>, String> {
        let served = self.served()?;
        let mut out: Vec<ExportInfo> = served
            .iter()
            .map(|(id, m)| ExportInfo {
                name: id.to_hex(),
                description: describe(m),
            })
            .collect();
        if let Some((id, m)) = served.last() {
            out.push(ExportInfo {
                name: "latest".into(),
                description: format!("{}: {}", id.to_hex(), describe(m)),
            });
        }
        Ok(out)
    }

    fn open(&self, name: &str) -> Result<(Arc<dyn Export>, ExportInfo), String> {
        // New backups may have added index files since the server started.
        self.shared
            .repo
            .refresh_index()
            .map_err(|e| e.to_string())?;
        let served = self.served()?;
        let id = if name == "latest" {
            served
                .last()
                .map(|(id, _)| *id)
                .ok_or("no snapshot to serve")?
        } else {
            let lc = name.to_ascii_lowercase();
            let found: Vec<_> = served
                .iter()
                .filter(|(id, _)| !lc.is_empty() && id.to_hex().starts_with(&lc))
                .collect();
            match found.as_slice() {
                [(id, _)] => *id,
                [] => return Err(format!("no served snapshot {name:?}")),
                more => return Err(format!("{name:?} names {} snapshots", more.len())),
            }
        };
        let guard = (self.opened)(&id)?;
        let mut export =
            SnapshotExport::open(self.shared.clone(), id).map_err(|e| e.to_string())?;
        export._guard = Some(guard);
        let info = ExportInfo {
            name: id.to_hex(),
            description: describe(export.manifest()),
        };
        let size = export.manifest().size;
        let export: Arc<dyn Export> = Arc::new(export);
        let Some((dir, open)) = &self.overlays else {
            return Ok((export, info));
        };
        // `latest` keeps its own overlay, bound to the snapshot it was made on.
        let key = if name == "latest" {
            "latest".to_owned()
        } else {
            id.to_hex()
        };
        let mut open = open.lock().expect("no thread panics holding this");
        let overlay = match open.get(&key).and_then(std::sync::Weak::upgrade) {
            Some(o) => o,
            None => {
                let o = Arc::new(Overlay::open(dir, &key, id, size)?);
                open.insert(key, Arc::downgrade(&o));
                o
            }
        };
        Ok((Arc::new(OverlayExport::new(export, overlay)), info))
    }
}

/// The snapshots a server pins against prune under its lock, with how many connections have
/// each open: the first connection to open a snapshot pins it, the last to close it unpins it.
pub struct ServePins {
    repo: Arc<Repository>,
    lock: Lock,
    open: Mutex<HashMap<SnapshotId, usize>>,
    log: Log,
}

impl ServePins {
    /// Pins under `lock` (a pin lock), logging what goes wrong to `log`.
    pub fn new(repo: Arc<Repository>, lock: Lock, log: Log) -> Arc<Self> {
        Arc::new(ServePins {
            repo,
            lock,
            open: Mutex::new(HashMap::new()),
            log,
        })
    }

    /// The hook a [`SnapshotCatalog`] calls with each snapshot a connection opens.
    pub fn hook(self: &Arc<Self>) -> OpenHook {
        let pins = self.clone();
        Box::new(move |id| pins.pin(id))
    }

    /// Pins `id` for one more connection (the first pins it in the repository).
    fn pin(self: &Arc<Self>, id: &SnapshotId) -> Result<OpenGuard, String> {
        let mut open = self.open.lock().expect("no thread panics holding this");
        let n = open.get(id).copied().unwrap_or(0);
        if n == 0 {
            self.repo
                .pin_snapshot(&self.lock, id)
                .map_err(|e| format!("snapshot {id} cannot be pinned against prune: {e}"))?;
        }
        open.insert(*id, n + 1);
        Ok(Box::new(PinGuard {
            pins: self.clone(),
            id: *id,
        }))
    }
}

/// One connection's hold on a pinned snapshot; the last one unpins it.
struct PinGuard {
    pins: Arc<ServePins>,
    id: SnapshotId,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let p = &self.pins;
        let mut open = p.open.lock().expect("no thread panics holding this");
        let n = open.get(&self.id).copied().unwrap_or(1) - 1;
        if n > 0 {
            open.insert(self.id, n);
            return;
        }
        open.remove(&self.id);
        if let Err(e) = p.repo.unpin_snapshot(&p.lock, &self.id) {
            // Left behind, it only keeps data until the server stops (or a prune finds its
            // lock gone).
            (p.log)(&format!("snapshot {}: unpinning failed: {e}", self.id));
        }
    }
}
