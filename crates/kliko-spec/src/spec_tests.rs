use super::*;
use crate::Value;

const EVERY_TYPE_V4: &str = include_str!("../tests/fixtures/every-type-v4.yml");
const SIMULATOR_V2: &str = include_str!("../tests/fixtures/simulator-v2.yml");

fn problems(text: &str) -> Vec<String> {
    match Spec::parse("kliko.yml", text) {
        Ok(spec) => panic!("expected an error, parsed {spec:?}"),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

fn one_problem(text: &str) -> String {
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:#?}");
    p.into_iter().next().unwrap()
}

/// A document with one field of type `ty`, plus whatever that type needs.
fn one_field_doc(version: Option<u8>, ty: FieldType) -> String {
    let mut doc = String::new();
    if let Some(v) = version {
        doc.push_str(&format!("schema_version: {v}\n"));
    }
    if version == Some(2) {
        doc.push_str("name: n\ndescription: d\nauthor: a\ncontainer: o/n\nemail: a@b\n");
    }
    doc.push_str(&format!(
        "io: split\nsections:\n  - name: s\n    description: d\n    fields:\n      - name: f\n        type: {ty}\n"
    ));
    if ty == FieldType::Choice {
        doc.push_str("        choices: {a: A}\n");
    }
    doc
}

#[test]
fn every_version_with_every_type() {
    for version in [Some(2), Some(3), Some(4), None] {
        let v = version.unwrap_or(DEFAULT_SCHEMA_VERSION);
        for ty in FieldType::ALL {
            let result = Spec::parse("kliko.yml", &one_field_doc(version, ty));
            if ty.allowed_in(v) {
                let spec = result.unwrap_or_else(|e| panic!("{ty} in version {v}: {e}"));
                assert_eq!(spec.field("f").unwrap().ty, ty);
                assert_eq!(spec.schema_version, v);
            } else {
                let e = result.expect_err(&format!("{ty} must be rejected in version {v}")).to_string();
                assert!(e.contains(&format!("type `{ty}` in field `f` is not allowed in schema version {v}")), "{e}");
                let line = match version {
                    Some(2) => 13,
                    Some(_) => 8,
                    None => 7,
                };
                assert!(e.starts_with(&format!("`kliko.yml` line {line}, column 15: ")), "{e}");
            }
        }
    }
    // Pin the contract's table.
    let names = |v| FieldType::allowed(v).iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" ");
    assert_eq!(names(2), "choice char float file bool int");
    assert_eq!(names(3), "choice char str float file bool int");
    assert_eq!(names(4), "choice str float file bool int List[int] List[bool] List[file] List[float] List[str]");
}

#[test]
fn fixtures_parse() {
    let spec = Spec::parse("every-type-v4.yml", EVERY_TYPE_V4).unwrap();
    assert_eq!(spec.schema_version, 4);
    assert!(spec.schema_version_declared);
    assert_eq!(spec.io, IoMode::Split);
    assert_eq!(spec.container.as_deref(), Some("kliko/every-type"));
    let names: Vec<&str> = spec.fields().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["mode", "title", "gain", "mask", "verbose", "niter", "sizes", "flags", "inputs", "scales", "tags"]
    );
    let mode = spec.field("mode").unwrap();
    assert_eq!(
        mode.choices.as_deref().unwrap(),
        [("fast".to_string(), "Fast mode".to_string()), ("exact".to_string(), "Exact mode".to_string())]
    );
    assert_eq!(mode.initial, Some(Value::Str("fast".into())));
    assert_eq!(spec.field("verbose").unwrap().initial, Some(Value::Bool(false)));
    assert_eq!(spec.field("niter").unwrap().initial, Some(Value::Int(1000)));
    assert_eq!(
        spec.field("sizes").unwrap().initial,
        Some(Value::List(vec![Value::Int(1), Value::Int(2), Value::Int(3)]))
    );
    assert_eq!(spec.field("scales").unwrap().initial, Some(Value::List(vec![Value::Float(0.5), Value::Float(1000.0)])));
    assert_eq!(spec.field("tags").unwrap().initial, Some(Value::List(vec![])));
    assert!(!spec.field("mask").unwrap().required);
    assert!(spec.field("inputs").unwrap().required);
    assert_eq!(spec.field("title").unwrap().max_length, Some(12));

    let spec = Spec::parse("simulator-v2.yml", SIMULATOR_V2).unwrap();
    assert_eq!(spec.schema_version, 2);
    assert_eq!(spec.io, IoMode::Join);
    assert_eq!(spec.field("ms_dfreq").unwrap().initial, Some(Value::Float(50e3)));
    assert_eq!(spec.field("moresane_tolerance").unwrap().initial, Some(Value::Float(0.75)));
    assert_eq!(spec.field("moresane_accuracy").unwrap().initial, Some(Value::Float(1e-6)));
    assert_eq!(spec.field("add_noise").unwrap().initial, Some(Value::Bool(true)));
    assert!(!spec.field("sefd").unwrap().required, "`required: False` means optional");
}

