//! `sbk completions SHELL` and `sbk man DIR`: shell completions and man pages, generated from
//! the same clap definitions as `--help`, so they never disagree with it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::CommandFactory;

use super::Context;

/// Print a shell completion script for sbk.
///
/// bash: `sbk completions bash > /etc/bash_completion.d/sbk`; zsh: into a folder of `$fpath` as
/// `_sbk`; fish: `sbk completions fish > ~/.config/fish/completions/sbk.fish`.
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Write man pages for sbk and each of its commands into DIR (sbk.1, sbk-backup.1, ...).
#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Where to write the pages (created if missing).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// Runs `sbk completions`.
pub fn completions(_ctx: &Context, args: CompletionsArgs) -> Result<ExitCode> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "sbk", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Runs `sbk man`.
pub fn man(ctx: &Context, args: ManArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("{}: cannot create the folder", args.dir.display()))?;
    let mut cmd = crate::Cli::command();
    cmd.build();
    let written = pages(&cmd, "sbk", &args.dir)?;
    ctx.out.info(
        &format!("wrote {written} man pages to {}", args.dir.display()),
        false,
    );
    ctx.out.json(
        &serde_json::json!({ "dir": args.dir, "pages": written }),
        false,
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the page of `cmd` as `name.1`, then those of its subcommands; returns how many.
fn pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    std::fs::write(&path, out).with_context(|| format!("{}: cannot write", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        n += pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}
