//! [`Herd`], the handle every primitive hangs off, and its [`Builder`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::backend::gate::{Gate, Stage};
use crate::backend::memory::MemoryBackend;
use crate::backend::preflight::Preflight;
use crate::backend::redis::{ConnectSettings, RedisBackend};
use crate::backend::target::{Endpoint, TlsFiles};
use crate::backend::Backend;
use crate::coalesce::Flights;
use crate::error::{Error, Result};
use crate::keys::{self, JobKeys};
use crate::obs::{Primitive, Stats};
use crate::semaphore::Gates;
use crate::watchdog::Watchdog;

/// A cheap, cloneable handle to one coordination backend (Redis or in-memory) plus its
/// settings. Share it by cloning; every clone uses the same connections.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), herdlock::Error> {
/// let herd = herdlock::Herd::memory();
/// let other = herd.clone(); // same backend, same connections
/// assert_eq!(other.prefix(), "herdlock");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Herd {
    pub(crate) inner: Arc<HerdInner>,
}

#[derive(Debug)]
pub(crate) struct HerdInner {
    pub(crate) backend: Backend,
    pub(crate) prefix: String,
    pub(crate) owner: String,
    pub(crate) lock_ttl: Duration,
    pub(crate) flights: Flights,
    pub(crate) gates: Gates,
    pub(crate) watchdog: Watchdog,
    /// The counters behind [`Herd::stats`] (shared with the watchdog thread).
    pub(crate) stats: Arc<Stats>,
}

/// Local activity of a [`Herd`], from [`Herd::stats`]: the fan-out gauges (now) and
/// cumulative counters per primitive (since the herd was built; clones share them).
///
/// The same figures go to the `metrics` facade with the crate feature `metrics` (README,
/// "Observability", lists the metric names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HerdStats {
    /// Fan-out runs in progress in this process (one per job id, however many callers).
    pub in_flight: usize,
    /// Of those, the ones subscribed and waiting for another process's run.
    pub following: usize,
    /// Callers waiting on those runs (all local callers of a job id share one run).
    pub waiting: usize,
    /// Locks: [`try_lock`](Herd::try_lock), [`lock`](Herd::lock), [`once`](Herd::once).
    pub lock: PrimitiveStats,
    /// Multi-locks: [`try_multi`](Herd::try_multi), [`multi`](Herd::multi); one
    /// acquisition per multi-lock, however many keys.
    pub multi: PrimitiveStats,
    /// Semaphore permits.
    pub semaphore: PrimitiveStats,
    /// Fan-out runs: `acquired` counts runs this process led, `busy` flights that found
    /// another run in progress, `timeouts` callers whose timeout passed, `lost` leaders that
    /// lost their lease, `released` runs that ended holding it.
    pub fanout: PrimitiveStats,
    /// How fan-out callers got their results.
    pub runs: FanoutStats,
}

/// Cumulative counters of one primitive, in [`HerdStats`].
///
/// Every acquisition ends released or lost, once: `acquired - released - lost` is what
/// this herd holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PrimitiveStats {
    /// Acquisitions (a lock taken, a multi-lock taken, a permit granted, a run led).
    pub acquired: u64,
    /// Acquire attempts that found it held: every `try_*` call that returned busy, and
    /// every attempt of a waiting call that found it still held.
    pub busy: u64,
    /// Waiting calls whose wait (or fan-out timeout) passed.
    pub timeouts: u64,
    /// Holds that ended lost: a renewal found another holder or came too late, an
    /// `extend` found it gone, or it was given up after its local deadline.
    pub lost: u64,
    /// Holds that ended while still held: released, or the guard dropped.
    pub released: u64,
    /// The lost-message detector: waiters woken by their re-check timer (the holder's TTL
    /// ran out, or the 30 s cap) rather than by a notice, whose re-check found what they
    /// waited for: a free lock or permit, or a run's result. For fan-out it counts only
    /// results (a follower that finds the run gone without one is a takeover); for locks
    /// it also counts holders that died without releasing; fair semaphore waiters, whose
    /// timer also refreshes their queue place, are not counted. Above zero on a healthy Redis,
    /// notices are being lost (pub/sub down or refused, or a release that could not
    /// publish).
    pub lost_notices: u64,
}

