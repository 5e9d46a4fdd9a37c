//! Replays the committed fuzz corpora of the engine's decoders (fuzz/corpus/changed_list/ and
//! fuzz/corpus/overlay_map/) through the entry points the cargo-fuzz targets use, so CI replays
//! them without libFuzzer.

fn replay(target: &str, f: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        f(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}

#[test]
fn replay_changed_list_corpus() {
    replay("changed_list", sbk_engine::fuzz_changed_list);
}

#[test]
fn replay_overlay_map_corpus() {
    // The seed: an empty map of a 100 000-byte export; then what the fuzzer kept.
    let seed = sbk_engine::OverlayMap::new(sbk_store::SnapshotId([9; 32]), 100_000).encode();
    sbk_engine::fuzz_overlay_map(&seed);
    replay("overlay_map", sbk_engine::fuzz_overlay_map);
}
