use super::*;

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
pub(super) fn safe_name(name: &str) -> String {
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
