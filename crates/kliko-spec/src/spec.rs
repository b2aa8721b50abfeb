//! The kliko.yml document: types, parsing and validation.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::params::{convert, Input, Value};
use crate::suggest::suggest;
use crate::yaml::{self, Node, Pos};

/// The schema version a document without `schema_version` is read as: the last
/// release (kliko 0.8) wrote version 3 documents.
pub const DEFAULT_SCHEMA_VERSION: u8 = 3;

/// The schema versions this crate reads.
pub const SCHEMA_VERSIONS: [u8; 3] = [2, 3, 4];

/// A parsed and validated kliko.yml.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spec {
    /// 2, 3 or 4; [`DEFAULT_SCHEMA_VERSION`] when the document does not say.
    pub schema_version: u8,
    /// Whether the document has a `schema_version` key.
    pub schema_version_declared: bool,
    pub name: Option<String>,
    pub description: Option<String>,
    pub author: Option<String>,
    /// `owner/name`.
    pub container: Option<String>,
    pub email: Option<String>,
    pub url: Option<String>,
    pub io: IoMode,
    pub sections: Vec<Section>,
}

/// How the container sees its data: `split` gets `/input` (read-only) and `/output`,
/// `join` gets one read-write `/work`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    Split,
    Join,
}

impl IoMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IoMode::Split => "split",
            IoMode::Join => "join",
        }
    }
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named group of fields; sections only organise help and forms, the parameters
/// themselves are one flat namespace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Section {
    pub name: String,
    pub description: String,
    pub fields: Vec<Field>,
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// The default, already checked against the type, the choices and `max_length`.
    pub initial: Option<Value>,
    /// For `char`, `str` (and each item of `List[str]`): the most characters allowed.
    pub max_length: Option<usize>,
    /// For `choice`: key → label, in the order written. The key is the value.
    pub choices: Option<Vec<(String, String)>>,
    pub label: Option<String>,
    pub help_text: Option<String>,
    /// `true` unless the document says `required: false` (Django's default, which the
    /// original forms used).
    pub required: bool,
}

/// A field type, spelled in kliko.yml (and by `Display`) as `int`, `List[int]`, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    Choice,
    Char,
    Str,
    Float,
    File,
    Bool,
    Int,
    ListInt,
    ListBool,
    ListFile,
    ListFloat,
    ListStr,
}

impl FieldType {
    pub const ALL: [FieldType; 12] = [
        FieldType::Choice,
        FieldType::Char,
        FieldType::Str,
        FieldType::Float,
        FieldType::File,
        FieldType::Bool,
        FieldType::Int,
        FieldType::ListInt,
        FieldType::ListBool,
        FieldType::ListFile,
        FieldType::ListFloat,
        FieldType::ListStr,
    ];

    /// The spelling in kliko.yml.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Choice => "choice",
            FieldType::Char => "char",
            FieldType::Str => "str",
            FieldType::Float => "float",
            FieldType::File => "file",
            FieldType::Bool => "bool",
            FieldType::Int => "int",
            FieldType::ListInt => "List[int]",
            FieldType::ListBool => "List[bool]",
            FieldType::ListFile => "List[file]",
            FieldType::ListFloat => "List[float]",
            FieldType::ListStr => "List[str]",
        }
    }

    /// Whether a document of `schema_version` may use this type.
    pub fn allowed_in(self, schema_version: u8) -> bool {
        match self {
            FieldType::Choice | FieldType::Float | FieldType::File | FieldType::Bool | FieldType::Int => {
                (2..=4).contains(&schema_version)
            }
            FieldType::Char => (2..=3).contains(&schema_version),
            FieldType::Str => (3..=4).contains(&schema_version),
            FieldType::ListInt
            | FieldType::ListBool
            | FieldType::ListFile
            | FieldType::ListFloat
            | FieldType::ListStr => schema_version == 4,
        }
    }

    /// The types a document of `schema_version` may use, in kliko.yml order.
    pub fn allowed(schema_version: u8) -> Vec<FieldType> {
        FieldType::ALL.into_iter().filter(|t| t.allowed_in(schema_version)).collect()
    }

    pub fn is_list(self) -> bool {
        self != self.item_type()
    }

    /// The type of one item of a list type; a scalar type is its own item type.
    pub fn item_type(self) -> FieldType {
        match self {
            FieldType::ListInt => FieldType::Int,
            FieldType::ListBool => FieldType::Bool,
            FieldType::ListFile => FieldType::File,
            FieldType::ListFloat => FieldType::Float,
            FieldType::ListStr => FieldType::Str,
            other => other,
        }
    }

    /// `file` or `List[file]`: values are host paths copied under `/param_files`.
    pub fn is_file(self) -> bool {
        self.item_type() == FieldType::File
    }

    /// Whether `max_length` means something for this type.
    pub fn takes_max_length(self) -> bool {
        matches!(self.item_type(), FieldType::Char | FieldType::Str)
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of [`FieldType::from_str`]: the spelling is not a kliko type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown field type `{0}`")]
pub struct UnknownFieldType(pub String);

impl FromStr for FieldType {
    type Err = UnknownFieldType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FieldType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| UnknownFieldType(s.to_string()))
    }
}

