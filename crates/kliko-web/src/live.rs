//! Server-sent events of something going on (a run, a pipeline run): what happened so far,
//! then each message as it comes, until the last one or the server stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

/// A message of a live stream.
pub(crate) trait Live: Clone + Send + 'static {
    /// The last message: the stream ends after it.
    fn is_done(&self) -> bool;
    /// Said instead of `n` messages a slow viewer missed.
    fn lagged(n: u64) -> Self;
    fn event(self) -> Event;
}

/// `first` (the state so far; ending with the last message when it is over), then what `rx`
/// receives, until the last message, or `shutdown`.
pub(crate) fn sse<M: Live>(
    first: Vec<M>,
    rx: broadcast::Receiver<M>,
    shutdown: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let finished = first.last().is_some_and(M::is_done);
    let live = stream::unfold((rx, finished, shutdown), |(mut rx, ended, shutdown)| async move {
        if ended {
            return None;
        }
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = rx.recv() => m,
        };
        match msg {
            Ok(m) => {
                let end = m.is_done();
                Some((m, (rx, end, shutdown)))
            }
            Err(RecvError::Lagged(n)) => Some((M::lagged(n), (rx, false, shutdown))),
            Err(RecvError::Closed) => None,
        }
    });
    let all = futures_util::StreamExt::map(futures_util::StreamExt::chain(stream::iter(first), live), |m| {
        Ok::<_, Infallible>(m.event())
    });
    Sse::new(all).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
