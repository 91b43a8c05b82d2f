//! Semaphores: N holders, status, wake-ups, the lease watchdog, timeouts, bad input, fair
//! queueing, waiters that give up, and changing N (both backends).

use std::time::{Duration, Instant};

use herdlock::{ErrorKind, Herd, Permit, Semaphore, SemaphoreOptions, TryPermit};

use crate::fixture::{both_backends, within, Fx, Kind};

both_backends!(
    three_permits_fourth_is_busy,
    waiter_is_woken_by_release,
    watchdog_keeps_a_short_lease_alive,
    acquire_times_out,
    bad_input_is_rejected,
    fair_waiters_are_admitted_in_queue_order,
    fair_waiter_timing_out_does_not_block_the_queue,
    fair_waiter_dropped_does_not_block_the_queue,
    fair_try_acquire_does_not_jump_the_queue,
    changing_n,
    dropped_permit_is_released,
);

const LONG: Duration = Duration::from_secs(30);

fn sem(node: &Herd, key: &str, permits: u32, lease: Duration, fair: bool) -> Semaphore {
    node.semaphore_with(
        key,
        permits,
        &SemaphoreOptions::new().lease(lease).fair(fair),
    )
    .expect("semaphore")
}

async fn take(sem: &Semaphore) -> Permit {
    match sem.try_acquire().await.expect("try_acquire") {
        TryPermit::Acquired(permit) => permit,
        TryPermit::Busy { in_use } => panic!("expected a free permit, {in_use} in use"),
    }
}

async fn assert_busy(sem: &Semaphore, expected_in_use: u32) {
    match sem.try_acquire().await.expect("try_acquire") {
        TryPermit::Busy { in_use } => assert_eq!(in_use, expected_in_use),
        TryPermit::Acquired(p) => panic!("admitted {p:?} with N={}", sem.permits()),
    }
}

