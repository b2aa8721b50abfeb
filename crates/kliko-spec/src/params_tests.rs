use std::collections::HashMap;
use std::convert::Infallible;

use super::*;
use crate::field_flags_help;

const EVERY_TYPE_V4: &str = include_str!("../tests/fixtures/every-type-v4.yml");

fn every_type() -> Spec {
    Spec::parse("every-type-v4.yml", EVERY_TYPE_V4).unwrap()
}

/// A v3 spec with one optional field of each scalar type, for value parsing tests.
fn scalars() -> Spec {
    Spec::parse(
        "kliko.yml",
        "\
io: split
sections:
  - name: s
    description: d
    fields:
      - {name: flag, type: bool, required: false}
      - {name: count, type: int, required: false}
      - {name: ratio, type: float, required: false}
      - {name: label, type: char, max_length: 4, required: false}
      - {name: text, type: str, required: false}
      - {name: output, type: choice, required: false, choices: {img: Image, vis: Visibilities}}
      - {name: model, type: file, required: false}
",
    )
    .unwrap()
}

fn strings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn one(spec: &Spec, name: &str, raw: &str) -> Result<Value, String> {
    spec.params_from_strings(&strings(&[(name, raw)])).map(|p| p.get(name).unwrap().clone()).map_err(|e| e.to_string())
}

#[test]
fn bool_spellings() {
    let spec = scalars();
    for t in ["true", "True", "TRUE", "yes", "Yes", "on", "ON", "1"] {
        assert_eq!(one(&spec, "flag", t), Ok(Value::Bool(true)), "{t}");
    }
    for f in ["false", "False", "no", "NO", "off", "Off", "0"] {
        assert_eq!(one(&spec, "flag", f), Ok(Value::Bool(false)), "{f}");
    }
    assert_eq!(
        one(&spec, "flag", "maybe").unwrap_err(),
        "invalid value `maybe` for `flag` from the command line: expected a boolean \
         (`true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`)"
    );
}

#[test]
fn numbers() {
    let spec = scalars();
    assert_eq!(one(&spec, "count", "42"), Ok(Value::Int(42)));
    assert_eq!(one(&spec, "count", "-7"), Ok(Value::Int(-7)));
    assert_eq!(
        one(&spec, "count", "3.5").unwrap_err(),
        "invalid value `3.5` for `count` from the command line: expected an integer"
    );
    assert!(one(&spec, "count", "99999999999999999999").is_err());
    assert_eq!(one(&spec, "ratio", "3"), Ok(Value::Float(3.0)), "float accepts ints");
    assert_eq!(one(&spec, "ratio", "1e-6"), Ok(Value::Float(1e-6)));
    assert_eq!(one(&spec, "ratio", ".75"), Ok(Value::Float(0.75)));
    for bad in ["nan", "inf", "-infinity", "1e400", "x"] {
        assert_eq!(
            one(&spec, "ratio", bad).unwrap_err(),
            format!("invalid value `{bad}` for `ratio` from the command line: expected a finite number")
        );
    }
}

#[test]
fn strings_and_max_length() {
    let spec = scalars();
    assert_eq!(one(&spec, "label", "abcd"), Ok(Value::Str("abcd".into())));
    assert_eq!(one(&spec, "label", "äöüß"), Ok(Value::Str("äöüß".into())), "characters, not bytes");
    assert_eq!(
        one(&spec, "label", "abcde").unwrap_err(),
        "invalid value `abcde` for `label` from the command line: expected at most 4 characters (this has 5)"
    );
    assert_eq!(one(&spec, "text", ""), Ok(Value::Str(String::new())));
}

#[test]
fn choices_take_keys_and_hint_at_labels() {
    let spec = scalars();
    assert_eq!(one(&spec, "output", "vis"), Ok(Value::Str("vis".into())));
    assert_eq!(
        one(&spec, "output", "Image").unwrap_err(),
        "invalid value `Image` for `output` from the command line: expected one of `img`, `vis`; did you mean `img`?"
    );
    assert_eq!(
        one(&spec, "output", "VIS").unwrap_err(),
        "invalid value `VIS` for `output` from the command line: expected one of `img`, `vis`; did you mean `vis`?"
    );
    assert_eq!(
        one(&spec, "output", "table").unwrap_err(),
        "invalid value `table` for `output` from the command line: expected one of `img`, `vis`"
    );
}

