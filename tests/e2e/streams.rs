//! Pipes as sources: `sbk backup - --source-name NAME` reads an image from standard input and
//! `--source-command CMD` from a command's output, read once, front to back, zero runs still
//! found; a command that fails leaves no snapshot.

use std::process::Stdio;

use crate::common::*;

/// An image of data and zero runs: 12 MiB of random bytes, a 20 MiB zero run, 3 MiB more data
/// and an unaligned tail.
fn image(env: &Env) -> std::path::PathBuf {
    let mut bytes = random(12 << 20, 31);
    bytes.resize(32 << 20, 0);
    bytes.extend(random((3 << 20) + 12_345, 32));
    let path = env.path("disk.img");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs `sbk backup ARGS` with `stdin` as its standard input.
fn backup_from(env: &Env, stdin: Stdio, args: &[&str]) -> Run {
    Run::from_output(
        env.cmd()
            .arg("backup")
            .args(args)
            .stdin(stdin)
            .output()
            .unwrap(),
    )
}

#[test]
fn a_backup_from_a_pipe_restores_byte_identical_and_stores_nothing_twice() {
    let env = Env::new();
    let img = image(&env);
    let file = std::fs::File::open(&img).unwrap();
    let first =
        backup_from(&env, file.into(), &["-", "--source-name", "vm1", "--json"]).json()[0].clone();
    assert_eq!(first["size"], std::fs::metadata(&img).unwrap().len());
    assert_eq!(first["source"], "vm1");
    assert!(
        first["bytes_zero"].as_u64().unwrap() >= 19 << 20,
        "the zero run is found in a stream too: {first}"
    );
    let out = env.path("out");
    env.restore(first["snapshot"].as_str().unwrap(), &out, &[]);
    assert_same(&img, &out);

    // The same bytes through a real pipe (a command's output) store nothing new, and so does
    // a backup of the file itself: a stream is cut exactly as the file is.
    let cat = format!("cat {}", img.display());
    let again = backup_from(
        &env,
        Stdio::null(),
        &["--source-command", &cat, "--source-name", "vm1", "--json"],
    )
    .json()[0]
        .clone();
    assert_eq!(again["new_bytes_stored"], 0, "{again}");
    assert_eq!(
        again["parent"], first["snapshot"],
        "the same source's chain"
    );
    let whole = env.backup(&img, &[]);
    assert_eq!(whole["new_bytes_stored"], 0, "{whole}");
    let out2 = env.path("out2");
    env.restore(again["snapshot"].as_str().unwrap(), &out2, &[]);
    assert_same(&img, &out2);
}

#[test]
fn a_source_command_that_fails_leaves_no_snapshot() {
    let env = Env::new();
    let img = image(&env);
    // It wrote the whole image and still failed: its output cannot be trusted.
    let cmd = format!("cat {}; echo 'export failed' >&2; exit 3", img.display());
    let r = backup_from(
        &env,
        Stdio::null(),
        &["--source-command", &cmd, "--source-name", "vm1"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("export failed") && r.stderr.contains("exit status: 3"),
        "the command's own message and its status reach the operator: {}",
        r.stderr
    );
    assert!(r.stderr.contains("no snapshot was written"), "{}", r.stderr);
    // A command cut short (a dropped ssh) fails the same way.
    let cut = format!("head -c 1000000 {}; kill -9 $$", img.display());
    let r = backup_from(
        &env,
        Stdio::null(),
        &["--source-command", &cut, "--source-name", "vm1"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    // A pipe that gave nothing is refused rather than saved as an empty disk.
    let r = backup_from(&env, Stdio::null(), &["-", "--source-name", "vm1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("gave no bytes"), "{}", r.stderr);
    let list = env.run(&["snapshots", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 0, "no snapshot: {list}");
}

#[test]
fn stream_arguments_are_checked_before_anything_is_read() {
    let env = Env::new();
    let img = image(&env);
    let list = env.path("changed.txt");
    std::fs::write(&list, "0 4096\n").unwrap();
    let list = list.to_str().unwrap();
    for (args, says) in [
        (vec!["-"], "--source-name NAME is required"),
        (
            vec!["--source-command", "true"],
            "--source-name NAME is required",
        ),
        (vec!["-", "-", "--source-name", "a"], "may be given once"),
        (
            vec!["-", "--source-name", "a", "--changed-blocks", list],
            "a stream is read whole",
        ),
        (
            vec!["--source-command", "true", img.to_str().unwrap()],
            "cannot be used with",
        ),
    ] {
        let file = std::fs::File::open(&img).unwrap();
        let r = backup_from(&env, file.into(), &args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    // A terminal on standard input (script(1) gives the command one) is refused.
    assert!(
        have_tool("script"),
        "script(1), from util-linux, is missing"
    );
    let line = format!(
        "{} --repo {} backup - --source-name a",
        env!("CARGO_BIN_EXE_sbk"),
        env.repo.display()
    );
    let r = Run::from_output(
        std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("SBK_PASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("standard input is a terminal"),
        "{}",
        r.stdout
    );
    let list = env.run(&["snapshots", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 0, "no snapshot: {list}");
}
