//! Where Redis's clock stands relative to this process's: an upper bound on the Redis
//! time of a local instant, learnt from the replies that carry Redis `TIME`.
//!
//! A reply that carries Redis time `R`, to a request sent at local instant `s` and answered
//! at `r`, says Redis read `R` at some local instant in `[s, r]`. So the Redis time of a
//! later local instant `x` is at most `R + (x - s)`, and of an earlier one at most
//! `R - (s - x)`, give or take the clocks' rate difference over `|x - s|`, which herdlock
//! bounds by [`DRIFT_PPM`]. The bound is loose by the round trip `r - s` plus that drift:
//! the sample kept is the one that makes it tightest, so a quiet moment's fast round trip
//! serves a busy moment's calls. Used to tell, without a round trip, whether a fan-out
//! run completed after a caller called (no coalescing misses, no stale results).
//!
//! Samples belong to a *generation* of the backend's target: a Sentinel failover moves the
//! commands to another server, whose clock may read anything. A newer generation drops the
//! samples of older ones ([`RedisClock::reset`]), and a sample of an older one is ignored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The clock-rate difference between this host and the Redis host that the bound allows
/// for, in parts per million: the most NTP slews a clock (500 ppm).
pub(crate) const DRIFT_PPM: u64 = 500;

#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: Instant,
    rtt: Duration,
    /// Redis `TIME` in µs.
    redis_us: u64,
}

impl Sample {
    /// How loose the bound from this sample is at `x`.
    fn slack(&self, x: Instant) -> Duration {
        let gap = if x >= self.sent {
            x - self.sent
        } else {
            self.sent - x
        };
        self.rtt + drift(gap)
    }
}

pub(crate) fn drift(gap: Duration) -> Duration {
    // Rounded up to the next µs so that the bound stays an upper bound.
    let nanos = gap.as_nanos() * u128::from(DRIFT_PPM) / 1_000_000;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)) + Duration::from_micros(1)
}

/// The best sample so far of one server's clock.
///
/// Samples come from the fan-out replies and, while fan-out is in use, from a `TIME` probe
/// every [`PROBE_EVERY`] on a thread and connection of its own: under load every reply
/// waits in queues (the runtime's, the connection's), and a probe that is not queued
/// behind the load keeps the bound tight.
#[derive(Debug, Default)]
pub(crate) struct RedisClock {
    state: Mutex<State>,
    /// When fan-out last asked for the bound (ns since `probe_epoch`), 0: never.
    wanted: AtomicU64,
    /// Whether the probe thread runs.
    probing: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// The target generation the samples come from.
    generation: u64,
    best: Option<Sample>,
}

/// Where the probe thread connects: the current server's client and the target
/// generation it belongs to, read again on every round; `None` once the backend is gone.
pub(crate) type ClientSource = Box<dyn Fn() -> Option<(redis::Client, u64)> + Send>;

/// How often the probe thread samples the clock while fan-out is in use.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(100);
/// The probe thread ends after this long without fan-out.
const PROBE_IDLE: Duration = Duration::from_secs(10);