#[test]
fn files_need_a_file_name() {
    let spec = scalars();
    assert_eq!(one(&spec, "model", "sky.fits"), Ok(Value::File("sky.fits".into())));
    assert!(one(&spec, "model", "").unwrap_err().contains("expected a path to a file"));
    assert!(one(&spec, "model", "/").unwrap_err().contains("expected a path to a file"));
    assert!(one(&spec, "model", "a/..").unwrap_err().contains("expected a path to a file"));
    let layer = ParamLayer::strings([("model", "sky.fits")]).with_base_dir("/data");
    let p = spec.resolve(&[layer]).unwrap();
    assert_eq!(p.get("model"), Some(&Value::File("/data/sky.fits".into())));
    let layer = ParamLayer::strings([("model", "/abs/sky.fits")]).with_base_dir("/data");
    let p = spec.resolve(&[layer]).unwrap();
    assert_eq!(p.get("model"), Some(&Value::File("/abs/sky.fits".into())));
}

#[test]
fn optional_fields_may_stay_unset() {
    let p = scalars().params_from_strings(&[]).unwrap();
    assert_eq!(p.len(), 7);
    assert!(p.iter().all(|(_, v)| *v == Value::Null));
    assert_eq!(
        String::from_utf8(p.container_json()).unwrap(),
        "{\n  \"flag\": null,\n  \"count\": null,\n  \"ratio\": null,\n  \"label\": null,\n  \"text\": null,\n  \
         \"output\": null,\n  \"model\": null\n}\n"
    );
}

#[test]
fn required_is_the_default_and_initial_fills_in() {
    let spec = Spec::parse(
        "kliko.yml",
        "io: split\nsections:\n  - name: s\n    description: d\n    fields:\n      - {name: must, type: int}\n      \
         - {name: has_default, type: int, initial: 5}\n      - {name: maybe, type: int, required: false}\n",
    )
    .unwrap();
    let e = spec.params_from_strings(&[]).unwrap_err();
    assert_eq!(e.to_string(), "missing required parameter `must` (`int`, no default)");
    let p = spec.params_from_strings(&strings(&[("must", "1")])).unwrap();
    assert_eq!(
        p.iter().collect::<Vec<_>>(),
        [("must", &Value::Int(1)), ("has_default", &Value::Int(5)), ("maybe", &Value::Null)]
    );
    // A value replaces the default; an explicit null clears it, and then it is missing.
    let p = spec.params_from_strings(&strings(&[("must", "1"), ("has_default", "6")])).unwrap();
    assert_eq!(p.get("has_default"), Some(&Value::Int(6)));
    let obj = serde_json::json!({"must": 1, "has_default": null});
    let e = spec.params_from_json(obj.as_object().unwrap()).unwrap_err();
    assert_eq!(e.to_string(), "missing required parameter `has_default` (`int`, no default)");
}

