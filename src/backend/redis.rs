//! The Redis engine: one multiplexed command connection that runs the Lua scripts in
//! `src/scripts/`, and a [`Notifier`] that owns a dedicated pub/sub connection.
//!
//! ## Behaviour in the background
//!
//! - The command connection is a redis-rs `ConnectionManager`: after an I/O error it
//!   reconnects on its own (a few retries with exponential backoff, each bounded by the
//!   connect timeout). Every command is also bounded by the command timeout.
//! - Scripts are sent by `EVALSHA`; on `NOSCRIPT` (a restarted or flushed server) redis-rs
//!   loads the script and retries once.
//! - One listener task per herd owns the pub/sub connection. When it drops, the task
//!   reconnects with backoff (50 ms doubling to 2 s), re-subscribes every channel that still
//!   has local subscribers, and then sends every local subscriber a `Resync` notice, because
//!   messages published while disconnected are gone (DESIGN invariant 6). A refused
//!   re-subscribe (a channel permission revoked; Redis also closes the connection then)
//!   backs off from 100 ms doubling to 5 s, with a `warn` each time. The task holds
//!   only a `Weak` reference and ends when the herd is dropped.
//! - A lazy backend runs the connect checks (`preflight.rs`) before its first command;
//!   concurrent first calls wait for that one check, and a refusal is repeated for 5 s
//!   before the next call checks again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub, PubSubSink};
use redis::{Script, Value};
use tokio::sync::{broadcast, oneshot};

use super::clock::RedisClock;
use super::preflight::Preflight;
use super::target::{Conn, Endpoint, Target, TlsFiles};
use super::{
    AcquireReply, CheckReply, FanoutReply, MultiReply, Notice, ResultAges, SemArgs, SemOp,
    SemReply, StatusReply, Subscription,
};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{micros, millis, JobKeys};

/// Capacity of a key's local notice queue; a receiver that falls further behind sees a
/// Resync and re-checks state.
const CHANNEL_CAPACITY: usize = 16;
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Backoff after the re-SUBSCRIBE of a fresh pub/sub connection failed (a revoked channel
/// permission fails every time): 100 ms doubling to 5 s, with a `warn` each time.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);
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
    /// The command connection, rebuilt when the target (a Sentinel master) moves.
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
    acquire: Script,
    release: Script,
    extend: Script,
    status: Script,
    fanout_acquire: Script,
    fanout_check: Script,
    complete: Script,
    multi_acquire: Script,
    multi_release: Script,
    multi_extend: Script,
    semaphore: Script,
}

impl Scripts {
    fn load() -> Scripts {
        Scripts {
            acquire: Script::new(include_str!("../scripts/acquire.lua")),
            release: Script::new(include_str!("../scripts/release.lua")),
            extend: Script::new(include_str!("../scripts/extend.lua")),
            status: Script::new(include_str!("../scripts/status.lua")),
            fanout_acquire: Script::new(include_str!("../scripts/fanout_acquire.lua")),
            fanout_check: Script::new(include_str!("../scripts/fanout_check.lua")),
            complete: Script::new(include_str!("../scripts/complete.lua")),
            multi_acquire: Script::new(include_str!("../scripts/multi_acquire.lua")),
            multi_release: Script::new(include_str!("../scripts/multi_release.lua")),
            multi_extend: Script::new(include_str!("../scripts/multi_extend.lua")),
            semaphore: Script::new(include_str!("../scripts/semaphore.lua")),
        }
    }
}

