//! Distributed semaphores: at most N holders cluster-wide. [`Herd::semaphore`],
//! [`Semaphore`] and [`Permit`].
//!
//! ## How it works
//!
//! Holders live in a Redis sorted set scored by their lease expiry, computed from Redis
//! `TIME` (never a client clock); every step first drops expired holders, so a holder that
//! died gives its permit back when its lease runs out. A live [`Permit`] is kept alive by a
//! watchdog task that extends its lease every third of the lease.
//!
//! Waiters are woken by pub/sub: a release publishes `released` (for unfair waiters) and a
//! `wake:<member>` notice for each fair waiter at the head of the queue that a free permit
//! could admit. Each waiter also re-checks when the earliest lease would run out. In one
//! process, unfair waiters of one semaphore pass a local gate of N, so a herd of local
//! waiters costs at most N remote contenders.
//!
//! ## Fair mode
//!
//! Fair waiters take a ticket (a Redis counter) and are admitted in ticket order,
//! cluster-wide. A queued waiter refreshes its place while it waits; a waiter that gives up
//! leaves the queue at once, and one that died is dropped after [`QUEUE_TTL`](crate::limits::QUEUE_TTL). `try_acquire`
//! never jumps the queue.
//!
//! ## Changing N
//!
//! N is not stored in Redis: every caller enforces the N it passes. After N is lowered,
//! holders beyond the new N keep their permits until they release (nothing is revoked), and
//! callers with the new N are admitted only once fewer than N are held. After N is raised,
//! callers with the new N are admitted at once up to it. Give every caller of one key the
//! same N except while changing it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::gate::{released_by_shutdown, Stage};
use crate::backend::{SemArgs, SemOp, SemReply};
use crate::error::{Error, ErrorKind, Result};
use crate::herd::{nonce, spawn_cleanup, Herd};
use crate::keys::{self, JobKeys};
use crate::limits::{MAX_PERMITS, QUEUE_TTL};
use crate::obs::{self, Primitive};
use crate::wait::{self, Hint, Until, Woken};
use crate::watchdog::{self, LeaseHandle, LeaseTerms, LostToken, Renewal};

/// Options of a semaphore.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct SemaphoreOptions {
    lease: Option<Duration>,
    fair: bool,
}

impl SemaphoreOptions {
    /// Options with every field at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a permit lives unless extended. A watchdog extends it while the
    /// [`Permit`] is alive; the lease bounds how long a dead holder blocks its permit.
    ///
    /// Default: the herd's [`lock_ttl`](crate::Builder::lock_ttl).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Admit waiters in arrival order, cluster-wide.
    ///
    /// Default: off. Unfair waiters are cheaper (no queue to keep) and, with a local gate,
    /// faster under a herd; fair waiters never starve.
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }
}

/// A handle to one distributed semaphore. Cheap to clone.
#[derive(Clone)]
pub struct Semaphore {
    herd: Herd,
    keys: JobKeys,
    permits: u32,
    lease: Duration,
    fair: bool,
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("key", &self.keys.key)
            .field("permits", &self.permits)
            .field("lease", &self.lease)
            .field("fair", &self.fair)
            .finish_non_exhaustive()
    }
}

/// The result of [`Semaphore::try_acquire`].
#[derive(Debug)]
#[must_use = "dropping an acquired permit releases it in the background"]
#[allow(clippy::large_enum_variant)] // Acquired is the common case; boxing it costs an allocation
pub enum TryPermit {
    /// The caller holds a permit now.
    Acquired(Permit),
    /// No permit is free (or fair waiters are queued); nothing was changed.
    Busy {
        /// Permits in use.
        in_use: u32,
    },
}

impl TryPermit {
    /// The permit, if one was acquired.
    pub fn acquired(self) -> Option<Permit> {
        match self {
            TryPermit::Acquired(p) => Some(p),
            TryPermit::Busy { .. } => None,
        }
    }

    /// Whether a permit was acquired.
    pub fn is_acquired(&self) -> bool {
        matches!(self, TryPermit::Acquired(_))
    }

