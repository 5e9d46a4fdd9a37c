//! Retention policies for `forget`: which snapshots to keep, and why.
//!
//! Rules follow the usual backup-tool semantics. Snapshots are grouped by (host, source) and
//! each group is walked newest first. `last N` keeps the N newest. `hourly N` (and daily,
//! weekly, monthly, yearly) keeps the newest snapshot of each of the N most recent hours (days,
//! ISO weeks, months, years) that have a snapshot. `tag T` keeps every snapshot tagged T. A
//! snapshot is kept when any rule keeps it; the reasons are all the rules that did. Times are UTC.

use std::collections::BTreeMap;

use sbk_store::{Manifest, Repository, SnapshotId, FUTURE_SLACK_SECS};

use crate::error::{EngineError, Result};

/// A retention policy; `None` rules are not applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the N newest.
    pub last: Option<u32>,
    /// Keep the newest of each of the N most recent hours.
    pub hourly: Option<u32>,
    /// … days.
    pub daily: Option<u32>,
    /// … ISO weeks.
    pub weekly: Option<u32>,
    /// … months.
    pub monthly: Option<u32>,
    /// … years.
    pub yearly: Option<u32>,
    /// Keep every snapshot with one of these tags.
    pub tags: Vec<String>,
    /// Keep every snapshot taken within a duration of now.
    pub within: Option<Within>,
}

/// "Keep what is younger than this": measured from now by the storage's clock (the time forget
/// took its lock), never from the newest snapshot, so a flood of new (or future-dated, forged)
/// snapshots cannot push the older ones out. A snapshot dated after now is within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Within {
    /// The duration, in seconds.
    pub secs: u64,
    /// Now, in seconds since the Unix epoch, by the storage's clock.
    pub now: i64,
    /// The duration as the operator wrote it (`30d`), for the reasons printed.
    pub label: String,
}

impl Policy {
    /// True when no rule is given.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// What retention needs to know of a snapshot.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its id.
    pub id: SnapshotId,
    /// When it was taken (nanoseconds since the Unix epoch).
    pub time_ns: i64,
    /// Host and source: the group.
    pub host: String,
    /// The source.
    pub source: String,
    /// Its tags.
    pub tags: Vec<String>,
}

/// The verdict on one snapshot: kept for these reasons, or removed when there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The snapshot.
    pub id: SnapshotId,
    /// (host, source) group.
    pub group: (String, String),
    /// Why it is kept; empty when it is removed.
    pub reasons: Vec<String>,
}

/// What `forget` is asked to remove: snapshots named by the operator, or what a policy does not
/// keep among the snapshots of `host` and `source` (all when `None`).
#[derive(Debug, Clone, Default)]
pub struct ForgetSelection {
    /// Snapshots named (`latest`, ids or unique prefixes): each is removed, no policy applies.
    pub named: Vec<String>,
    /// The policy, when none is named.
    pub policy: Policy,
    /// Only snapshots of this host.
    pub host: Option<String>,
    /// Only snapshots of this source.
    pub source: Option<String>,
    /// Now, seconds since the Unix epoch, by the storage's clock: under Object Lock a snapshot
    /// protected until later is never removed.
    pub now: i64,
}

/// One snapshot `forget` weighed.
#[derive(Debug, Clone)]
pub struct ForgetVerdict {
    /// The snapshot.
    pub id: SnapshotId,
    /// Its manifest, when it could be read (for messages).
    pub manifest: Option<Manifest>,
    /// Why it is kept; empty when it is removed.
    pub reasons: Vec<String>,
}

