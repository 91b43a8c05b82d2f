//! The lease watchdog: one OS thread per herd that keeps every held lease alive, and tells
//! each holder it lost its lease no later than the lease can have run out on Redis.
//!
//! Held locks, fan-out runs, multi-locks and semaphore permits register a lease here. The
//! thread runs its own single-threaded Tokio runtime and, for Redis, its **own connection**,
//! so a job that blocks the caller's runtime (a CPU loop, a blocking call) does not stop
//! renewals. Every lease is renewed every third of its TTL; each renewal runs as its own
//! task (pipelined on one multiplexed connection), so one slow or hung renewal never delays
//! another lease's renewal or its loss.
//!
//! # Loss is decided on the holder's clock
//!
//! A lease's *local deadline* is the instant its last successful renewal (or its
//! acquisition) was **sent**, plus its TTL, minus a drift margin ([`drift_margin`]: 1 % of
//! the TTL plus 2 ms, for clock-rate drift between this host and Redis and Redis's
//! millisecond rounding). Redis starts the TTL when it *runs* the command, which is after
//! it was sent, so the local deadline is never later than the key's expiry on Redis. When
//! the deadline passes the lease is lost — whatever renewals are in flight, whatever the
//! command timeout — and its [`LeaseHandle`] reports it. A renewal that succeeds after
//! that does not resurrect the lease: the watchdog releases it.
//!
//! A lease is also lost when a renewal finds another holder. Whoever holds the handle
//! decides what loss means (a fan-out leader cancels its job by default). Dropping the
//! handle stops renewal at once. A lease registered without renewal (`auto_extend(false)`)
//! or past its maximum hold time is not renewed, and is reported lost at its deadline.
//!
//! # Heartbeats
//!
//! A heartbeat ([`LeaseHandle::heartbeat`]) is a renewal the holder asks for, and this
//! thread sends it: so at most one renewal of a lease is ever in flight, the watchdog's and
//! every caller's alike. A heartbeat sends nothing while the last successful renewal (or the
//! acquisition) was sent less than a third of the TTL ago — the watchdog's own period, so a
//! lease the watchdog keeps alive costs no extra command at all; otherwise it asks for a
//! renewal (or joins the one in flight) and returns its outcome. A lease known lost fails at
//! once, without a round trip.
//!
//! # Tokens
//!
//! [`LostToken`] is a cloneable, `'static` view of one lease's standing (held, lost, or
//! ended by a release), for tasks that must stop when the lease is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use crate::backend::gate::Stage;
use crate::backend::{Backend, SemArgs, SemOp, SemReply};
use crate::keys::JobKeys;
use crate::limits::QUEUE_TTL;
use crate::obs::{self, Held, Primitive, Stats};

/// How soon a failed renewal is retried.
const RETRY: Duration = Duration::from_millis(100);
/// The longest the thread sleeps when nothing is due (it is woken on registration).
const IDLE: Duration = Duration::from_secs(1);
/// The fixed part of the drift margin: Redis rounds its clock to milliseconds.
const DRIFT_FIXED: Duration = Duration::from_millis(2);
/// The proportional part of the drift margin: 1 / `DRIFT_DIVISOR` of the TTL.
const DRIFT_DIVISOR: u32 = 100;

/// How much earlier than `sent + ttl` a lease is considered gone: 1 % of the TTL (the
/// clock-rate difference between this host and the Redis host that herdlock tolerates)
/// plus 2 ms (Redis keeps expiry times in whole milliseconds).
pub(crate) fn drift_margin(ttl: Duration) -> Duration {
    ttl / DRIFT_DIVISOR + DRIFT_FIXED
}

/// The local deadline of a lease whose acquisition or renewal to `ttl` was sent at `sent`.
pub(crate) fn local_deadline(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.saturating_sub(drift_margin(ttl))
}

/// What renewing one lease means.
#[derive(Debug, Clone)]
pub(crate) enum Renewal {
    /// A lock or fan-out run: extend `keys.lock` if it still holds `token`.
    Lock { keys: JobKeys, token: String },
    /// A multi-key lock: extend every key, or (if any is lost) release the rest.
    Multi {
        keys: Vec<JobKeys>,
        tokens: Vec<String>,
    },
    /// A semaphore permit: extend `member`'s lease.
    Permit {
        keys: JobKeys,
        member: String,
        permits: u32,
    },
}

/// How a lease is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseTerms {
    /// The TTL the lease was acquired with.
    pub(crate) ttl: Duration,
    /// When the acquisition was sent (before the acquire command left this process).
    pub(crate) sent: Instant,
    /// Whether the watchdog renews it (`false`: it is only watched until its deadline).
    pub(crate) renew: bool,
    /// Stop renewing this long after `sent` (the maximum hold time).
    pub(crate) max_hold: Option<Duration>,
    /// Whose lease it is (for `Herd::stats` and the metrics).
    pub(crate) what: Primitive,
}

