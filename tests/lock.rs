//! Locks: try/once/blocking, guards, fencing, grace, status, bad input (both backends).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, Herd, LockOptions, Outcome, TryLock};

use crate::fixture::{both_backends, within, Fx};

both_backends!(
    busy_reports_holder_owner,
    blocking_waiter_is_woken_by_release,
    expired_holder_gets_lock_lost,
    outcome_form,
    grace_period_suppresses_late_triggers,
    concurrent_once_same_tick,
    bad_input_is_rejected,
    fencing_tokens_increase,
    lock_status_reports_holder,
    dropped_guard_is_released,
    wait_times_out,
    list_held_and_force_release,
);

async fn busy_reports_holder_owner(fx: Fx) {
    let a = fx.node("node-a").await;
    let b = fx.node("node-b").await;
    let guard = a
        .try_lock("job")
        .await
        .expect("try_lock")
        .acquired()
        .expect("free");
    match b.try_lock("job").await.expect("try_lock") {
        TryLock::Busy(holder) => {
            assert_eq!(holder.owner, "node-a");
            assert_eq!(holder.fence, guard.fence());
            assert!(holder.remaining.is_some_and(|r| r <= a.lock_ttl()));
        }
        TryLock::Acquired(_) => panic!("two holders"),
    }
    guard.release().await.expect("release");
    assert!(b
        .try_lock("job")
        .await
        .expect("try_lock")
        .acquired()
        .is_some());
}

/// Issue 2, test 3: a waiter is woken by the release, long before the 30 s TTL.
async fn blocking_waiter_is_woken_by_release(fx: Fx) {
    let a = fx.node("holder").await;
    let b = fx.node("waiter").await;
    let long = LockOptions::new().ttl(Duration::from_secs(30));
    let guard = a
        .lock_with("migrate", Duration::from_secs(1), &long)
        .await
        .expect("lock");
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let waiter = tokio::spawn(async move {
        // The waiter is certainly waiting once its first try has seen the lock busy.
        assert!(b.try_lock("migrate").await.expect("try").is_busy());
        let _ = subscribed_tx.send(());
        let got = b.lock_with("migrate", Duration::from_secs(20), &long).await;
        (got, Instant::now())
    });
    subscribed_rx.await.expect("waiter started");
    let released_at = Instant::now();
    guard.release().await.expect("release");
    let (got, acquired_at) = within(Duration::from_secs(10), "waiter", waiter)
        .await
        .expect("waiter task");
    let got = got.expect("waiter got the lock");
    let delay = acquired_at.saturating_duration_since(released_at);
    assert!(
        delay < Duration::from_secs(3),
        "woken {delay:?} after release"
    );
    assert_eq!(got.owner(), "waiter");
    got.release().await.expect("release");
}

/// Issue 2, test 4.
async fn expired_holder_gets_lock_lost(fx: Fx) {
    let a = fx.node("old").await;
    let b = fx.node("new").await;
    // A lease that is not auto-extended runs out while its holder still lives.
    let short = LockOptions::new()
        .ttl(Duration::from_millis(150))
        .auto_extend(false);
    let old = a
        .try_lock_with("k", &short)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    // `lock` waits until the old lease runs out (re-checked at its TTL), then takes it.
    let new = b
        .lock("k", Duration::from_secs(5))
        .await
        .expect("taken over");
    assert!(new.fence() > old.fence());
    let e = old
        .extend(Duration::from_secs(5))
        .await
        .expect_err("extend must fail");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    let e = old.release().await.expect_err("release must fail");
    assert!(e.is_lock_lost());
    let status = b.lock_status("k").await.expect("status");
    let holder = status.holder.expect("new holder intact");
    assert_eq!(holder.owner, "new");
    assert_eq!(holder.fence, new.fence());
    new.release()
        .await
        .expect("the new holder's lock is intact");
}

#[derive(Debug, PartialEq)]
struct DiskFull;

impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("disk full")
    }
}

impl std::error::Error for DiskFull {}

/// Issue 2, test 5.
async fn outcome_form(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let ran: Outcome<()> = a.once("cron", || async { Ok(()) }).await.expect("once");
    assert_eq!(ran, Outcome::Ran(()));

    let guard = b
        .try_lock("cron")
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let called = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&called);
    let busy = a
        .once("cron", move || async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .await
        .expect("once");
    match busy {
        Outcome::Busy(holder) => assert_eq!(holder.owner, "b"),
        Outcome::Ran(()) => panic!("ran while held"),
    }
    assert_eq!(called.load(Ordering::SeqCst), 0, "the closure must not run");
    guard.release().await.expect("release");

    let failed = a
        .once("cron", || async {
            Err(DiskFull)?;
            Ok(())
        })
        .await
        .expect_err("the work failed");
    // The closure's own error comes back as the source of a JobFailed error.
    assert_eq!(failed.kind(), ErrorKind::JobFailed, "{failed}");
    assert!(failed.to_string().contains("disk full"), "{failed}");
    let source = std::error::Error::source(&failed).expect("the original error");
    assert_eq!(source.downcast_ref::<DiskFull>(), Some(&DiskFull));
    assert!(a
        .lock_status("cron")
        .await
        .expect("status")
        .holder
        .is_none());
}

/// Issue 2, test 6: three triggers 300 ms apart; grace 1 s runs once, no grace three times.
async fn grace_period_suppresses_late_triggers(fx: Fx) {
    for (grace, expected) in [(Some(Duration::from_secs(1)), 1), (None, 3)] {
        let key = format!("nightly-{expected}");
        let runs = Arc::new(AtomicUsize::new(0));
        let mut options = LockOptions::new().ttl(Duration::from_secs(10));
        if let Some(g) = grace {
            options = options.grace(g);
        }
        for trigger in 0..3 {
            let node = fx.node(&format!("host-{trigger}")).await;
            let r = Arc::clone(&runs);
            let _ = node
                .once_with(&key, &options, move || async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
                .expect("once");
            if trigger < 2 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        assert_eq!(runs.load(Ordering::SeqCst), expected, "grace {grace:?}");
    }
}

/// Issue 2, test 7 (both backends): 5 concurrent `once` in the same tick, one runs.
async fn concurrent_once_same_tick(fx: Fx) {
    let herd = fx.node("same").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(5));
    let (release_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..5 {
        let (herd, runs, barrier) = (herd.clone(), runs.clone(), barrier.clone());
        let mut release_rx = release_tx.subscribe();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            let outcome = herd
                .once("tick", move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    // Hold the lock until every other contender has come back.
                    let _ = release_rx.recv().await;
                    Ok(())
                })
                .await;
            let _ = done_tx.send(outcome);
        });
    }
    for _ in 0..4 {
        let outcome = within(Duration::from_secs(10), "contender", done_rx.recv())
            .await
            .expect("sender alive")
            .expect("once");
        assert!(matches!(outcome, Outcome::Busy(_)), "a second holder ran");
    }
    let _ = release_tx.send(());
    let winner = within(Duration::from_secs(10), "winner", done_rx.recv())
        .await
        .expect("sender alive")
        .expect("once");
    assert_eq!(winner, Outcome::Ran(()));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Issue 2, test 9.
