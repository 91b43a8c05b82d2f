//! Multi-key locks and semaphores across real OS processes (see `workers_sem.rs` for their
//! side). Holders count themselves in an independent Redis counter (INCR on entry, DECR on
//! exit; a reply above the limit is counted as a violation in another key).

use std::time::{Duration, Instant};

use crate::common::procs::{ready_then_go, Worker, WorkerOutput};
use crate::common::server::{self, RedisServer};

const ENTRY: &str = "workers::worker_entry";

fn spawn(role: &str, owner: &str, prefix: &str, params: &[(&str, String)]) -> Worker {
    let mut all = vec![
        ("URL", server::shared().url()),
        ("PREFIX", prefix.to_owned()),
        ("OWNER", owner.to_owned()),
    ];
    all.extend(params.iter().cloned());
    Worker::spawn(ENTRY, role, &all)
}

fn finish_all(workers: Vec<Worker>, timeout: Duration) -> Vec<WorkerOutput> {
    let deadline = Instant::now() + timeout;
    workers
        .into_iter()
        .map(|w| {
            let out = w.finish(deadline.saturating_duration_since(Instant::now()));
            out.assert_success();
            out
        })
        .collect()
}

fn get(server: &RedisServer, key: &str) -> i64 {
    server.cmd(&["GET", key]).trim().parse().unwrap_or(0)
}

/// The single value of a `KEY value` line, parsed.
fn value<T: std::str::FromStr>(out: &WorkerOutput, key: &str) -> T {
    let values = out.values(key);
    assert_eq!(values.len(), 1, "one `{key}` line expected: {out:#?}");
    values[0]
        .parse()
        .unwrap_or_else(|_| panic!("bad `{key}` line: {out:#?}"))
}

/// Polls `check` every 5 ms until it holds (bounded by `timeout`).
fn poll_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Issue 4, test 1: 10 processes race blocking `multi(5, 6, 7)`, 20 acquisitions each: at
/// most one holds the three at any moment, and everybody finishes.
#[test]
fn multi_race_across_processes() {
    const PROCS: usize = 10;
    const ROUNDS: u64 = 20;
    let server = server::shared();
    let prefix = server::unique_prefix("multi_race");
    let started = Instant::now();
    let mut workers: Vec<Worker> = (0..PROCS)
        .map(|i| {
            spawn(
                "multi_race",
                &format!("proc-{i}"),
                &prefix,
                &[("ROUNDS", ROUNDS.to_string())],
            )
        })
        .collect();
    ready_then_go(&mut workers, Duration::from_secs(30));
    let outputs = finish_all(workers, Duration::from_secs(120));
    for out in &outputs {
        assert_eq!(value::<u64>(out, "done"), ROUNDS, "{out:#?}");
        assert_eq!(value::<u64>(out, "lost"), 0, "{out:#?}");
        assert_eq!(value::<i64>(out, "max"), 1, "{out:#?}");
    }
    assert_eq!(get(server, &format!("{prefix}:violations:multi")), 0);
    assert_eq!(get(server, &format!("{prefix}:inside:multi")), 0);
    // Every acquisition was released: nothing is left behind.
    for key in ["5", "6", "7"] {
        let lock = format!("{prefix}:{{{key}}}:lock");
        assert_eq!(server.cmd(&["EXISTS", &lock]), "0", "{key} left held");
    }
    eprintln!(
        "multi_race_across_processes: {} acquisitions in {:?}",
        PROCS as u64 * ROUNDS,
        started.elapsed()
    );
}

