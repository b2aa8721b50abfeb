//! Canonical JSON: object keys sorted by their UTF-8 bytes, no whitespace, strings escaped as
//! `serde_json` escapes them, numbers as `serde_json` prints them.

use serde_json::Value;

pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(v, &mut out);
    out
}

fn write(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&serde_json::to_vec(k).expect("string"));
                out.push(b':');
                write(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(&serde_json::to_vec(other).expect("scalar")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_keys_recursively() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":[1,{"z":null,"y":true}],"c":"x"}}"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":"x","d":[1,{"y":true,"z":null}]},"b":1}"#
        );
    }
}
