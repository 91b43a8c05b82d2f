//! The worker side of `cross_process_sem.rs`: multi-key locks and semaphores in real OS
//! processes. Dispatched from `workers::worker_entry`; every role connects with the
//! `URL`, `PREFIX` and `OWNER` params, prints `ready`, waits for `go`, works and prints
//! `KEY value` result lines.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herdlock::{ErrorKind, Herd, Semaphore, SemaphoreOptions, TryPermit};

use crate::common::procs::{emit, worker_param, worker_read_line, worker_ready_and_wait_go};
use crate::workers::herd;

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(worker_param("URL"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

fn param_u64(name: &str) -> u64 {
    worker_param(name)
        .parse()
        .expect("numeric worker parameter")
}

fn param_ms(name: &str) -> Duration {
    Duration::from_millis(param_u64(name))
}

fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
}

/// Blocks (off the runtime) until the parent writes `line` on stdin.
async fn wait_for_line(line: &'static str) {
    tokio::task::spawn_blocking(move || while worker_read_line() != line {})
        .await
        .expect("stdin reader");
}

/// An independent occupancy counter in Redis: `enter` INCRs it and counts a violation
/// (in another key) when the new value exceeds `limit`; `leave` DECRs it.
#[derive(Clone)]
struct Occupancy {
    conn: redis::aio::MultiplexedConnection,
    inside: String,
    violations: String,
    limit: i64,
}

impl Occupancy {
    async fn new(name: &str, limit: i64) -> Occupancy {
        let prefix = worker_param("PREFIX");
        Occupancy {
            conn: raw().await,
            inside: format!("{prefix}:inside:{name}"),
            violations: format!("{prefix}:violations:{name}"),
            limit,
        }
    }

    /// Returns how many were inside, this caller included.
    async fn enter(&mut self) -> i64 {
        let now: i64 = redis::cmd("INCR")
            .arg(&self.inside)
            .query_async(&mut self.conn)
            .await
            .expect("INCR");
        if now > self.limit {
            let _: i64 = redis::cmd("INCR")
                .arg(&self.violations)
                .query_async(&mut self.conn)
                .await
                .expect("INCR");
        }
        now
    }

    async fn leave(&mut self) {
        let _: i64 = redis::cmd("DECR")
            .arg(&self.inside)
            .query_async(&mut self.conn)
            .await
            .expect("DECR");
    }
}

/// Issue 4, test 1: `ROUNDS` blocking `multi(5, 6, 7)` acquisitions; every holder checks
/// the independent counter.
pub(crate) async fn multi_race() {
    let herd = herd().await;
    let rounds = param_u64("ROUNDS");
    let mut occupancy = Occupancy::new("multi", 1).await;
    worker_ready_and_wait_go();
    let started = Instant::now();
    let (mut max, mut lost) = (0, 0);
    for round in 0..rounds {
        let guard = herd
            .multi(&["5", "6", "7"], Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        max = max.max(occupancy.enter().await);
        // Widen the window a little, so an overlap would be seen.
        tokio::time::sleep(Duration::from_millis(round % 2)).await;
        occupancy.leave().await;
        match guard.release().await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::LockLost => {
                emit(&format!("lost_key {e}"));
                lost += 1;
            }
            Err(e) => panic!("round {round}: release: {e}"),
        }
    }
    emit(&format!("max {max}"));
    emit(&format!("lost {lost}"));
    emit(&format!("done {rounds}"));
    emit(&format!("elapsed_ms {}", started.elapsed().as_millis()));
}

/// Issue 4, test 2: `ROUNDS` blocking multi-locks of `KEYS` (comma-separated, in the order
/// given): progress in both orders, no deadlock.
pub(crate) async fn multi_order() {
    let herd = herd().await;
    let rounds = param_u64("ROUNDS");
    let keys = worker_param("KEYS");
    let keys: Vec<&str> = keys.split(',').collect();
    let mut occupancy = Occupancy::new("order", 1).await;
    worker_ready_and_wait_go();
    let started = Instant::now();
    for round in 0..rounds {
        let guard = herd
            .multi(&keys, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        occupancy.enter().await;
        occupancy.leave().await;
        guard.release().await.expect("release");
    }
    emit(&format!("done {rounds}"));
    emit(&format!("elapsed_ms {}", started.elapsed().as_millis()));
}

fn semaphore(herd: &Herd) -> Semaphore {
    herd.semaphore_with(
        &worker_param("KEY"),
        u32::try_from(param_u64("PERMITS")).expect("permits"),
        &SemaphoreOptions::new()
            .lease(param_ms("LEASE_MS"))
            .fair(worker_param("FAIR") == "1"),
    )
    .expect("semaphore")
}

/// Issue 5, test 5: `TASKS` tasks × `HOLDS` holds of a semaphore of `PERMITS`, each hold
/// 0–2 ms; every holder checks the independent counter.
pub(crate) async fn sem_hammer() {
    let herd = herd().await;
    let sem = semaphore(&herd);
    let tasks = param_u64("TASKS");
    let holds = param_u64("HOLDS");
    let limit = i64::try_from(param_u64("PERMITS")).expect("permits");
    let occupancy = Occupancy::new(&worker_param("KEY"), limit).await;
    worker_ready_and_wait_go();
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (sem, mut occupancy) = (sem.clone(), occupancy.clone());
            tokio::spawn(async move {
                let (mut max, mut errors) = (0, 0);
                for hold in 0..holds {
                    let permit = match sem.acquire(Duration::from_secs(60)).await {
                        Ok(permit) => permit,
                        Err(e) => {
                            emit(&format!("error task {task} hold {hold}: {e}"));
                            errors += 1;
                            continue;
                        }
                    };
                    max = max.max(occupancy.enter().await);
                    tokio::time::sleep(Duration::from_millis((task + hold) % 3)).await;
                    occupancy.leave().await;
                    if let Err(e) = permit.release().await {
                        emit(&format!("error task {task} hold {hold} release: {e}"));
                        errors += 1;
                    }
                }
                (holds - errors, max, errors)
            })
        })
        .collect();
    let (mut completed, mut max, mut errors) = (0, 0, 0);
    for handle in handles {
        let (c, m, e) = handle.await.expect("task");
        completed += c;
        max = max.max(m);
        errors += e;
    }
    emit(&format!("completed {completed}"));
    emit(&format!("max {max}"));
    emit(&format!("errors {errors}"));
    emit(&format!("elapsed_ms {}", started.elapsed().as_millis()));
}

