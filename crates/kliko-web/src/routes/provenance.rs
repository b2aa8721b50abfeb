use super::*;

// ---------------------------------------------------------------- provenance

/// `/provenance?q=…`.
#[derive(serde::Deserialize)]
pub struct ProvenanceQuery {
    q: Option<String>,
}

pub async fn provenance_query(State(st): St, Query(p): Query<ProvenanceQuery>) -> Result<Response, PageError> {
    match p.q.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
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
    if !prov.runs.is_empty() {
        b.push_str(&format!(
            "<p class=\"meta\"><a href=\"/provenance-crate/{0}\" download>Download this lineage as an RO-Crate</a> \
(a Provenance Run Crate, zipped: every run, image, parameter, input and output by digest).</p>",
            prov.digest.to_hex()
        ));
    }
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

/// `/provenance-crate/{digest}`: the lineage of a whole digest (a run key, a tree or a file) as
/// an RO-Crate, the one `kliko provenance DIGEST --ro-crate FILE.zip` writes. The crate names
/// outputs and logs by digest; putting the files themselves in (they may be large) is the
/// command line's `--with-data`.
pub async fn provenance_crate(State(st): St, Path(d): Path<String>) -> Result<Response, PageError> {
    if d.len() != 64 || !d.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(PageError::new(
            StatusCode::BAD_REQUEST,
            "A crate is made for a whole digest: 64 hexadecimal characters.",
        ));
    }
    let d = d.to_ascii_lowercase();
    let name = format!("kliko-provenance-{}", &d[..16]);
    crate_zip(st.engine.store().clone(), name, move |store| match kliko_engine::provenance::provenance(store, &d, 8) {
        Ok(p) if !p.runs.is_empty() => Ok((p, Default::default())),
        Ok(_) | Err(EngineError::UnknownRef { .. }) => {
            Err(PageError::new(StatusCode::NOT_FOUND, "No stored run made or used this digest."))
        }
        Err(e) => Err(internal(e)),
    })
    .await
}

/// An RO-Crate as a zip download named `name.zip`: `describe` says what goes in it (off the
/// async threads; the crate is written to a private temporary folder and read back).
pub(crate) async fn crate_zip(
    store: Arc<Store>,
    name: String,
    describe: impl FnOnce(&Store) -> Result<(kliko_engine::provenance::Provenance, kliko_engine::rocrate::CrateOptions), PageError>
        + Send
        + 'static,
) -> Result<Response, PageError> {
    let made = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, PageError> {
        let (prov, opts) = describe(&store)?;
        let tmp = tempfile::Builder::new().prefix("kliko-web-crate-").tempdir().map_err(internal)?;
        let zip = tmp.path().join("crate.zip");
        kliko_engine::rocrate::write_ro_crate_zip(&store, &prov, &zip, &opts).map_err(internal)?;
        std::fs::read(&zip).map_err(internal)
    })
    .await
    .map_err(internal)??;
    let disposition = format!("attachment; filename=\"{name}.zip\"");
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/zip")),
            (header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).map_err(internal)?),
        ],
        made,
    )
        .into_response())
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
