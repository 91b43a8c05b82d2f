//! Distributed locks: [`Herd::try_lock`], [`Herd::lock`], the closure forms [`Herd::once`]
//! and [`Herd::run_locked`], and [`LockGuard`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;

use crate::backend::gate::{released_by_shutdown, Stage};
use crate::backend::{holder_nonce, holder_token, parse_holder, AcquireReply, Backend};
use crate::codec::{JobError, JobResult};
use crate::error::{Error, ErrorKind, Result};
use crate::herd::{nonce, spawn_cleanup, Herd};
use crate::keys::{self, JobKeys};
use crate::obs::{self, Primitive};
use crate::wait::{self, Finished, Hint, Until, Woken};
use crate::watchdog::{self, BeatFailed, LeaseHandle, LeaseTerms, LostToken, Renewal};

/// A fencing token: strictly increasing per key across every acquisition by any process.
///
/// It is Redis `TIME` in microseconds at the acquisition, so it keeps increasing after all
/// of a key's state expired, across client restarts and Redis restarts, as long as the Redis
/// host's clock moves forward (two acquisitions of one key are at least one script apart).
/// A Redis clock stepped back, or a failover to a replica whose clock is behind, can hand
/// out a lower token: keep the Redis hosts' clocks synchronized when you fence across
/// failovers.
///
/// Pass it to the system the lock protects and have that system reject writes carrying a
/// token lower than one it has already seen: that makes a paused or partitioned former
/// holder harmless even after its lease ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    pub(crate) fn new(value: u64) -> FencingToken {
        FencingToken(value)
    }

    /// The token as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Holder {
    /// The holder's owner label (see [`Builder::owner`](crate::Builder::owner)).
    pub owner: String,
    /// The holder's fencing token.
    pub fence: FencingToken,
    /// How long until the lock expires unless extended; `None` if it has no expiry.
    pub remaining: Option<Duration>,
}

impl Holder {
    pub(crate) fn parse(value: &str, pttl_ms: i64) -> Result<Holder> {
        let (fence, owner) = parse_holder(value)?;
        Ok(Holder {
            owner: owner.to_owned(),
            fence: FencingToken(fence),
            remaining: u64::try_from(pttl_ms).ok().map(Duration::from_millis),
        })
    }
}

/// Something held under a herd's prefix, as [`Herd::list_held`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Held {
    /// The key (lock name, job id or semaphore name), as the caller gave it.
    pub key: String,
    /// What holds it.
    pub kind: HeldKind,
}

/// What kind of primitive a [`Held`] entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum HeldKind {
    /// A lock, a key of a multi-lock, or a fan-out run (which holds the lock of its job id).
    Lock,
    /// A semaphore with at least one permit held.
    Semaphore,
}

impl Held {
    /// The entry a Redis key under `prefix` stands for: `prefix:{k}:lock` is lock `k`,
    /// `prefix:{t}:a:{t}:b:sem` semaphore `a:{t}:b` (see `JobKeys`); other keys, none.
    fn parse(prefix: &str, name: &str) -> Option<Held> {
        let rest = name.strip_prefix(prefix)?.strip_prefix(':')?;
        let (base, kind) = if let Some(base) = rest.strip_suffix(":lock") {
            (base, HeldKind::Lock)
        } else {
            (rest.strip_suffix(":sem")?, HeldKind::Semaphore)
        };
        let inner = base.strip_prefix('{')?;
        let key = match inner.strip_suffix('}') {
            Some(plain) if !plain.contains(['{', '}']) => plain,
            _ => inner.split_once("}:")?.1,
        };
        Some(Held {
            key: key.to_owned(),
            kind,
        })
    }
}

/// A snapshot of one lock key, for debugging stuck work. See [`Herd::lock_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockStatus {
    /// The current holder, if the lock is held.
    pub holder: Option<Holder>,
    /// The current holder's fencing token, `None` when nobody holds the key. Tokens are
    /// Redis `TIME` in microseconds at acquisition, so no counter outlives a name's state.
    pub last_fence: Option<FencingToken>,
}

/// The result of [`Herd::try_lock`]: the lock, or who has it.
#[derive(Debug)]
#[must_use = "dropping an acquired lock releases it in the background"]
#[allow(clippy::large_enum_variant)] // Acquired is the common case; boxing it costs an allocation
pub enum TryLock {
    /// The caller holds the lock now.
    Acquired(LockGuard),
    /// Someone else holds it; nothing was changed.
    Busy(Holder),
}

impl TryLock {
    /// The guard, if the lock was acquired.
    pub fn acquired(self) -> Option<LockGuard> {
        match self {
            TryLock::Acquired(guard) => Some(guard),
            TryLock::Busy(_) => None,
        }
    }

    /// Whether the lock was acquired.
    pub fn is_acquired(&self) -> bool {
        matches!(self, TryLock::Acquired(_))
    }

    /// Whether someone else held the lock.
    pub fn is_busy(&self) -> bool {
        matches!(self, TryLock::Busy(_))
    }

    /// Who held the lock, if it was busy.
    pub fn holder(&self) -> Option<&Holder> {
        match self {
            TryLock::Acquired(_) => None,
            TryLock::Busy(holder) => Some(holder),
        }
    }
}

