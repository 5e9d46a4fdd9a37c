//! Repository v2: many packs under a low open-file limit, a cache that never blocks (garbage,
//! deleted, stale after a prune elsewhere or a restore of an older copy), a lock whose refresh
//! fails, and a crash or an I/O error at every single repository operation of backup and prune.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::*;

/// Runs `sbk --repo REPO ARGS…` with its cache, under `ulimit -n LIMIT`.
fn run_limited(env: &Env, limit: u32, args: &[&str]) -> Run {
    let cmd = env.cmd();
    let prog = cmd.get_program().to_owned();
    let all: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    let quoted: Vec<String> = std::iter::once(prog.to_string_lossy().into_owned())
        .chain(all)
        .map(|a| format!("'{a}'"))
        .collect();
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg(format!("ulimit -n {limit} && exec {}", quoted.join(" ")));
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    Run::from_output(sh.output().unwrap())
}

#[test]
fn many_packs_under_a_low_open_file_limit() {
    let env = Env::with_init(&["--chunk-size", "64K", "--pack-size", "1M"]);
    let src = env.path("img");
    // Incompressible: 110 MiB make more than 100 packs of 1 MiB.
    std::fs::write(&src, random(110 << 20, 40)).unwrap();
    env.backup(&src, &[]);
    let packs = env.packs().len();
    assert!(packs > 100, "only {packs} packs");
    let r = run_limited(&env, 40, &["verify", "--read-data"]);
    assert_eq!(r.code, 0, "verify under ulimit -n 40: {}", r.stderr);
    let out = env.path("out");
    let r = run_limited(&env, 40, &["restore", "latest", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "restore under ulimit -n 40: {}", r.stderr);
    assert_same(&src, &out);
}

/// A table built by an older sbk is replaced with a notice that says so; one of a newer sbk
/// sharing the cache is left alone (and not used).
#[test]
fn cache_tables_of_other_versions() {
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, random(3 << 20, 44)).unwrap();
    env.backup(&src, &[]);
    env.backup(&src, &[]);
    let tables = || -> Vec<PathBuf> {
        files_below(&env.cache())
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "tbl"))
            .collect()
    };
    let table = tables().pop().expect("the cache holds a table");
    let with_version = |v: u32, to: &Path| {
        let mut bytes = std::fs::read(&table).unwrap();
        bytes[8..12].copy_from_slice(&v.to_le_bytes());
        std::fs::write(to, bytes).unwrap();
    };
    let version =
        |t: &Path| u32::from_le_bytes(std::fs::read(t).unwrap()[8..12].try_into().unwrap());
    with_version(3, &table);
    let r = env.run(&["backup", src.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("built by an older sbk (table version 3)"),
        "{}",
        r.stderr
    );
    assert_eq!(tables(), vec![table.clone()]);
    assert_eq!(version(&table), 4, "rebuilt in the current version");
    // A newer sbk names its tables by its own version: beside this one's.
    let newer = table.with_file_name("0123456789abcdef0123456789abcdef.tbl");
    with_version(1000, &newer);
    let r = env.run(&["backup", src.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("index cache"), "{}", r.stderr);
    assert_eq!(version(&newer), 1000, "a newer sbk's table is kept");
    assert_eq!(version(&table), 4);
}

#[test]
fn a_cache_of_garbage_never_blocks_any_command() {
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, random(6 << 20, 41)).unwrap();
    let first = env.backup(&src, &[]);
    // A second backup builds a table from the index files (the first had none to build from).
    env.backup(&src, &[]);
    let cached = files_below(&env.cache());
    assert!(!cached.is_empty(), "the cache holds a table");
    for f in &cached {
        let len = std::fs::metadata(f).unwrap().len() as usize;
        std::fs::write(f, random(len.max(1), 42)).unwrap();
    }
    let out = env.path("out");
    let r = env.run(&[
        "restore",
        first["snapshot"].as_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("index cache") && r.stderr.contains("damaged"),
        "one notice: {}",
        r.stderr
    );
    assert_same(&src, &out);
    for f in files_below(&env.cache()) {
        let len = std::fs::metadata(&f).unwrap().len() as usize;
        std::fs::write(&f, random(len.max(1), 43)).unwrap();
    }
    for args in [
        &["snapshots"][..],
        &["verify", "--read-data"],
        &["repair", "index"],
        &["unlock"],
        &["stats"],
        &["backup", src.to_str().unwrap()],
    ] {
        let r = env.run(args);
        assert_eq!(
            r.code, 0,
            "sbk {args:?} with a cache of garbage: {}",
            r.stderr
        );
    }
    // A cache directory that is a file is bypassed with a notice, never an error.
    std::fs::remove_dir_all(env.cache()).unwrap();
    std::fs::write(env.cache(), b"not a directory").unwrap();
    let r = env.run(&["backup", "--json", src.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("temporary cache"), "{}", r.stderr);
    assert_eq!(
        r.json()[0]["new_bytes"],
        0,
        "dedups through the temporary cache"
    );
}

#[test]
fn a_deleted_cache_still_dedups() {
    let env = Env::new();
    let src = env.path("img");
    let data = random(20 << 20, 44);
    std::fs::write(&src, &data).unwrap();
    env.backup(&src, &[]);
    std::fs::remove_dir_all(env.cache()).unwrap();
    let second = env.backup(&src, &[]);
    let new = second["new_bytes"].as_u64().unwrap();
    assert!(
        new * 100 < data.len() as u64,
        "{new} new bytes of {}",
        data.len()
    );
    // And with --no-cache: nothing is kept, and it still dedups.
    std::fs::remove_dir_all(env.cache()).unwrap();
    let third = env.backup(&src, &["--no-cache"]);
    assert_eq!(third["new_bytes"], 0);
    assert!(!env.cache().exists(), "--no-cache leaves no cache behind");
    // The cache folder is private.
    env.backup(&src, &[]);
    use std::os::unix::fs::PermissionsExt;
    for d in std::fs::read_dir(env.cache()).unwrap() {
        let mode = d.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}

/// `sbk` with the cache directory `cache` instead of the environment's own (another host).
fn run_with_cache(env: &Env, cache: &Path, args: &[&str]) -> Run {
    Run::from_output(
        env.cmd()
            .env("SBK_CACHE_DIR", cache)
            .args(args)
            .output()
            .unwrap(),
    )
}

#[test]
fn a_stale_cache_never_lets_a_backup_dedup_against_a_pack_that_is_gone() {
    let env = Env::new();
    let src = env.path("img");
    let data = random(8 << 20, 45);
    std::fs::write(&src, &data).unwrap();
    // This host backs up twice (its cache now holds a table naming the packs)…
    env.backup(&src, &[]);
    env.backup(&src, &[]);
    // …then another host forgets everything and prunes: every pack goes.
    let other = env.path("other-cache");
    let ids: Vec<String> = env
        .run(&["snapshots", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let mut forget = vec!["forget"];
    forget.extend(ids.iter().map(String::as_str));
    assert_eq!(run_with_cache(&env, &other, &forget).code, 0);
    let r = run_with_cache(&env, &other, &["prune", "--exclusive"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.packs().is_empty(), "prune removed every pack");
    // This host's next backup must store everything again.
    let r = env.run(&["backup", "--json", src.to_str().unwrap()]);
    assert!(r.stderr.contains("stale"), "{}", r.stderr);
    let v = r.json();
    assert_eq!(v[0]["new_bytes"].as_u64().unwrap(), data.len() as u64);
    let out = env.path("out");
    env.restore("latest", &out, &[]);
    assert_same(&src, &out);
    assert_eq!(env.run(&["verify", "--read-data"]).code, 0);

    // The repository restored from an older copy: the cache knows index files the copy lacks.
    let copy = env.path("repo-copy");
    sh(&format!("cp -a {} {}", env.repo.display(), copy.display()));
    let src2 = env.path("img2");
    std::fs::write(&src2, random(4 << 20, 46)).unwrap();
    env.backup(&src2, &[]);
    std::fs::remove_dir_all(&env.repo).unwrap();
    std::fs::rename(&copy, &env.repo).unwrap();
    let again = env.backup(&src2, &[]);
    assert_eq!(
        again["new_bytes"].as_u64().unwrap(),
        4 << 20,
        "src2's packs are not in the copy"
    );
    env.restore(again["snapshot"].as_str().unwrap(), &env.path("out2"), &[]);
    assert_same(&src2, &env.path("out2"));
}

#[test]
fn a_lock_whose_refresh_fails_stops_its_command() {
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, repetitive(200 << 20)).unwrap();
    env.backup(&src, &[]);
    // A restore to a pipe nobody reads yet: it blocks, holding its lock, refreshed every 50 ms.
    let mut child = env
        .cmd()
        .env("SBK_TEST_LOCK_REFRESH_MS", "50")
        .env("SBK_TEST_LOCK_LEASE_SECS", "4")
        .args(["restore", "latest", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first byte says it holds its lock and is restoring.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    // (A refresh writes its new lock beside the old one first, under a temporary dot-name.)
    let locks: Vec<_> = std::fs::read_dir(env.repo.join("locks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(locks.len(), 1, "{locks:?}");
    let lock = &locks[0];
    // Someone removes it (sbk unlock on another host that thought it stale): the next refresh
    // fails, and the restore stops at its next read instead of going on without a lock.
    std::fs::remove_file(lock).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).unwrap();
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(15), "{stderr}");
    assert!(
        stderr.contains("lock was lost") && stderr.contains("removed"),
        "{stderr}"
    );
    assert!(out.len() < 200 << 20, "the restore stopped early");
}

/// Snapshot ids, oldest first.
fn snapshot_ids(env: &Env) -> Vec<String> {
    env.run(&["snapshots", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// After an interrupted command: the repository verifies with every byte read, and every
/// snapshot restores to the bytes of its source.
fn check_consistent(env: &Env, sources: &[(&str, &Path)], what: &str) {
    let v = env.run(&["verify", "--read-data"]);
    assert_eq!(v.code, 0, "{what}: verify: {}{}", v.stdout, v.stderr);
    for (id, src) in sources {
        let out = env.path("check.out");
        let _ = std::fs::remove_file(&out);
        let r = env.run(&["restore", id, out.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{what}: restore {id}: {}", r.stderr);
        assert_same(src, &out);
    }
}

/// Runs `ARGS` with a fault at each repository operation in turn (1, 2, …) until one run
/// finishes with the fault never reached; checks the repository after each. Returns how many
/// operations the command made.
fn fault_every_operation(
    env: &Env,
    mode: &str,
    args: &[&str],
    sources: &[(&str, &Path)],
    reset: &dyn Fn(),
) -> u64 {
    for n in 1..200u64 {
        let before = snapshot_ids(env);
        let o = env
            .cmd()
            .env("SBK_TEST_FAULT", format!("{mode}:{n}"))
            .args(args)
            .output()
            .unwrap();
        let r = Run::from_output(o);
        if r.code == 0 {
            return n - 1;
        }
        let what = format!("{args:?} with {mode} at operation {n}");
        match mode {
            // abort(): no exit code, the process was killed by SIGABRT.
            "crash" => assert_eq!(r.code, -1, "{what}: {}", r.stderr),
            _ => {
                assert!(
                    [1, 12, 14, 15].contains(&r.code),
                    "{what}: exit {}: {}",
                    r.code,
                    r.stderr
                );
                assert!(r.stderr.contains("injected fault"), "{what}: {}", r.stderr);
            }
        }
        let after = snapshot_ids(env);
        assert!(after.len() <= before.len() + 1, "{what}");
        check_consistent(env, sources, &what);
        reset();
    }
    panic!("{args:?} never finished");
}

#[test]
fn a_crash_or_an_error_at_any_operation_of_backup_or_prune_loses_nothing() {
    let env = Env::with_init(&["--chunk-size", "64K", "--pack-size", "1M"]);
    let (a, b) = (env.path("a"), env.path("b"));
    let data = random(3 << 20, 47);
    std::fs::write(&a, &data).unwrap();
    let keep = env.backup(&a, &[])["snapshot"].as_str().unwrap().to_owned();
    let mut changed = data.clone();
    changed[1 << 20..2 << 20].copy_from_slice(&random(1 << 20, 48));
    std::fs::write(&b, &changed).unwrap();
    let sources = [(keep.as_str(), a.as_path())];
    // Each faulted backup of b may or may not have written its snapshot (a crash right after
    // the manifest): either way, what is there is whole.
    let forget_b = || {
        for id in snapshot_ids(&env).into_iter().filter(|id| *id != keep) {
            assert_eq!(env.run(&["forget", &id]).code, 0);
        }
    };
    let ops = fault_every_operation(
        &env,
        "crash",
        &["backup", b.to_str().unwrap()],
        &sources,
        &forget_b,
    );
    assert!(
        ops >= 4,
        "a backup makes at least lock, pack, index, manifest: {ops}"
    );
    fault_every_operation(
        &env,
        "fail",
        &["backup", b.to_str().unwrap()],
        &sources,
        &forget_b,
    );
    // Now prune, with leftovers of all those runs to sweep, faulted at every operation.
    forget_b();
    let b_id = env.backup(&b, &[])["snapshot"].as_str().unwrap().to_owned();
    assert_eq!(env.run(&["forget", &keep]).code, 0);
    let sources = [(b_id.as_str(), b.as_path())];
    let packs_before = env.packs().len();
    // Beside backups: each run acts on the marks of the runs before it, and marks again.
    let ops = fault_every_operation(
        &env,
        "crash",
        &["prune", "--max-unused", "0", "--grace=0s"],
        &sources,
        &|| {},
    );
    assert!(ops >= 3, "{ops}");
    let r = env.run(&["prune", "--max-unused", "0", "--grace=0s"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.packs().len() < packs_before, "prune finished its work");
    check_consistent(&env, &sources, "after the last prune beside backups");
    // At once, under an exclusive lock, with what a new forgotten backup left.
    let c = env.path("c");
    std::fs::write(&c, random(2 << 20, 49)).unwrap();
    let c_id = env.backup(&c, &[])["snapshot"].as_str().unwrap().to_owned();
    assert_eq!(env.run(&["forget", &c_id]).code, 0);
    let packs_before = env.packs().len();
    let ops = fault_every_operation(
        &env,
        "crash",
        &["prune", "--max-unused", "0", "--exclusive"],
        &sources,
        &|| {},
    );
    assert!(ops >= 3, "{ops}");
    assert!(env.packs().len() < packs_before, "prune finished its work");
    check_consistent(&env, &sources, "after the last prune");
}

/// More sources than workers and buffers: every source's segments go to the shared workers, so
/// none can starve the others of the shared buffers (a deadlock, were each source to have its
/// own workers). Each restores byte for byte.
#[test]
fn more_sources_than_threads_share_workers_and_buffers() {
    let env = Env::new();
    let srcs: Vec<_> = (0..5u64)
        .map(|i| {
            let p = env.path(&format!("src{i}"));
            std::fs::write(&p, random((40 << 20) + i as usize * 4097, 60 + i)).unwrap();
            p
        })
        .collect();
    let mut cmd = env.cmd();
    cmd.args(["backup", "--json", "--threads", "1"]).args(&srcs);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("a backup of 5 sources with 1 thread did not finish: deadlock");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
    for (i, src) in srcs.iter().enumerate() {
        let out = env.path("out");
        let _ = std::fs::remove_file(&out);
        env.restore(v[i]["snapshot"].as_str().unwrap(), &out, &[]);
        assert_same(src, &out);
    }
}
