//! The lease watchdog: one OS thread per herd that keeps every held lease alive.
//!
//! Held locks, fan-out runs and semaphore permits register a lease here. The thread runs
//! its own single-threaded Tokio runtime and, for Redis, its **own connection**, so a job
//! that blocks the caller's runtime (a CPU loop, a blocking call) does not stop renewals.
//! Every lease is renewed every third of its TTL; renewals that fall due together are sent
//! together (pipelined on one multiplexed connection), not one timer per lease.
//!
//! A lease is *lost* when a renewal finds another holder, or when no renewal succeeded
//! before the lease's own deadline (Redis unreachable): its [`LeaseHandle`] then reports
//! lost, and whoever holds it decides (a fan-out leader cancels its job by default).
//! Dropping the handle stops renewal at once. An optional maximum hold time stops renewing
//! after that long, so the lease runs out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::backend::{Backend, SemArgs, SemOp, SemReply};
use crate::keys::JobKeys;
use crate::semaphore::QUEUE_TTL;

/// How soon a failed renewal is retried.
const RETRY: Duration = Duration::from_millis(100);
/// The longest the thread sleeps when nothing is due (it is woken on registration).
const IDLE: Duration = Duration::from_secs(1);

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

/// The watchdog of one herd. The thread starts on the first registration.
#[derive(Debug)]
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    leases: Mutex<Leases>,
    /// Wakes the thread when a lease is registered.
    wake: Arc<Notify>,
    /// The backend the thread renews through (for Redis, it opens a connection of its own).
    backend: Backend,
}

#[derive(Debug, Default)]
struct Leases {
    next_id: u64,
    map: HashMap<u64, Lease>,
    thread_started: bool,
    /// When the thread will next wake on its own (`None` while it is working).
    planned_wake: Option<Instant>,
}

#[derive(Debug)]
struct Lease {
    renewal: Renewal,
    ttl: Duration,
    next_due: Instant,
    /// The lease is certainly valid until here (from the send time of the last success).
    valid_until: Instant,
    /// Stop renewing after this (the maximum hold time).
    hold_until: Option<Instant>,
    lost: watch::Sender<bool>,
}

impl Leases {
    fn due(&mut self, now: Instant) -> Vec<(u64, Renewal, Duration)> {
        let mut due = Vec::new();
        for (id, lease) in &mut self.map {
            if *lease.lost.borrow() {
                continue;
            }
            if lease.valid_until <= now {
                // Nothing renewed it in time: it may have expired and been taken.
                lease.lost.send_replace(true);
                continue;
            }
            if lease.hold_until.is_some_and(|t| t <= now) {
                continue; // past its maximum hold time: let it run out
            }
            if lease.next_due <= now {
                due.push((*id, lease.renewal.clone(), lease.ttl));
            }
        }
        due
    }

    fn next_wake(&self, now: Instant) -> Instant {
        self.map
            .values()
            .filter(|l| !*l.lost.borrow())
            .map(|l| {
                if l.hold_until.is_some_and(|t| t <= now) {
                    l.valid_until
                } else {
                    l.next_due.min(l.valid_until)
                }
            })
            .min()
            .unwrap_or(now + IDLE)
            .min(now + IDLE)
    }
}

impl Watchdog {
    pub(crate) fn new(backend: Backend) -> Watchdog {
        Watchdog {
            shared: Arc::new(Shared {
                leases: Mutex::new(Leases::default()),
                wake: Arc::new(Notify::new()),
                backend,
            }),
        }
    }