fn probe_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch() -> u64 {
    u64::try_from(probe_epoch().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl RedisClock {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops every sample: the next bound needs a new one.
    pub(crate) fn reset(&self) {
        self.state().best = None;
    }

    /// Moves to target `generation` if it is newer than the samples' (a Sentinel
    /// failover): their server is no longer the one commands go to, so they are dropped.
    pub(crate) fn follow(&self, generation: u64) {
        let mut state = self.state();
        if generation > state.generation {
            state.generation = generation;
            drop(state);
            self.reset();
        }
    }

    /// Records a reply carrying Redis time `redis_us`, to a request sent at `sent` and
    /// answered at `received`, from the server of target `generation`.
    pub(crate) fn sample(&self, generation: u64, sent: Instant, received: Instant, redis_us: u64) {
        self.follow(generation);
        let new = Sample {
            sent,
            rtt: received.saturating_duration_since(sent),
            redis_us,
        };
        let mut state = self.state();
        if generation < state.generation {
            return; // a server commands no longer go to
        }
        let best = &mut state.best;
        // Keep whichever bounds the present more tightly; drop the old one outright when
        // it is stale, or when Redis's clock now reads later than it allowed for (another
        // server after a reconnect, or a clock step): a bound must never be too low.
        let keep_old = best.is_some_and(|b| {
            received.saturating_duration_since(b.sent) <= MAX_SAMPLE_AGE
                && bound(b, received) >= redis_us
                && b.slack(received) < new.slack(received)
        });
        if !keep_old {
            *best = Some(new);
        }
    }

    /// Notes that fan-out needs the bound, and starts the probe thread if it is not
    /// running. The thread connects to the client `source` names, and again when the
    /// generation it names changes (a Sentinel failover).
    pub(crate) fn wanted(
        self: &Arc<Self>,
        source: impl FnOnce() -> ClientSource,
        timeout: Duration,
    ) {
        self.wanted.store(since_epoch(), Ordering::Relaxed);
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let clock = Arc::downgrade(self);
        let source = source();
        let spawned = std::thread::Builder::new()
            .name("herdlock-clock".to_owned())
            .spawn(move || probe_loop(&clock, &source, timeout));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "the clock probe thread could not be started");
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Whether a reply carrying Redis time `redis_us`, to a request sent at `sent`, reads
    /// earlier than the kept sample allows: another server's clock (a Redis Cluster slot
    /// that moved to another master) or a clock stepped back. A bound from the kept sample
    /// may then be too low for the server that answered.
    pub(crate) fn contradicts(&self, sent: Instant, redis_us: u64) -> bool {
        let Some(best) = self.state().best else {
            return false;
        };
        // The server read `best.redis_us` at some instant in [best.sent, best.sent + rtt],
        // and the reply at some instant after `sent`: at least this much later.
        i128::from(redis_us) < lowest(best, sent)
    }

    /// A lower bound on Redis's clock (µs) at local instant `x`, if a recent sample is
    /// known: the sample's reading may have been taken as late as the end of its round
    /// trip.
    pub(crate) fn lower_bound_us(&self, x: Instant) -> Option<u64> {
        let best = self.state().best?;
        if x.saturating_duration_since(best.sent) > MAX_SAMPLE_AGE {
            return None;
        }
        u64::try_from(lowest(best, x).max(0)).ok()
    }

    /// An upper bound on Redis's clock (µs) at local instant `x`, if a recent sample is
    /// known.
    pub(crate) fn upper_bound_us(&self, x: Instant) -> Option<u64> {
        let best = self.state().best?;
        (x.saturating_duration_since(best.sent) <= MAX_SAMPLE_AGE).then(|| bound(best, x))
    }
}

/// Samples Redis's clock every [`PROBE_EVERY`] with a blocking `TIME` on a connection of
/// its own, while fan-out asked for the bound within [`PROBE_IDLE`] and the backend lives.
fn probe_loop(clock: &Weak<RedisClock>, source: &ClientSource, timeout: Duration) {
    let mut conn: Option<(u64, redis::Connection)> = None;
    loop {
        std::thread::sleep(PROBE_EVERY);
        let Some(clock) = clock.upgrade() else { return };
        let idle = Duration::from_nanos(
            since_epoch().saturating_sub(clock.wanted.load(Ordering::Relaxed)),
        );
        if idle > PROBE_IDLE {
            clock.probing.store(false, Ordering::Release);
            // Asked again meanwhile: keep going (the asker saw the thread running).
            if Duration::from_nanos(
                since_epoch().saturating_sub(clock.wanted.load(Ordering::Relaxed)),
            ) > PROBE_IDLE
                || clock.probing.swap(true, Ordering::AcqRel)
            {
                return;
            }
        }
        let Some((client, generation)) = source() else {
            clock.probing.store(false, Ordering::Release);
            return;
        };
        if conn.as_ref().is_some_and(|(g, _)| *g != generation) {
            // The master moved: probe the new one, and forget the old one's clock.
            conn = None;
            clock.follow(generation);
        }
        if conn.is_none() {
            conn = client
                .get_connection_with_timeout(timeout)
                .ok()
                .filter(|c| c.set_read_timeout(Some(timeout)).is_ok())
                .map(|c| (generation, c));
        }
        let Some((generation, c)) = conn.as_mut() else {
            continue;
        };
        let sent = Instant::now();
        match redis::cmd("TIME").query::<(u64, u64)>(c) {
            Ok((secs, us)) => clock.sample(
                *generation,
                sent,
                Instant::now(),
                secs.saturating_mul(1_000_000).saturating_add(us),
            ),
            Err(_) => conn = None, // reconnect on the next round
        }
    }
}

/// How long a sample is trusted (a bound from an older one is dominated by drift anyway).
const MAX_SAMPLE_AGE: Duration = Duration::from_secs(5);

/// The lower bound `sample` gives for Redis's clock at local instant `x` (it may be
/// negative): the sample's reading may have been taken as late as the end of its round
/// trip, and the clocks' rates may differ by the drift.
fn lowest(sample: Sample, x: Instant) -> i128 {
    let micros = |d: Duration| i128::try_from(d.as_micros()).unwrap_or(i128::MAX);
    let (gap, gap_abs) = if x >= sample.sent {
        (micros(x - sample.sent), x - sample.sent)
    } else {
        (-micros(sample.sent - x), sample.sent - x)
    };
    i128::from(sample.redis_us) + gap - micros(sample.rtt) - micros(drift(gap_abs))
}

/// The upper bound `sample` gives for Redis's clock at local instant `x`.
fn bound(sample: Sample, x: Instant) -> u64 {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    if x >= sample.sent {
        let gap = x - sample.sent;
        sample
            .redis_us
            .saturating_add(micros(gap))
            .saturating_add(micros(drift(gap)))
    } else {
        let gap = sample.sent - x;
        sample
            .redis_us
            .saturating_sub(micros(gap))
            .saturating_add(micros(drift(gap)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_never_below_the_true_time() {
        // Redis's clock reads 1_000_000 µs at local `base + 3 ms`, in a 10 ms round trip.
        let base = Instant::now();
        let clock = RedisClock::default();
        let true_us = |x: Instant| 1_000_000 + (x - base).as_micros() as u64 - 3_000;
        clock.sample(0, base, base + Duration::from_millis(10), 1_000_000);
        for offset_ms in [0, 1, 3, 10, 500, 5_000] {
            let x = base + Duration::from_millis(offset_ms);
            let bound = clock.upper_bound_us(x).expect("sampled");
            assert!(bound >= true_us(x), "at +{offset_ms} ms");
            assert!(bound - true_us(x) <= 3_000 + offset_ms * 1_000 * DRIFT_PPM / 1_000_000 + 1);
        }
        // A faster round trip later replaces it; a slower one does not.
        let later = base + Duration::from_secs(1);
        clock.sample(
            0,
            later,
            later + Duration::from_millis(50),
            true_us(later) + 100,
        );
        let bound = clock.upper_bound_us(later).expect("sampled");
        assert!(
            bound <= true_us(later) + 3_000 + 1_000 + 1,
            "kept the tighter sample"
        );
        clock.sample(
            0,
            later,
            later + Duration::from_micros(200),
            true_us(later) + 100,
        );
        let bound = clock.upper_bound_us(later).expect("sampled");
        assert!(
            bound <= true_us(later) + 200,
            "{bound} vs {}",
            true_us(later)
        );
        // A server whose clock reads later than the bound allowed replaces the sample.
        let jump = later + Duration::from_millis(1);
        clock.sample(
            0,
            jump,
            jump + Duration::from_millis(40),
            true_us(jump) + 60_000_000,
        );
        let bound = clock.upper_bound_us(jump).expect("sampled");
        assert!(bound >= true_us(jump) + 60_000_000);
        // Samples older than MAX_SAMPLE_AGE give no bound.
        assert!(clock.upper_bound_us(jump + MAX_SAMPLE_AGE * 2).is_none());
    }

    #[test]
    fn the_lower_bound_is_never_above_the_true_time() {
        // Redis read 1_000_000 µs somewhere in a 4 ms round trip sent at `base`.
        let base = Instant::now();
        let clock = RedisClock::default();
        assert!(clock.lower_bound_us(base).is_none());
        clock.sample(0, base, base + Duration::from_millis(4), 1_000_000);
        for read_at_ms in [0, 2, 4] {
            // Whenever in the round trip Redis read it, the true time at `x` is at least
            // the lower bound and at most the upper one.
            let true_us =
                |x: Instant| 1_000_000 + (x - base).as_micros() as u64 - read_at_ms * 1_000;
            for offset_ms in [4, 10, 1_000] {
                let x = base + Duration::from_millis(offset_ms);
                let low = clock.lower_bound_us(x).expect("sampled");
                let high = clock.upper_bound_us(x).expect("sampled");
                assert!(
                    low <= true_us(x) && true_us(x) <= high,
                    "{low} {} {high}",
                    true_us(x)
                );
                assert!(high - low <= 4_000 + 2 * (offset_ms * 1_000 * DRIFT_PPM / 1_000_000 + 1));
            }
        }
    }

    #[test]
    fn a_reply_from_a_clock_behind_contradicts_the_sample() {
        let base = Instant::now();
        let clock = RedisClock::default();
        assert!(
            !clock.contradicts(base, 0),
            "no sample, nothing to contradict"
        );
        // Read 1_000_000 µs somewhere in a 2 ms round trip at `base`.
        clock.sample(0, base, base + Duration::from_millis(2), 1_000_000);
        let later = base + Duration::from_millis(100);
        // The same clock, read right at `later` (at most 2 ms + drift earlier than the
        // sample's reading plus 100 ms): consistent.
        assert!(!clock.contradicts(later, 1_098_500));
        assert!(!clock.contradicts(later, 1_100_000));
        assert!(
            !clock.contradicts(later, 9_000_000),
            "later is not a contradiction"
        );
        // A clock 10 ms behind: contradicts.
        assert!(clock.contradicts(later, 1_090_000));
    }

    #[test]
    fn a_new_generation_drops_the_old_servers_samples() {
        // The old master's clock reads 60 s ahead of the new one's (a failover to a
        // server whose clock is behind): its bound would be far too high on the new one.
        let base = Instant::now();
        let clock = RedisClock::default();
        clock.sample(0, base, base + Duration::from_millis(1), 61_000_000);
        assert!(clock.upper_bound_us(base).is_some());
        clock.follow(1);
        assert!(clock.upper_bound_us(base).is_none(), "dropped on failover");
        // A late reply from the old master (generation 0) is ignored.
        clock.sample(0, base, base + Duration::from_millis(1), 61_000_000);
        assert!(clock.upper_bound_us(base).is_none());
        // The new master's samples count; a repeated follow of the same generation keeps
        // them; reset drops them.
        clock.sample(1, base, base + Duration::from_millis(1), 1_000_000);
        clock.follow(1);
        let bound = clock.upper_bound_us(base).expect("sampled");
        assert!(bound < 1_010_000, "{bound}");
        clock.reset();
        assert!(clock.upper_bound_us(base).is_none());
        // A newer generation's sample moves the clock on by itself.
        clock.sample(2, base, base + Duration::from_millis(1), 2_000_000);
        clock.sample(1, base, base + Duration::from_millis(1), 1_000_000);
        assert!(clock.upper_bound_us(base).expect("sampled") >= 2_000_000);
    }
}
