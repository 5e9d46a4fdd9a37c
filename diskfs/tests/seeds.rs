//! The fuzz seeds are the disks they claim to be (so the fuzzer starts from images the readers
//! get deep into), and every saved input replays without a panic.

use std::path::Path;
use std::sync::Arc;

use sbk_diskfs::{lookup, open_filesystem, partitions, Disk, FsKind, TableKind};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty());
    out
}

fn seed(target: &str, name: &str) -> Disk {
    let bytes = corpus(target)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1;
    Arc::new(bytes)
}

/// /d/f holds "hello\n", /hard is a hard link of it, /l a symbolic link to it.
fn check_tree(dev: Disk) {
    let fs = open_filesystem(dev).unwrap();
    let f = lookup(fs.as_ref(), b"/d/f", false).unwrap();
    let mut buf = [0u8; 16];
    let n = fs.open(&f).unwrap().read_at(0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello\n");
    assert_eq!(lookup(fs.as_ref(), b"/hard", false).unwrap().id, f.id);
    assert_eq!(lookup(fs.as_ref(), b"/l", true).unwrap().id, f.id);
}

#[test]
fn the_seeds_are_what_they_claim() {
    let gpt = seed("disk_image", "gpt-ext4");
    let t = partitions(&gpt).unwrap();
    assert_eq!(t.kind, TableKind::Gpt);
    assert_eq!(t.partitions.len(), 1);
    assert_eq!(
        (t.partitions[0].number, t.partitions[0].start),
        (1, 34 * 512)
    );
    assert_eq!(t.partitions[0].label, "root");
    assert_eq!(t.partitions[0].kind, "Linux filesystem");
    let p1: Disk = Arc::new(t.open(&gpt, 1).unwrap());
    assert_eq!(sbk_diskfs::detect(p1.as_ref()), FsKind::Ext(4));
    check_tree(p1);

    let mbr = seed("disk_image", "mbr-logical-ext2");
    let t = partitions(&mbr).unwrap();
    assert_eq!(t.kind, TableKind::Mbr);
    let numbers: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 5, 6]);
    check_tree(Arc::new(t.open(&mbr, 5).unwrap()));

    let fat = open_filesystem(seed("fs_image", "fat12")).unwrap();
    assert_eq!(
        (fat.kind(), fat.label()),
        (FsKind::Fat(12), "SEED".to_owned())
    );
    let f = lookup(fat.as_ref(), b"/d/f", false).unwrap();
    let mut buf = [0u8; 16];
    let n = fat.open(&f).unwrap().read_at(0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello\n");
    assert!(lookup(fat.as_ref(), b"/a long name.txt", false).is_ok());

    let ntfs = open_filesystem(seed("fs_image", "ntfs")).unwrap();
    assert_eq!(
        (ntfs.kind(), ntfs.label()),
        (FsKind::Ntfs, "SEED".to_owned())
    );
    let f = lookup(ntfs.as_ref(), b"/d/f", false).unwrap();
    let n = ntfs.open(&f).unwrap().read_at(0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello\n");
    assert_eq!(lookup(ntfs.as_ref(), b"/hard", false).unwrap().id, f.id);

    check_tree(seed("fs_image", "ext2"));
    check_tree(seed("fs_image", "ext4-1k"));
    let bare = seed("fs_image", "ext4-1k");
    let t = partitions(&bare).unwrap();
    assert_eq!((t.kind, t.partitions[0].number), (TableKind::None, 0));
}

#[test]
fn replay_corpora() {
    for (_, bytes) in corpus("disk_image") {
        sbk_diskfs::fuzz::disk(&bytes);
    }
    for (_, bytes) in corpus("fs_image") {
        sbk_diskfs::fuzz::filesystem_image(&bytes);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

    /// Mutated seeds (a few bytes, mostly in the metadata near the start) never panic or hang
    /// the readers: a stable-toolchain fuzzer that `cargo test` runs.
    #[test]
    fn mutated_seeds_never_panic(
        which in 0usize..6,
        edits in proptest::collection::vec((0usize..1 << 20, proptest::num::u8::ANY, proptest::bool::ANY), 1..24),
    ) {
        let (target, name) = [
            ("disk_image", "gpt-ext4"),
            ("disk_image", "mbr-logical-ext2"),
            ("fs_image", "ext2"),
            ("fs_image", "ext4-1k"),
            ("fs_image", "fat12"),
            ("fs_image", "ntfs"),
        ][which];
        let mut bytes = corpus(target).into_iter().find(|(n, _)| n == name).unwrap().1;
        for (at, v, near) in edits {
            let at = if near { at % 131_072 } else { at } % bytes.len();
            bytes[at] = v;
        }
        if target == "disk_image" {
            sbk_diskfs::fuzz::disk(&bytes);
        } else {
            sbk_diskfs::fuzz::filesystem_image(&bytes);
        }
    }
}
