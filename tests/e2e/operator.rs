//! What an operator types and reads: names checked before anything is written, shell
//! completions and man pages from the same definitions as --help, and `sbk diff`.

use std::process::Command;

use crate::common::*;

#[test]
fn names_with_control_characters_or_too_long_are_refused() {
    let env = Env::new();
    let img = env.path("img");
    std::fs::write(&img, random(1 << 20, 1)).unwrap();
    let long = "h".repeat(256);
    for args in [
        &["--tag", "night\nly"][..],
        &["--host", &long],
        &["--source-name", "a\tb"],
        &["--tag", ""],
    ] {
        let r = env.run(&[&["backup", img.to_str().unwrap()], args].concat());
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
    }
    // A path that cannot name a source: told to use --source-name.
    let odd = env.path("disk\nimage");
    std::fs::write(&odd, random(1 << 20, 2)).unwrap();
    let r = env.run(&["backup", odd.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--source-name"), "{}", r.stderr);
    let r = env.run(&[
        "backup",
        odd.to_str().unwrap(),
        "--source-name",
        "disk-image",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Nothing was written by the refused ones: one snapshot.
    let list = env.run(&["snapshots", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let r = env.run(&["forget", "--keep-last", "1", "--host", "x\ny"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn completions_and_man_pages_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let o = sbk().args(["completions", shell]).output().unwrap();
        assert!(o.status.success());
        let script = String::from_utf8(o.stdout).unwrap();
        for word in ["backup", "restore", "serve", "changed-blocks"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
        if shell == "bash" {
            // The script parses.
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("sbk.bash");
            std::fs::write(&f, &script).unwrap();
            let ok = Command::new("bash").arg("-n").arg(&f).status().unwrap();
            assert!(ok.success());
        }
    }
    assert_ne!(
        sbk()
            .args(["completions", "tcsh"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(0)
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let r = Run::from_output(sbk().args(["man", out.to_str().unwrap()]).output().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    for page in [
        "sbk.1",
        "sbk-backup.1",
        "sbk-serve.1",
        "sbk-key-add.1",
        "sbk-repair-index.1",
    ] {
        let text =
            std::fs::read_to_string(out.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    let backup = std::fs::read_to_string(out.join("sbk-backup.1")).unwrap();
    assert!(
        backup.contains("changed\\-blocks"),
        "the options are in the page"
    );
}

#[test]
fn diff_names_the_ranges_that_differ_in_the_changed_block_format() {
    let env = Env::new();
    let seg = 16usize << 20;
    let a = env.path("a.img");
    let d1 = random(3 * seg + 5000, 3);
    std::fs::write(&a, &d1).unwrap();
    let s1 = env.backup(&a, &["--source-name", "disk"]);
    let mut d2 = d1.clone();
    d2[1_000_000..1_000_010].fill(0xee);
    d2[2 * seg + 77..2 * seg + 80].fill(0xdd);
    d2.extend_from_slice(&random(seg, 4)); // grown
    let b = env.path("b.img");
    std::fs::write(&b, &d2).unwrap();
    let s2 = env.backup(&b, &["--source-name", "disk"]);
    let (i1, i2) = (
        s1["snapshot"].as_str().unwrap(),
        s2["snapshot"].as_str().unwrap(),
    );
    let r = env.run(&["diff", i1, i2]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ranges: Vec<(usize, usize)> = r
        .stdout
        .lines()
        .map(|l| {
            let mut f = l.split(' ').map(|x| x.parse::<usize>().unwrap());
            let (o, n) = (f.next().unwrap(), f.next().unwrap());
            (o, o + n)
        })
        .collect();
    // Every changed byte is covered, segment 1 is not (its tree is the same), and the growth is.
    for changed in [
        1_000_000,
        1_000_009,
        2 * seg + 77,
        2 * seg + 79,
        3 * seg + 5000,
        4 * seg,
    ] {
        assert!(
            ranges.iter().any(|&(s, e)| s <= changed && changed < e),
            "{changed} in {ranges:?}"
        );
    }
    assert!(
        !ranges.iter().any(|&(s, e)| s < 2 * seg && e > seg),
        "{ranges:?}"
    );
    let total: usize = ranges.iter().map(|(s, e)| e - s).sum();
    assert!(total < seg + (4 << 20), "chunk granularity: {total} bytes");
    // The output is a changed-block list: an incremental from it is exact.
    let list = env.path("list");
    std::fs::write(&list, &r.stdout).unwrap();
    let inc = env.backup(
        &b,
        &[
            "--source-name",
            "disk",
            "--changed-blocks",
            list.to_str().unwrap(),
            "--parent",
            i1,
            "--verify-unchanged",
            "100",
        ],
    );
    assert_eq!(inc["changed_blocks"]["trusted"], true, "{inc}");
    // A snapshot against itself: nothing; --json says the same.
    let r = env.run(&["diff", i1, i1]);
    assert_eq!(r.stdout, "");
    let j = env.run(&["diff", "--json", i1, i2]).json();
    assert_eq!(j["ranges"].as_array().unwrap().len(), ranges.len());
}

/// Parses a metrics file with a Prometheus text-format parser; returns (name, labels, value).
fn metrics(
    path: &std::path::Path,
) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a valid text-format file");
    assert!(!scrape.samples.is_empty(), "{text}");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("{}: not a gauge: {other:?}", s.metric),
            };
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (s.metric, labels, value)
        })
        .collect()
}

fn value(
    samples: &[(String, std::collections::BTreeMap<String, String>, f64)],
    name: &str,
    source: &str,
) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l.get("source").is_none_or(|s| s == source))
        .map(|(_, _, v)| *v)
}

#[test]
fn metrics_files_parse_and_keep_the_last_success_of_a_failed_source() {
    let env = Env::new();
    let img = env.path("img");
    std::fs::write(&img, random(3 << 20, 5)).unwrap();
    let file = env.path("sbk-backup.prom");
    let backup = || {
        env.run(&[
            "backup",
            img.to_str().unwrap(),
            "--source-name",
            "vm one",
            "--metrics-file",
            file.to_str().unwrap(),
        ])
    };
    let r = backup();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = metrics(&file);
    // (Label escaping is unit-tested in cli/src/metrics.rs: this parser does not undo it.)
    let src = "vm one";
    assert_eq!(value(&m, "sbk_backup_success", src), Some(1.0));
    assert_eq!(
        value(&m, "sbk_backup_read_bytes", src),
        Some(f64::from(3u32 << 20))
    );
    assert!(value(&m, "sbk_backup_new_bytes", src).unwrap() > 0.0);
    let first = value(&m, "sbk_backup_last_success_timestamp_seconds", src).unwrap();
    assert!(first > 1.7e9);
    // The same source failing (gone): success 0, and the last success time kept.
    std::fs::remove_file(&img).unwrap();
    let r = backup();
    assert_ne!(r.code, 0);
    let m = metrics(&file);
    assert_eq!(value(&m, "sbk_backup_success", src), Some(0.0));
    assert_eq!(value(&m, "sbk_backup_errors", src), Some(1.0));
    assert_eq!(
        value(&m, "sbk_backup_last_success_timestamp_seconds", src),
        Some(first)
    );
    // Prune and verify write theirs.
    let pf = env.path("sbk-prune.prom");
    let r = env.run(&["prune", "--metrics-file", pf.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pm = metrics(&pf);
    assert_eq!(value(&pm, "sbk_prune_success", ""), Some(1.0));
    assert_eq!(value(&pm, "sbk_prune_marks_waiting", ""), Some(0.0));
    assert!(value(&pm, "sbk_prune_packs_marked", "").is_some());
    let vf = env.path("sbk-verify.prom");
    let r = env.run(&[
        "verify",
        "--read-data",
        "--metrics-file",
        vf.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = metrics(&vf);
    assert_eq!(value(&v, "sbk_verify_success", ""), Some(1.0));
    assert_eq!(value(&v, "sbk_verify_problems", ""), Some(0.0));
}