/// The watchdog of one herd. The thread starts on the first registration.
#[derive(Debug)]
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    leases: Mutex<Leases>,
    /// Wakes the thread when a lease is registered or extended.
    wake: Arc<Notify>,
    /// The backend the thread renews through (for Redis, it opens a connection of its own).
    backend: Backend,
    /// Where acquisitions, releases and losses are counted, and the herd's owner label.
    stats: Arc<Stats>,
    owner: Arc<str>,
}

#[derive(Debug, Default)]
struct Leases {
    next_id: u64,
    map: HashMap<u64, Lease>,
    thread_started: bool,
    /// When the thread will next wake on its own (`None` while it is working).
    planned_wake: Option<Instant>,
    /// Set by [`Watchdog::stop`]: the thread ends at its next wake-up.
    stopped: bool,
}

#[derive(Debug)]
struct Lease {
    renewal: Renewal,
    ttl: Duration,
    renew: bool,
    next_due: Instant,
    /// Stop renewing after this (the maximum hold time).
    hold_until: Option<Instant>,
    /// A renewal of this lease is on its way: when it was due (no later than it was sent)
    /// and the TTL it asks for.
    in_flight: Option<(Instant, Duration)>,
    /// When the last manual extension (`extend`) was sent.
    last_manual: Option<Instant>,
    /// A heartbeat asked for a renewal (sent even when `renew` is off or past `hold_until`).
    requested: bool,
    state: Arc<LeaseState>,
}

/// Where a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Held (unless its local deadline has passed and the thread has not marked it yet).
    Held,
    /// Lost while held.
    Lost,
    /// Given up by its holder (released, or its guard dropped) while still held.
    Ended,
}

/// What a lease's holder, its tokens and the thread share: its standing, the local
/// deadline, and what heartbeats need.
#[derive(Debug)]
struct LeaseState {
    standing: watch::Sender<Standing>,
    /// The local deadline, as nanoseconds since [`epoch`].
    deadline: AtomicU64,
    /// Until when a heartbeat sends nothing: the send time of the last successful renewal
    /// (or the acquisition) plus a third of the TTL, as nanoseconds since [`epoch`].
    fresh_until: AtomicU64,
    /// Finished renewals, counted, with the last one's error (`None`: it succeeded, or
    /// found the lease lost, which `standing` tells). Heartbeats wait on it.
    beats: watch::Sender<(u64, Option<crate::Error>)>,
    /// The hold's record for `Herd::stats`, the metrics and the events: its end (released
    /// or lost) is counted once. `None` for a token of no lease.
    held: Option<Held>,
}

fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl LeaseState {
    fn new(deadline: Instant, fresh_until: Instant, held: Option<Held>) -> LeaseState {
        LeaseState {
            standing: watch::Sender::new(Standing::Held),
            deadline: AtomicU64::new(nanos_since_epoch(deadline)),
            fresh_until: AtomicU64::new(nanos_since_epoch(fresh_until)),
            beats: watch::Sender::new((0, None)),
            held,
        }
    }

    /// Records the hold's end (`lost` or released), if it is still held: counted before
    /// anyone is told.
    fn record_end(&self, lost: bool) {
        if let (Some(held), Standing::Held) = (&self.held, *self.standing.borrow()) {
            held.end(lost);
        }
    }

    fn deadline(&self) -> Instant {
        epoch() + Duration::from_nanos(self.deadline.load(Ordering::Acquire))
    }

    fn set_deadline(&self, at: Instant) {
        self.deadline
            .store(nanos_since_epoch(at), Ordering::Release);
    }

    fn fresh_until(&self) -> Instant {
        epoch() + Duration::from_nanos(self.fresh_until.load(Ordering::Acquire))
    }

    /// Records a successful renewal sent at `sent` to `ttl`: heartbeats need none for a
    /// third of the TTL from then.
    fn renewed(&self, sent: Instant, ttl: Duration) {
        self.fresh_until
            .fetch_max(nanos_since_epoch(sent + period(ttl)), Ordering::AcqRel);
    }

    /// Marked lost by the thread or the holder (not counting a deadline not yet noticed).
    fn marked_lost(&self) -> bool {
        *self.standing.borrow() == Standing::Lost
    }

    fn is_lost(&self) -> bool {
        match *self.standing.borrow() {
            Standing::Lost => true,
            Standing::Ended => false,
            Standing::Held => self.deadline() <= Instant::now(),
        }
    }

    fn mark_lost(&self) {
        self.record_end(true);
        self.standing.send_if_modified(|standing| {
            let held = *standing == Standing::Held;
            if held {
                *standing = Standing::Lost;
            }
            held
        });
    }

    /// The holder gave the lease up: lost if its deadline had passed, else ended.
    fn end(&self) {
        if self.is_lost() {
            self.mark_lost();
        } else {
            self.record_end(false);
            self.standing.send_if_modified(|standing| {
                let held = *standing == Standing::Held;
                if held {
                    *standing = Standing::Ended;
                }
                held
            });
        }
    }

    /// Tells heartbeats a renewal finished (`error`: it failed without an answer).
    fn beat(&self, error: Option<crate::Error>) {
        self.beats.send_modify(|(count, last)| {
            *count += 1;
            *last = error;
        });
    }
}

