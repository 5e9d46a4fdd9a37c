//! Round trips: back up, restore, compare bytes.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::common::*;

/// Segment size of a repository with 64 KiB chunks (see `sbk init`).
const SEG: usize = 16 << 20;

fn round_trip(env: &Env, name: &str, data: &[u8]) {
    let src = env.path(name);
    std::fs::write(&src, data).unwrap();
    let snap = env.backup(&src, &[]);
    assert_eq!(snap["size"], data.len() as u64);
    let id = snap["snapshot"].as_str().unwrap();
    let out = env.path(&format!("{name}.restored"));
    env.restore(id, &out, &[]);
    assert_same(&src, &out);
    // The same snapshot to stdout.
    let o = sbk()
        .arg("--repo")
        .arg(&env.repo)
        .args(["restore", id, "-"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == data, "{name}: stdout restore differs");
}

#[test]
fn sizes_around_blocks_and_segments() {
    let env = Env::new();
    for len in [
        0,
        1,
        4095,
        4096,
        4097,
        SEG - 1,
        SEG,
        SEG + 1,
        3 * SEG + 12345,
    ] {
        round_trip(&env, &format!("random-{len}"), &random(len, len as u64));
    }
}

#[test]
fn repetitive_and_zero_data() {
    let env = Env::new();
    round_trip(&env, "repetitive", &repetitive(2 * SEG + 999));
    let zeros = vec![0u8; SEG + 4097];
    round_trip(&env, "zeros", &zeros);
    let snap = env.backup(&env.path("zeros"), &[]);
    assert_eq!(snap["new_bytes"], 0, "zeros are never stored");
    assert_eq!(snap["bytes_zero"], zeros.len() as u64);
    // Mixed: data, a zero run inside a segment, data.
    let mut mixed = random(5 << 20, 9);
    mixed[1 << 20..3 << 20].fill(0);
    round_trip(&env, "mixed", &mixed);
}

#[test]
fn sparse_file_keeps_its_holes() {
    let env = Env::new();
    let src = env.path("sparse");
    let size = 3 * SEG as u64 + 777;
    let f = File::create(&src).unwrap();
    f.set_len(size).unwrap();
    // Data at odd offsets; everything between is a hole.
    for (i, off) in [12_345u64, 5_000_001, 17_000_003, 40_000_000]
        .into_iter()
        .enumerate()
    {
        f.write_all_at(&random(300_000 + i * 1000, off), off)
            .unwrap();
    }
    f.write_all_at(b"tail", size - 4).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let snap = env.backup(&src, &[]);
    let read = snap["bytes_read"].as_u64().unwrap();
    assert!(read < 4 << 20, "holes are not read: read {read} bytes");
    let out = env.path("sparse.restored");
    env.restore(snap["snapshot"].as_str().unwrap(), &out, &[]);
    assert_same(&src, &out);
    // Every hole of 64 KiB or more in the source is a hole in the restored file.
    let holes = |p: &std::path::Path| {
        let s = sbk_engine::Source::open(p).unwrap();
        let data = s.data_ranges(0..size).unwrap();
        let mut holes = Vec::new();
        let mut pos = 0;
        for r in data {
            if r.start > pos {
                holes.push(pos..r.start);
            }
            pos = r.end;
        }
        if pos < size {
            holes.push(pos..size);
        }
        holes
    };
    let restored_holes = holes(&out);
    for h in holes(&src)
        .into_iter()
        .filter(|h| h.end - h.start >= 128 << 10)
    {
        // Zero extents fall on 4 KiB blocks; allow the edges.
        let inner = (h.start + 4096)..(h.end - 4096);
        assert!(
            restored_holes
                .iter()
                .any(|r| r.start <= inner.start && r.end >= inner.end),
            "source hole {h:?} is not a hole in the restore: {restored_holes:?}"
        );
    }
    let (src_blocks, out_blocks) = (
        std::fs::metadata(&src).unwrap().blocks(),
        std::fs::metadata(&out).unwrap().blocks(),
    );
    assert!(
        out_blocks <= src_blocks + 64,
        "restored file allocates {out_blocks} blocks, source {src_blocks}"
    );
}

#[test]
fn chunk_list_does_not_depend_on_thread_count() {
    let env = Env::new();
    let src = env.path("img");
    let mut data = random(5 * SEG + 4321, 77);
    data[3 * SEG..3 * SEG + (1 << 20)].fill(0);
    std::fs::write(&src, &data).unwrap();
    let one = env.backup(&src, &["--threads", "1"]);
    let four = env.backup(&src, &["--threads", "4"]);
    assert_eq!(four["new_bytes"], 0);
    let repo = env.open();
    let extents = |id: &serde_json::Value| {
        let id = id.as_str().unwrap().parse().unwrap();
        let m = repo.load_manifest(&id).unwrap();
        sbk_engine::load_extents(&repo, &m, 0..m.trees.len()).unwrap()
    };
    let (a, b) = (extents(&one["snapshot"]), extents(&four["snapshot"]));
    assert!(a.len() > 50, "expected many chunks, got {}", a.len());
    assert_eq!(a, b);
}
