//! Everything the binary shows: human lines on stdout, JSON for scripts, errors and notices on
//! stderr, and progress bars on a terminal.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sbk_engine::Progress;

use crate::exit::Exit;

/// How results are shown.
pub struct Output {
    json: bool,
    quiet: bool,
    bars: bool,
}

impl Output {
    /// `--json` and `--quiet` as given; bars only when stderr is a terminal.
    pub fn new(json: bool, quiet: bool) -> Self {
        Output {
            json,
            quiet,
            bars: !json && !quiet && std::io::stderr().is_terminal(),
        }
    }

    /// Whether results go out as JSON (`--json`).
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// A line for people, on stdout (or stderr when stdout carries data).
    pub fn info(&self, line: &str, to_stderr: bool) {
        if self.json || self.quiet {
            return;
        }
        if to_stderr {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// A result for scripts, on stdout (or stderr when stdout carries data).
    pub fn json(&self, value: &serde_json::Value, to_stderr: bool) {
        if self.json {
            if to_stderr {
                eprintln!("{value}");
            } else {
                println!("{value}");
            }
        }
    }

    /// A warning that is not an error.
    pub fn notice(&self, message: &str) {
        if !self.quiet {
            eprintln!("sbk: note: {message}");
        }
    }

    /// Reports the error a command failed with.
    pub fn error(&self, e: &anyhow::Error, code: Exit) {
        eprintln!("sbk: error: {e:#}");
        if self.json {
            println!(
                "{}",
                serde_json::json!({ "error": format!("{e:#}"), "exit_code": code as u8 })
            );
        }
    }

    /// The progress reporter for long work.
    pub fn progress(&self) -> Bars {
        Bars {
            multi: self
                .bars
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4))),
            bars: Mutex::new(HashMap::new()),
            quiet: self.quiet,
        }
    }
}

/// Progress bars on a terminal (one per task), or nothing but notices elsewhere.
pub struct Bars {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<usize, ProgressBar>>,
    quiet: bool,
}

impl Progress for Bars {
    fn start(&self, task: usize, label: &str, total: u64) {
        let Some(multi) = &self.multi else { return };
        // A stream's size is known at its end only: bytes and speed, no bar.
        let template = if total == 0 {
            "{prefix:.bold} {spinner} {bytes} {bytes_per_sec}"
        } else {
            "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        };
        let style = ProgressStyle::with_template(template)
            .expect("the template is valid")
            .progress_chars("=> ");
        let bar = multi.add(
            ProgressBar::new(total)
                .with_style(style)
                .with_prefix(label.to_owned()),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bars
            .lock()
            .expect("no thread panics holding this lock")
            .insert(task, bar);
    }

    fn advance(&self, task: usize, bytes: u64) {
        if let Some(bar) = self
            .bars
            .lock()
            .expect("no thread panics holding this lock")
            .get(&task)
        {
            bar.inc(bytes);
        }
    }

    fn finish(&self, task: usize) {
        if let Some(bar) = self
            .bars
            .lock()
            .expect("no thread panics holding this lock")
            .remove(&task)
        {
            bar.finish_and_clear();
        }
    }

    fn notice(&self, message: &str) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(format!("sbk: note: {message}"));
            }
            None => eprintln!("sbk: note: {message}"),
        }
    }
}

/// The JSON of a snapshot's changed-block record (backup, snapshots and stats show the same).
pub fn changed_blocks_json(c: &sbk_store::ChangedBlocks) -> serde_json::Value {
    serde_json::json!({
        "incremental": c.incremental,
        "trusted": c.trusted,
        "token": c.token,
        "since": c.since,
        "segments_read": c.segments_read,
        "segments_reused": c.segments_reused,
        "bytes_skipped": c.bytes_skipped,
    })
}

/// Bytes for people: "1.50 GiB".
pub fn bytes(n: u64) -> String {
    sbk_records::bytes(n, 2)
}

/// Throughput for people: "812.3 MiB/s".
pub fn rate(bytes_moved: u64, ms: u64) -> String {
    format!(
        "{}/s",
        bytes((bytes_moved as f64 / (ms.max(1) as f64 / 1000.0)) as u64)
    )
}

/// Bytes per second as a number, for JSON.
pub fn rate_num(bytes_moved: u64, ms: u64) -> f64 {
    bytes_moved as f64 / (ms.max(1) as f64 / 1000.0)
}

/// Parses a duration such as `30d`, `12h` or `90s` (`--keep-within`, `--object-lock`), keeping
/// its text for messages. Under a second is refused: it would keep or protect nothing.
pub fn parse_duration(s: &str) -> Result<(u64, String), String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 30d or 12h: {e}"))?;
    if d.as_secs() == 0 {
        return Err("a duration under a second keeps nothing: give one such as 30d".into());
    }
    Ok((d.as_secs(), s.to_owned()))
}

/// Parses a size such as `1048576`, `512K`, `1M`, `1MiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1M, 512K, 1048576)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1M").is_err());
        assert_eq!(bytes(1536 << 20), "1.50 GiB");
        assert_eq!(bytes(12), "12 B");
    }
}
