//! Where the Redis engine connects, and the command connection built from it.
//!
//! A [`Target`] is either one server (a URL, over TLS when it is `rediss://`) or the master
//! a group of Sentinels names. redis-rs does not follow a Sentinel failover (upstream
//! #1438): its connection manager keeps reconnecting to the old address. So a Sentinel
//! target follows the master itself:
//!
//! - a follower task listens for `+switch-master` on one Sentinel (the next one when that
//!   connection drops) and re-resolves on every such message;
//! - a connection error or a `READONLY` reply on any connection is a *suspicion*: the
//!   follower re-resolves, every 100 ms until a master answers (for at most 60 s, then
//!   again on the next suspicion);
//! - re-resolving asks each Sentinel `SENTINEL GET-MASTER-ADDR-BY-NAME` and accepts the
//!   first address whose server says it is a master (`ROLE`). A new address bumps the
//!   target's *generation*.
//!
//! Everything built from a target checks the generation: [`Managed::get`] replaces its
//! connection manager on the next call (the command connection and the watchdog's), and the
//! Notifier's listener reconnects its pub/sub connection, re-subscribes every channel and
//! sends every waiter a `Resync`.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use tokio::sync::{oneshot, watch, Notify};

use crate::error::{Error, ErrorKind, Result};

/// How often a suspicious target re-resolves until a master answers.
const RESOLVE_EVERY: Duration = Duration::from_millis(100);
/// How long a suspicion keeps the follower re-resolving.
const RESOLVE_FOR: Duration = Duration::from_secs(60);
/// The pause before the follower subscribes to the next Sentinel after losing one.
const SENTINEL_RETRY: Duration = Duration::from_millis(200);

