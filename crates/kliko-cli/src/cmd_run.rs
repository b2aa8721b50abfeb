//! `kliko run IMAGE …`: the image's own fields become flags, so the command line is parsed
//! twice: once to find the image, then with a parser that knows its kliko.yml.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use kliko_engine::{Cache, Event, Input, Observer, RunReport, RunRequest, Status, UserChoice};
use kliko_runtime::Stream;
use kliko_spec::{IoMode, ParamLayer, Spec};
use tokio_util::sync::CancellationToken;

use crate::cli::Placement;

// Options of `kliko run` itself (the image's fields are added at run time).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The image: a tag (`name:tag`), an image ID, or `name@sha256:…`.
    pub image: String,
    /// Input folder (split images), mounted read-only at `/input`.
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub input: Option<PathBuf>,
    /// Output folder (split images): must be empty or absent, unless `--overwrite`.
    /// For join images: where the result goes instead of back into `--work`.
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub output: Option<PathBuf>,
    /// Work folder (join images): the container changes a private copy; this folder
    /// receives the result once it is safely stored.
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub work: Option<PathBuf>,
    /// Replace the contents of a non-empty `--output` folder.
    #[arg(long, help_heading = "Data")]
    pub overwrite: bool,
    /// How output files are placed: `auto` (read-only hard links to the store when safe,
    /// else copies), `link`, or `copy` (writable copies).
    #[arg(long, value_enum, default_value_t = Placement::Auto, value_name = "HOW", help_heading = "Data")]
    pub materialize: Placement,
    /// A parameter, `NAME=VALUE` (repeatable; a list takes `a,b,c` or repeats).
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE", help_heading = "Parameters")]
    pub param: Vec<String>,
    /// Parameters from a YAML or JSON file (flags given on the command line win).
    #[arg(long, value_name = "FILE", help_heading = "Parameters")]
    pub params: Option<PathBuf>,
    /// Give the container a network (`bridge`, `host`, a network name). Default: none.
    #[arg(long, value_name = "NET", help_heading = "Container")]
    pub network: Option<String>,
    /// Run as `UID[:GID]`, or `image` for the image's own user. Default: you.
    #[arg(long, value_name = "USER", help_heading = "Container")]
    pub user: Option<String>,
    /// Memory limit, e.g. `512m`, `4g`.
    #[arg(long, value_name = "SIZE", help_heading = "Container")]
    pub memory: Option<String>,
    /// CPU limit, e.g. `1.5`.
    #[arg(long, value_name = "N", help_heading = "Container")]
    pub cpus: Option<f64>,
    /// GPUs for the container: `all`, a number, or `device=0,1` (not part of the key; kept in
    /// provenance). Refused before anything starts on a machine without them.
    #[arg(long, value_name = "GPUS", help_heading = "Container")]
    pub gpus: Option<String>,
    /// Stop the container after this long (`90s`, `10m`, `2h`); the run fails (exit 124).
    #[arg(long, value_name = "DURATION", help_heading = "Container")]
    pub timeout: Option<String>,
    /// An environment variable for the container, `K=V` (repeatable; part of the key).
    #[arg(long = "env", short = 'e', value_name = "K=V", help_heading = "Container")]
    pub env: Vec<String>,
    /// Extra text in the key: results with another salt are not reused.
    #[arg(long, value_name = "TEXT", help_heading = "Cache")]
    pub salt: Option<String>,
    /// Run even if a result is stored (the new result replaces it).
    #[arg(long, help_heading = "Cache")]
    pub no_cache: bool,
    /// If the identical run this one waited on fails, run it again here once.
    #[arg(long, help_heading = "Cache")]
    pub retry_failed: bool,
    /// Print the key's pre-image (and how it differs from the nearest stored run); run nothing.
    #[arg(long, help_heading = "Cache")]
    pub explain: bool,
    /// Print one JSON object about the run on stdout (container logs go to stderr).
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// Do not show the container's logs (they are still stored).
    #[arg(long, short = 'q', help_heading = "Output")]
    pub quiet: bool,
}

const FIELD_PREFIX: &str = "field:";

fn base_command() -> Command {
    RunArgs::augment_args(base_info())
}

/// Static flags that take a value (so the image can be found before the image is known).
fn takes_value(cmd: &Command, flag: &str) -> bool {
    let name = flag.trim_start_matches('-');
    match cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(name) || (flag.len() == 2 && a.get_short() == name.chars().next()))
    {
        Some(a) => a.get_action().takes_values(),
        // An image field: every field flag takes a value (`--flag false`).
        None => true,
    }
}

