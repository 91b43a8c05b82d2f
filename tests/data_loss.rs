//! Data loss during a fan-out run (issue 9, test 5): Redis forgets everything (FLUSHALL)
//! while followers in this process and in other processes wait for the run. The fence
//! counter starts again, so the generation they waited for never comes: they must take the
//! new run's result (at most one extra run) and every caller resolves before its deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd};

use crate::common::procs::{
    emit, ready_then_go, worker_param, worker_ready_and_wait_go, Worker, WorkerOutput,
};
use crate::common::server::RedisServer;
use crate::common::STEP_TIMEOUT;
use crate::fixture::within;

const ENTRY: &str = "workers::worker_entry";
const JOB: &str = "report";
/// The run's lease: followers re-check when it would have run out.
const TTL: Duration = Duration::from_millis(1500);
/// Every caller's own deadline.
const CALLER_TIMEOUT: Duration = Duration::from_secs(20);
const LOCAL_FOLLOWERS: usize = 2;
const REMOTE_FOLLOWERS: usize = 2;
const CALLERS: usize = 3;

fn options() -> FanoutOptions {
    FanoutOptions::new().ttl(TTL)
}

/// Bounded polling until `herd` has a flight following another node's run.
async fn until_following(herd: &Herd) {
    within(STEP_TIMEOUT, "a flight following the run", async {
        while herd.stats().following == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Worker role: `CALLERS` callers of the job on one herd; each prints `value <v> after_ms
/// <ms>` or `error <kind> <message>`, and every run of the job here prints `ran`.
pub(crate) async fn flush_follower() {
    let herd = crate::workers::herd().await;
    let callers: usize = worker_param("CALLERS").parse().expect("CALLERS");
    let owner = worker_param("OWNER");
    worker_ready_and_wait_go();
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (herd, owner) = (herd.clone(), owner.clone());
            tokio::spawn(async move {
                herd.fanout_with(JOB, CALLER_TIMEOUT, &options(), move || async move {
                    emit("ran");
                    Ok(format!("ran by {owner}"))
                })
                .await
            })
        })
        .collect();
    until_following(&herd).await;
    emit("following");
    for task in tasks {
        match task.await.expect("caller task") {
            Ok(fanned) => emit(&format!(
                "value {} after_ms {}",
                fanned.value,
                started.elapsed().as_millis()
            )),
            Err(e) => emit(&format!("error {:?} {e}", e.kind())),
        }
    }
}

/// Collects the worker processes' results: every value they got and how many runs of the
/// job they made.
fn remote_results(workers: Vec<Worker>) -> (Vec<String>, usize) {
    let outputs: Vec<WorkerOutput> = workers
        .into_iter()
        .map(|w| {
            let out = w.finish(CALLER_TIMEOUT + STEP_TIMEOUT);
            out.assert_success();
            out
        })
        .collect();
    let mut values = Vec::new();
    let mut runs = 0;
    for out in &outputs {
        assert!(out.values("error").is_empty(), "{out:#?}");
        runs += out.lines.iter().filter(|l| *l == "ran").count();
        let lines = out.values("value");
        assert_eq!(lines.len(), CALLERS, "{out:#?}");
        for line in lines {
            let (value, after) = line.split_once(" after_ms ").expect("value line");
            let after: u128 = after.parse().expect("ms");
            assert!(
                after < CALLER_TIMEOUT.as_millis(),
                "resolved after {after} ms"
            );
            values.push(value.to_owned());
        }
    }
    (values, runs)
}

/// Spawns the follower processes and gets them past the start barrier.
fn spawn_followers(server: &RedisServer, prefix: &str) -> Vec<Worker> {
    let mut workers: Vec<Worker> = (0..REMOTE_FOLLOWERS)
        .map(|i| {
            Worker::spawn(
                ENTRY,
                "flush_follower",
                &[
                    ("URL", server.url()),
                    ("PREFIX", prefix.to_owned()),
                    ("OWNER", format!("proc-{i}")),
                    ("CALLERS", CALLERS.to_string()),
                ],
            )
        })
        .collect();
    ready_then_go(&mut workers, STEP_TIMEOUT);
    workers
}

/// Issue 9, test 5: FLUSHALL while a run of generation 11 is in progress, followed by two
/// herds here and two other processes (three callers each). The leader learns it lost the
/// lease and cancels its run; the followers find the lock gone, one of them runs the job
/// again (generation 1), and everyone takes that run's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_during_fanout_run() {
    let server = RedisServer::start();
    let prefix = "fl";
    // The counter stands at 10, so the run is generation 11 and the one after the flush is
    // generation 1: the followers see the generation go down.
    server.cmd(&["SET", &format!("{prefix}:{{{JOB}}}:fence"), "10"]);
    let node = |owner: &'static str| {
        let url = server.url();
        async move {
            Herd::builder()
                .prefix(prefix)
                .owner(owner)
                .connect(&url)
                .await
                .expect("connect")
        }
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let job = |owner: &'static str, started: Option<tokio::sync::mpsc::Sender<()>>| {
        let runs = Arc::clone(&runs);
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if let Some(started) = started {
                // The run that will be lost: it holds until its lease is found lost.
                let _ = started.send(()).await;
                std::future::pending::<()>().await;
            }
            Ok(format!("ran by {owner}"))
        }
    };
    let call = |herd: &Herd, job| {
        let herd = herd.clone();
        tokio::spawn(async move {
            let result = herd.fanout_with(JOB, CALLER_TIMEOUT, &options(), job).await;
            (result, Instant::now())
        })
    };

    // The leader's run, with two callers sharing it.
    let leader = node("leader").await;
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(1);
    let begun = Instant::now();
    let leader_calls: Vec<_> = (0..2)
        .map(|_| call(&leader, job("leader", Some(started_tx.clone()))))
        .collect();
    within(STEP_TIMEOUT, "the leader's run starting", started_rx.recv())
        .await
        .expect("the run started");

    // Followers: two herds here, two processes.
    let mut local_calls = Vec::new();
    let mut local_nodes = Vec::new();
    for owner in ["local-1", "local-2"].into_iter().take(LOCAL_FOLLOWERS) {
        let herd = node(owner).await;
        for _ in 0..CALLERS {
            local_calls.push(call(&herd, job(owner, None)));
        }
        local_nodes.push(herd);
    }
    let mut workers = spawn_followers(&server, prefix);
    for herd in &local_nodes {
        until_following(herd).await;
    }
    for worker in &mut workers {
        worker.wait_line_prefix("following", STEP_TIMEOUT);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the leader ran so far");

    // Redis forgets everything.
    assert_eq!(server.cmd(&["FLUSHALL"]), "OK");
    let flushed_at = Instant::now();

    let deadline = begun + CALLER_TIMEOUT;
    for task in leader_calls {
        let (result, at) = within(CALLER_TIMEOUT, "a leader caller", task)
            .await
            .expect("caller task");
        let err = result.expect_err("the leader's run was lost with Redis's data");
        assert_eq!(err.kind(), ErrorKind::LockLost, "{err}");
        assert!(at < deadline, "resolved after its deadline");
    }
    let mut values = Vec::new();
    for task in local_calls {
        let (result, at) = within(CALLER_TIMEOUT, "a local follower", task)
            .await
            .expect("caller task");
        let fanned = result.expect("a local follower gets the new run's result");
        assert!(at < deadline, "resolved after its deadline");
        values.push(fanned.value);
    }
    let (remote_values, remote_runs) = remote_results(workers);
    values.extend(remote_values);
    let extra_runs = runs.load(Ordering::SeqCst) - 1 + remote_runs;
    assert_eq!(
        extra_runs, 1,
        "exactly one run after the flush (the lost one is not counted)"
    );
    assert_eq!(values.len(), (LOCAL_FOLLOWERS + REMOTE_FOLLOWERS) * CALLERS);
    assert!(
        values.windows(2).all(|w| w[0] == w[1]),
        "every follower got the same, new run's result: {values:?}"
    );
    eprintln!(
        "flushall: every caller resolved {:?} after the flush; values {:?}",
        flushed_at.elapsed(),
        values[0]
    );
}