impl RedisBackend {
    /// Opens both connections and waits for them to be established, so a wrong address or
    /// password is reported now; then runs the connect checks (eviction policy,
    /// permissions). Nothing keeps running when this fails.
    pub(crate) async fn connect(
        endpoint: &Endpoint,
        tls: TlsFiles,
        settings: ConnectSettings,
        preflight: Preflight,
    ) -> Result<RedisBackend> {
        let target = Target::new(endpoint, tls, settings.connect_timeout).await?;
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
        Ok(RedisBackend::assemble(
            Conn::new(target, config, conn, generation),
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
        tls: TlsFiles,
        settings: ConnectSettings,
        preflight: Preflight,
    ) -> Result<RedisBackend> {
        let target = Target::direct(url, tls, settings.connect_timeout)?;
        let conn = Conn::lazy(target, manager_config(settings))?;
        let checks = LazyChecks {
            preflight,
            passed: AtomicBool::new(false),
            refused: tokio::sync::Mutex::new(None),
        };
        Ok(RedisBackend::assemble(conn, None, settings, Some(checks)))
    }

    fn assemble(
        conn: Conn,
        pubsub: Option<PubSub>,
        settings: ConnectSettings,
        checks: Option<LazyChecks>,
    ) -> RedisBackend {
        RedisBackend {
            inner: Arc::new(Inner {
                clock: Arc::default(),
                probe: tokio::sync::OnceCell::new(),
                first_probe: tokio::sync::Mutex::new(()),
                notifier: Some(Notifier::start(Arc::clone(conn.target()), pubsub, settings)),
                conn,
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
        let mut conn = self.inner.conn.get()?;
        let outcome = checks
            .preflight
            .run(
                &self.inner.conn.target().client().0,
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
        let conn = Conn::lazy(
            Arc::clone(self.inner.conn.target()),
            manager_config(self.inner.settings),
        )?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                clock: Arc::default(),
                probe: tokio::sync::OnceCell::new(),
                first_probe: tokio::sync::Mutex::new(()),
                conn,
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
        let mut conn = self.inner.conn.get()?;
        let acked: i64 = self.noticed(
            bounded(
                "wait",
                timeout + self.inner.settings.command_timeout,
                redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(millis(timeout))
                    .query_async(&mut conn),
            )
            .await,
        )?;
        Ok(u32::try_from(acked).unwrap_or(0))
    }

    /// How long one command may take.
    pub(crate) fn command_timeout(&self) -> Duration {
        self.inner.settings.command_timeout
    }

    /// Runs a script once, without retrying on a dropped connection (release, complete):
    /// whether it may be repeated is the caller's decision (releases are retried by
    /// `Backend::retry_release`, which knows how to read a repeated release's reply).
    async fn invoke(&self, what: &str, inv: &redis::ScriptInvocation<'_>) -> Result<Value> {
        self.ready().await?;
        let mut conn = self.inner.conn.get()?;
        self.noticed(
            bounded(
                what,
                self.inner.settings.command_timeout,
                inv.invoke_async::<Value>(&mut conn),
            )
            .await,
        )
    }

    /// Passes `result` through, telling the target about an error that may mean the
    /// master moved (a Sentinel failover).
    fn noticed<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.inner.conn.target().noticed(e);
        }
        result
    }

    /// Runs a script that is safe to repeat (reads, extend, and acquire, which recognises
    /// its own nonce), retrying once when the connection turned out to be dead: the
    /// connection manager reconnects on that error, so the first call after a Redis
    /// restart succeeds instead of failing.
    async fn invoke_idempotent(
        &self,
        what: &str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<Value> {
        self.ready().await?;
        let mut conn = self.inner.conn.get()?;
        let limit = self.inner.settings.command_timeout;
        let first = tokio::time::timeout(limit, inv.invoke_async::<Value>(&mut conn)).await;
        let result = match first {
            Ok(Err(e)) if e.is_connection_dropped() || e.is_io_error() => {
                tracing::debug!(what, error = %e, "connection dropped; retrying once");
                let target = self.inner.conn.target();
                if target.is_sentinel() {
                    // The master may have moved: retry on the one the Sentinels name now.
                    target.refresh(limit).await;
                    conn = self.inner.conn.get()?;
                }
                bounded(what, limit, inv.invoke_async::<Value>(&mut conn)).await
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
        let mut conn = self.inner.conn.get()?;
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
        // The probe thread keeps the client it starts with (a Sentinel failover leaves it on
        // the old master; replies still sample the new one's clock).
        self.inner.clock.wanted(
            &self.inner.conn.target().client().0,
            self.inner.settings.command_timeout,
        );
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
        let items = array(&reply, 3, "fanout check")?;
        let holder = string(&items[0], "fanout check")?;
        let pttl_ms = int(&items[1], "fanout check")?;
        let stored = bytes(&items[2], "fanout check")?;
        Ok(CheckReply {
            holder: (!holder.is_empty()).then_some(holder),
            pttl_ms,
            envelope: if stored.is_empty() {
                None
            } else {
                Some(stored_envelope(stored, "fanout check")?)
            },
        })
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
        let items = array(&reply, 2, "status")?;
        let holder = string(&items[0], "status")?;
        let pttl_ms = int(&items[1], "status")?;
        Ok(StatusReply {
            holder: (!holder.is_empty()).then_some(holder),
            pttl_ms,
        })
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
        let items = array(&reply, 2, what)?;
        let Value::Array(list) = &items[1] else {
            return Err(malformed(what));
        };
        if int(&items[0], what)? == 1 {
            if list.len() != keys.len() {
                return Err(malformed(what));
            }
            return Ok(MultiReply::Acquired(
                list.iter()
                    .map(|v| string(v, what))
                    .collect::<Result<_>>()?,
            ));
        }
        let mut busy = Vec::new();
        for chunk in list.chunks(3) {
            let [index, holder, pttl] = chunk else {
                return Err(malformed(what));
            };
            let index = usize::try_from(int(index, what)?)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .filter(|i| *i < keys.len())
                .ok_or_else(|| malformed(what))?;
            busy.push((index, string(holder, what)?, int(pttl, what)?));
        }
        Ok(MultiReply::Busy(busy))
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
        let Value::Array(items) = &reply else {
            return Err(malformed(what));
        };
        items
            .iter()
            .map(|v| {
                usize::try_from(int(v, what)?)
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .filter(|i| *i < keys.len())
                    .ok_or_else(|| malformed(what))
            })
            .collect()
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
        let count = |v: &Value| u32::try_from(int(v, what)?).map_err(|_| malformed(what));
        Ok(match op {
            SemOp::Try | SemOp::Queue => {
                let items = array(&reply, 3, what)?;
                if int(&items[0], what)? == 1 {
                    SemReply::Admitted
                } else {
                    SemReply::Busy {
                        in_use: count(&items[1])?,
                        soonest_ms: int(&items[2], what)?,
                    }
                }
            }
            SemOp::Release | SemOp::Extend | SemOp::Leave => {
                SemReply::Done(int(&reply, what)? == 1)
            }
            SemOp::Status => {
                let Value::Array(items) = &reply else {
                    return Err(malformed(what));
                };
                if items.len() < 2 || items.len() % 2 != 0 {
                    return Err(malformed(what));
                }
                let holders = items[2..]
                    .chunks(2)
                    .map(|pair| Ok((string(&pair[0], what)?, int(&pair[1], what)?)))
                    .collect::<Result<_>>()?;
                SemReply::Status {
                    in_use: count(&items[0])?,
                    queued: count(&items[1])?,
                    holders,
                }
            }
        })
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

fn manager_config(settings: ConnectSettings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        // Every call is already bounded by the command timeout (`bounded`, `invoke*`): a
        // second timer per request inside the manager would only cost time.
        .set_response_timeout(None)
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500))
}

/// Samples the server's clock with one `TIME` on the probe connection (opened on first use).
async fn probe(inner: &Inner) {
    let limit = inner.settings.command_timeout;
    let conn = inner
        .probe
        .get_or_try_init(|| async {
            let client = inner.conn.target().client().0;
            match tokio::time::timeout(limit, client.get_multiplexed_async_connection()).await {
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

/// Runs `fut` under a deadline, mapping both redis errors and the deadline to [`Error`].
async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::redis(what, e)),
        Err(_) => Err(Error::new(
            ErrorKind::Connection,
            format!("redis did not answer {what} within {limit:?}"),
        )),
    }
}

/// An invocation with every key's lock as `KEYS` and its token, then its channel, as `ARGV`
/// (the layout of `multi_release.lua` and `multi_extend.lua`).
fn per_key_invocation<'a>(
    script: &'a Script,
    keys: &[JobKeys],
    tokens: &[String],
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
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

/// Parses `{1, holder, fence}`, `{0, holder, pttl}` or `{2, envelope, age}`.
fn parse_acquire(items: &[Value], what: &str) -> Result<FanoutReply> {
    let [_, _, _] = items else {
        return Err(malformed(what));
    };
    let n = int(&items[2], what)?;
    Ok(match int(&items[0], what)? {
        1 => FanoutReply::Lock(AcquireReply::Acquired {
            token: string(&items[1], what)?,
            fence: u64::try_from(n).map_err(|_| malformed(what))?,
        }),
        0 => FanoutReply::Lock(AcquireReply::Busy {
            holder: string(&items[1], what)?,
            pttl_ms: n,
        }),
        2 => FanoutReply::Cached {
            envelope: stored_envelope(bytes(&items[1], what)?, what)?,
        },
        3 => FanoutReply::Fresh {
            envelope: stored_envelope(bytes(&items[1], what)?, what)?,
        },
        _ => return Err(malformed(what)),
    })
}

/// The envelope inside a stored result (`r2:<ok>:<completed µs>:` + envelope, as
/// `complete.lua` writes it).
fn stored_envelope(mut stored: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    let header = stored
        .strip_prefix(b"r2:")
        .and_then(|rest| {
            let ok = rest.iter().position(|&b| b == b':')?;
            let done = rest[ok + 1..].iter().position(|&b| b == b':')?;
            Some(3 + ok + 1 + done + 1)
        })
        .ok_or_else(|| malformed(what))?;
    stored.drain(..header);
    Ok(stored)
}

fn bytes(v: &Value, what: &str) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b.clone()),
        Value::SimpleString(s) => Ok(s.clone().into_bytes()),
        _ => Err(malformed(what)),
    }
}

fn malformed(what: &str) -> Error {
    Error::new(
        ErrorKind::Redis,
        format!("unexpected reply from the {what} script"),
    )
}

fn array<'a>(v: &'a Value, len: usize, what: &str) -> Result<&'a [Value]> {
    match v {
        Value::Array(items) if items.len() == len => Ok(items),
        _ => Err(malformed(what)),
    }
}

fn int(v: &Value, what: &str) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed(what)),
        Value::SimpleString(s) => s.parse().map_err(|_| malformed(what)),
        _ => Err(malformed(what)),
    }
}