/// Certificates for TLS connections: a CA to trust instead of the built-in roots, and a
/// client certificate for mutual TLS (PEM).
#[derive(Clone, Default)]
pub(crate) struct TlsFiles {
    pub(crate) ca: Option<Vec<u8>>,
    pub(crate) client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Whether neither a CA nor a client certificate was given.
    pub(crate) fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }

    /// These files as redis-rs wants them.
    #[cfg(feature = "tls-rustls")]
    pub(crate) fn certificates(&self) -> redis::TlsCertificates {
        // redis-rs builds its rustls config with the process's default crypto provider, or
        // the one the enabled crate features name. herdlock enables ring; if another crate
        // in the build enables aws-lc-rs too, neither is the default and rustls would
        // panic: install ring unless the application installed a provider of its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsFiles")
            .field("ca", &self.ca.is_some())
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

/// Where to connect, as the builder was told.
#[derive(Clone, Debug)]
pub(crate) enum Endpoint {
    /// One server.
    Url(String),
    /// The master the Sentinels at these URLs name `master`; its credentials, if any.
    Sentinel {
        master: String,
        sentinels: Vec<String>,
        auth: Option<(Option<String>, String)>,
    },
}

/// The server commands go to, followed across Sentinel failovers.
pub(crate) struct Target {
    sentinel: Option<SentinelSpec>,
    /// Whether connections use TLS (`rediss://`).
    uses_tls: bool,
    tls: TlsFiles,
    connect_timeout: Duration,
    current: Mutex<Current>,
    generation: watch::Sender<u64>,
    /// Wakes the follower to re-resolve.
    suspicion: Notify,
    /// One resolution at a time.
    resolving: tokio::sync::Mutex<()>,
    /// Dropped with the target: stops the follower.
    _shutdown: Option<oneshot::Sender<()>>,
}

struct SentinelSpec {
    master: String,
    sentinels: Vec<Client>,
    /// The master's connection settings (credentials, TLS), with a placeholder address.
    template: ConnectionInfo,
}

struct Current {
    client: Client,
    addr: Option<(String, u16)>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("sentinel", &self.sentinel.as_ref().map(|s| &s.master))
            .field("addr", &self.current().addr)
            .field("generation", &*self.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl Target {
    /// A target for `endpoint`. A URL is only parsed; a Sentinel target resolves its master
    /// now (within the connect timeout per Sentinel) and starts its follower task.
    pub(crate) async fn new(
        endpoint: &Endpoint,
        tls: TlsFiles,
        connect_timeout: Duration,
    ) -> Result<Arc<Target>> {
        match endpoint {
            Endpoint::Url(url) => Target::direct(url, tls, connect_timeout),
            Endpoint::Sentinel {
                master,
                sentinels,
                auth,
            } => Target::sentinel(master, sentinels, auth.as_ref(), tls, connect_timeout).await,
        }
    }

    /// A target for one server at `url`.
    pub(crate) fn direct(
        url: &str,
        tls: TlsFiles,
        connect_timeout: Duration,
    ) -> Result<Arc<Target>> {
        let info = parse_url(url, "redis url")?;
        let uses_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let client = build_client(info, &tls)?;
        Ok(Arc::new(Target {
            sentinel: None,
            uses_tls,
            tls,
            connect_timeout,
            current: Mutex::new(Current { client, addr: None }),
            generation: watch::channel(0).0,
            suspicion: Notify::new(),
            resolving: tokio::sync::Mutex::new(()),
            _shutdown: None,
        }))
    }

    async fn sentinel(
        master: &str,
        sentinels: &[String],
        auth: Option<&(Option<String>, String)>,
        tls: TlsFiles,
        connect_timeout: Duration,
    ) -> Result<Arc<Target>> {
        if master.is_empty() || master.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(format!(
                "sentinel master name {master:?} must be non-empty, without spaces"
            )));
        }
        if sentinels.is_empty() {
            return Err(Error::invalid(
                "connect_sentinel needs at least one sentinel url",
            ));
        }
        let mut clients = Vec::with_capacity(sentinels.len());
        let mut uses_tls = None;
        for url in sentinels {
            let info = parse_url(url, "sentinel url")?;
            let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
            if *uses_tls.get_or_insert(is_tls) != is_tls {
                return Err(Error::invalid(
                    "sentinel urls must be all redis:// or all rediss://",
                ));
            }
            clients.push(build_client(info, &tls)?);
        }
        // The master speaks TLS when the Sentinels do, with the same certificates.
        let scheme = if uses_tls == Some(true) {
            "rediss"
        } else {
            "redis"
        };
        let mut template = parse_url(&format!("{scheme}://127.0.0.1:6379/"), "sentinel url")?;
        if let Some((user, password)) = auth {
            let mut settings = template.redis_settings().clone().set_password(password);
            if let Some(user) = user {
                settings = settings.set_username(user);
            }
            template = template.set_redis_settings(settings);
        }
        let spec = SentinelSpec {
            master: master.to_owned(),
            sentinels: clients,
            template,
        };
        let (addr, client) = resolve_master(&spec, &tls, connect_timeout).await?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let target = Arc::new(Target {
            sentinel: Some(spec),
            uses_tls: uses_tls == Some(true),
            tls,
            connect_timeout,
            current: Mutex::new(Current {
                client,
                addr: Some(addr),
            }),
            generation: watch::channel(0).0,
            suspicion: Notify::new(),
            resolving: tokio::sync::Mutex::new(()),
            _shutdown: Some(shutdown_tx),
        });
        tokio::spawn(follow(Arc::downgrade(&target), shutdown_rx));
        Ok(target)
    }

    fn current(&self) -> MutexGuard<'_, Current> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The client of the current server, and its generation.
    pub(crate) fn client(&self) -> (Client, u64) {
        // The generation first: a client at least as new as the generation it is paired
        // with (a newer client under an older generation only causes one more rebuild).
        let generation = *self.generation.borrow();
        (self.current().client.clone(), generation)
    }

    /// The current generation: bumped each time the master moves (0 for one server).
    pub(crate) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Changes of the generation (a new master), for the pub/sub listener.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// `error` from connecting, with a hint when it may be a TLS mismatch.
    pub(crate) fn explain(&self, error: Error) -> Error {
        if error.kind() != ErrorKind::Connection {
            return error;
        }
        let hint = if self.uses_tls {
            "; the url is rediss:// (TLS): does the port speak TLS, and is its certificate trusted (tls_ca)?"
        } else {
            "; if the port speaks only TLS, use a rediss:// url"
        };
        error.with_hint(hint)
    }

    /// Whether this target follows a Sentinel master.
    pub(crate) fn is_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// Reports an error seen on a connection of this target: a connection error or a
    /// `READONLY` reply makes a Sentinel target re-resolve its master (in the background).
    pub(crate) fn noticed(&self, error: &Error) {
        if self.sentinel.is_some() && is_suspicious(error) {
            self.suspicion.notify_one();
        }
    }

    /// Re-resolves the master now (Sentinel targets; a no-op otherwise), bounded by `limit`.
    /// A caller then takes a fresh connection ([`Managed::get`]): it is rebuilt if the master
    /// moved, by this call or by another.
    pub(crate) async fn refresh(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.resolve()).await;
    }

    /// Asks the Sentinels for the master; installs it (a new generation) when it moved.
    async fn resolve(&self) -> Result<bool> {
        let Some(spec) = &self.sentinel else {
            return Ok(false);
        };
        let _one = self.resolving.lock().await;
        let (addr, client) = resolve_master(spec, &self.tls, self.connect_timeout).await?;
        {
            let mut current = self.current();
            if current.addr.as_ref() == Some(&addr) {
                return Ok(false);
            }
            tracing::info!(
                master = %spec.master,
                from = ?current.addr,
                to = ?addr,
                "sentinel master moved; rebuilding connections"
            );
            *current = Current {
                client,
                addr: Some(addr),
            };
        }
        self.generation.send_modify(|g| *g += 1);
        Ok(true)
    }
}