/// A fixed instant the deadlines are measured from (set before any lease exists).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A renewal's outcome, sent back to the thread's loop by the renewal's task.
struct Renewed {
    id: u64,
    sent: Instant,
    ttl: Duration,
    outcome: crate::Result<bool>,
}

impl Leases {
    /// Marks every lease whose deadline has passed as lost, and collects the due renewals.
    fn due(&mut self, now: Instant) -> Vec<(u64, Renewal, Duration)> {
        let mut due = Vec::new();
        for (id, lease) in &mut self.map {
            if lease.state.marked_lost() {
                continue;
            }
            if lease.state.deadline() <= now {
                // Nothing renewed it in time: it may have expired on Redis and been taken.
                tracing::warn!(renewal = ?lease.renewal, "lease lost: its local deadline passed before a renewal succeeded");
                lease.state.mark_lost();
                continue;
            }
            if lease.in_flight.is_some() {
                continue;
            }
            let scheduled =
                lease.renew && lease.hold_until.is_none_or(|t| t > now) && lease.next_due <= now;
            if scheduled || lease.requested {
                lease.requested = false;
                lease.in_flight = Some((now, lease.ttl));
                due.push((*id, lease.renewal.clone(), lease.ttl));
            }
        }
        due
    }

    fn next_wake(&self, now: Instant) -> Instant {
        self.map
            .values()
            .filter(|l| !l.state.marked_lost())
            .map(|l| {
                let deadline = l.state.deadline();
                if l.requested && l.in_flight.is_none() {
                    now
                } else if !l.renew
                    || l.in_flight.is_some()
                    || l.hold_until.is_some_and(|t| t <= now)
                {
                    deadline
                } else {
                    l.next_due.min(deadline)
                }
            })
            .min()
            .unwrap_or(now + IDLE)
            .min(now + IDLE)
    }
}

impl Watchdog {
    pub(crate) fn new(backend: Backend, stats: Arc<Stats>, owner: String) -> Watchdog {
        epoch();
        Watchdog {
            shared: Arc::new(Shared {
                leases: Mutex::new(Leases::default()),
                wake: Arc::new(Notify::new()),
                backend,
                stats,
                owner: Arc::from(owner),
            }),
        }
    }

