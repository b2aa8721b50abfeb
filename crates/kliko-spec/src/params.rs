//! Parameter values: parsing from the command line and parameter files, merging
//! layers, and the two canonical outputs (`/parameters.json` and the cache-key form).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::spec::{Field, FieldType, Spec};
use crate::suggest::suggest;
use crate::yaml;

/// Where `file` parameters are mounted in the container.
pub const PARAM_FILES_DIR: &str = "/param_files";

/// The version of the [`Params::canonical_key_json`] format. Whoever folds those bytes
/// into a cache key must fold this in too (or bump their own version when it changes).
pub const CANONICAL_PARAMS_FORMAT: u32 = 1;

/// One parameter value, typed by its field.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Unset: an optional field with no value and no `initial`.
    Null,
    Bool(bool),
    Int(i64),
    /// Always finite: NaN and infinities are rejected when parsed.
    Float(f64),
    /// `char`, `str`, and the key of a `choice`.
    Str(String),
    /// A host path; the container sees a copy under [`PARAM_FILES_DIR`].
    File(PathBuf),
    List(Vec<Value>),
}

impl fmt::Display for Value {
    /// The command-line spelling: what a user would type to give this value
    /// (lists comma-separated). Used for help defaults and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
            Value::File(p) => write!(f, "{}", p.display()),
            Value::List(items) => {
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                Ok(())
            }
        }
    }
}

impl Serialize for Value {
    /// Native JSON; a file as its host path (for inspection, not for the container).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(x) => s.serialize_f64(*x),
            Value::Str(v) => s.serialize_str(v),
            Value::File(p) => s.serialize_str(&p.to_string_lossy()),
            Value::List(items) => items.serialize(s),
        }
    }
}

/// A value as given, before its field's type is applied. Scalars are text whatever
/// their source (a flag, a JSON number, a YAML scalar): the declared type decides.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    Null,
    Scalar(String),
    List(Vec<Input>),
    Map,
}