/// Issue 4, test 2: two processes take `multi(a, b)` and `multi(b, a)` 200 times each: both
/// make progress and finish, never overlapping.
#[test]
fn multi_opposite_orders_do_not_deadlock() {
    const ROUNDS: u64 = 200;
    let server = server::shared();
    let prefix = server::unique_prefix("multi_order");
    let started = Instant::now();
    let mut workers: Vec<Worker> = ["a,b", "b,a"]
        .iter()
        .enumerate()
        .map(|(i, keys)| {
            spawn(
                "multi_order",
                &format!("proc-{i}"),
                &prefix,
                &[("ROUNDS", ROUNDS.to_string()), ("KEYS", (*keys).to_owned())],
            )
        })
        .collect();
    ready_then_go(&mut workers, Duration::from_secs(30));
    let outputs = finish_all(workers, Duration::from_secs(60));
    for out in &outputs {
        assert_eq!(value::<u64>(out, "done"), ROUNDS, "{out:#?}");
    }
    assert_eq!(get(server, &format!("{prefix}:violations:order")), 0);
    for key in ["a", "b"] {
        let lock = format!("{prefix}:{{{key}}}:lock");
        assert_eq!(server.cmd(&["EXISTS", &lock]), "0", "{key} left held");
    }
    eprintln!(
        "multi_opposite_orders_do_not_deadlock: {} acquisitions in {:?}",
        2 * ROUNDS,
        started.elapsed()
    );
}

/// Issue 5, test 5: a semaphore of `permits` over 4 processes × 25 tasks × 20 holds of
/// 0–2 ms: simultaneous holders never exceed `permits`, and every hold completes.
fn semaphore_hammer(permits: u32) {
    const PROCS: usize = 4;
    const TASKS: u64 = 25;
    const HOLDS: u64 = 20;
    let server = server::shared();
    let prefix = server::unique_prefix(&format!("sem_hammer_{permits}"));
    let key = "pool";
    let started = Instant::now();
    let mut workers: Vec<Worker> = (0..PROCS)
        .map(|i| {
            spawn(
                "sem_hammer",
                &format!("proc-{i}"),
                &prefix,
                &[
                    ("KEY", key.to_owned()),
                    ("PERMITS", permits.to_string()),
                    ("LEASE_MS", "10000".to_owned()),
                    ("FAIR", "0".to_owned()),
                    ("TASKS", TASKS.to_string()),
                    ("HOLDS", HOLDS.to_string()),
                ],
            )
        })
        .collect();
    ready_then_go(&mut workers, Duration::from_secs(30));
    let went = Instant::now();
    let outputs = finish_all(workers, Duration::from_secs(120));
    let elapsed = went.elapsed();
    let mut max_seen = 0;
    let mut slowest = 0;
    for out in &outputs {
        assert_eq!(value::<u64>(out, "errors"), 0, "{out:#?}");
        assert_eq!(value::<u64>(out, "completed"), TASKS * HOLDS, "{out:#?}");
        let max: i64 = value(out, "max");
        assert!(max <= i64::from(permits), "{max} holders at once: {out:#?}");
        max_seen = max_seen.max(max);
        slowest = slowest.max(value::<u64>(out, "elapsed_ms"));
    }
    assert_eq!(get(server, &format!("{prefix}:violations:{key}")), 0);
    assert_eq!(get(server, &format!("{prefix}:inside:{key}")), 0);
    // The semaphore admits N at once (it is not a mutex): with 100 contenders, N is reached.
    assert_eq!(max_seen, i64::from(permits), "at most {max_seen} at once");
    let status = server.cmd(&["ZCARD", &format!("{prefix}:{{{key}}}:sem")]);
    assert_eq!(status, "0", "holders left behind");
    eprintln!(
        "semaphore N={permits}: {} holds over {PROCS} processes in {elapsed:?} (slowest worker {slowest} ms, {:?} with startup)",
        PROCS as u64 * TASKS * HOLDS,
        started.elapsed()
    );
}

#[test]
fn semaphore_of_three_across_processes() {
    semaphore_hammer(3);
}

#[test]
fn semaphore_of_one_across_processes() {
    semaphore_hammer(1);
}

fn sem_params(
    key: &str,
    lease_ms: u64,
    fair: bool,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut params = vec![
        ("KEY", key.to_owned()),
        ("PERMITS", "1".to_owned()),
        ("LEASE_MS", lease_ms.to_string()),
        ("FAIR", if fair { "1" } else { "0" }.to_owned()),
    ];
    params.extend(extra.iter().cloned());
    params
}

