use super::*;

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
