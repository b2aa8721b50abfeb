//! The folder picker: input, output and work folders chosen by browsing the data folders.
//! `GET /folders?under=PATH` answers the subfolders of a folder inside the data folders, as
//! JSON; a small script of ours (`PICKER_JS`) turns that into a panel under each folder field.
//! Paths go through [`crate::DataRoots::resolve`], as every path the browser names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::AppState;

/// Subfolders listed at most per folder.
const MAX_LISTED: usize = 500;

#[derive(Serialize)]
struct Folder {
    name: String,
    path: String,
}

#[derive(Serialize)]
struct Listing {
    /// The folder listed; `None`: the list of data folders itself.
    path: Option<String>,
    /// One level up: a folder, `""` for the list of data folders, `None` at the top.
    parent: Option<String>,
    folders: Vec<Folder>,
    truncated: bool,
}

fn subfolders(dir: &Path) -> (Vec<Folder>, bool) {
    let mut out: Vec<Folder> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    (!name.starts_with('.')).then(|| Folder { path: e.path().display().to_string(), name })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    let truncated = out.len() > MAX_LISTED;
    out.truncate(MAX_LISTED);
    (out, truncated)
}

fn listing(st: &AppState, under: &str) -> Result<Listing, String> {
    let roots = st.roots.roots();
    if roots.is_empty() {
        return Err("this server has no data folder".into());
    }
    if under.trim().is_empty() {
        if let [one] = roots {
            return listing(st, &one.display().to_string());
        }
        let folders =
            roots.iter().map(|r| Folder { name: r.display().to_string(), path: r.display().to_string() }).collect();
        return Ok(Listing { path: None, parent: None, folders, truncated: false });
    }
    // A folder still to be created (an output folder typed in) is browsed from the deepest
    // part of it that exists.
    let mut dir: PathBuf = st.roots.resolve(under)?;
    while !dir.is_dir() {
        match dir.parent() {
            Some(p) if roots.iter().any(|r| p.starts_with(r)) => dir = p.to_path_buf(),
            _ => return Err("no such folder".into()),
        }
    }
    let parent = if roots.contains(&dir) {
        (roots.len() > 1).then(String::new)
    } else {
        dir.parent().map(|p| p.display().to_string())
    };
    let (folders, truncated) = subfolders(&dir);
    Ok(Listing { path: Some(dir.display().to_string()), parent, folders, truncated })
}

/// `GET /folders?under=PATH`.
/// `/folders?under=…`.
#[derive(serde::Deserialize)]
pub struct FoldersQuery {
    under: Option<String>,
}

pub async fn folders(State(st): State<Arc<AppState>>, Query(q): Query<FoldersQuery>) -> Response {
    let under = q.under.unwrap_or_default();
    let st2 = st.clone();
    match tokio::task::spawn_blocking(move || listing(&st2, &under)).await {
        Ok(Ok(l)) => Json(l).into_response(),
        Ok(Err(why)) => (StatusCode::FORBIDDEN, Json(serde_json::json!({ "error": why }))).into_response(),
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
        }
    }
}

/// The button and the (hidden) panel beside the folder field `input_id`.
pub fn button(input_id: &str) -> String {
    format!(
        "<button type=\"button\" class=\"small browse\" data-for=\"{input_id}\" aria-controls=\"picker-{input_id}\">Browse…</button><div class=\"picker\" id=\"picker-{input_id}\" hidden></div>"
    )
}

/// Opens a panel of subfolders under a folder field; a click descends, "Use this folder"
/// fills the field. Text goes in with `textContent` only.
pub const PICKER_JS: &str = r#"(function () {
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
  function show(input, panel, under) {
    fetch('/folders?under=' + encodeURIComponent(under || ''), { credentials: 'same-origin' })
      .then(function (r) { return r.json(); })
      .then(function (d) {
        panel.replaceChildren();
        if (d.error) {
          panel.append(el('div', 'error', d.error));
          var top = el('button', 'small', 'Show the data folders');
          top.type = 'button';
          top.addEventListener('click', function () { show(input, panel, ''); });
          panel.append(top);
          return;
        }
        var head = el('div', 'picker-head');
        head.append(el('code', null, d.path || 'the data folders'));
        if (d.path) {
          var use = el('button', 'small use', 'Use this folder');
          use.type = 'button';
          use.addEventListener('click', function () { input.value = d.path; panel.hidden = true; input.focus(); });
          head.append(use);
        }
        panel.append(head);
        var list = el('ul');
        if (d.parent !== null) {
          var up = el('li'); var b = el('button', 'link', '↑ up');
          b.type = 'button'; b.addEventListener('click', function () { show(input, panel, d.parent); });
          up.append(b); list.append(up);
        }
        d.folders.forEach(function (f) {
          var li = el('li'); var b = el('button', 'link', f.name + '/');
          b.type = 'button'; b.dataset.path = f.path;
          b.addEventListener('click', function () { show(input, panel, f.path); });
          li.append(b); list.append(li);
        });
        if (!d.folders.length) list.append(el('li', 'meta', 'no subfolders'));
        panel.append(list);
        if (d.truncated) panel.append(el('div', 'meta', 'only the first folders are shown'));
      });
  }
  document.querySelectorAll('button.browse').forEach(function (b) {
    b.addEventListener('click', function () {
      var input = document.getElementById(b.dataset.for);
      var panel = document.getElementById('picker-' + b.dataset.for);
      if (!panel.hidden) { panel.hidden = true; return; }
      panel.hidden = false;
      show(input, panel, input.value.trim());
    });
  });
})();"#;

#[cfg(test)]
mod tests {
    #[test]
    fn the_button_names_its_field_and_panel() {
        let b = super::button("folder-input");
        assert!(b.contains("data-for=\"folder-input\"") && b.contains("id=\"picker-folder-input\" hidden"));
    }
}