/// Which snapshots `selection` removes and which it keeps, and why. A policy that would keep no
/// snapshot of some host and source is refused ([`EngineError::PolicyKeepsNone`]): removing
/// every copy of a disk must be asked for by name.
pub fn select_forget(repo: &Repository, selection: &ForgetSelection) -> Result<Vec<ForgetVerdict>> {
    let all = repo.snapshots()?;
    let manifest = |id: &SnapshotId| {
        all.iter()
            .find(|(i, _)| i == id)
            .and_then(|(_, m)| m.as_ref().ok().cloned())
    };
    if !selection.named.is_empty() {
        return selection
            .named
            .iter()
            .map(|s| {
                let id = repo.resolve_snapshot(s)?;
                let until = manifest(&id).and_then(|m| repo.protected_until(&m, selection.now));
                if let Some(until) = until.filter(|u| *u > selection.now) {
                    return Err(EngineError::Protected {
                        id: id.to_hex()[..8].to_owned(),
                        until: rfc3339(until),
                    });
                }
                Ok(ForgetVerdict {
                    id,
                    manifest: manifest(&id),
                    reasons: Vec::new(),
                })
            })
            .collect();
    }
    let candidates: Vec<Candidate> = all
        .iter()
        .filter_map(|(id, m)| m.as_ref().ok().map(|m| (id, m)))
        .filter(|(_, m)| {
            selection.host.as_ref().is_none_or(|h| *h == m.host)
                && selection.source.as_ref().is_none_or(|s| *s == m.source)
        })
        .map(|(id, m)| Candidate {
            id: *id,
            time_ns: m.time_ns,
            host: m.host.clone(),
            source: m.source.clone(),
            tags: m.tags.clone(),
        })
        .collect();
    let verdicts = apply(&selection.policy, &candidates);
    if let Some((host, source)) = keeping_none(&selection.policy, &candidates, &verdicts) {
        return Err(EngineError::PolicyKeepsNone {
            host,
            source_name: source,
        });
    }
    Ok(verdicts
        .into_iter()
        .map(|mut v| {
            let m = manifest(&v.id);
            // Kept whatever the policy says: its protection has not ended.
            match m
                .as_ref()
                .and_then(|m| repo.protected_until(m, selection.now))
            {
                Some(until) if until > selection.now => v
                    .reasons
                    .push(format!("protected until {}", rfc3339(until))),
                _ => {}
            }
            ForgetVerdict {
                manifest: m,
                id: v.id,
                reasons: v.reasons,
            }
        })
        .collect())
}

