//! The atomic steps the primitives are built from, and the two engines that provide them.
//!
//! The set of backends is closed (Redis and in-memory), so this is an enum rather than a
//! trait object: no boxing of every future, and each step reads as one `match`. Both
//! engines implement exactly the same steps with the same semantics; the behavioural test
//! suite runs against both.

mod clock;
pub(crate) mod gate;
pub(crate) mod memory;
pub(crate) mod preflight;
pub(crate) mod redis;
pub(crate) mod target;
pub(crate) mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::keys::JobKeys;

pub(crate) use wire::{holder_nonce, holder_token, parse_holder, token_fence};

/// The first pause before a release is retried; it doubles up to [`RETRY_MAX`]. The
/// connection manager reconnects on the error that triggers the retry, so the retry usually
/// finds a fresh connection at once.
const RETRY_MIN: Duration = Duration::from_millis(5);
const RETRY_MAX: Duration = Duration::from_millis(200);

/// The engine behind a [`Herd`](crate::Herd).
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Redis(redis::RedisBackend),
    Memory(memory::MemoryBackend),
}

/// The reply of the acquire step.
#[derive(Debug, Clone)]
pub(crate) enum AcquireReply {
    /// The caller now holds the lock; `token` is the stored holder value. `maybe_missed`
    /// (fan-out on Redis only): a previous run's result, still stored, completed within the
    /// clock bound's uncertainty around the newest caller's call, so it may have completed
    /// after that call: a possible coalescing miss (the script could not prove it either
    /// way, and starts a run rather than risk a stale result).
    Acquired {
        token: String,
        fence: u64,
        maybe_missed: bool,
    },
    /// Someone else holds it: their stored holder value and the lock's remaining TTL.
    Busy { holder: String, pttl_ms: i64 },
}

/// The reply of the fan-out acquire step.
#[derive(Debug, Clone)]
pub(crate) enum FanoutReply {
    /// As [`AcquireReply`].
    Lock(AcquireReply),
    /// A successful result younger than the requested cache age.
    Cached { envelope: Vec<u8> },
    /// The result (success or failure) of a run that completed after the newest caller of
    /// this attempt called: it is theirs, so no new run starts (no coalescing miss).
    Fresh { envelope: Vec<u8> },
}

/// Which stored results a fan-out acquire may serve instead of starting a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResultAges {
    /// A successful result no older than this (the caller's cache age).
    pub(crate) cache_age: Option<Duration>,
    /// Any result completed after this instant, when the newest caller called.
    pub(crate) newest_call: tokio::time::Instant,
}

/// The reply of the fan-out check step.
#[derive(Debug, Clone)]
pub(crate) struct CheckReply {
    pub(crate) holder: Option<String>,
    pub(crate) pttl_ms: i64,
    pub(crate) envelope: Option<Vec<u8>>,
}

/// The reply of the multi-key acquire step.
#[derive(Debug, Clone)]
pub(crate) enum MultiReply {
    /// Every key is now held; the stored holder value of each, in order.
    Acquired(Vec<String>),
    /// Nothing was changed; these keys (index, holder value, pttl) are held by others.
    Busy(Vec<(usize, String, i64)>),
}

/// A semaphore step (all run by one script on Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SemOp {
    /// Admit now if a permit is free and nobody is queued ahead.
    Try,
    /// As `Try`, for a fair waiter: enqueue (or refresh the place) and admit in order.
    Queue,
    Release,
    Extend,
    /// A fair waiter gives up its place.
    Leave,
    Status,
}

impl SemOp {
    fn name(self) -> &'static str {
        match self {
            SemOp::Try => "try",
            SemOp::Queue => "queue",
            SemOp::Release => "release",
            SemOp::Extend => "extend",
            SemOp::Leave => "leave",
            SemOp::Status => "status",
        }
    }
}

/// The arguments of a semaphore step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SemArgs<'a> {
    pub(crate) member: &'a str,
    pub(crate) permits: u32,
    pub(crate) lease: Duration,
    pub(crate) queue_ttl: Duration,
}

/// The reply of a semaphore step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SemReply {
    Admitted,
    /// Not admitted; `soonest_ms` until the earliest lease ends (-1: none held).
    Busy {
        in_use: u32,
        soonest_ms: i64,
    },
    /// Release / extend / leave: whether the member was there.
    Done(bool),
    Status {
        in_use: u32,
        queued: u32,
        holders: Vec<(String, i64)>,
    },
}

