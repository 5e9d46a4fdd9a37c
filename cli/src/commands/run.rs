//! `sbk run JOBFILE`: a data mover's night in one command.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::Context;
use crate::exit::{Exit, ExitWith};
use crate::hooks::{hook, HookLog};
use crate::job::{Job, JobSource, Password};

/// Run a job file: for each source, its `pre` hook (take the storage snapshot), its
/// `changed_blocks` hook (print the list since the parent), the backup, and its `post` hook
/// (release the snapshot), which runs whatever happened before it; then retention and prune;
/// then copies to other repositories.
///
/// Hooks run with `sh -c` as the user running sbk, with SBK_SOURCE, SBK_SNAPSHOT, SBK_STATUS
/// (`success` or `failure`, for post), SBK_PARENT_TOKEN (the parent snapshot's storage token) in
/// their environment, never a password. A hook that fails or passes its `timeout` (its whole
/// process group is killed) fails that source with a message; the other sources go on. A job
/// file that group or others may write is refused. The whole file is checked before anything
/// runs: unknown keys and bad values name their line. Exit: 0 when every source succeeded, 3
/// when some failed, 1 when all did. sbk schedules nothing itself: see contrib/ for systemd.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The job file (TOML; see contrib/jobs/).
    #[arg(value_name = "JOBFILE")]
    job: PathBuf,

    /// Check the job file and say what would run; run nothing.
    #[arg(long)]
    dry_run: bool,

    /// Write the job's Prometheus metrics to PATH (atomically) [default: the job file's
    /// metrics_file]: per source, success and last success time; the job's errors and duration.
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,

    /// Keep a record of this run (each source's status, error, bytes and the tail of its hooks'
    /// output; the last 100 runs of the job) under DIR/runs/job/JOB/ [default: the job file's
    /// state_dir, else $SBK_STATE_DIR, else /var/lib/sbk as root, else $XDG_STATE_HOME/sbk].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Default hook time limit.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// How one source went.
struct Done {
    name: String,
    snapshot: Option<String>,
    error: Option<String>,
    /// Its backup's figures (`sbk backup --json`), when it ran.
    figures: Option<serde_json::Value>,
    /// What each hook did.
    hooks: Vec<HookLog>,
    /// When it started and ended (ns since the epoch).
    span: (i64, i64),
}

/// `sbk` itself, for one step of the job (each step is an ordinary sbk command, with its own
/// lock, messages and exit code).
fn sbk(job: &Job, repo: &str, pw: &Password) -> Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.arg("--repo").arg(repo);
    if let Some(d) = &job.cache_dir {
        c.arg("--cache-dir").arg(d);
    }
    // The steps keep their records (a prune's) beside the job's, where the console looks.
    if let Some(d) = &job.state_dir {
        c.env("SBK_STATE_DIR", d);
    }
    password_env(
        &mut c,
        pw,
        ["SBK_PASSWORD", "SBK_KEY_FILE"],
        "--password-file",
        "--password-command",
    )?;
    Ok(c)
}

/// Passes a password source on to a child sbk: a key file as `key_var` (before any password),
/// the named variable's value as `var`, or the file or command flag. Neither variable is passed
/// on from our own environment: the job file says what opens each repository.
fn password_env(
    c: &mut Command,
    pw: &Password,
    [var, key_var]: [&str; 2],
    file_flag: &str,
    command_flag: &str,
) -> Result<()> {
    c.env_remove(var).env_remove(key_var);
    if let Some(f) = &pw.key_file {
        c.env(key_var, f);
    } else if let Some(name) = &pw.password_env {
        let value = std::env::var(name).map_err(|_| {
            ExitWith(
                Exit::Usage,
                format!("the job names password_env {name:?}, which is not set"),
            )
        })?;
        c.env(var, value);
    } else if let Some(f) = &pw.password_file {
        c.arg(file_flag).arg(f);
    } else if let Some(cmd) = &pw.password_command {
        c.arg(command_flag).arg(cmd);
    }
    Ok(())
}

