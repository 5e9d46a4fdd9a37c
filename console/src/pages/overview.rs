//! The overview: per repository its sizes, ratios, snapshot and source counts, storage,
//! encryption and Object Lock, the last verify, and charts of its growth.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use maud::{html, Markup};
use sbk_store::LockMode;

use super::{age, badge, bytes, day, layout, time, Page};
use crate::auth::Caller;
use crate::charts;
use crate::repos::{Repo, Stats};
use crate::App;

/// Days the bytes-added chart covers.
const DAYS: i64 = 30;

/// The overview page.
pub fn page(app: &App, caller: &Caller) -> Page {
    let cards: Vec<Markup> = app.repos.iter().map(card).collect();
    Ok(layout(
        caller,
        "Overview",
        html! { @for c in cards { (c) } },
    ))
}

/// The records of `kind` (`verify`, `prune`) about `location` in any of `dirs`, oldest first.
pub fn records(dirs: &[PathBuf], kind: &str, location: &str) -> Vec<serde_json::Value> {
    // Folders are named after the location with some characters replaced, so two locations
    // can share one: each record says its own.
    let mut all: Vec<serde_json::Value> = dirs
        .iter()
        .flat_map(|d| sbk_records::read(d, kind, location).unwrap_or_default())
        .filter(|r| r["repository"] == location)
        .collect();
    all.sort_by(|a, b| a["started"].as_str().cmp(&b["started"].as_str()));
    all
}

/// Seconds since the epoch of a record's RFC 3339 time field.
pub fn record_secs(v: &serde_json::Value) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(v.as_str()?).ok()?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as i64)
}

fn card(repo: &Repo) -> Markup {
    let loc = &repo.spec.location;
    let opened = match repo.open() {
        Ok(o) => o,
        Err(e) => {
            return html! {
                section.card.failed id=(format!("repo-{}", repo.n)) {
                    h2 { (loc) " " (badge("unavailable")) }
                    p.error { "Cannot be opened: " (e) }
                    p.muted { "The console tries again on the next page load after 30 s; the other repositories work meanwhile." }
                }
            }
        }
    };
    let catalog = opened.catalog();
    let config = opened.repo.config();
    let sources = catalog.by_source().len();
    let logical: u64 = catalog.snaps.iter().map(|s| s.size).sum();
    let verifies = records(&repo.spec.state_dirs, "verify", loc);
    let prunes = records(&repo.spec.state_dirs, "prune", loc);
    let last_verify = verifies.last();
    // Bytes added per day, from each snapshot's figures (stored bytes its backup added).
    let today = sbk_store::unix_now().div_euclid(86400);
    let mut per_day: BTreeMap<i64, u64> = (today - DAYS + 1..=today).map(|d| (d, 0)).collect();
    for s in &catalog.snaps {
        let d = s.time_ns.div_euclid(1_000_000_000).div_euclid(86400);
        if let Some(v) = per_day.get_mut(&d) {
            *v += s.figures.new_stored;
        }
    }
    let added: Vec<(String, u64)> = per_day
        .into_iter()
        .map(|(d, v)| (day(d * 86400), v))
        .collect();
    let mut measured: Vec<(i64, u64)> = verifies
        .iter()
        .chain(prunes.iter())
        .filter_map(|r| Some((record_secs(&r["ended"])?, r["stored_bytes"].as_u64()?)))
        .collect();
    measured.sort_unstable();
    let stats = opened.stats();
    let kind = if loc.starts_with("s3://") {
        "S3 object storage"
    } else {
        "local directory"
    };
    html! {
        section.card id=(format!("repo-{}", repo.n)) {
            h2 { (loc) }
            dl.figures {
                div { dt { "Snapshots" } dd.snapshot-count { (catalog.snaps.len()) } }
                div { dt { "Sources" } dd { a href="/sources" { (sources) } } }
                div { dt { "Logical size" } dd title="the sum of every snapshot's size" { (bytes(logical)) } }
                @match &*stats {
                    Stats::Done { repo: r, at, took, .. } => {
                        div { dt { "Stored" } dd title="bytes of all pack files" { (bytes(r.pack_bytes)) } }
                        div { dt { "Dedup" } dd { (format!("{:.2}x", r.dedup_ratio())) } }
                        div { dt { "Compression" } dd { (format!("{:.2}x", r.compression_ratio())) } }
                        div.muted { dt { "Counted" } dd title=(format!("in {:.1} s", took.as_secs_f64())) { (ago(*at)) " ago" } }
                    }
                    Stats::Pending => {
                        div { dt { "Stored, dedup, compression" } dd.muted { "counting…" } }
                    }
                    Stats::Failed { error, at } => {
                        div { dt { "Stored, dedup, compression" } dd.error { "count failed " (ago(*at)) " ago: " (error) } }
                    }
                }
                div { dt { "Storage" } dd { (kind) } }
                div { dt { "Encryption" } dd { @if opened.repo.is_encrypted() { "on" } @else { span.warn { "none" } } } }
                div { dt { "Object Lock" } dd {
                    @match config.object_lock {
                        Some(l) => { (match l.mode { LockMode::Compliance => "compliance", LockMode::Governance => "governance" }) ", " (humantime::format_duration(std::time::Duration::from_secs(l.secs))) }
                        None => "off",
                    }
                } }
                div { dt { "Last verify" } dd.last-verify {
                    @match last_verify {
                        Some(v) => {
                            (badge(v["status"].as_str().unwrap_or("unknown")))
                            " " (v["ended"].as_str().unwrap_or("?"))
                            @if v["read_data"].as_bool() == Some(true) { " (data read)" }
                        }
                        None => span.warn { "never (no verify record)" },
                    }
                } }
            }
            @if let Some(e) = &catalog.error { p.error { (e) } }
            @if !catalog.broken.is_empty() {
                p.error { (catalog.broken.len()) " snapshot manifests cannot be read, first " (catalog.broken[0].0) ": " (catalog.broken[0].1) }
            }
            @if let Some(v) = last_verify.filter(|v| v["status"] != "success") {
                details.error { summary { "What the last verify found" }
                    @if let Some(e) = v["error"].as_str() { p { (e) } }
                    ul { @for p in v["problems"].as_array().into_iter().flatten().take(20) { li { (p.as_str().unwrap_or("")) } } }
                }
            }
            div.charts {
                figure { (charts::bars("Bytes stored per day by new snapshots", &added)) figcaption { "Stored bytes added per day (last " (DAYS) " days), from the snapshots' manifests" } }
                figure { (charts::line("Stored size as measured", &measured)) figcaption { "Stored size as measured by prune and verify runs" } }
            }
            p.muted { "Newest snapshot: " @match catalog.snaps.last() { Some(s) => { (time(s.time_ns)) " (" (age(s.time_ns)) " ago)" } None => "none" } }
        }
    }
}

/// How long ago a time was.
fn ago(at: SystemTime) -> String {
    let ns = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    age(ns)
}
