//! Local single-flight and the fan-out protocol: one remote attempt per key per process.
//!
//! All concurrent callers of one job id in one process share one *flight*: a task the herd
//! owns, which talks to the backend on their behalf and publishes one outcome to all of
//! them through a `watch` channel. Callers only wait on that channel, each under its own
//! deadline, so a caller that times out or is dropped never affects the job or the others
//! (ARCHITECTURE.md invariants 3, 4 and 6).
//!
//! ## The protocol a flight follows (ARCHITECTURE.md invariant 1)
//!
//! 1. *Subscribe* to the job's channel and wait for the confirmation (no round trip when
//!    the channel is already subscribed), then *acquire* (one script): serve a fresh cached
//!    result if the caller asked for one, or a result that completed after the newest
//!    caller called; else take the lock with a fresh fence (the run's generation `g`,
//!    Redis `TIME` in µs); else report the holder of the running generation `g`.
//! 2. *Lead*: run the job (a panic becomes a "job panicked" outcome), keep the lease alive
//!    with a watchdog, then *complete* (one script): if still the holder, store the
//!    envelope tagged with `g` for a short linger, publish it, release the lock.
//! 3. *Follow*: when the subscription was confirmed before the acquire script saw run `g`
//!    in progress, that script was the check (no result of `g` can exist while `g` holds
//!    the lock) and the follower goes straight to waiting; when it was not (pub/sub down
//!    or not answering), the follower checks first. A notice is accepted directly
//!    only if it is a well-formed envelope of exactly generation `g` with the run's holder
//!    token; anything else, and the holder's lease running out, triggers a *check* (one
//!    script): a stored result of generation `>= g` is taken; a lock still held by run `g`
//!    means wait again; a lock held by another run means follow that one instead (a newer
//!    generation: `g` ended without a result; a lower or equal one with another token:
//!    Redis lost data and a replica with a slower clock took over, so `g` will never
//!    come); a free
//!    lock with no such result means the leader died or gave up (or Redis lost the run
//!    with its data), so go back to 1 and contend (one of the waiters becomes the next
//!    leader, unless the acquire serves a result of a run that completed after the newest
//!    caller called). Waiting uses the one wait helper (`wait.rs`).

use std::any::TypeId;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::gate::{shutting_down, InFlight, Stage};
use crate::backend::{
    holder_token, parse_holder, AcquireReply, Backend, FanoutReply, ResultAges, Subscription,
};
use crate::codec::{self, Body, Envelope, Status};
use crate::error::{Error, ErrorKind, Result};
use crate::herd::{nonce, Herd};
use crate::keys::JobKeys;
use crate::obs::{self, Primitive};
use crate::wait::{self, Hint, Until, Woken};
use crate::watchdog::{self, LeaseHandle, LeaseTerms, LostToken, Renewal};

/// A job, type-erased: it runs and encodes its own result.
pub(crate) type JobFn = Box<dyn FnOnce() -> BoxFuture<'static, Body> + Send>;

/// How a flight obtained its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// This process ran the job.
    Led,
    /// Another process ran it (or another local caller's flight did).
    Followed,
    /// A cached result was served.
    Cached,
}

/// What every caller of a flight receives.
#[derive(Debug, Clone)]
pub(crate) struct FlightOutcome {
    pub(crate) result: Result<Arc<Envelope>>,
    pub(crate) how: How,
}

type Slot = watch::Sender<Option<Arc<FlightOutcome>>>;
pub(crate) type Waiter = watch::Receiver<Option<Arc<FlightOutcome>>>;

/// Settings of one run, taken from the options of the caller that started the flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunSettings {
    pub(crate) ttl: Duration,
    pub(crate) linger: Duration,
    pub(crate) cache_age: Option<Duration>,
    pub(crate) max_duration: Option<Duration>,
    pub(crate) cancel_on_lost: bool,
    /// Cancel the job when no caller anywhere waits for it any more.
    pub(crate) cancel_when_abandoned: bool,
}

