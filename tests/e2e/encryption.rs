//! Encryption at rest: nothing readable in the repository, tampering detected in every kind of
//! object, passwords from every source, keys added, removed and changed. These scenarios make
//! their own encrypted repository whatever mode the rest of the suite runs in.

use std::path::Path;

use crate::common::*;

/// A fresh encrypted repository (64 KiB chunks) with the test password.
fn encrypted_env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        repo: dir.path().join("repo"),
        dir,
        vars: Vec::new(),
    };
    let r = env.run(&["init", "--chunk-size", "64K", "--encryption", "repokey"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    env
}

#[test]
fn nothing_of_the_source_is_readable_in_the_repository_or_the_cache() {
    let env = encrypted_env();
    // A source whose name, host, tag and content are all recognisable: text that compresses
    // (so it is not hidden by incompressibility) around random data.
    let src = env.path("source-NAMEMARKER.img");
    let mut data = repetitive(3 << 20);
    data.extend_from_slice(&random(1 << 20, 70));
    data.extend(b"CONTENTMARKER ".repeat(20_000));
    std::fs::write(&src, &data).unwrap();
    let r = env.run(&[
        "backup",
        src.to_str().unwrap(),
        "--host",
        "HOSTMARKER",
        "--tag",
        "TAGMARKER",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A second run, so the cache holds a table too.
    assert_eq!(env.run(&["stats"]).code, 0);
    let needles: [&[u8]; 6] = [
        b"NAMEMARKER",
        b"HOSTMARKER",
        b"TAGMARKER",
        b"CONTENTMARKER",
        b"repetitive test image",
        &data[3 << 20..(3 << 20) + 64],
    ];
    let mut checked = 0;
    for f in files_below(&env.repo)
        .into_iter()
        .chain(files_below(&env.cache()))
    {
        let bytes = std::fs::read(&f).unwrap();
        for n in needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n),
                "{} holds {:?} in plaintext",
                f.display(),
                String::from_utf8_lossy(&n[..n.len().min(20)])
            );
        }
        checked += 1;
    }
    assert!(checked > 5, "only {checked} files");
    // And it all comes back.
    let out = env.path("out");
    env.restore("latest", &out, &[]);
    assert_same(&src, &out);
}

/// Flips one byte of `file` in the middle.
fn flip(file: &Path) -> Vec<u8> {
    let original = std::fs::read(file).unwrap();
    let mut bad = original.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(file, &bad).unwrap();
    original
}

#[test]
fn a_changed_byte_in_any_kind_of_object_is_detected() {
    let env = encrypted_env();
    let src = env.path("img");
    std::fs::write(&src, random(2 << 20, 71)).unwrap();
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let one = |dir: &str| files_below(&env.repo.join(dir)).into_iter().next().unwrap();
    // (object, command, what the message must say)
    let cases: Vec<(std::path::PathBuf, Vec<&str>, &str)> = vec![
        (env.repo.join("config"), vec!["snapshots"], "config"),
        (one("keys"), vec!["snapshots"], "key object"),
        (
            one("snapshots"),
            vec!["restore", &id, "/dev/null"],
            &id[..16],
        ),
        (one("index"), vec!["verify"], "index file"),
        (
            one("packs"),
            vec!["verify", "--read-data"],
            "authentication failed",
        ),
    ];
    for (file, args, says) in cases {
        let original = flip(&file);
        let r = env.run(&args);
        assert_eq!(
            r.code,
            12,
            "{} changed: sbk {args:?} exit {}: {}{}",
            file.display(),
            r.code,
            r.stdout,
            r.stderr
        );
        let text = format!("{}{}", r.stdout, r.stderr);
        assert!(text.contains(says), "{}: {text}", file.display());
        std::fs::write(&file, original).unwrap();
    }
    assert_eq!(env.run(&["verify", "--read-data"]).code, 0, "all put back");
    // A config swapped for an unencrypted one (which would make sbk write plaintext into an
    // encrypted repository) is refused: the repository holds keys.
    let config = env.repo.join("config");
    let original = std::fs::read(&config).unwrap();
    let mut c = sbk_store::RepoConfig::decode(&original).unwrap();
    c.features_required = 0;
    c.mac = [0; 16];
    std::fs::write(&config, c.encode()).unwrap();
    let r = env.run(&["snapshots"]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("key objects"), "{}", r.stderr);
    std::fs::write(&config, original).unwrap();
}