/// The first positional argument: the image.
fn find_image(cmd: &Command, args: &[OsString]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            return it.next().map(|x| x.to_string_lossy().into_owned());
        }
        if s.starts_with('-') && s.len() > 1 {
            if !s.contains('=') && takes_value(cmd, &s) {
                it.next();
            }
            continue;
        }
        return Some(s.into_owned());
    }
    None
}

fn base_info() -> Command {
    Command::new("kliko run")
        .no_binary_name(true)
        .about("Run a kliko image; an identical earlier run is reused instead (no container is started).")
        .after_help("The image's own parameters are listed by `kliko run IMAGE --help`.")
        .max_term_width(100)
}

/// The image's parameters first (what a user looks for in `--help`), then kliko's options.
fn full_command(spec: &Spec) -> Command {
    let taken: Vec<String> = base_command().get_arguments().filter_map(|a| a.get_long().map(str::to_string)).collect();
    let mut cmd = base_info();
    let mut shadowed = Vec::new();
    for section in &spec.sections {
        let heading = format!("Image parameters: {}", section.name);
        for f in &section.fields {
            if taken.iter().any(|t| t == &f.name) || f.name == "help" {
                shadowed.push(f.name.clone());
                continue;
            }
            let mut help = match (&f.label, &f.help_text) {
                (Some(l), Some(h)) => format!("{l}: {h}"),
                (Some(t), None) | (None, Some(t)) => t.clone(),
                (None, None) => String::new(),
            };
            let mut notes = Vec::new();
            if f.needs_value() {
                notes.push("required".to_string());
            }
            if let Some(c) = f.choices_display() {
                notes.push(format!("choices: {c}"));
            }
            if let Some(d) = f.default_display() {
                notes.push(format!("default: `{d}`"));
            } else if !f.required {
                notes.push("optional".into());
            }
            if let Some(n) = f.max_length {
                notes.push(format!("at most {n} characters"));
            }
            if f.ty.is_list() {
                notes.push("a list: `a,b,c` or repeat the flag".into());
            }
            if !notes.is_empty() {
                if !help.is_empty() {
                    help.push(' ');
                }
                help.push_str(&format!("[{}]", notes.join("; ")));
            }
            let arg = Arg::new(format!("{FIELD_PREFIX}{}", f.name))
                .long(f.name.clone())
                .value_name(f.type_label())
                .action(ArgAction::Append)
                .allow_hyphen_values(true)
                .help(help)
                .help_heading(heading.clone());
            cmd = cmd.arg(arg);
        }
    }
    let mut cmd = RunArgs::augment_args(cmd);
    if !shadowed.is_empty() {
        cmd = cmd.after_help(format!(
            "These image parameters share a name with a kliko option; give them as `--param NAME=VALUE`: {}",
            shadowed.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
        ));
    }
    cmd
}

