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
}

/// Runs `sbk init`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let path = ctx.repo_path()?;
    let chunk_avg = u32::try_from(args.chunk_size).unwrap_or(u32::MAX);
    let config = Repository::init(
        ctx.backend()?.as_ref(),
        InitOptions {
            chunk_avg,
            zstd_level: args.compression_level,
            pack_size: args.pack_size,
        },
    )?;
    ctx.out.info(
        &format!(
            "created sbk repository {} (id {}, format {}): chunks of {} on average, segments of {}, packs of {}, zstd level {}",
            path.display(),
            sbk_store::PackId(config.repo_id),
            config.version,
            bytes(u64::from(config.chunk_avg)),
            bytes(config.segment_size),
            bytes(config.pack_size),
            config.zstd_level
        ),
        false,
    );
    ctx.out.json(
        &serde_json::json!({
            "repository": path,
            "id": sbk_store::PackId(config.repo_id).to_hex(),
            "format_version": config.version,
            "chunk_min": config.chunk_min,
            "chunk_avg": config.chunk_avg,
            "chunk_max": config.chunk_max,
            "segment_size": config.segment_size,
            "pack_size": config.pack_size,
            "zstd_level": config.zstd_level,
        }),
        false,
    );
    Ok(Exit::Ok.into())
}
