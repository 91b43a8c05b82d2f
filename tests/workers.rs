//! The worker side of the cross-process tests: the test binary re-executes itself with
//! `HERDLOCK_WORKER_ROLE` set, and `worker_entry` runs that role as a real OS process.
//! Each role prints `ready`, waits for `go` on stdin (the start barrier), does its work
//! and prints result lines; the parent test (in `cross_process.rs`) checks them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{FanoutOptions, Herd, JobError, LockOptions, TryLock};

use crate::common::procs::{
    emit, worker_param, worker_read_line, worker_ready_and_wait_go, worker_role,
};

/// Not a test of its own: a no-op unless this process was started as a worker.
#[test]
fn worker_entry() {
    let Some(role) = worker_role() else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        match role.as_str() {
            "once_race" => once_race().await,
            "fence_ledger" => fence_ledger().await,
            "fanout_herd" => fanout_herd().await,
            "fanout_rounds" => fanout_rounds().await,
            "fanout_error" => fanout_error().await,
            "fanout_takeover" => fanout_takeover().await,
            "multi_race" => crate::workers_sem::multi_race().await,
            "multi_order" => crate::workers_sem::multi_order().await,
            "sem_hammer" => crate::workers_sem::sem_hammer().await,
            "sem_hold" => crate::workers_sem::sem_hold().await,
            "sem_wait" => crate::workers_sem::sem_wait().await,
            "lease_holder" => crate::workers_lease::lease_holder().await,
            "lease_waiter" => crate::workers_lease::lease_waiter().await,
            "lease_fanout" => crate::workers_lease::lease_fanout().await,
            "chaos" => crate::workers_lease::chaos().await,
            "flush_follower" => crate::data_loss::flush_follower().await,
            "fence_expiry" => crate::protocol_v2::fence_expiry().await,
            "fanout_misses" => crate::protocol_v2::fanout_misses().await,
            "abandon_leader" => crate::abandon::abandon_leader().await,
            "shutdown_holder" => crate::shutdown::shutdown_holder().await,
            other => panic!("unknown worker role {other}"),
        }
    });
}

