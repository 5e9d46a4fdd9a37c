//! ext images made by mke2fs -d from a real tree, read back and compared with the tree.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

mod common;

use common::{read_all, run, tool};
use sbk_diskfs::{lookup, open_filesystem, Disk, Filesystem, FsError, Kind};

/// A tree with what an ext filesystem must give back: nested directories, a long and a
/// non-ASCII name, fast and slow symbolic links, a hard link, a sparse file of many data
/// islands (an extent tree deeper than the inode), an empty file, a 3 MiB file, odd modes,
/// user xattrs.
fn source_tree(root: &Path) {
    let deep = root.join("a/b/c/d/e/f/g/h");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("leaf.txt"), b"deep\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("n".repeat(255)), b"long name").unwrap();
    std::fs::write(root.join("héllo wörld ✓"), b"unicode").unwrap();
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::hard_link(root.join("big.bin"), root.join("a/big-link.bin")).unwrap();
    std::os::unix::fs::symlink("a/b/c", root.join("short-link")).unwrap();
    std::os::unix::fs::symlink("x".repeat(200), root.join("long-link")).unwrap();
    let f = std::fs::File::create(root.join("sparse")).unwrap();
    for i in 0..12u64 {
        std::os::unix::fs::FileExt::write_all_at(&f, &[i as u8 + 1; 5000], i * (1 << 20)).unwrap();
    }
    f.set_len(40 << 20).unwrap();
    drop(f);
    std::fs::set_permissions(root.join("empty"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    if let Some(setfattr) = tool("setfattr") {
        run(Command::new(setfattr)
            .args(["-n", "user.colour", "-v", "blue"])
            .arg(root.join("big.bin")));
        run(Command::new(tool("setfattr").unwrap())
            .args(["-n", "user.big", "-v", &"v".repeat(300)])
            .arg(root.join("a")));
    }
}

fn image(args: &[&str], src: &Path, out: &Path, mib: u64) -> Option<Disk> {
    let mke2fs = tool("mke2fs")?;
    std::fs::File::create(out)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    run(Command::new(mke2fs)
        .args(["-q", "-F", "-E", "root_owner=0:0"])
        .args(args)
        .arg("-d")
        .arg(src)
        .arg(out));
    Some(Arc::new(std::fs::File::open(out).unwrap()))
}

/// Every node under `src` has its twin in `fs`, with the same metadata and contents.
fn compare(fs: &dyn Filesystem, src: &Path, rel: &str) {
    for e in std::fs::read_dir(src.join(rel.trim_start_matches('/'))).unwrap() {
        let e = e.unwrap();
        let path = format!("{rel}/{}", e.file_name().to_str().unwrap());
        let m = e.path().symlink_metadata().unwrap();
        let n = lookup(fs, path.as_bytes(), false).unwrap_or_else(|err| panic!("{path}: {err}"));
        assert_eq!(n.perm, m.mode() & 0o7777, "{path}");
        assert_eq!((n.uid, n.gid), (m.uid(), m.gid()), "{path}");
        assert_eq!(n.mtime.secs, m.mtime(), "{path}");
        assert_eq!(n.links as u64, m.nlink(), "{path}");
        if m.is_dir() {
            assert_eq!(n.kind, Kind::Dir, "{path}");
            compare(fs, src, &path);
        } else if m.is_symlink() {
            assert_eq!(n.kind, Kind::Symlink, "{path}");
            let target = std::fs::read_link(e.path()).unwrap();
            assert_eq!(
                fs.read_link(&n).unwrap(),
                target.as_os_str().as_encoded_bytes(),
                "{path}"
            );
        } else {
            assert_eq!(n.kind, Kind::File, "{path}");
            assert_eq!(n.size, m.len(), "{path}");
            let want = std::fs::read(e.path()).unwrap();
            let got = read_all(fs, &n);
            assert!(got == want, "{path}: contents differ");
            let f = fs.open(&n).unwrap();
            let data: u64 = f.data_ranges().iter().map(|(a, b)| b - a).sum();
            assert!(data <= n.size);
            if path.ends_with("sparse") {
                assert!(
                    data < 1 << 20,
                    "{path}: the holes are holes ({data} bytes of data)"
                );
            }
        }
    }
}

fn check(args: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    source_tree(&src);
    let Some(disk) = image(args, &src, &t.path().join("fs.img"), 64) else {
        return;
    };
    let fs = open_filesystem(disk).unwrap();
    compare(fs.as_ref(), &src, "");
    let big = lookup(fs.as_ref(), b"/big.bin", false).unwrap();
    let link = lookup(fs.as_ref(), b"/a/big-link.bin", false).unwrap();
    assert_eq!(big.id, link.id, "hard links share an inode");
    if tool("setfattr").is_some() {
        let x = fs.xattrs(&big).unwrap();
        assert!(
            x.contains(&(b"user.colour".to_vec(), b"blue".to_vec())),
            "{x:?}"
        );
        let a = lookup(fs.as_ref(), b"/a", false).unwrap();
        assert!(fs
            .xattrs(&a)
            .unwrap()
            .contains(&(b"user.big".to_vec(), vec![b'v'; 300])));
    }
    // Paths: symbolic links on the way are followed, `..` climbs, the last is followed on ask.
    let leaf = lookup(fs.as_ref(), b"/short-link/d/../d/e/f/g/h/leaf.txt", false).unwrap();
    assert_eq!(leaf.size, 5);
    assert_eq!(
        lookup(fs.as_ref(), b"/short-link", true).unwrap().kind,
        Kind::Dir
    );
    assert!(matches!(
        lookup(fs.as_ref(), b"/nope", false),
        Err(FsError::NotFound(_))
    ));
    assert!(matches!(
        lookup(fs.as_ref(), b"/big.bin/x", false),
        Err(FsError::NotDirectory(_))
    ));
}

#[test]
fn ext4_reads_back_the_tree_it_was_made_from() {
    check(&["-t", "ext4"]);
}

#[test]
fn ext4_with_1k_blocks_and_64bit_and_meta_bg() {
    check(&[
        "-t",
        "ext4",
        "-b",
        "1024",
        "-O",
        "64bit,meta_bg,^resize_inode",
    ]);
}

#[test]
fn ext3_and_ext2_block_maps_read_back() {
    check(&["-t", "ext3", "-b", "1024"]);
    check(&["-t", "ext2", "-I", "128"]);
}

/// The block and byte offset of `path`'s inode, as debugfs's `imap` says.
fn imap(img: &std::path::Path, path: &str) -> Option<(u64, u64)> {
    let out = Command::new(tool("debugfs")?)
        .args(["-R", &format!("imap {path}")])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = text.split("located at block ").nth(1)?;
    let (block, off) = rest.split_once(", offset 0x")?;
    Some((
        block.trim().parse().ok()?,
        u64::from_str_radix(off.trim(), 16).ok()?,
    ))
}

#[test]
fn an_extent_tree_that_names_one_block_twice_is_damage_not_a_blowup() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("sparse")).unwrap();
    for i in 0..12u64 {
        std::os::unix::fs::FileExt::write_all_at(&f, &[7; 5000], i << 20).unwrap();
    }
    drop(f);
    let img = t.path().join("fs.img");
    let Some(_) = image(&["-t", "ext4", "-b", "4096"], &src, &img, 64) else {
        return;
    };
    let Some((block, off)) = imap(&img, "/sparse") else {
        return;
    };
    // The inode's root is an index of one entry (depth 1); make it two entries naming the
    // same leaf: a hostile tree that, nested, would be read 340^5 times.
    let mut b = std::fs::read(&img).unwrap();
    let root = (block * 4096 + off) as usize + 0x28;
    assert_eq!(u16::from_le_bytes([b[root], b[root + 1]]), 0xF30A);
    assert_eq!(u16::from_le_bytes([b[root + 6], b[root + 7]]), 1, "depth 1");
    b[root + 2] = 2;
    b.copy_within(root + 12..root + 24, root + 24);
    b[root + 24..root + 28].copy_from_slice(&1_000_000u32.to_le_bytes()); // a later logical start
    std::fs::write(&img, &b).unwrap();
    let disk: Disk = Arc::new(std::fs::File::open(&img).unwrap());
    let fs = open_filesystem(disk).unwrap();
    let n = lookup(fs.as_ref(), b"/sparse", false).unwrap();
    let opened = fs.open(&n).map(|_| ());
    match opened {
        Err(FsError::Damaged(why)) => assert!(why.contains("comes back"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(()) => panic!("a tree naming one leaf twice opened"),
    }
}
