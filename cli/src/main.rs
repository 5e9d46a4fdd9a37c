//! `sbk`: deduplicating backup of block devices and disk images.
//!
//! The binary is glue: it parses arguments (clap), renders progress and results, and maps errors
//! to the documented exit codes (see `exit.rs` and the README).

mod commands;
mod exit;
mod hooks;
mod job;
mod metrics;
mod names;
mod output;
mod password;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sbk_store::CacheLocation;

/// sbk: deduplicating disk-to-disk backup of block devices and disk images.
///
/// sbk reads a block device or disk-image file through O_DIRECT (holes and zero runs skipped),
/// cuts it into content-defined chunks, and stores each distinct chunk once, compressed, in a
/// repository directory. Start with `sbk init --repo DIR`, then `sbk backup --repo DIR /dev/sdX`.
#[derive(Parser, Debug)]
#[command(name = "sbk", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Repository: a directory, or s3://BUCKET/PREFIX on S3-compatible storage (endpoint,
    /// credentials and region from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SESSION_TOKEN, AWS_REGION).
    #[arg(
        long,
        short = 'r',
        global = true,
        env = "SBK_REPO",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    repo: Option<PathBuf>,

    /// Print results as JSON on stdout (for scripts); no progress bars.
    #[arg(long, global = true)]
    json: bool,

    /// Print nothing but errors.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,

    /// Directory of the local index cache, one folder per repository inside it [default:
    /// $XDG_CACHE_HOME/sbk, else ~/.cache/sbk]. The cache is never needed for correctness: one
    /// that is missing, stale or damaged is rebuilt from the repository.
    #[arg(long, global = true, env = "SBK_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    /// Keep no cache between runs: build the index cache in a temporary directory removed at
    /// exit (reads every index file of the repository on each run). Overrides --cache-dir.
    #[arg(long, global = true)]
    no_cache: bool,

    /// Read the repository password from the first line of FILE (SBK_PASSWORD, if set, comes
    /// first; on a terminal sbk asks when none is given).
    #[arg(
        long,
        global = true,
        env = "SBK_PASSWORD_FILE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    password_file: Option<PathBuf>,

    /// Run CMD with `sh -c` and read the password from the first line of its output.
    #[arg(
        long,
        global = true,
        env = "SBK_PASSWORD_COMMAND",
        hide_env_values = true,
        value_name = "CMD"
    )]
    password_command: Option<String>,

    /// Open the repository with a key file (`sbk key add --new-key-file`) instead of a password:
    /// no password KDF, for automated movers. Takes precedence over every password option. A key
    /// file is as sensitive as the data; one that group or others may read is refused.
    #[arg(long, global = true, env = "SBK_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Read the repository as it was at TIME (RFC 3339, such as 2026-12-01T03:00:00Z, or a
    /// duration ago, such as 2d), through the storage's object versions: what was written,
    /// overwritten or deleted since is not seen. For recovering from a stolen mover on S3 with
    /// Object Lock (or any bucket that keeps versions). For the commands that only read
    /// (snapshots, restore, verify, stats, serve, diff, ls, cat, extract, mount); it writes
    /// nothing to the repository (no lock, no pin) and keeps no cache. To rebuild a clean
    /// repository, use `sbk copy --from-as-of`.
    #[arg(long, global = true, value_name = "TIME", value_parser = commands::parse_as_of)]
    as_of: Option<commands::AsOf>,

    /// Worker threads [default: the number of CPUs].
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Init(commands::init::Args),
    Backup(commands::backup::Args),
    Snapshots(commands::snapshots::Args),
    Restore(commands::restore::Args),
    Ls(commands::ls::Args),
    Cat(commands::cat::Args),
    Extract(commands::extract::Args),
    Mount(commands::mount::Args),
    Serve(commands::serve::Args),
    Console(commands::console::Args),
    Diff(commands::diff::Args),
    Copy(commands::copy::Args),
    Run(commands::run::Args),
    Forget(commands::forget::Args),
    Prune(commands::prune::Args),
    Verify(commands::verify::Args),
    Stats(commands::stats::Args),
    Repair(commands::repair::Args),
    Unlock(commands::unlock::Args),
    Key(commands::key::Args),
    Completions(commands::generate::CompletionsArgs),
    Man(commands::generate::ManArgs),
}