/// What a flight does when it wins the lock.
pub(crate) enum Mode {
    /// Run this job.
    Run(JobFn),
    /// Hand a completer to the pusher (`Some` body sender and the run's lease token), or
    /// tell it it follows (`None`). Push flights cannot take over a dead leader: they have
    /// no job.
    Push(Option<oneshot::Sender<Option<Lead>>>),
}

/// What a pusher that leads gets: where to send the body, and the run's lease token.
pub(crate) type Lead = (oneshot::Sender<Body>, LostToken);

/// When the newest caller of a flight called (it joined or started the flight then).
type Joined = Arc<Mutex<Instant>>;

/// One flight in the map.
#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    /// The result type of the callers (one job id has one result type).
    result_type: TypeId,
    type_name: &'static str,
    joined: Joined,
}

/// The result type a caller asks a flight for (its `TypeId` and name, for errors).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResultType {
    id: TypeId,
    name: &'static str,
}

impl ResultType {
    pub(crate) fn of<T: 'static>() -> ResultType {
        ResultType {
            id: TypeId::of::<T>(),
            name: std::any::type_name::<T>(),
        }
    }
}

/// The flights of one herd, by job id.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    /// Invariant: an entry exists exactly while its flight task has not yet published an
    /// outcome or retired; joining (subscribing) and retiring both happen under this lock,
    /// so a caller never joins a flight that has already given up.
    map: Mutex<HashMap<String, Entry>>,
    /// Flights currently subscribed and waiting for another node's run (a gauge).
    following: AtomicUsize,
    /// Runs this process leads right now (a gauge), and a wake-up when one ends.
    leading: InFlight,
}

impl Flights {
    /// Flights in progress (each serves every local caller of one job id).
    pub(crate) fn in_flight(&self) -> usize {
        self.map().len()
    }

    /// Callers waiting on any flight.
    pub(crate) fn waiting(&self) -> usize {
        self.map().values().map(|e| e.slot.receiver_count()).sum()
    }

    /// Flights subscribed and waiting for another node's run.
    pub(crate) fn following(&self) -> usize {
        self.following.load(Ordering::SeqCst)
    }

    /// Runs this process leads right now.
    pub(crate) fn leading(&self) -> usize {
        self.leading.count()
    }

    /// Resolves once this process leads no run (at once if it leads none).
    pub(crate) async fn none_leading(&self) {
        self.leading.none().await;
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes the flight if it is still the registered one for `id`.
    fn remove(&self, id: &str, slot: &Arc<Slot>) {
        let mut map = self.map();
        if map.get(id).is_some_and(|e| Arc::ptr_eq(&e.slot, slot)) {
            map.remove(id);
        }
    }

    /// Retires the flight (it got its outcome) unless a caller joined after `since`:
    /// checked and removed under the map lock, so no caller joins in between. `false`: a
    /// caller joined (it may have called after the outcome was produced).
    fn retire_unless_joined(
        &self,
        id: &str,
        slot: &Arc<Slot>,
        joined: &Mutex<Instant>,
        since: Instant,
    ) -> bool {
        let mut map = self.map();
        if *lock_joined(joined) > since {
            return false;
        }
        if map.get(id).is_some_and(|e| Arc::ptr_eq(&e.slot, slot)) {
            map.remove(id);
        }
        true
    }

    /// Retires a following flight whose callers are all gone; `false` if a new caller
    /// joined meanwhile (the flight must keep going).
    fn retire(&self, id: &str, slot: &Arc<Slot>) -> bool {
        let mut map = self.map();
        if slot.receiver_count() > 0 {
            return false;
        }
        if map.get(id).is_some_and(|e| Arc::ptr_eq(&e.slot, slot)) {
            map.remove(id);
        }
        true
    }
}

/// Joins the flight for `keys`, or starts one with `mode`. Returns the waiter and whether
/// this call started the flight (when it joined, `mode` is dropped unused).
///
/// # Errors
///
/// [`InvalidInput`](ErrorKind::InvalidInput) when the job id is in flight in this process
/// for another result type: one job id names one job, with one result type.
pub(crate) fn join_or_start(
    herd: &Herd,
    keys: &JobKeys,
    result_type: ResultType,
    settings: RunSettings,
    mode: Mode,
) -> Result<(Waiter, bool)> {
    herd.backend().gate().admit_acquire("a fan-out call")?;
    let flights = &herd.inner.flights;
    let mut map = flights.map();
    let now = Instant::now();
    if let Some(entry) = map.get(&keys.key) {
        if entry.result_type != result_type.id {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "job `{}` is in flight for result type `{}`; this call asks for `{}` \
                     (one job id has one result type: give each type its own id)",
                    keys.key, entry.type_name, result_type.name
                ),
            ));
        }
        *lock_joined(&entry.joined) = now;
        return Ok((entry.slot.subscribe(), false));
    }
    let (tx, rx) = watch::channel(None);
    let slot = Arc::new(tx);
    let joined = Arc::new(Mutex::new(now));
    map.insert(
        keys.key.clone(),
        Entry {
            slot: Arc::clone(&slot),
            result_type: result_type.id,
            type_name: result_type.name,
            joined: Arc::clone(&joined),
        },
    );
    drop(map);
    let span = obs::span(Primitive::Fanout, &keys.key, herd.owner());
    tokio::spawn(fly(herd.clone(), keys.clone(), slot, joined, settings, mode).instrument(span));
    Ok((rx, true))
}

