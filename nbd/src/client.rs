//! An NBD client, for reading exports as backup sources: fixed newstyle with `NBD_OPT_GO`,
//! structured replies, metadata contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`), and
//! large reads split into pipelined requests.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::proto::*;
use crate::server::Stream;

/// Where an export is: an NBD URI (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// How to reach the server.
    pub address: Address,
    /// The export's name (may be empty: the default export).
    pub export: String,
}

/// A server's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `host:port`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl NbdUri {
    /// Whether `s` looks like an NBD URI at all (so that a file path is never taken for one).
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    /// Parses an NBD URI (the NBD URI standard; TLS schemes are refused).
    pub fn parse(s: &str) -> Result<NbdUri, String> {
        let bad = |why: &str| format!("{s:?} is not a usable NBD URI: {why}");
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            if authority.is_empty() {
                return Err(bad("no host"));
            }
            if path.contains('?') {
                return Err(bad("query parameters are not supported with nbd://"));
            }
            let host_port = if authority.starts_with('[') {
                if authority.contains("]:") {
                    authority.to_owned()
                } else {
                    format!("{authority}:10809")
                }
            } else if authority.contains(':') {
                authority.to_owned()
            } else {
                format!("{authority}:10809")
            };
            return Ok(NbdUri {
                address: Address::Tcp(host_port),
                export: percent_decode(path).map_err(|e| bad(&e))?,
            });
        }
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| bad("nbd+unix:// takes no host"))?;
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("no ?socket=PATH"))?;
            return Ok(NbdUri {
                address: Address::Unix(PathBuf::from(percent_decode(socket).map_err(|e| bad(&e))?)),
                export: percent_decode(path).map_err(|e| bad(&e))?,
            });
        }
        if s.starts_with("nbds") {
            return Err(bad("TLS (nbds://) is not supported"));
        }
        Err(bad("it must start with nbd:// or nbd+unix://"))
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.address {
            Address::Tcp(a) => write!(f, "nbd://{a}/{}", self.export),
            Address::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad %-escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8".into())
}

/// An open connection to one export, in the transmission phase.
pub struct Client {
    stream: Stream,
    size: u64,
    flags: u16,
    max_request: u32,
    contexts: HashMap<String, u32>,
    cookie: u64,
}