fn string(v: &Value, what: &str) -> Result<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| malformed(what)),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        _ => Err(malformed(what)),
    }
}

/// Fans pub/sub messages from the one dedicated connection out to local subscribers.
#[derive(Clone)]
struct Notifier {
    shared: Arc<NotifierShared>,
}

/// How long a channel nobody listens to stays subscribed before the sweep unsubscribes it.
/// A waiter that comes back within it (a hot key) subscribes with no round trip at all.
const IDLE_UNSUBSCRIBE: Duration = Duration::from_secs(1);

struct NotifierShared {
    /// Channel name → local subscribers.
    ///
    /// Invariants: a channel with live [`ChannelGuard`]s is in this map; an entry is removed
    /// only by the sweep, under the `sink` lock, and only while it has no guard. Every
    /// channel in the map is subscribed on the current connection, is being subscribed by
    /// the caller that registered it, or will be re-subscribed (followed by a Resync) when
    /// the connection comes back.
    channels: Mutex<HashMap<String, ChannelEntry>>,
    /// The sending half of the current pub/sub connection and its epoch; `None` while
    /// (re)connecting. Held only to clone the sink, by the listener while it swaps
    /// connections (re-subscribing everything), and by the sweep across its UNSUBSCRIBE, so
    /// no SUBSCRIBE sent after a registration can be overtaken by a stale UNSUBSCRIBE.
    sink: tokio::sync::Mutex<Option<(PubSubSink, u64)>>,
    /// The epoch of the installed sink (0 while reconnecting), readable without the sink
    /// lock: a channel confirmed on this epoch needs neither a SUBSCRIBE nor the lock
    /// (which the sweep holds across its UNSUBSCRIBE).
    epoch: AtomicU64,
    command_timeout: Duration,
    /// Dropped with this struct, which tells the listener task to stop.
    _shutdown: oneshot::Sender<()>,
}

