//! The repositories a console shows: each opened once (under a pin lock, which conflicts with
//! nothing, so the console never holds up a backup or a prune), with a catalog of its snapshots
//! kept in memory and brought up to date by listing, and figures that need every snapshot's
//! trees computed in the background.
//!
//! A repository that cannot be opened is shown with its error and tried again at most every
//! [`RETRY_OPEN`]; the others work meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant, SystemTime};

use sbk_engine::{OpenGuard, RepoStats, ServePins, ServeShared, SnapshotFiles};
use sbk_nbd::server::Log;
use sbk_store::{BackupFigures, ChangedBlocks, Lock, Repository, SnapshotId};

/// How long a failed open is shown before it is tried again.
const RETRY_OPEN: Duration = Duration::from_secs(30);
/// How old the snapshot catalog may be before a page lists the repository again.
const CATALOG_FRESH: Duration = Duration::from_secs(5);
/// How often the background thread looks for a changed snapshot set to count again.
const STATS_EVERY: Duration = Duration::from_secs(20);
/// Bytes of verified chunks each repository keeps in memory for file browsing and exports.
const CHUNK_CACHE: u64 = 64 << 20;
/// Snapshots kept open for file browsing (each holds its partition table and a filesystem's
/// metadata in the chunk cache).
const FILES_KEPT: usize = 4;
/// How long a snapshot kept open for browsing stays open, and pinned, unasked for.
const FILES_IDLE: Duration = Duration::from_secs(600);

/// Opens a repository for the console: open, take a pin lock, load the index (through the
/// cache). Returns the error as the operator should read it.
pub type Opener = Arc<dyn Fn() -> Result<(Repository, Lock), String> + Send + Sync>;

/// A repository to show.
pub struct RepoSpec {
    /// Where it is (a directory or `s3://…`), as job files and records name it.
    pub location: String,
    /// How to open it.
    pub open: Opener,
    /// State directories whose `runs/verify/` and `runs/prune/` records are about it.
    pub state_dirs: Vec<PathBuf>,
}

/// A job whose run records the console shows.
pub struct JobSpec {
    /// Its name (the job file's stem), as its records are filed.
    pub name: String,
    /// The job file.
    pub file: PathBuf,
    /// Its repository's location.
    pub repository: String,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its sources' names.
    pub sources: Vec<String>,
}

/// What the console keeps of one snapshot (never its trees: 10^4 snapshots fit in a few MB).
#[derive(Debug, Clone)]
pub struct Snap {
    /// Its id.
    pub id: SnapshotId,
    /// When it was taken (ns since the epoch).
    pub time_ns: i64,
    /// Its source's name.
    pub source: String,
    /// The host that backed it up.
    pub host: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its logical size.
    pub size: u64,
    /// The snapshot it was made from, if any.
    pub parent: Option<SnapshotId>,
    /// Its backup's figures.
    pub figures: BackupFigures,
    /// Its changed-block record, when it has one.
    pub changed: Option<ChangedBlocks>,
    /// Until when Object Lock protects it (seconds since the epoch).
    pub protected_until: Option<i64>,
}

/// The snapshots of a repository, oldest first, and those whose manifest failed to load.
#[derive(Default)]
pub struct Catalog {
    /// Snapshots that loaded, oldest first.
    pub snaps: Vec<Arc<Snap>>,
    /// Snapshots whose manifest did not load, with why.
    pub broken: Vec<(SnapshotId, String)>,
    /// Why the last listing failed, if it did (the snapshots are then those listed before).
    pub error: Option<String>,
}

impl Catalog {
    /// The snapshot `id`.
    pub fn get(&self, id: &SnapshotId) -> Option<&Arc<Snap>> {
        self.snaps.iter().find(|s| &s.id == id)
    }

    /// Snapshots whose id starts with `prefix` (lower-case hex).
    pub fn find(&self, prefix: &str) -> Option<&Arc<Snap>> {
        let mut found = self
            .snaps
            .iter()
            .filter(|s| s.id.to_hex().starts_with(prefix));
        match (found.next(), found.next()) {
            (Some(s), None) if !prefix.is_empty() => Some(s),
            _ => None,
        }
    }

    /// Source names, sorted, each with its snapshots (oldest first).
    pub fn by_source(&self) -> BTreeMap<String, Vec<Arc<Snap>>> {
        let mut map: BTreeMap<String, Vec<Arc<Snap>>> = BTreeMap::new();
        for s in &self.snaps {
            map.entry(s.source.clone()).or_default().push(s.clone());
        }
        map
    }
}

/// Figures that need every snapshot's trees, computed in the background.
pub enum Stats {
    /// Not counted yet.
    Pending,
    /// Counted over the snapshot set of that time.
    Done {
        /// The repository's figures.
        repo: RepoStats,
        /// Per snapshot: raw and stored bytes no other snapshot refers to (what forgetting it
        /// would free).
        unique: HashMap<SnapshotId, (u64, u64)>,
        /// When the count finished.
        at: SystemTime,
        /// How long it took.
        took: Duration,
    },
    /// The count failed.
    Failed {
        /// Why.
        error: String,
        /// When.
        at: SystemTime,
    },
}

