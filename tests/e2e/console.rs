//! `sbk console` in a real browser: Debian's chromium driven by Playwright for Python
//! (console_browser.py), against three repositories: a job's with a failing hook, one that cannot be opened, and
//! one whose newest snapshot has a damaged chunk.
//! Refused addresses and options are checked here, without a browser.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use crate::common::*;

/// The console's token for the tests.
const TOKEN: &str = "console-test-token-0123456789";

/// A running console, stopped (SIGTERM) when dropped.
struct Running {
    child: Child,
    base: String,
}

impl Running {
    /// Stops it with SIGTERM and says how it exited.
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Still running: a failed assertion on the way.
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Writes the token file (mode 0600) in `dir`.
fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Starts `sbk console --listen LISTEN ARGS` and waits until it listens.
fn start(env: &Env, listen: &str, args: &[&str]) -> Running {
    let mut child = env
        .cmd()
        .env("JOB_PASS", PASSWORD)
        .args(["--json", "console", "--listen", listen])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the console did not say where it listens ({e}): {line:?}"));
    let base = v["listening"]
        .as_str()
        .unwrap_or_else(|| panic!("the console did not start: {line}"))
        .to_owned();
    Running { child, base }
}

/// Runs the browser script on `case`; its measurements.
fn browse(python: &Path, case: serde_json::Value) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("case.json");
    std::fs::write(&file, case.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/console_browser.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The browser's peers: Python with Playwright, and Debian's chromium.
fn browser_peers() -> Option<(PathBuf, PathBuf)> {
    let python = peer("SBK_TEST_PYTHON", "a Python with Playwright")?;
    let chromium = peer("SBK_TEST_CHROMIUM", "Debian's chromium")?;
    if !have_tool("nbdcopy") || !have_tool("mke2fs") {
        return None;
    }
    Some((python, chromium))
}

#[test]
fn the_console_in_a_browser_overview_failures_files_exports_and_csrf() {
    let Some((python, chromium)) = browser_peers() else {
        return;
    };
    // Repository A: two snapshots of an ext4 disk, the second one's chunks over file b
    // damaged.
    let a = Env::new();
    let (first, second) = crate::files::damaged_file_b(&a, &["--source-name", "db1"]);
    let src = a.path("src");
    let restored = a.path("first.img");
    a.restore(&first, &restored, &[]);
    // A verify that reads the data finds the damage; its record is the overview's last verify.
    let v = a.run(&["verify", "--read-data"]);
    assert_eq!(v.code, 12, "{}", v.stderr);

    // Repository B, a job's: source "good" backed up, source "broken" whose pre hook fails.
    let bdir = tempfile::tempdir().unwrap();
    let b = Env::init_at(bdir, a.dir.path().join("repo-b"), vec![], &[]);
    let d = a.dir.path().display();
    std::fs::write(a.path("good.img"), random(2 << 20, 4)).unwrap();
    let job = a.path("nightly.toml");
    std::fs::write(
        &job,
        format!(
            r#"repository = "{}"
password_env = "JOB_PASS"
state_dir = "{d}/state"
cache_dir = "{d}/cache-b"

[[source]]
name = "good"
path = "{d}/good.img"

[[source]]
name = "broken"
path = "{d}/missing.img"
pre = "echo 'lvcreate: Insufficient free space in volume group' >&2; exit 5"
"#,
            b.repo.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&job, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = Run::from_output(
        sbk()
            .env("JOB_PASS", PASSWORD)
            .args(["run", job.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 3, "one source of two failed: {}", r.stderr);
    let record = std::fs::read_dir(a.path("state/runs/job/nightly"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    let error = record["sources"][1]["error"].as_str().unwrap().to_owned();

    // A job whose repository is gone: shown as such, and the others still work.
    let lost = a.path("lost.toml");
    std::fs::write(
        &lost,
        format!("repository = \"{d}/gone\"\nstate_dir = \"{d}/state\"\n[[source]]\nname = \"app\"\npath = \"{d}/app.img\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&lost, std::fs::Permissions::from_mode(0o600)).unwrap();

    let tok = token_file(a.dir.path());
    let console = start(
        &a,
        "127.0.0.1:0",
        &[
            job.to_str().unwrap(),
            lost.to_str().unwrap(),
            "--token-file",
            tok.to_str().unwrap(),
            "--allow-exports",
        ],
    );
    // The jobs' repositories come first, in order, then --repo.
    let snap = |id: &str| format!("/r/2/snap/{id}");
    let files = |id: &str| format!("/r/2/snap/{id}/files?path=0%3A%2F");
    let shots = std::env::var("SBK_CONSOLE_SCREENSHOTS").ok();
    let got = browse(
        &python,
        serde_json::json!({
            "base": console.base,
            "token": TOKEN,
            "chromium": chromium,
            "shots": shots,
            "repos": [
                { "location": b.repo.to_str().unwrap(), "snapshots": 1 },
                { "location": format!("{d}/gone"), "unavailable": true },
                { "location": a.repo.to_str().unwrap(), "snapshots": 2, "last_verify": "problems" },
            ],
            "failed": { "source": "broken", "error": error },
            "source": "/r/2/source/db1",
            "snapshot": snap(&second),
            "files": { "dir": files(&first), "name": "a", "expect": src.join("a") },
            "damaged": { "dir": files(&second), "name": "b" },
            "export": { "page": snap(&first), "repo": 2, "snapshot": first, "restored": restored },
        }),
    );
    assert_eq!(got["downloaded_bytes"], 4 << 20);
    eprintln!("console pages: {}", got["timings"]);
}

#[test]
fn addresses_and_tokens_the_console_refuses() {
    let env = Env::with_init(&[]);
    let tok = token_file(env.dir.path());
    let tok = tok.to_str().unwrap();
    let refused = |args: &[&str], code: i32, says: &str| {
        let r = env.run(&[&["console"], args].concat());
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    };
    // A remote address: without --allow-remote, and with it but without TLS.
    refused(
        &["--listen", "0.0.0.0:0", "--token-file", tok],
        2,
        "not a loopback address",
    );
    refused(
        &[
            "--listen",
            "0.0.0.0:0",
            "--token-file",
            tok,
            "--allow-remote",
        ],
        2,
        "needs TLS",
    );
    // No token on TCP, loopback included.
    refused(&["--listen", "127.0.0.1:0"], 2, "--token-file is required");
    // A token others can read, and one too short to be one.
    let loose = env.path("loose");
    std::fs::write(&loose, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(&["--token-file", loose.to_str().unwrap()], 19, "mode 0644");
    let short = env.path("short");
    std::fs::write(&short, "abc\n").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    refused(
        &["--token-file", short.to_str().unwrap()],
        2,
        "shorter than 16",
    );
    // --as-of is for commands that read a repository once.
    refused(&["--as-of", "1d", "--token-file", tok], 2, "--as-of");

    // On a Unix socket: mode 0600, and no token needed.
    let sock = env.path("console.sock");
    {
        let mut console = Running {
            child: env
                .cmd()
                .args(["console", "--socket", sock.to_str().unwrap()])
                .spawn()
                .unwrap(),
            base: String::new(),
        };
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let page = sh(&format!(
            "curl -sf --unix-socket {} http://console/",
            sock.display()
        ));
        assert!(page.contains("snapshot-count"), "{page}");
        assert!(console.stop().success(), "SIGTERM is a clean stop");
    }
    assert!(
        !sock.exists(),
        "the socket is removed when the console stops"
    );

    // --allow-remote with TLS: a self-signed certificate; HTTPS with the token, 401 without,
    // and no plain HTTP on that port.
    let (cert, key) = (env.path("cert.pem"), env.path("key.pem"));
    sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout {} -out {} -days 1 -subj /CN=localhost 2>/dev/null",
        key.display(),
        cert.display()
    ));
    let console = start(
        &env,
        "0.0.0.0:0",
        &[
            "--allow-remote",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--token-file",
            tok,
        ],
    );
    let port = console
        .base
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/');
    assert!(console.base.starts_with("https://"), "{}", console.base);
    let status = |extra: &str| {
        sh(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' {extra} https://127.0.0.1:{port}/sources || true"
        ))
    };
    assert_eq!(
        status(&format!("-k -H 'Authorization: Bearer {TOKEN}'")),
        "200"
    );
    assert_eq!(status("-k"), "401");
    let plain = sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/sources || true"
    ));
    assert_ne!(plain, "200", "plain HTTP is not served on the TLS port");
}