#[test]
fn lists_comma_separated_and_repeated() {
    let spec = every_type();
    let base = [("inputs", "a.ms"), ("title", "t")];
    let with = |extra: &[(&str, &str)]| {
        let mut raw = strings(&base);
        raw.extend(strings(extra));
        spec.params_from_strings(&raw)
    };
    let p = with(&[("sizes", "4,5"), ("sizes", "6")]).unwrap();
    assert_eq!(p.get("sizes"), Some(&Value::List(vec![Value::Int(4), Value::Int(5), Value::Int(6)])));
    let p = with(&[("sizes", "")]).unwrap();
    assert_eq!(p.get("sizes"), Some(&Value::List(vec![])), "an empty value is the empty list");
    let p = with(&[("flags", "yes,off")]).unwrap();
    assert_eq!(p.get("flags"), Some(&Value::List(vec![Value::Bool(true), Value::Bool(false)])));
    let e = with(&[("sizes", "1,x,3.5")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid value `x` for `sizes` (item 2) from the command line: expected an integer\n\
         invalid value `3.5` for `sizes` (item 3) from the command line: expected an integer"
    );
    let e = with(&[("niter", "1"), ("niter", "2")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`niter` is given more than once from the command line (`1`, then `2`); only list parameters may be repeated"
    );
    // In a document a list is a list; a string is split like a flag.
    let obj = serde_json::json!({"title": "t", "inputs": ["a", "b"], "sizes": "7,8", "scales": [1, "2.5"]});
    let p = spec.params_from_json(obj.as_object().unwrap()).unwrap();
    assert_eq!(p.get("sizes"), Some(&Value::List(vec![Value::Int(7), Value::Int(8)])));
    assert_eq!(p.get("scales"), Some(&Value::List(vec![Value::Float(1.0), Value::Float(2.5)])));
    let obj = serde_json::json!({"title": "t", "inputs": ["a"], "niter": [1, 2]});
    let e = spec.params_from_json(obj.as_object().unwrap()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid value `[1, 2]` for `niter` from the parameters file: expected an integer, not a list"
    );
}

#[test]
fn json_values_native_or_as_strings() {
    let spec = scalars();
    let obj = serde_json::json!({
        "flag": "False", "count": "3", "ratio": 2, "label": 1234, "output": "img", "model": "/x/y.fits"
    });
    let p = spec.params_from_json(obj.as_object().unwrap()).unwrap();
    assert_eq!(p.get("flag"), Some(&Value::Bool(false)));
    assert_eq!(p.get("count"), Some(&Value::Int(3)));
    assert_eq!(p.get("ratio"), Some(&Value::Float(2.0)));
    assert_eq!(p.get("label"), Some(&Value::Str("1234".into())));
    let obj = serde_json::json!({"count": 2.5, "flag": {"a": 1}});
    let e = spec.params_from_json(obj.as_object().unwrap()).unwrap_err();
    assert_eq!(e.0.len(), 2);
}

#[test]
fn unknown_names_suggest_and_all_errors_come_at_once() {
    let spec = scalars();
    let e = spec
        .resolve(&[
            ParamLayer::strings([("conut", "1"), ("flag", "x")]),
            ParamLayer::from_document("params.yml", "ratio: abc\nzzz: 1\n").unwrap(),
        ])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown parameter `conut` from the command line; did you mean `count`?\n\
         invalid value `x` for `flag` from the command line: expected a boolean (`true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`)\n\
         invalid value `abc` for `ratio` from `params.yml`: expected a finite number\n\
         unknown parameter `zzz` from `params.yml`"
    );
    assert_eq!(e.iter().map(|e| e.field().unwrap()).collect::<Vec<_>>(), ["conut", "flag", "ratio", "zzz"]);
    // `-` for `_` and case are forgiven in suggestions: flags are often spelled so.
    let e = spec.params_from_strings(&strings(&[("Out-put", "img")])).unwrap_err();
    assert_eq!(e.to_string(), "unknown parameter `Out-put` from the command line; did you mean `output`?");
}

#[test]
fn later_layers_win() {
    let spec = every_type();
    let file = ParamLayer::from_document("params.yml", "niter: 10\ntitle: '007'\ninputs: [a.ms]\nsizes: [1]\n")
        .unwrap()
        .with_base_dir("/cfg");
    let cli = ParamLayer::strings([("niter", "20"), ("sizes", "2"), ("sizes", "3")]);
    let p = spec.resolve(&[file, cli]).unwrap();
    assert_eq!(p.get("niter"), Some(&Value::Int(20)));
    assert_eq!(p.get("title"), Some(&Value::Str("007".into())), "document text is kept as written");
    assert_eq!(p.get("sizes"), Some(&Value::List(vec![Value::Int(2), Value::Int(3)])), "a later list replaces");
    assert_eq!(p.get("inputs"), Some(&Value::List(vec![Value::File("/cfg/a.ms".into())])));
    assert!(ParamLayer::from_document("p.yml", "- a\n").unwrap_err().to_string().contains("expected a mapping"));
    assert!(ParamLayer::from_document("p.yml", "a: 1\na: 2\n").unwrap_err().to_string().contains("`a` is given twice"));
    assert!(ParamLayer::from_document("p.yml", "").is_ok());
}

fn golden_params() -> Params {
    every_type()
        .params_from_strings(&strings(&[
            ("title", "plot \"one\""),
            ("mask", "/data/masks/mask.fits"),
            ("niter", "50"),
            ("inputs", "/data/a.ms,/data/b.ms"),
            ("tags", "x"),
            ("tags", "y\tz"),
        ]))
        .unwrap()
}

#[test]
fn container_json_golden() {
    let expected = r#"{
  "mode": "fast",
  "title": "plot \"one\"",
  "gain": 0.1,
  "mask": "/param_files/mask",
  "verbose": false,
  "niter": 50,
  "sizes": [1, 2, 3],
  "flags": null,
  "inputs": ["/param_files/inputs/0/a.ms", "/param_files/inputs/1/b.ms"],
  "scales": [0.5, 1000.0],
  "tags": ["x", "y\tz"]
}
"#;
    let bytes = golden_params().container_json();
    assert_eq!(String::from_utf8(bytes.clone()).unwrap(), expected);
    // It is JSON with every declared field, in declaration order.
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 11);
    assert_eq!(
        golden_params().file_placements(),
        [
            ("/data/masks/mask.fits".into(), "mask".into()),
            ("/data/a.ms".into(), "inputs/0/a.ms".into()),
            ("/data/b.ms".into(), "inputs/1/b.ms".into()),
        ]
    );
}

