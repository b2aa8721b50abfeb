//! Request handlers. Store work runs in `spawn_blocking`, and the index handle (`store.db()`)
//! lives only inside those closures: holding it would block every `kliko` command.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Multipart, Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use futures_util::stream::Stream;
use kliko_core::tree::Entry;
use kliko_core::Digest;
use kliko_engine::{Cache, EngineError, ImageMeta, Input, RunRequest};
use kliko_runtime::RuntimeError;
use kliko_spec::IoMode;
use kliko_store::records::ActionResult;
use kliko_store::{ObjectKind, Store};

use crate::form::{self, Errors, Submitted};
use crate::html::{self, badge, esc, page, url_path, url_query, Nav};
use crate::runs::{LiveMsg, RunEntry, RunObserver};
use crate::{auth, AppState};

type St = State<Arc<AppState>>;

/// An error page.
pub struct PageError(StatusCode, String);

impl PageError {
    pub(crate) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        PageError(status, msg.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = self.0.canonical_reason().unwrap_or("Error");
        let body =
            format!("<h1>{}</h1><div class=\"alert bad\">{}</div>", esc(title), esc(&self.1).replace('\n', "<br>"));
        (self.0, Html(page(title, Nav::None, &body))).into_response()
    }
}

use kliko_core::error_chain as chain;

/// An engine error as a browser user reads it: what went wrong, then, where there is
/// something to do about it, what (in this interface's terms, never a command-line flag).
pub(crate) fn explain(e: &EngineError) -> String {
    use kliko_runtime::Unreachable;
    let advice = match e {
        EngineError::Runtime(RuntimeError::Unreachable { reason: Unreachable::NotRunning, runtime, .. }) => {
            Some(format!("The {runtime} daemon on this server is not running: whoever runs this kliko server must start it. Nothing was run."))
        }
        EngineError::Runtime(RuntimeError::Unreachable { reason: Unreachable::PermissionDenied, runtime, .. }) => {
            Some(format!("This kliko server may not use {runtime}: whoever runs it must give its user access. Nothing was run."))
        }
        EngineError::Runtime(RuntimeError::ImageNotFound { .. }) => {
            Some("The image is not on this server: it must be built or pulled there first.".to_string())
        }
        _ => None,
    };
    match advice {
        Some(a) => format!("{}\n{a}", chain(e)),
        None => chain(e),
    }
}

fn internal(e: impl std::error::Error) -> PageError {
    PageError::new(StatusCode::INTERNAL_SERVER_ERROR, chain(&e))
}

