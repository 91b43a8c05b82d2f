//! Graceful shutdown (issue 12): `Herd::shutdown` refuses new work with `ShuttingDown`, ends
//! waits, makes heartbeats report draining, lets running fan-out jobs publish within the
//! grace period (and cancels them after it), releases every held lock, multi-lock and
//! permit at once, and stops the pub/sub listener. On both backends, and across two real
//! processes on Redis.

use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd, JobResult};
use tokio::sync::oneshot;

use crate::common::procs::{emit, worker_read_line, worker_ready_and_wait_go};
use crate::common::{ready_then_go, shared, unique_prefix, Worker, STEP_TIMEOUT};
use crate::fixture::{both_backends, within, Fx};

/// Well above every wait below: a lock freed "at once" is freed long before its TTL.
const TTL: Duration = Duration::from_secs(30);

fn kind<T: std::fmt::Debug>(result: herdlock::Result<T>) -> ErrorKind {
    result.expect_err("expected an error").kind()
}

/// A caller of `job` on `b` (whose own job would return "b ran it"), waiting as a follower.
async fn follow_job(fx: &Fx, b: &Herd) -> tokio::task::JoinHandle<herdlock::Result<String>> {
    let follower = {
        let b = b.clone();
        tokio::spawn(async move {
            b.fanout("job", Duration::from_secs(30), || async {
                Ok("b ran it".to_owned())
            })
            .await
        })
    };
    fx.wait_subscribed(&["job"]).await;
    follower
}

both_backends!(
    held_leases_are_released_and_new_work_refused,
    a_running_job_publishes_within_the_grace,
    a_run_past_the_grace_is_cancelled_and_released,
);

/// A lock, a multi-lock and a permit held through `a`; `b` waits for the lock. The shutdown
/// releases all three at once (b gets the lock well before the TTL), the holders are told
/// (lost tokens fire, `release` says `ShuttingDown`), and every new call on `a` is refused.
async fn held_leases_are_released_and_new_work_refused(fx: Fx) {
    let a = fx.node_with("a", |b| b.lock_ttl(TTL)).await;
    let b = fx.node("b").await;
    let guard = a.lock("held", Duration::from_secs(5)).await.expect("lock");
    let multi = a
        .multi(&["m1", "m2"], Duration::from_secs(5))
        .await
        .expect("multi");
    let semaphore = a.semaphore("sem", 1).expect("semaphore");
    let permit = semaphore
        .acquire(Duration::from_secs(5))
        .await
        .expect("permit");
    let lost = guard.lost_token();
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock("held", Duration::from_secs(20)).await })
    };
    fx.wait_subscribed(&["held"]).await;

    let started = Instant::now();
    let report = within(STEP_TIMEOUT, "shutdown", a.shutdown(Duration::from_secs(1)))
        .await
        .expect("shutdown");
    assert_eq!(report.released, 3, "{report:?}");
    assert_eq!(report.release_failures, 0, "{report:?}");
    assert_eq!(report.runs_finished + report.runs_cancelled, 0);
    assert!(a.is_shutting_down());
    assert!(lost.is_lost(), "the holder is told");
    // Another node waiting for the lock has it at once, not after the 30 s TTL.
    let taken = within(STEP_TIMEOUT, "b's wait", waiter)
        .await
        .expect("waiter task")
        .expect("b gets the lock");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "freed after {:?}",
        started.elapsed()
    );
    taken.release().await.expect("b releases");

    assert_eq!(kind(guard.release().await), ErrorKind::ShuttingDown);
    assert_eq!(kind(multi.release().await), ErrorKind::ShuttingDown);
    assert_eq!(kind(permit.release().await), ErrorKind::ShuttingDown);
    assert_eq!(kind(a.try_lock("new").await), ErrorKind::ShuttingDown);
    assert_eq!(
        kind(a.lock("new", Duration::from_secs(1)).await),
        ErrorKind::ShuttingDown
    );
    assert_eq!(
        kind(a.try_multi(&["n1", "n2"]).await),
        ErrorKind::ShuttingDown
    );
    assert_eq!(kind(semaphore.try_acquire().await), ErrorKind::ShuttingDown);
    let refused = a
        .fanout("job", Duration::from_secs(1), || async { Ok(1) })
        .await;
    assert_eq!(kind(refused), ErrorKind::ShuttingDown);
    // The other node is untouched.
    let fresh = b.try_lock("m1").await.expect("b works").acquired();
    fresh.expect("m1 is free").release().await.expect("release");
}

