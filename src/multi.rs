//! Multi-key locks: hold all of several locks, or none. [`Herd::try_multi`],
//! [`Herd::multi`] and [`MultiGuard`].
//!
//! ## Key placement
//!
//! Acquisition is one script over every key, so on one Redis it is atomic: no caller ever
//! holds a subset, and callers racing for overlapping sets in any order never deadlock (a
//! caller either gets every key or changes nothing). On a Redis Cluster a script may only
//! touch keys of one slot: give keys that must be locked together one hash tag of their
//! own, `account:{bank-1}:alice` and `account:{bank-1}:bob`, and herdlock places all of their
//! Redis keys in that tag's slot (see the key layout in the crate docs).

use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::gate::{released_by_shutdown, Stage};
use crate::backend::{holder_nonce, holder_token, token_fence, Backend, MultiReply, Subscription};
use crate::error::{Error, ErrorKind, Result};
use crate::herd::{nonce, spawn_cleanup, Herd};
use crate::keys::{self, JobKeys};
use crate::limits::MAX_MULTI_KEYS;
use crate::lock::{self, FencingToken, Holder};
use crate::obs::{self, Primitive};
use crate::wait::{self, Finished, Hint, Until, Woken};
use crate::watchdog::{self, LeaseHandle, LeaseTerms, LostToken, Renewal};

/// Options of a multi-key lock ([`Herd::try_multi_with`], [`Herd::multi_with`]). Unset
/// fields take the herd's defaults.
///
/// A multi-lock has no grace period (its release frees every key at once) and no closure
/// form to cancel, so unlike [`LockOptions`](crate::LockOptions) these options have no
/// `grace` and no `cancel_on_lost`: every option here is honoured.
#[derive(Debug, Clone)]
#[must_use]
pub struct MultiOptions {
    ttl: Option<Duration>,
    auto_extend: bool,
    max_hold: Option<Duration>,
    replicas: Option<(u32, Duration)>,
}

impl Default for MultiOptions {
    fn default() -> Self {
        MultiOptions {
            ttl: None,
            auto_extend: true,
            max_hold: None,
            replicas: None,
        }
    }
}

/// Multi-lock options checked and resolved against the herd's defaults.
#[derive(Debug, Clone, Copy)]
struct Resolved {
    ttl: Duration,
    auto_extend: bool,
    max_hold: Option<Duration>,
    replicas: Option<(u32, Duration)>,
}

impl MultiOptions {
    /// Options with every field at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every key's TTL. Default: the herd's [`lock_ttl`](crate::Builder::lock_ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Keep every key alive while the guard lives: the herd's watchdog thread extends them
    /// all every third of the TTL (all or none).
    ///
    /// Default: on. Turn it off for a lease that must run out on its own unless extended
    /// by hand ([`MultiGuard::extend`], [`MultiGuard::heartbeat`]).
    pub fn auto_extend(mut self, on: bool) -> Self {
        self.auto_extend = on;
        self
    }

    /// Stop extending the keys after they have been held this long, so they run out one
    /// TTL later even if the holder hangs.
    ///
    /// Default: none (extend while the guard lives).
    pub fn max_hold(mut self, limit: Duration) -> Self {
        self.max_hold = Some(limit);
        self
    }

    /// Report the keys acquired only once `replicas` replicas have acknowledged them (Redis
    /// `WAIT`, up to `timeout`); if fewer do, release them all and fail with
    /// [`NotReplicated`](ErrorKind::NotReplicated). As
    /// [`LockOptions::replicas`](crate::LockOptions::replicas).
    ///
    /// Default: none. The in-memory backend has no replicas, so any `replicas > 0` fails
    /// there.
    pub fn replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some((replicas, timeout));
        self
    }

    fn resolve(&self, herd: &Herd) -> Result<Resolved> {
        let ttl = self.ttl.unwrap_or(herd.inner.lock_ttl);
        keys::validate_ttl("lock ttl", ttl)?;
        if let Some(limit) = self.max_hold {
            keys::validate_ttl("maximum hold time", limit)?;
        }
        if let Some((_, timeout)) = self.replicas {
            keys::validate_wait(timeout)?;
        }
        Ok(Resolved {
            ttl,
            auto_extend: self.auto_extend,
            max_hold: self.max_hold,
            replicas: self.replicas.filter(|(n, _)| *n > 0),
        })
    }
}

