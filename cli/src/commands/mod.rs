//! One module per command: an `Args` struct (clap derive) and a `run` function.

pub mod backup;
pub mod cat;
pub mod console;
pub mod copy;
pub mod diff;
pub mod extract;
pub mod files;
pub mod forget;
pub mod generate;
pub mod init;
pub mod key;
pub mod ls;
pub mod mount;
pub mod prune;
pub mod repair;
pub mod restore;
pub mod run;
pub mod serve;
pub mod snapshots;
pub mod stats;
pub mod unlock;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sbk_store::{
    Backend, CacheLocation, CountingBackend, FaultMode, FaultyBackend, LocalBackend, Lock,
    LockKind, LockTiming, ReadCount, Repository, FAULT_ENV,
};

use sbk_s3::{S3Backend, S3Location};

use crate::exit::{Exit, ExitWith};
use crate::output::Output;
use crate::password::PasswordSource;

/// Test-only: lock refresh interval in milliseconds (default 5 minutes), so that a test of a
/// failing refresh takes seconds.
pub const LOCK_REFRESH_ENV: &str = "SBK_TEST_LOCK_REFRESH_MS";
/// Test-only: lock lease in seconds (default 30 minutes).
pub const LOCK_LEASE_ENV: &str = "SBK_TEST_LOCK_LEASE_SECS";

/// What every command gets from the global options.
pub struct Context {
    /// `--repo` / `SBK_REPO`.
    pub repo: Option<PathBuf>,
    /// `--threads`, or the number of CPUs.
    pub threads: usize,
    /// Where results go.
    pub out: Output,
    /// `--cache-dir` / `--no-cache`.
    pub cache: CacheLocation,
    /// Where the repository password comes from.
    pub password: PasswordSource,
    /// `--as-of`: read the repository as it was then.
    pub as_of: Option<AsOf>,
}

/// A past time to read a repository as of (`--as-of`, `copy --from-as-of`).
#[derive(Debug, Clone)]
pub struct AsOf {
    /// The time as given, for messages.
    pub label: String,
    /// An absolute time (seconds since the Unix epoch), or how long ago by the storage's clock.
    pub when: When,
}

/// When an [`AsOf`] is.
#[derive(Debug, Clone, Copy)]
pub enum When {
    /// At this time (seconds since the Unix epoch).
    At(i64),
    /// This many seconds before the storage's now.
    Ago(u64),
}

/// Parses `--as-of`: an RFC 3339 time, or a duration ago (`2d`, `90m`).
pub fn parse_as_of(s: &str) -> std::result::Result<AsOf, String> {
    let when = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => When::At(match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }),
        Err(_) => match humantime::parse_duration(s) {
            Ok(d) => When::Ago(d.as_secs()),
            Err(_) => {
                return Err(format!(
                    "{s:?} is neither a time (2026-12-01T03:00:00Z) nor a duration ago (2d, 12h)"
                ))
            }
        },
    };
    Ok(AsOf {
        label: s.to_owned(),
        when,
    })
}

impl AsOf {
    /// `backend` as it was at this time. Storage without versions is a usage error (exit 2).
    pub fn view(&self, backend: Arc<dyn Backend>) -> Result<Arc<dyn Backend>> {
        let Some(versions) = backend.versions() else {
            return Err(ExitWith(
                Exit::Usage,
                format!(
                    "{}: --as-of needs an s3:// repository whose bucket keeps object versions (Object Lock); a local repository keeps only its current files",
                    backend.location()
                ),
            )
            .into());
        };
        // One request, which also sets the storage's clock and hears of a missing bucket.
        if !versions.keeps_versions()? {
            return Err(ExitWith(
                Exit::Usage,
                format!(
                    "{}: --as-of needs a bucket that keeps object versions (versioning or Object Lock on); this one keeps only the current objects",
                    backend.location()
                ),
            )
            .into());
        }
        let at = match self.when {
            When::At(t) => t,
            When::Ago(secs) => versions.storage_now() - secs as i64,
        };
        Ok(Arc::new(sbk_store::AsOfBackend::new(
            backend,
            at,
            &self.label,
        )?))
    }
}

impl Context {
    /// The repository path, or an error that says how to give one.
    pub fn repo_path(&self) -> Result<&PathBuf> {
        self.repo.as_ref().ok_or_else(|| {
            ExitWith(
                Exit::NoRepository,
                "no repository given: use --repo DIR or set SBK_REPO".into(),
            )
            .into()
        })
    }

    /// The backend of the repository (with a fault injected when the test-only
    /// `SBK_TEST_FAULT` asks for one).
    pub fn backend(&self) -> Result<Arc<dyn Backend>> {
        let backend = self.backend_at(self.repo_path()?)?;
        match &self.as_of {
            Some(as_of) => as_of.view(backend),
            None => Ok(backend),
        }
    }

    /// The backend of the repository at `path` (a directory or an `s3://` location).
    pub fn backend_at(&self, path: &std::path::Path) -> Result<Arc<dyn Backend>> {
        let local: Arc<dyn Backend> = match path.to_str().filter(|s| S3Location::is_s3(s)) {
            Some(s) => {
                let at = S3Location::parse(s).map_err(|e| ExitWith(Exit::Usage, e))?;
                Arc::new(S3Backend::new(at)?)
            }
            None => Arc::new(LocalBackend::new(path)),
        };
        Ok(
            match std::env::var(FAULT_ENV)
                .ok()
                .as_deref()
                .map(FaultMode::parse)
            {
                None => local,
                Some(Some((mode, at))) => Arc::new(FaultyBackend::new(local, mode, at)),
                Some(None) => {
                    return Err(ExitWith(
                        Exit::Usage,
                        format!("{FAULT_ENV} must be fail:N or crash:N (N from 1)"),
                    )
                    .into())
                }
            },
        )
    }

