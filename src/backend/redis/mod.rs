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
//! - A lazy backend runs the connect checks (`preflight.rs`) before its first command;
//!   concurrent first calls wait for that one check, and a refusal is repeated for 5 s
//!   before the next call checks again.

mod conn;
mod notifier;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{Client, Value};

use self::conn::{bounded, manager_config, Conn, Invocation, Lua};
pub(crate) use self::notifier::ChannelGuard;
use self::notifier::Notifier;
use super::clock::RedisClock;
use super::preflight::Preflight;
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
}

struct Inner {
    client: Client,
    conn: Conn,
    /// A bound on the server's clock, from the replies that carry it.
    clock: Arc<RedisClock>,
    /// A connection of its own for clock probes, opened on the first probe: under load
    /// the command connection's queue would make every probe as slow as the load.
    probe: tokio::sync::OnceCell<redis::aio::MultiplexedConnection>,
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
    fn load() -> Scripts {
        Scripts {
            acquire: Lua::new(include_str!("../../scripts/acquire.lua")),
            release: Lua::new(include_str!("../../scripts/release.lua")),
            extend: Lua::new(include_str!("../../scripts/extend.lua")),
            status: Lua::new(include_str!("../../scripts/status.lua")),
            fanout_acquire: Lua::new(include_str!("../../scripts/fanout_acquire.lua")),
            fanout_check: Lua::new(include_str!("../../scripts/fanout_check.lua")),
            complete: Lua::new(include_str!("../../scripts/complete.lua")),
            multi_acquire: Lua::new(include_str!("../../scripts/multi_acquire.lua")),
            multi_release: Lua::new(include_str!("../../scripts/multi_release.lua")),
            multi_extend: Lua::new(include_str!("../../scripts/multi_extend.lua")),
            semaphore: Lua::new(include_str!("../../scripts/semaphore.lua")),
        }
    }
}

impl RedisBackend {
    /// Opens both connections and waits for them to be established, so a wrong address or
    /// password is reported now; then runs the connect checks (eviction policy,
    /// permissions). Nothing keeps running when this fails.
    pub(crate) async fn connect(
        url: &str,
        settings: ConnectSettings,
        preflight: Preflight,
    ) -> Result<RedisBackend> {
        let (client, config) = client_config(url, settings)?;
        let mut conn = bounded(
            "connect",
            settings.connect_timeout * 2,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await?;
        let mut pubsub = bounded(
            "connect (pub/sub)",
            settings.connect_timeout,
            client.get_async_pubsub(),
        )
        .await?;
        preflight
            .run(
                &client,
                &mut conn,
                Some(&mut pubsub),
                settings.command_timeout,
            )
            .await?;
        Ok(RedisBackend::assemble(
            client,
            conn,
            Some(pubsub),
            settings,
            None,
        ))
    }

    /// Checks the URL only; both connections are made on first use, and the connect checks
    /// run before the first command. Needs a Tokio runtime (the pub/sub listener task
    /// starts now).
    pub(crate) fn connect_lazy(
        url: &str,
        settings: ConnectSettings,
        preflight: Preflight,
    ) -> Result<RedisBackend> {
        let (client, config) = client_config(url, settings)?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| Error::redis("connect", e))?;
        let checks = LazyChecks {
            preflight,
            passed: AtomicBool::new(false),
            refused: tokio::sync::Mutex::new(None),
        };
        Ok(RedisBackend::assemble(
            client,
            conn,
            None,
            settings,
            Some(checks),
        ))
    }