impl Serialize for FieldType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FieldType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One thing wrong with a kliko.yml, with its place where YAML gives one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based.
    pub column: Option<usize>,
    /// Lowercase, values in backticks, without the place.
    pub message: String,
}

/// Why a kliko.yml was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem found, in document order (validation goes on past the first).
    #[error("{}", render_problems(source_name, problems))]
    Invalid { source_name: String, problems: Vec<Problem> },
}

impl SpecError {
    /// The problems of an invalid document; empty for an I/O error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            SpecError::Invalid { problems, .. } => problems,
            SpecError::Io { .. } => &[],
        }
    }
}

fn render_problems(source_name: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| match (p.line, p.column) {
            (Some(l), Some(c)) => format!("`{source_name}` line {l}, column {c}: {}", p.message),
            (Some(l), None) => format!("`{source_name}` line {l}: {}", p.message),
            _ => format!("`{source_name}`: {}", p.message),
        })
        .collect();
    lines.join("\n")
}

/// Reads and validates a kliko.yml file: what `kliko validate` does.
pub fn validate_file(path: &Path) -> Result<Spec, SpecError> {
    Spec::parse_file(path)
}

const TOP_KEYS: &[&str] =
    &["schema_version", "name", "description", "author", "container", "email", "url", "io", "sections"];
const SECTION_KEYS: &[&str] = &["name", "description", "fields"];
const FIELD_KEYS: &[&str] = &["name", "type", "initial", "max_length", "choices", "label", "help_text", "required"];
const TOP: &str = "at the top level";
const V2_REQUIRED: &[&str] = &["name", "description", "author", "container", "email"];

impl Spec {
    /// Parses and validates a kliko.yml. `source_name` names the document in messages:
    /// a path, or something like `image foo:latest:/kliko.yml`.
    pub fn parse(source_name: &str, text: &str) -> Result<Spec, SpecError> {
        let mut cx = Checker { problems: Vec::new() };
        let spec = match yaml::parse(text) {
            Err(e) => {
                cx.problems.push(Problem {
                    line: e.pos.map(|p| p.line),
                    column: e.pos.map(|p| p.column),
                    message: e.describe(),
                });
                None
            }
            Ok(None) => {
                cx.problems.push(Problem {
                    line: None,
                    column: None,
                    message: "the document is empty (expected a mapping with at least `io`)".into(),
                });
                None
            }
            Ok(Some(root)) => cx.spec(&root),
        };
        match spec {
            Some(spec) if cx.problems.is_empty() => Ok(spec),
            _ => {
                let mut problems = cx.problems;
                problems.sort_by_key(|p| (p.line.unwrap_or(0), p.column.unwrap_or(0)));
                Err(SpecError::Invalid { source_name: source_name.to_string(), problems })
            }
        }
    }

