//! One shape for every guard (issue 12): coalescing heartbeats (counted on a real Redis),
//! `LostToken`s moved into spawned tasks and fired by real losses, options a primitive cannot
//! honour refused, and compile-time `Send`/`Sync` checks of every public future and handle.

use std::time::{Duration, Instant};

use futures::future::join_all;
use herdlock::{
    ErrorKind, FanoutOptions, Herd, LockOptions, LostToken, MultiOptions, Push, SemaphoreOptions,
};

use crate::common::server::{unique_prefix, RedisServer};
use crate::fixture::{both_backends, within, Fx, Kind};
use crate::protocol_v2::command_stats;

both_backends!(
    heartbeat_renews_once_per_third_of_the_ttl,
    heartbeat_fails_at_once_when_lost,
    tokens_end_on_release_and_fire_on_expiry,
    options_a_guard_cannot_honour_are_refused,
    multi_replicas_are_honoured,
);

const LONG: Duration = Duration::from_secs(30);
const LIMIT: Duration = Duration::from_secs(10);

/// `EVALSHA` calls (every herdlock step is one) on `server` so far.
fn scripts(server: &RedisServer) -> u64 {
    command_stats(server).get("evalsha").copied().unwrap_or(0)
}

/// The remaining TTL of `key`'s lock, as `node` sees it.
async fn remaining(node: &Herd, key: &str) -> Duration {
    node.lock_status(key)
        .await
        .expect("status")
        .holder
        .and_then(|h| h.remaining)
        .expect("held, with a ttl")
}

/// Without auto-extend, heartbeats keep a lock alive: none sends anything within a third
/// of the TTL of the acquisition, and then one renewal serves 50 concurrent callers and
/// every later call until the next third.
async fn heartbeat_renews_once_per_third_of_the_ttl(fx: Fx) {
    let herd = fx.node("beats").await;
    let ttl = Duration::from_millis(1_500);
    let options = LockOptions::new().ttl(ttl).auto_extend(false);
    let guard = herd
        .try_lock_with("beat", &options)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let acquired = Instant::now();
    // A wait for time to pass (a third of the TTL), not for another task.
    tokio::time::sleep(ttl / 3 + Duration::from_millis(20)).await;
    let results = join_all((0..50).map(|_| guard.heartbeat())).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for _ in 0..200 {
        guard.heartbeat().await.expect("beat");
    }
    let left = remaining(&herd, "beat").await;
    assert!(left > ttl * 3 / 4, "renewed to the full TTL: {left:?} left");
    // Renewed to the full TTL after the first third: past the acquisition's TTL, still held.
    let until_first_ttl = ttl.saturating_sub(acquired.elapsed());
    tokio::time::sleep(until_first_ttl + Duration::from_millis(50)).await;
    assert!(!guard.is_lost(), "the heartbeat renewed the lock");
    let other = fx.node("other").await;
    assert!(other.try_lock("beat").await.expect("try").is_busy());
    guard.release().await.expect("release");
}

/// A lock known lost fails every heartbeat at once, without a round trip, and another
/// node has it.
async fn heartbeat_fails_at_once_when_lost(fx: Fx) {
    let herd = fx.node("lost").await;
    let options = LockOptions::new()
        .ttl(Duration::from_millis(200))
        .auto_extend(false);
    let guard = herd
        .try_lock_with("gone", &options)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    within(LIMIT, "the loss", guard.lost_token().lost()).await;
    let started = Instant::now();
    let results = join_all((0..20).map(|_| guard.heartbeat())).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(herdlock::Error::is_lock_lost)),
        "{results:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    let other = fx.node("other").await;
    let taken = other
        .lock("gone", LIMIT)
        .await
        .expect("free after the lease ran out");
    assert!(guard.heartbeat().await.expect_err("lost").is_lock_lost());
    assert!(guard.release().await.expect_err("lost").is_lock_lost());
    taken.release().await.expect("the new holder is intact");
}