/// Store work off the async threads; the index handle is opened and dropped inside `f`.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, kliko_store::StoreError> + Send + 'static,
) -> Result<T, PageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(internal),
        Err(e) => Err(PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

pub async fn not_found() -> PageError {
    PageError::new(StatusCode::NOT_FOUND, "there is no such page")
}

// ---------------------------------------------------------------- images

enum Listed {
    Kliko(Box<ImageMeta>),
    Invalid(String, String),
}

pub async fn index(State(st): St) -> Result<Html<String>, PageError> {
    let skip = |id: &str| st.not_kliko.lock().expect("not_kliko lock").get(id).is_some_and(|k| k.is_none());
    let (found, not_kliko) =
        st.engine.kliko_images(skip).await.map_err(|e| PageError::new(StatusCode::SERVICE_UNAVAILABLE, explain(&e)))?;
    let mut listed = Vec::new();
    {
        let mut known = st.not_kliko.lock().expect("not_kliko lock");
        for id in not_kliko {
            known.insert(id, None);
        }
    }
    for l in found {
        match l {
            kliko_engine::Listed::Kliko(meta) => listed.push(Listed::Kliko(meta)),
            kliko_engine::Listed::Invalid { reference, reason } => {
                listed.push(Listed::Invalid(reference, chain(&reason)))
            }
        }
    }
    let mut b =
        String::from("<h1>Images</h1><p class=\"sub\">The kliko images on this machine. Choose one to run it.</p>");
    let kliko: Vec<&ImageMeta> =
        listed.iter().filter_map(|l| if let Listed::Kliko(m) = l { Some(&**m) } else { None }).collect();
    if kliko.is_empty() {
        b.push_str("<div class=\"card\">No kliko images found. A kliko image has a <code>/kliko.yml</code>; build one with <code>docker build</code>.</div>");
    } else {
        b.push_str("<div class=\"grid\">");
        for m in &kliko {
            let s = &m.spec;
            let title = s.name.clone().unwrap_or_else(|| m.reference.clone());
            b.push_str(&format!(
                "<div class=\"card image\"><h3><a href=\"/image/{}\">{}</a></h3><p class=\"meta\"><code>{}</code></p>",
                url_path(&m.reference),
                esc(&title),
                esc(&m.reference)
            ));
            if let Some(d) = &s.description {
                b.push_str(&format!("<p>{}</p>", esc(d)));
            }
            let fields = s.fields().count();
            b.push_str(&format!(
                "<p class=\"meta\">{}io <b>{}</b> · {fields} parameter{}</p>",
                s.author.as_ref().map(|a| format!("by {} · ", esc(a))).unwrap_or_default(),
                esc(s.io.as_str()),
                if fields == 1 { "" } else { "s" }
            ));
            b.push_str("<div class=\"tags\">");
            for t in m.info.repo_tags.iter().filter(|t| !t.contains("<none>")) {
                b.push_str(&format!("<span class=\"tag\">{}</span>", esc(t)));
            }
            b.push_str(&format!(
                "<span class=\"tag\" title=\"{}\">{}</span>",
                esc(&m.info.id),
                esc(&short_id(&m.info.id))
            ));
            b.push_str("</div></div>");
        }
        b.push_str("</div>");
    }
    let invalid: Vec<(&String, &String)> =
        listed.iter().filter_map(|l| if let Listed::Invalid(r, w) = l { Some((r, w)) } else { None }).collect();
    if !invalid.is_empty() {
        b.push_str(
            "<h2>Images with an invalid or unreadable kliko.yml</h2><table><tr><th>image</th><th>problem</th></tr>",
        );
        for (r, w) in invalid {
            b.push_str(&format!("<tr><td><code>{}</code></td><td>{}</td></tr>", esc(r), esc(w)));
        }
        b.push_str("</table>");
    }
    let recent = st.runs.recent(10);
    if !recent.is_empty() {
        b.push_str("<h2>Runs from this browser session's server</h2>");
        b.push_str(&runs_table(&recent));
    }
    Ok(Html(page("Images", Nav::Images, &b)))
}

fn short_id(id: &str) -> String {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.chars().take(12).collect()
}

fn runs_table(runs: &[Arc<RunEntry>]) -> String {
    let mut b = String::from("<table><tr><th>run</th><th>image</th><th>status</th><th>started</th></tr>");
    for r in runs {
        let s = r.snapshot();
        b.push_str(&format!(
            "<tr><td><a href=\"/run/{}\">{}</a></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            url_path(&r.id),
            esc(&r.id),
            esc(&r.image),
            status_badge(&s),
            esc(&rfc3339(r.started))
        ));
    }
    b.push_str("</table>");
    b
}

pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

// ---------------------------------------------------------------- the form

async fn image_meta(st: &AppState, reference: &str) -> Result<ImageMeta, PageError> {
    st.engine.image(reference).await.map_err(|e| match e {
        EngineError::Runtime(RuntimeError::ImageNotFound { .. }) => {
            PageError::new(StatusCode::NOT_FOUND, format!("there is no local image `{reference}`"))
        }
        EngineError::Runtime(RuntimeError::FileNotInImage { .. }) => {
            PageError::new(StatusCode::NOT_FOUND, format!("`{reference}` is not a kliko image: it has no /kliko.yml"))
        }
        e @ EngineError::Runtime(RuntimeError::Unreachable { .. }) => {
            PageError::new(StatusCode::SERVICE_UNAVAILABLE, explain(&e))
        }
        e => PageError::new(StatusCode::UNPROCESSABLE_ENTITY, explain(&e)),
    })
}

fn form_page(st: &AppState, meta: &ImageMeta, submitted: Option<&Submitted>, errors: &Errors) -> String {
    let folders = st.roots.folders(3, 400);
    let body = form::render(meta, submitted, errors, &st.csrf, &folders, st.roots.roots());
    page(meta.spec.name.as_deref().unwrap_or(&meta.reference), Nav::Images, &body)
}

pub async fn image_form(State(st): St, Path(reference): Path<String>) -> Result<Html<String>, PageError> {
    let meta = image_meta(&st, &reference).await?;
    Ok(Html(form_page(&st, &meta, None, &Errors::default())))
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: u64) -> PageError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        PageError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the upload is larger than this server accepts ({}); see `kliko serve --upload-limit`",
                html::bytes(limit)
            ),
        )
    } else {
        PageError::new(e.status(), format!("the form could not be read: {}", e.body_text()))
    }
}

/// A file name safe to create: letters, digits, `.`, `-`, `_`; never hidden or empty.
fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut s: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with('.') {
        s = format!("file{s}");
    }
    s.chars().take(120).collect()
}

/// Uploads of a form that came back with errors, kept for its resubmission (an hour at most).
pub struct KeptUploads {
    dirs: Vec<tempfile::TempDir>,
    files: HashMap<String, Vec<PathBuf>>,
    at: std::time::Instant,
}

/// How long kept uploads wait for the form to be submitted again.
const KEEP_UPLOADS: std::time::Duration = std::time::Duration::from_secs(3600);

