//! What the reader tests share: the real tools that make the images, and reading a file whole.

use std::path::{Path, PathBuf};
use std::process::Command;

use sbk_diskfs::{Filesystem, Node};

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
