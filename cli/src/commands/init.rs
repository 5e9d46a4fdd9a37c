//! `sbk init`: create a repository.

use std::process::ExitCode;

use anyhow::Result;
use sbk_store::{InitOptions, Repository};

use super::Context;
use crate::exit::Exit;
use crate::output::{bytes, parse_size};

/// Create a new repository in an empty or new directory (made mode 0700).
///
/// The chunking parameters and compression level are fixed at creation: every backup into the
/// repository cuts data the same way, which is what makes deduplication work.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Average chunk size: a power of two from 64K to 4M. Larger chunks mean less metadata and
    /// faster backups; smaller chunks find more duplicate data.
    #[arg(long, default_value_t = u64::from(sbk_store::DEFAULT_CHUNK_AVG), value_parser = parse_size, value_name = "SIZE")]
    chunk_size: u64,

    /// zstd compression level for new chunks (1 = fastest, 19 = smallest).
    #[arg(long, default_value_t = sbk_store::DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(u32).range(1..=19), value_name = "LEVEL")]
    compression_level: u32,

    /// Pack size: packs are closed once they reach it, from 1M to 1G. Larger packs mean fewer
    /// objects (object storage bills per request); smaller ones less to rewrite in prune.
    #[arg(long, default_value_t = sbk_store::DEFAULT_PACK_SIZE, value_parser = parse_size, value_name = "SIZE")]
    pack_size: u64,

    /// `repokey` (the default): every blob, pack trailer, index file and manifest is encrypted
    /// and authenticated (AES-256-GCM, a key per object derived from a random master key, which
    /// is stored wrapped by a key derived from your password with Argon2id). `none`: nothing is
    /// encrypted; anyone who can read the repository can read the disks in it.
    #[arg(long, default_value = "repokey", value_name = "MODE", value_parser = ["repokey", "none"])]
    encryption: String,

    /// Cut and name chunks as the repository at REPO does (its chunk size, gear seed and chunk-id
    /// key), so that the two dedup against each other and `sbk copy` between them reads only the
    /// chunks the destination lacks. Opening REPO takes its password (see --from-password-file).
    #[arg(long, value_name = "REPO", conflicts_with = "chunk_size")]
    copy_chunker_params_from: Option<std::path::PathBuf>,

    /// Protect the backups from a stolen mover with S3 Object Lock: every object of backup data
    /// is written with a retention date at least DURATION (`30d`, `12h`) ahead, and a snapshot
    /// cannot be forgotten, nor its data deleted, for DURATION after it was written, by anyone
    /// holding this host's credentials. Needs a bucket created with Object Lock (exit 13
    /// otherwise); not available on a local repository, whose host can undo any protection.
    #[arg(long, value_name = "DURATION", value_parser = crate::output::parse_duration)]
    object_lock: Option<(u64, String)>,

    /// `compliance` (the default): nobody, not even the storage's root account, can shorten
    /// retention or delete a protected version. `governance`: identities with the
    /// s3:BypassGovernanceRetention permission can (keep that permission off the mover).
    #[arg(long, value_name = "MODE", value_parser = ["compliance", "governance"], default_value = "compliance", requires = "object_lock")]
    object_lock_mode: String,

    #[command(flatten)]
    from: super::FromPassword,
}

/// Test-only: `SBK_TEST_KDF=weak` makes key derivation cost nothing, so that tests do not
/// spend half a second per command. It protects no password: never set it elsewhere.
pub const TEST_KDF_ENV: &str = "SBK_TEST_KDF";

/// Says so when the weak test profile is in force: a key made with it protects nothing.
pub fn warn_weak_kdf(ctx: &Context) {
    if std::env::var(TEST_KDF_ENV).as_deref() == Ok("weak") {
        ctx.out.notice(&format!(
            "{TEST_KDF_ENV}=weak: the new key is derived with the test-only profile and protects no password"
        ));
    }
}

