//! End to end in a real browser: Debian's headless `chromium`, driven over the DevTools
//! protocol (a minimal client over a WebSocket), against a real server on 127.0.0.1.
//! Opens a form, fills it, submits, waits for the run to finish, sees the output; submits
//! again and sees the cache-hit badge, then draws the output's lineage and follows a link in
//! it; picks a folder with the folder picker; runs a pipeline and watches its graph. Saves docs/screenshots/{form,run,run-cache-hit,lineage,pipeline,pipeline-run}.png.
//!
//! Needs the `chromium` package (or `KLIKO_CHROMIUM=/path/to/chrome`): without it this test
//! fails, it does not skip.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};
use tokio_tungstenite::tungstenite::Message;

fn chromium_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KLIKO_CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no chromium found: the browser test needs Debian's `chromium` package \
         (`apt-get install -y chromium`), or KLIKO_CHROMIUM=/path/to/chrome"
    );
}

/// The browser process, killed (by its own handle) when the test ends.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch() -> (Browser, String) {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium_binary())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
    // Chromium says where its DevTools endpoint is on stderr.
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    let ws = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(i) = line.find("ws://") {
                    break line[i..].trim().to_string();
                }
                seen.push(line);
            }
            _ => panic!("chromium exited without a DevTools endpoint:\n{}", seen.join("\n")),
        }
    };
    // Keep draining stderr so the browser never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Browser { child, _profile: profile }, ws)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A minimal DevTools protocol client: commands by id, events broadcast.
struct Cdp {
    out: tokio::sync::mpsc::UnboundedSender<String>,
    pending: Pending,
    events: broadcast::Sender<Value>,
    next: AtomicU64,
    session: Mutex<Option<String>>,
}

