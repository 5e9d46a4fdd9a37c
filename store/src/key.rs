//! Key objects: the master key, wrapped by a key derived from a password with Argon2id, or by
//! the random secret of a key file.
//!
//! A repository has one key object per password or key file (per operator or data mover):
//! `keys/<32 hex>`. A key file (for automated movers, which should not pay a password KDF on
//! every command) names its key object and holds a 32-byte random secret: it needs no KDF, as it
//! has full entropy, and removing its key object revokes it.
//! Each holds its own Argon2id parameters and salt, the master key sealed (AES-256-GCM under a
//! key derived from the password-derived key and a random salt, as every sealed object) and a
//! plain checksum, so that a damaged key object
//! (exit 12) is told apart from a wrong password (exit 19). Adding or removing a key object, or
//! changing a password, rewraps the master key; it never changes it. Byte layout:
//! docs/format.md, "key object".

use zeroize::Zeroize;

use crate::codec::{invalid, split_checksum, Decoder, Encoder};
use crate::crypto::MasterKey;
use crate::error::DecodeError;

/// Magic of a key object. Do not change.
pub const KEY_MAGIC: &[u8; 8] = b"SBKKEY\0\0";
/// Key object format version: 2 added key files (KDF 2). Password key objects are still written
/// as version 1, which every sbk reads; a key file's object is version 2, which an older sbk
/// skips when it tries a password.
pub const KEY_VERSION: u32 = 2;
/// KDF identifier: Argon2id, version 0x13.
const KDF_ARGON2ID: u32 = 1;
/// KDF identifier: a key file's secret, keyed-hashed with the salt (no password KDF).
const KDF_KEY_FILE: u32 = 2;
/// Most memory a key object may ask the KDF for (2 GiB): a forged key object must not be able
/// to make an unlock allocate without bound.
const MAX_M_KIB: u32 = 2 << 20;

/// Argon2id parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for KdfParams {
    /// 64 MiB and 12 passes: about 0.5 s on the machines sbk is measured on (docs/benchmarks.md,
    /// "Encryption"), so that guessing passwords costs an attacker 0.5 s and 64 MiB a guess.
    fn default() -> Self {
        KdfParams {
            m_kib: 64 << 10,
            t: 12,
            p: 1,
        }
    }
}

impl KdfParams {
    /// A profile that costs nothing, for tests only (the CLI offers it only through a variable
    /// documented as test-only): it protects no password.
    pub fn weak() -> Self {
        KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        }
    }

    /// Checks the parameters' bounds.
    pub(crate) fn check(&self) -> Result<argon2::Params, DecodeError> {
        if self.m_kib > MAX_M_KIB || self.t == 0 || self.t > 1000 || self.p == 0 || self.p > 16 {
            return Err(invalid(
                "kdf parameters",
                format!("m {} KiB, t {}, p {}", self.m_kib, self.t, self.p),
            ));
        }
        argon2::Params::new(self.m_kib, self.t, self.p, Some(32))
            .map_err(|e| invalid("kdf parameters", e.to_string()))
    }

    /// The key `password` and `salt` derive.
    pub fn derive(&self, password: &[u8], salt: &[u8; 16]) -> Result<[u8; 32], DecodeError> {
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            self.check()?,
        );
        let mut out = [0u8; 32];
        argon
            .hash_password_into(password, salt, &mut out)
            .map_err(|e| invalid("kdf", e.to_string()))?;
        Ok(out)
    }
}

/// How a key object's wrapping key is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    /// From a password, with Argon2id and these parameters.
    Argon2id(KdfParams),
    /// From a key file's 32-byte random secret: `BLAKE3-keyed(secret, salt)`.
    KeyFile,
}

impl Kdf {
    /// The identifier and the three parameter fields the key object stores.
    fn fields(&self) -> [u32; 4] {
        match self {
            Kdf::Argon2id(p) => [KDF_ARGON2ID, p.m_kib, p.t, p.p],
            Kdf::KeyFile => [KDF_KEY_FILE, 0, 0, 0],
        }
    }

    /// The wrapping key `secret` (a password, or a key file's secret) and `salt` give.
    fn derive(&self, secret: &[u8], salt: &[u8; 16]) -> Result<[u8; 32], DecodeError> {
        match self {
            Kdf::Argon2id(p) => p.derive(secret, salt),
            Kdf::KeyFile => {
                let key: &[u8; 32] = secret
                    .try_into()
                    .map_err(|_| invalid("key file secret", "not 32 bytes"))?;
                Ok(*blake3::keyed_hash(key, salt).as_bytes())
            }
        }
    }
}

/// A key object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyObject {
    /// How the wrapping key is made.
    pub kdf: Kdf,
    /// Argon2id salt.
    pub salt: [u8; 16],
    /// Salt of the wrapping's AES-256-GCM key (derived from the password-derived key).
    pub wrap_salt: [u8; 24],
    /// The master key (64 bytes) encrypted, and its 16-byte tag: 80 bytes.
    pub wrapped: Vec<u8>,
    /// When it was made (seconds since the Unix epoch). Part of the associated data, so it
    /// cannot be changed without the password. (No host name: the repository keeps none in the
    /// clear.)
    pub created: i64,
}

/// Associated data of the wrapping: binds it to the repository and to the key's parameters.
fn aad(repo_id: &[u8; 16], kdf: &Kdf, salt: &[u8; 16], created: i64) -> Vec<u8> {
    let mut e = Encoder::default();
    e.bytes(b"sbk key").bytes(repo_id);
    for f in kdf.fields() {
        e.u32(f);
    }
    e.bytes(salt).i64(created);
    e.buf
}