#[test]
fn parse_file_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kliko.yml");
    std::fs::write(&path, "io: split\ncolour: red\n").unwrap();
    let e = validate_file(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "`{}` line 2, column 1: unknown top-level key `colour` (expected one of: schema_version, \
             name, description, author, container, email, url, io, sections)",
            path.display()
        )
    );
    let missing = dir.path().join("nope.yml");
    let e = validate_file(&missing).unwrap_err();
    assert!(matches!(e, SpecError::Io { .. }));
    assert_eq!(e.to_string(), format!("cannot read `{}`", missing.display()));
}

#[test]
fn version_2_requires_its_keys() {
    let p = problems("schema_version: 2\nio: split\n");
    assert_eq!(
        p,
        ["name", "description", "author", "container", "email"].map(|k| format!(
            "`kliko.yml` line 1, column 1: missing required key `{k}` (required by schema version 2)"
        ))
    );
    // From version 3 on only `io` is required.
    Spec::parse("kliko.yml", "schema_version: 3\nio: split\n").unwrap();
    Spec::parse("kliko.yml", "schema_version: 4\nio: join\n").unwrap();
}

#[test]
fn io_is_required_and_checked() {
    assert_eq!(
        one_problem("schema_version: 3\nname: x\n"),
        "`kliko.yml` line 1, column 1: missing required key `io` (expected `split` or `join`)"
    );
    assert_eq!(
        one_problem("io: joined\n"),
        "`kliko.yml` line 1, column 5: `io` must be `split` or `join`, found `joined`"
    );
}

#[test]
fn absent_schema_version_is_3() {
    let spec = Spec::parse("kliko.yml", "io: split\n").unwrap();
    assert_eq!(spec.schema_version, 3);
    assert!(!spec.schema_version_declared);
    assert!(spec.sections.is_empty());
    // A version 3 document may use `char` and `str` but not lists, and says why.
    Spec::parse("kliko.yml", &one_field_doc(None, FieldType::Char)).unwrap();
    let e = one_problem(&one_field_doc(None, FieldType::ListInt));
    assert!(
        e.contains(
            "not allowed in schema version 3 (the document has no `schema_version`, so it is read as version 3)"
        ),
        "{e}"
    );
}

#[test]
fn char_and_list_by_version() {
    Spec::parse("kliko.yml", &one_field_doc(Some(3), FieldType::Char)).unwrap();
    let e = one_problem(&one_field_doc(Some(4), FieldType::Char));
    assert_eq!(
        e,
        "`kliko.yml` line 8, column 15: type `char` in field `f` is not allowed in schema version 4 \
         (allowed: choice, str, float, file, bool, int, List[int], List[bool], List[file], List[float], List[str]); use `str`"
    );
    Spec::parse("kliko.yml", &one_field_doc(Some(4), FieldType::ListStr)).unwrap();
    let e = one_problem(&one_field_doc(Some(3), FieldType::ListInt));
    assert!(
        e.contains("type `List[int]` in field `f` is not allowed in schema version 3 (allowed: choice, char, str"),
        "{e}"
    );
}

#[test]
fn schema_version_must_be_known() {
    let e = one_problem("schema_version: 5\nio: split\n");
    assert_eq!(e, "`kliko.yml` line 1, column 17: `schema_version` must be 2, 3 or 4, found `5`");
    // With an unknown version, types are not also blamed on the version.
    let doc = one_field_doc(Some(1), FieldType::ListInt);
    assert_eq!(problems(&doc).len(), 1);
}