/// How fan-out callers got their results, in [`HerdStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FanoutStats {
    /// Runs this process led (the job ran here).
    pub led: u64,
    /// Callers that received a result another caller's run produced (in this process or
    /// another).
    pub followed: u64,
    /// Callers served a stored result within their cache age.
    pub cached: u64,
    /// Flights whose awaited leader ended without a result (it died or gave up), so they
    /// contended for the next run.
    pub takeovers: u64,
    /// Runs led although the previous run's result (still stored) may have completed after
    /// their newest caller called: possible coalescing misses. On Redis the acquire step
    /// serves every result it can prove completed after the call; this counts the runs it
    /// could not decide, within the clock bound's uncertainty (the round trip of the best
    /// clock sample plus drift). Always 0 on the in-memory backend (one clock).
    pub possible_misses: u64,
}

/// What [`Herd::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Fan-out runs this process led when the shutdown began that finished (and published)
    /// within the grace period.
    pub runs_finished: usize,
    /// Runs still going when the grace period ended: cancelled, their locks released.
    pub runs_cancelled: usize,
    /// Locks, multi-locks and permits still held that were released at once.
    pub released: usize,
    /// Locks, multi-locks and permits whose release failed (Redis unreachable): they run
    /// out with their TTL.
    pub release_failures: usize,
}

/// Configures and builds a [`Herd`]. Every setter documents its default and why.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// # fn main() -> Result<(), herdlock::Error> {
/// let herd = herdlock::Herd::builder()
///     .prefix("myapp")
///     .owner("worker-7")
///     .lock_ttl(Duration::from_secs(30))
///     .memory()?;
/// assert_eq!(herd.owner(), "worker-7");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    prefix: String,
    owner: Option<String>,
    lock_ttl: Duration,
    connect_timeout: Duration,
    command_timeout: Duration,
    allow_eviction: bool,
    tls: TlsFiles,
    master_auth: Option<(Option<String>, String)>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            prefix: "herdlock".to_owned(),
            owner: None,
            lock_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            allow_eviction: false,
            tls: TlsFiles::default(),
            master_auth: None,
        }
    }
}

