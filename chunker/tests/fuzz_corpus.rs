//! Replays the committed chunker fuzz corpus (fuzz/corpus/chunker/) through the fuzz entry point,
//! so a regression on a saved input fails CI on the stable toolchain.

#[test]
fn replay_chunker_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/chunker");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        sbk_chunker::fuzz_split(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    println!("chunker: replayed {n} inputs");
    assert!(n > 0);
}