#[test]
fn passwords_from_every_source_and_wrong_ones() {
    let env = encrypted_env();
    let run_with = |vars: &[(&str, &str)], args: &[&str]| {
        let mut c = env.cmd();
        c.env_remove("SBK_PASSWORD");
        for (k, v) in vars {
            c.env(k, v);
        }
        Run::from_output(
            c.args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap(),
        )
    };
    // Environment, file, command.
    assert_eq!(
        run_with(&[("SBK_PASSWORD", PASSWORD)], &["snapshots"]).code,
        0
    );
    let file = env.path("pw");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    assert_eq!(
        run_with(
            &[],
            &["--password-file", file.to_str().unwrap(), "snapshots"]
        )
        .code,
        0
    );
    assert_eq!(
        run_with(
            &[("SBK_PASSWORD_FILE", file.to_str().unwrap())],
            &["snapshots"]
        )
        .code,
        0
    );
    let cmd = format!("echo '{PASSWORD}'");
    assert_eq!(
        run_with(&[], &["--password-command", &cmd, "snapshots"]).code,
        0
    );
    assert_eq!(
        run_with(&[("SBK_PASSWORD_COMMAND", &cmd)], &["snapshots"]).code,
        0
    );
    // Wrong, missing, failing: exit 19, saying which, never a hang.
    let r = run_with(&[("SBK_PASSWORD", "not it")], &["snapshots"]);
    assert_eq!(r.code, 19, "{}", r.stderr);
    assert!(r.stderr.contains("wrong password"), "{}", r.stderr);
    let r = run_with(&[], &["snapshots"]);
    assert_eq!(r.code, 19, "{}", r.stderr);
    assert!(r.stderr.contains("no password"), "{}", r.stderr);
    let r = run_with(&[], &["--password-command", "exit 3", "snapshots"]);
    assert_eq!(r.code, 19, "{}", r.stderr);
    assert!(r.stderr.contains("password command failed"), "{}", r.stderr);
    let r = run_with(&[], &["--password-file", "/nonexistent/pw", "snapshots"]);
    assert_eq!(r.code, 19, "{}", r.stderr);
    // unlock needs no password.
    assert_eq!(run_with(&[], &["unlock"]).code, 0);
}

