//! NBD exports started from the console, as `sbk serve` serves them: one snapshot per export,
//! read-only, pinned against prune while a client has it open, on a Unix socket of its own
//! (mode 0600, in a folder only the console's user can enter). NBD has no authentication
//! without TLS: on a loopback TCP port any local user could read the whole disk, which the
//! console's token exists to prevent.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use sbk_engine::SnapshotCatalog;
use sbk_nbd::server::{Listener, Log, Server};
use sbk_store::SnapshotId;

use crate::repos::Opened;

/// One running export.
pub struct Export {
    /// Its number (in URLs).
    pub n: u64,
    /// The repository's number.
    pub repo: usize,
    /// The snapshot served.
    pub snapshot: SnapshotId,
    /// Its socket.
    pub socket: PathBuf,
    /// When it started.
    pub started: SystemTime,
    server: Arc<Server>,
    thread: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

impl Export {
    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.snapshot.to_hex(),
            self.socket.display()
        )
    }

    fn stop(&self) {
        self.server.stop();
        if let Some(t) = crate::repos::lock(&self.thread).take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The running exports.
pub struct Exports {
    next: AtomicU64,
    list: Mutex<Vec<Arc<Export>>>,
    /// Where their sockets are (mode 0700).
    dir: PathBuf,
}

impl Exports {
    /// Exports with their sockets in `dir`, a folder only the console's user can enter.
    pub fn new(dir: &Path) -> Exports {
        Exports {
            next: AtomicU64::new(0),
            list: Mutex::new(Vec::new()),
            dir: dir.to_owned(),
        }
    }

    /// Every running export, oldest first.
    pub fn all(&self) -> Vec<Arc<Export>> {
        crate::repos::lock(&self.list).clone()
    }

    /// The running exports of snapshot `id` of repository `repo`.
    pub fn of(&self, repo: usize, id: &SnapshotId) -> Vec<Arc<Export>> {
        self.all()
            .into_iter()
            .filter(|e| e.repo == repo && &e.snapshot == id)
            .collect()
    }

    /// Starts serving snapshot `id` of `opened` (repository `repo`) on a socket of its own.
    pub fn start(
        &self,
        opened: &Opened,
        repo: usize,
        id: SnapshotId,
    ) -> std::io::Result<Arc<Export>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let socket = self.dir.join(format!("export-{n}.sock"));
        let listener = UnixListener::bind(&socket)?;
        // Owner only (the folder already keeps others out).
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        let log: Log = Arc::new(move |m: &str| eprintln!("sbk console: export {n}: {m}"));
        let catalog =
            SnapshotCatalog::new(opened.shared.clone(), Some(vec![id]), opened.pins.hook());
        let server = Server::new(Arc::new(catalog), log);
        let thread = {
            let server = server.clone();
            std::thread::Builder::new()
                .name(format!("sbk-console-export-{n}"))
                .spawn(move || server.run(Listener::Unix(listener)))?
        };
        let export = Arc::new(Export {
            n,
            repo,
            snapshot: id,
            socket,
            started: SystemTime::now(),
            server,
            thread: Mutex::new(Some(thread)),
        });
        crate::repos::lock(&self.list).push(export.clone());
        Ok(export)
    }

    /// Stops export `n`: its listener closes and its clients are disconnected. Whether it ran.
    pub fn stop(&self, n: u64) -> bool {
        let found = {
            let mut list = crate::repos::lock(&self.list);
            let i = list.iter().position(|e| e.n == n);
            i.map(|i| list.remove(i))
        };
        match found {
            Some(e) => {
                e.stop();
                true
            }
            None => false,
        }
    }

    /// Stops every export.
    pub fn stop_all(&self) {
        let all: Vec<_> = crate::repos::lock(&self.list).drain(..).collect();
        for e in all {
            e.stop();
        }
    }
}
