//! Deduplication: across backups and inside one image.

use crate::common::*;

#[test]
fn second_backup_of_the_same_image_stores_almost_nothing() {
    let env = Env::new();
    let src = env.path("img");
    let data = random(40 << 20, 5);
    std::fs::write(&src, &data).unwrap();
    let first = env.backup(&src, &[]);
    assert!(first["new_bytes"].as_u64().unwrap() >= data.len() as u64 * 99 / 100);
    let second = env.backup(&src, &[]);
    let stored = second["new_bytes_stored"].as_u64().unwrap();
    assert!(
        stored < data.len() as u64 / 100,
        "second backup stored {stored} bytes"
    );
    assert_eq!(second["parent"], first["snapshot"]);
}

#[test]
fn a_region_copied_to_another_offset_dedups() {
    let env = Env::new();
    let src = env.path("img");
    let mut data = random(48 << 20, 6);
    std::fs::write(&src, &data).unwrap();
    env.backup(&src, &[]);
    // Copy 10 MiB from 5 MiB to 25 MiB (not a multiple of any block size away).
    let region = data[5 << 20..15 << 20].to_vec();
    let at = (25 << 20) + 12_345;
    data[at..at + region.len()].copy_from_slice(&region);
    std::fs::write(&src, &data).unwrap();
    let second = env.backup(&src, &[]);
    let new = second["new_bytes"].as_u64().unwrap();
    assert!(
        new < 3 << 20,
        "the copied 10 MiB region should dedup, but {new} new bytes were stored"
    );
    let out = env.path("out");
    env.restore(second["snapshot"].as_str().unwrap(), &out, &[]);
    assert_same(&src, &out);
}

#[test]
fn several_sources_in_one_run() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    std::fs::write(&a, random(20 << 20, 1)).unwrap();
    std::fs::write(&b, random(20 << 20, 1)).unwrap(); // the same content: dedups across sources
    let r = env
        .run(&["backup", "--json", a.to_str().unwrap(), b.to_str().unwrap()])
        .json();
    let stored: u64 = r
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["new_bytes_stored"].as_u64().unwrap())
        .sum();
    assert!(stored < 22 << 20, "identical sources stored {stored} bytes");
    for (i, src) in [&a, &b].into_iter().enumerate() {
        let out = env.path(&format!("out{i}"));
        env.restore(r[i]["snapshot"].as_str().unwrap(), &out, &[]);
        assert_same(src, &out);
    }
}