fn lock_joined(joined: &Mutex<Instant>) -> MutexGuard<'_, Instant> {
    joined
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits for a flight's outcome until `deadline`.
pub(crate) async fn wait(
    mut waiter: Waiter,
    deadline: Instant,
    timed_out: impl FnOnce() -> Error,
) -> Result<Arc<FlightOutcome>> {
    match tokio::time::timeout_at(deadline, waiter.wait_for(Option::is_some)).await {
        Err(_) => Err(timed_out()),
        Ok(Ok(outcome)) => match outcome.as_ref() {
            Some(outcome) => Ok(Arc::clone(outcome)),
            None => Err(abandoned("the run ended without an outcome")),
        },
        // The flight task is gone without publishing: the runtime is shutting down.
        Ok(Err(_)) => Err(abandoned("the run was stopped (runtime shutting down)")),
    }
}

fn abandoned(why: &str) -> Error {
    Error::new(ErrorKind::Abandoned, why)
}

/// The flight task. A panic anywhere in it (say, a job whose `Drop` panics while it is
/// being cancelled) still retires the flight and tells its callers, so the job id is never
/// left to a dead flight.
async fn fly(
    herd: Herd,
    keys: JobKeys,
    slot: Arc<Slot>,
    joined: Joined,
    settings: RunSettings,
    mode: Mode,
) {
    let outcome = AssertUnwindSafe(drive(&herd, &keys, &slot, &joined, settings, mode))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            Some(FlightOutcome {
                result: Err(Error::new(
                    ErrorKind::JobPanicked,
                    format!(
                        "the run of job `{}` panicked while it was stopped or cleaned up",
                        keys.key
                    ),
                )),
                how: How::Led,
            })
        });
    herd.inner.flights.remove(&keys.key, &slot);
    if let Some(outcome) = outcome {
        slot.send_replace(Some(Arc::new(outcome)));
    }
}

