//! `scale-repo`: writes a valid sbk repository of N distinct chunks straight through the store,
//! without chunking a source, so that every command can be measured at 10^6..10^8 chunks
//! (docs/benchmarks.md, "Scale").
//!
//! ```text
//! scale-repo --repo DIR|s3://B/P --chunks N [--snapshots S] [--sources K] [--chunk-bytes B]
//!            [--change PCT] [--encryption none]
//! scale-repo --expect DIR|s3://B/P SNAPSHOT
//! ```
//!
//! S snapshots of K sources (S/K each) refer together to N distinct chunks (a little more when N
//! does not divide evenly: the JSON report says how many). Each chunk is a deterministic, unique,
//! compressible pattern of `--chunk-bytes` (default 4 KiB: ids hash whole chunks, so 256 KiB
//! chunks would mean hashing 24 TiB at 10^8). Packs roll every 256 blobs and an index file names
//! every 64 packs, so pack and index-file counts match a real repository of 256 KiB chunks. Each
//! snapshot of a source lacks `--change` percent of its predecessor's chunks (evenly spread
//! positions, rotating); no snapshot is over 4 GiB. Encrypted with `SBK_PASSWORD` (the default
//! Argon2id profile, or `SBK_TEST_KDF=weak`) unless `--encryption none`.
//!
//! `--expect` prints, alone on stdout, the sha256 of the image a snapshot must restore to (it is
//! regenerated from the parameters the snapshot's tag records), so that a restore can be checked
//! with `sha256sum`. The writer prints its own timings as JSON.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use sbk_store::{
    encode_tree, Backend, BackupFigures, BlobKind, ChunkId, EncodedBlob, Extent, InitOptions,
    KdfParams, LocalBackend, LockKind, LockTiming, Manifest, PackEntry, PackId, Repository,
};

/// Blobs per pack: 256 chunks of 256 KiB make a real repository's 64 MiB... its 32 MiB packs
/// hold about 128 to 256 compressed chunks; 256 keeps pack counts on the real side.
const BLOBS_PER_PACK: usize = 256;
/// Packs per index file, as the packer names them.
const PACKS_PER_INDEX: usize = 64;
/// Largest snapshot.
const MAX_SNAPSHOT: u64 = 4 << 30;
/// The tag prefix that records a snapshot's parameters for `--expect`.
const TAG: &str = "scale-repo:";

/// What to write.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Chunks per snapshot.
    len: u64,
    /// Every `stride`-th position changes from one snapshot to the next (0: none do).
    stride: u64,
    /// Snapshots per source.
    per_source: u64,
    /// Bytes per chunk.
    chunk_bytes: u64,
    /// Distinct chunks per source.
    per_source_chunks: u64,
}

impl Shape {
    fn new(
        chunks: u64,
        snapshots: u64,
        sources: u64,
        change_pct: f64,
        chunk_bytes: u64,
    ) -> Result<Shape, String> {
        if sources == 0 || snapshots < sources || !snapshots.is_multiple_of(sources) {
            return Err(
                "--snapshots must be a multiple of --sources (each source has as many)".into(),
            );
        }
        let per_source = snapshots / sources;
        let stride = if change_pct <= 0.0 {
            0
        } else {
            (100.0 / change_pct).round().max(1.0) as u64
        };
        // Distinct chunks of one source: len, plus len / stride new ones per later snapshot.
        let factor = 1.0
            + (per_source - 1) as f64
                * if stride == 0 {
                    0.0
                } else {
                    1.0 / stride as f64
                };
        let len = ((chunks as f64 / sources as f64) / factor).ceil().max(1.0) as u64;
        if len * chunk_bytes > MAX_SNAPSHOT {
            return Err(format!(
                "each snapshot would hold {} GiB (over 4 GiB): give more --sources or --snapshots, or a higher --change",
                (len * chunk_bytes) >> 30
            ));
        }
        let mut s = Shape {
            len,
            stride,
            per_source,
            chunk_bytes,
            per_source_chunks: 0,
        };
        s.per_source_chunks = len + (1..per_source).map(|j| s.changed(j)).sum::<u64>();
        Ok(s)
    }

    /// Positions that snapshot `j` (1 and later) takes new chunks at: `p % stride == j % stride`.
    fn changed(&self, j: u64) -> u64 {
        if self.stride == 0 {
            return 0;
        }
        let r = j % self.stride;
        (self.len + self.stride - 1 - r) / self.stride
    }