#[test]
fn keys_are_added_removed_and_changed() {
    let env = encrypted_env();
    let src = env.path("img");
    std::fs::write(&src, random(1 << 20, 72)).unwrap();
    env.backup(&src, &[]);
    let as_pw = |pw: &str, args: &[&str]| {
        Run::from_output(
            env.cmd()
                .env("SBK_PASSWORD", pw)
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let list = |pw: &str| -> Vec<serde_json::Value> {
        as_pw(pw, &["key", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .clone()
    };
    assert_eq!(list(PASSWORD).len(), 1);
    // A second key, for a second password: both open.
    let r = Run::from_output(
        env.cmd()
            .env("SBK_NEW_PASSWORD", "second secret")
            .args(["key", "add"])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let keys = list("second secret");
    assert_eq!(keys.len(), 2);
    let first = keys.iter().find(|k| k["current"] == false).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The key in use cannot be removed from under itself; the other one can.
    let r = as_pw(PASSWORD, &["key", "remove", &first[..8]]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    let r = as_pw("second secret", &["key", "remove", &first[..8]]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        as_pw(PASSWORD, &["snapshots"]).code,
        19,
        "the removed key's password no longer opens"
    );
    assert_eq!(
        as_pw("second secret", &["snapshots"]).code,
        0,
        "the other still opens"
    );
    // The last key is never removed.
    let last = list("second secret")[0]["id"].as_str().unwrap().to_owned();
    let r = Run::from_output(
        env.cmd()
            .env("SBK_PASSWORD", "second secret")
            .env("SBK_NEW_PASSWORD", "third")
            .args(["key", "add"])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0);
    let r = as_pw("third", &["key", "remove", &last[..8]]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let only = list("third")[0]["id"].as_str().unwrap().to_owned();
    let r = as_pw("third", &["key", "remove", &only[..8]]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    // passwd: the new password opens, the old one does not; the data is the same.
    let r = Run::from_output(
        env.cmd()
            .env("SBK_PASSWORD", "third")
            .env("SBK_NEW_PASSWORD", "fourth")
            .args(["key", "passwd"])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(as_pw("third", &["snapshots"]).code, 19);
    assert_eq!(list("fourth").len(), 1);
    let out = env.path("out");
    let r = Run::from_output(
        env.cmd()
            .env("SBK_PASSWORD", "fourth")
            .args(["restore", "latest", out.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_same(&src, &out);
    // Keys are for encrypted repositories only.
    let plain = Env::with_init(&["--encryption", "none"]);
    assert_eq!(plain.run(&["key", "list"]).code, 13);
}

#[test]
fn a_key_file_opens_without_a_password_until_it_is_removed() {
    use std::os::unix::fs::PermissionsExt;
    let env = encrypted_env();
    let src = env.path("img");
    std::fs::write(&src, random(2 << 20, 73)).unwrap();
    let key = env.path("mover.key");
    let r = env.run(&[
        "key",
        "add",
        "--new-key-file",
        key.to_str().unwrap(),
        "--json",
    ]);
    let added = r.json()["added"].as_str().unwrap().to_owned();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a key file is written private");
    // Never over an existing file.
    let before = std::fs::read(&key).unwrap();
    let r = env.run(&["key", "add", "--new-key-file", key.to_str().unwrap()]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert_eq!(
        std::fs::read(&key).unwrap(),
        before,
        "the file is untouched"
    );

    // With the key file and no password at all (and a wrong one ignored): backup, restore.
    let with_key = |args: &[&str], how: &str| {
        let mut c = env.cmd();
        c.env_remove("SBK_PASSWORD");
        match how {
            "flag" => c.arg("--key-file").arg(&key),
            _ => c.env("SBK_KEY_FILE", &key).env("SBK_PASSWORD", "wrong"),
        };
        Run::from_output(c.args(args).output().unwrap())
    };
    let b = with_key(&["backup", "--json", src.to_str().unwrap()], "flag").json();
    let out = env.path("out");
    let r = with_key(
        &[
            "restore",
            b[0]["snapshot"].as_str().unwrap(),
            out.to_str().unwrap(),
        ],
        "env",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_same(&src, &out);
    let keys = with_key(&["key", "list", "--json"], "flag").json();
    let listed = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == added.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["kind"], "key-file", "{keys}");
    assert_eq!(listed["current"], true, "{keys}");

    // Group-readable: refused, naming its mode.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let r = with_key(&["snapshots"], "flag");
    assert_eq!(r.code, 19, "{}", r.stderr);
    assert!(r.stderr.contains("0640"), "{}", r.stderr);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Removed (by a password holder), it opens nothing.
    let r = env.run(&["key", "remove", &added[..8]]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = with_key(&["snapshots"], "flag");
    assert_eq!(r.code, 19, "{}", r.stderr);
    assert!(r.stderr.contains("revoked"), "{}", r.stderr);
    // The password still opens everything it did.
    assert_eq!(env.run(&["snapshots"]).code, 0);
}