    /// Registers a lease just acquired on `terms`; renewal (if any) starts a third of the
    /// TTL after the acquisition was sent. Keep the handle while the lease is held;
    /// dropping it stops renewal.
    pub(crate) fn register(&self, renewal: Renewal, terms: LeaseTerms) -> LeaseHandle {
        let deadline = local_deadline(terms.sent, terms.ttl);
        let first_due = terms.sent + period(terms.ttl);
        let (key, fence) = key_and_fence(&renewal);
        let owner = Arc::clone(&self.shared.owner);
        let held = Held::acquired(
            &self.shared.stats,
            terms.what,
            terms.sent,
            owner,
            key,
            fence,
        );
        let state = Arc::new(LeaseState::new(deadline, first_due, Some(held)));
        let (id, wake) = {
            let mut leases = lock(&self.shared.leases);
            // An acquisition that was on its way when the herd shut down (its step was sent
            // before the gate closed): `release_all` has run or will find nothing of it, so
            // its holder is told now and what it took is released. Checked under the same
            // lock as `release_all`'s snapshot, which runs after the gate closed.
            if leases.stopped || self.shared.backend.gate().stage() == Stage::Closed {
                drop(leases);
                state.record_end(false);
                state.mark_lost();
                let backend = self.shared.backend.clone();
                crate::herd::spawn_cleanup(
                    self.shared.backend.gate(),
                    "a release after shutdown",
                    async move { release_renewal(&backend, &renewal).await },
                );
                return LeaseHandle {
                    shared: Arc::downgrade(&self.shared),
                    id: 0,
                    state,
                };
            }
            leases.next_id += 1;
            let id = leases.next_id;
            leases.map.insert(
                id,
                Lease {
                    renewal,
                    ttl: terms.ttl,
                    renew: terms.renew,
                    next_due: first_due,
                    hold_until: terms.max_hold.map(|d| terms.sent + d),
                    in_flight: None,
                    last_manual: None,
                    requested: false,
                    state: Arc::clone(&state),
                },
            );
            if !leases.thread_started {
                leases.thread_started = true;
                self.start_thread();
            }
            // Wake the thread only if it would otherwise sleep past this lease's first
            // renewal or its deadline: with the usual TTLs it wakes in time on its own, and
            // skipping the wake-up keeps registration cheap on the acquire path.
            let next = if terms.renew {
                first_due.min(deadline)
            } else {
                deadline
            };
            let wake = leases.planned_wake.is_some_and(|t| next < t);
            (id, wake)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        LeaseHandle {
            shared: Arc::downgrade(&self.shared),
            id,
            state,
        }
    }

    /// Releases every lease still held, at once and concurrently, each after telling its
    /// holder it is gone (its [`LostToken`] fires first: no one else can have it before
    /// the holder is told). Returns how many were released and how many could not be
    /// (those run out with their TTL). For [`Herd::shutdown`](crate::Herd::shutdown).
    pub(crate) async fn release_all(&self, backend: &Backend) -> (usize, usize) {
        let held: Vec<Renewal> = {
            let leases = lock(&self.shared.leases);
            leases
                .map
                .values()
                .filter(|lease| {
                    !lease.state.is_lost() && *lease.state.standing.borrow() == Standing::Held
                })
                .map(|lease| {
                    lease.state.record_end(false); // released by the herd, not lost to another
                    lease.state.mark_lost();
                    lease.renewal.clone()
                })
                .collect()
        };
        let outcomes =
            futures::future::join_all(held.iter().map(|r| release_renewal(backend, r))).await;
        let failed = outcomes
            .iter()
            .zip(&held)
            .filter_map(|(outcome, renewal)| outcome.as_ref().err().map(|e| (e, renewal)))
            .inspect(|(e, renewal)| {
                tracing::warn!(error = %e, ?renewal, "shutdown could not release a lease; it runs out with its TTL");
            })
            .count();
        (held.len() - failed, failed)
    }

    /// Ends the thread (after [`release_all`](Watchdog::release_all), at shutdown): it
    /// renews nothing from now on.
    pub(crate) fn stop(&self) {
        lock(&self.shared.leases).stopped = true;
        self.shared.wake.notify_one();
    }

    fn start_thread(&self) {
        let weak = Arc::downgrade(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("herdlock-watchdog".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "the lease watchdog could not start a runtime");
                        return;
                    }
                };
                runtime.block_on(run(weak));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "the lease watchdog thread could not be started");
        }
    }
}

fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(1))
}

fn lock(leases: &Mutex<Leases>) -> MutexGuard<'_, Leases> {
    leases
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The thread's loop. Ends when the herd (and so `Shared`) is gone.
async fn run(weak: Weak<Shared>) {
    let (backend, wake) = {
        let Some(shared) = weak.upgrade() else { return };
        let wake = Arc::clone(&shared.wake);
        let backend = match &shared.backend {
            Backend::Redis(redis) => match redis.detached() {
                Ok(own) => Some(Backend::Redis(own)),
                Err(e) => {
                    // Without renewals, every lease is still reported lost at its deadline.
                    tracing::error!(error = %e, "the lease watchdog could not open its connection; leases will not be renewed");
                    None
                }
            },
            memory @ Backend::Memory(_) => Some(memory.clone()),
        };
        (backend, wake)
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Renewed>();
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if lock(&shared.leases).stopped {
            return;
        }
        // Outcomes first: a success moves deadlines, so apply it before judging them.
        let mut late = Vec::new();
        {
            let mut leases = lock(&shared.leases);
            while let Ok(renewed) = done_rx.try_recv() {
                if let Some(renewal) = apply(&mut leases, renewed) {
                    late.push(renewal);
                }
            }
        }
        if let Some(backend) = &backend {
            for renewal in late {
                spawn_release(backend, renewal);
            }
        }
        let now = Instant::now();
        let due = {
            let mut leases = lock(&shared.leases);
            leases.planned_wake = None;
            leases.due(now)
        };
        for (id, renewal, ttl) in due {
            let Some(backend) = backend.clone() else {
                // No connection to renew on: the lease runs out at its deadline.
                if let Some(lease) = lock(&shared.leases).map.get_mut(&id) {
                    lease.renew = false;
                    lease.in_flight = None;
                    lease.state.beat(Some(crate::Error::new(
                        crate::ErrorKind::Connection,
                        "the lease watchdog has no connection to renew on",
                    )));
                }
                continue;
            };
            let done = done_tx.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let outcome = renew(&backend, &renewal, ttl).await;
                // The loop may be gone (herd dropped): then nobody needs the outcome.
                let _ = done.send(Renewed {
                    id,
                    sent,
                    ttl,
                    outcome,
                });
            });
        }
        let wake_at = {
            let mut leases = lock(&shared.leases);
            let wake_at = leases.next_wake(Instant::now());
            leases.planned_wake = Some(wake_at);
            wake_at
        };
        // Not holding `shared` while asleep lets the herd be dropped, which ends this loop.
        drop(shared);
        let notified = wake.notified();
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(wake_at.into()) => {}
            Some(renewed) = done_rx.recv() => {
                let Some(shared) = weak.upgrade() else { return };
                let late = apply(&mut lock(&shared.leases), renewed);
                if let (Some(renewal), Some(backend)) = (late, &backend) {
                    spawn_release(backend, renewal);
                }
            }
        }
    }
}