/// A token of a released guard ends without being lost; a token of an expired lease
/// fires in a spawned task, for a lock, a multi-lock and a permit alike.
async fn tokens_end_on_release_and_fire_on_expiry(fx: Fx) {
    let herd = fx.node("tokens").await;
    // Released: ended, never lost.
    let guard = herd.lock("clean", LIMIT).await.expect("lock");
    let token = guard.lost_token();
    let watcher = tokio::spawn({
        let token = token.clone();
        async move {
            token.ended().await;
            token.is_lost()
        }
    });
    assert!(!token.is_ended() && !token.is_lost());
    guard.release().await.expect("release");
    assert!(!within(LIMIT, "ended", watcher).await.expect("task"));
    assert!(token.is_ended() && !token.is_lost());

    // Expired: lost, for each kind of guard.
    let short = Duration::from_millis(200);
    let lock = herd
        .try_lock_with("expire", &LockOptions::new().ttl(short).auto_extend(false))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let multi = herd
        .try_multi_with(
            &["m1", "m2"],
            &MultiOptions::new().ttl(short).auto_extend(false),
        )
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let tokens = [lock.lost_token(), multi.lost_token()];
    let fired = tokens.map(|token| {
        tokio::spawn(async move {
            token.lost().await;
            token.is_lost()
        })
    });
    for task in fired {
        assert!(within(LIMIT, "a token's loss", task).await.expect("task"));
    }
    assert!(lock.heartbeat().await.expect_err("lost").is_lock_lost());
    assert!(multi.heartbeat().await.expect_err("lost").is_lock_lost());
    // The local deadline comes a little before the keys expire: once another node has
    // them, the release is `LockLost` too.
    let other = fx.node("other").await;
    let new_holder = other
        .multi(&["m1", "m2"], LIMIT)
        .await
        .expect("free after expiry");
    assert!(multi.release().await.expect_err("lost").is_lock_lost());
    new_holder
        .release()
        .await
        .expect("the new holder is intact");
    drop(lock);
    // A permit's token ends with the permit.
    let permit = herd
        .semaphore_with("sem", 1, &SemaphoreOptions::new().lease(LONG))
        .expect("semaphore")
        .acquire(LIMIT)
        .await
        .expect("permit");
    permit.heartbeat().await.expect("a fresh permit beats");
    let token = permit.lost_token();
    drop(permit);
    within(LIMIT, "the permit's token ends", token.ended()).await;
    assert!(!token.is_lost());
}

/// `cancel_on_lost` on a guard form is refused, not ignored; on `once` it is honoured.
async fn options_a_guard_cannot_honour_are_refused(fx: Fx) {
    let herd = fx.node("options").await;
    for on in [true, false] {
        let options = LockOptions::new().cancel_on_lost(on);
        let e = herd
            .try_lock_with("k", &options)
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.message().contains("cancel_on_lost"), "{e}");
        let e = herd
            .lock_with("k", LIMIT, &options)
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    // Nothing was taken.
    assert!(herd
        .lock_status("k")
        .await
        .expect("status")
        .holder
        .is_none());
    // `once` honours it, and hands its closure the lock's token.
    let options = LockOptions::new().cancel_on_lost(false);
    let outcome = herd
        .once_with("k", &options, || async {
            let token = LostToken::current().expect("inside once");
            Ok(token.is_lost())
        })
        .await
        .expect("once");
    assert_eq!(outcome.into_value(), Some(false));
    // So does the waiting closure form.
    let sees_token = herd
        .run_locked_with("k", LIMIT, &options, || async {
            Ok(LostToken::current().is_some_and(|t| !t.is_ended()))
        })
        .await
        .expect("run_locked honours cancel_on_lost");
    assert!(sees_token, "run_locked's closure sees its lock's token");
    assert!(LostToken::current().is_none(), "outside any run");
}

/// `MultiOptions::replicas` is honoured: with no replica to acknowledge (the test Redis
/// has none; the in-memory engine never has), the multi-lock fails `NotReplicated` and
/// every key is free again.
async fn multi_replicas_are_honoured(fx: Fx) {
    let herd = fx.node("replicas").await;
    let options = MultiOptions::new().replicas(1, Duration::from_millis(50));
    let e = herd
        .try_multi_with(&["r1", "r2"], &options)
        .await
        .expect_err("no replica");
    assert_eq!(e.kind(), ErrorKind::NotReplicated, "{e}");
    let e = herd
        .multi_with(&["r1", "r2"], LIMIT, &options)
        .await
        .expect_err("no replica");
    assert_eq!(e.kind(), ErrorKind::NotReplicated, "{e}");
    let other = fx.node("other").await;
    let both = other
        .try_multi(&["r1", "r2"])
        .await
        .expect("try")
        .acquired()
        .expect("released after the failed acknowledgement");
    both.release().await.expect("release");
    // Zero replicas asks for nothing.
    let none = MultiOptions::new().replicas(0, Duration::from_millis(50));
    herd.try_multi_with(&["r1", "r2"], &none)
        .await
        .expect("try")
        .acquired()
        .expect("free")
        .release()
        .await
        .expect("release");
}