    /// The chunk number at position `p` of snapshot `j` of source `k`.
    fn chunk(&self, k: u64, j: u64, p: u64) -> u64 {
        let base = k * self.per_source_chunks;
        if self.stride == 0 {
            return base + p;
        }
        let r = p % self.stride;
        // The latest snapshot j' <= j that took a new chunk here (j' % stride == r), if any.
        let back = (j + self.stride - r) % self.stride;
        if back >= j {
            return base + p;
        }
        let last = j - back;
        let before: u64 = (1..last).map(|i| self.changed(i)).sum();
        base + self.len + before + p / self.stride
    }

    fn tag(&self, k: u64, j: u64) -> String {
        format!(
            "{TAG}{k},{j},{},{},{},{},{}",
            self.len, self.stride, self.per_source, self.chunk_bytes, self.per_source_chunks
        )
    }

    fn from_tag(tag: &str) -> Option<(Shape, u64, u64)> {
        let v: Vec<u64> = tag
            .strip_prefix(TAG)?
            .split(',')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let [k, j, len, stride, per_source, chunk_bytes, per_source_chunks] = v[..] else {
            return None;
        };
        Some((
            Shape {
                len,
                stride,
                per_source,
                chunk_bytes,
                per_source_chunks,
            },
            k,
            j,
        ))
    }
}

/// The bytes of chunk number `c`: its number and its complement, repeated (unique, and
/// compressible as real data is, not as zeros are).
fn chunk_bytes(c: u64, len: usize, out: &mut Vec<u8>) {
    out.clear();
    let unit: Vec<u8> = c
        .to_le_bytes()
        .into_iter()
        .chain((!c).to_le_bytes())
        .collect();
    while out.len() < len {
        out.extend_from_slice(&unit[..(len - out.len()).min(16)]);
    }
}

/// Packs filled in order and named by index files every [`PACKS_PER_INDEX`] packs.
struct Writer<'a> {
    repo: &'a Repository,
    done: Vec<(PackId, Vec<PackEntry>)>,
    packs: u64,
    index_files: u64,
}

