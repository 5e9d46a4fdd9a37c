//! Who may use the console: the holder of the token (`--token-file`), by a login form that sets
//! a session cookie (HttpOnly, SameSite=Strict, Secure under TLS) or by `Authorization: Bearer
//! TOKEN` for scripts. Actions are POSTs that carry the session's CSRF token (a Bearer request
//! needs none: a browser never adds that header by itself). Tokens are compared in constant
//! time. On a Unix socket without a token, the socket's mode (0600) is the protection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use crate::App;

/// The session cookie's name.
pub const COOKIE: &str = "sbk_session";
/// How long a login lasts.
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// How long a wrong token is answered late (the login form's, a Bearer header's).
pub const WRONG_TOKEN_DELAY: Duration = Duration::from_secs(1);
/// Sessions kept at most (the oldest go first): a flood of logins cannot exhaust memory.
const MAX_SESSIONS: usize = 1000;

/// What an authenticated request carries to its handler.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A browser session, with its CSRF token.
    Session {
        /// The token its forms carry.
        csrf: String,
    },
    /// A script that sent the token itself (or anyone on a socket without a token).
    Direct,
}

impl Caller {
    /// The CSRF token forms must carry ("" for a direct caller, who needs none).
    pub fn csrf(&self) -> &str {
        match self {
            Caller::Session { csrf } => csrf,
            Caller::Direct => "",
        }
    }

    /// Whether a POST's `csrf` field is the one this caller's forms carry.
    pub fn allows(&self, given: &str) -> bool {
        match self {
            Caller::Session { csrf } => same(csrf, given),
            Caller::Direct => true,
        }
    }
}

/// The token and the sessions it opened.
pub struct Auth {
    token: Option<String>,
    sessions: Mutex<HashMap<String, (String, Instant)>>,
    /// Whether cookies get `Secure` (TLS).
    pub secure: bool,
}

/// Equal in constant time: both are hashed, and BLAKE3 hashes compare in constant time, so the
/// time taken says nothing about how much of the token was right (nor its length).
pub fn same(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

/// 32 random bytes as hex.
fn random_hex() -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS has randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Auth {
    /// With `token` required (`None`: open to whoever reaches the socket).
    pub fn new(token: Option<String>, secure: bool) -> Auth {
        Auth {
            token,
            sessions: Mutex::new(HashMap::new()),
            secure,
        }
    }

    /// A new session if `given` is the token: its cookie value.
    pub fn login(&self, given: &str) -> Option<String> {
        let token = self.token.as_deref()?;
        if !same(token, given) {
            return None;
        }
        let id = random_hex();
        let mut s = self.sessions.lock().expect("no thread panics holding this");
        s.retain(|_, (_, t)| t.elapsed() < SESSION_LIFE);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                s.remove(&oldest);
            }
        }
        s.insert(id.clone(), (random_hex(), Instant::now()));
        Some(id)
    }

    /// Ends the session of `cookie`.
    pub fn logout(&self, cookie: &str) {
        self.sessions
            .lock()
            .expect("no thread panics holding this")
            .remove(cookie);
    }

    /// Who sent a request with these headers, if anyone the console lets in.
    pub fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        let Some(token) = &self.token else {
            return Some(Caller::Direct);
        };
        if let Some(bearer) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return same(token, bearer.trim()).then_some(Caller::Direct);
        }
        let cookie = session_cookie(headers)?;
        let s = self.sessions.lock().expect("no thread panics holding this");
        let (csrf, at) = s.get(cookie)?;
        (at.elapsed() < SESSION_LIFE).then(|| Caller::Session { csrf: csrf.clone() })
    }

    /// The `Set-Cookie` value that opens session `id` (or, empty, ends it).
    pub fn cookie(&self, id: &str) -> HeaderValue {
        let life = if id.is_empty() {
            "; Max-Age=0".to_owned()
        } else {
            format!("; Max-Age={}", SESSION_LIFE.as_secs())
        };
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{life}{secure}"
        ))
        .expect("hex and fixed text")
    }
}

/// The session cookie of a request, if it has one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Lets a request through to its handler with its [`Caller`], or refuses it: a page asked for
/// by a browser goes to the login form, anything else gets 401.
pub async fn guard(
    State(app): State<std::sync::Arc<App>>,
    mut req: Request,
    next: Next,
) -> Response {
    // A form posted from another site is refused whoever sends it (browsers say where a
    // request comes from; scripts send no such header): with SameSite=Strict cookies and
    // CSRF tokens this is a third wall, and the only one on a socket without a token.
    if req.method() == Method::POST {
        let site = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok());
        if site.is_some_and(|s| s != "same-origin" && s != "none") {
            return (
                StatusCode::FORBIDDEN,
                "refused: a request from another site\n",
            )
                .into_response();
        }
    }
    let path = req.uri().path();
    if path == "/login" || path == "/style.css" {
        return next.run(req).await;
    }
    match app.auth.caller(req.headers()) {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None if req.method() == Method::GET && wants_html(req.headers()) => {
            let back = req
                .uri()
                .path_and_query()
                .map_or("/".to_owned(), |p| p.as_str().to_owned());
            Redirect::to(&format!("/login?next={}", crate::pages::enc(&back))).into_response()
        }
        None => {
            if req.headers().contains_key(header::AUTHORIZATION) {
                // A wrong token is answered late, as in the login form.
                tokio::time::sleep(WRONG_TOKEN_DELAY).await;
            }
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a token is required: log in, or send Authorization: Bearer TOKEN\n",
            )
                .into_response()
        }
    }
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// The refusal of a POST whose CSRF token is missing or wrong.
pub fn csrf_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        "refused: the form's CSRF token is missing or not this session's; reload the page and try again\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_bearers_and_csrf() {
        let auth = Auth::new(Some("s3cret-token-0123".into()), false);
        assert!(auth.login("wrong").is_none());
        let id = auth.login("s3cret-token-0123").unwrap();
        let mut h = HeaderMap::new();
        assert!(auth.caller(&h).is_none());
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={id}")).unwrap(),
        );
        let Some(Caller::Session { csrf }) = auth.caller(&h) else {
            panic!("the session is not known")
        };
        let caller = auth.caller(&h).unwrap();
        assert!(caller.allows(&csrf));
        assert!(!caller.allows(""));
        assert!(!caller.allows("0"));
        auth.logout(&id);
        assert!(auth.caller(&h).is_none());
        let mut b = HeaderMap::new();
        b.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret-token-0123"),
        );
        assert!(matches!(auth.caller(&b), Some(Caller::Direct)));
        b.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret-token-0124"),
        );
        assert!(auth.caller(&b).is_none());
        let open = Auth::new(None, false);
        assert!(matches!(
            open.caller(&HeaderMap::new()),
            Some(Caller::Direct)
        ));
        assert!(open.login("anything").is_none());
        let c = auth.cookie("ab").to_str().unwrap().to_owned();
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
    }
}
