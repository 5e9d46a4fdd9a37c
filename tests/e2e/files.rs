//! File-level restore (issue 21): disks built the way their tools build them (sgdisk, sfdisk,
//! mke2fs -d from a real tree, mkfs.vfat), backed up, then listed and extracted with `sbk ls`,
//! `sbk cat` and `sbk extract`, and the extracted trees compared with the source trees.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::common::*;

/// A tree with what file-level restore must give back: nested and deep directories, long and
/// non-ASCII names, fast and slow symbolic links (one pointing outside any tree), a hard link,
/// a sparse file, empty files, a 100 MiB file, odd modes and owners, user xattrs.
fn source_tree(root: &Path) {
    let deep = root.join("deep/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("leaf"), b"at the bottom\n").unwrap();
    std::fs::create_dir_all(root.join("etc/nginx")).unwrap();
    std::fs::write(root.join("etc/nginx/nginx.conf"), b"worker_processes 4;\n").unwrap();
    std::fs::write(root.join("etc/empty"), b"").unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("l".repeat(250)), b"long").unwrap();
    std::fs::write(root.join("Grüße, 世界 ✓"), "non-ASCII\n").unwrap();
    std::fs::write(root.join("big.bin"), repetitive(100 << 20)).unwrap();
    std::fs::hard_link(
        root.join("etc/nginx/nginx.conf"),
        root.join("nginx.conf.link"),
    )
    .unwrap();
    std::os::unix::fs::symlink("etc/nginx", root.join("conf")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("outside")).unwrap();
    std::os::unix::fs::symlink("t".repeat(150), root.join("slow-link")).unwrap();
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"island", 5 << 20).unwrap();
    sparse.set_len(20 << 20).unwrap();
    std::fs::set_permissions(
        root.join("etc/empty"),
        std::fs::Permissions::from_mode(0o2640),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("empty-dir"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    sh(&format!(
        "chown 1234:5678 {}",
        root.join("etc/nginx/nginx.conf").display()
    ));
    sh(&format!(
        "setfattr -n user.purpose -v 'web server' {0} && setfattr -n user.empty {1}",
        root.join("etc/nginx/nginx.conf").display(),
        root.join("etc").display()
    ));
}

/// Builds a disk at `disk` of `mib` MiB: `partition` makes the table, then each (start
/// sector, mke2fs type) gets a filesystem of `tree`.
fn tools_present() -> bool {
    [
        "mke2fs",
        "sgdisk",
        "sfdisk",
        "setfattr",
        "mkfs.vfat",
        "mcopy",
    ]
    .iter()
    .all(|t| have_tool(t))
        && can_use_devices()
            .map_err(|w| eprintln!("skipped: {w}"))
            .is_ok()
}

/// Every node under `src` has its twin under `out`: type, mode, owner, mtime (seconds:
/// mke2fs -d keeps no nanoseconds), contents, link target, user xattrs; names that are one
/// file in `src` are one file in `out`; a sparse file is still sparse.
fn compare_trees(src: &Path, out: &Path) {
    let mut inodes: HashMap<u64, u64> = HashMap::new();
    for s in files_below_all(src) {
        let rel = s.strip_prefix(src).unwrap();
        let o = out.join(rel);
        let (sm, om) = (
            s.symlink_metadata().unwrap(),
            o.symlink_metadata()
                .unwrap_or_else(|e| panic!("{}: {e}", o.display())),
        );
        let what = rel.display();
        assert_eq!(sm.mode(), om.mode(), "{what}: type and mode");
        assert_eq!((sm.uid(), sm.gid()), (om.uid(), om.gid()), "{what}: owner");
        if !sm.is_dir() {
            assert_eq!(sm.mtime(), om.mtime(), "{what}: mtime");
        }
        if sm.is_symlink() {
            assert_eq!(
                std::fs::read_link(&s).unwrap(),
                std::fs::read_link(&o).unwrap(),
                "{what}"
            );
        } else if sm.is_file() {
            assert_eq!(sm.len(), om.len(), "{what}: size");
            assert!(
                std::fs::read(&s).unwrap() == std::fs::read(&o).unwrap(),
                "{what}: contents"
            );
            // One source inode, one extracted inode: hard links stay links.
            let twin = *inodes.entry(sm.ino()).or_insert(om.ino());
            assert_eq!(twin, om.ino(), "{what}: a hard link became a copy");
        }
        if !sm.is_symlink() {
            let get = |p: &Path| {
                sh(&format!(
                    "getfattr -d --absolute-names -m '^user\\.' '{}' 2>/dev/null | sed 1d",
                    p.display()
                ))
            };
            assert_eq!(get(&s), get(&o), "{what}: xattrs");
        }
    }
    // Extracted dirs match too, in both directions: nothing more was written.
    assert_eq!(
        files_below_all(src).len(),
        files_below_all(out).len(),
        "node counts"
    );
    let sparse = out.join("sparse").metadata().unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "the sparse file was written sparse ({} blocks)",
        sparse.blocks()
    );
}

