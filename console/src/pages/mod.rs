//! The pages: each a function from the console's state to HTML, run on a blocking thread (the
//! repository's reads block), inside one layout.

pub mod files;
pub mod jobs;
pub mod overview;
pub mod snapshots;
pub mod sources;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::auth::Caller;

/// A page that could not be made: its status and what to tell the operator.
#[derive(Debug)]
pub struct PageError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The message.
    pub message: String,
}

impl PageError {
    /// 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> PageError {
        PageError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    /// 503: a repository that cannot be read now.
    pub fn unavailable(message: impl Into<String>) -> PageError {
        PageError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }

    /// 400: a request that makes no sense.
    pub fn bad(message: impl Into<String>) -> PageError {
        PageError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// A page's result.
pub type Page = Result<Markup, PageError>;

/// Runs `make` on a blocking thread and answers with its page, or its error as a page. A panic
/// (a filesystem reader meeting a hostile image) is a 500 page, never a dropped console.
pub async fn blocking(
    caller: Caller,
    make: impl FnOnce(&Caller) -> Page + Send + 'static,
) -> Response {
    let c = caller.clone();
    let made = tokio::task::spawn_blocking(move || make(&c)).await;
    match made {
        Ok(Ok(page)) => Html(page.into_string()).into_response(),
        Ok(Err(e)) => error_page(&caller, e.status, &e.message),
        Err(_) => error_page(
            &caller,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the page failed while it was being made (logged by the console); other pages, and an export of the raw disk, still work",
        ),
    }
}

/// An error as a page.
pub fn error_page(caller: &Caller, status: StatusCode, message: &str) -> Response {
    let page = layout(
        caller,
        status.canonical_reason().unwrap_or("Error"),
        html! { p.error { (message) } },
    );
    (status, Html(page.into_string())).into_response()
}

/// The page around `body`: the navigation, and a logout button that carries the CSRF token.
pub fn layout(caller: &Caller, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sbk console" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    nav {
                        a.brand href="/" { "sbk" }
                        a href="/" { "Overview" }
                        a href="/sources" { "Sources" }
                        a href="/exports" { "Exports" }
                        a href="/jobs" { "Jobs" }
                        @if let Caller::Session { csrf } = caller {
                            form.logout method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The style sheet, served from the binary.
pub const STYLE: &str = include_str!("style.css");

/// Bytes as people read them on a page: `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    sbk_records::bytes(n, 1)
}

/// A time (ns since the epoch) as RFC 3339, UTC, to the second.
pub fn time(ns: i64) -> String {
    sbk_records::time(ns)
}

/// The day (UTC) of a time in seconds since the epoch: `2026-12-07`.
pub fn day(secs: i64) -> String {
    let t = time(secs.saturating_mul(1_000_000_000));
    t.get(..10).unwrap_or(&t).to_owned()
}

/// How long ago `ns` was, from now: `3 h`, `2 d`.
pub fn age(ns: i64) -> String {
    let secs = (sbk_store::unix_now_ns().saturating_sub(ns) / 1_000_000_000).max(0);
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 2 * 86400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86400),
    }
}

/// What a path segment or query value may hold unescaped.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes `s` for a URL path segment or query value.
pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// A short id: the first 12 hex digits, as people paste them.
pub fn short(id: &sbk_store::SnapshotId) -> String {
    id.to_hex()[..12].to_owned()
}

/// A status word as a coloured badge.
pub fn badge(status: &str) -> Markup {
    let class = match status {
        "success" | "ok" => "ok",
        "partial" | "problems" | "stale" | "stopped" => "warn",
        _ => "bad",
    };
    html! { span class=(format!("badge {class}")) { (status) } }
}

/// A form field that carries the CSRF token.
pub fn csrf_field(caller: &Caller) -> Markup {
    html! { input type="hidden" name="csrf" value=(caller.csrf()); }
}