/// Locks `m`, recovering it if a thread panicked while holding it (a filesystem reader that
/// met a hostile image): what these mutexes guard stays consistent at every step, and one bad
/// page must not break every later one.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A snapshot's disk open for file-level reads, pinned against prune while it is (a download
/// may run for hours; prune keeps what a pinned snapshot needs).
pub struct OpenFiles {
    /// The disk.
    pub files: SnapshotFiles,
    _pin: OpenGuard,
}

/// A repository, open.
pub struct Opened {
    /// The repository.
    pub repo: Arc<Repository>,
    /// The chunk cache and readers every export and file read share.
    pub shared: Arc<ServeShared>,
    /// Pins of exported and browsed snapshots, under the console's pin lock.
    pub pins: Arc<ServePins>,
    catalog: Mutex<(Option<Instant>, Arc<Catalog>)>,
    /// Held by the one request that lists the repository again; the others show the catalog
    /// they have meanwhile.
    listing: Mutex<()>,
    stats: Mutex<Arc<Stats>>,
    files: Mutex<Vec<(SnapshotId, Arc<OpenFiles>, Instant)>>,
    stopping: AtomicBool,
}

impl Opened {
    /// The snapshot catalog, listed again when older than [`CATALOG_FRESH`] (new manifests
    /// come from the manifest cache or the repository; those gone are dropped). The listing
    /// runs outside the catalog's lock: while one request lists, the others get the catalog as
    /// it was.
    pub fn catalog(&self) -> Arc<Catalog> {
        let (fresh, old) = {
            let held = lock(&self.catalog);
            (
                held.0.is_some_and(|t| t.elapsed() < CATALOG_FRESH),
                held.1.clone(),
            )
        };
        if fresh {
            return old;
        }
        // The first listing is waited for (there is nothing to show before it); later ones
        // are skipped by everyone but the one doing it.
        let _listing = match self.listing.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if lock(&self.catalog).0.is_some() => return old,
            Err(TryLockError::WouldBlock) => lock(&self.listing),
        };
        let held = lock(&self.catalog).clone();
        if held.0.is_some_and(|t| t.elapsed() < CATALOG_FRESH) {
            return held.1;
        }
        let new = Arc::new(refresh(&self.repo, &held.1));
        *lock(&self.catalog) = (Some(Instant::now()), new.clone());
        new
    }

    /// The background figures, as far as they are.
    pub fn stats(&self) -> Arc<Stats> {
        lock(&self.stats).clone()
    }

    /// Snapshot `id`'s disk, open for file-level reads and pinned (kept open, and pinned, for
    /// the next request, at most [`FILES_KEPT`] snapshots for at most [`FILES_IDLE`]).
    pub fn files(&self, id: SnapshotId) -> Result<Arc<OpenFiles>, String> {
        {
            let mut kept = lock(&self.files);
            if let Some(i) = kept.iter().position(|(k, _, _)| *k == id) {
                let (_, hit, _) = kept.remove(i);
                kept.push((id, hit.clone(), Instant::now()));
                return Ok(hit);
            }
        }
        // Opened outside the lock: reading a partition table takes chunk reads, and a reader
        // may fail on a hostile one.
        let pin = (self.pins.hook())(&id)?;
        let files = SnapshotFiles::open(self.shared.clone(), id).map_err(|e| e.to_string())?;
        let open = Arc::new(OpenFiles { files, _pin: pin });
        let mut kept = lock(&self.files);
        if kept.len() >= FILES_KEPT {
            kept.remove(0);
        }
        kept.push((id, open.clone(), Instant::now()));
        Ok(open)
    }

    /// Closes the snapshots kept open for browsing that nobody asked for lately (their pins
    /// go with them, once no download holds them).
    fn forget_idle_files(&self) {
        lock(&self.files).retain(|(_, _, used)| used.elapsed() < FILES_IDLE);
    }
}

/// The catalog after listing the repository again, loading only manifests not seen before.
fn refresh(repo: &Repository, old: &Catalog) -> Catalog {
    let ids = match repo.snapshot_ids() {
        Ok(ids) => ids,
        Err(e) => {
            return Catalog {
                snaps: old.snaps.clone(),
                broken: old.broken.clone(),
                error: Some(format!("cannot list the snapshots: {e}")),
            }
        }
    };
    let known: HashMap<SnapshotId, &Arc<Snap>> = old.snaps.iter().map(|s| (s.id, s)).collect();
    let now = sbk_store::unix_now();
    let mut snaps = Vec::with_capacity(ids.len());
    let mut broken = Vec::new();
    for id in ids {
        if let Some(s) = known.get(&id) {
            snaps.push((*s).clone());
            continue;
        }
        match repo.load_manifest(&id) {
            Ok(m) => snaps.push(Arc::new(Snap {
                id,
                time_ns: m.time_ns,
                protected_until: repo.protected_until(&m, now),
                changed: m.changed_blocks().and_then(|c| c.ok()),
                source: m.source,
                host: m.host,
                tags: m.tags,
                size: m.size,
                parent: m.parent,
                figures: m.figures,
            })),
            Err(e) => broken.push((id, e.to_string())),
        }
    }
    snaps.sort_by_key(|s| (s.time_ns, s.id));
    Catalog {
        snaps,
        broken,
        error: None,
    }
}

