//! `sbk serve`: snapshots as NBD exports, for instant recovery.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use sbk_engine::{ServePins, ServeShared, SnapshotCatalog};
use sbk_nbd::server::{Listener, Log, Server};
use sbk_store::LockKind;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::Context;
use crate::exit::{Exit, ExitWith};
use crate::output::parse_size;

/// Serve snapshots as NBD exports: boot or mount a machine from its backup at once.
///
/// Each served snapshot is an export named by its id (any unique prefix of it works too) and
/// `latest`, the newest served snapshot when a client connects; without SNAPSHOT arguments every
/// snapshot is served, including those backed up while the server runs. Any NBD client reads
/// them: `qemu-img convert nbd://127.0.0.1:10809/latest disk.raw`, `nbdcopy`, `nbdinfo --list`,
/// or a VM booting with a qcow2 overlay on top (`qemu-img create -f qcow2 -b
/// nbd://127.0.0.1:10809/latest -F raw overlay.qcow2`). Exports are read-only unless --overlay
/// is given.
///
/// NBD has no authentication without TLS, which sbk does not speak: the server listens on
/// loopback (or a Unix socket) unless --allow-remote is given, and then anyone who can reach the
/// port can read the snapshots. Every chunk is verified before it is served; a damaged one fails
/// that read (EIO) and is logged, and the server goes on. SIGINT or SIGTERM stop it.
///
/// The server does not keep prune from running: it holds a pin lock, and each snapshot a client
/// has open is pinned (its manifest copied under pins/) until the last such client disconnects.
/// Prune keeps everything a pinned snapshot needs, even one forgotten meanwhile.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshots to serve: full ids, unique prefixes, or `latest` [default: all of them].
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,

    /// Address to listen on.
    #[arg(
        long,
        default_value = "127.0.0.1:10809",
        value_name = "ADDR:PORT",
        conflicts_with = "socket"
    )]
    listen: SocketAddr,

    /// Listen on a Unix socket at PATH instead (clients use nbd+unix:///EXPORT?socket=PATH).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Allow --listen on an address other than loopback. Without TLS anyone who reaches the
    /// port reads every served snapshot: use it only on a network you trust.
    #[arg(long)]
    allow_remote: bool,

    /// Make the exports writable for recovered machines: writes, zeroes and trims go to a sparse
    /// copy-on-write overlay in DIR per export (`latest.data`/`.map`, or by snapshot id), made
    /// durable by FLUSH and kept across restarts; the snapshot itself never changes. An overlay
    /// made on another snapshot (`latest` moved since) is refused.
    #[arg(long, value_name = "DIR")]
    overlay: Option<PathBuf>,

    /// Bytes of decompressed chunks kept in memory, shared by every client.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    cache_size: u64,
}

/// Runs `sbk serve`. Long (about 90 lines), as a server's start reads: check the address, open
/// and lock, listen, build the catalog, wait for a signal, then report the cache.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    if args.socket.is_none() && !args.listen.ip().is_loopback() && !args.allow_remote {
        return Err(ExitWith(
            Exit::Usage,
            format!(
                "--listen {} is not a loopback address: NBD has no authentication without TLS, so anyone who reaches it could read every snapshot; add --allow-remote if the network is trusted",
                args.listen
            ),
        )
        .into());
    }
    let (repo, lock) = ctx.open_locked(LockKind::Pin, "serve", true)?;
    let only = if args.snapshots.is_empty() {
        None
    } else {
        let ids = args
            .snapshots
            .iter()
            .map(|s| repo.resolve_snapshot(s))
            .collect::<Result<Vec<_>, _>>()?;
        Some(ids)
    };
    let listener = match &args.socket {
        Some(path) => Listener::Unix(UnixListener::bind(path).map_err(|e| {
            ExitWith(
                Exit::Usage,
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?),
        None => Listener::Tcp(TcpListener::bind(args.listen).map_err(|e| {
            ExitWith(
                Exit::Usage,
                format!("cannot listen on {}: {e}", args.listen),
            )
        })?),
    };
    let log: Log = Arc::new(|msg: &str| eprintln!("sbk serve: {msg}"));
    let repo = Arc::new(repo);
    let pins = ServePins::new(repo.clone(), lock, log.clone());
    let shared = ServeShared::new(repo, args.cache_size, 2, log.clone());
    let mut catalog = SnapshotCatalog::new(shared.clone(), only.clone(), pins.hook());
    if let Some(dir) = &args.overlay {
        catalog = catalog.with_overlays(dir.clone());
    }
    let server = Server::new(Arc::new(catalog), log);
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let stopper = {
        let server = server.clone();
        std::thread::spawn(move || {
            let got = signals.forever().next();
            server.stop();
            got
        })
    };
    let place = match &args.socket {
        Some(p) => format!("nbd+unix:///latest?socket={}", p.display()),
        None => format!("nbd://{}/latest", args.listen),
    };
    let what = match &only {
        Some(ids) => format!("{} snapshots", ids.len()),
        None => "every snapshot".into(),
    };
    ctx.out.info(
        &format!("serving {what} at {place} (SIGINT or SIGTERM stops)"),
        false,
    );
    ctx.out
        .json(&serde_json::json!({ "listening": place }), false);
    let served = server.run(listener);
    handle.close();
    let signal = stopper.join().ok().flatten();
    shared.stop();
    if let Some(p) = &args.socket {
        let _ = std::fs::remove_file(p);
    }
    served?;
    let (cached, hits, misses) = shared.cache().figures();
    ctx.out.info(
        &format!(
            "stopped{}: chunk cache {hits} hits, {misses} misses, {} MiB held",
            match signal {
                Some(SIGINT) => " (SIGINT)",
                Some(SIGTERM) => " (SIGTERM)",
                _ => "",
            },
            cached >> 20
        ),
        false,
    );
    Ok(ExitCode::SUCCESS)
}