pub async fn submit(State(st): St, Path(reference): Path<String>, mut mp: Multipart) -> Result<Response, PageError> {
    // The CSRF secret comes first in our form: refuse before reading (or storing) anything else.
    let first = mp.next_field().await.map_err(|e| multipart_error(e, st.upload_limit))?;
    let csrf_ok = match first {
        Some(f) if f.name() == Some("csrf") => {
            let v = f.text().await.map_err(|e| multipart_error(e, st.upload_limit))?;
            auth::ct_eq(&v, &st.csrf)
        }
        _ => false,
    };
    if !csrf_ok {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "this form was not made by this server (missing or wrong CSRF token): reload the form and submit it again",
        ));
    }
    let meta = image_meta(&st, &reference).await?;
    let mut sub = Submitted::default();
    let mut uploads: Option<tempfile::TempDir> = None;
    // Files kept from this form's previous submission (taken out: used now or kept again).
    let mut kept: Option<KeptUploads> = None;
    let mut received: u64 = 0;
    while let Some(mut field) = mp.next_field().await.map_err(|e| multipart_error(e, st.upload_limit))? {
        let name = field.name().unwrap_or("").to_string();
        if name == "kept" {
            let token = field.text().await.map_err(|e| multipart_error(e, st.upload_limit))?;
            kept = st.kept.lock().expect("kept lock").remove(&token);
            continue;
        }
        if let Some(fname) = name.strip_prefix("f.") {
            let Some(index) = meta.spec.fields().position(|f| f.name == fname && f.ty.is_file()) else { continue };
            let original = field.file_name().unwrap_or("").to_string();
            if uploads.is_none() {
                uploads = Some(st.engine.store().scratch("upload-").map_err(internal)?);
            }
            let dir = uploads.as_ref().expect("just made").path().join(index.to_string());
            let n = sub.files.get(fname).map_or(0, Vec::len);
            let dest_dir = dir.join(n.to_string());
            std::fs::create_dir_all(&dest_dir).map_err(internal)?;
            let dest = dest_dir.join(safe_name(&original));
            let mut out = tokio::fs::File::create(&dest).await.map_err(internal)?;
            let mut size = 0u64;
            while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, st.upload_limit))? {
                size += chunk.len() as u64;
                received += chunk.len() as u64;
                if received > st.upload_limit {
                    return Err(PageError::new(StatusCode::PAYLOAD_TOO_LARGE, "the upload is too large"));
                }
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await.map_err(internal)?;
            }
            tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(internal)?;
            // A file input left empty still sends a part, without a name or content.
            if original.is_empty() && size == 0 {
                let _ = std::fs::remove_dir_all(&dest_dir);
                continue;
            }
            sub.files.entry(fname.to_string()).or_default().push(dest);
            continue;
        }
        let value = field.text().await.map_err(|e| multipart_error(e, st.upload_limit))?;
        if let Some(p) = name.strip_prefix("p.") {
            let is_list = meta.spec.field(p).is_some_and(|f| f.ty.is_list());
            if is_list {
                sub.items.entry(p.to_string()).or_default().push(value);
            } else {
                sub.scalars.insert(p.to_string(), value);
            }
        } else if let Some(p) = name.strip_prefix("csv.") {
            sub.csv.insert(p.to_string(), value);
        } else if let Some(p) = name.strip_prefix("listjs.") {
            sub.listjs.push(p.to_string());
        } else {
            match name.as_str() {
                "input" => sub.input = value,
                "output" => sub.output = value,
                "work" => sub.work = value,
                "overwrite" => sub.overwrite = true,
                _ => {}
            }
        }
    }

    // A file field left empty this time takes the files kept from last time.
    let mut dirs: Vec<tempfile::TempDir> = uploads.into_iter().collect();
    if let Some(k) = kept {
        for (field, files) in k.files {
            sub.files.entry(field).or_insert(files);
        }
        dirs.extend(k.dirs);
    }

    // The same validation as the command line, each message beside its field.
    let mut errors = Errors::default();
    let layer = sub.layer(&meta);
    if let Err(errs) = meta.spec.resolve(std::slice::from_ref(&layer)) {
        for e in errs.iter() {
            let msg = e.to_string().replace(" from the form", "");
            match e.field().filter(|f| meta.spec.field(f).is_some()) {
                Some(f) => errors.add(f, msg),
                None => errors.general.push(msg),
            }
        }
    }
    let folder = |typed: &str, name: &str, errors: &mut Errors, must_exist: bool| -> Option<PathBuf> {
        if typed.trim().is_empty() {
            return None;
        }
        match st.roots.resolve(typed) {
            Ok(p) if must_exist && !p.is_dir() => {
                errors.add(name, "no such folder");
                None
            }
            Ok(p) => Some(p),
            Err(why) => {
                errors.add(name, why);
                None
            }
        }
    };
    let (input, output) = match meta.spec.io {
        IoMode::Split => {
            (folder(&sub.input, "input", &mut errors, true), folder(&sub.output, "output", &mut errors, false))
        }
        IoMode::Join => {
            if sub.work.trim().is_empty() {
                errors.add("work", "a work folder is required: the image changes it in place");
            }
            (folder(&sub.work, "work", &mut errors, true), folder(&sub.output, "output", &mut errors, false))
        }
    };
    if let Some(o) = &output {
        if o.is_file() {
            errors.add("output", "that is a file, not a folder");
        } else if !sub.overwrite && std::fs::read_dir(o).is_ok_and(|mut d| d.next().is_some()) {
            errors.add("output", "this folder is not empty: choose another, or tick \"replace the contents\"");
        }
    }
    if !errors.is_empty() {
        if !sub.files.is_empty() {
            let token = auth::random_hex(16);
            let mut map = st.kept.lock().expect("kept lock");
            map.retain(|_, k| k.at.elapsed() < KEEP_UPLOADS);
            map.insert(token.clone(), KeptUploads { dirs, files: sub.files.clone(), at: std::time::Instant::now() });
            sub.kept = Some(token);
        }
        let html = form_page(&st, &meta, Some(&sub), &errors);
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Html(html)).into_response());
    }

    let mut req = RunRequest::new(
        reference.clone(),
        match &input {
            Some(p) => Input::Path(p.clone()),
            None => Input::None,
        },
        output.clone(),
    );
    req.io_flags = Some(meta.spec.io);
    req.params = vec![layer];
    req.overwrite = sub.overwrite;
    // Run exactly the image whose form was shown, even if the tag moves meanwhile.
    let id = auth::random_hex(8);
    let entry = Arc::new(RunEntry::new(
        id.clone(),
        reference,
        input.map(|p| p.display().to_string()),
        output.map(|p| p.display().to_string()),
    ));
    st.runs.insert(entry.clone());
    let engine = st.engine.clone();
    tokio::spawn(async move {
        let obs = Arc::new(RunObserver(entry.clone()));
        let result = engine.run_with(req, Some(meta), None, obs, entry.cancel.clone()).await;
        // The uploads are needed until the engine has copied them for the container.
        drop(dirs);
        entry.finish(result.map_err(|e| explain(&e)));
    });
    Ok(Redirect::to(&format!("/run/{id}")).into_response())
}