    /// Whether no permit was free.
    pub fn is_busy(&self) -> bool {
        matches!(self, TryPermit::Busy { .. })
    }

    /// How many permits were in use, if none was free.
    pub fn in_use(&self) -> Option<u32> {
        match self {
            TryPermit::Acquired(_) => None,
            TryPermit::Busy { in_use } => Some(*in_use),
        }
    }
}

/// One holder of a semaphore, from [`Semaphore::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PermitHolder {
    /// The holder's owner label.
    pub owner: String,
    /// Time left on its lease.
    pub remaining: Duration,
}

/// A snapshot of a semaphore, for debugging.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SemaphoreStatus {
    /// Permits in use.
    pub in_use: u32,
    /// Fair waiters in the queue.
    pub queued: u32,
    /// Every holder with its remaining lease.
    pub holders: Vec<PermitHolder>,
}

impl Herd {
    /// A handle to the semaphore `key` with `permits` permits; `permits = 1` is a
    /// serialized queue (a mutex with waiters).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// use std::time::Duration;
    /// let herd = herdlock::Herd::memory();
    /// let uploads = herd.semaphore("uploads", 2)?;
    /// let a = uploads.acquire(Duration::from_secs(1)).await?;
    /// let b = uploads.acquire(Duration::from_secs(1)).await?;
    /// assert!(uploads.try_acquire().await?.acquired().is_none()); // both permits taken
    /// a.release().await?;
    /// let c = uploads.acquire(Duration::from_secs(1)).await?;
    /// # b.release().await?; c.release().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a bad key, zero permits or more than
    /// [`MAX_PERMITS`](crate::limits::MAX_PERMITS).
    pub fn semaphore(&self, key: &str, permits: u32) -> Result<Semaphore> {
        self.semaphore_with(key, permits, &SemaphoreOptions::default())
    }

    /// [`semaphore`](Herd::semaphore) with options (lease, fair mode).
    ///
    /// # Errors
    ///
    /// As [`semaphore`](Herd::semaphore), plus [`InvalidInput`](ErrorKind::InvalidInput)
    /// for a lease out of range.
    pub fn semaphore_with(
        &self,
        key: &str,
        permits: u32,
        options: &SemaphoreOptions,
    ) -> Result<Semaphore> {
        let keys = self.job_keys(key)?;
        if permits == 0 || permits > MAX_PERMITS {
            return Err(Error::invalid(format!(
                "a semaphore needs between 1 and {MAX_PERMITS} permits, got {permits}"
            )));
        }
        let lease = options.lease.unwrap_or(self.inner.lock_ttl);
        keys::validate_ttl("semaphore lease", lease)?;
        Ok(Semaphore {
            herd: self.clone(),
            keys,
            permits,
            lease,
            fair: options.fair,
        })
    }
}

impl Semaphore {
    /// The key.
    pub fn key(&self) -> &str {
        &self.keys.key
    }

