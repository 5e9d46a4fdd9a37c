//! The hooks of a job (`pre`, `changed_blocks`, `cbt_token`, `post`): each runs with `sh -c` in
//! a process group of its own, killed whole past its time limit, its output forwarded to sbk's
//! stderr as it comes and its tail kept for the run's record.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one hook did, for the run record.
pub(crate) struct HookLog {
    /// Which hook (`pre`, `post`, …).
    pub hook: &'static str,
    /// `success`, or why not.
    pub status: String,
    /// The end of what it printed (stderr, and stdout unless that is its result).
    pub tail: String,
}

/// Runs a hook with `sh -c` in a process group of its own, killed whole past `timeout`.
/// Returns its stdout when it succeeded (with `capture`). What it prints otherwise (stderr,
/// and stdout unless captured) goes to sbk's stderr as it comes, and its tail into `log`.
pub(crate) fn hook(
    what: &'static str,
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
    capture: bool,
    hide: &[String],
    log: &mut Vec<HookLog>,
) -> Result<Vec<u8>, String> {
    let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = run_hook(what, cmd, env, timeout, capture, hide, &tail);
    let printed = tail.lock().unwrap_or_else(|e| e.into_inner()).clone();
    log.push(HookLog {
        hook: what,
        status: match &r {
            Ok(_) => "success".into(),
            Err(e) => e.clone(),
        },
        tail: sbk_records::tail(&printed),
    });
    r
}

/// Forwards what a hook prints to sbk's stderr as it comes, keeping its last bytes in `tail`
/// (never all of it: a hook may print for an hour).
fn forward(
    mut from: impl std::io::Read + Send + 'static,
    tail: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = from.read(&mut chunk) {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), &chunk[..n]);
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            t.extend_from_slice(&chunk[..n]);
            if t.len() > 2 * sbk_records::TAIL_BYTES {
                let cut = t.len() - sbk_records::TAIL_BYTES;
                t.drain(..cut);
            }
        }
    })
}

/// [`hook`]'s work.
fn run_hook(
    what: &str,
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
    capture: bool,
    hide: &[String],
    tail: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> Result<Vec<u8>, String> {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd);
    for var in hide {
        c.env_remove(var);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let out_file = tempfile::tempfile().map_err(|e| format!("{what}: {e}"))?;
    c.stderr(Stdio::piped());
    if capture {
        c.stdout(out_file.try_clone().map_err(|e| format!("{what}: {e}"))?);
    } else {
        c.stdout(Stdio::piped());
    }
    let mut child = c
        .spawn()
        .map_err(|e| format!("{what} hook: cannot run sh: {e}"))?;
    let mut readers = Vec::new();
    if let Some(e) = child.stderr.take() {
        readers.push(forward(e, tail.clone()));
    }
    if let Some(o) = child.stdout.take() {
        readers.push(forward(o, tail.clone()));
    }
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if started.elapsed() > timeout => {
                // The hook and everything it started: the group, which it leads.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                break Err(format!(
                    "{what} hook timed out after {} s (killed): {cmd}",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("{what} hook: {e}")),
        }
    };
    // What it printed last, unless something it left running keeps the pipe open: that is
    // not waited for beyond a moment (its reader goes on forwarding, detached).
    let deadline = Instant::now() + Duration::from_secs(2);
    while readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = status?;
    if !status.success() {
        return Err(format!("{what} hook failed ({status}): {cmd}"));
    }
    if !capture {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut f = out_file;
    std::io::Seek::rewind(&mut f).map_err(|e| format!("{what}: {e}"))?;
    std::io::Read::read_to_end(&mut f, &mut out).map_err(|e| format!("{what}: {e}"))?;
    Ok(out)
}
