//! Key files: what an automated data mover opens a repository with instead of a password.
//!
//! A key file names one key object of one repository and holds a 32-byte random secret that
//! wraps the master key in that object (`Kdf::KeyFile`). The secret has full entropy, so no
//! password KDF stands between a mover and its repository (the Argon2id unlock costs about
//! 0.45 s on every command). Removing the key object (`sbk key remove`) revokes the file: the
//! secret alone unwraps nothing. A key file is as sensitive as the data: it is written mode 0600
//! and refused when group or others may read it. Byte layout: docs/format.md, "key file".

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

use crate::codec::{split_checksum, Decoder, Encoder};
use crate::error::{DecodeError, Result, StoreError};

/// Magic of a key file. Do not change.
pub const KEY_FILE_MAGIC: &[u8; 8] = b"SBKKEYF\0";
/// Key file format version.
pub const KEY_FILE_VERSION: u32 = 1;
/// A key file's length: magic, version, repository id, key name, secret, checksum.
const KEY_FILE_LEN: usize = 8 + 4 + 16 + 16 + 32 + 16;

/// A key file's contents.
pub struct KeyFile {
    /// The repository it opens (its config's `repo_id`).
    pub repo_id: [u8; 16],
    /// Its key object's name, as bytes (the object is `keys/<32 hex of these>`).
    pub key_name: [u8; 16],
    secret: [u8; 32],
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl std::fmt::Debug for KeyFile {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyFile(key {})", self.name())
    }
}

impl KeyFile {
    /// A new key file for repository `repo_id`: a random key name and secret.
    pub fn random(repo_id: [u8; 16]) -> std::io::Result<KeyFile> {
        Ok(KeyFile {
            repo_id,
            key_name: crate::id::random_bytes()?,
            secret: crate::id::random_bytes()?,
        })
    }

    /// The name of its key object.
    pub fn name(&self) -> String {
        crate::id::to_hex(&self.key_name)
    }

    /// The secret that wraps the master key in its key object.
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// Encodes the key file.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(KEY_FILE_MAGIC)
            .u32(KEY_FILE_VERSION)
            .bytes(&self.repo_id)
            .bytes(&self.key_name)
            .bytes(&self.secret);
        e.finish_with_checksum()
    }

    /// Decodes and checks a key file (checksum first, then version).
    pub fn decode(bytes: &[u8]) -> std::result::Result<KeyFile, DecodeError> {
        let body = split_checksum(bytes)?;
        let mut d = Decoder::new(body);
        d.magic(KEY_FILE_MAGIC)?;
        let version = d.u32()?;
        if version != KEY_FILE_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let k = KeyFile {
            repo_id: d.array()?,
            key_name: d.array()?,
            secret: d.array()?,
        };
        d.end("key file")?;
        Ok(k)
    }

    /// Reads the key file at `path`: refused when it is not a regular file of this user (or
    /// root), when group or others have any access to it (a key file is as sensitive as the
    /// data), when it is not a key file, or when it is damaged. Checked on the open file, so what
    /// is checked is what is read.
    pub fn load(path: &Path) -> Result<KeyFile> {
        let refuse = |what: String| StoreError::KeyFile {
            path: path.to_owned(),
            what,
        };
        let cannot = |e: std::io::Error| refuse(format!("cannot read it: {e}"));
        // O_NONBLOCK: a FIFO put in its place is refused below instead of hanging the open.
        let f = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)
            .map_err(cannot)?;
        let meta = f.metadata().map_err(cannot)?;
        if !meta.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        // This process's user: the owner of /proc/self (no unsafe call in this crate).
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if me.is_some_and(|me| meta.uid() != me) && meta.uid() != 0 {
            return Err(refuse(format!(
                "it belongs to user {}, not to you (or root)",
                meta.uid()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(refuse(format!(
                "its mode is {mode:04o}: group or others have access to it, and whoever reads it opens the repository; chmod 600 it (and ask who may have copied it)"
            )));
        }
        let mut bytes = Vec::with_capacity(KEY_FILE_LEN + 1);
        // At most one byte more than a key file: a larger file is not one, however it grows.
        f.take(KEY_FILE_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(cannot)?;
        let k = KeyFile::decode(&bytes).map_err(|e| refuse(format!("not a usable key file: {e}")));
        bytes.zeroize();
        k
    }

    /// Writes the key file to `path`, which must not exist (exit 13 if it does), mode 0600 from
    /// the start, fsynced with its directory entry: the key object it names is written only after
    /// this returns, so a key object never exists whose file was lost in a crash.
    pub fn create(&self, path: &Path) -> Result<()> {
        let io = |e| StoreError::io(path, e);
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::KeyRefused(format!(
                    "{} exists, and a key file is never written over one (it may be the only copy of another key)",
                    path.display()
                )),
                _ => io(e),
            })?;
        let mut bytes = self.encode();
        let written = f.write_all(&bytes).and_then(|()| f.sync_all());
        bytes.zeroize();
        if let Err(e) = written {
            // A part of a key file opens nothing, and would stop the next attempt (exit 13).
            let _ = std::fs::remove_file(path);
            return Err(io(e));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_damage() {
        let k = KeyFile::random([5; 16]).unwrap();
        let bytes = k.encode();
        assert_eq!(bytes.len(), KEY_FILE_LEN);
        let back = KeyFile::decode(&bytes).unwrap();
        assert_eq!(
            (back.repo_id, back.key_name, back.secret),
            (k.repo_id, k.key_name, k.secret)
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(KeyFile::decode(&bad).is_err(), "flip at {i}");
        }
        assert!(!format!("{k:?}").contains(&crate::id::to_hex(&k.secret)));
    }

    #[test]
    fn created_0600_never_over_a_file_and_refused_when_others_may_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mover.key");
        let k = KeyFile::random([5; 16]).unwrap();
        k.create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(KeyFile::load(&path).unwrap().secret, k.secret);
        assert!(matches!(k.create(&path), Err(StoreError::KeyRefused(_))));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = KeyFile::load(&path).unwrap_err();
        assert!(e.to_string().contains("0640"), "{e}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = KeyFile::decode(&bytes);
        }
    }
}
