//! The Redis engine: the command steps (one Lua script each, `src/scripts/`) on a
//! command connection, and a [`Notifier`] for pub/sub notices.
//!
//! The engine variants differ only in two places, each behind a seam: the command
//! connection ([`conn`]: how a script is sent and reloaded) and the notifier
//! ([`notifier`]: how channels are subscribed and kept alive). Reply parsing and the wire
//! formats live in `backend/wire.rs`.
//!
//! ## Behaviour in the background
//!
//! - The one-node command connection is a redis-rs `ConnectionManager`: after an I/O error
//!   it reconnects on its own (a few retries with exponential backoff, each bounded by the
//!   connect timeout). Every command is also bounded by the command timeout.
//! - One listener task per herd owns the notifier's connection (see [`notifier`]).
//! - A one-node engine reaches its server through a `backend/target.rs` target: one URL
//!   (TLS for `rediss://`), or the master of a Sentinel group. Errors that may mean the
//!   master moved are reported to it (`noticed`); when it moves, the command connection
//!   (and the watchdog's), the notifier's pub/sub connection and the clock probe's
//!   connection are rebuilt on the new master, and the clock's old samples are dropped.
//! - A lazy backend runs the connect checks (`preflight.rs`) before its first command;
//!   concurrent first calls wait for that one check, and a refusal is repeated for 5 s
//!   before the next call checks again.

mod clocks;
mod conn;
mod notifier;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Value;

use self::clocks::ClusterClocks;
use self::conn::{bounded, manager_config, Commands, Conn, Invocation, Lua};
pub(crate) use self::notifier::ChannelGuard;
use self::notifier::Notifier;
use super::clock::RedisClock;
use super::gate::Gate;
use super::preflight::Preflight;
use super::target::{self, Endpoint, Managed, TlsFiles};
use super::wire::{
    array, int, malformed, parse_acquire, parse_check, parse_multi_acquire, parse_multi_extend,
    parse_semaphore, parse_status,
};
use super::{
    AcquireReply, CheckReply, FanoutReply, MultiReply, ResultAges, SemArgs, SemOp, SemReply,
    StatusReply, Subscription,
};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{micros, millis, JobKeys};

/// How long a lazy herd whose connect checks failed (eviction, permissions) answers every
/// call with that failure before checking again.
const RECHECK_AFTER: Duration = Duration::from_secs(5);

/// Connection settings the backend needs from the herd's options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
}

#[derive(Clone)]
pub(crate) struct RedisBackend {
    inner: Arc<Inner>,
    /// The herd's gate (shared with its watchdog's detached backend).
    gate: Arc<Gate>,
}

/// The engine variant and how to reach it again (a detached backend, the clock probe, the
/// connect checks).
#[derive(Clone)]
enum Target {
    /// One Redis node, or the master of a Sentinel group (followed across failovers).
    Single(Arc<target::Target>),
    /// A Redis Cluster: its seed node URLs, the command client, and each master's clock.
    Cluster {
        nodes: Arc<[String]>,
        client: Box<redis::cluster::ClusterClient>,
        clocks: Arc<ClusterClocks>,
    },
}

impl Target {
    fn sharded(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }
}

struct Inner {
    target: Target,
    conn: Commands,
    /// A bound on the server's clock, from the replies that carry it.
    clock: Arc<RedisClock>,
    /// A connection of its own for clock probes, opened on the first probe: under load
    /// the command connection's queue would make every probe as slow as the load.
    /// With the target generation it was made for: a Sentinel failover replaces it.
    probe: tokio::sync::Mutex<Option<(u64, redis::aio::MultiplexedConnection)>>,
    /// Held while the first clock sample is taken.
    first_probe: tokio::sync::Mutex<()>,
    scripts: Scripts,
    /// `None` for a detached command-only backend (the watchdog's).
    notifier: Option<Notifier>,
    settings: ConnectSettings,
    /// The connect checks a lazy backend runs before its first command. `None` when they
    /// ran at connect (or, for a detached backend, are its parent's).
    checks: Option<LazyChecks>,
}

/// The connect checks of a lazy herd: run once, by the first call, while later calls wait.
struct LazyChecks {
    preflight: Preflight,
    /// Set once the checks passed; read without the lock on every call.
    passed: AtomicBool,
    /// The last refusal (eviction, permissions) and when it was found: repeated for
    /// [`RECHECK_AFTER`] without asking Redis again. The lock also makes concurrent
    /// first calls wait for one check instead of each running their own.
    refused: tokio::sync::Mutex<Option<(tokio::time::Instant, Error)>>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("cluster", &self.inner.target.sharded())
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    acquire: Lua,
    release: Lua,
    extend: Lua,
    status: Lua,
    fanout_acquire: Lua,
    fanout_check: Lua,
    complete: Lua,
    multi_acquire: Lua,
    multi_release: Lua,
    multi_extend: Lua,
    semaphore: Lua,
}