/// The result of [`Herd::once`]: whether the closure ran, unambiguous even when it returns
/// `()`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Outcome<T> {
    /// The lock was acquired and the closure ran to completion with this value.
    Ran(T),
    /// Someone else held the lock; the closure never ran.
    Busy(Holder),
}

impl<T> Outcome<T> {
    /// Whether the closure ran.
    pub fn ran(&self) -> bool {
        matches!(self, Outcome::Ran(_))
    }

    /// The closure's value, if it ran.
    pub fn into_value(self) -> Option<T> {
        match self {
            Outcome::Ran(v) => Some(v),
            Outcome::Busy(_) => None,
        }
    }
}

/// Per-call lock options. Unset fields take the herd's defaults.
///
/// Every option is honoured by every primitive that takes it, or refused: the guard forms
/// ([`Herd::try_lock_with`], [`Herd::lock_with`]) have no work to cancel, so
/// [`cancel_on_lost`](LockOptions::cancel_on_lost) set on options passed to them is an
/// [`InvalidInput`](ErrorKind::InvalidInput) error. Multi-locks take
/// [`MultiOptions`](crate::MultiOptions), semaphores
/// [`SemaphoreOptions`](crate::SemaphoreOptions).
#[derive(Debug, Clone)]
#[must_use]
pub struct LockOptions {
    ttl: Option<Duration>,
    grace: Duration,
    auto_extend: bool,
    max_hold: Option<Duration>,
    /// `None`: not set (on, for the closure forms).
    cancel_on_lost: Option<bool>,
    replicas: Option<(u32, Duration)>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: None,
            grace: Duration::ZERO,
            auto_extend: true,
            max_hold: None,
            cancel_on_lost: None,
            replicas: None,
        }
    }
}

/// Lock options checked and resolved against the herd's defaults.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub(crate) ttl: Duration,
    pub(crate) grace: Duration,
    pub(crate) auto_extend: bool,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) replicas: Option<(u32, Duration)>,
}

impl LockOptions {
    /// Options with every field at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lock's TTL. Default: the herd's [`lock_ttl`](crate::Builder::lock_ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Keep the lock this long after the work finishes successfully, so a late duplicate
    /// trigger (a cron firing a little later on another host) finds it held and does not
    /// run the work again.
    ///
    /// Default: zero (release at once). Applied by [`LockGuard::release`] and by
    /// [`Herd::once`] and [`Herd::run_locked`] when their closure returns `Ok`; a closure
    /// that fails or panics releases at once, so a retry may run.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Keep the lock alive while the guard lives: the herd's watchdog thread extends it
    /// every third of the TTL, so work may take longer than the TTL, and the TTL only
    /// bounds how long a *crashed* holder blocks others.
    ///
    /// Default: on. Turn it off for a lease that must run out on its own unless extended
    /// by hand ([`LockGuard::extend`]).
    pub fn auto_extend(mut self, on: bool) -> Self {
        self.auto_extend = on;
        self
    }

    /// Stop extending the lock after it has been held this long, so it runs out one TTL
    /// later even if the holder hangs.
    ///
    /// Default: none (extend while the guard lives).
    pub fn max_hold(mut self, limit: Duration) -> Self {
        self.max_hold = Some(limit);
        self
    }

    /// Whether [`Herd::once`] and [`Herd::run_locked`] cancel their work when the lock is
    /// lost (the watchdog found another holder, or could not renew the lease in time); the
    /// caller then gets [`LockLost`](ErrorKind::LockLost).
    ///
    /// Default: on, so a holder that lost its lock stops working at once ("seppuku"). Turn
    /// it off to let the work finish, and watch the loss yourself: inside the closure,
    /// [`LostToken::current`] is the lock's loss signal.
    ///
    /// Only the closure forms ([`Herd::once`], [`Herd::run_locked`] and their `_with`
    /// forms) run work to cancel: set on
    /// options passed to [`Herd::try_lock_with`] or [`Herd::lock_with`], it is an
    /// [`InvalidInput`](ErrorKind::InvalidInput) error rather than silently ignored.
    pub fn cancel_on_lost(mut self, on: bool) -> Self {
        self.cancel_on_lost = Some(on);
        self
    }

    /// Whether a closure form cancels its work on loss.
    pub(crate) fn cancels_on_lost(&self) -> bool {
        self.cancel_on_lost.unwrap_or(true)
    }

    /// Refuses the options a guard form (`what`) cannot honour.
    fn for_guard(&self, what: &str) -> Result<()> {
        if self.cancel_on_lost.is_some() {
            return Err(Error::invalid(format!(
                "`cancel_on_lost` applies to the closure forms (`once`, `run_locked`) only: `{what}` returns a guard and cancels nothing; watch `LockGuard::lost` or `LockGuard::lost_token` instead"
            )));
        }
        Ok(())
    }

