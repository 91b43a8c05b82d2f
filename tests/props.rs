//! Issue 9, test 7: random sequences of operations and clock advances, run on both
//! backends, must give the same observable results.
//!
//! ## The clock model
//!
//! The in-memory engine runs on a paused Tokio clock, which the test advances; Redis keeps
//! its own time, which nobody can advance. So the model only has two kinds of durations:
//! *short* ([`SHORT`], 250 ms) and *long* ([`LONG`], 60 s), and one kind of time step,
//! [`Op::Advance`]: the in-memory clock is advanced by [`ADVANCE`] (300 ms) and the Redis
//! run really sleeps that long. After an advance every short TTL has run out on both, and
//! no long one has (a sequence has far fewer than 200 advances).
//!
//! Between two advances the model says no time passes. On the paused clock that is exact;
//! on Redis the operations of such a segment take real time, so the Redis run checks that
//! every segment stays well inside a short TTL ([`SEGMENT_LIMIT`]); a run on a machine so
//! loaded that it does not is run again (and, three times unlucky, the case is rejected),
//! never judged. Observations compare remaining times only as short or long, never to the
//! millisecond, and never depend on the order of a hash map.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herdlock::{
    ErrorKind, FanoutOptions, Herd, JobError, LockGuard, LockOptions, MultiGuard, MultiOptions,
    Permit, Role, Semaphore, SemaphoreOptions, TryLock, TryMulti, TryPermit,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::common::server::RedisServer;

const SHORT: Duration = Duration::from_millis(250);
const LONG: Duration = Duration::from_secs(60);
/// Longer than [`SHORT`] by a margin, far shorter than [`LONG`].
const ADVANCE: Duration = Duration::from_millis(300);
/// The most real time a Redis segment (the operations between two advances) may take for
/// its observations to count: below [`SHORT`], with room for Redis's millisecond rounding.
const SEGMENT_LIMIT: Duration = Duration::from_millis(200);
/// How many times a Redis run that broke [`SEGMENT_LIMIT`] is tried again.
const TIMING_RETRIES: usize = 3;
/// Cases per run (`PROPTEST_CASES` overrides it); each costs its advances in real sleeps
/// on Redis.
const DEFAULT_CASES: u32 = 48;

const NODES: usize = 2;
const LOCK_KEYS: [&str; 3] = ["a", "b", "c"];
const JOBS: [&str; 2] = ["j1", "j2"];
const SEMAPHORE: &str = "s";
const PERMITS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ttl {
    Short,
    Long,
}

impl Ttl {
    fn duration(self) -> Duration {
        match self {
            Ttl::Short => SHORT,
            Ttl::Long => LONG,
        }
    }

    /// A remaining time, classed: short (at most a second) or long.
    fn of(remaining: Duration) -> Ttl {
        if remaining <= Duration::from_secs(1) {
            Ttl::Short
        } else {
            Ttl::Long
        }
    }
}

/// One step of a sequence. Guard indexes pick among the guards still held (modulo).
#[derive(Debug, Clone)]
enum Op {
    TryLock {
        node: usize,
        key: usize,
        ttl: Ttl,
    },
    Release {
        guard: usize,
    },
    Extend {
        guard: usize,
        ttl: Ttl,
    },
    Status {
        key: usize,
    },
    TryMulti {
        node: usize,
        keys: Vec<usize>,
        ttl: Ttl,
    },
    MultiRelease {
        guard: usize,
    },
    MultiExtend {
        guard: usize,
        ttl: Ttl,
    },
    Fanout {
        node: usize,
        job: usize,
        ok: bool,
        linger: Ttl,
        cached: bool,
    },
    SemTry {
        node: usize,
    },
    SemRelease {
        permit: usize,
    },
    SemStatus,
    Advance,
}

