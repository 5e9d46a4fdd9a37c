//! FAT12, FAT16 and FAT32 images made by mkfs.vfat and filled by mcopy from a real tree, read
//! back and compared: long and short names, nested directories, contents, mtimes to 2 s.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{compare_files, run, tool};
use sbk_diskfs::{lookup, open_filesystem, partitions, Disk, FsKind, TableKind};

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("Program Files/Some Vendor")).unwrap();
    std::fs::write(
        root.join("Program Files/Some Vendor/settings.ini"),
        b"[a]\nb=c\n",
    )
    .unwrap();
    std::fs::write(root.join("README.TXT"), b"short name\n").unwrap();
    std::fs::write(
        root.join("a long file name with spaces.txt"),
        b"long name\n",
    )
    .unwrap();
    std::fs::write(root.join("MixedCase.Doc"), b"mixed\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    // Many entries: the directory spans clusters.
    std::fs::create_dir(root.join("many")).unwrap();
    for i in 0..300 {
        std::fs::write(
            root.join(format!("many/file number {i:03}.dat")),
            format!("{i}\n"),
        )
        .unwrap();
    }
    let big: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("big.bin"), big).unwrap();
}

fn check(bits: u8, kib: u64) {
    let (Some(mkfs), Some(mcopy)) = (tool("mkfs.vfat"), tool("mcopy")) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    tree(&src);
    let img = t.path().join("fat.img");
    run(Command::new(mkfs)
        .args(["-C", "-n", "MYLABEL", "-F", &bits.to_string()])
        .arg(&img)
        .arg(kib.to_string()));
    // mtools writes local time; UTC here is what the reader assumes.
    let mut copy = Command::new(mcopy);
    copy.env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-i"])
        .arg(&img);
    for e in std::fs::read_dir(&src).unwrap() {
        copy.arg(e.unwrap().path());
    }
    run(copy.arg("::/"));
    let disk: Disk = Arc::new(std::fs::File::open(&img).unwrap());
    let t2 = partitions(&disk).unwrap();
    assert_eq!(
        t2.kind,
        TableKind::None,
        "a bare FAT is partition 0, not an MBR"
    );
    let fs = open_filesystem(disk).unwrap();
    assert_eq!(fs.kind(), FsKind::Fat(bits));
    assert_eq!(fs.label(), "MYLABEL");
    compare_files(fs.as_ref(), &src, "", 2);
    let many = lookup(fs.as_ref(), b"/many", false).unwrap();
    assert_eq!(fs.read_dir(&many).unwrap().len(), 300);
}

#[test]
fn fat12_reads_back() {
    check(12, 2048);
}

#[test]
fn fat16_reads_back() {
    check(16, 20 * 1024);
}

#[test]
fn fat32_reads_back() {
    check(32, 40 * 1024);
}
