//! A TCP proxy between a client under test and a server (RabbitMQ), to cut
//! the client's connection at a chosen point: after exactly N bytes from
//! the client, so a test can land the cut inside any step of a protocol
//! exchange (handshake, declarations, subscriptions), or all at once.
//!
//! ```ignore
//! let proxy = Proxy::start("127.0.0.1:5672").await;
//! config.amqp_url = proxy.url(&amqp_url());
//! proxy.cut_next_after(300); // the next connection dies after 300 bytes
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Forwards every connection accepted on a random local port to a target
/// address, both ways, and cuts connections when told. Everything stops
/// when it is dropped.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

/// What the accept loop and the connection tasks share with the handle.
#[derive(Default)]
struct State {
    /// Bytes forwarded client → server, over every connection.
    client_bytes: AtomicU64,
    /// The first [`CAPTURE_LIMIT`] bytes clients sent, over every
    /// connection in the order forwarded (to show what crossed the wire).
    captured: Mutex<Vec<u8>>,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Connections closed by a `cut_next_after` limit.
    cuts: AtomicU64,
    /// The limit for the next accepted connection, taken when it arrives.
    cut_next: Mutex<Option<u64>>,
    /// The open connections' tasks: aborting one drops both its sockets.
    open: Mutex<Vec<AbortHandle>>,
    /// Set when the proxy is dropped: a connection the accept loop was
    /// still registering is then closed by the loop itself.
    closed: AtomicBool,
}

/// How much of what clients send a proxy keeps for [`Proxy::client_sent`].
pub const CAPTURE_LIMIT: usize = 1 << 20;

impl State {
    /// Counts and keeps (up to the limit) bytes a client sent.
    fn sent(&self, bytes: &[u8]) {
        self.client_bytes
            .fetch_add(bytes.len() as u64, Ordering::SeqCst);
        let mut captured = self.captured.lock().unwrap_or_else(PoisonError::into_inner);
        let room = CAPTURE_LIMIT.saturating_sub(captured.len());
        captured.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Vec<AbortHandle>> {
        // A test that panicked mid-way must not make the others' cleanup panic.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why one direction of a connection stopped.
enum Stop {
    /// The limit was reached: the whole connection goes, at once.
    Cut,
    /// Read or write failed: the whole connection goes too.
    Failed,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards each accepted connection to
    /// `target` (`host:port`). Must be called within a tokio runtime.
    ///
    /// # Panics
    ///
    /// When the local port cannot be bound.
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port for the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(State::default());
        let accept = tokio::spawn(accept_loop(listener, target.to_owned(), Arc::clone(&state)));
        Proxy {
            port,
            state,
            accept,
        }
    }

    /// The local port clients should connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `amqp_url` (or any `scheme://[userinfo@]host[:port][/path][?query]`
    /// URL) with its host and port replaced by the proxy's.
    ///
    /// # Panics
    ///
    /// When `amqp_url` has no `://`.
    pub fn url(&self, amqp_url: &str) -> String {
        let (scheme, userinfo, _, tail) = split_url(amqp_url);
        format!("{scheme}://{userinfo}127.0.0.1:{}{tail}", self.port)
    }

    /// The next connection accepted (only that one) is closed, both its
    /// sockets dropped, as soon as `n` bytes have gone from its client to
    /// the server: exactly `n` are forwarded, the rest of that read is not.
    /// `0` closes it on accept. Later connections pass untouched.
    pub fn cut_next_after(&self, n: u64) {
        *self
            .state
            .cut_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(n);
    }

    /// Bytes forwarded from clients to the server so far, over every
    /// connection (to measure what a protocol exchange takes).
    pub fn client_bytes(&self) -> u64 {
        self.state.client_bytes.load(Ordering::SeqCst)
    }

    /// What clients sent through the proxy so far, as it crossed the wire
    /// (the first [`CAPTURE_LIMIT`] bytes, all connections one after
    /// another): to show whether a secret travelled in clear.
    pub fn client_sent(&self) -> Vec<u8> {
        self.state
            .captured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed so far by a [`Proxy::cut_next_after`] limit
    /// (one that was set but never reached does not count).
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Closes every open connection now (both sockets of each); new ones
    /// are still accepted.
    pub fn cut_all(&self) {
        for task in self.state.open().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The flag goes up before `cut_all` takes the lock, so a connection
        // the accept loop registers after that sees it (see `accept_loop`).
        self.state.closed.store(true, Ordering::SeqCst);
        self.accept.abort();
        self.cut_all();
    }
}

/// Whether `needle` occurs in `haystack` (say, a secret in what a client
/// sent, [`Proxy::client_sent`]).
pub fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The `host:port` a URL points at (what [`Proxy::start`] takes), with
/// the scheme's default port when it names none: `amqp` 5672, `amqps`
/// 5671, `postgres`/`postgresql` 5432.
///
/// # Panics
///
/// When `url` has no `://`, or no port and another scheme.
pub fn address_of(url: &str) -> String {
    let (scheme, _, host_port, _) = split_url(url);
    // A port is what follows the last ':', unless that is inside an IPv6
    // literal's brackets.
    if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        return host_port.to_owned();
    }
    let port = match scheme {
        "amqp" => 5672,
        "amqps" => 5671,
        "postgres" | "postgresql" => 5432,
        other => panic!("no default port known for scheme {other:?} in {url:?}"),
    };
    format!("{host_port}:{port}")
}

/// Splits `scheme://[userinfo@]host[:port][/path][?query]` into the
/// scheme, the user info with its `@` (or ""), `host[:port]`, and the rest.
fn split_url(url: &str) -> (&str, &str, &str, &str) {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("{url:?} is not a URL"));
    // The authority runs to the path or the query, whichever comes first.
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    // A password may hold '@' only percent-encoded, so the last '@' ends
    // the user info.
    let at = authority.rfind('@').map_or(0, |at| at + 1);
    let (userinfo, host_port) = authority.split_at(at);
    (scheme, userinfo, host_port, tail)
}

async fn accept_loop(listener: TcpListener, target: String, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or the like: the client sees a refusal or
            // a timeout, which a test of a flaky network can take. Pause,
            // not to spin while the condition lasts.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let limit = state
            .cut_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let task = tokio::spawn(forward(client, target.clone(), limit, Arc::clone(&state)));
        let mut open = state.open();
        open.retain(|t| !t.is_finished());
        open.push(task.abort_handle());
        // The proxy was dropped while this one was being accepted, after
        // its drop had closed the others (on another thread).
        if state.closed.load(Ordering::SeqCst) {
            open.drain(..).for_each(|t| t.abort());
            return;
        }
    }
}

