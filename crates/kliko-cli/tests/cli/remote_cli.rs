//! `kliko remote ...` and signed records, through the real binary, real Docker and a shared
//! folder tier (and the real S3 server when `KLIKO_TEST_S3` names one).

use std::path::Path;

use crate::common::*;

fn image(name: &str) -> TestImage {
    split_image(name, "", "cp -r /input/. /output/\necho copied\n")
}

fn remote(w: &World, tier: &Path, args: &[&str]) -> Out {
    let mut c = w.kliko();
    c.arg("--remote").arg(tier).arg("remote").args(args);
    Out::of(&mut c)
}

#[test]
fn keys_are_made_once_and_shown() {
    let w = World::new();
    let shown = Out::of(w.kliko().args(["remote", "key", "show"]));
    shown.expect_code(2);
    assert!(shown.stderr.contains("kliko remote key new"), "{}", shown.stderr);
    let made = Out::of(w.kliko().args(["remote", "key", "new"]));
    made.ok();
    let public = made.stdout.trim().to_string();
    assert!(public.starts_with("ed25519:") && public.len() == 8 + 64, "{public}");
    let again = Out::of(w.kliko().args(["remote", "key", "new"]));
    again.expect_code(2);
    assert!(again.stderr.contains("never replaces") && again.stderr.contains(&public), "{}", again.stderr);
    let shown = Out::of(w.kliko().args(["remote", "key", "show"]));
    shown.ok();
    assert_eq!(shown.stdout.trim(), public);
}

#[test]
fn check_push_stats_gc_and_trust_on_a_shared_folder() {
    let img = image("remote-cli");
    let (a, b) = (World::new(), World::new());
    let tier = a.path("tier");
    std::fs::create_dir_all(&tier).unwrap();
    let input = a.folder("in", &[("a.txt", "alpha")]);

    let check = remote(&a, &tier, &["check", "--probe-size", "1m", "--json"]);
    check.ok();
    let c = check.json();
    assert_eq!((c["writable"].as_bool(), c["conditional_writes"].as_bool()), (Some(true), Some(true)), "{c}");
    assert!(c["download_mib_s"].as_f64().unwrap() > 0.0);
    assert!(!tier.join("kliko-remote-v1/probe").read_dir().unwrap().any(|_| true), "the probe files are gone");

    // A makes a result with no tier, then pushes it, signed.
    Out::of(a.kliko().args(["remote", "key", "new"])).ok();
    let alice = Out::of(a.kliko().args(["remote", "key", "show"])).stdout.trim().to_string();
    let run = |w: &World, out: &str, trusted: Option<&str>| {
        let mut c = w.kliko();
        if let Some(t) = trusted {
            c.env("KLIKO_TRUSTED_KEYS", t);
        }
        c.arg("--remote").arg(&tier).arg("run").arg(&img.tag).arg("--input").arg(&input);
        c.arg("--output").arg(w.path(out)).arg("--json");
        Out::of(&mut c)
    };
    let mut c = a.kliko();
    c.arg("run").arg(&img.tag).arg("--input").arg(&input).arg("--output").arg(a.path("out")).arg("--json");
    let made = Out::of(&mut c);
    made.ok();
    let pushed = remote(&a, &tier, &["push", "--json"]);
    pushed.ok();
    assert_eq!(pushed.json()["published"].as_u64(), Some(1), "{}", pushed.stdout);
    let again = remote(&a, &tier, &["push", "--json"]);
    assert_eq!((again.json()["published"].as_u64(), again.json()["present"].as_u64()), (Some(0), Some(1)));
    let record = std::fs::read_to_string(tier.join(format!("kliko-remote-v1/ac/{}.json", made.key()))).unwrap();
    assert!(record.contains(&alice), "the record is signed by A: {record}");

    // B, trusting only a key that is not A's, ignores it and says why.
    Out::of(b.kliko().args(["remote", "key", "new"])).ok();
    let bob = Out::of(b.kliko().args(["remote", "key", "show"])).stdout.trim().to_string();
    let mut c = b.kliko();
    c.env("KLIKO_TRUSTED_KEYS", &bob).arg("--remote").arg(&tier).arg("run").arg(&img.tag);
    c.arg("--input").arg(&input).arg("--output").arg(b.path("x")).arg("--explain");
    let explained = Out::of(&mut c);
    explained.ok();
    assert!(explained.stdout.contains("shared tier: a result that is ignored"), "{}", explained.stdout);
    assert!(explained.stdout.contains("not a trusted key"), "{}", explained.stdout);
    // Trusting A (by a file of keys), B hits, with no container.
    let keys = b.file("trusted-keys", &format!("# the group\n{alice}\n"));
    let hit = run(&b, "out", Some(keys.to_str().unwrap()));
    hit.ok();
    assert_eq!((hit.cache().as_str(), hit.json()["hit_from"].as_str()), ("hit", Some("remote")), "{}", hit.stderr);

    let stats = remote(&a, &tier, &["stats", "--json"]);
    stats.ok();
    assert_eq!(stats.json()["records"].as_u64(), Some(1));
    assert!(stats.json()["blobs"].as_u64().unwrap() >= 2);

    // gc: a dry run removes nothing; then the record (older than 0 s) and its objects go.
    let dry = remote(&a, &tier, &["gc", "--older-than", "0s", "--grace", "0s", "--dry-run", "--json"]);
    dry.ok();
    assert_eq!(dry.json()["records_removed"].as_u64(), Some(1));
    assert_eq!(remote(&a, &tier, &["stats", "--json"]).json()["records"].as_u64(), Some(1));
    let young = remote(&a, &tier, &["gc", "--older-than", "0s", "--json"]);
    young.ok();
    assert!(young.json()["objects_young"].as_u64().unwrap() >= 2, "objects within the grace stay: {}", young.stdout);
    let gc = remote(&a, &tier, &["gc", "--older-than", "0s", "--grace", "0s", "--json"]);
    gc.ok();
    let s = remote(&a, &tier, &["stats", "--json"]).json();
    assert_eq!((s["records"].as_u64(), s["blobs"].as_u64(), s["trees"].as_u64()), (Some(0), Some(0), Some(0)), "{s}");

    // Without a tier the commands say how to name one.
    let none = Out::of(a.kliko().args(["remote", "stats"]));
    none.expect_code(2);
    assert!(none.stderr.contains("--remote URL"), "{}", none.stderr);
    assert_no_containers(&img);
}

