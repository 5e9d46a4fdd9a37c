//! An NBD server for any [`Catalog`] of [`Export`]s: fixed newstyle negotiation, `NBD_OPT_GO`,
//! structured replies, the `base:allocation` metadata context, and pipelined requests answered
//! out of order by a few threads per connection.
//!
//! A client that breaks the protocol (a bad magic, a truncated message, an oversized payload)
//! loses its connection and nothing else: each connection has its own threads, and nothing a
//! client sends can panic them. [`Server::stop`] closes every connection after the requests
//! already taken are answered.

mod connection;
mod export;
mod negotiate;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use export::{Catalog, Export, ExportError, ExportInfo, ReadBytes, ReadPart};

/// Connections served at once; more are refused (closed) until some end.
const MAX_CONNECTIONS: usize = 64;

/// A connected socket, TCP or Unix.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle of the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down (wakes a thread blocked reading it).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A listening socket, TCP or Unix.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain.
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Stream::Tcp(s), a.to_string())),
            Listener::Unix(l) => l
                .accept()
                .map(|(s, _)| (Stream::Unix(s), "unix socket".into())),
        }
    }
}

/// Where the server's messages go.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// The server: a catalog, a log, and the connections it has open.
pub struct Server {
    catalog: Arc<dyn Catalog>,
    log: Log,
    stopping: AtomicBool,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Stream>>,
}

impl Server {
    /// A server of `catalog`'s exports, logging to `log`.
    pub fn new(catalog: Arc<dyn Catalog>, log: Log) -> Arc<Server> {
        Arc::new(Server {
            catalog,
            log,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts connections on `listener` until [`Server::stop`], each on its own thread; returns
    /// once every connection has ended.
    pub fn run(self: &Arc<Self>, listener: Listener) -> io::Result<()> {
        listener.set_nonblocking()?;
        std::thread::scope(|s| {
            while !self.stopping.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let open = self
                            .open
                            .lock()
                            .expect("no thread panics holding this")
                            .len();
                        if open >= MAX_CONNECTIONS {
                            (self.log)(&format!(
                                "{peer}: refused, {open} connections are open already"
                            ));
                            stream.shutdown();
                            continue;
                        }
                        let server = self.clone();
                        let spawned = std::thread::Builder::new()
                            .name("sbk-nbd-conn".into())
                            .spawn_scoped(s, move || server.connection(stream, peer));
                        if let Err(e) = spawned {
                            (self.log)(&format!("cannot start a connection thread: {e}"));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Out of descriptors, say: wait for connections to end, do not spin.
                        (self.log)(&format!("accept failed: {e}"));
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            // Wake every connection blocked reading: it ends after answering what it took.
            self.shutdown_all();
        });
        Ok(())
    }

    /// Stops accepting and closes every connection (from any thread, a signal handler's
    /// watcher for one).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.shutdown_all();
    }

    fn shutdown_all(&self) {
        let open = self.open.lock().expect("no thread panics holding this");
        for s in open.values() {
            s.shutdown();
        }
    }

    fn connection(&self, stream: Stream, peer: String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            self.open
                .lock()
                .expect("no thread panics holding this")
                .insert(id, clone);
        }
        if self.stopping.load(Ordering::Acquire) {
            stream.shutdown();
        }
        match self.negotiate(stream) {
            Ok(Some(connection)) => {
                (self.log)(&format!("{peer}: serving {}", connection.name));
                if let Err(e) = connection.transmit() {
                    (self.log)(&format!("{peer}: connection closed: {e}"));
                }
            }
            Ok(None) => {}
            Err(e) => (self.log)(&format!("{peer}: negotiation failed: {e}")),
        }
        if let Some(s) = self
            .open
            .lock()
            .expect("no thread panics holding this")
            .remove(&id)
        {
            s.shutdown();
        }
    }
}

/// At most the protocol's longest string.
pub(super) fn clip(s: &str) -> &[u8] {
    let mut end = s.len().min(crate::proto::MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// A client that broke the protocol: its connection ends.
pub(super) fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}