/// One repository of the console: open, or the error that kept it from opening.
pub struct Repo {
    /// Its number in the console (its place in the list; in URLs).
    pub n: usize,
    /// What it is.
    pub spec: RepoSpec,
    state: Mutex<State>,
    /// Held while the repository is being opened, which can take long (storage that does not
    /// answer): the state's lock is not, so pages of the others never wait for it.
    opening: Mutex<()>,
}

enum State {
    Never,
    Failed(String, Instant),
    Open(Arc<Opened>),
}

impl Repo {
    /// Repository `n` of `spec`, not opened yet.
    pub fn new(n: usize, spec: RepoSpec) -> Repo {
        Repo {
            n,
            spec,
            state: Mutex::new(State::Never),
            opening: Mutex::new(()),
        }
    }

    fn settled(&self) -> Option<Result<Arc<Opened>, String>> {
        match &*lock(&self.state) {
            State::Open(o) => Some(Ok(o.clone())),
            State::Failed(e, at) if at.elapsed() < RETRY_OPEN => Some(Err(e.clone())),
            _ => None,
        }
    }

    /// The open repository, opening it if it is not (a failure is kept, and shown, for
    /// [`RETRY_OPEN`] before the next try). While another request opens it, this one says so
    /// instead of waiting.
    pub fn open(&self) -> Result<Arc<Opened>, String> {
        if let Some(r) = self.settled() {
            return r;
        }
        let _opening = match self.opening.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err("being opened; reload the page in a moment".into())
            }
        };
        // Another request may have finished opening it meanwhile.
        if let Some(r) = self.settled() {
            return r;
        }
        let opened = (self.spec.open)().map(|(repo, held)| {
            let repo = Arc::new(repo);
            let location = self.spec.location.clone();
            let log: Log = Arc::new(move |m: &str| eprintln!("sbk console: {location}: {m}"));
            let opened = Arc::new(Opened {
                shared: ServeShared::new(repo.clone(), CHUNK_CACHE, 1, log.clone()),
                pins: ServePins::new(repo.clone(), held, log),
                repo,
                catalog: Mutex::new((None, Arc::new(Catalog::default()))),
                listing: Mutex::new(()),
                stats: Mutex::new(Arc::new(Stats::Pending)),
                files: Mutex::new(Vec::new()),
                stopping: AtomicBool::new(false),
            });
            let weak = Arc::downgrade(&opened);
            let _ = std::thread::Builder::new()
                .name(format!("sbk-console-stats-{}", self.n))
                .spawn(move || count_in_background(weak));
            opened
        });
        *lock(&self.state) = match &opened {
            Ok(o) => State::Open(o.clone()),
            Err(e) => State::Failed(e.clone(), Instant::now()),
        };
        opened
    }

    /// Closes the repository: its prefetchers and background count stop, the snapshots kept
    /// open are closed. Returns it, so that the caller can wait for the last reference (and
    /// with it the pin lock) to go.
    pub fn close(&self) -> Option<Arc<Opened>> {
        let State::Open(o) = std::mem::replace(&mut *lock(&self.state), State::Never) else {
            return None;
        };
        o.stopping.store(true, Ordering::Release);
        o.shared.stop();
        lock(&o.files).clear();
        Some(o)
    }
}

/// Counts the repository's figures whenever its snapshot set has changed, until the
/// repository is closed; closes snapshots kept open for browsing once idle.
fn count_in_background(opened: Weak<Opened>) {
    let mut counted: Option<Vec<SnapshotId>> = None;
    loop {
        let Some(o) = opened.upgrade() else {
            return;
        };
        if o.stopping.load(Ordering::Acquire) {
            return;
        }
        o.forget_idle_files();
        let ids: Vec<SnapshotId> = o.catalog().snaps.iter().map(|s| s.id).collect();
        if counted.as_ref() != Some(&ids) {
            let started = Instant::now();
            let figures = match sbk_engine::stats(&o.repo, &[]) {
                Ok((repo, per)) => Stats::Done {
                    repo,
                    unique: per
                        .into_iter()
                        .map(|s| (s.id, (s.unique_bytes, s.unique_stored)))
                        .collect(),
                    at: SystemTime::now(),
                    took: started.elapsed(),
                },
                Err(e) => Stats::Failed {
                    error: e.to_string(),
                    at: SystemTime::now(),
                },
            };
            *lock(&o.stats) = Arc::new(figures);
            counted = Some(ids);
        }
        drop(o);
        // Slept in steps, so that a closed repository's reference goes within a second.
        for _ in 0..STATS_EVERY.as_secs() {
            std::thread::sleep(Duration::from_secs(1));
            if opened
                .upgrade()
                .is_none_or(|o| o.stopping.load(Ordering::Acquire))
            {
                return;
            }
        }
    }
}