impl Input {
    fn from_json(v: &serde_json::Value) -> Input {
        match v {
            serde_json::Value::Null => Input::Null,
            serde_json::Value::Bool(b) => Input::Scalar(b.to_string()),
            serde_json::Value::Number(n) => Input::Scalar(n.to_string()),
            serde_json::Value::String(s) => Input::Scalar(s.clone()),
            serde_json::Value::Array(a) => Input::List(a.iter().map(Input::from_json).collect()),
            serde_json::Value::Object(_) => Input::Map,
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Null => f.write_str("null"),
            Input::Scalar(s) => f.write_str(s),
            Input::List(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Input::Map => f.write_str("{…}"),
        }
    }
}

/// One rejected value (or list item), before it is tied to a layer.
#[derive(Debug, Clone)]
pub(crate) struct Invalid {
    pub value: String,
    /// 1-based index into a list.
    pub item: Option<usize>,
    pub expected: String,
    pub hint: Option<String>,
}

/// `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`, any case.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Applies `field`'s type (and choices and `max_length`) to an input. A relative file
/// path is joined to `base_dir` when one is given.
pub(crate) fn convert(field: &Field, input: &Input, base_dir: Option<&Path>) -> Result<Value, Vec<Invalid>> {
    match input {
        Input::Null => Ok(Value::Null),
        Input::Map => Err(vec![Invalid {
            value: input.to_string(),
            item: None,
            expected: format!("{}, not a mapping", expected(field, field.ty.item_type())),
            hint: None,
        }]),
        Input::Scalar(s) if field.ty.is_list() => convert_list(field, &split_items(s), base_dir),
        Input::Scalar(s) => scalar(field, field.ty, s, base_dir).map_err(|e| vec![e]),
        Input::List(items) if field.ty.is_list() => convert_list(field, items, base_dir),
        Input::List(_) => Err(vec![Invalid {
            value: input.to_string(),
            item: None,
            expected: format!("{}, not a list", expected(field, field.ty)),
            hint: None,
        }]),
    }
}

fn convert_list(field: &Field, items: &[Input], base_dir: Option<&Path>) -> Result<Value, Vec<Invalid>> {
    let item_ty = field.ty.item_type();
    let mut out = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let result = match item {
            Input::Scalar(s) => scalar(field, item_ty, s, base_dir),
            other => {
                Err(Invalid { value: other.to_string(), item: None, expected: expected(field, item_ty), hint: None })
            }
        };
        match result {
            Ok(v) => out.push(v),
            Err(mut e) => {
                e.item = Some(i + 1);
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        Ok(Value::List(out))
    } else {
        Err(errors)
    }
}

/// What a value of `ty` for `field` must look like, for messages.
fn expected(field: &Field, ty: FieldType) -> String {
    match ty {
        FieldType::Bool => "a boolean (`true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`)".into(),
        FieldType::Int => "an integer".into(),
        FieldType::Float => "a finite number".into(),
        FieldType::Char | FieldType::Str => match field.max_length {
            Some(n) => format!("a string of at most {n} characters"),
            None => "a string".into(),
        },
        FieldType::Choice => format!("one of {}", choice_keys(field)),
        FieldType::File => "a path to a file".into(),
        _ => format!("a `{ty}`"),
    }
}

fn choice_keys(field: &Field) -> String {
    let keys: Vec<String> = field.choices.iter().flatten().map(|(k, _)| format!("`{k}`")).collect();
    keys.join(", ")
}

fn scalar(field: &Field, ty: FieldType, s: &str, base_dir: Option<&Path>) -> Result<Value, Invalid> {
    let invalid =
        |hint: Option<String>| Invalid { value: s.to_string(), item: None, expected: expected(field, ty), hint };
    match ty {
        FieldType::Bool => parse_bool(s).map(Value::Bool).ok_or_else(|| invalid(None)),
        FieldType::Int => s.trim().parse::<i64>().map(Value::Int).map_err(|_| invalid(None)),
        FieldType::Float => match s.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Value::Float(x)),
            _ => Err(invalid(None)),
        },
        FieldType::Char | FieldType::Str => {
            let n = s.chars().count();
            match field.max_length {
                Some(max) if n > max => Err(Invalid {
                    value: s.to_string(),
                    item: None,
                    expected: format!("at most {max} characters (this has {n})"),
                    hint: None,
                }),
                _ => Ok(Value::Str(s.to_string())),
            }
        }
        FieldType::Choice => {
            let choices = field.choices.as_deref().unwrap_or_default();
            if choices.iter().any(|(k, _)| k == s) {
                return Ok(Value::Str(s.to_string()));
            }
            // A user who typed what the form showed gave a label, not the key.
            let by_label = choices
                .iter()
                .find(|(_, l)| l == s)
                .or_else(|| choices.iter().find(|(k, l)| l.eq_ignore_ascii_case(s) || k.eq_ignore_ascii_case(s)));
            let hint = match by_label {
                Some((k, _)) => Some(format!("did you mean `{k}`?")),
                None => suggest(s, choices.iter().map(|(k, _)| k.as_str())).map(|k| format!("did you mean `{k}`?")),
            };
            Err(invalid(hint))
        }
        FieldType::File => {
            let path = Path::new(s);
            if s.is_empty() || path.file_name().is_none() {
                return Err(invalid(None));
            }
            match base_dir {
                Some(dir) if path.is_relative() => Ok(Value::File(dir.join(path))),
                _ => Ok(Value::File(path.to_path_buf())),
            }
        }
        list => Err(Invalid { value: s.to_string(), item: None, expected: format!("a `{list}`"), hint: None }),
    }
}

/// One problem with the parameters given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown parameter `{name}` from {origin}{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    Unknown { name: String, origin: String, suggestion: Option<String> },
    #[error(
        "invalid value `{value}` for `{field}`{} from {origin}: expected {expected}{}",
        item.map(|i| format!(" (item {i})")).unwrap_or_default(),
        hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default()
    )]
    Invalid {
        field: String,
        ty: FieldType,
        /// 1-based, for a list item.
        item: Option<usize>,
        value: String,
        origin: String,
        expected: String,
        hint: Option<String>,
    },
    #[error("`{field}` is given more than once from {origin} (`{first}`, then `{second}`); only list parameters may be repeated")]
    Repeated { field: String, origin: String, first: String, second: String },
    #[error("missing required parameter `{field}` (`{ty}`, no default)")]
    Missing { field: String, ty: FieldType },
    #[error("cannot read parameters from {origin}: {message}")]
    Document { origin: String, message: String },
    #[error("parameter `{field}`: `{}` {problem}", path.display())]
    File { field: String, path: PathBuf, problem: String },
}