// ---------------------------------------------------------------- runs

fn status_badge(s: &crate::RunState) -> String {
    if !s.finished {
        return badge("running", &s.phase);
    }
    match (&s.report, &s.error) {
        (Some(r), _) if r.status == kliko_engine::Status::Succeeded => badge("ok", &s.phase),
        (Some(_), _) => badge("failed", &s.phase),
        (None, _) => badge("failed", "error"),
    }
}

/// For a run that had to run (a miss): the nearest earlier run of the same image and what
/// differed, as `kliko run --explain` says it.
async fn why_it_ran(st: &AppState, result: ActionResult) -> Result<String, PageError> {
    let store = st.engine.store().clone();
    let why = blocking(move || kliko_engine::explain::why_missed(&store, &result)).await?;
    let mut b = String::from("<div class=\"card\" id=\"why\"><h3>Why it ran</h3>");
    match why {
        None => b.push_str(
            "<p class=\"meta\">No earlier run of this image is stored: this was its first run with this store.</p>",
        ),
        Some((nearest, diffs)) => {
            b.push_str(&format!(
                "<p class=\"meta\">Nothing identical had run before. The nearest earlier run of this image, <a href=\"/provenance/{k}\"><code>{short}</code></a>, differs in:</p><ul class=\"diffs\">",
                k = nearest.to_hex(),
                short = &nearest.to_hex()[..12]
            ));
            for d in &diffs {
                b.push_str(&format!("<li><code>{}</code></li>", esc(d)));
            }
            b.push_str("</ul>");
        }
    }
    b.push_str("</div>");
    Ok(b)
}

fn get_run(st: &AppState, id: &str) -> Result<Arc<RunEntry>, PageError> {
    st.run(id).ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            format!("no run `{id}` on this server (runs are kept while it runs; see History for older ones)"),
        )
    })
}

fn logs_html(chunks: &[(bool, String)], dropped: bool) -> String {
    let mut b = String::new();
    if dropped {
        b.push_str("<span class=\"err\">[older lines dropped; the full logs are in the store]\n</span>");
    }
    for (stderr, text) in chunks {
        if *stderr {
            b.push_str(&format!("<span class=\"err\">{}</span>", esc(text)));
        } else {
            b.push_str(&esc(text));
        }
    }
    b
}