    /// The number of permits this handle enforces.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    fn args<'a>(&self, member: &'a str) -> SemArgs<'a> {
        SemArgs {
            member,
            permits: self.permits,
            lease: self.lease,
            queue_ttl: QUEUE_TTL,
        }
    }

    async fn step(&self, op: SemOp, member: &str) -> Result<SemReply> {
        let reply = self
            .herd
            .backend()
            .semaphore(&self.keys, op, self.args(member));
        reply.await.inspect(|reply| {
            if let SemReply::Busy { .. } = reply {
                obs::contend_on(&self.herd, Primitive::Semaphore, &self.keys.key, None);
            }
        })
    }

    /// Releases `member`'s permit, retrying through connection errors within the command
    /// timeout. `false`: the permit was not held (its lease had run out). After a retry,
    /// a permit found gone counts as released: only its holder can remove its member.
    async fn release_member(&self, member: &str) -> Result<bool> {
        let reply = self
            .herd
            .backend()
            .retry_release("semaphore release", || self.step(SemOp::Release, member))
            .await?;
        Ok(reply.value == SemReply::Done(true) || reply.after_error)
    }

    fn member(&self) -> String {
        format!("{}:{}", nonce(), self.herd.owner())
    }

    /// Takes a permit now if one is free (and, in fair mode, nobody is queued), or reports
    /// how many are in use. Never waits.
    ///
    /// # Errors
    ///
    /// Connection errors. Contention is [`TryPermit::Busy`], not an error.
    ///
    /// # Cancel safety
    ///
    /// If cancelled after the request was sent, a permit may have been taken; it then
    /// expires with its lease.
    pub async fn try_acquire(&self) -> Result<TryPermit> {
        let member = self.member();
        let sent = std::time::Instant::now();
        Ok(match self.step(SemOp::Try, &member).await? {
            SemReply::Admitted => TryPermit::Acquired(self.permit(member, sent)),
            SemReply::Busy { in_use, .. } => TryPermit::Busy { in_use },
            other => return Err(unexpected(&other)),
        })
    }

    /// Takes a permit, waiting up to `wait` for one.
    ///
    /// # Errors
    ///
    /// [`Timeout`](ErrorKind::Timeout) when `wait` passes;
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a zero or absurd wait; connection
    /// errors.
    ///
    /// # Cancel safety
    ///
    /// Cancelling leaves nothing behind: in the background, a fair waiter's place in the
    /// queue is given up (or expires after [`QUEUE_TTL`](crate::limits::QUEUE_TTL)), and a permit granted to an
    /// attempt that was in flight when cancelled is given back.
    pub async fn acquire(&self, wait: Duration) -> Result<Permit> {
        keys::validate_wait(wait)?;
        let deadline = Instant::now() + wait;
        let member = self.member();
        let timed_out = || {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "timed out after {wait:?} waiting for a permit of semaphore `{}`",
                    self.keys.key
                ),
            )
        };
        let mut leave = LeaveOnDrop {
            armed: true,
            semaphore: self.clone(),
            member: member.clone(),
        };
        // When the step that admitted us was sent: the permit's lease starts no earlier.
        let mut sent = std::time::Instant::now();
        let mut seen = obs::Waiting::start(&self.herd, Primitive::Semaphore, &self.keys.key);
        let wait_loop = async {
            let op = if self.fair { SemOp::Queue } else { SemOp::Try };
            // A fair waiter whose channel is already subscribed (other waiters of this
            // semaphore in the process keep it warm) takes that subscription first, at no
            // cost, so its first queue step is also its check. Otherwise try once first:
            // a free permit then costs no SUBSCRIBE round trip.
            let early = if self.fair {
                self.herd.backend().subscribe_if_warm(&self.keys)
            } else {
                None
            };
            if early.is_none() {
                sent = std::time::Instant::now();
                if let SemReply::Admitted = self.step(op, &member).await? {
                    return Ok(());
                }
            }
            // Unfair waiters of this process pass a local gate of N first.
            let _gate = if self.fair {
                None
            } else {
                Some(
                    gate(&self.herd, &self.keys.key, self.permits)
                        .acquire_owned()
                        .await,
                )
            };
            let wake = crate::backend::wire::wake_notice(&member);
            let mut sub = match early {
                Some(sub) => sub,
                None => self.herd.backend().subscribe(&self.keys).await?,
            };
            loop {
                // Subscribed (confirmed) before this check.
                sent = std::time::Instant::now();
                let soonest = match self.step(op, &member).await? {
                    SemReply::Admitted => return Ok(()),
                    SemReply::Busy { soonest_ms, .. } => soonest_ms,
                    other => return Err(unexpected(&other)),
                };
                let mut until = Until::lease(wait::remaining(soonest)).deadline(deadline);
                if self.fair {
                    // A fair waiter refreshes its place in the queue while it waits.
                    until = until.cap(QUEUE_TTL / 3);
                }
                seen.sleeps(None, wait::remaining(soonest));
                // A fair waiter re-checks only when named (or on a resync or its timer).
                let woken = wait::wait(std::slice::from_mut(&mut sub), until, |message| {
                    if self.fair && message != wake.as_bytes() {
                        Hint::<Infallible>::Ignore
                    } else {
                        Hint::Recheck
                    }
                })
                .await;
                if !self.fair {
                    seen.woke(&woken); // a fair waiter's timer also refreshes its place
                }
                if let Woken::Deadline = woken {
                    return Err(timed_out());
                }
            }
        };
        let result = match tokio::time::timeout_at(deadline, wait_loop).await {
            Ok(Ok(())) => {
                leave.armed = false;
                Ok(self.permit(member, sent))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(timed_out()),
        };
        seen.finish(&result);
        result
    }

    /// Permits in use, fair waiters queued, and every holder with its remaining lease.
    ///
    /// # Errors
    ///
    /// Connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn status(&self) -> Result<SemaphoreStatus> {
        match self.step(SemOp::Status, "").await? {
            SemReply::Status {
                in_use,
                queued,
                holders,
            } => Ok(SemaphoreStatus {
                in_use,
                queued,
                holders: holders
                    .into_iter()
                    .map(|(member, ms)| PermitHolder {
                        owner: member
                            .split_once(':')
                            .map_or(member.as_str(), |(_, owner)| owner)
                            .to_owned(),
                        remaining: Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
                    })
                    .collect(),
            }),
            other => Err(unexpected(&other)),
        }
    }

    fn permit(&self, member: String, sent: std::time::Instant) -> Permit {
        let lease = self.herd.inner.watchdog.register(
            Renewal::Permit {
                keys: self.keys.clone(),
                member: member.clone(),
                permits: self.permits,
            },
            LeaseTerms {
                ttl: self.lease,
                sent,
                renew: true,
                max_hold: None,
                what: Primitive::Semaphore,
            },
        );
        Permit {
            semaphore: self.clone(),
            member,
            lease: Some(lease),
            released: false,
        }
    }
}

