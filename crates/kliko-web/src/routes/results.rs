use super::*;

// ---------------------------------------------------------------- stored trees

/// Every file under `tree`: (relative path, size), at most `max`.
pub(super) fn list_tree(
    store: &Store,
    tree: &Digest,
    max: usize,
) -> Result<Vec<(String, u64)>, kliko_store::StoreError> {
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

pub(super) fn files_table(files: &[(String, u64)], base: &str) -> String {
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

pub(super) async fn serve_tree_file(st: &AppState, tree: Digest, path: String) -> Result<Response, PageError> {
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
