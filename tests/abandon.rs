//! Abandoned runs (issue 12): with `FanoutOptions::cancel_when_abandoned`, a leader cancels
//! its job once no caller anywhere waits for the run (its own callers timed out, no other
//! process subscribed), releases the lock at once and publishes nothing; while any caller
//! anywhere still waits, the job keeps running. On both backends, and across two real
//! processes on Redis.

use std::time::Duration;

use futures::future::BoxFuture;
use herdlock::{ErrorKind, FanoutOptions, JobError};

/// How often a leader checks for remote waiters (`FanoutOptions::cancel_when_abandoned`).
const ABANDON_CHECK_EVERY: Duration = Duration::from_millis(500);
use tokio::sync::oneshot;

use crate::common::procs::{emit, worker_read_line, worker_ready_and_wait_go};
use crate::common::{ready_then_go, shared, unique_prefix, Worker, STEP_TIMEOUT};
use crate::fixture::{both_backends, within, Fx};

/// Sends on drop: the job's future was dropped (cancelled) or finished.
struct OnDrop(Option<oneshot::Sender<()>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

type Job = Box<dyn FnOnce() -> BoxFuture<'static, Result<String, JobError>> + Send>;

/// A job that reports its start, reports being dropped, and finishes (with "done") only
/// when `finish` fires.
fn watched_job(
    started: oneshot::Sender<()>,
    dropped: oneshot::Sender<()>,
    finish: oneshot::Receiver<()>,
) -> Job {
    Box::new(move || {
        Box::pin(async move {
            let _dropped = OnDrop(Some(dropped));
            let _ = started.send(());
            let _ = finish.await;
            Ok("done".to_owned())
        })
    })
}

/// A job a follower passes: it must never run while the leader's run is in progress.
fn follower_job(value: &'static str) -> Job {
    Box::new(move || Box::pin(async move { Ok(value.to_owned()) }))
}

fn options() -> FanoutOptions {
    FanoutOptions::new().ttl(Duration::from_secs(10))
}

/// A leading call on `herd` with `cancel_when_abandoned`, whose caller waits `wait`, of a
/// [`watched_job`] that has started.
struct Watched {
    leader: tokio::task::JoinHandle<herdlock::Result<herdlock::Fanned<String>>>,
    dropped: oneshot::Receiver<()>,
    finish: oneshot::Sender<()>,
}

async fn lead_watched(herd: &herdlock::Herd, wait: Duration) -> Watched {
    let (started_tx, started) = oneshot::channel();
    let (dropped_tx, dropped) = oneshot::channel();
    let (finish, finish_rx) = oneshot::channel::<()>();
    let leader = {
        let herd = herd.clone();
        tokio::spawn(async move {
            herd.fanout_with(
                "job",
                wait,
                &options().cancel_when_abandoned(true),
                watched_job(started_tx, dropped_tx, finish_rx),
            )
            .await
        })
    };
    within(STEP_TIMEOUT, "the job starts", started)
        .await
        .expect("started");
    Watched {
        leader,
        dropped,
        finish,
    }
}

both_backends!(
    a_run_nobody_waits_for_is_cancelled,
    a_waiting_follower_keeps_the_run
);

/// The leader's caller and a follower on another node both time out: the job is cancelled
/// (dropped) within a few checks, the lock is free at once, and a later caller runs anew.
async fn a_run_nobody_waits_for_is_cancelled(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let Watched {
        leader,
        dropped,
        finish: _finish,
    } = lead_watched(&a, Duration::from_millis(400)).await;
    let followed = b
        .fanout_with(
            "job",
            Duration::from_millis(300),
            &options(),
            follower_job("b"),
        )
        .await;
    assert_eq!(
        followed.expect_err("the follower times out").kind(),
        ErrorKind::Timeout
    );
    let led = leader.await.expect("leader task");
    assert_eq!(led.expect_err("times out").kind(), ErrorKind::Timeout);
    // Nobody waits now: cancelled within the idle subscription's second plus a few checks.
    within(
        Duration::from_secs(2) + ABANDON_CHECK_EVERY * 6,
        "the abandoned job is cancelled",
        dropped,
    )
    .await
    .expect("dropped");
    // The lock was released at once: a new caller runs its own job right away.
    let again = within(
        STEP_TIMEOUT,
        "a later caller",
        b.fanout_with(
            "job",
            Duration::from_secs(5),
            &options(),
            follower_job("again"),
        ),
    )
    .await
    .expect("a new run");
    assert_eq!(again.value, "again");
}

/// The leader's own caller times out but a follower on another node still waits: the job
/// is not cancelled over several checks, and its result reaches the follower.
async fn a_waiting_follower_keeps_the_run(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let Watched {
        leader,
        mut dropped,
        finish,
    } = lead_watched(&a, Duration::from_millis(200)).await;
    let follower = {
        let b = b.clone();
        tokio::spawn(async move {
            b.fanout_with(
                "job",
                Duration::from_secs(30),
                &options(),
                follower_job("b"),
            )
            .await
        })
    };
    let led = leader.await.expect("leader task");
    assert_eq!(led.expect_err("times out").kind(), ErrorKind::Timeout);
    // Several checks pass while the follower waits: the job keeps running.
    let window = Duration::from_secs(1) + ABANDON_CHECK_EVERY * 4;
    assert!(
        tokio::time::timeout(window, &mut dropped).await.is_err(),
        "the job was cancelled while a follower waited"
    );
    let _ = finish.send(());
    let result = within(STEP_TIMEOUT, "the follower", follower)
        .await
        .expect("follower task")
        .expect("the follower gets the result");
    assert_eq!(result.value, "done");
}

/// Worker role `abandon_leader`: leads job `job` with `cancel_when_abandoned`, its caller
/// timing out after 400 ms; prints `started`, then `caller <kind>`, then `cancelled` when
/// the job is dropped unfinished; exits on `quit`.
pub(crate) async fn abandon_leader() {
    let herd = crate::workers::herd().await;
    worker_ready_and_wait_go();
    let Watched {
        leader,
        dropped,
        finish: _finish,
    } = lead_watched(&herd, Duration::from_millis(400)).await;
    emit("started");
    let kind = match leader.await.expect("caller task") {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("{:?}", e.kind()),
    };
    emit(&format!("caller {kind}"));
    if dropped.await.is_ok() {
        emit("cancelled");
    }
    let _ = tokio::task::spawn_blocking(worker_read_line).await;
}

/// Across two real processes on Redis: the worker leads, this process follows; when both
/// callers timed out, the worker's job is cancelled and the lock is free for a new run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_across_two_processes() {
    let server = shared();
    let prefix = unique_prefix("abandon::processes");
    let mut worker = Worker::spawn(
        "workers::worker_entry",
        "abandon_leader",
        &[
            ("URL", server.url()),
            ("PREFIX", prefix.clone()),
            ("OWNER", "leader".to_owned()),
        ],
    );
    tokio::task::block_in_place(|| ready_then_go(std::slice::from_mut(&mut worker), STEP_TIMEOUT));
    tokio::task::block_in_place(|| worker.wait_line_prefix("started", STEP_TIMEOUT));
    let herd = herdlock::Herd::builder()
        .prefix(prefix)
        .owner("follower")
        .connect(&server.url())
        .await
        .expect("connect");
    let followed = herd
        .fanout_with(
            "job",
            Duration::from_millis(600),
            &options(),
            follower_job("follower"),
        )
        .await;
    assert_eq!(
        followed.expect_err("the follower times out").kind(),
        ErrorKind::Timeout
    );
    tokio::task::block_in_place(|| {
        let caller = worker.wait_line_prefix("caller ", STEP_TIMEOUT);
        assert_eq!(caller, "caller Timeout");
        worker.wait_line_prefix("cancelled", STEP_TIMEOUT);
    });
    let again = within(
        STEP_TIMEOUT,
        "a later caller",
        herd.fanout_with(
            "job",
            Duration::from_secs(5),
            &options(),
            follower_job("again"),
        ),
    )
    .await
    .expect("a new run");
    assert_eq!(again.value, "again");
    worker.send_line("quit");
}