/// Polls `status()` until `queued == n` (bounded).
async fn wait_queued(sem: &Semaphore, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sem.status().await.expect("status");
        if status.queued == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue never reached {n}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// N = 3: three holders, the fourth is Busy; status names them; a release frees one.
async fn three_permits_fourth_is_busy(fx: Fx) {
    let lease = Duration::from_secs(20);
    let mut permits = Vec::new();
    for i in 0..3 {
        let node = fx.node(&format!("holder-{i}")).await;
        permits.push(take(&sem(&node, "pool", 3, lease, false)).await);
    }
    let late = fx.node("late").await;
    let late_sem = sem(&late, "pool", 3, lease, false);
    assert_busy(&late_sem, 3).await;
    let status = late_sem.status().await.expect("status");
    assert_eq!(status.in_use, 3);
    assert_eq!(status.queued, 0);
    let mut owners: Vec<&str> = status.holders.iter().map(|h| h.owner.as_str()).collect();
    owners.sort_unstable();
    assert_eq!(owners, ["holder-0", "holder-1", "holder-2"]);
    for h in &status.holders {
        assert!(
            h.remaining <= lease && h.remaining > lease.saturating_sub(Duration::from_secs(5)),
            "{h:?}"
        );
    }
    for p in &permits {
        assert_eq!(p.key(), "pool");
        assert!(!p.is_lost());
    }
    permits
        .pop()
        .expect("three")
        .release()
        .await
        .expect("release");
    assert_eq!(late_sem.status().await.expect("status").in_use, 2);
    let fourth = take(&late_sem).await;
    assert_busy(&late_sem, 3).await;
    fourth.release().await.expect("release");
    for p in permits {
        p.release().await.expect("release");
    }
    let status = late_sem.status().await.expect("status");
    assert_eq!((status.in_use, status.queued), (0, 0));
    assert!(status.holders.is_empty());
}

/// Issue 5, test 9: a waiter on a full semaphore (lease 30 s) is admitted within 2 s of a
/// release: woken by the release, not by a timer.
async fn waiter_is_woken_by_release(fx: Fx) {
    let holder = fx.node("holder").await;
    let waiter = fx.node("waiter").await;
    let held = take(&sem(&holder, "wake", 1, LONG, false)).await;
    let waiting = sem(&waiter, "wake", 1, LONG, false);
    assert_busy(&waiting, 1).await;
    let task = tokio::spawn(async move {
        let got = waiting.acquire(Duration::from_secs(20)).await;
        (got, Instant::now())
    });
    fx.wait_subscribed(&["wake"]).await;
    assert!(!task.is_finished(), "the waiter must wait while full");
    let permit = release_admits(held, task, Duration::from_secs(2)).await;
    permit.release().await.expect("release");
}

/// Issue 5, test 7: a holder with a 300 ms lease holds for over 900 ms; the watchdog keeps
/// it, so another node with N = 1 stays Busy all along; then it releases cleanly.
async fn watchdog_keeps_a_short_lease_alive(fx: Fx) {
    let lease = Duration::from_millis(300);
    let holder = fx.node("holder").await;
    let other = fx.node("other").await;
    let permit = take(&sem(&holder, "short", 1, lease, false)).await;
    let other_sem = sem(&other, "short", 1, lease, false);
    let started = Instant::now();
    let mut checks = 0;
    while started.elapsed() < Duration::from_secs(1) {
        assert_busy(&other_sem, 1).await;
        let status = other_sem.status().await.expect("status");
        assert_eq!(status.holders.len(), 1, "{status:?}");
        assert_eq!(status.holders[0].owner, "holder");
        assert!(status.holders[0].remaining <= lease, "{status:?}");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(checks >= 10, "only {checks} checks in a second");
    assert!(!permit.is_lost());
    permit.release().await.expect("released, not lost");
    take(&other_sem)
        .await
        .release()
        .await
        .expect("free after the release");
}

/// `acquire` times out with `Timeout` after its wait and not much later; the holder is
/// unaffected; a fair waiter that times out leaves the queue.
async fn acquire_times_out(fx: Fx) {
    let holder = fx.node("holder").await;
    let waiter = fx.node("waiter").await;
    for fair in [false, true] {
        let key = format!("timeout-{fair}");
        let held = take(&sem(&holder, &key, 1, LONG, fair)).await;
        let waiting = sem(&waiter, &key, 1, LONG, fair);
        let started = Instant::now();
        let e = waiting
            .acquire(Duration::from_millis(300))
            .await
            .expect_err("must time out");
        let took = started.elapsed();
        assert_eq!(e.kind(), ErrorKind::Timeout, "fair {fair}: {e}");
        assert!(e.message().contains(&key), "{e}");
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(3),
            "fair {fair}: {took:?}"
        );
        // A fair waiter's place is given up (in the background) at once, not after
        // QUEUE_TTL; well under it here.
        let left = Instant::now();
        wait_queued(&waiting, 0).await;
        assert!(
            left.elapsed() < Duration::from_secs(1),
            "{:?}",
            left.elapsed()
        );
        held.extend(LONG).await.expect("the holder is unaffected");
        held.release().await.expect("release");
        take(&waiting).await.release().await.expect("release");
    }
}

/// Zero or too many permits, an empty key, a zero or huge lease, a zero or huge wait:
/// `InvalidInput`.
async fn bad_input_is_rejected(fx: Fx) {
    let herd = fx.node("bad").await;
    let lease = |d| SemaphoreOptions::new().lease(d);
    let handles = [
        herd.semaphore("k", 0).map(|_| ()),
        herd.semaphore("k", herdlock::limits::MAX_PERMITS + 1)
            .map(|_| ()),
        herd.semaphore("k", u32::MAX).map(|_| ()),
        herd.semaphore("", 1).map(|_| ()),
        herd.semaphore("a{b", 1).map(|_| ()),
        herd.semaphore(&"k".repeat(herdlock::limits::MAX_KEY_LEN + 1), 1)
            .map(|_| ()),
        herd.semaphore_with("k", 1, &lease(Duration::ZERO))
            .map(|_| ()),
        herd.semaphore_with("k", 1, &lease(herdlock::limits::MAX_TTL * 2))
            .map(|_| ()),
    ];
    for (i, case) in handles.into_iter().enumerate() {
        let e = case.expect_err("bad input accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "case {i}: {e}");
        assert!(!e.message().is_empty());
    }
    let max = herd
        .semaphore("k", herdlock::limits::MAX_PERMITS)
        .expect("MAX_PERMITS is accepted");
    assert_eq!(max.permits(), herdlock::limits::MAX_PERMITS);
    let ok = herd.semaphore("k", 1).expect("semaphore");
    for wait in [Duration::ZERO, herdlock::limits::MAX_WAIT * 2] {
        let e = ok.acquire(wait).await.expect_err("bad wait accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "wait {wait:?}: {e}");
    }
    let permit = take(&ok).await;
    let e = permit.extend(Duration::ZERO).await.expect_err("zero lease");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    permit.extend(LONG).await.expect("still held");
    permit.release().await.expect("release");
    // A rejected acquire left nothing behind.
    assert_eq!(ok.status().await.expect("status").in_use, 0);
}

/// Fair mode across nodes: waiters that queued in a known order are admitted in that order
/// as permits free up one by one.
async fn fair_waiters_are_admitted_in_queue_order(fx: Fx) {
    const WAITERS: usize = 5;
    let holder = fx.node("holder").await;
    let handle = sem(&holder, "fair", 1, LONG, true);
    let held = take(&handle).await;
    let (admitted_tx, mut admitted_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for k in 0..WAITERS {
        let node = fx.node(&format!("waiter-{k}")).await;
        let waiting = sem(&node, "fair", 1, LONG, true);
        let admitted_tx = admitted_tx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = waiting
                .acquire(Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| panic!("waiter {k}: {e}"));
            // Reported while holding (N = 1), so the order of reports is the order of
            // admission.
            admitted_tx.send(k).expect("the test listens");
            permit.release().await.expect("release");
        }));
        // Waiter k + 1 starts only once waiter k is visibly queued.
        wait_queued(&handle, u32::try_from(k + 1).expect("small")).await;
    }
    drop(admitted_tx);
    held.release().await.expect("release");
    let mut order = Vec::new();
    while let Some(k) = within(Duration::from_secs(20), "admissions", admitted_rx.recv()).await {
        order.push(k);
    }
    assert_eq!(order, (0..WAITERS).collect::<Vec<_>>());
    for task in tasks {
        within(Duration::from_secs(10), "waiter task", task)
            .await
            .expect("waiter task");
    }
    let status = handle.status().await.expect("status");
    assert_eq!((status.in_use, status.queued), (0, 0));
}

/// A waiting task that reports its outcome and when it got it.
type Waiter = tokio::task::JoinHandle<(Result<Permit, herdlock::Error>, Instant)>;

/// Releases `held`, then asserts that `waiter` was admitted less than `limit` after the
/// release; returns its permit.
async fn release_admits(held: Permit, waiter: Waiter, limit: Duration) -> Permit {
    let released_at = Instant::now();
    held.release().await.expect("release");
    let (got, admitted_at) = within(Duration::from_secs(10), "waiter", waiter)
        .await
        .expect("waiter task");
    let permit = got.expect("the waiter is admitted");
    let delay = admitted_at.saturating_duration_since(released_at);
    assert!(
        delay < limit,
        "admitted {delay:?} after the release (limit {limit:?}, QUEUE_TTL {:?})",
        herdlock::limits::QUEUE_TTL
    );
    permit
}

/// Sets up: `holder` holds the only permit of a fair semaphore; the first waiter queues
/// with `first_wait`, then a second waiter queues with a long wait.
async fn two_fair_waiters(
    fx: &Fx,
    key: &str,
    first_wait: Duration,
) -> (
    Semaphore,
    Permit,
    tokio::task::JoinHandle<Result<Permit, herdlock::Error>>,
    Waiter,
) {
    let holder = fx.node("holder").await;
    let quitter = fx.node("quitter").await;
    let patient = fx.node("patient").await;
    let handle = sem(&holder, key, 1, LONG, true);
    let held = take(&handle).await;
    let first = sem(&quitter, key, 1, LONG, true);
    let first = tokio::spawn(async move { first.acquire(first_wait).await });
    wait_queued(&handle, 1).await;
    let second = sem(&patient, key, 1, LONG, true);
    let second = tokio::spawn(async move {
        let got = second.acquire(Duration::from_secs(20)).await;
        (got, Instant::now())
    });
    wait_queued(&handle, 2).await;
    (handle, held, first, second)
}

/// A fair waiter that times out leaves the queue at once: after a release, the next waiter
/// is admitted promptly, far sooner than `QUEUE_TTL`.
async fn fair_waiter_timing_out_does_not_block_the_queue(fx: Fx) {
    let (handle, held, first, second) =
        two_fair_waiters(&fx, "quit", Duration::from_millis(400)).await;
    let e = within(Duration::from_secs(10), "first waiter", first)
        .await
        .expect("task")
        .expect_err("the first waiter times out");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let gave_up = Instant::now();
    wait_queued(&handle, 1).await;
    assert!(
        gave_up.elapsed() < Duration::from_secs(1),
        "left the queue {:?} after giving up",
        gave_up.elapsed()
    );
    let permit = release_admits(held, second, Duration::from_millis(1500)).await;
    permit.release().await.expect("release");
}

/// A fair waiter whose future is dropped (task aborted) does not block the queue: released
/// right after the abort, the permit reaches the next waiter promptly.
async fn fair_waiter_dropped_does_not_block_the_queue(fx: Fx) {
    let (handle, held, first, second) =
        two_fair_waiters(&fx, "drop", Duration::from_secs(20)).await;
    first.abort();
    let aborted = within(Duration::from_secs(10), "aborted waiter", first)
        .await
        .expect_err("aborted");
    assert!(aborted.is_cancelled());
    // No waiting for the background leave: the release and the leave race.
    let permit = release_admits(held, second, Duration::from_millis(1500)).await;
    let status = handle.status().await.expect("status");
    assert_eq!((status.in_use, status.queued), (1, 0), "{status:?}");
    permit.release().await.expect("release");
}

/// In fair mode `try_acquire` never takes a permit ahead of a queued waiter.
async fn fair_try_acquire_does_not_jump_the_queue(fx: Fx) {
    let holder = fx.node("holder").await;
    let waiter = fx.node("waiter").await;
    let jumper = fx.node("jumper").await;
    let handle = sem(&holder, "nojump", 2, LONG, true);
    let first = take(&handle).await;
    let second = take(&handle).await;
    let waiting = sem(&waiter, "nojump", 2, LONG, true);
    let task = tokio::spawn(async move { waiting.acquire(Duration::from_secs(20)).await });
    wait_queued(&handle, 1).await;
    let jumping = sem(&jumper, "nojump", 2, LONG, true);
    assert_busy(&jumping, 2).await;
    first.release().await.expect("release");
    let permit = within(Duration::from_secs(10), "waiter", task)
        .await
        .expect("task")
        .expect("the queued waiter gets the freed permit");
    assert_busy(&jumping, 2).await;
    second.release().await.expect("release");
    take(&jumping).await.release().await.expect("release");
    permit.release().await.expect("release");
}

/// Changing N, as documented: with 3 holders, a handle with N = 2 is Busy until fewer than
/// 2 are held; a handle with N = 4 is admitted at once.
async fn changing_n(fx: Fx) {
    let mut held = Vec::new();
    for i in 0..3 {
        let node = fx.node(&format!("n3-{i}")).await;
        held.push(take(&sem(&node, "resize", 3, LONG, false)).await);
    }
    let up = fx.node("n4").await;
    let four = sem(&up, "resize", 4, LONG, false);
    let raised = take(&four).await;
    let three = sem(&fx.node("n3-late").await, "resize", 3, LONG, false);
    assert_busy(&three, 4).await;
    assert_busy(&four, 4).await;
    raised.release().await.expect("release");

    let down = fx.node("n2").await;
    let two = sem(&down, "resize", 2, LONG, false);
    assert_busy(&two, 3).await;
    held.pop().expect("3").release().await.expect("release");
    assert_busy(&two, 2).await;
    // A blocking N = 2 waiter is admitted once one more is released.
    let waiting = two.clone();
    let task = tokio::spawn(async move { waiting.acquire(Duration::from_secs(20)).await });
    fx.wait_subscribed(&["resize"]).await;
    assert!(!task.is_finished(), "admitted with 2 held and N = 2");
    held.pop().expect("2").release().await.expect("release");
    let lowered = within(Duration::from_secs(10), "N = 2 waiter", task)
        .await
        .expect("task")
        .expect("admitted once fewer than 2 were held");
    assert_busy(&two, 2).await;
    // Holders beyond a lowered N are never revoked.
    assert!(!held[0].is_lost());
    lowered.release().await.expect("release");
    held.pop().expect("1").release().await.expect("release");
    assert_eq!(two.status().await.expect("status").in_use, 0);
}

/// A dropped permit is released in the background: a waiter is admitted long before the
/// 30 s lease.
async fn dropped_permit_is_released(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let permit = take(&sem(&a, "drop", 1, LONG, false)).await;
    drop(permit);
    let started = Instant::now();
    let again = within(
        Duration::from_secs(10),
        "re-acquire",
        sem(&b, "drop", 1, LONG, false).acquire(Duration::from_secs(20)),
    )
    .await
    .expect("admitted");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    again.release().await.expect("release");
}

/// A permit whose holder entry disappears under it (Redis: the holders set is deleted) is
/// found lost by the watchdog; `extend` and `release` say `LockLost`, and the new holder is
/// left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_removed_under_its_holder_is_lost_redis() {
    let fx = Fx::new(Kind::Redis, "semaphore::permit_removed");
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let permit = take(&sem(&a, "gone", 1, Duration::from_millis(300), false)).await;
    let holders = format!("{}:{{gone}}:sem", fx.prefix);
    assert_eq!(fx.server().cmd(&["DEL", &holders]), "1");
    let other_sem = sem(&b, "gone", 1, LONG, false);
    let other = take(&other_sem).await;
    within(
        Duration::from_secs(2),
        "the watchdog notices",
        permit.lost(),
    )
    .await;
    assert!(permit.is_lost());
    let e = permit.extend(LONG).await.expect_err("lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    let e = permit.release().await.expect_err("lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    let status = other_sem.status().await.expect("status");
    assert_eq!(status.in_use, 1);
    assert_eq!(status.holders[0].owner, "b");
    other.release().await.expect("the new holder is intact");
}

/// `acquire` cancelled while its request is in flight (a private Redis, paused, admits the
/// waiter after the caller gave up) leaves no permit behind: nobody holds the admitted
/// member, so it must be given back at once, not after its 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_cancelled_in_flight_leaves_no_permit_redis() {
    let server = crate::common::RedisServer::start();
    let herd = Herd::builder()
        .prefix(crate::common::unique_prefix(
            "semaphore::cancelled_in_flight",
        ))
        .owner("canceller")
        .connect(&server.url())
        .await
        .expect("connect");
    for fair in [false, true] {
        let key = format!("inflight-{fair}");
        let s = sem(&herd, &key, 1, LONG, fair);
        // Load the script, so the paused request is the acquisition itself.
        assert_eq!(s.status().await.expect("status").in_use, 0);
        assert_eq!(server.cmd(&["CLIENT", "PAUSE", "500", "ALL"]), "OK");
        let waiting = s.clone();
        let task = tokio::spawn(async move { waiting.acquire(Duration::from_secs(20)).await });
        // The request is on the wire well within this; its reply is held by the pause.
        tokio::time::sleep(Duration::from_millis(150)).await;
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        // The pause ends at 500 ms; then the acquisition runs, and must be undone.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let status = s.status().await.expect("status");
            if status.in_use == 0 && status.queued == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fair {fair}: a cancelled acquire left {status:?} behind"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