pub fn run(store_root: &Path, args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let base = base_command();
    let wants_help = args.iter().any(|a| a == "--help" || a == "-h");
    let Some(image) = find_image(&base, &args) else {
        if wants_help {
            if let Err(e) = base_command().print_help() {
                crate::out::failed(e);
            }
            return Ok(ExitCode::SUCCESS);
        }
        base_command()
            .error(clap::error::ErrorKind::MissingRequiredArgument, "missing the image to run: `kliko run IMAGE`")
            .exit();
    };
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let store = Arc::new(
            kliko_store::Store::open(store_root)
                .with_context(|| format!("cannot open the store at `{}`", store_root.display()))?,
        );
        let engine = crate::engine(store)?;
        // The image (for its flags) and the index (for the lookup) at the same time.
        let (meta, hold) = tokio::join!(engine.image(&image), engine.hold_index());
        let meta = meta?;
        let cmd = full_command(&meta.spec);
        let m = match cmd.try_get_matches_from(&args) {
            Ok(m) => m,
            Err(e) => {
                if e.kind() == clap::error::ErrorKind::DisplayHelp {
                    let mut head = format!("kliko image `{image}` ({})", meta.info.id);
                    for (k, v) in [
                        ("name", &meta.spec.name),
                        ("description", &meta.spec.description),
                        ("author", &meta.spec.author),
                    ] {
                        if let Some(v) = v {
                            head.push_str(&format!("\n  {k}: {v}"));
                        }
                    }
                    head.push_str(&format!(
                        "\n  io: {} ({})",
                        meta.spec.io,
                        match meta.spec.io {
                            IoMode::Split => "give `--input DIR --output DIR`",
                            IoMode::Join => "give `--work DIR`",
                        }
                    ));
                    println!("{head}\n");
                }
                e.exit();
            }
        };
        let a = RunArgs::from_arg_matches(&m).map_err(|e| anyhow::anyhow!("{e}"))?;
        let req = build_request(&a, &meta.spec, &m)?;
        if a.explain {
            let x = engine.explain(&req).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&x)?);
            } else {
                println!("key: {}", x.key);
                println!(
                    "stored: {}",
                    if x.stored { "yes (a run would be a hit)" } else { "no (a run would be a miss)" }
                );
                println!("pre-image:\n{}", serde_json::to_string_pretty(&x.preimage)?);
                match x.nearest {
                    Some(n) if !x.differences.is_empty() => {
                        println!("differences from the nearest stored run `{n}`:");
                        for d in &x.differences {
                            println!("  {d}");
                        }
                    }
                    Some(_) => {}
                    None => println!("no earlier run of this image is stored"),
                }
                if let Some(r) = &x.remote {
                    println!("shared tier: {r}");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        let cancel = CancellationToken::new();
        crate::cancel_on_signal(
            cancel.clone(),
            "kliko: stopping: the container is being stopped and removed; nothing is cached",
        );
        let obs = Arc::new(Term { json: a.json, quiet: a.quiet, said: Default::default() });
        // A failed hold is taken again (and its error reported) by the run itself.
        let report = engine.run_with(req, Some(meta), hold.ok(), obs.clone(), cancel).await?;
        kliko_core::trace::mark("run finished");
        let said = std::mem::take(&mut *obs.said.lock().unwrap_or_else(|p| p.into_inner()));
        let code = finish(&a, &report, &said);
        // The output is in place and reported; the upload (`--remote-async`) ends first.
        crate::finish_background(&engine).await;
        code
    })
}

fn build_request(a: &RunArgs, spec: &Spec, m: &ArgMatches) -> anyhow::Result<RunRequest> {
    if a.work.is_some() && a.input.is_some() {
        bail!("`--work` (join images) and `--input` (split images) cannot be given together");
    }
    let io_flags = if a.work.is_some() {
        Some(IoMode::Join)
    } else if a.input.is_some() {
        Some(IoMode::Split)
    } else {
        None
    };
    // A folder given as a symbolic link means the folder it points to: that is where the
    // result is placed (replacing the link itself by a folder would be a surprise).
    let work = a.work.as_deref().map(|w| follow_link("--work", w)).transpose()?;
    let output = a.output.as_deref().map(|o| follow_link("--output", o)).transpose()?;
    if let Some(o) = &output {
        check_apart(o, a.input.as_deref().or(work.as_deref()), work.is_some())?;
    }
    let input = match (&work, &a.input) {
        (Some(w), _) => Input::Path(w.clone()),
        (None, Some(i)) => Input::Path(i.clone()),
        (None, None) => Input::None,
    };
    let mut req = RunRequest::new(a.image.clone(), input, output);
    req.io_flags = io_flags;
    if let Some(file) = &a.params {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the parameters file `{}`", file.display()))?;
        let layer = ParamLayer::from_document(&file.display().to_string(), &text)
            .map_err(|errors| kliko_engine::EngineError::Params { image: a.image.clone(), errors })?;
        let base = std::path::absolute(file)?.parent().map(Path::to_path_buf).unwrap_or_default();
        req.params.push(layer.with_base_dir(base));
    }
    let mut raw = Vec::new();
    for p in &a.param {
        let Some((k, v)) = p.split_once('=') else {
            bail!("`--param {p}` must be `NAME=VALUE`");
        };
        raw.push((k.to_string(), v.to_string()));
    }
    for f in spec.fields() {
        if let Some(vals) = m.get_many::<String>(&format!("{FIELD_PREFIX}{}", f.name)) {
            for v in vals {
                raw.push((f.name.clone(), v.clone()));
            }
        }
    }
    if !raw.is_empty() {
        req.params.push(ParamLayer::strings(raw));
    }
    for e in &a.env {
        let Some((k, v)) = e.split_once('=') else {
            bail!("`--env {e}` must be `NAME=VALUE`");
        };
        req.env.push((k.to_string(), v.to_string()));
    }
    req.network = a.network.clone();
    req.user = match a.user.as_deref() {
        None => UserChoice::Invoker,
        Some("image") => UserChoice::Image,
        Some(u) => UserChoice::Explicit(u.to_string()),
    };
    req.memory_bytes = a
        .memory
        .as_deref()
        .map(|m| parse_size(m).and_then(|n| i64::try_from(n).map_err(|_| anyhow::anyhow!("`{m}` is too large a size"))))
        .transpose()?;
    req.cpus = match a.cpus {
        Some(c) if c > 0.0 && c.is_finite() => Some(c),
        Some(c) => bail!("`--cpus {c}` must be a positive number"),
        None => None,
    };
    req.timeout = a.timeout.as_deref().map(parse_duration).transpose()?;
    req.gpus = a
        .gpus
        .as_deref()
        .map(|g| kliko_engine::Gpus::parse(g).map_err(|e| anyhow::anyhow!("`--gpus`: {e}")))
        .transpose()?;
    req.salt = a.salt.clone();
    req.no_cache = a.no_cache;
    req.overwrite = a.overwrite;
    req.materialize = a.materialize.into();
    req.retry_failed = a.retry_failed;
    Ok(req)
}