/// Issue 5, test 6: the holder process is `kill -9`ed while holding (lease 2 s); its permit
/// returns when the lease runs out and a waiter in another process gets it, less than
/// lease + 1.5 s after the kill.
#[test]
fn killed_holder_permit_returns_within_lease() {
    const LEASE_MS: u64 = 2000;
    let server = server::shared();
    let prefix = server::unique_prefix("sem_killed");
    let key = "killed";
    let holder_params = sem_params(key, LEASE_MS, false, &[]);
    let waiter_params = sem_params(
        key,
        LEASE_MS,
        false,
        &[("WAIT_MS", "20000".to_owned()), ("HOLD_MS", "0".to_owned())],
    );
    let mut holder = vec![spawn("sem_hold", "holder", &prefix, &holder_params)];
    let mut waiter = vec![spawn("sem_wait", "waiter", &prefix, &waiter_params)];
    ready_then_go(&mut holder, Duration::from_secs(30));
    holder[0].wait_line_prefix("holding", Duration::from_secs(30));
    ready_then_go(&mut waiter, Duration::from_secs(30));
    waiter[0].wait_line_prefix("waiting", Duration::from_secs(30));
    let channel = format!("{prefix}:{{{key}}}");
    poll_until("the waiter subscribes", Duration::from_secs(10), || {
        server.subscribers(&channel) >= 1
    });
    // Let the holder's watchdog renew at least once: the permit outlives its first lease.
    std::thread::sleep(Duration::from_millis(LEASE_MS + 300));
    let holders = server.cmd(&["ZRANGE", &format!("{prefix}:{{{key}}}:sem"), "0", "-1"]);
    assert!(
        holders.ends_with(":holder"),
        "held by the holder: {holders:?}"
    );
    let killed_at = Instant::now();
    holder[0].kill9();
    let line = waiter[0].wait_line_prefix("acquired ", Duration::from_secs(10));
    let after = killed_at.elapsed();
    assert!(
        after < Duration::from_millis(LEASE_MS + 1500),
        "the waiter got the permit {after:?} after the kill ({line})"
    );
    // A killed holder's permit is not freed before its lease runs out (it was renewed at
    // most a third of the lease before the kill).
    assert!(
        after > Duration::from_millis(LEASE_MS / 3),
        "the waiter got the permit only {after:?} after the kill"
    );
    let waiter = waiter.pop().expect("one");
    waiter.finish(Duration::from_secs(30)).assert_success();
    eprintln!("killed_holder_permit_returns_within_lease: admitted {after:?} after kill -9 (lease {LEASE_MS} ms)");
}

