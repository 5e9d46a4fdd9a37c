//! What the reader tests share: the real tools that make the images, and reading a file whole.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::os::unix::fs::MetadataExt;

use sbk_diskfs::{lookup, Filesystem, Kind, Node};

/// The tool, or `None` (and the test says why) where it is missing; under CI=true a missing
/// tool fails the test instead.
pub fn tool(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{name} is missing"
    );
    eprintln!("skipped: {name} is missing");
    None
}

/// Runs a command, asserting success.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file's whole contents, read in odd-sized pieces (so that reads start and end inside
/// blocks and clusters).
#[allow(dead_code)] // each test binary uses what it needs
pub fn read_all(fs: &dyn Filesystem, n: &Node) -> Vec<u8> {
    let f = fs.open(n).unwrap();
    let mut got = vec![0xEEu8; n.size as usize + 10];
    let mut at = 0;
    while at < got.len() {
        let end = (at + 77_777).min(got.len());
        let k = f.read_at(at as u64, &mut got[at..end]).unwrap();
        if k == 0 {
            break;
        }
        at += k;
    }
    got.truncate(at);
    got
}

/// Every file and directory under `src` (from `rel`) is in `fs` with its type, contents and
/// mtime (within `mtime_slack` seconds: FAT keeps 2 s).
#[allow(dead_code)] // each test binary uses what it needs
pub fn compare_files(fs: &dyn Filesystem, src: &Path, rel: &str, mtime_slack: i64) {
    for e in std::fs::read_dir(src.join(rel.trim_start_matches('/'))).unwrap() {
        let e = e.unwrap();
        let path = format!("{rel}/{}", e.file_name().to_str().unwrap());
        let m = e.metadata().unwrap();
        let n = lookup(fs, path.as_bytes(), false).unwrap_or_else(|err| panic!("{path}: {err}"));
        if m.is_dir() {
            assert_eq!(n.kind, Kind::Dir, "{path}");
            compare_files(fs, src, &path, mtime_slack);
            continue;
        }
        assert_eq!((n.kind, n.size), (Kind::File, m.len()), "{path}");
        let off = (n.mtime.secs - m.mtime()).abs();
        assert!(
            off <= mtime_slack,
            "{path}: mtime {} vs {}",
            n.mtime.secs,
            m.mtime()
        );
        assert!(
            read_all(fs, &n) == std::fs::read(e.path()).unwrap(),
            "{path}: contents"
        );
    }
}
