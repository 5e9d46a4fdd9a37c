//! A backup killed with SIGKILL leaves no snapshot and no damage; SIGINT and SIGTERM stop backup
//! and prune cleanly.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn killed_backup_leaves_no_snapshot_and_no_damage() {
    let env = Env::new();
    let first = env.path("first");
    std::fs::write(&first, random(8 << 20, 1)).unwrap();
    let kept = env.backup(&first, &[]);

    let big = env.path("big");
    std::fs::write(&big, random(300 << 20, 2)).unwrap();
    // Kill at different moments: as soon as a pack is being written, and after 1 and 2 sealed.
    for sealed_before_kill in [0, 1, 2] {
        let packs_before = env.packs().len();
        let mut child = spawn_backup(&env.repo, &big);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let tmp = !env.pack_files(true).is_empty();
            let sealed = env.packs().len() - packs_before;
            if (sealed_before_kill == 0 && tmp)
                || (sealed_before_kill > 0 && sealed >= sealed_before_kill)
            {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "backup finished before it could be killed"
            );
            assert!(Instant::now() < deadline, "no pack appeared");
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the backup was killed mid-way (kill #{sealed_before_kill}: {status:?})"
        );

        let list = env.run(&["snapshots", "--json"]).json();
        assert_eq!(
            list.as_array().unwrap().len(),
            1,
            "no partial snapshot after kill #{sealed_before_kill}: {list}"
        );
        let out = env.path("out");
        let _ = std::fs::remove_file(&out);
        env.restore(kept["snapshot"].as_str().unwrap(), &out, &[]);
        assert_same(&first, &out);
        let v = env.run(&["verify", "--read-data"]);
        assert_eq!(
            v.code, 0,
            "the repository verifies after kill #{sealed_before_kill}: {}",
            v.stderr
        );
    }
    // Crashes at every single repository operation, rather than at delays that land wherever
    // they land, are in repository.rs (a_crash_or_an_error_at_any_operation_…).
    // Prune's figures add up after the kills: what the packs gave back is at most what they
    // held, and the killed writes' temporary files are counted on their own.
    let tmp: u64 = env
        .pack_files(true)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(tmp > 0, "the kills left temporary pack files");
    let r = env.run(&["prune", "--exclusive", "--json"]);
    let p = r.json();
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
    assert_eq!(n("bytes_leftovers"), tmp, "{p}");
    assert!(n("bytes_reclaimed") <= n("bytes_before"), "{p}");
    assert_eq!(
        n("bytes_reclaimed"),
        n("bytes_removed").saturating_sub(n("bytes_written")),
        "{p}"
    );
    assert!(env.pack_files(true).is_empty(), "leftovers removed");
    let line = env.run(&["prune", "--exclusive"]).stdout;
    assert!(line.contains("reclaimed of the"), "{line}");
    // The next backup works and restores.
    let snap = env.backup(&big, &[]);
    let out = env.path("big.out");
    env.restore(snap["snapshot"].as_str().unwrap(), &out, &[]);
    assert_same(&big, &out);
}

/// Sends `sig` (INT or TERM) to a running sbk.
fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn sigint_and_sigterm_stop_backup_and_prune_cleanly() {
    let env = Env::new();
    let first = env.path("first");
    std::fs::write(&first, random(8 << 20, 3)).unwrap();
    env.backup(&first, &[]);
    let big = env.path("big");
    std::fs::write(&big, random(300 << 20, 4)).unwrap();
    for (sig, code) in [("TERM", 143), ("INT", 130)] {
        let packs_before = env.packs().len();
        let mut child = spawn_backup(&env.repo, &big);
        // Once the first pack of this run is sealed, the backup is well under way.
        let deadline = Instant::now() + Duration::from_secs(60);
        while env.packs().len() == packs_before {
            assert!(child.try_wait().unwrap().is_none(), "finished too soon");
            assert!(Instant::now() < deadline, "no pack appeared");
            std::thread::sleep(Duration::from_millis(2));
        }
        signal(&child, sig);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "SIG{sig}");
        // No snapshot, no lock, no temporary pack left behind.
        assert_eq!(
            env.run(&["snapshots", "--json"])
                .json()
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(
            files_below(&env.repo.join("locks")).is_empty(),
            "SIG{sig}: a lock remains"
        );
        assert!(
            env.pack_files(true).is_empty(),
            "SIG{sig}: a temporary pack remains"
        );
        let v = env.run(&["verify", "--read-data"]);
        assert_eq!(v.code, 0, "{}", v.stderr);
    }
    // Prune, stopped wherever the signal lands, leaves a repository that verifies, and the
    // next prune finishes the job.
    let r = env.run(&["forget", "--keep-last", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut child = env
        .cmd()
        .args(["prune", "--max-unused", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    signal(&child, "INT");
    let status = child.wait().unwrap();
    assert!(matches!(status.code(), Some(0) | Some(130)), "{status:?}");
    assert!(files_below(&env.repo.join("locks")).is_empty());
    let v = env.run(&["verify", "--read-data"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let r = env.run(&["prune", "--max-unused", "0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