/// Per source of the job, the storage token its newest snapshot on the job's host recorded (the
/// parent the next incremental starts from): one listing for the whole job, as the sources'
/// names are distinct and no source's backup changes another's parent.
fn parent_tokens(job: &Job) -> Result<HashMap<String, String>, String> {
    let host = job
        .host
        .as_ref()
        .map_or_else(sbk_engine::default_host, |h| h.0.clone());
    let out = sbk(job, &job.repository, &job.password())
        .map_err(|e| e.to_string())?
        .args(["snapshots", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("listing the snapshots: {e}"))?;
    if !out.status.success() {
        return Err(format!("listing the snapshots failed ({})", out.status));
    }
    let list: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("listing the snapshots: {e}"))?;
    let mut tokens = HashMap::new();
    // Oldest first: the newest snapshot of each source has the last word.
    for s in list.as_array().into_iter().flatten() {
        if s["host"] == host.as_str() {
            if let Some(source) = s["source"].as_str() {
                match s["changed_blocks"]["token"].as_str() {
                    Some(t) => tokens.insert(source.to_owned(), t.to_owned()),
                    None => tokens.remove(source),
                };
            }
        }
    }
    Ok(tokens)
}

/// The variables that hold passwords, which hooks never see.
fn secret_vars(job: &Job) -> Vec<String> {
    let mut v = vec!["SBK_PASSWORD".to_owned(), "SBK_FROM_PASSWORD".to_owned()];
    v.extend(job.password_env.iter().cloned());
    v.extend(job.copies.iter().filter_map(|c| c.password_env.clone()));
    v
}

/// Backs up one source with its hooks.
fn source(
    ctx: &Context,
    job: &Job,
    s: &JobSource,
    tokens: &Result<HashMap<String, String>, String>,
    scratch: &Path,
) -> Done {
    let name = s.name.0.clone();
    let hide = secret_vars(job);
    let timeout = s.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0);
    let mut env: Vec<(&str, String)> = vec![("SBK_SOURCE", name.clone())];
    let mut snapshot = None;
    let mut figures = None;
    let mut hooks = Vec::new();
    let started = sbk_store::unix_now_ns();
    let result = (|| -> Result<(), String> {
        // The parent's storage token: where a changed-block list must start from.
        let parent = tokens.as_ref().map_err(Clone::clone)?.get(&name).cloned();
        if let Some(t) = &parent {
            env.push(("SBK_PARENT_TOKEN", t.clone()));
        }
        if let Some(pre) = &s.pre {
            hook("pre", pre, &env, timeout, false, &hide, &mut hooks)?;
        }
        let token = match &s.cbt_token {
            Some(cmd) => {
                let out = hook("cbt_token", cmd, &env, timeout, true, &hide, &mut hooks)?;
                Some(String::from_utf8_lossy(&out).trim().to_owned()).filter(|t| !t.is_empty())
            }
            None => None,
        };
        let mut c = sbk(job, &job.repository, &job.password()).map_err(|e| e.to_string())?;
        c.args(["backup", "--json", "--source-name", &name, &s.path]);
        if let Some(h) = &job.host {
            c.args(["--host", &h.0]);
        }
        for t in &s.tags {
            c.args(["--tag", &t.0]);
        }
        if let Some(t) = &token {
            c.args(["--cbt-token", t]);
        }
        if let Some(b) = &s.dirty_bitmap {
            c.args(["--dirty-bitmap", b]);
        }
        // A list is only as good as the state it starts from: with no parent token, nothing
        // says what it would be relative to, so the source is read whole; with one, sbk checks
        // that the parent carries it (--cbt-since).
        if let (Some(cmd), Some(since)) = (&s.changed_blocks, &parent) {
            let list = hook(
                "changed_blocks",
                cmd,
                &env,
                timeout,
                true,
                &hide,
                &mut hooks,
            )?;
            let file = scratch.join(format!("{}.list", name.replace('/', "_")));
            std::fs::write(&file, list).map_err(|e| format!("{}: {e}", file.display()))?;
            c.arg("--changed-blocks")
                .arg(&file)
                .args(["--cbt-since", since]);
        }
        ctx.out
            .info(&format!("{name}: backing up {}", s.path), false);
        let out = c
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("backup: {e}"))?;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            snapshot = v[0]["snapshot"].as_str().map(str::to_owned);
            figures = Some(v[0].clone()).filter(|f| f.is_object());
        }
        if !out.status.success() {
            return Err(format!("backup failed ({})", out.status));
        }
        Ok(())
    })();
    let status = if result.is_ok() { "success" } else { "failure" };
    let mut error = result.err();
    if let Some(post) = &s.post {
        let mut env = env.clone();
        env.push(("SBK_STATUS", status.into()));
        env.push(("SBK_SNAPSHOT", snapshot.clone().unwrap_or_default()));
        if let Err(e) = hook("post", post, &env, timeout, false, &hide, &mut hooks) {
            // A failed post fails the source: its storage snapshot may still be held.
            error = Some(match error {
                Some(first) => format!("{first}; then {e}"),
                None => e,
            });
        }
    }
    Done {
        name,
        snapshot,
        error,
        figures,
        hooks,
        span: (started, sbk_store::unix_now_ns()),
    }
}

