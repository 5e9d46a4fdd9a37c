//! Two movers and a prune beside them, interleaved step by step over one in-memory repository:
//! each process's backend operations wait for its turn, and the turns follow a seeded random
//! order, so every run of a seed takes the same path and several seeds take different ones.
//! Whatever the order, every snapshot that was not forgotten restores byte-identical and verify
//! --read-data passes.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use sbk_store::backend::{Staged, Written};
use sbk_store::{Backend, Kind, LockKind, MemBackend, ObjectInfo, SnapshotId, StoreError};

use crate::prune::{prune, PruneMode, PruneOptions};
use crate::testkit::{assert_sound, backup_one, lock, mem_repository, open, source};
use crate::NoProgress;

/// Whose turn it is.
struct Turns {
    state: Mutex<TurnState>,
    cv: Condvar,
    /// The storage, whose clock moves on a second with every step (so that leases, marks and
    /// grace periods see time pass).
    mem: MemBackend,
}

struct TurnState {
    turn: usize,
    /// An operation of the process whose turn it is runs.
    busy: bool,
    running: Vec<bool>,
    rng: u64,
    steps: u64,
}

impl Turns {
    fn new(mem: MemBackend, processes: usize, seed: u64) -> Self {
        Turns {
            state: Mutex::new(TurnState {
                turn: 0,
                busy: false,
                running: vec![true; processes],
                rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                steps: 0,
            }),
            cv: Condvar::new(),
            mem,
        }
    }

    /// Runs one operation of process `me` in its turn, then hands the turn on.
    fn step<T>(&self, me: usize, op: impl FnOnce() -> T) -> T {
        let mut s = self.state.lock().unwrap();
        while s.turn != me || s.busy {
            s = self.cv.wait(s).unwrap();
        }
        s.busy = true;
        drop(s);
        let r = op();
        let mut s = self.state.lock().unwrap();
        s.busy = false;
        self.hand_on(&mut s);
        r
    }

    /// Process `me` has ended: it takes no more turns.
    fn done(&self, me: usize) {
        let mut s = self.state.lock().unwrap();
        s.running[me] = false;
        if s.turn == me && !s.busy {
            self.hand_on(&mut s);
        }
    }

    fn hand_on(&self, s: &mut TurnState) {
        s.steps += 1;
        self.mem.advance(1);
        let running: Vec<usize> = (0..s.running.len()).filter(|i| s.running[*i]).collect();
        if !running.is_empty() {
            s.rng ^= s.rng << 13;
            s.rng ^= s.rng >> 7;
            s.rng ^= s.rng << 17;
            s.turn = running[(s.rng % running.len() as u64) as usize];
        }
        self.cv.notify_all();
    }
}

/// Ends a process's turns when dropped, so that one that panics lets the others finish (and the
/// test fail) instead of hanging.
struct Ending<'a> {
    turns: &'a Turns,
    me: usize,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.turns.done(self.me);
    }
}

/// The repository as one process sees it: its listings and writes wait for its turn.
struct Stepped {
    turns: Arc<Turns>,
    me: usize,
}

impl Stepped {
    fn mem(&self) -> &MemBackend {
        &self.turns.mem
    }
}

struct SteppedStaged {
    inner: Box<dyn Staged>,
    turns: Arc<Turns>,
    me: usize,
}