/// A key of a multi-key request that someone else holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldKey {
    /// The key, as requested.
    pub key: String,
    /// Who holds it.
    pub holder: Holder,
}

/// The result of [`Herd::try_multi`].
#[derive(Debug)]
#[must_use = "dropping an acquired multi-lock releases it in the background"]
pub enum TryMulti {
    /// Every key is held by the caller now.
    Acquired(MultiGuard),
    /// Some keys are held by others (all of them are listed); nothing was locked.
    Busy(Vec<HeldKey>),
}

impl TryMulti {
    /// The guard, if every key was acquired.
    pub fn acquired(self) -> Option<MultiGuard> {
        match self {
            TryMulti::Acquired(guard) => Some(guard),
            TryMulti::Busy(_) => None,
        }
    }

    /// Whether every key was acquired.
    pub fn is_acquired(&self) -> bool {
        matches!(self, TryMulti::Acquired(_))
    }

    /// Whether some keys were held by others.
    pub fn is_busy(&self) -> bool {
        matches!(self, TryMulti::Busy(_))
    }

    /// The keys held by others with their holders, if the request was busy.
    pub fn held(&self) -> Option<&[HeldKey]> {
        match self {
            TryMulti::Acquired(_) => None,
            TryMulti::Busy(held) => Some(held),
        }
    }
}

/// Several locks held together. Release with [`release`](MultiGuard::release); dropping
/// the guard releases in the background (best effort; the TTL is the backstop).
///
/// It reads like [`LockGuard`](crate::LockGuard): `extend`, `heartbeat`, `is_lost`,
/// `lost`, `lost_token` take `&self`, and a key lost before the release is
/// [`LockLost`](ErrorKind::LockLost) from [`release`](MultiGuard::release).
#[must_use = "dropping the guard releases the locks in the background"]
pub struct MultiGuard {
    herd: Herd,
    keys: Vec<JobKeys>,
    tokens: Vec<String>,
    fences: Vec<FencingToken>,
    /// The watchdog's registration (auto-extend), dropped first on release.
    lease: Option<LeaseHandle>,
    /// Released, or nothing left to release (a failed `extend` released the rest).
    released: AtomicBool,
}

impl fmt::Debug for MultiGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiGuard")
            .field("keys", &self.keys().collect::<Vec<_>>())
            .field("fences", &self.fences)
            .finish_non_exhaustive()
    }
}

