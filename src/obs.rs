//! Observability in one place: the `tracing` events and spans, the records made through
//! the `metrics` facade (crate feature `metrics`), and the counters behind
//! [`Herd::stats`](crate::Herd::stats). Every call site elsewhere is one line.
//!
//! Cheap when nobody listens: every event is at `debug` or `trace` level (the macros check
//! the level before they touch a field), fields are values the caller already has (keys as
//! `&str`, fences as integers, durations), and the metric records use static names and
//! static labels (`primitive` is one of four literals), so the facade builds no key at run
//! time; without a recorder installed, a record is a no-op. The counters of `Herd::stats`
//! are relaxed atomic increments.
//!
//! The metric names and what they count are in README.md, "Observability" (one table).
//! Events go to the `herdlock` target: `RUST_LOG=herdlock=debug` shows acquisitions,
//! contention, leads, follows, releases, losses and takeovers; `trace` adds waits, renewals
//! and publications.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::coalesce::{FlightOutcome, How};
use crate::herd::{FanoutStats, PrimitiveStats};
use crate::lock::Holder;
use crate::wait::Woken;

/// The primitive an event or a record belongs to (the `primitive` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Primitive {
    Lock = 0,
    Multi = 1,
    Semaphore = 2,
    Fanout = 3,
}

impl Primitive {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Primitive::Lock => "lock",
            Primitive::Multi => "multi",
            Primitive::Semaphore => "semaphore",
            Primitive::Fanout => "fanout",
        }
    }
}

/// Records one metric labelled by primitive, with literal names and labels only (so the
/// facade keeps its key in a `static`).
#[cfg(feature = "metrics")]
macro_rules! by_primitive {
    ($kind:ident, $p:expr, $name:literal) => {
        match $p {
            Primitive::Lock => metrics::$kind!($name, "primitive" => "lock"),
            Primitive::Multi => metrics::$kind!($name, "primitive" => "multi"),
            Primitive::Semaphore => metrics::$kind!($name, "primitive" => "semaphore"),
            Primitive::Fanout => metrics::$kind!($name, "primitive" => "fanout"),
        }
    };
}

/// Increments a counter labelled by primitive (no-op without the `metrics` feature).
macro_rules! count {
    ($p:expr, $name:literal) => {
        #[cfg(feature = "metrics")]
        by_primitive!(counter, $p, $name).increment(1);
    };
}

/// Records a duration in seconds into a histogram labelled by primitive.
macro_rules! observe {
    ($p:expr, $name:literal, $duration:expr) => {
        #[cfg(feature = "metrics")]
        by_primitive!(histogram, $p, $name).record($duration.as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = $duration;
    };
}

/// Cumulative counters of one primitive.
#[derive(Debug, Default)]
struct Counters {
    acquired: AtomicU64,
    busy: AtomicU64,
    timeouts: AtomicU64,
    lost: AtomicU64,
    released: AtomicU64,
    lost_notices: AtomicU64,
}

/// The counters behind `Herd::stats`, shared by a herd and its watchdog thread.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    per: [Counters; 4],
    led: AtomicU64,
    followed: AtomicU64,
    cached: AtomicU64,
    takeovers: AtomicU64,
    possible_misses: AtomicU64,
}

impl Stats {
    fn of(&self, p: Primitive) -> &Counters {
        &self.per[p as usize]
    }

    /// A snapshot of one primitive's counters.
    pub(crate) fn primitive(&self, p: Primitive) -> PrimitiveStats {
        let c = self.of(p);
        PrimitiveStats {
            acquired: c.acquired.load(Relaxed),
            busy: c.busy.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            lost: c.lost.load(Relaxed),
            released: c.released.load(Relaxed),
            lost_notices: c.lost_notices.load(Relaxed),
        }
    }

