//! The routes: which page answers which request, the headers every answer carries, the
//! actions (exports, login, logout) and their checks.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::html;
use serde::Deserialize;

use crate::auth::{csrf_refused, Caller, WRONG_TOKEN_DELAY};
use crate::pages::{self, blocking, layout};
use crate::App;

type AppState = State<Arc<App>>;

/// Every route of the console, behind the guard of [`crate::auth`].
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/sources", get(sources))
        .route("/r/{n}/source/{name}", get(source))
        .route("/r/{n}/snap/{id}", get(snapshot))
        .route("/r/{n}/snap/{id}/files", get(files))
        .route("/r/{n}/snap/{id}/download", get(download))
        .route("/exports", get(exports).post(start_export))
        .route("/exports/{e}/stop", post(stop_export))
        .route("/jobs", get(jobs))
        .route("/jobs/{name}", get(job))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/style.css", get(style))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            crate::auth::guard,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), headers))
        .with_state(app)
}

/// Headers on every answer: nothing from elsewhere, no framing, no caching of backed-up data,
/// no referrer leaking snapshot ids.
async fn headers(State(app): AppState, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if app.auth.secure {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn overview(State(app): AppState, Extension(c): Extension<Caller>) -> Response {
    blocking(c, move |c| pages::overview::page(&app, c)).await
}

async fn sources(State(app): AppState, Extension(c): Extension<Caller>) -> Response {
    blocking(c, move |c| pages::sources::page(&app, c)).await
}

#[derive(Deserialize)]
struct PageQuery {
    page: Option<usize>,
}

async fn source(
    State(app): AppState,
    Extension(c): Extension<Caller>,
    UrlPath((n, name)): UrlPath<(usize, String)>,
    Query(q): Query<PageQuery>,
) -> Response {
    blocking(c, move |c| {
        pages::snapshots::source_page(&app, c, n, &name, q.page.unwrap_or(0))
    })
    .await
}

async fn snapshot(
    State(app): AppState,
    Extension(c): Extension<Caller>,
    UrlPath((n, id)): UrlPath<(usize, String)>,
) -> Response {
    blocking(c, move |c| pages::snapshots::snapshot_page(&app, c, n, &id)).await
}

#[derive(Deserialize)]
struct PathQuery {
    path: Option<String>,
}

async fn files(
    State(app): AppState,
    Extension(c): Extension<Caller>,
    UrlPath((n, id)): UrlPath<(usize, String)>,
    Query(q): Query<PathQuery>,
) -> Response {
    blocking(c, move |c| {
        pages::files::page(&app, c, n, &id, q.path.as_deref().unwrap_or(""))
    })
    .await
}

async fn download(
    State(app): AppState,
    UrlPath((n, id)): UrlPath<(usize, String)>,
    Query(q): Query<PathQuery>,
) -> Response {
    let Some(path) = q.path else {
        return (StatusCode::BAD_REQUEST, "name the file: ?path=PART:PATH\n").into_response();
    };
    pages::files::download(app, n, id, path).await
}

async fn exports(State(app): AppState, Extension(c): Extension<Caller>) -> Response {
    blocking(c, move |c| pages::files::exports_page(&app, c)).await
}

#[derive(Deserialize)]
struct StartForm {
    csrf: Option<String>,
    repo: usize,
    snapshot: String,
}

async fn start_export(
    State(app): AppState,
    Extension(c): Extension<Caller>,
    Form(f): Form<StartForm>,
) -> Response {
    if !c.allows(f.csrf.as_deref().unwrap_or("")) {
        return csrf_refused();
    }
    if !app.allow_exports {
        return (
            StatusCode::FORBIDDEN,
            "exports are off: start the console with --allow-exports\n",
        )
            .into_response();
    }
    let made = tokio::task::spawn_blocking(move || {
        let (_, opened) = pages::snapshots::repo(&app, f.repo)?;
        let s = pages::snapshots::snapshot(&opened, &f.snapshot)?;
        app.exports
            .start(&opened, f.repo, s.id)
            .map_err(|e| pages::PageError::unavailable(format!("cannot start the export: {e}")))?;
        Ok::<_, pages::PageError>(format!("/r/{}/snap/{}", f.repo, s.id.to_hex()))
    })
    .await;
    match made {
        Ok(Ok(to)) => Redirect::to(&to).into_response(),
        Ok(Err(e)) => pages::error_page(&c, e.status, &e.message),
        Err(_) => pages::error_page(
            &c,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the export failed to start",
        ),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

/// The `csrf` field of a form body; none in an empty body (a script's bare POST with a Bearer
/// token needs no form).
fn csrf_of(body: &[u8]) -> String {
    serde_urlencoded::from_bytes::<CsrfForm>(body)
        .ok()
        .and_then(|f| f.csrf)
        .unwrap_or_default()
}

async fn stop_export(
    State(app): AppState,
    Extension(c): Extension<Caller>,
    UrlPath(e): UrlPath<u64>,
    body: axum::body::Bytes,
) -> Response {
    if !c.allows(&csrf_of(&body)) {
        return csrf_refused();
    }
    let stopped = tokio::task::spawn_blocking(move || app.exports.stop(e))
        .await
        .unwrap_or(false);
    if stopped {
        Redirect::to("/exports").into_response()
    } else {
        pages::error_page(
            &c,
            StatusCode::NOT_FOUND,
            &format!("no export {e} is running"),
        )
    }
}

async fn jobs(State(app): AppState, Extension(c): Extension<Caller>) -> Response {
    blocking(c, move |c| pages::jobs::page(&app, c)).await
}

async fn job(
    State(app): AppState,
    Extension(c): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    blocking(c, move |c| pages::jobs::job_page(&app, c, &name)).await
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        pages::STYLE,
    )
        .into_response()
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Where to go after logging in: a path of this console only. Only visible ASCII is allowed
/// (a browser drops tabs and line ends from a URL, so `/<TAB>/elsewhere` would become
/// `//elsewhere`), and the path must not start with `//` or `/\\`, which name another host.
fn local(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_owned()
        }
        _ => "/".into(),
    }
}

fn login_page(next: &str, wrong: bool) -> Response {
    let page = layout(
        &Caller::Direct,
        "Log in",
        html! {
            @if wrong { p.error { "That is not the console's token." } }
            form.login method="post" action="/login" {
                label for="token" { "Token (from the console's --token-file)" }
                input #token type="password" name="token" autocomplete="current-password" autofocus;
                input type="hidden" name="next" value=(next);
                button type="submit" { "Log in" }
            }
        },
    );
    let status = if wrong {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    (status, Html(page.into_string())).into_response()
}

async fn login_form(Query(q): Query<NextQuery>) -> Response {
    login_page(&local(q.next.as_deref()), false)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(State(app): AppState, Form(f): Form<LoginForm>) -> Response {
    let next = local(f.next.as_deref());
    match app.auth.login(&f.token) {
        Some(session) => {
            let mut resp = Redirect::to(&next).into_response();
            resp.headers_mut()
                .insert(header::SET_COOKIE, app.auth.cookie(&session));
            resp
        }
        None => {
            tokio::time::sleep(WRONG_TOKEN_DELAY).await;
            login_page(&next, true)
        }
    }
}

async fn logout(
    State(app): AppState,
    Extension(c): Extension<Caller>,
    req_headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !c.allows(&csrf_of(&body)) {
        return csrf_refused();
    }
    if let Some(s) = crate::auth::session_cookie(&req_headers) {
        app.auth.logout(s);
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, app.auth.cookie(""));
    resp
}

#[cfg(test)]
mod tests {
    use super::local;

    #[test]
    fn login_goes_back_only_to_a_path_of_this_console() {
        assert_eq!(local(Some("/sources?x=1")), "/sources?x=1");
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "https://evil.example/",
            "evil",
            "/ /x",
        ] {
            assert_eq!(local(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(local(None), "/");
    }
}
