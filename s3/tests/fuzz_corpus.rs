//! Replays the committed corpus of S3 listing answers (fuzz/corpus/uploads_listing/) through the
//! fuzz entry point, so a regression on a saved input fails CI on the stable toolchain.

#[test]
fn replay_uploads_listing_corpus() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/uploads_listing");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        sbk_s3::fuzz_uploads_listing(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    println!("uploads_listing: replayed {n} inputs");
    assert!(n > 0);
}
