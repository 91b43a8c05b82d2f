//! `Herd::stats()`: every primitive's counters, on both backends, and the lost-notice
//! detector with a real lost notice (a waiter whose pub/sub channel right was revoked).

use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd, LockOptions, Role, TryLock, TryMulti, TryPermit};

use crate::common::server::{unique_prefix, RedisServer};
use crate::fixture::{both_backends, within, Fx};

const SHORT: Duration = Duration::from_millis(50);
const LONG: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds, failing after 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

both_backends!(
    locks,
    multi_locks,
    semaphores,
    fanout,
    lost_leases,
    shutdown
);

async fn locks(fx: Fx) {
    let (a, b) = (fx.node("a").await, fx.node("b").await);
    let TryLock::Acquired(guard) = a.try_lock("k").await.expect("try_lock") else {
        panic!("free");
    };
    assert!(b.try_lock("k").await.expect("try_lock").is_busy());
    let err = b.lock("k", SHORT).await.expect_err("held");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    let s = b.stats().lock;
    assert_eq!((s.acquired, s.timeouts), (0, 1));
    assert!(s.busy >= 2, "{s:?}"); // the try, and the waiting call's attempts

    // A waiter woken by the release (a notice, not its timer).
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.lock("k", LONG).await }
    });
    fx.wait_subscribed(&["k"]).await;
    guard.release().await.expect("release");
    let got = within(LONG, "waiter", waiter)
        .await
        .expect("task")
        .expect("lock");
    got.release().await.expect("release");
    assert!(a.once("o", || async { Ok(()) }).await.expect("once").ran());

    let (sa, sb) = (a.stats().lock, b.stats().lock);
    assert_eq!(
        (sa.acquired, sa.released, sa.lost, sa.busy),
        (2, 2, 0, 0),
        "{sa:?}"
    );
    assert_eq!(
        (sb.acquired, sb.released, sb.lost, sb.timeouts),
        (1, 1, 0, 1),
        "{sb:?}"
    );
    assert_eq!(sb.lost_notices, 0, "woken by the release notice: {sb:?}");
    // Other primitives untouched.
    assert_eq!(a.stats().multi, herdlock::PrimitiveStats::default());
    assert_eq!(a.stats().fanout, herdlock::PrimitiveStats::default());
}

async fn multi_locks(fx: Fx) {
    let (a, b) = (fx.node("a").await, fx.node("b").await);
    let TryMulti::Acquired(guard) = a.try_multi(&["m1", "m2"]).await.expect("try_multi") else {
        panic!("free");
    };
    assert!(matches!(
        b.try_multi(&["m2", "m3"]).await.expect("try_multi"),
        TryMulti::Busy(_)
    ));
    let err = b.multi(&["m2", "m3"], SHORT).await.expect_err("held");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.multi(&["m2", "m3"], LONG).await }
    });
    fx.wait_subscribed(&["m2", "m3"]).await;
    guard.release().await.expect("release");
    let got = within(LONG, "waiter", waiter)
        .await
        .expect("task")
        .expect("multi");
    got.release().await.expect("release");

    let (sa, sb) = (a.stats().multi, b.stats().multi);
    assert_eq!((sa.acquired, sa.released, sa.lost), (1, 1, 0), "{sa:?}");
    assert_eq!((sb.acquired, sb.released, sb.timeouts), (1, 1, 1), "{sb:?}");
    assert!(sb.busy >= 2, "{sb:?}");
    assert_eq!(a.stats().lock, herdlock::PrimitiveStats::default());
}

