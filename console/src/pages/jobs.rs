//! Jobs: the history of each job's runs and of each repository's verifies, from the records
//! `sbk run` and `sbk verify` leave in their state directories.

use maud::{html, Markup};
use serde_json::Value;

use super::{badge, bytes, enc, layout, Page, PageError};
use crate::auth::Caller;
use crate::App;

/// Runs shown in a job's history on the jobs page.
const RECENT: usize = 10;

fn figure(v: &Value) -> Markup {
    match v.as_u64() {
        Some(n) => html! { (bytes(n)) },
        None => html! {},
    }
}

/// One run: its summary row, and each source with its hooks' output (shown when `open`).
fn run(r: &Value, open: bool) -> Markup {
    let sources = r["sources"].as_array().cloned().unwrap_or_default();
    let failed = sources.iter().filter(|s| s["status"] != "success").count();
    html! {
        details.run open[open] {
            summary {
                (badge(r["status"].as_str().unwrap_or("unknown")))
                " " (r["started"].as_str().unwrap_or("?")) " → " (r["ended"].as_str().unwrap_or("?"))
                " · exit " (r["exit_code"]) " · " (sources.len() - failed) " of " (sources.len()) " sources backed up"
            }
            @if let Some(e) = r["error"].as_str() { p.error { (e) } }
            table {
                thead { tr { th { "Source" } th { "Status" } th { "Snapshot" } th { "Size" } th { "Read" } th { "New" } th { "Stored" } } }
                tbody {
                    @for s in &sources {
                        tr {
                            td { (s["name"].as_str().unwrap_or("?")) }
                            td { (badge(s["status"].as_str().unwrap_or("unknown"))) @if let Some(e) = s["error"].as_str() { div.error { (e) } } }
                            td.id { (s["snapshot"].as_str().map(|x| x.get(..12).unwrap_or(x)).unwrap_or("")) }
                            td { (figure(&s["size"])) }
                            td { (figure(&s["bytes_read"])) }
                            td { (figure(&s["new_bytes"])) }
                            td { (figure(&s["stored_bytes"])) }
                        }
                        @for h in s["hooks"].as_array().into_iter().flatten() {
                            tr.hook {
                                td colspan="7" {
                                    "hook " code { (h["hook"].as_str().unwrap_or("?")) } ": " (h["status"].as_str().unwrap_or("?"))
                                    @if let Some(t) = h["output_tail"].as_str().filter(|t| !t.is_empty()) { pre.tail { (t) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The jobs page: each job's newest runs, and each repository's verifies.
pub fn page(app: &App, caller: &Caller) -> Page {
    let verifies: Vec<(&crate::repos::Repo, Vec<Value>)> = app
        .repos
        .iter()
        .map(|repo| {
            let v = super::overview::records(&repo.spec.state_dirs, "verify", &repo.spec.location);
            (repo, v)
        })
        .collect();
    Ok(layout(
        caller,
        "Jobs",
        html! {
            @if app.jobs.is_empty() { p.muted { "No job files given: start the console with the job files sbk run uses to see their runs here." } }
            @for job in &app.jobs {
                @let records = sbk_records::read(&job.state_dir, "job", &job.name).unwrap_or_default();
                section.card.job data-job=(job.name) {
                    h2 { a href=(format!("/jobs/{}", enc(&job.name))) { (job.name) } " "
                        @match records.last() { Some(r) => (badge(r["status"].as_str().unwrap_or("unknown"))), None => span.muted { "never ran" } } }
                    p.muted { (job.file.display()) " → " (job.repository) " · " (job.sources.join(", ")) }
                    @for (i, r) in records.iter().rev().take(RECENT).enumerate() { (run(r, i == 0)) }
                    @if records.len() > RECENT { p { a href=(format!("/jobs/{}", enc(&job.name))) { "all " (records.len()) " runs" } } }
                }
            }
            h2 { "Verify runs" }
            @for (repo, v) in verifies {
                section.card {
                    h3 { (repo.spec.location) }
                    @if v.is_empty() { p.muted { "No verify record." } }
                    table {
                        @for r in v.iter().rev().take(RECENT) {
                            tr {
                                td { (badge(r["status"].as_str().unwrap_or("unknown"))) }
                                td { (r["started"].as_str().unwrap_or("?")) " → " (r["ended"].as_str().unwrap_or("?")) }
                                td { @if r["read_data"].as_bool() == Some(true) { "data read" } @else { "structure" } }
                                td { @for p in r["problems"].as_array().into_iter().flatten().take(5) { div.error { (p.as_str().unwrap_or("")) } } @if let Some(e) = r["error"].as_str() { div.error { (e) } } }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// One job's whole history.
pub fn job_page(app: &App, caller: &Caller, name: &str) -> Page {
    let job = app
        .jobs
        .iter()
        .find(|j| j.name == name)
        .ok_or_else(|| PageError::not_found(format!("no job {name:?}")))?;
    let records = sbk_records::read(&job.state_dir, "job", &job.name).unwrap_or_default();
    Ok(layout(
        caller,
        &format!("Job {name}"),
        html! {
            p.muted { (job.file.display()) " → " (job.repository) " · records in " (job.state_dir.display()) }
            @for (i, r) in records.iter().rev().enumerate() { (run(r, i == 0)) }
        },
    ))
}