/// What one step showed. Both backends must show the same sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Obs {
    Acquired {
        fence: u64,
    },
    Busy {
        owner: String,
        fence: u64,
        left: Option<Ttl>,
    },
    Done,
    Failed(ErrorKind),
    NoGuard,
    Status {
        holder: Option<(String, u64, Option<Ttl>)>,
        last_fence: u64,
    },
    MultiAcquired {
        fences: Vec<(String, u64)>,
    },
    MultiBusy(Vec<(String, String, u64)>),
    Fanned {
        value: u32,
        role: Role,
        generation: u64,
    },
    PermitTaken,
    PermitBusy {
        in_use: u32,
    },
    SemStatus {
        in_use: u32,
        queued: u32,
        holders: Vec<(String, Ttl)>,
    },
    Advanced,
}

fn ttl() -> impl Strategy<Value = Ttl> {
    prop_oneof![Just(Ttl::Short), Just(Ttl::Long)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NODES, 0..LOCK_KEYS.len(), ttl())
            .prop_map(|(node, key, ttl)| Op::TryLock { node, key, ttl }),
        2 => any::<usize>().prop_map(|guard| Op::Release { guard }),
        2 => (any::<usize>(), ttl()).prop_map(|(guard, ttl)| Op::Extend { guard, ttl }),
        2 => (0..LOCK_KEYS.len() + JOBS.len()).prop_map(|key| Op::Status { key }),
        2 => (0..NODES, proptest::sample::subsequence(vec![0, 1, 2], 1..=3), ttl())
            .prop_map(|(node, keys, ttl)| Op::TryMulti { node, keys, ttl }),
        1 => any::<usize>().prop_map(|guard| Op::MultiRelease { guard }),
        1 => (any::<usize>(), ttl()).prop_map(|(guard, ttl)| Op::MultiExtend { guard, ttl }),
        3 => (0..NODES, 0..JOBS.len(), proptest::bool::weighted(0.8), ttl(), any::<bool>())
            .prop_map(|(node, job, ok, linger, cached)| Op::Fanout { node, job, ok, linger, cached }),
        2 => (0..NODES).prop_map(|node| Op::SemTry { node }),
        1 => any::<usize>().prop_map(|permit| Op::SemRelease { permit }),
        1 => Just(Op::SemStatus),
        2 => Just(Op::Advance),
    ]
}

/// The held guards of one run.
#[derive(Default)]
struct Held {
    locks: Vec<Option<LockGuard>>,
    multis: Vec<Option<MultiGuard>>,
    permits: Vec<Option<Permit>>,
}

/// The index of the `pick`-th live slot (modulo), if any is live.
fn pick<T>(slots: &[Option<T>], pick: usize) -> Option<usize> {
    let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
    (!live.is_empty()).then(|| live[pick % live.len()])
}

fn failed(e: &herdlock::Error) -> Obs {
    match e.kind() {
        kind @ (ErrorKind::LockLost | ErrorKind::JobFailed) => Obs::Failed(kind),
        _ => panic!("unexpected error: {e}"),
    }
}

/// Where a run's herds live, and how its time passes.
enum Clock {
    /// The paused Tokio clock of the in-memory run: advanced by the test.
    Paused,
    /// Real time (Redis): an advance sleeps; segments are timed.
    Real,
}

fn lock_opts(ttl: Ttl) -> LockOptions {
    LockOptions::new().ttl(ttl.duration()).auto_extend(false)
}

fn multi_opts(ttl: Ttl) -> MultiOptions {
    MultiOptions::new().ttl(ttl.duration()).auto_extend(false)
}

/// One run of a sequence on one backend.
struct Run<'a> {
    nodes: &'a [Herd],
    semaphores: Vec<Semaphore>,
    held: Held,
}

