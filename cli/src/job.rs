//! Job files of `sbk run`: TOML, checked whole before anything runs. Unknown keys and bad values
//! are refused naming their line (toml reports the span of the value a deserializer refused).
//! A job file names where secrets are, never a secret.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A name an operator typed (see `crate::names`), checked while the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::names::check(&s)
            .map_err(|why| serde::de::Error::custom(format!("{s:?} cannot be a name: {why}")))?;
        Ok(Name(s))
    }
}

/// A duration such as `90s`, `30m`, `2h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration such as 90s, 30m or 2h: {e}"
            ))
        })?;
        if t.is_zero() {
            return Err(serde::de::Error::custom(
                "a timeout of 0 would stop every hook at once",
            ));
        }
        Ok(Timeout(t))
    }
}

/// A retention period such as `30d`, checked when the job file is read and handed to
/// `sbk forget --keep-within` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period(pub String);

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match humantime::parse_duration(&s) {
            Ok(t) if t.as_secs() > 0 => Ok(Period(s)),
            Ok(_) => Err(serde::de::Error::custom(
                "a period under a second keeps nothing",
            )),
            Err(e) => Err(serde::de::Error::custom(format!(
                "{s:?} is not a duration such as 30d or 12h: {e}"
            ))),
        }
    }
}

/// What opens a repository: a key file, or a password in a file, a command, or an environment
/// variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Password {
    /// A key file (before any password).
    pub key_file: Option<PathBuf>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// A command that prints it.
    pub password_command: Option<String>,
    /// The name of an environment variable that holds it.
    pub password_env: Option<String>,
}

/// A job: one repository, its sources, then retention and copies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// The repository (a directory or `s3://BUCKET/PREFIX`).
    pub repository: String,
    /// A key file that opens the repository without a password (before any password).
    pub key_file: Option<PathBuf>,
    /// A file whose first line is the repository's password.
    pub password_file: Option<PathBuf>,
    /// A command that prints it.
    pub password_command: Option<String>,
    /// The name of an environment variable that holds it.
    pub password_env: Option<String>,
    /// Host recorded in the snapshots [default: this machine's].
    pub host: Option<Name>,
    /// Index cache folder [default: sbk's].
    pub cache_dir: Option<PathBuf>,
    /// Prometheus metrics of the run, written atomically.
    pub metrics_file: Option<PathBuf>,
    /// Where the records of the job's runs are kept (`runs/job/JOB/`) [default:
    /// $SBK_STATE_DIR, else /var/lib/sbk as root, else $XDG_STATE_HOME/sbk].
    pub state_dir: Option<PathBuf>,
    /// The sources, backed up one after the other.
    #[serde(rename = "source", default)]
    pub sources: Vec<JobSource>,
    /// Retention, applied after the backups to the job's sources.
    pub retention: Option<Retention>,
    /// Repositories the new snapshots are copied to, after retention.
    #[serde(rename = "copy", default)]
    pub copies: Vec<CopyTarget>,
}

/// One source of a job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSource {
    /// The snapshot's source name (`--source-name`): stable across nights.
    pub name: Name,
    /// What to read: a device, an image file or an NBD URI (often made by `pre`).
    pub path: String,
    /// Run before the backup (take the storage snapshot, freeze a filesystem).
    pub pre: Option<String>,
    /// Prints the changed-block list since the parent (`rbd diff ... --format json`, say).
    pub changed_blocks: Option<String>,
    /// For an NBD source: take the changed blocks from this QEMU dirty bitmap.
    pub dirty_bitmap: Option<String>,
    /// Prints this run's storage-side snapshot id, recorded as the snapshot's token.
    pub cbt_token: Option<String>,
    /// Run after everything else, whatever happened (release the snapshot, thaw).
    pub post: Option<String>,
    /// Tags of the snapshot.
    #[serde(default)]
    pub tags: Vec<Name>,
    /// Each hook's time limit [default: 1h]; its whole process group is killed past it.
    pub timeout: Option<Timeout>,
}

/// Retention of a job (as `sbk forget`), per source.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep the N newest.
    pub keep_last: Option<u32>,
    /// Keep one per hour for N hours.
    pub keep_hourly: Option<u32>,
    /// Keep one per day for N days.
    pub keep_daily: Option<u32>,
    /// Keep one per week for N weeks.
    pub keep_weekly: Option<u32>,
    /// Keep one per month for N months.
    pub keep_monthly: Option<u32>,
    /// Keep one per year for N years.
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot with these tags.
    #[serde(default)]
    pub keep_tag: Vec<Name>,
    /// Keep every snapshot younger than this (`30d`), by the storage's clock.
    pub keep_within: Option<Period>,
    /// Prune once after forgetting (for all the job's sources).
    #[serde(default)]
    pub prune: bool,
}

impl Retention {
    /// The `sbk forget` arguments of the policy.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (flag, v) in [
            ("--keep-last", self.keep_last),
            ("--keep-hourly", self.keep_hourly),
            ("--keep-daily", self.keep_daily),
            ("--keep-weekly", self.keep_weekly),
            ("--keep-monthly", self.keep_monthly),
            ("--keep-yearly", self.keep_yearly),
        ] {
            if let Some(n) = v {
                a.push(flag.to_owned());
                a.push(n.to_string());
            }
        }
        for t in &self.keep_tag {
            a.push("--keep-tag".into());
            a.push(t.0.clone());
        }
        if let Some(p) = &self.keep_within {
            a.push("--keep-within".into());
            a.push(p.0.clone());
        }
        a
    }
}