    /// A snapshot of the fan-out counters.
    pub(crate) fn fanout(&self) -> FanoutStats {
        FanoutStats {
            led: self.led.load(Relaxed),
            followed: self.followed.load(Relaxed),
            cached: self.cached.load(Relaxed),
            takeovers: self.takeovers.load(Relaxed),
            possible_misses: self.possible_misses.load(Relaxed),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

// ---------------------------------------------------------------------------------------
// Leases: every acquisition of every primitive registers one with the watchdog, so its
// acquisition, its end (released or lost) and its hold time are recorded there, once.

/// The record of one held lease: which primitive, since when, how it ended.
#[derive(Debug)]
pub(crate) struct Held {
    stats: Arc<Stats>,
    owner: Arc<str>,
    /// The key and fence its events name: kept only while `debug` events are on.
    named: Option<(Box<str>, Option<u64>)>,
    what: Primitive,
    since: Instant,
    /// `OPEN`, `RELEASED` or `LOST`.
    end: AtomicU8,
}

const OPEN: u8 = 0;
const RELEASED: u8 = 1;
const LOST: u8 = 2;

impl Held {
    /// Records an acquisition (`acquire` event) and starts its hold.
    pub(crate) fn acquired(
        stats: &Arc<Stats>,
        what: Primitive,
        since: Instant,
        owner: Arc<str>,
        key: &str,
        fence: Option<u64>,
    ) -> Held {
        bump(&stats.of(what).acquired);
        count!(what, "herdlock_acquired_total");
        tracing::debug!(target: "herdlock", primitive = what.name(), key, owner = &*owner, fence, "acquire");
        let named = tracing::enabled!(target: "herdlock", tracing::Level::DEBUG)
            .then(|| (Box::from(key), fence));
        Held {
            stats: Arc::clone(stats),
            owner,
            named,
            what,
            since,
            end: AtomicU8::new(OPEN),
        }
    }

    /// Records the end of the hold, once: `lost` (`lose` event) or released (`release`
    /// event, with the held duration). Later calls do nothing.
    pub(crate) fn end(&self, lost: bool) {
        let end = if lost { LOST } else { RELEASED };
        if self
            .end
            .compare_exchange(OPEN, end, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        let held = self.since.elapsed();
        let what = self.what;
        observe!(what, "herdlock_hold_seconds", held);
        if lost {
            self.lost(held);
        } else {
            bump(&self.stats.of(what).released);
            count!(what, "herdlock_released_total");
            let (key, fence) = self.named();
            tracing::debug!(target: "herdlock", primitive = what.name(), key, owner = &*self.owner, fence, ?held, "release");
        }
    }

    /// A hold recorded as released turned out lost (its release found another holder):
    /// moved to `lost` in `Herd::stats`; the metrics count it in both (counters only grow).
    pub(crate) fn found_lost(&self) {
        if self
            .end
            .compare_exchange(RELEASED, LOST, Relaxed, Relaxed)
            .is_ok()
        {
            self.stats.of(self.what).released.fetch_sub(1, Relaxed);
            self.lost(self.since.elapsed());
        }
    }

    fn lost(&self, held: Duration) {
        let what = self.what;
        bump(&self.stats.of(what).lost);
        count!(what, "herdlock_lost_total");
        let (key, fence) = self.named();
        tracing::debug!(target: "herdlock", primitive = what.name(), key, owner = &*self.owner, fence, ?held, "lose");
    }

    fn named(&self) -> (&str, Option<u64>) {
        self.named.as_ref().map_or(("", None), |(k, f)| (k, *f))
    }
}

/// A renewal succeeded (`renew` event).
pub(crate) fn renewed(key: &str, fence: Option<u64>, ttl: Duration) {
    tracing::trace!(target: "herdlock", key, fence, ?ttl, "renew");
}

// ---------------------------------------------------------------------------------------
// Contention and waiting.

/// An acquire attempt found the lock (or permits) held (`contend` event): the holder's
/// owner and fence when there is one holder.
pub(crate) fn contend<'h>(
    stats: &Stats,
    what: Primitive,
    key: &str,
    owner: &str,
    holder: impl Into<Contended<'h>>,
) {
    let Contended(holder, holder_fence) = holder.into();
    bump(&stats.of(what).busy);
    count!(what, "herdlock_busy_total");
    tracing::debug!(target: "herdlock", primitive = what.name(), key, owner, holder, holder_fence, "contend");
}

/// [`contend`] by `herd` (its counters and owner).
pub(crate) fn contend_on<'h>(
    herd: &crate::Herd,
    what: Primitive,
    key: &str,
    holder: impl Into<Contended<'h>>,
) {
    contend(herd.obs(), what, key, herd.owner(), holder);
}

/// A multi-lock attempt by `herd` found keys held: the first of them names the event.
pub(crate) fn contend_multi(herd: &crate::Herd, busy: &[crate::HeldKey]) {
    let first = busy.first();
    let key = first.map_or("", |h| h.key.as_str());
    contend_on(herd, Primitive::Multi, key, first.map(|h| &h.holder));
}

/// Who a contender found: the holder's owner and fence, when there is one holder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Contended<'h>(Option<&'h str>, Option<u64>);

impl<'h> From<&'h Holder> for Contended<'h> {
    fn from(holder: &'h Holder) -> Self {
        Contended(Some(&holder.owner), Some(holder.fence.get()))
    }
}

impl<'h> From<Option<&'h Holder>> for Contended<'h> {
    fn from(holder: Option<&'h Holder>) -> Self {
        holder.map_or(Contended(None, None), Contended::from)
    }
}