/// `$XDG_CACHE_HOME/sbk`, else `~/.cache/sbk`; none without a home (a temporary cache then).
fn default_cache_dir() -> Option<PathBuf> {
    let nonempty = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    nonempty("XDG_CACHE_HOME")
        .or_else(|| nonempty("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("sbk"))
}

fn main() -> ExitCode {
    sbk_engine::large_allocations_from_the_kernel();
    let cli = Cli::parse();
    // The commands that stop cleanly at their next safe point catch SIGINT and SIGTERM; the
    // others keep the default action (they stop at once, as they always did; serve has its own).
    if matches!(
        cli.command,
        Command::Backup(_)
            | Command::Prune(_)
            | Command::Forget(_)
            | Command::Copy(_)
            | Command::Run(_)
    ) {
        signals::install();
    }
    let out = output::Output::new(cli.json, cli.quiet);
    let threads = cli.threads.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let reads_only = matches!(
        cli.command,
        Command::Snapshots(_)
            | Command::Restore(_)
            | Command::Verify(_)
            | Command::Stats(_)
            | Command::Serve(_)
            | Command::Diff(_)
            | Command::Ls(_)
            | Command::Cat(_)
            | Command::Extract(_)
            | Command::Mount(_)
    );
    if cli.as_of.is_some() && !reads_only {
        let hint = if matches!(cli.command, Command::Copy(_)) {
            ": to copy from the repository as it was, use `sbk copy --from-as-of`"
        } else {
            ": it reads the repository as it was, and this command writes to it"
        };
        out.error(
            &anyhow::anyhow!("--as-of is not for this command{hint}"),
            exit::Exit::Usage,
        );
        return exit::Exit::Usage.into();
    }
    // A view of the past keeps nothing: a cache of it would stand for the present next time.
    let cache = if cli.no_cache || cli.as_of.is_some() {
        CacheLocation::Temporary
    } else {
        match cli.cache_dir.or_else(default_cache_dir) {
            Some(dir) => CacheLocation::Dir(dir),
            None => CacheLocation::Temporary,
        }
    };
    let ctx = commands::Context {
        repo: cli.repo,
        as_of: cli.as_of,
        threads,
        out,
        cache,
        password: password::PasswordSource {
            file: cli.password_file,
            command: cli.password_command,
            env: None,
            key_file: cli.key_file,
        },
    };
    // For serve a signal is the normal end (exit 0); for the rest, an interruption.
    let serving = matches!(cli.command, Command::Serve(_) | Command::Console(_));
    let result = match cli.command {
        Command::Init(a) => commands::init::run(&ctx, a),
        Command::Backup(a) => commands::backup::run(&ctx, a),
        Command::Snapshots(a) => commands::snapshots::run(&ctx, a),
        Command::Restore(a) => commands::restore::run(&ctx, a),
        Command::Ls(a) => commands::files::guarded(|| commands::ls::run(&ctx, a)),
        Command::Cat(a) => commands::files::guarded(|| commands::cat::run(&ctx, a)),
        Command::Extract(a) => commands::files::guarded(|| commands::extract::run(&ctx, a)),
        Command::Mount(a) => commands::files::guarded(|| commands::mount::run(&ctx, a)),
        Command::Serve(a) => commands::serve::run(&ctx, a),
        Command::Console(a) => commands::console::run(&ctx, a),
        Command::Forget(a) => commands::forget::run(&ctx, a),
        Command::Prune(a) => commands::prune::run(&ctx, a),
        Command::Verify(a) => commands::verify::run(&ctx, a),
        Command::Stats(a) => commands::stats::run(&ctx, a),
        Command::Repair(a) => commands::repair::run(&ctx, a),
        Command::Unlock(a) => commands::unlock::run(&ctx, a),
        Command::Key(a) => commands::key::run(&ctx, a),
        Command::Diff(a) => commands::diff::run(&ctx, a),
        Command::Copy(a) => commands::copy::run(&ctx, a),
        Command::Run(a) => commands::run::run(&ctx, a),
        Command::Completions(a) => commands::generate::completions(&ctx, a),
        Command::Man(a) => commands::generate::man(&ctx, a),
    };
    // Stopped at the operator's request before the command could finish: say so. (One that
    // finished anyway, its snapshot saved, keeps its own success.)
    let finished = matches!(&result, Ok(code) if *code == ExitCode::SUCCESS);
    if let Some(s) = signals::received().filter(|_| !serving && !finished) {
        if let Err(e) = &result {
            eprintln!("sbk: {e:#}");
        }
        eprintln!(
            "sbk: stopped by {}; the repository is consistent and the lock released",
            signals::name(s)
        );
        return ExitCode::from((128 + s) as u8);
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = exit::classify(&e);
            ctx.out.error(&e, code);
            code.into()
        }
    }
}
