//! `sbk copy`: snapshots replicated between two repositories with different keys and back, only
//! the chunks the destination lacks stored, idempotent.

use std::path::PathBuf;

use crate::common::*;

/// A second repository with its own password.
fn other_repo() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo-b");
    Env::init_at(
        dir,
        repo,
        vec![("SBK_PASSWORD".into(), "another password".into())],
        &["--chunk-size", "64K"],
    )
}

fn copy(to: &Env, from: &Env, from_password: &str, args: &[&str]) -> serde_json::Value {
    let r = Run::from_output(
        to.cmd()
            .args(["copy", "--json", "--from-repo", from.repo.to_str().unwrap()])
            .args(args)
            .env("SBK_FROM_PASSWORD", from_password)
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json()
}

fn written(out: &serde_json::Value) -> u64 {
    out.as_array()
        .unwrap()
        .iter()
        .map(|o| o["chunks_written"].as_u64().unwrap())
        .sum()
}

#[test]
fn copy_there_and_back_stores_only_missing_chunks() {
    let a = Env::new();
    let b = other_repo();
    let img: PathBuf = a.path("img");
    let mut data = random(12 << 20, 7);
    data[4 << 20..6 << 20].fill(0);
    std::fs::write(&img, &data).unwrap();
    let s1 = a.backup(&img, &["--tag", "nightly", "--cbt-token", "snap-1"]);

    let first = copy(&b, &a, PASSWORD, &[]);
    let copied = first[0]["copy"].as_str().unwrap().to_owned();
    // B cuts chunks its own way: a changed-block chain may not continue from the copy.
    let listed = b.run(&["snapshots", "--json"]).json();
    assert_eq!(
        listed[0]["changed_blocks"]["token"],
        serde_json::Value::Null,
        "{listed}"
    );
    assert!(written(&first) > 100, "{first}");
    let restored = b.path("restored");
    b.restore(&copied, &restored, &[]);
    assert_same(&img, &restored);

    // Again: nothing to do.
    let again = copy(&b, &a, PASSWORD, &[]);
    assert_eq!(again[0]["copy"], serde_json::Value::Null);
    assert_eq!(again[0]["existing"].as_str().unwrap(), copied);

    // A new version: only its new chunks go over.
    data[100_000..100_000 + (1 << 20)].copy_from_slice(&random(1 << 20, 8));
    std::fs::write(&img, &data).unwrap();
    a.backup(&img, &[]);
    let second = copy(&b, &a, PASSWORD, &["latest"]);
    let n = written(&second);
    assert!(
        n > 0 && n * 4 < written(&first),
        "{n} of {}",
        written(&first)
    );
    let r = b.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // And back. B's copy of A's snapshot does not go back (A has it); a backup made in B does
    // (B cuts chunks its own way, with its own seed: they are new to A).
    let back = copy(&a, &b, "another password", &[&copied]);
    assert_eq!(back[0]["copy"], serde_json::Value::Null, "{back}");
    assert_eq!(back[0]["existing"], s1["snapshot"]);
    let native = b.backup(&img, &[]);
    let back = copy(
        &a,
        &b,
        "another password",
        &[native["snapshot"].as_str().unwrap()],
    );
    let home = a.path("home");
    a.restore(back[0]["copy"].as_str().unwrap(), &home, &[]);
    assert_same(&img, &home);
    // Filters: --tag picks the tagged snapshot only (copied before: skipped).
    let tagged = copy(&b, &a, PASSWORD, &["--tag", "nightly"]);
    let tagged = tagged.as_array().unwrap();
    assert_eq!(tagged.len(), 1, "{tagged:?}");
    assert_eq!(tagged[0]["source"], s1["snapshot"]);
    assert!(tagged[0]["copy"].is_null());
    // A wrong source password: exit 19, nothing copied.
    let r = Run::from_output(
        b.cmd()
            .args(["copy", "--from-repo", a.repo.to_str().unwrap()])
            .env("SBK_FROM_PASSWORD", "wrong")
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, if encrypted() { 19 } else { 0 }, "{}", r.stderr);
}

#[test]
fn a_repository_with_copied_chunker_params_dedups_with_its_source() {
    let a = Env::new();
    let img = a.path("img");
    let mut data = random(10 << 20, 9);
    std::fs::write(&img, &data).unwrap();
    a.backup(&img, &["--cbt-token", "snap-1"]);
    // B cuts and names chunks as A does.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo-b");
    let b = Env {
        dir,
        repo,
        vars: vec![("SBK_PASSWORD".into(), "another password".into())],
    };
    let r = Run::from_output(
        b.cmd()
            .args([
                "init",
                "--copy-chunker-params-from",
                a.repo.to_str().unwrap(),
            ])
            .args(if encrypted() {
                &[][..]
            } else {
                &["--encryption", "none"][..]
            })
            .env("SBK_FROM_PASSWORD", PASSWORD)
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = copy(&b, &a, PASSWORD, &[]);
    let n = first[0]["chunks_written"].as_u64().unwrap();
    assert!(n > 0);
    // The same cuts: the copy keeps its token, a chain may go on from it in B.
    let listed = b.run(&["snapshots", "--json"]).json();
    assert_eq!(listed[0]["changed_blocks"]["token"], "snap-1", "{listed}");
    // A new version: only the new chunks are even read from A.
    data[3 << 20..(3 << 20) + 500_000].copy_from_slice(&random(500_000, 10));
    std::fs::write(&img, &data).unwrap();
    a.backup(&img, &[]);
    let second = copy(&b, &a, PASSWORD, &["latest"]);
    let read = second[0]["chunks_read"].as_u64().unwrap();
    assert!(read > 0 && read * 5 < n, "{read} read of {n}");
    assert_eq!(second[0]["chunks_written"].as_u64().unwrap(), read);
    // A backup of the same image in B stores nothing new: the two repositories dedup.
    let native = b.backup(&img, &[]);
    assert_eq!(native["new_bytes"], 0, "{native}");
    // And it goes back to A without reading or writing a chunk.
    let back = copy(
        &a,
        &b,
        "another password",
        &[native["snapshot"].as_str().unwrap()],
    );
    assert_eq!(back[0]["chunks_read"], 0, "{back}");
    assert_eq!(back[0]["chunks_written"], 0, "{back}");
    let home = a.path("home");
    a.restore(back[0]["copy"].as_str().unwrap(), &home, &[]);
    assert_same(&img, &home);
}