#[test]
fn unknown_keys_at_every_level_with_place() {
    assert_eq!(
        one_problem("io: split\nauthr: me\n"),
        "`kliko.yml` line 2, column 1: unknown top-level key `authr` (expected one of: schema_version, name, \
         description, author, container, email, url, io, sections); did you mean `author`?"
    );
    assert_eq!(
        one_problem("io: split\nsections:\n  - name: s\n    description: d\n    fields: []\n    extra: 1\n"),
        "`kliko.yml` line 6, column 5: unknown key `extra` in section `s` (expected one of: name, description, fields)"
    );
    let doc = "\
schema_version: 3
io: split
sections:
  - name: main
    description: d
    fields:
      - name: threshold
        colour: red
        type: float
";
    assert_eq!(
        one_problem(doc),
        "`kliko.yml` line 8, column 9: unknown key `colour` in field `threshold` (expected one of: name, type, \
         initial, max_length, choices, label, help_text, required)"
    );
    let doc =
        "io: split\nsections:\n  - name: main\n    description: d\n    fields:\n      - type: int\n        lable: x\n";
    let p = problems(doc);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(
        p[0].starts_with("`kliko.yml` line 6, column 9: field 1 of section `main` is missing required key `name`"),
        "{p:#?}"
    );
    assert!(p[1].contains("line 7, column 9: unknown key `lable` in field 1 of section `main`"), "{p:#?}");
    assert!(p[1].ends_with("did you mean `label`?"), "{p:#?}");
}

#[test]
fn duplicate_keys_are_errors() {
    assert_eq!(
        one_problem("io: split\nio: join\n"),
        "`kliko.yml` line 2, column 1: duplicate key `io` at the top level (first at line 1, column 1)"
    );
}

#[test]
fn duplicate_field_names_across_sections() {
    let doc = "\
io: split
sections:
  - name: first
    description: d
    fields:
      - name: gain
        type: float
  - name: second
    description: d
    fields:
      - name: gain
        type: int
";
    assert_eq!(
        one_problem(doc),
        "`kliko.yml` line 11, column 15: duplicate field name `gain` in section `second`: already declared in \
         section `first` at line 6, column 15"
    );
}

#[test]
fn field_names_must_be_usable_as_paths() {
    let e = one_problem(
        "io: split\nsections:\n  - name: s\n    description: d\n    fields:\n      - {name: a/b, type: file}\n",
    );
    assert!(e.contains("field name `a/b` cannot be used"), "{e}");
}

#[test]
fn metadata_is_checked() {
    let base = "schema_version: 3\nio: split\n";
    let e = one_problem(&format!("{base}email: nobody\n"));
    assert_eq!(e, "`kliko.yml` line 3, column 8: `email` must contain `@`, found `nobody`");
    let e = one_problem(&format!("{base}url: ftp://example.org\n"));
    assert_eq!(e, "`kliko.yml` line 3, column 6: `url` must be an http or https URL, found `ftp://example.org`");
    let e = one_problem(&format!("{base}container: justaname\n"));
    assert_eq!(e, "`kliko.yml` line 3, column 12: `container` must have the form `owner/name`, found `justaname`");
    assert!(one_problem(&format!("{base}container: /name\n")).contains("owner/name"));
    assert!(one_problem(&format!("{base}name: [a, b]\n"))
        .contains("`name` at the top level must be a string, found a list"));
    let ok = format!("{base}email: a@b.org\nurl: HTTPS://example.org/x?y=1\ncontainer: registry/owner/name\n");
    Spec::parse("kliko.yml", &ok).unwrap();
}

#[test]
fn sections_need_name_description_fields() {
    let p = problems("io: split\nsections:\n  - name: s\n");
    assert_eq!(
        p,
        [
            "`kliko.yml` line 3, column 5: section `s` is missing required key `description`",
            "`kliko.yml` line 3, column 5: section `s` is missing required key `fields`",
        ]
    );
    let e = one_problem("io: split\nsections: {a: 1}\n");
    assert_eq!(e, "`kliko.yml` line 2, column 1: `sections` must be a list of sections, found a mapping");
    let e = one_problem("io: split\nsections:\n  - just a string\n");
    assert_eq!(e, "`kliko.yml` line 3, column 5: section 1 must be a mapping, found a scalar");
}

fn field_doc(field_yaml: &str) -> String {
    let mut doc = "schema_version: 4\nio: split\nsections:\n  - name: s\n    description: d\n    fields:\n".to_string();
    for line in field_yaml.lines() {
        doc.push_str("      ");
        doc.push_str(line);
        doc.push('\n');
    }
    doc
}