pub async fn run_page(State(st): St, Path(id): Path<String>) -> Result<Html<String>, PageError> {
    let run = get_run(&st, &id)?;
    let s = run.snapshot();
    let mut b = format!(
        "<h1>Run <code>{}</code></h1><p class=\"sub\">image <a href=\"/image/{}\"><code>{}</code></a> · started {}</p>",
        esc(&run.id),
        url_path(&run.image),
        esc(&run.image),
        esc(&rfc3339(run.started))
    );
    let cache = match &s.report {
        Some(r) if r.cache == Cache::Hit => badge("hit", "cache hit"),
        Some(r) if r.recorded => badge("miss", "computed"),
        Some(_) => badge("miss", "computed, not cached"),
        None => String::new(),
    };
    b.push_str("<div class=\"card status\">");
    b.push_str(&format!(
        "<div><div class=\"label\">status</div><div class=\"big\" id=\"status\">{}</div></div>",
        status_badge(&s)
    ));
    if let Some(r) = &s.report {
        b.push_str(&format!(
            "<div><div class=\"label\">exit code</div><div class=\"big\" id=\"exit-code\">{}</div></div>",
            r.exit_code
        ));
        b.push_str(&format!(
            "<div><div class=\"label\">wall time</div><div class=\"big\">{}</div></div>",
            esc(&html::duration_ms(r.wall_ms))
        ));
        if r.cache == Cache::Hit {
            b.push_str(&format!(
                "<div><div class=\"label\">saved</div><div class=\"big\">{}</div></div>",
                esc(&html::duration_ms(r.saved_ms))
            ));
        }
        b.push_str(&format!(
            "<div><div class=\"label\">cache</div><div class=\"big\" id=\"cache\">{cache}</div></div>"
        ));
    }
    if !s.finished {
        b.push_str(&format!(
            "<form method=\"post\" action=\"/run/{}/cancel\" style=\"margin-left:auto\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Cancel</button></form>",
            url_path(&run.id),
            esc(&st.csrf)
        ));
    }
    b.push_str("</div>");
    if let Some(r) = s.report.as_ref().filter(|r| r.cache == Cache::Hit) {
        b.push_str(&format!(
            "<div class=\"alert ok\"><b>Cache hit.</b> An identical run (same image, input and parameters) was done before: its output was reused and nothing ran, saving {}.</div>",
            esc(&html::duration_ms(r.saved_ms))
        ));
    }
    if let Some(e) = &s.error {
        b.push_str(&format!("<div class=\"alert bad\" id=\"run-error\">{}</div>", esc(e)));
    }
    if let Some(result) = s.report.as_ref().filter(|r| r.cache == Cache::Miss).and_then(|r| r.result.clone()) {
        b.push_str(&why_it_ran(&st, result).await?);
    }
    if let Some(r) = &s.report {
        for w in &r.warnings {
            b.push_str(&format!("<div class=\"alert warn\">{}</div>", esc(w)));
        }
    }
    b.push_str("<div class=\"card\"><dl class=\"kv\">");
    if let Some(k) = &s.key {
        b.push_str(&format!(
            "<dt>key</dt><dd><a href=\"/provenance/{}\"><code>{}</code></a></dd>",
            k.to_hex(),
            k.to_hex()
        ));
    }
    if let Some(i) = &run.input {
        b.push_str(&format!("<dt>input</dt><dd><code>{}</code></dd>", esc(i)));
    }
    if let Some(r) = &s.report {
        if let Some(o) = &r.output {
            b.push_str(&format!(
                "<dt>output tree</dt><dd><a href=\"/provenance/{}\"><code>{}</code></a></dd>",
                o.to_hex(),
                o.to_hex()
            ));
        }
        if let Some(p) = &r.output_path {
            b.push_str(&format!("<dt>output folder</dt><dd><code>{}</code></dd>", esc(&p.display().to_string())));
        }
        b.push_str(&format!("<dt>image ID</dt><dd><code>{}</code></dd>", esc(&r.image_id)));
    }
    b.push_str("</dl></div>");

    // Output files, from the store.
    if let Some(out) = s.report.as_ref().and_then(|r| r.output) {
        let store = st.engine.store().clone();
        let files = blocking(move || list_tree(&store, &out, 2000)).await?;
        b.push_str(&format!(
            "<h2>Output <span class=\"meta\">{} file{}</span></h2>",
            files.len(),
            if files.len() == 1 { "" } else { "s" }
        ));
        b.push_str(&files_table(&files, &format!("/run/{}/file", url_path(&run.id))));
    }

    b.push_str("<h2>Logs</h2>");
    let (chunks, dropped) = run.logs();
    let hit = s.report.as_ref().is_some_and(|r| r.cache == Cache::Hit);
    if hit {
        if let Some(k) = &s.key {
            b.push_str(&format!(
                "<p class=\"meta\">Nothing ran: the result of an identical earlier run was reused. Its logs: <a href=\"/result/{k}/log/stdout\">stdout</a> · <a href=\"/result/{k}/log/stderr\">stderr</a>.</p>"
            ));
        }
    } else if let (Some(k), true) = (&s.key, s.report.as_ref().is_some_and(|r| r.recorded)) {
        b.push_str(&format!(
            "<p class=\"meta\">Stored logs: <a href=\"/result/{k}/log/stdout\">stdout</a> · <a href=\"/result/{k}/log/stderr\">stderr</a>.</p>"
        ));
    }
    if !s.finished || !chunks.is_empty() {
        b.push_str(&format!("<pre class=\"log\" id=\"log\">{}</pre>", logs_html(&chunks, dropped)));
    }
    if !s.finished {
        b.push_str(&html::script(&format!(
            r#"(function () {{
  var log = document.getElementById('log'), status = document.getElementById('status');
  var es = new EventSource('/run/{id}/events');
  function esc(s) {{ var d = document.createElement('div'); d.textContent = s; return d.innerHTML; }}
  es.addEventListener('log', function (e) {{
    var m = JSON.parse(e.data), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    var span = document.createElement('span'); if (m.stderr) span.className = 'err'; span.textContent = m.text;
    log.appendChild(span); if (atEnd) log.scrollTop = log.scrollHeight;
  }});
  es.addEventListener('phase', function (e) {{ status.innerHTML = '<span class="badge running">' + esc(JSON.parse(e.data)) + '</span>'; }});
  es.addEventListener('done', function () {{ es.close(); location.reload(); }});
}})();"#,
            id = url_path(&run.id)
        )));
    }
    Ok(Html(page(&format!("Run {}", run.id), Nav::None, &b)))
}