impl Writer<'_> {
    fn pack(&mut self, blobs: &[EncodedBlob]) -> sbk_store::Result<()> {
        let mut p = self.repo.new_pack()?;
        for b in blobs {
            p.add(b)?;
        }
        self.done.push(p.finish()?);
        self.packs += 1;
        if self.done.len() == PACKS_PER_INDEX {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> sbk_store::Result<()> {
        if !self.done.is_empty() {
            self.repo.write_index_file(std::mem::take(&mut self.done))?;
            self.index_files += 1;
        }
        Ok(())
    }
}

fn backend(at: &str) -> Result<Arc<dyn Backend>, String> {
    if sbk_s3::S3Location::is_s3(at) {
        let loc = sbk_s3::S3Location::parse(at)?;
        return Ok(Arc::new(
            sbk_s3::S3Backend::new(loc).map_err(|e| e.to_string())?,
        ));
    }
    Ok(Arc::new(LocalBackend::new(Path::new(at))))
}

fn open(at: &str) -> Result<Repository, String> {
    Repository::open(backend(at)?, &mut || {
        std::env::var("SBK_PASSWORD")
            .map_err(|_| sbk_store::StoreError::NoPassword("set SBK_PASSWORD".into()))
    })
    .map_err(|e| e.to_string())
}

fn kdf() -> KdfParams {
    match std::env::var("SBK_TEST_KDF").as_deref() {
        Ok("weak") => KdfParams::weak(),
        _ => KdfParams::default(),
    }
}

/// Every distinct chunk, in number order, a pack of 256 at a time (encoded in parallel).
fn write_chunks(w: &mut Writer<'_>, total: u64, chunk_size: usize) -> sbk_store::Result<()> {
    let repo = w.repo;
    let mut c = 0;
    while c < total {
        let n = (total - c).min(BLOBS_PER_PACK as u64);
        let blobs: Vec<EncodedBlob> = (c..c + n)
            .into_par_iter()
            .map_init(Vec::new, |buf, i| {
                chunk_bytes(i, chunk_size, buf);
                repo.encode_blob(repo.blob_id(buf), BlobKind::Data, buf)
            })
            .collect::<sbk_store::Result<_>>()?;
        w.pack(&blobs)?;
        c += n;
    }
    Ok(())
}

/// The segment trees of every snapshot (shared ones stored once), then the index files.
/// Returns each snapshot's (source, number, trees), and how many distinct trees there are.
#[allow(clippy::type_complexity)]
fn write_trees(
    w: &mut Writer<'_>,
    shape: &Shape,
    sources: u64,
) -> sbk_store::Result<(Vec<(u64, u64, Vec<ChunkId>)>, usize)> {
    let repo = w.repo;
    let cb = shape.chunk_bytes as usize;
    let per_seg = (repo.config().segment_size / shape.chunk_bytes).max(1);
    let mut trees_of = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut pending = Vec::new();
    let mut buf = Vec::new();
    for k in 0..sources {
        for j in 0..shape.per_source {
            let mut trees = Vec::new();
            let mut p = 0;
            while p < shape.len {
                let end = (p + per_seg).min(shape.len);
                let extents: Vec<Extent> = (p..end)
                    .map(|q| {
                        chunk_bytes(shape.chunk(k, j, q), cb, &mut buf);
                        Extent::Data {
                            id: repo.blob_id(&buf),
                            len: cb as u32,
                        }
                    })
                    .collect();
                let raw = encode_tree(&extents);
                let id: ChunkId = repo.blob_id(&raw);
                if seen.insert(id) {
                    pending.push(repo.encode_blob(id, BlobKind::Tree, &raw)?);
                    if pending.len() == BLOBS_PER_PACK {
                        w.pack(&std::mem::take(&mut pending))?;
                    }
                }
                trees.push(id);
                p = end;
            }
            trees_of.push((k, j, trees));
        }
    }
    if !pending.is_empty() {
        w.pack(&pending)?;
    }
    w.flush()?;
    Ok((trees_of, seen.len()))
}

/// The manifests, a day apart per snapshot of a source, each after its parent (and after the
/// index files that name everything they refer to).
fn write_manifests(
    repo: &Repository,
    shape: &Shape,
    trees_of: Vec<(u64, u64, Vec<ChunkId>)>,
) -> sbk_store::Result<()> {
    let now = sbk_store::unix_now_ns();
    let day = 86_400_000_000_000i64;
    let mut parents = std::collections::HashMap::new();
    for (k, j, trees) in trees_of {
        let m = Manifest {
            time_ns: now - (shape.per_source - j) as i64 * day,
            source: format!("scale-{k}"),
            host: "scale".into(),
            tags: vec![shape.tag(k, j)],
            size: shape.len * shape.chunk_bytes,
            segment_size: repo.config().segment_size,
            parent: parents.get(&k).copied(),
            figures: BackupFigures {
                chunks: shape.len,
                ..Default::default()
            },
            trees,
            extensions: Vec::new(),
        };
        let id = repo.write_manifest(&m)?;
        parents.insert(k, id);
    }
    Ok(())
}

/// Writes the repository; returns the JSON report.
fn write(
    at: &str,
    chunks: u64,
    snapshots: u64,
    sources: u64,
    chunk_size: u64,
    change: f64,
    encrypt: bool,
) -> Result<serde_json::Value, String> {
    let shape = Shape::new(chunks, snapshots, sources, change, chunk_size)?;
    let started = Instant::now();
    let encryption = if encrypt {
        let pw = std::env::var("SBK_PASSWORD")
            .map_err(|_| "set SBK_PASSWORD, or give --encryption none")?;
        Some((pw, kdf()))
    } else {
        None
    };
    let err = |e: sbk_store::StoreError| e.to_string();
    let b = backend(at)?;
    let init = InitOptions {
        encryption,
        ..InitOptions::default()
    };
    Repository::init(b.as_ref(), init).map_err(err)?;
    let repo = open(at)?;
    let _lock = repo
        .lock(LockKind::Exclusive, "scale-repo", LockTiming::default())
        .map_err(err)?;
    let mut w = Writer {
        repo: &repo,
        done: Vec::new(),
        packs: 0,
        index_files: 0,
    };
    let total = sources * shape.per_source_chunks;
    write_chunks(&mut w, total, chunk_size as usize).map_err(err)?;
    let data_s = started.elapsed().as_secs_f64();
    let (trees_of, trees) = write_trees(&mut w, &shape, sources).map_err(err)?;
    let trees_s = started.elapsed().as_secs_f64() - data_s;
    write_manifests(&repo, &shape, trees_of).map_err(err)?;
    let total_s = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "chunks": total,
        "chunk_bytes": chunk_size,
        "snapshots": snapshots,
        "sources": sources,
        "chunks_per_snapshot": shape.len,
        "change_percent": change,
        "packs": w.packs,
        "index_files": w.index_files,
        "trees": trees,
        "seconds": { "data": data_s, "trees": trees_s, "manifests": total_s - data_s - trees_s, "total": total_s },
    }))
}