    /// Report the lock acquired only once `replicas` replicas have acknowledged it (Redis
    /// `WAIT`, up to `timeout`); if fewer do, release it and fail with
    /// [`NotReplicated`](ErrorKind::NotReplicated). This narrows the window in which a
    /// failover loses a fresh lock; it does not make Redis strongly consistent.
    ///
    /// Default: none (acknowledged by the primary only). The in-memory backend has no
    /// replicas, so any `replicas > 0` fails there.
    pub fn replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some((replicas, timeout));
        self
    }

    pub(crate) fn resolve(&self, herd: &Herd) -> Result<Resolved> {
        let ttl = self.ttl.unwrap_or(herd.inner.lock_ttl);
        keys::validate_ttl("lock ttl", ttl)?;
        if !self.grace.is_zero() {
            keys::validate_ttl("grace period", self.grace)?;
        }
        if let Some(limit) = self.max_hold {
            keys::validate_ttl("maximum hold time", limit)?;
        }
        if let Some((_, timeout)) = self.replicas {
            keys::validate_wait(timeout)?;
        }
        Ok(Resolved {
            ttl,
            grace: self.grace,
            auto_extend: self.auto_extend,
            max_hold: self.max_hold,
            replicas: self.replicas.filter(|(n, _)| *n > 0),
        })
    }
}

/// A held lock.
///
/// Release it with [`release`](LockGuard::release), which reports errors. Dropping it
/// without releasing is a best effort: the release is sent from a background task when a
/// Tokio runtime is available, and nothing at all happens otherwise; in either case the
/// TTL is the backstop. A guard is released once: `release` takes it by value, so a second
/// release does not compile.
///
/// ```compile_fail
/// # async fn f(herd: herdlock::Herd) -> Result<(), herdlock::Error> {
/// let guard = herd.lock("k", std::time::Duration::from_secs(1)).await?;
/// guard.release().await?;
/// guard.release().await?; // error[E0382]: use of moved value
/// # Ok(()) }
/// ```
#[must_use = "dropping the guard releases the lock in the background"]
pub struct LockGuard {
    herd: Herd,
    keys: JobKeys,
    token: String,
    fence: FencingToken,
    grace: Duration,
    /// The watchdog's registration (auto-extend), dropped first on release.
    lease: Option<LeaseHandle>,
    released: bool,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.keys.key)
            .field("fence", &self.fence)
            .field("owner", &self.herd.owner())
            .finish_non_exhaustive()
    }
}

impl LockGuard {
    /// The key this guard holds.
    pub fn key(&self) -> &str {
        &self.keys.key
    }

    /// This acquisition's fencing token.
    pub fn fence(&self) -> FencingToken {
        self.fence
    }

    /// The owner label stamped on the lock.
    pub fn owner(&self) -> &str {
        self.herd.owner()
    }

    /// Resets the lock's TTL to `ttl` from now, if this guard still holds it.
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost) if the lock expired (and perhaps was taken by
    /// another holder, whose lock is left untouched); [`InvalidInput`](ErrorKind::InvalidInput)
    /// for a TTL out of range; connection errors.
    ///
    /// # Cancel safety
    ///
    /// If cancelled, the extension may or may not have been applied.
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        keys::validate_ttl("lock ttl", ttl)?;
        let sent = std::time::Instant::now();
        if self
            .herd
            .backend()
            .extend(&self.keys, &self.token, ttl)
            .await?
        {
            // An extension that lands after the local deadline does not revive the lock.
            if self.lease.as_ref().is_none_or(|l| l.extended(ttl, sent)) {
                return Ok(());
            }
            Err(lost(&self.keys.key))
        } else {
            if let Some(lease) = &self.lease {
                lease.mark_lost();
            }
            Err(lost(&self.keys.key))
        }
    }

    /// Whether the lock is known to be lost: the watchdog found another holder, or no
    /// renewal (or [`extend`](LockGuard::extend)) succeeded before the lease's *local
    /// deadline* — the instant the last successful acquisition or renewal was sent, plus
    /// the TTL, minus a drift margin of 1 % + 2 ms — which is never later than the key's
    /// expiry on Redis. Without [auto-extend](LockOptions::auto_extend) the lock is lost
    /// at that deadline unless `extend` moved it.
    pub fn is_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(LeaseHandle::is_lost)
    }

    /// Resolves when the lock is lost (see [`is_lost`](LockGuard::is_lost)); never while it
    /// is held. Race it against the work the lock protects to stop that work at once; for a
    /// spawned task, move a [`lost_token`](LockGuard::lost_token) into it instead.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) {
        watchdog::lost(self.lease.as_ref()).await;
    }

    /// A cloneable, `'static` loss signal for this lock, to move into spawned tasks: it
    /// reports the same loss as [`lost`](LockGuard::lost) and
    /// [`is_lost`](LockGuard::is_lost), and also when the guard was released or dropped
    /// ([`LostToken::ended`]).
    pub fn lost_token(&self) -> LostToken {
        token_of(self.lease.as_ref())
    }

    /// Checks in, cheaply enough to call in a hot loop: fails with
    /// [`LockLost`](ErrorKind::LockLost) as soon as the lock is known lost, and otherwise
    /// makes sure it was renewed (to its TTL) within the last third of its TTL.
    ///
    /// Heartbeats coalesce: while the last successful renewal — the watchdog's, a
    /// heartbeat's or [`extend`](LockGuard::extend)'s — or the acquisition was sent less
    /// than TTL/3 ago, a heartbeat sends nothing. Otherwise the herd's watchdog thread
    /// renews the lock once for every caller that asks meanwhile (joining its own renewal
    /// if one is in flight), and each gets that renewal's outcome. With
    /// [auto-extend](LockOptions::auto_extend) on, the watchdog renews every TTL/3 anyway,
    /// so heartbeats add no Redis command; with it off, they keep the lock alive with at
    /// most one renewal per TTL/3. A heartbeat renews even past
    /// [`max_hold`](LockOptions::max_hold) (a holder that beats is not hung).
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost); connection errors of the renewal it waited for
    /// (the watchdog retries; the lock is not lost before its local deadline).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the renewal belongs to the watchdog and goes on for other callers.
    pub async fn heartbeat(&self) -> Result<()> {
        beat(self.lease.as_ref(), || lost(&self.keys.key)).await
    }

    /// Releases the lock (or, with a [grace period](LockOptions::grace), shortens it to the
    /// grace) and wakes the waiters.
    ///
    /// A connection error is retried within the herd's
    /// [command timeout](crate::Builder::command_timeout): the release compares the holder,
    /// so repeating it is safe. A retry that finds the lock free reports success (the
    /// attempt that failed may have released it); one that finds another holder reports
    /// [`LockLost`](ErrorKind::LockLost).
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost) if the lock had already expired or been taken
    /// over, in which case the current holder's lock is untouched; connection errors that
    /// outlast the command timeout (the lock then expires with its TTL).
    ///
    /// # Cancel safety
    ///
    /// If cancelled, the release may or may not have happened; the TTL is the backstop.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        let held = self.held_until();
        let token = self.lost_token();
        self.lease = None; // stop renewing first
        if token.is_lost() && self.herd.backend().gate().stage() == Stage::Closed {
            return Err(released_by_shutdown("lock"));
        }
        let released = release(
            self.herd.backend(),
            &self.keys,
            &self.token,
            self.grace,
            held,
        )
        .await;
        token.found_lost_if(&released);
        released
    }

    /// Until when nobody else can have the lock (the lease's local deadline), if known.
    fn held_until(&self) -> Option<std::time::Instant> {
        self.lease.as_ref().map(LeaseHandle::deadline)
    }

    /// Releases at once, ignoring the grace period (used when the work failed).
    async fn release_now(mut self) -> Result<()> {
        self.released = true;
        let held = self.held_until();
        self.lease = None;
        release(
            self.herd.backend(),
            &self.keys,
            &self.token,
            Duration::ZERO,
            held,
        )
        .await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let backend = self.herd.backend().clone();
        let keys = self.keys.clone();
        let token = std::mem::take(&mut self.token);
        let grace = self.grace;
        let held = self.held_until();
        let gate = std::sync::Arc::clone(self.herd.backend().gate());
        spawn_cleanup(&gate, "release of a dropped lock guard", async move {
            release(&backend, &keys, &token, grace, held).await
        });
    }
}