struct ChannelEntry {
    tx: broadcast::Sender<Notice>,
    refs: usize,
    /// The connection epoch on which the subscription was confirmed (0: not confirmed).
    confirmed: u64,
    /// Since when nobody listens (for the sweep).
    idle_since: Option<tokio::time::Instant>,
}

impl NotifierShared {
    fn channels(&self) -> MutexGuard<'_, HashMap<String, ChannelEntry>> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        if let Some(entry) = self.channels().get(channel) {
            // An idle channel (nobody waits; a leader hears its own completion) costs no copy.
            if entry.tx.receiver_count() > 0 {
                let _ = entry.tx.send(Notice::Message(Arc::from(payload)));
            }
        }
    }

    fn resync_all(&self) {
        for entry in self.channels().values() {
            let _ = entry.tx.send(Notice::Resync);
        }
    }

    /// Unsubscribes channels idle for longer than [`IDLE_UNSUBSCRIBE`], in one command.
    async fn sweep(&self) {
        let mut slot = self.sink.lock().await;
        let idle: Vec<String> = {
            let mut channels = self.channels();
            let now = tokio::time::Instant::now();
            let idle: Vec<String> = channels
                .iter()
                .filter(|(_, e)| {
                    e.refs == 0 && e.idle_since.is_some_and(|t| now - t >= IDLE_UNSUBSCRIBE)
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in &idle {
                channels.remove(name);
            }
            idle
        };
        if idle.is_empty() {
            return;
        }
        if let Some((sink, _)) = slot.as_mut() {
            let _ = tokio::time::timeout(self.command_timeout, sink.unsubscribe(&idle)).await;
        }
    }
}

impl Notifier {
    fn start(target: Arc<Target>, first: Option<PubSub>, settings: ConnectSettings) -> Notifier {
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let shared = Arc::new(NotifierShared {
            channels: Mutex::new(HashMap::new()),
            sink: tokio::sync::Mutex::new(None),
            epoch: AtomicU64::new(0),
            command_timeout: settings.command_timeout,
            _shutdown: shutdown_tx,
        });
        tokio::spawn(listen(
            Arc::downgrade(&shared),
            target,
            first,
            shutdown_rx,
            settings.connect_timeout,
        ));
        Notifier { shared }
    }

    /// Registers a local subscriber, then, unless the channel is already confirmed on the
    /// current connection, subscribes and waits for the confirmation. If the connection is
    /// down, returns at once: the listener re-subscribes on reconnect and sends a Resync,
    /// so nothing published meanwhile is silently missed.
    async fn subscribe(&self, channel: &str) -> Subscription {
        let (rx, confirmed) = self.register(channel);
        let guard = ChannelGuard {
            shared: Arc::clone(&self.shared),
            channel: channel.to_owned(),
        };
        let live = self.shared.epoch.load(Ordering::Acquire);
        if live != 0 && confirmed == live {
            return Subscription::new(rx, Some(guard), true); // warm: no round trip, no lock
        }
        let current = self.shared.sink.lock().await.clone();
        let Some((mut sink, epoch)) = current else {
            return Subscription::new(rx, Some(guard), false);
        };
        if confirmed == epoch {
            return Subscription::new(rx, Some(guard), true); // already subscribed: no round trip
        }
        let ok = match tokio::time::timeout(self.shared.command_timeout, sink.subscribe(channel))
            .await
        {
            Ok(Ok(())) => {
                if let Some(entry) = self.shared.channels().get_mut(channel) {
                    entry.confirmed = entry.confirmed.max(epoch);
                }
                true
            }
            Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                // The connect check found SUBSCRIBE allowed: the right was revoked since.
                tracing::warn!(channel, error = %e, "subscribe refused; waiting for the holder's TTL instead");
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(channel, error = %e, "subscribe failed; relying on resync");
                false
            }
            Err(_) => {
                tracing::debug!(channel, "subscribe timed out; relying on resync");
                false
            }
        };
        Subscription::new(rx, Some(guard), ok)
    }

    /// A subscription if the channel is already confirmed on the current connection (no
    /// round trip); otherwise nothing is registered.
    fn subscribe_if_warm(&self, channel: &str) -> Option<Subscription> {
        let live = self.shared.epoch.load(Ordering::Acquire);
        if live == 0 {
            return None;
        }
        let rx = {
            let mut channels = self.shared.channels();
            let entry = channels.get_mut(channel).filter(|e| e.confirmed == live)?;
            entry.refs += 1;
            entry.idle_since = None;
            entry.tx.subscribe()
        };
        let guard = ChannelGuard {
            shared: Arc::clone(&self.shared),
            channel: channel.to_owned(),
        };
        Some(Subscription::new(rx, Some(guard), true))
    }

    /// Registers a local subscriber of `channel`: its receiver, and the epoch on which the
    /// channel was confirmed (0: not yet).
    fn register(&self, channel: &str) -> (broadcast::Receiver<Notice>, u64) {
        let mut channels = self.shared.channels();
        let entry = channels
            .entry(channel.to_owned())
            .or_insert_with(|| ChannelEntry {
                tx: broadcast::channel(CHANNEL_CAPACITY).0,
                refs: 0,
                confirmed: 0,
                idle_since: None,
            });
        entry.refs += 1;
        entry.idle_since = None;
        (entry.tx.subscribe(), entry.confirmed)
    }
}

