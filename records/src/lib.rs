//! Run records: `sbk run`, `sbk verify` and `sbk prune` each leave one JSON record per run (when
//! it started and ended, how each source went, the tail of each hook's output; what verify
//! found; the stored size a prune left) under a state directory, so that an operator, and the
//! console, can see what happened last night and the nights before. The last [`KEEP`] records
//! of each job or repository are kept.
//!
//! Layout: `STATE_DIR/runs/job/<job>/`, `STATE_DIR/runs/verify/<repository>/` and
//! `STATE_DIR/runs/prune/<repository>/`, each record
//! `<start, ns since the epoch, 20 digits>.json`, folders mode 0700 and files 0600 (hook output
//! may say more than it should). Each record is written to a temporary file, fsynced and
//! renamed, so a reader never sees half of one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Records kept per job.
pub const KEEP: usize = 100;

/// Bytes of a hook's output a record keeps: its end, where the error usually is.
pub const TAIL_BYTES: usize = 4096;

/// The state directory: `explicit` (`--state-dir`, else a job file's `state_dir`), else
/// `$SBK_STATE_DIR`, else `/var/lib/sbk` as root, else `$XDG_STATE_HOME/sbk` or
/// `~/.local/state/sbk`; `None` without a home.
pub fn state_dir(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = explicit {
        return Some(d.to_owned());
    }
    let var = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("SBK_STATE_DIR") {
        return Some(d);
    }
    if rustix::process::geteuid().is_root() {
        return Some(PathBuf::from("/var/lib/sbk"));
    }
    var("XDG_STATE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".local/state")))
        .map(|d| d.join("sbk"))
}

/// A job's name as a folder name: its letters, digits, `.`, `_` and `-`; anything else `_`.
pub fn group_name(job: &str) -> String {
    let name: String = job
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect();
    match name.trim_start_matches('.') {
        "" => "_".into(),
        n => n.to_owned(),
    }
}

/// The last [`TAIL_BYTES`] of `output`, as text (a cut character is dropped).
pub fn tail(output: &[u8]) -> String {
    let start = output.len().saturating_sub(TAIL_BYTES);
    let text = String::from_utf8_lossy(&output[start..]);
    text.trim_start_matches('\u{fffd}').to_owned()
}

/// Writes `record` as the record of a run of `kind` (`job`, `verify`) named `name` that
/// started at `started_ns`, then removes the oldest records past [`KEEP`]. Returns the record's
/// path.
pub fn write(
    dir: &Path,
    kind: &str,
    name: &str,
    started_ns: i64,
    record: &serde_json::Value,
) -> std::io::Result<PathBuf> {
    let folder = dir.join("runs").join(kind).join(group_name(name));
    if !folder.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&folder)?;
        // The new folders durable in theirs, so that the first record survives a crash.
        for d in [&folder, &folder.join(".."), &dir.join("runs")] {
            std::fs::File::open(d)?.sync_all()?;
        }
    }
    let name = format!("{:020}.json", started_ns.max(0));
    let path = folder.join(&name);
    let tmp = folder.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        serde_json::to_writer_pretty(&mut f, record)?;
        f.write_all(b"\n")?;
        // Durable before it is named: a crash leaves the old records and a temporary file.
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    // The rename durable too, so that the record survives a crash right after the run.
    std::fs::File::open(&folder)?.sync_all()?;
    let mut all = names(&folder)?;
    if all.len() > KEEP {
        all.sort();
        for old in &all[..all.len() - KEEP] {
            // Another run of the same job may have removed it first.
            match std::fs::remove_file(folder.join(old)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(path)
}

/// The record files of a folder (not temporary ones).
fn names(folder: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(folder)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") && !name.starts_with('.') {
            out.push(name);
        }
    }
    Ok(out)
}

/// The records of the runs of `kind` named `name`, oldest first; one that does not parse is
/// skipped.
pub fn read(dir: &Path, kind: &str, name: &str) -> std::io::Result<Vec<serde_json::Value>> {
    let folder = dir.join("runs").join(kind).join(group_name(name));
    let mut all = match names(&folder) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    all.sort();
    Ok(all
        .iter()
        .filter_map(|n| std::fs::read(folder.join(n)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect())
}

/// Bytes as people read them, in binary units with `decimals` digits after the point
/// (`1.50 GiB`); below a KiB, whole bytes (`512 B`). The command line and the console both
/// show figures this way.
pub fn bytes(n: u64, decimals: usize) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.decimals$} {}", UNITS[unit])
    }
}

/// Nanoseconds since the epoch as RFC 3339 (whole seconds, UTC), as records say times.
pub fn time(ns: i64) -> String {
    let st = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(st).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hundred_records_are_kept_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..(KEEP as i64 + 5) {
            write(
                dir.path(),
                "job",
                "night/ly",
                i,
                &serde_json::json!({ "n": i }),
            )
            .unwrap();
        }
        let kept = read(dir.path(), "job", "night/ly").unwrap();
        assert_eq!(kept.len(), KEEP);
        assert_eq!(kept[0]["n"], 5);
        assert_eq!(kept[KEEP - 1]["n"], KEEP as i64 + 4);
        let folder = dir.path().join("runs/job/night_ly");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let file = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap();
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert!(read(dir.path(), "job", "none").unwrap().is_empty());
    }

    #[test]
    fn tails_and_names() {
        let long = vec![b'x'; TAIL_BYTES + 10];
        assert_eq!(tail(&long).len(), TAIL_BYTES);
        assert_eq!(tail(b"short"), "short");
        assert_eq!(group_name("../etc"), "_etc");
        assert_eq!(group_name(".."), "_");
        assert_eq!(group_name("db-1.prod"), "db-1.prod");
    }
}