impl MultiGuard {
    /// The keys held, de-duplicated, in the order first requested.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.key.as_str())
    }

    /// The fencing token of `key`, if this guard holds it.
    pub fn fence(&self, key: &str) -> Option<FencingToken> {
        self.keys
            .iter()
            .position(|k| k.key == key)
            .map(|i| self.fences[i])
    }

    /// Every key with its fencing token.
    pub fn fences(&self) -> impl Iterator<Item = (&str, FencingToken)> {
        self.keys
            .iter()
            .map(|k| k.key.as_str())
            .zip(self.fences.iter().copied())
    }

    /// Extends every lock to `ttl` from now: all of them, or none.
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost) naming the keys that had expired or been taken
    /// over; the keys this guard still held are then **released** (all or nothing), and the
    /// guard holds nothing. [`InvalidInput`](ErrorKind::InvalidInput) for a TTL out of range;
    /// connection errors.
    ///
    /// # Cancel safety
    ///
    /// If cancelled, the extension may or may not have been applied.
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        keys::validate_ttl("lock ttl", ttl)?;
        let sent = std::time::Instant::now();
        let lost = self
            .herd
            .backend()
            .multi_extend(&self.keys, &self.tokens, ttl)
            .await?;
        if lost.is_empty() {
            // An extension that lands after the local deadline does not revive the locks.
            if self.lease.as_ref().is_none_or(|l| l.extended(ttl, sent)) {
                return Ok(());
            }
            return Err(self.lost_error());
        }
        self.released.store(true, Ordering::Release);
        if let Some(lease) = &self.lease {
            lease.mark_lost();
        }
        let names: Vec<&str> = lost.iter().map(|&i| self.keys[i].key.as_str()).collect();
        Err(Error::new(
            ErrorKind::LockLost,
            format!(
                "multi-lock lost key(s) {}; the other keys were released",
                quoted(&names)
            ),
        ))
    }

    /// Checks in, cheaply enough to call in a hot loop: as
    /// [`LockGuard::heartbeat`](crate::LockGuard::heartbeat), for every key at once (one
    /// renewal of all of them per third of the TTL at most, shared by concurrent callers
    /// and the watchdog). A renewal that finds a key lost releases the others.
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost); connection errors of the renewal it waited for.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn heartbeat(&self) -> Result<()> {
        lock::beat(self.lease.as_ref(), || self.lost_error()).await
    }

    /// A cloneable, `'static` loss signal for these locks, to move into spawned tasks (see
    /// [`LostToken`]).
    pub fn lost_token(&self) -> LostToken {
        lock::token_of(self.lease.as_ref())
    }

    fn lost_error(&self) -> Error {
        let names: Vec<&str> = self.keys().collect();
        Error::new(
            ErrorKind::LockLost,
            format!(
                "multi-lock on {} is no longer held by this guard (a key expired or was taken over; the others were released)",
                quoted(&names)
            ),
        )
    }

    /// Whether the locks are known lost: the watchdog found one of them taken or could not
    /// renew them in time (it then released the others), or an `extend` failed.
    pub fn is_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(LeaseHandle::is_lost)
    }

    /// Resolves when the locks are lost (see [`is_lost`](MultiGuard::is_lost)).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) {
        watchdog::lost(self.lease.as_ref()).await;
    }

    /// Releases every lock still held, as [`LockGuard::release`](crate::LockGuard::release)
    /// does one: every key this guard still holds is released, and a key that had already
    /// expired or been taken over is an error naming it.
    ///
    /// A connection error is retried within the herd's
    /// [command timeout](crate::Builder::command_timeout): after a retry, a key found free
    /// counts as released, one held by another as lost.
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost) naming the keys that had expired or been taken over
    /// (their current holders are left untouched; every other key was released);
    /// connection errors that outlast the command timeout (the locks then expire with their
    /// TTL).
    ///
    /// # Cancel safety
    ///
    /// If cancelled, the release may or may not have happened; the TTL is the backstop.
    pub async fn release(mut self) -> Result<()> {
        let gone = self.released.swap(true, Ordering::AcqRel);
        let token = self.lost_token();
        self.lease = None; // stop renewing first
        if token.is_lost() && self.herd.backend().gate().stage() == Stage::Closed {
            return Err(released_by_shutdown("multi-lock"));
        }
        if gone {
            // A failed `extend` already released what was left.
            return Err(self.lost_error());
        }
        let lost = release_all(self.herd.backend(), &self.keys, &self.tokens).await?;
        if lost.is_empty() {
            return Ok(());
        }
        let lost = Err(Error::new(
            ErrorKind::LockLost,
            format!(
                "multi-lock lost key(s) {} before the release (they expired or were taken over; left untouched); the other keys were released",
                quoted(&lost.iter().map(String::as_str).collect::<Vec<_>>())
            ),
        ));
        token.found_lost_if(&lost);
        lost
    }
}

