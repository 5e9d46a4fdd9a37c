//! forget (by id and by policy), prune and stats.

use serde_json::Value;

use crate::common::*;

fn json(r: &Run) -> Value {
    r.json()
}

fn snapshot_ids(env: &Env) -> Vec<String> {
    json(&env.run(&["snapshots", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

fn pack_bytes(env: &Env) -> u64 {
    env.packs()
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// Every snapshot restores to the bytes recorded for it, and verify --read-data passes.
fn check_all(env: &Env, expected: &std::collections::HashMap<String, Vec<u8>>) {
    for id in snapshot_ids(env) {
        let out = env.path("check.out");
        let _ = std::fs::remove_file(&out);
        env.restore(&id, &out, &[]);
        assert!(
            std::fs::read(&out).unwrap() == expected[&id],
            "snapshot {id} restores differently"
        );
    }
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "verify: {}{}", r.stdout, r.stderr);
}

#[test]
fn forget_by_id_and_by_policy() {
    let env = Env::new();
    let src = env.path("img");
    let mut ids = Vec::new();
    for i in 0..5 {
        std::fs::write(&src, random(200_000, i)).unwrap();
        let tag = if i == 1 { "monthly" } else { "nightly" };
        ids.push(
            env.backup(&src, &["--tag", tag])["snapshot"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Bad input first: nothing changes.
    let before = env.state();
    for (args, code) in [
        (vec!["forget"], 2),
        (vec!["forget", &ids[0][..10], "--keep-last", "1"], 2),
        (vec!["forget", "--keep-last", "-1"], 2),
        (vec!["forget", "--keep-tag", "no-such-tag"], 13),
        (vec!["forget", "ffffffffffff"], 11),
    ] {
        let r = env.run(&args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(!r.stderr.is_empty());
    }
    assert!(env.state() == before);

    // A dry run says what it would do and does nothing.
    let r = json(&env.run(&[
        "forget",
        "--json",
        "--keep-last",
        "2",
        "--keep-tag",
        "monthly",
        "--dry-run",
    ]));
    let removed: Vec<&str> = r["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["keep"] == false)
        .map(|s| s["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(removed.len(), 2);
    assert!(env.state() == before);
    // For real, with reasons.
    let r = env.run(&["forget", "--keep-last", "2", "--keep-tag", "monthly"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("last 1") && r.stdout.contains("tag monthly"),
        "{}",
        r.stdout
    );
    let left = snapshot_ids(&env);
    assert_eq!(left.len(), 3);
    assert!(left.contains(&ids[1]) && left.contains(&ids[3]) && left.contains(&ids[4]));
    // By id.
    assert_eq!(env.run(&["forget", &ids[3][..12]]).code, 0);
    assert_eq!(snapshot_ids(&env).len(), 2);
}

#[test]
fn keep_within_counts_from_the_storage_clock() {
    let env = Env::new();
    let src = env.path("img");
    for i in 0..3 {
        std::fs::write(&src, random(100_000, i)).unwrap();
        env.backup(&src, &[]);
    }
    // Everything is younger than an hour: all kept, with the reason.
    let r = env.run(&["forget", "--keep-within", "1h"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("within 1h"), "{}", r.stdout);
    assert_eq!(snapshot_ids(&env).len(), 3);
    // Nothing is younger than a second two seconds on: a policy that keeps none is refused,
    // and with --keep-last 1 beside it, the newest stays.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(env.run(&["forget", "--keep-within", "1s"]).code, 13);
    let r = env.run(&["forget", "--keep-within", "1s", "--keep-last", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(snapshot_ids(&env).len(), 1);
    for bad in ["0s", "a month"] {
        assert_eq!(env.run(&["forget", "--keep-within", bad]).code, 2, "{bad}");
    }
}

#[test]
fn prune_reclaims_space_and_keeps_every_remaining_snapshot_whole() {
    // A seeded random sequence of backups of a mutating image, forgets and prunes; after each
    // prune, every remaining snapshot restores byte-identical and verify --read-data passes.
    for seed in [1u64, 2, 3] {
        let env = Env::new();
        let src = env.path("img");
        let mut image = random(6 << 20, seed);
        let mut expected = std::collections::HashMap::new();
        let mut rng = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..8 {
            match next(4) {
                0 | 1 => {
                    // Mutate a few MiB-sized regions and back up.
                    for _ in 0..1 + next(3) {
                        let at = next(image.len() as u64 - (1 << 20)) as usize;
                        image[at..at + (1 << 20)].copy_from_slice(&random(1 << 20, next(1 << 30)));
                    }
                    std::fs::write(&src, &image).unwrap();
                    let id = env.backup(&src, &[])["snapshot"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    expected.insert(id, image.clone());
                }
                2 => {
                    let ids = snapshot_ids(&env);
                    if ids.len() > 1 {
                        let victim = &ids[next(ids.len() as u64) as usize];
                        assert_eq!(env.run(&["forget", victim]).code, 0);
                    }
                }
                _ => {
                    // Beside backups (marks, then deletes what earlier runs marked) or at once.
                    let mode = if next(2) == 0 {
                        "--grace=0s"
                    } else {
                        "--exclusive"
                    };
                    let r = env.run(&["prune", "--max-unused", "0", mode]);
                    assert_eq!(r.code, 0, "{}", r.stderr);
                    check_all(&env, &expected);
                }
            }
        }
        // Forgetting snapshots with unique data and pruning shrinks the repository.
        let ids = snapshot_ids(&env);
        let before = pack_bytes(&env);
        for id in &ids[..ids.len().saturating_sub(1)] {
            assert_eq!(env.run(&["forget", id]).code, 0);
        }
        let r = json(&env.run(&["prune", "--exclusive", "--json"]));
        check_all(&env, &expected);
        if ids.len() > 1 {
            assert!(
                pack_bytes(&env) < before,
                "seed {seed}: {before} -> {} ({r})",
                pack_bytes(&env)
            );
            assert!(r["bytes_reclaimed"].as_u64().unwrap() > 0);
        }
    }
}

#[test]
fn prune_dry_run_changes_nothing_and_prune_respects_locks() {
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, random(3 << 20, 1)).unwrap();
    let first = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&src, random(3 << 20, 2)).unwrap();
    env.backup(&src, &[]);
    assert_eq!(env.run(&["forget", &first]).code, 0);
    let before = env.state();
    let r = json(&env.run(&["prune", "--exclusive", "--dry-run", "--json"]));
    assert!(
        r["packs_deleted"].as_u64().unwrap() + r["packs_repacked"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert!(env.state() == before, "a dry run changes nothing");
    // The plan, pack by pack: every pack once, each with an action, a reason and its size.
    let plan = r["plan"].as_array().unwrap();
    assert_eq!(plan.len() as u64, r["packs"].as_u64().unwrap(), "{r}");
    assert!(
        plan.iter()
            .any(|p| p["action"] == "delete" || p["action"] == "repack"),
        "{r}"
    );
    assert!(plan
        .iter()
        .any(|p| p["action"] == "keep" && p["reason"] == "used"));
    let r = json(&env.run(&["prune", "--grace=0s", "--dry-run", "--json"]));
    assert!(r["packs_marked"].as_u64().unwrap() > 0, "{r}");
    assert!(r["plan"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["action"] == "mark" && p["bytes"].as_u64().unwrap() > 0));
    assert!(env.state() == before, "a dry run changes nothing");
    // Without --json: the summary line, then PACK ACTION REASON BYTES lines.
    let r = env.run(&["prune", "--exclusive", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[0].starts_with("would remove"), "{}", r.stdout);
    assert!(lines.len() > 1, "{}", r.stdout);
    for line in &lines[1..] {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 4, "{line}");
        assert_eq!(f[0].len(), 32, "{line}");
        assert!(f[3].parse::<u64>().is_ok(), "{line}");
    }
    assert!(env.state() == before, "a dry run changes nothing");
    // A live shared lock (a backup running elsewhere) keeps an exclusive prune out…
    let lock = live_lock(sbk_store::LockKind::Shared, "backup");
    std::fs::write(env.repo.join("locks").join("other"), lock.encode()).unwrap();
    let before = env.state();
    let r = env.run(&["prune", "--exclusive"]);
    assert_eq!(r.code, 15, "{}", r.stderr);
    assert!(r.stderr.contains("backup"), "{}", r.stderr);
    assert!(env.state() == before);
    // …while prune beside it marks, and deletes nothing until that lock is gone: the backup
    // may have found the marked data before the mark.
    let packs = env.packs();
    for _ in 0..2 {
        let r = json(&env.run(&["prune", "--grace=0s", "--json"]));
        assert_eq!(r["packs_deleted"].as_u64(), Some(0), "{r}");
        assert!(env.packs() == packs);
    }
    let r = json(&env.run(&["prune", "--grace=0s", "--json"]));
    assert!(
        r["waiting_because"].as_str().unwrap().contains("backup"),
        "{r}"
    );
    std::fs::remove_file(env.repo.join("locks").join("other")).unwrap();
    let r = json(&env.run(&["prune", "--grace=0s", "--json"]));
    assert!(r["packs_deleted"].as_u64().unwrap() > 0, "{r}");
    assert!(env.packs().len() < packs.len());
    assert_eq!(env.run(&["verify", "--read-data"]).code, 0);
}

#[test]
fn stats_report_unique_bytes_and_ratios() {
    let env = Env::new();
    let src = env.path("img");
    let shared = random(2 << 20, 1);
    std::fs::write(&src, [shared.clone(), random(1 << 20, 2)].concat()).unwrap();
    let a = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&src, [shared, random(1 << 20, 3)].concat()).unwrap();
    env.backup(&src, &[]);
    let r = json(&env.run(&["stats", "--json"]));
    assert_eq!(r["snapshots"], 2);
    assert_eq!(r["logical_bytes"], 6 << 20);
    let dedup = r["dedup_ratio"].as_f64().unwrap();
    assert!(
        dedup > 1.3 && dedup < 1.7,
        "6 MiB referenced, about 4 MiB distinct: {dedup}"
    );
    let per = r["per_snapshot"].as_array().unwrap();
    for s in per {
        let unique = s["unique_bytes"].as_u64().unwrap();
        assert!(
            unique > (1 << 20) - (256 << 10) && unique < (1 << 20) + (512 << 10),
            "about 1 MiB unique: {s}"
        );
    }
    let one = json(&env.run(&["stats", "--json", &a[..8]]));
    assert_eq!(one["snapshots"], 1);
}