/// Issue 5, test 8: fair mode across processes: waiters queued in a known order (waiter k
/// starts only once k waiters are in the Redis queue) are admitted in that order as the
/// holder and then each waiter releases.
#[test]
fn fair_waiters_across_processes_are_admitted_in_order() {
    const WAITERS: usize = 4;
    let server = server::shared();
    let prefix = server::unique_prefix("sem_fair");
    let key = "fair";
    let queue = format!("{prefix}:{{{key}}}:semq");
    let mut holder = vec![spawn(
        "sem_hold",
        "holder",
        &prefix,
        &sem_params(key, 30_000, true, &[]),
    )];
    let waiter_params = sem_params(
        key,
        30_000,
        true,
        &[
            ("WAIT_MS", "30000".to_owned()),
            ("HOLD_MS", "50".to_owned()),
        ],
    );
    let mut waiters: Vec<Worker> = (0..WAITERS)
        .map(|k| spawn("sem_wait", &format!("waiter-{k}"), &prefix, &waiter_params))
        .collect();
    ready_then_go(&mut holder, Duration::from_secs(30));
    holder[0].wait_line_prefix("holding", Duration::from_secs(30));
    for (k, waiter) in waiters.iter_mut().enumerate() {
        let ready = waiter.wait_line_prefix("ready", Duration::from_secs(30));
        assert_eq!(ready, "ready");
        waiter.send_line("go");
        waiter.wait_line_prefix("waiting", Duration::from_secs(30));
        let expected = (k + 1).to_string();
        poll_until(
            &format!("waiter {k} is queued"),
            Duration::from_secs(10),
            || server.cmd(&["ZCARD", &queue]) == expected,
        );
    }
    holder[0].send_line("release");
    holder[0].wait_line_prefix("released", Duration::from_secs(30));
    let mut last_ms = 0;
    for (k, waiter) in waiters.iter_mut().enumerate() {
        let line = waiter.wait_line_prefix("acquired ", Duration::from_secs(30));
        let mut parts = line.split(' ').skip(1);
        let seq: usize = parts.next().and_then(|s| s.parse().ok()).expect("seq");
        let at_ms: u128 = parts.next().and_then(|s| s.parse().ok()).expect("ms");
        assert_eq!(seq, k + 1, "waiter {k} was admitted as number {seq}");
        assert!(at_ms >= last_ms, "admission times out of order");
        last_ms = at_ms;
    }
    let holder = holder.pop().expect("one");
    holder.finish(Duration::from_secs(30)).assert_success();
    finish_all(waiters, Duration::from_secs(30));
    assert_eq!(server.cmd(&["ZCARD", &queue]), "0");
}

/// A fair waiter process `kill -9`ed while queued at the head blocks the queue at most
/// `QUEUE_TTL`: after the holder releases, the next waiter (another process) is admitted
/// less than `QUEUE_TTL` + 1.5 s after the kill.
#[test]
fn killed_fair_waiter_is_dropped_from_the_queue() {
    let server = server::shared();
    let prefix = server::unique_prefix("sem_fair_killed");
    let key = "fairkill";
    let queue = format!("{prefix}:{{{key}}}:semq");
    let mut holder = vec![spawn(
        "sem_hold",
        "holder",
        &prefix,
        &sem_params(key, 30_000, true, &[]),
    )];
    let waiter_params = sem_params(
        key,
        30_000,
        true,
        &[("WAIT_MS", "30000".to_owned()), ("HOLD_MS", "0".to_owned())],
    );
    let mut waiters: Vec<Worker> = ["doomed", "next"]
        .iter()
        .map(|owner| spawn("sem_wait", owner, &prefix, &waiter_params))
        .collect();
    ready_then_go(&mut holder, Duration::from_secs(30));
    holder[0].wait_line_prefix("holding", Duration::from_secs(30));
    for (k, waiter) in waiters.iter_mut().enumerate() {
        let ready = waiter.wait_line_prefix("ready", Duration::from_secs(30));
        assert_eq!(ready, "ready");
        waiter.send_line("go");
        waiter.wait_line_prefix("waiting", Duration::from_secs(30));
        let expected = (k + 1).to_string();
        poll_until(
            &format!("waiter {k} is queued"),
            Duration::from_secs(10),
            || server.cmd(&["ZCARD", &queue]) == expected,
        );
    }
    let killed_at = Instant::now();
    waiters[0].kill9();
    holder[0].send_line("release");
    holder[0].wait_line_prefix("released", Duration::from_secs(30));
    let line = waiters[1].wait_line_prefix("acquired ", Duration::from_secs(30));
    let after = killed_at.elapsed();
    let limit = herdlock::limits::QUEUE_TTL + Duration::from_millis(1500);
    assert!(
        after < limit,
        "the next waiter was admitted {after:?} after the kill ({line})"
    );
    let next = waiters.pop().expect("two");
    next.finish(Duration::from_secs(30)).assert_success();
    let holder = holder.pop().expect("one");
    holder.finish(Duration::from_secs(30)).assert_success();
    assert_eq!(server.cmd(&["ZCARD", &queue]), "0");
    eprintln!(
        "killed_fair_waiter_is_dropped_from_the_queue: next admitted {after:?} after kill -9"
    );
}