/// Runs the protocol; `None` when every caller left while following.
// One loop of the protocol's steps, each arm a few lines: splitting it would scatter the
// state machine that the module docs describe in order.
#[allow(clippy::too_many_lines)]
async fn drive(
    herd: &Herd,
    keys: &JobKeys,
    slot: &Arc<Slot>,
    joined: &Mutex<Instant>,
    settings: RunSettings,
    mut mode: Mode,
) -> Option<FlightOutcome> {
    let backend = herd.backend();
    let fail = |e: Error| {
        Some(FlightOutcome {
            result: Err(e),
            how: How::Followed,
        })
    };
    loop {
        // Subscribe before trying: if the run turns out to be another node's, the
        // subscription was confirmed before the acquire script saw it running, so its
        // completion cannot slip past unseen and no separate check is needed. (A leader
        // pays one subscription it does not use; a hot key's channel stays subscribed.)
        let sub = match backend.subscribe(keys).await {
            Ok(sub) => sub,
            Err(e) => return fail(e),
        };
        let sent = std::time::Instant::now();
        // A run that completed after the newest caller called is everyone's: serving its
        // stored result is no coalescing miss, and needs no extra round trip.
        let newest_call = *lock_joined(joined);
        let ages = ResultAges {
            cache_age: settings.cache_age,
            newest_call,
        };
        let reply = backend
            .fanout_acquire(keys, &nonce(), herd.owner(), settings.ttl, ages)
            .await;
        let (holder, pttl_ms) = match reply {
            Err(e) => return fail(e),
            Ok(FanoutReply::Fresh { envelope }) => {
                // A caller that joined while the request was out may have called after
                // that run completed: it must not get it. Try again for everyone then.
                // Checked and retired under the flights lock, so nobody joins in between.
                if !herd
                    .inner
                    .flights
                    .retire_unless_joined(&keys.key, slot, joined, newest_call)
                {
                    continue;
                }
                drop(sub);
                tell_follower(&mut mode);
                return Some(FlightOutcome {
                    result: decode_stored(&keys.key, &envelope).map(Arc::new),
                    how: How::Followed,
                });
            }
            Ok(FanoutReply::Cached { envelope }) => {
                drop(sub);
                tell_follower(&mut mode);
                return Some(FlightOutcome {
                    result: decode_stored(&keys.key, &envelope).map(Arc::new),
                    how: How::Cached,
                });
            }
            Ok(FanoutReply::Lock(AcquireReply::Acquired {
                token,
                fence,
                maybe_missed,
            })) => {
                obs::lead(herd.obs(), &keys.key, herd.owner(), (fence, maybe_missed));
                drop(sub);
                let run = Led { token, fence, sent };
                return Some(lead(herd, keys, slot, settings, mode, run).await);
            }
            Ok(FanoutReply::Lock(AcquireReply::Busy { holder, pttl_ms })) => (holder, pttl_ms),
        };
        tell_follower(&mut mode);
        let (generation, token) = match (parse_holder(&holder), holder_token(&holder)) {
            (Ok((generation, _)), Some(token)) => (generation, token.to_owned()),
            (Err(e), _) => return fail(e),
            (Ok(_), None) => return fail(Error::new(ErrorKind::Redis, "malformed holder value")),
        };
        obs::follow(herd.obs(), &keys.key, herd.owner(), &holder);
        let run = Run {
            generation,
            token,
            pttl_ms,
        };
        let mut seen = obs::Waiting::start(herd, Primitive::Fanout, &keys.key);
        match follow(
            backend,
            keys,
            slot,
            &herd.inner.flights,
            sub,
            run,
            &mut seen,
        )
        .await
        {
            Followed::Done(result) => {
                return Some(FlightOutcome {
                    result,
                    how: How::Followed,
                })
            }
            Followed::NoCallers => return None,
            Followed::Vacant => {
                if matches!(mode, Mode::Push(_)) {
                    return fail(abandoned(&format!(
                        "the leader of job `{}` died or gave up before completing it",
                        keys.key
                    )));
                }
                obs::takeover(herd.obs(), &keys.key, herd.owner(), generation);
            }
        }
    }
}

/// Tells a pusher that it follows (no-op for run flights or once told).
fn tell_follower(mode: &mut Mode) {
    if let Mode::Push(role) = mode {
        if let Some(role) = role.take() {
            let _ = role.send(None);
        }
    }
}

fn decode_stored(job: &str, bytes: &[u8]) -> Result<Envelope> {
    Envelope::decode(bytes).map_err(|e| {
        Error::with_source(
            ErrorKind::Codec,
            format!("the result stored for job `{job}` is malformed"),
            e,
        )
    })
}