/// Whether `error` may mean the master moved: a connection failure, or a write refused by a
/// replica.
pub(crate) fn is_suspicious(error: &Error) -> bool {
    if error.kind() == ErrorKind::Connection {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        if s.to_string().contains("READONLY") {
            return true;
        }
        source = s.source();
    }
    false
}

pub(crate) fn parse_url(url: &str, what: &str) -> Result<ConnectionInfo> {
    if url.starts_with("rediss://") && !cfg!(feature = "tls-rustls") {
        return Err(Error::invalid(format!(
            "{what} is rediss:// (TLS), which needs herdlock's `tls-rustls` feature"
        )));
    }
    url.into_connection_info()
        .map_err(|e| Error::with_source(ErrorKind::InvalidInput, format!("invalid {what}"), e))
}

/// A client for `info`, with the custom CA and client certificate when there are any.
pub(crate) fn build_client(info: ConnectionInfo, tls: &TlsFiles) -> Result<Client> {
    let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    if tls.is_empty() {
        return Client::open(info)
            .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "invalid redis url", e));
    }
    if !is_tls {
        return Err(Error::invalid(
            "TLS certificates were given (tls_ca / tls_client_cert) but the url is not rediss://",
        ));
    }
    tls_client(info, tls)
}

/// `builder` with the custom CA and client certificate for every node, when there are any
/// (the caller checked that the node urls are `rediss://`).
pub(crate) fn with_cluster_tls(
    builder: redis::cluster::ClusterClientBuilder,
    tls: &TlsFiles,
) -> redis::cluster::ClusterClientBuilder {
    #[cfg(feature = "tls-rustls")]
    if !tls.is_empty() {
        return builder.certs(tls.certificates());
    }
    let _ = tls;
    builder
}

#[cfg(feature = "tls-rustls")]
fn tls_client(info: ConnectionInfo, tls: &TlsFiles) -> Result<Client> {
    Client::build_with_tls(info, tls.certificates()).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidInput,
            "invalid TLS certificates (tls_ca / tls_client_cert want PEM)",
            e,
        )
    })
}

#[cfg(not(feature = "tls-rustls"))]
fn tls_client(_info: ConnectionInfo, _tls: &TlsFiles) -> Result<Client> {
    Err(Error::invalid(
        "TLS certificates need herdlock's `tls-rustls` feature",
    ))
}

/// The master's address and a client for it: the first address a Sentinel names whose
/// server answers `ROLE` as a master.
async fn resolve_master(
    spec: &SentinelSpec,
    tls: &TlsFiles,
    connect_timeout: Duration,
) -> Result<((String, u16), Client)> {
    let mut last = None;
    for sentinel in &spec.sentinels {
        let named = bounded(connect_timeout, async {
            let mut conn = sentinel.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&spec.master)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        })
        .await
        .map_err(|e| refused_hint(e, "may not run `sentinel|get-master-addr-by-name` on a sentinel (its user needs the sentinel rule in README.md, \"Sentinel\")"));
        let (host, port) = match named {
            Ok(Some(addr)) => addr,
            Ok(None) => {
                last = Some(Error::new(
                    ErrorKind::Connection,
                    format!("a sentinel does not know master {:?}", spec.master),
                ));
                continue;
            }
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let addr = match spec.template.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.clone(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.clone(), port),
        };
        let client = build_client(spec.template.clone().set_addr(addr), tls)?;
        let role = bounded(connect_timeout, async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("ROLE")
                .query_async::<redis::Value>(&mut conn)
                .await
        })
        .await
        .map_err(|e| refused_hint(e, "may not run `role` on the master (its user needs the least-privilege rule plus `+role`)"));
        match role {
            Ok(redis::Value::Array(items)) if matches!(items.first(), Some(redis::Value::BulkString(b)) if b == b"master") =>
            {
                return Ok(((host, port), client));
            }
            Ok(_) => {
                last = Some(Error::new(
                    ErrorKind::Connection,
                    format!("{host}:{port}, named master by a sentinel, is not a master yet"),
                ));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::new(ErrorKind::Connection, "no sentinel answered")))
}

/// A permission refusal during the master lookup, with what was refused and the right to
/// grant; other errors as they are.
fn refused_hint(error: Error, what: &str) -> Error {
    if error.kind() == ErrorKind::Permission {
        error.with_hint(&format!(": {what}"))
    } else {
        error
    }
}

async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::redis("sentinel master lookup", e)),
        Err(_) => Err(Error::new(
            ErrorKind::Connection,
            format!("no answer within {limit:?} during sentinel master lookup"),
        )),
    }
}