/// Applies a renewal's outcome to its lease. Returns the renewal to undo when it succeeded
/// on Redis after the lease was already reported lost (it must not come back to life).
fn apply(leases: &mut Leases, renewed: Renewed) -> Option<Renewal> {
    let Renewed {
        id,
        sent,
        ttl,
        outcome,
    } = renewed;
    let lease = leases.map.get_mut(&id)?; // released meanwhile
    lease.in_flight = None;
    // Every heartbeat waiting now is answered by this renewal.
    lease.requested = false;
    let state = Arc::clone(&lease.state);
    let late = apply_outcome(lease, sent, ttl, outcome);
    match late {
        Ok(late) => {
            state.beat(None);
            late
        }
        Err(e) => {
            state.beat(Some(e));
            None
        }
    }
}

/// [`apply`] for one lease; `Err`: the renewal failed without an answer.
fn apply_outcome(
    lease: &mut Lease,
    sent: Instant,
    ttl: Duration,
    outcome: crate::Result<bool>,
) -> crate::Result<Option<Renewal>> {
    match outcome {
        Ok(true) => {
            let deadline = local_deadline(sent, ttl);
            if lease.state.is_lost() || deadline <= Instant::now() {
                tracing::warn!(renewal = ?lease.renewal, "a renewal succeeded after the lease's local deadline; releasing it");
                lease.state.mark_lost();
                return Ok(Some(lease.renewal.clone()));
            }
            let current = lease.state.deadline();
            if lease.last_manual.is_some_and(|m| m >= sent) {
                // A manual extension was sent while this renewal was out: Redis ran them in
                // an unknown order, and the key expires no earlier than the sooner of the
                // two ends, so the deadline may only come earlier.
                lease.state.set_deadline(current.min(deadline));
            } else if deadline > current {
                lease.state.set_deadline(deadline);
            }
            lease.state.renewed(sent, ttl);
            lease.next_due = sent + period(lease.ttl);
            let (key, fence) = key_and_fence(&lease.renewal);
            obs::renewed(key, fence, ttl);
            Ok(None)
        }
        Ok(false) => {
            tracing::warn!(renewal = ?lease.renewal, "lease lost: another holder has it, or it expired");
            lease.state.mark_lost();
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(error = %e, renewal = ?lease.renewal, "lease renewal failed; retrying");
            lease.next_due = Instant::now() + RETRY.min(period(ttl));
            Err(e)
        }
    }
}

/// Releases, in the background, a lease that was renewed after it was reported lost.
fn spawn_release(backend: &Backend, renewal: Renewal) {
    let backend = backend.clone();
    tokio::spawn(async move {
        if let Err(e) = release_renewal(&backend, &renewal).await {
            tracing::warn!(error = %e, ?renewal, "could not release a lease renewed after its deadline; it runs out with its TTL");
        }
    });
}

/// Releases what `renewal` holds, at once (no grace).
async fn release_renewal(backend: &Backend, renewal: &Renewal) -> crate::Result<()> {
    match renewal {
        Renewal::Lock { keys, token } => {
            backend.release(keys, token, Duration::ZERO).await.map(drop)
        }
        Renewal::Multi { keys, tokens } => backend.multi_release(keys, tokens).await.map(drop),
        Renewal::Permit {
            keys,
            member,
            permits,
        } => backend
            .semaphore(
                keys,
                SemOp::Release,
                permit_args(member, *permits, Duration::ZERO),
            )
            .await
            .map(drop),
    }
}

async fn renew(backend: &Backend, renewal: &Renewal, ttl: Duration) -> crate::Result<bool> {
    match renewal {
        Renewal::Lock { keys, token } => backend.extend(keys, token, ttl).await,
        Renewal::Multi { keys, tokens } => {
            Ok(backend.multi_extend(keys, tokens, ttl).await?.is_empty())
        }
        Renewal::Permit {
            keys,
            member,
            permits,
        } => {
            let args = permit_args(member, *permits, ttl);
            Ok(backend.semaphore(keys, SemOp::Extend, args).await? == SemReply::Done(true))
        }
    }
}

/// The semaphore step arguments of a permit's lease.
fn permit_args(member: &str, permits: u32, lease: Duration) -> SemArgs<'_> {
    SemArgs {
        member,
        permits,
        lease,
        queue_ttl: QUEUE_TTL,
    }
}

