//! Fan-out and push in one process, across several nodes (both backends).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{Codec, ErrorKind, FanoutOptions, Herd, JobError, Push, Role};
use tokio::sync::oneshot;

use crate::fixture::{both_backends, within, Fx};

/// A caller's wait where the test does not time out.
const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    herd_of_nodes_runs_once,
    errors_and_panics_reach_every_waiter,
    per_caller_deadlines,
    leaders_own_timeout_does_not_stop_the_job,
    job_longer_than_ttl_runs_once,
    no_stale_results,
    dropping_the_leaders_caller_keeps_the_job,
    push_leader_and_followers,
    push_dropped_completer_does_not_hang,
    codecs_and_unusable_results,
    max_duration_and_bad_options,
    a_panic_while_cancelling_does_not_wedge_the_id,
    ten_thousand_local_callers,
    one_job_id_has_one_result_type,
);

fn counting_job(
    runs: &Arc<AtomicUsize>,
    delay: Duration,
    value: &str,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<String, JobError>> + Send + 'static
{
    let runs = Arc::clone(runs);
    let value = value.to_owned();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Ok(value)
        })
    }
}

/// Issue 3, test 1 (in-process form): 3 nodes × 10 callers, job 300 ms, one run.
async fn herd_of_nodes_runs_once(fx: Fx) {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..3 {
        let node = fx.node(&format!("node-{n}")).await;
        for _ in 0..10 {
            let node = node.clone();
            let job = counting_job(&runs, Duration::from_millis(300), "the answer");
            tasks.push(tokio::spawn(async move {
                node.fanout_with("herd", Duration::from_secs(10), &FanoutOptions::new(), job)
                    .await
            }));
        }
    }
    let mut roles = HashMap::new();
    for task in tasks {
        let fanned = within(Duration::from_secs(15), "caller", task)
            .await
            .expect("task")
            .expect("fanout");
        assert_eq!(fanned.value, "the answer");
        *roles.entry(fanned.role).or_insert(0) += 1;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(roles.get(&Role::Leader), Some(&1));
    assert_eq!(roles.get(&Role::Follower), Some(&29));
}

/// Issue 3, test 4 (in-process form).
async fn errors_and_panics_reach_every_waiter(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let leader = tokio::spawn({
        let a = a.clone();
        async move {
            a.fanout("failing", Duration::from_secs(10), move || async move {
                let _ = go_rx.await;
                Err::<String, _>(
                    JobError::new("upstream said no")
                        .with_code("E_UPSTREAM")
                        .with_detail(serde_json::json!({"status": 503})),
                )
            })
            .await
        }
    });
    wait_until_running(&b, "failing").await;
    let follower = tokio::spawn({
        let b = b.clone();
        async move {
            b.fanout("failing", Duration::from_secs(10), || async {
                Ok("follower job must not run".into())
            })
            .await
        }
    });
    wait_for_follower(&fx, &b, "failing").await;
    let _ = go_tx.send(());
    for task in [leader, follower] {
        let e = within(Duration::from_secs(15), "caller", task)
            .await
            .expect("task")
            .expect_err("job failed");
        assert_eq!(e.kind(), ErrorKind::JobFailed);
        assert!(e.to_string().contains("upstream said no"), "{e}");
        let job = e.job_error().expect("job error detail");
        assert_eq!(job.message(), "upstream said no");
        assert_eq!(job.code(), Some("E_UPSTREAM"));
        assert_eq!(job.detail(), Some(&serde_json::json!({"status": 503})));
    }

    // A panicking job: every waiter gets "job panicked", nobody hangs.
    let mut tasks = Vec::new();
    for node in [a.clone(), b.clone(), a.clone()] {
        tasks.push(tokio::spawn(async move {
            node.fanout("panicking", Duration::from_secs(10), || async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(explode())
            })
            .await
        }));
    }
    for task in tasks {
        let e = within(Duration::from_secs(15), "caller", task)
            .await
            .expect("task")
            .expect_err("panicked");
        assert_eq!(e.kind(), ErrorKind::JobPanicked, "{e}");
        assert!(e.to_string().contains("job exploded"));
    }
    // The key is usable again afterwards.
    assert_eq!(
        a.fanout("panicking", Duration::from_secs(5), || async { Ok(1u8) })
            .await
            .expect("fresh run"),
        1
    );
}