impl ParamError {
    /// The field (or unknown name) this error is about; `None` for a whole document.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParamError::Unknown { name, .. } => Some(name),
            ParamError::Invalid { field, .. }
            | ParamError::Repeated { field, .. }
            | ParamError::Missing { field, .. }
            | ParamError::File { field, .. } => Some(field),
            ParamError::Document { .. } => None,
        }
    }
}

/// Every problem found while resolving parameters, so a user fixes them all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamErrors(pub Vec<ParamError>);

impl ParamErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ParamError> {
        self.0.iter()
    }
}

impl fmt::Display for ParamErrors {
    /// One problem per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

impl From<ParamError> for ParamErrors {
    fn from(e: ParamError) -> Self {
        ParamErrors(vec![e])
    }
}

/// One source of parameter values. Layers are merged in order, later wins per field
/// (a later list replaces an earlier one whole).
#[derive(Debug, Clone)]
pub struct ParamLayer {
    origin: String,
    base_dir: Option<PathBuf>,
    source: LayerSource,
}

#[derive(Debug, Clone)]
enum LayerSource {
    /// Flags as typed: a list field may repeat and each occurrence may be
    /// comma-separated; a scalar field may appear once.
    Strings(Vec<(String, String)>),
    /// A mapping (from a JSON or YAML document): a value is given once, natively typed
    /// or as a string that parses; an explicit null unsets the field.
    Document(Vec<(String, Input)>),
}

impl ParamLayer {
    /// Command-line values, `(field name, raw string)`; origin "the command line".
    pub fn strings<I, K, V>(raw: I) -> ParamLayer
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        ParamLayer {
            origin: "the command line".into(),
            base_dir: None,
            source: LayerSource::Strings(raw.into_iter().map(|(k, v)| (k.into(), v.into())).collect()),
        }
    }

    /// A parsed JSON (or YAML) object; origin "the parameters file".
    pub fn json(obj: &serde_json::Map<String, serde_json::Value>) -> ParamLayer {
        ParamLayer {
            origin: "the parameters file".into(),
            base_dir: None,
            source: LayerSource::Document(obj.iter().map(|(k, v)| (k.clone(), Input::from_json(v))).collect()),
        }
    }

    /// Parses a YAML or JSON parameters document (`--params FILE`). Scalars keep their
    /// text, so `version: 1.10` for a `str` field stays `1.10`. Origin is `` `name` ``.
    pub fn from_document(name: &str, text: &str) -> Result<ParamLayer, ParamErrors> {
        let origin = format!("`{name}`");
        let fail = |message: String| ParamErrors(vec![ParamError::Document { origin: origin.clone(), message }]);
        let root = yaml::parse(text).map_err(|e| match e.pos {
            Some(p) => fail(format!("{p}: {}", e.describe())),
            None => fail(e.describe()),
        })?;
        let mut entries: Vec<(String, Input)> = Vec::new();
        match root {
            None => {}
            Some(yaml::Node::Map { entries: map, .. }) => {
                let mut seen = std::collections::HashSet::new();
                for (k, v) in &map {
                    let Some(key) = k.as_scalar() else {
                        return Err(fail(format!("{}: expected a parameter name, found {}", k.pos(), k.kind())));
                    };
                    if !seen.insert(key) {
                        return Err(fail(format!("{}: `{key}` is given twice", k.pos())));
                    }
                    entries.push((key.to_string(), crate::spec::input_from_node(v)));
                }
            }
            Some(other) if other.is_null() => {}
            Some(other) => {
                return Err(fail(format!(
                    "{}: expected a mapping from parameter name to value, found {}",
                    other.pos(),
                    other.kind()
                )))
            }
        }
        Ok(ParamLayer { origin, base_dir: None, source: LayerSource::Document(entries) })
    }

