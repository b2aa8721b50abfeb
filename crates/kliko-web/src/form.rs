//! The run form generated from kliko.yml, and what a submission of it means.
//!
//! Form names: `p.<field>` a value (repeated for a list's items), `csv.<field>` a list
//! typed comma-separated (the fallback without JavaScript), `listjs.<field>` marks a list
//! edited item by item, `f.<field>` an uploaded file; `input`, `output`, `work` and
//! `overwrite` are the folders. Every value becomes a string in a [`ParamLayer`] and
//! kliko-spec applies the field types, exactly as for the command line.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use kliko_engine::ImageMeta;
use kliko_spec::{Field, FieldType, IoMode, ParamLayer, Value};

use crate::html::{esc, url_path};

/// What the user submitted (kept to re-render the form with their values).
#[derive(Clone, Debug, Default)]
pub struct Submitted {
    pub scalars: HashMap<String, String>,
    pub items: HashMap<String, Vec<String>>,
    pub csv: HashMap<String, String>,
    pub listjs: Vec<String>,
    pub files: HashMap<String, Vec<PathBuf>>,
    /// The token under which the server keeps `files` when the form comes back with errors.
    pub kept: Option<String>,
    pub input: String,
    pub output: String,
    pub work: String,
    pub overwrite: bool,
}

/// Messages to show, by field name (`input`, `output`, `work` for the folders) and overall.
#[derive(Clone, Debug, Default)]
pub struct Errors {
    pub by_field: BTreeMap<String, Vec<String>>,
    pub general: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, field: &str, msg: impl Into<String>) {
        self.by_field.entry(field.to_string()).or_default().push(msg.into());
    }
    pub fn is_empty(&self) -> bool {
        self.by_field.is_empty() && self.general.is_empty()
    }
}

impl Submitted {
    /// The parameters as one layer for [`kliko_spec::Spec::resolve`].
    pub fn layer(&self, meta: &ImageMeta) -> ParamLayer {
        use serde_json::Value as J;
        let mut map = serde_json::Map::new();
        for field in meta.spec.fields() {
            let name = &field.name;
            let v = match field.ty {
                FieldType::Bool => Some(J::String(self.scalars.contains_key(name).to_string())),
                FieldType::File => {
                    self.files.get(name).and_then(|f| f.first()).map(|p| J::String(p.display().to_string()))
                }
                FieldType::ListFile => self
                    .files
                    .get(name)
                    .filter(|f| !f.is_empty())
                    .map(|f| J::Array(f.iter().map(|p| J::String(p.display().to_string())).collect())),
                t if t.is_list() => {
                    let items = self.list_items(name);
                    Some(if items.is_empty() { J::Null } else { J::Array(items.into_iter().map(J::String).collect()) })
                }
                _ => match self.scalars.get(name) {
                    Some(s) if !s.trim().is_empty() => {
                        Some(J::String(if field.ty == FieldType::Str || field.ty == FieldType::Char {
                            s.clone()
                        } else {
                            s.trim().to_string()
                        }))
                    }
                    // A cleared field is unset, even when kliko.yml gives an initial value.
                    Some(_) => Some(J::Null),
                    // Not in the submission at all: the initial value applies.
                    None => None,
                },
            };
            if let Some(v) = v {
                map.insert(name.clone(), v);
            }
        }
        ParamLayer::json(&map).with_origin("the form")
    }

    /// A list's items: one per input when edited item by item, else comma-separated.
    fn list_items(&self, name: &str) -> Vec<String> {
        let raw: Vec<String> = if self.listjs.iter().any(|n| n == name) {
            self.items.get(name).cloned().unwrap_or_default()
        } else {
            self.csv.get(name).map(|s| s.split([',', '\n']).map(str::to_string).collect()).unwrap_or_default()
        };
        raw.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
    }
}

/// Under a file field of a form that came back: which files the server kept for it.
fn kept_note(submitted: Option<&Submitted>, name: &str) -> String {
    let Some(files) = submitted.and_then(|s| s.files.get(name)).filter(|f| !f.is_empty()) else { return String::new() };
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            format!(
                "<code>{}</code>",
                esc(&p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            )
        })
        .collect();
    format!("<div class=\"help kept\">Kept from your last submission: {}.</div>", names.join(", "))
}