/// A job `a` leads is running when the shutdown begins: while the grace lasts, a heartbeat
/// on a guard reports draining and a lock wait on `a` is refused; the job then finishes and
/// its result reaches a follower on `b`; the report counts it finished.
async fn a_running_job_publishes_within_the_grace(fx: Fx) {
    let a = fx.node_with("a", |b| b.lock_ttl(TTL)).await;
    let b = fx.node("b").await;
    let (started_tx, started) = oneshot::channel();
    let (finish, finish_rx) = oneshot::channel::<()>();
    let leader = {
        let a = a.clone();
        tokio::spawn(async move {
            a.fanout("job", Duration::from_secs(30), move || async move {
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Ok("published".to_owned())
            })
            .await
        })
    };
    within(STEP_TIMEOUT, "the job starts", started)
        .await
        .expect("started");
    let follower = follow_job(&fx, &b).await;
    let guard = a.lock("held", Duration::from_secs(5)).await.expect("lock");
    let busy = b
        .lock("busy", Duration::from_secs(5))
        .await
        .expect("b's lock");
    let blocked = {
        let a = a.clone();
        tokio::spawn(async move { a.lock("busy", Duration::from_secs(20)).await })
    };
    fx.wait_subscribed(&["busy"]).await;

    let shutdown = {
        let a = a.clone();
        tokio::spawn(async move { a.shutdown(Duration::from_secs(20)).await })
    };
    // Draining: a's lock wait is refused, heartbeats report it.
    let refused = within(STEP_TIMEOUT, "a's lock wait", blocked)
        .await
        .expect("task");
    assert_eq!(kind(refused), ErrorKind::ShuttingDown);
    let deadline = Instant::now() + STEP_TIMEOUT;
    while guard.heartbeat().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "heartbeat never reported draining"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(kind(guard.heartbeat().await), ErrorKind::ShuttingDown);
    assert!(
        !shutdown.is_finished(),
        "the shutdown waits for the running job"
    );
    let _ = finish.send(());
    let report = within(STEP_TIMEOUT, "shutdown", shutdown)
        .await
        .expect("task")
        .expect("shutdown");
    assert_eq!(report.runs_finished, 1, "{report:?}");
    assert_eq!(report.runs_cancelled, 0, "{report:?}");
    assert_eq!(report.released, 1, "the guard: {report:?}");
    let led = leader.await.expect("task").expect("the leader's caller");
    assert_eq!(led, "published");
    let result = within(STEP_TIMEOUT, "follower", follower)
        .await
        .expect("task")
        .expect("the follower gets the result");
    assert_eq!(result, "published");
    busy.release().await.expect("b releases");
}

/// A job that never finishes: after the grace the run is cancelled and its lock released,
/// so a follower on `b` takes over and runs the job itself at once; `a`'s caller gets
/// `ShuttingDown`.
async fn a_run_past_the_grace_is_cancelled_and_released(fx: Fx) {
    let a = fx.node_with("a", |b| b.lock_ttl(TTL)).await;
    let b = fx.node("b").await;
    let (started_tx, started) = oneshot::channel();
    let leader = {
        let a = a.clone();
        tokio::spawn(async move {
            a.fanout_with(
                "job",
                Duration::from_secs(30),
                &FanoutOptions::new(),
                move || async move {
                    let _ = started_tx.send(());
                    std::future::pending::<JobResult<String>>().await
                },
            )
            .await
        })
    };
    within(STEP_TIMEOUT, "the job starts", started)
        .await
        .expect("started");
    let follower = follow_job(&fx, &b).await;
    let started = Instant::now();
    let report = within(
        STEP_TIMEOUT,
        "shutdown",
        a.shutdown(Duration::from_millis(200)),
    )
    .await
    .expect("shutdown");
    assert_eq!(report.runs_cancelled, 1, "{report:?}");
    assert_eq!(report.runs_finished, 0, "{report:?}");
    let led = within(STEP_TIMEOUT, "the leader's caller", leader)
        .await
        .expect("task");
    assert_eq!(kind(led), ErrorKind::ShuttingDown);
    let result = within(STEP_TIMEOUT, "follower", follower)
        .await
        .expect("task")
        .expect("b takes over");
    assert_eq!(result, "b ran it");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "b took over after {:?} (the TTL is 30 s)",
        started.elapsed()
    );
}

