//! The action key's pre-image bytes and digest are pinned: changing either is a format change
//! (bump `ACTION_FORMAT`).

use std::collections::BTreeMap;

use kliko_core::key::{ActionPreimage, ACTION_FORMAT};
use kliko_core::tree::Tree;

fn sample() -> ActionPreimage {
    let mut env = BTreeMap::new();
    env.insert("OUTPUT".to_string(), "/output".to_string());
    env.insert("INPUT".to_string(), "/input".to_string());
    ActionPreimage {
        format: ACTION_FORMAT.to_string(),
        image_id: "sha256:0000000000000000000000000000000000000000000000000000000000000001".into(),
        io: "split".into(),
        cmd: vec!["/kliko".into()],
        env,
        parameters_format: 1,
        parameters: serde_json::json!({"threshold": "5e0", "mode": "amplitude", "note": null}),
        input: Some(Tree::new().digest()),
        salt: None,
    }
}

#[test]
fn golden_preimage_and_key() {
    let p = sample();
    assert_eq!(
        String::from_utf8(p.canonical_bytes()).unwrap(),
        r#"{"cmd":["/kliko"],"env":{"INPUT":"/input","OUTPUT":"/output"},"format":"kliko-action-v1","image_id":"sha256:0000000000000000000000000000000000000000000000000000000000000001","input":"f4069c038369f94c7d0fe580331e5e87650f54860704d7c2c89ce0b9a3ac9dd4","io":"split","parameters":{"mode":"amplitude","note":null,"threshold":"5e0"},"parameters_format":1,"salt":null}"#
    );
    assert_eq!(p.key().to_hex(), GOLDEN_KEY);
}

const GOLDEN_KEY: &str = "485f297bad03ca9a5ca68548b4d6aa75df07b13288e364312a9b7ba8677bb8bd";

#[test]
fn every_field_is_in_the_key() {
    let base = sample().key();
    let mut variants: Vec<(&str, ActionPreimage)> = Vec::new();
    let mut v = sample();
    v.format = "kliko-action-v2".into();
    variants.push(("format", v));
    let mut v = sample();
    v.image_id.push('2');
    variants.push(("image_id", v));
    let mut v = sample();
    v.io = "join".into();
    variants.push(("io", v));
    let mut v = sample();
    v.cmd.push("x".into());
    variants.push(("cmd", v));
    let mut v = sample();
    v.env.insert("K".into(), "V".into());
    variants.push(("env", v));
    let mut v = sample();
    v.parameters_format = 2;
    variants.push(("parameters_format", v));
    let mut v = sample();
    v.parameters["threshold"] = "6e0".into();
    variants.push(("parameters", v));
    let mut v = sample();
    v.input = Some(kliko_core::Digest::of_bytes(b"x"));
    variants.push(("input", v));
    let mut v = sample();
    v.salt = Some("s".into());
    variants.push(("salt", v));
    for (what, v) in variants {
        assert_ne!(v.key(), base, "changing {what} must change the key");
    }
}

#[test]
fn map_order_does_not_matter() {
    let mut a = sample();
    a.parameters = serde_json::from_str(r#"{"b":1,"a":2}"#).unwrap();
    let mut b = sample();
    b.parameters = serde_json::from_str(r#"{"a":2,"b":1}"#).unwrap();
    assert_eq!(a.key(), b.key());
}