/// Digests by "content": the test's stand-in for hashing the file.
fn digests<'a>(contents: &'a HashMap<PathBuf, &'a str>) -> impl FnMut(&Path) -> Result<String, Infallible> + 'a {
    move |p: &Path| Ok(format!("h({})", contents[p]))
}

#[test]
fn canonical_key_golden() {
    let contents: HashMap<PathBuf, &str> =
        [("/data/masks/mask.fits".into(), "M"), ("/data/a.ms".into(), "A"), ("/data/b.ms".into(), "B")]
            .into_iter()
            .collect();
    let key = golden_params().canonical_key_json(digests(&contents)).unwrap();
    assert_eq!(
        String::from_utf8(key).unwrap(),
        r#"{"flags":null,"gain":1e-1,"inputs":[{"digest":"h(A)","path":"inputs/0/a.ms"},{"digest":"h(B)","path":"inputs/1/b.ms"}],"mask":{"digest":"h(M)","path":"mask"},"mode":"fast","niter":50,"scales":[5e-1,1e3],"sizes":[1,2,3],"tags":["x","y\tz"],"title":"plot \"one\"","verbose":false}"#
    );
    assert_eq!(canonical_float(1500.25), "1.50025e3");
    assert_eq!(canonical_float(3.0), "3e0");
    assert_eq!(canonical_float(-0.0), "-0e0");
    assert_eq!(canonical_float(0.1 + 0.2), "3.0000000000000004e-1");
}

#[test]
fn canonical_key_ignores_order_and_host_paths_but_not_content() {
    let spec = every_type();
    let contents: HashMap<PathBuf, &str> = [
        ("/one/mask.fits".into(), "M"),
        ("/two/elsewhere.fits".into(), "M"),
        ("/one/a.ms".into(), "A"),
        ("/two/a.ms".into(), "A"),
        ("/two/b.ms".into(), "A"),
        ("/one/changed.fits".into(), "M2"),
    ]
    .into_iter()
    .collect();
    let key = |raw: &[(&str, &str)]| {
        let mut raw = strings(raw);
        raw.push(("title".into(), "t".into()));
        let p = spec.params_from_strings(&raw).unwrap();
        String::from_utf8(p.canonical_key_json(digests(&contents)).unwrap()).unwrap()
    };
    let base = key(&[("niter", "5"), ("mask", "/one/mask.fits"), ("inputs", "/one/a.ms"), ("gain", "0.5")]);
    // Order given, and spellings of the same value, do not matter.
    assert_eq!(base, key(&[("gain", "5e-1"), ("inputs", "/one/a.ms"), ("mask", "/one/mask.fits"), ("niter", "+5")]));
    // Where the files live on the host does not matter, nor the name of a `file`
    // field's file (the container sees `/param_files/mask` either way).
    assert_eq!(base, key(&[("niter", "5"), ("mask", "/two/elsewhere.fits"), ("inputs", "/two/a.ms"), ("gain", "0.5")]));
    assert!(!base.contains("/one/"));
    // Content does.
    assert_ne!(base, key(&[("niter", "5"), ("mask", "/one/changed.fits"), ("inputs", "/one/a.ms"), ("gain", "0.5")]));
    // A `List[file]` item's name reaches the container, so it counts.
    assert_ne!(base, key(&[("niter", "5"), ("mask", "/one/mask.fits"), ("inputs", "/two/b.ms"), ("gain", "0.5")]));
    // And so does every value.
    assert_ne!(base, key(&[("niter", "6"), ("mask", "/one/mask.fits"), ("inputs", "/one/a.ms"), ("gain", "0.5")]));
    // A digest error is passed through.
    let p = spec.params_from_strings(&strings(&[("inputs", "/nowhere/x"), ("title", "t")])).unwrap();
    let r: Result<Vec<u8>, String> = p.canonical_key_json(|p| Err(format!("cannot hash `{}`", p.display())));
    assert_eq!(r.unwrap_err(), "cannot hash `/nowhere/x`");
}

