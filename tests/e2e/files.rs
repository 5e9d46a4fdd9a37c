//! File-level restore (issue 21): disks built the way their tools build them (sgdisk, sfdisk,
//! mke2fs -d from a real tree, mkfs.vfat), backed up, then listed and extracted with `sbk ls`,
//! `sbk cat` and `sbk extract`, and the extracted trees compared with the source trees.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

/// Whether the tools that build the disks are here (root too, for owners).
pub(crate) fn tools_present() -> bool {
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
    if !src.join("sparse").exists() {
        return;
    }
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

/// A GPT disk in `env`: partition 1 an ext4 made from [`source_tree`], 2 a FAT32 ESP holding
/// HELLO.TXT and an EFI tree under "Long Name Dir", 3 swap. Returns the two source trees and
/// the disk.
pub(crate) fn gpt_disk(env: &Env) -> (PathBuf, PathBuf, PathBuf) {
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    source_tree(&src);
    // The ESP's tree: FAT keeps names, contents and mtimes (to 2 s).
    let esp_src = env.path("esp_src");
    std::fs::create_dir_all(esp_src.join("EFI/BOOT")).unwrap();
    std::fs::write(esp_src.join("EFI/BOOT/BOOTX64.EFI"), random(1 << 20, 5)).unwrap();
    std::fs::write(esp_src.join("EFI/a long name, mixed Case.txt"), b"long\n").unwrap();
    let disk = env.path("disk.img");
    let d = disk.display();
    sh(&format!(
        "truncate -s 210M {d} && sgdisk -a 2048 -n 1:2048:+150M -t 1:8300 -c 1:root -n 2:0:+40M -t 2:ef00 -c 2:esp -n 3:0:0 -t 3:8200 {d} >/dev/null \
         && mke2fs -q -F -t ext4 -E offset=1048576,root_owner=0:0 -d {s} {d} 150M \
         && dd if=/dev/zero of={fat} bs=1M count=40 status=none && mkfs.vfat -F 32 -n ESP {fat} >/dev/null \
         && echo hello > {h} && mcopy -i {fat} {h} ::/HELLO.TXT && TZ=UTC mcopy -s -m -i {fat} {esp}/EFI '::/Long Name Dir' \
         && dd if={fat} of={d} bs=1M seek=151 conv=notrunc status=none \
         && truncate -s 8M {swap} && mkswap {swap} >/dev/null && dd if={swap} of={d} bs=1M seek=191 conv=notrunc status=none",
        swap = env.path("swap.img").display(),
        s = src.display(),
        fat = env.path("fat.img").display(),
        h = env.path("hello").display(),
        esp = esp_src.display(),
    ));
    (src, esp_src, disk)
}

#[test]
fn a_gpt_disk_lists_and_extracts_its_ext4_and_fat32_trees() {
    if !tools_present() {
        return;
    }
    let env = Env::new();
    let (src, esp_src, disk) = gpt_disk(&env);
    let snap = env.backup(&disk, &[]);
    let id = snap["snapshot"].as_str().unwrap();

    // The partitions, and what each holds.
    let parts = env.run(&["ls", id, "--json"]).json();
    assert_eq!(parts["table"], "gpt");
    let p = parts["partitions"].as_array().unwrap();
    assert_eq!(p.len(), 3, "{parts}");
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
    assert_eq!(
        (p[2]["type"].as_str(), p[2]["filesystem"].as_str()),
        (Some("Linux swap"), Some("swap"))
    );
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
    let r = env.run(&["ls", id, "3:/"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr.contains("swap") && r.stderr.contains("sbk serve"),
        "{}",
        r.stderr
    );

    // The FAT32 partition beside it reads too.
    let r = env.run(&["cat", id, "2:/HELLO.TXT"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "hello\n"), "{}", r.stderr);
    let esp = env.path("esp");
    let r = env.run(&["extract", id, "2:/", "--target", esp.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(esp.join("HELLO.TXT")).unwrap(), b"hello\n");
    assert_files_match(&esp_src.join("EFI"), &esp.join("Long Name Dir"), 2);
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

/// Replaces the directory-entry name `from` by `to` (same length) everywhere in the image:
/// what a hostile guest can write into its own disk.
fn patch_name(image: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut b = std::fs::read(image).unwrap();
    let mut n = 0;
    for i in 0..b.len() - from.len() {
        if &b[i..i + from.len()] == from {
            b[i..i + from.len()].copy_from_slice(to);
            n += 1;
        }
    }
    assert!(n > 0, "{} not in the image", String::from_utf8_lossy(from));
    std::fs::write(image, b).unwrap();
}

#[test]
fn a_hostile_image_never_writes_outside_the_target() {
    if !tools_present() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    // Names patched after mke2fs: one with a slash, one that becomes "..", and a file that
    // takes the name of the link before it in its directory (the second must not write
    // through the first).
    std::fs::write(src.join("d/aXXXetcXpass"), b"slash").unwrap();
    std::fs::create_dir(src.join("d/QQ")).unwrap();
    std::fs::write(src.join("d/QQ/inside"), b"dotdot").unwrap();
    std::os::unix::fs::symlink(env.path("escaped"), src.join("d/evil")).unwrap();
    std::fs::write(src.join("d/evim"), b"through the link?").unwrap();
    std::fs::write(src.join("d/fine"), b"fine").unwrap();
    let img = env.path("fs.img");
    sh(&format!(
        "mke2fs -q -F -t ext4 -O ^metadata_csum -d {} {} 8M",
        src.display(),
        img.display()
    ));
    patch_name(&img, b"aXXXetcXpass", b"a/../etc/pas");
    // The short names are patched with their directory entry's name length and file type in
    // front (ext4: 2, directory; 4, regular file), so that they never match inside the link's
    // target, a temporary path whose random part may hold "QQ".
    patch_name(&img, b"\x02\x02QQ", b"\x02\x02..");
    patch_name(&img, b"\x04\x01evim", b"\x04\x01evil");
    let id = env.backup(&img, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = env.path("out");
    let r = env.run(&[
        "extract",
        &id,
        "0:/d",
        "--target",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code, 12, "damage is reported: {}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let failed = report["failed"].to_string();
    assert!(
        failed.contains("unsafe name") && failed.contains("second entry"),
        "{failed}"
    );
    // What is safe was written; nothing escaped: no file beside the target, no write through
    // the link.
    assert_eq!(std::fs::read(out.join("d/fine")).unwrap(), b"fine");
    assert_eq!(
        std::fs::read_link(out.join("d/evil")).unwrap(),
        env.path("escaped")
    );
    assert!(!env.path("escaped").exists(), "written through a link");
    assert!(!env.path("etc").exists() && !out.join("etc").exists());
    let mut names: Vec<_> = std::fs::read_dir(env.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(
        !names.iter().any(|n| n == "inside" || n == "pas"),
        "{names:?}"
    );
}

#[test]
fn a_damaged_chunk_fails_its_file_and_the_rest_are_extracted() {
    if !tools_present() {
        return;
    }
    let env = Env::new();
    let (_, id) = damaged_file_b(&env, &[]);
    let out = env.path("out");
    let r = env.run(&["extract", &id, "0:/", "--target", out.to_str().unwrap()]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(
        r.stderr.contains("/b") && r.stderr.contains("chunk"),
        "names the file and the chunk: {}",
        r.stderr
    );
    assert_eq!(std::fs::read(out.join("a")).unwrap(), random(4 << 20, 1));
    assert_eq!(std::fs::read(out.join("c")).unwrap(), b"small");
    assert!(!out.join("b").exists(), "half a file is not left behind");
}

#[test]
fn an_mbr_disk_with_logical_partitions_numbers_them_as_linux_does() {
    if !tools_present() {
        return;
    }
    let env = Env::new();
    let disk = env.path("disk.img");
    let d = disk.display();
    // Partition 1 (ext2), an extended partition 2 holding logical partitions 5 (ext3) and
    // 6 (ext4); each filesystem made from its own tree at its partition's offset.
    sh(&format!(
        "truncate -s 100M {d} && printf 'label: dos\\nstart=2048, size=40960, type=83\\nstart=45056, type=5\\nstart=47104, size=40960, type=83\\nstart=90112, size=40960, type=83\\n' | sfdisk -q {d}"
    ));
    let parts = env.path("parts");
    for (n, kind, start) in [(1, "ext2", 2048u64), (5, "ext3", 47104), (6, "ext4", 90112)] {
        let tree = parts.join(n.to_string());
        std::fs::create_dir_all(tree.join("dir")).unwrap();
        std::fs::write(tree.join("dir/which"), format!("partition {n}, {kind}\n")).unwrap();
        std::os::unix::fs::symlink("dir/which", tree.join("link")).unwrap();
        sh(&format!(
            "mke2fs -q -F -t {kind} -E offset={},root_owner=0:0 -d {} {d} 20M",
            start * 512,
            tree.display()
        ));
    }
    let id = env.backup(&disk, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let j = env.run(&["ls", &id, "--json"]).json();
    assert_eq!(j["table"], "mbr");
    let got: Vec<(u64, bool, Option<&str>)> = j["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["number"].as_u64().unwrap(),
                p["extended"].as_bool().unwrap(),
                p["filesystem"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, false, Some("ext2")),
            (2, true, None),
            (5, false, Some("ext3")),
            (6, false, Some("ext4"))
        ]
    );
    for n in [1, 5, 6] {
        let out = env.path(&format!("out{n}"));
        let r = env.run(&[
            "extract",
            &id,
            &format!("{n}:/"),
            "--target",
            out.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        compare_trees(&parts.join(n.to_string()), &out);
    }
    assert_eq!(
        env.run(&["ls", &id, "2:/"]).code,
        13,
        "an extended partition holds no filesystem"
    );
}

#[test]
fn an_ntfs_partition_extracts_its_names_and_contents() {
    if !tools_present() || !have_tool("mkntfs") || !have_tool("ntfs-3g") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("Users/Ann/Desktop")).unwrap();
    std::fs::write(
        src.join("Users/Ann/Desktop/budget 2026.xlsx"),
        random(300_000, 7),
    )
    .unwrap();
    std::fs::write(src.join("Users/Ann/Grüße.txt"), "non-ASCII\n").unwrap();
    std::fs::write(src.join("pagefile.bin"), repetitive(20 << 20)).unwrap();
    let (ntfs, mnt, disk) = (env.path("ntfs.img"), env.path("mnt"), env.path("disk.img"));
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "truncate -s 60M {n} && mkntfs -q -F -f -L WINDOWS {n} 2>/dev/null && ntfs-3g {n} {m} \
         && cp -a {s}/. {m} && umount {m} \
         && truncate -s 64M {d} && sgdisk -a 2048 -n 1:2048:+60M -t 1:0700 -c 1:'Basic data partition' {d} >/dev/null \
         && dd if={n} of={d} bs=1M seek=1 conv=notrunc status=none",
        n = ntfs.display(),
        m = mnt.display(),
        s = src.display(),
        d = disk.display(),
    ));
    let id = env.backup(&disk, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let j = env.run(&["ls", &id, "--json"]).json();
    let p = &j["partitions"][0];
    assert_eq!(
        (p["filesystem"].as_str(), p["label"].as_str()),
        (Some("ntfs"), Some("WINDOWS")),
        "{j}"
    );
    let out = env.path("out");
    let r = env.run(&["extract", &id, "1:/", "--target", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_files_match(&src, &out, 0);
    assert_eq!(
        files_below_all(&src).len(),
        files_below_all(&out).len(),
        "only the user's files"
    );
}

/// The directories and files under `src` are under `out`, with the same contents and mtimes
/// (within `mtime_slack` seconds: FAT keeps 2 s); for filesystems that keep no owners, modes or
/// links.
fn assert_files_match(src: &Path, out: &Path, mtime_slack: i64) {
    for f in files_below_all(src) {
        let o = out.join(f.strip_prefix(src).unwrap());
        let (sm, om) = (
            f.metadata().unwrap(),
            o.metadata()
                .unwrap_or_else(|e| panic!("{}: {e}", o.display())),
        );
        assert_eq!(sm.is_dir(), om.is_dir(), "{}", o.display());
        if sm.is_file() {
            assert!(
                std::fs::read(&f).unwrap() == std::fs::read(&o).unwrap(),
                "{}",
                o.display()
            );
            assert!(
                (sm.mtime() - om.mtime()).abs() <= mtime_slack,
                "{}: mtime",
                o.display()
            );
        }
    }
}

/// An ext4 disk of `src/` with files a and b (4 MiB each, random) and c ("small"), backed up
/// twice: b's blocks get other bytes between the backups, straight into the image (no metadata
/// changes), so the second backup stores only the chunks over b, in packs of their own, which
/// are then damaged. Returns the two snapshots' ids.
pub fn damaged_file_b(env: &Env, backup_args: &[&str]) -> (String, String) {
    let src = env.path("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), random(4 << 20, 1)).unwrap();
    std::fs::write(src.join("b"), random(4 << 20, 2)).unwrap();
    std::fs::write(src.join("c"), b"small").unwrap();
    let img = env.path("fs.img");
    sh(&format!(
        "mke2fs -q -F -t ext4 -b 4096 -d {} {} 32M",
        src.display(),
        img.display()
    ));
    let snapshot = |env: &Env| {
        env.backup(&img, backup_args)["snapshot"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first = snapshot(env);
    let block: u64 = sh(&format!(
        "debugfs -R 'bmap /b 0' {} 2>/dev/null",
        img.display()
    ))
    .trim()
    .parse()
    .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &random(4 << 20, 3), block * 4096).unwrap();
    drop(f);
    let before = env.packs();
    let second = snapshot(env);
    for p in env.packs().into_iter().filter(|p| !before.contains(p)) {
        let mut b = std::fs::read(&p).unwrap();
        let at = b.len() / 3;
        b[at] ^= 0x40;
        std::fs::write(&p, &b).unwrap();
    }
    (first, second)
}