/// `path` itself, or the folder it points to when it is a symbolic link (which must then
/// exist and be a folder).
fn follow_link(flag: &str, path: &Path) -> anyhow::Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {}
        _ => return Ok(path.to_path_buf()),
    }
    let to = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
    match std::fs::canonicalize(path) {
        Ok(real) if real.is_dir() => Ok(real),
        Ok(real) => {
            bail!("`{flag} {}` is a symbolic link to `{}`, which is not a folder", path.display(), real.display())
        }
        Err(_) => bail!(
            "`{flag} {}` is a symbolic link to `{to}`, which does not exist: create that folder, or give another",
            path.display()
        ),
    }
}

/// `path` made absolute with every symbolic link resolved, for the part of it that exists.
fn real_path(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut existing = abs.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses an output folder that is, or is inside, the input (or work) folder, or holds it:
/// the result would change the input (so no run could ever be reused), or placing the result
/// would replace the input.
fn check_apart(output: &Path, input: Option<&Path>, join: bool) -> anyhow::Result<()> {
    let Some(input) = input else { return Ok(()) };
    let (what, flag) = if join { ("work", "--work") } else { ("input", "--input") };
    let (o, i) = (real_path(output), real_path(input));
    if o == i {
        if join {
            // The result goes back into the work folder, as without `--output`.
            return Ok(());
        }
        bail!(
            "`--output {}` is the input folder: a run must not write into its own input; choose another output folder",
            output.display()
        );
    }
    if o.starts_with(&i) {
        bail!(
            "`--output {}` is inside the {what} folder `{}`: every result would change the {what}, so no run could \
             ever be reused; choose an output folder outside `{flag}`",
            output.display(),
            input.display()
        );
    }
    if i.starts_with(&o) {
        bail!(
            "`--output {}` holds the {what} folder `{}`: placing the result would replace the {what}; choose an \
             output folder outside it",
            output.display(),
            input.display()
        );
    }
    Ok(())
}

/// A positive size (`kliko_core::units::parse_size`'s grammar).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let n = kliko_core::units::parse_size(s).map_err(anyhow::Error::msg)?;
    if n == 0 {
        bail!("`{s}` is not a positive size");
    }
    Ok(n)
}

/// A positive duration (`kliko_core::units::parse_duration`'s grammar).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let d = kliko_core::units::parse_duration(s).map_err(anyhow::Error::msg)?;
    if d.is_zero() {
        bail!("`{s}` is not a positive duration");
    }
    Ok(d)
}

/// Live logs and status on the terminal.
struct Term {
    json: bool,
    quiet: bool,
    /// The warnings said as they happened (a failed run's report repeats only the others).
    said: std::sync::Mutex<Vec<String>>,
}

impl Observer for Term {
    fn log(&self, stream: Stream, bytes: &[u8]) {
        if self.quiet {
            return;
        }
        if stream == Stream::Stdout && !self.json {
            if crate::out::stdout_closed() {
                return;
            }
            let mut o = std::io::stdout().lock();
            if let Err(e) = o.write_all(bytes).and_then(|()| o.flush()) {
                crate::out::failed(e);
            }
        } else {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(bytes);
        }
    }

