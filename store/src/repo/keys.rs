//! Key objects: the master key wrapped for each password and each key file.

use crate::backend::{Backend, Kind};
use crate::clock::unix_now;
use crate::config::RepoConfig;
use crate::crypto::{Crypto, MasterKey};
use crate::error::{DecodeError, Result, StoreError};
use crate::key::{Kdf, KdfParams, KeyObject};
use crate::key_file::KeyFile;

use super::Repository;

/// What opens an encrypted repository.
#[derive(Debug)]
pub enum Credential {
    /// A password, tried on every password key object (Argon2id each).
    Password(String),
    /// A key file, which names its key object (no KDF).
    KeyFile(KeyFile),
}

/// A key object as `key list` shows it.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    /// The key object's name.
    pub name: String,
    /// Its contents, or why they could not be read.
    pub key: std::result::Result<KeyObject, DecodeError>,
    /// True for the key that opened the repository.
    pub current: bool,
}

impl Repository {
    /// Every key object, with the one that opened the repository marked.
    pub fn keys(&self) -> Result<Vec<KeyInfo>> {
        let b = self.b()?;
        let mut out = Vec::new();
        for o in b.list(Kind::Key)? {
            let key = match b.read(Kind::Key, &o.name) {
                Ok(bytes) => KeyObject::decode(&bytes),
                Err(StoreError::ObjectMissing { .. }) => continue,
                Err(e) => return Err(e),
            };
            out.push(KeyInfo {
                current: self.key_name.as_deref() == Some(o.name.as_str()),
                name: o.name,
                key,
            });
        }
        Ok(out)
    }

    /// Refuses to manage keys from a repository opened with a key file: a mover's key file
    /// (the one thing a stolen mover holds) must not be able to add a key that outlives its
    /// revocation, nor remove the operators' passwords.
    fn refuse_if_key_file(&self) -> Result<()> {
        let opened_by_file = self.keys()?.into_iter().any(|k| {
            k.current
                && matches!(
                    k.key,
                    Ok(KeyObject {
                        kdf: Kdf::KeyFile,
                        ..
                    })
                )
        });
        if opened_by_file {
            return Err(StoreError::KeyRefused(
                "keys are managed with a password, not a key file: a key file is for backups, and one taken from a mover must not be able to add or remove keys".into(),
            ));
        }
        Ok(())
    }

    /// Adds a key object for `password`: the same master key, wrapped again.
    pub fn add_key(&self, password: &str, kdf: KdfParams) -> Result<String> {
        self.refuse_if_key_file()?;
        kdf.check()
            .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
        let io = |e| StoreError::io("key", e);
        let name = crate::id::to_hex(&crate::id::random_bytes::<16>().map_err(io)?);
        self.write_key(&name, password.as_bytes(), Kdf::Argon2id(kdf))?;
        Ok(name)
    }