/// A registered lease. Dropping it stops its renewal.
#[derive(Debug)]
pub(crate) struct LeaseHandle {
    shared: Weak<Shared>,
    id: u64,
    state: Arc<LeaseState>,
}

/// Why a heartbeat failed.
#[derive(Debug)]
pub(crate) enum BeatFailed {
    /// The lease is lost.
    Lost,
    /// The renewal it waited for failed without an answer (a connection error).
    Error(crate::Error),
}

impl LeaseHandle {
    /// Whether the lease is known lost, or its local deadline has passed.
    pub(crate) fn is_lost(&self) -> bool {
        self.state.is_lost()
    }

    /// Resolves once the lease is lost (never, while it is held).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub(crate) async fn lost(&self) {
        self.token().lost().await;
    }

    /// A cloneable, `'static` view of this lease's standing.
    pub(crate) fn token(&self) -> LostToken {
        LostToken {
            state: Arc::clone(&self.state),
        }
    }

    /// The lease's local deadline: until then nobody else can hold it (unless it is lost to
    /// another holder found by a renewal, or to data loss).
    pub(crate) fn deadline(&self) -> Instant {
        if self.state.marked_lost() {
            epoch()
        } else {
            self.state.deadline()
        }
    }

    /// Records that the holder found the lease lost itself (a failed extend).
    pub(crate) fn mark_lost(&self) {
        self.state.mark_lost();
    }

    /// A coalesced renewal (see the module docs, "Heartbeats"): nothing is sent while the
    /// last successful renewal was sent less than a third of the TTL ago; otherwise the
    /// thread renews (once, however many callers ask, joining a renewal in flight) and this
    /// returns that renewal's outcome. A lease known lost fails at once.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the renewal is the thread's, and goes on for the other callers.
    pub(crate) async fn heartbeat(&self) -> Result<(), BeatFailed> {
        if self.state.is_lost() {
            return Err(BeatFailed::Lost);
        }
        if let Some(shared) = self.shared.upgrade() {
            // A draining herd tells long work to stop at a safe point.
            shared
                .backend
                .gate()
                .admit_acquire("a heartbeat (stop at a safe point and release)")
                .map_err(BeatFailed::Error)?;
        }
        if Instant::now() < self.state.fresh_until() {
            return Ok(());
        }
        let mut beats = self.state.beats.subscribe();
        let seen = beats.borrow_and_update().0;
        // A renewal that finished between the check above and the subscription made the
        // lease fresh before it counted itself: look again rather than ask for another.
        if self.state.is_lost() {
            return Err(BeatFailed::Lost);
        }
        if Instant::now() < self.state.fresh_until() {
            return Ok(());
        }
        let mut standing = self.state.standing.subscribe();
        {
            let Some(shared) = self.shared.upgrade() else {
                return Err(BeatFailed::Error(crate::Error::new(
                    crate::ErrorKind::Connection,
                    "the herd's lease watchdog is gone",
                )));
            };
            let mut leases = lock(&shared.leases);
            let Some(lease) = leases.map.get_mut(&self.id) else {
                return Err(BeatFailed::Lost);
            };
            lease.requested = true;
            let idle = lease.in_flight.is_none();
            drop(leases);
            if idle {
                shared.wake.notify_one();
            }
        }
        loop {
            tokio::select! {
                changed = beats.changed() => {
                    if changed.is_err() {
                        return Err(BeatFailed::Lost);
                    }
                    let (count, error) = beats.borrow_and_update().clone();
                    if count == seen {
                        continue;
                    }
                    if self.state.is_lost() {
                        return Err(BeatFailed::Lost);
                    }
                    return match error {
                        None => Ok(()),
                        Some(e) => Err(BeatFailed::Error(e)),
                    };
                }
                _ = standing.wait_for(|s| *s != Standing::Held) => return Err(BeatFailed::Lost),
            }
        }
    }

    /// Records a successful manual extension to `ttl` that was sent at `sent`. Returns
    /// `false` (and changes nothing) when the lease was already lost: a late extension
    /// does not bring it back.
    pub(crate) fn extended(&self, ttl: Duration, sent: Instant) -> bool {
        if self.state.is_lost() {
            self.state.mark_lost();
            return false;
        }
        let Some(shared) = self.shared.upgrade() else {
            self.state.set_deadline(local_deadline(sent, ttl));
            return true;
        };
        if let Some(lease) = lock(&shared.leases).map.get_mut(&self.id) {
            let mut deadline = local_deadline(sent, ttl);
            if let Some((due, renewing)) = lease.in_flight {
                // A renewal is out too and may run after this extension: the key expires
                // no earlier than the sooner of the two ends.
                deadline = deadline.min(local_deadline(due, renewing));
            }
            lease.ttl = ttl;
            lease.last_manual = Some(sent);
            lease.next_due = sent + period(ttl);
            self.state.set_deadline(deadline);
            self.state.fresh_until.store(
                nanos_since_epoch((sent + period(ttl)).min(deadline)),
                Ordering::Release,
            );
        }
        shared.wake.notify_one();
        true
    }
}

