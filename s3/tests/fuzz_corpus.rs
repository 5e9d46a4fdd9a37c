//! Replays the committed corpora of S3 listing answers (fuzz/corpus/uploads_listing/,
//! fuzz/corpus/versions_listing/) through the fuzz entry points, so a regression on a saved
//! input fails CI on the stable toolchain.

fn replay(corpus: &str, entry: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(corpus);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        entry(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    println!("{corpus}: replayed {n} inputs");
    assert!(n > 0);
}

#[test]
fn replay_uploads_listing_corpus() {
    replay("uploads_listing", sbk_s3::fuzz_uploads_listing);
}

#[test]
fn replay_versions_listing_corpus() {
    replay("versions_listing", sbk_s3::fuzz_versions_listing);
}