/// Seconds since the Unix epoch as RFC 3339 in UTC, to the second.
pub fn rfc3339(secs: i64) -> String {
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The first group the verdicts keep nothing of. With a known now (`--keep-within`), a
/// snapshot dated after it does not count: one forged for 2036 must not let every real
/// snapshot of its group go without the refusal.
fn keeping_none(
    policy: &Policy,
    candidates: &[Candidate],
    verdicts: &[Verdict],
) -> Option<(String, String)> {
    let time: std::collections::HashMap<_, _> =
        candidates.iter().map(|c| (c.id, c.time_ns)).collect();
    let future = |id: &SnapshotId| {
        policy.within.as_ref().is_some_and(|w| {
            time.get(id).copied().unwrap_or(0).div_euclid(1_000_000_000)
                > w.now.saturating_add(FUTURE_SLACK_SECS)
        })
    };
    let mut groups: BTreeMap<&(String, String), bool> = BTreeMap::new();
    for v in verdicts {
        *groups.entry(&v.group).or_default() |= !v.reasons.is_empty() && !future(&v.id);
    }
    groups
        .into_iter()
        .find(|(_, kept)| !*kept)
        .map(|(g, _)| g.clone())
}

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// ISO 8601 (week-year, week) of a day count since 1970-01-01.
pub fn iso_week(days: i64) -> (i64, u32) {
    let weekday = (days + 3).rem_euclid(7); // 0 = Monday; 1970-01-01 was a Thursday
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    (
        year,
        ((thursday - days_from_civil(year, 1, 1)) / 7 + 1) as u32,
    )
}

/// The period a rule buckets by, as a comparable key and a label.
fn bucket(rule: &str, time: i64) -> (i64, String) {
    let days = time.div_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    match rule {
        "hourly" => {
            let h = time.rem_euclid(86_400) / 3600;
            (days * 24 + h, format!("{y:04}-{m:02}-{d:02} {h:02}h"))
        }
        "daily" => (days, format!("{y:04}-{m:02}-{d:02}")),
        "weekly" => {
            let (wy, w) = iso_week(days);
            (wy * 100 + i64::from(w), format!("{wy:04}-W{w:02}"))
        }
        "monthly" => (y * 12 + i64::from(m), format!("{y:04}-{m:02}")),
        _ => (y, format!("{y:04}")),
    }
}

/// Applies `policy` to `snapshots`; returns a verdict for each, grouped, newest first per group.
pub fn apply(policy: &Policy, snapshots: &[Candidate]) -> Vec<Verdict> {
    let mut groups: BTreeMap<(String, String), Vec<&Candidate>> = BTreeMap::new();
    for s in snapshots {
        groups
            .entry((s.host.clone(), s.source.clone()))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for (group, mut snaps) in groups {
        snaps.sort_by(|a, b| b.time_ns.cmp(&a.time_ns).then(b.id.cmp(&a.id)));
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); snaps.len()];
        if let Some(n) = policy.last {
            for (i, r) in reasons.iter_mut().enumerate().take(n as usize) {
                r.push(format!("last {}", i + 1));
            }
        }
        for (rule, n) in [
            ("hourly", policy.hourly),
            ("daily", policy.daily),
            ("weekly", policy.weekly),
            ("monthly", policy.monthly),
            ("yearly", policy.yearly),
        ] {
            let Some(n) = n else { continue };
            let mut seen = 0;
            let mut last_key = None;
            for (i, s) in snaps.iter().enumerate() {
                if seen == n {
                    break;
                }
                let (key, label) = bucket(rule, s.time_ns.div_euclid(1_000_000_000));
                if last_key != Some(key) {
                    last_key = Some(key);
                    seen += 1;
                    reasons[i].push(format!("{rule} {label}"));
                }
            }
        }
        for (i, s) in snaps.iter().enumerate() {
            for t in policy.tags.iter().filter(|t| s.tags.contains(t)) {
                reasons[i].push(format!("tag {t}"));
            }
        }
        if let Some(w) = &policy.within {
            for (i, s) in snaps.iter().enumerate() {
                let age = w.now.saturating_sub(s.time_ns.div_euclid(1_000_000_000));
                if age <= i64::try_from(w.secs).unwrap_or(i64::MAX) {
                    reasons[i].push(format!("within {}", w.label));
                }
            }
        }
        out.extend(snaps.iter().zip(reasons).map(|(s, reasons)| Verdict {
            id: s.id,
            group: group.clone(),
            reasons,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_602_359), "2026-12-07T00:12:39Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    const DAY: i64 = 86_400;
    /// 2024-01-01T00:00:00Z, a Monday.
    const T0: i64 = 1_704_067_200;

    fn snap(n: u8, time: i64, tags: &[&str]) -> Candidate {
        Candidate {
            id: SnapshotId([n; 32]),
            time_ns: time * 1_000_000_000,
            host: "h".into(),
            source: "/dev/sda".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// Ids kept by `policy` out of `snaps`, as their first byte, newest first.
    fn kept(policy: &Policy, snaps: &[Candidate]) -> Vec<u8> {
        apply(policy, snaps)
            .into_iter()
            .filter(|v| !v.reasons.is_empty())
            .map(|v| v.id.0[0])
            .collect()
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(T0 / DAY), (2024, 1, 1));
        assert_eq!(civil_from_days(T0 / DAY + 59), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(iso_week(T0 / DAY), (2024, 1));
        // 2021-01-03 (a Sunday) belongs to ISO week 53 of 2020.
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
        for d in -1000..1000 {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    /// One snapshot every 6 hours for 3 years.
    fn history() -> Vec<Candidate> {
        (0..3 * 365 * 4)
            .map(|i| snap((i % 251) as u8, T0 + i * 6 * 3600, &[]))
            .collect()
    }

    #[test]
    fn table_of_rules_over_a_generated_history() {
        let h = history();
        let newest = h.last().unwrap().time_ns / 1_000_000_000; // 2026-12-30 18:00
                                                                // (policy, the times it keeps, computed by hand)
        let cases: Vec<(Policy, Vec<i64>)> = vec![
            (
                Policy {
                    last: Some(3),
                    ..Default::default()
                },
                vec![newest, newest - 6 * 3600, newest - 12 * 3600],
            ),
            // hourly: each snapshot is in its own hour.
            (
                Policy {
                    hourly: Some(2),
                    ..Default::default()
                },
                vec![newest, newest - 6 * 3600],
            ),
            // daily: the newest of each day is its 18:00 snapshot.
            (
                Policy {
                    daily: Some(3),
                    ..Default::default()
                },
                vec![newest, newest - DAY, newest - 2 * DAY],
            ),
            // weekly: 2026-12-30 is a Wednesday; the newest of the previous ISO weeks is Sunday 18:00.
            (
                Policy {
                    weekly: Some(2),
                    ..Default::default()
                },
                vec![newest, newest - 3 * DAY],
            ),
            // monthly: newest of December, then 2026-11-30 18:00.
            (
                Policy {
                    monthly: Some(2),
                    ..Default::default()
                },
                vec![newest, newest - 30 * DAY],
            ),
            // yearly: 2026-12-30 18:00, 2025-12-31 18:00, 2024-12-31 18:00.
            (
                Policy {
                    yearly: Some(5),
                    ..Default::default()
                },
                vec![newest, newest - 364 * DAY, newest - 729 * DAY],
            ),
        ];
        for (policy, times) in cases {
            // Verdicts come newest first; times are unique, ids are not (they repeat every 251).
            let v = apply(&policy, &h);
            let mut newest_first = h.clone();
            newest_first.sort_by_key(|c| std::cmp::Reverse(c.time_ns));
            let kept_times: Vec<i64> = newest_first
                .iter()
                .zip(&v)
                .filter(|(_, v)| !v.reasons.is_empty())
                .map(|(c, _)| c.time_ns / 1_000_000_000)
                .collect();
            assert_eq!(kept_times, times, "{policy:?}");
        }
    }

    #[test]
    fn rules_combine_and_reasons_say_which() {
        let snaps = vec![
            snap(1, T0 + 10 * DAY, &[]),
            snap(2, T0 + 9 * DAY + 3600, &[]),
            snap(3, T0 + 9 * DAY, &[]),
            snap(4, T0 + 2 * DAY, &["keep"]),
            snap(5, T0 + DAY, &[]),
        ];
        let p = Policy {
            last: Some(1),
            daily: Some(2),
            tags: vec!["keep".into()],
            ..Default::default()
        };
        let v = apply(&p, &snaps);
        let reasons = |n: u8| v.iter().find(|v| v.id.0[0] == n).unwrap().reasons.clone();
        assert_eq!(
            reasons(1),
            vec!["last 1".to_string(), "daily 2024-01-11".into()]
        );
        assert_eq!(reasons(2), vec!["daily 2024-01-10".to_string()]);
        assert!(
            reasons(3).is_empty(),
            "an older snapshot of the same day goes"
        );
        assert_eq!(reasons(4), vec!["tag keep".to_string()]);
        assert!(reasons(5).is_empty());
    }

    #[test]
    fn groups_are_separate() {
        let mut a = snap(1, T0, &[]);
        a.host = "a".into();
        let mut b = snap(2, T0 - DAY, &[]);
        b.host = "b".into();
        assert_eq!(
            kept(
                &Policy {
                    last: Some(1),
                    ..Default::default()
                },
                &[a, b]
            ),
            vec![1, 2]
        );
    }

    #[test]
    fn within_counts_from_now_and_a_forged_flood_moves_nothing() {
        let now = 1_800_000_000i64;
        let day = 86_400i64;
        let snap = |n: u8, secs: i64| Candidate {
            id: SnapshotId([n; 32]),
            time_ns: secs * 1_000_000_000,
            host: "h".into(),
            source: "s".into(),
            tags: Vec::new(),
        };
        // Nightly for 60 days, then 150 forged snapshots dated ten years ahead (ids 100..250).
        let mut snaps: Vec<Candidate> = (0..60u8)
            .map(|d| snap(d, now - i64::from(d) * day))
            .collect();
        snaps.extend((0..150u8).map(|k| snap(100 + k, now + 3650 * day + i64::from(k))));
        let policy = Policy {
            within: Some(Within {
                secs: 30 * 86_400,
                now,
                label: "30d".into(),
            }),
            ..Policy::default()
        };
        let v = apply(&policy, &snaps);
        let kept = |n: u8| {
            v.iter()
                .find(|x| x.id == SnapshotId([n; 32]))
                .unwrap()
                .reasons
                .clone()
        };
        assert_eq!(kept(0), ["within 30d"]);
        assert_eq!(kept(30), ["within 30d"], "exactly 30 days old is within");
        assert!(kept(31).is_empty() && kept(59).is_empty());
        assert_eq!(kept(100), ["within 30d"], "a future date is within");
        // The same flood pushes everything real out of --keep-last.
        let last = Policy {
            last: Some(100),
            ..Policy::default()
        };
        let v = apply(&last, &snaps);
        assert!(v
            .iter()
            .find(|x| x.id == SnapshotId([0; 32]))
            .unwrap()
            .reasons
            .is_empty());
        // Real backups stopped 40 days ago, one forged snapshot is dated ahead: within 30d keeps
        // only the forged one, which does not count as keeping the group: refused.
        let stale: Vec<Candidate> = (40..45u8)
            .map(|d| snap(d, now - i64::from(d) * day))
            .chain([snap(200, now + 3650 * day)])
            .collect();
        let v = apply(&policy, &stale);
        assert_eq!(
            keeping_none(&policy, &stale, &v),
            Some(("h".to_owned(), "s".to_owned()))
        );
        assert_eq!(keeping_none(&policy, &snaps, &apply(&policy, &snaps)), None);
    }
}
