//! A source's snapshots (a timeline and a table), and one snapshot: its figures, its
//! changed-block record, what changed since its parent, its files and an export.

use maud::{html, Markup};
use sbk_store::SnapshotId;

use super::{age, bytes, enc, layout, short, time, Page, PageError};
use crate::auth::Caller;
use crate::charts;
use crate::repos::{Opened, Repo, Snap, Stats};
use crate::App;

/// Table rows per page of a source's snapshots.
const PER_PAGE: usize = 100;
/// Differing ranges listed on a snapshot's page.
const RANGES_SHOWN: usize = 20;

/// Repository `n` of `app`, open.
pub fn repo(app: &App, n: usize) -> Result<(&Repo, std::sync::Arc<Opened>), PageError> {
    let repo = app
        .repos
        .get(n)
        .ok_or_else(|| PageError::not_found(format!("no repository {n}")))?;
    let opened = repo
        .open()
        .map_err(|e| PageError::unavailable(format!("{}: {e}", repo.spec.location)))?;
    Ok((repo, opened))
}

/// Snapshot `spec` (a full id or a unique prefix) of an open repository.
pub fn snapshot(opened: &Opened, spec: &str) -> Result<std::sync::Arc<Snap>, PageError> {
    let lc = spec.to_ascii_lowercase();
    opened
        .catalog()
        .find(&lc)
        .cloned()
        .ok_or_else(|| PageError::not_found(format!("no snapshot {spec:?} in this repository")))
}

fn changed_text(s: &Snap) -> Markup {
    match &s.changed {
        Some(c) if c.incremental => html! {
            "incremental"
            @if !c.trusted { " (not trusted: the next run reads everything)" }
            br; span.muted { (c.segments_read) " segments read, " (c.segments_reused) " reused, " (bytes(c.bytes_skipped)) " skipped" }
        },
        Some(c) => html! { "full" @if let Some(t) = &c.token { br; span.muted { "token " (t) } } },
        None => html! { "full" },
    }
}

/// What forgetting `id` would free, from the background count, with its age.
fn freed(stats: &Stats, id: &SnapshotId) -> Markup {
    match stats {
        Stats::Done { unique, at, .. } => match unique.get(id) {
            Some((raw, stored)) => html! {
                span title=(format!("{} raw; counted {} ago", bytes(*raw), age(at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)))) { (bytes(*stored)) }
            },
            None => html! { span.muted { "newer than the count" } },
        },
        Stats::Pending => html! { span.muted { "counting…" } },
        Stats::Failed { .. } => html! { span.muted { "count failed" } },
    }
}

/// A source's snapshots, newest first, page `page` (from 0).
pub fn source_page(app: &App, caller: &Caller, n: usize, name: &str, page: usize) -> Page {
    let (repo, opened) = repo(app, n)?;
    let catalog = opened.catalog();
    let snaps: Vec<&std::sync::Arc<Snap>> =
        catalog.snaps.iter().filter(|s| s.source == name).collect();
    let run = super::sources::last_runs(app).remove(&(repo.spec.location.clone(), name.to_owned()));
    if snaps.is_empty() && run.is_none() {
        return Err(PageError::not_found(format!(
            "no source {name:?} in {}",
            repo.spec.location
        )));
    }
    let stats = opened.stats();
    let points: Vec<(i64, u64, String)> = snaps
        .iter()
        .map(|s| {
            (
                s.time_ns / 1_000_000_000,
                s.figures.new_stored,
                time(s.time_ns),
            )
        })
        .collect();
    let pages = snaps.len().div_ceil(PER_PAGE).max(1);
    let page = page.min(pages - 1);
    let shown = snaps.iter().rev().skip(page * PER_PAGE).take(PER_PAGE);
    let base = format!("/r/{n}/source/{}", enc(name));
    Ok(layout(
        caller,
        &format!("{name} in {}", repo.spec.location),
        html! {
            @if let Some(r) = &run {
                p { "Last run: " (super::badge(&r.status)) " " (r.ended) @if let Some(e) = &r.error { div.error { (e) } } }
            }
            (charts::timeline(&points))
            p.muted { (snaps.len()) " snapshots. \"Frees\" is what forgetting the snapshot alone would let prune reclaim (stored bytes no other snapshot refers to)." }
            table.snapshots {
                thead { tr { th { "Time" } th { "Snapshot" } th { "Size" } th { "New (stored)" } th { "Frees" } th { "Made" } th { "Protected until" } th { "Tags" } } }
                tbody {
                    @for s in shown {
                        tr {
                            td { (time(s.time_ns)) }
                            td { a.id href=(format!("/r/{n}/snap/{}", s.id.to_hex())) { (short(&s.id)) } }
                            td { (bytes(s.size)) }
                            td { (bytes(s.figures.new_stored)) }
                            td { (freed(&stats, &s.id)) }
                            td { (changed_text(s)) }
                            td { @if let Some(t) = s.protected_until { (time(t.saturating_mul(1_000_000_000))) } }
                            td { (s.tags.join(", ")) }
                        }
                    }
                }
            }
            @if pages > 1 {
                nav.pages {
                    @if page > 0 { a href=(format!("{base}?page={}", page - 1)) { "← newer" } " " }
                    "page " (page + 1) " of " (pages)
                    @if page + 1 < pages { " " a href=(format!("{base}?page={}", page + 1)) { "older →" } }
                }
            }
        },
    ))
}

