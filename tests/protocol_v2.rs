//! Protocol v2 (issue 10, "Tests that must exist"), on real `redis-server`s:
//!
//! 1. Footprint: every primitive over 10,000 distinct names, then every lease, linger and
//!    queue TTL runs out and Redis (`DBSIZE`) and the in-memory backend hold nothing.
//! 2. Fences: 1,000 acquisitions of one name from 4 processes, the name's whole state
//!    expiring in between: tokens strictly increase in acquisition order.
//! 3. Misses: 4 processes × 10,000 ids in concurrent waves, job 0 ms: every run after an
//!    id's first is a *late* re-run (its caller called after the previous run ended), never
//!    a *miss*; no overlaps, no timeouts, and no caller gets a result that completed
//!    before it called.
//! 4. Commands: an uncontended `try_lock` + `release` cycle costs at most 5 Redis commands
//!    (`INFO commandstats`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use herdlock::limits::QUEUE_TTL;
use herdlock::{
    FanoutOptions, Herd, JobError, LockOptions, MultiOptions, Outcome, Push, SemaphoreOptions,
    TryLock, TryMulti, TryPermit,
};

use crate::common::procs::{emit, worker_param, worker_read_line, worker_ready_and_wait_go};
use crate::common::{ready_then_go, unique_prefix, RedisServer, Worker, STEP_TIMEOUT};

/// Wall-clock nanoseconds. Every process of a test runs on this machine, so their clocks
/// are one clock (`CLOCK_REALTIME`): timestamps from different processes compare.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

/// Reads the next line from the parent without blocking the runtime.
async fn next_line() -> String {
    tokio::task::spawn_blocking(worker_read_line)
        .await
        .expect("stdin reader")
}

fn param<T: std::str::FromStr>(name: &str) -> T {
    worker_param(name)
        .parse()
        .unwrap_or_else(|_| panic!("worker param {name} is not a number"))
}

// ---------------------------------------------------------------------------------------
// 1. Footprint

/// Distinct names per primitive; they add up to [`FOOTPRINT_NAMES`].
const FANOUT_NAMES: usize = 3_000;
const PUSH_NAMES: usize = 500;
const TRY_LOCK_NAMES: usize = 1_500;
const ONCE_NAMES: usize = 1_000;
const LOCK_NAMES: usize = 1_000;
const MULTI_GROUPS: usize = 250;
const MULTI_KEYS: usize = 4;
const FAIR_SEM_NAMES: usize = 1_000;
const UNFAIR_SEM_NAMES: usize = 1_000;
const FOOTPRINT_NAMES: usize = 10_000;
const _: () = assert!(
    FANOUT_NAMES
        + PUSH_NAMES
        + TRY_LOCK_NAMES
        + ONCE_NAMES
        + LOCK_NAMES
        + MULTI_GROUPS * MULTI_KEYS
        + FAIR_SEM_NAMES
        + UNFAIR_SEM_NAMES
        == FOOTPRINT_NAMES
);

/// Lock TTLs and semaphore leases of the footprint run.
const SHORT_TTL: Duration = Duration::from_millis(1_500);
/// Fan-out result lingers and lock grace periods.
const LINGER: Duration = Duration::from_millis(300);
/// How long a holder keeps a lock that someone waits for (its "work").
const HOLD: Duration = Duration::from_millis(10);
/// Names worked on at once per primitive.
const IN_FLIGHT: usize = 64;
/// Every wait and fan-out timeout of the footprint run: generous, none should be hit.
const WAIT: Duration = Duration::from_secs(20);

/// The longest any herdlock state of the footprint run may live after its last use: the
/// semaphore queue's entry TTL, plus the longest lease, linger or grace.
const LONGEST_LIFETIME: Duration = QUEUE_TTL.saturating_add(SHORT_TTL);

/// Runs `f(i)` for every `i` in `0..count`, [`IN_FLIGHT`] at a time.
async fn each<F, Fut>(count: usize, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    futures::stream::iter(0..count)
        .for_each_concurrent(IN_FLIGHT, f)
        .await;
}

/// Fan-out from two nodes at once on every id (one leads, the other joins or follows);
/// every tenth job fails, so error results are stored too.
async fn footprint_fanout(a: Herd, b: Herd) {
    let options = FanoutOptions::new().ttl(SHORT_TTL).linger(LINGER);
    each(FANOUT_NAMES, |i| {
        let (a, b, options) = (&a, &b, &options);
        async move {
            let id = format!("fanout-{i}");
            let fails = i % 10 == 0;
            let job = move || async move {
                if fails {
                    Err(JobError::new("boom"))
                } else {
                    Ok(i)
                }
            };
            let (from_a, from_b) = tokio::join!(
                a.fanout_with(&id, WAIT, options, job),
                b.fanout_with(&id, WAIT, options, job)
            );
            for result in [from_a, from_b] {
                match result {
                    Ok(fanned) => assert!(!fails && fanned.value == i, "{id}: {fanned:?}"),
                    Err(err) => assert!(fails && err.is_job_failure(), "{id}: {err}"),
                }
            }
        }
    })
    .await;
}