    /// How messages name this layer, e.g. "`params.yml`" or "the web form".
    pub fn with_origin(mut self, origin: impl Into<String>) -> ParamLayer {
        self.origin = origin.into();
        self
    }

    /// Relative file paths in this layer are taken relative to `dir` (for a parameters
    /// file: its own directory). Without it they stay as given.
    pub fn with_base_dir(mut self, dir: impl Into<PathBuf>) -> ParamLayer {
        self.base_dir = Some(dir.into());
        self
    }
}

/// Resolved parameters: every declared field, in declaration order.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    values: Vec<(String, Value)>,
}

impl Spec {
    /// Merges `layers` (later wins), fills `initial` defaults, and checks that every
    /// required field has a value. Reports every problem, not just the first.
    pub fn resolve(&self, layers: &[ParamLayer]) -> Result<Params, ParamErrors> {
        let mut errors = Vec::new();
        let mut given: HashMap<&str, Value> = HashMap::new();
        // Fields whose value was refused: already reported, so not "missing" as well.
        let mut refused: HashSet<&str> = HashSet::new();
        let names: Vec<&str> = self.fields().map(|f| f.name.as_str()).collect();
        for layer in layers {
            let entries = match &layer.source {
                LayerSource::Document(entries) => entries.clone(),
                LayerSource::Strings(raw) => self.group_strings(raw, &layer.origin, &mut errors),
            };
            for (name, input) in &entries {
                let Some(field) = self.field(name) else {
                    errors.push(ParamError::Unknown {
                        name: name.clone(),
                        origin: layer.origin.clone(),
                        suggestion: suggest(name, names.iter().copied()).map(str::to_string),
                    });
                    continue;
                };
                match convert(field, input, layer.base_dir.as_deref()) {
                    Ok(v) => {
                        given.insert(field.name.as_str(), v);
                    }
                    Err(invalids) => {
                        refused.insert(field.name.as_str());
                        errors.extend(invalids.into_iter().map(|e| ParamError::Invalid {
                            field: field.name.clone(),
                            ty: field.ty,
                            item: e.item,
                            value: e.value,
                            origin: layer.origin.clone(),
                            expected: e.expected,
                            hint: e.hint,
                        }))
                    }
                }
            }
        }
        let mut values = Vec::new();
        for field in self.fields() {
            // An explicit null (given) unsets the field even when it has an `initial`,
            // as clearing a pre-filled form field does.
            let value = match given.remove(field.name.as_str()) {
                Some(v) => v,
                None => field.initial.clone().unwrap_or(Value::Null),
            };
            if value == Value::Null && field.required && !refused.contains(field.name.as_str()) {
                errors.push(ParamError::Missing { field: field.name.clone(), ty: field.ty });
            }
            values.push((field.name.clone(), value));
        }
        if errors.is_empty() {
            Ok(Params { values })
        } else {
            Err(ParamErrors(errors))
        }
    }

    /// Command-line values only; see [`Spec::resolve`].
    pub fn params_from_strings(&self, raw: &[(String, String)]) -> Result<Params, ParamErrors> {
        self.resolve(&[ParamLayer::strings(raw.iter().cloned())])
    }

    /// A parsed JSON/YAML object only; see [`Spec::resolve`].
    pub fn params_from_json(&self, obj: &serde_json::Map<String, serde_json::Value>) -> Result<Params, ParamErrors> {
        self.resolve(&[ParamLayer::json(obj)])
    }

