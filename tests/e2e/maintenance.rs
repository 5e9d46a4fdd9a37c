//! verify, repair index, locks and unlock.

use std::os::unix::fs::FileExt;

use serde_json::Value;

use crate::common::*;

/// Adds an index file that names the first indexed blob at `shift` bytes past where it is:
/// an index file that disagrees with its pack.
fn add_wrong_index_entry(env: &Env, shift: u64) {
    let repo = env.open();
    let mut first = None;
    repo.index().unwrap().for_each(|e| {
        first.get_or_insert(e);
    });
    let e = first.expect("something is indexed");
    let moved = sbk_store::PackEntry {
        offset: e.entry.offset + shift,
        ..e.entry
    };
    repo.write_index_file(vec![(e.pack, vec![moved])]).unwrap();
}

/// Two snapshots sharing some data; returns (env, ids).
fn two_snapshots() -> (Env, Vec<String>) {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    let shared = random(3 << 20, 1);
    std::fs::write(&a, [shared.clone(), random(2 << 20, 2)].concat()).unwrap();
    std::fs::write(&b, [shared, random(2 << 20, 3)].concat()).unwrap();
    let ids = [&a, &b]
        .iter()
        .map(|p| env.backup(p, &[])["snapshot"].as_str().unwrap().to_owned())
        .collect();
    (env, ids)
}

fn verify(env: &Env, extra: &[&str]) -> (i32, Value, String) {
    let r = env.run(&[&["verify", "--json"], extra].concat());
    let v = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
    (r.code, v, r.stderr)
}

/// The problems verify reported, and every snapshot they name.
fn problems(v: &Value) -> (Vec<String>, Vec<String>) {
    let list = v["problems"].as_array().cloned().unwrap_or_default();
    let what = list
        .iter()
        .map(|p| p["problem"].as_str().unwrap().to_owned())
        .collect();
    let snaps = list
        .iter()
        .flat_map(|p| p["snapshots"].as_array().cloned().unwrap_or_default())
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    (what, snaps)
}