/// A repository the new snapshots are copied to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyTarget {
    /// The destination repository.
    pub repository: String,
    /// A key file that opens it (before any password).
    pub key_file: Option<PathBuf>,
    /// A file whose first line is its password.
    pub password_file: Option<PathBuf>,
    /// A command that prints it.
    pub password_command: Option<String>,
    /// The name of an environment variable that holds it.
    pub password_env: Option<String>,
}

impl Job {
    /// Where the repository's password is.
    pub fn password(&self) -> Password {
        Password {
            key_file: self.key_file.clone(),
            password_file: self.password_file.clone(),
            password_command: self.password_command.clone(),
            password_env: self.password_env.clone(),
        }
    }
}

impl CopyTarget {
    /// Where the destination's password is.
    pub fn password(&self) -> Password {
        Password {
            key_file: self.key_file.clone(),
            password_file: self.password_file.clone(),
            password_command: self.password_command.clone(),
            password_env: self.password_env.clone(),
        }
    }
}

/// Reads and checks a job file: permissions, syntax, every value, and what toml cannot say.
pub fn load(path: &Path) -> Result<Job, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    if mode & 0o022 != 0 {
        return Err(format!(
            "{}: group or others may write it (mode {:o}), and its hooks run as you: chmod go-w it",
            path.display(),
            mode & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let job: Job = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if job.sources.is_empty() {
        return Err(format!(
            "{}: no [[source]]: nothing to back up",
            path.display()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for s in &job.sources {
        if !seen.insert(&s.name.0) {
            return Err(format!(
                "{}: two sources are named {:?}",
                path.display(),
                s.name.0
            ));
        }
        if s.changed_blocks.is_some() && s.dirty_bitmap.is_some() {
            return Err(format!(
                "{}: source {:?} has both changed_blocks and dirty_bitmap",
                path.display(),
                s.name.0
            ));
        }
    }
    if let Some(r) = &job.retention {
        if r.args().is_empty() {
            return Err(format!(
                "{}: [retention] keeps nothing: give at least one keep_* rule",
                path.display()
            ));
        }
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Job, String> {
        toml::from_str::<Job>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_job_parses() {
        let j = parse(
            r#"
repository = "/srv/repo"
password_file = "/etc/sbk/pass"
metrics_file = "/var/lib/node_exporter/sbk.prom"

[[source]]
name = "vm1"
path = "/dev/vg/vm1-snap"
pre = "lvcreate -s -n vm1-snap vg/vm1"
post = "lvremove -f vg/vm1-snap"
timeout = "30m"
tags = ["nightly"]

[retention]
keep_daily = 7
keep_within = "30d"
prune = true

[[copy]]
repository = "s3://offsite/fleet"
password_env = "OFFSITE_PASSWORD"
"#,
        )
        .unwrap();
        assert_eq!(
            j.sources[0].timeout,
            Some(Timeout(Duration::from_secs(1800)))
        );
        assert_eq!(
            j.retention.unwrap().args(),
            vec!["--keep-daily", "7", "--keep-within", "30d"]
        );
        assert_eq!(
            j.copies[0].password().password_env.as_deref(),
            Some("OFFSITE_PASSWORD")
        );
    }

    #[test]
    fn the_shipped_examples_parse() {
        for (name, text) in [
            ("lvm-thin", include_str!("../../contrib/jobs/lvm-thin.toml")),
            ("ceph-rbd", include_str!("../../contrib/jobs/ceph-rbd.toml")),
            (
                "qcow2-dirty-bitmap",
                include_str!("../../contrib/jobs/qcow2-dirty-bitmap.toml"),
            ),
        ] {
            let j = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!j.sources.is_empty(), "{name}");
            assert!(
                j.sources.iter().all(|s| s.post.is_some()),
                "{name}: releases what pre took"
            );
        }
    }

    #[test]
    fn bad_keys_and_values_name_their_line() {
        let e =
            parse("repository = \"r\"\n[[source]]\nname = \"a\"\npath = \"p\"\nhooks = \"x\"\n")
                .unwrap_err();
        assert!(e.contains("line 5") && e.contains("hooks"), "{e}");
        let e = parse(
            "repository = \"r\"\n[[source]]\nname = \"a\"\npath = \"p\"\ntimeout = \"soon\"\n",
        )
        .unwrap_err();
        assert!(e.contains("line 5") && e.contains("duration"), "{e}");
        let e =
            parse("repository = \"r\"\n[[source]]\nname = \"a\\nb\"\npath = \"p\"\n").unwrap_err();
        assert!(
            e.contains("line 3") && e.contains("control character"),
            "{e}"
        );
        assert!(parse("repository = \"r\"\npassword = \"hunter2\"\n").is_err());
        let e = parse("repository = \"r\"\n[retention]\nkeep_within = \"a month\"\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("30d"), "{e}");
    }
}
