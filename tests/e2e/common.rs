//! Helpers shared by the scenarios: a temporary repository, the binary, data generators.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// A temporary directory holding a repository (`repo/`, or an `s3://` location with the
/// environment that reaches it) and whatever a test puts beside it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    /// Environment variables every command gets (the S3 endpoint and credentials).
    pub vars: Vec<(String, String)>,
}

/// Result of one `sbk` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Collects a finished `sbk` process.
    pub fn from_output(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout parsed as JSON.
    pub fn json(&self) -> Value {
        assert_eq!(self.code, 0, "sbk failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("bad JSON {e}: {}", self.stdout))
    }
}

/// The password of every test repository.
pub const PASSWORD: &str = "correct horse battery staple";

/// True when the suite runs against encrypted repositories: the default. `SBK_E2E_ENCRYPTION=none`
/// runs the same scenarios against unencrypted ones (scripts/test.sh runs both).
pub fn encrypted() -> bool {
    std::env::var("SBK_E2E_ENCRYPTION").as_deref() != Ok("none")
}

/// The `sbk` binary, with no repository in its environment and no cache directory of the
/// user's (a command that does not set one uses a temporary cache), the test password, and the
/// test-only key derivation that costs nothing.
pub fn sbk() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sbk"));
    c.env_remove("SBK_REPO")
        .env_remove("SBK_CACHE_DIR")
        .env_remove("SBK_TEST_FAULT")
        .env_remove("SBK_PASSWORD_FILE")
        .env_remove("SBK_PASSWORD_COMMAND")
        .env_remove("SBK_NEW_PASSWORD")
        .env("SBK_PASSWORD", PASSWORD)
        .env("SBK_TEST_KDF", "weak")
        .env("XDG_CACHE_HOME", std::env::temp_dir().join("sbk-e2e-cache"))
        // Run records of verify and run: never into /var/lib/sbk of the machine running tests.
        .env("SBK_STATE_DIR", std::env::temp_dir().join("sbk-e2e-state"));
    c
}

impl Env {
    /// A fresh repository with the given `init` arguments (small chunks make many of them).
    pub fn with_init(args: &[&str]) -> Env {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let repo = dir.path().join("repo");
        Env::init_at(dir, repo, Vec::new(), args)
    }

    /// A fresh repository at `repo` (a directory or an `s3://` location reached with `vars`).
    pub fn init_at(
        dir: tempfile::TempDir,
        repo: PathBuf,
        vars: Vec<(String, String)>,
        args: &[&str],
    ) -> Env {
        let env = Env { dir, repo, vars };
        let mode: &[&str] = if encrypted() || args.contains(&"--encryption") {
            &[]
        } else {
            &["--encryption", "none"]
        };
        let r = env.run(&[&["init"], mode, args].concat());
        assert_eq!(r.code, 0, "init failed: {}", r.stderr);
        env
    }

    /// A copy of the committed repository `tests/fixtures/NAME`, in a temporary folder.
    pub fn from_fixture(name: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let env = Env {
            repo: dir.path().join(name),
            dir,
            vars: Vec::new(),
        };
        sh(&format!(
            "cp -r {} {}",
            fixture(name).display(),
            env.repo.display()
        ));
        env
    }

    /// A fresh repository with 64 KiB chunks.
    pub fn new() -> Env {
        Env::with_init(&["--chunk-size", "64K"])
    }

    /// A path inside the temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The index cache directory every command of this environment uses.
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `sbk --repo REPO`, with this environment's cache directory.
    pub fn cmd(&self) -> Command {
        let mut c = sbk();
        c.arg("--repo")
            .arg(&self.repo)
            .env("SBK_CACHE_DIR", self.cache())
            .envs(self.vars.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs `sbk --repo REPO ARGS…`.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from_output(self.cmd().args(args).output().expect("sbk runs"))
    }

    /// Opens the repository in this process, with its index loaded (through a temporary
    /// cache, so that the test's own cache directory is left as the commands left it).
    pub fn open(&self) -> sbk_store::Repository {
        sbk_store::Repository::open_local(
            &self.repo,
            &sbk_store::CacheLocation::Temporary,
            Some(PASSWORD),
        )
        .expect("the repository opens")
    }

    /// Backs up `source` and returns the JSON record of its snapshot.
    pub fn backup(&self, source: &Path, extra: &[&str]) -> Value {
        let r = self.run(&[&["backup", "--json", source.to_str().unwrap()], extra].concat());
        r.json()[0].clone()
    }

    /// Restores `snapshot` to `target`, asserting success.
    pub fn restore(&self, snapshot: &str, target: &Path, extra: &[&str]) {
        let r = self.run(&[&["restore", snapshot, target.to_str().unwrap()], extra].concat());
        assert_eq!(r.code, 0, "restore failed: {}", r.stderr);
    }

    /// Every file of the repository with its bytes: two equal states mean a command changed
    /// nothing.
    pub fn state(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.repo, &mut out);
        out
    }

    /// Pack files, sealed (`.tmp` = false) or being written (true), by name only.
    pub fn pack_files(&self, tmp: bool) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.repo.join("packs")).unwrap() {
            for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                if p.extension().is_some_and(|e| e == "tmp") == tmp {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Sealed pack files.
    pub fn packs(&self) -> Vec<PathBuf> {
        self.pack_files(false)
    }
}

/// Every file below `dir`.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_below(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Deterministic pseudo-random bytes, shared with the benches.
pub use sbk_benches::random;

/// Data that compresses and dedups well: a short pattern repeated with a counter.
pub fn repetitive(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("block {:08} of a repetitive test image\n", i / 100).as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// True when this process may use losetup and mount (root, and the tools present).
pub fn can_use_devices() -> Result<(), String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        });
    if uid.as_deref() != Some("0") {
        return Err("not running as root".into());
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Err("losetup is not installed".into());
    }
    Ok(())
}

/// Runs a shell command, asserting success, and returns its stdout.
pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Asserts that two files hold the same bytes, naming the first difference.
pub fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

/// A lock that looks live: held, as far as anyone can tell, by this test process.
pub fn live_lock(kind: sbk_store::LockKind, purpose: &str) -> sbk_store::LockInfo {
    sbk_store::LockInfo {
        kind,
        host: sbk_store::holder_id(),
        pid: std::process::id(),
        lease_secs: 1800,
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
        started: 0,
        purpose: purpose.into(),
    }
}

/// The committed fixture `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Starts `sbk --repo REPO backup SOURCE` with its output discarded (and a cache directory
/// beside the repository).
pub fn spawn_backup(repo: &Path, source: &Path) -> std::process::Child {
    sbk()
        .arg("--repo")
        .arg(repo)
        .env("SBK_CACHE_DIR", repo.with_file_name("cache"))
        .arg("backup")
        .arg(source)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Whether the external program `tool` (a real protocol peer: qemu-img, nbdinfo...) is here.
/// Missing, the test is skipped with a message, except under `CI=true`, where it fails: a
/// scenario never passes by not running.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing (scripts/test.sh installs it)"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// A peer the tests run, named by environment variable `var` (scripts/test.sh installs it and
/// sets it); `None`, saying so, when it is not there, and a failure under CI=true.
pub fn peer(var: &str, what: &str) -> Option<PathBuf> {
    match std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        Some(p) => Some(p),
        None => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{var} does not name {what} (scripts/test.sh installs one)"
            );
            eprintln!("skipped: no {what} (set {var}, as scripts/test.sh does)");
            None
        }
    }
}