async fn bad_input_is_rejected(fx: Fx) {
    let herd = fx.node("bad").await;
    let long_key = "k".repeat(herdlock::limits::MAX_KEY_LEN + 1);
    let cases = [
        herd.try_lock("").await.map(|_| ()),
        herd.try_lock(&long_key).await.map(|_| ()),
        herd.try_lock_with("k", &LockOptions::new().ttl(Duration::ZERO))
            .await
            .map(|_| ()),
        herd.try_lock_with("k", &LockOptions::new().ttl(herdlock::limits::MAX_TTL * 2))
            .await
            .map(|_| ()),
        herd.try_lock_with(
            "k",
            &LockOptions::new().grace(herdlock::limits::MAX_TTL * 2),
        )
        .await
        .map(|_| ()),
        herd.lock("k", Duration::ZERO).await.map(|_| ()),
        herd.lock("k", Duration::from_secs(365 * 24 * 3600))
            .await
            .map(|_| ()),
        herd.lock_status("").await.map(|_| ()),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let e = case.expect_err("bad input accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "case {i}: {e}");
        assert!(!e.to_string().is_empty());
    }
    let guard = herd
        .try_lock("k")
        .await
        .expect("try")
        .acquired()
        .expect("free");
    assert!(guard
        .extend(Duration::ZERO)
        .await
        .expect_err("zero ttl")
        .is_invalid_input());
    guard.release().await.expect("release");
    // Bad builder options are errors, never panics.
    for builder in [
        Herd::builder().prefix(""),
        Herd::builder().prefix("a{b}"),
        Herd::builder().owner(""),
        Herd::builder().owner("x".repeat(herdlock::limits::MAX_OWNER_LEN + 1)),
        Herd::builder().lock_ttl(Duration::ZERO),
        Herd::builder().command_timeout(Duration::ZERO),
    ] {
        assert!(builder.memory().expect_err("bad option").is_invalid_input());
    }
    assert!(Herd::builder()
        .connect("not-a-url")
        .await
        .expect_err("bad url")
        .is_invalid_input());
}

async fn fencing_tokens_increase(fx: Fx) {
    let herd = fx.node("f").await;
    let mut last = 0;
    for _ in 0..50 {
        let guard = herd
            .lock("fenced", Duration::from_secs(5))
            .await
            .expect("lock");
        assert!(guard.fence().get() > last);
        last = guard.fence().get();
        // The status names the holder's token while it holds the lock.
        assert_eq!(
            herd.lock_status("fenced").await.expect("status").last_fence,
            Some(guard.fence())
        );
        guard.release().await.expect("release");
    }
    // Free again: no token is kept once a name's state is gone.
    assert_eq!(
        herd.lock_status("fenced").await.expect("status").last_fence,
        None
    );
}

async fn lock_status_reports_holder(fx: Fx) {
    let herd = fx.node("status-owner").await;
    let status = herd.lock_status("s").await.expect("status");
    assert!(status.holder.is_none());
    assert_eq!(status.last_fence, None);
    let guard = herd
        .try_lock_with("s", &LockOptions::new().ttl(Duration::from_secs(60)))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let status = herd.lock_status("s").await.expect("status");
    let holder = status.holder.expect("held");
    assert_eq!(holder.owner, "status-owner");
    assert_eq!(holder.fence, guard.fence());
    let remaining = holder.remaining.expect("has a ttl");
    assert!(remaining > Duration::from_secs(50) && remaining <= Duration::from_secs(60));
    guard
        .extend(Duration::from_secs(120))
        .await
        .expect("extend");
    let remaining = herd
        .lock_status("s")
        .await
        .expect("status")
        .holder
        .expect("held")
        .remaining;
    assert!(remaining.expect("ttl") > Duration::from_secs(100));
    guard.release().await.expect("release");
}

async fn dropped_guard_is_released(fx: Fx) {
    let herd = fx.node("dropper").await;
    let guard = herd
        .try_lock_with("d", &LockOptions::new().ttl(Duration::from_secs(60)))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    drop(guard);
    // The background release wakes this waiter long before the 60 s TTL.
    let again = within(
        Duration::from_secs(10),
        "re-acquire",
        herd.lock("d", Duration::from_secs(30)),
    )
    .await
    .expect("re-acquired");
    again.release().await.expect("release");
}

async fn wait_times_out(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let guard = a
        .try_lock_with("t", &LockOptions::new().ttl(Duration::from_secs(30)))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let started = Instant::now();
    let e = b
        .lock("t", Duration::from_millis(200))
        .await
        .expect_err("must time out");
    assert!(e.is_timeout(), "{e:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The holder is unaffected, and the herd still works.
    guard
        .extend(Duration::from_secs(30))
        .await
        .expect("still held");
    guard.release().await.expect("release");
    b.lock("t", Duration::from_secs(1))
        .await
        .expect("free now")
        .release()
        .await
        .expect("release");
}

/// Issue 2, test 7: TTL expiry on the in-memory backend, with paused time.
#[tokio::test(start_paused = true)]
async fn memory_ttl_expiry_with_paused_time() {
    let herd = Herd::memory();
    let options = LockOptions::new().ttl(Duration::from_secs(5));
    let guard = herd
        .try_lock_with("exp", &options)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    tokio::time::advance(Duration::from_millis(4_900)).await;
    assert!(herd.try_lock("exp").await.expect("try").is_busy());
    tokio::time::advance(Duration::from_millis(200)).await;
    let second = herd
        .try_lock("exp")
        .await
        .expect("try")
        .acquired()
        .expect("expired");
    assert!(guard.release().await.expect_err("expired").is_lock_lost());
    second.release().await.expect("release");
}

/// `list_held` names every lock, fan-out run and semaphore held under the prefix (and
/// nothing of another prefix); `force_release` breaks a lock, says who held it and wakes
/// its waiters; the broken holder finds the lock lost.
async fn list_held_and_force_release(fx: Fx) {
    use herdlock::HeldKind;

    let a = fx.node("holder-a").await;
    let b = fx.node("waiter-b").await;
    assert_eq!(a.list_held().await.expect("list"), []);
    let options = LockOptions::new().ttl(Duration::from_secs(60));
    let stuck = a
        .try_lock_with("stuck", &options)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let tagged = a
        .try_multi(&["acct:{bank}:1", "acct:{bank}:2"])
        .await
        .expect("try multi")
        .acquired()
        .expect("free");
    let permit = a
        .semaphore("pool", 2)
        .expect("semaphore")
        .acquire(Duration::from_secs(5))
        .await
        .expect("permit");
    let released = a
        .try_lock("gone")
        .await
        .expect("try")
        .acquired()
        .expect("free");
    released.release().await.expect("release");
    let listed = b.list_held().await.expect("list");
    let keys: Vec<(&str, HeldKind)> = listed.iter().map(|h| (h.key.as_str(), h.kind)).collect();
    assert_eq!(
        keys,
        [
            ("acct:{bank}:1", HeldKind::Lock),
            ("acct:{bank}:2", HeldKind::Lock),
            ("pool", HeldKind::Semaphore),
            ("stuck", HeldKind::Lock),
        ]
    );

    // A waiter is woken by the forced release, long before the holder's 60 s TTL.
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.lock("stuck", Duration::from_secs(20)).await }
    });
    fx.wait_subscribed(&["stuck"]).await;
    let holder = b
        .force_release("stuck")
        .await
        .expect("force release")
        .expect("it was held");
    assert_eq!(holder.owner, "holder-a");
    assert_eq!(holder.fence, stuck.fence());
    let taken = within(Duration::from_secs(10), "waiter woken", waiter)
        .await
        .expect("task")
        .expect("the waiter gets the lock");
    assert_eq!(taken.owner(), "waiter-b");
    assert!(stuck.release().await.expect_err("broken").is_lock_lost());
    taken.release().await.expect("release");
    assert_eq!(b.force_release("stuck").await.expect("force release"), None);
    assert!(b
        .force_release("")
        .await
        .expect_err("bad key")
        .is_invalid_input());

    tagged.release().await.expect("release");
    permit.release().await.expect("release");
    assert_eq!(b.list_held().await.expect("list"), []);
}