    /// Turns repeated flags into one input per name: a list accumulates, a scalar may
    /// appear once. Unknown names pass through for the caller to report.
    fn group_strings(
        &self,
        raw: &[(String, String)],
        origin: &str,
        errors: &mut Vec<ParamError>,
    ) -> Vec<(String, Input)> {
        let mut out: Vec<(String, Input)> = Vec::new();
        for (name, s) in raw {
            let is_list = self.field(name).is_some_and(|f| f.ty.is_list());
            let existing = out.iter_mut().find(|(n, _)| n == name);
            match (existing, is_list) {
                (None, true) => {
                    let items = split_items(s);
                    out.push((name.clone(), Input::List(items)));
                }
                (Some((_, Input::List(items))), true) => items.extend(split_items(s)),
                (None, false) => out.push((name.clone(), Input::Scalar(s.clone()))),
                (Some((_, first)), _) => {
                    if self.field(name).is_some() {
                        errors.push(ParamError::Repeated {
                            field: name.clone(),
                            origin: origin.to_string(),
                            first: first.to_string(),
                            second: s.clone(),
                        });
                    }
                }
            }
        }
        out
    }
}

/// `"1,2,3"` as typed on a command line; an empty string is the empty list.
fn split_items(s: &str) -> Vec<Input> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(|p| Input::Scalar(p.to_string())).collect()
    }
}

impl Params {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// `(field name, value)` in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.values.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `/parameters.json` the container reads: one flat object, keys in
    /// declaration order, every field present (`null` when unset), a file as its path
    /// in the container. Two-space indented, one key per line, a list on one line,
    /// floats as serde_json writes them (shortest round-trip, e.g. `0.5`, `3.0`,
    /// `1e-7`), a trailing newline. The same params give the same bytes.
    pub fn container_json(&self) -> Vec<u8> {
        let mut out = String::new();
        if self.values.is_empty() {
            return b"{}\n".to_vec();
        }
        out.push_str("{\n");
        for (i, (name, value)) in self.values.iter().enumerate() {
            out.push_str("  ");
            write_string(&mut out, name);
            out.push_str(": ");
            match value {
                Value::File(host) => write_string(&mut out, &container_path(&placement(name, None, host))),
                Value::List(items) => {
                    out.push('[');
                    for (j, item) in items.iter().enumerate() {
                        if j > 0 {
                            out.push_str(", ");
                        }
                        match item {
                            Value::File(host) => {
                                write_string(&mut out, &container_path(&placement(name, Some(j), host)))
                            }
                            other => write_container_scalar(&mut out, other),
                        }
                    }
                    out.push(']');
                }
                other => write_container_scalar(&mut out, other),
            }
            out.push_str(if i + 1 < self.values.len() { ",\n" } else { "\n" });
        }
        out.push_str("}\n");
        out.into_bytes()
    }