    /// Reads `path` and parses it; messages name the path.
    pub fn parse_file(path: &Path) -> Result<Spec, SpecError> {
        let text = match yaml::read_file(path) {
            Ok(text) => text,
            Err(yaml::ReadError::Io(source)) => return Err(SpecError::Io { path: path.to_path_buf(), source }),
            Err(yaml::ReadError::TooLarge(e)) => {
                return Err(SpecError::Invalid {
                    source_name: path.display().to_string(),
                    problems: vec![Problem { line: None, column: None, message: e.describe() }],
                })
            }
        };
        Spec::parse(&path.display().to_string(), &text)
    }

    /// Every field of every section, in declaration order.
    pub fn fields(&self) -> impl Iterator<Item = &Field> {
        self.sections.iter().flat_map(|s| s.fields.iter())
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields().find(|f| f.name == name)
    }
}

struct Checker {
    problems: Vec<Problem>,
}

/// The entries of a mapping, after unknown and duplicate keys were reported. A key
/// whose value is YAML null counts as absent.
struct Entries<'a> {
    pos: Pos,
    entries: Vec<(&'a str, Pos, &'a Node)>,
}

impl<'a> Entries<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries.iter().find(|(k, _, v)| *k == key && !v.is_null()).map(|(_, _, v)| *v)
    }

    /// Where `key` itself is written: errors about a key's presence, or about a value
    /// that is not a scalar, point here.
    fn key_pos(&self, key: &str) -> Pos {
        self.entries.iter().find(|(k, _, _)| *k == key).map_or(self.pos, |(_, p, _)| *p)
    }
}

impl Checker {
    fn err(&mut self, pos: Pos, message: String) {
        self.problems.push(Problem { line: Some(pos.line), column: Some(pos.column), message });
    }

