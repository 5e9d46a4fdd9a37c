//! The S3 backend on its own, against SeaweedFS: the backend contract every backend keeps,
//! and conditional creates that race.

use std::sync::Arc;

use sbk_store::backend::Written;
use sbk_store::{Backend, Kind};

use crate::weed::Weed;

#[test]
fn keeps_the_backend_contract_and_racing_creates_have_one_winner() {
    let Some(weed) = Weed::start() else { return };
    // The suite the local and in-memory backends pass too (sbk_store::backend::contract).
    let contract = weed.backend("contract");
    sbk_store::backend::contract::check(&contract, &sbk_store::unix_now).unwrap();
    // Two clients with their own connections and runtimes, as two processes would have.
    let a: Arc<dyn Backend> = Arc::new(weed.backend("race"));
    let b: Arc<dyn Backend> = Arc::new(weed.backend("race"));
    for round in 0..100 {
        let name = format!("lock-{round}");
        let (x, y) = std::thread::scope(|s| {
            let ta = s.spawn(|| a.write_once(Kind::Lock, &name, b"held by a").unwrap());
            let tb = s.spawn(|| b.write_once(Kind::Lock, &name, b"held by b").unwrap());
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let winners = [x, y].iter().filter(|w| **w == Written::Created).count();
        assert_eq!(winners, 1, "round {round}: {x:?} {y:?}");
        let held = a.read(Kind::Lock, &name).unwrap();
        let expected: &[u8] = if x == Written::Created {
            b"held by a"
        } else {
            b"held by b"
        };
        assert_eq!(held, expected, "round {round}");
    }
    // A replaced lock that someone removed does not come back.
    a.write_once(Kind::Lock, "l", b"1").unwrap();
    a.replace(Kind::Lock, "l", b"2").unwrap();
    assert_eq!(a.read(Kind::Lock, "l").unwrap(), b"2");
    b.delete(Kind::Lock, "l").unwrap();
    assert!(a.replace(Kind::Lock, "l", b"3").is_err());
    assert!(a.read(Kind::Lock, "l").is_err());
}