    /// Every host file the container needs: `(host path, path relative to the
    /// param_files directory)`, in declaration order. See the crate docs for the layout.
    pub fn file_placements(&self) -> Vec<(PathBuf, PathBuf)> {
        let mut out = Vec::new();
        for (name, value) in &self.values {
            match value {
                Value::File(host) => out.push((host.clone(), PathBuf::from(placement(name, None, host)))),
                Value::List(items) => {
                    for (j, item) in items.iter().enumerate() {
                        if let Value::File(host) = item {
                            out.push((host.clone(), PathBuf::from(placement(name, Some(j), host))));
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Checks that every file parameter names a regular file (following symbolic links) and
    /// returns `(host path as given, the file it resolves to)` for each, in declaration order.
    /// Every problem is reported, each naming its parameter and path.
    pub fn resolve_files(&self) -> Result<Vec<(PathBuf, PathBuf)>, ParamErrors> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for (name, value) in &self.values {
            let hosts: Vec<&PathBuf> = match value {
                Value::File(host) => vec![host],
                Value::List(items) => {
                    items.iter().filter_map(|i| if let Value::File(h) = i { Some(h) } else { None }).collect()
                }
                _ => continue,
            };
            for host in hosts {
                let problem = match std::fs::canonicalize(host) {
                    Ok(real) => match std::fs::metadata(&real) {
                        Ok(m) if m.is_file() => {
                            out.push((host.clone(), real));
                            continue;
                        }
                        Ok(m) if m.is_dir() => "is a folder; a file parameter takes a file".to_string(),
                        Ok(_) => "is not a regular file".to_string(),
                        Err(e) => format!("cannot be read: {e}"),
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::symlink_metadata(host) {
                        Ok(m) if m.file_type().is_symlink() => {
                            "is a symbolic link to something that does not exist".to_string()
                        }
                        _ => "does not exist".to_string(),
                    },
                    Err(e) => format!("cannot be read: {e}"),
                };
                errors.push(ParamError::File { field: name.clone(), path: host.clone(), problem });
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(ParamErrors(errors))
        }
    }

    /// The parameters' part of a cache key: compact JSON, keys sorted by their UTF-8
    /// bytes, every field present, floats in the canonical form (see the crate docs),
    /// and each file replaced by `{"digest":<file_digest(host)>,"path":<placement>}`.
    /// Host paths never appear, so moving an input file does not change the key;
    /// changing its content or the name the container sees does.
    pub fn canonical_key_json<E>(&self, mut file_digest: impl FnMut(&Path) -> Result<String, E>) -> Result<Vec<u8>, E> {
        let mut sorted: Vec<&(String, Value)> = self.values.iter().collect();
        sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut out = String::from("{");
        for (i, (name, value)) in sorted.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_string(&mut out, name);
            out.push(':');
            match value {
                Value::List(items) => {
                    out.push('[');
                    for (j, item) in items.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        write_canonical(&mut out, name, Some(j), item, &mut file_digest)?;
                    }
                    out.push(']');
                }
                other => write_canonical(&mut out, name, None, other, &mut file_digest)?,
            }
        }
        out.push('}');
        Ok(out.into_bytes())
    }
}

impl<'a> IntoIterator for &'a Params {
    type Item = (&'a str, &'a Value);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a Value)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// Where a file goes under the param_files directory: `<field>` for a `file`,
/// `<field>/<index>/<basename>` for item `index` (0-based) of a `List[file]`.
fn placement(field: &str, index: Option<usize>, host: &Path) -> String {
    match index {
        None => field.to_string(),
        Some(i) => {
            // Parsing guarantees a file name; the fallback only covers hand-built values.
            let base = host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
            format!("{field}/{i}/{base}")
        }
    }
}

fn container_path(placement: &str) -> String {
    format!("{PARAM_FILES_DIR}/{placement}")
}

fn write_container_scalar(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::Float(x) => match serde_json::Number::from_f64(*x) {
            Some(n) => out.push_str(&n.to_string()),
            None => out.push_str("null"),
        },
        Value::Str(s) => write_string(out, s),
        Value::File(p) => write_string(out, &p.to_string_lossy()),
        Value::List(items) => {
            // Lists do not nest in kliko; written for completeness.
            out.push('[');
            for (j, item) in items.iter().enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                write_container_scalar(out, item);
            }
            out.push(']');
        }
    }
}

fn write_canonical<E>(
    out: &mut String,
    field: &str,
    index: Option<usize>,
    v: &Value,
    file_digest: &mut impl FnMut(&Path) -> Result<String, E>,
) -> Result<(), E> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::Float(x) => out.push_str(&canonical_float(*x)),
        Value::Str(s) => write_string(out, s),
        Value::File(host) => {
            out.push_str("{\"digest\":");
            write_string(out, &file_digest(host)?);
            out.push_str(",\"path\":");
            write_string(out, &placement(field, index, host));
            out.push('}');
        }
        Value::List(items) => {
            out.push('[');
            for (j, item) in items.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                write_canonical(out, field, Some(j), item, file_digest)?;
            }
            out.push(']');
        }
    }
    Ok(())
}

/// The canonical float: the shortest decimal digits that read back as the same
/// `f64`, in scientific form `<digits>[.<digits>]e<exponent>` (Rust's `{:e}`):
/// `0.5` → `5e-1`, `3.0` → `3e0`, `1500.25` → `1.50025e3`, `-0.0` → `-0e0`.
pub fn canonical_float(x: f64) -> String {
    format!("{x:e}")
}

/// A JSON string: UTF-8 as is; `"` and `\` escaped; `\b \f \n \r \t` short forms;
/// other control characters below U+0020 as `\u00xx` (lowercase hex).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
#[path = "params_tests.rs"]
mod tests;