impl KeyObject {
    /// Wraps `master` under `secret`: a password (Argon2id) or a key file's secret.
    pub fn wrap(
        master: &MasterKey,
        secret: &[u8],
        kdf: Kdf,
        repo_id: &[u8; 16],
        created: i64,
    ) -> std::io::Result<Self> {
        let salt: [u8; 16] = crate::id::random_bytes()?;
        let wrap_salt: [u8; 24] = crate::id::random_bytes()?;
        let mut kek = kdf
            .derive(secret, &salt)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut plain = master.to_bytes();
        let sealed =
            crate::crypto::seal_under(&kek, wrap_salt, &aad(repo_id, &kdf, &salt, created), &plain);
        kek.zeroize();
        plain.zeroize();
        let mut sealed = sealed?;
        // The sealed bytes start with the wrap salt, stored in its own field; the rest is
        // ciphertext and tag.
        let wrapped = sealed.split_off(24);
        Ok(KeyObject {
            kdf,
            salt,
            wrap_salt,
            wrapped,
            created,
        })
    }

    /// The master key, if `secret` (a password, or a key file's secret) is this key's. `None`
    /// is a wrong password (the object itself was checked when it was decoded).
    pub fn unwrap_with(
        &self,
        secret: &[u8],
        repo_id: &[u8; 16],
    ) -> Result<Option<MasterKey>, DecodeError> {
        let mut kek = self.kdf.derive(secret, &self.salt)?;
        let mut sealed = Vec::with_capacity(24 + self.wrapped.len());
        sealed.extend_from_slice(&self.wrap_salt);
        sealed.extend_from_slice(&self.wrapped);
        let aad = aad(repo_id, &self.kdf, &self.salt, self.created);
        let master = crate::crypto::open_under(&kek, &aad, &mut sealed)
            .ok()
            .and_then(MasterKey::from_bytes);
        kek.zeroize();
        sealed.zeroize();
        Ok(master)
    }

    /// Encodes the key object.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        let version = match self.kdf {
            Kdf::Argon2id(_) => 1,
            Kdf::KeyFile => KEY_VERSION,
        };
        e.bytes(KEY_MAGIC).u32(version);
        for f in self.kdf.fields() {
            e.u32(f);
        }
        e.bytes(&self.salt)
            .bytes(&self.wrap_salt)
            .bytes(&self.wrapped)
            .i64(self.created);
        e.finish_with_checksum()
    }

    /// Decodes and checks a key object (checksum, version, parameter bounds).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        // The checksum first: a damaged version field is damage (exit 12), not a newer format.
        let body = split_checksum(bytes)?;
        let mut d = Decoder::new(body);
        d.magic(KEY_MAGIC)?;
        let version = d.u32()?;
        if !(1..=KEY_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kdf_id = d.u32()?;
        let params = KdfParams {
            m_kib: d.u32()?,
            t: d.u32()?,
            p: d.u32()?,
        };
        let kdf = match kdf_id {
            // A password key object is always written as version 1: another is not one of ours.
            KDF_ARGON2ID if version != 1 => {
                return Err(invalid(
                    "key derivation",
                    "1 (password) in a version 2 key object",
                ))
            }
            KDF_ARGON2ID => {
                params.check()?;
                Kdf::Argon2id(params)
            }
            KDF_KEY_FILE if version < 2 => {
                return Err(invalid(
                    "key derivation",
                    "2 (key file) in a version 1 key object",
                ))
            }
            KDF_KEY_FILE
                if params
                    == (KdfParams {
                        m_kib: 0,
                        t: 0,
                        p: 0,
                    }) =>
            {
                Kdf::KeyFile
            }
            KDF_KEY_FILE => {
                return Err(invalid(
                    "key file parameters",
                    format!("must be zero: {params:?}"),
                ))
            }
            _ => {
                return Err(DecodeError::UnsupportedFeature(format!(
                    "key derivation {kdf_id}"
                )))
            }
        };
        let k = KeyObject {
            kdf,
            salt: d.array()?,
            wrap_salt: d.array()?,
            wrapped: d.bytes(64 + 16)?.to_vec(),
            created: d.i64()?,
        };
        d.end("key object")?;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let m = MasterKey::random().unwrap();
        let k = KeyObject::wrap(&m, b"pw", Kdf::Argon2id(KdfParams::weak()), &[1; 16], 7).unwrap();
        let k = KeyObject::decode(&k.encode()).unwrap();
        let got = k.unwrap_with(b"pw", &[1; 16]).unwrap().unwrap();
        assert_eq!(got.to_bytes(), m.to_bytes());
        assert!(k.unwrap_with(b"pW", &[1; 16]).unwrap().is_none());
        // The same key object under another repository's id does not open.
        assert!(k.unwrap_with(b"pw", &[2; 16]).unwrap().is_none());
        // A damaged key object is a decode error, not a wrong password.
        let bytes = k.encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(
                matches!(
                    KeyObject::decode(&bad),
                    Err(DecodeError::ChecksumMismatch { .. })
                ),
                "flip at {i}"
            );
        }
        // Its creation time is authenticated too.
        let mut moved = k.clone();
        moved.created += 1;
        assert!(moved.unwrap_with(b"pw", &[1; 16]).unwrap().is_none());
    }

    #[test]
    fn forged_parameters_are_refused_before_any_allocation() {
        let m = MasterKey::random().unwrap();
        let weak = KdfParams::weak();
        let mut k = KeyObject::wrap(&m, b"pw", Kdf::Argon2id(weak), &[1; 16], 0).unwrap();
        k.kdf = Kdf::Argon2id(KdfParams {
            m_kib: u32::MAX,
            ..weak
        });
        assert!(KeyObject::decode(&k.encode()).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = KeyObject::decode(&bytes);
        }
    }
}
