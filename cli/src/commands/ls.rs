//! `sbk ls`: a snapshot's partitions, or a directory inside one, without restoring the disk.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use sbk_diskfs::{Filesystem, Kind, Node};
use sbk_engine::parse_part_path;

use super::files::{open, printable};
use super::Context;
use crate::exit::{Exit, ExitWith};
use crate::output::bytes;

/// List a snapshot's partitions and filesystems, or the files in one of them.
///
/// `sbk ls SNAPSHOT` shows the disk's partitions (GPT, or MBR with logical partitions numbered
/// from 5, as Linux numbers them) and the filesystem in each; a disk with a filesystem and no
/// partition table is partition 0. `sbk ls SNAPSHOT PART:PATH` lists a directory as `ls -l`
/// does (type and mode, owner, size, modification time, name, link target); `-R` lists the
/// whole tree under it, each entry by its full path. sbk reads ext2, ext3 and ext4 itself; only the chunks that hold the
/// directories listed are fetched from the repository.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshot: a full id, a unique prefix of one, or `latest`.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,

    /// A directory (or file) in a partition: `1:/etc`, `0:/` for a disk with no partition table.
    #[arg(value_name = "PART:PATH")]
    path: Option<String>,

    /// List the whole tree under PATH.
    #[arg(long, short = 'R')]
    recursive: bool,
}

/// Runs `sbk ls`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let opened = open(ctx, &args.snapshot, "ls")?;
    let Some(path) = &args.path else {
        return partitions(ctx, &opened);
    };
    let (part, path) = parse_part_path(path).map_err(|e| ExitWith(Exit::Usage, e))?;
    let fs = opened.files.filesystem(part)?;
    let node = sbk_diskfs::lookup(fs.as_ref(), path.as_bytes(), false)
        .map_err(|e| sbk_engine::EngineError::from_fs(&path, e))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut json = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![(path.trim_end_matches('/').to_owned(), node)];
    while let Some((dir_path, node)) = todo.pop() {
        if node.kind != Kind::Dir {
            line(ctx, fs.as_ref(), &mut out, &mut json, &dir_path, &node)?;
            continue;
        }
        if !seen.insert(node.id) {
            continue; // a directory met twice: a damaged image; listed once
        }
        let mut entries = fs
            .read_dir(&node)
            .map_err(|e| sbk_engine::EngineError::from_fs(&dir_path, e))?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut below = Vec::new();
        for e in &entries {
            let p = format!("{dir_path}/{}", printable(&e.name));
            let shown = if args.recursive {
                p.clone()
            } else {
                printable(&e.name)
            };
            line(ctx, fs.as_ref(), &mut out, &mut json, &shown, &e.node)?;
            if args.recursive && e.node.kind == Kind::Dir {
                below.push((p, e.node.clone()));
            }
        }
        todo.extend(below.into_iter().rev());
    }
    out.flush()?;
    drop(out);
    ctx.out.json(
        &serde_json::json!({
            "snapshot": opened.id.to_hex(),
            "entries": json,
            "repository_bytes_read": opened.count.bytes(),
        }),
        false,
    );
    Ok(ExitCode::SUCCESS)
}

/// One `ls -l` line, or its JSON object.
fn line(
    ctx: &Context,
    fs: &dyn Filesystem,
    out: &mut impl Write,
    json: &mut Vec<serde_json::Value>,
    name: &str,
    n: &Node,
) -> Result<()> {
    let target = if n.kind == Kind::Symlink {
        fs.read_link(n).ok().map(|t| printable(&t))
    } else {
        None
    };
    if ctx.out.is_json() {
        json.push(serde_json::json!({
            "name": name,
            "type": n.kind.name(),
            "mode": format!("{:04o}", n.perm),
            "uid": n.uid,
            "gid": n.gid,
            "size": n.size,
            "mtime": n.mtime.secs,
            "mtime_ns": n.mtime.nanos,
            "links": n.links,
            "inode": n.id,
            "target": target,
        }));
        return Ok(());
    }
    writeln!(
        out,
        "{}{} {:>5}/{:<5} {:>12} {} {}{}",
        n.kind.letter(),
        mode_string(n.perm),
        n.uid,
        n.gid,
        n.size,
        time_string(n.mtime.secs),
        name,
        target.map(|t| format!(" -> {t}")).unwrap_or_default()
    )?;
    Ok(())
}

/// `rwxr-xr-x`, with s, S, t and T where ls shows them.
fn mode_string(perm: u32) -> String {
    let mut s = String::new();
    for (i, special, mark) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (perm >> i) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, perm & special != 0) {
            (true, true) => mark,
            (false, true) => mark.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// A modification time as `2026-12-06 21:23` (UTC), for any time a filesystem can hold
/// (NTFS's year 1601, ext's negative seconds, years past 9999).
fn time_string(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = sbk_engine::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn partitions(ctx: &Context, opened: &super::files::Opened) -> Result<ExitCode> {
    let table = opened.files.table();
    let parts = opened.files.partitions();
    if ctx.out.is_json() {
        let list: Vec<_> = parts
            .iter()
            .map(|p| {
                serde_json::json!({
                    "number": p.partition.number,
                    "start": p.partition.start,
                    "size": p.partition.size,
                    "type": p.partition.kind,
                    "name": p.partition.label,
                    "extended": p.partition.extended,
                    "filesystem": if p.partition.extended { None } else { Some(p.filesystem.to_string()) },
                    "label": p.label,
                })
            })
            .collect();
        ctx.out.json(
            &serde_json::json!({
                "snapshot": opened.id.to_hex(),
                "table": table.kind.name(),
                "partitions": list,
                "repository_bytes_read": opened.count.bytes(),
            }),
            false,
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "partition table: {}", table.kind.name())?;
    writeln!(
        out,
        "{:>4} {:>14} {:>10}  {:<22} {:<12} {:<10} LABEL",
        "PART", "START", "SIZE", "TYPE", "NAME", "FS"
    )?;
    for p in &parts {
        let fs = if p.partition.extended {
            "-".to_owned()
        } else {
            p.filesystem.to_string()
        };
        writeln!(
            out,
            "{:>4} {:>14} {:>10}  {:<22} {:<12} {:<10} {}",
            p.partition.number,
            p.partition.start,
            bytes(p.partition.size),
            p.partition.kind,
            printable(p.partition.label.as_bytes()),
            fs,
            printable(p.label.as_bytes())
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_on_either_side_of_the_epoch() {
        assert_eq!(time_string(0), "1970-01-01 00:00");
        assert_eq!(time_string(1_796_592_184), "2026-12-06 21:23");
        assert_eq!(time_string(-1), "1969-12-31 23:59");
        // NTFS's zero: 1601-01-01.
        assert_eq!(time_string(-11_644_473_600), "1601-01-01 00:00");
        assert_eq!(time_string(951_782_400), "2000-02-29 00:00");
    }

    #[test]
    fn modes_print_as_ls_prints_them() {
        assert_eq!(mode_string(0o755), "rwxr-xr-x");
        assert_eq!(mode_string(0o4755), "rwsr-xr-x");
        assert_eq!(mode_string(0o2640), "rw-r-S---");
        assert_eq!(mode_string(0o1777), "rwxrwxrwt");
    }
}