fn unexpected(reply: &SemReply) -> Error {
    Error::new(
        ErrorKind::Redis,
        format!("unexpected semaphore reply {reply:?}"),
    )
}

/// The per-process gate of unfair waiters of one semaphore.
fn gate(herd: &Herd, key: &str, permits: u32) -> Arc<tokio::sync::Semaphore> {
    let mut gates = herd
        .inner
        .gates
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    gates.retain(|_, g| g.strong_count() > 0);
    let id = format!("{key}#{permits}");
    if let Some(g) = gates.get(&id).and_then(Weak::upgrade) {
        return g;
    }
    let g = Arc::new(tokio::sync::Semaphore::new(permits as usize));
    gates.insert(id, Arc::downgrade(&g));
    g
}

/// The local gates of one herd, by semaphore key and N.
pub(crate) type Gates = Mutex<HashMap<String, Weak<tokio::sync::Semaphore>>>;

/// Cleans up after a wait that ends without handing out a permit (time-out, error or
/// cancellation): gives a fair waiter's queue place up, and gives back a permit that an
/// attempt cancelled in flight may have been granted with nobody to own it.
struct LeaveOnDrop {
    armed: bool,
    semaphore: Semaphore,
    member: String,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (sem, member) = (self.semaphore.clone(), std::mem::take(&mut self.member));
        let gate = std::sync::Arc::clone(self.semaphore.herd.backend().gate());
        spawn_cleanup(&gate, "leaving a semaphore queue", async move {
            sem.step(SemOp::Leave, &member).await
        });
    }
}