/// One snapshot.
pub fn snapshot_page(app: &App, caller: &Caller, n: usize, spec: &str) -> Page {
    let (repo, opened) = repo(app, n)?;
    let s = snapshot(&opened, spec)?;
    let stats = opened.stats();
    let id = s.id.to_hex();
    let diff = s.parent.map(|p| {
        if opened.catalog().get(&p).is_none() {
            return Err(format!("its parent {p} has been forgotten"));
        }
        sbk_engine::diff(&opened.repo, &p, &s.id).map_err(|e| e.to_string())
    });
    let exports = app.exports.of(n, &s.id);
    Ok(layout(
        caller,
        &format!("Snapshot {}", short(&s.id)),
        html! {
            dl.figures.wide {
                div { dt { "Id" } dd.id { (id) } }
                div { dt { "Source" } dd { a href=(format!("/r/{n}/source/{}", enc(&s.source))) { (s.source) } " on " (s.host) } }
                div { dt { "Repository" } dd { (repo.spec.location) } }
                div { dt { "Time" } dd { (time(s.time_ns)) " (" (age(s.time_ns)) " ago)" } }
                div { dt { "Size" } dd { (bytes(s.size)) } }
                div { dt { "Read" } dd { (bytes(s.figures.bytes_read)) " (" (bytes(s.figures.bytes_zero)) " zeros)" } }
                div { dt { "New" } dd { (bytes(s.figures.new_raw)) " raw, " (bytes(s.figures.new_stored)) " stored, " (s.figures.new_chunks) " of " (s.figures.chunks) " chunks" } }
                div { dt { "Frees if forgotten" } dd { (freed(&stats, &s.id)) } }
                div { dt { "Made" } dd { (changed_text(&s)) } }
                @if let Some(t) = s.protected_until { div { dt { "Protected until" } dd { (time(t.saturating_mul(1_000_000_000))) } } }
                @if !s.tags.is_empty() { div { dt { "Tags" } dd { (s.tags.join(", ")) } } }
                @if let Some(c) = s.changed.as_ref().and_then(|c| c.token.as_ref()) { div { dt { "Storage token" } dd { (c) } } }
            }
            p { a.button href=(format!("/r/{n}/snap/{id}/files")) { "Browse files" } }
            h2 { "Changes since its parent" }
            @match (&s.parent, &diff) {
                (Some(p), Some(Ok(d))) => {
                    p { (bytes(d.bytes())) " in " (d.ranges.len()) " ranges differ from "
                        a href=(format!("/r/{n}/snap/{}", p.to_hex())) { (short(p)) }
                        @if d.size_a != d.size_b { " (size " (bytes(d.size_a)) " → " (bytes(d.size_b)) ")" } "." }
                    @if !d.ranges.is_empty() {
                        table.ranges { thead { tr { th { "Offset" } th { "Length" } } }
                            tbody { @for r in d.ranges.iter().take(RANGES_SHOWN) { tr { td { (r.start) } td { (bytes(r.end - r.start)) } } } } }
                        @if d.ranges.len() > RANGES_SHOWN { p.muted { "and " (d.ranges.len() - RANGES_SHOWN) " more" } }
                    }
                }
                (_, Some(Err(e))) => p.error { (e) },
                _ => p.muted { "No parent: a full backup." },
            }
            h2 { "Instant recovery" }
            (super::files::exports_of(app, caller, n, &s.id, &exports))
        },
    ))
}
