//! HTML building blocks. Every string that did not come from this file goes through
//! [`esc`] (text and attribute values alike) or [`url_path`] (inside a URL).

use std::fmt::Write;

/// Escape text for an HTML text node or a double- or single-quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode a path (keeping `/`) for use inside a URL; the result is also safe
/// in an attribute.
pub fn url_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' | b'@' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Percent-encode one query value.
pub fn url_query(s: &str) -> String {
    url_path(s).replace('/', "%2F").replace(':', "%3A").replace('@', "%40")
}

tokio::task_local! {
    /// The nonce of the response being made ([`with_fresh_nonce`]).
    static NONCE: String;
}

/// The nonce that marks this server's own inline scripts: fresh for every response (the
/// Content-Security-Policy runs no other script, so even markup that slipped through escaping
/// could not run, and a nonce seen in one page is worth nothing for the next). Outside a
/// response (a unit test), one per process.
pub fn nonce() -> String {
    NONCE.try_with(|n| n.clone()).unwrap_or_else(|_| {
        static ONE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        ONE.get_or_init(|| crate::auth::random_hex(16)).clone()
    })
}

/// Run `f` (the making of one response) with a nonce of its own; returns that nonce too, for
/// the response's Content-Security-Policy.
pub async fn with_fresh_nonce<F: std::future::Future>(f: F) -> (String, F::Output) {
    let n = crate::auth::random_hex(16);
    let out = NONCE.scope(n.clone(), f).await;
    (n, out)
}

/// An inline script of ours.
pub fn script(js: &str) -> String {
    format!("<script nonce=\"{}\">{js}</script>", nonce())
}

/// Which navigation entry is current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Images,
    Pipelines,
    History,
    Provenance,
    None,
}

/// A complete page. `title` is escaped here; `body` must already be HTML.
pub fn page(title: &str, nav: Nav, body: &str) -> String {
    let item = |n: Nav, href: &str, label: &str| {
        let cur = if n == nav { " aria-current=\"page\"" } else { "" };
        format!("<a href=\"{href}\"{cur}>{label}</a>")
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} · kliko</title><style>{CSS}</style></head><body>\
<header class=\"top\"><div class=\"wrap\"><a class=\"brand\" href=\"/\">kliko</a><nav>{}{}{}{}</nav></div></header>\
<main class=\"wrap\">{body}</main>\
<footer class=\"wrap\">kliko {} · runs are memoized: the same image, input and parameters are never computed twice</footer>\
</body></html>",
        item(Nav::Images, "/", "Images"),
        item(Nav::Pipelines, "/pipelines", "Pipelines"),
        item(Nav::History, "/history", "History"),
        item(Nav::Provenance, "/provenance", "Provenance"),
        env!("CARGO_PKG_VERSION"),
        title = esc(title),
    )
}

/// A badge: `kind` is one of the CSS classes below (`hit`, `miss`, `failed`, `running`, `muted`).
pub fn badge(kind: &str, text: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", esc(kind), esc(text))
}

pub use kliko_core::units::{human_bytes as bytes, human_ms as duration_ms};

