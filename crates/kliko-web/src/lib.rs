//! `kliko-web` owns the web interface: a list of the local kliko images, a form generated
//! from each image's kliko.yml (validated by kliko-spec exactly as the command line is),
//! runs in the background with live logs, the run history and provenance, and pipelines
//! (their graphs, runs with live step states, their history). It uses the
//! same [`Engine`] and store as the command line, so a run in the browser and one in a
//! terminal reuse each other's results. HTML is rendered on the server; every value that
//! comes from an image, a log or a user goes through [`html::esc`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let store = Arc::new(kliko_store::Store::open("/tmp/kliko-store".as_ref())?);
//! let engine = Arc::new(kliko_engine::Engine::new(store));
//! let config = kliko_web::ServeConfig { data_roots: vec!["/data".into()], ..Default::default() };
//! kliko_web::serve(engine, config).await?;
//! # Ok(()) }
//! ```
//!
//! Security: the server binds to 127.0.0.1 by default. On any other address it requires a
//! token (generated and printed when not given): a request without it (as `?token=` once,
//! then an HttpOnly cookie) gets 401. The run form carries a per-server CSRF secret. Host
//! folders are only those inside the `--data-root` folders, after canonicalization.
//! Uploads are limited in size and kept in a private scratch folder of the store; when a form
//! comes back with errors its uploads are kept (an hour at most) for the corrected submission.
//!
//! Slow clients: a request's header must arrive within [`ServeConfig::header_timeout`]
//! (which also closes idle keep-alive connections), a whole request within
//! [`ServeConfig::request_timeout`] (408 after that; a response streaming its body is not cut),
//! and at most [`ServeConfig::max_connections`] connections are open at once: further ones
//! wait in the listen queue, unaccepted, so they hold no file descriptor of the server.

pub mod auth;
pub mod form;
pub mod html;
mod live;
pub mod paths;
mod routes;
pub mod runs;

pub use routes::pipelines;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use kliko_engine::Engine;
use tokio_util::sync::CancellationToken;

pub use paths::DataRoots;
pub use runs::{RunEntry, RunState};

/// Default upload limit: 1 GiB.
pub const DEFAULT_UPLOAD_LIMIT: u64 = 1 << 30;
pub const DEFAULT_BIND: &str = "127.0.0.1:8765";
/// Default time a client has to send a request's header: 10 s.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a request may take until its response starts (an upload included): 5 min.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Default number of connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub bind: SocketAddr,
    /// The only host folders the browser may use as input, output or work folders.
    pub data_roots: Vec<PathBuf>,
    /// Required for every request when set; generated when binding to a non-loopback
    /// address without one.
    pub token: Option<String>,
    /// Largest request body (the uploads of one form), in bytes.
    pub upload_limit: u64,
    /// A connection that has not sent a whole request header this long after it opened, or
    /// after its previous response, is closed.
    pub header_timeout: Duration,
    /// A request whose response has not started this long after its header arrived gets 408.
    pub request_timeout: Duration,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            bind: DEFAULT_BIND.parse().expect("valid default address"),
            data_roots: Vec::new(),
            token: None,
            upload_limit: DEFAULT_UPLOAD_LIMIT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen on `{addr}`")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the data folder `{}` cannot be used", path.display())]
    DataRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`max_connections` must be at least 1")]
    NoConnections,
}

/// What every request handler shares.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub roots: DataRoots,
    pub token: Option<String>,
    /// The CSRF secret every form carries.
    pub csrf: String,
    pub upload_limit: u64,
    /// See [`ServeConfig::request_timeout`].
    pub request_timeout: Duration,
    pub runs: runs::Registry,
    /// Pipeline runs started by this server.
    pub pipelines: pipelines::Registry,
    /// Image IDs without a (valid) kliko.yml, with the reason: not asked again.
    pub not_kliko: Mutex<HashMap<String, Option<String>>>,
    /// Ends live streams when the server stops.
    pub shutdown: CancellationToken,
    /// Files uploaded with a form that came back with errors, by the token the form carries:
    /// resubmitting it reuses them unless new ones are chosen.
    pub kept: Mutex<HashMap<String, routes::KeptUploads>>,
}

impl AppState {
    /// The state for `config`: canonical data roots, and a token when the address is not
    /// loopback and none was given.
    pub fn new(engine: Arc<Engine>, config: &ServeConfig) -> Result<Arc<AppState>, WebError> {
        let roots = DataRoots::new(&config.data_roots).map_err(|(path, source)| WebError::DataRoot { path, source })?;
        let token = match &config.token {
            Some(t) if !t.is_empty() => Some(t.clone()),
            _ if !config.bind.ip().is_loopback() => Some(auth::random_hex(16)),
            _ => None,
        };
        Ok(Arc::new(AppState {
            engine,
            roots,
            token,
            csrf: auth::random_hex(32),
            upload_limit: config.upload_limit,
            request_timeout: config.request_timeout,
            runs: runs::Registry::default(),
            pipelines: pipelines::Registry::default(),
            not_kliko: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            kept: Mutex::new(HashMap::new()),
        }))
    }