    fn assemble(
        client: Client,
        conn: ConnectionManager,
        pubsub: Option<PubSub>,
        settings: ConnectSettings,
        checks: Option<LazyChecks>,
    ) -> RedisBackend {
        RedisBackend {
            inner: Arc::new(Inner {
                clock: Arc::default(),
                probe: tokio::sync::OnceCell::new(),
                first_probe: tokio::sync::Mutex::new(()),
                notifier: Some(Notifier::start(client.clone(), pubsub, settings)),
                client,
                conn: Conn::Single(conn),
                scripts: Scripts::load(),
                settings,
                checks,
            }),
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
        let mut conn = self.inner.conn.clone();
        let outcome = checks
            .preflight
            .run(
                &self.inner.client,
                &mut conn,
                None,
                self.inner.settings.command_timeout,
            )
            .await;
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
        let config = manager_config(self.inner.settings);
        let conn = ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)
            .map_err(|e| Error::redis("connect", e))?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                clock: Arc::default(),
                probe: tokio::sync::OnceCell::new(),
                first_probe: tokio::sync::Mutex::new(()),
                client: self.inner.client.clone(),
                conn: Conn::Single(conn),
                scripts: Scripts::load(),
                notifier: None,
                settings: self.inner.settings,
                checks: None,
            }),
        })
    }

    /// `WAIT replicas timeout`: how many replicas acknowledged this connection's writes.
    pub(crate) async fn wait_replicas(&self, replicas: u32, timeout: Duration) -> Result<u32> {
        self.ready().await?;
        let mut conn = self.inner.conn.clone();
        let acked: i64 = bounded(
            "wait",
            timeout + self.inner.settings.command_timeout,
            redis::cmd("WAIT")
                .arg(replicas)
                .arg(millis(timeout))
                .query_async(&mut conn),
        )
        .await?;
        Ok(u32::try_from(acked).unwrap_or(0))
    }

    /// How long one command may take.
    pub(crate) fn command_timeout(&self) -> Duration {
        self.inner.settings.command_timeout
    }

    /// Runs a script once, without retrying on a dropped connection (release, complete):
    /// whether it may be repeated is the caller's decision (releases are retried by
    /// `Backend::retry_release`, which knows how to read a repeated release's reply).
    async fn invoke(&self, what: &str, inv: &Invocation<'_>) -> Result<Value> {
        self.ready().await?;
        let mut conn = self.inner.conn.clone();
        bounded(
            what,
            self.inner.settings.command_timeout,
            inv.invoke_async(&mut conn),
        )
        .await
    }

    /// Runs a script that is safe to repeat (reads, extend, and acquire, which recognises
    /// its own nonce), retrying once when the connection turned out to be dead: the
    /// connection manager reconnects on that error, so the first call after a Redis
    /// restart succeeds instead of failing.
    async fn invoke_idempotent(&self, what: &str, inv: &Invocation<'_>) -> Result<Value> {
        self.ready().await?;
        let mut conn = self.inner.conn.clone();
        let limit = self.inner.settings.command_timeout;
        let first = tokio::time::timeout(limit, inv.invoke_async(&mut conn)).await;
        match first {
            Ok(Err(e)) if e.is_connection_dropped() || e.is_io_error() => {
                tracing::debug!(what, error = %e, "connection dropped; retrying once");
                bounded(what, limit, inv.invoke_async(&mut conn)).await
            }
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::redis(what, e)),
            Err(_) => Err(Error::new(
                ErrorKind::Connection,
                format!("redis did not answer {what} within {limit:?}"),
            )),
        }
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        self.ready().await?;
        let mut conn = self.inner.conn.clone();
        let pong: String = bounded(
            "ping",
            self.inner.settings.command_timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Redis, "redis answered PING oddly"))
        }
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
        let max_age = ages
            .cache_age
            .map_or(-1, |age| i64::try_from(micros(age)).unwrap_or(i64::MAX));
        if self
            .inner
            .clock
            .upper_bound_us(std::time::Instant::now())
            .is_none()
        {
            // The first fan-out of this backend (or after a long pause) waits for one clock
            // sample, so that even its first callers' results are recognised.
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
        self.inner
            .clock
            .wanted(&self.inner.client, self.inner.settings.command_timeout);
        let call_at = self
            .inner
            .clock
            .upper_bound_us(ages.newest_call.into_std())
            .unwrap_or(0);
        let mut inv = self.inner.scripts.fanout_acquire.prepare_invoke();
        inv.key(&keys.lock)
            .key(keys.result())
            .arg(nonce)
            .arg(owner)
            .arg(millis(ttl))
            .arg(max_age)
            .arg(call_at)
            .arg(micros(ages.newest_call.elapsed()));
        let sent = std::time::Instant::now();
        let reply = self.invoke_idempotent("fanout acquire", &inv).await?;
        let received = std::time::Instant::now();
        let what = "fanout acquire";
        let items = array(&reply, 4, what)?;
        let redis_us = u64::try_from(int(&items[3], what)?).map_err(|_| malformed(what))?;
        self.inner.clock.sample(sent, received, redis_us);
        parse_acquire(&items[..3], what)
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

fn client_config(
    url: &str,
    settings: ConnectSettings,
) -> Result<(Client, ConnectionManagerConfig)> {
    let client = Client::open(url)
        .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "invalid redis url", e))?;
    Ok((client, manager_config(settings)))
}

/// Samples the server's clock with one `TIME` on the probe connection (opened on first use).
async fn probe(inner: &Inner) {
    let limit = inner.settings.command_timeout;
    let conn = inner
        .probe
        .get_or_try_init(|| async {
            match tokio::time::timeout(limit, inner.client.get_multiplexed_async_connection()).await
            {
                Ok(Ok(conn)) => Ok(conn),
                _ => Err(()),
            }
        })
        .await;
    let Ok(conn) = conn else { return };
    let mut conn = conn.clone();
    let sent = std::time::Instant::now();
    let time = tokio::time::timeout(
        limit,
        redis::cmd("TIME").query_async::<(u64, u64)>(&mut conn),
    )
    .await;
    if let Ok(Ok((secs, us))) = time {
        let received = std::time::Instant::now();
        inner.clock.sample(
            sent,
            received,
            secs.saturating_mul(1_000_000).saturating_add(us),
        );
    }
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
