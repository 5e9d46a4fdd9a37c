//! The contract every [`Backend`] keeps, as one suite that runs against the local, in-memory
//! and S3 backends, so that the three cannot drift apart. Each check names the rule it found
//! broken.

use super::{Backend, Kind, Written};
use crate::error::StoreError;

/// Whether `r` says the object is missing.
fn missing<T>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::ObjectMissing { .. }))
}

/// Runs the contract against `backend`, which must be an empty place for a repository;
/// `storage_now` reads the storage's clock (this host's for local and S3 on this host, the
/// test's for memory). Leaves objects behind. Returns the first rule found broken, with the
/// backend's location.
pub fn check(backend: &dyn Backend, storage_now: &dyn Fn() -> i64) -> Result<(), String> {
    create(backend)
        .and_then(|()| creates_once(backend))
        .and_then(|()| missing_objects(backend))
        .and_then(|()| staged_objects(backend))
        .and_then(|()| listings(backend, storage_now))
        .and_then(|()| replace_and_delete(backend))
        .and_then(|()| racing_creates(backend))
        .and_then(|()| config(backend))
        .map_err(|e| format!("{}: {e}", backend.location()))
}

/// Fails with `rule` and what was found, unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $rule:expr, $($detail:tt)*) => {
        if !$cond {
            return Err(format!("{}: {}", $rule, format!($($detail)*)));
        }
    };
}

/// Create prepares an empty place, and may be asked again before a config exists.
fn create(backend: &dyn Backend) -> Result<(), String> {
    backend
        .create()
        .map_err(|e| format!("create on an empty place: {e}"))?;
    let again = backend.create();
    ensure!(
        matches!(again, Ok(()) | Err(StoreError::InitRefused { .. })),
        "create again before a config is written succeeds or refuses",
        "{again:?}"
    );
    Ok(())
}

/// A name is created once; kinds are separate namespaces.
fn creates_once(backend: &dyn Backend) -> Result<(), String> {
    let w = backend.write_once(Kind::Index, "aa01", b"one");
    ensure!(
        matches!(w, Ok(Written::Created)),
        "write_once creates",
        "{w:?}"
    );
    let w = backend.write_once(Kind::Index, "aa01", b"two");
    ensure!(
        matches!(w, Ok(Written::AlreadyThere)),
        "write_once of a taken name leaves it alone",
        "{w:?}"
    );
    let r = backend.read(Kind::Index, "aa01");
    ensure!(
        r.as_deref().ok() == Some(&b"one"[..]),
        "a name holds its first bytes",
        "{r:?}"
    );
    // Kinds are separate namespaces.
    backend
        .write_once(Kind::Snapshot, "aa01", b"snapshot")
        .map_err(|e| e.to_string())?;
    let r = backend.read(Kind::Index, "aa01");
    ensure!(
        r.as_deref().ok() == Some(&b"one"[..]),
        "kinds do not share names",
        "{r:?}"
    );
    Ok(())
}

/// Reads of what is not there are `ObjectMissing`.
fn missing_objects(backend: &dyn Backend) -> Result<(), String> {
    let mut buf = [0u8; 4];
    ensure!(
        missing(&backend.read(Kind::Index, "ffff")),
        "read of a missing object is ObjectMissing",
        ""
    );
    ensure!(
        missing(&backend.read_at(Kind::Pack, "ffff", 0, &mut buf)),
        "read_at of a missing object is ObjectMissing",
        ""
    );
    ensure!(
        missing(&backend.size(Kind::Pack, "ffff")),
        "size of a missing object is ObjectMissing",
        ""
    );
    Ok(())
}

/// Staged objects appear whole under their name, or not at all.
fn staged_objects(backend: &dyn Backend) -> Result<(), String> {
    let mut buf = [0u8; 4];
    let mut s = backend
        .stage(Kind::Pack, "abcd")
        .map_err(|e| e.to_string())?;
    s.write(b"hello ").map_err(|e| e.to_string())?;
    s.write(b"world").map_err(|e| e.to_string())?;
    ensure!(
        s.len() == 11,
        "a staged object counts its bytes",
        "{}",
        s.len()
    );
    let listed = backend.list(Kind::Pack).map_err(|e| e.to_string())?;
    ensure!(
        listed.is_empty(),
        "a staged object is not listed",
        "{listed:?}"
    );
    ensure!(
        missing(&backend.read(Kind::Pack, "abcd")),
        "a staged object cannot be read",
        ""
    );
    s.finish().map_err(|e| e.to_string())?;
    backend
        .read_at(Kind::Pack, "abcd", 6, &mut buf[..4])
        .map_err(|e| e.to_string())?;
    ensure!(&buf == b"worl", "read_at reads from its offset", "{buf:?}");
    backend
        .read_at(Kind::Pack, "abcd", 3, &mut [])
        .map_err(|e| format!("an empty read_at: {e}"))?;
    let short = backend.read_at(Kind::Pack, "abcd", 8, &mut buf);
    ensure!(
        matches!(
            short,
            Err(StoreError::ShortObject {
                needed: 12,
                size: 11,
                ..
            })
        ),
        "a read past the end is ShortObject with the sizes",
        "{short:?}"
    );
    let size = backend.size(Kind::Pack, "abcd");
    ensure!(
        matches!(size, Ok(11)),
        "size is the object's length",
        "{size:?}"
    );
    let mut dropped = backend
        .stage(Kind::Pack, "abce")
        .map_err(|e| e.to_string())?;
    dropped.write(b"abandoned").map_err(|e| e.to_string())?;
    drop(dropped);
    ensure!(
        missing(&backend.read(Kind::Pack, "abce")),
        "a staged object dropped unfinished never appears",
        ""
    );
    Ok(())
}

