//! Bad input: a clear message naming the problem, the documented exit code, and a repository
//! left exactly as it was.

use std::os::unix::fs::FileExt;

use crate::common::*;

/// Runs `args` against the repository and checks exit code, message and unchanged state.
fn refused(env: &Env, args: &[&str], code: i32, message: &str) -> Run {
    let before = env.state();
    let r = env.run(args);
    assert_eq!(
        r.code, code,
        "sbk {args:?}: expected exit {code}, got {}: {}",
        r.code, r.stderr
    );
    assert!(
        r.stderr.contains(message),
        "sbk {args:?}: message {:?} lacks {message:?}",
        r.stderr
    );
    assert!(env.state() == before, "sbk {args:?} changed the repository");
    r
}

#[test]
fn repository_problems() {
    let dir = tempfile::tempdir().unwrap();
    // No repository given at all.
    let r = sbk().args(["snapshots"]).output().unwrap();
    assert_eq!(r.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--repo"));
    // A directory that is not a repository, one that does not exist, and a file.
    let afile = dir.path().join("afile");
    std::fs::write(&afile, b"not a repository").unwrap();
    for p in [dir.path().to_path_buf(), dir.path().join("missing"), afile] {
        let r = sbk()
            .arg("--repo")
            .arg(&p)
            .args(["snapshots"])
            .output()
            .unwrap();
        assert_eq!(
            r.status.code(),
            Some(10),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(String::from_utf8_lossy(&r.stderr).contains("not an sbk repository"));
    }
    // SBK_REPO works in place of --repo.
    let env = Env::new();
    let r = sbk()
        .env("SBK_REPO", &env.repo)
        .args(["snapshots", "--json"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(0));
    // init over an existing repository or a non-empty directory.
    refused(&env, &["init"], 13, "already holds an sbk repository");
    std::fs::write(dir.path().join("x"), b"x").unwrap();
    let r = sbk()
        .arg("--repo")
        .arg(dir.path())
        .args(["init"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(13));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not empty"));
    assert!(!dir.path().join("config").exists());
}

#[test]
fn bad_arguments() {
    let env = Env::new();
    refused(
        &env,
        &["backup", "--threads", "0", "/dev/null"],
        2,
        "threads",
    );
    let fresh = tempfile::tempdir().unwrap();
    for size in ["1000", "8M", "32K", "abc"] {
        let r = sbk()
            .arg("--repo")
            .arg(fresh.path().join("r"))
            .args(["init", "--chunk-size", size])
            .output()
            .unwrap();
        assert_eq!(
            r.status.code(),
            Some(2),
            "chunk size {size}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(!fresh.path().join("r").join("config").exists());
    }
    refused(&env, &["backup"], 2, "SOURCE");
    refused(&env, &["restore", "latest"], 2, "TARGET");
}

#[test]
fn bad_sources() {
    let env = Env::new();
    let dir = env.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    refused(
        &env,
        &["backup", dir.to_str().unwrap()],
        1,
        "is a directory",
    );
    refused(
        &env,
        &["backup", env.path("missing").to_str().unwrap()],
        1,
        "No such file",
    );
    refused(&env, &["backup", "/dev/null"], 1, "character device");
    // One good and one bad source: the good one is saved, exit code 3.
    let good = env.path("good");
    std::fs::write(&good, random(100_000, 1)).unwrap();
    let r = env.run(&["backup", good.to_str().unwrap(), dir.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("1 of 2 sources"), "{}", r.stderr);
}

#[test]
fn unknown_and_ambiguous_snapshots() {
    let env = Env::new();
    let src = env.path("img");
    refused(
        &env,
        &["restore", "latest", env.path("o").to_str().unwrap()],
        11,
        "no snapshot matches",
    );
    let mut ids: Vec<String> = Vec::new();
    // Back up until two snapshot ids share their first hex digit (at most 17 tries).
    let prefix = loop {
        std::fs::write(&src, random(5000, ids.len() as u64)).unwrap();
        let id = env.backup(&src, &[])["snapshot"]
            .as_str()
            .unwrap()
            .to_owned();
        if let Some(other) = ids.iter().find(|o| o[..1] == id[..1]) {
            break other[..1].to_owned();
        }
        ids.push(id);
    };
    let out = env.path("out");
    refused(
        &env,
        &["restore", &prefix, out.to_str().unwrap()],
        11,
        "ambiguous",
    );
    refused(
        &env,
        &["restore", "0123456789abcdef0123", out.to_str().unwrap()],
        11,
        "no snapshot matches",
    );
    refused(
        &env,
        &["restore", "not-hex", out.to_str().unwrap()],
        11,
        "no snapshot matches",
    );
    assert!(!out.exists());
    // A unique prefix works.
    env.restore(&ids[0][..12], &out, &[]);
    // An existing non-empty target needs --force.
    let r = refused(
        &env,
        &["restore", &ids[0], out.to_str().unwrap()],
        13,
        "--force",
    );
    assert!(r.stderr.contains("not empty"));
    env.restore(&ids[0], &out, &["--force"]);
}

#[test]
fn corrupted_config() {
    let env = Env::new();
    let config = env.repo.join("config");
    let mut bytes = std::fs::read(&config).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&config, &bytes).unwrap();
    refused(&env, &["snapshots"], 12, "corrupt config");
    // A repository from a newer sbk says so.
    bytes[40] ^= 1;
    bytes[8] = 9;
    std::fs::write(&config, &bytes).unwrap();
    refused(&env, &["snapshots"], 16, "has format version 9");
    refused(&env, &["backup", "/dev/null"], 16, "a newer sbk wrote it");
    // A required feature this sbk does not know (a newer sbk's encryption, say): exit 16 too;
    // an optional one is ignored.
    bytes[8] = 2;
    let mut c = sbk_store::RepoConfig::decode(&bytes).unwrap();
    let ours = c.features_required;
    c.features_required = ours | 1 << 7;
    std::fs::write(&config, c.encode()).unwrap();
    refused(&env, &["snapshots"], 16, "required features 0x80");
    c.features_required = ours;
    c.features_optional = 1 << 7;
    std::fs::write(&config, c.encode()).unwrap();
    if encrypted() {
        // An encrypted repository's config is authenticated: even an optional bit set by
        // someone without the key is tampering.
        refused(&env, &["snapshots"], 12, "authentication failed");
    } else {
        assert_eq!(env.run(&["snapshots"]).code, 0);
    }
}

/// A repository written by sbk 0.1 (format 1, committed as a fixture) is refused with exit 16 by
/// every command, naming its version and what reads it, and is left as it was.
#[test]
fn format_1_repository_is_refused() {
    let env = Env::from_fixture("v1-repo");
    for args in [
        &["snapshots"][..],
        &["restore", "latest", "/tmp/never-written"],
        &["backup", "/dev/null"],
        &["verify"],
        &["prune"],
        &["repair", "index"],
        &["unlock"],
    ] {
        let r = refused(&env, args, 16, "format version 1");
        assert!(r.stderr.contains("sbk 0.1"), "{}", r.stderr);
    }
    assert!(!std::path::Path::new("/tmp/never-written").exists());
}

#[test]
fn damaged_packs_fail_the_restore_loudly() {
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, random(6 << 20, 4)).unwrap();
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let pack = env.packs().into_iter().next().unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_owned();
    let original = std::fs::read(&pack).unwrap();
    let out = env.path("out");

    // A flipped byte inside a blob: the chunk fails verification; the error names chunk and pack.
    let f = std::fs::File::options().write(true).open(&pack).unwrap();
    f.write_all_at(&[original[1 << 20] ^ 0xff], 1 << 20)
        .unwrap();
    let r = refused(
        &env,
        &["restore", &id, out.to_str().unwrap()],
        12,
        "is corrupt",
    );
    assert!(
        r.stderr.contains("chunk") && r.stderr.contains(&pack_name),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "no partial restore is left behind");
    let r = refused(&env, &["restore", &id, "-"], 12, &pack_name);
    assert!(r.stdout.len() < 6 << 20);

    // A truncated pack.
    std::fs::write(&pack, &original[..original.len() / 2]).unwrap();
    refused(
        &env,
        &["restore", &id, out.to_str().unwrap()],
        12,
        &pack_name,
    );
    assert!(!out.exists());

    // A missing pack.
    std::fs::remove_file(&pack).unwrap();
    refused(
        &env,
        &["restore", &id, out.to_str().unwrap()],
        12,
        "is missing",
    );

    // Put it back: everything restores again.
    std::fs::write(&pack, &original).unwrap();
    env.restore(&id, &out, &[]);
    assert_same(&src, &out);
}

#[test]
fn deleted_index_files_are_rebuilt_from_packs() {
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, random(3 << 20, 8)).unwrap();
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_dir_all(env.repo.join("index")).unwrap();
    let out = env.path("out");
    let r = env.run(&["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("repair index"), "{}", r.stderr);
    assert!(!out.exists(), "no partial restore");
    let r = env.run(&["repair", "index"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("rebuilt"), "{}", r.stdout);
    env.restore(&id, &out, &[]);
    assert_same(&src, &out);
    assert_eq!(
        env.backup(&src, &[])["new_bytes"],
        0,
        "the rebuilt index dedups"
    );
}

/// Every command and flag against bad input: (arguments, exit code, words the message must hold).
/// `{afile}`, `{adir}`, `{missing}`, `{id}` are replaced by a regular file, a directory, a path
/// that does not exist, and the id of the repository's one snapshot.
#[test]
fn bad_input_table() {
    let env = Env::new();
    let afile = env.path("afile");
    std::fs::write(&afile, random(10_000, 1)).unwrap();
    let adir = env.path("adir");
    std::fs::create_dir(&adir).unwrap();
    let missing = env.path("missing");
    let id = env.backup(&afile, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["init"], 13, "already holds an sbk repository"),
        (&["init", "--chunk-size", "3000"], 2, "power of two"),
        (&["init", "--chunk-size", "8M"], 2, "power of two"),
        (&["init", "--chunk-size", "32K"], 2, "power of two"),
        (&["init", "--chunk-size", "lots"], 2, "not a size"),
        (
            &["init", "--compression-level", "0"],
            2,
            "compression-level",
        ),
        (
            &["init", "--compression-level", "20"],
            2,
            "compression-level",
        ),
        (&["backup"], 2, "SOURCE"),
        (&["backup", "{adir}"], 1, "is a directory"),
        (&["backup", "{missing}"], 1, "No such file"),
        (&["backup", "/dev/null"], 1, "character device"),
        (&["backup", "--threads", "0", "{afile}"], 2, "threads"),
        (&["backup", "--threads", "-3", "{afile}"], 2, "threads"),
        (&["backup", "--threads", "100000", "{afile}"], 2, "threads"),
        (&["backup", "--bogus", "{afile}"], 2, "--bogus"),
        (&["restore"], 2, "SNAPSHOT"),
        (&["restore", "{id}"], 2, "TARGET"),
        (
            &["restore", "ffffffff", "{missing}"],
            11,
            "no snapshot matches",
        ),
        (&["restore", "{id}", "{adir}"], 13, "is a directory"),
        (&["restore", "{id}", "{afile}"], 13, "--force"),
        (&["restore", "{id}", "{missing}/sub/out"], 1, "No such file"),
        (&["snapshots", "extra"], 2, "extra"),
        (&["forget"], 2, "name the snapshots"),
        (&["forget", "--keep-last", "-1"], 2, "keep-last"),
        (&["forget", "--keep-daily", "many"], 2, "keep-daily"),
        (
            &["forget", "{id}", "--keep-last", "1"],
            2,
            "cannot be used with",
        ),
        (&["forget", "ffffffff"], 11, "no snapshot matches"),
        (
            &["forget", "--keep-tag", "nothing-has-this"],
            13,
            "keeps no snapshot",
        ),
        (&["forget", "--max-unused", "3"], 2, "--prune"),
        (&["prune", "--max-unused", "150"], 2, "between 0 and 100"),
        (&["prune", "--max-unused", "x"], 2, "not a percentage"),
        (
            &["verify", "--read-data", "--read-data-subset", "5%"],
            2,
            "cannot be used with",
        ),
        (&["verify", "--read-data-subset", "0%"], 2, "percentage"),
        (&["verify", "--read-data-subset", "101%"], 2, "percentage"),
        (&["verify", "--read-data-subset", "4/3"], 2, "1 <= n <= m"),
        (&["verify", "--read-data-subset", "1/0"], 2, "1 <= n <= m"),
        (&["verify", "ffffffff"], 11, "no snapshot matches"),
        (&["stats", "ffffffff"], 11, "no snapshot matches"),
        (&["repair"], 2, "index"),
        (&["frobnicate"], 2, "frobnicate"),
    ];
    for (args, code, words) in cases {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("{afile}", afile.to_str().unwrap())
                    .replace("{adir}", adir.to_str().unwrap())
                    .replace("{missing}", missing.to_str().unwrap())
                    .replace("{id}", &id)
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&env, &args, *code, words);
    }
    let r = sbk()
        .arg("--repo")
        .arg(&afile)
        .args(["init"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(13));
    assert!(String::from_utf8_lossy(&r.stderr).contains("is a file"));
}

#[test]
fn permission_denied_on_repository_and_source() {
    if let Err(why) = can_use_devices() {
        println!("SKIPPED permission_denied_on_repository_and_source: {why}");
        return;
    }
    // Root reads everything: run sbk as the unprivileged user `nobody` through setpriv.
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED permission_denied_on_repository_and_source: setpriv is not installed");
        return;
    }
    let env = Env::new();
    let src = env.path("img");
    std::fs::write(&src, random(10_000, 1)).unwrap();
    let as_nobody = |args: &[&str]| {
        let o = std::process::Command::new("setpriv")
            .env("SBK_PASSWORD", PASSWORD)
            .env("SBK_TEST_KDF", "weak")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_sbk"),
            ])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let before = env.state();
    // The repository is mode 0700, owned by root.
    let (code, err) = as_nobody(&["--repo", env.repo.to_str().unwrap(), "snapshots"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Permission denied") && err.contains("config"),
        "{err}"
    );
    // A readable repository but an unreadable source: make the repository nobody's.
    sh(&format!("chown -R 65534:65534 {}", env.repo.display()));
    sh(&format!("chmod 0600 {}", src.display()));
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (code, err) = as_nobody(&[
        "--repo",
        env.repo.to_str().unwrap(),
        "backup",
        src.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Permission denied") && err.contains("img"),
        "{err}"
    );
    sh(&format!("chown -R 0:0 {}", env.repo.display()));
    assert!(env.state() == before, "nothing changed");
}