/// The sha256 of the image `snapshot` restores to, from the parameters its tag records.
fn expect(at: &str, snapshot: &str) -> Result<String, String> {
    let repo = open(at)?;
    let id = repo.resolve_snapshot(snapshot).map_err(|e| e.to_string())?;
    let m = repo.load_manifest(&id).map_err(|e| e.to_string())?;
    let (shape, k, j) = m
        .tags
        .iter()
        .find_map(|t| Shape::from_tag(t))
        .ok_or_else(|| format!("snapshot {id} was not written by scale-repo"))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = Vec::new();
    for p in 0..shape.len {
        chunk_bytes(shape.chunk(k, j, p), shape.chunk_bytes as usize, &mut buf);
        ctx.update(&buf);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn usage() -> ! {
    eprintln!("usage: scale-repo --repo DIR --chunks N [--snapshots S] [--sources K] [--chunk-bytes B] [--change PCT] [--encryption none]\n       scale-repo --expect DIR SNAPSHOT");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--expect") {
        let [_, at, snap] = &args[..] else { usage() };
        match expect(at, snap) {
            Ok(hex) => println!("{hex}"),
            Err(e) => {
                eprintln!("scale-repo: {e}");
                std::process::exit(1)
            }
        }
        return;
    }
    let mut repo = None;
    let (mut chunks, mut snapshots, mut sources, mut chunk_size, mut change, mut encrypt) =
        (None, 10u64, 1u64, 4096u64, 10.0f64, true);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--repo" => repo = Some(val()),
            "--chunks" => chunks = Some(num(val())),
            "--snapshots" => snapshots = num(val()),
            "--sources" => sources = num(val()),
            "--chunk-bytes" => chunk_size = num(val()),
            "--change" => change = val().parse().unwrap_or_else(|_| usage()),
            "--encryption" => encrypt = val() != "none",
            _ => usage(),
        }
    }
    let (Some(repo), Some(chunks)) = (repo, chunks) else {
        usage()
    };
    if !(512..=(1 << 20)).contains(&chunk_size) || chunk_size % 512 != 0 {
        eprintln!("scale-repo: --chunk-bytes must be a multiple of 512 from 512 to 1 MiB");
        std::process::exit(2)
    }
    match write(
        &repo, chunks, snapshots, sources, chunk_size, change, encrypt,
    ) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("scale-repo: {e}");
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_numbers_are_distinct_per_snapshot_and_cover_the_total() {
        let s = Shape::new(10_000, 6, 2, 10.0, 4096).unwrap();
        let mut all = std::collections::HashSet::new();
        for k in 0..2 {
            for j in 0..s.per_source {
                let snap: std::collections::HashSet<u64> =
                    (0..s.len).map(|p| s.chunk(k, j, p)).collect();
                assert_eq!(snap.len() as u64, s.len, "a snapshot's chunks are distinct");
                all.extend(snap);
            }
        }
        assert_eq!(
            all.len() as u64,
            2 * s.per_source_chunks,
            "every chunk written is used"
        );
        assert!(all.iter().all(|&c| c < 2 * s.per_source_chunks));
        assert!(all.len() >= 10_000 && all.len() < 10_100, "{}", all.len());
        // A snapshot lacks about 10% of its predecessor's chunks.
        let a: std::collections::HashSet<u64> = (0..s.len).map(|p| s.chunk(0, 1, p)).collect();
        let b: std::collections::HashSet<u64> = (0..s.len).map(|p| s.chunk(0, 2, p)).collect();
        let new = b.difference(&a).count() as f64 / s.len as f64;
        assert!((0.09..0.11).contains(&new), "{new}");
        let (back, k, j) = Shape::from_tag(&s.tag(1, 2)).unwrap();
        assert_eq!((back.len, back.stride, k, j), (s.len, s.stride, 1, 2));
    }
}
