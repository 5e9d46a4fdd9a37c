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

/// The image of the compatibility fixture: random, zero, text-like and repetitive stretches.
fn compat_image() -> Vec<u8> {
    let mut b = random(256 << 10, 23);
    b.resize(b.len() + (1 << 20), 0);
    b.extend(sbk_benches::text_like(1 << 20, 24));
    b.extend(repetitive(256 << 10));
    b
}

/// Chunk boundaries and ids never change under existing repositories: the same image backed
/// up by this sbk into a repository that sbk 7932964 (the build before issue 23's hot-path work)
/// filled with it stores nothing new, and its snapshot restores. The fixture is a copy of that
/// repository (unencrypted, 64 KiB chunks), made by running this test with
/// `SBK_WRITE_COMPAT_FIXTURE=/path/to/sbk-7932964`.
#[test]
fn a_repository_an_older_sbk_filled_dedups_the_same_image_completely() {
    let fixture = fixture("repo-7932964");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("compat.img");
    std::fs::write(&img, compat_image()).unwrap();
    if let Some(old) = std::env::var_os("SBK_WRITE_COMPAT_FIXTURE") {
        let _ = std::fs::remove_dir_all(&fixture);
        let run = |args: &[&str]| {
            let ok = std::process::Command::new(&old)
                .arg("--repo")
                .arg(&fixture)
                .arg("--no-cache")
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{args:?}");
        };
        run(&["init", "--encryption", "none", "--chunk-size", "64K"]);
        run(&[
            "backup",
            "--host",
            "compat",
            "--source-name",
            "compat",
            img.to_str().unwrap(),
        ]);
    }
    let env = Env::from_fixture("repo-7932964");
    let again = env.backup(&img, &["--host", "compat", "--source-name", "compat"]);
    assert_eq!(again["new_bytes"], 0, "{again}");
    assert_eq!(again["new_bytes_stored"], 0, "{again}");
    assert!(
        again["parent"].is_string(),
        "the older snapshot is its parent: {again}"
    );
    let out = env.path("out");
    env.restore("latest", &out, &[]);
    assert_same(&img, &out);
    let old = env.path("old");
    env.restore(again["parent"].as_str().unwrap(), &old, &[]);
    assert_same(&img, &old);
}
