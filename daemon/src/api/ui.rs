//! The status page: a small read-only page on the API listener, for people.
//!
//! A browser lets any web page send requests to 127.0.0.1, so the page is locked down:
//! - `tandem open` asks for a one-time code (with the bearer token; valid 2 minutes) and
//!   prints `http://127.0.0.1:PORT/ui/login?code=...`. Redeeming it sets a session cookie,
//!   `HttpOnly; SameSite=Strict`, so other sites' pages can neither read it nor send it.
//! - Every cookie-authenticated request must name this listener in `Host` (no DNS
//!   rebinding) and, when it carries an `Origin`, this listener's own origin; and it may only
//!   read (GET): the page can look, not change anything.
//! - Everything the page needs is served here (no CDN): one HTML file with its CSS and JS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, header};

/// How long a login code stays valid.
const CODE_TTL: Duration = Duration::from_secs(120);
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "tandem_ui";

/// The page.
pub const PAGE: &str = include_str!("ui.html");

/// What a browser without a session gets: a form for the code `tandem open` prints, and
/// nothing about the node.
pub const LOGIN: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tandem: log in</title>
<style>body{font:15px system-ui,sans-serif;margin:12vh auto;max-width:30em;color:#1d2330}
input{font:inherit;padding:6px;width:100%;box-sizing:border-box}button{font:inherit;margin-top:10px;padding:6px 14px}
code{background:#eef0f5;padding:1px 4px;border-radius:3px}</style></head>
<body><h1>tandem</h1>
<p>Run <code>tandem open</code> on this machine and follow the link it prints, or paste its
code here. A code works once, for 2 minutes.</p>
<form id="login" method="get" action="/ui/login"><input name="code" aria-label="login code" autocomplete="off" required>
<button type="submit">Log in</button></form></body></html>
"#;

/// Login codes and sessions of the status page.
#[derive(Debug)]
pub struct Ui {
    addr: SocketAddr,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    codes: HashMap<String, Instant>,
    sessions: HashMap<String, Instant>,
}

/// Why a cookie-authenticated request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No valid session.
    NoSession,
    /// `Host` or `Origin` is not this listener (another site, or DNS rebinding).
    Foreign(&'static str),
    /// The page may only read.
    ReadOnly,
}

fn random_hex() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Ui {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh one-time login code.
    pub fn new_code(&self, now: Instant) -> String {
        let code = random_hex();
        let mut st = self.state();
        st.codes.retain(|_, exp| *exp > now);
        st.codes.insert(code.clone(), now + CODE_TTL);
        code
    }

    /// Redeems a login code (once, before it expires) for a session token.
    pub fn redeem(&self, code: &str, now: Instant) -> Option<String> {
        let mut st = self.state();
        let expires = st.codes.remove(code)?;
        if expires <= now {
            return None;
        }
        let session = random_hex();
        st.sessions.retain(|_, exp| *exp > now);
        st.sessions.insert(session.clone(), now + SESSION_TTL);
        Some(session)
    }

    /// The URL a code logs in at.
    pub fn login_url(&self, code: &str) -> String {
        format!("http://{}/ui/login?code={code}", self.addr)
    }

    /// Whether `Host` names this listener.
    pub fn host_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| self.is_ours(h))
    }

    /// Whether `host` (`name:port`) is this listener, by address or as localhost.
    fn is_ours(&self, host: &str) -> bool {
        let port = self.addr.port();
        [
            self.addr.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Whether `origin` (an `Origin` header) is this listener's own page.
    pub fn origin_is_ours(&self, origin: &str) -> bool {
        origin
            .strip_prefix("http://")
            .is_some_and(|h| self.is_ours(h))
    }

    /// Checks a request that carries no bearer token: a valid session cookie, this listener
    /// in `Host` and `Origin`, and a read.
    pub fn check(&self, method: &Method, headers: &HeaderMap, now: Instant) -> Result<(), Refusal> {
        let session = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.to_string());
        let Some(session) = session else {
            return Err(Refusal::NoSession);
        };
        let valid = self
            .state()
            .sessions
            .get(&session)
            .is_some_and(|exp| *exp > now);
        if !valid {
            return Err(Refusal::NoSession);
        }
        if !self.host_ok(headers) {
            return Err(Refusal::Foreign("Host"));
        }
        if let Some(origin) = headers.get(header::ORIGIN)
            && !origin.to_str().is_ok_and(|o| self.origin_is_ours(o))
        {
            return Err(Refusal::Foreign("Origin"));
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(Refusal::ReadOnly);
        }
        Ok(())
    }

    /// The `Set-Cookie` value for a session.
    pub fn cookie(session: &str) -> String {
        format!(
            "{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            SESSION_TTL.as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn codes_are_one_time_and_sessions_are_locked_to_this_listener() {
        let ui = Ui::new(SocketAddr::from(([127, 0, 0, 1], 7374)));
        let t = Instant::now();
        let code = ui.new_code(t);
        let session = ui.redeem(&code, t).expect("a fresh code works");
        assert!(ui.redeem(&code, t).is_none(), "once");
        let late = ui.new_code(t);
        assert!(ui.redeem(&late, t + CODE_TTL).is_none(), "expired");
        let cookie = format!("other=1; {COOKIE}={session}");
        let ok = headers(&[("host", "127.0.0.1:7374"), ("cookie", &cookie)]);
        assert_eq!(ui.check(&Method::GET, &ok, t), Ok(()));
        let local = headers(&[
            ("host", "localhost:7374"),
            ("cookie", &cookie),
            ("origin", "http://localhost:7374"),
        ]);
        assert_eq!(ui.check(&Method::GET, &local, t), Ok(()));
        let rebound = headers(&[("host", "evil.example:7374"), ("cookie", &cookie)]);
        assert_eq!(
            ui.check(&Method::GET, &rebound, t),
            Err(Refusal::Foreign("Host"))
        );
        let cross = headers(&[
            ("host", "127.0.0.1:7374"),
            ("cookie", &cookie),
            ("origin", "https://evil.example"),
        ]);
        assert_eq!(
            ui.check(&Method::GET, &cross, t),
            Err(Refusal::Foreign("Origin"))
        );
        assert_eq!(ui.check(&Method::POST, &ok, t), Err(Refusal::ReadOnly));
        let forged = headers(&[("host", "127.0.0.1:7374"), ("cookie", "tandem_ui=00")]);
        assert_eq!(ui.check(&Method::GET, &forged, t), Err(Refusal::NoSession));
        assert_eq!(
            ui.check(&Method::GET, &ok, t + SESSION_TTL),
            Err(Refusal::NoSession),
            "sessions expire"
        );
    }
}
