//! HTTP-level tests of every page and every refusal, through the router (no sockets),
//! against the real Docker daemon with tiny images built here.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::*;

fn csrf(f: &Fixture) -> Part {
    text("csrf", f.state.csrf.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn index_lists_kliko_images_and_skips_others() {
    let image = full_image();
    let plain = kliko_testkit::ImageBuilder::new("web-plain").kliko_script("true").build().expect("build");
    let f = Fixture::new();
    let r = f.get("/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(&format!("href=\"/image/{}\"", image.tag)), "kliko image not listed");
    assert!(r.body.contains("Web test &lt;b&gt;image&lt;/b&gt;"));
    assert!(r.body.contains("Counts &lt;things&gt; &amp; writes them"));
    assert!(r.body.contains("Test Author"));
    assert!(r.body.contains("io <b>split</b>"));
    assert!(!r.body.contains(&plain.tag), "an image without kliko.yml was listed");
    // The second time the image without kliko.yml is not even asked about.
    assert!(f.state.not_kliko.lock().unwrap().contains_key(&plain.id));
    assert_eq!(f.get("/").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn form_has_a_widget_per_type_and_escapes_kliko_yml() {
    let image = full_image();
    let f = Fixture::new();
    let r = f.get(&format!("/image/{}", image.tag)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let html = &r.body;
    // Nothing from kliko.yml is rendered as markup.
    assert!(!html.contains("<script>alert(1)</script>"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("How many &quot;items&quot; to &lt;make&gt;"));
    assert!(html.contains("Main &lt;i&gt;settings&lt;/i&gt;"));
    assert!(!html.contains("<b>image</b>"));
    // Our own scripts carry the nonce the Content-Security-Policy allows; no other script tag.
    let csp = r.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    let nonce = csp.split("'nonce-").nth(1).unwrap().split('\'').next().unwrap();
    assert!(html.contains(&format!("<script nonce=\"{nonce}\">")), "the picker's script carries it");
    assert_eq!(html.matches("<script").count(), html.matches(&format!("<script nonce=\"{nonce}\">")).count());
    assert_eq!(r.headers[header::X_FRAME_OPTIONS], "DENY");
    // A fresh nonce for every response: one seen in a page is worth nothing for the next.
    let again = f.get(&format!("/image/{}", image.tag)).await;
    let csp2 = again.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    let nonce2 = csp2.split("'nonce-").nth(1).unwrap().split('\'').next().unwrap();
    assert_ne!(nonce, nonce2);
    assert!(again.body.contains(&format!("<script nonce=\"{nonce2}\">")) && !again.body.contains(nonce));

    let count = field_block(html, "count");
    assert!(count.contains("type=\"number\" step=\"1\"") && count.contains("value=\"3\""), "{count}");
    assert!(count.contains("class=\"req\""), "required int is marked: {count}");
    let ratio = field_block(html, "ratio");
    assert!(ratio.contains("step=\"any\"") && ratio.contains("value=\"0.5\"") && !ratio.contains("class=\"req\""));
    let verbose = field_block(html, "verbose");
    assert!(verbose.contains("type=\"checkbox\"") && !verbose.contains("checked"));
    let mode = field_block(html, "mode");
    assert!(mode.contains("<select") && mode.contains("<option value=\"fast\" selected>Fast mode</option>"));
    assert!(mode.contains("<option value=\"exact\">Exact mode</option>"));
    let tag = field_block(html, "tag");
    assert!(tag.contains("maxlength=\"5\""));
    let sizes = field_block(html, "sizes");
    assert!(sizes.contains("<textarea") && sizes.contains("name=\"csv.sizes\"") && sizes.contains("1, 2"), "{sizes}");
    let upload = field_block(html, "upload");
    assert!(upload.contains("type=\"file\"") && upload.contains("name=\"f.upload\""));
    assert!(html.contains("class=\"listfield\"") && html.contains("+ add"), "the list widget's script is there");
    // Folders: input and output, suggestions from the data root.
    assert!(html.contains("name=\"input\"") && html.contains("name=\"output\"") && !html.contains("name=\"work\""));
    assert!(html.contains(&format!("<option value=\"{}\">", f.data_path().display())));
    // The CSRF secret is the first field.
    let form = &html[html.find("<form method=\"post\"").unwrap()..];
    assert!(form.find("name=\"csrf\"").unwrap() < form.find("name=\"input\"").unwrap());

    // A join image asks for a work folder instead.
    let join = kliko_testkit::ImageBuilder::new("web-join")
        .kliko_yml("schema_version: 3\nio: join\nsections: []\n")
        .kliko_script("true")
        .build()
        .expect("build");
    let r = f.get(&format!("/image/{}", join.tag)).await;
    assert!(r.body.contains("name=\"work\"") && !r.body.contains("name=\"input\""));
    // Unknown images and images without kliko.yml are 404.
    assert_eq!(f.get("/image/kliko-test-no-such-image:nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_values_are_shown_beside_their_fields_with_the_users_values() {
    let image = full_image();
    let f = Fixture::new();
    let path = format!("/image/{}", image.tag);
    let r = f
        .post_form(
            &path,
            &[
                csrf(&f),
                text("p.count", "abc"),
                text("p.ratio", "0.25"),
                text("p.mode", "slow"),
                text("p.tag", "toolong"),
                text("csv.sizes", "1, x"),
                text("p.verbose", "true"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let html = &r.body;
    let count = field_block(html, "count");
    assert!(count.contains("class=\"error\"") && count.contains("invalid value `abc` for `count`"), "{count}");
    assert!(count.contains("value=\"abc\""), "the user's value is kept");
    assert!(field_block(html, "tag").contains("at most 5 characters"));
    assert!(field_block(html, "mode").contains("class=\"error\""));
    assert!(field_block(html, "sizes").contains("item 2"));
    assert!(field_block(html, "sizes").contains("1, x"));
    assert!(!field_block(html, "ratio").contains("class=\"error\""));
    assert!(field_block(html, "ratio").contains("value=\"0.25\""));
    assert!(field_block(html, "verbose").contains("checked"));
    // A cleared required field is missing, as on the command line.
    let r = f.post_form(&path, &[csrf(&f), text("p.count", ""), text("p.mode", "fast")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(field_block(&r.body, "count").contains("missing required parameter `count`"));
    assert!(f.state.runs.all().is_empty(), "nothing ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_are_kept_when_the_form_comes_back_with_errors() {
    let image = full_image();
    let f = Fixture::new();
    let path = format!("/image/{}", image.tag);
    std::fs::create_dir(f.data.path().join("in")).unwrap();
    let parts = |count: &str| {
        vec![
            csrf(&f),
            text("input", "in"),
            text("output", "out"),
            text("p.count", count.to_string()),
            text("p.mode", "exact"),
            Part::File("f.upload", "calib.txt", b"the calibration table".to_vec()),
        ]
    };
    let r = f.post_form(&path, &parts("abc")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        field_block(&r.body, "upload").contains("Kept from your last submission: <code>calib.txt</code>"),
        "{}",
        r.body
    );
    let token = r
        .body
        .split("name=\"kept\" value=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .expect("a kept token")
        .to_string();

    // Corrected, with no file chosen this time: the kept one is used.
    let resubmit = vec![
        csrf(&f),
        text("kept", token.clone()),
        text("input", "in"),
        text("output", "out"),
        text("p.count", "3"),
        text("p.mode", "exact"),
    ];
    let id = f.run(&path, &resubmit).await;
    let st = f.state.run(&id).unwrap().snapshot();
    assert!(st.report.is_some(), "run failed: {:?}", st.error);
    assert_eq!(std::fs::read_to_string(f.data_path().join("out/upload.txt")).unwrap(), "the calibration table");
    // A token is good for one submission.
    let again = vec![
        csrf(&f),
        text("kept", token),
        text("input", "in"),
        text("output", "out2"),
        text("p.count", "x"),
        text("p.mode", "exact"),
    ];
    let r = f.post_form(&path, &again).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!r.body.contains("Kept from your last submission"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_shows_logs_and_outputs_and_the_same_run_is_a_cache_hit() {
    let image = full_image();
    let f = Fixture::new();
    let path = format!("/image/{}", image.tag);
    std::fs::create_dir(f.data.path().join("in")).unwrap();
    std::fs::write(f.data.path().join("in/a.txt"), "input data").unwrap();
    let parts = |out: &str| {
        vec![
            csrf(&f),
            text("input", "in"),
            text("output", out.to_string()),
            text("p.count", "7"),
            text("p.ratio", "0.25"),
            text("p.verbose", "true"),
            text("p.mode", "exact"),
            text("p.tag", "abc"),
            text("listjs.sizes", "1"),
            text("p.sizes", "4"),
            text("p.sizes", ""),
            text("p.sizes", "5"),
            Part::File("f.upload", "my data.txt", b"uploaded bytes".to_vec()),
        ]
    };
    let id = f.run(&path, &parts("out1")).await;
    let st = f.state.run(&id).unwrap().snapshot();
    let report = st.report.as_ref().unwrap_or_else(|| panic!("run failed: {:?}", st.error));
    assert_eq!(report.exit_code, 0);
    let out = f.data_path().join("out1");
    let params: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("parameters.json")).unwrap()).unwrap();
    assert_eq!(params["count"], 7);
    assert_eq!(params["ratio"], 0.25);
    assert_eq!(params["verbose"], true);
    assert_eq!(params["mode"], "exact");
    assert_eq!(params["sizes"], serde_json::json!([4, 5]));
    assert_eq!(params["upload"], "/param_files/upload");
    assert_eq!(std::fs::read_to_string(out.join("upload.txt")).unwrap(), "uploaded bytes");

    let page = f.get(&format!("/run/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("succeeded"));
    assert!(page.body.contains("id=\"exit-code\">0<"));
    assert!(page.body.contains("computed"));
    assert!(page.body.contains("hello from the container &lt;b&gt;"), "logs are shown, escaped");
    assert!(page.body.contains("<span class=\"err\">a warning line"));
    assert!(page.body.contains(&format!("href=\"/run/{id}/file/sub/deep.txt\"")));
    assert!(page.body.contains(&format!("/provenance/{}", report.key)));
    // Downloads come from the store; traversal finds nothing.
    let file = f.get(&format!("/run/{id}/file/sub/deep.txt")).await;
    assert_eq!((file.status, file.body.as_str()), (StatusCode::OK, "nested\n"));
    assert!(file.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("sandbox"));
    let json = f.get(&format!("/run/{id}/file/parameters.json")).await;
    assert_eq!(json.headers[header::CONTENT_TYPE], "application/json");
    for bad in ["../../etc/passwd", "sub/../parameters.json", "%2e%2e/%2e%2e/etc/passwd", "nope.txt"] {
        assert_eq!(f.get(&format!("/run/{id}/file/{bad}")).await.status, StatusCode::NOT_FOUND, "{bad}");
    }
    // The live stream of a finished run replays its logs and ends.
    let events = f.get(&format!("/run/{id}/events")).await;
    assert_eq!(events.headers[header::CONTENT_TYPE], "text/event-stream");
    assert!(events.body.contains("event: log") && events.body.contains("hello from the container"));
    assert!(events.body.trim_end().ends_with("event: done\ndata: {}"), "{}", events.body);

    // The same run again (another output folder, the same upload content): a cache hit.
    let id2 = f.run(&path, &parts("out2")).await;
    let st2 = f.state.run(&id2).unwrap().snapshot();
    assert_eq!(st2.report.as_ref().unwrap().cache, kliko_engine::Cache::Hit);
    assert_eq!(st2.key, st.key);
    let page2 = f.get(&format!("/run/{id2}")).await;
    assert!(page2.body.contains("badge hit\">cache hit"), "{}", page2.body);
    assert_eq!(std::fs::read_to_string(f.data_path().join("out2/sub/deep.txt")).unwrap(), "nested\n");

    // The first run of the image had nothing earlier to compare with; a run that differs in
    // one parameter says which, beside the nearest earlier run.
    assert!(page.body.contains("id=\"why\"") && page.body.contains("its first run"), "{}", page.body);
    let mut other = parts("out3");
    other[3] = text("p.count", "8");
    let id3 = f.run(&path, &other).await;
    let page3 = f.get(&format!("/run/{id3}")).await;
    assert!(page3.body.contains("differs in:"), "{}", page3.body);
    assert!(page3.body.contains("<li><code>parameters.count: 7 → 8</code></li>"), "{}", page3.body);
    assert!(page3.body.contains(&format!("href=\"/provenance/{}\"", report.key)), "the nearest run is a link");
    assert!(!page2.body.contains("id=\"why\""), "a hit has nothing to explain");

    // History lists both; provenance of the key and of the output tree shows the run.
    let key = report.key.to_hex();
    let hist = f.get("/history").await;
    assert!(hist.body.matches(&format!("/provenance/{key}")).count() >= 2, "{}", hist.body);
    assert!(hist.body.contains("badge hit") && hist.body.contains("badge miss"));
    let prov = f.get(&format!("/provenance/{}", &key[..10])).await;
    assert_eq!(prov.status, StatusCode::OK);
    assert!(prov.body.contains(&image.tag) && prov.body.contains(&image.id));
    assert!(prov.body.contains("&quot;count&quot;: 7"), "parameters given are shown");
    assert!(prov.body.contains(&f.data_path().join("in").display().to_string()), "input path");
    let out_tree = report.output.unwrap().to_hex();
    let prov = f.get(&format!("/provenance/{out_tree}")).await;
    assert!(prov.body.contains("produced by") && prov.body.contains(&key[..16]));
    // The lineage drawn: the input, the run and the output, each a link; the tree asked about outlined.
    assert!(prov.body.contains("<svg") && prov.body.contains("class=\"lineage\""), "{}", prov.body);
    assert!(prov.body.contains(&format!("<a href=\"/provenance/{key}\">")), "the run links to its page");
    assert!(prov.body.contains(&format!("<a href=\"/provenance/{out_tree}\"><title>tree {out_tree}</title><rect")));
    assert_eq!(prov.body.matches("stroke=\"#c2410c\"").count(), 1, "only the tree asked about is outlined");
    // The lineage as an RO-Crate, to download, zipped.
    assert!(prov.body.contains(&format!("href=\"/provenance-crate/{out_tree}\" download")));
    let c = f.get(&format!("/provenance-crate/{out_tree}")).await;
    assert_eq!(c.status, StatusCode::OK);
    let name = format!("kliko-provenance-{}.zip", &out_tree[..16]);
    let text = crate_metadata(&c, &name);
    assert!(text.contains(&key) && text.contains(&out_tree) && text.contains(&image.id), "{text}");
    assert_eq!(f.get("/provenance-crate/abc").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(f.get(&format!("/provenance-crate/{}", "0".repeat(64))).await.status, StatusCode::NOT_FOUND);
    let q = f.get(&format!("/provenance?q={}", &key[..8])).await;
    assert_eq!(q.status, StatusCode::SEE_OTHER);
    let log = f.get(&format!("/result/{key}/log/stdout")).await;
    assert_eq!(log.body, "hello from the container <b>\n");
    assert_eq!(log.headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    let files = f.get(&format!("/result/{key}/files")).await;
    assert!(files.body.contains(&format!("/result/{key}/file/upload.txt")));
    assert_eq!(f.get(&format!("/result/{key}/file/upload.txt")).await.body, "uploaded bytes");
    assert!(f.get("/provenance/zz").await.body.contains("at least 8 hexadecimal"));
    assert!(f.get("/provenance/abcdef0123").await.body.contains("no stored run"));
    // A path inside a data folder: its digest, then the run that made it.
    let out1 = f.data_path().join("out1");
    let by_path = f.get(&format!("/provenance?q={}", out1.display())).await;
    assert_eq!(by_path.status, StatusCode::SEE_OTHER);
    let loc = by_path.headers[header::LOCATION].to_str().unwrap().to_string();
    let by_path = f.get(&loc).await;
    assert!(by_path.body.contains(&out_tree) && by_path.body.contains("produced by"), "{}", by_path.body);
    // A path elsewhere is never hashed.
    assert!(f.get("/provenance/%2Fetc%2Fpasswd").await.body.contains("outside the data folders"));
}

#[tokio::test(flavor = "multi_thread")]
async fn posts_without_the_csrf_secret_are_refused() {
    let image = full_image();
    let f = Fixture::new();
    let path = format!("/image/{}", image.tag);
    let r = f.post_form(&path, &[text("p.count", "1")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = f.post_form(&path, &[text("csrf", "0".repeat(64)), text("p.count", "1")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Not first: refused too (nothing is read before the secret).
    let r = f.post_form(&path, &[text("p.count", "1"), csrf(&f)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(f.state.runs.all().is_empty());
    // Cancelling needs it as well.
    let id = f.run(&path, &[csrf(&f)]).await;
    let req = Request::post(format!("/run/{id}/cancel"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("csrf=wrong"))
        .unwrap();
    assert_eq!(f.send(req).await.status, StatusCode::FORBIDDEN);
    let req = Request::post(format!("/run/{id}/cancel"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("csrf={}", f.state.csrf)))
        .unwrap();
    assert_eq!(f.send(req).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread")]
async fn off_loopback_every_request_needs_the_token() {
    // No token given for a non-loopback address: one is generated.
    let f = Fixture::with(|c| c.bind = "0.0.0.0:0".parse().unwrap());
    let token = f.state.token.clone().expect("a generated token");
    assert!(token.len() >= 32);
    for path in ["/", "/history", "/provenance", "/image/x", "/run/x", "/run/x/events", "/result/x/files", "/nope"] {
        let r = f.get(path).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!r.body.contains(&token));
    }
    let r = f.post_form("/image/x", &[text("csrf", f.state.csrf.clone())]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.get("/history?token=wrong").await.status, StatusCode::UNAUTHORIZED);
    // The right token once: a cookie, and the token leaves the address.
    let r = f.get(&format!("/history?a=1&token={token}")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.headers[header::LOCATION], "/history?a=1");
    let cookie = r.headers[header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains(&token), "the cookie holds a derived value, not the token");
    let pair = cookie.split(';').next().unwrap().to_string();
    let req = Request::get("/history").header(header::COOKIE, format!("other=1; {pair}")).body(Body::empty()).unwrap();
    assert_eq!(f.send(req).await.status, StatusCode::OK);
    let req = Request::get("/history").header(header::COOKIE, "kliko_auth=forged").body(Body::empty()).unwrap();
    assert_eq!(f.send(req).await.status, StatusCode::UNAUTHORIZED);

    // A given token is used as given; loopback without one needs none.
    let g = Fixture::with(|c| {
        c.bind = "0.0.0.0:0".parse().unwrap();
        c.token = Some("s3cret/+?".into());
    });
    assert_eq!(g.get("/history?token=s3cret%2F%2B%3F").await.status, StatusCode::SEE_OTHER);
    let h = Fixture::new();
    assert!(h.state.token.is_none());
    assert_eq!(h.get("/history").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn folders_outside_the_data_roots_are_refused() {
    let image = full_image();
    let f = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), f.data.path().join("link-out")).unwrap();
    std::fs::create_dir(f.data.path().join("full")).unwrap();
    std::fs::write(f.data.path().join("full/x"), "x").unwrap();
    let path = format!("/image/{}", image.tag);
    for (input, output, bad_field, msg) in [
        ("../", "", "input", "outside the data folders"),
        ("/etc", "", "input", "outside the data folders"),
        ("link-out", "", "input", "outside the data folders"),
        ("", "link-out/new", "output", "outside the data folders"),
        ("", "../../tmp/x", "output", "outside the data folders"),
        ("", "new/../../x", "output", ""),
        ("missing", "", "input", "no such folder"),
        ("", "full", "output", "not empty"),
        ("", "full/x", "output", "not a folder"),
    ] {
        let r = f.post_form(&path, &[csrf(&f), text("input", input), text("output", output)]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{input} {output}");
        let block = field_block(&r.body, &format!("folder:{bad_field}"));
        assert!(block.contains("class=\"error\"") && block.contains(msg), "{input} {output}: {block}");
    }
    assert!(f.state.runs.all().is_empty(), "nothing ran");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing was written outside");
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_over_the_limit_are_refused() {
    let image = full_image();
    let f = Fixture::with(|c| c.upload_limit = 4096);
    let path = format!("/image/{}", image.tag);
    let r = f.post_form(&path, &[csrf(&f), Part::File("f.upload", "big.bin", vec![7u8; 64 * 1024])]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert!(f.state.runs.all().is_empty());
    // A small one is fine.
    let r = f.post_form(&path, &[csrf(&f), Part::File("f.upload", "small.bin", vec![7u8; 100])]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let id = r.headers[header::LOCATION].to_str().unwrap().trim_start_matches("/run/").to_string();
    f.state.run(&id).unwrap().wait().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_that_do_not_exist_are_404() {
    let f = Fixture::new();
    assert_eq!(f.get("/run/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(f.get("/run/nope/events").await.status, StatusCode::NOT_FOUND);
    assert_eq!(f.get("/result/xyz/files").await.status, StatusCode::NOT_FOUND);
    assert_eq!(f.get(&format!("/result/{}/log/stdout", "ab".repeat(32))).await.status, StatusCode::NOT_FOUND);
    assert_eq!(f.get("/elsewhere").await.status, StatusCode::NOT_FOUND);
    let h = f.get("/history").await;
    assert!(h.body.contains("Nothing has run yet"));
}

/// Nine levels of ten aliases: 10^9 scalars once expanded, a few hundred bytes written.
fn alias_bomb_yml() -> String {
    let mut s = String::from("io: split\nname: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        s.push_str(&format!("x{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn images_with_a_bomb_or_deeply_nested_kliko_yml_get_their_own_row_and_the_server_goes_on() {
    let good = full_image();
    let bomb = kliko_testkit::ImageBuilder::new("web-bomb").kliko_yml(&alias_bomb_yml()).build().expect("build");
    // About 10 KB: 5,000 nested lists.
    let deep_yml = format!("io: split\nsections: {}{}\n", "[".repeat(5000), "]".repeat(5000));
    let deep = kliko_testkit::ImageBuilder::new("web-deep").kliko_yml(&deep_yml).build().expect("build");
    let f = Fixture::new();
    let r = f.get("/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(&format!("href=\"/image/{}\"", good.tag)), "the good image is listed");
    let row = |tag: &str| {
        let start =
            r.body.find(&format!("<tr><td><code>{tag}</code></td>")).unwrap_or_else(|| panic!("no row for {tag}"));
        let rest = &r.body[start..];
        rest[..rest.find("</tr>").unwrap()].to_string()
    };
    let b = row(&bomb.tag);
    assert!(b.contains("line 7") && b.contains("too large once its aliases are expanded"), "{b}");
    let d = row(&deep.tag);
    assert!(d.contains("line 2") && d.contains("nested too deeply: more than 64 levels"), "{d}");
    // Their form pages say the same, and the server still answers everything else.
    let r = f.get(&format!("/image/{}", bomb.tag)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("too large once its aliases are expanded"), "{}", r.body);
    assert_eq!(f.get("/").await.status, StatusCode::OK);
    assert_eq!(f.get(&format!("/image/{}", good.tag)).await.status, StatusCode::OK);
    assert_eq!(f.get("/history").await.status, StatusCode::OK);
}

/// An image that copies its input to its output and adds its `tag` parameter as a file.
fn step_image() -> kliko_testkit::TestImage {
    kliko_testkit::ImageBuilder::new("webpipe")
        .kliko_yml(
            "schema_version: 3\nio: split\nsections:\n  - name: main\n    description: knobs\n    fields:\n      - {name: tag, type: str, initial: x}\n",
        )
        .kliko_script(
            "cp -r /input/. /output/\ntag=$(sed -n 's/.*\"tag\": *\"\\([^\"]*\\)\".*/\\1/p' /parameters.json)\necho \"$tag\" >> /output/tags.txt\necho \"step says $tag\"\n",
        )
        .build()
        .expect("docker build of the test image")
}

fn urlencoded(path: &str, body: String) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap()
}

/// Run the pipeline whose page is `page_path` from its form; wait for it; its run id.
async fn start_pipeline(f: &Fixture, page_path: &str) -> String {
    let r = f.send(urlencoded(page_path, format!("csrf={}&executor=local&jobs=2", f.state.csrf))).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let loc = r.headers[header::LOCATION].to_str().unwrap().to_string();
    let id = loc.strip_prefix("/pipeline-run/").unwrap().to_string();
    f.state.pipelines.get(&id).unwrap().wait().await;
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelines_are_listed_drawn_run_live_and_kept_in_their_history() {
    let image = step_image();
    let f = Fixture::new();
    let data = f.data_path();
    std::fs::create_dir_all(data.join("in")).unwrap();
    std::fs::write(data.join("in/obs.txt"), "visibilities\n").unwrap();
    std::fs::create_dir_all(data.join("pipes")).unwrap();
    let yml = format!(
        "version: 1\nsteps:\n  first:\n    image: {t}\n    input: ../in/\n    params: {{tag: a}}\n  second:\n    image: {t}\n    input: first\n    params: {{tag: b}}\n    output: ../out/final\n",
        t = image.tag
    );
    let file = data.join("pipes/pipeline.yml");
    std::fs::write(&file, &yml).unwrap();
    let page_path = format!("/pipeline{}", file.display());

    let list = f.get("/pipelines").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.body.contains(&format!("href=\"{page_path}\"")), "{}", list.body);
    assert!(list.body.contains("<code>first</code> → <code>second</code>"), "{}", list.body);

    // Before any run: the first step would run, the second cannot be known yet.
    let before = f.get(&page_path).await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.body);
    assert!(before.body.contains("class=\"pipeline-graph\""), "{}", before.body);
    assert!(before.body.contains("<g id=\"step-first\" class=\"step st-would-run\">"), "{}", before.body);
    assert!(before.body.contains("<g id=\"step-second\" class=\"step st-unknown\">"), "{}", before.body);
    assert!(before.body.contains("id=\"run-form\"") && before.body.contains("has not run yet"));

    // No CSRF secret, no run.
    let r = f.send(urlencoded(&page_path, "executor=local".into())).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(f.state.pipelines.all().is_empty());
    // The cluster needs a shared tier, which this server has not: said in the page's words.
    let r = f.send(urlencoded(&page_path, format!("csrf={}&executor=slurm", f.state.csrf))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("needs a cache shared by its machines") && !r.body.contains("--remote"), "{}", r.body);
    // Raw Slurm options are not taken from the browser (they could write anywhere).
    let raw = data.join("pipes/raw.yml");
    std::fs::write(&raw, yml.replace("version: 1\n", "version: 1\nresources: {sbatch: [--output=/tmp/x]}\n")).unwrap();
    let r = f
        .send(urlencoded(&format!("/pipeline{}", raw.display()), format!("csrf={}&executor=slurm", f.state.csrf)))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("give their own Slurm options") && r.body.contains("--output=/tmp/x"), "{}", r.body);
    std::fs::remove_file(&raw).unwrap();
    let r = f.send(urlencoded(&page_path, format!("csrf={}&jobs=0", f.state.csrf))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(f.state.pipelines.all().is_empty());

    let id = start_pipeline(&f, &page_path).await;
    let report = f.state.pipelines.get(&id).unwrap().report().expect("the pipeline ran");
    assert!(report.ok && report.containers == 2, "{report:?}");
    assert_eq!(std::fs::read_to_string(data.join("out/final/tags.txt")).unwrap(), "a\nb\n");
    let run = f.get(&format!("/pipeline-run/{id}")).await;
    assert!(run.body.contains("badge ok\">succeeded"), "{}", run.body);
    assert!(run.body.contains("<g id=\"step-first\" class=\"step st-done\">"), "{}", run.body);
    let second_key = report.steps[1].runs[0].key.unwrap();
    assert!(run.body.contains(&format!("<a href=\"/provenance/{second_key}\">")), "the step links to its run");
    assert!(run.body.contains(&format!("/result/{second_key}/log/stdout")), "and to its logs");
    assert!(run.body.contains("[first] step says a") && run.body.contains("[second] step says b"), "{}", run.body);
    assert!(run.body.contains("written to <code>out/final</code>"), "the step's output folder: {}", run.body);
    assert!(run.body.contains("<span class=\"st-done\">done</span>"), "a legend");
    // The finished run as an RO-Crate: the pipeline as the workflow, with both steps' runs.
    assert!(run.body.contains(&format!("href=\"/pipeline-run/{id}/ro-crate\" download")), "{}", run.body);
    let c = f.get(&format!("/pipeline-run/{id}/ro-crate")).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.body);
    let text = crate_metadata(&c, &format!("kliko-pipeline-run-{id}.zip"));
    let first_key = report.steps[0].runs[0].key.unwrap();
    assert!(text.contains(&first_key.to_hex()) && text.contains(&second_key.to_hex()), "{text}");
    assert!(text.contains("ComputationalWorkflow") && text.contains("pipeline.yml"), "{text}");
    // The live stream of a finished run: every step's last state, then the end.
    let events = f.get(&format!("/pipeline-run/{id}/events")).await;
    assert!(events.body.contains("event: step") && events.body.contains("\"state\":\"done\""), "{}", events.body);
    assert!(events.body.trim_end().ends_with("event: done\ndata: {}"), "{}", events.body);

    // Now each step would hit, and the history has the run.
    let after = f.get(&page_path).await;
    assert!(after.body.contains("<g id=\"step-second\" class=\"step st-would-hit\">"), "{}", after.body);
    assert!(after.body.contains("local (web)") && after.body.contains("badge ok\">succeeded"), "{}", after.body);

    // Again: nothing runs.
    let id2 = start_pipeline(&f, &page_path).await;
    let again = f.state.pipelines.get(&id2).unwrap().report().unwrap();
    assert_eq!(again.containers, 0);
    let run2 = f.get(&format!("/pipeline-run/{id2}")).await;
    assert!(run2.body.contains("<g id=\"step-second\" class=\"step st-cached\">"), "{}", run2.body);
    assert!(run2.body.contains("badge hit\">cache hit"));
    let list = f.get("/pipelines").await;
    assert!(
        list.body.contains("Recent pipeline runs") && list.body.matches("local (web)").count() == 2,
        "{}",
        list.body
    );
    // A run that is not this server's is not found; cancelling needs the secret.
    assert_eq!(f.get("/pipeline-run/nope").await.status, StatusCode::NOT_FOUND);
    let r = f.send(urlencoded(&format!("/pipeline-run/{id2}/cancel"), "csrf=wrong".into())).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A form that is not a form is refused before anything of it is used.
    let r = f.send(Request::post(format!("/pipeline-run/{id2}/cancel")).body(Body::from("csrf=x")).unwrap()).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_naming_anything_outside_the_data_folders_is_shown_never_run() {
    let image = step_image();
    let f = Fixture::new();
    let data = f.data_path();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "not yours").unwrap();
    std::fs::create_dir_all(data.join("in")).unwrap();
    let cases = [
        ("reads.yml", format!("input: {}/", outside.path().display())),
        ("writes.yml", format!("input: ../in/\n    output: {}/out", outside.path().display())),
        ("foreach.yml", format!("foreach: {}/", outside.path().display())),
    ];
    for (name, step) in cases {
        let file = data.join(name);
        std::fs::write(&file, format!("version: 1\nsteps:\n  s:\n    image: {}\n    {step}\n", image.tag)).unwrap();
        let path = format!("/pipeline{}", file.display());
        let page = f.get(&path).await;
        assert!(
            page.body.contains("id=\"outside\"") && !page.body.contains("id=\"run-form\""),
            "{name}: {}",
            page.body
        );
        assert!(page.body.contains(&outside.path().display().to_string()), "{name}: the path is named");
        let r = f.send(urlencoded(&path, format!("csrf={}&executor=local", f.state.csrf))).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{name}");
    }
    assert!(f.state.pipelines.all().is_empty(), "nothing ran");
    assert!(!outside.path().join("out").exists());
    // A pipeline file itself outside the folders is not even read.
    let stray = outside.path().join("p.yml");
    std::fs::write(&stray, "version: 1\nsteps:\n  s:\n    image: x\n").unwrap();
    assert_eq!(f.get(&format!("/pipeline{}", stray.display())).await.status, StatusCode::FORBIDDEN);
    // An invalid pipeline: its problems, no form.
    std::fs::write(data.join("bad.yml"), "version: 1\nsteps:\n  s:\n    imag: x\n").unwrap();
    let bad = f.get(&format!("/pipeline{}", data.join("bad.yml").display())).await;
    assert!(bad.body.contains("id=\"problems\"") && !bad.body.contains("id=\"run-form\""), "{}", bad.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_folder_picker_browses_the_data_folders_and_nothing_else() {
    let f = Fixture::new();
    let data = f.data_path();
    for d in ["obs/night1", "obs/night2", "obs/.hidden", "results"] {
        std::fs::create_dir_all(data.join(d)).unwrap();
    }
    std::fs::write(data.join("obs/file.txt"), "not a folder").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), data.join("link-out")).unwrap();
    let json = |r: &Resp| serde_json::from_str::<serde_json::Value>(&r.body).unwrap();
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["folders"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().to_string()).collect()
    };
    // One data folder: the top is that folder; symlinks and hidden folders are not offered.
    let top = f.get("/folders?under=").await;
    assert_eq!(top.status, StatusCode::OK);
    let v = json(&top);
    assert_eq!(v["path"], data.display().to_string());
    assert_eq!(v["parent"], serde_json::Value::Null);
    assert_eq!(names(&v), ["obs", "results"]);
    let obs = json(&f.get("/folders?under=obs").await);
    assert_eq!(names(&obs), ["night1", "night2"]);
    assert_eq!(obs["parent"], data.display().to_string());
    assert_eq!(obs["folders"][0]["path"], data.join("obs/night1").display().to_string());
    // An output folder still to be created is browsed from what exists of it.
    let new = json(&f.get("/folders?under=obs%2Fnight3%2Fdeeper").await);
    assert_eq!(new["path"], data.join("obs").display().to_string());
    for bad in ["%2Fetc", "..%2F..", "link-out", "link-out%2Fnew"] {
        let r = f.get(&format!("/folders?under={bad}")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{bad}: {}", r.body);
        assert!(json(&r)["error"].as_str().unwrap().contains("outside the data folders"), "{bad}");
    }
    // The run form offers it beside each folder field.
    let image = full_image();
    let form = f.get(&format!("/image/{}", image.tag)).await;
    assert!(form.body.contains("data-for=\"folder-input\"") && form.body.contains("data-for=\"folder-output\""));
    assert!(form.body.contains("fetch('/folders?under='"));
}

/// The `ro-crate-metadata.json` of a zipped crate download named `name`, as text (checked to
/// be JSON).
fn crate_metadata(c: &Resp, name: &str) -> String {
    assert_eq!(c.headers[header::CONTENT_TYPE], "application/zip");
    assert_eq!(c.headers[header::CONTENT_DISPOSITION], format!("attachment; filename=\"{name}\"").as_str());
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(c.bytes.clone())).expect("a zip");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut zip.by_name("ro-crate-metadata.json").expect("metadata at the top"), &mut text)
        .unwrap();
    serde_json::from_str::<serde_json::Value>(&text).expect("JSON");
    text
}
