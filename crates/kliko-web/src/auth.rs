//! Access control: the token (on non-loopback addresses), the CSRF secret, and the
//! headers every response carries.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use kliko_core::Digest;

use crate::html;
use crate::AppState;

pub const COOKIE: &str = "kliko_auth";

/// 32 random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the operating system's random source");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compare secrets without leaking where they differ.
pub fn ct_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the cookie holds: derived from the token, so a token with any characters fits in it.
pub fn cookie_value(token: &str) -> String {
    Digest::derive("kliko web 2026 auth cookie", token.as_bytes()).to_hex()
}

/// The value of `name` in a query string (`+` and `%XX` decoded as forms encode them).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// The query string without its `token` pairs (the others as they were sent).
fn query_without_token(query: &str) -> String {
    let keep = |kv: &&str| {
        let key = kv.split_once('=').map_or(*kv, |(k, _)| k);
        !kv.is_empty() && form_urlencoded::parse(key.as_bytes()).next().is_none_or(|(k, _)| k != "token")
    };
    query.split('&').filter(keep).collect::<Vec<_>>().join("&")
}

fn has_cookie(req: &Request, value: &str) -> bool {
    CookieJar::from_headers(req.headers()).iter().any(|c| c.name() == COOKIE && ct_eq(c.value(), value))
}

/// Refuses every request without the token when the server has one; accepts `?token=`
/// once and answers with an HttpOnly cookie (and, for a GET, a redirect to the same URL
/// without the token, so it does not stay in the address bar or the history).
pub async fn require_token(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(token) = &st.token else { return next.run(req).await };
    let cookie = cookie_value(token);
    if has_cookie(&req, &cookie) {
        return next.run(req).await;
    }
    let given = query_param(req.uri().query(), "token");
    if given.is_some_and(|g| ct_eq(&g, token)) {
        let set =
            Cookie::build((COOKIE, cookie)).http_only(true).same_site(SameSite::Strict).path("/").build().to_string();
        let mut resp = if req.method() == Method::GET {
            let path = req.uri().path().to_string();
            let rest = query_without_token(req.uri().query().unwrap_or(""));
            let target = if rest.is_empty() { path } else { format!("{path}?{rest}") };
            let mut r = StatusCode::SEE_OTHER.into_response();
            if let Ok(v) = HeaderValue::from_str(&target) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        } else {
            next.run(req).await
        };
        if let Ok(v) = HeaderValue::from_str(&set) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
        return resp;
    }
    let body = html::page(
        "Token required",
        html::Nav::None,
        "<h1>Token required</h1><p class=\"sub\">This kliko server is reachable from other machines, so it needs its access token.</p>\
<p>Open the address printed by <code>kliko serve</code> (it ends in <code>?token=…</code>) once; this browser then remembers it.</p>",
    );
    (StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// Headers on every response: no framing, no sniffing, no referrer, scripts only our own.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let (nonce, mut resp) = html::with_fresh_nonce(next.run(req)).await;
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        let csp = format!(
            "default-src 'self'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        );
        if let Ok(v) = HeaderValue::from_str(&csp) {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(query_param(Some("a=1&token=x%2By+z"), "token").as_deref(), Some("x+y z"));
        assert_eq!(query_param(Some("a=1"), "token"), None);
        assert_eq!(query_param(Some("token=%"), "token").as_deref(), Some("%"));
        assert_eq!(query_param(Some("token=%4"), "token").as_deref(), Some("%4"));
        assert_eq!(query_param(Some("to%6Ben=abc"), "token").as_deref(), Some("abc"));
    }

    #[test]
    fn the_redirect_keeps_every_pair_but_the_token() {
        assert_eq!(query_without_token("token=abc"), "");
        assert_eq!(query_without_token("a=1&token=abc&b=x%20y"), "a=1&b=x%20y");
        assert_eq!(query_without_token("to%6Ben=abc&tokens=2&&c"), "tokens=2&c");
    }

    #[test]
    fn the_cookie_is_found_among_others_and_compared_exactly() {
        let req = |cookies: &str| {
            Request::builder().header(header::COOKIE, cookies).body(axum::body::Body::empty()).expect("request")
        };
        assert!(has_cookie(&req("a=1; kliko_auth=abc; b=2"), "abc"));
        assert!(has_cookie(&req("kliko_auth=abc"), "abc"));
        assert!(!has_cookie(&req("kliko_auth=abd"), "abc"));
        assert!(!has_cookie(&req("xkliko_auth=abc"), "abc"));
        assert!(!has_cookie(&req("a=1"), "abc"));
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(ct_eq("abc", "abc"));
        assert!(!ct_eq("abc", "abd"));
        assert!(!ct_eq("abc", "ab"));
    }
}
