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
    let mounted = Command::new(ntfs3g).arg(&img).arg(&mnt).output().unwrap();
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
    run(Command::new("umount").arg(&mnt));
    assert!(copied.success());
    linked.unwrap();

    let disk: Disk = Arc::new(std::fs::File::open(&img).unwrap());
    let fs = open_filesystem(disk).unwrap();
    assert_eq!(
        (fs.kind(), fs.label()),
        (FsKind::Ntfs, "WINDATA".to_owned())
    );
    compare_files(fs.as_ref(), &src, "", 0);
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
