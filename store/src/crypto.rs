//! The one place where repository objects are sealed and opened.
//!
//! An encrypted repository (config feature [`FEATURE_ENCRYPTED`]) has a random master key: an
//! encryption key and the chunk-id key. Every blob (after compression), pack trailer, index
//! file and manifest is sealed with AES-256-GCM under a key of its own, derived from the
//! encryption key and a random 192-bit salt (BLAKE3 keyed with the encryption key), with a zero
//! nonce: each key seals one message, so many writers sharing the master key never risk a
//! repeated (key, nonce) pair, which 96-bit random nonces under one key would after ~2^32
//! objects. Associated data binds each sealed object to what it is: a blob to its kind and id
//! (so prune moves blobs between packs without re-encrypting them, and no blob can stand in for
//! another), a trailer to its pack, an index file or manifest to its kind. Sealed bytes are
//! `salt (24) ‖ ciphertext ‖ tag (16)`. The master key is stored only wrapped, in key objects
//! ([`crate::key`]), by the same construction under a password-derived key.
//!
//! AEAD chosen by measurement (benches/benches/crypto.rs; docs/benchmarks.md, "Encryption"):
//! sealing a 256 KiB chunk on this CPU, RustCrypto's XChaCha20-Poly1305 runs at 1.1 GiB/s and
//! its AES-256-GCM at 1.4 GiB/s, ring's AES-256-GCM (AES-NI/VAES and carry-less multiply in
//! assembly) at 7.2 GiB/s with the per-object key derivation included. Encryption is on every
//! byte backup, restore and verify move: the fast one.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroize;

use crate::blob::BlobKind;
use crate::error::DecodeError;
use crate::id::{ChunkId, PackId};

/// Required feature bit: objects are sealed (this module).
pub const FEATURE_ENCRYPTED: u64 = 1;
pub use crate::codec::SEAL_OVERHEAD;

/// The AES-256-GCM key of one sealed object: BLAKE3 keyed with `key`, of `salt`.
fn object_key(key: &[u8; 32], salt: &[u8]) -> LessSafeKey {
    let k = blake3::keyed_hash(key, salt);
    // 32 bytes is AES-256's key length: the only way this can fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.as_bytes()).expect("a 32-byte key"))
}

/// Seals `plain` under `key` with `salt`: `salt ‖ ciphertext ‖ tag`.
pub(crate) fn seal_under(
    key: &[u8; 32],
    salt: [u8; 24],
    aad: &[u8],
    plain: &[u8],
) -> std::io::Result<Vec<u8>> {
    // One copy of the plaintext, encrypted where it lies.
    let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
    out.extend_from_slice(&salt);
    out.extend_from_slice(plain);
    let tag = object_key(key, &salt)
        .seal_in_place_separate_tag(
            // Each key seals exactly one message: a fixed nonce is unique for it.
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad),
            &mut out[24..],
        )
        .map_err(|_| std::io::Error::other("sealing failed"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens `salt ‖ ciphertext ‖ tag` sealed under `key`, in place; returns the plaintext.
pub(crate) fn open_under<'a>(
    key: &[u8; 32],
    aad: &[u8],
    sealed: &'a mut [u8],
) -> Result<&'a [u8], DecodeError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(DecodeError::Truncated {
            needed: SEAL_OVERHEAD,
            available: sealed.len(),
        });
    }
    let (salt, rest) = sealed.split_at_mut(24);
    object_key(key, salt)
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), rest)
        .map(|plain| &*plain)
        .map_err(|_| DecodeError::AuthenticationFailed)
}

/// The master key of an encrypted repository.
#[derive(Clone)]
pub struct MasterKey {
    /// Key of the AEAD.
    pub(crate) enc: [u8; 32],
    /// Key of the keyed BLAKE3 that makes chunk ids.
    pub(crate) chunk: [u8; 32],
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.chunk.zeroize();
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random master key.
    pub fn random() -> std::io::Result<Self> {
        Ok(MasterKey {
            enc: crate::id::random_bytes()?,
            chunk: crate::id::random_bytes()?,
        })
    }

    /// The 64 bytes that key objects wrap.
    pub(crate) fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.enc);
        out[32..].copy_from_slice(&self.chunk);
        out
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == 64).then(|| MasterKey {
            enc: b[..32].try_into().expect("32 bytes"),
            chunk: b[32..].try_into().expect("32 bytes"),
        })
    }
}

/// Seals and opens objects: plainly (an unencrypted repository) or with the master key.
pub enum Crypto {
    /// `--encryption none`: bytes are stored as they are.
    Plain,
    /// Sealed under the master key.
    Sealed {
        /// The master key.
        key: MasterKey,
    },
}

/// What sealed bytes stand for, bound into their authentication tag.
#[derive(Debug, Clone, Copy)]
pub enum SealedFor<'a> {
    /// A blob: its kind and id.
    Blob(BlobKind, &'a ChunkId),
    /// A pack trailer's entries: the pack.
    Trailer(&'a PackId),
    /// A whole object (index file, manifest): its kind.
    Object(crate::backend::Kind),
}

impl SealedFor<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut a = Vec::with_capacity(48);
        match self {
            SealedFor::Blob(kind, id) => {
                a.extend_from_slice(b"sbk blob");
                a.push(*kind as u8);
                a.extend_from_slice(&id.0);
            }
            SealedFor::Trailer(pack) => {
                a.extend_from_slice(b"sbk trailer");
                a.extend_from_slice(&pack.0);
            }
            SealedFor::Object(kind) => {
                a.extend_from_slice(b"sbk object ");
                a.extend_from_slice(kind.dir().as_bytes());
            }
        }
        a
    }
}