/// Issue 12: heartbeats coalesce, counted by a private Redis (`INFO commandstats`). Without
/// auto-extend: no script within the first third of the TTL, then one renewal for 50
/// concurrent callers and 200 more calls. With auto-extend: a hot loop of heartbeats in
/// four tasks sends no more scripts than the watchdog's own renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_coalesce_on_redis() {
    let server = RedisServer::start();
    let herd = Herd::builder()
        .prefix(unique_prefix("guards::coalesce"))
        .connect(&server.url())
        .await
        .expect("connect");
    // Scripts load on first use (NOSCRIPT, then SCRIPT LOAD): warm the extend script up.
    let warm = herd
        .try_lock_with(
            "warm",
            &LockOptions::new()
                .ttl(Duration::from_millis(300))
                .auto_extend(false),
        )
        .await
        .expect("try")
        .acquired()
        .expect("free");
    tokio::time::sleep(Duration::from_millis(120)).await;
    warm.heartbeat().await.expect("warm-up beat");
    warm.release().await.expect("release");

    let ttl = Duration::from_secs(3);
    let guard = herd
        .try_lock_with("hot", &LockOptions::new().ttl(ttl).auto_extend(false))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let before = scripts(&server);
    let fresh = join_all((0..50).map(|_| guard.heartbeat())).await;
    assert!(fresh.iter().all(Result::is_ok), "{fresh:?}");
    for _ in 0..200 {
        guard.heartbeat().await.expect("beat");
    }
    assert_eq!(
        scripts(&server) - before,
        0,
        "heartbeats within a third of the TTL of the acquisition send nothing"
    );
    // A wait for time to pass (a third of the TTL), not for another task.
    tokio::time::sleep(ttl / 3 + Duration::from_millis(20)).await;
    let before = scripts(&server);
    let stale = join_all((0..50).map(|_| guard.heartbeat())).await;
    assert!(stale.iter().all(Result::is_ok), "{stale:?}");
    for _ in 0..200 {
        guard.heartbeat().await.expect("beat");
    }
    let sent = scripts(&server) - before;
    assert_eq!(
        sent, 1,
        "50 concurrent heartbeats and 200 more: one renewal"
    );
    let left = herd
        .lock_status("hot")
        .await
        .expect("status")
        .holder
        .and_then(|h| h.remaining)
        .expect("held");
    assert!(left > ttl * 3 / 4, "renewed to the full TTL: {left:?} left");
    guard.release().await.expect("release");

    // With auto-extend: the watchdog renews every TTL/3 anyway; heartbeats add nothing.
    let ttl = Duration::from_millis(900);
    let guard = herd
        .try_lock_with("auto", &LockOptions::new().ttl(ttl))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let before = scripts(&server);
    let started = Instant::now();
    let run = Duration::from_millis(1_500);
    let calls: Vec<u64> = join_all((0..4).map(|_| async {
        let mut calls = 0;
        while started.elapsed() < run {
            guard.heartbeat().await.expect("beat");
            calls += 1;
            tokio::task::yield_now().await;
        }
        calls
    }))
    .await;
    let elapsed = started.elapsed();
    let sent = scripts(&server) - before;
    let calls: u64 = calls.iter().sum();
    // One renewal per TTL/3 of the run, plus one for the period under way at each end.
    let most = (elapsed.as_millis() / (ttl / 3).as_millis()) as u64 + 2;
    eprintln!("{calls} heartbeats in {elapsed:?} sent {sent} scripts (at most {most})");
    assert!(calls > 100, "a hot loop: {calls} calls");
    assert!(
        sent <= most,
        "{calls} heartbeats sent {sent} scripts, more than {most}"
    );
    guard.release().await.expect("release");
}

