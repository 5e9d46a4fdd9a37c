//! `sbk console`: the web console over the repositories of job files and `--repo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sbk_console::{Config, Console, ConsoleError, JobSpec, Listen, Opener, RepoSpec, TlsFiles};
use sbk_store::{CacheLocation, LockKind};
use signal_hook::consts::{SIGINT, SIGTERM};

use super::Context;
use crate::exit::{Exit, ExitWith};
use crate::output::Output;
use crate::password::PasswordSource;

/// Serve a web console: what was backed up, what failed, how each repository grows, files out
/// of snapshots, and instant recovery.
///
/// It shows the repositories of the job files (opened with their credentials, their runs'
/// records read from their state directories) and --repo. Pages: an overview per repository
/// (sizes, ratios, counts, encryption, Object Lock, last verify, growth charts), every source
/// with its newest snapshot and last run (stale and failed ones stand out), each source's
/// snapshots (what forgetting each would free, its changed-block record, a diff against its
/// parent), files browsed and downloaded out of a snapshot, NBD exports started and stopped
/// (with --allow-exports), and the history of jobs and verifies.
///
/// It never writes a repository's data; it holds a pin lock on each, which conflicts with
/// nothing, and pins a snapshot while it is exported, browsed or downloaded from, as `sbk
/// serve` does.
///
/// Security: it listens on loopback (or a Unix socket, made mode 0600) unless --allow-remote is
/// given, which needs TLS. On TCP every request needs the token of --token-file (mode 0600):
/// through the login form (an HttpOnly, SameSite=Strict session cookie) or as `Authorization:
/// Bearer TOKEN`; actions are POSTs with a CSRF token. SIGINT or SIGTERM stop it.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job files (as `sbk run` takes them): their repositories and the records of their runs.
    #[arg(value_name = "JOBFILE")]
    jobs: Vec<PathBuf>,

    /// Address to listen on.
    #[arg(
        long,
        default_value = "127.0.0.1:8080",
        value_name = "ADDR:PORT",
        conflicts_with = "socket"
    )]
    listen: SocketAddr,

    /// Listen on a Unix socket at PATH instead (mode 0600; for a reverse proxy on this host).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// The token that opens the console, the first line of FILE (at least 16 characters; the
    /// file readable by its owner only). Required on TCP.
    #[arg(long, value_name = "FILE", env = "SBK_CONSOLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// Allow --listen on an address other than loopback; needs --tls-cert and --tls-key.
    #[arg(long)]
    allow_remote: bool,

    /// TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Let the console start NBD exports of snapshots (read-only, on loopback ports).
    #[arg(long)]
    allow_exports: bool,

    /// A source whose newest snapshot is older than this stands out.
    #[arg(long, default_value = "26h", value_name = "DURATION", value_parser = humantime::parse_duration)]
    stale: Duration,

    /// Where the verify and prune records of --repo are [default: $SBK_STATE_DIR, else
    /// /var/lib/sbk as root, else $XDG_STATE_HOME/sbk].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// How the console opens `location` with `password` and the index cache in `cache`: a pin lock
/// (conflicts with nothing), then the index.
fn opener(
    location: PathBuf,
    password: PasswordSource,
    cache: CacheLocation,
    threads: usize,
) -> Opener {
    Arc::new(move || {
        let ctx = Context {
            repo: Some(location.clone()),
            threads,
            out: Output::new(false, true),
            cache: cache.clone(),
            password: password.clone(),
            as_of: None,
        };
        ctx.open_locked(LockKind::Pin, "console", true)
            .map_err(|e| format!("{e:#}"))
    })
}

