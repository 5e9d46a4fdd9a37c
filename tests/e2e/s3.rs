//! Repositories on S3-compatible object storage, against a real SeaweedFS server started by each
//! test on loopback (weed.rs).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sbk_store::backend::Written;
use sbk_store::{Backend, Kind};

use crate::common::*;
use crate::weed::{Weed, BUCKET, KEY, SECRET};

#[test]
fn every_command_works_on_s3_as_on_a_local_repository() {
    let Some(weed) = Weed::start() else { return };
    let env = weed.env("every");
    // Several sizes, sparse images, a chunk-size-odd tail.
    let mut sources = Vec::new();
    for (i, len) in [1usize, 4096, 3 << 20, (40 << 20) + 12345]
        .into_iter()
        .enumerate()
    {
        let p = env.path(&format!("img{i}"));
        let mut d = random(len, i as u64);
        if len > 1 << 20 {
            d[len / 4..len / 2].fill(0);
        }
        std::fs::write(&p, &d).unwrap();
        sources.push(p);
    }
    let args: Vec<&str> = sources.iter().map(|p| p.to_str().unwrap()).collect();
    let r = env.run(&[&["backup", "--json"], &args[..]].concat());
    let out = r.json();
    for (i, p) in sources.iter().enumerate() {
        let id = out[i]["snapshot"].as_str().unwrap();
        let restored = env.path(&format!("restored{i}"));
        env.restore(id, &restored, &[]);
        assert_same(p, &restored);
    }
    // Restore to stdout.
    let o = env
        .cmd()
        .args(["restore", out[3]["snapshot"].as_str().unwrap(), "-"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stdout == std::fs::read(&sources[3]).unwrap());
    // The structural verify reads each pack's trailer and each tree, not each blob's header:
    // its range reads grow with the packs, not with the chunks.
    let o = env
        .cmd()
        .env("SBK_S3_STATS", "1")
        .arg("verify")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let ranges: u64 = stderr
        .split("get_range=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request counts in {stderr}"));
    let chunks: u64 = (0..sources.len())
        .map(|i| out[i]["chunks"].as_u64().unwrap())
        .sum();
    assert!(
        ranges * 4 < chunks,
        "{ranges} range reads for {chunks} chunks: {stderr}"
    );
    // A second backup dedups against the first.
    let again = env.backup(&sources[3], &[]);
    assert_eq!(again["new_bytes"], 0);
    for cmd in [
        &["snapshots"][..],
        &["stats"],
        &["verify", "--read-data"],
        &["forget", "--keep-within", "1h", "--dry-run"],
        &["forget", out[0]["snapshot"].as_str().unwrap()],
        &["prune", "--max-unused", "0"],
        &["repair", "index"],
        &["verify", "--read-data"],
        &["unlock"],
    ] {
        let r = env.run(cmd);
        assert_eq!(r.code, 0, "{cmd:?}: {}", r.stderr);
    }
    // Everything still restores after prune and repair.
    let restored = env.path("after");
    env.restore(out[2]["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same(&sources[2], &restored);
    // init on a prefix that holds a repository is refused.
    let r = env.run(&["init"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
}

#[test]
fn bad_credentials_a_missing_bucket_and_a_closed_port() {
    let Some(weed) = Weed::start() else { return };
    let env = weed.env("errors");
    let img = env.path("img");
    std::fs::write(&img, random(1 << 20, 1)).unwrap();
    env.backup(&img, &[]);
    let with = |vars: &[(&str, &str)], repo: &str, args: &[&str]| {
        let mut c = sbk();
        c.arg("--repo")
            .arg(repo)
            .env("SBK_CACHE_DIR", env.cache())
            .envs(env.vars.iter().map(|(k, v)| (k, v)));
        for (k, v) in vars {
            c.env(k, v);
        }
        Run::from_output(c.args(args).output().unwrap())
    };
    let repo = env.repo.to_str().unwrap().to_owned();
    let r = with(
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
        &repo,
        &["backup", img.to_str().unwrap()],
    );
    assert_eq!(r.code, 17, "{}", r.stderr);
    assert!(r.stderr.contains("refused access"), "{}", r.stderr);
    // A missing bucket is no repository (exit 10), said in words, for init and the rest.
    let missing = format!("no-such-bucket-{}", std::process::id());
    for args in [&["snapshots"][..], &["init", "--encryption", "none"][..]] {
        let r = with(&[], &format!("s3://{missing}/x"), args);
        assert_eq!(r.code, 10, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("bucket {missing} does not exist"))
                && !r.stderr.contains("<?xml"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = with(&[], &format!("s3://{BUCKET}/nothing-here"), &["snapshots"]);
    assert_eq!(r.code, 10, "{}", r.stderr);
    let started = Instant::now();
    let r = with(
        &[("AWS_ENDPOINT_URL", "http://127.0.0.1:1")],
        &repo,
        &["backup", img.to_str().unwrap()],
    );
    assert_eq!(r.code, 18, "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
    // Nothing was written by the failed commands: one snapshot, no lock.
    let list = env.run(&["snapshots", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let b = weed.backend("errors");
    assert!(b.list(Kind::Lock).unwrap().is_empty());
}

#[test]
fn a_killed_backup_loses_nothing_and_the_next_one_works() {
    let Some(weed) = Weed::start() else { return };
    let env = weed.env("kill");
    let img = env.path("img");
    std::fs::write(&img, random(96 << 20, 9)).unwrap();
    let first = env.path("first");
    std::fs::write(&first, random(8 << 20, 10)).unwrap();
    env.backup(&first, &[]);
    for delay_ms in [200u64, 600, 1200] {
        let mut c = env
            .cmd()
            .args(["backup", img.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }
    // The killed backups' locks are stale by their process; the next backup goes on.
    let r = env.run(&["unlock"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let done = env.backup(&img, &[]);
    let restored = env.path("restored");
    env.restore(done["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same(&img, &restored);
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Multipart uploads the kills cut short are aborted by prune (no live lock is older).
    let b = weed.backend("kill");
    eprintln!(
        "unfinished uploads after the kills: {}",
        b.unfinished_uploads().unwrap().len()
    );
    let r = env.run(&["prune", "--grace=0s"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(b.unfinished_uploads().unwrap().is_empty());
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A repository under `prefix`, and a backup of a 160 MiB image into it that has stored its
/// first pack (stderr piped, for the message of a failure).
fn backup_under_way(
    weed: &Weed,
    prefix: &str,
    seed: u64,
) -> (Env, PathBuf, sbk_s3::S3Backend, Child) {
    let env = weed.env(prefix);
    let img = env.path("img");
    std::fs::write(&img, random(160 << 20, seed)).unwrap();
    let b = weed.backend(prefix);
    let mut child = env
        .cmd()
        .args(["backup", img.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while b.list(Kind::Pack).unwrap().is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "finished too soon");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no pack appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (env, img, b, child)
}

#[test]
fn sigint_during_a_backup_to_s3_leaves_no_lock_and_no_snapshot() {
    let Some(weed) = Weed::start() else { return };
    let (env, _img, b, child) = backup_under_way(&weed, "sigint", 11);
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut child = child;
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(b.list(Kind::Lock).unwrap().is_empty(), "a lock remains");
    assert!(
        b.unfinished_uploads().unwrap().is_empty(),
        "an upload in flight was left unfinished"
    );
    assert!(
        b.list(Kind::Snapshot).unwrap().is_empty(),
        "a snapshot was written"
    );
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn the_server_gone_mid_backup_then_back_loses_nothing() {
    let Some(mut weed) = Weed::start() else {
        return;
    };
    let (env, img, _, child) = backup_under_way(&weed, "restart", 12);
    weed.kill();
    std::thread::sleep(Duration::from_millis(1500));
    weed.restart();
    // The backup either rode out the outage on its retries or failed cleanly (exit 18).
    let out = child.wait_with_output().unwrap();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(18)),
        "{code:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshots = env.run(&["snapshots", "--json"]).json();
    assert_eq!(
        snapshots.as_array().unwrap().len(),
        usize::from(code == Some(0)),
        "a snapshot only when the backup succeeded"
    );
    // Its lock may be left by a failed run (its process is gone): unlock, back up, verify.
    assert_eq!(env.run(&["unlock"]).code, 0);
    let done = env.backup(&img, &[]);
    let restored = env.path("restored");
    env.restore(done["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same(&img, &restored);
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A repository under `prefix` with `n` snapshots of 24 MiB images (seeds from `seed`), the
/// first of them forgotten: work for prune. Returns the images and snapshots.
fn forgotten_one(
    weed: &Weed,
    prefix: &str,
    n: u64,
    seed: u64,
) -> (Env, Vec<(PathBuf, serde_json::Value)>) {
    let env = weed.env(prefix);
    let mut kept = Vec::new();
    for i in 0..n {
        let img = env.path(&format!("img{i}"));
        std::fs::write(&img, random(24 << 20, seed + i)).unwrap();
        kept.push((img.clone(), env.backup(&img, &[])));
    }
    let r = env.run(&["forget", kept[0].1["snapshot"].as_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    (env, kept)
}

/// `sbk prune --max-unused 0 MODE`, started, its output discarded.
fn spawn_prune(env: &Env, mode: &str) -> Child {
    env.cmd()
        .args(["prune", "--max-unused", "0", mode])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_prune_on_s3_loses_nothing() {
    let Some(weed) = Weed::start() else { return };
    let (env, kept) = forgotten_one(&weed, "prune-kill", 4, 20);
    // Beside backups (each run acts on the marks of the killed runs before it), then at once.
    for mode in ["--grace=0s", "--exclusive"] {
        for delay_ms in [50u64, 150, 400] {
            let mut c = spawn_prune(&env, mode);
            std::thread::sleep(Duration::from_millis(delay_ms));
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
            assert_eq!(env.run(&["unlock"]).code, 0);
            let r = env.run(&["verify", "--read-data"]);
            assert_eq!(
                r.code, 0,
                "after a kill at {delay_ms} ms ({mode}): {}",
                r.stderr
            );
        }
    }
    let r = env.run(&["prune", "--max-unused", "0", "--exclusive"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for (img, snap) in &kept[1..] {
        let restored = env.path("restored");
        let _ = std::fs::remove_file(&restored);
        env.restore(snap["snapshot"].as_str().unwrap(), &restored, &[]);
        assert_same(img, &restored);
    }
}

#[test]
fn sigterm_during_prune_on_s3_leaves_no_lock_and_a_repository_that_verifies() {
    let Some(weed) = Weed::start() else { return };
    let (env, _) = forgotten_one(&weed, "prune-term", 3, 40);
    let b = weed.backend("prune-term");
    for delay_ms in [100u64, 400] {
        let mut c = spawn_prune(&env, "--grace=0s");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let code = c.wait().unwrap().code();
        assert!(matches!(code, Some(0) | Some(143)), "{code:?}");
        assert!(b.list(Kind::Lock).unwrap().is_empty(), "a lock remains");
        let r = env.run(&["verify", "--read-data"]);
        assert_eq!(r.code, 0, "after SIGTERM at {delay_ms} ms: {}", r.stderr);
    }
}

#[test]
fn four_movers_back_up_into_s3_while_forget_and_prune_run_beside_them() {
    let Some(weed) = Weed::start() else { return };
    let env = weed.env_with("movers", &["--chunk-size", "64K", "--pack-size", "1M"]);
    let f = crate::movers::movers_beside_forget_and_prune(&env);
    eprintln!("prune beside the movers on S3: {f:?}");
    assert!(f.runs >= 3, "{f:?}");
    assert!(
        f.packs_marked > 0,
        "prune had work beside the movers: {f:?}"
    );
}

#[test]
fn prune_aborts_multipart_uploads_left_by_killed_movers_once_no_live_lock_is_older() {
    use object_store::multipart::MultipartStore;
    let Some(weed) = Weed::start() else { return };
    let env = weed.env("uploads");
    let backend = weed.backend("uploads");
    // A backup that is still running: its lock was taken before the upload started.
    let lock = live_lock(sbk_store::LockKind::Shared, "backup");
    assert_eq!(
        backend
            .write_once(Kind::Lock, "mover", &lock.encode())
            .unwrap(),
        Written::Created
    );
    std::thread::sleep(Duration::from_millis(1100));
    // An upload of a pack that never completes: no listing of objects shows it.
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_endpoint(weed.endpoint())
        .with_allow_http(true)
        .with_access_key_id(KEY)
        .with_secret_access_key(SECRET)
        .with_region("us-east-1")
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = object_store::path::Path::from("uploads/packs/00112233445566778899aabbccddeeff");
    let id = rt.block_on(store.create_multipart(&key)).unwrap();
    rt.block_on(store.put_part(&key, &id, 0, vec![7u8; 5 << 20].into()))
        .unwrap();
    let left = backend.unfinished_uploads().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].key, key.as_ref());
    assert!(backend.list(Kind::Pack).unwrap().is_empty());
    // It may be the live backup's: prune leaves it.
    std::thread::sleep(Duration::from_millis(1100));
    let r = env.run(&["prune", "--grace=0s"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(backend.unfinished_uploads().unwrap().len(), 1);
    // Once that backup is gone, nothing live is older than the upload: it is aborted.
    backend.delete(Kind::Lock, "mover").unwrap();
    let r = env.run(&["prune", "--grace=0s"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(backend.unfinished_uploads().unwrap().is_empty());
    assert_eq!(env.run(&["verify"]).code, 0);
}