/// Resolves when the lease (if there is one) is lost; never without a lease. Shared by the
/// guards' `lost()` methods.
pub(crate) async fn lost(lease: Option<&LeaseHandle>) {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        self.state.end();
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.leases).map.remove(&self.id);
        }
    }
}

/// A cloneable, `'static` signal that one lease — a lock, a multi-lock, a semaphore
/// permit or a fan-out run — was lost, for a task of its own to watch.
///
/// Get one from [`LockGuard::lost_token`](crate::LockGuard::lost_token),
/// [`MultiGuard::lost_token`](crate::MultiGuard::lost_token),
/// [`Permit::lost_token`](crate::Permit::lost_token),
/// [`Completer::lost_token`](crate::Completer::lost_token), or inside a fan-out job or a
/// `once` closure from [`LostToken::current`]. Clones share one lease; a token keeps no connection, lock or
/// herd alive, and holding it does not keep the lease alive (its guard does).
///
/// A lease is *lost* when the watchdog found another holder (or none) at a renewal, or
/// when its local deadline passed before a renewal succeeded (the instant the last
/// successful acquisition or renewal was sent, plus the TTL, minus 1 % + 2 ms), which is
/// never later than the lease runs out on Redis. A lease its holder released (or whose
/// guard was dropped) while still held is *ended*, not lost: [`lost`](LostToken::lost)
/// then never resolves, and [`ended`](LostToken::ended) does. A release that finds the
/// lease already lost ([`LockLost`](crate::ErrorKind::LockLost)) marks the token lost.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), herdlock::Error> {
/// let herd = herdlock::Herd::memory();
/// let guard = herd.lock("report", std::time::Duration::from_secs(1)).await?;
/// let token = guard.lost_token();
/// let worker = tokio::spawn(async move {
///     tokio::select! {
///         () = token.lost() => "stopped: the lock was lost",
///         () = token.ended() => "done: the lock was released",
///     }
/// });
/// guard.release().await?;
/// assert_eq!(worker.await.expect("task ran"), "done: the lock was released");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LostToken {
    state: Arc<LeaseState>,
}

impl LostToken {
    /// Inside a fan-out job run by [`Herd::fanout`](crate::Herd::fanout) or
    /// [`Herd::fanout_with`](crate::Herd::fanout_with), the token of the run's lease; inside
    /// the closure of [`Herd::once`](crate::Herd::once) or
    /// [`Herd::run_locked`](crate::Herd::run_locked), the token of its lock; `None`
    /// anywhere else. It is read from the task polling the job: a task the job spawns does
    /// not inherit it, so take it first and move it in.
    ///
    /// The job or closure is cancelled when its lease is lost unless `cancel_on_lost` is off
    /// ([`FanoutOptions`](crate::FanoutOptions::cancel_on_lost),
    /// [`LockOptions`](crate::LockOptions::cancel_on_lost)); the token serves work that runs
    /// on with it off, or work handed to other tasks.
    pub fn current() -> Option<LostToken> {
        CURRENT_RUN.try_with(LostToken::clone).ok()
    }

    /// A token of no lease: already ended, never lost.
    pub(crate) fn ended_already() -> LostToken {
        let state = LeaseState::new(epoch(), epoch(), None);
        state.standing.send_replace(Standing::Ended);
        LostToken {
            state: Arc::new(state),
        }
    }

    /// A release found the lease lost (`LockLost`): it was lost while still held, even if
    /// the token already reads ended.
    pub(crate) fn found_lost_if<T>(&self, released: &crate::Result<T>) {
        if released.as_ref().is_err_and(crate::Error::is_lock_lost) {
            self.state.standing.send_if_modified(|standing| {
                let changed = *standing != Standing::Lost;
                if let (true, Some(held)) = (changed, &self.state.held) {
                    held.found_lost(); // counted released when it ended: a loss after all
                }
                *standing = Standing::Lost;
                changed
            });
        }
    }

    /// Whether the lease was lost while held (see the type's docs). `false` while it is
    /// held and after a release that found it held.
    pub fn is_lost(&self) -> bool {
        self.state.is_lost()
    }

    /// Whether the lease is over: lost, or given up by its holder.
    pub fn is_ended(&self) -> bool {
        *self.state.standing.borrow() != Standing::Held || self.state.is_lost()
    }

