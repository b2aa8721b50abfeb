use super::*;

// ---------------------------------------------------------------- runs

pub(super) fn status_badge(s: &crate::RunState) -> String {
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

pub async fn run_cancel(State(st): St, Path(id): Path<String>, Form(f): Form<CsrfForm>) -> Result<Response, PageError> {
    check_csrf(&st, f.csrf.as_deref())?;
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