fn explode() -> u8 {
    panic!("job exploded")
}

/// Waits (bounded) until a run of `job` holds its lock.
async fn wait_until_running(herd: &Herd, job: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while herd
        .lock_status(job)
        .await
        .expect("status")
        .holder
        .is_none()
    {
        assert!(Instant::now() < deadline, "run of {job} never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Issue 3, test 5, first half: waiters with 200 ms and 3 s timeouts on a 1 s job.
async fn per_caller_deadlines(fx: Fx) {
    let herd = fx.node("solo").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let job = counting_job(&runs, Duration::from_secs(1), "slow");
    let long = tokio::spawn({
        let herd = herd.clone();
        async move { herd.fanout("deadlines", Duration::from_secs(3), job).await }
    });
    wait_until_running(&herd, "deadlines").await;
    let started = Instant::now();
    let short = herd
        .fanout(
            "deadlines",
            Duration::from_millis(200),
            counting_job(&runs, Duration::ZERO, "x"),
        )
        .await
        .expect_err("short waiter times out");
    let took = started.elapsed();
    assert!(short.is_timeout(), "{short:?}");
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(900),
        "{took:?}"
    );
    let value = within(Duration::from_secs(5), "long waiter", long)
        .await
        .expect("task")
        .expect("long waiter gets the result");
    assert_eq!(value, "slow");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Issue 3, test 5, second half: the leader's own caller times out at 200 ms on a 1 s job;
/// other nodes still get the result, and a caller arriving at 500 ms joins the run.
async fn leaders_own_timeout_does_not_stop_the_job(fx: Fx) {
    let leader = fx.node("leader").await;
    let remote = fx.node("remote").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let leader_call = leader.fanout(
        "own-timeout",
        Duration::from_millis(200),
        counting_job(&runs, Duration::from_secs(1), "finished"),
    );
    let remote_call = tokio::spawn({
        let remote = remote.clone();
        let runs = runs.clone();
        async move {
            wait_until_running(&remote, "own-timeout").await;
            remote
                .fanout(
                    "own-timeout",
                    Duration::from_secs(5),
                    counting_job(&runs, Duration::ZERO, "second run"),
                )
                .await
        }
    });
    let e = leader_call.await.expect_err("leader's caller times out");
    assert!(e.is_timeout());
    tokio::time::sleep_until((started + Duration::from_millis(500)).into()).await;
    let late = leader
        .fanout(
            "own-timeout",
            Duration::from_secs(5),
            counting_job(&runs, Duration::ZERO, "second run"),
        )
        .await
        .expect("late caller joins");
    assert_eq!(late, "finished");
    let remote_value = within(Duration::from_secs(10), "remote", remote_call)
        .await
        .expect("task")
        .expect("remote gets it");
    assert_eq!(remote_value, "finished");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Issue 3, test 7: a job three times longer than the TTL runs once.
async fn job_longer_than_ttl_runs_once(fx: Fx) {
    let runs = Arc::new(AtomicUsize::new(0));
    let options = FanoutOptions::new().ttl(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for n in 0..2 {
        let node = fx.node(&format!("n{n}")).await;
        for _ in 0..5 {
            let (node, options) = (node.clone(), options.clone());
            let job = counting_job(&runs, Duration::from_millis(900), "long");
            tasks.push(tokio::spawn(async move {
                node.fanout_with("long", Duration::from_secs(10), &options, job)
                    .await
            }));
        }
    }
    for task in tasks {
        let fanned = within(Duration::from_secs(15), "caller", task)
            .await
            .expect("task")
            .expect("fanout");
        assert_eq!(fanned.value, "long");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Issue 3, test 8: a caller that arrives after a run finished never gets its result,
/// unless it asked for a cached one.
async fn no_stale_results(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let counter = Arc::new(AtomicUsize::new(0));
    let next = |c: &Arc<AtomicUsize>| {
        let c = Arc::clone(c);
        move || async move { Ok(c.fetch_add(1, Ordering::SeqCst)) }
    };
    for i in 0..50 {
        let node = if i % 2 == 0 { &a } else { &b };
        let first = node
            .fanout("stale", Duration::from_secs(5), next(&counter))
            .await
            .expect("first");
        let second = node
            .fanout("stale", Duration::from_secs(5), next(&counter))
            .await
            .expect("second");
        assert!(second > first, "round {i}: got {second} after {first}");
    }
    let cached = FanoutOptions::new().cache_age(Duration::from_secs(5));
    let fresh = a
        .fanout_with("stale", WAIT, &cached, next(&counter))
        .await
        .expect("fresh");
    let served = b
        .fanout_with("stale", WAIT, &cached, next(&counter))
        .await
        .expect("cached");
    assert_eq!(served.value, fresh.value);
    assert_eq!(served.role, Role::Cached);
}

/// Issue 3, test 10: dropping the leader's caller mid-job does not cancel the job.
async fn dropping_the_leaders_caller_keeps_the_job(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let finished = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&finished);
    let leader = tokio::spawn({
        let a = a.clone();
        async move {
            a.fanout("orphan", Duration::from_secs(10), move || async move {
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok("done anyway".to_owned())
            })
            .await
        }
    });
    within(Duration::from_secs(5), "job start", started_rx)
        .await
        .expect("started");
    leader.abort();
    assert!(leader.await.expect_err("aborted").is_cancelled());
    let follower = tokio::spawn({
        let b = b.clone();
        async move {
            b.fanout("orphan", Duration::from_secs(10), || async {
                Ok("second run".to_owned())
            })
            .await
        }
    });
    wait_for_follower(&fx, &b, "orphan").await;
    let _ = finish_tx.send(());
    let value = within(Duration::from_secs(10), "follower", follower)
        .await
        .expect("task")
        .expect("fanout");
    assert_eq!(value, "done anyway");
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    assert!(
        a.lock_status("orphan")
            .await
            .expect("status")
            .holder
            .is_none(),
        "lock left behind"
    );
}

/// Waits (bounded) until `herd` has a flight subscribed and following another node's run
/// (`Herd::stats().following`), so a completion from now on reaches it.
async fn wait_for_follower(_fx: &Fx, herd: &Herd, job: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while herd.stats().following == 0 {
        assert!(
            Instant::now() < deadline,
            "no follower of {job} ever waited"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Issue 3, test 11: ten pushes, one leader completes from another task.
async fn push_leader_and_followers(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let (wait, options) = (Duration::from_secs(10), FanoutOptions::new());
    let mut completer = None;
    let mut followers = Vec::new();
    for i in 0..10 {
        let node = if i % 2 == 0 { &a } else { &b };
        match node
            .push::<Vec<u32>>("pushed", wait, &options)
            .await
            .expect("push")
        {
            Push::Leader(c) => {
                assert!(completer.is_none(), "two leaders");
                completer = Some(c);
            }
            Push::Follower(f) => followers.push(tokio::spawn(f.wait())),
        }
    }
    let completer = completer.expect("one leader");
    assert_eq!(followers.len(), 9);
    let second = completer.clone();
    let done = tokio::spawn(async move { completer.complete(Ok(vec![4, 5, 6])) })
        .await
        .expect("task");
    assert!(done, "first completion wins");
    assert!(
        !second.complete(Ok(vec![0])),
        "second completion is a no-op"
    );
    for f in followers {
        let v = within(Duration::from_secs(10), "follower", f)
            .await
            .expect("task")
            .expect("value");
        assert_eq!(v, vec![4, 5, 6]);
    }
}

async fn push_dropped_completer_does_not_hang(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let (wait, options) = (Duration::from_secs(20), FanoutOptions::new());
    let Push::Leader(completer) = a
        .push::<u8>("abandoned", wait, &options)
        .await
        .expect("push")
    else {
        panic!("first push leads");
    };
    let Push::Follower(local) = a
        .push::<u8>("abandoned", wait, &options)
        .await
        .expect("push")
    else {
        panic!("second push follows");
    };
    let Push::Follower(remote) = b
        .push::<u8>("abandoned", wait, &options)
        .await
        .expect("push")
    else {
        panic!("remote push follows");
    };
    let remote = tokio::spawn(remote.wait());
    wait_for_follower(&fx, &b, "abandoned").await;
    drop(completer);
    let started = Instant::now();
    let e = within(Duration::from_secs(5), "local follower", local.wait())
        .await
        .expect_err("abandoned");
    assert_eq!(e.kind(), ErrorKind::Abandoned);
    let e = within(Duration::from_secs(5), "remote follower", remote)
        .await
        .expect("task")
        .expect_err("abandoned");
    assert_eq!(e.kind(), ErrorKind::Abandoned, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The id is free for a new run.
    assert!(matches!(
        a.push::<u8>("abandoned", wait, &options)
            .await
            .expect("push"),
        Push::Leader(_)
    ));
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Report {
    id: u64,
    rows: Vec<(String, f64)>,
}

#[allow(clippy::many_single_char_names)] // a, b: the two nodes, as everywhere in this file
async fn codecs_and_unusable_results(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let report = Report {
        id: 7,
        rows: vec![("a".into(), 1.5), ("b".into(), -2.0)],
    };
    // The leader's codec travels in the envelope: the follower, on JSON, reads it.
    #[cfg(feature = "bincode")]
    let bincode = FanoutOptions::new().codec(Codec::Bincode);
    #[cfg(not(feature = "bincode"))]
    let bincode = FanoutOptions::new().codec(Codec::Json);
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let r = report.clone();
    let leader = tokio::spawn({
        let (a, bincode) = (a.clone(), bincode.clone());
        async move {
            a.fanout_with("report", WAIT, &bincode, move || async move {
                let _ = go_rx.await;
                Ok(r)
            })
            .await
        }
    });
    wait_until_running(&b, "report").await;
    let follower = tokio::spawn({
        let b = b.clone();
        async move {
            b.fanout_with("report", WAIT, &FanoutOptions::new(), || async {
                Ok(Report {
                    id: 0,
                    rows: vec![],
                })
            })
            .await
        }
    });
    wait_for_follower(&fx, &b, "report").await;
    let _ = go_tx.send(());
    for task in [leader, follower] {
        let fanned = within(Duration::from_secs(10), "caller", task)
            .await
            .expect("task")
            .expect("fanout");
        assert_eq!(fanned.value, report);
    }

    // Too large for the configured maximum: a clear codec error, nothing stored.
    let small = FanoutOptions::new().max_result_size(64);
    let e = a
        .fanout_with("big", WAIT, &small, || async { Ok("x".repeat(1000)) })
        .await
        .expect_err("too large");
    assert_eq!(e.kind(), ErrorKind::Codec);
    assert!(e.to_string().contains("limit"), "{e}");

    // Fails to serialize (JSON map keys must be strings).
    let e = a
        .fanout("unserializable", Duration::from_secs(5), || async {
            let mut m = HashMap::new();
            m.insert((1u8, 2u8), String::from("v"));
            Ok(m)
        })
        .await
        .expect_err("cannot serialize");
    assert_eq!(e.kind(), ErrorKind::Codec);

    // A follower that expects another type: a codec error for that caller only.
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let text = tokio::spawn({
        let a = a.clone();
        async move {
            a.fanout("wrong-type", Duration::from_secs(10), move || async move {
                let _ = go_rx.await;
                Ok("text".to_owned())
            })
            .await
        }
    });
    wait_until_running(&b, "wrong-type").await;
    let number = tokio::spawn({
        let b = b.clone();
        async move {
            b.fanout("wrong-type", Duration::from_secs(10), || async { Ok(5u64) })
                .await
        }
    });
    wait_for_follower(&fx, &b, "wrong-type").await;
    let _ = go_tx.send(());
    assert_eq!(text.await.expect("task").expect("leader"), "text");
    let e = number.await.expect("task").expect_err("wrong type");
    assert_eq!(e.kind(), ErrorKind::Codec);
}

/// A job whose cleanup panics when it is cancelled (its maximum duration passed): every
/// caller still gets an error at once, and the id is usable again once the dead run's lease
/// runs out (nothing is left joined to a dead flight).
async fn a_panic_while_cancelling_does_not_wedge_the_id(fx: Fx) {
    struct PanicOnDrop;
    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("cleanup panicked (expected by this test)");
        }
    }
    let a = fx.node("a").await;
    let options = FanoutOptions::new()
        .ttl(Duration::from_millis(300))
        .max_duration(Duration::from_millis(100));
    let started = Instant::now();
    let e = a
        .fanout_with("wedge", Duration::from_secs(10), &options, || async {
            let _cleanup = PanicOnDrop;
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(0_u8)
        })
        .await
        .expect_err("cancelled, and its cleanup panicked");
    assert_eq!(e.kind(), ErrorKind::JobPanicked, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.stats().in_flight, 0);
    let again = a
        .fanout_with("wedge", Duration::from_secs(10), &options, || async {
            Ok(2_u8)
        })
        .await
        .expect("the id works again");
    assert_eq!(again.value, 2);
}

async fn max_duration_and_bad_options(fx: Fx) {
    let a = fx.node("a").await;
    let limited = FanoutOptions::new().max_duration(Duration::from_millis(100));
    let e = a
        .fanout_with("stuck", WAIT, &limited, || async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        })
        .await
        .expect_err("over its maximum duration");
    // The job's own limit, not the caller's deadline.
    assert_eq!(e.kind(), ErrorKind::JobTimedOut, "{e}");
    assert!(e.is_job_failure() && !e.is_timeout(), "{e}");
    assert!(a
        .lock_status("stuck")
        .await
        .expect("status")
        .holder
        .is_none());

    let job = || async { Ok(()) };
    for (wait, options) in [
        (Duration::ZERO, FanoutOptions::new()),
        (Duration::from_secs(10 * 24 * 3600), FanoutOptions::new()),
        (WAIT, FanoutOptions::new().ttl(Duration::ZERO)),
        (WAIT, FanoutOptions::new().linger(Duration::ZERO)),
        (WAIT, FanoutOptions::new().max_result_size(0)),
        (WAIT, FanoutOptions::new().max_duration(Duration::ZERO)),
    ] {
        let e = a
            .fanout_with("opts", wait, &options, job)
            .await
            .expect_err("rejected");
        assert!(e.is_invalid_input(), "{e:?}");
    }
    assert!(a
        .fanout("", Duration::from_secs(1), job)
        .await
        .expect_err("empty id")
        .is_invalid_input());
}

/// Issue 3, test 3 (both backends for correctness; the Redis command count is checked in
/// `faults::commands_do_not_grow_with_callers`).
async fn ten_thousand_local_callers(fx: Fx) {
    let herd = fx.node("big").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let (herd, runs, mut go_rx) = (herd.clone(), runs.clone(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            herd.fanout("ten-k", Duration::from_secs(30), move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                // Finish only once every caller has joined (no late caller starts a run).
                let _ = go_rx.wait_for(|go| *go).await;
                Ok("shared".to_owned())
            })
            .await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while herd.stats().waiting < 10_000 {
        assert!(
            Instant::now() < deadline,
            "callers never joined: {:?}",
            herd.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    go_tx.send_replace(true);
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("fanout"), "shared");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Issue 10: `fanout::<u32>("id")` and `fanout::<String>("id")` in one process do not share
/// a flight (which would hand one of them a codec error): the second is refused at once
/// with a clear error naming both types, and the first is unaffected.
async fn one_job_id_has_one_result_type(fx: Fx) {
    let node = fx.node("typed").await;
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let leader = {
        let node = node.clone();
        tokio::spawn(async move {
            node.fanout("typed-job", Duration::from_secs(10), move || async move {
                let _ = go_rx.await;
                Ok(7_u32)
            })
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.stats().in_flight == 0 {
        assert!(Instant::now() < deadline, "the first flight never started");
        tokio::task::yield_now().await;
    }
    let err = node
        .fanout("typed-job", Duration::from_secs(10), || async {
            Ok("text".to_owned())
        })
        .await
        .expect_err("another result type for an id in flight");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("u32") && message.contains("String"),
        "{message}"
    );
    // The same type joins as usual.
    let joiner = {
        let node = node.clone();
        tokio::spawn(async move {
            node.fanout("typed-job", Duration::from_secs(10), || async { Ok(0_u32) })
                .await
        })
    };
    while node.stats().waiting < 2 {
        assert!(Instant::now() < deadline, "the joiner never joined");
        tokio::task::yield_now().await;
    }
    go_tx.send(()).expect("the job waits");
    assert_eq!(
        within(Duration::from_secs(10), "leader", leader)
            .await
            .expect("task")
            .expect("leader"),
        7
    );
    assert_eq!(
        within(Duration::from_secs(10), "joiner", joiner)
            .await
            .expect("task")
            .expect("joiner"),
        7
    );
}
