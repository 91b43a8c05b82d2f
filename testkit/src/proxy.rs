//! A TCP proxy between a client and a `redis-server`, for partition faults.
//!
//! [`Proxy::start`] listens on a free loopback port and forwards every connection it accepts
//! to the server, both ways. Give one client (a holder) the proxy's [`url`](Proxy::url) and
//! everyone else the server's own: then [`freeze`](Proxy::freeze) partitions that one client
//! while Redis stays up for the others. A freeze stops forwarding bytes but keeps every
//! socket open, as a network partition does: the client sees no error, only silence, until
//! its own timeouts fire. [`thaw`](Proxy::thaw) delivers what was held back;
//! [`cut`](Proxy::cut) closes every connection (the client sees the connection drop).
//!
//! The proxy runs on a thread of its own with its own Tokio runtime, so it works the same
//! from async and sync tests and keeps forwarding while a test's runtime is busy. Dropping
//! the [`Proxy`] stops it and closes every connection.
//!
//! While frozen, a direction still reads one buffer (up to 16 KiB) from its source and holds
//! it ([`held`](Proxy::held)), so a test can wait until a request (or a reply) is in the
//! proxy's hands before it acts; beyond that, TCP flow control stops the sender.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::server::RedisServer;

/// The size of one forwarding buffer (per direction, per connection).
const BUFFER: usize = 16 * 1024;

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Requests: client → server.
    ToServer,
    /// Replies and pub/sub messages: server → client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// Which directions are frozen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Frozen {
    to_server: bool,
    to_client: bool,
}

impl Frozen {
    fn blocks(self, direction: Direction) -> bool {
        match direction {
            Direction::ToServer => self.to_server,
            Direction::ToClient => self.to_client,
        }
    }
}

/// State shared by the test (control side) and the proxy thread.
#[derive(Debug)]
struct Control {
    frozen: watch::Sender<Frozen>,
    /// Bumped by every cut; a connection closes when it changes.
    cuts: watch::Sender<u64>,
    /// Set when the proxy is dropped.
    stop: watch::Sender<bool>,
    /// Connections open now.
    open: AtomicUsize,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Bytes read from one side but not yet written to the other, per direction.
    held: [AtomicU64; 2],
    /// Notified whenever `held` or `open` changes.
    changed: Notify,
}

/// A running proxy in front of one server. See the module docs.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    /// The server's URL with the proxy's port in place of the server's.
    url: String,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy in front of `server` on a free loopback port. It forwards (not frozen)
    /// from the moment this returns.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound or the proxy thread cannot start.
    pub fn start(server: &RedisServer) -> Proxy {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("binding 127.0.0.1:0 works: the tests need loopback networking");
        listener
            .set_nonblocking(true)
            .expect("a listener can be made non-blocking");
        let port = listener
            .local_addr()
            .expect("a bound listener has an address")
            .port();
        let server_url = server.url();
        let suffix = format!("127.0.0.1:{}/", server.port());
        let url = format!(
            "{}127.0.0.1:{port}/",
            server_url
                .strip_suffix(&suffix)
                .expect("the server's URL ends with its address")
        );
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port()));
        let control = Arc::new(Control {
            frozen: watch::Sender::new(Frozen::default()),
            cuts: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            held: [AtomicU64::new(0), AtomicU64::new(0)],
            changed: Notify::new(),
        });
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn({
                let control = Arc::clone(&control);
                move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("the proxy's runtime starts");
                    // Dropping the runtime at the end drops every connection task, which
                    // closes its sockets.
                    runtime.block_on(accept_loop(listener, upstream, control));
                }
            })
            .expect("the proxy thread starts");
        Proxy {
            port,
            url,
            control,
            thread: Some(thread),
        }
    }

    /// The port the proxy listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to connect through the proxy: the server's URL (password included) with the
    /// proxy's port.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops forwarding in both directions; sockets stay open and nothing is lost.
    pub fn freeze(&self) {
        self.set(Frozen {
            to_server: true,
            to_client: true,
        });
    }

    /// Stops forwarding replies (server → client) only: requests still reach the server, so
    /// a command is applied while its reply is held back.
    pub fn freeze_replies(&self) {
        self.set(Frozen {
            to_server: false,
            to_client: true,
        });
    }

    /// Resumes forwarding both ways; whatever was held is delivered first, in order.
    pub fn thaw(&self) {
        self.set(Frozen::default());
    }

    /// Closes every open connection at once (frozen or not), dropping whatever was held.
    /// New connections are accepted as before.
    pub fn cut(&self) {
        self.control.cuts.send_modify(|n| *n += 1);
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.control.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the proxy started.
    pub fn accepted(&self) -> u64 {
        self.control.accepted.load(Ordering::SeqCst)
    }

    /// Bytes read in `direction` and not yet passed on: held by a freeze (or, for an
    /// instant, on their way through).
    pub fn held(&self, direction: Direction) -> u64 {
        self.control.held[direction.index()].load(Ordering::SeqCst)
    }

    /// Waits until at least `bytes` are held in `direction`.
    ///
    /// # Panics
    ///
    /// If that does not happen within `timeout`.
    pub async fn wait_held(&self, direction: Direction, bytes: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.control.changed.notified();
            if self.held(direction) >= bytes {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, changed).await.is_err() {
                assert!(
                    self.held(direction) >= bytes,
                    "the proxy never held {bytes} bytes going {direction:?} within {timeout:?} (held: {})",
                    self.held(direction)
                );
                return;
            }
        }
    }

    fn set(&self, frozen: Frozen) {
        self.control.frozen.send_replace(frozen);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.control.stop.send_replace(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until the proxy is dropped.
async fn accept_loop(listener: StdListener, upstream: SocketAddr, control: Arc<Control>) {
    let listener = TcpListener::from_std(listener).expect("a tokio listener from a std one");
    let mut stop = control.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                control.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(client, upstream, Arc::clone(&control)));
            }
            Err(e) => eprintln!("test proxy: accept failed: {e}"),
        }
    }
}

