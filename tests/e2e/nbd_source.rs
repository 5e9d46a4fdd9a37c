//! NBD exports as backup sources: a qcow2 disk exported by a real `qemu-nbd`, backed up in full
//! and then incrementally from its persistent QEMU dirty bitmap, restored and compared with
//! `qemu-img convert`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common::*;

/// A running `qemu-nbd`, killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    /// Exports `image` (qcow2, read-only) as `disk` on a Unix socket or a TCP port, with the
    /// dirty bitmap `bitmap` if given; waits until it accepts.
    fn start(
        image: &Path,
        socket: Option<&Path>,
        port: Option<u16>,
        bitmap: Option<&str>,
    ) -> QemuNbd {
        let mut c = Command::new("qemu-nbd");
        c.args(["-r", "-f", "qcow2", "-t", "-e", "4", "-x", "disk"]);
        if let Some(b) = bitmap {
            c.args(["-B", b]);
        }
        if let Some(s) = socket {
            let _ = std::fs::remove_file(s);
            c.arg("-k").arg(s);
        }
        if let Some(p) = port {
            c.args(["-b", "127.0.0.1", "-p", &p.to_string()]);
        }
        // Owned at once, so that a failed start still kills it.
        let nbd = QemuNbd(c.arg(image).spawn().unwrap());
        let started = Instant::now();
        loop {
            let up = match (socket, port) {
                (Some(s), _) => std::os::unix::net::UnixStream::connect(s).is_ok(),
                (_, Some(p)) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
                _ => unreachable!(),
            };
            if up {
                return nbd;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(image).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The image's contents as raw bytes, by qemu-img.
fn as_raw(image: &Path, out: &Path) {
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        image.display(),
        out.display()
    ));
}

fn tools() -> bool {
    ["qemu-img", "qemu-io", "qemu-nbd"]
        .iter()
        .all(|t| have_tool(t))
}

#[test]
fn a_qcow2_disk_over_nbd_in_full_then_from_its_dirty_bitmap() {
    if !tools() {
        return;
    }
    let env = Env::new();
    let disk = env.path("disk.qcow2");
    let socket = env.path("qemu-nbd.sock");
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    sh(&format!(
        "qemu-img create -q -f qcow2 {} 96M",
        disk.display()
    ));
    qemu_io(
        &disk,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 20M 3M",
            "write -P 0x33 95M 1M",
        ],
    );
    // The bitmap records every write from now on, across qemu-nbd restarts (it is persistent).
    sh(&format!("qemu-img bitmap --add {} b0", disk.display()));
    let full = {
        let _nbd = QemuNbd::start(&disk, Some(&socket), None, Some("b0"));
        env.backup(Path::new(&uri), &["--source-name", "vm1"])
    };
    let reference = env.path("ref.raw");
    as_raw(&disk, &reference);
    // Holes are skipped: 5 MiB of data in a 96 MiB disk.
    assert!(full["bytes_read"].as_u64().unwrap() < 8 << 20, "{full}");
    let restored = env.path("restored.raw");
    env.restore(full["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same(&reference, &restored);

    // More writes, at odd offsets and across a segment boundary; then an incremental from b0.
    qemu_io(
        &disk,
        &[
            "write -P 0x44 5000000 100000",
            "write -P 0x55 16775168 20480",
            "write -P 0x66 60M 2M",
        ],
    );
    as_raw(&disk, &reference);
    let inc = {
        let _nbd = QemuNbd::start(&disk, Some(&socket), None, Some("b0"));
        env.backup(
            Path::new(&uri),
            &[
                "--source-name",
                "vm1",
                "--dirty-bitmap",
                "b0",
                "--verify-unchanged",
                "100",
            ],
        )
    };
    let cb = &inc["changed_blocks"];
    assert_eq!(cb["incremental"], true, "{inc}");
    assert_eq!(cb["trusted"], true, "{inc}");
    assert!(cb["bytes_skipped"].as_u64().unwrap() > 0, "{inc}");
    env.restore(inc["snapshot"].as_str().unwrap(), &restored, &["--force"]);
    assert_same(&reference, &restored);
    // Exact: a full read of the same disk afterwards stores nothing new.
    let again = {
        let _nbd = QemuNbd::start(&disk, Some(&socket), None, Some("b0"));
        env.backup(Path::new(&uri), &["--source-name", "vm1"])
    };
    assert_eq!(again["new_bytes"], 0, "{again}");

    // Without the bitmap: a clear refusal, or a full read when asked.
    let _nbd = QemuNbd::start(&disk, Some(&socket), None, None);
    let r = env.run(&[
        "backup",
        &uri,
        "--source-name",
        "vm1",
        "--dirty-bitmap",
        "b0",
    ]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("no dirty bitmap \"b0\""), "{}", r.stderr);
    let r = env.run(&[
        "backup",
        "--json",
        &uri,
        "--source-name",
        "vm1",
        "--dirty-bitmap",
        "b0",
        "--full-on-bad-bitmap",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("reading everything"), "{}", r.stderr);
    assert_eq!(r.json()[0]["changed_blocks"], serde_json::Value::Null);
    // A file path is never taken for an NBD source, and a bitmap needs one.
    let r = env.run(&[
        "backup",
        reference.to_str().unwrap(),
        "--dirty-bitmap",
        "b0",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("NBD export"), "{}", r.stderr);
}

#[test]
fn nbd_over_tcp_dedups_with_a_file_backup_and_unreachable_servers_fail_cleanly() {
    if !tools() {
        return;
    }
    let env = Env::new();
    let disk = env.path("disk.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 {} 40M",
        disk.display()
    ));
    qemu_io(&disk, &["write -P 0x77 1M 6M", "write -P 0x78 30M 1M"]);
    let raw: PathBuf = env.path("disk.raw");
    as_raw(&disk, &raw);
    env.backup(&raw, &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let over_nbd = {
        let _nbd = QemuNbd::start(&disk, None, Some(port), None);
        env.backup(Path::new(&format!("nbd://127.0.0.1:{port}/disk")), &[])
    };
    // The same bytes: nothing new.
    assert_eq!(over_nbd["new_bytes"], 0, "{over_nbd}");
    let restored = env.path("restored.raw");
    env.restore(over_nbd["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same(&raw, &restored);
    // Nobody listens any more: an error naming the source, no snapshot.
    let before = env.run(&["snapshots", "--json"]).json();
    let r = env.run(&["backup", &format!("nbd://127.0.0.1:{port}/disk")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(&format!("127.0.0.1:{port}")),
        "{}",
        r.stderr
    );
    assert_eq!(env.run(&["snapshots", "--json"]).json(), before);
    // A malformed URI is refused as such.
    let r = env.run(&["backup", "nbd+unix:///disk"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("socket"), "{}", r.stderr);
}