impl Cdp {
    async fn connect(url: &str) -> Arc<Cdp> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect to chromium's DevTools");
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(1024);
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(Message::Text(m.into())).await.is_err() {
                    break;
                }
            }
        });
        let (p2, e2) = (pending.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(t) = msg else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    if let Some(tx) = p2.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                } else {
                    let _ = e2.send(v);
                }
            }
        });
        Arc::new(Cdp { out, pending, events, next: AtomicU64::new(1), session: Mutex::new(None) })
    }

    async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = self.session.lock().unwrap().clone() {
            msg["sessionId"] = json!(s);
        }
        self.out.send(msg.to_string()).unwrap();
        let v = rx.await.expect("chromium answered");
        if let Some(e) = v.get("error") {
            panic!("{method} failed: {e}");
        }
        v["result"].clone()
    }

    /// Open a page and talk to it from now on.
    async fn open_page(&self) {
        let t = self.call("Target.createTarget", json!({"url": "about:blank"})).await;
        let s = self.call("Target.attachToTarget", json!({"targetId": t["targetId"], "flatten": true})).await;
        *self.session.lock().unwrap() = Some(s["sessionId"].as_str().unwrap().to_string());
        self.call("Page.enable", json!({})).await;
        self.call("Runtime.enable", json!({})).await;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
    }

    /// Wait for the page's next `load` event (subscribe before triggering it).
    async fn next_load(rx: &mut broadcast::Receiver<Value>) {
        loop {
            let v = rx.recv().await.expect("event stream");
            if v["method"] == "Page.loadEventFired" {
                return;
            }
        }
    }

    async fn navigate(&self, url: &str) {
        let mut rx = self.events.subscribe();
        self.call("Page.navigate", json!({"url": url})).await;
        Cdp::next_load(&mut rx).await;
    }

    async fn eval(&self, js: &str) -> Value {
        let r =
            self.call("Runtime.evaluate", json!({"expression": js, "awaitPromise": true, "returnByValue": true})).await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("script failed: {e}\n{js}");
        }
        r["result"]["value"].clone()
    }

    /// Run `js` (which makes the page navigate) and wait for the new page's load.
    async fn eval_then_load(&self, js: &str) {
        let mut rx = self.events.subscribe();
        self.eval(js).await;
        Cdp::next_load(&mut rx).await;
    }

    /// Wait until `cond` (a JS expression) is true, checking after each page load: a
    /// running run's page reloads itself when the run ends.
    async fn wait_until(&self, cond: &str) {
        let mut rx = self.events.subscribe();
        while self.eval(cond).await != json!(true) {
            Cdp::next_load(&mut rx).await;
        }
    }

    /// Until `cond` holds on this page (no load in between): a script's work, such as a fetch.
    async fn poll_until(&self, cond: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.eval(cond).await != json!(true) {
            assert!(std::time::Instant::now() < deadline, "never true: {cond}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&self, path: &Path) {
        let m = self.call("Page.getLayoutMetrics", json!({})).await;
        let h = m["cssContentSize"]["height"].as_f64().unwrap_or(900.0).ceil().max(600.0) as u64;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1100, "height": h, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
    }
}

const DEMO_YML: &str = r#"schema_version: 4
name: Source finder
description: Finds point sources in a radio image above a detection threshold and writes a catalogue.
author: Radio Astronomy Group
io: split
sections:
  - name: detection
    description: How sources are detected.
    fields:
      - name: threshold
        type: float
        label: Detection threshold (sigma)
        help_text: Peaks above this many standard deviations of the noise are sources.
        initial: 5.0
      - name: max_sources
        type: int
        label: Maximum number of sources
        initial: 100
      - name: method
        type: choice
        label: Noise estimate
        choices: {mad: Median absolute deviation, rms: Root mean square}
        initial: mad
      - name: deblend
        type: bool
        label: Separate blended sources
        initial: true
  - name: output
    description: What goes into the catalogue.
    fields:
      - name: catalogue_name
        type: str
        label: Catalogue name
        max_length: 40
        initial: sources
      - name: apertures
        type: List[float]
        label: Aperture radii (arcsec)
        initial: [1.5, 3.0]
      - name: mask
        type: file
        label: Mask
        help_text: Optional FITS mask; masked pixels are ignored.
        required: false
      - name: note
        type: str
        label: <script>alert(1)</script>
        required: false
"#;

const DEMO_SCRIPT: &str = r#"echo "reading input"
ls /input
echo "threshold from parameters:"
grep threshold /parameters.json
cp /parameters.json /output/parameters.json
echo "ra,dec,flux" > /output/catalogue.csv
echo "10.1,-30.2,1.5" >> /output/catalogue.csv
mkdir -p /output/plots
echo "plot" > /output/plots/residuals.txt
echo "3 sources found" >&2
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_fills_the_form_runs_it_and_sees_a_cache_hit() {
    let image = kliko_testkit::ImageBuilder::new("web-browser")
        .kliko_yml(DEMO_YML)
        .kliko_script(DEMO_SCRIPT)
        .build()
        .expect("docker build of the test image");
    let store_dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("observations/field-1")).unwrap();
    std::fs::write(data.path().join("observations/field-1/image.fits"), "SIMPLE = T").unwrap();
    std::fs::create_dir_all(data.path().join("results")).unwrap();
    let store = Arc::new(kliko_store::Store::open(store_dir.path()).unwrap());
    let engine = Arc::new(kliko_engine::Engine::new(store));
    let config = kliko_web::ServeConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        data_roots: vec![data.path().to_path_buf()],
        ..Default::default()
    };
    let server = kliko_web::bind(engine, config).await.expect("bind");
    let base = format!("http://{}", server.local_addr());
    let state = server.state().clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(server.run_until(stop.clone()));

    let (_browser, ws) = launch();
    let cdp = Cdp::connect(&ws).await;
    cdp.open_page().await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots");

    // The image list links to the form.
    cdp.navigate(&format!("{base}/")).await;
    let href: String = serde_json::from_value(
        cdp.eval(&format!("document.querySelector('a[href=\"/image/{}\"]') !== null", image.tag)).await,
    )
    .map(|b: bool| if b { "ok".to_string() } else { String::new() })
    .unwrap();
    assert_eq!(href, "ok", "the image is listed");

    // The form: the hostile label is text, not a script.
    let mut dialogs = cdp.events.subscribe();
    cdp.navigate(&format!("{base}/image/{}", image.tag)).await;
    assert_eq!(cdp.eval("document.body.innerText.includes('<script>alert(1)</script>')").await, json!(true));
    while let Ok(ev) = dialogs.try_recv() {
        assert_ne!(ev["method"], "Page.javascriptDialogOpening", "a script from kliko.yml ran");
    }
    // The list widget turned into one input per item, with an add button.
    assert_eq!(cdp.eval("document.querySelectorAll('input[name=\"p.apertures\"]').length").await, json!(2));
    let input_dir = std::fs::canonicalize(data.path()).unwrap().join("observations/field-1");
    // The folder picker: browse from the data folder down to the input, and use it.
    cdp.eval("document.querySelector('button.browse[data-for=\"folder-input\"]').click()").await;
    let pick = |name: &str| {
        format!("(function () {{ var b = Array.from(document.querySelectorAll('#picker-folder-input button.link')).find(b => b.textContent === '{name}/'); if (b) b.click(); return !!b; }})()")
    };
    cdp.poll_until(&pick("observations")).await;
    cdp.poll_until(&pick("field-1")).await;
    cdp.poll_until("document.querySelector('#picker-folder-input code') && document.querySelector('#picker-folder-input code').textContent.endsWith('/field-1')").await;
    cdp.eval("document.querySelector('#picker-folder-input button.use').click()").await;
    assert_eq!(cdp.eval("document.getElementById('folder-input').value").await, json!(input_dir.display().to_string()));
    assert_eq!(cdp.eval("document.getElementById('picker-folder-input').hidden").await, json!(true));
    let fill = format!(
        r#"(function () {{
  var f = document.getElementById('run-form');
  f.querySelector('[name="input"]').value = {input};
  f.querySelector('[name="output"]').value = 'results/run-1';
  f.querySelector('[name="p.threshold"]').value = '4.5';
  f.querySelector('[name="p.method"]').value = 'rms';
  f.querySelector('[name="p.deblend"]').checked = false;
  f.querySelector('.listfield button.add').click();
  var items = f.querySelectorAll('input[name="p.apertures"]');
  items[items.length - 1].value = '6';
  return items.length;
}})()"#,
        input = json!(input_dir.display().to_string())
    );
    assert_eq!(cdp.eval(&fill).await, json!(3));
    cdp.screenshot(&shots.join("form.png")).await;
    cdp.eval_then_load("document.querySelector('#run-form button.primary').click()").await;
    assert!(cdp.eval("location.pathname").await.as_str().unwrap().starts_with("/run/"));
    cdp.wait_until("document.getElementById('exit-code') !== null").await;
    assert_eq!(cdp.eval("document.getElementById('exit-code').textContent").await, json!("0"));
    let text = cdp.eval("document.body.innerText").await;
    let text = text.as_str().unwrap();
    assert!(text.contains("succeeded") && text.contains("computed"), "{text}");
    assert!(text.contains("catalogue.csv") && text.contains("plots/residuals.txt"), "outputs listed: {text}");
    assert!(text.contains("3 sources found") && text.contains("image.fits"), "logs shown: {text}");
    let written = std::fs::read_to_string(data.path().join("results/run-1/parameters.json")).unwrap();
    let p: Value = serde_json::from_str(&written).unwrap();
    assert_eq!(
        (p["threshold"].clone(), p["method"].clone(), p["deblend"].clone()),
        (json!(4.5), json!("rms"), json!(false))
    );
    assert_eq!(p["apertures"], json!([1.5, 3.0, 6.0]));
    // Follow the link to an output file.
    let csv =
        cdp.eval("fetch(document.querySelector('a[href$=\"/file/catalogue.csv\"]').href).then(r => r.text())").await;
    assert_eq!(csv, json!("ra,dec,flux\n10.1,-30.2,1.5\n"));
    cdp.screenshot(&shots.join("run.png")).await;

    // The same again into another folder: nothing runs, the badge says so.
    cdp.navigate(&format!("{base}/image/{}", image.tag)).await;
    cdp.eval(&fill.replace("results/run-1", "results/run-2")).await;
    cdp.eval_then_load("document.querySelector('#run-form button.primary').click()").await;
    cdp.wait_until("document.getElementById('exit-code') !== null").await;
    assert_eq!(cdp.eval("document.querySelector('#cache .badge').textContent").await, json!("cache hit"));
    assert!(data.path().join("results/run-2/catalogue.csv").is_file());
    cdp.screenshot(&shots.join("run-cache-hit.png")).await;

    // History shows both, as hit and miss.
    cdp.navigate(&format!("{base}/history")).await;
    assert_eq!(cdp.eval("document.querySelectorAll('.badge.hit').length >= 1 && document.querySelectorAll('.badge.miss').length >= 1").await, json!(true));

    // The lineage of the output folder, drawn: input → run → output, each node a link.
    let out_dir = std::fs::canonicalize(data.path()).unwrap().join("results/run-1");
    cdp.navigate(&format!("{base}/provenance?q={}", out_dir.display())).await;
    assert_eq!(cdp.eval("document.querySelectorAll('svg.lineage a rect').length").await, json!(3));
    assert_eq!(cdp.eval("document.querySelectorAll('svg.lineage path[marker-end]').length").await, json!(2));
    // The drawing is laid out left to right: input, run, output.
    let xs = cdp
        .eval("Array.from(document.querySelectorAll('svg.lineage a rect')).map(r => r.getBoundingClientRect().x).sort((a, b) => a - b).map(Math.round)")
        .await;
    let xs: Vec<i64> = serde_json::from_value(xs).unwrap();
    assert!(xs[0] < xs[1] && xs[1] < xs[2], "three layers: {xs:?}");
    cdp.screenshot(&shots.join("lineage.png")).await;
    // Follow the run's node to the run's own provenance page.
    let href = cdp.eval("Array.from(document.querySelectorAll('svg.lineage a')).find(a => a.querySelector('title').textContent.startsWith('run ')).getAttribute('href')").await;
    let href = href.as_str().unwrap().to_string();
    cdp.eval_then_load(&format!("location.href = {}", json!(href))).await;
    assert_eq!(cdp.eval("location.pathname").await, json!(href));
    let text = cdp.eval("document.body.innerText").await;
    assert!(text.as_str().unwrap().contains("run key"), "{text}");

    // A pipeline of two steps of the same image: its graph, a run from the browser, each step
    // done; then the graph says every step would hit.
    std::fs::write(
        data.path().join("reduce.yml"),
        format!(
            "version: 1\nsteps:\n  find:\n    image: {t}\n    input: observations/field-1/\n    params: {{threshold: 3.0}}\n  refine:\n    image: {t}\n    input: find\n    params: {{threshold: 6.0}}\n    output: results/refined\n",
            t = image.tag
        ),
    )
    .unwrap();
    cdp.navigate(&format!("{base}/pipelines")).await;
    cdp.eval_then_load("document.querySelector('#pipelines a').click()").await;
    assert_eq!(cdp.eval("document.querySelectorAll('svg.pipeline-graph g.step').length").await, json!(2));
    assert_eq!(
        cdp.eval("document.getElementById('step-find').getAttribute('class')").await,
        json!("step st-would-run")
    );
    cdp.screenshot(&shots.join("pipeline.png")).await;
    cdp.eval_then_load("document.querySelector('#run-form button.primary').click()").await;
    assert!(cdp.eval("location.pathname").await.as_str().unwrap().starts_with("/pipeline-run/"));
    // The page follows the run live (and reloads itself when it ends: the run is awaited on
    // the server and the page loaded afresh, so no check races that reload).
    let run_path = cdp.eval("location.pathname").await.as_str().unwrap().to_string();
    let id = run_path.trim_start_matches("/pipeline-run/");
    state.pipelines.get(id).expect("the run is registered").wait().await;
    cdp.navigate(&format!("{base}{run_path}")).await;
    assert_eq!(cdp.eval("document.querySelector('#status .badge').textContent").await, json!("succeeded"));
    for step in ["find", "refine"] {
        let class = cdp.eval(&format!("document.getElementById('step-{step}').getAttribute('class')")).await;
        assert_eq!(class, json!("step st-done"), "{step}");
    }
    let text = cdp.eval("document.body.innerText").await;
    assert!(text.as_str().unwrap().contains("[refine] threshold from parameters:"), "{text}");
    assert!(data.path().join("results/refined/catalogue.csv").is_file());
    cdp.screenshot(&shots.join("pipeline-run.png")).await;
    cdp.eval_then_load("document.querySelector('.sub a').click()").await;
    assert_eq!(
        cdp.eval("document.getElementById('step-refine').getAttribute('class')").await,
        json!("step st-would-hit")
    );

    stop.cancel();
    serving.await.unwrap().unwrap();
    drop(_browser);
}