impl Crypto {
    /// Sealing under `key`.
    pub fn sealed(key: MasterKey) -> Self {
        Crypto::Sealed { key }
    }

    /// True for an encrypted repository.
    pub fn is_sealed(&self) -> bool {
        matches!(self, Crypto::Sealed { .. })
    }

    /// Bytes sealing adds to each object.
    pub fn overhead(&self) -> usize {
        if self.is_sealed() {
            SEAL_OVERHEAD
        } else {
            0
        }
    }

    /// The chunk-id key, when it comes from the master key.
    pub(crate) fn chunk_key(&self) -> Option<&[u8; 32]> {
        match self {
            Crypto::Plain => None,
            Crypto::Sealed { key, .. } => Some(&key.chunk),
        }
    }

    /// The key that authenticates the config, derived from the master key.
    pub(crate) fn config_mac(&self, config: &[u8]) -> Option<[u8; 16]> {
        match self {
            Crypto::Plain => None,
            Crypto::Sealed { key, .. } => {
                let mac_key = blake3::derive_key("sbk 2026-11 config authentication", &key.enc);
                let h = blake3::keyed_hash(&mac_key, config);
                Some(h.as_bytes()[..16].try_into().expect("16 bytes"))
            }
        }
    }

    /// Seals `plain` for `ctx` (or copies it, unencrypted).
    pub fn seal(&self, ctx: SealedFor<'_>, plain: &[u8]) -> std::io::Result<Vec<u8>> {
        let salt: [u8; 24] = match self {
            Crypto::Plain => [0; 24],
            Crypto::Sealed { .. } => crate::id::random_bytes()?,
        };
        self.seal_with_salt(ctx, plain, salt)
    }

    /// [`Crypto::seal`] with a given salt: for test vectors only (a salt must never repeat
    /// under one master key).
    fn seal_with_salt(
        &self,
        ctx: SealedFor<'_>,
        plain: &[u8],
        salt: [u8; 24],
    ) -> std::io::Result<Vec<u8>> {
        match self {
            Crypto::Plain => Ok(plain.to_vec()),
            Crypto::Sealed { key } => seal_under(&key.enc, salt, &ctx.aad(), plain),
        }
    }

    /// Opens sealed bytes where they lie and returns the plaintext within them (the bytes
    /// themselves when unencrypted): no allocation on the restore and verify paths.
    pub fn open_in_place<'a>(
        &self,
        ctx: SealedFor<'_>,
        sealed: &'a mut [u8],
    ) -> Result<&'a [u8], DecodeError> {
        match self {
            Crypto::Plain => Ok(sealed),
            Crypto::Sealed { key } => open_under(&key.enc, &ctx.aad(), sealed),
        }
    }

    /// Opens bytes sealed for `ctx`; anything changed, or sealed for something else, is
    /// [`DecodeError::AuthenticationFailed`].
    pub fn open(&self, ctx: SealedFor<'_>, sealed: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut copy = sealed.to_vec();
        let n = self.open_in_place(ctx, &mut copy)?.len();
        let start = if self.is_sealed() { 24 } else { 0 };
        copy.truncate(start + n);
        copy.drain(..start);
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Kind;

    fn crypto() -> Crypto {
        Crypto::sealed(MasterKey {
            enc: [1; 32],
            chunk: [2; 32],
        })
    }

    #[test]
    fn sealed_bytes_open_only_in_their_context() {
        let c = crypto();
        let id = ChunkId([7; 32]);
        let s = c
            .seal(SealedFor::Blob(BlobKind::Data, &id), b"secret disk bytes")
            .unwrap();
        assert_eq!(s.len(), 17 + SEAL_OVERHEAD);
        assert!(!s.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            c.open(SealedFor::Blob(BlobKind::Data, &id), &s).unwrap(),
            b"secret disk bytes"
        );
        // Another id, another kind, another context: refused.
        for other in [
            SealedFor::Blob(BlobKind::Data, &ChunkId([8; 32])),
            SealedFor::Blob(BlobKind::Tree, &id),
            SealedFor::Object(Kind::Snapshot),
        ] {
            assert_eq!(c.open(other, &s), Err(DecodeError::AuthenticationFailed));
        }
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 1;
            assert!(
                c.open(SealedFor::Blob(BlobKind::Data, &id), &bad).is_err(),
                "flip at {i}"
            );
        }
        assert!(c.open(SealedFor::Object(Kind::Index), &s[..10]).is_err());
        // Two seals of the same bytes differ (random nonces).
        assert_ne!(
            s,
            c.seal(SealedFor::Blob(BlobKind::Data, &id), b"secret disk bytes")
                .unwrap()
        );
    }

    /// docs/format.md, "sealed bytes": the test vector there.
    #[test]
    fn test_vector() {
        let c = crypto();
        let id = ChunkId([7; 32]);
        let s = c
            .seal_with_salt(SealedFor::Blob(BlobKind::Data, &id), b"sbk", [3; 24])
            .unwrap();
        assert_eq!(crate::id::to_hex(&s), VECTOR);
    }

    const VECTOR: &str =
        "0303030303030303030303030303030303030303030303037cae5c844a5d05d19e9fb1e3cd9dbcfee4a065";

    #[test]
    fn plain_is_the_identity() {
        let p = Crypto::Plain;
        assert_eq!(p.seal(SealedFor::Object(Kind::Index), b"x").unwrap(), b"x");
        assert_eq!(p.open(SealedFor::Object(Kind::Index), b"x").unwrap(), b"x");
        assert_eq!(p.overhead(), 0);
    }
}