/// The Argon2id parameters for new keys: the default, or the weak test profile.
pub fn kdf_params() -> sbk_store::KdfParams {
    if std::env::var(TEST_KDF_ENV).as_deref() == Ok("weak") {
        sbk_store::KdfParams::weak()
    } else {
        sbk_store::KdfParams::default()
    }
}

/// Runs `sbk init`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let path = ctx.repo_path()?;
    let object_lock = match &args.object_lock {
        Some((secs, text)) => {
            if !sbk_s3::S3Location::is_s3(&path.to_string_lossy()) {
                return Err(crate::exit::ExitWith(
                    Exit::Usage,
                    "--object-lock needs an s3:// repository: whoever is root on the host of a local repository can undo any protection sbk could give it (use a bucket with Object Lock)".into(),
                )
                .into());
            }
            if *secs > sbk_store::MAX_OBJECT_LOCK_SECS {
                return Err(crate::exit::ExitWith(
                    Exit::Usage,
                    format!("--object-lock {text}: at most 100 years"),
                )
                .into());
            }
            Some(sbk_store::ObjectLock {
                secs: *secs,
                mode: if args.object_lock_mode == "governance" {
                    sbk_store::LockMode::Governance
                } else {
                    sbk_store::LockMode::Compliance
                },
            })
        }
        None => None,
    };
    let chunk_avg = u32::try_from(args.chunk_size).unwrap_or(u32::MAX);
    let encryption = if args.encryption == "none" {
        ctx.out.notice(
            "the repository will not be encrypted: anyone who can read it can read every disk backed up into it",
        );
        None
    } else {
        // The repository's first password: from the usual sources, else asked twice.
        let given = std::env::var_os("SBK_PASSWORD").is_some()
            || ctx.password.file.is_some()
            || ctx.password.command.is_some();
        let password = if given {
            ctx.password.get()?
        } else {
            crate::password::PasswordSource::new_password(None)?
        };
        let password = crate::password::refuse_empty(password)?;
        warn_weak_kdf(ctx);
        Some((password, kdf_params()))
    };
    let chunker_from = match &args.copy_chunker_params_from {
        Some(src) => Some(ctx.open_other(src, &args.from)?.chunker_source()),
        None => None,
    };
    let config = Repository::init(
        ctx.backend()?.as_ref(),
        InitOptions {
            chunk_avg,
            zstd_level: args.compression_level,
            pack_size: args.pack_size,
            encryption,
            chunker_from,
            object_lock,
        },
    )?;
    let encrypted = config.is_encrypted();
    ctx.out.info(
        &format!(
            "created {} sbk repository {} (id {}, format {}): chunks of {} on average, segments of {}, packs of {}, zstd level {}",
            if encrypted { "encrypted" } else { "unencrypted" },
            path.display(),
            config.id_hex(),
            config.version,
            bytes(u64::from(config.chunk_avg)),
            bytes(config.segment_size),
            bytes(config.pack_size),
            config.zstd_level
        ),
        false,
    );
    if let Some(lock) = &config.object_lock {
        ctx.out.info(
            &format!(
                "under Object Lock ({} mode): every snapshot and the data it needs is protected for {} after it is written",
                lock.mode.s3_name().to_lowercase(),
                humantime::format_duration(std::time::Duration::from_secs(lock.secs))
            ),
            false,
        );
    }
    ctx.out.json(
        &serde_json::json!({
            "repository": path,
            "id": config.id_hex(),
            "format_version": config.version,
            "chunk_min": config.chunk_min,
            "chunk_avg": config.chunk_avg,
            "chunk_max": config.chunk_max,
            "segment_size": config.segment_size,
            "pack_size": config.pack_size,
            "encrypted": encrypted,
            "zstd_level": config.zstd_level,
            "object_lock": config.object_lock.map(|l| serde_json::json!({
                "seconds": l.secs,
                "mode": l.mode.s3_name().to_lowercase(),
            })),
        }),
        false,
    );
    Ok(Exit::Ok.into())
}