async fn semaphores(fx: Fx) {
    let (a, b) = (fx.node("a").await, fx.node("b").await);
    let (sa, sb) = (
        a.semaphore("s", 1).expect("semaphore"),
        b.semaphore("s", 1).expect("semaphore"),
    );
    let TryPermit::Acquired(permit) = sa.try_acquire().await.expect("try_acquire") else {
        panic!("free");
    };
    assert!(matches!(
        sb.try_acquire().await.expect("try_acquire"),
        TryPermit::Busy { .. }
    ));
    let err = sb.acquire(SHORT).await.expect_err("held");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    let waiter = tokio::spawn({
        let sb = sb.clone();
        async move { sb.acquire(LONG).await }
    });
    fx.wait_subscribed(&["s"]).await;
    permit.release().await.expect("release");
    let got = within(LONG, "waiter", waiter)
        .await
        .expect("task")
        .expect("permit");
    got.release().await.expect("release");

    let (ca, cb) = (a.stats().semaphore, b.stats().semaphore);
    assert_eq!((ca.acquired, ca.released, ca.lost), (1, 1, 0), "{ca:?}");
    assert_eq!((cb.acquired, cb.released, cb.timeouts), (1, 1, 1), "{cb:?}");
    assert!(cb.busy >= 2, "{cb:?}");
}

async fn fanout(fx: Fx) {
    let (a, b) = (fx.node("a").await, fx.node("b").await);
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let leader = tokio::spawn({
        let a = a.clone();
        async move {
            a.fanout("j", LONG, || async move {
                let _ = gate.await;
                Ok(7)
            })
            .await
        }
    });
    until("a leads", || a.stats().runs.led == 1).await;
    // A remote caller follows; a local one joins the leader's flight.
    let remote = tokio::spawn({
        let b = b.clone();
        async move { b.fanout("j", LONG, || async { Ok(0) }).await }
    });
    until("b follows", || b.stats().following == 1).await;
    let local = tokio::spawn({
        let a = a.clone();
        async move { a.fanout("j", LONG, || async { Ok(0) }).await }
    });
    until("the local caller joins", || a.stats().waiting == 2).await;
    // A caller whose timeout passes while the run goes on.
    let late = b.fanout("j", SHORT, || async { Ok(0) }).await;
    assert_eq!(late.expect_err("times out").kind(), ErrorKind::Timeout);
    let _ = go.send(());
    for task in [leader, remote, local] {
        assert_eq!(
            within(LONG, "caller", task)
                .await
                .expect("task")
                .expect("fanout"),
            7
        );
    }
    // Served from the cache.
    let options = FanoutOptions::new().cache_age(LONG);
    let cached = b
        .fanout_with("j", LONG, &options, || async { Ok(0) })
        .await
        .expect("cached");
    assert_eq!((cached.value, cached.role), (7, Role::Cached));

    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.fanout.acquired, sa.fanout.released), (1, 1), "{sa:?}");
    assert_eq!(
        (sa.runs.led, sa.runs.followed, sa.runs.cached),
        (1, 1, 0),
        "{sa:?}"
    );
    assert_eq!((sb.fanout.acquired, sb.fanout.timeouts), (0, 1), "{sb:?}");
    assert!(sb.fanout.busy >= 1, "{sb:?}");
    assert_eq!(
        (sb.runs.led, sb.runs.followed, sb.runs.cached),
        (0, 1, 1),
        "{sb:?}"
    );
    assert_eq!(sb.fanout.lost_notices, 0, "{sb:?}");
}

/// A lease that runs out (no auto-extend) is counted lost once, and not released after; a
/// lock taken over before a renewal noticed is counted lost when its release finds that.
async fn lost_leases(fx: Fx) {
    let a = fx.node("a").await;
    let short = LockOptions::new()
        .ttl(Duration::from_millis(100))
        .auto_extend(false);
    let guard = a.lock_with("k", LONG, &short).await.expect("lock");
    within(LONG, "loss", guard.lost()).await;
    assert_eq!(a.stats().lock.lost, 1);
    // The release may still find the key (its local deadline is a little before the TTL):
    // either way the hold ended lost, and is not counted again.
    let _ = guard.release().await;
    let s = a.stats().lock;
    assert_eq!((s.acquired, s.lost, s.released), (1, 1, 0), "{s:?}");

    // Taken over before any renewal noticed: the release finds another holder, and the
    // hold counts as lost, not released.
    let guard = a.lock("t", LONG).await.expect("lock");
    let b = fx.node("b").await;
    assert!(b.force_release("t").await.expect("force").is_some());
    let other = b.lock("t", LONG).await.expect("lock");
    let err = guard.release().await.expect_err("taken over");
    assert_eq!(err.kind(), ErrorKind::LockLost);
    let s = a.stats().lock;
    assert_eq!((s.acquired, s.lost, s.released), (2, 2, 0), "{s:?}");
    other.release().await.expect("release");
    assert_eq!(b.stats().lock.released, 1);
}