impl Run<'_> {
    async fn lock_step(&mut self, op: &Op) -> Obs {
        let held = &mut self.held.locks;
        match op {
            Op::TryLock { node, key, ttl } => {
                match self.nodes[*node]
                    .try_lock_with(LOCK_KEYS[*key], &lock_opts(*ttl))
                    .await
                    .expect("try_lock")
                {
                    TryLock::Acquired(guard) => {
                        let fence = guard.fence().get();
                        held.push(Some(guard));
                        Obs::Acquired { fence }
                    }
                    TryLock::Busy(holder) => Obs::Busy {
                        owner: holder.owner,
                        fence: holder.fence.get(),
                        left: holder.remaining.map(Ttl::of),
                    },
                }
            }
            Op::Release { guard } => match pick(held, *guard) {
                None => Obs::NoGuard,
                Some(i) => {
                    let guard = held[i].take().expect("live");
                    guard
                        .release()
                        .await
                        .map_or_else(|e| failed(&e), |()| Obs::Done)
                }
            },
            Op::Extend { guard, ttl } => match pick(held, *guard) {
                None => Obs::NoGuard,
                Some(i) => {
                    let guard = held[i].as_ref().expect("live");
                    guard
                        .extend(ttl.duration())
                        .await
                        .map_or_else(|e| failed(&e), |()| Obs::Done)
                }
            },
            Op::Status { key } => {
                let name = LOCK_KEYS.iter().chain(JOBS.iter()).nth(*key).expect("key");
                let status = self.nodes[0].lock_status(name).await.expect("status");
                Obs::Status {
                    holder: status
                        .holder
                        .map(|h| (h.owner, h.fence.get(), h.remaining.map(Ttl::of))),
                    last_fence: status.last_fence.map_or(0, herdlock::FencingToken::get),
                }
            }
            _ => unreachable!("not a lock step: {op:?}"),
        }
    }

    async fn multi_step(&mut self, op: &Op) -> Obs {
        let held = &mut self.held.multis;
        match op {
            Op::TryMulti { node, keys, ttl } => {
                let names: Vec<&str> = keys.iter().map(|&k| LOCK_KEYS[k]).collect();
                match self.nodes[*node]
                    .try_multi_with(&names, &multi_opts(*ttl))
                    .await
                    .expect("try_multi")
                {
                    TryMulti::Acquired(guard) => {
                        let fences = guard
                            .fences()
                            .map(|(k, f)| (k.to_owned(), f.get()))
                            .collect();
                        held.push(Some(guard));
                        Obs::MultiAcquired { fences }
                    }
                    TryMulti::Busy(busy) => Obs::MultiBusy(
                        busy.into_iter()
                            .map(|h| (h.key, h.holder.owner, h.holder.fence.get()))
                            .collect(),
                    ),
                }
            }
            Op::MultiRelease { guard } => match pick(held, *guard) {
                None => Obs::NoGuard,
                Some(i) => {
                    let guard = held[i].take().expect("live");
                    guard
                        .release()
                        .await
                        .map_or_else(|e| failed(&e), |()| Obs::Done)
                }
            },
            Op::MultiExtend { guard, ttl } => match pick(held, *guard) {
                None => Obs::NoGuard,
                Some(i) => {
                    let guard = held[i].as_mut().expect("live");
                    guard
                        .extend(ttl.duration())
                        .await
                        .map_or_else(|e| failed(&e), |()| Obs::Done)
                }
            },
            _ => unreachable!("not a multi-lock step: {op:?}"),
        }
    }

    /// A fan-out whose job returns `value` (its step's index), or fails.
    async fn fanout(
        &self,
        node: usize,
        job: usize,
        ok: bool,
        linger: Ttl,
        cached: bool,
        value: u32,
    ) -> Obs {
        let mut options = FanoutOptions::new().ttl(LONG).linger(linger.duration());
        if cached {
            options = options.cache_age(LONG);
        }
        let fanned = self.nodes[node]
            .fanout_with(
                JOBS[job],
                Duration::from_secs(10),
                &options,
                move || async move {
                    if ok {
                        Ok(value)
                    } else {
                        Err(JobError::new("the job failed"))
                    }
                },
            )
            .await;
        match fanned {
            Ok(f) => Obs::Fanned {
                value: f.value,
                role: f.role,
                generation: f.generation.get(),
            },
            Err(e) => failed(&e),
        }
    }

    async fn sem_step(&mut self, op: &Op) -> Obs {
        let held = &mut self.held.permits;
        match op {
            Op::SemTry { node } => match self.semaphores[*node].try_acquire().await.expect("try") {
                TryPermit::Acquired(permit) => {
                    held.push(Some(permit));
                    Obs::PermitTaken
                }
                TryPermit::Busy { in_use } => Obs::PermitBusy { in_use },
            },
            Op::SemRelease { permit } => match pick(held, *permit) {
                None => Obs::NoGuard,
                Some(i) => {
                    let permit = held[i].take().expect("live");
                    permit
                        .release()
                        .await
                        .map_or_else(|e| failed(&e), |()| Obs::Done)
                }
            },
            Op::SemStatus => {
                let status = self.semaphores[0].status().await.expect("semaphore status");
                let mut holders: Vec<(String, Ttl)> = status
                    .holders
                    .into_iter()
                    .map(|h| (h.owner, Ttl::of(h.remaining)))
                    .collect();
                holders.sort();
                Obs::SemStatus {
                    in_use: status.in_use,
                    queued: status.queued,
                    holders,
                }
            }
            _ => unreachable!("not a semaphore step: {op:?}"),
        }
    }
}