/// Against the real S3 server that `scripts/test.sh` starts (`KLIKO_TEST_S3`).
#[test]
fn s3_check_and_a_bad_configuration_before_anything_runs() {
    let Ok(bucket) = std::env::var("KLIKO_TEST_S3") else {
        eprintln!("KLIKO_TEST_S3 is not set: no S3 server to test against");
        return;
    };
    let w = World::new();
    let url = format!("{bucket}/cli-{}", std::process::id());
    let check = remote(&w, Path::new(&url), &["check", "--json"]);
    check.ok();
    let c = check.json();
    assert_eq!((c["writable"].as_bool(), c["conditional_writes"].as_bool()), (Some(true), Some(true)), "{c}");

    let img = image("remote-s3-bad");
    let input = w.folder("in", &[("a.txt", "alpha")]);
    let run = |url: &str, secret: &str| {
        let mut c = w.kliko();
        c.env("AWS_SECRET_ACCESS_KEY", secret).arg("--remote").arg(url).arg("run").arg(&img.tag);
        c.arg("--input").arg(&input).arg("--output").arg(w.path(&format!("out-{}", secret.len())));
        Out::of(&mut c)
    };
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
    let missing = run("s3://no-such-bucket-for-kliko/x", &secret);
    missing.expect_code(2);
    assert!(missing.stderr.contains("the bucket does not exist"), "{}", missing.stderr);
    let refused = run(&url, "not-the-secret");
    refused.expect_code(2);
    assert!(refused.stderr.contains("refused the credentials"), "{}", refused.stderr);
    assert_no_containers(&img);
    let checked = remote(&w, Path::new("s3://no-such-bucket-for-kliko/x"), &["check"]);
    checked.expect_code(2);
    assert!(checked.stderr.contains("the bucket does not exist"), "{}", checked.stderr);
}

/// The leader on machine A is SIGKILLed mid-run; machine B, waiting on it through the shared
/// folder, takes its lease over once it stops being renewed, runs the step and finishes.
#[test]
fn a_killed_leader_on_one_machine_is_taken_over_by_another() {
    let img = split_image("remote-killed", "", "sleep 3\ncp -r /input/. /output/\necho done\n");
    let (a, b) = (World::new(), World::new());
    let tier = a.path("tier");
    let input = a.folder("in", &[("a.txt", "alpha")]);
    let start = |w: &World| {
        let mut c = w.kliko();
        c.env("KLIKO_REMOTE_LEASE_TTL", "2s").arg("--remote").arg(&tier).arg("run").arg(&img.tag);
        c.arg("--input").arg(&input).arg("--output").arg(w.path("out")).arg("--json").arg("-q");
        c
    };
    let mut leader = start(&a).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let leases = tier.join("kliko-remote-v1/leases");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_dir(&leases)
        .is_ok_and(|d| d.flatten().any(|k| k.path().read_dir().is_ok_and(|mut g| g.next().is_some())))
    {
        assert!(std::time::Instant::now() < deadline, "A never took the lease");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    leader.kill().unwrap(); // SIGKILL
    leader.wait().unwrap();

    let started = std::time::Instant::now();
    let took_over = Out::of(&mut start(&b));
    took_over.ok();
    let j = took_over.json();
    assert_eq!((j["cache"].as_str(), j["waited"].as_bool()), (Some("miss"), Some(true)), "{}", took_over.stdout);
    assert!(started.elapsed() >= std::time::Duration::from_secs(2), "B waited for A's lease to expire");
    assert_eq!(std::fs::read_to_string(b.path("out/a.txt")).unwrap(), "alpha");
    // A's machine cleans up what its killed process left (its container) at its next gc.
    Out::of(a.kliko().args(["gc", "--older-than", "3650d"])).ok();
    assert_no_containers(&img);
}

/// Credentials and endpoint from `~/.aws/credentials` and `~/.aws/config` (as `aws configure`
/// writes them), when the environment has none: against the real S3 server.
#[test]
fn s3_credentials_from_the_aws_files() {
    let Ok(bucket) = std::env::var("KLIKO_TEST_S3") else {
        eprintln!("KLIKO_TEST_S3 is not set: no S3 server to test against");
        return;
    };
    let w = World::new();
    let home = w.path("home");
    let var = |k: &str| std::env::var(k).unwrap();
    w.file(
        "home/.aws/credentials",
        &format!(
            "[default]\naws_access_key_id = wrong\n[lofar]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY")
        ),
    );
    w.file(
        "home/.aws/config",
        &format!("[profile lofar]\nregion = {}\nendpoint_url = {}\n", var("AWS_REGION"), var("AWS_ENDPOINT_URL")),
    );
    let mut c = w.kliko();
    c.env("HOME", &home).env("AWS_PROFILE", "lofar");
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"] {
        c.env_remove(k);
    }
    c.arg("--remote").arg(format!("{bucket}/aws-files")).args(["remote", "check", "--probe-size", "0", "--json"]);
    let o = Out::of(&mut c);
    o.ok();
    assert_eq!(o.json()["writable"].as_bool(), Some(true), "{}", o.stdout);
}