/// A lock taken over behind its holder's back (Redis `SET`): a heartbeat fails with
/// `LockLost` as soon as the watchdog's renewal found it, and tokens of a lock, a
/// multi-lock and a permit moved into spawned tasks fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_fire_in_spawned_tasks_on_a_real_loss_redis() {
    let fx = Fx::new(Kind::Redis, "guards::tokens_fire");
    let server = fx.server();
    let herd = fx.node("victim").await;
    let ttl = Duration::from_millis(600);
    let lock = herd
        .try_lock_with("stolen", &LockOptions::new().ttl(ttl))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let multi = herd
        .try_multi_with(&["s1", "s2"], &MultiOptions::new().ttl(ttl))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let permit = herd
        .semaphore_with("ssem", 2, &SemaphoreOptions::new().lease(ttl))
        .expect("semaphore")
        .acquire(LIMIT)
        .await
        .expect("permit");
    let watchers: Vec<_> = [lock.lost_token(), multi.lost_token(), permit.lost_token()]
        .into_iter()
        .map(|token| {
            tokio::spawn(async move {
                token.lost().await;
                Instant::now()
            })
        })
        .collect();
    let lock_key = format!("{}:{{stolen}}:lock", fx.prefix);
    let stolen = Instant::now();
    server.cmd(&["SET", &lock_key, "999:x:30000:0:thief", "PX", "30000"]);
    server.cmd(&[
        "SET",
        &format!("{}:{{s2}}:lock", fx.prefix),
        "999:y:30000:0:thief",
        "PX",
        "30000",
    ]);
    server.cmd(&["DEL", &format!("{}:{{ssem}}:sem", fx.prefix)]);
    for watcher in watchers {
        let fired = within(LIMIT, "a token fires", watcher).await.expect("task");
        // Found by the next renewal: within a third of the TTL (plus scheduling).
        assert!(
            fired - stolen < ttl,
            "fired {:?} after the theft",
            fired - stolen
        );
    }
    assert!(lock.heartbeat().await.expect_err("lost").is_lock_lost());
    assert!(multi.heartbeat().await.expect_err("lost").is_lock_lost());
    assert!(permit.heartbeat().await.expect_err("lost").is_lock_lost());
    assert!(lock.release().await.expect_err("lost").is_lock_lost());
    assert!(multi.release().await.expect_err("lost").is_lock_lost());
    assert_eq!(server.cmd(&["GET", &lock_key]), "999:x:30000:0:thief");
    drop(permit);

    // Taken over and released before any renewal noticed: the release finds the loss, and
    // the token says lost (not merely ended).
    let guard = herd
        .try_lock_with("quiet", &LockOptions::new().ttl(LONG))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let token = guard.lost_token();
    let quiet_key = format!("{}:{{quiet}}:lock", fx.prefix);
    server.cmd(&["SET", &quiet_key, "999:z:30000:0:thief", "PX", "30000"]);
    assert!(!token.is_lost(), "no renewal ran yet");
    assert!(guard.release().await.expect_err("taken").is_lock_lost());
    assert!(token.is_lost() && token.is_ended());
    within(LIMIT, "the token fires", token.lost()).await;
    assert_eq!(server.cmd(&["GET", &quiet_key]), "999:z:30000:0:thief");
}

/// The run token of a fan-out job (`LostToken::current`) and of a push leader's completer,
/// moved into spawned tasks, fire when the run's lock is taken over on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_tokens_fire_on_a_real_loss_redis() {
    let fx = Fx::new(Kind::Redis, "guards::run_tokens");
    let server = fx.server();
    let herd = fx.node("runner").await;
    let options = FanoutOptions::new()
        .ttl(Duration::from_millis(600))
        .cancel_on_lost(false);
    let (token_tx, token_rx) = tokio::sync::oneshot::channel::<LostToken>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn({
        let (herd, options) = (herd.clone(), options.clone());
        async move {
            herd.fanout_with("job", LIMIT, &options, move || async move {
                let token = LostToken::current().expect("inside a fan-out job");
                let _ = token_tx.send(token);
                let _ = stop_rx.await;
                Ok(1_u32)
            })
            .await
        }
    });
    let token = within(LIMIT, "the job starts", token_rx)
        .await
        .expect("token");
    let watcher = tokio::spawn(async move {
        token.lost().await;
        token.is_lost()
    });
    let run_key = format!("{}:{{job}}:lock", fx.prefix);
    server.cmd(&["SET", &run_key, "999:x:30000:0:thief", "PX", "30000"]);
    assert!(within(LIMIT, "the run token fires", watcher)
        .await
        .expect("task"));
    stop_tx.send(()).expect("the job waits");
    // With cancel_on_lost off the job finished; its result reaches this process only.
    let _ = within(LIMIT, "the run ends", run).await.expect("task");

    let push = herd
        .push::<u32>(
            "pushed",
            LIMIT,
            &FanoutOptions::new().ttl(Duration::from_millis(600)),
        )
        .await
        .expect("push");
    let Push::Leader(completer) = push else {
        panic!("the first caller leads");
    };
    let token = completer.lost_token();
    let watcher = tokio::spawn(async move {
        token.lost().await;
        token.is_lost()
    });
    server.cmd(&[
        "SET",
        &format!("{}:{{pushed}}:lock", fx.prefix),
        "999:y:30000:0:thief",
        "PX",
        "30000",
    ]);
    assert!(within(LIMIT, "the completer's token fires", watcher)
        .await
        .expect("task"));
    assert!(completer.lost_token().is_lost());
}

