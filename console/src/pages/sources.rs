//! Sources: every source of every repository with its newest snapshot, the last run of the job
//! that backs it up, how it was made, and its size over time. Sources whose newest snapshot is
//! older than the threshold, or whose last run failed, stand out.

use std::collections::HashMap;

use maud::{html, Markup};

use super::{age, badge, bytes, enc, layout, time, Page};
use crate::auth::Caller;
use crate::charts;
use crate::App;

/// Snapshots a sparkline shows.
const SPARK: usize = 30;

/// How the newest run of a job went for one source.
pub struct LastRun {
    /// `success` or `failure`.
    pub status: String,
    /// Its error.
    pub error: Option<String>,
    /// When it ended.
    pub ended: String,
    /// The job.
    pub job: String,
}

/// The newest run of each source of each job of `app`, by (repository, source): each job's
/// records read once, newest first.
pub fn last_runs(app: &App) -> HashMap<(String, String), LastRun> {
    let mut out: HashMap<(String, String), LastRun> = HashMap::new();
    for job in &app.jobs {
        let records = sbk_records::read(&job.state_dir, "job", &job.name).unwrap_or_default();
        for r in records.iter().rev() {
            for s in r["sources"].as_array().into_iter().flatten() {
                let Some(name) = s["name"].as_str() else {
                    continue;
                };
                let ended = s["ended"].as_str().unwrap_or("").to_owned();
                let key = (job.repository.clone(), name.to_owned());
                if out.get(&key).is_none_or(|b| b.ended < ended) {
                    out.insert(
                        key,
                        LastRun {
                            status: s["status"].as_str().unwrap_or("unknown").to_owned(),
                            error: s["error"].as_str().map(str::to_owned),
                            ended,
                            job: job.name.clone(),
                        },
                    );
                }
            }
        }
    }
    out
}

/// The sources page.
pub fn page(app: &App, caller: &Caller) -> Page {
    let stale_ns = i64::try_from(app.stale_after.as_nanos()).unwrap_or(i64::MAX);
    let now = sbk_store::unix_now_ns();
    let runs = last_runs(app);
    let mut rows: Vec<Markup> = Vec::new();
    let mut unavailable: Vec<Markup> = Vec::new();
    for repo in &app.repos {
        let opened = match repo.open() {
            Ok(o) => o,
            Err(e) => {
                unavailable.push(html! { p.error { (repo.spec.location) ": " (e) } });
                continue;
            }
        };
        let catalog = opened.catalog();
        let mut sources = catalog.by_source();
        // A job's source that never had a snapshot (its first run failed) is listed too.
        for job in app
            .jobs
            .iter()
            .filter(|j| j.repository == repo.spec.location)
        {
            for s in &job.sources {
                sources.entry(s.clone()).or_default();
            }
        }
        for (name, snaps) in sources {
            let newest = snaps.last();
            let run = runs.get(&(repo.spec.location.clone(), name.clone()));
            let stale = newest.is_none_or(|n| now - n.time_ns > stale_ns);
            let failed = run.as_ref().is_some_and(|r| r.status != "success");
            let sizes: Vec<u64> = snaps
                .iter()
                .rev()
                .take(SPARK)
                .rev()
                .map(|s| s.size)
                .collect();
            let href = format!("/r/{}/source/{}", repo.n, enc(&name));
            rows.push(html! {
                tr class=(match (failed, stale) { (true, _) => "failed", (_, true) => "stale", _ => "" }) data-source=(name) {
                    td { (repo.spec.location) }
                    td { a href=(href) { (name) } }
                    td {
                        @match newest {
                            Some(n) => { (time(n.time_ns)) br; span.muted { (age(n.time_ns)) " ago" } }
                            None => span.muted { "none yet" },
                        }
                        @if stale { " " (badge("stale")) }
                    }
                    td.run {
                        @match run {
                            Some(r) => {
                                (badge(&r.status)) " " span.muted { (r.ended) " (" a href=(format!("/jobs/{}", enc(&r.job))) { (r.job) } ")" }
                                @if let Some(e) = &r.error { div.error { (e) } }
                            }
                            None => span.muted { "no job record" },
                        }
                    }
                    td {
                        @match newest.map(|n| &n.changed) {
                            Some(Some(c)) if c.incremental => { "incremental" @if !c.trusted { " " (badge("untrusted")) } }
                            Some(_) => "full",
                            None => "",
                        }
                    }
                    td { (snaps.len()) }
                    td { @if let Some(n) = newest { (bytes(n.size)) br; (charts::sparkline(&sizes)) } }
                }
            });
        }
    }
    Ok(layout(
        caller,
        "Sources",
        html! {
            @for u in unavailable { (u) }
            p.muted { "A source stands out when its newest snapshot is older than " (humantime::format_duration(app.stale_after)) " or its last run failed." }
            table.sources {
                thead { tr { th { "Repository" } th { "Source" } th { "Newest snapshot" } th { "Last run" } th { "Made" } th { "Snapshots" } th { "Size" } } }
                tbody { @for r in rows { (r) } }
            }
        },
    ))
}