    fn event(&self, event: &Event) {
        match event {
            Event::Waiting { holder } => eprintln!(
                "kliko: an identical run is in progress (pid {} on `{}`, since {}); waiting for its result",
                holder.pid, holder.host, holder.started_at
            ),
            Event::Warning(w) => {
                eprintln!("warning: {w}");
                self.said.lock().unwrap_or_else(|p| p.into_inner()).push(w.clone());
            }
            _ => {}
        }
    }
}

/// Report run `r`; `said`: its warnings that were already said as they happened.
fn finish(a: &RunArgs, r: &RunReport, said: &[String]) -> anyhow::Result<ExitCode> {
    if a.json {
        let v = serde_json::json!({
            "key": r.key,
            "cache": r.cache,
            "status": r.status,
            "exit_code": r.exit_code,
            "output": r.output,
            // JSON holds text only: a path that is not UTF-8 is shown with U+FFFD in its place.
            "output_path": r.output_path.as_ref().map(|p| p.to_string_lossy()),
            "image": r.image_ref,
            "image_id": r.image_id,
            "wall_ms": r.wall_ms,
            "saved_ms": r.saved_ms,
            "waited": r.waited_on.is_some(),
            "recorded": r.recorded,
            "hit_from": r.hit_from,
            "published": r.published,
            "publishing_in_background": r.publishing,
            "warnings": r.warnings,
        });
        println!("{v}");
    }
    match r.status {
        Status::Succeeded => {
            if !a.json {
                let what = match r.cache {
                    Cache::Hit if r.hit_from == Some(kliko_engine::Tier::Remote) => {
                        format!("cache hit from the shared tier (saved {})", human_ms(r.saved_ms))
                    }
                    Cache::Hit => format!("cache hit (saved {})", human_ms(r.saved_ms)),
                    Cache::Miss => match &r.published {
                        Some(p) if p.raced => {
                            format!("ran in {}; another machine had published it first", human_ms(r.wall_ms))
                        }
                        Some(p) => format!(
                            "ran in {}; published to the shared tier ({} new objects, {})",
                            human_ms(r.wall_ms),
                            p.uploaded,
                            kliko_core::units::human_bytes(p.bytes)
                        ),
                        None if r.publishing => {
                            format!("ran in {}; publishing to the shared tier in the background", human_ms(r.wall_ms))
                        }
                        None => format!("ran in {}", human_ms(r.wall_ms)),
                    },
                };
                let out = match (&r.output_path, r.output) {
                    (Some(p), _) => format!("output in `{}`", p.display()),
                    (None, Some(d)) => format!("output tree `{d}` (`kliko store materialize {d} DIR` to get it)"),
                    (None, None) => String::new(),
                };
                eprintln!("kliko: {what}; key {}; {out}", r.key.short(16));
            }
            Ok(ExitCode::SUCCESS)
        }
        status => {
            let what = match status {
                Status::TimedOut => format!("`{}` timed out and was stopped", r.image_ref),
                Status::Cancelled => format!("`{}` was cancelled", r.image_ref),
                Status::LeaderFailed => format!("the identical run `{}` that this one waited on failed", r.image_ref),
                _ => format!("`{}` exited with code {}", r.image_ref, r.exit_code),
            };
            eprintln!("error: {what}; nothing was cached");
            for w in r.warnings.iter().filter(|w| !said.contains(w)) {
                eprintln!("  {w}");
            }
            if !r.log_tail.is_empty() {
                eprintln!("last log lines:");
                for l in &r.log_tail {
                    eprintln!("  | {l}");
                }
            }
            if status == Status::LeaderFailed {
                eprintln!("hint: pass `--retry-failed` to run it again here");
            }
            let code = r.exit_code.clamp(1, 255) as u8;
            Ok(ExitCode::from(code))
        }
    }
}

pub use kliko_core::units::human_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("1gb").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").unwrap_err().to_string().contains("positive"));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn the_image_is_found_among_flags() {
        let cmd = base_command();
        let args: Vec<OsString> = ["--input", "in", "--threshold", "3", "--no-cache", "img:1", "--output", "o"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(find_image(&cmd, &args).as_deref(), Some("img:1"));
        let args: Vec<OsString> = ["--param=x=1", "img"].iter().map(OsString::from).collect();
        assert_eq!(find_image(&cmd, &args).as_deref(), Some("img"));
    }
}