impl Staged for SteppedStaged {
    fn write(&mut self, bytes: &[u8]) -> sbk_store::Result<()> {
        self.inner.write(bytes)
    }
    fn finish(self: Box<Self>) -> sbk_store::Result<()> {
        let SteppedStaged { inner, turns, me } = *self;
        turns.step(me, || inner.finish())
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

impl Backend for Stepped {
    fn location(&self) -> String {
        format!("memory, process {}", self.me)
    }
    fn create(&self) -> sbk_store::Result<()> {
        self.mem().create()
    }
    fn list(&self, kind: Kind) -> sbk_store::Result<Vec<ObjectInfo>> {
        self.turns.step(self.me, || self.mem().list(kind))
    }
    fn read(&self, kind: Kind, name: &str) -> sbk_store::Result<Vec<u8>> {
        self.mem().read(kind, name)
    }
    fn read_at(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> sbk_store::Result<()> {
        self.mem().read_at(kind, name, offset, buf)
    }
    fn size(&self, kind: Kind, name: &str) -> sbk_store::Result<u64> {
        self.mem().size(kind, name)
    }
    fn write_once(&self, kind: Kind, name: &str, bytes: &[u8]) -> sbk_store::Result<Written> {
        self.turns
            .step(self.me, || self.mem().write_once(kind, name, bytes))
    }
    fn stage(&self, kind: Kind, name: &str) -> sbk_store::Result<Box<dyn Staged>> {
        Ok(Box::new(SteppedStaged {
            inner: self.mem().stage(kind, name)?,
            turns: self.turns.clone(),
            me: self.me,
        }))
    }
    fn replace(&self, kind: Kind, name: &str, bytes: &[u8]) -> sbk_store::Result<()> {
        self.turns
            .step(self.me, || self.mem().replace(kind, name, bytes))
    }
    fn delete(&self, kind: Kind, name: &str) -> sbk_store::Result<()> {
        self.turns.step(self.me, || self.mem().delete(kind, name))
    }
    fn remove_leftovers(&self, before: i64) -> sbk_store::Result<u64> {
        self.turns
            .step(self.me, || self.mem().remove_leftovers(before))
    }
}

const BESIDE: PruneMode = PruneMode::Beside { grace_secs: 5 };

fn prune_once(backend: Arc<dyn Backend>, mode: PruneMode) -> crate::Result<()> {
    let repo = open(backend)?;
    let kind = if mode == PruneMode::Exclusive {
        LockKind::Exclusive
    } else {
        LockKind::Prune
    };
    let lock = lock(&repo, kind)?;
    let opts = PruneOptions {
        max_unused_percent: 0.0,
        dry_run: false,
        threads: 1,
        mode,
    };
    prune(&repo, &lock, &opts, &NoProgress).map(|_| ())
}

#[test]
fn two_movers_and_a_prune_interleaved_step_by_step_lose_nothing() {
    for seed in 1..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        let mem = mem_repository();
        let turns = Arc::new(Turns::new(mem.clone(), 3, seed));
        let taken: Mutex<HashMap<SnapshotId, Vec<u8>>> = Mutex::default();
        let firsts: Mutex<Vec<SnapshotId>> = Mutex::default();
        let forgotten: Mutex<Vec<SnapshotId>> = Mutex::default();
        let backend = |me| -> Arc<dyn Backend> {
            Arc::new(Stepped {
                turns: turns.clone(),
                me,
            })
        };
        std::thread::scope(|s| {
            for mover in 0..2usize {
                let (backend, turns, taken, firsts, dir) =
                    (backend(mover), &turns, &taken, &firsts, dir.path());
                s.spawn(move || {
                    let _ending = Ending { turns, me: mover };
                    let repo = open(backend).expect("a mover opens the repository");
                    for version in 0..3u64 {
                        let seed = seed * 100 + mover as u64 * 10 + version;
                        let name = format!("mover{mover}");
                        let (path, bytes) = source(dir, &name, seed, 1 << 20);
                        let id = backup_one(&repo, &path)
                            .unwrap_or_else(|e| panic!("seed {seed}: mover {mover}: {e}"));
                        taken.lock().unwrap().insert(id, bytes);
                        if version == 0 {
                            firsts.lock().unwrap().push(id);
                        }
                    }
                });
            }
            let (backend, turns, firsts, forgotten) = (backend(2), &turns, &firsts, &forgotten);
            s.spawn(move || {
                let _ending = Ending { turns, me: 2 };
                for round in 0..4 {
                    // Forget a mover's first snapshot once there is one, as `forget` beside
                    // the movers would.
                    if round > 0 {
                        if let Some(id) = firsts.lock().unwrap().pop() {
                            let repo = open(backend.clone()).expect("opens");
                            match repo.remove_snapshot(&id) {
                                Ok(()) | Err(StoreError::SnapshotNotFound(_)) => {}
                                Err(e) => panic!("seed {seed}: forget: {e}"),
                            }
                            forgotten.lock().unwrap().push(id);
                        }
                    }
                    prune_once(backend.clone(), BESIDE)
                        .unwrap_or_else(|e| panic!("seed {seed}: prune round {round}: {e}"));
                }
            });
        });
        let mut expected = taken.into_inner().unwrap();
        for id in forgotten.into_inner().unwrap() {
            expected.remove(&id);
        }
        let when = format!("seed {seed}, {} steps", turns.state.lock().unwrap().steps);
        assert_sound(Arc::new(mem.clone()), &expected, &when);
        // With the movers gone, later prunes act on every mark, and lose nothing either.
        for _ in 0..2 {
            mem.advance(60);
            prune_once(Arc::new(mem.clone()), BESIDE).unwrap();
        }
        prune_once(Arc::new(mem.clone()), PruneMode::Exclusive).unwrap();
        assert_sound(
            Arc::new(mem.clone()),
            &expected,
            &format!("{when}, then pruned"),
        );
    }
}