    /// Registers a lease just acquired with `ttl`; renewal starts a third of the TTL from
    /// now. Keep the handle while the lease is held; dropping it stops renewal.
    pub(crate) fn register(
        &self,
        renewal: Renewal,
        ttl: Duration,
        max_hold: Option<Duration>,
    ) -> LeaseHandle {
        let now = Instant::now();
        let (tx, rx) = watch::channel(false);
        let (id, wake) = {
            let mut leases = lock(&self.shared.leases);
            leases.next_id += 1;
            let id = leases.next_id;
            leases.map.insert(
                id,
                Lease {
                    renewal,
                    ttl,
                    next_due: now + period(ttl),
                    valid_until: now + ttl,
                    hold_until: max_hold.map(|d| now + d),
                    lost: tx,
                },
            );
            if !leases.thread_started {
                leases.thread_started = true;
                self.start_thread();
            }
            // Wake the thread only if it would otherwise sleep past this lease's first
            // renewal: with the usual TTLs it wakes in time on its own, and skipping the
            // wake-up keeps registration cheap on the acquire path.
            let wake = leases.planned_wake.is_some_and(|t| now + period(ttl) < t);
            (id, wake)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        LeaseHandle {
            shared: Arc::downgrade(&self.shared),
            id,
            lost: rx,
        }
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
                Ok(own) => Backend::Redis(own),
                Err(e) => {
                    tracing::error!(error = %e, "the lease watchdog could not open its connection");
                    return;
                }
            },
            memory @ Backend::Memory(_) => memory.clone(),
        };
        (backend, wake)
    };
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let now = Instant::now();
        let due = {
            let mut leases = lock(&shared.leases);
            leases.planned_wake = None;
            leases.due(now)
        };
        if !due.is_empty() {
            let sent_at = Instant::now();
            let renewals = due
                .iter()
                .map(|(_, renewal, ttl)| renew(&backend, renewal, *ttl));
            let outcomes = futures::future::join_all(renewals).await;
            let mut leases = lock(&shared.leases);
            for ((id, _, ttl), outcome) in due.iter().zip(outcomes) {
                let Some(lease) = leases.map.get_mut(id) else {
                    continue;
                }; // released meanwhile
                match outcome {
                    Ok(true) => {
                        lease.valid_until = sent_at + *ttl;
                        lease.next_due = sent_at + period(*ttl);
                    }
                    Ok(false) => {
                        tracing::warn!(renewal = ?lease.renewal, "lease lost: another holder has it, or it expired");
                        lease.lost.send_replace(true);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lease renewal failed; retrying");
                        lease.next_due = Instant::now() + RETRY.min(period(*ttl));
                    }
                }
            }
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
        }
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
            let args = SemArgs {
                member,
                permits: *permits,
                lease: ttl,
                queue_ttl: QUEUE_TTL,
            };
            Ok(backend.semaphore(keys, SemOp::Extend, args).await? == SemReply::Done(true))
        }
    }
}

/// A registered lease. Dropping it stops its renewal.
#[derive(Debug)]
pub(crate) struct LeaseHandle {
    shared: Weak<Shared>,
    id: u64,
    lost: watch::Receiver<bool>,
}

impl LeaseHandle {
    /// Whether the lease is known lost.
    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lease is lost (never, while it is held).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub(crate) async fn lost(&self) {
        let mut rx = self.lost.clone();
        if rx.wait_for(|lost| *lost).await.is_err() {
            // The watchdog is gone (the herd was dropped): nothing will ever report loss.
            std::future::pending::<()>().await;
        }
    }

    /// Records that the holder found the lease lost itself (a failed extend or heartbeat).
    pub(crate) fn mark_lost(&self) {
        if let Some(shared) = self.shared.upgrade() {
            if let Some(lease) = lock(&shared.leases).map.get(&self.id) {
                lease.lost.send_replace(true);
            }
        }
    }

    /// Records a successful manual extension to `ttl`.
    pub(crate) fn extended(&self, ttl: Duration) {
        if let Some(shared) = self.shared.upgrade() {
            let now = Instant::now();
            if let Some(lease) = lock(&shared.leases).map.get_mut(&self.id) {
                lease.ttl = ttl;
                lease.valid_until = now + ttl;
                lease.next_due = now + period(ttl);
            }
            shared.wake.notify_one();
        }
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
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.leases).map.remove(&self.id);
        }
    }
}
