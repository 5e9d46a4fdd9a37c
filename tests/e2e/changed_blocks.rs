//! Changed-block incrementals: only what a list says changed is read, the snapshot is exact
//! (the same trees as a full backup of the same bytes), and a list that lies, belongs to another
//! parent or is malformed never makes a wrong snapshot.

use std::io::Write;
use std::path::Path;

use crate::common::*;

const SEG: usize = 16 << 20;

/// Backs up `src` as source `disk` with extra arguments, returning the JSON record.
fn backup(env: &Env, src: &Path, extra: &[&str]) -> serde_json::Value {
    let r = env.run(
        &[
            &[
                "backup",
                "--json",
                "--source-name",
                "disk",
                src.to_str().unwrap(),
            ],
            extra,
        ]
        .concat(),
    );
    assert_eq!(r.code, 0, "backup {extra:?}: {}", r.stderr);
    r.json()[0].clone()
}

/// The segment tree ids of a snapshot.
fn trees(env: &Env, snapshot: &serde_json::Value) -> Vec<sbk_store::ChunkId> {
    let repo = env.open();
    let id = snapshot["snapshot"].as_str().unwrap().parse().unwrap();
    repo.load_manifest(&id).unwrap().trees
}

/// Restores a snapshot and compares it with `src`.
fn restores_to(env: &Env, snapshot: &serde_json::Value, src: &Path) {
    let out = env.path("restored");
    let _ = std::fs::remove_file(&out);
    env.restore(snapshot["snapshot"].as_str().unwrap(), &out, &[]);
    assert_same(src, &out);
}