#[test]
fn help_lists_fields_by_section() {
    let help = field_flags_help(&every_type());
    let expected = "\
scalars: one value each
  --mode <choice>
      [choices: `fast` (Fast mode), `exact` (Exact mode); default: `fast`]
  --title <str> (required)
      Title: shown on the plot
      [at most 12 characters]
  --gain <float>
      [default: `0.1`]
  --mask <file>
      [optional]
  --verbose <bool>
      [default: `false`]
  --niter <int>
      [default: `1000`]

lists: several values each
  --sizes <List[int]>
      [default: `1,2,3`; repeat the flag or separate items with commas]
  --flags <List[bool]>
      [optional; repeat the flag or separate items with commas]
  --inputs <List[file]> (required)
      [repeat the flag or separate items with commas]
  --scales <List[float]>
      [default: `0.5,1000`; repeat the flag or separate items with commas]
  --tags <List[str]>
      [default: empty; repeat the flag or separate items with commas]
";
    assert_eq!(help, expected);
}

#[test]
fn a_refused_value_is_reported_once_not_also_as_missing() {
    let spec = Spec::parse(
        "kliko.yml",
        "io: split\nsections:\n  - name: s\n    description: d\n    fields:\n      - {name: n, type: int}\n      \
         - {name: m, type: int}\n",
    )
    .unwrap();
    let e = spec.params_from_strings(&strings(&[("n", "ten")])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid value `ten` for `n` from the command line: expected an integer\n\
         missing required parameter `m` (`int`, no default)"
    );
    // A later layer's good value still wins over an earlier bad one.
    let layers = [ParamLayer::strings([("n", "ten"), ("m", "1")]), ParamLayer::strings([("n", "10")])];
    let e = spec.resolve(&layers).unwrap_err();
    assert_eq!(e.0.len(), 1, "the bad value is still reported, and only it: {e}");
    let obj = serde_json::json!({"n": "ten", "m": 1});
    let e = spec.params_from_json(obj.as_object().unwrap()).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
}

#[test]
fn file_parameters_resolve_links_and_name_the_parameter_when_wrong() {
    let spec = Spec::parse(
        "kliko.yml",
        "schema_version: 4\nio: split\nsections:\n  - name: s\n    description: d\n    fields:\n      - {name: calibration, type: file}\n      \
         - {name: extra, type: 'List[file]', required: false}\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("cal.txt");
    std::fs::write(&real, "gain 2\n").unwrap();
    let link = dir.path().join("link.txt");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let p = spec.params_from_strings(&strings(&[("calibration", link.to_str().unwrap())])).unwrap();
    assert_eq!(p.resolve_files().unwrap(), [(link.clone(), std::fs::canonicalize(&real).unwrap())]);

    let missing = dir.path().join("none.txt");
    let dangling = dir.path().join("dangling.txt");
    std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
    let list = format!("{},{}", dangling.display(), dir.path().display());
    let p =
        spec.params_from_strings(&strings(&[("calibration", missing.to_str().unwrap()), ("extra", &list)])).unwrap();
    let e = p.resolve_files().unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "parameter `calibration`: `{}` does not exist\n\
             parameter `extra`: `{}` is a symbolic link to something that does not exist\n\
             parameter `extra`: `{}` is a folder; a file parameter takes a file",
            missing.display(),
            dangling.display(),
            dir.path().display()
        )
    );
    assert_eq!(e.0[0].field(), Some("calibration"));
}
