//! The kinds of repository objects: what the backends and the errors name.

use std::fmt;

/// What an object is; each kind lives in its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The repository config (one object, named `config`).
    Config,
    /// Key objects (encryption; reserved by format v2, not written yet).
    Key,
    /// Pack files.
    Pack,
    /// Index files: blob -> pack, offset, length, for a set of packs.
    Index,
    /// Snapshot manifests.
    Snapshot,
    /// Lock objects.
    Lock,
    /// Pins: copies of the manifests a pin lock's holder serves, named `<lock>.<snapshot>`.
    Pin,
    /// Marks objects: the packs a prune run marked for deletion by a later one.
    Marks,
}

impl Kind {
    /// How messages name an object of this kind: its folder and its name (`packs/1f2e…`).
    pub fn object_path(self, name: &str) -> std::path::PathBuf {
        std::path::Path::new(self.dir()).join(name)
    }

    /// The kind's folder (local) or key prefix (object storage).
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Config => "",
            Kind::Key => "keys",
            Kind::Pack => "packs",
            Kind::Index => "index",
            Kind::Snapshot => "snapshots",
            Kind::Lock => "locks",
            Kind::Pin => "pins",
            Kind::Marks => "marks",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Config => "config",
            Kind::Key => "key",
            Kind::Pack => "pack",
            Kind::Index => "index file",
            Kind::Snapshot => "snapshot",
            Kind::Lock => "lock",
            Kind::Pin => "pin",
            Kind::Marks => "marks object",
        })
    }
}