/// Keeps one local subscription to a channel registered. When the last one goes, the
/// channel turns idle and the sweep unsubscribes it a little later.
pub(crate) struct ChannelGuard {
    shared: Arc<NotifierShared>,
    channel: String,
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if let Some(entry) = self.shared.channels().get_mut(&self.channel) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                entry.idle_since = Some(tokio::time::Instant::now());
            }
        }
    }
}

/// The listener task: owns the pub/sub stream, reconnects, re-subscribes and resyncs, and
/// sweeps idle channels. It also moves to a new master when the target's generation moves
/// (a Sentinel failover).
#[allow(clippy::too_many_lines)] // one reconnect loop; the notifier seam of issue 11 splits it
async fn listen(
    weak: Weak<NotifierShared>,
    target: Arc<Target>,
    mut first: Option<PubSub>,
    mut shutdown: oneshot::Receiver<()>,
    connect_timeout: Duration,
) {
    let mut backoff = RECONNECT_MIN;
    let mut resubscribe_backoff = RESUBSCRIBE_MIN;
    let mut epoch = 0u64;
    let mut moved = target.watch();
    loop {
        moved.borrow_and_update();
        let pubsub = if let Some(p) = first.take() {
            p
        } else {
            let client = target.client().0;
            let attempt = tokio::time::timeout(connect_timeout, client.get_async_pubsub());
            let outcome = tokio::select! {
                _ = &mut shutdown => return,
                r = attempt => r,
            };
            match outcome {
                Ok(Ok(p)) => p,
                other => {
                    if let Ok(Err(e)) = other {
                        tracing::debug!(error = %e, "pub/sub reconnect failed");
                    }
                    target.noticed(&Error::new(
                        ErrorKind::Connection,
                        "pub/sub reconnect failed",
                    ));
                    tokio::select! {
                        _ = &mut shutdown => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue;
                }
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        epoch += 1;
        {
            let Some(shared) = weak.upgrade() else { return };
            let mut slot = shared.sink.lock().await;
            let names: Vec<String> = shared.channels().keys().cloned().collect();
            if !names.is_empty() {
                let resubscribed =
                    tokio::time::timeout(shared.command_timeout, sink.subscribe(&names)).await;
                if !matches!(resubscribed, Ok(Ok(()))) {
                    // A refused SUBSCRIBE (a channel permission revoked) fails on every new
                    // connection: back off instead of reconnecting in a tight loop. Waiters
                    // meanwhile re-check when their holder's TTL runs out.
                    let error = match resubscribed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", shared.command_timeout),
                    };
                    tracing::warn!(
                        channels = names.len(),
                        %error,
                        retry_in = ?resubscribe_backoff,
                        "pub/sub re-subscribe failed; waiters fall back to TTL re-checks until it succeeds"
                    );
                    drop(slot);
                    drop(shared);
                    drop((sink, stream));
                    tokio::select! {
                        _ = &mut shutdown => return,
                        () = tokio::time::sleep(resubscribe_backoff) => {}
                    }
                    resubscribe_backoff = (resubscribe_backoff * 2).min(RESUBSCRIBE_MAX);
                    continue;
                }
                resubscribe_backoff = RESUBSCRIBE_MIN;
                let mut channels = shared.channels();
                for name in &names {
                    if let Some(entry) = channels.get_mut(name) {
                        entry.confirmed = epoch;
                    }
                }
            }
            *slot = Some((sink, epoch));
            shared.epoch.store(epoch, Ordering::Release);
            drop(slot);
            shared.resync_all();
        }
        backoff = RECONNECT_MIN;
        let mut sweep = tokio::time::interval(IDLE_UNSUBSCRIBE);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => return,
                msg = stream.next() => msg,
                // A new master (Sentinel failover): reconnect there, re-subscribe, resync.
                _ = moved.changed() => None,
                _ = sweep.tick() => {
                    let Some(shared) = weak.upgrade() else { return };
                    shared.sweep().await;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            let Some(shared) = weak.upgrade() else { return };
            shared.dispatch(msg.get_channel_name(), msg.get_payload_bytes());
        }
        tracing::debug!("pub/sub connection lost; reconnecting");
        target.noticed(&Error::new(
            ErrorKind::Connection,
            "pub/sub connection lost",
        ));
        let Some(shared) = weak.upgrade() else { return };
        let mut slot = shared.sink.lock().await;
        *slot = None;
        shared.epoch.store(0, Ordering::Release);
        drop(slot);
        drop(shared);
    }
}
