//! The smoke set the permission tests run as restricted users, on one Redis, a cluster or
//! through Sentinel: two herds `a` and `b` of one prefix, every wake-up by pub/sub well
//! before the holders' TTLs. `subscribed(key)` tells whether a waiter is subscribed to the
//! channel of `key` (how that is asked differs per deployment).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{Error, FanoutOptions, Herd, LockOptions, Outcome, SemaphoreOptions};

use crate::fixture::within;

/// Every TTL, lease and wait of the smoke set: far longer than a pub/sub wake-up takes.
pub(crate) const LONG: Duration = Duration::from_secs(30);
/// What a pub/sub wake-up must take less than.
pub(crate) const QUICK: Duration = Duration::from_secs(5);

/// The channel of `key` under `prefix` (src/keys.rs: a key with a hash tag `{t}` keeps it).
pub(crate) fn channel(prefix: &str, key: &str) -> String {
    match key.strip_prefix('{').and_then(|rest| rest.split_once('}')) {
        Some((tag, _)) => format!("{prefix}:{{{tag}}}:{key}"),
        None => format!("{prefix}:{{{key}}}"),
    }
}

/// Waits until `subscribed()` says a waiter is subscribed, runs `release`, and returns what
/// the waiter got, checking it was woken well before the holder's TTL.
pub(crate) async fn woken<T>(
    what: &str,
    subscribed: impl Fn() -> bool,
    waiter: tokio::task::JoinHandle<Result<T, Error>>,
    release: impl std::future::Future<Output = ()>,
) -> T {
    let deadline = Instant::now() + QUICK;
    while !subscribed() {
        assert!(
            Instant::now() < deadline,
            "{what}: the waiter never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let released = Instant::now();
    release.await;
    let got = within(LONG, what, waiter)
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = released.elapsed();
    eprintln!("{what}: woken {took:?} after the release");
    assert!(took < QUICK, "{what}: woken {took:?} after the release");
    got
}

/// 5 callers on each of two herds: one run; the leader finishes only once the other herd
/// follows, so its result crosses pub/sub.
pub(crate) async fn fanout(a: &Herd, b: &Herd) {
    let runs = Arc::new(AtomicUsize::new(0));
    let options = FanoutOptions::new().ttl(LONG);
    let mut callers = Vec::new();
    for herd in [a, b] {
        for _ in 0..5 {
            let (herd, a, b) = (herd.clone(), a.clone(), b.clone());
            let (runs, options) = (Arc::clone(&runs), options.clone());
            callers.push(tokio::spawn(async move {
                herd.fanout_with("job", LONG, &options, move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while a.stats().following + b.stats().following == 0 {
                        assert!(Instant::now() < deadline, "the other herd never followed");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(42u32)
                })
                .await
            }));
        }
    }
    let started = Instant::now();
    for caller in callers {
        let fanned = within(LONG, "fan-out caller", caller)
            .await
            .expect("task")
            .expect("fanout");
        assert_eq!(fanned.value, 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let took = started.elapsed();
    eprintln!("fan-out: 10 callers, 1 run, {took:?}");
    assert!(took < QUICK, "fan-out took {took:?}");
}

/// b waits for a lock a holds; a's release wakes it.
pub(crate) async fn lock(a: &Herd, b: &Herd, subscribed: impl Fn(&str) -> bool) {
    let options = LockOptions::new().ttl(LONG);
    let held = a.lock_with("l", QUICK, &options).await.expect("a locks");
    let status = b.lock_status("l").await.expect("status");
    assert_eq!(status.holder.expect("held").owner, "a");
    let b = b.clone();
    let waiter = tokio::spawn(async move { b.lock("l", LONG).await });
    let got = woken("lock", || subscribed("l"), waiter, async {
        held.release().await.expect("release");
    })
    .await;
    got.release().await.expect("release");
}

/// b waits for a multi-lock sharing a key (and the hash tag) with a's.
pub(crate) async fn multi(a: &Herd, b: &Herd, subscribed: impl Fn(&str) -> bool) {
    let options = herdlock::MultiOptions::new().ttl(LONG);
    let held = a
        .try_multi_with(&["{m}:1", "{m}:2"], &options)
        .await
        .expect("try_multi")
        .acquired()
        .expect("free");
    let b = b.clone();
    let waiter = tokio::spawn(async move { b.multi(&["{m}:2", "{m}:3"], LONG).await });
    let got = woken("multi", || subscribed("{m}:2"), waiter, async {
        held.release().await.expect("release");
    })
    .await;
    got.release().await.expect("release");
}

/// One permit (its status seen by the other herd); a waiter woken by the release.
pub(crate) async fn semaphore(a: &Herd, b: &Herd, fair: bool, subscribed: impl Fn(&str) -> bool) {
    let key = if fair { "fair" } else { "unfair" };
    let options = SemaphoreOptions::new().lease(LONG).fair(fair);
    let sem_a = a.semaphore_with(key, 1, &options).expect("semaphore");
    let sem_b = b.semaphore_with(key, 1, &options).expect("semaphore");
    let permit = sem_a
        .try_acquire()
        .await
        .expect("try")
        .acquired()
        .expect("free");
    assert_eq!(sem_b.status().await.expect("status").in_use, 1);
    let waiter = tokio::spawn(async move { sem_b.acquire(LONG).await });
    let got = woken(key, || subscribed(key), waiter, async {
        permit.release().await.expect("release");
    })
    .await;
    got.release().await.expect("release");
}

/// `once` runs on `a` while the same key is busy for `b`.
pub(crate) async fn once(a: &Herd, b: &Herd) {
    let outcome = a
        .once("o", || async {
            let busy = b.once("o", || async { Ok(()) }).await?;
            assert!(matches!(busy, Outcome::Busy(_)), "{busy:?}");
            Ok(1)
        })
        .await
        .expect("once");
    assert_eq!(outcome.into_value(), Some(1));
}