/// Every path below `dir`, directories and links included, without following links.
fn files_below_all(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n == "lost+found") {
                continue;
            }
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn a_gpt_disk_lists_and_extracts_its_ext4_tree_and_names_its_fat32_partition() {
    if !tools_present() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    source_tree(&src);
    let disk = env.path("disk.img");
    let d = disk.display();
    sh(&format!(
        "truncate -s 200M {d} && sgdisk -a 2048 -n 1:2048:+150M -t 1:8300 -c 1:root -n 2:0:0 -t 2:ef00 -c 2:esp {d} >/dev/null \
         && mke2fs -q -F -t ext4 -E offset=1048576,root_owner=0:0 -d {s} {d} 150M \
         && dd if=/dev/zero of={fat} bs=1M count=40 status=none && mkfs.vfat -F 32 -n ESP {fat} >/dev/null \
         && echo hello > {h} && mcopy -i {fat} {h} ::/HELLO.TXT \
         && dd if={fat} of={d} bs=1M seek=151 conv=notrunc status=none",
        s = src.display(),
        fat = env.path("fat.img").display(),
        h = env.path("hello").display(),
    ));
    let snap = env.backup(&disk, &[]);
    let id = snap["snapshot"].as_str().unwrap();

    // The partitions, and what each holds.
    let parts = env.run(&["ls", id, "--json"]).json();
    assert_eq!(parts["table"], "gpt");
    let p = parts["partitions"].as_array().unwrap();
    assert_eq!(p.len(), 2, "{parts}");
    assert_eq!(
        (p[0]["number"].as_u64(), p[0]["start"].as_u64()),
        (Some(1), Some(1 << 20))
    );
    assert_eq!(
        (p[0]["filesystem"].as_str(), p[0]["name"].as_str()),
        (Some("ext4"), Some("root"))
    );
    assert_eq!(
        (p[1]["number"].as_u64(), p[1]["filesystem"].as_str()),
        (Some(2), Some("fat32"))
    );
    assert_eq!(p[1]["type"], "EFI System");
    let text = env.run(&["ls", id]);
    assert!(
        text.stdout.contains("ext4") && text.stdout.contains("Linux filesystem"),
        "{}",
        text.stdout
    );

    // A directory, as ls -l shows it, and as JSON.
    let r = env.run(&["ls", id, "1:/etc/nginx"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("-rw-r--r--")
            && r.stdout.contains("1234/5678")
            && r.stdout.contains("nginx.conf"),
        "{}",
        r.stdout
    );
    let j = env.run(&["ls", id, "1:/", "--json"]).json();
    let names: Vec<&str> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"Grüße, 世界 ✓") && names.contains(&"outside"),
        "{names:?}"
    );
    let outside = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "outside")
        .unwrap();
    assert_eq!(
        (outside["type"].as_str(), outside["target"].as_str()),
        (Some("symlink"), Some("/etc/passwd"))
    );
    let all = env.run(&["ls", id, "1:/deep", "-R"]);
    assert!(
        all.stdout
            .contains("/deep/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/leaf"),
        "{}",
        all.stdout
    );

    // cat follows a link inside the filesystem.
    let r = env.run(&["cat", id, "1:/conf/nginx.conf"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "worker_processes 4;\n"),
        "{}",
        r.stderr
    );

    // The whole partition, then the comparison.
    let out = env.path("out");
    let r = env.run(&[
        "extract",
        id,
        "1:/",
        "--target",
        out.to_str().unwrap(),
        "--json",
    ]);
    let report = r.json();
    assert_eq!(report["failed"].as_array().unwrap().len(), 0, "{report}");
    assert!(report["hard_links"].as_u64() >= Some(1), "{report}");
    compare_trees(&src, &out);

    // One directory is named by its last component; a second time is refused, then forced.
    let one = env.path("one");
    let t = one.to_str().unwrap();
    assert_eq!(env.run(&["extract", id, "1:/etc", "--target", t]).code, 0);
    assert_eq!(
        std::fs::read(one.join("etc/nginx/nginx.conf")).unwrap(),
        b"worker_processes 4;\n"
    );
    std::fs::write(one.join("etc/nginx/nginx.conf"), b"changed").unwrap();
    let r = env.run(&["extract", id, "1:/etc", "--target", t]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(one.join("etc/nginx/nginx.conf")).unwrap(),
        b"changed",
        "left alone"
    );
    assert_eq!(
        env.run(&["extract", id, "1:/etc", "--target", t, "--force"])
            .code,
        0
    );
    assert_eq!(
        std::fs::read(one.join("etc/nginx/nginx.conf")).unwrap(),
        b"worker_processes 4;\n"
    );

    // What cannot be done says so, with its exit code.
    let r = env.run(&["extract", id, "1:/no/such", "--target", t]);
    assert_eq!(r.code, 11, "{}", r.stderr);
    assert!(r.stderr.contains("/no/such"), "{}", r.stderr);
    assert_eq!(env.run(&["ls", id, "7:/"]).code, 11);
    assert_eq!(env.run(&["cat", id, "1:/etc"]).code, 13);
    let r = env.run(&["ls", id, "2:/"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr.contains("fat32") && r.stderr.contains("sbk serve"),
        "{}",
        r.stderr
    );
    assert_eq!(env.run(&["ls", id, "etc"]).code, 2, "no PART: prefix");
}

#[test]
fn a_small_file_of_a_large_disk_is_read_alone() {
    if !tools_present() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("data")).unwrap();
    for i in 0..4 {
        std::fs::write(src.join(format!("data/{i}.bin")), random(16 << 20, i)).unwrap();
    }
    std::fs::write(src.join("wanted"), random(1 << 20, 99)).unwrap();
    let disk = env.path("disk.img");
    sh(&format!(
        "mke2fs -q -F -t ext4 -d {} {} 100M",
        src.display(),
        disk.display()
    ));
    let id = env.backup(&disk, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = env.path("out");
    let r = env
        .run(&[
            "extract",
            &id,
            "0:/wanted",
            "--target",
            out.to_str().unwrap(),
            "--json",
        ])
        .json();
    assert_eq!(
        std::fs::read(out.join("wanted")).unwrap(),
        random(1 << 20, 99)
    );
    let read = r["repository_bytes_read"].as_u64().unwrap();
    // The file, the filesystem's metadata on the way and the snapshot's trees: nowhere near
    // the 65 MiB the disk holds.
    assert!(read < 8 << 20, "{read} bytes read for a 1 MiB file");
    assert!(
        read >= 1 << 20,
        "{read}: the file itself must have been read"
    );
}