/// `Herd::shutdown` releases what the herd still holds: counted released, not lost.
async fn shutdown(fx: Fx) {
    let a = fx.node("a").await;
    let guard = a.lock("k", LONG).await.expect("lock");
    let permit = a
        .semaphore("s", 1)
        .expect("semaphore")
        .acquire(LONG)
        .await
        .expect("permit");
    let report = a.shutdown(Duration::from_secs(1)).await.expect("shutdown");
    assert_eq!(report.released, 2, "{report:?}");
    let s = a.stats();
    assert_eq!(
        (s.lock.acquired, s.lock.released, s.lock.lost),
        (1, 1, 0),
        "{s:?}"
    );
    assert_eq!((s.semaphore.released, s.semaphore.lost), (1, 0), "{s:?}");
    drop((guard, permit));
    let s = a.stats();
    assert_eq!(
        (s.lock.released, s.lock.lost),
        (1, 0),
        "counted once: {s:?}"
    );
}

/// The lost-notice detector: a waiter whose channel right is revoked loses its pub/sub
/// connection (Redis closes it, and the re-subscription is refused), so the holder's
/// release notice never reaches it; it is woken by its re-check timer (the holder's TTL),
/// finds the lock free, and counts one lost notice. The same for a fan-out follower that
/// finds the result by its timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notice_is_counted() {
    let server = RedisServer::start();
    let prefix = unique_prefix("lost-notice");
    let connect = |url: String| {
        let prefix = prefix.clone();
        async move {
            Herd::builder()
                .prefix(prefix)
                .connect(&url)
                .await
                .expect("connect")
        }
    };
    let holder = connect(server.url()).await;
    let url = server.acl_user("waiter", "pw", &["on", "~*", "&*", "+@all"]);
    let waiter = connect(url).await;
    let ttl = LockOptions::new().ttl(Duration::from_millis(600));
    let guard = holder.lock_with("k", LONG, &ttl).await.expect("lock");
    let task = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.lock("k", Duration::from_secs(30)).await }
    });
    let (channel, job_channel) = (format!("{prefix}:{{k}}"), format!("{prefix}:{{j}}"));
    server.wait_subscribers(&channel, 1, LONG);

    // The follower of a run, subscribed before the right goes.
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let options = FanoutOptions::new().ttl(Duration::from_millis(600));
    let leader = tokio::spawn({
        let (holder, options) = (holder.clone(), options.clone());
        async move {
            holder
                .fanout_with("j", LONG, &options, || async move {
                    let _ = gate.await;
                    Ok(5)
                })
                .await
        }
    });
    until("the run starts", || holder.stats().runs.led == 1).await;
    let follower = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            waiter
                .fanout("j", Duration::from_secs(30), || async { Ok(0) })
                .await
        }
    });
    until("the follower waits", || waiter.stats().following == 1).await;
    server.wait_subscribers(&job_channel, 1, LONG);

    server.cmd(&["ACL", "SETUSER", "waiter", "resetchannels"]);
    until("the waiter's subscriptions are gone", || {
        server.subscribers(&channel) + server.subscribers(&job_channel) == 0
    })
    .await;
    guard.release().await.expect("release");
    let _ = go.send(());
    assert_eq!(
        within(LONG, "leader", leader)
            .await
            .expect("task")
            .expect("run")
            .value,
        5
    );

    let got = within(LONG, "waiter", task)
        .await
        .expect("task")
        .expect("lock");
    let value = within(LONG, "follower", follower)
        .await
        .expect("task")
        .expect("result");
    assert_eq!(value, 5);
    let s = waiter.stats();
    assert_eq!(s.lock.lost_notices, 1, "{s:?}");
    assert_eq!(s.fanout.lost_notices, 1, "{s:?}");
    assert_eq!(holder.stats().lock.lost_notices, 0);
    got.release().await.expect("release");
}
