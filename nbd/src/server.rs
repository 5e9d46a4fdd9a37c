//! An NBD server for any [`Catalog`] of [`Export`]s: fixed newstyle negotiation, `NBD_OPT_GO`,
//! structured replies, the `base:allocation` metadata context, and pipelined requests answered
//! out of order by a few threads per connection.
//!
//! A client that breaks the protocol (a bad magic, a truncated message, an oversized payload)
//! loses its connection and nothing else: each connection has its own threads, and nothing a
//! client sends can panic them. [`Server::stop`] closes every connection after the requests
//! already taken are answered.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::proto::*;

/// Connections served at once; more are refused (closed) until some end.
const MAX_CONNECTIONS: usize = 64;

/// How many requests of one connection are worked on at once: two, measured (four per
/// connection made nbdcopy -C 4 slower on two cores: the threads spent their time switching).
const WORKERS_PER_CONNECTION: usize = 2;
/// A client has this long to finish the negotiation.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes a read answers with: owned, or a range of a buffer shared with a cache (sent from
/// there, without a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bytes {
    /// Bytes of the reply's own.
    Owned(Vec<u8>),
    /// `range` of a shared buffer.
    Shared(Arc<Vec<u8>>, std::ops::Range<usize>),
}

impl Bytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Shared(b, r) => &b[r.clone()],
        }
    }
}

/// Part of the answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes at an offset of the export.
    Data {
        /// Offset in the export.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Zeroes at an offset of the export.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Length.
        len: u32,
    },
}

/// Why an export could not do what it was asked: an NBD error code and a message for the client
/// (and the server's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    /// One of the protocol's error values (`proto::EIO`, ...).
    pub code: u32,
    /// What went wrong.
    pub message: String,
}

impl ExportError {
    /// An error with `code` and `message`.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        ExportError {
            code,
            message: message.into(),
        }
    }
}

/// One export: a size, reads, block status and, for a writable one, writes.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are taken.
    fn writable(&self) -> bool {
        false
    }
    /// Reads `len` bytes at `offset` (inside the export) as data and hole chunks that cover the
    /// range exactly, in any order.
    fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError>;
    /// `base:allocation` descriptors (length, `STATE_*` flags) from `offset`, covering at least
    /// the first byte and at most a little past `offset + len`.
    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, ExportError>;
    /// A hint that `offset..offset + len` will be read soon.
    fn cache(&self, _offset: u64, _len: u32) -> Result<(), ExportError> {
        Ok(())
    }
    /// Writes `data` at `offset`.
    fn write(&self, _offset: u64, _data: &[u8]) -> Result<(), ExportError> {
        Err(ExportError::new(EPERM, "the export is read-only"))
    }
    /// Writes `len` zeroes at `offset`.
    fn write_zeroes(&self, _offset: u64, _len: u32) -> Result<(), ExportError> {
        Err(ExportError::new(EPERM, "the export is read-only"))
    }
    /// Discards `offset..offset + len` (reads as zeroes after).
    fn trim(&self, _offset: u64, _len: u32) -> Result<(), ExportError> {
        Err(ExportError::new(EPERM, "the export is read-only"))
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
}

/// How a catalog names an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The canonical name.
    pub name: String,
    /// A description for humans.
    pub description: String,
}

