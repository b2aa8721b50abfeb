//! `kliko serve`: the web interface, on the same runtime, engine and store as every other
//! command, so browser runs and terminal runs reuse each other's results.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kliko_engine::Engine;

use crate::cli::ServeArgs;

pub fn run(store_root: &Path, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let upload_limit =
        parse_size(&a.upload_limit).with_context(|| format!("invalid `--upload-limit {}`", a.upload_limit))?;
    let bind = a
        .bind
        .parse()
        .with_context(|| format!("invalid `--bind {}`: expected an address like `127.0.0.1:8765`", a.bind))?;
    let data_roots = if a.data_root.is_empty() {
        vec![std::env::current_dir().context("cannot read the current folder")?]
    } else {
        a.data_root.clone()
    };
    if a.max_connections == 0 {
        anyhow::bail!("invalid `--max-connections 0`: at least one connection must be served");
    }
    let config = kliko_web::ServeConfig {
        bind,
        data_roots,
        token: a.token.clone(),
        upload_limit,
        max_connections: a.max_connections,
        ..Default::default()
    };
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let store = Arc::new(
            kliko_store::Store::open(store_root)
                .with_context(|| format!("cannot open the store at `{}`", store_root.display()))?,
        );
        let engine = Arc::new(Engine::new(store));
        kliko_web::serve(engine, config).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `1G`, `500M`, `1GiB`, `64k`, `1000`: binary units (a `G` is 2^30 bytes).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("expected a number of bytes, like `1G` or `500M`"))?;
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        other => anyhow::bail!("unknown unit `{other}`: use K, M, G or T"),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| anyhow::anyhow!("too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("64kb").unwrap(), 64 << 10);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
    }
}