/// The run a flight won: its holder token, fence, and when its acquisition was sent.
struct Led {
    token: String,
    fence: u64,
    sent: std::time::Instant,
}

/// Leads run `fence`: runs the job (or waits for the pusher's completion), then completes.
/// The herd's watchdog thread keeps the lease alive meanwhile; if it reports the lease
/// lost, the job is cancelled (unless the options say otherwise) and nothing is published.
async fn lead(
    herd: &Herd,
    keys: &JobKeys,
    slot: &Arc<Slot>,
    settings: RunSettings,
    mode: Mode,
    run: Led,
) -> FlightOutcome {
    let Led { token, fence, sent } = run;
    let backend = herd.backend();
    let flights = &herd.inner.flights;
    flights.leading.begin();
    let _leading = Leading(flights);
    let closed = backend.gate().reached(Stage::Closed);
    let lease = herd.inner.watchdog.register(
        Renewal::Lock {
            keys: keys.clone(),
            token: token.clone(),
        },
        LeaseTerms {
            ttl: settings.ttl,
            sent,
            renew: true,
            max_hold: None,
            what: Primitive::Fanout,
        },
    );
    let lost_outcome = || FlightOutcome {
        result: Err(Error::new(
            ErrorKind::LockLost,
            format!(
                "the run of job `{}` lost its lock (another holder took over); it was cancelled",
                keys.key
            ),
        )),
        how: How::Led,
    };
    let body = match mode {
        Mode::Run(job) => {
            let run = watchdog::with_run_token(lease.token(), run_job(job, settings.max_duration));
            let cancelled = tokio::select! {
                // A finished job wins over a loss or a shutdown noticed at the same time:
                // its completion script still checks the lock, and publishes nothing if lost.
                biased;
                body = run => Ok(body),
                () = lease.lost(), if settings.cancel_on_lost => return lost_outcome(),
                () = abandoned_by_all(herd, keys, slot), if settings.cancel_when_abandoned => {
                    tracing::debug!(job = %keys.key, generation = fence, "no caller waits for the run any more; cancelled");
                    Err(abandoned(&format!(
                        "no caller waited for the run of job `{}` any more; it was cancelled",
                        keys.key
                    )))
                }
                () = closed => Err(shutting_down(&format!(
                    "the run of job `{}` (still running when the shutdown's grace ended; it was cancelled)",
                    keys.key
                ))),
            };
            match cancelled {
                Ok(body) => body,
                Err(e) => return give_up(backend, keys, &token, lease, e).await,
            }
        }
        Mode::Push(role) => {
            let (done_tx, done_rx) = oneshot::channel();
            let handed = role.is_some_and(|role| role.send(Some((done_tx, lease.token()))).is_ok());
            let body = if handed {
                let completion = await_completion(done_rx, settings.max_duration);
                tokio::select! {
                    // A completion handed over wins (see above).
                    biased;
                    body = completion => body.ok_or(None),
                    () = lease.lost(), if settings.cancel_on_lost => return lost_outcome(),
                    () = closed => Err(Some(shutting_down(&format!(
                        "the push run of job `{}` (not completed when the shutdown's grace ended)",
                        keys.key
                    )))),
                }
            } else {
                Err(None)
            };
            match body {
                Ok(body) => body,
                Err(e) => {
                    let e = e.unwrap_or_else(|| {
                        abandoned(&format!(
                            "the leader of job `{}` dropped its completer without completing",
                            keys.key
                        ))
                    });
                    return give_up(backend, keys, &token, lease, e).await;
                }
            }
        }
    };
    drop(lease);
    let ran = sent.elapsed();
    // From here on a new caller starts a flight of its own instead of joining this one:
    // it then follows this run while its lock is held, or gets its result if it completed
    // after the call — never a result that completed before it called.
    herd.inner.flights.remove(&keys.key, slot);
    let bytes = Envelope::encode(fence, &token, &body);
    let ok = body.status == Status::Ok;
    let completed = complete(backend, keys, (&token, fence), &bytes, ok, settings.linger).await;
    obs::completed(&keys.key, herd.owner(), (fence, ran, ok), &completed);
    FlightOutcome {
        result: decode_stored(&keys.key, &bytes).map(Arc::new),
        how: How::Led,
    }
}

