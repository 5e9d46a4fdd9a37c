//! `sbk run`: job files with hooks around each source (an LVM-free stand-in: `pre` copies an
//! image, `post` deletes it, `changed_blocks` prints a list), retention, copies and metrics.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

/// Writes a job file (mode 0600) and returns its path.
fn job(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Runs `sbk run JOB` with the job's password variables.
fn run(env: &Env, job: &Path, extra: &[&str]) -> Run {
    Run::from_output(
        sbk()
            .env("SBK_CACHE_DIR", env.cache())
            .env("JOB_PASS", PASSWORD)
            .arg("run")
            .args(extra)
            .arg(job)
            .output()
            .unwrap(),
    )
}

fn snapshots(env: &Env) -> Vec<serde_json::Value> {
    env.run(&["snapshots", "--json"])
        .json()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_night_then_an_incremental_with_retention_copy_and_metrics() {
    let a = Env::new();
    let dir = a.dir.path();
    let bdir = tempfile::tempdir().unwrap();
    let b = Env::init_at(
        bdir,
        dir.join("repo-b"),
        vec![("SBK_PASSWORD".into(), "another password".into())],
        &[],
    );
    // The copy's destination opens with a key file, as an automated mover's would (an
    // unencrypted one needs nothing).
    let b_opens = if encrypted() {
        let bkey = dir.join("b.key");
        let r = b.run(&["key", "add", "--new-key-file", bkey.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        format!("key_file = \"{}\"", bkey.display())
    } else {
        String::new()
    };
    let base = dir.join("base.img");
    let mut data = random(20 << 20, 1);
    std::fs::write(&base, &data).unwrap();
    std::fs::write(dir.join("list.txt"), "# nothing changed\n").unwrap();
    let d = dir.display();
    // As root, the "storage snapshot" is a read-only loop device over a copy of the image, as an
    // LVM or RBD snapshot would be a block device; otherwise the copy itself.
    let (path, take, release) = if can_use_devices().is_ok() {
        (
            format!("{d}/dev"),
            format!("cp {d}/base.img {d}/snap.img && ln -sfn $(losetup -f --show -r {d}/snap.img) {d}/dev"),
            format!("losetup -d $(readlink {d}/dev); rm -f {d}/dev {d}/snap.img"),
        )
    } else {
        (
            format!("{d}/snap.img"),
            format!("cp {d}/base.img {d}/snap.img"),
            format!("rm -f {d}/snap.img"),
        )
    };
    let text = format!(
        r#"repository = "{repo}"
password_env = "JOB_PASS"
metrics_file = "{d}/job.prom"

[[source]]
name = "disk"
path = "{path}"
pre = "{take}; (env | grep -e JOB_PASS -e SBK_PASSWORD || true) > {d}/secrets.txt"
changed_blocks = "touch {d}/list.used; cat {d}/list.txt"
cbt_token = "echo night-$(date +%s%N)"
post = "echo $SBK_STATUS $SBK_SNAPSHOT $SBK_SOURCE $SBK_PARENT_TOKEN >> {d}/post.log; {release}"
timeout = "60s"
tags = ["nightly"]

[retention]
keep_last = 1
prune = true

[[copy]]
repository = "{brepo}"
{b_opens}
"#,
        repo = a.repo.display(),
        brepo = b.repo.display()
    );
    let job = job(dir, "night.toml", &text);
    let r = run(&a, &job, &["--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("source disk"), "{}", r.stdout);
    assert!(snapshots(&a).is_empty(), "a dry run runs nothing");

    let r = run(&a, &job, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = snapshots(&a);
    assert_eq!(first.len(), 1);
    assert!(!dir.join("snap.img").exists(), "post ran");
    assert_eq!(
        std::fs::read_to_string(dir.join("secrets.txt")).unwrap(),
        "",
        "hooks see no password"
    );
    // No parent yet: the list is not asked for, the source is read whole.
    assert!(!dir.join("list.used").exists());
    let token = first[0]["changed_blocks"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(token.starts_with("night-"), "{}", first[0]);
    let log = std::fs::read_to_string(dir.join("post.log")).unwrap();
    assert!(
        log.starts_with(&format!(
            "success {} disk",
            first[0]["id"].as_str().unwrap()
        )),
        "{log}"
    );
    assert_eq!(snapshots(&b).len(), 1, "copied");

    // The next night: a small change, listed by the changed_blocks hook.
    data[5 << 20..(5 << 20) + 100].fill(0x5a);
    std::fs::write(&base, &data).unwrap();
    std::fs::write(dir.join("list.txt"), format!("{} 100\n", 5 << 20)).unwrap();
    let r = run(&a, &job, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let now = snapshots(&a);
    assert_eq!(now.len(), 1, "retention kept the last one");
    assert_eq!(now[0]["changed_blocks"]["incremental"], true, "{}", now[0]);
    assert_eq!(
        now[0]["changed_blocks"]["since"],
        token.as_str(),
        "checked against its parent"
    );
    let log = std::fs::read_to_string(dir.join("post.log")).unwrap();
    assert!(
        log.lines().nth(1).unwrap().ends_with(&token),
        "post saw the parent's token: {log}"
    );
    let restored = dir.join("restored");
    a.restore("latest", &restored, &[]);
    assert_same(&base, &restored);
    assert_eq!(snapshots(&b).len(), 2, "each night copied");
    let text = std::fs::read_to_string(dir.join("job.prom")).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a valid metrics file");
    let ok = scrape
        .samples
        .iter()
        .find(|s| s.metric == "sbk_job_source_success")
        .unwrap();
    assert_eq!(format!("{:?}", ok.value), "Gauge(1.0)");
    let errors = scrape
        .samples
        .iter()
        .find(|s| s.metric == "sbk_job_errors")
        .unwrap();
    assert_eq!(format!("{:?}", errors.value), "Gauge(0.0)");
}

#[test]
fn failing_hooks_fail_their_source_and_the_others_go_on() {
    let env = Env::new();
    let dir = env.dir.path();
    let img = dir.join("img");
    std::fs::write(&img, random(4 << 20, 2)).unwrap();
    let d = dir.display();
    let repo = env.repo.display();
    let source = |name: &str, extra: &str| {
        format!("[[source]]\nname = \"{name}\"\npath = \"{d}/img\"\ntimeout = \"2s\"\n{extra}\n")
    };
    // One good source, one whose pre fails (its post still runs, told so).
    let text = format!(
        "repository = \"{repo}\"\npassword_env = \"JOB_PASS\"\n{}{}",
        source("good", ""),
        source(
            "bad",
            &format!("pre = \"exit 3\"\npost = \"echo $SBK_STATUS > {d}/bad.status\"")
        ),
    );
    let prom = dir.join("mixed.prom");
    let r = run(
        &env,
        &job(dir, "mixed.toml", &text),
        &["--metrics-file", prom.to_str().unwrap()],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert!(
        metrics.contains("sbk_job_errors{job=\"mixed\"} 1"),
        "{metrics}"
    );
    assert!(r.stderr.contains("pre hook failed"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(dir.join("bad.status"))
            .unwrap()
            .trim(),
        "failure"
    );
    assert_eq!(snapshots(&env).len(), 1);

    // A hook past its timeout: killed with everything it started; the only source failed.
    let text = format!(
        "repository = \"{repo}\"\npassword_env = \"JOB_PASS\"\n{}",
        source(
            "slow",
            &format!("pre = \"echo $$ > {d}/slow.pid; sleep 60\"")
        ),
    );
    let started = Instant::now();
    let r = run(&env, &job(dir, "slow.toml", &text), &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("timed out"), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(20));
    let pid = std::fs::read_to_string(dir.join("slow.pid")).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the hook's shell was killed"
    );

    // A post that fails fails its source, though the backup was made.
    let text = format!(
        "repository = \"{repo}\"\npassword_env = \"JOB_PASS\"\n{}",
        source("post", "post = \"exit 1\""),
    );
    let r = run(&env, &job(dir, "post.toml", &text), &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("post hook failed"), "{}", r.stderr);
    assert_eq!(snapshots(&env).len(), 2);
}

#[test]
fn a_bad_job_file_runs_nothing() {
    let env = Env::new();
    let dir = env.dir.path();
    let repo = env.repo.display();
    let good =
        format!("repository = \"{repo}\"\n[[source]]\nname = \"x\"\npath = \"/nonexistent\"\n");
    let r = run(
        &env,
        &job(
            dir,
            "typo.toml",
            &format!("{good}pree = \"touch {}/ran\"\n", dir.display()),
        ),
        &[],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("line 5") && r.stderr.contains("pree"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("ran").exists());
    let r = run(
        &env,
        &job(dir, "time.toml", &format!("{good}timeout = \"a while\"\n")),
        &[],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("line 5"), "{}", r.stderr);
    // Writable by others: its hooks could be anyone's.
    let p = job(dir, "open.toml", &good);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = run(&env, &p, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("chmod go-w"), "{}", r.stderr);
    let r = run(
        &env,
        &job(dir, "empty.toml", &format!("repository = \"{repo}\"\n")),
        &[],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// The run records (oldest first) under `state/runs/KIND/`, in the one folder whose name ends
/// with `which` (a job's name, the end of a repository's path).
fn records(state: &Path, kind: &str, which: &str) -> Vec<serde_json::Value> {
    let kinds = state.join("runs").join(kind);
    let folders: Vec<PathBuf> = std::fs::read_dir(&kinds)
        .unwrap_or_else(|e| panic!("{}: {e}", kinds.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(which))
        .collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    let dir = &folders[0];
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

#[test]
fn each_run_and_verify_leaves_a_record_with_sources_errors_and_hook_output() {
    let env = Env::new();
    let dir = env.dir.path();
    let state = dir.join("state");
    std::fs::write(dir.join("good.img"), random(2 << 20, 4)).unwrap();
    let text = format!(
        r#"repository = "{repo}"
password_env = "JOB_PASS"
state_dir = "{state}"

[[source]]
name = "good"
path = "{d}/good.img"
pre = "echo taking the snapshot of good"

[[source]]
name = "bad"
path = "{d}/bad.img"
pre = "echo 'lvcreate: Insufficient free space in volume group' >&2; exit 5"
post = "echo released"

[retention]
keep_last = 5
prune = true
"#,
        repo = env.repo.display(),
        state = state.display(),
        d = dir.display()
    );
    let job = job(dir, "night.toml", &text);
    let r = run(&env, &job, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    // The hooks' output still reaches the log.
    assert!(r.stderr.contains("Insufficient free space"), "{}", r.stderr);
    let recs = records(&state, "job", "night");
    assert_eq!(recs.len(), 1);
    let rec = &recs[0];
    assert_eq!(rec["kind"], "run");
    assert_eq!(rec["status"], "partial");
    assert_eq!(rec["exit_code"], 3);
    assert!(rec["started"].as_str().unwrap() <= rec["ended"].as_str().unwrap());
    let sources = rec["sources"].as_array().unwrap();
    let good = &sources[0];
    assert_eq!(good["name"], "good");
    assert_eq!(good["status"], "success");
    assert_eq!(good["bytes_read"], 2 << 20);
    assert!(good["snapshot"].as_str().unwrap().len() == 64, "{good}");
    assert_eq!(good["hooks"][0]["hook"], "pre");
    assert_eq!(
        good["hooks"][0]["output_tail"],
        "taking the snapshot of good\n"
    );
    let bad = &sources[1];
    assert_eq!(bad["status"], "failure");
    assert!(
        bad["error"].as_str().unwrap().contains("pre hook failed"),
        "{bad}"
    );
    assert!(bad["hooks"][0]["output_tail"]
        .as_str()
        .unwrap()
        .contains("Insufficient free space"));
    assert_eq!(bad["hooks"][1]["hook"], "post");
    assert_eq!(bad["hooks"][1]["status"], "success");
    // A second run adds a record; no password appears in any.
    run(&env, &job, &[]);
    let recs = records(&state, "job", "night");
    assert_eq!(recs.len(), 2);
    let all = serde_json::Value::Array(recs).to_string();
    assert!(!all.contains(PASSWORD));

    // verify keeps its own, by --state-dir.
    let r = env.run(&["verify", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = records(&state, "verify", "_repo");
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["status"], "success");
    assert_eq!(v[0]["problems"].as_array().unwrap().len(), 0);
    let packs: u64 = env
        .packs()
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert_eq!(
        v[0]["stored_bytes"], packs,
        "verify measures the stored size"
    );
    // The job's retention pruned once per run (after forgetting per source), and kept the
    // record in the job's state directory, where the console looks for the stored size.
    let p = records(&state, "prune", "_repo");
    assert_eq!(p.len(), 2, "one prune per run: {p:?}");
    let last = &p[1];
    assert_eq!(last["status"], "success");
    assert_eq!(last["stored_bytes"], packs, "{last}");
    let r = sbk()
        .args(["--repo", dir.join("nothing").to_str().unwrap(), "verify"])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--metrics-file", dir.join("verify.prom").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(10));
    // A verify that could not run says so to Prometheus too (SbkVerifyFailed).
    let prom = std::fs::read_to_string(dir.join("verify.prom")).unwrap();
    assert!(
        prom.lines()
            .any(|l| l.starts_with("sbk_verify_success{") && l.ends_with(" 0")),
        "{prom}"
    );
    let v = records(&state, "verify", "_nothing");
    assert_eq!(v[0]["status"], "failure");
    assert_eq!(v[0]["exit_code"], 10);
    assert!(v[0]["error"]
        .as_str()
        .unwrap()
        .contains("not an sbk repository"));
}