/// Runs `sbk console`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let default_state = sbk_records::state_dir(args.state_dir.as_deref());
    let mut repos: Vec<RepoSpec> = Vec::new();
    let mut jobs = Vec::new();
    for file in &args.jobs {
        let job = crate::job::load(file).map_err(|e| ExitWith(Exit::Usage, e))?;
        let state_dir = sbk_records::state_dir(job.state_dir.as_deref()).ok_or_else(|| {
            ExitWith(
                Exit::Usage,
                format!(
                    "{}: no state directory (set state_dir, or SBK_STATE_DIR)",
                    file.display()
                ),
            )
        })?;
        let pw = job.password();
        let password = PasswordSource {
            file: pw.password_file,
            command: pw.password_command,
            // As `sbk run`: the job file says what opens the repository, never our own
            // SBK_PASSWORD.
            env: Some(pw.password_env.unwrap_or_default()),
            key_file: pw.key_file,
        };
        match repos
            .iter_mut()
            .find(|r| same_place(&r.location, &job.repository))
        {
            Some(r) if !r.state_dirs.contains(&state_dir) => r.state_dirs.push(state_dir.clone()),
            Some(_) => {}
            None => repos.push(RepoSpec {
                location: job.repository.clone(),
                open: opener(
                    PathBuf::from(&job.repository),
                    password,
                    job.cache_dir
                        .clone()
                        .map_or_else(|| ctx.cache.clone(), CacheLocation::Dir),
                    ctx.threads,
                ),
                state_dirs: vec![state_dir.clone()],
            }),
        }
        jobs.push(JobSpec {
            name: super::run::job_name(file),
            file: std::fs::canonicalize(file).unwrap_or_else(|_| file.clone()),
            repository: job.repository.clone(),
            state_dir,
            sources: job.sources.iter().map(|s| s.name.0.clone()).collect(),
        });
    }
    if let Some(repo) = &ctx.repo {
        let location = repo.to_string_lossy().into_owned();
        if !repos.iter().any(|r| same_place(&r.location, &location)) {
            repos.push(RepoSpec {
                location,
                open: opener(
                    repo.clone(),
                    ctx.password.clone(),
                    ctx.cache.clone(),
                    ctx.threads,
                ),
                state_dirs: Vec::new(),
            });
        }
    }
    // Verifies and prunes run by hand keep their records in the default state directory.
    for r in &mut repos {
        if let Some(d) = default_state.as_ref().filter(|d| !r.state_dirs.contains(d)) {
            r.state_dirs.push(d.clone());
        }
    }
    if repos.is_empty() {
        return Err(ExitWith(
            Exit::NoRepository,
            "nothing to show: give job files, or --repo (or SBK_REPO)".into(),
        )
        .into());
    }
    let token = args
        .token_file
        .as_deref()
        .map(sbk_console::read_token)
        .transpose()
        .map_err(console_error)?;
    let config = Config {
        listen: match &args.socket {
            Some(p) => Listen::Unix(p.clone()),
            None => Listen::Tcp(args.listen),
        },
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        token,
        allow_remote: args.allow_remote,
        allow_exports: args.allow_exports,
        stale_after: args.stale,
        repos,
        jobs,
    };
    let console = Console::bind(config).map_err(console_error)?;
    let stopper = console.stopper();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let waiter = std::thread::spawn(move || {
        let got = signals.forever().next();
        stopper.stop();
        got
    });
    ctx.out.info(
        &format!("console at {} (SIGINT or SIGTERM stops)", console.place()),
        false,
    );
    ctx.out
        .json(&serde_json::json!({ "listening": console.place() }), false);
    let served = console.run();
    handle.close();
    let _ = waiter.join();
    served.map_err(console_error)?;
    Ok(ExitCode::SUCCESS)
}

/// Whether two locations name one repository (`/srv/r` and `/srv/r/`), so that it is opened,
/// and locked, once.
fn same_place(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

fn console_error(e: ConsoleError) -> anyhow::Error {
    let code = match &e {
        ConsoleError::Usage(_) => Exit::Usage,
        ConsoleError::Exposed(_) => Exit::WrongPassword,
        ConsoleError::Io(_) => Exit::Error,
    };
    ExitWith(code, e.to_string()).into()
}
