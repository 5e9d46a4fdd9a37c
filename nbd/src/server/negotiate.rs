//! The negotiation phase: fixed newstyle, one method per option the server answers.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::connection::Connection;
use super::{clip, protocol, Export, Server, Stream};
use crate::proto::*;

/// A client has this long to finish the negotiation.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What an option leaves the negotiation at.
enum Next {
    /// Another option.
    Option,
    /// The client ended the session.
    End,
    /// The transmission phase, serving `export` (named `name`), with `base:allocation` replies
    /// when `allocation`.
    Serve {
        export: Arc<dyn Export>,
        name: String,
        allocation: bool,
    },
}

/// One client's negotiation.
struct Negotiation<'a> {
    server: &'a Server,
    s: Stream,
    /// The client asked for no 124 zero bytes after `NBD_OPT_EXPORT_NAME`'s reply.
    no_zeroes: bool,
    /// Structured replies were negotiated.
    structured: bool,
    /// The export `base:allocation` was selected for.
    meta: Option<String>,
}

impl Server {
    /// The negotiation phase; `None` when the client ended it (`NBD_OPT_ABORT`).
    pub(super) fn negotiate(&self, mut s: Stream) -> io::Result<Option<Connection>> {
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
        let mut n = Negotiation {
            server: self,
            s,
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            structured: false,
            meta: None,
        };
        loop {
            match n.option()? {
                Next::Option => {}
                Next::End => return Ok(None),
                Next::Serve {
                    export,
                    name,
                    allocation,
                } => {
                    let structured = n.structured;
                    return Connection::new(n.s, export, name, structured, allocation).map(Some);
                }
            }
        }
    }
}