/// Compile-time checks: every public future, guard and handle is `Send` (and the handles
/// `Sync`), so they can be held across `.await` in spawned tasks.
#[allow(dead_code, clippy::too_many_lines)]
mod send_sync {
    use std::time::Duration;

    use herdlock::{
        Completer, Error, Fanned, FanoutOptions, Follower, HeldKey, Herd, Holder, JobError,
        LockGuard, LockOptions, LockStatus, LostToken, MultiGuard, MultiOptions, Outcome, Permit,
        Push, Semaphore, SemaphoreOptions, SemaphoreStatus, TryLock, TryMulti, TryPermit,
    };

    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync>() {}
    fn static_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn handles_and_values_are_send_and_sync() {
        static_send_sync::<Herd>();
        static_send_sync::<LockGuard>();
        static_send_sync::<MultiGuard>();
        static_send_sync::<Permit>();
        static_send_sync::<Semaphore>();
        static_send_sync::<LostToken>();
        static_send_sync::<Completer<u32>>();
        static_send_sync::<Follower<u32>>();
        static_send_sync::<Push<u32>>();
        static_send_sync::<TryLock>();
        static_send_sync::<TryMulti>();
        static_send_sync::<TryPermit>();
        static_send_sync::<Outcome<u32>>();
        static_send_sync::<Fanned<u32>>();
        static_send_sync::<Error>();
        static_send_sync::<JobError>();
        static_send_sync::<Holder>();
        static_send_sync::<HeldKey>();
        static_send_sync::<LockStatus>();
        static_send_sync::<SemaphoreStatus>();
        send_sync::<LockOptions>();
        send_sync::<MultiOptions>();
        send_sync::<SemaphoreOptions>();
        send_sync::<FanoutOptions>();
    }

    /// Builds (never awaits) every public future: the body only has to compile.
    fn futures(
        herd: &Herd,
        guard: LockGuard,
        multi: MultiGuard,
        permit: Permit,
        semaphore: &Semaphore,
        follower: Follower<u32>,
        token: &LostToken,
    ) {
        let wait = Duration::from_secs(1);
        let lock_options = LockOptions::new();
        let multi_options = MultiOptions::new();
        let fanout_options = FanoutOptions::new();
        send(&Herd::connect("redis://127.0.0.1/"));
        send(&Herd::builder().connect("redis://127.0.0.1/"));
        send(&Herd::builder().connect_cluster(&["redis://127.0.0.1/"]));
        send(&Herd::builder().connect_sentinel("m", &["redis://127.0.0.1/"]));
        send(&herd.try_lock("k"));
        send(&herd.try_lock_with("k", &lock_options));
        send(&herd.lock("k", wait));
        send(&herd.lock_with("k", wait, &lock_options));
        send(&herd.lock_status("k"));
        send(&herd.once("k", || async { Ok(1) }));
        send(&herd.once_with("k", &lock_options, || async { Ok(1) }));
        send(&herd.run_locked("k", wait, || async { Ok(1) }));
        send(&herd.run_locked_with("k", wait, &lock_options, || async { Ok(1) }));
        send(&herd.fanout("k", wait, || async { Ok(1) }));
        send(&herd.fanout_with("k", wait, &fanout_options, || async { Ok(1) }));
        send(&herd.push::<u32>("k", wait, &fanout_options));
        send(&herd.try_multi(&["a", "b"]));
        send(&herd.try_multi_with(&["a", "b"], &multi_options));
        send(&herd.multi(&["a", "b"], wait));
        send(&herd.multi_with(&["a", "b"], wait, &multi_options));
        send(&semaphore.try_acquire());
        send(&semaphore.acquire(wait));
        send(&semaphore.status());
        send(&guard.extend(wait));
        send(&guard.heartbeat());
        send(&guard.lost());
        send(&multi.extend(wait));
        send(&multi.heartbeat());
        send(&multi.lost());
        send(&permit.extend(wait));
        send(&permit.heartbeat());
        send(&permit.lost());
        send(&token.lost());
        send(&token.ended());
        send(&follower.wait());
        send(&guard.release());
        send(&multi.release());
        send(&permit.release());
    }
}
