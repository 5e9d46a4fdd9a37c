//! `sbk mount`: snapshots as a read-only filesystem, for cp, rsync, diff and loop mounts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use sbk_engine::{Mounted, MountedSnapshot, ServePins, ServeShared, SnapshotFiles, SnapshotsFs};
use sbk_nbd::server::Log;
use sbk_store::LockKind;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::Context;
use crate::exit::{Exit, ExitWith};
use crate::output::parse_size;

/// Mount snapshots read-only (FUSE): their disks, partitions and files as ordinary files.
///
/// DIR gets one folder per snapshot, named by its id, holding `disk.img` (the whole disk),
/// `partN.img` (each partition, for a loop mount or any tool that reads images) and `partN/`
/// (each filesystem sbk reads: ext2/3/4, FAT, NTFS) as a tree with its names, modes, owners,
/// times, links and extended attributes; cp, rsync and diff work on it as any user may, the
/// kernel checking each file's mode and owner. Every chunk is verified as it is read; a
/// damaged one fails that read (EIO) and is logged.
///
/// Runs until DIR is unmounted (`fusermount3 -u DIR`) or sbk gets SIGINT or SIGTERM, which
/// unmount it. The snapshots stay pinned against prune meanwhile, as `sbk serve` pins them.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshots (full ids, unique prefixes, or `latest`), then the directory to mount on.
    #[arg(value_name = "SNAPSHOT... DIR", required = true, num_args = 2..)]
    args: Vec<String>,

    /// Bytes of decompressed chunks kept in memory.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    cache_size: u64,
}

/// Runs `sbk mount`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let (dir, names) = args.args.split_last().expect("clap asks for two or more");
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        return Err(ExitWith(
            Exit::Usage,
            format!("{}: not a directory to mount on", dir.display()),
        )
        .into());
    }
    let (repo, lock) = ctx.open_locked(LockKind::Pin, "mount", true)?;
    let repo = Arc::new(repo);
    let log: Log = Arc::new(|msg: &str| eprintln!("sbk mount: {msg}"));
    let pins = ServePins::new(repo.clone(), lock, log.clone());
    let shared = ServeShared::new(repo.clone(), args.cache_size, 2, log.clone());
    let pin = pins.hook();
    let mut snapshots = Vec::new();
    for name in names {
        let id = repo.resolve_snapshot(name)?;
        let manifest = repo.load_manifest(&id)?;
        let guard = pin(&id).map_err(|e| ExitWith(Exit::Locked, e))?;
        snapshots.push(MountedSnapshot {
            name: id.to_hex(),
            files: SnapshotFiles::open(shared.clone(), id)?,
            guard,
            time: UNIX_EPOCH + Duration::from_nanos(manifest.time_ns.max(0) as u64),
        });
    }
    let n = snapshots.len();
    let me = rustix::process::getuid().as_raw();
    let group = rustix::process::getgid().as_raw();
    let log2 = log.clone();
    let fs = SnapshotsFs::new(snapshots, me, group, Box::new(move |m: &str| log2(m)));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let mounted = Mounted::mount(fs, &dir).map_err(|e| {
        ExitWith(
            Exit::Error,
            format!(
                "cannot mount on {}: {e} (is fuse3 installed, and /dev/fuse there?)",
                dir.display()
            ),
        )
    })?;
    ctx.out.info(
        &format!(
            "mounted {n} snapshot{} on {d} (fusermount3 -u {d}, SIGINT or SIGTERM unmounts)",
            if n == 1 { "" } else { "s" },
            d = dir.display()
        ),
        false,
    );
    ctx.out.json(
        &serde_json::json!({ "mounted": dir, "snapshots": n }),
        false,
    );
    let signal = loop {
        if let Some(s) = signals.pending().next() {
            break Some(s);
        }
        if mounted.ended() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Unmounts (when a signal ended it); the pins go as the snapshots close.
    if let Err(e) = mounted.unmount() {
        ctx.out.notice(&format!(
            "unmounting {}: {e} (a process may still use it: fusermount3 -u {0} once it is done)",
            dir.display()
        ));
    }
    shared.stop();
    ctx.out.info(
        &format!(
            "unmounted {}{}",
            dir.display(),
            match signal {
                Some(SIGINT) => " (SIGINT)",
                Some(SIGTERM) => " (SIGTERM)",
                _ => "",
            }
        ),
        false,
    );
    Ok(ExitCode::SUCCESS)
}