#[test]
fn type_is_required_and_known() {
    let e = one_problem(&field_doc("- name: x"));
    assert_eq!(e, "`kliko.yml` line 7, column 9: field `x` is missing required key `type`");
    let e = one_problem(&field_doc("- name: x\n  type: integer"));
    assert!(
        e.starts_with(
            "`kliko.yml` line 8, column 15: unknown type `integer` in field `x` (expected one of: choice, str,"
        ),
        "{e}"
    );
    let e = one_problem(&field_doc("- name: x\n  type: List[Int]"));
    assert!(e.ends_with("did you mean `List[int]`?"), "{e}");
}

#[test]
fn choices_rules() {
    let e = one_problem(&field_doc("- name: x\n  type: choice"));
    assert_eq!(e, "`kliko.yml` line 7, column 9: field `x` has type `choice` but no `choices`");
    let e = one_problem(&field_doc("- name: x\n  type: str\n  choices: {a: A}"));
    assert_eq!(e, "`kliko.yml` line 9, column 9: `choices` only applies to `choice` fields; field `x` is `str`");
    let e = one_problem(&field_doc("- name: x\n  type: choice\n  choices: [a, b]"));
    assert!(e.contains("`choices` in field `x` must be a mapping from key to label, found a list"), "{e}");
    let e = one_problem(&field_doc("- name: x\n  type: choice\n  choices: {}"));
    assert!(e.contains("`choices` in field `x` is empty"), "{e}");
    let e = one_problem(&field_doc("- name: x\n  type: choice\n  choices: {a: A, b: B}\n  initial: c"));
    assert_eq!(e, "`kliko.yml` line 10, column 18: invalid `initial` value `c` in field `x`: expected one of `a`, `b`");
    // Keys are text whatever YAML would resolve them to; a missing label is the key.
    let spec = Spec::parse(
        "kliko.yml",
        &field_doc("- name: x\n  type: choice\n  choices: {1: One, yes: , 0.5: half}\n  initial: 1"),
    )
    .unwrap();
    let f = spec.field("x").unwrap();
    assert_eq!(
        f.choices.as_deref().unwrap(),
        [("1".into(), "One".into()), ("yes".into(), "yes".into()), ("0.5".into(), "half".into())]
    );
    assert_eq!(f.initial, Some(Value::Str("1".into())));
}

#[test]
fn max_length_rules() {
    let e = one_problem(&field_doc("- name: x\n  type: str\n  max_length: -1"));
    assert_eq!(
        e,
        "`kliko.yml` line 9, column 21: `max_length` in field `x` must be a non-negative integer, found `-1`"
    );
    let e = one_problem(&field_doc("- name: x\n  type: int\n  max_length: 3"));
    assert!(e.contains("`max_length` only applies to `char`, `str` and `List[str]` fields; field `x` is `int`"), "{e}");
    let e = one_problem(&field_doc("- name: x\n  type: str\n  max_length: 3\n  initial: abcd"));
    assert!(
        e.ends_with("invalid `initial` value `abcd` in field `x`: expected at most 3 characters (this has 4)"),
        "{e}"
    );
    // Characters, not bytes.
    Spec::parse("kliko.yml", &field_doc("- name: x\n  type: str\n  max_length: 3\n  initial: äöü")).unwrap();
    let e = one_problem(&field_doc("- name: x\n  type: List[str]\n  max_length: 2\n  initial: [ab, abc]"));
    assert!(e.contains("invalid `initial` value `abc` (item 2) in field `x`"), "{e}");
}

#[test]
fn required_defaults_to_true() {
    let spec = Spec::parse(
        "kliko.yml",
        &field_doc(
            "- {name: a, type: int}\n- {name: b, type: int, required: false}\n- {name: c, type: int, required: yes}",
        ),
    )
    .unwrap();
    assert!(spec.field("a").unwrap().required, "absent `required` means required");
    assert!(!spec.field("b").unwrap().required);
    assert!(spec.field("c").unwrap().required);
    let e = one_problem(&field_doc("- {name: a, type: int, required: maybe}"));
    assert!(e.contains("`required` in field `a` must be `true` or `false`, found `maybe`"), "{e}");
}