    /// Adds a key object for a new key file written to `path` (which must not exist): the file
    /// first, durable, then the key object it names. A crash in between leaves a file that opens
    /// nothing; an object whose file was lost never exists. Returns the key's name.
    pub fn add_key_file(&self, path: &std::path::Path) -> Result<String> {
        if !self.config.is_encrypted() {
            return Err(StoreError::NotEncrypted);
        }
        self.refuse_if_key_file()?;
        let file = KeyFile::random(self.config.repo_id).map_err(|e| StoreError::io(path, e))?;
        file.create(path)?;
        let name = file.name();
        if let Err(e) = self.write_key(&name, file.secret(), Kdf::KeyFile) {
            // The file would open nothing: do not leave it looking like a key.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(name)
    }

    /// Writes key object `name`: the master key wrapped under `secret` by `kdf`.
    fn write_key(&self, name: &str, secret: &[u8], kdf: Kdf) -> Result<()> {
        let Crypto::Sealed { key: master, .. } = self.crypto.as_ref() else {
            return Err(StoreError::NotEncrypted);
        };
        let key = KeyObject::wrap(master, secret, kdf, &self.config.repo_id, unix_now())
            .map_err(|e| StoreError::io("key", e))?;
        self.b()?.write_once(Kind::Key, name, &key.encode())?;
        Ok(())
    }

    /// Removes a key object. The last password key, and the one that opened the repository,
    /// are refused (change its password instead); so is any removal by a key file.
    pub fn remove_key(&self, name: &str) -> Result<()> {
        self.refuse_if_key_file()?;
        let keys = self.keys()?;
        let Some(target) = keys.iter().find(|k| k.name == name) else {
            return Err(StoreError::ObjectMissing {
                kind: Kind::Key,
                name: name.to_owned(),
            });
        };
        if target.current {
            return Err(StoreError::KeyRefused(
                "cannot remove the key this command was opened with: open with another key to remove it (or `sbk key passwd` to change a password)".into(),
            ));
        }
        // Key files are on movers; a password key is what an operator recovers with.
        let is_password = |k: &KeyInfo| {
            matches!(
                k.key,
                Ok(KeyObject {
                    kdf: Kdf::Argon2id(_),
                    ..
                })
            )
        };
        let others = keys.iter().filter(|k| k.name != name);
        if !others.clone().any(is_password) && (is_password(target) || others.count() == 0) {
            return Err(StoreError::KeyRefused(
                "cannot remove the last password key: without it only key files (on movers) could open the repository".into(),
            ));
        }
        self.b()?.delete(Kind::Key, name)
    }

    /// Changes the password of the key that opened the repository: a new key object first,
    /// then the old one removed (a crash in between leaves both, never neither).
    pub fn change_password(&self, password: &str, kdf: KdfParams) -> Result<String> {
        let new = self.add_key(password, kdf)?;
        if let Some(old) = &self.key_name {
            self.b()?.delete(Kind::Key, old)?;
        }
        Ok(new)
    }
}

/// Opens the master key with `credential`: a key file's own key object, or the first password
/// key object the password opens. Returns the key object's name too.
pub(super) fn unlock(
    backend: &dyn Backend,
    keys: &[crate::backend::ObjectInfo],
    config: &RepoConfig,
    credential: &Credential,
) -> Result<(String, MasterKey)> {
    let password = match credential {
        Credential::Password(p) => p.as_bytes(),
        Credential::KeyFile(file) => return unlock_key_file(backend, config, file),
    };
    let mut damaged = Vec::new();
    let mut tried = 0;
    let mut key_files = 0;
    for o in keys {
        let key = match backend.read(Kind::Key, &o.name) {
            Ok(bytes) => KeyObject::decode(&bytes),
            Err(StoreError::ObjectMissing { .. }) => continue,
            Err(e) => return Err(e),
        };
        match key {
            // Key files' objects open with their file only.
            Ok(KeyObject {
                kdf: Kdf::KeyFile, ..
            }) => key_files += 1,
            Ok(k) => {
                tried += 1;
                let master = k.unwrap_with(password, &config.repo_id).map_err(|source| {
                    StoreError::Corrupt {
                        path: Kind::Key.object_path(&o.name),
                        what: "key object",
                        source,
                    }
                })?;
                if let Some(m) = master {
                    return Ok((o.name.clone(), m));
                }
            }
            Err(source) => damaged.push(StoreError::Corrupt {
                path: Kind::Key.object_path(&o.name),
                what: "key object",
                source,
            }),
        }
    }
    if tried == 0 && key_files > 0 {
        return Err(StoreError::OnlyKeyFiles { key_files });
    }
    if tried == 0 {
        // No key object could even be read: damage, not a wrong password.
        return Err(damaged.into_iter().next().unwrap_or(StoreError::Corrupt {
            path: "keys".into(),
            what: "key objects",
            source: DecodeError::Invalid {
                field: "keys",
                detail: "the repository is encrypted but holds no key object".into(),
            },
        }));
    }
    Err(StoreError::WrongPassword {
        tried,
        damaged: damaged.len(),
    })
}

/// Opens the master key with a key file: its repository, its key object (gone: revoked), its
/// secret. Every refusal names the key file's key and is a credential error (exit 19).
fn unlock_key_file(
    backend: &dyn Backend,
    config: &RepoConfig,
    file: &KeyFile,
) -> Result<(String, MasterKey)> {
    let name = file.name();
    let refuse = |what: String| StoreError::KeyFileRefused {
        key: name.clone(),
        what,
    };
    if file.repo_id != config.repo_id {
        return Err(refuse(format!(
            "it is a key of repository {}, not of this one ({})",
            crate::id::to_hex(&file.repo_id),
            config.id_hex()
        )));
    }
    let bytes = match backend.read(Kind::Key, &name) {
        Ok(b) => b,
        Err(StoreError::ObjectMissing { .. }) => {
            return Err(refuse(
                "its key object is gone: the key was removed (revoked) from the repository".into(),
            ))
        }
        Err(e) => return Err(e),
    };
    let corrupt = |source| StoreError::Corrupt {
        path: Kind::Key.object_path(&name),
        what: "key object",
        source,
    };
    let key = KeyObject::decode(&bytes).map_err(corrupt)?;
    if key.kdf != Kdf::KeyFile {
        return Err(refuse("its key object is a password key".into()));
    }
    match key
        .unwrap_with(file.secret(), &config.repo_id)
        .map_err(corrupt)?
    {
        Some(master) => Ok((name, master)),
        None => Err(refuse("its secret does not open its key object".into())),
    }
}