#[test]
fn remote_async_publishes_after_the_run_is_reported_and_before_the_command_ends() {
    let img = image("remote-async");
    let (a, b) = (World::new(), World::new());
    let tier = a.path("tier");
    let input = a.folder("in", &[("a.txt", "alpha")]);
    let mut c = a.kliko();
    c.arg("--remote").arg(&tier).arg("--remote-async").arg("run").arg(&img.tag);
    c.arg("--input").arg(&input).arg("--output").arg(a.path("out")).arg("--json");
    let made = Out::of(&mut c);
    made.ok();
    assert_eq!(made.json()["publishing_in_background"].as_bool(), Some(true), "{}", made.stdout);
    assert!(made.stderr.contains("to the shared tier in the background"), "{}", made.stderr);
    let mut c = b.kliko();
    c.arg("--remote").arg(&tier).arg("run").arg(&img.tag);
    c.arg("--input").arg(&input).arg("--output").arg(b.path("out")).arg("--json");
    let hit = Out::of(&mut c);
    hit.ok();
    assert_eq!(hit.json()["hit_from"].as_str(), Some("remote"), "{}", hit.stderr);
    assert_no_containers(&img);
}

#[test]
fn provenance_and_show_find_runs_made_on_another_machine() {
    let one = split_image("remote-prov-one", "", "cp -r /input/. /output/\necho one > /output/one\n");
    let two = split_image("remote-prov-two", "", "cp -r /input/. /output/\necho two > /output/two\n");
    let (a, b) = (World::new(), World::new());
    let tier = a.path("tier");
    let input = a.folder("in", &[("a.txt", "alpha")]);
    let run = |img: &TestImage, input: &Path, out: &str| {
        let mut c = a.kliko();
        c.arg("--remote").arg(&tier).arg("run").arg(&img.tag).arg("--input").arg(input);
        c.arg("--output").arg(a.path(out)).arg("--json");
        let o = Out::of(&mut c);
        o.ok();
        o
    };
    let first = run(&one, &input, "out1");
    let second = run(&two, &a.path("out1"), "out2");
    let output = second.json()["output"].as_str().unwrap().to_string();

    // Machine B has never seen either run: the tier has them, and the lineage.
    let mut c = b.kliko();
    c.arg("--remote").arg(&tier).args(["provenance", &output, "--json"]);
    let p = Out::of(&mut c);
    p.ok();
    let v: serde_json::Value = serde_json::from_str(&p.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{}", p.stdout);
    assert_eq!(runs[0]["result"]["key"].as_str(), Some(second.key().as_str()));
    assert_eq!(runs[1]["result"]["key"].as_str(), Some(first.key().as_str()));
    assert_eq!((runs[1]["depth"].as_u64(), runs[1]["from_tier"].as_bool()), (Some(1), Some(true)));
    // Without the tier, B knows nothing of it.
    let none = Out::of(b.kliko().args(["provenance", &output]));
    none.expect_code(2);

    let mut c = b.kliko();
    c.arg("--remote").arg(&tier).args(["show", &second.key()]);
    let shown = Out::of(&mut c);
    shown.ok();
    assert!(shown.stdout.contains("on the shared tier") && !shown.stdout.contains(&one.tag), "{}", shown.stdout);
    assert!(shown.stdout.contains(&two.tag), "{}", shown.stdout);
    assert_no_containers(&one);
    assert_no_containers(&two);
}