/// Render the form page body.
pub fn render(
    meta: &ImageMeta,
    submitted: Option<&Submitted>,
    errors: &Errors,
    csrf: &str,
    folders: &[PathBuf],
    roots: &[PathBuf],
) -> String {
    let spec = &meta.spec;
    let title = spec.name.clone().unwrap_or_else(|| meta.reference.clone());
    let mut b = String::new();
    b.push_str(&format!("<h1>{}</h1>", esc(&title)));
    b.push_str(&format!(
        "<p class=\"sub\"><code>{}</code> · io <b>{}</b>{}</p>",
        esc(&meta.reference),
        esc(spec.io.as_str()),
        spec.author.as_ref().map(|a| format!(" · by {}", esc(a))).unwrap_or_default()
    ));
    if let Some(d) = &spec.description {
        b.push_str(&format!("<p>{}</p>", esc(d)));
    }
    if !errors.is_empty() {
        b.push_str("<div class=\"alert bad\" role=\"alert\"><b>Please correct the marked fields.</b>");
        if !errors.general.is_empty() {
            b.push_str("<ul>");
            for e in &errors.general {
                b.push_str(&format!("<li>{}</li>", esc(e)));
            }
            b.push_str("</ul>");
        }
        if submitted.is_some_and(|s| !s.files.is_empty()) {
            b.push_str("<div>The files you chose are kept: choose others only to replace them.</div>");
        }
        b.push_str("</div>");
    }
    b.push_str(&format!(
        "<form method=\"post\" action=\"/image/{}\" enctype=\"multipart/form-data\" id=\"run-form\">",
        url_path(&meta.reference)
    ));
    // First, so the server can refuse a forged form before reading any upload.
    b.push_str(&format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(csrf)));
    if let Some(token) = submitted.and_then(|s| s.kept.as_ref()) {
        b.push_str(&format!("<input type=\"hidden\" name=\"kept\" value=\"{}\">", esc(token)));
    }

    // Folders.
    b.push_str("<fieldset><legend>Data</legend>");
    let roots_text: Vec<String> =
        roots.iter().map(|r| format!("<code>{}</code>", esc(&r.display().to_string()))).collect();
    b.push_str(&format!(
        "<p class=\"desc\">Folders are inside the data folder{} of this server: {}. A relative path is taken inside the first.</p>",
        if roots.len() == 1 { "" } else { "s" },
        roots_text.join(", ")
    ));
    let s = submitted.cloned().unwrap_or_default();
    match spec.io {
        IoMode::Split => {
            folder_field(
                &mut b,
                "input",
                "Input folder",
                &s.input,
                "Mounted read-only at /input. Leave empty for no input.",
                errors,
            );
            folder_field(&mut b, "output", "Output folder", &s.output, "Receives /output (created if absent; must be empty). Leave empty to keep the output in the store only: it is listed and downloadable on the run page.", errors);
        }
        IoMode::Join => {
            folder_field(&mut b, "work", "Work folder", &s.work, "The image changes a private copy of it (/work); your folder is only replaced once the result is safely stored.", errors);
            folder_field(
                &mut b,
                "output",
                "Result folder",
                &s.output,
                "Where the changed work folder goes. Leave empty to put it back into the work folder.",
                errors,
            );
        }
    }
    b.push_str(&format!(
        "<div class=\"field\"><label class=\"check\"><input type=\"checkbox\" name=\"overwrite\" value=\"true\"{}>Replace the contents of a non-empty output folder</label></div>",
        if s.overwrite { " checked" } else { "" }
    ));
    b.push_str("<datalist id=\"folders\">");
    for f in folders {
        b.push_str(&format!("<option value=\"{}\">", esc(&f.display().to_string())));
    }
    b.push_str("</datalist></fieldset>");
    b.push_str(&crate::html::script(crate::routes::picker::PICKER_JS));

    for section in &spec.sections {
        b.push_str(&format!("<fieldset><legend>{}</legend>", esc(&section.name)));
        if !section.description.is_empty() {
            b.push_str(&format!("<p class=\"desc\">{}</p>", esc(&section.description)));
        }
        for field in &section.fields {
            field_html(&mut b, field, submitted, errors);
        }
        b.push_str("</fieldset>");
    }
    // Errors for names the spec does not have (should not happen from this form).
    b.push_str("<div class=\"actions\"><button type=\"submit\" class=\"primary\">Run</button>");
    b.push_str("<span class=\"meta\">An identical earlier run is reused from the cache.</span></div></form>");
    b.push_str(&crate::html::script(LIST_JS));
    b
}