impl Negotiation<'_> {
    /// Reads one option and answers it.
    fn option(&mut self) -> io::Result<Next> {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head)?;
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
        self.s.read_exact(&mut data)?;
        if self.server.stopping.load(Ordering::Acquire) {
            self.reply(option, REP_ERR_SHUTDOWN, b"the server is stopping")?;
            return Ok(Next::End);
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(&data),
            OPT_ABORT => {
                let _ = self.reply(option, REP_ACK, &[]);
                Ok(Next::End)
            }
            OPT_LIST => self.list(&data).map(|()| Next::Option),
            OPT_INFO | OPT_GO => self.info_or_go(option, &data),
            OPT_STRUCTURED_REPLY => self.structured_reply(&data).map(|()| Next::Option),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, &data).map(|()| Next::Option)
            }
            OPT_STARTTLS => self
                .reply(
                    option,
                    REP_ERR_POLICY,
                    b"sbk serve speaks no TLS: it listens on loopback or a Unix socket",
                )
                .map(|()| Next::Option),
            _ => self
                .reply(option, REP_ERR_UNSUP, &[])
                .map(|()| Next::Option),
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        option_reply(&mut self.s, option, kind, data)
    }

    /// The old way in: no error reply exists for this option, so an unknown export ends the
    /// session.
    fn export_name(&mut self, data: &[u8]) -> io::Result<Next> {
        let name = String::from_utf8_lossy(data).into_owned();
        let (export, info) = self
            .server
            .catalog
            .open(&name)
            .map_err(|e| protocol(format!("export {name:?} refused: {e}")))?;
        let mut b = Vec::with_capacity(134);
        b.extend_from_slice(&export.size().to_be_bytes());
        b.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
        if !self.no_zeroes {
            b.extend_from_slice(&[0u8; 124]);
        }
        self.s.write_all(&b)?;
        Ok(Next::Serve {
            export,
            name: info.name,
            allocation: false,
        })
    }

    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return self.reply(OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
        }
        match self.server.catalog.list() {
            Ok(exports) => {
                for e in exports {
                    let mut b = Vec::new();
                    put_string(&mut b, &e.name);
                    b.extend_from_slice(e.description.as_bytes());
                    self.reply(OPT_LIST, REP_SERVER, &b)?;
                }
                self.reply(OPT_LIST, REP_ACK, &[])
            }
            Err(e) => self.reply(OPT_LIST, REP_ERR_UNKNOWN, e.as_bytes()),
        }
    }

    /// `NBD_OPT_INFO` describes an export; `NBD_OPT_GO` also starts serving it.
    fn info_or_go(&mut self, option: u32, data: &[u8]) -> io::Result<Next> {
        let Some(req) = valid(&mut self.s, option, InfoRequest::decode(data))? else {
            return Ok(Next::Option);
        };
        let (export, info) = match self.server.catalog.open(&req.name) {
            Ok(x) => x,
            Err(e) => {
                (self.server.log)(&format!("export {:?} refused: {e}", req.name));
                self.reply(option, REP_ERR_UNKNOWN, clip(&e))?;
                return Ok(Next::Option);
            }
        };
        let mut b = Vec::with_capacity(12);
        b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        b.extend_from_slice(&export.size().to_be_bytes());
        b.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
        self.reply(option, REP_INFO, &b)?;
        let mut b = Vec::with_capacity(14);
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        for v in [1u32, 4096, MAX_PAYLOAD] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, REP_INFO, &b)?;
        for (kind, text) in [
            (INFO_NAME, &info.name),
            (INFO_DESCRIPTION, &info.description),
        ] {
            if req.infos.contains(&kind) {
                let mut b = kind.to_be_bytes().to_vec();
                b.extend_from_slice(clip(text));
                self.reply(option, REP_INFO, &b)?;
            }
        }
        self.reply(option, REP_ACK, &[])?;
        if option != OPT_GO {
            return Ok(Next::Option);
        }
        Ok(Next::Serve {
            allocation: self.meta.as_deref() == Some(req.name.as_str()),
            export,
            name: info.name,
        })
    }

    fn structured_reply(&mut self, data: &[u8]) -> io::Result<()> {
        let option = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.reply(
                option,
                REP_ERR_INVALID,
                b"NBD_OPT_STRUCTURED_REPLY takes no data",
            );
        }
        self.structured = true;
        self.reply(option, REP_ACK, &[])
    }

    /// `base:allocation`, the one metadata context: listed, or selected for an export.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        if !self.structured {
            return self.reply(
                option,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
        }
        let Some(req) = valid(&mut self.s, option, MetaRequest::decode(data))? else {
            return Ok(());
        };
        let listing = option == OPT_LIST_META_CONTEXT;
        let matches = req
            .queries
            .iter()
            .any(|q| q == CONTEXT_BASE_ALLOCATION || (listing && (q == "base:")))
            || (listing && req.queries.is_empty());
        if option == OPT_SET_META_CONTEXT {
            self.meta = matches.then(|| req.name.clone());
        }
        if matches {
            let mut b = 1u32.to_be_bytes().to_vec();
            b.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &b)?;
        }
        self.reply(option, REP_ACK, &[])
    }
}

/// The transmission flags of an export.
pub(super) fn transmission_flags(export: &dyn Export) -> u16 {
    let base = TFLAG_HAS_FLAGS | TFLAG_SEND_CACHE;
    if export.writable() {
        base | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    } else {
        // Nothing changes a read-only export, so every connection sees the same bytes.
        base | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
    }
}

pub(super) fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// The decoded option data, or `None` once `ERR_INVALID` (naming what is wrong) is sent.
pub(super) fn valid<T>(
    s: &mut impl Write,
    option: u32,
    r: Result<T, WireError>,
) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            option_reply(s, option, REP_ERR_INVALID, e.to_string().as_bytes())?;
            Ok(None)
        }
    }
}

pub(super) fn option_reply(
    s: &mut impl Write,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = option_reply_header(option, kind, data.len() as u32).to_vec();
    b.extend_from_slice(data);
    s.write_all(&b)
}