/// The follower task of a Sentinel target: `+switch-master` messages and suspicions make it
/// re-resolve. Ends when the target is dropped.
async fn follow(weak: Weak<Target>, mut shutdown: oneshot::Receiver<()>) {
    let mut next_sentinel = 0usize;
    loop {
        // Subscribe to +switch-master on one Sentinel.
        let pubsub = {
            let Some(target) = weak.upgrade() else { return };
            let Some(spec) = &target.sentinel else { return };
            let sentinel = spec.sentinels[next_sentinel % spec.sentinels.len()].clone();
            next_sentinel += 1;
            let limit = target.connect_timeout;
            drop(target);
            let attempt = tokio::time::timeout(limit, async move {
                let mut pubsub = sentinel.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                redis::RedisResult::Ok(pubsub)
            });
            tokio::select! {
                _ = &mut shutdown => return,
                r = attempt => match r {
                    Ok(Ok(p)) => Some(p),
                    _ => None,
                },
            }
        };
        let mut stream = pubsub.map(redis::aio::PubSub::into_on_message);
        // Re-resolve once on (re)subscribing: a switch may have happened while unsubscribed.
        if let Some(target) = weak.upgrade() {
            target.suspicion.notify_one();
        }
        let mut suspicious_until: Option<tokio::time::Instant> = None;
        loop {
            let Some(target) = weak.upgrade() else { return };
            let retry = async {
                match suspicious_until {
                    Some(_) => tokio::time::sleep(RESOLVE_EVERY).await,
                    None => std::future::pending().await,
                }
            };
            let mut resolve = false;
            let lost_sentinel = tokio::select! {
                _ = &mut shutdown => return,
                () = target.suspicion.notified() => {
                    suspicious_until = Some(tokio::time::Instant::now() + RESOLVE_FOR);
                    resolve = true;
                    false
                }
                () = retry => {
                    resolve = true;
                    false
                }
                msg = next_message(&mut stream) => match msg {
                    Some(text) => {
                        let ours = target
                            .sentinel
                            .as_ref()
                            .is_some_and(|s| text.split(' ').next() == Some(s.master.as_str()));
                        if ours {
                            tracing::debug!(%text, "+switch-master");
                            suspicious_until = Some(tokio::time::Instant::now() + RESOLVE_FOR);
                            resolve = true;
                        }
                        false
                    }
                    None => true,
                },
            };
            if resolve {
                match target.resolve().await {
                    Ok(_) => suspicious_until = None,
                    Err(e) => {
                        tracing::debug!(error = %e, "sentinel master lookup failed; retrying");
                        if suspicious_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
                            suspicious_until = None;
                        }
                    }
                }
            }
            if lost_sentinel {
                break;
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            () = tokio::time::sleep(SENTINEL_RETRY) => {}
        }
    }
}

/// The next message payload on the Sentinel subscription; `None` when it ended (or there is
/// none, in which case this waits for the retry).
async fn next_message(
    stream: &mut Option<impl futures::Stream<Item = redis::Msg> + Unpin>,
) -> Option<String> {
    if let Some(s) = stream {
        let msg = s.next().await?;
        return Some(String::from_utf8_lossy(msg.get_payload_bytes()).into_owned());
    }
    tokio::time::sleep(SENTINEL_RETRY).await;
    None
}

/// The one-node command connection of a target: a connection manager, replaced on the
/// first call after the target's generation moved (a Sentinel failover).
pub(crate) struct Managed {
    target: Arc<Target>,
    config: ConnectionManagerConfig,
    slot: Mutex<(u64, ConnectionManager)>,
}

impl Managed {
    /// Wraps `first`, made from the target's client of `generation`.
    pub(crate) fn new(
        target: Arc<Target>,
        config: ConnectionManagerConfig,
        first: ConnectionManager,
        generation: u64,
    ) -> Managed {
        Managed {
            target,
            config,
            slot: Mutex::new((generation, first)),
        }
    }

    /// A connection manager that connects on first use.
    pub(crate) fn lazy(target: Arc<Target>, config: ConnectionManagerConfig) -> Result<Managed> {
        let (client, generation) = target.client();
        let first = ConnectionManager::new_lazy_with_config(client, config.clone())
            .map_err(|e| Error::redis("connect", e))?;
        Ok(Managed::new(target, config, first, generation))
    }

    /// The connection manager of the current master (a cheap clone), and the generation
    /// it was made for.
    pub(crate) fn get(&self) -> Result<(ConnectionManager, u64)> {
        let mut slot = self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *self.target.generation.borrow() != slot.0 {
            let (client, generation) = self.target.client();
            let conn = ConnectionManager::new_lazy_with_config(client, self.config.clone())
                .map_err(|e| Error::redis("connect", e))?;
            *slot = (generation, conn);
        }
        Ok((slot.1.clone(), slot.0))
    }
}
