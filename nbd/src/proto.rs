//! The protocol's constants and the fixed-size messages, in one place
//! (NetworkBlockDevice `doc/proto.md`). All integers are big-endian.

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option a client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is understood.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is understood.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is understood.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is understood.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections see one state (caches are shared).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

/// Option: choose an export, old style (no error replies).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and start the transmission phase with it.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done, success.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical name.
pub const INFO_NAME: u16 = 1;
/// Information type: description for humans.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch a hole for write zeroes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment a read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one block status descriptor only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: nothing (final).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Structured reply type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` state: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` state: changed since the bitmap was created.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The allocation metadata context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU's dirty bitmap contexts.
pub const CONTEXT_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// Error: operation not permitted.
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space left.
pub const ENOSPC: u32 = 28;
/// Error: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error: not supported.
pub const ENOTSUP: u32 = 95;
/// Error: shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest payload (read length, write data) the server accepts: 32 MiB, as qemu-nbd.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data the server reads (names and queries are short).
pub const MAX_OPTION: u32 = 64 << 10;
/// Longest string the protocol allows (names, messages).
pub const MAX_STRING: usize = 4096;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message does not start with its magic.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    Magic {
        /// The magic expected.
        expected: u64,
        /// What was there.
        found: u64,
    },
    /// Fewer bytes than the message needs.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// A field holds a value the protocol does not allow.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// A request's fixed 28-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (of the data that follows, for a write).
    pub length: u32,
}

impl Request {
    /// Size of the header on the wire.
    pub const LEN: usize = 28;

    /// Decodes a request header.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Request, WireError> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::Magic {
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    /// Encodes a request header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The header of a structured reply chunk (20 bytes), or of a simple reply (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: an error code (0 for success) and the cookie; a successful read's data
    /// follows (its length is the request's).
    Simple {
        /// Error, 0 for success.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk; `length` bytes of payload follow.
    Structured {
        /// Reply flags (`REPLY_FLAG_DONE`).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Decodes a reply header from its first 16 bytes; for a structured chunk, `rest` gives the
    /// remaining 4 (the payload length).
    pub fn decode(
        b: &[u8; 16],
        rest: impl FnOnce() -> Result<[u8; 4], WireError>,
    ) -> Result<ReplyHeader, WireError> {
        match be32(&b[0..4]) {
            SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
                error: be32(&b[4..8]),
                cookie: be64(&b[8..16]),
            }),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Structured {
                flags: be16(&b[4..6]),
                kind: be16(&b[6..8]),
                cookie: be64(&b[8..16]),
                length: u32::from_be_bytes(rest()?),
            }),
            found => Err(WireError::Magic {
                expected: STRUCTURED_REPLY_MAGIC.into(),
                found: found.into(),
            }),
        }
    }
}

/// A structured reply chunk header, encoded.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A simple reply header, encoded.
pub fn simple_header(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// An option reply header, encoded.
pub fn option_reply_header(option: u32, kind: u32, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Reads big-endian integers and strings off an option's data, refusing to run past its end.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or(WireError::Truncated(what))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// A u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.take(2, what).map(be16)
    }

    /// A u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.take(4, what).map(be32)
    }

    /// A u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.take(8, what).map(be64)
    }

    /// A string of a u32 length and UTF-8 bytes, at most [`MAX_STRING`] long.
    pub fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING {
            return Err(WireError::Invalid(format!("{what} is {len} bytes long")));
        }
        self.rest_string(len, what)
    }

    /// `len` bytes of UTF-8.
    pub fn rest_string(&mut self, len: usize, what: &'static str) -> Result<String, WireError> {
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| WireError::Invalid(format!("{what} is not UTF-8")))
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Fails unless every byte was read.
    pub fn end(&self, what: &'static str) -> Result<(), WireError> {
        if self.remaining() != 0 {
            return Err(WireError::Invalid(format!(
                "{} bytes after the {what}",
                self.remaining()
            )));
        }
        Ok(())
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the information asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name (empty: the default export).
    pub name: String,
    /// Information types asked for.
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option's data.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, WireError> {
        let mut c = Cursor::new(data);
        let name = c.string("export name")?;
        let n = c.u16("number of information requests")?;
        let infos = (0..n)
            .map(|_| c.u16("information request"))
            .collect::<Result<_, _>>()?;
        c.end("information requests")?;
        Ok(InfoRequest { name, infos })
    }

    /// Encodes the option's data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string(&mut b, &self.name);
        b.extend_from_slice(&(self.infos.len() as u16).to_be_bytes());
        for i in &self.infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export's name.
    pub name: String,
    /// The queries, each `namespace:leaf`.
    pub queries: Vec<String>,
}

impl MetaRequest {
    /// Decodes the option's data.
    pub fn decode(data: &[u8]) -> Result<MetaRequest, WireError> {
        let mut c = Cursor::new(data);
        let name = c.string("export name")?;
        let n = c.u32("number of queries")?;
        // Each query takes at least its 4-byte length: a count beyond that is a lie.
        if n as usize > c.remaining() / 4 {
            return Err(WireError::Invalid(format!(
                "{n} queries in {} bytes",
                c.remaining()
            )));
        }
        let queries = (0..n)
            .map(|_| c.string("query"))
            .collect::<Result<_, _>>()?;
        c.end("queries")?;
        Ok(MetaRequest { name, queries })
    }

    /// Encodes the option's data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string(&mut b, &self.name);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string(&mut b, q);
        }
        b
    }
}

/// Appends a u32 length and the string's bytes.
pub fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("two bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("four bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("eight bytes"))
}

/// Fuzz entry point: every decoder of bytes a peer sends, on `data`; none may panic, and what
/// decodes re-encodes to the same bytes.
pub fn fuzz_messages(data: &[u8]) {
    if let Ok(b) = <&[u8; Request::LEN]>::try_from(data.get(..Request::LEN).unwrap_or(&[])) {
        if let Ok(r) = Request::decode(b) {
            assert_eq!(&r.encode(), b);
        }
    }
    if let Ok(r) = InfoRequest::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok(r) = MetaRequest::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Some(b) = data.get(..16) {
        let b: &[u8; 16] = b.try_into().expect("sixteen bytes");
        let rest = || {
            data.get(16..20)
                .map(|r| r.try_into().expect("four bytes"))
                .ok_or(WireError::Truncated("reply header"))
        };
        let _ = ReplyHeader::decode(b, rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn info_request_refuses_short_and_long_data() {
        let good = InfoRequest {
            name: "latest".into(),
            infos: vec![INFO_BLOCK_SIZE],
        }
        .encode();
        assert!(InfoRequest::decode(&good).is_ok());
        assert!(InfoRequest::decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(InfoRequest::decode(&long).is_err());
        // A name length past the data.
        let mut lie = good;
        lie[0..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(InfoRequest::decode(&lie).is_err());
    }

    #[test]
    fn meta_request_refuses_a_huge_query_count() {
        let mut b = Vec::new();
        put_string(&mut b, "x");
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaRequest::decode(&b).is_err());
    }

    proptest! {
        #[test]
        fn requests_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn option_data_round_trips(name in "[a-z0-9]{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..5), queries in proptest::collection::vec("[a-z:-]{1,30}", 0..4)) {
            let i = InfoRequest { name: name.clone(), infos };
            prop_assert_eq!(InfoRequest::decode(&i.encode()).unwrap(), i);
            let m = MetaRequest { name, queries };
            prop_assert_eq!(MetaRequest::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_messages(&data);
        }
    }
}