/// Runs `ops` on `nodes`; `None` if a Redis segment took too long to be judged.
async fn run(ops: &[Op], nodes: &[Herd], clock: &Clock) -> Option<Vec<Obs>> {
    let semaphores = nodes
        .iter()
        .map(|n| {
            n.semaphore_with(SEMAPHORE, PERMITS, &SemaphoreOptions::new().lease(LONG))
                .expect("semaphore")
        })
        .collect();
    let mut run = Run {
        nodes,
        semaphores,
        held: Held::default(),
    };
    let mut seen = Vec::with_capacity(ops.len());
    let mut segment = tokio::time::Instant::now();
    for (index, op) in ops.iter().enumerate() {
        let obs = match op {
            Op::TryLock { .. } | Op::Release { .. } | Op::Extend { .. } | Op::Status { .. } => {
                run.lock_step(op).await
            }
            Op::TryMulti { .. } | Op::MultiRelease { .. } | Op::MultiExtend { .. } => {
                run.multi_step(op).await
            }
            Op::Fanout {
                node,
                job,
                ok,
                linger,
                cached,
            } => {
                run.fanout(*node, *job, *ok, *linger, *cached, index as u32)
                    .await
            }
            Op::SemTry { .. } | Op::SemRelease { .. } | Op::SemStatus => run.sem_step(op).await,
            Op::Advance => {
                match clock {
                    Clock::Paused => tokio::time::advance(ADVANCE).await,
                    Clock::Real => tokio::time::sleep(ADVANCE).await,
                }
                segment = tokio::time::Instant::now();
                Obs::Advanced
            }
        };
        if segment.elapsed() >= SEGMENT_LIMIT {
            // Real time, not the model, would decide what the next steps see.
            assert!(
                matches!(clock, Clock::Real),
                "the paused clock moved by itself"
            );
            return None;
        }
        seen.push(obs);
    }
    Some(seen)
}

/// Every herd of one run: `NODES` nodes with their own owner labels, sharing one backend.
fn owners() -> impl Iterator<Item = String> {
    (0..NODES).map(|i| format!("node-{i}"))
}

fn memory_run(ops: &[Op]) -> Vec<Obs> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("paused runtime");
    runtime.block_on(async {
        let mut nodes: Vec<Herd> = Vec::new();
        for owner in owners() {
            let builder = Herd::builder().prefix("props").owner(owner);
            let herd = match nodes.first() {
                Some(first) => builder.memory_peer(first),
                None => builder.memory(),
            };
            nodes.push(herd.expect("memory herd"));
        }
        run(ops, &nodes, &Clock::Paused)
            .await
            .expect("the paused clock never breaks a segment")
    })
}