#[test]
fn initial_must_match_the_type() {
    let e = one_problem(&field_doc("- {name: n, type: int, initial: 3.5}"));
    assert_eq!(e, "`kliko.yml` line 7, column 39: invalid `initial` value `3.5` in field `n`: expected an integer");
    let e = one_problem(&field_doc("- {name: b, type: bool, initial: maybe}"));
    assert!(e.contains("expected a boolean"), "{e}");
    let e = one_problem(&field_doc("- {name: x, type: float, initial: .nan}"));
    assert!(e.contains("expected a finite number"), "{e}");
    let e = one_problem(&field_doc("- {name: f, type: file, initial: /etc/passwd}"));
    assert!(e.contains("field `f` has type `file`, which cannot have an `initial` value"), "{e}");
    // Every bad item is reported, each at its own place.
    let p = problems(&field_doc("- {name: l, type: 'List[int]', initial: [1, x, 3.5]}"));
    assert_eq!(
        p,
        [
            "`kliko.yml` line 7, column 51: invalid `initial` value `x` (item 2) in field `l`: expected an integer",
            "`kliko.yml` line 7, column 54: invalid `initial` value `3.5` (item 3) in field `l`: expected an integer",
        ]
    );
    let spec = Spec::parse("kliko.yml", &field_doc("- {name: x, type: float, initial: 3}\n- {name: s, type: str, initial: 007}\n- {name: o, type: str, required: false, initial: ~}")).unwrap();
    assert_eq!(spec.field("x").unwrap().initial, Some(Value::Float(3.0)));
    assert_eq!(spec.field("s").unwrap().initial, Some(Value::Str("007".into())), "text is kept as written");
    assert_eq!(spec.field("o").unwrap().initial, None, "null is absent");
}

#[test]
fn yaml_errors_have_places() {
    let e = one_problem("io: split\nsections: [\n");
    assert!(e.starts_with("`kliko.yml` line 3, column"), "{e}");
    assert!(e.contains("invalid YAML"), "{e}");
    assert_eq!(one_problem(""), "`kliko.yml`: the document is empty (expected a mapping with at least `io`)");
    assert_eq!(one_problem("- a\n- b\n"), "`kliko.yml` line 1, column 1: the document must be a mapping, found a list");
    let e = one_problem("io: split\n---\nio: join\n");
    assert!(e.contains("line 2, column 1: invalid YAML: expected a single YAML document"), "{e}");
}

#[test]
fn all_problems_are_reported_in_order_and_lowercase() {
    let doc = "\
schema_version: 4
io: sideways
email: nobody
sections:
  - name: s
    description: d
    fields:
      - {name: a, type: char}
      - {name: a, type: int, initial: x}
";
    let err = Spec::parse("kliko.yml", doc).unwrap_err();
    let p = err.problems();
    assert_eq!(p.len(), 5, "{err}");
    let lines: Vec<usize> = p.iter().map(|p| p.line.unwrap()).collect();
    assert_eq!(lines, [2, 3, 8, 9, 9]);
    for problem in p {
        assert!(problem.message.starts_with(|c: char| !c.is_uppercase()), "{}", problem.message);
    }
}

#[test]
fn field_type_round_trips() {
    for t in FieldType::ALL {
        assert_eq!(t.to_string().parse::<FieldType>().unwrap(), t);
        assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
    }
    assert_eq!(FieldType::ListFile.item_type(), FieldType::File);
    assert!(FieldType::ListFile.is_file() && FieldType::ListFile.is_list());
    assert_eq!(serde_json::to_string(&IoMode::Join).unwrap(), "\"join\"");
    assert_eq!(serde_json::from_str::<IoMode>("\"split\"").unwrap(), IoMode::Split);
}