/// The exports a server offers; asked again at every listing and every connection.
pub trait Catalog: Send + Sync {
    /// The exports, for `NBD_OPT_LIST`.
    fn list(&self) -> Result<Vec<ExportInfo>, String>;
    /// Opens the export `name` for one connection; the error says why there is none.
    fn open(&self, name: &str) -> Result<(Arc<dyn Export>, ExportInfo), String>;
}

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
            Ok(Some(session)) => {
                (self.log)(&format!("{peer}: serving {}", session.name));
                if let Err(e) = session.transmit() {
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

    /// The negotiation phase; `None` when the client ended it (`NBD_OPT_ABORT`).
    fn negotiate(&self, mut s: Stream) -> io::Result<Option<Session>> {
        s.set_read_timeout(Some(NEGOTIATION_TIMEOUT))?;
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello)?;
        let client_flags = read_u32(&mut s)?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(protocol(format!("unknown client flags {client_flags:#x}")));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        let mut structured = false;
        let mut meta: Option<String> = None; // the export base:allocation was selected for
        loop {
            let mut head = [0u8; 16];
            s.read_exact(&mut head)?;
            let magic = u64::from_be_bytes(head[0..8].try_into().expect("eight bytes"));
            if magic != IHAVEOPT {
                return Err(protocol(format!("option magic {magic:#x}")));
            }
            let option = u32::from_be_bytes(head[8..12].try_into().expect("four bytes"));
            let len = u32::from_be_bytes(head[12..16].try_into().expect("four bytes"));
            if len > MAX_OPTION {
                return Err(protocol(format!("option {option} of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            if self.stopping.load(Ordering::Acquire) {
                option_reply(&mut s, option, REP_ERR_SHUTDOWN, b"the server is stopping")?;
                return Ok(None);
            }
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    // No error reply exists for this option: an unknown export ends the session.
                    let (export, info) = self
                        .catalog
                        .open(&name)
                        .map_err(|e| protocol(format!("export {name:?} refused: {e}")))?;
                    let mut b = Vec::with_capacity(134);
                    b.extend_from_slice(&export.size().to_be_bytes());
                    b.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&b)?;
                    return Ok(Some(Session::new(s, export, info.name, structured, false)?));
                }
                OPT_ABORT => {
                    let _ = option_reply(&mut s, option, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        option_reply(
                            &mut s,
                            option,
                            REP_ERR_INVALID,
                            b"NBD_OPT_LIST takes no data",
                        )?;
                        continue;
                    }
                    match self.catalog.list() {
                        Ok(exports) => {
                            for e in exports {
                                let mut b = Vec::new();
                                put_string(&mut b, &e.name);
                                b.extend_from_slice(e.description.as_bytes());
                                option_reply(&mut s, option, REP_SERVER, &b)?;
                            }
                            option_reply(&mut s, option, REP_ACK, &[])?;
                        }
                        Err(e) => option_reply(&mut s, option, REP_ERR_UNKNOWN, e.as_bytes())?,
                    }
                }
                OPT_INFO | OPT_GO => {
                    let Some(req) = valid(&mut s, option, InfoRequest::decode(&data))? else {
                        continue;
                    };
                    let (export, info) = match self.catalog.open(&req.name) {
                        Ok(x) => x,
                        Err(e) => {
                            (self.log)(&format!("export {:?} refused: {e}", req.name));
                            option_reply(&mut s, option, REP_ERR_UNKNOWN, clip(&e))?;
                            continue;
                        }
                    };
                    let mut b = Vec::with_capacity(12);
                    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    b.extend_from_slice(&export.size().to_be_bytes());
                    b.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
                    option_reply(&mut s, option, REP_INFO, &b)?;
                    let mut b = Vec::with_capacity(14);
                    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    for v in [1u32, 4096, MAX_PAYLOAD] {
                        b.extend_from_slice(&v.to_be_bytes());
                    }
                    option_reply(&mut s, option, REP_INFO, &b)?;
                    for (kind, text) in [
                        (INFO_NAME, &info.name),
                        (INFO_DESCRIPTION, &info.description),
                    ] {
                        if req.infos.contains(&kind) {
                            let mut b = kind.to_be_bytes().to_vec();
                            b.extend_from_slice(clip(text));
                            option_reply(&mut s, option, REP_INFO, &b)?;
                        }
                    }
                    option_reply(&mut s, option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        let allocation = meta.as_deref() == Some(req.name.as_str());
                        return Ok(Some(Session::new(
                            s, export, info.name, structured, allocation,
                        )?));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        option_reply(
                            &mut s,
                            option,
                            REP_ERR_INVALID,
                            b"NBD_OPT_STRUCTURED_REPLY takes no data",
                        )?;
                    } else {
                        structured = true;
                        option_reply(&mut s, option, REP_ACK, &[])?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !structured {
                        option_reply(
                            &mut s,
                            option,
                            REP_ERR_INVALID,
                            b"negotiate structured replies first",
                        )?;
                        continue;
                    }
                    let Some(req) = valid(&mut s, option, MetaRequest::decode(&data))? else {
                        continue;
                    };
                    let listing = option == OPT_LIST_META_CONTEXT;
                    let matches = req
                        .queries
                        .iter()
                        .any(|q| q == CONTEXT_BASE_ALLOCATION || (listing && (q == "base:")))
                        || (listing && req.queries.is_empty());
                    if option == OPT_SET_META_CONTEXT {
                        meta = matches.then(|| req.name.clone());
                    }
                    if matches {
                        let mut b = 1u32.to_be_bytes().to_vec();
                        b.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                        option_reply(&mut s, option, REP_META_CONTEXT, &b)?;
                    }
                    option_reply(&mut s, option, REP_ACK, &[])?;
                }
                OPT_STARTTLS => option_reply(
                    &mut s,
                    option,
                    REP_ERR_POLICY,
                    b"sbk serve speaks no TLS: it listens on loopback or a Unix socket",
                )?,
                _ => option_reply(&mut s, option, REP_ERR_UNSUP, &[])?,
            }
        }
    }
}

/// The transmission flags of an export.
fn transmission_flags(export: &dyn Export) -> u16 {
    let base = TFLAG_HAS_FLAGS | TFLAG_SEND_CACHE;
    if export.writable() {
        base | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    } else {
        // Nothing changes a read-only export, so every connection sees the same bytes.
        base | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
    }
}

/// At most the protocol's longest string.
fn clip(s: &str) -> &[u8] {
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// The decoded option data, or `None` once `ERR_INVALID` (naming what is wrong) is sent.
fn valid<T>(s: &mut impl Write, option: u32, r: Result<T, WireError>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            option_reply(s, option, REP_ERR_INVALID, e.to_string().as_bytes())?;
            Ok(None)
        }
    }
}

