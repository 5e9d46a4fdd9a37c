//! The repository: a directory holding a config, packs, an index and snapshot manifests.
//!
//! ```text
//! config                     immutable after init (docs/format.md, "config")
//! packs/<2 hex>/<32 hex>     sealed pack files; <…>.tmp while being written
//! index/                     sled database: chunk id -> pack, offset, lengths (a cache)
//! snapshots/<64 hex>         manifests, named by the BLAKE3 hash of their bytes
//! ```

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::blob::{decode_blob_into, BlobKind};
use crate::config::{RepoConfig, FORMAT_VERSION};
use crate::error::{DecodeError, Result, StoreError};
use crate::id::{to_hex, ChunkId, PackId, SnapshotId};
use crate::index::{Index, IndexEntry};
use crate::manifest::{decode_tree, Extent, Manifest};
use crate::pack::{pack_path, read_blob, read_trailer, PackEntry};

/// What `init` may choose; everything else is derived or random.
#[derive(Debug, Clone, Copy)]
pub struct InitOptions {
    /// Average chunk size (a power of two, 64 KiB..4 MiB).
    pub chunk_avg: u32,
    /// zstd level, 1..=19.
    pub zstd_level: u32,
}

/// Default average chunk size. Chosen by measurement (docs/benchmarks.md, "Choosing the
/// defaults"): after a 2% change, 256 KiB chunks store 1.7x less new data than 1 MiB chunks, at
/// the same backup throughput and 250 KiB of metadata per 4 GiB snapshot.
pub const DEFAULT_CHUNK_AVG: u32 = 256 << 10;

/// Default zstd level: level 1 backs up 25-30% faster than level 3 for about 6% more stored
/// bytes on a disk image (docs/benchmarks.md).
pub const DEFAULT_ZSTD_LEVEL: u32 = 1;

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_avg: DEFAULT_CHUNK_AVG,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// What bringing the index up to date with the packs found.
#[derive(Debug, Clone, Default)]
pub struct RebuildReport {
    /// Packs whose trailers were read (packs new to this index slot).
    pub packs: usize,
    /// Blobs indexed.
    pub blobs: usize,
    /// Packs that could not be read, with the reason (left out, tried again next time).
    pub damaged: Vec<(PathBuf, String)>,
    /// Packs the index knew that are gone, with the blobs it knew in them (now dropped from the
    /// index, so that no backup refers to them).
    pub vanished: Vec<(PackId, Vec<ChunkId>)>,
    /// True when the index directory was missing altogether.
    pub was_missing: bool,
}

/// An open repository.
pub struct Repository {
    path: PathBuf,
    config: RepoConfig,
    index: Index,
    caught_up: RebuildReport,
    open_packs: Mutex<HashMap<PackId, Arc<File>>>,
}

/// Fsyncs a directory, so that entries created, renamed or removed in it survive a power loss.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Writes `bytes` to `path` atomically: a temporary name in the same directory, fsync, rename,
/// fsync of the directory. Readers see the old state or the whole new file, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .expect("atomic writes target a file in a directory");
    let name = path
        .file_name()
        .expect("atomic writes target a named file")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |e| StoreError::io(&tmp, e);
    let mut f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    fsync_dir(dir)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn random<const N: usize>(path: &Path) -> Result<[u8; N]> {
    crate::id::random_bytes().map_err(|e| StoreError::io(path, e))
}

