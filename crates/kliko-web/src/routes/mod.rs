//! Request handlers, one module per part of the site: `images` (the image list and each
//! image's form), `run` (a run's page, live events, cancel, files), `results` (stored trees,
//! files and logs), `history`, `provenance`, `pipelines`, `picker` (the folder picker). What
//! they share is here: the error page, the engine's errors in the browser's words, the CSRF
//! check. Store work runs in `spawn_blocking`, and the index handle (`store.db()`)
//! lives only inside those closures: holding it would block every `kliko` command.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Form, Multipart, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use futures_util::stream::Stream;
use kliko_core::tree::Entry;
use kliko_core::Digest;
use kliko_engine::{Cache, EngineError, ImageMeta, Input, RunRequest};
use kliko_runtime::RuntimeError;
use kliko_spec::IoMode;
use kliko_store::records::ActionResult;
use kliko_store::{ObjectKind, Store};

use crate::form::{self, Errors, Submitted};
use crate::html::{self, badge, esc, page, url_path, url_query, Nav};
use crate::runs::{LiveMsg, RunEntry, RunObserver};
use crate::{auth, AppState};

type St = State<Arc<AppState>>;

/// An error page.
pub struct PageError(StatusCode, String);

impl PageError {
    pub(crate) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        PageError(status, msg.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = self.0.canonical_reason().unwrap_or("Error");
        let body =
            format!("<h1>{}</h1><div class=\"alert bad\">{}</div>", esc(title), esc(&self.1).replace('\n', "<br>"));
        (self.0, Html(page(title, Nav::None, &body))).into_response()
    }
}

use kliko_core::error_chain as chain;

/// An engine error as a browser user reads it: what went wrong, then, where there is
/// something to do about it, what (in this interface's terms, never a command-line flag).
pub(crate) fn explain(e: &EngineError) -> String {
    use kliko_runtime::Unreachable;
    let advice = match e {
        EngineError::Runtime(RuntimeError::Unreachable { reason: Unreachable::NotRunning, runtime, .. }) => {
            Some(format!("The {runtime} daemon on this server is not running: whoever runs this kliko server must start it. Nothing was run."))
        }
        EngineError::Runtime(RuntimeError::Unreachable { reason: Unreachable::PermissionDenied, runtime, .. }) => {
            Some(format!("This kliko server may not use {runtime}: whoever runs it must give its user access. Nothing was run."))
        }
        EngineError::Runtime(RuntimeError::ImageNotFound { .. }) => {
            Some("The image is not on this server: it must be built or pulled there first.".to_string())
        }
        _ => None,
    };
    match advice {
        Some(a) => format!("{}\n{a}", chain(e)),
        None => chain(e),
    }
}

pub(crate) fn internal(e: impl std::error::Error) -> PageError {
    PageError::new(StatusCode::INTERNAL_SERVER_ERROR, chain(&e))
}

/// Store work off the async threads; the index handle is opened and dropped inside `f`.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, kliko_store::StoreError> + Send + 'static,
) -> Result<T, PageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(internal),
        Err(e) => Err(PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

pub async fn not_found() -> PageError {
    PageError::new(StatusCode::NOT_FOUND, "there is no such page")
}

/// A form that carries nothing but the CSRF secret (a Cancel button).
#[derive(serde::Deserialize)]
pub struct CsrfForm {
    csrf: Option<String>,
}

/// A form's CSRF secret, checked before anything else of it is used.
pub(crate) fn check_csrf(st: &AppState, given: Option<&str>) -> Result<(), PageError> {
    if !given.is_some_and(|c| auth::ct_eq(c, &st.csrf)) {
        return Err(PageError::new(StatusCode::FORBIDDEN, "missing or wrong CSRF token"));
    }
    Ok(())
}

mod history;
mod images;
pub mod picker;
pub mod pipelines;
mod provenance;
mod results;
mod run;

pub use history::history;
pub use images::{image_form, index, submit, KeptUploads};
pub(crate) use provenance::crate_zip;
pub use provenance::{provenance, provenance_crate, provenance_query};
pub use results::{result_file, result_files, result_log};
pub use run::{run_cancel, run_events, run_file, run_page};

use images::{rfc3339, safe_name};
use results::{files_table, list_tree, serve_tree_file};
use run::status_badge;
