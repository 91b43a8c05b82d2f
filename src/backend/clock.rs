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

fn drift(gap: Duration) -> Duration {
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
    best: Mutex<Option<Sample>>,
    /// When fan-out last asked for the bound (ns since `probe_epoch`), 0: never.
    wanted: AtomicU64,
    /// Whether the probe thread runs.
    probing: AtomicBool,
}

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
    /// Records a reply carrying Redis time `redis_us`, to a request sent at `sent` and
    /// answered at `received`.
    pub(crate) fn sample(&self, sent: Instant, received: Instant, redis_us: u64) {
        let new = Sample {
            sent,
            rtt: received.saturating_duration_since(sent),
            redis_us,
        };
        let mut best = self
            .best
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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

    /// Notes that fan-out needs the bound, and starts the probe thread (on its own
    /// connection from `client`) if it is not running.
    pub(crate) fn wanted(self: &Arc<Self>, client: &redis::Client, timeout: Duration) {
        self.wanted.store(since_epoch(), Ordering::Relaxed);
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let clock = Arc::downgrade(self);
        let client = client.clone();
        let spawned = std::thread::Builder::new()
            .name("herdlock-clock".to_owned())
            .spawn(move || probe_loop(&clock, &client, timeout));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "the clock probe thread could not be started");
            self.probing.store(false, Ordering::Release);
        }
    }

    /// An upper bound on Redis's clock (µs) at local instant `x`, if a recent sample is
    /// known.
    pub(crate) fn upper_bound_us(&self, x: Instant) -> Option<u64> {
        let best = (*self
            .best
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))?;
        (x.saturating_duration_since(best.sent) <= MAX_SAMPLE_AGE).then(|| bound(best, x))
    }
}

/// Samples Redis's clock every [`PROBE_EVERY`] with a blocking `TIME` on a connection of
/// its own, while fan-out asked for the bound within [`PROBE_IDLE`] and the backend lives.
fn probe_loop(clock: &Weak<RedisClock>, client: &redis::Client, timeout: Duration) {
    let mut conn = None;
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
        if conn.is_none() {
            conn = client
                .get_connection_with_timeout(timeout)
                .ok()
                .filter(|c| c.set_read_timeout(Some(timeout)).is_ok());
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = Instant::now();
        match redis::cmd("TIME").query::<(u64, u64)>(c) {
            Ok((secs, us)) => clock.sample(
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
        clock.sample(base, base + Duration::from_millis(10), 1_000_000);
        for offset_ms in [0, 1, 3, 10, 500, 5_000] {
            let x = base + Duration::from_millis(offset_ms);
            let bound = clock.upper_bound_us(x).expect("sampled");
            assert!(bound >= true_us(x), "at +{offset_ms} ms");
            assert!(bound - true_us(x) <= 3_000 + offset_ms * 1_000 * DRIFT_PPM / 1_000_000 + 1);
        }
        // A faster round trip later replaces it; a slower one does not.
        let later = base + Duration::from_secs(1);
        clock.sample(
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
            jump,
            jump + Duration::from_millis(40),
            true_us(jump) + 60_000_000,
        );
        let bound = clock.upper_bound_us(jump).expect("sampled");
        assert!(bound >= true_us(jump) + 60_000_000);
        // Samples older than MAX_SAMPLE_AGE give no bound.
        assert!(clock.upper_bound_us(jump + MAX_SAMPLE_AGE * 2).is_none());
    }
}