    /// Lock timing: the defaults, unless the test-only variables set them.
    fn lock_timing() -> LockTiming {
        let env = |v| std::env::var(v).ok().and_then(|s| s.parse::<u64>().ok());
        let mut t = LockTiming::default();
        if let Some(ms) = env(LOCK_REFRESH_ENV) {
            t.refresh = Duration::from_millis(ms.max(1));
        }
        if let Some(s) = env(LOCK_LEASE_ENV) {
            t.lease = Duration::from_secs(s.max(1));
        }
        t
    }

    /// Opens the repository (its config, and its key when it is encrypted: no index, no
    /// lock).
    pub fn open_repo(&self) -> Result<Repository> {
        self.open_repo_on(self.backend()?)
    }

    fn open_repo_on(&self, backend: Arc<dyn Backend>) -> Result<Repository> {
        let repo = Repository::open_with(backend, &mut || self.password.credential())?;
        repo.use_manifest_cache(&self.cache);
        Ok(repo)
    }

    /// Opens the repository with its reads counted, takes a lock, loads the index (for the
    /// commands that report `repository_bytes_read`).
    pub fn open_counted(
        &self,
        kind: LockKind,
        purpose: &str,
    ) -> Result<(Repository, Lock, Arc<ReadCount>)> {
        let (backend, count) = CountingBackend::new(self.backend()?);
        let repo = self.open_repo_on(Arc::new(backend))?;
        let lock = self.lock(&repo, kind, purpose)?;
        self.load_index(&repo)?;
        Ok((repo, lock, count))
    }

    /// Loads the index through the cache, saying what that found.
    pub fn load_index(&self, repo: &Repository) -> Result<()> {
        let r = repo.load_index(&self.cache)?;
        for n in &r.notices {
            self.out.notice(n);
        }
        for (id, why) in &r.damaged {
            self.out.notice(&format!(
                "index file {id} cannot be read: {why}; its packs are not used for dedup (run `sbk verify`, then `sbk repair index`)"
            ));
        }
        Ok(())
    }

    /// Takes a lock on an open repository.
    pub fn lock(&self, repo: &Repository, kind: LockKind, purpose: &str) -> Result<Lock> {
        Ok(repo.lock(kind, purpose, Self::lock_timing())?)
    }

    /// Opens the repository, takes a lock, then (if asked) loads the index: nothing is written
    /// to the repository or the cache before the lock is held.
    pub fn open_locked(
        &self,
        kind: LockKind,
        purpose: &str,
        with_index: bool,
    ) -> Result<(Repository, Lock)> {
        let repo = self.open_repo()?;
        let lock = self.lock(&repo, kind, purpose)?;
        if with_index {
            self.load_index(&repo)?;
        }
        Ok((repo, lock))
    }
}

/// The password options of another repository (`copy --from-repo`, `init
/// --copy-chunker-params-from`).
#[derive(clap::Args, Debug, Clone)]
pub struct FromPassword {
    /// Read the other repository's password from the first line of FILE (SBK_FROM_PASSWORD, if
    /// set, comes first; with neither, the password options of --repo apply).
    #[arg(
        long,
        value_name = "FILE",
        hide_env_values = true,
        env = "SBK_FROM_PASSWORD_FILE"
    )]
    from_password_file: Option<PathBuf>,

    /// Run CMD with `sh -c` and read the other repository's password from its first line.
    #[arg(
        long,
        value_name = "CMD",
        hide_env_values = true,
        env = "SBK_FROM_PASSWORD_COMMAND"
    )]
    from_password_command: Option<String>,

    /// Open the other repository with this key file (before any of its password options).
    #[arg(long, value_name = "FILE", env = "SBK_FROM_KEY_FILE")]
    from_key_file: Option<PathBuf>,
}

impl Context {
    /// Opens another repository (no lock, no index) with the `--from-*` password options.
    pub fn open_other(&self, path: &std::path::Path, pw: &FromPassword) -> Result<Repository> {
        self.open_other_as_of(path, pw, None)
    }

    /// [`Context::open_other`], as it was at a past time when `as_of` says so.
    pub fn open_other_as_of(
        &self,
        path: &std::path::Path,
        pw: &FromPassword,
        as_of: Option<&AsOf>,
    ) -> Result<Repository> {
        let given = std::env::var_os("SBK_FROM_PASSWORD").is_some()
            || pw.from_password_file.is_some()
            || pw.from_password_command.is_some()
            || pw.from_key_file.is_some();
        let source = if given {
            PasswordSource {
                file: pw.from_password_file.clone(),
                command: pw.from_password_command.clone(),
                env: Some("SBK_FROM_PASSWORD".into()),
                key_file: pw.from_key_file.clone(),
            }
        } else {
            // The same password, but never `--repo`'s key file: a key file opens one repository.
            PasswordSource {
                key_file: None,
                ..self.password.clone()
            }
        };
        let backend = match as_of {
            Some(as_of) => as_of.view(self.backend_at(path)?)?,
            None => self.backend_at(path)?,
        };
        Ok(Repository::open_with(backend, &mut || source.credential())?)
    }
}
