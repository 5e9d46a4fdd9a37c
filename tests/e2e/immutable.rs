//! Backups a stolen mover cannot destroy: repositories under S3 Object Lock on a real SeaweedFS
//! (which enforces it), attacked with the mover's own credentials through boto3 (from PyPI, in
//! the venv scripts/test.sh makes; SBK_TEST_PYTHON), and read back as they were with `--as-of`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::common::*;
use crate::weed::Weed;

/// The bucket with Object Lock the scenarios use (weed's own test bucket has none).
const LOCKED: &str = "locked";

/// The Python with boto3, if installed; skipped (or failed under CI=true) otherwise.
fn python() -> Option<PathBuf> {
    peer("SBK_TEST_PYTHON", "a Python with boto3")
}

/// Runs a Python script with `s3` bound to a boto3 client of `weed`, with the mover's own
/// credentials; its stdout parsed as JSON.
fn boto(python: &PathBuf, weed: &Weed, script: &str) -> Value {
    let prelude = "import boto3, json, sys, datetime\n\
         s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],\n\
             aws_secret_access_key=sys.argv[3], region_name='us-east-1')\n";
    let vars: std::collections::HashMap<_, _> = weed.vars().into_iter().collect();
    let o = Command::new(python)
        .args([
            "-c",
            &format!("{prelude}{script}"),
            &weed.endpoint(),
            &vars["AWS_ACCESS_KEY_ID"],
            &vars["AWS_SECRET_ACCESS_KEY"],
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// A SeaweedFS with a bucket created with Object Lock.
fn locked_storage() -> Option<(Weed, PathBuf)> {
    let python = python()?;
    let weed = Weed::start()?;
    let made = boto(
        &python,
        &weed,
        &format!(
            "s3.create_bucket(Bucket='{LOCKED}', ObjectLockEnabledForBucket=True)\n\
             c = s3.get_object_lock_configuration(Bucket='{LOCKED}')\n\
             print(json.dumps(c['ObjectLockConfiguration']['ObjectLockEnabled']))"
        ),
    );
    assert_eq!(made, "Enabled");
    Some((weed, python))
}

/// A repository under `prefix` of the locked bucket, under Object Lock for `duration`, made
/// with these further `init` arguments.
fn locked_repo(weed: &Weed, prefix: &str, duration: &str, init: &[&str]) -> Env {
    Env::init_at(
        tempfile::tempdir().unwrap(),
        PathBuf::from(format!("s3://{LOCKED}/{prefix}")),
        weed.vars(),
        &[&["--chunk-size", "64K", "--object-lock", duration], init].concat(),
    )
}

/// Every version under `prefix` with its retention date and LastModified (seconds since the
/// epoch; retention null when it has none).
fn versions(python: &PathBuf, weed: &Weed, prefix: &str) -> Vec<Value> {
    let v = boto(
        python,
        weed,
        &format!(
            "out = []\n\
             r = s3.list_object_versions(Bucket='{LOCKED}', Prefix='{prefix}/')\n\
             for v in r.get('Versions', []):\n\
             \x20   try:\n\
             \x20       until = s3.get_object_retention(Bucket='{LOCKED}', Key=v['Key'], VersionId=v['VersionId'])['Retention']['RetainUntilDate'].timestamp()\n\
             \x20   except Exception:\n\
             \x20       until = None\n\
             \x20   out.append({{'key': v['Key'], 'version': v['VersionId'], 'modified': v['LastModified'].timestamp(), 'until': until}})\n\
             print(json.dumps(out))"
        ),
    );
    v.as_array().unwrap().clone()
}

#[test]
fn a_stolen_mover_cannot_destroy_the_backups() {
    let Some((weed, python)) = locked_storage() else {
        return;
    };
    let env = locked_repo(&weed, "estate", "1h", &[]);
    let image = env.path("disk.img");
    let mut data = random(3 << 20, 7);
    std::fs::write(&image, &data).unwrap();
    let first = env.backup(&image, &[]);
    let first_copy = env.path("first.img");
    std::fs::copy(&image, &first_copy).unwrap();
    data[1 << 20..(1 << 20) + 300_000].copy_from_slice(&random(300_000, 8));
    std::fs::write(&image, &data).unwrap();
    let second = env.backup(&image, &[]);
    let ids = [
        first["snapshot"].as_str().unwrap().to_owned(),
        second["snapshot"].as_str().unwrap().to_owned(),
    ];
    // TIME: after both backups, before the attack (one-second resolution on both sides).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // After TIME, a third backup: it is not part of the repository as it was, and the packs
    // it reuses have their retention extended (which moves their LastModified past TIME on
    // SeaweedFS: the view must still find them).
    std::fs::write(env.path("third.img"), random(1 << 20, 9)).unwrap();
    env.backup(&env.path("third.img"), &[]);
    env.backup(&image, &[]);

    // The attacker holds the mover's credentials: garbage over the config and every manifest,
    // every object deleted, then every version deleted by id.
    let attack = boto(
        &python,
        &weed,
        &format!(
            "objs = s3.list_objects_v2(Bucket='{LOCKED}', Prefix='estate/').get('Contents', [])\n\
             for o in objs:\n\
             \x20   if o['Key'].endswith('/config') or '/snapshots/' in o['Key']:\n\
             \x20       s3.put_object(Bucket='{LOCKED}', Key=o['Key'], Body=b'garbage')\n\
             for o in objs:\n\
             \x20   s3.delete_object(Bucket='{LOCKED}', Key=o['Key'])\n\
             refused, deleted = [], []\n\
             for v in s3.list_object_versions(Bucket='{LOCKED}', Prefix='estate/').get('Versions', []):\n\
             \x20   try:\n\
             \x20       s3.delete_object(Bucket='{LOCKED}', Key=v['Key'], VersionId=v['VersionId'])\n\
             \x20       deleted.append(v['Key'])\n\
             \x20   except Exception as e:\n\
             \x20       refused.append(v['Key'])\n\
             print(json.dumps({{'objects': len(objs), 'refused': refused, 'deleted': deleted}}))"
        ),
    );
    let refused = attack["refused"].as_array().unwrap();
    let deleted = attack["deleted"].as_array().unwrap();
    // Every object sbk wrote is refused (locks are gone by now); what the attacker could delete
    // is only the garbage versions it wrote itself.
    assert_eq!(
        refused.len() as u64,
        attack["objects"].as_u64().unwrap(),
        "{attack}"
    );
    assert!(refused
        .iter()
        .any(|k| k.as_str().unwrap().contains("/packs/")));
    assert_eq!(deleted.len(), 5, "config and four manifests: {attack}");

    // The repository as it is now is gone, and says how to get it back.
    let r = env.run(&["snapshots"]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(
        r.stderr.contains("config") && r.stderr.contains("--as-of"),
        "{}",
        r.stderr
    );

    // As it was at TIME: both snapshots, restored byte for byte, verified.
    let listed = env.run(&["--as-of", &t, "snapshots", "--json"]).json();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "{id} not in {listed:?}");
    }
    for (id, original) in ids.iter().zip([&first_copy, &image]) {
        let out = env.path(&format!("{id}.img"));
        env.restore(id, &out, &["--as-of", &t]);
        assert_same(original, &out);
    }
    let r = env.run(&["--as-of", &t, "verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Reading the past writes nothing: no command that writes runs with --as-of.
    for cmd in [&["backup"][..], &["prune"], &["forget", &ids[0]]] {
        let r = env.run(&[&["--as-of", &t][..], cmd].concat());
        assert_eq!(r.code, 2, "{cmd:?}: {}", r.stderr);
    }
    let r = env.run(&["--as-of", &t, "copy", "--from-repo", "x"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--from-as-of"), "{}", r.stderr);

    // Rebuilt elsewhere: a clean repository that needs no --as-of.
    let clean = Env::new();
    let r = Run::from_output(
        clean
            .cmd()
            .envs(weed.vars())
            .args(["copy", "--from-repo", env.repo.to_str().unwrap()])
            .args(["--from-as-of", &t])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = clean.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let copied = clean.run(&["snapshots", "--json"]).json();
    assert_eq!(copied.as_array().unwrap().len(), 2);
    let out = clean.path("latest.img");
    clean.restore("latest", &out, &[]);
    assert_same(&image, &out);
}

#[test]
fn every_object_of_backup_data_is_written_under_retention() {
    let Some((weed, python)) = locked_storage() else {
        return;
    };
    let env = locked_repo(&weed, "kept", "30s", &[]);
    let image = env.path("disk.img");
    std::fs::write(&image, random(2 << 20, 3)).unwrap();
    env.backup(&image, &[]);
    let all = versions(&python, &weed, "kept");
    let mut kinds = std::collections::BTreeSet::new();
    for v in &all {
        let key = v["key"].as_str().unwrap();
        // Locks and pins go for good once their command ends: no version of them is left.
        assert!(
            !key.contains("/locks/") && !key.contains("/pins/"),
            "left behind: {v}"
        );
        let until = v["until"]
            .as_f64()
            .unwrap_or_else(|| panic!("no retention: {v}"));
        let modified = v["modified"].as_f64().unwrap();
        assert!(until >= modified + 30.0, "{v}");
        kinds.insert(key.split('/').nth(1).unwrap_or("").to_owned());
    }
    for kind in ["config", "keys", "packs", "index", "snapshots"] {
        if kind == "keys" && !encrypted() {
            continue;
        }
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }
    // The config rewritten with its own bytes (as one would, to put another retention date
    // on it, or to drop Object Lock with the key a stolen mover holds): damage, said as such.
    boto(
        &python,
        &weed,
        &format!(
            "body = s3.get_object(Bucket='{LOCKED}', Key='kept/config')['Body'].read()\n\
             s3.put_object(Bucket='{LOCKED}', Key='kept/config', Body=body)\n\
             print(json.dumps(len(body)))"
        ),
    );
    let r = env.run(&["snapshots"]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(
        r.stderr.contains("written 2 times") && r.stderr.contains("--as-of"),
        "{}",
        r.stderr
    );
}

#[test]
fn object_lock_needs_a_bucket_with_it() {
    let Some((weed, _python)) = locked_storage() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let init = |repo: &str| {
        Run::from_output(
            sbk()
                .envs(weed.vars())
                .args(["--repo", repo, "init", "--object-lock", "1d"])
                .output()
                .unwrap(),
        )
    };
    // weed's own test bucket has no Object Lock.
    let r = init("s3://sbk/plain");
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("Object Lock"), "{}", r.stderr);
    let r = init("s3://no-such-bucket/r");
    assert_eq!(r.code, 10, "{}", r.stderr);
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);
    let r = init(dir.path().join("local").to_str().unwrap());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(!dir.path().join("local").exists());
    // --as-of on a local repository, and on a bucket that keeps no versions.
    let local = Env::new();
    let r = local.run(&["--as-of", "1h", "snapshots"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let plain = Env::init_at(
        tempfile::tempdir().unwrap(),
        PathBuf::from("s3://sbk/plain"),
        weed.vars(),
        &[],
    );
    let r = plain.run(&["--as-of", "1h", "snapshots"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("versions"), "{}", r.stderr);
}

/// Seconds since the epoch of an RFC 3339 time as sbk prints it.
fn epoch(t: &Value) -> f64 {
    let t = humantime::parse_rfc3339(t.as_str().unwrap()).unwrap();
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The earliest retention date among the versions under `prefix` whose key contains `part`.
fn earliest(all: &[Value], part: &str) -> f64 {
    all.iter()
        .filter(|v| v["key"].as_str().unwrap().contains(part))
        .map(|v| v["until"].as_f64().unwrap_or(0.0))
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn reused_packs_stay_retained_as_long_as_the_new_snapshot() {
    let Some((weed, python)) = locked_storage() else {
        return;
    };
    // 20 s, in generations of 2 s: a few seconds apart, two backups are in different ones.
    // Packs of 1 MiB: the one unchanged segment a changed-block backup reads again to check
    // the list finds a few of them; only a walk of its trees finds the rest.
    let env = locked_repo(&weed, "reuse", "20s", &["--pack-size", "1M"]);
    let image = env.path("disk.img");
    std::fs::write(&image, random(40 << 20, 11)).unwrap();
    let unchanged = env.path("nothing-changed");
    std::fs::write(&unchanged, "# nothing changed\n").unwrap();
    env.backup(&image, &[]);
    let pause = || std::thread::sleep(std::time::Duration::from_secs(3));
    // Every segment reused from the parent, a generation later: the new snapshot's packs are
    // only found by walking its trees. Then a whole read: every chunk a dedup hit.
    for extra in [&["--changed-blocks", unchanged.to_str().unwrap()][..], &[]] {
        pause();
        let b = env.backup(&image, extra);
        assert_eq!(b["new_bytes"], 0, "{b}");
        let listed = env.run(&["snapshots", "--json"]).json();
        let newest = listed.as_array().unwrap().last().unwrap().clone();
        assert_eq!(newest["id"], b["snapshot"]);
        let protected = epoch(&newest["protected_until"]);
        assert_eq!(protected, epoch(&newest["time"]) + 20.0, "{newest}");
        let all = versions(&python, &weed, "reuse");
        for part in ["/packs/", "/index/", "/config"] {
            let until = earliest(&all, part);
            assert!(until >= protected, "{part}: {until} < {protected}: {all:?}");
        }
    }
    // Protected snapshots are not forgotten: by name it is refused, by a policy kept.
    let r = env.run(&["forget", "latest"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("protected until"), "{}", r.stderr);
    let r = env.run(&["forget", "--keep-last", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout.matches("protected until").count(),
        3,
        "{}",
        r.stdout
    );
    assert_eq!(
        env.run(&["snapshots", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

/// Keys under `prefix` that have a version (`versions`) or a delete marker (`markers`).
fn keys(python: &PathBuf, weed: &Weed, prefix: &str) -> Value {
    boto(
        python,
        weed,
        &format!(
            "r = s3.list_object_versions(Bucket='{LOCKED}', Prefix='{prefix}/')\n\
             print(json.dumps({{'versions': sorted(v['Key'] for v in r.get('Versions', [])),\n\
             \x20   'markers': sorted(v['Key'] for v in r.get('DeleteMarkers', []))}}))"
        ),
    )
}

#[test]
fn prune_deletes_old_versions_once_their_retention_has_passed() {
    let Some((weed, python)) = locked_storage() else {
        return;
    };
    let env = locked_repo(&weed, "expire", "6s", &[]);
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    std::fs::write(&a, random(2 << 20, 21)).unwrap();
    std::fs::write(&b, random(2 << 20, 22)).unwrap();
    let first = env.backup(&a, &[]);
    let packs_of_a: Vec<String> = keys(&python, &weed, "expire")["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .filter(|k| k.contains("/packs/"))
        .collect();
    assert!(!packs_of_a.is_empty());
    // A's protection ends; B, written now, is protected and keeps the index files retained.
    std::thread::sleep(std::time::Duration::from_secs(8));
    env.backup(&b, &[]);
    let r = env.run(&["forget", first["snapshot"].as_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = env.run(&["prune", "--exclusive", "--json"]).json();
    let lock = &report["object_lock"];
    assert!(report["packs_deleted"].as_u64().unwrap() >= 1, "{report}");
    // A's packs are past their retention: gone for good, markers and all. The index files
    // the prune replaced are still retained: kept, with the date they free.
    assert!(
        lock["versions_deleted"].as_u64().unwrap() >= packs_of_a.len() as u64,
        "{report}"
    );
    assert!(lock["versions_retained"].as_u64().unwrap() >= 1, "{report}");
    assert!(lock["retained_until"].is_string(), "{report}");
    let after = keys(&python, &weed, "expire");
    for p in &packs_of_a {
        let listed = after.to_string();
        assert!(!listed.contains(p.as_str()), "{p} still listed: {after}");
    }
    let retained_markers = after["markers"].as_array().unwrap().len();
    assert!(retained_markers >= 1, "{after}");
    // Once that date has passed, the next prune frees the rest: no version of a gone object
    // and no delete marker is left.
    std::thread::sleep(std::time::Duration::from_secs(8));
    let report = env.run(&["prune", "--exclusive", "--json"]).json();
    assert_eq!(report["object_lock"]["versions_retained"], 0, "{report}");
    assert_eq!(
        report["object_lock"]["markers_deleted"].as_u64().unwrap() as usize,
        retained_markers,
        "{report}"
    );
    let after = keys(&python, &weed, "expire");
    assert_eq!(after["markers"].as_array().unwrap().len(), 0, "{after}");
    // What is left is the repository itself, which still restores B.
    let out = env.path("b.out");
    env.restore("latest", &out, &[]);
    assert_same(&b, &out);
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