/// The reply of the status step.
#[derive(Debug, Clone)]
pub(crate) struct StatusReply {
    pub(crate) holder: Option<String>,
    pub(crate) pttl_ms: i64,
}

/// Something arrived for a subscribed key.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    /// A message published on the key's channel (a release or a completion).
    /// Untrusted: anyone with access to Redis can publish anything.
    Message(Arc<[u8]>),
    /// Messages may have been lost (the pub/sub connection dropped and came back, or the
    /// receiver lagged): re-check state in the backend.
    Resync,
}

/// A live subscription to one key's notices. Dropping it unsubscribes (when it was the
/// last local subscriber of that key).
pub(crate) struct Subscription {
    rx: broadcast::Receiver<Notice>,
    /// Unsubscribes on drop (Redis only; the in-memory channel needs no bookkeeping).
    _guard: Option<redis::ChannelGuard>,
    confirmed: bool,
}

impl Subscription {
    pub(crate) fn new(
        rx: broadcast::Receiver<Notice>,
        guard: Option<redis::ChannelGuard>,
        confirmed: bool,
    ) -> Self {
        Subscription {
            rx,
            _guard: guard,
            confirmed,
        }
    }

    /// Whether the subscription was confirmed on the current connection when it was made
    /// (so everything published after that is delivered). When not (pub/sub down, or the
    /// SUBSCRIBE failed or timed out), a Resync follows a reconnect, and callers check
    /// state before relying on notices.
    pub(crate) fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// The next notice. A lagged receiver reports [`Notice::Resync`]. If the sending side is
    /// gone this never resolves, so callers always race it against their own timer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a notice is either returned or stays queued.
    pub(crate) async fn recv(&mut self) -> Notice {
        match self.rx.recv().await {
            Ok(notice) => notice,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                crate::obs::resync(1);
                Notice::Resync
            }
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Backend {
    /// Atomically: if the lock is free, store a holder value with a fresh fence (Redis
    /// `TIME` in µs) and a TTL, and return its token; otherwise report the current holder
    /// (marking its value as waited for when `waiting`, so its release wakes the waiters).
    pub(crate) async fn acquire(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
        waiting: bool,
    ) -> Result<AcquireReply> {
        self.gate().admit_acquire("a lock acquisition")?;
        match self {
            Backend::Redis(b) => b.acquire(keys, nonce, owner, ttl, waiting).await,
            Backend::Memory(b) => Ok(b.acquire(keys, nonce, owner, ttl, waiting)),
        }
    }

    /// Atomically: if `token` still holds the lock, release it (or, with a grace period,
    /// shorten its TTL to the grace) and publish a release notice. `false`: not the holder.
    pub(crate) async fn release(
        &self,
        keys: &JobKeys,
        token: &str,
        grace: Duration,
    ) -> Result<bool> {
        match self {
            Backend::Redis(b) => b.release(keys, token, grace).await,
            Backend::Memory(b) => Ok(b.release(keys, token, grace)),
        }
    }

    /// Atomically: if `token` still holds the lock, set its TTL to `ttl`. `false`: not the
    /// holder.
    pub(crate) async fn extend(&self, keys: &JobKeys, token: &str, ttl: Duration) -> Result<bool> {
        self.gate().admit("an extension")?;
        match self {
            Backend::Redis(b) => b.extend(keys, token, ttl).await,
            Backend::Memory(b) => Ok(b.extend(keys, token, ttl)),
        }
    }

    /// The holder, remaining TTL and last fence of a key.
    pub(crate) async fn status(&self, keys: &JobKeys) -> Result<StatusReply> {
        match self {
            Backend::Redis(b) => b.status(keys).await,
            Backend::Memory(b) => Ok(b.status(keys)),
        }
    }

    /// Subscribes to the key's channel; returns once the subscription is confirmed, so
    /// every notice published after this returns is delivered (or a Resync is).
    pub(crate) async fn subscribe(&self, keys: &JobKeys) -> Result<Subscription> {
        self.gate().admit("a subscription")?;
        match self {
            Backend::Redis(b) => b.subscribe(keys).await,
            Backend::Memory(b) => Ok(b.subscribe(keys)),
        }
    }

    /// How many subscriptions to the key's channel exist, in every process: waiters of a
    /// run (and, for up to a second after they leave, their idle subscriptions).
    pub(crate) async fn subscribers(&self, keys: &JobKeys) -> Result<u64> {
        match self {
            Backend::Redis(b) => b.subscribers(keys).await,
            Backend::Memory(b) => Ok(b.subscribers(keys)),
        }
    }

    /// A confirmed subscription to the key's channel if it costs no round trip (the
    /// channel is already subscribed on the current connection), else `None`.
    pub(crate) fn subscribe_if_warm(&self, keys: &JobKeys) -> Option<Subscription> {
        match self {
            Backend::Redis(b) => b.subscribe_if_warm(keys),
            Backend::Memory(b) => Some(b.subscribe(keys)),
        }
    }

    /// As [`acquire`](Backend::acquire), but first serves a stored result the caller may
    /// have: one younger than `called` (the time since the newest caller called, measured
    /// when the request is sent), whatever its outcome, or a successful one no older than
    /// `cache_age`, when one is given.
    pub(crate) async fn fanout_acquire(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
        ages: ResultAges,
    ) -> Result<FanoutReply> {
        self.gate().admit_acquire("a fan-out call")?;
        match self {
            Backend::Redis(b) => b.fanout_acquire(keys, nonce, owner, ttl, ages).await,
            Backend::Memory(b) => Ok(b.fanout_acquire(keys, nonce, owner, ttl, ages)),
        }
    }

    /// The holder, its remaining TTL and the last stored result envelope, in one snapshot.
    pub(crate) async fn fanout_check(&self, keys: &JobKeys) -> Result<CheckReply> {
        self.gate().admit("a fan-out check")?;
        match self {
            Backend::Redis(b) => b.fanout_check(keys).await,
            Backend::Memory(b) => Ok(b.fanout_check(keys)),
        }
    }

    /// Atomically: if `token` still holds the lock, store `envelope` for `linger`, publish
    /// it and release the lock. `false`: not the holder (nothing was written).
    pub(crate) async fn complete(
        &self,
        keys: &JobKeys,
        token: &str,
        envelope: &[u8],
        ok: bool,
        linger: Duration,
    ) -> Result<bool> {
        match self {
            Backend::Redis(b) => b.complete(keys, token, envelope, ok, linger).await,
            Backend::Memory(b) => Ok(b.complete(keys, token, envelope, ok, linger)),
        }
    }

    /// Atomically: if none of `keys` is held, take them all (each bumping its own fence);
    /// otherwise change nothing and report every held one.
    pub(crate) async fn multi_acquire(
        &self,
        keys: &[JobKeys],
        nonce: &str,
        owner: &str,
        ttl: Duration,
        waiting: bool,
    ) -> Result<MultiReply> {
        self.gate().admit_acquire("a multi-lock acquisition")?;
        match self {
            Backend::Redis(b) => b.multi_acquire(keys, nonce, owner, ttl, waiting).await,
            Backend::Memory(b) => Ok(b.multi_acquire(keys, nonce, owner, ttl, waiting)),
        }
    }

    /// Releases each key still held with its token (waking its waiters); per-key outcome.
    pub(crate) async fn multi_release(
        &self,
        keys: &[JobKeys],
        tokens: &[String],
    ) -> Result<Vec<bool>> {
        match self {
            Backend::Redis(b) => b.multi_release(keys, tokens).await,
            Backend::Memory(b) => Ok(keys
                .iter()
                .zip(tokens)
                .map(|(k, t)| b.release(k, t, Duration::ZERO))
                .collect()),
        }
    }

    /// Atomically: extend every key, or, if any is lost, release the others and return
    /// the indexes of the lost ones.
    pub(crate) async fn multi_extend(
        &self,
        keys: &[JobKeys],
        tokens: &[String],
        ttl: Duration,
    ) -> Result<Vec<usize>> {
        self.gate().admit("an extension")?;
        match self {
            Backend::Redis(b) => b.multi_extend(keys, tokens, ttl).await,
            Backend::Memory(b) => Ok(b.multi_extend(keys, tokens, ttl)),
        }
    }

    /// One semaphore step, atomically.
    pub(crate) async fn semaphore(
        &self,
        keys: &JobKeys,
        op: SemOp,
        args: SemArgs<'_>,
    ) -> Result<SemReply> {
        match op {
            SemOp::Try | SemOp::Queue => self.gate().admit_acquire("a permit acquisition")?,
            SemOp::Extend => self.gate().admit("an extension")?,
            SemOp::Release | SemOp::Leave | SemOp::Status => {}
        }
        match self {
            Backend::Redis(b) => b.semaphore(keys, op, args).await,
            Backend::Memory(b) => Ok(b.semaphore(keys, op, args)),
        }
    }

    /// How many replicas acknowledged the writes made so far (`WAIT`), on the node that
    /// holds `keys` (a cluster's slot master). The in-memory backend has none.
    pub(crate) async fn wait_replicas(
        &self,
        keys: &JobKeys,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32> {
        match self {
            Backend::Redis(b) => b.wait_replicas(keys, replicas, timeout).await,
            Backend::Memory(_) => Ok(0),
        }
    }

    /// How long one command may take: the budget of a retried release. Zero for the
    /// in-memory engine, whose steps cannot fail.
    pub(crate) fn command_timeout(&self) -> Duration {
        match self {
            Backend::Redis(b) => b.command_timeout(),
            Backend::Memory(_) => Duration::ZERO,
        }
    }

    /// Runs `step`, a release (which compares the holder, so repeating it is harmless),
    /// retrying after connection errors until the command timeout has passed since the
    /// first attempt. Returns the step's reply and whether it came from a retry: a retry
    /// that finds nothing to release cannot tell "released by the attempt that failed"
    /// from "expired", and the caller decides (see `lock::release`).
    pub(crate) async fn retry_release<T, F, Fut>(
        &self,
        what: &str,
        mut step: F,
    ) -> Result<Retried<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let budget = self.command_timeout();
        let deadline = Instant::now() + budget;
        let mut pause = RETRY_MIN;
        let mut retried = false;
        loop {
            let sent = std::time::Instant::now();
            let outcome = match tokio::time::timeout_at(deadline, step()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Error::new(
                    ErrorKind::Connection,
                    format!("redis did not answer {what} within {budget:?} (retried)"),
                )),
            };
            match outcome {
                Err(e)
                    if e.kind() == ErrorKind::Connection && Instant::now() + pause < deadline =>
                {
                    tracing::debug!(what, error = %e, "release failed on a connection error; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                    retried = true;
                }
                Err(e) => return Err(e),
                Ok(value) => {
                    return Ok(Retried {
                        value,
                        after_error: retried,
                        sent,
                    })
                }
            }
        }
    }

    /// Every lock (`prefix:…:lock`) and semaphore (`prefix:…:sem`) key under `prefix`, by
    /// `SCAN` on Redis (each master of a cluster); possibly with duplicates.
    pub(crate) async fn scan_held(&self, prefix: &str) -> Result<Vec<String>> {
        match self {
            Backend::Redis(b) => b.scan(&format!("{}:{{*", glob_escape(prefix))).await,
            Backend::Memory(b) => Ok(b.held_keys(&format!("{prefix}:{{"))),
        }
    }

    /// Checks the backend answers (used by the eager constructor).
    /// The herd's gate (its shutdown stage).
    pub(crate) fn gate(&self) -> &std::sync::Arc<gate::Gate> {
        match self {
            Backend::Redis(b) => b.gate(),
            Backend::Memory(b) => b.gate(),
        }
    }

    /// Makes every waiter on this herd's subscriptions re-check now.
    pub(crate) fn wake_all(&self) {
        match self {
            Backend::Redis(b) => b.wake_all(),
            Backend::Memory(b) => b.wake_all(),
        }
    }

    /// Stops the herd's background connection work (the pub/sub listener) and wakes its
    /// waiters; the command connection closes with the last clone of the herd.
    pub(crate) fn close(&self) {
        match self {
            Backend::Redis(b) => b.close(),
            Backend::Memory(b) => b.wake_all(),
        }
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        match self {
            Backend::Redis(b) => b.ping().await,
            Backend::Memory(_) => Ok(()),
        }
    }
}

/// The reply of a step run by [`Backend::retry_release`].
#[derive(Debug)]
pub(crate) struct Retried<T> {
    pub(crate) value: T,
    /// Whether an earlier attempt failed on a connection error (and may have been applied).
    pub(crate) after_error: bool,
    /// When the attempt that answered was sent.
    pub(crate) sent: std::time::Instant,
}

/// Escapes the glob characters of a `SCAN MATCH` pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
