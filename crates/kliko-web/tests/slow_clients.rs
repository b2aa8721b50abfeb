//! The server over real loopback sockets, against clients that send requests slowly or
//! never finish them: header and request timeouts, the connection limit, and the token
//! checked before a body is read. No Docker: the pages used here need only the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kliko_web::ServeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The connection-limit test counts this process's file descriptors: no other test of this
/// file may open sockets meanwhile.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long any one wait in these tests may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
    serving: tokio::task::JoinHandle<Result<(), kliko_web::WebError>>,
    _store: tempfile::TempDir,
}

impl Running {
    async fn start(configure: impl FnOnce(&mut ServeConfig)) -> Running {
        let store_dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(kliko_store::Store::open(store_dir.path()).expect("store"));
        let engine = Arc::new(kliko_engine::Engine::new(store));
        let mut config = ServeConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            data_roots: vec![store_dir.path().to_path_buf()],
            ..Default::default()
        };
        configure(&mut config);
        let server = kliko_web::bind(engine, config).await.expect("bind");
        let addr = server.local_addr();
        let stop = CancellationToken::new();
        let serving = tokio::spawn(server.run_until(stop.clone()));
        Running { addr, stop, serving, _store: store_dir }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.serving).await.expect("stops").expect("joins").expect("serves");
    }
}

/// Sends `request` on a new connection and reads the whole answer (the server closes the
/// connection after it: every request here says `Connection: close` or is refused).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut answer)).await.expect("an answer in time").expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

const HISTORY: &[u8] = b"GET /history HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
const PARTIAL: &[u8] = b"GET /history HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";

/// Opens `n` connections that each send part of a request header and nothing more.
async fn partial_clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(PARTIAL).await.expect("write");
        conns.push(s);
    }
    conns
}

/// Waits until the server closes `s`; returns what it sent first, if anything.
async fn until_closed(mut s: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await {
        Ok(Ok(_)) => got,
        // A reset is a close too.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => got,
        Ok(Err(e)) => panic!("read: {e}"),
        Err(_) => panic!("the server kept a connection with a partial header open for {PATIENCE:?}"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn partial_headers_are_closed_after_the_header_timeout_while_others_are_served() {
    let _serial = SERIAL.lock().await;
    let timeout = Duration::from_secs(2);
    let server = Running::start(|c| {
        c.header_timeout = timeout;
        c.max_connections = 400;
    })
    .await;
    let opened = Instant::now();
    let slow = partial_clients(server.addr, 300).await;
    // While all 300 are open, a whole request is answered at once.
    let answer = exchange(server.addr, HISTORY).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(opened.elapsed() < timeout, "answered only after the slow ones were closed");
    let closing: Vec<_> = slow.into_iter().map(|s| tokio::spawn(until_closed(s))).collect();
    for c in closing {
        let first = c.await.expect("joins");
        assert!(first.is_empty() || first.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&first));
    }
    let elapsed = opened.elapsed();
    assert!(elapsed >= timeout, "closed before the timeout: {elapsed:?}");
    assert!(elapsed < timeout + Duration::from_secs(10), "closed long after the timeout: {elapsed:?}");
    // And the server goes on.
    assert!(exchange(server.addr, HISTORY).await.starts_with("HTTP/1.1 200 OK"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_wait_unaccepted_and_hold_no_descriptor() {
    let _serial = SERIAL.lock().await;
    let limit = 4;
    let server = Running::start(|c| {
        c.header_timeout = Duration::from_millis(500);
        c.max_connections = limit;
    })
    .await;
    let before = open_fds();
    let slow = partial_clients(server.addr, 40).await;
    // Queued behind the 40 slow ones: answered once they have timed out, 4 at a time.
    let whole = tokio::spawn(exchange(server.addr, HISTORY));
    let mut most = 0;
    while !whole.is_finished() {
        most = most.max(open_fds().saturating_sub(before));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = whole.await.expect("joins");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    // Our 41 client sockets, at most 4 accepted ones, a few for the store and the runtime;
    // without the limit the server would hold 40 more.
    assert!(most <= 41 + limit + 8, "{most} descriptors more than before");
    for s in slow {
        until_closed(s).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_never_comes_gets_408_after_the_request_timeout() {
    let _serial = SERIAL.lock().await;
    let timeout = Duration::from_secs(1);
    let server = Running::start(|c| c.request_timeout = timeout).await;
    let started = Instant::now();
    // The cancel endpoint reads its whole (small) body before it answers.
    let answer =
        exchange(
            server.addr,
            b"POST /run/nope/cancel HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ncsrf=",
        )
            .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("not complete within 1 s"), "{answer}");
    assert!(started.elapsed() >= timeout);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_token_a_request_is_refused_before_its_body_is_read() {
    let _serial = SERIAL.lock().await;
    // A long request timeout: the answer must come from the token check, not the timeout.
    let server = Running::start(|c| {
        c.token = Some("secret".into());
        c.request_timeout = Duration::from_secs(600);
    })
    .await;
    let answer = exchange(
        server.addr,
        b"POST /image/x HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    server.stop().await;
}