fn redis_run(
    runtime: &tokio::runtime::Runtime,
    server: &RedisServer,
    ops: &[Op],
) -> Option<Vec<Obs>> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("props{}", RUNS.fetch_add(1, Ordering::Relaxed));
    runtime.block_on(async {
        let mut nodes = Vec::new();
        for owner in owners() {
            nodes.push(
                Herd::builder()
                    .prefix(prefix.clone())
                    .owner(owner)
                    .connect(&server.url())
                    .await
                    .expect("connect"),
            );
        }
        run(ops, &nodes, &Clock::Real).await
    })
}

/// The observations with every fencing token replaced by its rank among the tokens of
/// the run (1 = the lowest; 0 stays 0). Tokens are clock readings (µs), so the engines
/// agree on their order, not on their values.
fn ranked(observed: &[Obs]) -> Vec<Obs> {
    let mut all = Vec::new();
    for obs in observed {
        match obs {
            Obs::Acquired { fence } | Obs::Busy { fence, .. } => all.push(*fence),
            Obs::Status { holder, last_fence } => {
                all.extend(holder.iter().map(|h| h.1));
                all.push(*last_fence);
            }
            Obs::MultiAcquired { fences } => all.extend(fences.iter().map(|f| f.1)),
            Obs::MultiBusy(held) => all.extend(held.iter().map(|h| h.2)),
            Obs::Fanned { generation, .. } => all.push(*generation),
            _ => {}
        }
    }
    all.retain(|f| *f != 0);
    all.sort_unstable();
    all.dedup();
    let rank = |f: u64| {
        if f == 0 {
            0
        } else {
            all.binary_search(&f).map_or(u64::MAX, |i| i as u64 + 1)
        }
    };
    observed
        .iter()
        .cloned()
        .map(|obs| match obs {
            Obs::Acquired { fence } => Obs::Acquired { fence: rank(fence) },
            Obs::Busy { owner, fence, left } => Obs::Busy {
                owner,
                fence: rank(fence),
                left,
            },
            Obs::Status { holder, last_fence } => Obs::Status {
                holder: holder.map(|(o, f, t)| (o, rank(f), t)),
                last_fence: rank(last_fence),
            },
            Obs::MultiAcquired { fences } => Obs::MultiAcquired {
                fences: fences.into_iter().map(|(k, f)| (k, rank(f))).collect(),
            },
            Obs::MultiBusy(held) => {
                Obs::MultiBusy(held.into_iter().map(|(k, o, f)| (k, o, rank(f))).collect())
            }
            Obs::Fanned {
                value,
                role,
                generation,
            } => Obs::Fanned {
                value,
                role,
                generation: rank(generation),
            },
            other => other,
        })
        .collect()
}

/// Issue 9, test 7: the in-memory engine and Redis agree on every random sequence of lock,
/// multi-lock, fan-out and semaphore steps and clock advances.
#[test]
fn backends_agree_on_random_sequences() {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    });
    let (judged, retried) = (AtomicU64::new(0), AtomicU64::new(0));
    let outcome = runner.run(&proptest::collection::vec(op(), 1..24), |ops| {
        let memory = memory_run(&ops);
        for attempt in 0..TIMING_RETRIES {
            if attempt > 0 {
                retried.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(redis) = redis_run(&runtime, &server, &ops) {
                judged.fetch_add(1, Ordering::Relaxed);
                prop_assert_eq!(
                    ranked(&memory),
                    ranked(&redis),
                    "memory (left) and Redis (right) differ"
                );
                return Ok(());
            }
        }
        Err(TestCaseError::reject(
            "the machine was too slow to keep a Redis segment within a short TTL",
        ))
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    eprintln!(
        "props: {} sequences judged on both backends, {} Redis runs repeated for timing",
        judged.load(Ordering::Relaxed),
        retried.load(Ordering::Relaxed)
    );
}
