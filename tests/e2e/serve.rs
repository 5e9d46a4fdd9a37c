//! `sbk serve`: snapshots as NBD exports, read by real clients (qemu-img, qemu-io, nbdinfo,
//! nbdcopy) and by misbehaving ones, while prune runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sbk_nbd::client::{Client, NbdUri};
use sbk_nbd::proto::*;

use crate::common::*;

/// A running `sbk serve`, stopped with SIGTERM when dropped.
pub(crate) struct Served {
    child: Child,
    pub(crate) socket: PathBuf,
    pub(crate) log: PathBuf,
}

impl Served {
    /// Starts `sbk serve --socket` with extra arguments and waits until it listens.
    pub(crate) fn start(env: &Env, extra: &[&str]) -> Served {
        let socket = env.path(&format!("nbd-{}.sock", std::process::id()));
        let listen = ["--socket", socket.to_str().unwrap()];
        Served::start_on(env, socket.clone(), &[&listen[..], extra].concat())
    }

    /// Starts `sbk serve ARGS` and waits until it listens (`socket` is where, for a socket).
    fn start_on(env: &Env, socket: PathBuf, args: &[&str]) -> Served {
        let log = env.path("serve.log");
        let mut child = env
            .cmd()
            .args(["serve", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("listening"),
            "serve did not start: {line} {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Served { child, socket, log }
    }

    /// The URI of export `name`.
    pub(crate) fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Sends SIGTERM and returns the exit code.
    pub(crate) fn stop(mut self) -> i32 {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe_free_kill(pid, "TERM"), 0);
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -SIG PID` through the shell (the workspace denies unsafe code, tests included).
fn unsafe_free_kill(pid: i32, sig: &str) -> i32 {
    Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

/// Runs a command, asserting success; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) const MIB: usize = 1 << 20;

/// A 40 MiB sparse image: data, a hole, data with a zero run, data at the very end.
fn image(path: &Path, seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; 40 * MIB];
    for (at, n) in [
        (0, 5 * MIB),
        (12 * MIB, 9 * MIB),
        (40 * MIB - MIB / 2, MIB / 2),
    ] {
        d[at..at + n].copy_from_slice(&random(n, seed + at as u64));
    }
    d[15 * MIB..16 * MIB].fill(0);
    std::fs::write(path, &d).unwrap();
    d
}

/// The zero regions every export of [`image`] must report as holes.
const ZERO_REGIONS: [(usize, usize); 2] = [(5 * MIB, 12 * MIB), (21 * MIB, 40 * MIB - MIB / 2)];

fn tools() -> bool {
    ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"]
        .iter()
        .all(|t| have_tool(t))
}

/// A repository with one backup of [`image`] `v1.img` (seed `seed`); `None` when the NBD tools
/// are missing (and the test is skipped).
pub(crate) fn one_snapshot(seed: u64) -> Option<(Env, PathBuf, Vec<u8>)> {
    if !tools() {
        return None;
    }
    let env = Env::new();
    let v1 = env.path("v1.img");
    let d1 = image(&v1, seed);
    env.backup(&v1, &[]);
    Some((env, v1, d1))
}

#[test]
fn snapshots_are_exports_for_real_clients() {
    if !tools() {
        return;
    }
    let env = Env::new();
    let v1 = env.path("v1.img");
    let d1 = image(&v1, 1);
    let s1 = env.backup(&v1, &[]);
    let v2 = env.path("v2.img");
    let mut d2 = d1.clone();
    d2[MIB..MIB + 4096].fill(0x77);
    std::fs::write(&v2, &d2).unwrap();
    let s2 = env.backup(&v2, &[]);
    let id1 = s1["snapshot"].as_str().unwrap().to_owned();
    let id2 = s2["snapshot"].as_str().unwrap().to_owned();
    let server = Served::start(&env, &[]);

    // Both snapshots and latest are listed (nbdinfo shows latest by its canonical name, v2's
    // id, so v2 appears twice).
    let list = run_ok(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    assert!(list.contains(&format!("export=\"{id1}\"")), "{list}");
    assert_eq!(
        list.matches(&format!("export=\"{id2}\"")).count(),
        2,
        "{list}"
    );

    // latest is v2; a prefix of v1's id opens v1.
    let cmp = |uri: &str, file: &Path| {
        run_ok(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw", uri])
                .arg(file),
        )
    };
    cmp(&server.uri("latest"), &v2);
    cmp(&server.uri(&id1[..12]), &v1);

    // The zero runs are holes in the map, so that copies skip them.
    let map = run_ok(Command::new("nbdinfo").args(["--map", &server.uri("latest")]));
    let holes: Vec<(usize, usize)> = map
        .lines()
        .filter(|l| l.contains("hole"))
        .map(|l| {
            let f: Vec<usize> = l
                .split_whitespace()
                .take(2)
                .map(|x| x.parse().unwrap())
                .collect();
            (f[0], f[0] + f[1])
        })
        .collect();
    for (a, b) in ZERO_REGIONS {
        assert!(
            holes.iter().any(|&(s, e)| s <= a && b <= e),
            "{a}..{b} is not a hole in\n{map}"
        );
    }
    assert!(
        map.lines().filter(|l| l.contains("data")).count() >= 3,
        "{map}"
    );

    // nbdcopy to a file: byte-identical and sparse; four copies at once, four connections each.
    let outs: Vec<PathBuf> = (0..4).map(|i| env.path(&format!("copy{i}.img"))).collect();
    let copies: Vec<Child> = outs
        .iter()
        .map(|o| {
            Command::new("nbdcopy")
                .args(["-C", "4", &server.uri("latest")])
                .arg(o)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in copies {
        assert!(c.wait().unwrap().success());
    }
    for o in &outs {
        assert_same(&v2, o);
    }
    let allocated = sh(&format!("du -k {} | cut -f1", outs[0].display()));
    assert!(
        allocated.parse::<usize>().unwrap() < 25 * 1024,
        "{allocated} KiB allocated of 40 MiB"
    );

    // A qcow2 overlay on the read-only export takes writes.
    let ov = env.path("overlay.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-f",
                "qcow2",
                "-b",
                &server.uri("latest"),
                "-F",
                "raw",
            ])
            .arg(&ov),
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 2M 64k"])
            .arg(&ov),
    );
    let read = run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -P 0x5a 2M 64k"])
            .arg(&ov),
    );
    assert!(!read.contains("fail"), "{read}");
    let flat = env.path("overlay.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&ov)
            .arg(&flat),
    );
    let mut d3 = d2.clone();
    d3[2 * MIB..2 * MIB + 65536].fill(0x5a);
    assert!(std::fs::read(&flat).unwrap() == d3);

    // Writes to the export itself are refused (read-only without --overlay).
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &server.uri("latest")])
        .output()
        .unwrap();
    assert!(!w.status.success() || String::from_utf8_lossy(&w.stdout).contains("failed"));

    // SIGTERM: a clean stop, nothing left behind.
    let log = server.log.clone();
    let socket = server.socket.clone();
    assert_eq!(
        server.stop(),
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!socket.exists());
    assert!(files_below(&env.repo.join("locks")).is_empty());
    assert!(files_below(&env.repo.join("pins")).is_empty());
}

#[test]
fn tcp_listens_on_loopback_only_unless_told() {
    let Some((env, v1, _)) = one_snapshot(2) else {
        return;
    };
    let r = env.run(&["serve", "--listen", "0.0.0.0:10809"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--allow-remote"), "{}", r.stderr);
    // A free port on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let server = Served::start_on(&env, PathBuf::new(), &["--listen", &addr]);
    let uri = format!("nbd://{addr}/latest");
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&v1)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(server.stop(), 0);
}

#[test]
fn prune_runs_while_a_forgotten_snapshot_is_served_and_keeps_its_data() {
    let env = Env::new();
    let v1 = env.path("v1.img");
    let d1 = image(&v1, 4);
    let s1 = env.backup(&v1, &[]);
    let v2 = env.path("v2.img");
    image(&v2, 5);
    env.backup(&v2, &[]);
    let id1 = s1["snapshot"].as_str().unwrap().to_owned();
    let server = Served::start(&env, &[]);

    // A client opens v1 (and reads nothing yet: the server keeps packs it read open, and an
    // open file outlives its deletion).
    let uri = NbdUri::parse(&server.uri(&id1)).unwrap();
    let mut client = Client::connect(&uri, &[CONTEXT_BASE_ALLOCATION]).unwrap();
    assert_eq!(client.size(), d1.len() as u64);

    // v1 is forgotten and pruned meanwhile: the server's pin lock does not stop prune.
    let before = sh(&format!(
        "du -sk {} | cut -f1",
        env.repo.join("packs").display()
    ));
    let r = env.run(&["forget", &id1, "--prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The client still reads all of v1, byte-identical (prune kept what the pin needs).
    let mut all = vec![0u8; d1.len()];
    client.read(0, &mut all).unwrap();
    assert!(all == d1, "v1 changed under its reader");
    // A new connection does not find it: it is forgotten.
    assert!(Client::connect(&uri, &[]).is_err());
    client.disconnect().unwrap();

    // Once no client has it open, it is unpinned, and the next prune frees its data.
    std::thread::sleep(Duration::from_millis(300));
    // Beside the server (its pin lock holds no mark back): one run marks, the next deletes.
    for _ in 0..2 {
        let r = env.run(&["prune", "--max-unused", "0", "--grace=0s"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let after = sh(&format!(
        "du -sk {} | cut -f1",
        env.repo.join("packs").display()
    ));
    assert!(
        after.parse::<u64>().unwrap() < before.parse::<u64>().unwrap() * 3 / 4,
        "packs {before} KiB before, {after} KiB after"
    );
    assert_eq!(server.stop(), 0);
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn overlay_writes_read_back_and_survive_a_restart() {
    let Some((env, v1, d1)) = one_snapshot(6) else {
        return;
    };
    let overlay = env.path("overlay");
    let server = Served::start(&env, &["--overlay", overlay.to_str().unwrap()]);
    let uri = server.uri("latest");
    // Writes at odd offsets and lengths, zeroes, a trim, through qemu-io over NBD; then a flush.
    let cmds = [
        "write -P 0x11 1000 5000",
        "write -P 0x22 12582912 1048576",
        "write -z 2097152 65536",
        "discard 3145728 8192",
        "write -P 0x33 41942000 1040",
        "flush",
    ];
    let mut qio = Command::new("qemu-io");
    qio.args(["-f", "raw"]);
    for c in cmds {
        qio.args(["-c", c]);
    }
    run_ok(qio.arg(&uri));
    let mut expected = d1.clone();
    expected[1000..6000].fill(0x11);
    expected[12 * MIB..13 * MIB].fill(0x22);
    expected[2 * MIB..2 * MIB + 65536].fill(0);
    expected[3 * MIB..3 * MIB + 8192].fill(0);
    expected[41_942_000..41_943_040].fill(0x33);
    let want = env.path("expected.img");
    std::fs::write(&want, &expected).unwrap();
    let cmp = |uri: &str| {
        run_ok(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw", uri])
                .arg(&want),
        )
    };
    cmp(&uri);
    // The snapshot itself is unchanged: restore gives v1.
    let restored = env.path("restored.img");
    env.restore("latest", &restored, &[]);
    assert_same(&v1, &restored);
    // Restarted, the server reads the overlay back.
    assert_eq!(server.stop(), 0);
    let server = Served::start(&env, &["--overlay", overlay.to_str().unwrap()]);
    cmp(&server.uri("latest"));
    assert_eq!(server.stop(), 0);

    // A new backup moves latest: the overlay made on the old snapshot is refused, by name.
    let v2 = env.path("v2.img");
    image(&v2, 7);
    env.backup(&v2, &[]);
    let server = Served::start(&env, &["--overlay", overlay.to_str().unwrap()]);
    let o = Command::new("nbdinfo")
        .arg(server.uri("latest"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let log = server.log.clone();
    assert_eq!(server.stop(), 0);
    let log = std::fs::read_to_string(log).unwrap();
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("belongs to snapshot") || said.contains("belongs to snapshot"),
        "{log} {said}"
    );
}

#[test]
fn a_damaged_chunk_fails_its_read_and_the_server_goes_on() {
    let Some((env, _v1, d1)) = one_snapshot(8) else {
        return;
    };
    // Damage one byte in the middle of every pack: some data chunks no longer verify.
    for p in env.packs() {
        let mut b = std::fs::read(&p).unwrap();
        let at = b.len() / 2;
        b[at] ^= 0x40;
        std::fs::write(&p, &b).unwrap();
    }
    let server = Served::start(&env, &[]);
    let uri = NbdUri::parse(&server.uri("latest")).unwrap();
    let mut client = Client::connect(&uri, &[]).unwrap();
    let mut all = vec![0u8; d1.len()];
    let e = client.read(0, &mut all).unwrap_err().to_string();
    assert!(e.contains("error 5"), "{e}");
    // The same connection goes on: the zero runs read, as zeroes.
    let (a, b) = ZERO_REGIONS[0];
    let mut zeros = vec![1u8; b - a];
    client.read(a as u64, &mut zeros).unwrap();
    assert!(zeros.iter().all(|&x| x == 0));
    client.disconnect().unwrap();
    // New connections are served too.
    let o = Command::new("nbdinfo")
        .arg(server.uri("latest"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let log = server.log.clone();
    assert_eq!(server.stop(), 0);
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("chunk") && log.contains("pack"), "{log}");
}

#[test]
fn a_served_snapshot_reads_on_after_prune_moves_its_chunks() {
    let env = Env::new();
    // Two images in one run share packs: forgetting one leaves packs half used, repacked.
    let (v1, vx) = (env.path("v1.img"), env.path("vx.img"));
    let d1 = image(&v1, 20);
    image(&vx, 21);
    let out = env
        .run(&[
            "backup",
            "--json",
            v1.to_str().unwrap(),
            vx.to_str().unwrap(),
        ])
        .json();
    let (id1, idx) = (
        out[0]["snapshot"].as_str().unwrap().to_owned(),
        out[1]["snapshot"].as_str().unwrap().to_owned(),
    );
    let server = Served::start(&env, &[]);
    let uri = NbdUri::parse(&server.uri(&id1)).unwrap();
    let mut client = Client::connect(&uri, &[]).unwrap();
    let packs_before = env.packs();
    // Beside the server: the first run copies the chunks that stay and marks their old packs,
    // the second deletes those.
    let r = env.run(&["forget", &idx, "--prune", "--max-unused", "0", "--grace=0s"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = env.run(&["prune", "--max-unused", "0", "--grace=0s"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        packs_before.iter().any(|p| !p.exists()),
        "prune rewrote packs the served snapshot uses"
    );
    // The server's index named the old packs: it finds the chunks where prune moved them.
    let mut all = vec![0u8; d1.len()];
    client.read(0, &mut all).unwrap();
    assert!(all == d1);
    client.disconnect().unwrap();
    assert_eq!(server.stop(), 0);
}