#[test]
fn an_alias_bomb_is_one_problem_with_its_line() {
    let mut doc = String::from("io: split\nname: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        doc.push_str(&format!("x{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    let p = one_problem(&doc);
    assert!(p.starts_with("`kliko.yml` line 7, column "), "{p}");
    assert!(p.ends_with("the document is too large once its aliases are expanded: more than 250000 values"), "{p}");
}

#[test]
fn deep_nesting_is_one_problem_with_its_line_even_on_a_small_stack() {
    // About 10 KB: 5,000 nested lists.
    let doc = format!("io: split\nsections:\n  - {}{}\n", "[".repeat(5000), "]".repeat(5000));
    let p = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || one_problem(&doc)).unwrap().join();
    let p = p.expect("no stack overflow");
    assert!(p.starts_with("`kliko.yml` line 3, column "), "{p}");
    assert!(p.ends_with("lists and mappings are nested too deeply: more than 64 levels"), "{p}");
}

#[test]
fn a_file_too_large_is_refused_with_its_name_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kliko.yml");
    let mut doc = String::from("io: split\n");
    while doc.len() < 3 * 1024 * 1024 {
        doc.push_str("# padding padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&path, &doc).unwrap();
    let e = validate_file(&path).unwrap_err();
    assert!(matches!(e, SpecError::Invalid { .. }), "{e:?}");
    assert_eq!(e.to_string(), format!("`{}`: the document is too large: 3.0 MiB, at most 512 KiB", path.display()));
    // The same text handed over directly (as from an image) is refused the same way.
    assert_eq!(one_problem(&doc), "`kliko.yml`: the document is too large: 3.0 MiB, at most 512 KiB");
}

#[test]
fn a_parameters_file_with_an_alias_bomb_is_refused() {
    let mut doc = String::from("a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n");
    for i in 1..10 {
        doc.push_str(&format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    let e = crate::ParamLayer::from_document("params.yml", &doc).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("too large once its aliases are expanded"), "{msg}");
}

/// A small deterministic generator (xorshift64*): property tests without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Pieces of YAML syntax, glued at random: mostly nonsense, often valid, sometimes nested.
const FRAGMENTS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    "- ",
    ": ",
    ", ",
    "&a ",
    "&b ",
    "*a",
    "*b",
    "\n",
    "  ",
    "    ",
    "'",
    "\"",
    "# c",
    "---\n",
    "...\n",
    "? ",
    "!!str ",
    "!x ",
    "|\n",
    ">-\n",
    "x",
    "io",
    "split",
    "sections",
    "fields",
    "name",
    "type",
    "int",
    "List[str]",
    "initial",
    "choices",
    "1",
    "-1.5e3",
    "~",
    "null",
    "\t",
    "%YAML 1.2\n",
    "\\",
    "é",
    "\u{0}",
    "\r\n",
    "schema_version: 4\n",
    "io: join\n",
    "sections:\n  - name: s\n    description: d\n    fields:\n",
];

fn random_doc(rng: &mut Rng) -> String {
    let n = rng.below(120);
    (0..n).map(|_| FRAGMENTS[rng.below(FRAGMENTS.len())]).collect()
}

#[test]
fn arbitrary_text_never_panics_and_is_answered_quickly() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = std::time::Instant::now();
    for _ in 0..3000 {
        let doc = random_doc(&mut rng);
        let _ = Spec::parse("kliko.yml", &doc);
        let _ = crate::ParamLayer::from_document("params.yml", &doc);
    }
    // Random bytes edited into a real document.
    for _ in 0..1000 {
        let mut bytes = EVERY_TYPE_V4.as_bytes().to_vec();
        for _ in 0..=rng.below(4) {
            let at = rng.below(bytes.len());
            let pool = b"[]{}:-&*!|>'\"\n #?,%@`";
            bytes[at] = pool[rng.below(pool.len())];
        }
        let _ = Spec::parse("kliko.yml", &String::from_utf8_lossy(&bytes));
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?}", started.elapsed());
}

#[test]
fn generated_bombs_and_towers_are_always_refused_within_bounds() {
    let mut rng = Rng(42);
    for _ in 0..40 {
        // Aliases of aliases, with random fan-out and depth: refused or small, never huge.
        let fan = 2 + rng.below(30);
        let levels = 2 + rng.below(12);
        let mut doc = format!("io: split\nname: &a0 [{}]\n", vec!["x"; fan].join(", "));
        for i in 1..levels {
            doc.push_str(&format!("k{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); fan].join(", ")));
        }
        let started = std::time::Instant::now();
        let _ = Spec::parse("kliko.yml", &doc);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "fan {fan}, levels {levels}");
        // Towers of random brackets, block and flow mixed.
        let mut tower = String::from("io: split\nsections:\n");
        for d in 0..rng.below(3000) {
            match rng.below(3) {
                0 => tower.push('['),
                1 => tower.push('{'),
                _ => tower.push_str(&format!("\n{}- ", " ".repeat(d % 200))),
            }
        }
        let r =
            std::thread::Builder::new().stack_size(256 * 1024).spawn(move || Spec::parse("kliko.yml", &tower).is_ok());
        assert!(r.unwrap().join().is_ok(), "no stack overflow");
    }
}
