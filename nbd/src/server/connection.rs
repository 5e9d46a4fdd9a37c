//! A connection in the transmission phase: requests read in order, worked on by a few threads,
//! answered out of order (simple or structured replies).

use std::io::{self, Read, Write};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use super::{clip, protocol, Export, ExportError, ReadPart, Stream};
use crate::proto::*;

/// How many requests of one connection are worked on at once: two, measured (four per
/// connection made nbdcopy -C 4 slower on two cores: the threads spent their time switching).
const WORKERS_PER_CONNECTION: usize = 2;

/// A connection in the transmission phase.
pub(super) struct Connection {
    reader: Stream,
    writer: Mutex<Stream>,
    export: Arc<dyn Export>,
    pub(super) name: String,
    structured: bool,
    allocation: bool,
}

/// A request with its payload, for a worker.
struct Job {
    req: Request,
    data: Vec<u8>,
}

impl Connection {
    pub(super) fn new(
        s: Stream,
        export: Arc<dyn Export>,
        name: String,
        structured: bool,
        allocation: bool,
    ) -> io::Result<Connection> {
        // Out of descriptors, say: the connection ends, the server goes on.
        let writer = s.try_clone()?;
        Ok(Connection {
            reader: s,
            writer: Mutex::new(writer),
            export,
            name,
            structured,
            allocation,
        })
    }

    /// Reads requests and hands them to the workers until the client disconnects.
    pub(super) fn transmit(self) -> io::Result<()> {
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

    /// Carries out one request. Long (about 100 lines): one arm per NBD command, in the
    /// protocol's order, each checking its own flags and bounds as the spec words them.
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

    fn send_read(&self, req: &Request, chunks: Vec<ReadPart>) -> io::Result<()> {
        if !self.structured {
            // A simple reply carries the whole range, holes as zeroes.
            let mut buf = vec![0u8; req.length as usize];
            for c in chunks {
                if let ReadPart::Data { offset, data } = c {
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
                ReadPart::Data { offset, data } => {
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
                ReadPart::Hole { offset, len } => {
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
    Read(Vec<ReadPart>),
    Status(Vec<(u32, u32)>),
}
