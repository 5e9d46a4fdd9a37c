//! NBD exports started from the console, as `sbk serve` serves them: one snapshot per export,
//! read-only, on a loopback port of its own, pinned against prune while a client has it open.

use std::net::{SocketAddr, TcpListener};
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
    /// Where it listens.
    pub addr: SocketAddr,
    /// When it started.
    pub started: SystemTime,
    server: Arc<Server>,
    thread: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

impl Export {
    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.snapshot.to_hex())
    }

    fn stop(&self) {
        self.server.stop();
        if let Some(t) = self
            .thread
            .lock()
            .expect("no thread panics holding this")
            .take()
        {
            let _ = t.join();
        }
    }
}

/// The running exports.
#[derive(Default)]
pub struct Exports {
    next: AtomicU64,
    list: Mutex<Vec<Arc<Export>>>,
}

impl Exports {
    /// Every running export, oldest first.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.list
            .lock()
            .expect("no thread panics holding this")
            .clone()
    }

    /// The running exports of snapshot `id` of repository `repo`.
    pub fn of(&self, repo: usize, id: &SnapshotId) -> Vec<Arc<Export>> {
        self.all()
            .into_iter()
            .filter(|e| e.repo == repo && &e.snapshot == id)
            .collect()
    }

    /// Starts serving snapshot `id` of `opened` (repository `repo`) on `host`, on a port the
    /// system picks.
    pub fn start(
        &self,
        opened: &Opened,
        repo: usize,
        id: SnapshotId,
        host: std::net::IpAddr,
    ) -> std::io::Result<Arc<Export>> {
        let listener = TcpListener::bind((host, 0))?;
        let addr = listener.local_addr()?;
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let log: Log = Arc::new(move |m: &str| eprintln!("sbk console: export {n}: {m}"));
        let catalog =
            SnapshotCatalog::new(opened.shared.clone(), Some(vec![id]), opened.pins.hook());
        let server = Server::new(Arc::new(catalog), log);
        let thread = {
            let server = server.clone();
            std::thread::Builder::new()
                .name(format!("sbk-console-export-{n}"))
                .spawn(move || server.run(Listener::Tcp(listener)))?
        };
        let export = Arc::new(Export {
            n,
            repo,
            snapshot: id,
            addr,
            started: SystemTime::now(),
            server,
            thread: Mutex::new(Some(thread)),
        });
        self.list
            .lock()
            .expect("no thread panics holding this")
            .push(export.clone());
        Ok(export)
    }

    /// Stops export `n`: its listener closes and its clients are disconnected. Whether it ran.
    pub fn stop(&self, n: u64) -> bool {
        let found = {
            let mut list = self.list.lock().expect("no thread panics holding this");
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
        let all: Vec<_> = self
            .list
            .lock()
            .expect("no thread panics holding this")
            .drain(..)
            .collect();
        for e in all {
            e.stop();
        }
    }
}