    /// Resolves when the lease is lost; never while it is held, and never after its holder
    /// released it (select on [`ended`](LostToken::ended) too for a task that must also
    /// stop then).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) {
        let mut standing = self.state.standing.subscribe();
        // The sender lives in `state`, which this token keeps: `wait_for` cannot fail.
        let _ = standing.wait_for(|s| *s == Standing::Lost).await;
        if !self.is_lost() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when the lease is over: lost, released, or its guard dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn ended(&self) {
        let mut standing = self.state.standing.subscribe();
        let _ = standing.wait_for(|s| *s != Standing::Held).await;
    }
}

tokio::task_local! {
    /// The lease token of the fan-out run whose job this task is polling.
    static CURRENT_RUN: LostToken;
}

/// Runs `job` with `token` as its [`LostToken::current`].
pub(crate) async fn with_run_token<F: std::future::Future>(token: LostToken, job: F) -> F::Output {
    CURRENT_RUN.scope(token, job).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_deadline_is_before_the_ttl_runs_out() {
        let sent = Instant::now();
        for ttl_ms in [1, 10, 100, 1_000, 2_000, 10_000, 3_600_000] {
            let ttl = Duration::from_millis(ttl_ms);
            let deadline = local_deadline(sent, ttl);
            assert!(deadline <= sent + ttl, "ttl {ttl:?}");
            assert!(deadline >= sent);
        }
        assert_eq!(
            local_deadline(sent, Duration::from_secs(10)),
            sent + Duration::from_millis(9_898)
        );
    }
}

#[cfg(test)]
mod overlap {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::keys::JobKeys;

    fn lease(dog: &Watchdog, ttl: Duration, sent: Instant) -> LeaseHandle {
        dog.register(
            Renewal::Lock {
                keys: JobKeys::new("t", "k"),
                token: "1:n".to_owned(),
            },
            LeaseTerms {
                ttl,
                sent,
                renew: false, // the test plays the thread's part itself
                max_hold: None,
                what: Primitive::Lock,
            },
        )
    }

    /// A manual extension to a shorter TTL sent while a renewal to the long TTL is out:
    /// whichever Redis ran last decides the expiry, so the deadline is the sooner end, and
    /// the renewal's reply, applied afterwards, does not move it later.
    #[test]
    fn an_extension_racing_a_renewal_keeps_the_sooner_end() {
        let dog = Watchdog::new(
            Backend::Memory(MemoryBackend::default()),
            Arc::default(),
            "t".to_owned(),
        );
        let t0 = Instant::now();
        let long = Duration::from_secs(30);
        let short = Duration::from_secs(1);
        let handle = lease(&dog, long, t0);
        let renewal_sent = t0 + Duration::from_secs(10);
        lock(&dog.shared.leases)
            .map
            .get_mut(&handle.id)
            .expect("registered")
            .in_flight = Some((renewal_sent, long));
        let extend_sent = renewal_sent + Duration::from_millis(4);
        assert!(handle.extended(short, extend_sent));
        assert_eq!(handle.deadline(), local_deadline(extend_sent, short));
        let late = apply(
            &mut lock(&dog.shared.leases),
            Renewed {
                id: handle.id,
                sent: renewal_sent,
                ttl: long,
                outcome: Ok(true),
            },
        );
        assert!(late.is_none(), "a renewal within its deadline is kept");
        assert_eq!(
            handle.deadline(),
            local_deadline(extend_sent, short),
            "the renewal's longer end must not win"
        );
    }

    /// A manual extension to a longer TTL while a renewal to the short TTL is out: if the
    /// renewal runs last on Redis, the key dies at the renewal's end, so that end is the
    /// deadline.
    #[test]
    fn an_extension_to_a_longer_ttl_waits_for_the_renewal_out() {
        let dog = Watchdog::new(
            Backend::Memory(MemoryBackend::default()),
            Arc::default(),
            "t".to_owned(),
        );
        let t0 = Instant::now();
        let short = Duration::from_secs(30);
        let handle = lease(&dog, short, t0);
        let renewal_sent = t0 + Duration::from_secs(10);
        lock(&dog.shared.leases)
            .map
            .get_mut(&handle.id)
            .expect("registered")
            .in_flight = Some((renewal_sent, short));
        let extend_sent = renewal_sent + Duration::from_millis(4);
        assert!(handle.extended(Duration::from_secs(300), extend_sent));
        assert_eq!(handle.deadline(), local_deadline(renewal_sent, short));
    }
}

/// The key (the first, for a multi-lock) and fence a lease's events name.
fn key_and_fence(renewal: &Renewal) -> (&str, Option<u64>) {
    let fence = |token: &str| token.split_once(':').and_then(|(f, _)| f.parse().ok());
    match renewal {
        Renewal::Lock { keys, token } => (&keys.key, fence(token)),
        Renewal::Multi { keys, tokens } => (
            keys.first().map_or("", |k| k.key.as_str()),
            tokens.first().and_then(|t| fence(t)),
        ),
        Renewal::Permit { keys, .. } => (&keys.key, None),
    }
}
