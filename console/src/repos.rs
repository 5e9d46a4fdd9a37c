//! The repositories a console shows: each opened once (under a pin lock, which conflicts with
//! nothing, so the console never holds up a backup or a prune), with a catalog of its snapshots
//! kept in memory and brought up to date by listing, and figures that need every snapshot's
//! trees computed in the background.
//!
//! A repository that cannot be opened is shown with its error and tried again at most every
//! [`RETRY_OPEN`]; the others work meanwhile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use sbk_engine::{RepoStats, ServePins, ServeShared, SnapshotFiles};
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
    pub fn by_source(&self) -> Vec<(String, Vec<Arc<Snap>>)> {
        let mut map: std::collections::BTreeMap<String, Vec<Arc<Snap>>> = Default::default();
        for s in &self.snaps {
            map.entry(s.source.clone()).or_default().push(s.clone());
        }
        map.into_iter().collect()
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

/// A repository, open.
pub struct Opened {
    /// The repository.
    pub repo: Arc<Repository>,
    /// The chunk cache and readers every export and file read share.
    pub shared: Arc<ServeShared>,
    /// Pins of exported snapshots, under the console's pin lock.
    pub pins: Arc<ServePins>,
    catalog: Mutex<(Option<Instant>, Arc<Catalog>)>,
    stats: Mutex<Arc<Stats>>,
    files: Mutex<Vec<(SnapshotId, Arc<SnapshotFiles>)>>,
}

impl Opened {
    /// The snapshot catalog, listed again when older than [`CATALOG_FRESH`] (new manifests
    /// come from the manifest cache or the repository; those gone are dropped).
    pub fn catalog(&self) -> Arc<Catalog> {
        let mut held = self.catalog.lock().expect("no thread panics holding this");
        if held.0.is_some_and(|t| t.elapsed() < CATALOG_FRESH) {
            return held.1.clone();
        }
        let fresh = refresh(&self.repo, &held.1);
        held.0 = Some(Instant::now());
        held.1 = Arc::new(fresh);
        held.1.clone()
    }

    /// The background figures, as far as they are.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats
            .lock()
            .expect("no thread panics holding this")
            .clone()
    }

    /// Snapshot `id`'s disk, open for file-level reads (kept open for the next request).
    pub fn files(&self, id: SnapshotId) -> Result<Arc<SnapshotFiles>, String> {
        let mut kept = self.files.lock().expect("no thread panics holding this");
        if let Some(i) = kept.iter().position(|(k, _)| *k == id) {
            let hit = kept.remove(i);
            kept.push(hit.clone());
            return Ok(hit.1);
        }
        let files =
            Arc::new(SnapshotFiles::open(self.shared.clone(), id).map_err(|e| e.to_string())?);
        if kept.len() >= FILES_KEPT {
            kept.remove(0);
        }
        kept.push((id, files.clone()));
        Ok(files)
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
        }
    }

    /// The open repository, opening it if it is not (a failure is kept, and shown, for
    /// [`RETRY_OPEN`] before the next try).
    pub fn open(&self) -> Result<Arc<Opened>, String> {
        let mut state = self.state.lock().expect("no thread panics holding this");
        match &*state {
            State::Open(o) => return Ok(o.clone()),
            State::Failed(e, at) if at.elapsed() < RETRY_OPEN => return Err(e.clone()),
            _ => {}
        }
        match (self.spec.open)() {
            Ok((repo, lock)) => {
                let repo = Arc::new(repo);
                let location = self.spec.location.clone();
                let log: Log = Arc::new(move |m: &str| eprintln!("sbk console: {location}: {m}"));
                let opened = Arc::new(Opened {
                    shared: ServeShared::new(repo.clone(), CHUNK_CACHE, 1, log.clone()),
                    pins: ServePins::new(repo.clone(), lock, log),
                    repo,
                    catalog: Mutex::new((None, Arc::new(Catalog::default()))),
                    stats: Mutex::new(Arc::new(Stats::Pending)),
                    files: Mutex::new(Vec::new()),
                });
                let weak = Arc::downgrade(&opened);
                let _ = std::thread::Builder::new()
                    .name(format!("sbk-console-stats-{}", self.n))
                    .spawn(move || count_in_background(weak));
                *state = State::Open(opened.clone());
                Ok(opened)
            }
            Err(e) => {
                *state = State::Failed(e.clone(), Instant::now());
                Err(e)
            }
        }
    }

    /// Stops what the open repository runs (its prefetchers); the lock goes with the last
    /// reference.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("no thread panics holding this");
        if let State::Open(o) = &*state {
            o.shared.stop();
        }
        *state = State::Never;
    }
}

/// Counts the repository's figures whenever its snapshot set has changed, until the
/// repository is closed.
fn count_in_background(opened: Weak<Opened>) {
    let mut counted: Option<Vec<SnapshotId>> = None;
    loop {
        let Some(o) = opened.upgrade() else {
            return;
        };
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
            *o.stats.lock().expect("no thread panics holding this") = Arc::new(figures);
            counted = Some(ids);
        }
        drop(o);
        std::thread::sleep(STATS_EVERY);
    }
}