fn folder_field(b: &mut String, name: &str, label: &str, value: &str, help: &str, errors: &Errors) {
    let errs = errors.by_field.get(name);
    b.push_str(&format!(
        "<div class=\"field{}\" data-field=\"folder:{name}\"><label for=\"folder-{name}\">{}</label><input type=\"text\" id=\"folder-{name}\" name=\"{name}\" value=\"{}\" list=\"folders\" autocomplete=\"off\" placeholder=\"folder\">{}<div class=\"help\">{}</div>",
        if errs.is_some() { " invalid" } else { "" },
        esc(label),
        esc(value),
        crate::routes::picker::button(&format!("folder-{name}")),
        esc(help)
    ));
    for e in errs.into_iter().flatten() {
        b.push_str(&format!("<div class=\"error\">{}</div>", esc(e)));
    }
    b.push_str("</div>");
}

/// The text shown in a field: what was submitted, else the initial value.
fn shown(field: &Field, submitted: Option<&Submitted>) -> String {
    match submitted {
        Some(s) => s.scalars.get(&field.name).cloned().unwrap_or_default(),
        None => field.initial.as_ref().filter(|v| **v != Value::Null).map(|v| v.to_string()).unwrap_or_default(),
    }
}

fn field_html(b: &mut String, field: &Field, submitted: Option<&Submitted>, errors: &Errors) {
    let name = &field.name;
    let id = format!("p-{}", url_path(name).replace(['%', '/', ':', '@', '.', '~'], "_"));
    let errs = errors.by_field.get(name);
    let label = field.label.clone().unwrap_or_else(|| name.clone());
    let req = if field.required && field.ty != FieldType::Bool {
        "<span class=\"req\" title=\"required\">*</span>"
    } else {
        ""
    };
    b.push_str(&format!(
        "<div class=\"field{}\" data-field=\"{}\">",
        if errs.is_some() { " invalid" } else { "" },
        esc(name)
    ));
    let pname = esc(&format!("p.{name}"));
    match field.ty {
        FieldType::Bool => {
            let checked = match submitted {
                Some(s) => s.scalars.contains_key(name),
                None => matches!(field.initial, Some(Value::Bool(true))),
            };
            b.push_str(&format!(
                "<label class=\"check\"><input type=\"checkbox\" id=\"{id}\" name=\"{pname}\" value=\"true\"{}>{}<span class=\"name\">{}</span></label>",
                if checked { " checked" } else { "" },
                esc(&label),
                esc(name)
            ));
        }
        _ => {
            b.push_str(&format!(
                "<label for=\"{id}\">{}{req}<span class=\"name\">{}</span></label>",
                esc(&label),
                esc(name)
            ));
            match field.ty {
                FieldType::Int | FieldType::Float => {
                    let step = if field.ty == FieldType::Int { "1" } else { "any" };
                    b.push_str(&format!(
                        "<input type=\"number\" step=\"{step}\" id=\"{id}\" name=\"{pname}\" value=\"{}\">",
                        esc(&shown(field, submitted))
                    ));
                }
                FieldType::Choice => {
                    let cur = shown(field, submitted);
                    b.push_str(&format!("<select id=\"{id}\" name=\"{pname}\">"));
                    if !field.required || field.initial.is_none() {
                        b.push_str(&format!(
                            "<option value=\"\"{}>—</option>",
                            if cur.is_empty() { " selected" } else { "" }
                        ));
                    }
                    for (k, l) in field.choices.iter().flatten() {
                        b.push_str(&format!(
                            "<option value=\"{}\"{}>{}</option>",
                            esc(k),
                            if *k == cur { " selected" } else { "" },
                            esc(l)
                        ));
                    }
                    b.push_str("</select>");
                }
                FieldType::File => {
                    b.push_str(&format!("<input type=\"file\" id=\"{id}\" name=\"{}\">", esc(&format!("f.{name}"))));
                    b.push_str(&kept_note(submitted, name));
                }
                FieldType::ListFile => {
                    b.push_str(&format!(
                        "<input type=\"file\" multiple id=\"{id}\" name=\"{}\"><div class=\"help\">Choose one or more files; their order is kept.</div>",
                        esc(&format!("f.{name}"))
                    ));
                    b.push_str(&kept_note(submitted, name));
                }
                t if t.is_list() => {
                    let text = match submitted {
                        Some(s) if s.listjs.iter().any(|n| n == name) => {
                            s.items.get(name).cloned().unwrap_or_default().join(", ")
                        }
                        Some(s) => s.csv.get(name).cloned().unwrap_or_default(),
                        None => shown(field, None).split(',').collect::<Vec<_>>().join(", "),
                    };
                    let (kind, step) = match t.item_type() {
                        FieldType::Int => ("number", "1"),
                        FieldType::Float => ("number", "any"),
                        _ => ("text", ""),
                    };
                    b.push_str(&format!(
                        "<div class=\"listfield\" data-name=\"{}\" data-kind=\"{kind}\" data-step=\"{step}\"><textarea id=\"{id}\" name=\"{}\" rows=\"2\">{}</textarea>\
<div class=\"help\">Items separated by commas.</div></div>",
                        esc(name),
                        esc(&format!("csv.{name}")),
                        esc(&text)
                    ));
                }
                _ => {
                    let max = field.max_length.map(|n| format!(" maxlength=\"{n}\"")).unwrap_or_default();
                    b.push_str(&format!(
                        "<input type=\"text\" id=\"{id}\" name=\"{pname}\" value=\"{}\"{max}>",
                        esc(&shown(field, submitted))
                    ));
                }
            }
        }
    }
    let mut help = field.help_text.clone().unwrap_or_default();
    if let Some(n) = field.max_length {
        if field.ty.takes_max_length() {
            help = format!("{help}{}At most {n} characters.", if help.is_empty() { "" } else { " " });
        }
    }
    if !help.is_empty() {
        b.push_str(&format!("<div class=\"help\">{}</div>", esc(&help)));
    }
    for e in errs.into_iter().flatten() {
        b.push_str(&format!("<div class=\"error\">{}</div>", esc(e)));
    }
    b.push_str("</div>");
}