impl Builder {
    /// The prefix of every Redis key and channel herdlock uses.
    ///
    /// Default: `herdlock`. Give each application (or test) its own prefix to keep their
    /// keys apart on a shared Redis. It must not contain `{` or `}` (the hash tag belongs
    /// to the key) and is at most [`MAX_PREFIX_LEN`](crate::limits::MAX_PREFIX_LEN) bytes.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The owner label stamped on every lock this herd takes, shown to contenders and by
    /// [`Herd::lock_status`].
    ///
    /// Default: `<hostname>.<pid>`, which is what you want when debugging a stuck job
    /// ("which machine, which process?"). At most [`MAX_OWNER_LEN`](crate::limits::MAX_OWNER_LEN)
    /// bytes, no control characters.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// The TTL of locks taken without an explicit TTL.
    ///
    /// Default: 10 s. The TTL is the crash backstop: a holder that dies without releasing
    /// blocks others for at most this long. Choose it longer than the work, or extend the
    /// lock as the work goes on.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// How long one attempt to connect to Redis may take.
    ///
    /// Default: 2 s: long enough for a loaded server on a LAN, short enough that a caller
    /// learns quickly that Redis is down.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one Redis command may take before the call fails with a connection error.
    ///
    /// Default: 2 s. Every herdlock step is one short script, so a command that takes
    /// longer means Redis is stalled or unreachable.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Whether to run on a Redis that may evict keys (a `maxmemory-policy` other than
    /// `noeviction`).
    ///
    /// Default: `false`, and [`connect`](Builder::connect) refuses such a server with
    /// [`ServerConfig`](crate::ErrorKind::ServerConfig). Under memory pressure an evicting
    /// Redis can delete a held lock (a second holder gets in while the first still sees
    /// its guard as held). Set it only for
    /// a Redis that never reaches its `maxmemory`, or where duplicate work is acceptable.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Trusts this CA (PEM, one or more certificates) for `rediss://` connections, instead
    /// of the built-in Mozilla roots (`webpki-roots`).
    ///
    /// Default: the built-in roots, which is right for a managed Redis with a public
    /// certificate. Set it for a server whose certificate your own CA signed. Only for
    /// `rediss://` URLs (and Sentinels reached over `rediss://`, and Redis Cluster nodes
    /// given as `rediss://` or `rediss+cluster://`, every node trusting this CA): with a
    /// `redis://` URL, connecting fails with [`InvalidInput`](crate::ErrorKind::InvalidInput).
    #[cfg(feature = "tls-rustls")]
    pub fn tls_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca = Some(ca_pem.into());
        self
    }

    /// Presents this client certificate and key (PEM; the key PKCS#8, PKCS#1 or SEC1) on
    /// `rediss://` connections (a cluster's included): mutual TLS, for a server started
    /// with `tls-auth-clients yes`.
    ///
    /// Default: no client certificate.
    #[cfg(feature = "tls-rustls")]
    pub fn tls_client_cert(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// The credentials of the master (and its replicas) for
    /// [`connect_sentinel`](Builder::connect_sentinel); `username` `None` is the `default`
    /// user. The Sentinel URLs carry the Sentinels' own credentials.
    ///
    /// Default: none (a master without `requirepass`).
    pub fn master_auth(mut self, username: Option<&str>, password: impl Into<String>) -> Self {
        self.master_auth = Some((username.map(str::to_owned), password.into()));
        self
    }

    /// Connects to the master that the Sentinels at `sentinels` (`redis://host:port` or
    /// `rediss://host:port`, all the same scheme) monitor as `master_name`, and follows it
    /// across failovers.
    ///
    /// The master is the first address a Sentinel names whose server answers `ROLE` as a
    /// master. It is reached over TLS when the Sentinels are (with the same
    /// [`tls_ca`](Builder::tls_ca) and [`tls_client_cert`](Builder::tls_client_cert)), with
    /// the credentials of [`master_auth`](Builder::master_auth), on database 0. Then the
    /// herd follows it: it listens for `+switch-master` on one Sentinel, and a connection
    /// error or a `READONLY` reply makes it ask the Sentinels again (every 100 ms until a
    /// master answers); when the master moved, the command connection, the watchdog's and
    /// the pub/sub connection are rebuilt on the new one and every waiter re-checks. Calls
    /// made while no master answers fail with [`Connection`](crate::ErrorKind::Connection);
    /// waiters keep their deadlines. The Sentinels' user needs only `SENTINEL
    /// GET-MASTER-ADDR-BY-NAME`, `SUBSCRIBE +switch-master` and `PING`/`HELLO` (README,
    /// "Running at scale").
    ///
    /// What a failover keeps: Redis replicates asynchronously, so a lock or result written
    /// just before the master died may be missing on the promoted replica. A holder whose
    /// lock is missing learns it at its next renewal
    /// ([`LockLost`](crate::ErrorKind::LockLost)); one that took its lock with
    /// [`LockOptions::replicas`](crate::LockOptions::replicas) keeps it.
    ///
    /// # Errors
    ///
    /// As [`connect`](Builder::connect), and [`Connection`](crate::ErrorKind::Connection)
    /// when no Sentinel names a master that answers as one.
    pub async fn connect_sentinel<S: AsRef<str>>(
        self,
        master_name: &str,
        sentinels: &[S],
    ) -> Result<Herd> {
        let endpoint = Endpoint::Sentinel {
            master: master_name.to_owned(),
            sentinels: sentinels.iter().map(|s| s.as_ref().to_owned()).collect(),
            auth: self.master_auth.clone(),
        };
        self.connect_to(&endpoint).await
    }

    /// Connects to Redis at `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://…` for TLS with the `tls-rustls` feature), checks that
    /// both connections (commands and pub/sub) work, and checks the server and the user:
    ///
    /// - the server must not evict keys (`maxmemory-policy noeviction`, read from `INFO
    ///   memory` or `CONFIG GET`; if the user may read neither, a `warn` is logged and the
    ///   check skipped), unless [`allow_eviction`](Builder::allow_eviction) says otherwise;
    /// - the user must be allowed every command herdlock runs, on the keys and channels
    ///   under the prefix (`prefix:*`): checked with `ACL DRYRUN` when the user may run
    ///   it, else with harmless real commands on a probe key and channel under the prefix.
    ///   README, "Redis requirements", has the least-privilege `ACL SETUSER` rule.
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) for a bad option or URL;
    /// [`Connection`](crate::ErrorKind::Connection) when Redis cannot be reached within
    /// the connect timeout; [`Auth`](crate::ErrorKind::Auth) when it rejects the
    /// credentials; [`ServerConfig`](crate::ErrorKind::ServerConfig) when it may evict
    /// keys; [`Permission`](crate::ErrorKind::Permission) when the user may not do
    /// something herdlock needs (the message names each missing right and the rule that
    /// grants it). Nothing is left running after an error.
    pub async fn connect(self, url: &str) -> Result<Herd> {
        self.connect_to(&Endpoint::Url(url.to_owned())).await
    }

    async fn connect_to(self, endpoint: &Endpoint) -> Result<Herd> {
        let settings = self.settings()?;
        let backend =
            RedisBackend::connect(endpoint, self.tls.clone(), settings, self.preflight()).await?;
        let backend = Backend::Redis(backend);
        backend.ping().await?;
        Ok(self.finish(backend))
    }

    /// Connects to a Redis Cluster through `nodes` (seed node URLs, `redis://[user:password@]host:port`;
    /// any reachable master or replica will do, the rest is discovered), with the checks
    /// of [`connect`](Builder::connect) run on every master. The same as `connect` with
    /// the cluster URL `redis+cluster://[user:password@]host:port,host:port/`, which
    /// [`connect_lazy`](Builder::connect_lazy) accepts too.
    ///
    /// On a cluster every script touches one slot (a key's names share the hash tag
    /// `{key}`); notices travel over sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`), so a
    /// completion reaches only the shard that owns the job; the keys of one multi-lock must
    /// share a hash tag (`{order-7}:a`, `{order-7}:b`). See README, "Running at scale".
    ///
    /// # Errors
    ///
    /// As [`connect`](Builder::connect); [`InvalidInput`](crate::ErrorKind::InvalidInput)
    /// also when `nodes` is empty.
    pub async fn connect_cluster<S: AsRef<str>>(self, nodes: &[S]) -> Result<Herd> {
        let settings = self.settings()?;
        let nodes: Vec<String> = nodes.iter().map(|n| n.as_ref().to_owned()).collect();
        if nodes.is_empty() {
            return Err(Error::invalid(
                "connect_cluster needs at least one node url",
            ));
        }
        let backend =
            RedisBackend::connect_cluster(&nodes, &self.tls, settings, self.preflight()).await?;
        let backend = Backend::Redis(backend);
        backend.ping().await?;
        Ok(self.finish(backend))
    }

    /// Like [`connect`](Builder::connect), but connects on first use: this only checks
    /// the options and the URL. Connection and credential errors surface from the first
    /// call that needs Redis, and so do the server and permission checks of `connect`,
    /// which that call runs first (concurrent first calls wait for one check). A refusal
    /// ([`ServerConfig`](crate::ErrorKind::ServerConfig),
    /// [`Permission`](crate::ErrorKind::Permission)) is repeated to every call for 5 s
    /// before the next call checks again, so a misconfigured herd does not flood Redis.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (the pub/sub listener task is spawned here).
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) for a bad option or URL.
    pub fn connect_lazy(self, url: &str) -> Result<Herd> {
        let settings = self.settings()?;
        let backend = RedisBackend::connect_lazy(url, &self.tls, settings, self.preflight())?;
        Ok(self.finish(Backend::Redis(backend)))
    }

    /// Builds an in-memory herd: the same semantics, for one process (tests, the quick
    /// start, single-process deployments). Clones share one state.
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) for a bad option.
    pub fn memory(self) -> Result<Herd> {
        self.settings()?;
        Ok(self.finish(Backend::Memory(MemoryBackend::default())))
    }

    /// Builds an in-memory herd that shares `other`'s in-memory state but has its own
    /// options (owner label, TTL) and its own local coalescing: a second "node" of an
    /// in-process cluster, for tests and simulations.
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) for a bad option, or when `other`
    /// is not an in-memory herd.
    pub fn memory_peer(self, other: &Herd) -> Result<Herd> {
        self.settings()?;
        match &other.inner.backend {
            Backend::Memory(memory) => Ok(self.finish(Backend::Memory(memory.peer()))),
            Backend::Redis(_) => Err(Error::invalid(
                "memory_peer needs an in-memory herd to share state with",
            )),
        }
    }

    fn settings(&self) -> Result<ConnectSettings> {
        keys::validate_prefix(&self.prefix)?;
        if let Some(owner) = &self.owner {
            keys::validate_owner(owner)?;
        }
        keys::validate_ttl("default lock ttl", self.lock_ttl)?;
        for (what, t) in [
            ("connect timeout", self.connect_timeout),
            ("command timeout", self.command_timeout),
        ] {
            if t.is_zero() || t > Duration::from_secs(300) {
                return Err(Error::invalid(format!(
                    "{what} must be between 1 ms and 300 s, got {t:?}"
                )));
            }
        }
        Ok(ConnectSettings {
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
        })
    }

    fn preflight(&self) -> Preflight {
        Preflight {
            prefix: self.prefix.clone(),
            allow_eviction: self.allow_eviction,
            tls: self.tls.clone(),
        }
    }

    fn finish(self, backend: Backend) -> Herd {
        let stats = Arc::new(Stats::default());
        let owner = self.owner.unwrap_or_else(default_owner);
        Herd {
            inner: Arc::new(HerdInner {
                watchdog: Watchdog::new(backend.clone(), Arc::clone(&stats), owner.clone()),
                stats,
                backend,
                prefix: self.prefix,
                owner,
                lock_ttl: self.lock_ttl,
                flights: Flights::default(),
                gates: Gates::default(),
            }),
        }
    }
}

