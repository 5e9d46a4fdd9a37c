//! Real block devices (loop devices) as source and target, and a filesystem that refuses O_DIRECT.

use std::path::{Path, PathBuf};

use crate::common::*;

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        Loop(sh(&format!("losetup -f --show {}", file.display())))
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(&self.0)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

/// A ramfs mount, unmounted on drop.
struct Ramfs(PathBuf);

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn loop_device_as_source_and_target() {
    if let Err(why) = can_use_devices() {
        println!("SKIPPED loop_device_as_source_and_target: {why}");
        return;
    }
    let env = Env::new();
    let backing = env.path("disk");
    let mut data = random(40 << 20, 11);
    data[8 << 20..20 << 20].fill(0); // a zero run the device reads but sbk does not store
    std::fs::write(&backing, &data).unwrap();
    let src = Loop::attach(&backing);
    let snap = env.backup(&src.path(), &[]);
    assert_eq!(snap["size"], data.len() as u64, "size from BLKGETSIZE64");
    assert_eq!(snap["direct_io"], true);
    let id = snap["snapshot"].as_str().unwrap();

    // Restore onto a second loop device full of other bytes: zero runs must be written as zeros.
    let target_file = env.path("target");
    std::fs::write(&target_file, random(40 << 20, 99)).unwrap();
    let target = Loop::attach(&target_file);
    let r = env.run(&["restore", id, target.0.as_str()]);
    assert_eq!(
        r.code, 13,
        "a device is never overwritten without --force: {}",
        r.stderr
    );
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    env.restore(id, &target.path(), &["--force"]);
    drop(target);
    assert_same(&backing, &target_file);

    // A device smaller than the snapshot is refused.
    let small_file = env.path("small");
    std::fs::write(&small_file, vec![1u8; 8 << 20]).unwrap();
    let small = Loop::attach(&small_file);
    let r = env.run(&["restore", id, small.0.as_str(), "--force"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("the snapshot needs"), "{}", r.stderr);
    drop(small);
    assert!(
        std::fs::read(&small_file).unwrap().iter().all(|&b| b == 1),
        "a refused target is untouched"
    );
}

#[test]
fn o_direct_fallback_on_ramfs() {
    if let Err(why) = can_use_devices() {
        println!("SKIPPED o_direct_fallback_on_ramfs: {why}");
        return;
    }
    let env = Env::new();
    let mnt = env.path("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!("mount -t ramfs ramfs {}", mnt.display()));
    let _guard = Ramfs(mnt.clone());
    let src = mnt.join("img");
    std::fs::write(&src, random((3 << 20) + 123, 3)).unwrap();
    assert!(
        std::fs::File::options()
            .read(true)
            .custom_flags_direct()
            .open(&src)
            .is_err(),
        "ramfs is expected to refuse O_DIRECT here"
    );
    let r = env.run(&["backup", "--json", src.to_str().unwrap()]);
    let snap = r.json()[0].clone();
    assert_eq!(snap["direct_io"], false);
    assert_eq!(
        r.stderr.matches("without O_DIRECT").count(),
        1,
        "said once: {}",
        r.stderr
    );
    let out = env.path("out");
    env.restore(snap["snapshot"].as_str().unwrap(), &out, &[]);
    assert_same(&src, &out);
    // Restoring onto ramfs works too (buffered writes there).
    let out2 = mnt.join("restored");
    env.restore(snap["snapshot"].as_str().unwrap(), &out2, &[]);
    assert_same(&src, &out2);
}

trait DirectOpen {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl DirectOpen for std::fs::OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECT)
    }
}