/// Largest read sent as one request (several are in flight at once).
const REQUEST_BYTES: u32 = 4 << 20;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// Connects to `uri`, negotiates structured replies, selects the metadata contexts `meta`
    /// (those the server has; see [`Client::context`]), and opens the export.
    pub fn connect(uri: &NbdUri, meta: &[&str]) -> io::Result<Client> {
        let mut s = match &uri.address {
            Address::Tcp(a) => Stream::Tcp(TcpStream::connect(a)?),
            Address::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if hello[0..8] != NBDMAGIC.to_be_bytes() || hello[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(bad("not a newstyle NBD server"));
        }
        let hflags = u16::from_be_bytes([hello[16], hello[17]]);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("the server does not speak fixed newstyle"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;
        let (kind, _) = option(&mut s, OPT_STRUCTURED_REPLY, &[])?;
        if kind != REP_ACK {
            return Err(bad("the server refuses structured replies"));
        }
        let mut contexts = HashMap::new();
        if !meta.is_empty() {
            let req = MetaRequest {
                name: uri.export.clone(),
                queries: meta.iter().map(|m| m.to_string()).collect(),
            };
            send_option(&mut s, OPT_SET_META_CONTEXT, &req.encode())?;
            loop {
                let (kind, data) = option_reply(&mut s, OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes(data[0..4].try_into().expect("four bytes"));
                        let name = String::from_utf8_lossy(&data[4..]).into_owned();
                        contexts.insert(name, id);
                    }
                    REP_ACK => break,
                    k if k & (1 << 31) != 0 => break, // no contexts: the caller sees none
                    k => return Err(bad(format!("unexpected reply {k} to SET_META_CONTEXT"))),
                }
            }
        }
        let req = InfoRequest {
            name: uri.export.clone(),
            infos: vec![INFO_BLOCK_SIZE],
        };
        send_option(&mut s, OPT_GO, &req.encode())?;
        let (mut size, mut flags, mut max_request) = (None, 0, REQUEST_BYTES);
        loop {
            let (kind, data) = option_reply(&mut s, OPT_GO)?;
            match kind {
                REP_INFO if data.len() >= 2 => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    if info == INFO_EXPORT && data.len() == 12 {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().expect("eight")));
                        flags = u16::from_be_bytes([data[10], data[11]]);
                    } else if info == INFO_BLOCK_SIZE && data.len() == 14 {
                        let max = u32::from_be_bytes(data[10..14].try_into().expect("four"));
                        max_request = max_request.min(max.max(4096));
                    }
                }
                REP_ACK => break,
                k if k & (1 << 31) != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        if k == REP_ERR_UNKNOWN {
                            format!("no export {:?}: {msg}", uri.export)
                        } else {
                            format!("the server refused export {:?} ({k:#x}): {msg}", uri.export)
                        },
                    ));
                }
                _ => {}
            }
        }
        Ok(Client {
            stream: s,
            size: size.ok_or_else(|| bad("the server sent no export size"))?,
            flags,
            max_request,
            contexts,
            cookie: 0,
        })
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The id of metadata context `name`, if the server selected it.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts.get(name).copied()
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32) -> io::Result<u64> {
        self.cookie += 1;
        let r = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            length,
        };
        self.stream.write_all(&r.encode())?;
        Ok(self.cookie)
    }

    /// Reads `buf.len()` bytes at `offset`, as pipelined requests.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut pending = HashMap::new();
        let mut at = 0usize;
        while at < buf.len() {
            let n = (buf.len() - at).min(self.max_request as usize);
            let cookie = self.request(CMD_READ, 0, offset + at as u64, n as u32)?;
            // (start, length, bytes the replies covered so far)
            pending.insert(cookie, (offset + at as u64, n, 0usize));
            at += n;
        }
        // Every reply is read to its end, even after an error, so that the connection stays in
        // step; the first error is returned then.
        let mut failure = None;
        while !pending.is_empty() {
            let (cookie, done, chunk) = self.reply_chunk()?;
            let Some(&mut (start, n, ref mut covered)) = pending.get_mut(&cookie) else {
                return Err(bad(format!("a reply to cookie {cookie}, not asked")));
            };
            let mut place = |o: u64, len: usize| -> io::Result<std::ops::Range<usize>> {
                let inside = o >= start
                    && o.checked_add(len as u64)
                        .is_some_and(|end| end <= start + n as u64);
                if !inside {
                    return Err(bad("a read reply outside its request"));
                }
                // Chunks of a reply may not overlap, so their lengths add up to what they cover.
                *covered += len;
                let from = (o - offset) as usize;
                Ok(from..from + len)
            };
            match chunk {
                Chunk::Data(o, data) => {
                    let r = place(o, data.len())?;
                    buf[r].copy_from_slice(&data);
                }
                Chunk::Hole(o, len) => {
                    let r = place(o, len as usize)?;
                    buf[r].fill(0);
                }
                Chunk::Error(code, msg) => {
                    failure.get_or_insert_with(|| {
                        io::Error::other(format!(
                            "the NBD server failed a read at {start} (error {code}): {msg}"
                        ))
                    });
                }
                Chunk::Status(..) => return Err(bad("block status in a read reply")),
                Chunk::Simple => {
                    // Structured replies were negotiated: a read's data never comes simple.
                    return Err(bad("a simple reply to a read"));
                }
                Chunk::None => {}
            }
            if done {
                let (_, n, covered) = pending.remove(&cookie).expect("looked up above");
                if covered != n && failure.is_none() {
                    // Bytes a reply left out would be whatever the buffer held before.
                    failure = Some(bad(format!("a read reply covered {covered} of {n} bytes")));
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Block status of `offset..offset + len`: per selected context id, descriptors (length,
    /// flags) from `offset`; they may cover less than asked (ask again from where they end).
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
    ) -> io::Result<HashMap<u32, Vec<(u32, u32)>>> {
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut out = HashMap::new();
        loop {
            let (c, done, chunk) = self.reply_chunk()?;
            if c != cookie {
                return Err(bad("a reply to another request"));
            }
            match chunk {
                Chunk::Status(id, d) => {
                    out.insert(id, d);
                }
                Chunk::Error(code, msg) => {
                    return Err(io::Error::other(format!(
                        "the NBD server failed a block status at {offset} (error {code}): {msg}"
                    )))
                }
                Chunk::None => {}
                _ => return Err(bad("data in a block status reply")),
            }
            if done {
                return Ok(out);
            }
        }
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0)?;
        self.stream.shutdown();
        Ok(())
    }

    /// Reads one reply chunk: its cookie, whether it ends the reply, and what it says.
    fn reply_chunk(&mut self) -> io::Result<(u64, bool, Chunk)> {
        let mut head = [0u8; 16];
        self.stream.read_exact(&mut head)?;
        let s = &mut self.stream;
        let header = ReplyHeader::decode(&head, || {
            let mut b = [0u8; 4];
            s.read_exact(&mut b)
                .map_err(|_| WireError::Truncated("reply header"))?;
            Ok(b)
        })
        .map_err(|e| bad(e.to_string()))?;
        let (flags, kind, cookie, length) = match header {
            ReplyHeader::Simple { error, cookie } => {
                // Only replies without data come simple once structured replies are on.
                let chunk = if error == 0 {
                    Chunk::Simple
                } else {
                    Chunk::Error(error, String::new())
                };
                return Ok((cookie, true, chunk));
            }
            ReplyHeader::Structured {
                flags,
                kind,
                cookie,
                length,
            } => (flags, kind, cookie, length),
        };
        if length > MAX_PAYLOAD + 64 {
            return Err(bad(format!("a reply chunk of {length} bytes")));
        }
        let mut payload = vec![0u8; length as usize];
        self.stream.read_exact(&mut payload)?;
        let done = flags & REPLY_FLAG_DONE != 0;
        let mut c = Cursor::new(&payload);
        let e = |e: WireError| bad(e.to_string());
        let chunk = match kind {
            REPLY_TYPE_NONE => Chunk::None,
            REPLY_TYPE_OFFSET_DATA => {
                let o = c.u64("offset").map_err(e)?;
                Chunk::Data(o, payload[8..].to_vec())
            }
            REPLY_TYPE_OFFSET_HOLE => {
                Chunk::Hole(c.u64("offset").map_err(e)?, c.u32("hole size").map_err(e)?)
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let id = c.u32("context id").map_err(e)?;
                let mut d = Vec::with_capacity(c.remaining() / 8);
                while c.remaining() >= 8 {
                    d.push((c.u32("length").map_err(e)?, c.u32("flags").map_err(e)?));
                }
                Chunk::Status(id, d)
            }
            k if k & (1 << 15) != 0 => {
                let code = c.u32("error").map_err(e)?;
                let n = c.u16("message length").map_err(e)? as usize;
                let msg = c
                    .rest_string(n.min(c.remaining()), "message")
                    .unwrap_or_default();
                Chunk::Error(code, msg)
            }
            k => return Err(bad(format!("unknown reply chunk type {k}"))),
        };
        Ok((cookie, done, chunk))
    }
}

/// What a reply chunk says.
enum Chunk {
    None,
    /// A simple reply with no error (and no data).
    Simple,
    Data(u64, Vec<u8>),
    Hole(u64, u32),
    Status(u32, Vec<(u32, u32)>),
    Error(u32, String),
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

fn option_reply(s: &mut Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if h[0..8] != REPLY_MAGIC.to_be_bytes() {
        return Err(bad("bad option reply magic"));
    }
    let got = u32::from_be_bytes(h[8..12].try_into().expect("four bytes"));
    if got != option {
        return Err(bad(format!("a reply to option {got}, not {option}")));
    }
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("four bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("four bytes"));
    if len > MAX_OPTION {
        return Err(bad(format!("an option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((kind, data))
}

fn option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    send_option(s, option, data)?;
    option_reply(s, option)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd://127.0.0.1:10900/latest").unwrap();
        assert_eq!(u.address, Address::Tcp("127.0.0.1:10900".into()));
        assert_eq!(u.export, "latest");
        let u = NbdUri::parse("nbd://host/").unwrap();
        assert_eq!(u.address, Address::Tcp("host:10809".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///disk%201?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "disk 1");
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("nbds://h/x").is_err());
        assert!(NbdUri::parse("/dev/sda").is_err());
        assert!(NbdUri::parse("nbd://%zz").is_ok()); // the host is not decoded
        assert!(NbdUri::parse("nbd://h/%zz").is_err());
    }
}