impl Scripts {
    /// Every script; `sharded` (a cluster) publishes with `SPUBLISH`.
    fn load(sharded: bool) -> Scripts {
        let lua = |source: &str| Lua::new(source, sharded);
        Scripts {
            acquire: lua(include_str!("../../scripts/acquire.lua")),
            release: lua(include_str!("../../scripts/release.lua")),
            extend: lua(include_str!("../../scripts/extend.lua")),
            status: lua(include_str!("../../scripts/status.lua")),
            fanout_acquire: lua(include_str!("../../scripts/fanout_acquire.lua")),
            fanout_check: lua(include_str!("../../scripts/fanout_check.lua")),
            complete: lua(include_str!("../../scripts/complete.lua")),
            multi_acquire: lua(include_str!("../../scripts/multi_acquire.lua")),
            multi_release: lua(include_str!("../../scripts/multi_release.lua")),
            multi_extend: lua(include_str!("../../scripts/multi_extend.lua")),
            semaphore: lua(include_str!("../../scripts/semaphore.lua")),
        }
    }
}

impl RedisBackend {
    /// Opens both connections and waits for them to be established, so a wrong address or
    /// password is reported now; then runs the connect checks (eviction policy,
    /// permissions). Nothing keeps running when this fails. A cluster URL
    /// (`redis+cluster://…`, see [`conn::cluster_nodes`]) connects to a Redis Cluster.
    pub(crate) async fn connect(
        endpoint: &Endpoint,
        tls: TlsFiles,
        settings: ConnectSettings,
        preflight: Preflight,
    ) -> Result<RedisBackend> {
        if let Endpoint::Url(url) = endpoint {
            if let Some(nodes) = conn::cluster_nodes(url) {
                return RedisBackend::connect_cluster(&nodes?, &tls, settings, preflight).await;
            }
        }
        let target = target::Target::new(endpoint, tls, settings.connect_timeout).await?;
        let (client, generation) = target.client();
        let config = manager_config(settings);
        // The pub/sub connection first: one attempt within the connect timeout, so that a
        // server that never answers (a rediss:// url on a plain port: Redis waits for the
        // end of an inline command that never comes) fails within the connect timeout.
        let mut pubsub = bounded(
            "connect",
            settings.connect_timeout,
            client.get_async_pubsub(),
        )
        .await
        .map_err(|e| target.explain(e))?;
        let mut conn = bounded(
            "connect",
            settings.connect_timeout * 2,
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await
        .map_err(|e| target.explain(e))?;
        preflight
            .run(
                &client,
                &mut conn,
                Some(&mut pubsub),
                settings.command_timeout,
            )
            .await?;
        let notifier = Notifier::start(Arc::clone(&target), Some(pubsub), settings);
        let managed = Managed::new(Arc::clone(&target), config, conn, generation);
        let backend = RedisBackend::assemble(
            Target::Single(target),
            Commands::Single(managed),
            notifier,
            settings,
            None,
        );
        // One sample of Redis's clock now, while the process is likely quiet: a fan-out
        // right after connecting (in a busy process) then starts with a tight bound.
        if let Ok((mut conn, generation)) = backend.inner.conn.get() {
            sample_clock(&backend.inner, &mut conn, generation).await;
        }
        Ok(backend)
    }

    /// As [`connect`](RedisBackend::connect), to the Redis Cluster that `nodes` (seed node
    /// URLs) belong to: a cluster command connection, a RESP3 cluster connection for
    /// sharded pub/sub, and the connect checks on every master.
    pub(crate) async fn connect_cluster(
        nodes: &[String],
        tls: &TlsFiles,
        settings: ConnectSettings,
        preflight: Preflight,
    ) -> Result<RedisBackend> {
        let client = conn::cluster_client(nodes, settings, tls, None)?;
        let mut commands = bounded(
            "connect (cluster)",
            settings.connect_timeout * 2,
            client.get_async_connection(),
        )
        .await?;
        let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
        let sub_client = conn::cluster_client(nodes, settings, tls, Some(push_tx))?;
        let subscriber = bounded(
            "connect (cluster pub/sub)",
            settings.connect_timeout * 2,
            sub_client.get_async_connection(),
        )
        .await?;
        preflight
            .run_cluster(nodes, &mut commands, settings.command_timeout)
            .await?;
        let notifier = Notifier::start_sharded(subscriber, push_rx, settings);
        Ok(RedisBackend::assemble(
            Target::Cluster {
                nodes: nodes.into(),
                client: Box::new(client),
                clocks: Arc::new(ClusterClocks::new(nodes, tls)),
            },
            Commands::Cluster(commands),
            notifier,
            settings,
            None,
        ))
    }

    /// Checks the URL only; both connections are made on first use, and the connect checks
    /// run before the first command. Needs a Tokio runtime (the pub/sub listener task
    /// starts now).
    pub(crate) fn connect_lazy(
        url: &str,
        tls: &TlsFiles,
        settings: ConnectSettings,
        preflight: Preflight,
    ) -> Result<RedisBackend> {
        let checks = LazyChecks {
            preflight,
            passed: AtomicBool::new(false),
            refused: tokio::sync::Mutex::new(None),
        };
        if let Some(nodes) = conn::cluster_nodes(url) {
            let nodes = nodes?;
            let client = conn::cluster_client(&nodes, settings, tls, None)?;
            let commands =
                client.get_pending_async_connection_with_config(conn::cluster_config(settings));
            let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
            let subscriber = conn::cluster_client(&nodes, settings, tls, Some(push_tx))?
                .get_pending_async_connection_with_config(conn::cluster_config(settings));
            let notifier = Notifier::start_sharded(subscriber, push_rx, settings);
            return Ok(RedisBackend::assemble(
                Target::Cluster {
                    clocks: Arc::new(ClusterClocks::new(&nodes, tls)),
                    nodes: nodes.into(),
                    client: Box::new(client),
                },
                Commands::Cluster(commands),
                notifier,
                settings,
                Some(checks),
            ));
        }
        let target = target::Target::direct(url, tls.clone(), settings.connect_timeout)?;
        let managed = Managed::lazy(Arc::clone(&target), manager_config(settings))?;
        let notifier = Notifier::start(Arc::clone(&target), None, settings);
        Ok(RedisBackend::assemble(
            Target::Single(target),
            Commands::Single(managed),
            notifier,
            settings,
            Some(checks),
        ))
    }

    fn assemble(
        target: Target,
        conn: Commands,
        notifier: Notifier,
        settings: ConnectSettings,
        checks: Option<LazyChecks>,
    ) -> RedisBackend {
        RedisBackend {
            inner: Arc::new(Inner {
                clock: Arc::default(),
                probe: tokio::sync::Mutex::new(None),
                first_probe: tokio::sync::Mutex::new(()),
                notifier: Some(notifier),
                scripts: Scripts::load(target.sharded()),
                target,
                conn,
                settings,
                checks,
            }),
            gate: Arc::default(),
        }
    }

    /// Runs a lazy herd's connect checks unless they passed already (one atomic load).
    async fn ready(&self) -> Result<()> {
        let Some(checks) = &self.inner.checks else {
            return Ok(());
        };
        if checks.passed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut refused = checks.refused.lock().await;
        if checks.passed.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some((at, e)) = refused.as_ref() {
            if at.elapsed() < RECHECK_AFTER {
                return Err(e.clone());
            }
        }
        let timeout = self.inner.settings.command_timeout;
        let outcome = match (&self.inner.target, self.inner.conn.get()?.0) {
            (Target::Cluster { nodes, .. }, Conn::Cluster(mut conn)) => {
                checks
                    .preflight
                    .run_cluster(nodes, &mut conn, timeout)
                    .await
            }
            (Target::Single(target), mut conn) => {
                let client = target.client().0;
                let outcome = checks
                    .preflight
                    .run(&client, &mut conn, None, timeout)
                    .await;
                self.noticed(outcome)
            }
            (Target::Cluster { .. }, Conn::Single(_)) => Err(Error::new(
                ErrorKind::Redis,
                "a cluster herd on a one-node connection",
            )),
        };
        match outcome {
            Ok(()) => {
                checks.passed.store(true, Ordering::Release);
                *refused = None;
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::Permission | ErrorKind::ServerConfig) => {
                *refused = Some((tokio::time::Instant::now(), e.clone()));
                Err(e)
            }
            // Unreachable, or bad credentials: the next call tries again.
            Err(e) => Err(e),
        }
    }

    /// A command-only backend on a connection of its own (no pub/sub), connecting on
    /// first use from whatever runtime uses it: the watchdog thread's.
    pub(crate) fn detached(&self) -> Result<RedisBackend> {
        let conn = match &self.inner.target {
            Target::Single(target) => Commands::Single(Managed::lazy(
                Arc::clone(target),
                manager_config(self.inner.settings),
            )?),
            Target::Cluster { client, .. } => {
                Commands::Cluster(client.get_pending_async_connection_with_config(
                    conn::cluster_config(self.inner.settings),
                ))
            }
        };
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                clock: Arc::default(),
                probe: tokio::sync::Mutex::new(None),
                first_probe: tokio::sync::Mutex::new(()),
                target: self.inner.target.clone(),
                conn,
                scripts: Scripts::load(self.inner.target.sharded()),
                notifier: None,
                settings: self.inner.settings,
                checks: None,
            }),
            gate: Arc::clone(&self.gate),
        })
    }

    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Makes every waiter on this herd's subscriptions re-check now (a shutdown began).
    pub(crate) fn wake_all(&self) {
        if let Some(notifier) = &self.inner.notifier {
            notifier.resync_all();
        }
    }

    /// Stops the pub/sub listener (its connection closes); every waiter re-checks, and
    /// finds the herd closed.
    pub(crate) fn close(&self) {
        if let Some(notifier) = &self.inner.notifier {
            notifier.close();
        }
    }

    /// `WAIT replicas timeout`: how many replicas acknowledged this connection's writes. On
    /// a cluster it is sent to the master of `keys`' slot (the one the lock was written
    /// to), over the same node connection the lock's script used; redis-rs would send a
    /// bare `WAIT` to every master and answer the minimum.
    pub(crate) async fn wait_replicas(
        &self,
        keys: &JobKeys,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        self.ready().await?;
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(millis(timeout));
        let limit = timeout + self.inner.settings.command_timeout;
        let acked: i64 = match self.inner.conn.get()?.0 {
            Conn::Single(mut conn) => {
                self.noticed(bounded("wait", limit, cmd.query_async(&mut conn)).await)?
            }
            Conn::Cluster(mut conn) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(keys.lock.as_bytes(), SlotAddr::Master),
                ));
                let reply = bounded("wait", limit, conn.route_command(cmd, route)).await?;
                int(&reply, "wait")?
            }
        };
        Ok(u32::try_from(acked).unwrap_or(0))
    }

    /// How long one command may take.
    pub(crate) fn command_timeout(&self) -> Duration {
        self.inner.settings.command_timeout
    }

    /// Runs a script once, without retrying on a dropped connection (release, complete):
    /// whether it may be repeated is the caller's decision (releases are retried by
    /// `Backend::retry_release`, which knows how to read a repeated release's reply).
    ///
    /// On a cluster, a refusal that means the script did not run (`MOVED`, `ASK`,
    /// `TRYAGAIN`, `CLUSTERDOWN`: a slot moving or a failover under way) is retried; see
    /// [`through_failover`](RedisBackend::through_failover).
    async fn invoke(&self, what: &str, inv: &Invocation<'_>) -> Result<Value> {
        self.ready().await?;
        let mut conn = self.inner.conn.get()?.0;
        let limit = self.inner.settings.command_timeout;
        if let Conn::Cluster(_) = conn {
            return self
                .script_through_failover(what, &conn, inv, redis::RedisError::is_cluster_error)
                .await;
        }
        self.noticed(bounded(what, limit, inv.invoke_async(&mut conn)).await)
    }

    /// The generation of the target (bumped by each Sentinel failover; 0 otherwise).
    fn generation(&self) -> u64 {
        match &self.inner.target {
            Target::Single(target) => target.generation(),
            Target::Cluster { .. } => 0,
        }
    }

    /// Passes `result` through, telling a one-node target about an error that may mean
    /// the master moved (a Sentinel failover).
    fn noticed<T>(&self, result: Result<T>) -> Result<T> {
        if let (Err(e), Target::Single(target)) = (&result, &self.inner.target) {
            target.noticed(e);
        }
        result
    }

    /// Runs the script `inv` on the cluster connection `conn`, through a failover (see
    /// [`through_failover`](RedisBackend::through_failover)).
    async fn script_through_failover(
        &self,
        what: &str,
        conn: &Conn,
        inv: &Invocation<'_>,
        transient: impl Fn(&redis::RedisError) -> bool,
    ) -> Result<Value> {
        self.through_failover(
            what,
            || {
                let mut conn = conn.clone();
                async move { inv.invoke_async(&mut conn).await }
            },
            transient,
        )
        .await
    }

    /// Runs `attempt` on a cluster, retrying the errors `transient` accepts (50 ms doubling
    /// to 500 ms) for up to three command timeouts in all, each attempt bounded by one: a
    /// master failover (about 2.5 s with a 1 s node timeout) is ridden out instead of
    /// failing every call made during it. redis-rs retries too, but gives up on its own
    /// count of attempts.
    async fn through_failover<F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
        transient: impl Fn(&redis::RedisError) -> bool,
    ) -> Result<Value>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<Value>>,
    {
        let limit = self.inner.settings.command_timeout;
        let give_up = tokio::time::Instant::now() + limit * 3;
        let mut pause = Duration::from_millis(50);
        loop {
            let outcome = tokio::time::timeout(limit, attempt()).await;
            let retry = match &outcome {
                Ok(Err(e)) => transient(e),
                Ok(Ok(_)) | Err(_) => false,
            };
            if !retry || tokio::time::Instant::now() + pause >= give_up {
                return match outcome {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(Error::redis(what, e)),
                    Err(_) => Err(Error::new(
                        ErrorKind::Connection,
                        format!("redis did not answer {what} within {limit:?}"),
                    )),
                };
            }
            if let Ok(Err(e)) = &outcome {
                tracing::debug!(what, error = %e, "cluster in transition; retrying");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs a script that is safe to repeat (reads, extend, and acquire, which recognises
    /// its own nonce), retrying once when the connection turned out to be dead: the
    /// connection manager reconnects on that error, so the first call after a Redis
    /// restart succeeds instead of failing.
    ///
    /// On a cluster it also retries connection errors and the refusals of a slot in
    /// transit (see [`through_failover`](RedisBackend::through_failover)).
    async fn invoke_idempotent(&self, what: &str, inv: &Invocation<'_>) -> Result<Value> {
        self.ready().await?;
        let mut conn = self.inner.conn.get()?.0;
        let limit = self.inner.settings.command_timeout;
        if let Conn::Cluster(_) = conn {
            return self
                .script_through_failover(what, &conn, inv, |e| {
                    e.is_cluster_error()
                        || e.is_connection_dropped()
                        || e.is_io_error()
                        || e.is_connection_refusal()
                        || e.is_timeout()
                })
                .await;
        }
        let first = tokio::time::timeout(limit, inv.invoke_async(&mut conn)).await;
        let result = match first {
            Ok(Err(e)) if e.is_connection_dropped() || e.is_io_error() => {
                tracing::debug!(what, error = %e, "connection dropped; retrying once");
                if let Target::Single(target) = &self.inner.target {
                    if target.is_sentinel() {
                        // The master may have moved: retry on the one the Sentinels name now.
                        target.refresh(limit).await;
                        conn = self.inner.conn.get()?.0;
                    }
                }
                bounded(what, limit, inv.invoke_async(&mut conn)).await
            }
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::redis(what, e)),
            Err(_) => Err(Error::new(
                ErrorKind::Connection,
                format!("redis did not answer {what} within {limit:?}"),
            )),
        };
        self.noticed(result)
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        self.ready().await?;
        let mut conn = self.inner.conn.get()?.0;
        let pong: String = self.noticed(
            bounded(
                "ping",
                self.inner.settings.command_timeout,
                redis::cmd("PING").query_async(&mut conn),
            )
            .await,
        )?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Redis, "redis answered PING oddly"))
        }
    }

    /// Every key matching `pattern`, by `SCAN` (never `KEYS`): on a cluster, on each
    /// master in turn. A key may be listed twice (`SCAN` promises every key present for
    /// the whole scan at least once); the caller dedups.
    pub(crate) async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

        self.ready().await?;
        let timeout = self.inner.settings.command_timeout;
        let mut conn = self.inner.conn.get()?.0;
        let scan = |cursor: u64| {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
        };
        let mut found = Vec::new();
        match &mut conn {
            Conn::Single(_) => {
                let mut cursor = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = self.noticed(
                        bounded("scan", timeout, scan(cursor).query_async(&mut conn)).await,
                    )?;
                    found.extend(keys);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Conn::Cluster(cluster) => {
                let slots = bounded(
                    "scan",
                    timeout,
                    cluster.route_command(
                        redis::cmd("CLUSTER").arg("SLOTS").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    ),
                )
                .await?;
                let masters = clocks::masters_of(slots).ok_or_else(|| {
                    Error::new(ErrorKind::Redis, "redis answered CLUSTER SLOTS oddly")
                })?;
                for (host, port) in masters {
                    let mut cursor = 0;
                    loop {
                        let reply = bounded(
                            "scan",
                            timeout,
                            cluster.route_command(
                                scan(cursor),
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port,
                                }),
                            ),
                        )
                        .await?;
                        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)
                            .map_err(|e| Error::redis("scan", e.into()))?;
                        found.extend(keys);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
        Ok(found)
    }

    pub(crate) async fn acquire(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
        waiting: bool,
    ) -> Result<AcquireReply> {
        let mut inv = self.inner.scripts.acquire.prepare_invoke();
        inv.key(&keys.lock)
            .arg(nonce)
            .arg(owner)
            .arg(millis(ttl))
            .arg(u8::from(waiting));
        let reply = self.invoke_idempotent("acquire", &inv).await?;
        match parse_acquire(array(&reply, 3, "acquire")?, "acquire")? {
            FanoutReply::Lock(reply) => Ok(reply),
            FanoutReply::Cached { .. } | FanoutReply::Fresh { .. } => Err(malformed("acquire")),
        }
    }

    pub(crate) async fn fanout_acquire(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
        ages: ResultAges,
    ) -> Result<FanoutReply> {
        // The clock of the server that runs the script, and the generation (one server) or
        // master (a cluster) it belongs to.
        let generation = self.generation();
        let (clock, node) = match &self.inner.target {
            Target::Single(target) => {
                // A Sentinel failover moved the commands to another server: forget the
                // old one's clock before bounding anything.
                self.inner.clock.follow(generation);
                if self
                    .inner
                    .clock
                    .upper_bound_us(std::time::Instant::now())
                    .is_none()
                {
                    // The first fan-out of this backend (or after a long pause) waits for
                    // one clock sample, so that even its first callers' results are
                    // recognised.
                    let _one = self.inner.first_probe.lock().await;
                    if self
                        .inner
                        .clock
                        .upper_bound_us(std::time::Instant::now())
                        .is_none()
                    {
                        probe(&self.inner).await;
                    }
                }
                // The thread reads the target's current client each round: after a
                // failover it probes the new master.
                let target = Arc::downgrade(target);
                self.inner.clock.wanted(
                    move || Box::new(move || target.upgrade().map(|t| t.client())),
                    self.inner.settings.command_timeout,
                );
                (Some(Arc::clone(&self.inner.clock)), None)
            }
            Target::Cluster { clocks, .. } => match self.cluster_clock(clocks, keys).await {
                Some((node, clock)) => (Some(clock), Some((Arc::clone(clocks), node))),
                None => (None, None),
            },
        };
        let call_at = clock
            .as_ref()
            .and_then(|c| c.upper_bound_us(ages.newest_call.into_std()))
            .unwrap_or(0);
        let (sent, received, redis_us, mut reply, previous_done) = self
            .fanout_acquire_step(keys, nonce, owner, ttl, ages, call_at)
            .await?;
        // A run started although the stored result of the previous one completed later than
        // the earliest instant the newest call may have happened on Redis's clock: the bound
        // could not tell whether it completed after the call (a possible coalescing miss).
        if let FanoutReply::Lock(AcquireReply::Acquired { maybe_missed, .. }) = &mut reply {
            *maybe_missed = previous_done > 0
                && clock
                    .as_ref()
                    .and_then(|c| c.lower_bound_us(ages.newest_call.into_std()))
                    .is_some_and(|earliest| previous_done > earliest);
        }
        let Some(clock) = clock else {
            return Ok(reply);
        };
        // Was the bound of this server's clock? A reply reading earlier than the sample
        // allows is another clock (a cluster slot that moved) or a clock stepped back; one
        // reading later than it allows is another clock or a clock stepped forward, and
        // then the bound may have been too low: a result served on it may be older than
        // the call. Either way, a served result is asked for again without a bound.
        let behind = clock.contradicts(sent, redis_us);
        let ahead = clock
            .upper_bound_us(received)
            .is_some_and(|bound| redis_us > bound);
        match &node {
            Some((clocks, node)) => {
                if behind || ahead {
                    clocks.moved(node);
                }
                if !behind {
                    clock.sample(0, sent, received, redis_us);
                }
            }
            // Only a reply from the server of this generation samples its clock.
            None if self.generation() == generation => {
                clock.sample(generation, sent, received, redis_us);
            }
            None => {}
        }
        if (behind || ahead) && call_at > 0 && matches!(reply, FanoutReply::Fresh { .. }) {
            tracing::debug!(
                key = %keys.key,
                "fan-out reply from a clock the bound was not of; asking again without a bound"
            );
            // The same nonce: a lock won meanwhile is found again.
            let (_, _, _, reply, _) = self
                .fanout_acquire_step(keys, nonce, owner, ttl, ages, 0)
                .await?;
            return Ok(reply);
        }
        Ok(reply)
    }

    /// The master that owns `keys`' slot and its clock, sampled once if it has no recent
    /// sample, with its probe thread running.
    async fn cluster_clock(
        &self,
        clocks: &Arc<ClusterClocks>,
        keys: &JobKeys,
    ) -> Option<(clocks::Node, Arc<RedisClock>)> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let Ok((Conn::Cluster(mut conn), _)) = self.inner.conn.get() else {
            return None;
        };
        let timeout = self.inner.settings.command_timeout;
        let (node, clock) = clocks.for_slot(&mut conn, keys.slot(), timeout).await?;
        if clock.upper_bound_us(std::time::Instant::now()).is_none() {
            let _one = self.inner.first_probe.lock().await;
            if clock.upper_bound_us(std::time::Instant::now()).is_none() {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: node.0.clone(),
                    port: node.1,
                });
                let sent = std::time::Instant::now();
                let time =
                    tokio::time::timeout(timeout, conn.route_command(redis::cmd("TIME"), route))
                        .await;
                if let Ok(Ok(reply)) = time {
                    if let Ok((secs, us)) = redis::from_redis_value::<(u64, u64)>(reply) {
                        clock.sample(
                            0,
                            sent,
                            std::time::Instant::now(),
                            secs.saturating_mul(1_000_000).saturating_add(us),
                        );
                    }
                }
            }
        }
        clock.wanted(|| clocks.probe_source(&node), timeout);
        Some((node, clock))
    }

    /// One `fanout_acquire.lua` call: when it was sent and answered, Redis's clock in the
    /// reply, and the reply.
    async fn fanout_acquire_step(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
        ages: ResultAges,
        call_at: u64,
    ) -> Result<(
        std::time::Instant,
        std::time::Instant,
        u64,
        FanoutReply,
        u64,
    )> {
        let max_age = ages
            .cache_age
            .map_or(-1, |age| i64::try_from(micros(age)).unwrap_or(i64::MAX));
        // The time since the call, less what Redis's clock may run slower over it.
        let called = ages.newest_call.elapsed();
        let called = called.saturating_sub(super::clock::drift(called));
        let mut inv = self.inner.scripts.fanout_acquire.prepare_invoke();
        inv.key(&keys.lock)
            .key(keys.result())
            .arg(nonce)
            .arg(owner)
            .arg(millis(ttl))
            .arg(max_age)
            .arg(call_at)
            .arg(micros(called));
        let sent = std::time::Instant::now();
        let reply = self.invoke_idempotent("fanout acquire", &inv).await?;
        let received = std::time::Instant::now();
        let what = "fanout acquire";
        // Four items, or five when a run was started: the completion time (µs) of the
        // stored result it did not serve (0: none).
        let items = match &reply {
            Value::Array(items) if items.len() == 5 => &items[..],
            _ => array(&reply, 4, what)?,
        };
        let redis_us = u64::try_from(int(&items[3], what)?).map_err(|_| malformed(what))?;
        let previous_done = match items.get(4) {
            Some(v) => u64::try_from(int(v, what)?).map_err(|_| malformed(what))?,
            None => 0,
        };
        Ok((
            sent,
            received,
            redis_us,
            parse_acquire(&items[..3], what)?,
            previous_done,
        ))
    }

    pub(crate) async fn fanout_check(&self, keys: &JobKeys) -> Result<CheckReply> {
        let mut inv = self.inner.scripts.fanout_check.prepare_invoke();
        inv.key(&keys.lock).key(keys.result());
        let reply = self.invoke_idempotent("fanout check", &inv).await?;
        parse_check(&reply)
    }

    pub(crate) async fn complete(
        &self,
        keys: &JobKeys,
        token: &str,
        envelope: &[u8],
        ok: bool,
        linger: Duration,
    ) -> Result<bool> {
        let mut inv = self.inner.scripts.complete.prepare_invoke();
        inv.key(&keys.lock)
            .key(keys.result())
            .arg(token)
            .arg(envelope)
            .arg(millis(linger))
            .arg(&keys.channel)
            .arg(u8::from(ok));
        let reply = self.invoke("complete", &inv).await?;
        Ok(int(&reply, "complete")? == 1)
    }

    pub(crate) async fn release(
        &self,
        keys: &JobKeys,
        token: &str,
        grace: Duration,
    ) -> Result<bool> {
        let mut inv = self.inner.scripts.release.prepare_invoke();
        inv.key(&keys.lock)
            .arg(token)
            .arg(millis(grace))
            .arg(&keys.channel);
        let reply = self.invoke("release", &inv).await?;
        Ok(int(&reply, "release")? == 1)
    }

    pub(crate) async fn extend(&self, keys: &JobKeys, token: &str, ttl: Duration) -> Result<bool> {
        let mut inv = self.inner.scripts.extend.prepare_invoke();
        inv.key(&keys.lock).arg(token).arg(millis(ttl));
        let reply = self.invoke_idempotent("extend", &inv).await?;
        Ok(int(&reply, "extend")? == 1)
    }

    pub(crate) async fn status(&self, keys: &JobKeys) -> Result<StatusReply> {
        let mut inv = self.inner.scripts.status.prepare_invoke();
        inv.key(&keys.lock);
        let reply = self.invoke_idempotent("status", &inv).await?;
        parse_status(&reply)
    }

    pub(crate) async fn multi_acquire(
        &self,
        keys: &[JobKeys],
        nonce: &str,
        owner: &str,
        ttl: Duration,
        waiting: bool,
    ) -> Result<MultiReply> {
        let what = "multi acquire";
        if self.inner.target.sharded() {
            same_slot(keys)?;
        }
        let mut inv = self.inner.scripts.multi_acquire.prepare_invoke();
        for k in keys {
            inv.key(&k.lock);
        }
        inv.arg(nonce)
            .arg(owner)
            .arg(millis(ttl))
            .arg(u8::from(waiting));
        let reply = self.invoke_idempotent(what, &inv).await?;
        parse_multi_acquire(&reply, keys.len())
    }

    pub(crate) async fn multi_release(
        &self,
        keys: &[JobKeys],
        tokens: &[String],
    ) -> Result<Vec<bool>> {
        let what = "multi release";
        let inv = per_key_invocation(&self.inner.scripts.multi_release, keys, tokens);
        let reply = self.invoke(what, &inv).await?;
        let items = array(&reply, keys.len(), what)?;
        items.iter().map(|v| Ok(int(v, what)? == 1)).collect()
    }

    pub(crate) async fn multi_extend(
        &self,
        keys: &[JobKeys],
        tokens: &[String],
        ttl: Duration,
    ) -> Result<Vec<usize>> {
        let what = "multi extend";
        let mut inv = per_key_invocation(&self.inner.scripts.multi_extend, keys, tokens);
        inv.arg(millis(ttl));
        let reply = self.invoke(what, &inv).await?;
        parse_multi_extend(&reply, keys.len())
    }

    pub(crate) async fn semaphore(
        &self,
        keys: &JobKeys,
        op: SemOp,
        args: SemArgs<'_>,
    ) -> Result<SemReply> {
        let what = "semaphore";
        let mut inv = self.inner.scripts.semaphore.prepare_invoke();
        inv.key(keys.sem())
            .key(keys.sem_queue())
            .key(keys.sem_queue_expiry())
            .key(keys.sem_ticket())
            .arg(op.name())
            .arg(args.member)
            .arg(args.permits)
            .arg(millis(args.lease))
            .arg(millis(args.queue_ttl))
            .arg(&keys.channel);
        // Try/queue recognise their own member, extend and status are safe to repeat.
        let reply = if op == SemOp::Release {
            self.invoke(what, &inv).await?
        } else {
            self.invoke_idempotent(what, &inv).await?
        };
        parse_semaphore(&reply, op)
    }

    /// How many connections, in every process, are subscribed to `keys`' channel
    /// (`PUBSUB NUMSUB`; `PUBSUB SHARDNUMSUB` on the slot's master of a cluster).
    pub(crate) async fn subscribers(&self, keys: &JobKeys) -> Result<u64> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        self.ready().await?;
        let limit = self.inner.settings.command_timeout;
        let reply = match self.inner.conn.get()?.0 {
            Conn::Single(mut conn) => {
                let mut cmd = redis::cmd("PUBSUB");
                cmd.arg("NUMSUB").arg(&keys.channel);
                self.noticed(bounded("pubsub numsub", limit, cmd.query_async(&mut conn)).await)?
            }
            Conn::Cluster(mut conn) => {
                let mut cmd = redis::cmd("PUBSUB");
                cmd.arg("SHARDNUMSUB").arg(&keys.channel);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(keys.lock.as_bytes(), SlotAddr::Master),
                ));
                bounded("pubsub shardnumsub", limit, conn.route_command(cmd, route)).await?
            }
        };
        // `[channel, count]` (RESP2) or `{channel: count}` (RESP3).
        let count = match &reply {
            Value::Array(items) if items.len() == 2 => int(&items[1], "pubsub numsub")?,
            Value::Map(pairs) if pairs.len() == 1 => int(&pairs[0].1, "pubsub numsub")?,
            _ => return Err(malformed("pubsub numsub")),
        };
        // A negative count is no count: never read it as "nobody waits".
        u64::try_from(count).map_err(|_| malformed("pubsub numsub"))
    }

    pub(crate) fn subscribe_if_warm(&self, keys: &JobKeys) -> Option<Subscription> {
        self.inner
            .notifier
            .as_ref()?
            .subscribe_if_warm(&keys.channel)
    }

    pub(crate) async fn subscribe(&self, keys: &JobKeys) -> Result<Subscription> {
        self.ready().await?;
        match &self.inner.notifier {
            Some(notifier) => Ok(notifier.subscribe(&keys.channel).await),
            None => Err(Error::new(
                ErrorKind::Redis,
                "a detached backend cannot subscribe",
            )),
        }
    }
}

