//! What `kliko run IMAGE --help` shows about an image's parameters.

use std::fmt::Write as _;

use crate::spec::{Field, Spec};

impl Field {
    /// The type as written in kliko.yml: `int`, `List[file]`, ….
    pub fn type_label(&self) -> String {
        self.ty.to_string()
    }

    /// The `initial` value as a user would type it on the command line.
    pub fn default_display(&self) -> Option<String> {
        self.initial.as_ref().map(ToString::to_string)
    }

    /// `` `key` (label), `key2` `` — the label only where it differs from the key.
    pub fn choices_display(&self) -> Option<String> {
        let choices = self.choices.as_ref()?;
        let parts: Vec<String> =
            choices.iter().map(|(k, l)| if k == l { format!("`{k}`") } else { format!("`{k}` ({l})") }).collect();
        Some(parts.join(", "))
    }

    /// Whether a run must give this field a value: required and without a default.
    pub fn needs_value(&self) -> bool {
        self.required && self.initial.is_none()
    }
}

/// Every field as a `--name <type>` flag, grouped by section, with label, help text,
/// default, choices, length limit and whether it must be given.
pub fn field_flags_help(spec: &Spec) -> String {
    let mut out = String::new();
    for (i, section) in spec.sections.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if section.description.is_empty() || section.description == section.name {
            let _ = writeln!(out, "{}:", section.name);
        } else {
            let _ = writeln!(out, "{}: {}", section.name, section.description);
        }
        for field in &section.fields {
            let _ = write!(out, "  --{} <{}>", field.name, field.type_label());
            if field.needs_value() {
                out.push_str(" (required)");
            }
            out.push('\n');
            let text = match (&field.label, &field.help_text) {
                (Some(l), Some(h)) => Some(format!("{l}: {h}")),
                (Some(t), None) | (None, Some(t)) => Some(t.clone()),
                (None, None) => None,
            };
            if let Some(t) = text {
                let _ = writeln!(out, "      {t}");
            }
            let mut notes = Vec::new();
            if let Some(c) = field.choices_display() {
                notes.push(format!("choices: {c}"));
            }
            if let Some(d) = field.default_display() {
                notes.push(if d.is_empty() { "default: empty".to_string() } else { format!("default: `{d}`") });
            } else if !field.required {
                notes.push("optional".to_string());
            }
            if let Some(n) = field.max_length {
                notes.push(format!("at most {n} characters"));
            }
            if field.ty.is_list() {
                notes.push("repeat the flag or separate items with commas".to_string());
            }
            if !notes.is_empty() {
                let _ = writeln!(out, "      [{}]", notes.join("; "));
            }
        }
    }
    out
}