/// Releases the lock `token` holds, retrying through connection errors within the command
/// timeout (the release compares the holder, so a repeat is harmless). A retry that finds
/// the lock free succeeds: the attempt that failed may well have released it. One that
/// finds another holder reports `LockLost`, unless that retry was sent before the lease's
/// local deadline (`held_until`): the lock cannot have expired by then, so the failed
/// attempt released it and a waiter took it at once.
async fn release(
    backend: &Backend,
    keys: &JobKeys,
    token: &str,
    grace: Duration,
    held_until: Option<std::time::Instant>,
) -> Result<()> {
    let reply = backend
        .retry_release("release", || backend.release(keys, token, grace))
        .await?;
    let still_ours = held_until.is_some_and(|until| reply.sent < until);
    if reply.value || (reply.after_error && (still_ours || is_free(backend, keys).await?)) {
        Ok(())
    } else {
        Err(lost(&keys.key))
    }
}

/// Runs `work` under `guard` and releases it: on `Ok` with the grace period, at once on
/// `Err` or panic (the panic resumes), and in the background when the lock was lost
/// (`work` is then dropped unless `cancel_on_lost` is off).
async fn run_under<T, F, Fut>(guard: LockGuard, cancel_on_lost: bool, work: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = JobResult<T>>,
{
    let key = guard.keys.key.clone();
    let work =
        AssertUnwindSafe(watchdog::with_run_token(guard.lost_token(), work())).catch_unwind();
    let finished = if cancel_on_lost {
        tokio::select! {
            finished = work => Some(finished),
            () = guard.lost() => None,
        }
    } else {
        Some(work.await)
    };
    match finished {
        Some(Ok(Ok(value))) => {
            guard.release().await?;
            Ok(value)
        }
        Some(Ok(Err(e))) => {
            if let Err(release_error) = guard.release_now().await {
                tracing::warn!(key, error = %release_error, "release after a failed job failed");
            }
            Err(work_failed(&key, e))
        }
        Some(Err(panic)) => {
            if let Err(release_error) = guard.release_now().await {
                tracing::warn!(key, error = %release_error, "release after a panicked job failed");
            }
            std::panic::resume_unwind(panic)
        }
        None => {
            // The work was dropped (cancelled) when the lock was lost. Tell the caller
            // now: the release (a no-op unless the lease ran out locally but not yet on
            // Redis) goes on in the background, as the path to Redis may be what failed.
            let gate = std::sync::Arc::clone(guard.herd.backend().gate());
            spawn_cleanup(&gate, "release of a lost lock", guard.release_now());
            Err(lost(&key))
        }
    }
}

/// The caller's error for work under a lock that returned `e`: a herdlock error as it was,
/// anything else as `JobFailed` carrying the original as its source.
fn work_failed(key: &str, e: JobError) -> Error {
    if let Some(own) = e.source_error().and_then(|s| s.downcast_ref::<Error>()) {
        return own.clone();
    }
    Error::job(
        ErrorKind::JobFailed,
        format!("the work under lock `{key}` failed: {}", e.full_message()),
        e,
    )
}

/// Whether nobody holds the lock of `keys` (after a retried release found nothing to do).
pub(crate) async fn is_free(backend: &Backend, keys: &JobKeys) -> Result<bool> {
    Ok(backend.status(keys).await?.holder.is_none())
}

/// Undoes an acquire step whose caller is gone: releases the lock if the step took it. A
/// step that failed (a timeout, a dropped connection) may still have won on the server, so
/// the lock is released if it carries the step's nonce.
async fn undo_acquire(
    backend: &Backend,
    keys: &JobKeys,
    nonce: &str,
    reply: Result<AcquireReply>,
) -> Result<()> {
    let token = match reply {
        Ok(AcquireReply::Acquired { token, .. }) => token,
        Ok(AcquireReply::Busy { .. }) => return Ok(()),
        Err(_) => match backend.status(keys).await?.holder {
            Some(holder) if holder_nonce(&holder) == Some(nonce) => match holder_token(&holder) {
                Some(token) => token.to_owned(),
                None => return Ok(()),
            },
            _ => return Ok(()),
        },
    };
    tracing::debug!(key = %keys.key, "releasing a lock taken by an acquire step cut off in flight");
    release(backend, keys, &token, Duration::ZERO, None).await
}

/// "held by `owner` (fence N, M ms left)": who a timed-out waiter waited for.
pub(crate) fn held_by(holder: &Holder) -> String {
    let left = holder
        .remaining
        .map_or_else(String::new, |r| format!(", {} ms left", r.as_millis()));
    format!("held by `{}` (fence {}{left})", holder.owner, holder.fence)
}

/// The token of `lease`; a guard without one (never handed out) gets an ended token.
pub(crate) fn token_of(lease: Option<&LeaseHandle>) -> LostToken {
    lease.map_or_else(LostToken::ended_already, LeaseHandle::token)
}

/// A coalesced heartbeat of `lease` ([`LeaseHandle::heartbeat`]); `lost` names what was lost.
pub(crate) async fn beat(lease: Option<&LeaseHandle>, lost: impl FnOnce() -> Error) -> Result<()> {
    let Some(lease) = lease else {
        return Err(lost());
    };
    match lease.heartbeat().await {
        Ok(()) => Ok(()),
        Err(BeatFailed::Lost) => Err(lost()),
        Err(BeatFailed::Error(e)) => Err(e),
    }
}

fn lost(key: &str) -> Error {
    Error::new(
        ErrorKind::LockLost,
        format!("lock `{key}` is no longer held by this guard (it expired or was taken over)"),
    )
}

impl Herd {
    /// Takes the lock on `key` now, or reports who holds it. Never waits.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// use herdlock::{Herd, TryLock};
    /// let herd = Herd::memory();
    /// let TryLock::Acquired(guard) = herd.try_lock("nightly-import").await? else {
    ///     unreachable!("nobody else holds it");
    /// };
    /// match herd.try_lock("nightly-import").await? {
    ///     TryLock::Busy(holder) => assert_eq!(holder.owner, herd.owner()),
    ///     TryLock::Acquired(_) => unreachable!("we hold it"),
    /// }
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](ErrorKind::InvalidInput) for an empty or oversized key; connection
    /// errors. Contention is not an error: it is [`TryLock::Busy`].
    ///
    /// # Cancel safety
    ///
    /// Cancelling leaves nothing behind: an acquire step already sent is finished in the
    /// background and a lock it took is released (outside a Tokio runtime, where nothing
    /// can run, its TTL is the backstop).
    pub async fn try_lock(&self, key: &str) -> Result<TryLock> {
        self.try_lock_with(key, &LockOptions::default()).await
    }

    /// [`try_lock`](Herd::try_lock) with options (TTL, grace period, auto-extend, maximum
    /// hold time, replica acknowledgement).
    ///
    /// # Errors
    ///
    /// As [`try_lock`](Herd::try_lock), plus [`InvalidInput`](ErrorKind::InvalidInput) for
    /// a TTL or grace period out of range, or
    /// [`cancel_on_lost`](LockOptions::cancel_on_lost) set (a guard cancels nothing);
    /// [`NotReplicated`](ErrorKind::NotReplicated).
    ///
    /// # Cancel safety
    ///
    /// As [`try_lock`](Herd::try_lock).
    pub async fn try_lock_with(&self, key: &str, options: &LockOptions) -> Result<TryLock> {
        options.for_guard("try_lock_with")?;
        self.try_lock_options(key, options).await
    }

    /// [`try_lock_with`](Herd::try_lock_with) for the closure forms, which honour every
    /// option.
    pub(crate) async fn try_lock_options(
        &self,
        key: &str,
        options: &LockOptions,
    ) -> Result<TryLock> {
        let keys = self.job_keys(key)?;
        let resolved = options.resolve(self)?;
        self.attempt(keys, &resolved, false).await
    }

    /// One acquire step. `waiting`: the caller will wait if the lock is busy (it is
    /// subscribed), so the holder's value is marked and its release publishes a notice.
    async fn attempt(&self, keys: JobKeys, options: &Resolved, waiting: bool) -> Result<TryLock> {
        let sent = std::time::Instant::now();
        // Finished even if this call is cut off (deadline, cancellation) in flight: a win
        // nobody takes is released in the background.
        let (backend, nonce, ttl) = (self.backend().clone(), nonce(), options.ttl);
        let herd = self.clone();
        let step = async move {
            let reply = backend
                .acquire(&keys, &nonce, herd.owner(), ttl, waiting)
                .await;
            (reply, backend, keys, nonce)
        };
        let (reply, _, keys, _) = Finished::new(
            self.backend().gate(),
            "undoing an acquire step cut off in flight",
            step,
            |(reply, backend, keys, nonce)| async move {
                undo_acquire(&backend, &keys, &nonce, reply).await
            },
        )
        .await;
        let (token, fence) = match reply? {
            AcquireReply::Acquired { token, fence, .. } => (token, fence),
            AcquireReply::Busy { holder, pttl_ms } => {
                let holder = Holder::parse(&holder, pttl_ms)?;
                obs::contend_on(self, Primitive::Lock, &keys.key, &holder);
                return Ok(TryLock::Busy(holder));
            }
        };
        // Every lock is watched until its local deadline; with auto-extend it is renewed.
        let lease = Some(self.inner.watchdog.register(
            Renewal::Lock {
                keys: keys.clone(),
                token: token.clone(),
            },
            LeaseTerms {
                ttl: options.ttl,
                sent,
                renew: options.auto_extend,
                max_hold: options.max_hold,
                what: Primitive::Lock,
            },
        ));
        let guard = LockGuard {
            herd: self.clone(),
            keys,
            token,
            fence: FencingToken(fence),
            grace: options.grace,
            lease,
            released: false,
        };
        if let Some((replicas, timeout)) = options.replicas {
            let acked = self
                .backend()
                .wait_replicas(&guard.keys, replicas, timeout)
                .await?;
            if acked < replicas {
                let key = guard.keys.key.clone();
                if let Err(e) = guard.release_now().await {
                    tracing::warn!(key, error = %e, "releasing an under-replicated lock failed");
                }
                return Err(Error::new(
                    ErrorKind::NotReplicated,
                    format!(
                        "lock `{key}` was acknowledged by {acked} of {replicas} replicas within {timeout:?}; it was released"
                    ),
                ));
            }
        }
        Ok(TryLock::Acquired(guard))
    }

    /// Takes the lock on `key`, waiting up to `wait` for it to be free.
    ///
    /// Waiters are woken by the holder's release notice (pub/sub), not by polling: a
    /// waiter subscribes, waits for the subscription to be confirmed, and only then
    /// re-checks the lock, so no release can slip between the check and the wait. If a
    /// notice is lost anyway (a dropped connection, a holder that crashed), the waiter
    /// re-checks when the lock's remaining TTL runs out.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// use std::time::Duration;
    /// let herd = herdlock::Herd::memory();
    /// let first = herd.lock("migrations", Duration::from_secs(1)).await?;
    /// let first_fence = first.fence();
    /// let waiter = tokio::spawn({
    ///     let herd = herd.clone();
    ///     async move { herd.lock("migrations", Duration::from_secs(5)).await }
    /// });
    /// first.release().await?; // wakes the waiter at once
    /// let second = waiter.await.expect("task ran")?;
    /// assert!(second.fence() > first_fence);
    /// second.release().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Timeout`](ErrorKind::Timeout) when `wait` passes, naming the holder it waited for
    /// (owner label and fencing token);
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a bad key or a zero or absurd wait
    /// (above [`MAX_WAIT`](crate::limits::MAX_WAIT)); connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancelling leaves nothing behind, and neither does the deadline: an acquire step in
    /// flight when either strikes is finished in the background, and a lock it took is
    /// released.
    pub async fn lock(&self, key: &str, wait: Duration) -> Result<LockGuard> {
        self.lock_with(key, wait, &LockOptions::default()).await
    }

    /// [`lock`](Herd::lock) with options (TTL, grace period, auto-extend, maximum hold
    /// time, replica acknowledgement).
    ///
    /// # Errors
    ///
    /// As [`lock`](Herd::lock), plus [`InvalidInput`](ErrorKind::InvalidInput) for a TTL or
    /// grace period out of range, or [`cancel_on_lost`](LockOptions::cancel_on_lost) set (a
    /// guard cancels nothing); [`NotReplicated`](ErrorKind::NotReplicated).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Herd::lock).
    pub async fn lock_with(
        &self,
        key: &str,
        wait: Duration,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        options.for_guard("lock_with")?;
        self.lock_options(key, wait, options).await
    }

    /// [`lock_with`](Herd::lock_with) for the closure forms, which honour every option.
    pub(crate) async fn lock_options(
        &self,
        key: &str,
        wait: Duration,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        let keys = self.job_keys(key)?;
        let resolved = options.resolve(self)?;
        keys::validate_wait(wait)?;
        let deadline = Instant::now() + wait;
        // The holder last seen, named in the timeout error.
        let mut last: Option<Holder> = None;
        // `Ok(None)`: the deadline passed while waiting.
        let mut seen = obs::Waiting::start(self, Primitive::Lock, key);
        let wait_loop = async {
            // Fast path: no subscription round trip when the lock is free.
            match self.attempt(keys.clone(), &resolved, false).await? {
                TryLock::Acquired(guard) => return Ok(Some(guard)),
                TryLock::Busy(holder) => last = Some(holder),
            }
            // Subscribe (confirmed), then re-check: a release after this point is seen.
            let mut sub = self.backend().subscribe(&keys).await?;
            loop {
                let remaining = match self.attempt(keys.clone(), &resolved, true).await? {
                    TryLock::Acquired(guard) => return Ok(Some(guard)),
                    TryLock::Busy(holder) => last.insert(holder).remaining,
                };
                let until = Until::lease(remaining).deadline(deadline);
                seen.sleeps(last.as_ref().map(|h| h.fence.get()), remaining);
                // Every notice (a release, a resync) is a reason to try again.
                let woken = wait::wait(std::slice::from_mut(&mut sub), until, |_| {
                    Hint::<Infallible>::Recheck
                })
                .await;
                seen.woke(&woken);
                if let Woken::Deadline = woken {
                    return Ok(None);
                }
            }
        };
        match tokio::time::timeout_at(deadline, wait_loop).await {
            Ok(Ok(Some(guard))) => return Ok(seen.done(guard)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) | Err(_) => seen.timed_out(),
        }
        let held = last.as_ref().map_or_else(
            || " (no reply from the backend within the wait)".to_owned(),
            |h| format!(", {}", held_by(h)),
        );
        Err(Error::new(
            ErrorKind::Timeout,
            format!("timed out after {wait:?} waiting for lock `{key}`{held}"),
        ))
    }

    /// Runs `work` under the lock on `key` if it is free now; reports
    /// [`Outcome::Busy`] (and does not run `work`) if someone else holds it. Never waits:
    /// [`run_locked`](Herd::run_locked) is the form that waits for the lock.
    ///
    /// The lock is released when `work` ends: on `Ok` (after the grace period, if one is
    /// set), on `Err` and on panic (at once; the panic then resumes). If the lock is lost
    /// while `work` runs, `work` is dropped (cancelled) and the call fails with
    /// [`LockLost`](ErrorKind::LockLost), unless [`LockOptions::cancel_on_lost`] is off.
    ///
    /// `work` returns a [`JobResult`], so `Ok(value)` needs no annotation and `?` converts
    /// any error (see [`JobError`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// use herdlock::{Herd, Outcome};
    /// let herd = Herd::memory();
    /// let outcome = herd
    ///     .once("nightly-import", || async {
    ///         let rows: u64 = "1200".parse()?; // any error converts with `?`
    ///         Ok(rows)
    ///     })
    ///     .await?;
    /// assert_eq!(outcome, Outcome::Ran(1200));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// One error type, [`herdlock::Error`](Error):
    /// - `work` returned an error: a [`herdlock::Error`](Error) comes back unchanged (its
    ///   own kind); any other error comes back as [`JobFailed`](ErrorKind::JobFailed), whose
    ///   [`job_error`](Error::job_error) is what `work` returned and whose
    ///   [`source`](std::error::Error::source) is the original error (downcast it to get your
    ///   own error type back);
    /// - [`LockLost`](ErrorKind::LockLost) when the lock was lost while `work` ran;
    /// - herdlock's own errors: a bad key or options, connection errors, and a failure to
    ///   release after `work` succeeded (the lock then expires with its TTL).
    ///
    /// # Cancel safety
    ///
    /// Cancelling drops `work` mid-way; the guard's drop releases the lock in the
    /// background.
    pub async fn once<T, F, Fut>(&self, key: &str, work: F) -> Result<Outcome<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = JobResult<T>>,
    {
        self.once_with(key, &LockOptions::default(), work).await
    }

    /// [`once`](Herd::once) with options (TTL, grace period, cancellation on loss).
    ///
    /// # Errors
    ///
    /// As [`once`](Herd::once).
    ///
    /// # Cancel safety
    ///
    /// As [`once`](Herd::once).
    pub async fn once_with<T, F, Fut>(
        &self,
        key: &str,
        options: &LockOptions,
        work: F,
    ) -> Result<Outcome<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = JobResult<T>>,
    {
        let guard = match self.try_lock_options(key, options).await? {
            TryLock::Acquired(guard) => guard,
            TryLock::Busy(holder) => return Ok(Outcome::Busy(holder)),
        };
        run_under(guard, options.cancels_on_lost(), work)
            .await
            .map(Outcome::Ran)
    }

    /// Waits up to `wait` for the lock on `key`, then runs `work` under it: the waiting
    /// form of [`once`](Herd::once), with the same release rules (on `Ok` after the grace
    /// period, at once on `Err` or panic, `work` cancelled if the lock is lost).
    ///
    /// `wait` bounds only the wait for the lock, as in [`lock`](Herd::lock); `work` runs as
    /// long as it needs once the lock is held.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// use std::time::Duration;
    /// let herd = herdlock::Herd::memory();
    /// let applied = herd
    ///     .run_locked("migrations", Duration::from_secs(60), || async { Ok(3) })
    ///     .await?;
    /// assert_eq!(applied, 3);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Timeout`](ErrorKind::Timeout) when the lock was not free within `wait` (`work`
    /// never ran; the message names the holder); otherwise as [`once`](Herd::once).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Herd::lock) while waiting, as [`once`](Herd::once) while `work` runs.
    pub async fn run_locked<T, F, Fut>(&self, key: &str, wait: Duration, work: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = JobResult<T>>,
    {
        self.run_locked_with(key, wait, &LockOptions::default(), work)
            .await
    }

    /// [`run_locked`](Herd::run_locked) with options (TTL, grace period, cancellation on
    /// loss).
    ///
    /// # Errors
    ///
    /// As [`run_locked`](Herd::run_locked).
    ///
    /// # Cancel safety
    ///
    /// As [`run_locked`](Herd::run_locked).
    pub async fn run_locked_with<T, F, Fut>(
        &self,
        key: &str,
        wait: Duration,
        options: &LockOptions,
        work: F,
    ) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = JobResult<T>>,
    {
        let guard = self.lock_options(key, wait, options).await?;
        run_under(guard, options.cancels_on_lost(), work).await
    }

    /// Breaks the lock `key`, whoever holds it (a lock or a fan-out run; not a semaphore
    /// permit), and wakes its waiters: for an operator unsticking work (`herdlock release
    /// --force`). Returns who held it, or `None` if nobody did.
    ///
    /// The holder is not asked: its guard learns the lock is lost at its next renewal
    /// ([`LockGuard::lost`]), a fan-out leader's run is cancelled and publishes nothing. A
    /// holder that acquired between this call's read and its release is released too.
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a bad key; connection errors.
    ///
    /// # Cancel safety
    ///
    /// If cancelled, the lock may or may not have been released.
    pub async fn force_release(&self, key: &str) -> Result<Option<Holder>> {
        let keys = self.job_keys(key)?;
        // Each round releases the holder it read; one that took the lock in between is
        // read (and released) on the next round. Bounded: a lock taken again at once
        // every time is held by a live herd that the caller cannot out-race anyway.
        for _ in 0..8 {
            let reply = self.backend().status(&keys).await?;
            let Some(value) = reply.holder else {
                return Ok(None);
            };
            let holder = Holder::parse(&value, reply.pttl_ms)?;
            let token = holder_token(&value).ok_or_else(|| {
                Error::new(ErrorKind::Redis, "the lock holds a malformed holder value")
            })?;
            if self.backend().release(&keys, token, Duration::ZERO).await? {
                return Ok(Some(holder));
            }
        }
        Err(Error::new(
            ErrorKind::LockLost,
            format!("`{key}` changed hands 8 times while being force-released"),
        ))
    }

    /// What is held under this herd's prefix: every lock and fan-out run with a holder,
    /// every semaphore with a permit held, found with `SCAN` (never `KEYS`; on a cluster,
    /// on each master), sorted by key. Ask [`lock_status`](Herd::lock_status) or
    /// [`Semaphore::status`](crate::Semaphore::status) for the holders.
    ///
    /// Like every `SCAN`, it is no snapshot: an entry taken or released during the scan
    /// may or may not be listed. It reads every key under the prefix: for operators and
    /// tools, not for a hot path.
    ///
    /// # Errors
    ///
    /// Connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn list_held(&self) -> Result<Vec<Held>> {
        let prefix = self.prefix();
        let mut held: Vec<Held> = self
            .backend()
            .scan_held(prefix)
            .await?
            .iter()
            .filter_map(|name| Held::parse(prefix, name))
            .collect();
        held.sort_by(|a, b| a.key.cmp(&b.key).then(a.kind.cmp(&b.kind)));
        held.dedup();
        Ok(held)
    }

    /// The holder, remaining TTL and last fencing token of `key`, for debugging stuck work.
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a bad key; connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn lock_status(&self, key: &str) -> Result<LockStatus> {
        let keys = self.job_keys(key)?;
        let reply = self.backend().status(&keys).await?;
        let holder = match reply.holder {
            Some(value) => Some(Holder::parse(&value, reply.pttl_ms)?),
            None => None,
        };
        let last_fence = holder.as_ref().map(|h| h.fence);
        Ok(LockStatus { holder, last_fence })
    }
}

#[cfg(test)]
mod unit {
    use super::{Held, HeldKind};
    use crate::keys::JobKeys;

    #[test]
    fn held_entries_parse_back_from_their_redis_keys() {
        for key in ["job:1", "acct:{bank}:1", "x:{t}", "{t}:y", "a"] {
            let keys = JobKeys::new("pre:fix", key);
            let lock = Held::parse("pre:fix", &keys.lock).expect("a lock key");
            assert_eq!((lock.key.as_str(), lock.kind), (key, HeldKind::Lock));
            let sem = Held::parse("pre:fix", &keys.sem()).expect("a semaphore key");
            assert_eq!((sem.key.as_str(), sem.kind), (key, HeldKind::Semaphore));
            assert_eq!(Held::parse("pre:fix", &keys.result()), None);
            assert_eq!(Held::parse("pre:fix", &keys.sem_queue()), None);
            assert_eq!(Held::parse("pre", &keys.lock), None);
        }
    }
}