/// Samples the server's clock with one `TIME` on the probe connection (opened on first use,
/// and again on a new master after a Sentinel failover).
async fn probe(inner: &Inner) {
    let limit = inner.settings.command_timeout;
    match &inner.target {
        Target::Single(target) => {
            let mut slot = inner.probe.lock().await;
            let (client, generation) = target.client();
            if slot.as_ref().is_none_or(|(g, _)| *g != generation) {
                *slot = None;
                if let Ok(Ok(conn)) =
                    tokio::time::timeout(limit, client.get_multiplexed_async_connection()).await
                {
                    *slot = Some((generation, conn));
                }
            }
            let Some((generation, conn)) = slot.clone() else {
                return;
            };
            drop(slot);
            sample_clock(inner, &mut conn.clone(), generation).await;
        }
        // Each master has a clock of its own (`clocks.rs`), sampled where it is used.
        Target::Cluster { .. } => {}
    }
}

/// One `TIME` on `conn`, as a sample of the server's clock.
async fn sample_clock<C: redis::aio::ConnectionLike + Send>(
    inner: &Inner,
    conn: &mut C,
    generation: u64,
) {
    let sent = std::time::Instant::now();
    let time = tokio::time::timeout(
        inner.settings.command_timeout,
        redis::cmd("TIME").query_async::<(u64, u64)>(conn),
    )
    .await;
    if let Ok(Ok((secs, us))) = time {
        let received = std::time::Instant::now();
        inner.clock.sample(
            generation,
            sent,
            received,
            secs.saturating_mul(1_000_000).saturating_add(us),
        );
    }
}