/// Turns each comma-separated list textarea into one input per item with add/remove
/// buttons. Without JavaScript the textarea stays and works.
const LIST_JS: &str = r#"
document.querySelectorAll('.listfield').forEach(function (box) {
  var name = box.dataset.name, kind = box.dataset.kind, step = box.dataset.step;
  var ta = box.querySelector('textarea');
  var items = document.createElement('div'); items.className = 'list-items';
  function add(v) {
    var row = document.createElement('div'); row.className = 'row';
    var inp = document.createElement('input'); inp.type = kind; if (step) inp.step = step;
    inp.name = 'p.' + name; inp.value = v;
    var rm = document.createElement('button'); rm.type = 'button'; rm.className = 'small'; rm.textContent = 'remove';
    rm.onclick = function () { row.remove(); };
    row.appendChild(inp); row.appendChild(rm); items.appendChild(row); return inp;
  }
  ta.value.split(/[,\n]/).map(function (s) { return s.trim(); }).filter(function (s) { return s !== ''; }).forEach(add);
  var marker = document.createElement('input'); marker.type = 'hidden'; marker.name = 'listjs.' + name; marker.value = '1';
  var more = document.createElement('button'); more.type = 'button'; more.className = 'small add'; more.textContent = '+ add';
  more.onclick = function () { add('').focus(); };
  box.replaceChild(items, ta); box.insertBefore(marker, items); box.insertBefore(more, items.nextSibling);
  var help = box.querySelector('.help'); if (help) help.remove();
});
"#;