pub async fn run_events(
    State(st): St,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, PageError> {
    let run = get_run(&st, &id)?;
    let (backlog, _dropped, rx) = run.subscribe();
    let finished = run.is_finished();
    let first: Vec<LiveMsg> = backlog
        .into_iter()
        .map(|(stderr, text)| LiveMsg::Log { stderr, text })
        .chain(std::iter::once(LiveMsg::Phase(run.snapshot().phase)))
        .chain(finished.then_some(LiveMsg::Done))
        .collect();
    Ok(crate::live::sse(first, rx, st.shutdown.clone()))
}

impl crate::live::Live for LiveMsg {
    fn is_done(&self) -> bool {
        matches!(self, LiveMsg::Done)
    }
    fn lagged(n: u64) -> Self {
        LiveMsg::Log { stderr: true, text: format!("[{n} log chunks skipped]\n") }
    }
    fn event(self) -> SseEvent {
        match self {
            LiveMsg::Log { stderr, text } => {
                SseEvent::default().event("log").data(serde_json::json!({"stderr": stderr, "text": text}).to_string())
            }
            LiveMsg::Phase(p) => SseEvent::default().event("phase").data(serde_json::Value::String(p).to_string()),
            LiveMsg::Done => SseEvent::default().event("done").data("{}"),
        }
    }
}

/// A urlencoded form's CSRF secret, checked before anything else of it is used.
pub(crate) fn check_csrf(st: &AppState, body: &str) -> Result<(), PageError> {
    let csrf = auth::query_param(Some(body), "csrf");
    if !csrf.is_some_and(|c| auth::ct_eq(&c, &st.csrf)) {
        return Err(PageError::new(StatusCode::FORBIDDEN, "missing or wrong CSRF token"));
    }
    Ok(())
}

pub async fn run_cancel(State(st): St, Path(id): Path<String>, body: String) -> Result<Response, PageError> {
    check_csrf(&st, &body)?;
    let run = get_run(&st, &id)?;
    run.cancel.cancel();
    Ok(Redirect::to(&format!("/run/{}", url_path(&id))).into_response())
}

pub async fn run_file(State(st): St, Path((id, path)): Path<(String, String)>) -> Result<Response, PageError> {
    let run = get_run(&st, &id)?;
    let out = run
        .snapshot()
        .report
        .and_then(|r| r.output)
        .ok_or_else(|| PageError::new(StatusCode::NOT_FOUND, "this run has no output (yet)"))?;
    serve_tree_file(&st, out, path).await
}

// ---------------------------------------------------------------- stored trees

/// Every file under `tree`: (relative path, size), at most `max`.
fn list_tree(store: &Store, tree: &Digest, max: usize) -> Result<Vec<(String, u64)>, kliko_store::StoreError> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), *tree)];
    while let Some((prefix, d)) = stack.pop() {
        let t = store.get_tree(&d)?;
        let mut dirs = Vec::new();
        for (name, e) in &t.entries {
            let path = format!("{prefix}{}", String::from_utf8_lossy(name));
            match e {
                Entry::File { size, .. } => {
                    if out.len() >= max {
                        return Ok(out);
                    }
                    out.push((path, *size));
                }
                Entry::Dir { digest } => dirs.push((format!("{path}/"), *digest)),
                Entry::Symlink { .. } => {}
            }
        }
        stack.extend(dirs.into_iter().rev());
    }
    out.sort();
    Ok(out)
}

fn files_table(files: &[(String, u64)], base: &str) -> String {
    if files.is_empty() {
        return "<p class=\"meta\">No files.</p>".into();
    }
    let mut b = String::from("<table class=\"files\"><tr><th>file</th><th class=\"num\">size</th></tr>");
    for (p, size) in files {
        b.push_str(&format!(
            "<tr><td><a href=\"{base}/{}\"><code>{}</code></a></td><td class=\"num\">{}</td></tr>",
            url_path(p),
            esc(p),
            esc(&html::bytes(*size))
        ));
    }
    b.push_str("</table>");
    b
}

