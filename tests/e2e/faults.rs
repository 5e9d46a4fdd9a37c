//! Fault injection: a full disk, torn and corrupted files. Every command either works or fails
//! with a clear error and exit code; never a panic, never a wrong byte restored.

use std::path::Path;

use crate::common::*;

/// A small ext4 filesystem on a loop device, mounted; unmounted and detached on drop.
struct SmallFs {
    mnt: std::path::PathBuf,
}

impl SmallFs {
    fn new(dir: &Path, mib: u64) -> SmallFs {
        let img = dir.join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        sh(&format!("mkfs.ext4 -q -F {}", img.display()));
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        sh(&format!(
            "mount -o loop {} {}",
            img.display(),
            mnt.display()
        ));
        SmallFs { mnt }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

fn no_panic(r: &Run, what: &str) {
    assert!(
        !r.stderr.contains("panicked"),
        "{what}: sbk panicked: {}",
        r.stderr
    );
    assert!(r.code != 101, "{what}: exit 101 is a panic: {}", r.stderr);
}

#[test]
fn full_disk_fails_cleanly_and_recovers_after_prune() {
    if let Err(why) = can_use_devices() {
        println!("SKIPPED full_disk_fails_cleanly_and_recovers_after_prune: {why}");
        return;
    }
    if std::process::Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .is_err()
    {
        println!(
            "SKIPPED full_disk_fails_cleanly_and_recovers_after_prune: mkfs.ext4 is not installed"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(dir.path(), 48);
    let repo = fs.mnt.join("repo");
    let run = |args: &[&str]| {
        Run::from_output(sbk().arg("--repo").arg(&repo).args(args).output().unwrap())
    };
    assert_eq!(run(&["init", "--chunk-size", "64K"]).code, 0);
    let small = dir.path().join("small");
    std::fs::write(&small, random(4 << 20, 1)).unwrap();
    let r = run(&["backup", "--json", small.to_str().unwrap()]);
    let first = r.json()[0]["snapshot"].as_str().unwrap().to_owned();

    // Far more new data than the filesystem holds.
    let big = dir.path().join("big");
    std::fs::write(&big, random(96 << 20, 2)).unwrap();
    let r = run(&["backup", big.to_str().unwrap()]);
    no_panic(&r, "backup on a full disk");
    assert_eq!(r.code, 14, "a full disk exits 14: {}", r.stderr);
    assert!(r.stderr.contains("No space left"), "{}", r.stderr);
    let list = run(&["snapshots", "--json"]).json();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "no partial snapshot: {list}"
    );
    let out = dir.path().join("out");
    let r = run(&["restore", &first, out.to_str().unwrap()]);
    assert_eq!(
        r.code, 0,
        "the earlier snapshot still restores: {}",
        r.stderr
    );
    assert_same(&small, &out);

    // Prune removes the failed backup's packs; then a backup that fits succeeds.
    let r = run(&["prune", "--exclusive"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let medium = dir.path().join("medium");
    std::fs::write(&medium, random(16 << 20, 3)).unwrap();
    let r = run(&["backup", "--json", medium.to_str().unwrap()]);
    let id = r.json()[0]["snapshot"].as_str().unwrap().to_owned();
    let _ = std::fs::remove_file(&out);
    assert_eq!(run(&["restore", &id, out.to_str().unwrap()]).code, 0);
    assert_same(&medium, &out);
    assert_eq!(run(&["verify", "--read-data"]).code, 0);
}

#[test]
fn truncated_newest_pack_at_many_offsets() {
    let env = Env::new();
    let src = env.path("img");
    let data = random(5 << 20, 7);
    std::fs::write(&src, &data).unwrap();
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let pack = env
        .packs()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    let original = std::fs::read(&pack).unwrap();
    let out = env.path("out");
    let step = original.len() / 23;
    for cut in (0..original.len())
        .step_by(step.max(1))
        .chain([original.len() - 1, original.len() - 56])
    {
        std::fs::write(&pack, &original[..cut]).unwrap();
        for args in [
            vec!["snapshots"],
            vec!["verify"],
            vec!["verify", "--read-data"],
            vec!["stats"],
        ] {
            let r = env.run(&args);
            no_panic(&r, &format!("{args:?} with the pack cut at {cut}"));
            assert!(
                r.code == 0 || r.code == 12,
                "{args:?} cut at {cut}: exit {}: {}",
                r.code,
                r.stderr
            );
        }
        let _ = std::fs::remove_file(&out);
        let r = env.run(&["restore", &id, out.to_str().unwrap()]);
        no_panic(&r, "restore");
        if r.code == 0 {
            // The cut spared every blob this snapshot needs (only the trailer went): restore
            // reads blobs by the index and verifies each, so the bytes must be right.
            assert!(
                std::fs::read(&out).unwrap() == data,
                "cut at {cut}: restore succeeded with wrong bytes"
            );
        } else {
            assert_eq!(r.code, 12, "restore from a pack cut at {cut}: {}", r.stderr);
            assert!(!out.exists(), "no partial restore at cut {cut}");
        }
        let v = env.run(&["verify"]);
        assert_eq!(v.code, 12, "verify reports the pack cut at {cut}");
    }
    std::fs::write(&pack, &original).unwrap();
    env.restore(&id, &out, &["--force"]);
    assert_same(&src, &out);
}

#[test]
fn flipped_bytes_in_every_kind_of_file() {
    let env = Env::new();
    let src = env.path("img");
    let data = random(3 << 20, 8);
    std::fs::write(&src, &data).unwrap();
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut files = vec![
        env.repo.join("config"),
        env.repo.join("snapshots").join(&id),
    ];
    files.extend(env.packs());
    for f in files {
        let original = std::fs::read(&f).unwrap();
        for pos in [
            0,
            9,
            40,
            original.len() / 2,
            original.len() - 20,
            original.len() - 1,
        ] {
            let mut bad = original.clone();
            bad[pos] ^= 0x5a;
            std::fs::write(&f, &bad).unwrap();
            let out = env.path("out");
            let _ = std::fs::remove_file(&out);
            let r = env.run(&["restore", &id, out.to_str().unwrap()]);
            no_panic(
                &r,
                &format!("restore with {} flipped at {pos}", f.display()),
            );
            if r.code == 0 {
                // A flip the format does not notice must not change what is restored.
                assert!(
                    std::fs::read(&out).unwrap() == data,
                    "{} flipped at {pos}: restore succeeded with wrong bytes",
                    f.display()
                );
            } else {
                assert!(
                    [10, 11, 12, 16].contains(&r.code),
                    "{} flipped at {pos}: exit {}: {}",
                    f.display(),
                    r.code,
                    r.stderr
                );
            }
            let v = env.run(&["verify", "--read-data"]);
            no_panic(&v, "verify");
            if r.code != 0 {
                assert_ne!(
                    v.code,
                    0,
                    "verify misses what restore found: {} at {pos}",
                    f.display()
                );
            }
        }
        std::fs::write(&f, &original).unwrap();
    }
    // The index too: garbage in a slot's files is either healed or reported, never a panic.
    for entry in files_below(&env.repo.join("index")) {
        let original = std::fs::read(&entry).unwrap();
        if original.is_empty() {
            continue;
        }
        let mut bad = original.clone();
        let pos = bad.len() / 2;
        bad[pos] ^= 0xff;
        std::fs::write(&entry, &bad).unwrap();
        let out = env.path("out");
        let _ = std::fs::remove_file(&out);
        let r = env.run(&["restore", &id, out.to_str().unwrap()]);
        no_panic(
            &r,
            &format!("restore with index file {} damaged", entry.display()),
        );
        if r.code == 0 {
            assert!(std::fs::read(&out).unwrap() == data);
        }
        std::fs::write(&entry, &original).unwrap();
    }
}

#[test]
fn source_read_error_mid_backup_leaves_no_snapshot() {
    let env = Env::new();
    let good = env.path("good");
    std::fs::write(&good, random(2 << 20, 1)).unwrap();
    let first = env.backup(&good, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let src = env.path("failing");
    std::fs::write(&src, random(40 << 20, 2)).unwrap();
    // The source fails with EIO once a read reaches past 20 MiB (a dying disk).
    let r = Run::from_output(
        sbk()
            .arg("--repo")
            .arg(&env.repo)
            .env(sbk_engine::FAULT_EIO_ENV, (20u64 << 20).to_string())
            .args(["backup", src.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    no_panic(&r, "backup of a failing source");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("read error at offset") && r.stderr.contains("Input/output error"),
        "{}",
        r.stderr
    );
    let list = env.run(&["snapshots", "--json"]).json();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "no snapshot for the failed source: {list}"
    );
    assert_eq!(
        env.run(&["verify", "--read-data"]).code,
        0,
        "the repository is consistent"
    );
    let out = env.path("out");
    env.restore(&first, &out, &[]);
    assert_same(&good, &out);
    // The next backup of the (now healthy) source works.
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let out2 = env.path("out2");
    env.restore(&id, &out2, &[]);
    assert_same(&src, &out2);
}

/// A disk image truncated, or grown, while it is backed up fails with a message that says so,
/// exit 1, and no snapshot: what was read is not one consistent disk (the tail of a truncated
/// file would otherwise read as a hole, and be restored as zeros).
#[test]
fn an_image_resized_during_its_backup_fails_without_a_snapshot() {
    let env = Env::new();
    for (what, new_len) in [("shrunk", 8u64 << 20), ("grown", (300 << 20) + 4096)] {
        let img = env.path("live.img");
        std::fs::write(&img, random(300 << 20, 9)).unwrap();
        let mut child = env
            .cmd()
            .arg("backup")
            .arg(&img)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Resized once the backup is writing its first pack: it has read some, not all.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while env.pack_files(true).is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{what}: the backup finished before the image could be resized"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: no pack appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(new_len)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains("changed size while it was read")
                && stderr.contains(&format!("to {new_len} bytes")),
            "{what}: the message says what happened: {stderr}"
        );
        let list = env.run(&["snapshots", "--json"]).json();
        assert_eq!(
            list.as_array().unwrap().len(),
            0,
            "{what}: no snapshot: {list}"
        );
    }
}