/// Worker role `shutdown_holder`: holds lock `held` (TTL 30 s), prints `holding`; on
/// `shutdown` shuts the herd down and prints `released N`; exits on `quit`.
pub(crate) async fn shutdown_holder() {
    let herd = Herd::builder()
        .prefix(crate::common::worker_param("PREFIX"))
        .owner("holder")
        .lock_ttl(TTL)
        .connect(&crate::common::worker_param("URL"))
        .await
        .expect("worker connects");
    worker_ready_and_wait_go();
    let guard = herd
        .lock("held", Duration::from_secs(5))
        .await
        .expect("lock");
    emit("holding");
    let line = tokio::task::spawn_blocking(worker_read_line)
        .await
        .expect("stdin");
    assert_eq!(line, "shutdown");
    let report = herd
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
    emit(&format!("released {}", report.released));
    drop(guard);
    let _ = tokio::task::spawn_blocking(worker_read_line).await;
}

/// Across two real processes: the worker holds a lock with a 30 s TTL; this process waits
/// for it; the worker's shutdown hands it over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_another_process_gets_the_lock_right_after_shutdown() {
    let server = shared();
    let prefix = unique_prefix("shutdown::processes");
    let mut worker = Worker::spawn(
        "workers::worker_entry",
        "shutdown_holder",
        &[("URL", server.url()), ("PREFIX", prefix.clone())],
    );
    tokio::task::block_in_place(|| {
        ready_then_go(std::slice::from_mut(&mut worker), STEP_TIMEOUT);
        worker.wait_line_prefix("holding", STEP_TIMEOUT);
    });
    let herd = Herd::builder()
        .prefix(prefix.clone())
        .owner("waiter")
        .connect(&server.url())
        .await
        .expect("connect");
    let waiter = {
        let herd = herd.clone();
        tokio::spawn(async move { herd.lock("held", Duration::from_secs(25)).await })
    };
    let channel = format!("{prefix}:{{held}}");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while server.subscribers(&channel) < 1 {
        assert!(Instant::now() < deadline, "the waiter never subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let asked = Instant::now();
    worker.send_line("shutdown");
    let guard = within(STEP_TIMEOUT, "the waiter", waiter)
        .await
        .expect("task")
        .expect("the waiter gets the lock");
    let took = asked.elapsed();
    tokio::task::block_in_place(|| {
        assert_eq!(
            worker.wait_line_prefix("released ", STEP_TIMEOUT),
            "released 1"
        );
    });
    assert!(
        took < Duration::from_secs(5),
        "got it {took:?} after the shutdown (TTL 30 s)"
    );
    eprintln!("shutdown hand-over across processes: {took:?}");
    guard.release().await.expect("release");
    worker.send_line("quit");
}

/// An acquisition already on its way to Redis when the herd shuts down (its reply held by a
/// frozen proxy): when the reply arrives after the shutdown, the guard comes back already
/// lost (its holder told) and what it took is released, so another node has the lock long
/// before its 30 s TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquisition_in_flight_during_shutdown_is_released_and_reported_lost() {
    let server = shared();
    let prefix = unique_prefix("shutdown::in_flight");
    let proxy = herdlock_testkit::proxy::Proxy::start(server);
    let a = Herd::builder()
        .prefix(prefix.clone())
        .owner("a")
        .lock_ttl(TTL)
        .command_timeout(Duration::from_secs(20))
        .connect(&proxy.url())
        .await
        .expect("connect through the proxy");
    let b = Herd::builder()
        .prefix(prefix.clone())
        .owner("b")
        .connect(&server.url())
        .await
        .expect("connect");
    proxy.freeze_replies();
    let acquiring = {
        let a = a.clone();
        tokio::spawn(async move { a.try_lock("k").await })
    };
    // The request reached Redis: "a" holds the lock there, its reply held back.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let status = b.lock_status("k").await.expect("status");
        if status.holder.is_some_and(|h| h.owner == "a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the acquisition never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = within(STEP_TIMEOUT, "shutdown", a.shutdown(Duration::ZERO))
        .await
        .expect("shutdown");
    assert_eq!(report.released, 0, "nothing was held yet: {report:?}");
    let started = Instant::now();
    proxy.thaw();
    let guard = within(STEP_TIMEOUT, "the acquisition", acquiring)
        .await
        .expect("task")
        .expect("the step's reply")
        .acquired()
        .expect("it had won on Redis");
    assert!(guard.is_lost(), "the holder is told at once");
    let taken = within(STEP_TIMEOUT, "b", b.lock("k", Duration::from_secs(25)))
        .await
        .expect("b gets the lock");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "freed after {:?} (TTL 30 s)",
        started.elapsed()
    );
    taken.release().await.expect("release");
}
