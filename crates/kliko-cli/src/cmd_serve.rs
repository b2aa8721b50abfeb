//! `kliko serve`: the web interface, on the same runtime, engine and store as every other
//! command, so browser runs and terminal runs reuse each other's results.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::ServeArgs;

pub fn run(store_root: &Path, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let upload_limit = crate::cmd_run::parse_size(&a.upload_limit)
        .with_context(|| format!("invalid `--upload-limit {}`", a.upload_limit))?;
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
        let engine = Arc::new(crate::engine(store)?);
        kliko_web::serve(engine, config).await?;
        Ok(ExitCode::SUCCESS)
    })
}
