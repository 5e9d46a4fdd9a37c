//! Replays the committed NBD message corpus (fuzz/corpus/nbd_messages/) through the fuzz entry
//! point, so a regression on a saved input fails CI on the stable toolchain.

#[test]
fn replay_nbd_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_messages");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        sbk_nbd::proto::fuzz_messages(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    println!("nbd_messages: replayed {n} inputs");
    assert!(n > 0);
}
