//! Replays the committed fuzz corpora of the engine's decoders (fuzz/corpus/changed_list/ and
//! fuzz/corpus/overlay_map/) and of extraction (fuzz/corpus/disk_image/) through the entry
//! points the cargo-fuzz targets use, so CI replays them without libFuzzer.

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

#[test]
fn replay_disk_images_through_extract() {
    replay("disk_image", sbk_engine::fuzz_extract);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, ..Default::default() })]

    /// Mutated disk seeds extracted whole: no panic, nothing outside the target (checked by
    /// the entry point itself).
    #[test]
    fn mutated_disks_extract_safely(
        which in 0usize..2,
        edits in proptest::collection::vec((0usize..1 << 20, proptest::num::u8::ANY), 1..16),
    ) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/disk_image");
        let mut seeds: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        seeds.sort();
        let mut bytes = std::fs::read(&seeds[which % seeds.len()]).unwrap();
        for (at, v) in edits {
            // Mostly the metadata near the start (partition tables, superblock, inode table).
            let at = if at % 2 == 0 { at % 65_536 } else { at } % bytes.len();
            bytes[at] = v;
        }
        sbk_engine::fuzz_extract(&bytes);
    }
}