impl<'h> From<(&'h str, u64)> for Contended<'h> {
    fn from((owner, fence): (&'h str, u64)) -> Self {
        Contended(Some(owner), Some(fence))
    }
}

/// One waiting call (a lock, multi-lock or permit with a wait, a fan-out follower): the
/// wait time, the deadline, and the lost-message detector.
#[derive(Debug)]
pub(crate) struct Waiting<'a> {
    stats: &'a Stats,
    what: Primitive,
    key: &'a str,
    owner: &'a str,
    start: Instant,
    /// The last wake-up was the re-check timer, not a notice.
    by_timer: bool,
}

impl<'a> Waiting<'a> {
    pub(crate) fn start(herd: &'a crate::Herd, what: Primitive, key: &'a str) -> Self {
        Waiting {
            stats: herd.obs(),
            what,
            key,
            owner: herd.owner(),
            start: Instant::now(),
            by_timer: false,
        }
    }

    /// The caller goes to sleep until a notice or its re-check (`wait` event).
    pub(crate) fn sleeps(&self, holder_fence: Option<u64>, recheck_in: Option<Duration>) {
        tracing::trace!(target: "herdlock", primitive = self.what.name(), key = self.key, owner = self.owner, holder_fence, ?recheck_in, "wait");
    }

    /// Why the caller woke up.
    pub(crate) fn woke<T>(&mut self, woken: &Woken<T>) {
        self.by_timer = matches!(woken, Woken::Timer);
    }

    /// The re-check after this wake-up found what the caller waited for (a free lock, a
    /// permit, a run's result). Woken by the timer, not a notice: a notice was lost (or,
    /// for locks, the holder died without releasing).
    pub(crate) fn found(&mut self) {
        if std::mem::take(&mut self.by_timer) {
            bump(&self.stats.of(self.what).lost_notices);
            count!(self.what, "herdlock_lost_notices_total");
            tracing::debug!(target: "herdlock", primitive = self.what.name(), key = self.key, owner = self.owner, "re-check by timer found a change: a notice was lost");
        }
    }

    /// The call ended: on success its wait time is recorded (and a timer wake-up that led
    /// to it counted), a timeout is counted.
    pub(crate) fn finish<T>(&mut self, result: &crate::Result<T>) {
        let result = result.as_ref().map(drop);
        match result {
            Ok(()) => self.done(()),
            Err(e) if e.kind() == crate::ErrorKind::Timeout => self.timed_out(),
            Err(_) => {}
        }
    }

    /// The call got what it waited for (see [`finish`](Waiting::finish)).
    pub(crate) fn done<T>(&mut self, value: T) -> T {
        self.found();
        observe!(self.what, "herdlock_wait_seconds", self.start.elapsed());
        value
    }

    /// The call's deadline passed (see [`finish`](Waiting::finish)).
    pub(crate) fn timed_out(&self) {
        timed_out(
            self.stats,
            self.what,
            self.key,
            self.owner,
            self.start.elapsed(),
        );
    }
}

/// A call's deadline passed (lock, multi-lock, permit or fan-out wait).
pub(crate) fn timed_out(stats: &Stats, what: Primitive, key: &str, owner: &str, waited: Duration) {
    bump(&stats.of(what).timeouts);
    count!(what, "herdlock_timeouts_total");
    tracing::debug!(target: "herdlock", primitive = what.name(), key, owner, ?waited, "timeout");
}

// ---------------------------------------------------------------------------------------
// Fan-out.

/// A run starts although the previous run's stored result may have completed after the
/// newest caller called (within the clock bound's uncertainty): a possible coalescing miss
/// (`possible miss` event).
fn maybe_missed(stats: &Stats, key: &str, owner: &str, generation: u64) {
    bump(&stats.possible_misses);
    #[cfg(feature = "metrics")]
    metrics::counter!("herdlock_coalescing_misses_total").increment(1);
    tracing::debug!(target: "herdlock", primitive = "fanout", key, owner, generation, "possible miss");
}

/// This process leads run `generation` (`lead` event), after a possible coalescing miss
/// when `maybe_missed` (see [`maybe_missed`]).
pub(crate) fn lead(stats: &Stats, key: &str, owner: &str, (generation, maybe_missed): (u64, bool)) {
    if maybe_missed {
        self::maybe_missed(stats, key, owner, generation);
    }
    bump(&stats.led);
    #[cfg(feature = "metrics")]
    metrics::counter!("herdlock_runs_led_total").increment(1);
    tracing::debug!(target: "herdlock", primitive = "fanout", key, owner, generation, "lead");
}

