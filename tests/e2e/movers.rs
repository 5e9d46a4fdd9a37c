//! Many data movers into one repository while forget and prune run beside them
//! (docs/design.md, "prune"): separate `sbk` processes, each with its own cache as on its own
//! host, back up new versions of their images while a loop forgets old snapshots and prunes;
//! afterwards every remaining snapshot restores byte-identical and `verify --read-data` passes.
//! The S3 variant runs the same scenario against SeaweedFS (tests/e2e/s3.rs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::common::*;

const MOVERS: usize = 4;
/// Versions each mover backs up at least, and at most (it goes on until prune has run beside
/// it a few times).
const VERSIONS: usize = 4;
const MAX_VERSIONS: usize = 12;
const PRUNES_BESIDE: usize = 3;
const IMAGE: usize = 3 << 20;

/// What the prune loop did while the movers ran.
#[derive(Debug, Default)]
pub struct PruneFigures {
    pub runs: usize,
    pub packs_deleted: u64,
    pub packs_marked: u64,
    pub packs_revived: u64,
}

/// Runs the scenario on `env` (a fresh repository); returns what the prunes beside the movers
/// did.
pub fn movers_beside_forget_and_prune(env: &Env) -> PruneFigures {
    // A base every image shares (so that movers dedup against each other's data), and per
    // version a rewritten stretch of each image: plenty for forget and prune to free.
    let base = random(IMAGE, 900);
    let expected: Mutex<HashMap<String, Vec<u8>>> = Mutex::new(HashMap::new());
    let running = AtomicBool::new(true);
    let figures = Mutex::new(PruneFigures::default());
    let prunes = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let movers: Vec<_> = (0..MOVERS)
            .map(|m| {
                let (base, expected, prunes) = (&base, &expected, &prunes);
                s.spawn(move || {
                    let image = env.path(&format!("mover{m}.img"));
                    let cache = env.path(&format!("mover{m}-cache"));
                    let mut data = base.clone();
                    for v in 0..MAX_VERSIONS {
                        if v >= VERSIONS && prunes.load(Ordering::Relaxed) >= PRUNES_BESIDE {
                            break;
                        }
                        let at = ((m * 7 + v * 3) % 10) * (IMAGE / 12);
                        let len = IMAGE / 6;
                        data[at..at + len]
                            .copy_from_slice(&random(len, (1000 + m * 10 + v) as u64));
                        std::fs::write(&image, &data).unwrap();
                        let r = Run::from_output(
                            env.cmd()
                                .env("SBK_CACHE_DIR", &cache)
                                .args(["backup", "--json", "--host", &format!("mover{m}")])
                                .arg(&image)
                                .output()
                                .unwrap(),
                        );
                        assert_eq!(r.code, 0, "mover {m} version {v}: {}", r.stderr);
                        let id = r.json()[0]["snapshot"].as_str().unwrap().to_owned();
                        expected.lock().unwrap().insert(id, data.clone());
                    }
                })
            })
            .collect();
        // Forget and prune each in a loop of its own, beside each other and the movers.
        let forgetter = s.spawn(|| {
            while running.load(Ordering::Relaxed) {
                // Each (host, source) group keeps its newest two.
                let r = env.run(&["forget", "--keep-last", "2"]);
                assert_eq!(r.code, 0, "forget beside the movers: {}", r.stderr);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let pruner = s.spawn(|| {
            while running.load(Ordering::Relaxed) {
                let r = env.run(&["prune", "--grace=0s", "--max-unused", "0", "--json"]);
                assert_eq!(r.code, 0, "prune beside the movers: {}", r.stderr);
                let v = r.json();
                let mut f = figures.lock().unwrap();
                f.runs += 1;
                prunes.fetch_add(1, Ordering::Relaxed);
                f.packs_deleted += v["packs_deleted"].as_u64().unwrap();
                f.packs_marked += v["packs_marked"].as_u64().unwrap();
                f.packs_revived += v["packs_revived"].as_u64().unwrap();
            }
        });
        for m in movers {
            m.join().unwrap();
        }
        running.store(false, Ordering::Relaxed);
        forgetter.join().unwrap();
        pruner.join().unwrap();
    });
    let figures = figures.into_inner().unwrap();
    // Nobody else now: one more round forgets and marks, the next deletes what it marked.
    assert_eq!(env.run(&["forget", "--keep-last", "2"]).code, 0);
    for _ in 0..2 {
        let r = env.run(&["prune", "--grace=0s", "--max-unused", "0"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let expected = expected.into_inner().unwrap();
    let left = env.run(&["snapshots", "--json"]).json();
    let left: Vec<String> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left.len(), MOVERS * 2, "each mover keeps its newest two");
    for id in &left {
        let out = env.path("restored");
        let _ = std::fs::remove_file(&out);
        env.restore(id, &out, &[]);
        assert!(
            std::fs::read(&out).unwrap() == expected[id],
            "snapshot {id} restores byte-identical"
        );
    }
    let r = env.run(&["verify", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    figures
}

#[test]
fn four_movers_back_up_while_forget_and_prune_run_beside_them() {
    let env = Env::with_init(&["--chunk-size", "64K", "--pack-size", "1M"]);
    let f = movers_beside_forget_and_prune(&env);
    eprintln!("prune beside the movers: {f:?}");
    assert!(f.runs >= PRUNES_BESIDE, "{f:?}");
    assert!(
        f.packs_marked > 0,
        "prune had work beside the movers: {f:?}"
    );
}