    /// The run with this id, started by this server.
    pub fn run(&self, id: &str) -> Option<Arc<RunEntry>> {
        self.runs.get(id)
    }
}

/// Every page and endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = usize::try_from(state.upload_limit).unwrap_or(usize::MAX);
    Router::new()
        .route("/", get(routes::index))
        .route("/image/{*reference}", get(routes::image_form).post(routes::submit).layer(DefaultBodyLimit::max(limit)))
        .route("/run/{id}", get(routes::run_page))
        .route("/run/{id}/events", get(routes::run_events))
        .route("/run/{id}/cancel", post(routes::run_cancel))
        .route("/run/{id}/file/{*path}", get(routes::run_file))
        .route("/folders", get(routes::picker::folders))
        .route("/pipelines", get(pipelines::list))
        .route("/pipeline/{*path}", get(pipelines::pipeline_page).post(pipelines::submit))
        .route("/pipeline-run/{id}", get(pipelines::run_page))
        .route("/pipeline-run/{id}/events", get(pipelines::run_events))
        .route("/pipeline-run/{id}/ro-crate", get(pipelines::run_crate))
        .route("/pipeline-run/{id}/cancel", post(pipelines::run_cancel))
        .route("/history", get(routes::history))
        .route("/provenance", get(routes::provenance_query))
        .route("/provenance/{q}", get(routes::provenance))
        .route("/provenance-crate/{digest}", get(routes::provenance_crate))
        .route("/result/{key}/files", get(routes::result_files))
        .route("/result/{key}/file/{*path}", get(routes::result_file))
        .route("/result/{key}/log/{stream}", get(routes::result_log))
        .fallback(routes::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token))
        .layer(axum::middleware::from_fn(auth::security_headers))
        .layer(axum::middleware::from_fn_with_state(state.clone(), request_timeout))
        .with_state(state)
}

/// 408 for a request whose response has not started within the configured time: a client
/// that sends its body slowly (or never) does not hold a connection for long.
async fn request_timeout(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(st.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => (
            axum::http::StatusCode::REQUEST_TIMEOUT,
            [(axum::http::header::CONNECTION, "close")],
            format!("the request was not complete within {} s\n", st.request_timeout.as_secs_f64()),
        )
            .into_response(),
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    addr: SocketAddr,
    header_timeout: Duration,
    max_connections: usize,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The address to open, with the token when there is one.
    pub fn url(&self) -> String {
        match &self.state.token {
            Some(t) => format!("http://{}/?token={}", self.addr, html::url_query(t)),
            None => format!("http://{}/", self.addr),
        }
    }

    /// Serve until `stop` is cancelled; then cancel the runs still going and wait for them.
    ///
    /// axum::serve has no header timeout nor connection limit, so connections are accepted
    /// here: a permit first (beyond the limit, connections wait in the kernel's listen queue
    /// and use none of our file descriptors), then hyper's HTTP/1 with a header timeout.
    pub async fn run_until(self, stop: CancellationToken) -> Result<(), WebError> {
        let state = self.state.clone();
        let app = router(state.clone());
        let permits = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let closing = CancellationToken::new();
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // not the server's end. Back off a little rather than spin.
                    Err(_) => {
                        drop(permit);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let closing = closing.clone();
            let header_timeout = self.header_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
                let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = closing.cancelled() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
        drop(self.listener);
        state.shutdown.cancel();
        closing.cancel();
        // A browser may keep connections open indefinitely: give requests in flight a
        // moment (every permit back means every connection closed), then stop regardless.
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(2), permits.acquire_many(all)).await;
        for run in state.runs.all() {
            run.cancel.cancel();
        }
        for run in state.pipelines.all() {
            run.cancel.cancel();
        }
        for run in state.runs.all() {
            run.wait().await;
        }
        for run in state.pipelines.all() {
            run.wait().await;
        }
        Ok(())
    }
}

/// Bind the listener and build the state.
pub async fn bind(engine: Arc<Engine>, config: ServeConfig) -> Result<Server, WebError> {
    if config.max_connections == 0 {
        return Err(WebError::NoConnections);
    }
    let state = AppState::new(engine, &config)?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|source| WebError::Bind { addr: config.bind, source })?;
    let addr = listener.local_addr().map_err(|source| WebError::Bind { addr: config.bind, source })?;
    Ok(Server {
        listener,
        state,
        addr,
        header_timeout: config.header_timeout,
        max_connections: config.max_connections.min(u32::MAX as usize).min(tokio::sync::Semaphore::MAX_PERMITS),
    })
}

/// Serve until Ctrl-C, printing the address to open.
pub async fn serve(engine: Arc<Engine>, config: ServeConfig) -> Result<(), WebError> {
    let server = bind(engine, config).await?;
    eprintln!("kliko web interface: {}", server.url());
    for r in server.state.roots.roots() {
        eprintln!("  data folder: {}", r.display());
    }
    if !server.addr.ip().is_loopback() {
        eprintln!("  reachable from other machines: only with the token above");
    }
    eprintln!("  stop with Ctrl-C");
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s2.cancel();
    });
    server.run_until(stop).await
}