/// Writes `changes` (offset, bytes) into a copy of `data` at `path`; returns the new bytes.
fn changed(data: &[u8], changes: &[(usize, &[u8])], path: &Path) -> Vec<u8> {
    let mut d = data.to_vec();
    for (at, bytes) in changes {
        d[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    std::fs::write(path, &d).unwrap();
    d
}

#[test]
fn incrementals_from_every_list_format_are_exact() {
    let env = Env::new();
    let base = env.path("base.img");
    let data = random(3 * SEG + 12345, 90);
    std::fs::write(&base, &data).unwrap();
    let full = backup(&env, &base, &["--cbt-token", "s1"]);
    assert_eq!(full["changed_blocks"]["token"], "s1");

    // Odd offsets, one across a segment boundary, one at the very end.
    let v2 = env.path("v2.img");
    let boundary = SEG - 3;
    let end = data.len() - 5;
    let d2 = changed(
        &data,
        &[
            (777_777, b"odd offset"),
            (boundary, b"across"),
            (end, b"tail!"),
        ],
        &v2,
    );
    let lists: [(&str, String); 3] = [
        (
            "text",
            format!("# offset length\n777777 10\n0x{boundary:x} 6\n{end} 5\n"),
        ),
        (
            "rbd",
            format!(
                r#"[{{"offset":777777,"length":10,"exists":"true"}},{{"offset":{boundary},"length":6,"exists":"true"}},{{"offset":{end},"length":5,"exists":"false"}}]"#
            ),
        ),
        // thin_delta in blocks of 128 sectors (64 KiB): the blocks holding each change.
        (
            "thin",
            format!(
                r#"<superblock uuid="" time="0" transaction="1" data_block_size="128" nr_data_blocks="1000">
  <diff left="1" right="2">
    <different begin="{}" length="1"/>
    <different begin="{}" length="2"/>
    <right_only begin="{}" length="1"/>
  </diff>
</superblock>"#,
                777_777 / 65536,
                boundary / 65536,
                end / 65536
            ),
        ),
    ];
    for (name, list) in &lists {
        let file = env.path(&format!("list-{name}"));
        std::fs::write(&file, list).unwrap();
        let inc = backup(
            &env,
            &v2,
            &[
                "--changed-blocks",
                file.to_str().unwrap(),
                "--cbt-since",
                "s1",
            ],
        );
        let cb = &inc["changed_blocks"];
        assert_eq!(cb["incremental"], true, "{name}: {inc}");
        assert_eq!(cb["trusted"], true, "{name}");
        // Segments 0, 1 (the boundary change touches 0 and 1) and 3 changed; 2 is reused or
        // sampled (the default 1% checks at least one unchanged segment).
        assert!(cb["segments_reused"].as_u64().unwrap() <= 1, "{name}: {cb}");
        restores_to(&env, &inc, &v2);
        // Exact: the same trees as a full read of the same bytes.
        let whole = backup(&env, &v2, &[]);
        assert_eq!(
            whole["new_bytes"], 0,
            "{name}: nothing new after the incremental"
        );
        assert_eq!(trees(&env, &inc), trees(&env, &whole), "{name}");
    }

    // From stdin, relative to the newest snapshot (v2): only the changed segment is read, and
    // the one unchanged segment checked (the minimum, with --verify-unchanged 0).
    let v3 = env.path("v3.img");
    let d3 = changed(&d2, &[(2 * SEG + 100, b"stdin")], &v3);
    let mut child = env
        .cmd()
        .args([
            "backup",
            "--json",
            "--source-name",
            "disk",
            "--changed-blocks",
            "-",
            "--verify-unchanged",
            "0",
            v3.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{} 5", 2 * SEG + 100).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let inc = &inc[0];
    assert_eq!(inc["changed_blocks"]["segments_read"], 2);
    assert_eq!(inc["changed_blocks"]["segments_reused"], 2);
    // The one segment checked (which may be the short last one), and of the changed segment
    // only a chunk or two around the five changed bytes (chunks average 256 KiB, at most 1 MiB).
    let read = inc["bytes_read"].as_u64().unwrap();
    let around = 4 << 20;
    assert!(read > 5 && read <= (SEG + around) as u64, "{read}");
    let skipped = inc["changed_blocks"]["bytes_skipped"].as_u64().unwrap();
    assert!(skipped >= (2 * SEG - around) as u64, "{skipped}");
    restores_to(&env, inc, &v3);
    assert_eq!(d3.len(), data.len());
    // snapshots and stats say how it was made.
    let list = env.run(&["snapshots", "--json"]).json();
    let last = list.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["changed_blocks"]["segments_read"], 2, "{last}");
    let stats = env.run(&["stats", "--json"]).json();
    let per = stats["per_snapshot"].as_array().unwrap();
    let mine = per
        .iter()
        .find(|s| s["snapshot"] == inc["snapshot"])
        .unwrap();
    assert_eq!(mine["incremental"]["segments_reused"], 2, "{mine}");
}

#[test]
fn changes_in_and_around_holes_and_zero_runs_are_exact() {
    // A sparse image: data, a hole, data with a zero run, data. The changed version writes into
    // the hole, zeroes data between a zero run and a hole (so the runs merge), shortens the
    // zero run by writing into it, and rewrites bytes with the same bytes (listed, not changed).
    let env = Env::new();
    let base = env.path("sparse.img");
    let len = 2 * SEG;
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(len as u64).unwrap();
    drop(f);
    let mut data = vec![0u8; len];
    for (at, n, seed) in [
        (0, 3 << 20, 1),
        (6 << 20, 5 << 20, 2),
        (20 << 20, 4 << 20, 3),
    ] {
        data[at..at + n].copy_from_slice(&random(n, seed));
    }
    data[8 << 20..(8 << 20) + (512 << 10)].fill(0); // a zero run inside data
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        for (at, n) in [(0, 3 << 20), (6 << 20, 5 << 20), (20 << 20, 4 << 20)] {
            f.write_all_at(&data[at..at + n], at as u64).unwrap();
        }
    }
    backup(&env, &base, &[]);
    let v2 = env.path("sparse2.img");
    let zeros = vec![0u8; 300_000];
    let d2 = changed(
        &data,
        &[
            (4 << 20, b"into the hole"),
            ((11 << 20) - 300_000, &zeros),
            ((8 << 20) + 200_000, b"into the zero run"),
            (21 << 20, &data[21 << 20..(21 << 20) + 1000]),
        ],
        &v2,
    );
    assert_eq!(d2.len(), len);
    let list = env.path("list");
    std::fs::write(
        &list,
        format!(
            "{} 13\n{} 300000\n{} 17\n{} 1000\n",
            4 << 20,
            (11 << 20) - 300_000,
            (8 << 20) + 200_000,
            21 << 20
        ),
    )
    .unwrap();
    let inc = backup(&env, &v2, &["--changed-blocks", list.to_str().unwrap()]);
    assert_eq!(inc["changed_blocks"]["trusted"], true, "{inc}");
    restores_to(&env, &inc, &v2);
    let whole = backup(&env, &v2, &[]);
    assert_eq!(whole["new_bytes"], 0, "nothing new after the incremental");
    assert_eq!(trees(&env, &inc), trees(&env, &whole));
}

#[test]
fn grown_and_shrunk_sources_read_what_differs_in_shape() {
    let env = Env::new();
    let base = env.path("base.img");
    let data = random(2 * SEG + 1000, 91);
    std::fs::write(&base, &data).unwrap();
    backup(&env, &base, &[]);
    let empty = env.path("empty-list");
    std::fs::write(&empty, "# nothing changed\n").unwrap();
    // Grown: the old last segment changes length and a new one appears; both are read.
    let grown = env.path("grown.img");
    let mut g = data.clone();
    g.extend_from_slice(&random(SEG, 92));
    std::fs::write(&grown, &g).unwrap();
    let inc = backup(&env, &grown, &["--changed-blocks", empty.to_str().unwrap()]);
    restores_to(&env, &inc, &grown);
    assert_eq!(backup(&env, &grown, &[])["new_bytes"], 0);
    // Shrunk, to mid-segment.
    let shrunk = env.path("shrunk.img");
    std::fs::write(&shrunk, &g[..SEG + 4096]).unwrap();
    let inc = backup(
        &env,
        &shrunk,
        &["--changed-blocks", empty.to_str().unwrap()],
    );
    restores_to(&env, &inc, &shrunk);
    assert_eq!(backup(&env, &shrunk, &[])["new_bytes"], 0);
}

#[test]
fn a_lying_list_is_caught_and_the_snapshot_is_still_exact() {
    let env = Env::new();
    let base = env.path("base.img");
    let data = random(3 * SEG, 93);
    std::fs::write(&base, &data).unwrap();
    backup(&env, &base, &[]);
    let v2 = env.path("v2.img");
    changed(
        &data,
        &[(10, b"listed"), (2 * SEG + 10, b"NOT LISTED")],
        &v2,
    );
    let list = env.path("list");
    std::fs::write(&list, "10 6\n").unwrap();
    let r = env.run(&[
        "backup",
        "--json",
        "--source-name",
        "disk",
        "--changed-blocks",
        list.to_str().unwrap(),
        "--verify-unchanged",
        "100",
        v2.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("CHANGED-BLOCK LIST IS WRONG"),
        "{}",
        r.stderr
    );
    let inc = r.json()[0].clone();
    assert_eq!(inc["changed_blocks"]["trusted"], false);
    restores_to(&env, &inc, &v2);
    assert_eq!(backup(&env, &v2, &[])["new_bytes"], 0);
}

#[test]
fn lists_for_another_parent_malformed_lists_and_bad_parents_are_refused() {
    let env = Env::new();
    let base = env.path("base.img");
    std::fs::write(&base, random(SEG + 10, 94)).unwrap();
    backup(&env, &base, &["--cbt-token", "s1"]);
    let list = env.path("list");
    std::fs::write(&list, "0 10\n").unwrap();
    let before = env.state();
    // A list from a state no snapshot carries.
    let r = env.run(&[
        "backup",
        "--source-name",
        "disk",
        "--changed-blocks",
        list.to_str().unwrap(),
        "--cbt-since",
        "s0",
        base.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("\"s0\""), "{}", r.stderr);
    // Malformed lists: exit 2, naming the line or byte; nothing written.
    for (bad, says) in [
        ("", "empty"),
        ("0 10\nzero ten\n", "line 2"),
        ("[{\"offset\": 1}]", "rbd-json"),
        (
            "<superblock data_block_size=\"128\"><different begin=\"1\"/></superblock>",
            "length",
        ),
        (
            "<superblock data_block_size=\"128\"><different begin=\"1\" length=\"1\"/>",
            "incomplete",
        ),
    ] {
        std::fs::write(&list, bad).unwrap();
        let r = env.run(&[
            "backup",
            "--source-name",
            "disk",
            "--changed-blocks",
            list.to_str().unwrap(),
            base.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{bad}: {}", r.stderr);
    }
    // One source only.
    let r = env.run(&[
        "backup",
        "--changed-blocks",
        list.to_str().unwrap(),
        base.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(env.state() == before, "nothing was written");
}