/// Find a file by its relative path in a stored tree. Only plain names: the path never
/// touches the host filesystem, so it cannot climb out of anything.
fn find_in_tree(store: &Store, tree: &Digest, path: &str) -> Result<Option<(Digest, u64)>, kliko_store::StoreError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return Ok(None);
    }
    let mut cur = *tree;
    for (i, part) in parts.iter().enumerate() {
        let t = store.get_tree(&cur)?;
        match t.entries.get(part.as_bytes()) {
            Some(Entry::Dir { digest }) if i + 1 < parts.len() => cur = *digest,
            Some(Entry::File { digest, size, .. }) if i + 1 == parts.len() => return Ok(Some((*digest, *size))),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Content type for a download; anything a browser could run is served as an attachment.
fn content_type(path: &str) -> (&'static str, bool) {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "md" | "dat" | "tsv" | "yml" | "yaml" | "ini" | "cfg" => ("text/plain; charset=utf-8", true),
        "csv" => ("text/csv; charset=utf-8", true),
        "json" => ("application/json", true),
        "png" => ("image/png", true),
        "jpg" | "jpeg" => ("image/jpeg", true),
        "gif" => ("image/gif", true),
        "webp" => ("image/webp", true),
        "pdf" => ("application/pdf", true),
        _ => ("application/octet-stream", false),
    }
}

async fn serve_tree_file(st: &AppState, tree: Digest, path: String) -> Result<Response, PageError> {
    let store = st.engine.store().clone();
    let p2 = path.clone();
    let found = blocking(move || find_in_tree(&store, &tree, &p2)).await?;
    let Some((digest, size)) = found else {
        return Err(PageError::new(StatusCode::NOT_FOUND, format!("no file `{path}` in this output")));
    };
    let blob = st.engine.store().object_path(ObjectKind::Blob, &digest);
    let file = tokio::fs::File::open(&blob).await.map_err(internal)?;
    let (ctype, inline) = content_type(&path);
    let name = safe_name(path.rsplit('/').next().unwrap_or("file"));
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    let disp = format!("{}; filename=\"{name}\"", if inline { "inline" } else { "attachment" });
    if let Ok(v) = HeaderValue::from_str(&disp) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    // Output files are the image's, not ours: never let them script this origin.
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'; img-src 'self'"));
    Ok(resp)
}

fn parse_key(key: &str) -> Result<Digest, PageError> {
    key.parse::<Digest>().map_err(|e| PageError::new(StatusCode::NOT_FOUND, e.to_string()))
}

async fn result_of(st: &AppState, key: Digest) -> Result<ActionResult, PageError> {
    let store = st.engine.store().clone();
    blocking(move || {
        let db = store.db()?;
        store.get_result(&db, &key)
    })
    .await?
    .ok_or_else(|| PageError::new(StatusCode::NOT_FOUND, format!("no stored result for key `{key}`")))
}

pub async fn result_files(State(st): St, Path(key): Path<String>) -> Result<Html<String>, PageError> {
    let key = parse_key(&key)?;
    let r = result_of(&st, key).await?;
    let store = st.engine.store().clone();
    let out = r.output;
    let files = blocking(move || list_tree(&store, &out, 5000)).await?;
    let mut b = format!(
        "<h1>Output of <code>{}</code></h1><p class=\"sub\">run of <code>{}</code> · <a href=\"/provenance/{key}\">provenance</a></p>",
        esc(&key.short(16)),
        esc(&r.image_ref)
    );
    b.push_str(&files_table(&files, &format!("/result/{key}/file")));
    Ok(Html(page("Output", Nav::Provenance, &b)))
}

pub async fn result_file(State(st): St, Path((key, path)): Path<(String, String)>) -> Result<Response, PageError> {
    let key = parse_key(&key)?;
    let r = result_of(&st, key).await?;
    serve_tree_file(&st, r.output, path).await
}

pub async fn result_log(State(st): St, Path((key, stream)): Path<(String, String)>) -> Result<Response, PageError> {
    let key = parse_key(&key)?;
    let r = result_of(&st, key).await?;
    let d = match stream.as_str() {
        "stdout" => r.stdout,
        "stderr" => r.stderr,
        _ => return Err(PageError::new(StatusCode::NOT_FOUND, "logs are `stdout` or `stderr`")),
    };
    let store = st.engine.store().clone();
    let bytes = blocking(move || store.get_bytes(ObjectKind::Blob, &d)).await?;
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    Ok(resp)
}

// ---------------------------------------------------------------- history

pub async fn history(State(st): St) -> Result<Html<String>, PageError> {
    let store = st.engine.store().clone();
    let entries = blocking(move || {
        if !store.has_index() {
            return Ok(Vec::new());
        }
        let db = store.db()?;
        store.history(&db, 500)
    })
    .await?;
    let mut b = String::from("<h1>History</h1><p class=\"sub\">Every run in this store, from the command line and from the browser, newest first.</p>");
    if entries.is_empty() {
        b.push_str("<div class=\"card\">Nothing has run yet.</div>");
    } else {
        b.push_str("<table><tr><th>when</th><th>image</th><th>key</th><th>cache</th><th class=\"num\">wall</th><th class=\"num\">saved</th><th class=\"num\">exit</th><th>who</th></tr>");
        for e in &entries {
            let kind = match e.cache.as_str() {
                "hit" => "hit",
                "failed" => "failed",
                _ => "miss",
            };
            b.push_str(&format!(
                "<tr><td>{}</td><td><code>{}</code></td><td><a href=\"/provenance/{}\"><code>{}</code></a></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&e.at),
                esc(&e.image_ref),
                e.key.to_hex(),
                esc(&e.key.short(12)),
                badge(kind, &e.cache),
                esc(&html::duration_ms(e.wall_ms)),
                if e.saved_ms > 0 { esc(&html::duration_ms(e.saved_ms)) } else { String::new() },
                e.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                esc(&format!("{}@{}", e.user, e.host)),
            ));
        }
        b.push_str("</table>");
    }
    Ok(Html(page("History", Nav::History, &b)))
}

// ---------------------------------------------------------------- provenance

pub async fn provenance_query(State(st): St, RawQuery(q): RawQuery) -> Result<Response, PageError> {
    match auth::query_param(q.as_deref(), "q").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
        Some(q) => Ok(Redirect::to(&format!("/provenance/{}", url_query(&q))).into_response()),
        None => Ok(Html(page("Provenance", Nav::Provenance, &provenance_body(&st, "", None).await?)).into_response()),
    }
}

pub async fn provenance(State(st): St, Path(q): Path<String>) -> Result<Html<String>, PageError> {
    let body = provenance_body(&st, &q, Some(&q)).await?;
    Ok(Html(page("Provenance", Nav::Provenance, &body)))
}

