//! Replays the committed fuzz corpus of the changed-block list parser (fuzz/corpus/changed_list/)
//! through the entry point the cargo-fuzz target uses, so CI replays it without libFuzzer.

#[test]
fn replay_changed_list_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/changed_list");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        sbk_engine::fuzz_changed_list(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}
