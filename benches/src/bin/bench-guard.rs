//! Regression guard for the hot path, run by CI after `cargo bench -- --quick`.
//!
//! Reads criterion's estimates (target/criterion/…/new/estimates.json) and checks each stage's
//! throughput as a ratio to the raw baseline measured in the same run, in the same group (a
//! memcpy of the same bytes, or an O_DIRECT read of the same file). Absolute times are never
//! compared: machines are shared and noisy. Each floor is about a third of the ratio measured
//! when it was set (docs/benchmarks.md), so only a real regression trips it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// (group, stage, baseline, floor of stage throughput / baseline throughput)
const GUARDS: &[(&str, &str, &str, f64)] = &[
    ("chunker", "segment_mixed", "baseline_memcpy", 0.05),
    ("chunker", "segment_random", "baseline_memcpy", 0.04),
    ("zero-detect", "blocks_zeros", "baseline_memcpy", 0.5),
    // Data blocks are told apart by their first 64 bytes: 35x a memcpy when set (2026-12-08).
    ("zero-detect", "blocks_data", "baseline_memcpy", 10.0),
    ("chunk", "blake3-keyed_random", "baseline_memcpy", 0.04),
    ("chunk", "zstd-compress_text", "baseline_memcpy", 0.003),
    ("chunk", "zstd-decompress_text", "baseline_memcpy", 0.01),
    ("pack", "write-and-seal", "baseline_write-fsync", 0.3),
    // Hits swung between 0.7 and 15 µs from run to run when the index was sled, as the working
    // set crossed its 8 MiB cache (docs/benchmarks.md): the floor only catches a collapse.
    ("index", "lookup_hit", "baseline_hashset", 0.0003),
    ("index", "lookup_miss", "baseline_hashset", 0.002),
    ("pipeline", "backup_first", "baseline_odirect-read", 0.15),
    ("pipeline", "backup_unchanged", "baseline_odirect-read", 0.3),
    // A restore is bound by its writes: against a write and fsync of the same bytes (0.78x when
    // set, 2026-12-06). Against the O_DIRECT read it swung from 0.25x to 0.39x between runs of
    // the same build on one machine, as the host's read cache came and went.
    ("pipeline", "restore_file", "baseline_write-fsync", 0.25),
];

/// Mean time per iteration in nanoseconds, from criterion's estimates.
fn mean_ns(dir: &Path, group: &str, bench: &str) -> Result<f64, String> {
    let path = dir
        .join(group)
        .join(bench)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    v["mean"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| format!("{}: no mean estimate", path.display()))
}

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/criterion"));
    let mut failed = 0;
    println!(
        "{:<12} {:<24} {:>8} {:>8}  verdict",
        "group", "stage", "ratio", "floor"
    );
    for &(group, stage, baseline, floor) in GUARDS {
        // Every bench of a group moves the same bytes (or does the same number of lookups), so
        // the throughput ratio is the inverse ratio of the times.
        match (mean_ns(&dir, group, stage), mean_ns(&dir, group, baseline)) {
            (Ok(t), Ok(b)) => {
                let ratio = b / t;
                let ok = ratio >= floor;
                println!(
                    "{group:<12} {stage:<24} {ratio:>8.4} {floor:>8.4}  {}",
                    if ok { "ok" } else { "REGRESSION" }
                );
                failed += usize::from(!ok);
            }
            (Err(e), _) | (_, Err(e)) => {
                println!("{group:<12} {stage:<24} missing: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!("bench-guard: {failed} stage(s) below their floor or missing");
        return ExitCode::FAILURE;
    }
    println!("bench-guard: every stage is above its floor");
    ExitCode::SUCCESS
}