/// Listings are sorted by name, with sizes and the storage's times.
fn listings(backend: &dyn Backend, storage_now: &dyn Fn() -> i64) -> Result<(), String> {
    backend
        .write_once(Kind::Pack, "0001", b"x")
        .map_err(|e| e.to_string())?;
    let now = storage_now();
    let listed = backend.list(Kind::Pack).map_err(|e| e.to_string())?;
    let names: Vec<(&str, u64)> = listed.iter().map(|o| (o.name.as_str(), o.size)).collect();
    ensure!(
        names == [("0001", 1), ("abcd", 11)],
        "list shows every finished object of its kind, sorted, with its size",
        "{names:?}"
    );
    for o in &listed {
        ensure!(
            (now - 5..=now + 5).contains(&o.modified),
            "list gives the time the storage wrote an object",
            "{} at {}, the storage's now is {now}",
            o.name,
            o.modified
        );
    }
    Ok(())
}

/// Replace changes only what is there; delete says when nothing was.
fn replace_and_delete(backend: &dyn Backend) -> Result<(), String> {
    let r = backend.replace(Kind::Lock, "l1", b"x");
    ensure!(
        missing(&r),
        "replace of a missing object is ObjectMissing",
        "{r:?}"
    );
    ensure!(
        missing(&backend.read(Kind::Lock, "l1")),
        "a failed replace creates nothing",
        ""
    );
    backend
        .write_once(Kind::Lock, "l1", b"x")
        .map_err(|e| e.to_string())?;
    backend
        .replace(Kind::Lock, "l1", b"yy")
        .map_err(|e| format!("replace of an existing object: {e}"))?;
    let r = backend.read(Kind::Lock, "l1");
    ensure!(
        r.as_deref().ok() == Some(&b"yy"[..]),
        "replace swaps the bytes",
        "{r:?}"
    );
    let names: Vec<String> = backend
        .list(Kind::Lock)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|o| o.name)
        .collect();
    ensure!(names == ["l1"], "replace leaves one object", "{names:?}");

    // Delete.
    backend
        .delete(Kind::Lock, "l1")
        .map_err(|e| format!("delete: {e}"))?;
    ensure!(
        missing(&backend.read(Kind::Lock, "l1")),
        "a deleted object is gone",
        ""
    );
    ensure!(
        missing(&backend.delete(Kind::Lock, "l1")),
        "delete of a missing object is ObjectMissing",
        ""
    );
    Ok(())
}

/// Writers racing for one name: exactly one wins, and the name holds its bytes.
fn racing_creates(backend: &dyn Backend) -> Result<(), String> {
    let results: Vec<(u8, Result<Written, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                s.spawn(move || {
                    let r = backend.write_once(Kind::Snapshot, "race", &[i; 64]);
                    (i, r.map_err(|e| e.to_string()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });
    let winners: Vec<u8> = results
        .iter()
        .filter(|(_, r)| matches!(r, Ok(Written::Created)))
        .map(|(i, _)| *i)
        .collect();
    ensure!(
        winners.len() == 1 && results.iter().all(|(_, r)| r.is_ok()),
        "one of several racing write_once calls wins",
        "{results:?}"
    );
    let r = backend.read(Kind::Snapshot, "race");
    ensure!(
        r.as_deref().ok() == Some(&[winners[0]; 64][..]),
        "the winner's bytes are kept",
        "{r:?}"
    );
    Ok(())
}

/// The config is written once, listed, and makes a place a repository.
fn config(backend: &dyn Backend) -> Result<(), String> {
    backend
        .write_once(Kind::Config, "config", b"cfg")
        .map_err(|e| e.to_string())?;
    let listed = backend.list(Kind::Config).map_err(|e| e.to_string())?;
    ensure!(
        listed.len() == 1 && listed[0].name == "config" && listed[0].size == 3,
        "the config is listed",
        "{listed:?}"
    );
    let again = backend.create();
    ensure!(
        matches!(again, Err(StoreError::InitRefused { .. })),
        "create refuses a place that holds a repository",
        "{again:?}"
    );
    Ok(())
}
