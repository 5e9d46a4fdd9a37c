//! `sbk key`: the key objects of an encrypted repository.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::exit::Exit;
use crate::password::PasswordSource;
use sbk_store::Kdf;

/// Manage the passwords and key files of an encrypted repository.
///
/// A repository has a random master key, stored wrapped by each of its keys: one per password
/// or key file (one per operator or data mover host). A key file opens the repository without a
/// password KDF (`--key-file FILE`, `SBK_KEY_FILE`): it is as sensitive as the data. These commands add, remove and rewrap keys; they
/// never change the master key itself. If a master key may have leaked, copy the snapshots into
/// a new repository (which has a new master key) and retire the old one.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// List the keys: id, time it was made, KDF parameters or "key file"; `*` marks the one
    /// this command was opened with.
    List,
    /// Add a key for another password (SBK_NEW_PASSWORD, --new-password-file, or asked), or,
    /// with --new-key-file FILE, a key file.
    Add(NewKey),
    /// Remove a key (a removed key file opens nothing any more). The last key, and the one this
    /// command was opened with, are refused.
    Remove {
        /// The key's id (as `key list` shows it; a unique prefix will do).
        id: String,
    },
    /// Change the password of the key the given password opens (a new key, then the old one
    /// removed).
    Passwd(NewPassword),
}

#[derive(clap::Args, Debug)]
struct NewKey {
    /// Write a new key file to FILE (mode 0600; an existing FILE is refused, exit 13) instead
    /// of adding a password.
    #[arg(long, value_name = "FILE", conflicts_with = "new_password_file")]
    new_key_file: Option<PathBuf>,

    /// Read the new password from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    new_password_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct NewPassword {
    /// Read the new password from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    new_password_file: Option<PathBuf>,
}

/// The first 8 characters of a key id (the whole name if it is shorter: a stray file).
fn short(name: &str) -> &str {
    name.get(..8).unwrap_or(name)
}

/// Runs `sbk key`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let repo = ctx.open_repo()?;
    if !repo.is_encrypted() {
        return Err(sbk_store::StoreError::NotEncrypted.into());
    }
    // Changing keys takes the repository to itself: two `key remove`s racing could otherwise
    // each remove the other's key and leave none.
    let _lock = match args.what {
        What::List => None,
        _ => Some(ctx.lock(&repo, sbk_store::LockKind::Exclusive, "key")?),
    };
    match args.what {
        What::List => {
            let keys = repo.keys()?;
            let mut json = Vec::new();
            for k in &keys {
                let mark = if k.current { "*" } else { " " };
                match &k.key {
                    Ok(key) => {
                        let made = sbk_records::time(key.created.saturating_mul(1_000_000_000));
                        let (what, kdf) = match key.kdf {
                            Kdf::Argon2id(p) => (
                                format!(
                                    "password (argon2id m={} KiB t={} p={})",
                                    p.m_kib, p.t, p.p
                                ),
                                serde_json::json!({"algorithm": "argon2id", "m_kib": p.m_kib, "t": p.t, "p": p.p}),
                            ),
                            Kdf::KeyFile => (
                                "key file".to_owned(),
                                serde_json::json!({"algorithm": "key-file"}),
                            ),
                        };
                        ctx.out.info(
                            &format!("{mark} {}  {}  {what}", short(&k.name), made),
                            false,
                        );
                        json.push(serde_json::json!({"id": k.name, "current": k.current, "created": made, "kind": if key.kdf == Kdf::KeyFile { "key-file" } else { "password" }, "kdf": kdf}));
                    }
                    Err(e) => {
                        ctx.out
                            .info(&format!("{mark} {}  damaged: {e}", &k.name[..8]), false);
                        json.push(serde_json::json!({"id": k.name, "current": k.current, "damaged": e.to_string()}));
                    }
                }
            }
            ctx.out.json(&serde_json::Value::Array(json), false);
        }
        What::Add(NewKey {
            new_key_file: Some(file),
            ..
        }) => {
            let id = repo.add_key_file(&file)?;
            ctx.out.info(
                &format!(
                    "added key {}: key file {} (mode 0600; whoever holds it opens the repository: keep it as you keep the data, and `sbk key remove {}` revokes it)",
                    short(&id),
                    file.display(),
                    short(&id)
                ),
                false,
            );
            ctx.out
                .json(&serde_json::json!({"added": id, "key_file": file}), false);
        }
        What::Add(n) => {
            let password = PasswordSource::new_password(n.new_password_file.as_ref())?;
            super::init::warn_weak_kdf(ctx);
            let id = repo.add_key(&password, super::init::kdf_params())?;
            ctx.out.info(&format!("added key {}", short(&id)), false);
            ctx.out.json(&serde_json::json!({"added": id}), false);
        }
        What::Remove { id } => {
            let keys = repo.keys()?;
            let matches: Vec<_> = keys.iter().filter(|k| k.name.starts_with(&id)).collect();
            let name = match matches.as_slice() {
                [one] => one.name.clone(),
                [] => anyhow::bail!(crate::exit::ExitWith(
                    Exit::Refused,
                    format!("no key matches {id:?}")
                )),
                _ => anyhow::bail!(crate::exit::ExitWith(
                    Exit::Refused,
                    format!("key prefix {id:?} is ambiguous")
                )),
            };
            repo.remove_key(&name)?;
            ctx.out
                .info(&format!("removed key {}", short(&name)), false);
            ctx.out.json(&serde_json::json!({"removed": name}), false);
        }
        What::Passwd(n) => {
            let password = PasswordSource::new_password(n.new_password_file.as_ref())?;
            super::init::warn_weak_kdf(ctx);
            let id = repo.change_password(&password, super::init::kdf_params())?;
            ctx.out.info(
                &format!("changed the password: new key {}", &id[..8]),
                false,
            );
            ctx.out.json(&serde_json::json!({"added": id}), false);
        }
    }
    Ok(Exit::Ok.into())
}