/// Gives a led run up without a result: stops its lease, releases its lock at once (so
/// remote waiters contend again without waiting out the TTL) and reports `error` to the
/// local callers.
async fn give_up(
    backend: &Backend,
    keys: &JobKeys,
    token: &str,
    lease: LeaseHandle,
    error: Error,
) -> FlightOutcome {
    drop(lease);
    if let Err(e) = backend.release(keys, token, Duration::ZERO).await {
        tracing::warn!(job = %keys.key, error = %e, "releasing a run given up failed");
    }
    FlightOutcome {
        result: Err(error),
        how: How::Led,
    }
}

/// Decrements the leading gauge and wakes [`Flights::none_leading`] on every exit path.
struct Leading<'a>(&'a Flights);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.leading.end();
    }
}

/// Resolves once nobody waits for the run any more: this process's callers are all gone
/// (and the flight retired, so none can join) and no other process is subscribed to the
/// job's channel. Pending forever when the subscriber count cannot be had (a missing
/// permission): an unanswerable question never cancels a job.
async fn abandoned_by_all(herd: &Herd, keys: &JobKeys, slot: &Arc<Slot>) {
    let backend = herd.backend();
    loop {
        slot.closed().await;
        loop {
            if slot.receiver_count() > 0 {
                break; // a local caller joined: wait for it to leave
            }
            match backend.subscribers(keys).await {
                Ok(0) => {
                    if herd.inner.flights.retire(&keys.key, slot) {
                        return;
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Permission || e.kind() == ErrorKind::Redis => {
                    tracing::warn!(
                        job = %keys.key,
                        error = %e,
                        "cannot count the run's waiters (PUBSUB NUMSUB refused); it will not be cancelled when abandoned"
                    );
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::debug!(job = %keys.key, error = %e, "counting the run's waiters failed; trying again");
                }
            }
            tokio::time::sleep(crate::fanout::ABANDON_CHECK_EVERY).await;
        }
    }
}

/// Stores and publishes a run's envelope and releases its lock (`complete.lua`), retried
/// through a dropped connection within the command timeout like a release: a repeat that
/// finds the lock gone but this run's result stored did complete. `false`: the run no
/// longer held its lock (nothing was written).
async fn complete(
    backend: &Backend,
    keys: &JobKeys,
    (token, fence): (&str, u64),
    bytes: &[u8],
    ok: bool,
    linger: Duration,
) -> Result<bool> {
    let reply = backend
        .retry_release("complete", || {
            backend.complete(keys, token, bytes, ok, linger)
        })
        .await?;
    if reply.value || !reply.after_error {
        return Ok(reply.value);
    }
    let check = backend.fanout_check(keys).await?;
    Ok(check
        .envelope
        .is_some_and(|stored| Envelope::decode(&stored).is_ok_and(|env| env.generation == fence)))
}

/// Runs the job, catching a panic and reporting it, never propagating it. The job runs
/// inside the flight task (which the herd owns), so no extra task is spawned per run;
/// dropping this future (lease lost, maximum duration) cancels the job.
async fn run_job(job: JobFn, max_duration: Option<Duration>) -> Body {
    let run = AssertUnwindSafe(job()).catch_unwind();
    let caught = match max_duration {
        None => run.await,
        Some(limit) => {
            if let Ok(caught) = tokio::time::timeout(limit, run).await {
                caught
            } else {
                return codec::failure(
                    Status::TimedOut,
                    &format!("ran longer than its maximum duration of {limit:?}"),
                );
            }
        }
    };
    caught.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string panic payload)".to_owned());
        codec::failure(Status::JobPanicked, &message)
    })
}

