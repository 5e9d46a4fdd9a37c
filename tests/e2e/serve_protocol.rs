//! `sbk serve` against clients that break the NBD protocol: each gets an error or loses its
//! connection, and the server goes on serving everyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sbk_nbd::proto::*;

use crate::serve::{one_snapshot, Served, MIB};

/// Negotiates `NBD_OPT_GO` for `export` by hand, with structured replies and base:allocation.
fn raw_session(socket: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let opt = |s: &mut UnixStream, o: u32, data: &[u8]| {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            assert!(kind & (1 << 31) == 0, "option {o} refused: {kind:#x}");
            if kind == REP_ACK {
                break;
            }
        }
    };
    opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
    let meta = MetaRequest {
        name: export.into(),
        queries: vec![CONTEXT_BASE_ALLOCATION.into()],
    };
    opt(&mut s, OPT_SET_META_CONTEXT, &meta.encode());
    let go = InfoRequest {
        name: export.into(),
        infos: vec![],
    };
    opt(&mut s, OPT_GO, &go.encode());
    s
}

/// Sends a request and returns the error of its (final) reply chunk, 0 for success.
fn request(s: &mut UnixStream, kind: u16, flags: u16, offset: u64, length: u32) -> u32 {
    let r = Request {
        flags,
        kind,
        cookie: 42,
        offset,
        length,
    };
    s.write_all(&r.encode()).unwrap();
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            return u32::from_be_bytes(h[4..8].try_into().unwrap());
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let mut l = [0u8; 4];
        s.read_exact(&mut l).unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes(l) as usize];
        s.read_exact(&mut payload).unwrap();
        if kind & (1 << 15) != 0 {
            return u32::from_be_bytes(payload[0..4].try_into().unwrap());
        }
        if flags & REPLY_FLAG_DONE != 0 {
            return 0;
        }
    }
}

/// True once the server closed the connection (a read returns end of file or a reset).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
}

#[test]
fn misbehaving_clients_get_errors_and_the_server_goes_on() {
    let Some((env, v1, _)) = one_snapshot(3) else {
        return;
    };
    let server = Served::start(&env, &[]);
    let size = 40 * MIB as u64;

    // Unknown client flags: the connection is closed.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s));

    // A bad option magic: closed.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed(&mut s));

    // An unknown export: an error reply, and the negotiation goes on.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    let go = InfoRequest {
        name: "nope".into(),
        infos: vec![],
    }
    .encode();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(go.len() as u32).to_be_bytes());
    b.extend_from_slice(&go);
    s.write_all(&b).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        REP_ERR_UNKNOWN
    );
    // An unknown option: ERR_UNSUP.
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&999u32.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&b).unwrap();
    let mut rest = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut rest).unwrap();
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        REP_ERR_UNSUP
    );
    drop(s);

    // In transmission: reads past the end, unknown commands and flags, writes to a read-only
    // export and block status of nothing get errors; the connection goes on.
    let mut s = raw_session(&server.socket, "latest");
    assert_eq!(request(&mut s, CMD_READ, 0, size - 10, 20), EINVAL);
    assert_eq!(request(&mut s, CMD_READ, 0, u64::MAX - 5, 20), EINVAL);
    assert_eq!(request(&mut s, 77, 0, 0, 0), EINVAL);
    assert_eq!(request(&mut s, CMD_READ, 1 << 9, 0, 4096), EINVAL);
    assert_eq!(request(&mut s, CMD_TRIM, 0, 0, 4096), EPERM);
    assert_eq!(request(&mut s, CMD_BLOCK_STATUS, 0, 0, 0), EINVAL);
    assert_eq!(request(&mut s, CMD_READ, 0, 0, 4096), 0);
    assert_eq!(
        request(&mut s, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096),
        0
    );
    // A bad request magic: closed.
    s.write_all(&[0xffu8; 28]).unwrap();
    assert!(closed(&mut s));

    // A truncated request, then gone; a client that vanishes in the middle of a big reply.
    let read = |length| {
        Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 1,
            offset: 0,
            length,
        }
        .encode()
    };
    let mut s = raw_session(&server.socket, "latest");
    s.write_all(&read(4096)[..10]).unwrap();
    drop(s);
    for _ in 0..3 {
        let mut s = raw_session(&server.socket, "latest");
        s.write_all(&read(32 << 20)).unwrap();
        let mut some = [0u8; 1000];
        s.read_exact(&mut some).unwrap();
        drop(s);
    }

    // The server still serves, byte-identical.
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &server.uri("latest")])
        .arg(&v1)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let log = server.log.clone();
    assert_eq!(server.stop(), 0);
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("client flags"), "{log}");
}