/// The record of a run (see records.rs): the job, each source with its figures and hooks.
#[allow(clippy::too_many_arguments)]
fn record(
    job_file: &Path,
    job: &Job,
    done: &[Done],
    span: (i64, i64),
    after_ok: bool,
    stopped: bool,
    exit_code: u8,
    error: Option<&anyhow::Error>,
) -> serde_json::Value {
    use sbk_records::time;
    let sources: Vec<serde_json::Value> = done
        .iter()
        .map(|d| {
            let f = d.figures.as_ref();
            let figure = |k: &str| f.and_then(|f| f.get(k)).cloned();
            serde_json::json!({
                "name": d.name,
                "status": if d.error.is_none() { "success" } else { "failure" },
                "error": d.error,
                "snapshot": d.snapshot,
                "started": time(d.span.0),
                "ended": time(d.span.1),
                "size": figure("size"),
                "bytes_read": figure("bytes_read"),
                "new_bytes": figure("new_bytes"),
                "stored_bytes": figure("new_bytes_stored"),
                "incremental": figure("changed_blocks").map(|c| !c.is_null()),
                "hooks": d.hooks.iter().map(|h| serde_json::json!({
                    "hook": h.hook,
                    "status": h.status,
                    "output_tail": h.tail,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let failed = done.iter().filter(|d| d.error.is_some()).count();
    serde_json::json!({
        "kind": "run",
        "job": job_name(job_file),
        "job_file": std::fs::canonicalize(job_file).unwrap_or_else(|_| job_file.to_owned()),
        "repository": job.repository,
        "host": job.host.as_ref().map(|h| h.0.clone()),
        "started": time(span.0),
        "ended": time(span.1),
        "status": match (stopped || exit_code >= 128, failed) {
            (true, _) => "stopped",
            (false, 0) if after_ok => "success",
            (false, n) if n == done.len() && n > 0 => "failure",
            _ => "partial",
        },
        "exit_code": exit_code,
        "error": error.map(|e| format!("{e:#}")),
        "sources": sources,
        "retention_and_copies_ok": after_ok,
    })
}

/// A job's name: its file's stem.
pub fn job_name(job_file: &Path) -> String {
    job_file
        .file_stem()
        .map_or("job".into(), |s| s.to_string_lossy().into_owned())
}

/// What a dry run prints: each source with its hooks, then retention and copies.
fn print_plan(ctx: &Context, job: &Job) {
    for s in &job.sources {
        ctx.out.info(
            &format!(
                "source {}: {}{}{}{}",
                s.name.0,
                s.path,
                s.pre
                    .as_ref()
                    .map_or(String::new(), |h| format!(", pre: {h}")),
                s.changed_blocks
                    .as_ref()
                    .map_or(String::new(), |h| format!(", changed blocks: {h}")),
                s.post
                    .as_ref()
                    .map_or(String::new(), |h| format!(", post: {h}")),
            ),
            false,
        );
    }
    if let Some(r) = &job.retention {
        ctx.out.info(
            &format!(
                "then: sbk forget {}{}",
                r.args().join(" "),
                if r.prune { " --prune" } else { "" }
            ),
            false,
        );
    }
    for c in &job.copies {
        ctx.out
            .info(&format!("then: sbk copy to {}", c.repository), false);
    }
}

/// The job's retention, source by source (`sbk forget`, and `--prune` when asked); true when
/// every run succeeded.
fn retention(job: &Job) -> Result<bool> {
    let mut ok = true;
    let Some(r) = &job.retention else {
        return Ok(ok);
    };
    for s in &job.sources {
        let mut c = sbk(job, &job.repository, &job.password())?;
        c.arg("forget").args(r.args()).args(["--source", &s.name.0]);
        if let Some(h) = &job.host {
            c.args(["--host", &h.0]);
        }
        let st = c.stdout(Stdio::null()).status()?;
        if !st.success() {
            eprintln!("sbk: error: retention of {} failed ({st})", s.name.0);
            ok = false;
        }
    }
    // One prune for the whole job, after every source's forget: a prune reads the whole index
    // and every snapshot's trees, so one per source would cost a job of a hundred sources a
    // hundred of them a night.
    if r.prune {
        let mut c = sbk(job, &job.repository, &job.password())?;
        let st = c.arg("prune").stdout(Stdio::null()).status()?;
        if !st.success() {
            eprintln!("sbk: error: prune after retention failed ({st})");
            ok = false;
        }
    }
    Ok(ok)
}

/// The job's copies of the snapshots `done` wrote (`sbk copy`); true when every copy succeeded.
fn copies(job: &Job, done: &[Done]) -> Result<bool> {
    let mut ok = true;
    for target in &job.copies {
        let mut c = sbk(job, &target.repository, &target.password())?;
        password_env(
            &mut c,
            &job.password(),
            ["SBK_FROM_PASSWORD", "SBK_FROM_KEY_FILE"],
            "--from-password-file",
            "--from-password-command",
        )?;
        c.args(["copy", "--from-repo", &job.repository]);
        for d in done.iter().filter(|d| d.error.is_none()) {
            if let Some(s) = &d.snapshot {
                c.arg(s);
            }
        }
        let st = c.stdout(Stdio::null()).status()?;
        if !st.success() {
            eprintln!("sbk: error: copy to {} failed ({st})", target.repository);
            ok = false;
        }
    }
    Ok(ok)
}

/// The job's metrics file: each source's success, the job's errors, duration and the success of
/// what came after.
fn write_job_metrics(
    file: &std::path::Path,
    job_file: &std::path::Path,
    job: &Job,
    done: &[Done],
    started: Instant,
    after_ok: bool,
) -> Result<()> {
    use crate::metrics::{labels, now, Metrics};
    let jobname = job_name(job_file);
    let mut m = Metrics::default();
    // Every source of the job keeps its last success, also those a stopped run never reached.
    let all: Vec<String> = job
        .sources
        .iter()
        .map(|s| labels(&[("job", &jobname), ("source", &s.name.0)]))
        .collect();
    for d in done {
        let l = labels(&[("job", &jobname), ("source", &d.name)]);
        for (name, help, key) in [
            (
                "sbk_job_source_read_bytes",
                "Bytes the source's last backup read.",
                "bytes_read",
            ),
            (
                "sbk_job_source_new_bytes",
                "Bytes of new data the source's last backup found (before compression).",
                "new_bytes",
            ),
            (
                "sbk_job_source_stored_bytes",
                "Bytes the source's last backup added to the repository.",
                "new_bytes_stored",
            ),
        ] {
            if let Some(v) = d.figures.as_ref().and_then(|f| f[key].as_f64()) {
                m.gauge(name, help, &l, v);
            }
        }
        m.gauge(
            "sbk_job_source_success",
            "1 when the source's last run succeeded (hooks and backup), else 0.",
            &l,
            f64::from(u8::from(d.error.is_none())),
        );
        if d.error.is_none() {
            m.gauge(
                "sbk_job_source_last_success_timestamp_seconds",
                "When the source last succeeded (Unix time).",
                &l,
                now(),
            );
        }
    }
    let lj = labels(&[("job", &jobname)]);
    m.gauge(
        "sbk_job_errors",
        "Sources that failed in the last run of the job (a hook or the backup).",
        &lj,
        done.iter().filter(|d| d.error.is_some()).count() as f64,
    );
    m.gauge(
        "sbk_job_duration_seconds",
        "Wall time of the last run of the job.",
        &lj,
        started.elapsed().as_secs_f64(),
    );
    m.gauge(
        "sbk_job_after_success",
        "1 when retention and copies of the last run succeeded.",
        &lj,
        f64::from(u8::from(after_ok)),
    );
    m.carry_over(
        file,
        "sbk_job_source_last_success_timestamp_seconds",
        "When the source last succeeded (Unix time).",
        &all,
    );
    m.write(file)
        .map_err(|e| anyhow::anyhow!("{}: cannot write the metrics file: {e}", file.display()))?;
    Ok(())
}

/// Runs `sbk run`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let mut job = crate::job::load(&args.job).map_err(|e| ExitWith(Exit::Usage, e))?;
    // --state-dir before the job file's: the run's record and its steps' (the prune of
    // `forget --prune`) go there.
    if let Some(d) = &args.state_dir {
        job.state_dir = Some(d.clone());
    }
    if args.dry_run {
        print_plan(ctx, &job);
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    let started_ns = sbk_store::unix_now_ns();
    let scratch = tempfile::tempdir()?;
    // A stop (SIGINT, SIGTERM) ends the job after the source in progress (whose post runs):
    // no further source, retention or copy starts.
    let mut done: Vec<Done> = Vec::new();
    let tokens = parent_tokens(&job);
    for s in &job.sources {
        if sbk_engine::stop_requested() {
            break;
        }
        done.push(source(ctx, &job, s, &tokens, scratch.path()));
    }
    let stopped = sbk_engine::stop_requested();
    for d in &done {
        match &d.error {
            None => ctx.out.info(
                &format!(
                    "{}: backed up as {}",
                    d.name,
                    d.snapshot.as_deref().map_or("?", |s| &s[..8.min(s.len())])
                ),
                false,
            ),
            Some(e) => eprintln!("sbk: error: source {}: {e}", d.name),
        }
    }
    // What comes after the backups may fail (a copy's password missing); the metrics and the
    // record are written first either way, then the error is the run's.
    let after = if stopped {
        Ok(false)
    } else {
        retention(&job).and_then(|r| Ok(r & copies(&job, &done)?))
    };
    let after_ok = *after.as_ref().unwrap_or(&false);
    let metrics = match args.metrics_file.as_ref().or(job.metrics_file.as_ref()) {
        Some(file) => write_job_metrics(file, &args.job, &job, &done, started, after_ok),
        None => Ok(()),
    };
    let failed = done.iter().filter(|d| d.error.is_some()).count();
    ctx.out.json(
        &serde_json::json!({
            "sources": done.iter().map(|d| serde_json::json!({"source": d.name, "snapshot": d.snapshot, "error": d.error})).collect::<Vec<_>>(),
            "retention_and_copies_ok": after_ok,
        }),
        false,
    );
    let exit = match failed {
        0 if after_ok => Exit::Ok,
        0 => Exit::Partial,
        n if n == done.len() => Exit::Error,
        _ => Exit::Partial,
    };
    // The code sbk will exit with: a stop's, else the first error's, else the sources'.
    let code = match (&after, &metrics) {
        (Err(e), _) | (Ok(_), Err(e)) => crate::exit::classify(e) as u8,
        _ => exit as u8,
    };
    // As main says it: a run that did not finish cleanly after a stop exits 128 + signal.
    let code = match crate::signals::received() {
        Some(sig) if code != 0 => 128 + sig as u8,
        _ => code,
    };
    if let Some(dir) = sbk_records::state_dir(job.state_dir.as_deref()) {
        let span = (started_ns, sbk_store::unix_now_ns());
        let error = after.as_ref().err().or(metrics.as_ref().err());
        let r = record(&args.job, &job, &done, span, after_ok, stopped, code, error);
        // The record is for the operator: failing to keep it fails no backup.
        if let Err(e) = sbk_records::write(&dir, "job", &job_name(&args.job), started_ns, &r) {
            ctx.out.notice(&format!(
                "cannot keep the record of this run in {}: {e}",
                dir.display()
            ));
        }
    }
    after?;
    metrics?;
    Ok(exit.into())
}
