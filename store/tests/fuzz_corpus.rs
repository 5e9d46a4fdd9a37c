//! Replays the committed fuzz corpora (fuzz/corpus/<target>/) through the same entry points the
//! cargo-fuzz targets use, so that a regression on any saved input fails CI on the stable
//! toolchain, without libFuzzer.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let path = e.unwrap().path();
            f(&std::fs::read(&path).unwrap());
            n += 1;
        }
    }
    println!("{target}: replayed {n} inputs from {}", dir.display());
    assert!(n > 0, "no corpus for {target} in {}", dir.display());
}

#[test]
fn replay_corpora() {
    replay("config", sbk_store::fuzz::config);
    replay("blob_header", sbk_store::fuzz::blob_header);
    replay("pack_trailer", sbk_store::fuzz::pack_trailer);
    replay("index_file", sbk_store::fuzz::index_file);
    replay("cache_table", sbk_store::fuzz::cache_table);
    replay("manifest", sbk_store::fuzz::manifest);
    replay("tree", sbk_store::fuzz::tree);
    replay("blob_frame", sbk_store::fuzz::blob_frame);
    replay("lock", sbk_store::fuzz::lock);
    replay("marks", sbk_store::fuzz::marks);
    replay("key", sbk_store::fuzz::key);
    replay("key_file", sbk_store::fuzz::key_file);
    replay("sealed", sbk_store::fuzz::sealed);
}