/// Carries one connection both ways until both sides are done, or until
/// the limit is reached or a side fails (then both sockets are dropped).
async fn forward(client: TcpStream, target: String, limit: Option<u64>, state: Arc<State>) {
    if limit == Some(0) {
        state.cuts.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let Ok(server) = TcpStream::connect(&target).await else {
        return; // dropping the client tells it as a server down would
    };
    // Small protocol frames should not wait for Nagle on our account.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, limit, Some(&state));
    let down = pump(server_read, client_write, None, None);
    // try_join ends (dropping the other direction's halves) at the first
    // Stop; an orderly end of one direction lets the other finish.
    if let Err(Stop::Cut) = tokio::try_join!(up, down) {
        state.cuts.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until end of stream (then shuts `to`'s write side,
/// as the sender did), or until `limit` bytes went through; what went is
/// told to `counter` (the client's direction only).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    limit: Option<u64>,
    counter: Option<&State>,
) -> Result<(), Stop> {
    let mut left = limit;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| Stop::Failed)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let send = match left {
            Some(left) => n.min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => n,
        };
        to.write_all(&buf[..send]).await.map_err(|_| Stop::Failed)?;
        if let Some(counter) = counter {
            counter.sent(&buf[..send]);
        }
        if let Some(left) = &mut left {
            *left -= send as u64;
            if *left == 0 {
                return Err(Stop::Cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    /// An echo server on a random port that also reports, at the end of
    /// each connection, everything it received. Returns its address.
    async fn echo() -> (String, mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        got.extend_from_slice(&buf[..n]);
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = tx.send(got);
                });
            }
        });
        (addr, rx)
    }

    /// Reads until end of stream or error (within 5 s); returns what came.
    async fn read_all(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out));
        // A reset instead of an orderly close is a close all the same.
        let _ = read.await.expect("the proxy closed the connection");
        out
    }

    #[tokio::test]
    async fn forwards_counts_and_cuts_the_next_connection_after_n_bytes() {
        let (target, mut received) = echo().await;
        let proxy = Proxy::start(&target).await;
        let addr = format!("127.0.0.1:{}", proxy.port());

        proxy.cut_next_after(5);
        let mut cut = TcpStream::connect(&addr).await.unwrap();
        cut.write_all(b"hello world").await.unwrap();
        // The echo may or may not make it back before the cut.
        assert!(b"hello".starts_with(&read_all(&mut cut).await));
        assert_eq!(received.recv().await.unwrap(), b"hello", "5 bytes went");
        assert_eq!(proxy.cuts(), 1);

        let mut whole = TcpStream::connect(&addr).await.unwrap();
        whole.write_all(b"hello world").await.unwrap();
        whole.shutdown().await.unwrap();
        assert_eq!(read_all(&mut whole).await, b"hello world", "untouched");
        assert_eq!(received.recv().await.unwrap(), b"hello world");
        assert_eq!(proxy.client_bytes(), 16);
        assert_eq!(
            proxy.client_sent(),
            b"hellohello world",
            "what crossed, in order"
        );
        assert_eq!(proxy.connections(), 2);
        assert_eq!(proxy.cuts(), 1);

        let mut open = TcpStream::connect(&addr).await.unwrap();
        open.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).await.unwrap();
        proxy.cut_all();
        assert_eq!(read_all(&mut open).await, b"", "closed by cut_all");
        assert_eq!(received.recv().await.unwrap(), b"x");
    }

    #[tokio::test]
    async fn urls_point_at_the_proxy() {
        let proxy = Proxy::start("127.0.0.1:1").await;
        let p = proxy.port();
        assert_eq!(
            proxy.url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            format!("amqp://guest:guest@127.0.0.1:{p}/%2f")
        );
        assert_eq!(
            proxy.url("amqp://mq?heartbeat=5"),
            format!("amqp://127.0.0.1:{p}?heartbeat=5")
        );
        assert_eq!(address_of("amqp://u:p@mq:5673/%2f"), "mq:5673");
        assert_eq!(address_of("amqp://u:p@mq/%2f"), "mq:5672");
        assert_eq!(address_of("amqps://[::1]?x=1"), "[::1]:5671");
        assert_eq!(address_of("amqp://[::1]:5000"), "[::1]:5000");
    }
}