/// `push`: a leads and completes (every fifth with an error), b follows.
async fn footprint_push(a: Herd, b: Herd) {
    let options = FanoutOptions::new().ttl(SHORT_TTL).linger(LINGER);
    each(PUSH_NAMES, |i| {
        let (a, b, options) = (&a, &b, &options);
        async move {
            let id = format!("push-{i}");
            let Push::Leader(completer) = a.push::<usize>(&id, WAIT, options).await.expect("push")
            else {
                panic!("{id}: the first push leads");
            };
            let Push::Follower(follower) = b.push::<usize>(&id, WAIT, options).await.expect("push")
            else {
                panic!("{id}: a push during a run follows it");
            };
            let fails = i % 5 == 0;
            assert!(completer.complete(if fails {
                Err(JobError::new("boom"))
            } else {
                Ok(i)
            }));
            match follower.wait().await {
                Ok(value) => assert!(!fails && value == i, "{id}: {value}"),
                Err(e) => assert!(fails && e.is_job_failure(), "{id}: {e}"),
            }
        }
    })
    .await;
}

/// `try_lock`: released at once, released into a grace period, or left to expire; b
/// always finds it busy.
async fn footprint_try_lock(a: Herd, b: Herd) {
    each(TRY_LOCK_NAMES, |i| {
        let (a, b) = (&a, &b);
        async move {
            let name = format!("try-{i}");
            let options = match i % 3 {
                0 => LockOptions::new().ttl(SHORT_TTL),
                1 => LockOptions::new().ttl(SHORT_TTL).grace(LINGER),
                _ => LockOptions::new().ttl(SHORT_TTL).auto_extend(false),
            };
            let guard = a
                .try_lock_with(&name, &options)
                .await
                .expect("try_lock")
                .acquired()
                .unwrap_or_else(|| panic!("{name} is free"));
            assert!(b.try_lock(&name).await.expect("try_lock").is_busy());
            if i % 3 == 2 {
                // Left to expire: the lease runs out on its own. The local deadline comes
                // a little before the expiry on the server, so the guard is dropped (which
                // sends a release) only one TTL later, when that release finds nothing.
                guard.lost().await;
                tokio::time::sleep(SHORT_TTL).await;
                drop(guard);
            } else {
                guard.release().await.expect("release");
            }
        }
    })
    .await;
}

/// `once`: work that succeeds (released, or kept for a grace period) or fails (released
/// at once); b's `once` inside the work finds the name busy.
async fn footprint_once(a: Herd, b: Herd) {
    each(ONCE_NAMES, |i| {
        let (a, b) = (&a, &b);
        async move {
            let name = format!("once-{i}");
            let options = if i % 3 == 1 {
                LockOptions::new().ttl(SHORT_TTL).grace(LINGER)
            } else {
                LockOptions::new().ttl(SHORT_TTL)
            };
            let outcome = a
                .once_with(&name, &options, || async {
                    let inner = b.once(&name, || async { Ok(()) }).await?;
                    assert!(!inner.ran(), "{name}: b ran while a held it");
                    if i % 3 == 2 {
                        Err(JobError::new("the work failed"))
                    } else {
                        Ok(())
                    }
                })
                .await;
            match outcome {
                Ok(Outcome::Ran(())) => assert!(i % 3 != 2),
                Ok(Outcome::Busy(holder)) => panic!("{name}: busy, held by {holder:?}"),
                Err(e) => assert!(i % 3 == 2, "{name}: {e}"),
            }
        }
    })
    .await;
}

/// `lock` with a waiter on another node, woken by the release.
async fn footprint_lock(a: Herd, b: Herd) {
    let options = LockOptions::new().ttl(SHORT_TTL);
    each(LOCK_NAMES, |i| {
        let (a, b, options) = (&a, &b, &options);
        async move {
            let name = format!("lock-{i}");
            let guard = a.lock_with(&name, WAIT, options).await.expect("lock");
            let release = async {
                tokio::time::sleep(HOLD).await;
                guard.release().await.expect("release");
            };
            let (waited, ()) = tokio::join!(b.lock_with(&name, WAIT, options), release);
            waited
                .expect("the waiter gets the lock")
                .release()
                .await
                .expect("release");
        }
    })
    .await;
}