/// Counts an open connection while it lives.
struct Open<'a>(&'a Control);

impl<'a> Open<'a> {
    fn new(control: &'a Control) -> Open<'a> {
        control.open.fetch_add(1, Ordering::SeqCst);
        control.changed.notify_waiters();
        Open(control)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Forwards one connection both ways until either side closes it or the proxy cuts it.
async fn serve(client: TcpStream, upstream: SocketAddr, control: Arc<Control>) {
    let _open = Open::new(&control);
    let mut cuts = control.cuts.subscribe();
    let generation = *cuts.borrow_and_update();
    let server = tokio::select! {
        _ = cuts.changed() => return,
        server = TcpStream::connect(upstream) => server,
    };
    let Ok(server) = server else {
        return; // dropping `client` closes it: the client sees the server as unreachable
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let both = async {
        tokio::join!(
            pump(
                client_read,
                server_write,
                Direction::ToServer,
                &control,
                generation,
            ),
            pump(
                server_read,
                client_write,
                Direction::ToClient,
                &control,
                generation,
            ),
        )
    };
    tokio::select! {
        _ = both => {}
        _ = cuts.changed() => {}
    }
    // Dropping the halves closes both sockets.
}

/// Copies `from` to `to`, waiting out freezes of `direction` between reading and writing.
/// Dropping `to` at the end (EOF, an error, or a cut) shuts its write side down. Nothing
/// is written once the connection's `generation` has been cut, even if a thaw wakes this
/// pump before the connection task has seen the cut (`cut(); thaw();` drops what was held).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    control: &Control,
    generation: u64,
) -> io::Result<()> {
    let cuts = control.cuts.subscribe();
    let mut frozen = control.frozen.subscribe();
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        let held = Held::new(control, direction, n as u64);
        if frozen.wait_for(|f| !f.blocks(direction)).await.is_err() {
            return Err(io::Error::other("the proxy stopped"));
        }
        if *cuts.borrow() != generation {
            return Err(io::Error::other("the connection was cut"));
        }
        // No longer held once it is on its way: the other side may see it before this
        // task runs again, and a test waiting for held bytes must not count it then.
        drop(held);
        to.write_all(&buffer[..n]).await?;
    }
}

/// Counts bytes read but not yet passed on, until dropped (on their way, or the pump was
/// cut).
struct Held<'a> {
    control: &'a Control,
    direction: Direction,
    bytes: u64,
}

impl<'a> Held<'a> {
    fn new(control: &'a Control, direction: Direction, bytes: u64) -> Held<'a> {
        control.held[direction.index()].fetch_add(bytes, Ordering::SeqCst);
        control.changed.notify_waiters();
        Held {
            control,
            direction,
            bytes,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.control.held[self.direction.index()].fetch_sub(self.bytes, Ordering::SeqCst);
        self.control.changed.notify_waiters();
    }
}
