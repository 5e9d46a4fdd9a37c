//! Key objects: the master key wrapped for each password.

use crate::backend::{Backend, Kind};
use crate::clock::unix_now;
use crate::config::RepoConfig;
use crate::crypto::{Crypto, MasterKey};
use crate::error::{DecodeError, Result, StoreError};
use crate::key::{KdfParams, KeyObject};

use super::Repository;

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

    /// Adds a key object for `password`: the same master key, wrapped again.
    pub fn add_key(&self, password: &str, kdf: KdfParams) -> Result<String> {
        let Crypto::Sealed { key: master, .. } = self.crypto.as_ref() else {
            return Err(StoreError::NotEncrypted);
        };
        kdf.check()
            .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
        let io = |e| StoreError::io("key", e);
        let key = KeyObject::wrap(
            master,
            password.as_bytes(),
            kdf,
            &self.config.repo_id,
            unix_now(),
        )
        .map_err(io)?;
        let name = crate::id::to_hex(&crate::id::random_bytes::<16>().map_err(io)?);
        self.b()?.write_once(Kind::Key, &name, &key.encode())?;
        Ok(name)
    }

    /// Removes a key object. The last readable one, and the one that opened the repository,
    /// are refused (change its password instead).
    pub fn remove_key(&self, name: &str) -> Result<()> {
        let keys = self.keys()?;
        let Some(target) = keys.iter().find(|k| k.name == name) else {
            return Err(StoreError::ObjectMissing {
                kind: Kind::Key,
                name: name.to_owned(),
            });
        };
        if target.current {
            return Err(StoreError::KeyRefused(
                "it is the key this command was opened with; use `sbk key passwd` to change its password".into(),
            ));
        }
        if keys
            .iter()
            .filter(|k| k.key.is_ok() && k.name != name)
            .count()
            == 0
        {
            return Err(StoreError::KeyRefused(
                "it is the last readable key: without it nobody could open the repository".into(),
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

/// Tries `password` on every key object: the master key of the first that opens, and its name.
pub(super) fn unlock(
    backend: &dyn Backend,
    keys: &[crate::backend::ObjectInfo],
    config: &RepoConfig,
    password: &[u8],
) -> Result<(String, MasterKey)> {
    let mut damaged = Vec::new();
    let mut tried = 0;
    for o in keys {
        let key = match backend.read(Kind::Key, &o.name) {
            Ok(bytes) => KeyObject::decode(&bytes),
            Err(StoreError::ObjectMissing { .. }) => continue,
            Err(e) => return Err(e),
        };
        match key {
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