impl Repository {
    /// Creates a repository at `path` (a new or empty directory, made mode 0700).
    pub fn init(path: &Path, opts: InitOptions) -> Result<RepoConfig> {
        // Parameters first: a bad one is the operator's typo, whatever the directory holds.
        let avg = opts.chunk_avg;
        if !avg.is_power_of_two() || !(64 << 10..=4 << 20).contains(&avg) {
            return Err(StoreError::InvalidParameter(format!(
                "chunk size {avg} must be a power of two from 64 KiB to 4 MiB"
            )));
        }
        let io = |p: &Path, e| StoreError::io(p, e);
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| io(path, e))?;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(StoreError::InitRefused {
                    path: path.to_owned(),
                    reason: "it is a file, not a directory".into(),
                })
            }
            Err(e) => return Err(io(path, e)),
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|e| io(path, e))?;
        let chunk_max = avg * 4;
        let config = RepoConfig {
            version: FORMAT_VERSION,
            repo_id: random(path)?,
            chunk_key: random(path)?,
            chunk_min: avg / 4,
            chunk_avg: avg,
            chunk_max,
            chunk_seed: u64::from_le_bytes(random(path)?),
            zero_min: 64 << 10,
            // Segments hold several maximal chunks, so the cut forced at each segment start
            // costs little dedup; 16 MiB keeps the pipeline's buffers small.
            segment_size: (16u64 << 20).max(4 * u64::from(chunk_max)),
            pack_target: 32 << 20,
            zstd_level: opts.zstd_level,
            created: now_unix(),
        };
        config
            .validate()
            .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
        let mkdir = |p: PathBuf| {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&p)
                .map_err(|e| io(&p, e))
        };
        mkdir(path.join("packs"))?;
        for i in 0..=255u8 {
            mkdir(path.join("packs").join(to_hex(&[i])))?;
        }
        fsync_dir(&path.join("packs"))?;
        mkdir(path.join("snapshots"))?;
        mkdir(path.join("locks"))?;
        Index::open_slot(&path.join("index"))?.flush()?;
        // The config is written last: its presence is what makes the directory a repository,
        // so a crash during init leaves a directory that init can be told to use again.
        write_atomic(&path.join("config"), &config.encode())?;
        Ok(config)
    }

    /// Opens the repository at `path`, with a free index cache slot brought up to date with the
    /// packs: packs the slot does not know are indexed from their trailers (all of them when the
    /// index was deleted, or for a new slot), and packs it knew that are gone are dropped from it
    /// (see [`Repository::index_report`]).
    pub fn open(path: &Path) -> Result<Self> {
        let config_path = path.join("config");
        let bytes = match fs::read(&config_path) {
            Ok(b) => b,
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::NotFound)
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                return Err(StoreError::NotARepository {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(StoreError::io(&config_path, e)),
        };
        let config = RepoConfig::decode(&bytes).map_err(|source| StoreError::Corrupt {
            path: config_path,
            what: "config",
            source,
        })?;
        let index_dir = path.join("index");
        let was_missing = !index_dir.exists();
        let index = Index::open_slot(&index_dir)?;
        let mut repo = Repository {
            path: path.to_owned(),
            config,
            index,
            caught_up: RebuildReport::default(),
            open_packs: Mutex::new(HashMap::new()),
        };
        repo.caught_up = repo.catch_up_index()?;
        repo.caught_up.was_missing = was_missing;
        Ok(repo)
    }

    /// What opening the repository did to bring the index up to date.
    pub fn index_report(&self) -> &RebuildReport {
        &self.caught_up
    }

    /// Indexes the packs the index slot does not know, and drops the ones it knows that are gone.
    pub fn catch_up_index(&self) -> Result<RebuildReport> {
        let mut report = RebuildReport::default();
        let known = self.index.packs()?;
        let on_disk = self.list_packs()?;
        let present: std::collections::HashSet<PackId> =
            on_disk.iter().map(|(id, _)| *id).collect();
        for (id, path) in on_disk.into_iter().filter(|(id, _)| !known.contains(id)) {
            match read_trailer(&path, id) {
                Ok(entries) => {
                    self.index.insert_pack(id, &entries)?;
                    report.packs += 1;
                    report.blobs += entries.len();
                }
                Err(e) => report.damaged.push((path, e.to_string())),
            }
        }
        let mut gone: Vec<PackId> = known
            .into_iter()
            .filter(|id| !present.contains(id))
            .collect();
        gone.sort();
        for id in gone {
            let ids = self.index.forget_pack(id)?;
            report.vanished.push((id, ids));
        }
        if report.packs > 0 || !report.vanished.is_empty() {
            self.index.flush()?;
        }
        Ok(report)
    }

    /// Clears the index slot and indexes every pack again.
    pub fn rebuild_index(&self) -> Result<RebuildReport> {
        self.index.clear()?;
        self.catch_up_index()
    }

    /// Every sealed pack: (id, path). Temporary files of unfinished packs are skipped.
    pub fn list_packs(&self) -> Result<Vec<(PackId, PathBuf)>> {
        let mut out = Vec::new();
        let packs = self.path.join("packs");
        for i in 0..=255u8 {
            let dir = packs.join(to_hex(&[i]));
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
                if let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<PackId>().ok())
                {
                    out.push((id, entry.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The repository directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The repository config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The id of a blob with these raw bytes: BLAKE3 keyed with the repository's key.
    pub fn blob_id(&self, raw: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.config.chunk_key, raw).as_bytes())
    }

    /// Path of a pack.
    pub fn pack_path(&self, id: PackId) -> PathBuf {
        pack_path(&self.path, id)
    }

    /// Looks a blob up in the index, failing when it is not there.
    pub fn locate(&self, id: &ChunkId) -> Result<IndexEntry> {
        self.index.get(id)?.ok_or(StoreError::BlobMissing(*id))
    }

    /// An open handle on a pack, shared between threads (positioned reads need no seeking).
    pub fn open_pack(&self, id: PackId) -> Result<Arc<File>> {
        let mut open = self
            .open_packs
            .lock()
            .expect("no thread panics holding this lock");
        if let Some(f) = open.get(&id) {
            return Ok(f.clone());
        }
        let path = self.pack_path(id);
        let f = Arc::new(File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::PackMissing {
                pack: id,
                path: path.clone(),
            },
            _ => StoreError::io(&path, e),
        })?);
        open.insert(id, f.clone());
        Ok(f)
    }

    /// Decodes the stored bytes of a blob into `out` (exactly `raw_len` long) and checks that
    /// they hash to the blob's id. Nothing unverified ever leaves this function.
    pub fn decode_verified(
        &self,
        pack: PackId,
        entry: &PackEntry,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        let corrupt = |detail: String| StoreError::BlobCorrupt {
            id: entry.id,
            pack,
            detail,
        };
        decode_blob_into(entry.compression, stored, out).map_err(|e| corrupt(e.to_string()))?;
        let got = self.blob_id(out);
        if got != entry.id {
            return Err(corrupt(format!("contents hash to {got}")));
        }
        Ok(())
    }

    /// Reads, decompresses and verifies one blob of the expected kind.
    pub fn read_blob(&self, id: &ChunkId, kind: BlobKind) -> Result<Vec<u8>> {
        self.read_blob_in(id, kind).map(|(_, raw)| raw)
    }

    /// [`Repository::read_blob`], also naming the pack it came from.
    fn read_blob_in(&self, id: &ChunkId, kind: BlobKind) -> Result<(PackId, Vec<u8>)> {
        let IndexEntry { pack, entry } = self.locate(id)?;
        if entry.kind != kind {
            return Err(StoreError::BlobCorrupt {
                id: *id,
                pack,
                detail: format!("is a {:?} blob, expected {kind:?}", entry.kind),
            });
        }
        let file = self.open_pack(pack)?;
        let stored = read_blob(&file, &self.pack_path(pack), &entry)?;
        let mut out = vec![0u8; entry.raw_len as usize];
        self.decode_verified(pack, &entry, &stored, &mut out)?;
        Ok((pack, out))
    }

    /// Reads a segment tree and decodes its extents, which must cover `segment_len` bytes.
    pub fn load_tree(&self, id: &ChunkId, segment_len: u64) -> Result<Vec<Extent>> {
        let (pack, raw) = self.read_blob_in(id, BlobKind::Tree)?;
        decode_tree(&raw, segment_len).map_err(|e| StoreError::BlobCorrupt {
            id: *id,
            pack,
            detail: format!("segment tree does not decode: {e}"),
        })
    }

    fn snapshot_path(&self, id: &SnapshotId) -> PathBuf {
        self.path.join("snapshots").join(id.to_hex())
    }

    /// Writes a manifest atomically and returns its id. The caller must have made every blob it
    /// refers to durable and indexed first (see docs/design.md, "write ordering").
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<SnapshotId> {
        let bytes = manifest.encode();
        let id = SnapshotId(*blake3::hash(&bytes).as_bytes());
        write_atomic(&self.snapshot_path(&id), &bytes)?;
        Ok(id)
    }

    /// Removes a snapshot's manifest (its data stays until prune). The directory is fsynced so
    /// that a forgotten snapshot does not come back after a power loss.
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let path = self.snapshot_path(id);
        fs::remove_file(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::SnapshotNotFound(id.to_hex()),
            _ => StoreError::io(&path, e),
        })?;
        fsync_dir(&self.path.join("snapshots"))
    }

    /// Removes a sealed pack. The caller must first have removed it from every index slot
    /// (see docs/design.md, "prune"), so that no backup can find its blobs any more.
    pub fn remove_pack(&self, id: PackId) -> Result<u64> {
        let path = self.pack_path(id);
        let len = fs::metadata(&path)
            .map_err(|e| StoreError::io(&path, e))?
            .len();
        self.open_packs
            .lock()
            .expect("no thread panics holding this lock")
            .remove(&id);
        fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
        fsync_dir(path.parent().expect("pack path has a parent"))?;
        Ok(len)
    }

    /// Removes leftovers of interrupted writes: `.tmp` packs and manifests. Only safe while no
    /// other process writes to the repository (under an exclusive lock). Returns bytes freed.
    pub fn remove_leftovers(&self) -> Result<u64> {
        let mut freed = 0;
        let mut dirs: Vec<PathBuf> = (0..=255u8)
            .map(|i| self.path.join("packs").join(to_hex(&[i])))
            .collect();
        dirs.push(self.path.join("snapshots"));
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.map_err(|e| StoreError::io(&dir, e))?.path();
                if path.extension().is_some_and(|e| e == "tmp") {
                    freed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                }
            }
        }
        Ok(freed)
    }

    /// Ids of every snapshot, sorted.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let dir = self.path.join("snapshots");
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
            if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Loads a manifest, checking that its bytes still hash to its id.
    pub fn load_manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let path = self.snapshot_path(id);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::SnapshotNotFound(id.to_hex()),
            _ => StoreError::io(&path, e),
        })?;
        let corrupt = |source| StoreError::Corrupt {
            path: path.clone(),
            what: "snapshot manifest",
            source,
        };
        let got = blake3::hash(&bytes);
        if got.as_bytes() != &id.0 {
            return Err(corrupt(DecodeError::ChecksumMismatch {
                got: got.to_hex().to_string(),
                expected: id.to_hex(),
            }));
        }
        Manifest::decode(&bytes).map_err(corrupt)
    }

    /// Every snapshot with its manifest (or the error that kept it from loading), oldest first.
    pub fn snapshots(&self) -> Result<Vec<(SnapshotId, Result<Manifest>)>> {
        let mut all: Vec<_> = self
            .snapshot_ids()?
            .into_iter()
            .map(|id| (id, self.load_manifest(&id)))
            .collect();
        all.sort_by_key(|(id, m)| (m.as_ref().map(|m| m.time_ns).unwrap_or(i64::MIN), *id));
        Ok(all)
    }

    /// Resolves `latest`, a full id or a unique prefix of one.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<SnapshotId> {
        if spec == "latest" {
            return self
                .snapshots()?
                .into_iter()
                .rev()
                .find(|(_, m)| m.is_ok())
                .map(|(id, _)| id)
                .ok_or_else(|| StoreError::SnapshotNotFound(spec.to_owned()));
        }
        let spec_lc = spec.to_ascii_lowercase();
        if spec_lc.is_empty() || !spec_lc.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::SnapshotNotFound(spec.to_owned()));
        }
        let matches: Vec<_> = self
            .snapshot_ids()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&spec_lc))
            .collect();
        match matches.len() {
            0 => Err(StoreError::SnapshotNotFound(spec.to_owned())),
            1 => Ok(matches[0]),
            count => Err(StoreError::AmbiguousSnapshot {
                prefix: spec.to_owned(),
                count,
            }),
        }
    }
}