/// Issues 5, tests 6 and 8: takes a permit (waiting up to 10 s), prints `holding`, and
/// holds it until told `release` (or until killed).
pub(crate) async fn sem_hold() {
    let herd = herd().await;
    let sem = semaphore(&herd);
    worker_ready_and_wait_go();
    let permit = sem
        .acquire(Duration::from_secs(10))
        .await
        .expect("the holder gets a permit");
    emit("holding");
    wait_for_line("release").await;
    assert!(!permit.is_lost(), "the holder's permit was lost");
    permit.release().await.expect("release");
    emit("released");
}

/// Issues 5, tests 6 and 8: after `go`, checks the semaphore is full, prints `waiting`, then
/// waits up to `WAIT_MS` for a permit; once admitted INCRs `PREFIX:order` and prints
/// `acquired SEQ EPOCH_MS`, holds `HOLD_MS` and releases.
pub(crate) async fn sem_wait() {
    let herd = herd().await;
    let sem = semaphore(&herd);
    let mut conn = raw().await;
    let order = format!("{}:order", worker_param("PREFIX"));
    worker_ready_and_wait_go();
    match sem.try_acquire().await.expect("try_acquire") {
        TryPermit::Busy { .. } => emit("waiting"),
        TryPermit::Acquired(p) => panic!("the semaphore should be full, got {p:?}"),
    }
    let permit = sem
        .acquire(param_ms("WAIT_MS"))
        .await
        .expect("the waiter gets a permit");
    let seq: i64 = redis::cmd("INCR")
        .arg(&order)
        .query_async(&mut conn)
        .await
        .expect("INCR");
    emit(&format!("acquired {seq} {}", epoch_ms()));
    tokio::time::sleep(param_ms("HOLD_MS")).await;
    permit.release().await.expect("release");
    emit("released");
}