/// `multi` over 4 names, busy for b's `try_multi`, then b waits for all of them.
async fn footprint_multi(a: Herd, b: Herd) {
    let options = MultiOptions::new().ttl(SHORT_TTL);
    each(MULTI_GROUPS, |i| {
        let (a, b, options) = (&a, &b, &options);
        async move {
            let names: Vec<String> = (0..MULTI_KEYS).map(|k| format!("multi-{i}-{k}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let guard = match a.try_multi_with(&names, options).await.expect("try_multi") {
                TryMulti::Acquired(guard) => guard,
                TryMulti::Busy(held) => panic!("{names:?} are free, got {held:?}"),
            };
            assert!(matches!(
                b.try_multi(&names).await.expect("try_multi"),
                TryMulti::Busy(_)
            ));
            let release = async {
                tokio::time::sleep(HOLD).await;
                guard.release().await.expect("release");
            };
            let (waited, ()) = tokio::join!(b.multi_with(&names, WAIT, options), release);
            waited
                .expect("the waiter gets every lock")
                .release()
                .await
                .expect("release");
        }
    })
    .await;
}

/// Semaphores of one permit: a holds, b waits (queued, when fair) and is admitted by the
/// release. (A permit cannot be left to run out its lease: the watchdog renews it while
/// it lives, and dropping it releases it.)
async fn footprint_semaphores(a: Herd, b: Herd, fair: bool) {
    let options = SemaphoreOptions::new().lease(SHORT_TTL).fair(fair);
    let count = if fair {
        FAIR_SEM_NAMES
    } else {
        UNFAIR_SEM_NAMES
    };
    each(count, |i| {
        let (a, b, options) = (&a, &b, &options);
        async move {
            let name = format!("sem-{}-{i}", if fair { "fair" } else { "unfair" });
            let sem_a = a.semaphore_with(&name, 1, options).expect("semaphore");
            let sem_b = b.semaphore_with(&name, 1, options).expect("semaphore");
            let permit = match sem_a.try_acquire().await.expect("try_acquire") {
                TryPermit::Acquired(permit) => permit,
                TryPermit::Busy { in_use } => panic!("{name}: {in_use} in use"),
            };
            let release = async {
                if fair {
                    // Bounded: the waiter is queued within a round trip or two.
                    let deadline = Instant::now() + WAIT;
                    while sem_a.status().await.expect("status").queued == 0 {
                        assert!(Instant::now() < deadline, "{name}: b never queued");
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                } else {
                    tokio::time::sleep(HOLD).await;
                }
                permit.release().await.expect("release");
            };
            let (waited, ()) = tokio::join!(sem_b.acquire(WAIT), release);
            waited
                .expect("the waiter gets the permit")
                .release()
                .await
                .expect("release");
        }
    })
    .await;
}

/// Runs every primitive over [`FOOTPRINT_NAMES`] distinct names on nodes `a` and `b`
/// (which share a backend and a prefix), all primitives at once.
async fn exercise_every_primitive(a: &Herd, b: &Herd) {
    let started = Instant::now();
    let tasks = [
        (
            "fanout",
            tokio::spawn(footprint_fanout(a.clone(), b.clone())),
        ),
        ("push", tokio::spawn(footprint_push(a.clone(), b.clone()))),
        (
            "try_lock",
            tokio::spawn(footprint_try_lock(a.clone(), b.clone())),
        ),
        ("once", tokio::spawn(footprint_once(a.clone(), b.clone()))),
        ("lock", tokio::spawn(footprint_lock(a.clone(), b.clone()))),
        ("multi", tokio::spawn(footprint_multi(a.clone(), b.clone()))),
        (
            "fair semaphore",
            tokio::spawn(footprint_semaphores(a.clone(), b.clone(), true)),
        ),
        (
            "unfair semaphore",
            tokio::spawn(footprint_semaphores(a.clone(), b.clone(), false)),
        ),
    ];
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    for (what, task) in tasks {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(done) => done.unwrap_or_else(|e| panic!("the {what} workload failed: {e}")),
            Err(elapsed) => panic!(
                "the {what} workload did not finish within {:?} ({elapsed})",
                WAIT * 3
            ),
        }
    }
    eprintln!(
        "footprint: {FOOTPRINT_NAMES} names worked on in {:?}",
        started.elapsed()
    );
}

/// Polls `count` until it is 0 or `limit` has passed; returns the last count and when it
/// was read.
async fn wait_for_zero<F, Fut>(limit: Duration, mut count: F) -> (usize, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = usize>,
{
    let started = Instant::now();
    loop {
        let n = count().await;
        if n == 0 || started.elapsed() >= limit {
            return (n, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The keys left on `server`, counted by what follows their hash tag (`:fence`, `:lock`,
/// …), with a few examples and their `PTTL`: the failure message of the footprint test.
fn describe_leftovers(server: &RedisServer) -> String {
    let keys = server.cmd(&["KEYS", "*"]);
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let kind = key.rsplit_once('}').map_or(key, |(_, kind)| kind);
        *kinds.entry(kind.to_owned()).or_default() += 1;
    }
    let examples: Vec<String> = keys
        .lines()
        .filter(|k| !k.is_empty())
        .take(5)
        .map(|k| format!("{k} (PTTL {})", server.cmd(&["PTTL", k])))
        .collect();
    format!("by kind {kinds:?}; e.g. {examples:?}")
}

/// Issue 10, test 1 on Redis: after every TTL has run out, `DBSIZE` is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn footprint_redis_holds_nothing_once_every_ttl_ran_out() {
    let server = RedisServer::start();
    let prefix = unique_prefix("protocol_v2::footprint");
    let url = server.url();
    let node = |owner: &'static str| {
        Herd::builder()
            .prefix(prefix.clone())
            .owner(owner)
            .connect(&url)
    };
    let a = node("a").await.expect("connect a");
    let b = node("b").await.expect("connect b");
    exercise_every_primitive(&a, &b).await;

    let mut conn = raw(&server.url()).await;
    let (left, after) = wait_for_zero(LONGEST_LIFETIME + Duration::from_secs(10), || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("DBSIZE")
                .query_async::<usize>(&mut conn)
                .await
                .expect("DBSIZE")
        }
    })
    .await;
    eprintln!("footprint (redis): DBSIZE {left} after {after:?}");
    assert_eq!(
        left,
        0,
        "{left} keys are left on Redis {after:?} after the last call (every lease, linger \
         and queue entry ends within {LONGEST_LIFETIME:?}): {}",
        describe_leftovers(&server)
    );
    let _: () = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("the server is fine");
}

/// Issue 10, test 1 on the in-memory backend: after every TTL has run out, it holds no
/// entry (`Herd::memory_entries`: locks, results and semaphores, counted after the engine
/// drops what has expired, as its periodic sweep does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn footprint_memory_holds_nothing_once_every_ttl_ran_out() {
    let prefix = unique_prefix("protocol_v2::footprint");
    let a = Herd::builder()
        .prefix(prefix.clone())
        .owner("a")
        .memory()
        .expect("memory herd");
    let b = Herd::builder()
        .prefix(prefix)
        .owner("b")
        .memory_peer(&a)
        .expect("memory peer");
    exercise_every_primitive(&a, &b).await;

    let (left, after) = wait_for_zero(LONGEST_LIFETIME + Duration::from_secs(5), || {
        let count = a.memory_entries().expect("an in-memory herd");
        async move { count }
    })
    .await;
    eprintln!("footprint (memory): {left} entries after {after:?}");
    assert_eq!(
        left, 0,
        "the in-memory backend holds {left} entries {after:?} after the last call (every \
         lease, linger and queue entry ends within {LONGEST_LIFETIME:?})"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Fences across expiry

const FENCE_WORKERS: usize = 4;
const FENCE_ROUNDS: usize = 50;
/// Acquisitions per worker per round: 4 × 5 × 50 = 1,000 in all.
const FENCE_PER_ROUND: usize = 5;
const FENCE_TTL_MS: u64 = 30;
/// Every this many acquisitions a holder lets its lock expire instead of releasing it.
const FENCE_EXPIRE_EVERY: usize = 5;
const FENCE_NAME: &str = "fenced";

/// Worker role `fence_expiry`: on `round N`, connects a fresh herd (a client restart) and
/// takes the lock `FENCE_PER_ROUND` times. A holder appends `fence pid seq` to the ledger
/// list, then extends its lock: if that succeeds, no one else acquired between its
/// acquisition and the append, so the verified entries of the ledger are in acquisition
/// order. One acquisition in [`FENCE_EXPIRE_EVERY`] is left to expire (its holder waits
/// until the lease is lost and one more TTL) instead of being released. Emits `acq pid seq
/// fence called_ns acquired_ns verified` per acquisition and `done N` per round.
pub(crate) async fn fence_expiry() {
    let ttl = Duration::from_millis(param("TTL_MS"));
    let per_round: usize = param("PER_ROUND");
    let ledger = worker_param("LEDGER");
    let mut conn = raw(&worker_param("URL")).await;
    let pid = std::process::id();
    let options = LockOptions::new().ttl(ttl).auto_extend(false);
    worker_ready_and_wait_go();
    let mut seq = 0usize;
    loop {
        let line = next_line().await;
        if line == "quit" {
            return;
        }
        let round = line
            .strip_prefix("round ")
            .expect("a round line")
            .to_owned();
        let herd = crate::workers::herd().await;
        for _ in 0..per_round {
            seq += 1;
            let called = now_ns();
            let guard = herd
                .lock_with(FENCE_NAME, Duration::from_secs(20), &options)
                .await
                .expect("lock");
            let acquired = now_ns();
            let fence = guard.fence().get();
            let _: u64 = redis::cmd("RPUSH")
                .arg(&ledger)
                .arg(format!("{fence} {pid} {seq}"))
                .query_async(&mut conn)
                .await
                .expect("RPUSH");
            let verified = guard.extend(ttl).await.is_ok();
            if seq.is_multiple_of(FENCE_EXPIRE_EVERY) {
                guard.lost().await;
                tokio::time::sleep(ttl).await;
            }
            match guard.release().await {
                Ok(()) => {}
                Err(e) if e.is_lock_lost() => {}
                Err(e) => panic!("release: {e}"),
            }
            emit(&format!(
                "acq {pid} {seq} {fence} {called} {acquired} {}",
                u8::from(verified)
            ));
        }
        emit(&format!("done {round}"));
    }
}

/// One acquisition, as a worker reported it.
#[derive(Debug, Clone, Copy)]
struct Acquisition {
    pid: u32,
    seq: usize,
    fence: u64,
    called: u64,
    acquired: u64,
    verified: bool,
}

impl Acquisition {
    fn parse(line: &str) -> Acquisition {
        let fields: Vec<&str> = line.split(' ').collect();
        let n = |i: usize| -> u64 {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("bad acq line {line:?}"))
        };
        Acquisition {
            pid: u32::try_from(n(0)).expect("pid"),
            seq: usize::try_from(n(1)).expect("seq"),
            fence: n(2),
            called: n(3),
            acquired: n(4),
            verified: n(5) == 1,
        }
    }
}

/// Counts the keys under `prefix` that still have a TTL (they will expire) and those
/// without one (they never will), in one atomic step.
fn finite_and_forever_keys(server: &RedisServer, prefix: &str) -> (u64, u64) {
    const COUNT: &str = "local finite, forever = 0, 0 \
        for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
          local t = redis.call('PTTL', k) \
          if t >= 0 then finite = finite + 1 elseif t == -1 then forever = forever + 1 end \
        end \
        return {finite, forever}";
    let reply = server.cmd(&["EVAL", COUNT, "0", &format!("{prefix}:*")]);
    let counts: Vec<u64> = reply
        .lines()
        .map(|n| n.trim().parse().expect("a count"))
        .collect();
    assert_eq!(counts.len(), 2, "EVAL replied {reply:?}");
    (counts[0], counts[1])
}

/// Issue 10, test 2: 1,000 acquisitions of one name from 4 processes, in 50 rounds. Within
/// a round some locks expire instead of being released; between rounds every herdlock key
/// of the name that has a TTL runs out (so under a protocol with no forever keys, the
/// name's whole state is gone), and every round starts with fresh clients. Tokens are
/// distinct, strictly increase along the ledger's verified entries (acquisition order),
/// and respect real time: an acquisition that returned before another was asked for has
/// the lower token.
#[test]
fn fences_increase_across_expiry_from_four_processes() {
    let server = RedisServer::start();
    let prefix = unique_prefix("protocol_v2::fences");
    let ledger = format!("{prefix}-ledger");
    let started = Instant::now();
    let mut workers: Vec<Worker> = (0..FENCE_WORKERS)
        .map(|w| {
            Worker::spawn(
                "workers::worker_entry",
                "fence_expiry",
                &[
                    ("URL", server.url()),
                    ("PREFIX", prefix.clone()),
                    ("OWNER", format!("w{w}")),
                    ("LEDGER", ledger.clone()),
                    ("TTL_MS", FENCE_TTL_MS.to_string()),
                    ("PER_ROUND", FENCE_PER_ROUND.to_string()),
                ],
            )
        })
        .collect();
    ready_then_go(&mut workers, STEP_TIMEOUT);
    let mut rounds_with_forever_keys = 0;
    let mut waited_for_expiry = Duration::ZERO;
    for round in 0..FENCE_ROUNDS {
        for worker in &mut workers {
            worker.send_line(&format!("round {round}"));
        }
        for worker in &mut workers {
            worker.wait_line_prefix(&format!("done {round}"), STEP_TIMEOUT);
        }
        let pause = Instant::now();
        if wait_until_only_forever_keys(&server, &prefix, round) > 0 {
            rounds_with_forever_keys += 1;
        }
        waited_for_expiry += pause.elapsed();
    }
    for worker in &mut workers {
        worker.send_line("quit");
    }
    let mut acquisitions = Vec::new();
    for worker in workers {
        let output = worker.finish(STEP_TIMEOUT);
        output.assert_success();
        acquisitions.extend(output.values("acq").into_iter().map(Acquisition::parse));
    }
    let total = FENCE_WORKERS * FENCE_ROUNDS * FENCE_PER_ROUND;
    assert_eq!(acquisitions.len(), total, "every acquisition is reported");
    let in_order = check_fences(&acquisitions, &server.cmd(&["LRANGE", &ledger, "0", "-1"]));
    eprintln!(
        "fences: {total} acquisitions, {in_order} verified in ledger order, \
         {rounds_with_forever_keys} of {FENCE_ROUNDS} rounds began with keys that never \
         expire, {waited_for_expiry:?} waiting for expiry, {:?} in all",
        started.elapsed()
    );
}

/// A pause longer than every TTL of the name: waits until no key under `prefix` with a
/// TTL is left, and returns how many keys without one there are.
fn wait_until_only_forever_keys(server: &RedisServer, prefix: &str, round: usize) -> u64 {
    let pause = Instant::now();
    loop {
        let (finite, forever) = finite_and_forever_keys(server, prefix);
        if finite == 0 {
            return forever;
        }
        assert!(
            pause.elapsed() < STEP_TIMEOUT,
            "round {round}: {finite} keys with a TTL still there after {STEP_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checks the fences of every acquisition against each other and against the `ledger`
/// (`LRANGE` output, one `fence pid seq` per line); returns how many ledger entries were
/// verified (see [`fence_expiry`]).
fn check_fences(acquisitions: &[Acquisition], ledger: &str) -> usize {
    let total = acquisitions.len();
    // Distinct tokens: no two acquisitions of one name share one.
    let distinct: HashSet<u64> = acquisitions.iter().map(|a| a.fence).collect();
    assert_eq!(distinct.len(), total, "two acquisitions got the same token");

    // Acquisition order: the ledger's verified entries.
    let verified: HashMap<(u32, usize), bool> = acquisitions
        .iter()
        .map(|a| ((a.pid, a.seq), a.verified))
        .collect();
    let mut in_order: Vec<u64> = Vec::new();
    for entry in ledger.lines() {
        let fields: Vec<u64> = entry
            .split(' ')
            .map(|f| f.parse().expect("a ledger field"))
            .collect();
        let [fence, pid, seq] = fields[..] else {
            panic!("bad ledger entry {entry:?}")
        };
        let key = (
            u32::try_from(pid).expect("pid"),
            usize::try_from(seq).expect("seq"),
        );
        if verified.get(&key).copied().unwrap_or(false) {
            in_order.push(fence);
        }
    }
    assert!(
        in_order.len() * 2 >= total,
        "only {} of {total} acquisitions could be verified as still held when logged",
        in_order.len()
    );
    let backwards: Vec<(u64, u64)> = in_order
        .windows(2)
        .filter(|w| w[1] <= w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        backwards.is_empty(),
        "tokens went backwards in acquisition order ({} times): {:?}",
        backwards.len(),
        &backwards[..backwards.len().min(10)]
    );

    // Real time: if a's lock call returned before b's was made, a acquired first.
    let mut by_acquired: Vec<(u64, u64)> =
        acquisitions.iter().map(|a| (a.acquired, a.fence)).collect();
    by_acquired.sort_unstable();
    let mut highest = Vec::with_capacity(by_acquired.len());
    let mut max = 0;
    for &(_, fence) in &by_acquired {
        max = max.max(fence);
        highest.push(max);
    }
    for b in acquisitions {
        let before = by_acquired.partition_point(|&(acquired, _)| acquired < b.called);
        if before > 0 {
            assert!(
                highest[before - 1] < b.fence,
                "{b:?} got token {} although token {} was handed out before it asked",
                b.fence,
                highest[before - 1]
            );
        }
    }
    in_order.len()
}

// ---------------------------------------------------------------------------------------
// 3. Coalescing misses

const MISS_WORKERS: usize = 4;
const MISS_IDS: usize = 10_000;
const MISS_IN_FLIGHT: usize = 256;

/// What one worker noted about one fan-out call (each process calls each id once).
#[derive(Debug)]
struct Call {
    /// The caller's process.
    pid: u32,
    id: usize,
    /// Just before the call: no later than the instant it began.
    before: u64,
    /// Just after the call's first poll, which registers it with the herd (its flight
    /// notes the caller then): no earlier than the instant it began.
    after: u64,
    /// When the call returned.
    returned: u64,
    /// The tag of the run whose result it got, or the error.
    got: Result<String, String>,
}

/// What a job noted about its run.
#[derive(Debug, Clone)]
struct Run {
    id: usize,
    start: u64,
    end: u64,
    /// When the caller whose job this is (its process's caller of the id) began its call,
    /// at the latest: its [`Call::after`].
    called: u64,
    /// `pid.n`: unique per run, the job's result.
    tag: String,
}

/// Worker role `fanout_misses`: on `wave START LEN`, calls `fanout` on ids START..START+LEN
/// all at once (job 0 ms) and emits `waved START`; on `quit`, emits every run (`run id
/// start end tag`) and every call (`call id before after returned tag` or `error id
/// kind`).
pub(crate) async fn fanout_misses() {
    let herd = crate::workers::herd().await;
    let options = FanoutOptions::new();
    let pid = std::process::id();
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let counter = Arc::new(AtomicU64::new(0));
    let mut calls: Vec<Call> = Vec::new();
    worker_ready_and_wait_go();
    loop {
        let line = next_line().await;
        if line == "quit" {
            break;
        }
        let wave: Vec<usize> = line
            .strip_prefix("wave ")
            .expect("a wave line")
            .split(' ')
            .map(|n| n.parse().expect("a number"))
            .collect();
        let [start, len] = wave[..] else {
            panic!("bad wave line {line:?}")
        };
        let tasks: Vec<_> = (start..start + len)
            .map(|id| {
                let (herd, options) = (herd.clone(), options.clone());
                let (runs, counter) = (Arc::clone(&runs), Arc::clone(&counter));
                tokio::spawn(async move {
                    let job = move || async move {
                        let start = now_ns();
                        let tag = format!("{pid}.{}", counter.fetch_add(1, Ordering::Relaxed));
                        let end = now_ns();
                        runs.lock().expect("runs").push(Run {
                            id,
                            start,
                            end,
                            called: 0, // the parent fills it in from the call
                            tag: tag.clone(),
                        });
                        Ok(tag)
                    };
                    let job_id = format!("id-{id}");
                    let before = now_ns();
                    let mut call = std::pin::pin!(herd.fanout_with(
                        &job_id,
                        Duration::from_secs(20),
                        &options,
                        job
                    ));
                    let first = futures::poll!(call.as_mut());
                    let after = now_ns();
                    let result = match first {
                        Poll::Ready(result) => result,
                        Poll::Pending => call.await,
                    };
                    Call {
                        pid,
                        id,
                        before,
                        after,
                        returned: now_ns(),
                        got: result
                            .map(|f| f.value)
                            .map_err(|e| format!("{:?}", e.kind())),
                    }
                })
            })
            .collect();
        for task in tasks {
            calls.push(task.await.expect("a caller task"));
        }
        emit(&format!("waved {start}"));
    }
    for run in runs.lock().expect("runs").iter() {
        emit(&format!(
            "run {} {} {} {}",
            run.id, run.start, run.end, run.tag
        ));
    }
    for call in &calls {
        match &call.got {
            Ok(tag) => emit(&format!(
                "call {} {} {} {} {tag}",
                call.id, call.before, call.after, call.returned
            )),
            Err(kind) => emit(&format!("error {} {kind}", call.id)),
        }
    }
    emit(&format!(
        "possible_misses {}",
        herd.stats().runs.possible_misses
    ));
}

/// Runs of ids, split as the load generator does.
#[derive(Debug, Default)]
struct RunKinds {
    first: usize,
    /// Started by a caller that called after the previous run of its id had ended.
    late: usize,
    /// Started by a caller that called before the previous run of its id had ended: that
    /// caller should have received the previous run's result. (id, description)
    misses: Vec<(usize, String)>,
    /// Started before the previous run of its id had ended.
    overlaps: Vec<String>,
    /// Started by a caller that called less than [`RESOLUTION`] before the previous run's
    /// job ended: closer to the completion than a caller can tell apart without a round
    /// trip (the bound on Redis's clock is as loose as its best sample's round trip).
    near: usize,
}

/// How close before a run's end a call can be and still start another run: the precision
/// of the client's bound on Redis's clock (a round trip of its best recent sample, plus
/// drift), well under this on a loaded 2-core machine.
const RESOLUTION: u64 = 2_000_000; // ns

fn classify(runs: &mut [Run]) -> RunKinds {
    runs.sort_by_key(|r| (r.id, r.start));
    let mut kinds = RunKinds::default();
    let mut previous: Option<(usize, u64, &str)> = None; // id, latest end so far, its run
    for run in runs.iter() {
        match previous {
            Some((id, end, tag)) if id == run.id => {
                if run.start < end {
                    kinds.overlaps.push(format!(
                        "id {id}: run {} started {} µs before run {tag} ended",
                        run.tag,
                        (end - run.start) / 1_000
                    ));
                }
                if run.called < end && end - run.called < RESOLUTION {
                    kinds.near += 1;
                } else if run.called < end {
                    kinds.misses.push((
                        id,
                        format!(
                            "id {id}: run {} started by a caller that called {} µs before run \
                         {tag} ended",
                            run.tag,
                            (end - run.called) / 1_000
                        ),
                    ));
                } else {
                    kinds.late += 1;
                }
                previous = Some(if run.end > end {
                    (id, run.end, &run.tag)
                } else {
                    (id, end, tag)
                });
            }
            _ => {
                kinds.first += 1;
                previous = Some((run.id, run.end, &run.tag));
            }
        }
    }
    kinds
}

/// Every call got the result of a run of its own id.
fn every_call_got_its_own_id(runs: &[Run], calls: &[Call]) {
    let by_tag: HashMap<String, usize> = runs.iter().map(|r| (r.tag.clone(), r.id)).collect();
    for call in calls {
        let id = by_tag
            .get(tag_of(call))
            .unwrap_or_else(|| panic!("{call:?} got a run nobody reported"));
        assert_eq!(*id, call.id, "{call:?} got the result of another id");
    }
}

/// Every run and call of `id`, in µs since the first call of the test: what a failure
/// shows of a miss.
fn timeline(id: usize, runs: &[Run], calls: &[Call]) -> String {
    use std::fmt::Write as _;
    let base = calls.iter().map(|c| c.before).min().unwrap_or(0);
    let us = |ns: u64| ns.saturating_sub(base) / 1_000;
    let mut out = format!("id {id}:\n");
    for r in runs.iter().filter(|r| r.id == id) {
        let _ = writeln!(
            out,
            "  run {}: caller called by {}, ran {}..{}",
            r.tag,
            us(r.called),
            us(r.start),
            us(r.end)
        );
    }
    for c in calls.iter().filter(|c| c.id == id) {
        let _ = writeln!(
            out,
            "  call in {}: called {}..{}, returned {} with {:?}",
            c.pid,
            us(c.before),
            us(c.after),
            us(c.returned),
            c.got
        );
    }
    out
}

/// Every worker's runs, successful calls and failed calls (`id kind`).
fn collect_fanout_reports(workers: Vec<Worker>) -> (Vec<Run>, Vec<Call>, Vec<String>, u64) {
    let (mut runs, mut calls, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut possible_misses = 0;
    for worker in workers {
        let pid = worker.pid();
        let output = worker.finish(STEP_TIMEOUT);
        output.assert_success();
        let number = |field: Option<&str>, line: &str| -> u64 {
            field
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("bad line {line:?}"))
        };
        for line in output.values("run") {
            let mut f = line.split(' ');
            runs.push(Run {
                id: usize::try_from(number(f.next(), line)).expect("id"),
                start: number(f.next(), line),
                end: number(f.next(), line),
                called: 0,
                tag: f.next().expect("a run tag").to_owned(),
            });
        }
        for line in output.values("call") {
            let mut f = line.split(' ');
            calls.push(Call {
                pid,
                id: usize::try_from(number(f.next(), line)).expect("id"),
                before: number(f.next(), line),
                after: number(f.next(), line),
                returned: number(f.next(), line),
                got: Ok(f.next().expect("a run tag").to_owned()),
            });
        }
        errors.extend(output.values("error").into_iter().map(str::to_owned));
        for line in output.values("possible_misses") {
            possible_misses += number(Some(line), line);
        }
    }
    (runs, calls, errors, possible_misses)
}

/// The tag of the run a successful call got.
fn tag_of(call: &Call) -> &str {
    call.got.as_deref().expect("only successful calls")
}

/// The process that ran the run `tag` (`pid.n`).
fn runner_of(tag: &str) -> u32 {
    tag.split('.')
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("a run tag starts with its runner's pid")
}

/// Calls that got a stale result. A run has surely completed once a caller in a process
/// other than the runner's has its result (only the completing script hands it out); a
/// caller that called after that (its `before` is no later than its call) must not
/// receive it.
fn stale_calls(calls: &[Call]) -> Vec<&Call> {
    let mut completed_by: HashMap<&str, u64> = HashMap::new();
    for call in calls {
        let tag = tag_of(call);
        if call.pid != runner_of(tag) {
            let at = completed_by.entry(tag).or_insert(u64::MAX);
            *at = (*at).min(call.returned);
        }
    }
    calls
        .iter()
        .filter(|c| {
            completed_by
                .get(tag_of(c))
                .is_some_and(|&done| done < c.before)
        })
        .collect()
}

/// Issue 10, test 3: 4 processes request the same 10,000 ids in waves of 256 at once (job
/// 0 ms). Every run after an id's first is late, none a miss; no runs overlap, no call
/// fails or times out, and no caller receives a run that had completed before it called
/// (a run has completed once a caller in another process has its result).
#[test]
fn no_coalescing_misses_across_four_processes() {
    let server = RedisServer::start();
    no_coalescing_misses(&server.url(), "protocol_v2::misses");
}

/// Issue 11: the same on a Redis Cluster (3 masters + 3 replicas), where each job's script
/// runs on its slot's master and each master's clock is bounded on its own.
#[test]
fn no_coalescing_misses_on_a_cluster() {
    let cluster = crate::common::cluster::shared();
    no_coalescing_misses(
        &crate::cluster::cluster_url(cluster),
        "protocol_v2::cluster_misses",
    );
}

fn no_coalescing_misses(url: &str, label: &str) {
    let prefix = unique_prefix(label);
    let started = Instant::now();
    let mut workers: Vec<Worker> = (0..MISS_WORKERS)
        .map(|w| {
            Worker::spawn(
                "workers::worker_entry",
                "fanout_misses",
                &[
                    ("URL", url.to_owned()),
                    ("PREFIX", prefix.clone()),
                    ("OWNER", format!("w{w}")),
                ],
            )
        })
        .collect();
    ready_then_go(&mut workers, STEP_TIMEOUT);
    for start in (0..MISS_IDS).step_by(MISS_IN_FLIGHT) {
        let len = MISS_IN_FLIGHT.min(MISS_IDS - start);
        for worker in &mut workers {
            worker.send_line(&format!("wave {start} {len}"));
        }
        for worker in &mut workers {
            worker.wait_line_prefix(&format!("waved {start}"), STEP_TIMEOUT);
        }
    }
    let calling = started.elapsed();
    for worker in &mut workers {
        worker.send_line("quit");
    }
    let (mut runs, calls, errors, possible_misses) = collect_fanout_reports(workers);
    assert!(
        errors.is_empty(),
        "{} calls failed (timeouts included), e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert_eq!(
        calls.len(),
        MISS_WORKERS * MISS_IDS,
        "every call is reported"
    );
    // Each run belongs to its process's one call of its id: that caller's `after` is when
    // it called, at the latest.
    let after: HashMap<(u32, usize), u64> =
        calls.iter().map(|c| ((c.pid, c.id), c.after)).collect();
    for run in &mut runs {
        run.called = after[&(runner_of(&run.tag), run.id)];
    }
    every_call_got_its_own_id(&runs, &calls);
    let stale = stale_calls(&calls);

    let kinds = classify(&mut runs);
    let ids: HashSet<usize> = runs.iter().map(|r| r.id).collect();
    eprintln!(
        "misses: {} calls, {} runs over {} ids: {} first, {} late, {} misses, {} within the \
         clock's resolution, {} overlaps, {} stale, {possible_misses} counted as possible \
         misses by the herds; calls took {calling:?}, {:?} in all",
        calls.len(),
        runs.len(),
        ids.len(),
        kinds.first,
        kinds.late,
        kinds.misses.len(),
        kinds.near,
        kinds.overlaps.len(),
        stale.len(),
        started.elapsed()
    );
    assert_eq!(ids.len(), MISS_IDS, "every id ran");
    // The herds' miss detector (HerdStats::runs.possible_misses) counts every true miss
    // (a run whose previous result completed after its caller called) and only runs after
    // an id's first.
    let (misses, repeats) = (kinds.misses.len() as u64, (runs.len() - kinds.first) as u64);
    assert!(
        misses <= possible_misses && possible_misses <= repeats,
        "{possible_misses} possible misses; {misses} misses, {repeats} runs after the first"
    );
    assert!(
        kinds.misses.is_empty(),
        "{} coalescing misses, e.g. {:#?}\ntimelines (µs since the first call):\n{}",
        kinds.misses.len(),
        kinds
            .misses
            .iter()
            .take(10)
            .map(|(_, miss)| miss)
            .collect::<Vec<_>>(),
        kinds
            .misses
            .iter()
            .take(3)
            .map(|&(id, _)| timeline(id, &runs, &calls))
            .collect::<String>()
    );
    assert!(
        kinds.overlaps.is_empty(),
        "{} overlapping runs, e.g. {:#?}",
        kinds.overlaps.len(),
        &kinds.overlaps[..kinds.overlaps.len().min(10)]
    );
    assert!(
        stale.is_empty(),
        "{} callers got a result that had completed before they called, e.g. {:#?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------
// 4. Commands per uncontended lock cycle

const CYCLES: u64 = 100;
const MAX_COMMANDS_PER_CYCLE: u64 = 5;

/// Calls per command from `INFO commandstats`.
pub(crate) fn command_stats(server: &RedisServer) -> BTreeMap<String, u64> {
    server
        .cmd(&["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Calls per command between two snapshots, leaving out commands with none.
fn stats_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, &calls)| {
            let delta = calls - before.get(name).copied().unwrap_or(0);
            (name.clone(), delta)
        })
        .filter(|&(_, delta)| delta > 0)
        .collect()
}

async fn uncontended_cycle(herd: &Herd, name: &str) {
    match herd.try_lock(name).await.expect("try_lock") {
        TryLock::Acquired(guard) => guard.release().await.expect("release"),
        TryLock::Busy(holder) => panic!("{name} is fresh, yet held by {holder:?}"),
    }
}

/// Issue 10, test 4: `try_lock` + `release` of a fresh name, with nobody waiting, costs at
/// most 5 Redis commands, counted by the server (`INFO commandstats`, which counts the
/// commands scripts run too). Only the `INFO` calls of the measurement are subtracted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_lock_cycle_costs_at_most_five_commands() {
    let server = RedisServer::start();
    let herd = Herd::builder()
        .prefix(unique_prefix("protocol_v2::commands"))
        .connect(&server.url())
        .await
        .expect("connect");
    // Scripts are loaded on first use (NOSCRIPT, SCRIPT LOAD), once per server: one cycle
    // first, so the measured cycles are the steady state.
    uncontended_cycle(&herd, "warm-up").await;
    // What one snapshot costs: an INFO counted in the next snapshot.
    let idle = stats_delta(&command_stats(&server), &command_stats(&server));
    let info_per_snapshot = idle.get("info").copied().unwrap_or(0);

    let before = command_stats(&server);
    for i in 0..CYCLES {
        uncontended_cycle(&herd, &format!("cycle-{i}")).await;
    }
    let mut delta = stats_delta(&before, &command_stats(&server));
    if let Some(info) = delta.get_mut("info") {
        *info -= info_per_snapshot;
    }
    delta.retain(|_, calls| *calls > 0);
    let total: u64 = delta.values().sum();
    let per_cycle: BTreeMap<&str, f64> = delta
        .iter()
        .map(|(name, &calls)| (name.as_str(), calls as f64 / CYCLES as f64))
        .collect();
    eprintln!(
        "commands per uncontended lock cycle: {:.2} {per_cycle:?}",
        total as f64 / CYCLES as f64
    );
    assert!(
        total <= MAX_COMMANDS_PER_CYCLE * CYCLES,
        "{CYCLES} try_lock + release cycles cost {total} Redis commands, {:.2} per cycle \
         (at most {MAX_COMMANDS_PER_CYCLE}): {per_cycle:?}",
        total as f64 / CYCLES as f64
    );
}