    /// Checks that `node` is a mapping with only `allowed` keys. `context` reads after
    /// "unknown key `x`", e.g. "in field `threshold`".
    fn entries<'a>(
        &mut self,
        node: &'a Node,
        allowed: Option<&[&str]>,
        what: &str,
        context: &str,
    ) -> Option<Entries<'a>> {
        let Node::Map { entries, pos } = node else {
            self.err(node.pos(), format!("{what} must be a mapping, found {}", node.kind()));
            return None;
        };
        let mut out: Vec<(&'a str, Pos, &'a Node)> = Vec::new();
        // A `choices` mapping may be long: no quadratic search for duplicates.
        let mut seen: HashMap<&'a str, Pos> = HashMap::new();
        for (k, v) in entries {
            let Some(key) = k.as_scalar() else {
                self.err(k.pos(), format!("expected a plain key {context}, found {}", k.kind()));
                continue;
            };
            if let Some(first) = seen.get(key) {
                let first = *first;
                self.err(k.pos(), format!("duplicate key `{key}` {context} (first at {first})"));
                continue;
            }
            if let Some(allowed) = allowed {
                if !allowed.contains(&key) {
                    let what = if context == TOP {
                        format!("unknown top-level key `{key}`")
                    } else {
                        format!("unknown key `{key}` {context}")
                    };
                    let mut msg = format!("{what} (expected one of: {})", allowed.join(", "));
                    if let Some(s) = suggest(key, allowed.iter().copied()) {
                        msg.push_str(&format!("; did you mean `{s}`?"));
                    }
                    self.err(k.pos(), msg);
                    continue;
                }
            }
            seen.insert(key, k.pos());
            out.push((key, k.pos(), v));
        }
        Some(Entries { pos: *pos, entries: out })
    }

    fn string(&mut self, e: &Entries<'_>, key: &str, context: &str) -> Option<String> {
        let node = e.get(key)?;
        match node.as_scalar() {
            Some(s) => Some(s.to_string()),
            None => {
                self.err(e.key_pos(key), format!("`{key}` {context} must be a string, found {}", node.kind()));
                None
            }
        }
    }

    fn spec(&mut self, root: &Node) -> Option<Spec> {
        let top = self.entries(root, Some(TOP_KEYS), "the document", TOP)?;

        // The version decides what else is allowed, so read it first. `known` is false
        // when the version is invalid: version-specific checks are then skipped rather
        // than piling confusing follow-up errors onto the one that matters.
        let declared = top.get("schema_version");
        let (version, known) = match declared {
            None => (DEFAULT_SCHEMA_VERSION, true),
            Some(node) => match node.as_scalar().map(|s| s.trim().parse::<i64>()) {
                Some(Ok(v @ 2..=4)) => (v as u8, true),
                _ => {
                    self.err(node.pos(), format!("`schema_version` must be 2, 3 or 4, found `{}`", display_node(node)));
                    (DEFAULT_SCHEMA_VERSION, false)
                }
            },
        };

        let name = self.string(&top, "name", TOP);
        let description = self.string(&top, "description", TOP);
        let author = self.string(&top, "author", TOP);
        let container = self.string(&top, "container", TOP);
        let email = self.string(&top, "email", TOP);
        let url = self.string(&top, "url", TOP);

        if known && version == 2 {
            for key in V2_REQUIRED {
                if top.get(key).is_none() {
                    self.err(top.pos, format!("missing required key `{key}` (required by schema version 2)"));
                }
            }
        }
        if let (Some(c), Some(node)) = (&container, top.get("container")) {
            let parts: Vec<&str> = c.split('/').collect();
            let ok = parts.len() >= 2 && parts.iter().all(|p| !p.is_empty()) && !c.chars().any(char::is_whitespace);
            if !ok {
                self.err(node.pos(), format!("`container` must have the form `owner/name`, found `{c}`"));
            }
        }
        if let (Some(m), Some(node)) = (&email, top.get("email")) {
            let ok = matches!(m.split_once('@'), Some((a, b)) if !a.is_empty() && !b.is_empty());
            if !ok {
                self.err(node.pos(), format!("`email` must contain `@`, found `{m}`"));
            }
        }
        if let (Some(u), Some(node)) = (&url, top.get("url")) {
            if !is_http_url(u) {
                self.err(node.pos(), format!("`url` must be an http or https URL, found `{u}`"));
            }
        }

        let io = match top.get("io") {
            None => {
                self.err(top.pos, "missing required key `io` (expected `split` or `join`)".into());
                None
            }
            Some(node) => match node.as_scalar() {
                Some("split") => Some(IoMode::Split),
                Some("join") => Some(IoMode::Join),
                _ => {
                    self.err(node.pos(), format!("`io` must be `split` or `join`, found `{}`", display_node(node)));
                    None
                }
            },
        };

        let version_note = if declared.is_none() {
            format!(" (the document has no `schema_version`, so it is read as version {DEFAULT_SCHEMA_VERSION})")
        } else {
            String::new()
        };
        let mut names: HashMap<String, (String, Pos)> = HashMap::new();
        let mut sections = Vec::new();
        match top.get("sections") {
            None => {}
            Some(Node::Seq { items, .. }) => {
                for (i, item) in items.iter().enumerate() {
                    let ctx = SectionCx { version, known, version_note: &version_note };
                    if let Some(s) = self.section(item, i + 1, &ctx, &mut names) {
                        sections.push(s);
                    }
                }
            }
            Some(other) => self
                .err(top.key_pos("sections"), format!("`sections` must be a list of sections, found {}", other.kind())),
        }

        Some(Spec {
            schema_version: version,
            schema_version_declared: declared.is_some(),
            name,
            description,
            author,
            container,
            email,
            url,
            io: io?,
            sections,
        })
    }

    fn section(
        &mut self,
        node: &Node,
        index: usize,
        cx: &SectionCx<'_>,
        names: &mut HashMap<String, (String, Pos)>,
    ) -> Option<Section> {
        // The name makes every later message readable, so find it before the checks.
        let label = match section_name(node) {
            Some(n) => format!("section `{n}`"),
            None => format!("section {index}"),
        };
        let e = self.entries(node, Some(SECTION_KEYS), &label, &format!("in {label}"))?;
        let name = self.string(&e, "name", &format!("in {label}"));
        let description = self.string(&e, "description", &format!("in {label}"));
        for key in SECTION_KEYS {
            if e.get(key).is_none() {
                self.err(e.pos, format!("{label} is missing required key `{key}`"));
            }
        }
        let mut fields = Vec::new();
        match e.get("fields") {
            None => {}
            Some(Node::Seq { items, .. }) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(f) = self.field(item, i + 1, &label, cx, names) {
                        fields.push(f);
                    }
                }
            }
            Some(other) => self.err(
                e.key_pos("fields"),
                format!("`fields` in {label} must be a list of fields, found {}", other.kind()),
            ),
        }
        Some(Section { name: name?, description: description?, fields })
    }

    fn field(
        &mut self,
        node: &Node,
        index: usize,
        section: &str,
        cx: &SectionCx<'_>,
        names: &mut HashMap<String, (String, Pos)>,
    ) -> Option<Field> {
        let label = match section_name(node) {
            Some(n) => format!("field `{n}`"),
            None => format!("field {index} of {section}"),
        };
        let in_field = format!("in {label}");
        let e = self.entries(node, Some(FIELD_KEYS), &label, &in_field)?;

        let name = self.string(&e, "name", &in_field);
        match (&name, e.get("name")) {
            (Some(n), Some(name_node)) => {
                let pos = name_node.pos();
                if n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0') {
                    self.err(
                        pos,
                        format!(
                            "field name `{n}` cannot be used: it names a path under \
                             `/param_files` (no `/`, and not empty, `.` or `..`)"
                        ),
                    );
                } else if let Some((first_section, first_pos)) = names.get(n) {
                    self.err(
                        pos,
                        format!(
                            "duplicate field name `{n}` in {section}: already declared in \
                             {first_section} at {first_pos}"
                        ),
                    );
                } else {
                    names.insert(n.clone(), (section.to_string(), pos));
                }
            }
            (None, None) => self.err(e.pos, format!("{label} is missing required key `name`")),
            _ => {}
        }

        let ty = match e.get("type") {
            None => {
                self.err(e.pos, format!("{label} is missing required key `type`"));
                None
            }
            Some(node) => self.field_type(node, &label, cx),
        };

        let required = match e.get("required") {
            None => true,
            Some(node) => match node.as_scalar().and_then(crate::params::parse_bool) {
                Some(b) => b,
                None => {
                    self.err(
                        node.pos(),
                        format!("`required` {in_field} must be `true` or `false`, found `{}`", display_node(node)),
                    );
                    true
                }
            },
        };

        let max_length = match e.get("max_length") {
            None => None,
            Some(node) => match node.as_scalar().map(|s| s.trim().parse::<usize>()) {
                Some(Ok(n)) => {
                    if let Some(t) = ty.filter(|t| !t.takes_max_length()) {
                        self.err(
                            e.key_pos("max_length"),
                            format!(
                                "`max_length` only applies to `char`, `str` and `List[str]` \
                                 fields; {label} is `{t}`"
                            ),
                        );
                    }
                    Some(n)
                }
                _ => {
                    self.err(
                        node.pos(),
                        format!(
                            "`max_length` {in_field} must be a non-negative integer, found `{}`",
                            display_node(node)
                        ),
                    );
                    None
                }
            },
        };

        let choices = match e.get("choices") {
            None => None,
            Some(node) => {
                let choices = self.choices(node, e.key_pos("choices"), &label);
                if let Some(t) = ty.filter(|t| *t != FieldType::Choice) {
                    self.err(
                        e.key_pos("choices"),
                        format!("`choices` only applies to `choice` fields; {label} is `{t}`"),
                    );
                }
                choices
            }
        };
        if ty == Some(FieldType::Choice) && e.get("choices").is_none() {
            self.err(e.pos, format!("{label} has type `choice` but no `choices`"));
        }

        let label_text = self.string(&e, "label", &in_field);
        let help_text = self.string(&e, "help_text", &in_field);

        let mut field =
            Field { name: name?, ty: ty?, initial: None, max_length, choices, label: label_text, help_text, required };

        if let Some(node) = e.get("initial") {
            if field.ty.is_file() {
                self.err(
                    e.key_pos("initial"),
                    format!(
                        "{label} has type `{}`, which cannot have an `initial` value \
                         (a default host path would not be portable)",
                        field.ty
                    ),
                );
            } else {
                match convert(&field, &input_from_node(node), None) {
                    Ok(v) => field.initial = Some(v),
                    Err(errs) => {
                        for err in errs {
                            let item = err.item.map(|i| format!(" (item {i})")).unwrap_or_default();
                            // Point at the bad item of a YAML list, else at the value.
                            let pos = match (node, err.item) {
                                (Node::Seq { items, .. }, Some(i)) => items.get(i - 1).map_or(node.pos(), Node::pos),
                                (Node::Scalar { .. }, _) => node.pos(),
                                _ => e.key_pos("initial"),
                            };
                            self.err(
                                pos,
                                format!(
                                    "invalid `initial` value `{}`{item} {in_field}: expected {}",
                                    err.value, err.expected
                                ),
                            );
                        }
                    }
                }
            }
        }
        Some(field)
    }

    fn field_type(&mut self, node: &Node, label: &str, cx: &SectionCx<'_>) -> Option<FieldType> {
        let allowed = FieldType::allowed(cx.version);
        let list = |ts: &[FieldType]| ts.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ");
        let Some(text) = node.as_scalar() else {
            self.err(node.pos(), format!("`type` in {label} must be a string, found {}", node.kind()));
            return None;
        };
        let Ok(ty) = text.parse::<FieldType>() else {
            let mut msg = format!(
                "unknown type `{text}` in {label} (expected one of: {})",
                list(if cx.known { &allowed } else { &FieldType::ALL })
            );
            let names = FieldType::ALL.map(FieldType::as_str);
            if let Some(s) = suggest(text, names.iter().copied()) {
                msg.push_str(&format!("; did you mean `{s}`?"));
            }
            self.err(node.pos(), msg);
            return None;
        };
        if cx.known && !ty.allowed_in(cx.version) {
            let hint = if ty == FieldType::Char { "; use `str`" } else { "" };
            self.err(
                node.pos(),
                format!(
                    "type `{ty}` in {label} is not allowed in schema version {}{} \
                     (allowed: {}){hint}",
                    cx.version,
                    cx.version_note,
                    list(&allowed)
                ),
            );
            return None;
        }
        Some(ty)
    }

    fn choices(&mut self, node: &Node, key_pos: Pos, label: &str) -> Option<Vec<(String, String)>> {
        let Node::Map { .. } = node else {
            self.err(
                key_pos,
                format!("`choices` in {label} must be a mapping from key to label, found {}", node.kind()),
            );
            return None;
        };
        let e = self.entries(node, None, &format!("`choices` in {label}"), &format!("in the `choices` of {label}"))?;
        let mut out = Vec::new();
        for (key, _, value) in &e.entries {
            let text = if value.is_null() {
                key.to_string()
            } else if let Some(s) = value.as_scalar() {
                s.to_string()
            } else {
                self.err(
                    value.pos(),
                    format!("the label of choice `{key}` in {label} must be a string, found {}", value.kind()),
                );
                continue;
            };
            out.push((key.to_string(), text));
        }
        if out.is_empty() && e.entries.is_empty() {
            self.err(key_pos, format!("`choices` in {label} is empty"));
        }
        Some(out)
    }
}

struct SectionCx<'a> {
    version: u8,
    known: bool,
    version_note: &'a str,
}

fn section_name(node: &Node) -> Option<&str> {
    let Node::Map { entries, .. } = node else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.as_scalar() == Some("name"))
        .and_then(|(_, v)| v.as_scalar())
        .filter(|s| !s.is_empty())
}

fn display_node(node: &Node) -> String {
    match node {
        Node::Scalar { text, .. } => text.clone(),
        Node::Seq { .. } => "[…]".into(),
        Node::Map { .. } => "{…}".into(),
    }
}

/// The YAML node as a parameter input: scalars keep their text, so the declared type,
/// not YAML's resolution rules, decides what `yes` or `1e3` means.
pub(crate) fn input_from_node(node: &Node) -> Input {
    if node.is_null() {
        return Input::Null;
    }
    match node {
        Node::Scalar { text, .. } => Input::Scalar(text.clone()),
        Node::Seq { items, .. } => Input::List(items.iter().map(input_from_node).collect()),
        Node::Map { .. } => Input::Map,
    }
}

fn is_http_url(u: &str) -> bool {
    let lower = u.to_ascii_lowercase();
    let rest = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://"));
    match rest {
        Some(rest) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            !host.is_empty() && !u.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
