//! `sbk mount` (issue 21): the GPT disk of the file-level restore scenarios mounted through
//! FUSE, read with diff, cmp and a loop mount, unmounted by fusermount3 and by SIGTERM.

use std::path::Path;

use crate::common::*;
use crate::files::{gpt_disk, tools_present};

/// `sbk mount ID DIR`, started; returns once DIR shows the snapshot.
fn start_mount(env: &Env, id: &str, dir: &Path) -> std::process::Child {
    let mut child = env
        .cmd()
        .args(["mount", id])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if dir.join(id).join("disk.img").exists() {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!(
        "{} never showed the snapshot: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mount_shows_the_disk_its_partitions_and_their_trees() {
    if !tools_present() || !have_tool("fusermount3") {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/fuse is missing"
        );
        eprintln!("skipped: /dev/fuse is missing");
        return;
    }
    let env = Env::new();
    let (src, esp_src, disk) = gpt_disk(&env);
    let id = env.backup(&disk, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = start_mount(&env, &id, &mnt);
    let snap = mnt.join(&id);
    let mut names: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "disk.img",
            "part1",
            "part1.img",
            "part2",
            "part2.img",
            "part3.img"
        ]
    );
    // The trees, as diff sees them (links compared as links), and the images as a restore.
    sh(&format!(
        "diff -r --no-dereference -x lost+found {} {}",
        src.display(),
        snap.join("part1").display()
    ));
    sh(&format!(
        "diff -r {} '{}'",
        esp_src.join("EFI").display(),
        snap.join("part2/Long Name Dir").display()
    ));
    let restored = env.path("restored.img");
    env.restore(&id, &restored, &[]);
    assert_same(&snap.join("disk.img"), &restored);
    assert_same(&snap.join("disk.img"), &disk);
    // A loop mount of a partition image, read-only.
    let lo = env.path("lo");
    std::fs::create_dir(&lo).unwrap();
    sh(&format!(
        "mount -o ro,loop {} {}",
        snap.join("part1.img").display(),
        lo.display()
    ));
    let same = std::process::Command::new("diff")
        .args(["-r", "--no-dereference", "-x", "lost+found"])
        .arg(&src)
        .arg(&lo)
        .status();
    sh(&format!("umount {}", lo.display()));
    assert!(
        same.unwrap().success(),
        "the loop-mounted image differs from the source"
    );
    // Read-only, and pinned while mounted.
    assert!(std::fs::write(snap.join("part1/new"), b"x").is_err());
    assert!(
        !files_below(&env.repo.join("pins")).is_empty(),
        "the snapshot is pinned"
    );
    sh(&format!("fusermount3 -u {}", mnt.display()));
    let status = child.wait().unwrap();
    assert!(status.success(), "sbk mount ends with its mount");
    assert!(
        files_below(&env.repo.join("pins")).is_empty(),
        "unpinned once unmounted"
    );
    assert!(files_below(&env.repo.join("locks")).is_empty());

    // SIGTERM unmounts too.
    let child = start_mount(&env, &id, &mnt);
    sh(&format!("kill -TERM {}", child.id()));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "unmounted"
    );
    assert!(files_below(&env.repo.join("pins")).is_empty());
}
