//! Shared fixtures: a private store, a data folder, tiny test images, and requests sent
//! straight to the router.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use kliko_web::{AppState, ServeConfig};
use tower::ServiceExt;

pub const BOUNDARY: &str = "----klikotestboundary7MA4YWxk";

/// A kliko.yml using every widget, with markup in a label and a description.
pub const FULL_YML: &str = r#"schema_version: 4
name: Web test <b>image</b>
description: Counts <things> & writes them
author: Test Author
io: split
sections:
  - name: main
    description: Main <i>settings</i>
    fields:
      - name: count
        type: int
        label: <script>alert(1)</script>
        help_text: How many "items" to <make>
        initial: 3
      - name: ratio
        type: float
        initial: 0.5
        required: false
      - name: verbose
        type: bool
        initial: false
      - name: mode
        type: choice
        choices: {fast: Fast mode, exact: Exact mode}
        initial: fast
      - name: tag
        type: str
        max_length: 5
        required: false
  - name: extra
    description: More
    fields:
      - name: sizes
        type: List[int]
        initial: [1, 2]
        required: false
      - name: upload
        type: file
        required: false
"#;

/// Writes its parameters, its uploaded file and a marker to /output; logs to both streams.
pub const FULL_SCRIPT: &str = r#"cat /parameters.json > /output/parameters.json
if [ -f /param_files/upload ]; then cat /param_files/upload > /output/upload.txt; fi
mkdir -p /output/sub
echo nested > /output/sub/deep.txt
echo "hello from the container <b>"
echo "a warning line" >&2
"#;

pub fn full_image() -> kliko_testkit::TestImage {
    kliko_testkit::ImageBuilder::new("web")
        .kliko_yml(FULL_YML)
        .kliko_script(FULL_SCRIPT)
        .build()
        .expect("docker build of the test image")
}

pub struct Fixture {
    pub store_dir: tempfile::TempDir,
    pub data: tempfile::TempDir,
    pub state: Arc<AppState>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut ServeConfig)) -> Fixture {
        let store_dir = tempfile::tempdir().expect("tempdir");
        let data = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(kliko_store::Store::open(store_dir.path()).expect("store"));
        let engine = Arc::new(kliko_engine::Engine::new(store));
        let mut config = ServeConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            data_roots: vec![data.path().to_path_buf()],
            ..Default::default()
        };
        f(&mut config);
        let state = AppState::new(engine, &config).expect("state");
        Fixture { store_dir, data, state }
    }

    pub fn data_path(&self) -> PathBuf {
        std::fs::canonicalize(self.data.path()).unwrap()
    }

    pub async fn send(&self, req: Request<Body>) -> Resp {
        let resp = kliko_web::router(self.state.clone()).oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        Resp { status, headers, body: String::from_utf8_lossy(&bytes).into_owned(), bytes: bytes.to_vec() }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Request::get(path).body(Body::empty()).unwrap()).await
    }

    pub async fn post_form(&self, path: &str, parts: &[Part]) -> Resp {
        self.send(multipart_request(path, parts)).await
    }

    /// Submit and wait for the run; returns its id.
    pub async fn run(&self, path: &str, parts: &[Part]) -> String {
        let r = self.post_form(path, parts).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "submission refused: {}", r.body);
        let loc = r.headers[header::LOCATION].to_str().unwrap().to_string();
        let id = loc.strip_prefix("/run/").expect("redirect to the run page").to_string();
        self.state.run(&id).expect("registered run").wait().await;
        id
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub bytes: Vec<u8>,
}

pub enum Part {
    Text(&'static str, String),
    File(&'static str, &'static str, Vec<u8>),
}

pub fn text(name: &'static str, v: impl Into<String>) -> Part {
    Part::Text(name, v.into())
}

pub fn multipart_body(parts: &[Part]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match p {
            Part::Text(n, v) => {
                b.extend_from_slice(format!("Content-Disposition: form-data; name=\"{n}\"\r\n\r\n").as_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            Part::File(n, f, data) => {
                b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{n}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                        .as_bytes(),
                );
                b.extend_from_slice(data);
            }
        }
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

pub fn multipart_request(path: &str, parts: &[Part]) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(Body::from(multipart_body(parts)))
        .unwrap()
}

/// The HTML of the form field block `data-field="name"`.
pub fn field_block<'a>(html: &'a str, name: &str) -> &'a str {
    let start = html.find(&format!("data-field=\"{name}\"")).unwrap_or_else(|| panic!("no field `{name}` in the form"));
    let rest = &html[start..];
    let end = rest[1..].find("data-field=").map(|i| i + 1).unwrap_or(rest.len());
    &rest[..end]
}
