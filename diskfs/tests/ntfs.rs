//! NTFS images made by mkntfs and filled through ntfs-3g (FUSE) from a real tree, read back
//! and compared: long and non-ASCII names, nested directories, contents, mtimes, hard links.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{compare_files, run, tool};
use sbk_diskfs::{lookup, open_filesystem, Disk, FsKind};

#[test]
fn ntfs_reads_back_the_tree_ntfs_3g_wrote() {
    let (Some(mkntfs), Some(ntfs3g)) = (tool("mkntfs"), tool("ntfs-3g")) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("Users/Ann/Documents")).unwrap();
    std::fs::write(
        src.join("Users/Ann/Documents/Quarterly Report (final).xlsx"),
        b"numbers",
    )
    .unwrap();
    std::fs::write(src.join("Users/Ann/Grüße 世界.txt"), "non-ASCII\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(src.join("big.bin"), big).unwrap();
    std::fs::write(src.join("tiny"), b"resident").unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    for i in 0..200 {
        // Enough names that the root's index leaves its record for index blocks.
        std::fs::write(src.join(format!("many-{i:03}.log")), format!("{i}\n")).unwrap();
    }
    let img = t.path().join("ntfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    run(Command::new(mkntfs)
        .args(["-q", "-F", "-f", "-L", "WINDATA"])
        .arg(&img));
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new(ntfs3g)
        .args(["-o", "compression"])
        .arg(&img)
        .arg(&mnt)
        .output()
        .unwrap();
    if !mounted.status.success() {
        let why = String::from_utf8_lossy(&mounted.stderr);
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "ntfs-3g cannot mount: {why}"
        );
        eprintln!("skipped: ntfs-3g cannot mount here: {why}");
        return;
    }
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&mnt)
        .status()
        .unwrap();
    let linked = std::fs::hard_link(mnt.join("tiny"), mnt.join("Users/tiny-link"));
    // A folder NTFS compresses (FILE_ATTRIBUTE_COMPRESSED), with a file in it.
    std::fs::create_dir(mnt.join("packed")).unwrap();
    let compressed = Command::new("setfattr")
        .args(["-n", "system.ntfs_attrib_be", "-v", "0x00000800"])
        .arg(mnt.join("packed"))
        .status();
    std::fs::write(mnt.join("packed/log.txt"), "hello\n".repeat(40_000)).unwrap();
    run(Command::new("umount").arg(&mnt));
    assert!(copied.success());
    linked.unwrap();

    let disk: Disk = Arc::new(std::fs::File::open(&img).unwrap());
    let fs = open_filesystem(disk).unwrap();
    assert_eq!(
        (fs.kind(), fs.label()),
        (FsKind::Ntfs, "WINDATA".to_owned())
    );
    // Compressed streams are refused by name, never read as stored.
    assert!(compressed.unwrap().success());
    let packed = lookup(fs.as_ref(), b"/packed/log.txt", false).unwrap();
    let opened = fs.open(&packed).map(|_| ());
    match opened {
        Err(sbk_diskfs::FsError::Unsupported(why)) => assert!(why.contains("compressed"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(()) => panic!("a compressed file opened as if it were stored plain"),
    }
    std::fs::create_dir(src.join("packed")).unwrap(); // the folder itself compares; its file not
    compare_files_except(fs.as_ref(), &src, "/packed/log.txt");
    let root = fs.root().unwrap();
    let names: Vec<String> = fs
        .read_dir(&root)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with('$')),
        "metadata files are not listed: {names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("many-")).count(),
        200,
        "no 8.3 aliases"
    );
    let a = lookup(fs.as_ref(), b"/tiny", false).unwrap();
    let b = lookup(fs.as_ref(), b"/Users/tiny-link", false).unwrap();
    assert_eq!((a.id, a.links), (b.id, 2), "one record, two names");
}

/// [`compare_files`] of the whole tree, `skip` aside (in the image, not in `src`).
fn compare_files_except(fs: &dyn sbk_diskfs::Filesystem, src: &std::path::Path, skip: &str) {
    let root = fs.root().unwrap();
    let names: Vec<Vec<u8>> = fs
        .read_dir(&root)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&b"packed".to_vec()));
    assert!(lookup(fs, skip.as_bytes(), false).is_ok());
    compare_files(fs, src, "", 0);
}