/// A led run's job ended after `ran` (`ok`: successfully) and the run completed
/// (`complete`'s result: stored, published and released, or not): the job's duration is
/// recorded (`job done` event), and the `publish` event or a warning follows.
pub(crate) fn completed(
    key: &str,
    owner: &str,
    (generation, ran, ok): (u64, Duration, bool),
    completed: &crate::Result<bool>,
) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("herdlock_job_duration_seconds").record(ran.as_secs_f64());
    tracing::debug!(target: "herdlock", primitive = "fanout", key, owner, generation, ?ran, ok, "job done");
    match completed {
        Ok(true) => {
            tracing::trace!(target: "herdlock", primitive = "fanout", key, owner, generation, "publish");
        }
        Ok(false) => tracing::warn!(
            job = key,
            generation,
            "the run's lock was lost before it completed; its result was not published"
        ),
        Err(e) => tracing::warn!(job = key, error = %e, "publishing a run's result failed"),
    }
}

/// A flight found another run in progress (`contend`, with its holder) and follows it
/// (`follow` event).
pub(crate) fn follow(stats: &Stats, key: &str, owner: &str, holder: &str) {
    let (generation, holder) = match crate::backend::parse_holder(holder) {
        Ok((generation, holder)) => (Some(generation), Some(holder)),
        Err(_) => (None, None),
    };
    contend(
        stats,
        Primitive::Fanout,
        key,
        owner,
        Contended(holder, generation),
    );
    tracing::debug!(target: "herdlock", primitive = "fanout", key, owner, generation, "follow");
}

/// The leader of `generation` is gone without a result and a follower contends for the
/// next run (`takeover` event).
pub(crate) fn takeover(stats: &Stats, key: &str, owner: &str, generation: u64) {
    bump(&stats.takeovers);
    #[cfg(feature = "metrics")]
    metrics::counter!("herdlock_takeovers_total").increment(1);
    tracing::debug!(target: "herdlock", primitive = "fanout", key, owner, generation, "takeover");
}

/// A fan-out caller's wait for its flight (`started`: it started the flight) ended after
/// `waited` (passed through): a
/// timeout is counted; a result another run produced is counted as followed, with its
/// latency (from the call to the result); a cached one as a cache hit (`cached` event).
pub(crate) fn settled(
    herd: &crate::Herd,
    key: &str,
    outcome: crate::Result<Arc<FlightOutcome>>,
    started: bool,
    waited: Duration,
) -> crate::Result<Arc<FlightOutcome>> {
    let stats = herd.obs();
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            if e.kind() == crate::ErrorKind::Timeout {
                timed_out(stats, Primitive::Fanout, key, herd.owner(), waited);
            }
            return Err(e);
        }
    };
    match outcome.how {
        // The caller that started the flight led the run; the others followed it.
        How::Led if started => {}
        How::Led | How::Followed => {
            bump(&stats.followed);
            #[cfg(feature = "metrics")]
            {
                metrics::counter!("herdlock_results_followed_total").increment(1);
                metrics::histogram!("herdlock_follower_latency_seconds")
                    .record(waited.as_secs_f64());
            }
            tracing::trace!(target: "herdlock", primitive = "fanout", key, owner = herd.owner(), ?waited, "followed");
        }
        How::Cached => {
            bump(&stats.cached);
            #[cfg(feature = "metrics")]
            metrics::counter!("herdlock_cached_hits_total").increment(1);
            tracing::debug!(target: "herdlock", primitive = "fanout", key, owner = herd.owner(), "cached");
        }
    }
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// Pub/sub (no herd at hand: metrics and events only).

/// Waiters of `channels` channels were told to re-check (`resync` event): their notices
/// may have been lost (a reconnect, a re-subscription, a lagging receiver).
pub(crate) fn resync(channels: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("herdlock_resyncs_total").increment(channels as u64);
    tracing::debug!(target: "herdlock", channels, "resync");
}

/// A pub/sub connection came back (`reconnect` event): `why` says what happened.
pub(crate) fn reconnect(why: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("herdlock_pubsub_reconnects_total").increment(1);
    tracing::debug!(target: "herdlock", why, "reconnect");
}

/// The span of one fan-out flight (its task): events inside it carry the primitive, the
/// key and the owner (a disabled span costs one level check). Waits get no span of their
/// own: their events carry the same fields, and a span around a wait would make every
/// caller's future larger.
pub(crate) fn span(what: Primitive, key: &str, owner: &str) -> tracing::Span {
    tracing::debug_span!(target: "herdlock", "herdlock", primitive = what.name(), key, owner)
}