async fn await_completion(
    done: oneshot::Receiver<Body>,
    max_duration: Option<Duration>,
) -> Option<Body> {
    match max_duration {
        None => done.await.ok(),
        Some(limit) => match tokio::time::timeout(limit, done).await {
            Ok(body) => body.ok(),
            Err(_) => Some(codec::failure(
                Status::TimedOut,
                &format!("was not completed within its maximum duration of {limit:?}"),
            )),
        },
    }
}

/// Decrements a gauge on every exit path.
struct Gauge<'a>(&'a AtomicUsize);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Followed {
    Done(Result<Arc<Envelope>>),
    Vacant,
    NoCallers,
}

/// The run a follower waits for: its generation, holder token and remaining lease.
struct Run {
    generation: u64,
    token: String,
    pttl_ms: i64,
}

/// Waits for `run` (or the run that replaced it) to finish. If `sub` was confirmed before
/// `run` was seen in progress, the first wait needs no check of Redis.
///
/// A check that finds another holder than the one waited for follows that holder's run
/// instead: a newer generation means the awaited run ended without a stored result; a
/// lower (or equal) one means Redis lost data (FLUSHALL, a restart without persistence, a
/// failover that lost writes, to a replica whose clock is behind) and the awaited
/// generation will never come.
async fn follow(
    backend: &Backend,
    keys: &JobKeys,
    slot: &Arc<Slot>,
    flights: &Flights,
    mut sub: Subscription,
    run: Run,
    seen: &mut obs::Waiting<'_>,
) -> Followed {
    let Run {
        mut generation,
        mut token,
        mut pttl_ms,
    } = run;
    flights.following.fetch_add(1, Ordering::SeqCst);
    let _gauge = Gauge(&flights.following);
    // Without a confirmed subscription (pub/sub down or slow), check first, as a waiter
    // that subscribed late would.
    let mut checked = sub.confirmed();
    loop {
        if !checked {
            // Subscribed (confirmed) before this check: a completion after it is delivered.
            let check = match backend.fanout_check(keys).await {
                Ok(check) => check,
                Err(e) => return Followed::Done(Err(e)),
            };
            if let Some(bytes) = check.envelope {
                match decode_stored(&keys.key, &bytes) {
                    Ok(env) if env.generation >= generation => {
                        seen.found();
                        return Followed::Done(Ok(Arc::new(env)));
                    }
                    // An earlier run's result, or, after data loss, a later run's under a
                    // lower generation: the acquire after `Vacant` serves the latter.
                    Ok(_) => {}
                    Err(e) => return Followed::Done(Err(e)),
                }
            }
            let Some(holder) = check.holder else {
                return Followed::Vacant;
            };
            if holder_token(&holder) != Some(token.as_str()) {
                if let (Ok((g, _)), Some(t)) = (parse_holder(&holder), holder_token(&holder)) {
                    // Another run holds the lock now (see above): follow it.
                    tracing::debug!(job = %keys.key, from = generation, to = g, "following the run that replaced the awaited one");
                    generation = g;
                    t.clone_into(&mut token);
                }
            }
            pttl_ms = check.pttl_ms;
        }
        checked = false;
        let until = Until::lease(wait::remaining(pttl_ms));
        seen.sleeps(Some(generation), wait::remaining(pttl_ms));
        let woken = loop {
            let hint = |bytes: &[u8]| match Envelope::decode(bytes) {
                Ok(env) if env.generation == generation && env.token == token => Hint::Done(env),
                // Anything else is only a hint: re-check the state.
                _ => Hint::Recheck,
            };
            tokio::select! {
                woken = wait::wait(std::slice::from_mut(&mut sub), until, hint) => break woken,
                () = slot.closed() => {
                    if flights.retire(&keys.key, slot) {
                        return Followed::NoCallers;
                    }
                }
            }
        };
        seen.woke(&woken);
        if let Woken::Done(env) = woken {
            return Followed::Done(Ok(Arc::new(env)));
        }
    }
}