fn option_reply(s: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = option_reply_header(option, kind, data.len() as u32).to_vec();
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// A connection in the transmission phase.
struct Session {
    reader: Stream,
    writer: Mutex<Stream>,
    export: Arc<dyn Export>,
    name: String,
    structured: bool,
    allocation: bool,
}

/// A request with its payload, for a worker.
struct Job {
    req: Request,
    data: Vec<u8>,
}

impl Session {
    fn new(
        s: Stream,
        export: Arc<dyn Export>,
        name: String,
        structured: bool,
        allocation: bool,
    ) -> io::Result<Session> {
        // Out of descriptors, say: the connection ends, the server goes on.
        let writer = s.try_clone()?;
        Ok(Session {
            reader: s,
            writer: Mutex::new(writer),
            export,
            name,
            structured,
            allocation,
        })
    }

    /// Reads requests and hands them to the workers until the client disconnects.
    fn transmit(self) -> io::Result<()> {
        self.reader.set_read_timeout(None)?;
        let (tx, rx) = sync_channel::<Job>(WORKERS_PER_CONNECTION * 2);
        let rx = Mutex::new(rx);
        let this = &self;
        std::thread::scope(|scope| {
            let mut started = 0;
            for _ in 0..WORKERS_PER_CONNECTION {
                let rx = &rx;
                let worker = std::thread::Builder::new()
                    .name("sbk-nbd-worker".into())
                    .spawn_scoped(scope, move || loop {
                        let job = rx.lock().expect("no thread panics holding this").recv();
                        match job {
                            Ok(job) => this.answer(job),
                            Err(_) => break,
                        }
                    });
                // Fewer workers still answer; none at all ends the connection.
                started += usize::from(worker.is_ok());
            }
            if started == 0 {
                return Err(io::Error::other("cannot start a worker thread"));
            }
            let result = this.read_requests(&tx);
            drop(tx); // the workers answer what they took, then end
            result
        })
    }

    fn read_requests(&self, tx: &std::sync::mpsc::SyncSender<Job>) -> io::Result<()> {
        let mut reader = self.reader.try_clone()?;
        loop {
            let mut head = [0u8; Request::LEN];
            match reader.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(protocol("the client went away without NBD_CMD_DISC"))
                }
                Err(e) => return Err(e),
            }
            let req = Request::decode(&head).map_err(|e| protocol(e.to_string()))?;
            let mut data = Vec::new();
            if req.kind == CMD_WRITE {
                if req.length > MAX_PAYLOAD {
                    return Err(protocol(format!("a write of {} bytes", req.length)));
                }
                data = vec![0u8; req.length as usize];
                reader.read_exact(&mut data)?;
            }
            if req.kind == CMD_DISC {
                return Ok(());
            }
            if tx.send(Job { req, data }).is_err() {
                return Ok(());
            }
        }
    }

    /// Works on one request and sends its reply.
    fn answer(&self, job: Job) {
        let Job { req, data } = job;
        let r = self.execute(&req, &data);
        let sent = match r {
            Ok(Reply::Done) => self.send_done(req.cookie),
            Ok(Reply::Read(chunks)) => self.send_read(&req, chunks),
            Ok(Reply::Status(descriptors)) => self.send_status(req.cookie, &descriptors),
            Err(e) => self.send_error(req.cookie, &e),
        };
        if sent.is_err() {
            // The client went away: the reader sees it too and ends the session.
            self.reader.shutdown();
        }
    }

    fn execute(&self, req: &Request, data: &[u8]) -> Result<Reply, ExportError> {
        let e = &*self.export;
        let size = e.size();
        let end = req.offset.checked_add(u64::from(req.length));
        let inside = end.is_some_and(|end| end <= size);
        // FUA is accepted on every command when it is advertised (the protocol says so; qemu
        // sends it on FLUSH); it means something only for writes.
        let allowed = CMD_FLAG_FUA
            | match req.kind {
                CMD_READ => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if req.flags & !allowed != 0 {
            return Err(ExportError::new(
                EINVAL,
                format!("command flags {:#x}", req.flags),
            ));
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let writes = matches!(
            req.kind,
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_FLUSH
        );
        if writes && !e.writable() {
            return Err(ExportError::new(EPERM, "the export is read-only"));
        }
        let check_range = |what: &str, code| {
            if inside {
                Ok(())
            } else {
                Err(ExportError::new(
                    code,
                    format!(
                        "{what} of {} bytes at {} is past the end ({size} bytes)",
                        req.length, req.offset
                    ),
                ))
            }
        };
        match req.kind {
            CMD_READ => {
                check_range("a read", EINVAL)?;
                if req.length > MAX_PAYLOAD {
                    return Err(ExportError::new(EOVERFLOW, "a read longer than 32 MiB"));
                }
                if req.flags & CMD_FLAG_DF != 0 {
                    // DF is not advertised, so a client may not send it.
                    return Err(ExportError::new(EINVAL, "NBD_CMD_FLAG_DF is not offered"));
                }
                e.read(req.offset, req.length).map(Reply::Read)
            }
            CMD_WRITE => {
                check_range("a write", ENOSPC)?;
                e.write(req.offset, data)?;
                if fua {
                    e.flush()?;
                }
                Ok(Reply::Done)
            }
            CMD_WRITE_ZEROES | CMD_TRIM => {
                check_range("a write", ENOSPC)?;
                if req.kind == CMD_TRIM {
                    e.trim(req.offset, req.length)?;
                } else {
                    e.write_zeroes(req.offset, req.length)?;
                }
                if fua {
                    e.flush()?;
                }
                Ok(Reply::Done)
            }
            CMD_FLUSH => e.flush().map(|()| Reply::Done),
            CMD_CACHE => {
                check_range("a cache request", EINVAL)?;
                e.cache(req.offset, req.length).map(|()| Reply::Done)
            }
            CMD_BLOCK_STATUS => {
                if !self.structured || !self.allocation {
                    return Err(ExportError::new(EINVAL, "no metadata context was selected"));
                }
                if req.length == 0 {
                    return Err(ExportError::new(EINVAL, "a block status of 0 bytes"));
                }
                check_range("a block status", EINVAL)?;
                let mut d = e.block_status(req.offset, req.length)?;
                if d.is_empty() || d.iter().any(|(len, _)| *len == 0) {
                    return Err(ExportError::new(EIO, "the export described no extent"));
                }
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    d.truncate(1);
                    d[0].0 = d[0].0.min(req.length);
                }
                // At most 2^20 descriptors per reply (the protocol's advice); clients ask again.
                d.truncate(1 << 20);
                Ok(Reply::Status(d))
            }
            other => Err(ExportError::new(EINVAL, format!("unknown command {other}"))),
        }
    }

    fn send(&self, bytes: &[&[u8]]) -> io::Result<()> {
        let mut w = self.writer.lock().expect("no thread panics holding this");
        for b in bytes {
            w.write_all(b)?;
        }
        Ok(())
    }

    fn send_done(&self, cookie: u64) -> io::Result<()> {
        self.send(&[&simple_header(0, cookie)])
    }

    fn send_error(&self, cookie: u64, e: &ExportError) -> io::Result<()> {
        if !self.structured {
            return self.send(&[&simple_header(e.code, cookie)]);
        }
        let msg = clip(&e.message);
        let mut payload = e.code.to_be_bytes().to_vec();
        payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        payload.extend_from_slice(msg);
        let head = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            payload.len() as u32,
        );
        self.send(&[&head, &payload])
    }

    fn send_read(&self, req: &Request, chunks: Vec<ReadChunk>) -> io::Result<()> {
        if !self.structured {
            // A simple reply carries the whole range, holes as zeroes.
            let mut buf = vec![0u8; req.length as usize];
            for c in chunks {
                if let ReadChunk::Data { offset, data } = c {
                    let data = data.as_slice();
                    let at = (offset - req.offset) as usize;
                    buf[at..at + data.len()].copy_from_slice(data);
                }
            }
            return self.send(&[&simple_header(0, req.cookie), &buf]);
        }
        if chunks.is_empty() {
            let head = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            return self.send(&[&head]);
        }
        let last = chunks.len() - 1;
        let mut w = self.writer.lock().expect("no thread panics holding this");
        for (i, c) in chunks.into_iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            match c {
                ReadChunk::Data { offset, data } => {
                    let data = data.as_slice();
                    let head = structured_header(
                        flags,
                        REPLY_TYPE_OFFSET_DATA,
                        req.cookie,
                        8 + data.len() as u32,
                    );
                    // Header and offset in one write, the data straight from its buffer.
                    let mut lead = [0u8; 28];
                    lead[..20].copy_from_slice(&head);
                    lead[20..].copy_from_slice(&offset.to_be_bytes());
                    w.write_all(&lead)?;
                    w.write_all(data)?;
                }
                ReadChunk::Hole { offset, len } => {
                    let mut chunk = [0u8; 32];
                    chunk[..20].copy_from_slice(&structured_header(
                        flags,
                        REPLY_TYPE_OFFSET_HOLE,
                        req.cookie,
                        12,
                    ));
                    chunk[20..28].copy_from_slice(&offset.to_be_bytes());
                    chunk[28..].copy_from_slice(&len.to_be_bytes());
                    w.write_all(&chunk)?;
                }
            }
        }
        Ok(())
    }

    fn send_status(&self, cookie: u64, d: &[(u32, u32)]) -> io::Result<()> {
        let mut payload = Vec::with_capacity(4 + 8 * d.len());
        payload.extend_from_slice(&1u32.to_be_bytes()); // base:allocation's context id
        for (len, flags) in d {
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        let head = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            payload.len() as u32,
        );
        self.send(&[&head, &payload])
    }
}

/// What a request's reply carries.
enum Reply {
    Done,
    Read(Vec<ReadChunk>),
    Status(Vec<(u32, u32)>),
}