impl Herd {
    /// A [`Builder`] with every option at its default.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Connects to Redis at `url` with default options. See [`Builder::connect`].
    ///
    /// # Errors
    ///
    /// As [`Builder::connect`].
    pub async fn connect(url: &str) -> Result<Herd> {
        Builder::default().connect(url).await
    }

    /// An in-memory herd with default options. See [`Builder::memory`].
    pub fn memory() -> Herd {
        Builder::default().finish(Backend::Memory(MemoryBackend::default()))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The owner label stamped on this herd's locks.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The default lock TTL.
    pub fn lock_ttl(&self) -> Duration {
        self.inner.lock_ttl
    }

    /// For the in-memory backend: how many entries (locks, results, semaphores) it holds
    /// once everything expired is dropped; `None` for Redis (use `DBSIZE`). Tests use it to
    /// show that the footprint stays bounded.
    #[doc(hidden)]
    pub fn memory_entries(&self) -> Option<usize> {
        match self.backend() {
            crate::backend::Backend::Memory(m) => Some(m.entries()),
            crate::backend::Backend::Redis(_) => None,
        }
    }

    /// A snapshot of this herd's local activity, for metrics and debugging: the fan-out
    /// gauges and every primitive's cumulative counters ([`HerdStats`]).
    pub fn stats(&self) -> HerdStats {
        let stats = &self.inner.stats;
        HerdStats {
            in_flight: self.inner.flights.in_flight(),
            following: self.inner.flights.following(),
            waiting: self.inner.flights.waiting(),
            lock: stats.primitive(Primitive::Lock),
            multi: stats.primitive(Primitive::Multi),
            semaphore: stats.primitive(Primitive::Semaphore),
            fanout: stats.primitive(Primitive::Fanout),
            runs: stats.fanout(),
        }
    }

    /// Shuts this herd down cleanly, for a service being stopped or redeployed.
    ///
    /// In order:
    /// 1. **Drain**: every new acquisition, fan-out call and push of this herd (any clone)
    ///    fails with [`ShuttingDown`](crate::ErrorKind::ShuttingDown); waiting lock,
    ///    multi-lock and permit callers stop waiting with that error; `heartbeat()` on every
    ///    guard, permit and run fails with it, so long work can stop at a safe point and
    ///    release.
    /// 2. **Finish runs**: fan-out jobs this process leads keep running, up to `grace`,
    ///    and publish their results as usual (their callers, here and elsewhere, get them).
    ///    Followers here keep waiting for other processes' runs meanwhile.
    /// 3. **Close**: a run still going after `grace` is cancelled and its lock released
    ///    (remote waiters take over at once); the remaining callers here get
    ///    `ShuttingDown`.
    /// 4. **Release**: every lock, multi-lock and permit still held through this herd is
    ///    released at once instead of being left to its TTL, after its holder is told
    ///    (its [`LostToken`](crate::LostToken) fires; its `release()` then returns
    ///    `ShuttingDown`). Another process waiting for one gets it right away.
    /// 5. **Stop**: the watchdog thread ends, and the pub/sub listener and its connection
    ///    stop. The command connection closes when the last clone of the herd is dropped.
    ///
    /// A holder still working when its lock is released here is where a holder whose lease
    /// was lost is: told first, then someone else may have the lock. Work that must not
    /// overlap the next holder checks `heartbeat()` or its [`LostToken`](crate::LostToken)
    /// (or fences its writes with the [`FencingToken`](crate::FencingToken)); `once`,
    /// `run_locked` and fan-out runs with `cancel_on_lost` are cancelled. Stop such work
    /// before calling `shutdown`, or give it a safe point through `heartbeat()`.
    ///
    /// Calling it again (or from another clone) runs the remaining steps again, which finds
    /// nothing left to do. A release that cannot reach Redis is counted in the report; that
    /// lock runs out with its TTL.
    ///
    /// # Errors
    ///
    /// None today: what could not be done is counted in the [`ShutdownReport`]. (The
    /// `Result` leaves room for a failure that must stop a deployment.)
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe in the sense that dropping it midway leaves the herd draining (or
    /// closed) with some leases not yet released (they run out with their TTL).
    pub async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport> {
        let backend = self.backend();
        let gate = backend.gate();
        gate.advance(Stage::Draining);
        // Lock, multi-lock and permit waiters re-check now and are refused.
        backend.wake_all();
        let leading = self.inner.flights.leading();
        let finished = tokio::time::timeout(grace, self.inner.flights.none_leading())
            .await
            .is_ok();
        let cancelled = if finished {
            0
        } else {
            self.inner.flights.leading()
        };
        gate.advance(Stage::Closed);
        // Followers re-check and are refused; runs still going are cancelled (each releases
        // its lock, within a command timeout).
        backend.wake_all();
        let _ = tokio::time::timeout(backend.command_timeout(), self.inner.flights.none_leading())
            .await;
        // Acquire steps cut off by their callers (a signal, a deadline) are finished and
        // undone in the background: let them end (each within a few command timeouts), so
        // that what they took is released, not left to its TTL when the process exits.
        let _ = tokio::time::timeout(backend.command_timeout() * 3, gate.cleanups_done()).await;
        let (released, release_failures) = self.inner.watchdog.release_all(backend).await;
        self.inner.watchdog.stop();
        backend.close();
        Ok(ShutdownReport {
            runs_finished: leading.saturating_sub(cancelled),
            runs_cancelled: cancelled,
            released,
            release_failures,
        })
    }

    /// Whether [`shutdown`](Herd::shutdown) has begun on this herd (or any clone of it).
    pub fn is_shutting_down(&self) -> bool {
        self.backend().gate().stage() >= Stage::Draining
    }

    /// The counters behind [`stats`](Herd::stats).
    pub(crate) fn obs(&self) -> &Stats {
        &self.inner.stats
    }

    /// Whether this herd runs on the in-memory backend.
    pub fn is_memory(&self) -> bool {
        matches!(self.inner.backend, Backend::Memory(_))
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub(crate) fn job_keys(&self, key: &str) -> Result<JobKeys> {
        keys::validate_key(key)?;
        Ok(JobKeys::new(&self.inner.prefix, key))
    }
}

/// Runs `cleanup` (a release, a queue departure) in the background on behalf of a `Drop`.
/// Never blocks: without a Tokio runtime nothing is sent, and the TTL or lease is the
/// backstop. A failure has no caller to report to, so it goes to `tracing`.
pub(crate) fn spawn_cleanup<T>(
    gate: &Arc<Gate>,
    what: &'static str,
    cleanup: impl std::future::Future<Output = Result<T>> + Send + 'static,
) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::debug!(what, "dropped outside a runtime; the TTL is the backstop");
        return;
    };
    // Counted until it ends: `Herd::shutdown` waits for the herd's cleanups.
    let counted = gate.cleanup();
    handle.spawn(async move {
        let _counted = counted;
        if let Err(e) = cleanup.await {
            tracing::debug!(what, error = %e, "background cleanup of a dropped handle failed");
        }
    });
}

/// `<hostname>.<pid>`, computed once.
fn default_owner() -> String {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER
        .get_or_init(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .or_else(|_| std::fs::read_to_string("/etc/hostname"))
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .or_else(|| std::env::var("COMPUTERNAME").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty() && !h.chars().any(char::is_control))
                .unwrap_or_else(|| "localhost".to_owned());
            format!("{host}.{}", std::process::id())
        })
        .clone()
}

/// A token unique to this acquisition: a per-process random seed and a counter.
pub(crate) fn nonce() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{seed:016x}{n:x}")
}