/// A held semaphore permit, kept alive by the herd's watchdog thread until released or
/// dropped.
///
/// Dropping it releases in the background (best effort; the lease is the backstop).
#[must_use = "dropping the permit releases it in the background"]
pub struct Permit {
    semaphore: Semaphore,
    member: String,
    /// The watchdog's registration; dropped first on release.
    lease: Option<LeaseHandle>,
    released: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.semaphore.keys.key)
            .field("owner", &self.semaphore.herd.owner())
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// The semaphore's key.
    pub fn key(&self) -> &str {
        &self.semaphore.keys.key
    }

    /// Whether the permit is known lost: the watchdog found it gone, or no renewal
    /// succeeded before its local deadline (the send time of the last successful
    /// admission or renewal, plus the lease, minus 1 % + 2 ms), for example while Redis
    /// was unreachable.
    pub fn is_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(LeaseHandle::is_lost)
    }

    /// Resolves when the permit is lost (see [`is_lost`](Permit::is_lost)).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) {
        watchdog::lost(self.lease.as_ref()).await;
    }

    /// A cloneable, `'static` loss signal for this permit, to move into spawned tasks (see
    /// [`LostToken`]).
    pub fn lost_token(&self) -> LostToken {
        crate::lock::token_of(self.lease.as_ref())
    }

    /// Checks in, cheaply enough to call in a hot loop: as
    /// [`LockGuard::heartbeat`](crate::LockGuard::heartbeat), for the permit's lease (at
    /// most one renewal per third of the lease, shared by concurrent callers and the
    /// watchdog, which renews it anyway).
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost) once the permit is known lost; connection errors
    /// of the renewal it waited for.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn heartbeat(&self) -> Result<()> {
        crate::lock::beat(self.lease.as_ref(), || self.lost_error()).await
    }

    /// Resets the lease to `lease` from now (the watchdog does this on its own; this is for
    /// a longer lease).
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost) if the permit's lease had run out;
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a lease out of range; connection
    /// errors.
    ///
    /// # Cancel safety
    ///
    /// If cancelled, the extension may or may not have been applied.
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        keys::validate_ttl("semaphore lease", lease)?;
        let args = SemArgs {
            lease,
            ..self.semaphore.args(&self.member)
        };
        let sent = std::time::Instant::now();
        let reply = self
            .semaphore
            .herd
            .backend()
            .semaphore(&self.semaphore.keys, SemOp::Extend, args)
            .await?;
        if reply == SemReply::Done(true) {
            // An extension that lands after the local deadline does not revive the permit.
            if self.lease.as_ref().is_none_or(|h| h.extended(lease, sent)) {
                return Ok(());
            }
            Err(self.lost_error())
        } else {
            if let Some(handle) = &self.lease {
                handle.mark_lost();
            }
            Err(self.lost_error())
        }
    }

    /// Gives the permit back and wakes a waiter.
    ///
    /// A connection error is retried within the herd's
    /// [command timeout](crate::Builder::command_timeout) (a permit is released by its own
    /// member name, so repeating the release is safe); a retry that finds the permit gone
    /// reports success, as the attempt that failed may have released it.
    ///
    /// # Errors
    ///
    /// [`LockLost`](ErrorKind::LockLost) if the lease had already run out; connection
    /// errors that outlast the command timeout (the permit then expires with its lease).
    ///
    /// # Cancel safety
    ///
    /// If cancelled, the release may or may not have happened; the lease is the backstop.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        let token = self.lost_token();
        self.lease = None; // stop renewing first
        if token.is_lost() && self.semaphore.herd.backend().gate().stage() == Stage::Closed {
            return Err(released_by_shutdown("permit"));
        }
        if self.semaphore.release_member(&self.member).await? {
            Ok(())
        } else {
            let lost = Err(self.lost_error());
            token.found_lost_if(&lost);
            lost
        }
    }

    fn lost_error(&self) -> Error {
        Error::new(
            ErrorKind::LockLost,
            format!(
                "permit of semaphore `{}` is no longer held (its lease ran out)",
                self.semaphore.keys.key
            ),
        )
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.lease = None;
        if self.released {
            return;
        }
        let sem = self.semaphore.clone();
        let member = std::mem::take(&mut self.member);
        let gate = std::sync::Arc::clone(self.semaphore.herd.backend().gate());
        spawn_cleanup(&gate, "release of a dropped permit", async move {
            sem.release_member(&member).await
        });
    }
}