/// The one stylesheet.
pub const CSS: &str = r#"
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--muted:#5f6b7a;--line:#dde2e8;--accent:#2458c6;--accent-ink:#fff;
--ok:#1d7a46;--ok-bg:#e3f4ea;--bad:#b42318;--bad-bg:#fdecea;--warn:#8a5a00;--warn-bg:#fff4d6;--run:#2458c6;--run-bg:#e6eefc}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
.wrap{max-width:1000px;margin:0 auto;padding:0 20px}
header.top{background:#17223b;color:#fff;margin-bottom:24px}
header.top .wrap{display:flex;align-items:center;gap:28px;height:52px}
.brand{color:#fff;font-weight:700;font-size:19px;letter-spacing:.5px;text-decoration:none}
header nav a{color:#c9d3e6;text-decoration:none;margin-right:18px;padding:15px 0;border-bottom:3px solid transparent}
header nav a:hover{color:#fff}
header nav a[aria-current]{color:#fff;border-bottom-color:#7ea6ff}
footer.wrap{color:var(--muted);font-size:13px;margin:40px auto 24px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 10px}
.sub{color:var(--muted);margin:0 0 20px}
a{color:var(--accent)}
code,.mono{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:13px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin-bottom:16px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:16px}
.grid .card{margin:0;display:flex;flex-direction:column}
.card h3{margin:0 0 6px;font-size:17px}
.card h3 a{text-decoration:none}
.card p{margin:4px 0}
.meta{color:var(--muted);font-size:13px}
.tags{margin-top:auto;padding-top:10px}
.tag{display:inline-block;background:#eef1f5;border-radius:4px;padding:1px 7px;margin:2px 4px 0 0;font-size:12px;font-family:ui-monospace,Menlo,Consolas,monospace}
.badge{display:inline-block;border-radius:999px;padding:1px 10px;font-size:12px;font-weight:600;vertical-align:middle}
.badge.hit{background:var(--ok-bg);color:var(--ok)}
.badge.ok{background:var(--ok-bg);color:var(--ok)}
.badge.miss,.badge.muted{background:#eef1f5;color:var(--muted)}
.badge.failed{background:var(--bad-bg);color:var(--bad)}
.badge.running{background:var(--run-bg);color:var(--run)}
.badge.warn{background:var(--warn-bg);color:var(--warn)}
form fieldset{border:1px solid var(--line);border-radius:10px;background:var(--card);padding:14px 20px 6px;margin:0 0 18px}
legend{font-weight:650;padding:0 6px;font-size:16px}
fieldset > p.desc{color:var(--muted);margin:0 0 10px}
.field{margin:0 0 16px}
.field > label,.field > .label{display:block;font-weight:600;margin-bottom:4px}
.field .name{font-weight:400;color:var(--muted);font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;margin-left:6px}
.req{color:var(--bad);margin-left:2px}
.help{color:var(--muted);font-size:13px;margin-top:3px}
.error{color:var(--bad);font-size:13px;margin-top:4px;font-weight:600}
.field.invalid input,.field.invalid select,.field.invalid textarea{border-color:var(--bad);background:#fffafa}
input[type=text],input[type=number],select,textarea{font:inherit;width:100%;max-width:460px;padding:7px 10px;border:1px solid #c5ccd6;border-radius:6px;background:#fff}
textarea{min-height:60px}
input:focus,select:focus,textarea:focus{outline:2px solid #9db9f5;border-color:var(--accent)}
input[type=checkbox]{width:18px;height:18px;vertical-align:middle;margin:0 8px 0 0}
.check{display:flex;align-items:center;font-weight:600}
.list-items .row{display:flex;gap:6px;margin-bottom:6px;max-width:460px}
.list-items .row input{flex:1}
button,.button{font:inherit;border:1px solid #c5ccd6;background:#fff;border-radius:6px;padding:6px 14px;cursor:pointer;color:var(--ink);text-decoration:none;display:inline-block}
button:hover,.button:hover{background:#f0f3f7}
button.primary{background:var(--accent);color:var(--accent-ink);border-color:var(--accent);font-weight:600;padding:9px 22px}
button.primary:hover{background:#1c4aa8}
button.small{padding:2px 10px;font-size:13px}
.actions{display:flex;gap:12px;align-items:center;margin:8px 0 30px}
.lineage-wrap{overflow-x:auto;margin:4px 0 18px;padding:6px;background:var(--card, #fff);border-radius:8px}
.lineage a:hover rect,.pipeline-graph a:hover rect{stroke:#1d4ed8;stroke-width:2}
.pipeline-graph .st-would-hit rect,.pipeline-graph .st-cached rect{fill:#e3f4ea;stroke:#1d7a46}
.pipeline-graph .st-done rect{fill:#d1f0dc;stroke:#1d7a46;stroke-width:2}
.pipeline-graph .st-would-run rect,.pipeline-graph .st-waiting rect{fill:#eef1f5}
.pipeline-graph .st-running rect{fill:#e6eefc;stroke:#2458c6;stroke-width:2.5;stroke-dasharray:6 3}
.pipeline-graph .st-failed rect,.pipeline-graph .st-cancelled rect{fill:#fdecea;stroke:#b42318;stroke-width:2}
.pipeline-graph .st-skipped rect,.pipeline-graph .st-not-run rect{fill:#fff4d6;stroke:#8a5a00}
.pipeline-graph .st-unknown rect{fill:#fff;stroke-dasharray:3 3}
.legend{display:flex;gap:14px;flex-wrap:wrap;font-size:12px;color:var(--muted);margin:-10px 0 16px}
.legend span::before{content:"";display:inline-block;width:12px;height:12px;border:1px solid #8a94a6;border-radius:3px;margin-right:5px;vertical-align:-2px;background:#fff}
.legend .st-would-hit::before,.legend .st-cached::before{background:#e3f4ea;border-color:#1d7a46}
.legend .st-done::before{background:#d1f0dc;border-color:#1d7a46}
.legend .st-would-run::before,.legend .st-waiting::before{background:#eef1f5}
.legend .st-running::before{background:#e6eefc;border-color:#2458c6}
.legend .st-failed::before{background:#fdecea;border-color:#b42318}
.legend .st-skipped::before{background:#fff4d6;border-color:#8a5a00}
.legend .st-unknown::before{border-style:dashed}
.picker{border:1px solid var(--line);border-radius:8px;background:#fbfcfd;padding:8px 12px;margin-top:6px;max-width:460px;max-height:320px;overflow:auto}
.picker-head{display:flex;gap:10px;align-items:center;justify-content:space-between;margin-bottom:4px}
.picker ul{list-style:none;margin:0;padding:0}
.picker li{padding:1px 0}
button.link{border:0;background:none;padding:0;color:var(--accent);cursor:pointer;font:13px ui-monospace,Menlo,Consolas,monospace}
button.link:hover{text-decoration:underline;background:none}
button.browse{margin-left:6px;vertical-align:middle}
.alert{border-radius:8px;padding:10px 14px;margin:0 0 16px}
.alert.bad{background:var(--bad-bg);color:var(--bad)}
.alert.warn{background:var(--warn-bg);color:var(--warn)}
.alert.ok{background:var(--ok-bg);color:var(--ok)}
.alert ul{margin:4px 0 0 18px;padding:0}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden}
th,td{text-align:left;padding:8px 12px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#f0f3f7;font-size:13px;color:var(--muted);font-weight:600}
th.num{text-align:right}
tr:last-child td{border-bottom:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:6px 18px;margin:0}
dl.kv dt{color:var(--muted)}
dl.kv dd{margin:0;word-break:break-all}
.status{display:flex;gap:28px;flex-wrap:wrap;align-items:center}
.status .big{font-size:20px;font-weight:650}
.status .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.4px}
pre.log{background:#111827;color:#e5e7eb;border-radius:10px;padding:14px 16px;max-height:460px;overflow:auto;font:12.5px/1.45 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;margin:0}
pre.log .err{color:#fca5a5}
pre.json{background:#f0f3f7;border-radius:6px;padding:8px 10px;margin:0;white-space:pre-wrap;font:12.5px ui-monospace,Menlo,Consolas,monospace}
.search{display:flex;gap:8px;margin-bottom:18px}
.search input{max-width:560px}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(esc("<script>alert(1)</script>"), "&lt;script&gt;alert(1)&lt;/script&gt;");
        assert_eq!(esc("a\"b'c&d"), "a&quot;b&#39;c&amp;d");
    }

    #[test]
    fn url_paths_keep_slashes_and_escape_the_rest() {
        assert_eq!(url_path("owner/name:tag"), "owner/name:tag");
        assert_eq!(url_path("a b\"<>"), "a%20b%22%3C%3E");
        assert_eq!(url_query("a/b c"), "a%2Fb%20c");
    }
}