async fn provenance_body(st: &AppState, typed: &str, q: Option<&str>) -> Result<String, PageError> {
    use kliko_engine::provenance::{provenance, MIN_PREFIX};
    let mut b = String::from(
        "<h1>Provenance</h1><p class=\"sub\">Where a result came from: give a digest (or its first characters) of a run key, an output tree or a file, or a path inside a data folder.</p>",
    );
    b.push_str(&format!(
        "<form class=\"search\" method=\"get\" action=\"/provenance\"><input type=\"text\" name=\"q\" value=\"{}\" placeholder=\"digest, prefix or path\" autofocus><button type=\"submit\" class=\"primary\">Look up</button></form>",
        esc(typed)
    ));
    let Some(q) = q else { return Ok(b) };
    let q = q.trim();
    let hex = q.len() >= MIN_PREFIX && q.len() <= 64 && q.chars().all(|c| c.is_ascii_hexdigit());
    // Never hand the engine a host path the browser chose outside the data folders.
    let arg = if hex {
        q.to_ascii_lowercase()
    } else if q.contains('/') {
        match st.roots.resolve(q) {
            Ok(p) if p.exists() => p.display().to_string(),
            Ok(_) => {
                b.push_str("<div class=\"alert bad\">No such file or folder.</div>");
                return Ok(b);
            }
            Err(why) => {
                b.push_str(&format!("<div class=\"alert bad\">{}</div>", esc(&why)));
                return Ok(b);
            }
        }
    } else {
        b.push_str(&format!(
            "<div class=\"alert bad\">Give at least {MIN_PREFIX} hexadecimal characters of a digest, or a path inside a data folder.</div>"
        ));
        return Ok(b);
    };
    let store = st.engine.store().clone();
    let answer = tokio::task::spawn_blocking(move || {
        if !store.has_index() {
            return Ok(None);
        }
        // The index handle is opened and dropped inside `provenance`.
        provenance(&store, &arg, 8).map(Some)
    })
    .await
    .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let prov = match answer {
        Ok(Some(p)) => p,
        Ok(None) => {
            b.push_str("<div class=\"alert warn\">The store is empty: nothing has run yet.</div>");
            return Ok(b);
        }
        Err(e @ (EngineError::UnknownRef { .. } | EngineError::Store(kliko_store::StoreError::Ambiguous { .. }))) => {
            b.push_str(&format!("<div class=\"alert warn\">{}</div>", esc(&chain(&e))));
            return Ok(b);
        }
        Err(e) => return Err(internal(e)),
    };
    let what = match prov.kind.as_str() {
        "key" => "run key",
        "tree" => "tree",
        _ => "file",
    };
    b.push_str(&format!("<h2>{what} <code>{}</code></h2>", prov.digest.to_hex()));
    let direct = prov.runs.iter().filter(|r| r.depth == 0).count();
    if prov.kind != "key" {
        b.push_str(&format!(
            "<p class=\"meta\">Produced by {direct} run{}; the input of {} run{}.</p>",
            if direct == 1 { "" } else { "s" },
            prov.used_by.len(),
            if prov.used_by.len() == 1 { "" } else { "s" }
        ));
    }
    if !prov.runs.is_empty() {
        b.push_str("<h2>Lineage</h2><div class=\"lineage-wrap\">");
        b.push_str(&kliko_engine::provenance::lineage_svg(&prov, "/provenance/"));
        b.push_str("</div>");
    }
    for r in &prov.runs {
        let role = match (r.depth, &r.feeds) {
            (0, _) if prov.kind == "key" => "the run".to_string(),
            (0, _) => "produced by".to_string(),
            (d, Some(f)) => format!("lineage {d}: made the input of {}", f.short(12)),
            (d, None) => format!("lineage {d}"),
        };
        let mut card = result_card(&r.result, &role);
        if !r.complete {
            card = card.replacen("</h3>", &format!(" {}</h3>", badge("warn", "objects missing")), 1);
        }
        if r.pinned {
            card = card.replacen("</h3>", &format!(" {}</h3>", badge("muted", "pinned")), 1);
        }
        b.push_str(&card);
    }
    if !prov.used_by.is_empty() {
        b.push_str("<h2>Used as input by</h2><ul>");
        for k in &prov.used_by {
            b.push_str(&format!("<li><a href=\"/provenance/{k}\"><code>{k}</code></a></li>"));
        }
        b.push_str("</ul>");
    }
    Ok(b)
}

fn result_card(r: &ActionResult, role: &str) -> String {
    let k = r.key.to_hex();
    let mut b = format!(
        "<div class=\"card result\"><h3>{} <a href=\"/provenance/{k}\"><code>{}</code></a></h3><dl class=\"kv\">",
        esc(role),
        esc(&r.key.short(16))
    );
    let kv = |b: &mut String, k: &str, v: String| b.push_str(&format!("<dt>{}</dt><dd>{v}</dd>", esc(k)));
    kv(&mut b, "image", format!("<code>{}</code>", esc(&r.image_ref)));
    kv(&mut b, "image ID", format!("<code>{}</code>", esc(&r.image_id)));
    let params = serde_json::to_string_pretty(&r.parameters_given).unwrap_or_default();
    kv(&mut b, "parameters", format!("<pre class=\"json\">{}</pre>", esc(&params)));
    if let Some(i) = r.preimage.input {
        kv(&mut b, "input tree", format!("<a href=\"/provenance/{i}\"><code>{i}</code></a>"));
    }
    if let Some(p) = &r.input_path {
        kv(&mut b, "input path", format!("<code>{}</code>", esc(p)));
    }
    kv(
        &mut b,
        "output tree",
        format!(
            "<a href=\"/provenance/{o}\"><code>{o}</code></a> · {} files, {} · <a href=\"/result/{k}/files\">browse</a>",
            r.output_files,
            esc(&html::bytes(r.output_bytes)),
            o = r.output
        ),
    );
    kv(&mut b, "user", esc(&format!("{}@{}", r.user, r.host)));
    if let Some(rt) = &r.runtime {
        let gpus = r.gpus.as_ref().map(|g| format!(", GPUs {g}")).unwrap_or_default();
        kv(&mut b, "runtime", esc(&format!("{rt}{gpus}")));
    }
    kv(&mut b, "started", esc(&r.started_at));
    kv(&mut b, "finished", esc(&r.finished_at));
    kv(&mut b, "wall time", esc(&html::duration_ms(r.wall_ms)));
    kv(&mut b, "exit code", r.exit_code.to_string());
    kv(
        &mut b,
        "logs",
        format!(
            "<a href=\"/result/{k}/log/stdout\">stdout</a> ({}) · <a href=\"/result/{k}/log/stderr\">stderr</a> ({})",
            esc(&html::bytes(r.stdout_bytes)),
            esc(&html::bytes(r.stderr_bytes))
        ),
    );
    b.push_str("</dl></div>");
    b
}