/// The herd a worker uses: the parent's URL, key prefix and owner label.
pub(crate) async fn herd() -> Herd {
    Herd::builder()
        .prefix(worker_param("PREFIX"))
        .owner(worker_param("OWNER"))
        .connect(&worker_param("URL"))
        .await
        .expect("worker connects")
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(worker_param("URL"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

fn param_usize(name: &str) -> usize {
    worker_param(name)
        .parse()
        .expect("numeric worker parameter")
}

/// Blocks (off the runtime) until the parent writes `line` on stdin.
async fn wait_for_line(line: &'static str) {
    tokio::task::spawn_blocking(move || while worker_read_line() != line {})
        .await
        .expect("stdin reader");
}

/// Issue 2, test 1: contenders race `try_lock`; the winner holds until told `done`.
async fn once_race() {
    let herd = herd().await;
    let contenders = param_usize("CONTENDERS");
    let options = LockOptions::new().ttl(Duration::from_secs(30));
    worker_ready_and_wait_go();
    let attempts = (0..contenders).map(|_| {
        let (herd, options) = (herd.clone(), options.clone());
        tokio::spawn(async move { herd.try_lock_with("race", &options).await })
    });
    let mut guards = Vec::new();
    for attempt in attempts.collect::<Vec<_>>() {
        match attempt.await.expect("task").expect("try_lock") {
            TryLock::Acquired(guard) => {
                emit("result acquired");
                guards.push(guard);
            }
            TryLock::Busy(holder) => emit(&format!("result busy {}", holder.owner)),
        }
    }
    emit("attempted");
    wait_for_line("done").await;
    for guard in guards {
        guard.release().await.expect("release");
    }
    emit("finished");
}

/// Issue 2, test 2: blocking acquisitions; each holder checks its fence against a ledger.
async fn fence_ledger() {
    let herd = herd().await;
    let mut conn = raw().await;
    let n = param_usize("ACQUISITIONS");
    let ledger = format!("{}:ledger", worker_param("PREFIX"));
    worker_ready_and_wait_go();
    let mut fences = Vec::with_capacity(n);
    let mut violations = 0;
    for _ in 0..n {
        let guard = herd
            .lock("fenced", Duration::from_secs(30))
            .await
            .expect("lock");
        let fence = guard.fence().get();
        let last: Option<u64> = redis::cmd("GET")
            .arg(&ledger)
            .query_async(&mut conn)
            .await
            .expect("GET");
        if last.is_some_and(|last| last >= fence) {
            violations += 1;
        }
        let _: () = redis::cmd("SET")
            .arg(&ledger)
            .arg(fence)
            .query_async(&mut conn)
            .await
            .expect("SET");
        fences.push(fence);
        guard.release().await.expect("release");
    }
    let list: Vec<String> = fences.iter().map(u64::to_string).collect();
    emit(&format!("fences {}", list.join(",")));
    emit(&format!("violations {violations}"));
}

/// A job that counts its runs (and concurrent runs) in Redis, sleeps, and names its runner.
async fn counted_job(job_key: String, sleep: Duration) -> Result<String, JobError> {
    let mut conn = raw().await;
    let prefix = worker_param("PREFIX");
    let running: i64 = redis::cmd("INCR")
        .arg(format!("{prefix}:running:{job_key}"))
        .query_async(&mut conn)
        .await
        .map_err(JobError::from)?;
    let _: i64 = redis::cmd("INCR")
        .arg(format!("{prefix}:runs:{job_key}"))
        .query_async(&mut conn)
        .await?;
    if running > 1 {
        let _: i64 = redis::cmd("INCR")
            .arg(format!("{prefix}:overlaps"))
            .query_async(&mut conn)
            .await?;
    }
    tokio::time::sleep(sleep).await;
    let _: i64 = redis::cmd("DECR")
        .arg(format!("{prefix}:running:{job_key}"))
        .query_async(&mut conn)
        .await?;
    Ok(format!("ran by {}", worker_param("OWNER")))
}

/// Issue 3, test 1: callers in this process join one herd-wide run.
async fn fanout_herd() {
    let herd = herd().await;
    let callers = param_usize("CALLERS");
    let sleep = Duration::from_millis(param_usize("JOB_MS") as u64);
    worker_ready_and_wait_go();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let herd = herd.clone();
            tokio::spawn(async move {
                herd.fanout("herd", Duration::from_secs(20), move || {
                    counted_job("herd".into(), sleep)
                })
                .await
            })
        })
        .collect();
    for task in tasks {
        match task.await.expect("task") {
            Ok(value) => emit(&format!("value {value}")),
            Err(e) => emit(&format!("error {e}")),
        }
    }
}

/// Issue 3, test 2: many rounds of a 0 ms job; report errors and per-round results.
async fn fanout_rounds() {
    let herd = herd().await;
    let rounds = param_usize("ROUNDS");
    let callers = param_usize("CALLERS");
    worker_ready_and_wait_go();
    let mut errors = 0;
    let started = Instant::now();
    for round in 0..rounds {
        let job = format!("round-{round}");
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (herd, job) = (herd.clone(), job.clone());
                tokio::spawn(async move {
                    let key = job.clone();
                    herd.fanout(&job, Duration::from_secs(10), move || {
                        counted_job(key, Duration::ZERO)
                    })
                    .await
                })
            })
            .collect();
        for task in tasks {
            if task.await.expect("task").is_err() {
                errors += 1;
            }
        }
    }
    emit(&format!("errors {errors}"));
    emit(&format!("elapsed_ms {}", started.elapsed().as_millis()));
}

/// Issue 3, test 4: a failing job's error reaches every caller in every process.
async fn fanout_error() {
    let herd = herd().await;
    let callers = param_usize("CALLERS");
    worker_ready_and_wait_go();
    let owner = Arc::new(worker_param("OWNER"));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (herd, owner) = (herd.clone(), owner.clone());
            tokio::spawn(async move {
                herd.fanout("failing", Duration::from_secs(20), move || async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Err::<String, _>(
                        JobError::new(format!("boom from {owner}")).with_code("E_BOOM"),
                    )
                })
                .await
            })
        })
        .collect();
    for task in tasks {
        match task.await.expect("task") {
            Ok(v) => emit(&format!("value {v}")),
            Err(e) => emit(&format!(
                "error {:?}|{}|{}",
                e.kind(),
                e.job_error().map_or("-", JobError::message),
                e.job_error().and_then(JobError::code).unwrap_or("-")
            )),
        }
    }
}

/// Issue 3, test 6: a leader that will be killed, and followers that must take over.
async fn fanout_takeover() {
    let herd = herd().await;
    let callers = param_usize("CALLERS");
    let ttl = Duration::from_millis(param_usize("TTL_MS") as u64);
    let job_ms = param_usize("JOB_MS") as u64;
    worker_ready_and_wait_go();
    let options = FanoutOptions::new().ttl(ttl);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (herd, options) = (herd.clone(), options.clone());
            tokio::spawn(async move {
                herd.fanout_with(
                    "takeover",
                    Duration::from_secs(10),
                    &options,
                    move || async move {
                        emit("running");
                        counted_job("takeover".into(), Duration::from_millis(job_ms)).await
                    },
                )
                .await
            })
        })
        .collect();
    for task in tasks {
        match task.await.expect("task") {
            Ok(fanned) => emit(&format!(
                "value {} after_ms {}",
                fanned.value,
                started.elapsed().as_millis()
            )),
            Err(e) => emit(&format!("error {e}")),
        }
    }
}