/// Releases every key still held with its token, retrying through connection errors within
/// the command timeout (as [`LockGuard::release`](crate::LockGuard::release)), and returns
/// the keys that were lost: after a retry, a key found free counts as released, one held by
/// another as lost.
async fn release_all(
    backend: &Backend,
    keys: &[JobKeys],
    tokens: &[String],
) -> Result<Vec<String>> {
    let reply = backend
        .retry_release("multi release", || backend.multi_release(keys, tokens))
        .await?;
    let mut lost = Vec::new();
    for (k, released) in keys.iter().zip(reply.value) {
        let released = released || (reply.after_error && lock::is_free(backend, k).await?);
        if !released {
            lost.push(k.key.clone());
        }
    }
    Ok(lost)
}

impl Drop for MultiGuard {
    fn drop(&mut self) {
        self.lease = None;
        if *self.released.get_mut() {
            return;
        }
        let backend = self.herd.backend().clone();
        let keys = std::mem::take(&mut self.keys);
        let tokens = std::mem::take(&mut self.tokens);
        let gate = std::sync::Arc::clone(self.herd.backend().gate());
        spawn_cleanup(&gate, "release of a dropped multi-lock", async move {
            release_all(&backend, &keys, &tokens).await
        });
    }
}

/// Undoes a multi-lock acquire step whose caller is gone: releases the keys if the step took
/// them. A step that failed (a timeout, a dropped connection) may still have won on the
/// server, so every key carrying the step's nonce is released.
async fn undo_multi_acquire(
    backend: &Backend,
    keys: &[JobKeys],
    nonce: &str,
    reply: Result<MultiReply>,
) -> Result<()> {
    let (keys, tokens): (Vec<JobKeys>, Vec<String>) = match reply {
        Ok(MultiReply::Acquired(tokens)) => (keys.to_vec(), tokens),
        Ok(MultiReply::Busy(_)) => return Ok(()),
        Err(_) => {
            let mut ours = (Vec::new(), Vec::new());
            for k in keys {
                if let Some(holder) = backend.status(k).await?.holder {
                    if holder_nonce(&holder) == Some(nonce) {
                        if let Some(token) = holder_token(&holder) {
                            ours.0.push(k.clone());
                            ours.1.push(token.to_owned());
                        }
                    }
                }
            }
            ours
        }
    };
    if keys.is_empty() {
        return Ok(());
    }
    tracing::debug!(
        keys = keys.len(),
        "releasing a multi-lock taken by an acquire step cut off in flight"
    );
    backend.multi_release(&keys, &tokens).await.map(drop)
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Herd {
    /// Takes every lock in `keys` now, or none of them. Never waits.
    ///
    /// Duplicate keys are ignored (the set is what counts). On contention, every key held
    /// by someone else is reported with its holder, and nothing is left locked.
    ///
    /// # Examples
    ///
    /// A transfer between two accounts holds both:
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// use herdlock::TryMulti;
    /// let herd = herdlock::Herd::memory();
    /// let TryMulti::Acquired(both) = herd.try_multi(&["acct:alice", "acct:bob"]).await? else {
    ///     unreachable!("nobody holds them");
    /// };
    /// match herd.try_multi(&["acct:bob", "acct:carol"]).await? {
    ///     TryMulti::Busy(held) => assert_eq!(held[0].key, "acct:bob"),
    ///     TryMulti::Acquired(_) => unreachable!("bob is held"),
    /// }
    /// both.release().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](ErrorKind::InvalidInput) for an empty key set, more than
    /// [`MAX_MULTI_KEYS`](crate::limits::MAX_MULTI_KEYS) keys, or a bad key; connection errors. Contention is
    /// [`TryMulti::Busy`], not an error.
    ///
    /// # Cancel safety
    ///
    /// Cancelling leaves nothing behind: an acquire step already sent is finished in the
    /// background and the locks it took are released (outside a Tokio runtime, where
    /// nothing can run, their TTL is the backstop).
    pub async fn try_multi(&self, keys: &[&str]) -> Result<TryMulti> {
        self.try_multi_with(keys, &MultiOptions::default()).await
    }

    /// [`try_multi`](Herd::try_multi) with [options](MultiOptions): the TTL,
    /// [auto-extend](MultiOptions::auto_extend) (on by default: the watchdog keeps every key
    /// alive while the guard lives), the maximum hold time and replica acknowledgement.
    ///
    /// # Errors
    ///
    /// As [`try_multi`](Herd::try_multi), plus [`InvalidInput`](ErrorKind::InvalidInput)
    /// for options out of range and [`NotReplicated`](ErrorKind::NotReplicated) (the keys
    /// were released) when fewer replicas than asked acknowledged them.
    ///
    /// # Cancel safety
    ///
    /// As [`try_multi`](Herd::try_multi).
    pub async fn try_multi_with(&self, keys: &[&str], options: &MultiOptions) -> Result<TryMulti> {
        let keys = self.multi_keys(keys)?;
        let options = options.resolve(self)?;
        self.multi_attempt(keys, &options, false).await
    }

    /// Takes every lock in `keys`, waiting up to `wait` until all are free at once.
    ///
    /// Waiters subscribe to every key's channel (confirmed) before re-checking, and are
    /// woken by the release of any of them; a lost notice is covered by a re-check when the
    /// earliest holder's TTL runs out.
    ///
    /// # Errors
    ///
    /// [`Timeout`](ErrorKind::Timeout) when `wait` passes, naming the keys still held and
    /// each one's holder (owner label and fencing token);
    /// otherwise as [`try_multi`](Herd::try_multi), plus
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a zero or absurd wait.
    ///
    /// # Cancel safety
    ///
    /// Cancelling leaves nothing behind, and neither does the deadline: an acquire step in
    /// flight when either strikes is finished in the background, and the locks it took are
    /// released.
    pub async fn multi(&self, keys: &[&str], wait: Duration) -> Result<MultiGuard> {
        self.multi_with(keys, wait, &MultiOptions::default()).await
    }

    /// [`multi`](Herd::multi) with [options](MultiOptions) (TTL, auto-extend, maximum hold
    /// time, replica acknowledgement).
    ///
    /// # Errors
    ///
    /// As [`multi`](Herd::multi), plus [`InvalidInput`](ErrorKind::InvalidInput) for
    /// options out of range and [`NotReplicated`](ErrorKind::NotReplicated).
    ///
    /// # Cancel safety
    ///
    /// As [`multi`](Herd::multi).
    pub async fn multi_with(
        &self,
        keys: &[&str],
        wait: Duration,
        options: &MultiOptions,
    ) -> Result<MultiGuard> {
        let requested = keys;
        let keys = self.multi_keys(keys)?;
        let options = options.resolve(self)?;
        keys::validate_wait(wait)?;
        let deadline = Instant::now() + wait;
        let mut last_held: Vec<HeldKey> = Vec::new();
        let mut seen = obs::Waiting::start(self, Primitive::Multi, &keys[0].key);
        // `Ok(None)`: the deadline passed while waiting.
        let wait_loop = async {
            let mut subs: Vec<Subscription> = Vec::new();
            loop {
                let earliest = match self.multi_attempt(keys.clone(), &options, true).await? {
                    TryMulti::Acquired(guard) => return Ok(Some(guard)),
                    TryMulti::Busy(held) => {
                        let earliest = held.iter().filter_map(|h| h.holder.remaining).min();
                        last_held = held;
                        earliest
                    }
                };
                if subs.is_empty() {
                    // Subscribe (confirmed) to every key, then re-check at once.
                    for k in &keys {
                        subs.push(self.backend().subscribe(k).await?);
                    }
                    continue;
                }
                // A notice on any key (a release, a resync) is a reason to try again.
                let until = Until::lease(earliest).deadline(deadline);
                seen.sleeps(None, earliest);
                let woken = wait::wait(&mut subs, until, |_| Hint::<Infallible>::Recheck).await;
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
        if last_held.is_empty() {
            Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "timed out after {wait:?} waiting for multi-lock on {} (no reply from the backend within the wait)",
                    quoted(requested)
                ),
            ))
        } else {
            Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "timed out after {wait:?} waiting for multi-lock; still held: {}",
                    last_held
                        .iter()
                        .map(|h| format!("`{}` {}", h.key, lock::held_by(&h.holder)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    }

    fn multi_keys(&self, keys: &[&str]) -> Result<Vec<JobKeys>> {
        if keys.is_empty() {
            return Err(Error::invalid("a multi-lock needs at least one key"));
        }
        let mut unique: Vec<&str> = Vec::with_capacity(keys.len());
        for key in keys {
            if !unique.contains(key) {
                unique.push(key);
            }
        }
        if unique.len() > MAX_MULTI_KEYS {
            return Err(Error::invalid(format!(
                "a multi-lock takes at most {MAX_MULTI_KEYS} keys, got {}",
                unique.len()
            )));
        }
        unique.into_iter().map(|k| self.job_keys(k)).collect()
    }

    /// One acquire step over every key; `waiting`: the caller waits when some are busy, so
    /// their holder values are marked and their releases publish notices.
    async fn multi_attempt(
        &self,
        keys: Vec<JobKeys>,
        options: &Resolved,
        waiting: bool,
    ) -> Result<TryMulti> {
        let sent = std::time::Instant::now();
        // Finished even if this call is cut off (deadline, cancellation) in flight: a win
        // nobody takes is released in the background.
        let (backend, nonce, ttl) = (self.backend().clone(), nonce(), options.ttl);
        let node = self.clone();
        let step = async move {
            let reply = backend
                .multi_acquire(&keys, &nonce, node.owner(), ttl, waiting)
                .await;
            (reply, backend, keys, nonce)
        };
        let (reply, _, keys, _) = Finished::new(
            self.backend().gate(),
            "undoing a multi-lock acquire step cut off in flight",
            step,
            |(reply, backend, keys, nonce)| async move {
                undo_multi_acquire(&backend, &keys, &nonce, reply).await
            },
        )
        .await;
        let reply = reply?;
        match reply {
            MultiReply::Acquired(tokens) => {
                let fences = tokens
                    .iter()
                    .map(|t| token_fence(t).map(FencingToken::new))
                    .collect::<Result<Vec<_>>>()?;
                // Watched until its local deadline; with auto-extend it is renewed.
                let lease = Some(self.inner.watchdog.register(
                    Renewal::Multi {
                        keys: keys.clone(),
                        tokens: tokens.clone(),
                    },
                    LeaseTerms {
                        ttl: options.ttl,
                        sent,
                        renew: options.auto_extend,
                        max_hold: options.max_hold,
                        what: Primitive::Multi,
                    },
                ));
                let guard = MultiGuard {
                    herd: self.clone(),
                    keys,
                    tokens,
                    fences,
                    lease,
                    released: AtomicBool::new(false),
                };
                if let Some((replicas, timeout)) = options.replicas {
                    // Every key is in one slot (checked), so one WAIT covers them all.
                    let acked = self
                        .backend()
                        .wait_replicas(&guard.keys[0], replicas, timeout)
                        .await?;
                    if acked < replicas {
                        let names: Vec<String> = guard.keys().map(str::to_owned).collect();
                        if let Err(e) = guard.release().await {
                            tracing::warn!(error = %e, "releasing an under-replicated multi-lock failed");
                        }
                        return Err(Error::new(
                            ErrorKind::NotReplicated,
                            format!(
                                "multi-lock on {} was acknowledged by {acked} of {replicas} replicas within {timeout:?}; it was released",
                                quoted(&names.iter().map(String::as_str).collect::<Vec<_>>())
                            ),
                        ));
                    }
                }
                Ok(TryMulti::Acquired(guard))
            }
            MultiReply::Busy(held) => held
                .into_iter()
                .map(|(i, holder, pttl)| {
                    Ok(HeldKey {
                        key: keys[i].key.clone(),
                        holder: Holder::parse(&holder, pttl)?,
                    })
                })
                .collect::<Result<Vec<_>>>()
                .inspect(|held| obs::contend_multi(self, held))
                .map(TryMulti::Busy),
        }
    }
}