#[test]
fn verify_passes_on_a_healthy_repository_and_reads_everything() {
    let (env, _) = two_snapshots();
    let (code, v, err) = verify(&env, &["--read-data"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["snapshots"], 2);
    assert!(v["blobs_read"].as_u64().unwrap() > 20);
    assert!(v["problems"].as_array().unwrap().is_empty());
    // Subsets: the parts together read every pack once.
    let packs = v["packs"].as_u64().unwrap();
    let parts: u64 = (1..=3)
        .map(|n| {
            verify(&env, &["--read-data-subset", &format!("{n}/3")]).1["packs_read"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(parts, packs);
    assert_eq!(
        verify(&env, &["--read-data-subset", "100%"]).1["packs_read"]
            .as_u64()
            .unwrap(),
        packs
    );
    let r = env.run(&["verify", "--read-data-subset", "0/3"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn verify_catches_each_injected_fault_and_names_the_snapshots() {
    let (env, ids) = two_snapshots();
    let pack = env.packs().into_iter().next().unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_owned();
    let original = std::fs::read(&pack).unwrap();
    let restore_pack = || std::fs::write(&pack, &original).unwrap();

    // A flipped byte inside a blob: found by --read-data, with the chunk, pack and snapshots.
    std::fs::File::options()
        .write(true)
        .open(&pack)
        .unwrap()
        .write_all_at(&[original[100_000] ^ 1], 100_000)
        .unwrap();
    let (code, v, _) = verify(&env, &["--read-data"]);
    let (what, snaps) = problems(&v);
    assert_eq!(code, 12);
    assert!(
        what.iter()
            .any(|w| w.contains("chunk") && w.contains(&pack_name) && w.contains("corrupt")),
        "{what:?}"
    );
    assert!(
        !snaps.is_empty() && snaps.iter().all(|s| ids.contains(s)),
        "{snaps:?}"
    );
    restore_pack();

    // A truncated pack.
    std::fs::write(&pack, &original[..original.len() - 100]).unwrap();
    let (code, v, _) = verify(&env, &[]);
    let (what, snaps) = problems(&v);
    assert_eq!(code, 12);
    assert!(what.iter().any(|w| w.contains(&pack_name)), "{what:?}");
    assert!(!snaps.is_empty());
    restore_pack();

    // A missing pack.
    std::fs::remove_file(&pack).unwrap();
    let (code, v, _) = verify(&env, &[]);
    let (what, snaps) = problems(&v);
    assert_eq!(code, 12);
    assert!(
        what.iter()
            .any(|w| w.contains(&pack_name) && w.contains("missing")),
        "{what:?}"
    );
    assert!(!snaps.is_empty());
    restore_pack();
    assert_eq!(verify(&env, &["--read-data"]).0, 0, "healthy again");

    // A corrupt manifest.
    let manifest = env.repo.join("snapshots").join(&ids[1]);
    let m = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &m[..m.len() - 1]).unwrap();
    let (code, v, _) = verify(&env, &[]);
    let (what, snaps) = problems(&v);
    assert_eq!(code, 12);
    assert!(what.iter().any(|w| w.contains(&ids[1])), "{what:?}");
    assert_eq!(snaps, vec![ids[1].clone()]);
    std::fs::write(&manifest, &m).unwrap();

    // An index entry that points at the wrong offset.
    add_wrong_index_entry(&env, 1);
    let (code, v, _) = verify(&env, &[]);
    let (what, snaps) = problems(&v);
    assert_eq!(code, 12);
    assert!(
        what.iter()
            .any(|w| w.contains("index entry") && w.contains("does not list")),
        "{what:?}"
    );
    assert!(!snaps.is_empty());
    // repair index puts it right.
    let r = env.run(&["repair", "index"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(verify(&env, &["--read-data"]).0, 0);

    // Deleted index files: every chunk is reported unindexed, and repair index rebuilds them.
    std::fs::remove_dir_all(env.repo.join("index")).unwrap();
    let (code, v, _) = verify(&env, &[]);
    assert_eq!(code, 12);
    assert!(problems(&v)
        .0
        .iter()
        .any(|w| w.contains("not in the index") && w.contains("repair index")));
    let r = env.run(&["repair", "index"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(verify(&env, &["--read-data"]).0, 0);
}

#[test]
fn repair_index_then_restore_and_verify() {
    let (env, ids) = two_snapshots();
    // An index file that disagrees with its pack: an entry moved to a wrong offset.
    add_wrong_index_entry(&env, 48);
    assert_eq!(verify(&env, &[]).0, 12);
    let r = env.run(&["repair", "index", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["blobs"].as_u64().unwrap() > 20);
    env.restore(&ids[0], &env.path("a.out"), &[]);
    assert_same(&env.path("a"), &env.path("a.out"));
    assert_eq!(verify(&env, &["--read-data"]).0, 0);
    // Emptied index files: restore names the missing chunk and the remedy; after repair index
    // (which needs only the packs) it works again.
    for f in std::fs::read_dir(env.repo.join("index")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let r = env.run(&["restore", &ids[1], env.path("b.out").to_str().unwrap()]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("repair index"), "{}", r.stderr);
    assert_eq!(env.run(&["repair", "index"]).code, 0);
    env.restore(&ids[1], &env.path("b.out"), &[]);
    assert_same(&env.path("b"), &env.path("b.out"));
}

#[test]
fn locks_exclude_and_stale_locks_are_removed() {
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, random(100_000, 1)).unwrap();
    let locks = env.repo.join("locks");
    // A live exclusive lock (held, as far as anyone can tell, by this test process).
    let live = live_lock(sbk_store::LockKind::Exclusive, "prune");
    std::fs::write(locks.join("live"), live.encode()).unwrap();
    let r = env.run(&["backup", src.to_str().unwrap()]);
    assert_eq!(r.code, 15, "{}", r.stderr);
    assert!(
        r.stderr.contains("locked") && r.stderr.contains("prune"),
        "{}",
        r.stderr
    );
    assert_eq!(env.run(&["unlock"]).code, 0);
    assert!(locks.join("live").exists(), "a live lock is kept");
    // The same lock of a process that is gone is stale: it does not block, and unlock removes it.
    let dead = sbk_store::LockInfo {
        pid: u32::MAX - 7,
        ..live
    };
    std::fs::write(locks.join("live"), dead.encode()).unwrap();
    assert_eq!(
        env.run(&["backup", src.to_str().unwrap()]).code,
        0,
        "a stale lock does not block"
    );
    // An unreadable lock file might be anything: it blocks until unlock removes it.
    std::fs::write(locks.join("junk"), b"not a lock").unwrap();
    let r = env.run(&["backup", src.to_str().unwrap()]);
    assert_eq!(r.code, 15, "{}", r.stderr);
    assert!(r.stderr.contains("unreadable lock"), "{}", r.stderr);
    let r = env.run(&["unlock", "--json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["removed"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(env.run(&["backup", src.to_str().unwrap()]).code, 0);
    assert_eq!(
        std::fs::read_dir(&locks).unwrap().count(),
        0,
        "the backup released its own lock"
    );
}

#[test]
fn concurrent_backups_from_two_processes_with_one_cache_and_prune_during_a_backup() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    std::fs::write(&a, random(300 << 20, 21)).unwrap();
    std::fs::write(&b, random(300 << 20, 22)).unwrap();
    // Both processes share one cache directory on this host.
    let spawn = |src: &std::path::Path| {
        env.cmd()
            .args(["backup", "--json", src.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (spawn(&a), spawn(&b));
    // While both run, prune is refused: they hold shared locks.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let held = || {
        std::fs::read_dir(env.repo.join("locks"))
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
    };
    while held() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backups never took their locks"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let r = env.run(&["prune", "--exclusive"]);
    assert_eq!(r.code, 15, "prune --exclusive during backups: {}", r.stderr);
    assert!(r.stderr.contains("backup"), "{}", r.stderr);
    // Prune beside them goes on, and deletes nothing they may need.
    let r = env.run(&["prune", "--grace=0s"]);
    assert_eq!(r.code, 0, "prune during backups: {}", r.stderr);
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    assert!(
        oa.status.success() && ob.status.success(),
        "{} {}",
        String::from_utf8_lossy(&oa.stderr),
        String::from_utf8_lossy(&ob.stderr)
    );
    for (src, out) in [(&a, oa), (&b, ob)] {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let restored = env.path("restored");
        let _ = std::fs::remove_file(&restored);
        env.restore(v[0]["snapshot"].as_str().unwrap(), &restored, &[]);
        assert_same(src, &restored);
    }
    assert_eq!(verify(&env, &["--read-data"]).0, 0);
    assert!(
        std::fs::read_dir(env.repo.join("index")).unwrap().count() >= 2,
        "each backup process wrote its own index file"
    );
}