/// Refuses a multi-lock whose keys fall in different Redis Cluster slots: one script can
/// touch one slot only, and Redis would answer `CROSSSLOT`.
fn same_slot(keys: &[JobKeys]) -> Result<()> {
    let Some(first) = keys.first() else {
        return Ok(());
    };
    let slot = first.slot();
    let Some(other) = keys.iter().find(|k| k.slot() != slot) else {
        return Ok(());
    };
    Err(Error::invalid(format!(
        "on a Redis Cluster the keys of one multi-lock must share a hash slot, but `{}` \
         (slot {slot}) and `{}` (slot {}) do not; give every key the same hash tag, e.g. \
         `{{{tag}}}:{}` and `{{{tag}}}:{}` (keys with a `{{tag}}` are laid out by the tag)",
        first.key,
        other.key,
        other.slot(),
        first.key.replace(['{', '}'], ""),
        other.key.replace(['{', '}'], ""),
        tag = "group",
    )))
}

/// An invocation with every key's lock as `KEYS` and its token, then its channel, as `ARGV`
/// (the layout of `multi_release.lua` and `multi_extend.lua`).
fn per_key_invocation<'a>(lua: &'a Lua, keys: &[JobKeys], tokens: &[String]) -> Invocation<'a> {
    let mut inv = lua.prepare_invoke();
    for k in keys {
        inv.key(&k.lock);
    }
    for t in tokens {
        inv.arg(t);
    }
    for k in keys {
        inv.arg(&k.channel);
    }
    inv
}
