//! Multi-key locks: all or none, lost keys, waiting, fencing, hash tags (both
//! backends, plus Redis-only forms that lose exactly one key).

use std::time::{Duration, Instant};

use herdlock::{
    ErrorKind, Herd, LockGuard, LockOptions, MultiGuard, MultiOptions, TryLock, TryMulti,
};

use crate::fixture::{both_backends, within, Fx, Kind};

both_backends!(
    busy_names_held_key_and_locks_nothing,
    busy_behind_another_multi_names_every_held_key,
    extend_after_expiry_and_takeover_is_lock_lost,
    release_after_expiry_is_lock_lost,
    duplicates_are_ignored,
    bad_input_is_rejected,
    blocking_multi_is_woken_by_release,
    blocking_multi_times_out_naming_held_key,
    fences_increase_per_key,
    hash_tag_keys_lock_together,
    extend_keeps_every_key,
    dropped_guard_is_released,
);

const LONG: Duration = Duration::from_secs(30);

fn long() -> LockOptions {
    LockOptions::new().ttl(LONG)
}

fn long_multi() -> MultiOptions {
    MultiOptions::new().ttl(LONG)
}

/// The guard of an acquired multi-lock; panics naming the holders otherwise.
fn acquired(outcome: TryMulti) -> MultiGuard {
    match outcome {
        TryMulti::Acquired(guard) => guard,
        TryMulti::Busy(held) => panic!("expected the multi-lock to be free, held: {held:?}"),
    }
}

/// Asserts that `key` is free by taking and releasing it on `node`.
async fn assert_free(node: &Herd, key: &str) {
    match node.try_lock(key).await.expect("try_lock") {
        TryLock::Acquired(guard) => guard.release().await.expect("release"),
        TryLock::Busy(holder) => panic!("`{key}` should be free, held by {holder:?}"),
    }
}

/// Asserts that `key` is held by `owner`.
async fn assert_held_by(node: &Herd, key: &str, owner: &str) {
    let status = node.lock_status(key).await.expect("lock_status");
    let holder = status
        .holder
        .unwrap_or_else(|| panic!("`{key}` should be held by {owner}, it is free"));
    assert_eq!(holder.owner, owner, "holder of `{key}`");
}

/// The Redis name of `key`'s lock (the key layout of the crate docs; plain keys only).
fn lock_key(fx: &Fx, key: &str) -> String {
    format!("{}:{{{key}}}:lock", fx.prefix)
}

/// Redis only: `x` takes `a`, `b` and `c`; then `b`'s lock is deleted under it and `y`
/// takes `b`. Returns `x`'s multi-guard and `y`'s lock on `b`.
async fn abc_with_b_taken(fx: &Fx, x: &Herd, y: &Herd) -> (MultiGuard, LockGuard) {
    let guard = acquired(
        x.try_multi_with(&["a", "b", "c"], &long_multi())
            .await
            .expect("try_multi"),
    );
    assert_eq!(fx.server().cmd(&["DEL", &lock_key(fx, "b")]), "1");
    let taken = y
        .try_lock_with("b", &long())
        .await
        .expect("try_lock")
        .acquired()
        .expect("b was deleted");
    (guard, taken)
}

/// Issue 4, test 3: key 1 held by another node's plain lock: `try_multi(1, 2, 3)` is Busy
/// naming key 1 and its holder, and keys 2 and 3 are left free.
async fn busy_names_held_key_and_locks_nothing(fx: Fx) {
    let a = fx.node("node-a").await;
    let b = fx.node("node-b").await;
    let c = fx.node("node-c").await;
    let guard = a
        .try_lock_with("1", &long())
        .await
        .expect("try_lock")
        .acquired()
        .expect("free");
    match b.try_multi(&["1", "2", "3"]).await.expect("try_multi") {
        TryMulti::Busy(held) => {
            assert_eq!(held.len(), 1, "{held:?}");
            assert_eq!(held[0].key, "1");
            assert_eq!(held[0].holder.owner, "node-a");
            assert_eq!(held[0].holder.fence, guard.fence());
            assert!(held[0].holder.remaining.is_some_and(|r| r <= LONG));
        }
        TryMulti::Acquired(g) => panic!("acquired {g:?} while key 1 is held"),
    }
    // Nothing was left locked: both other keys are free, for another node too.
    assert_free(&c, "2").await;
    assert_free(&c, "3").await;
    // The blocking form does not leave a subset behind either when it times out.
    let e = b
        .multi(&["2", "1", "3"], Duration::from_millis(100))
        .await
        .expect_err("key 1 is held");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert_free(&c, "2").await;
    assert_free(&c, "3").await;
    guard.release().await.expect("release");
    let all = acquired(b.try_multi(&["1", "2", "3"]).await.expect("try_multi"));
    all.release().await.expect("release");
}

/// Issue 4, test 3 (holder is a multi-lock): every held key is reported, with its holder.
async fn busy_behind_another_multi_names_every_held_key(fx: Fx) {
    let a = fx.node("multi-a").await;
    let b = fx.node("multi-b").await;
    let first = acquired(
        a.try_multi_with(&["x", "1", "3"], &long_multi())
            .await
            .expect("try_multi"),
    );
    match b.try_multi(&["1", "2", "3"]).await.expect("try_multi") {
        TryMulti::Busy(held) => {
            let mut names: Vec<(&str, &str)> = held
                .iter()
                .map(|h| (h.key.as_str(), h.holder.owner.as_str()))
                .collect();
            names.sort_unstable();
            assert_eq!(names, [("1", "multi-a"), ("3", "multi-a")]);
            for h in &held {
                assert_eq!(Some(h.holder.fence), first.fence(&h.key));
            }
        }
        TryMulti::Acquired(g) => panic!("acquired {g:?} while 1 and 3 are held"),
    }
    assert_free(&b, "2").await;
    first.release().await.expect("release");
    for key in ["x", "1", "3"] {
        assert_free(&b, key).await;
    }
    let second = acquired(b.try_multi(&["1", "2", "3"]).await.expect("try_multi"));
    second.release().await.expect("release");
}

/// Takes `a, b, c` on `x` with a 150 ms TTL, lets it run out, and has `y` take `b`.
async fn expire_then_take_b(x: &Herd, y: &Herd) -> (MultiGuard, herdlock::LockGuard) {
    // No auto-extension: this lease must run out on its own.
    let short = MultiOptions::new()
        .ttl(Duration::from_millis(150))
        .auto_extend(false);
    let guard = acquired(
        x.try_multi_with(&["a", "b", "c"], &short)
            .await
            .expect("try_multi"),
    );
    // `lock` re-checks when the holder's TTL runs out and takes `b` then.
    let taken = y
        .lock_with("b", Duration::from_secs(5), &long())
        .await
        .expect("b taken over after the multi-lock expired");
    assert!(taken.fence() > guard.fence("b").expect("b is in the guard"));
    (guard, taken)
}

/// Issue 4, test 4 (every key expired, one taken over): `extend` fails with `LockLost`
/// naming the taken key, and leaves the new holder's lock alone.
async fn extend_after_expiry_and_takeover_is_lock_lost(fx: Fx) {
    let x = fx.node("x").await;
    let y = fx.node("y").await;
    let (guard, taken) = expire_then_take_b(&x, &y).await;
    let e = guard.extend(LONG).await.expect_err("b is lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(e.message().contains("`b`"), "{e}");
    assert_held_by(&y, "b", "y").await;
    assert_free(&y, "a").await;
    assert_free(&y, "c").await;
    // The guard holds nothing now; releasing it says so, as for a lock guard.
    assert!(guard.is_lost());
    let e = guard.release().await.expect_err("nothing left to release");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    taken
        .release()
        .await
        .expect("the new holder's lock is intact");
}

/// Release after every key expired and one was taken over: `LockLost` naming every key
/// (as `LockGuard::release`), and the new holder's lock is intact.
async fn release_after_expiry_is_lock_lost(fx: Fx) {
    let x = fx.node("x").await;
    let y = fx.node("y").await;
    let (guard, taken) = expire_then_take_b(&x, &y).await;
    let e = guard.release().await.expect_err("every key was lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    for key in ["`a`", "`b`", "`c`"] {
        assert!(e.message().contains(key), "{key} in {e}");
    }
    assert_held_by(&y, "b", "y").await;
    taken
        .release()
        .await
        .expect("the new holder's lock is intact");
}

/// Issue 4, test 4 (Redis, exactly one key lost): `b`'s lock is deleted under the holder and
/// taken by another node; `extend` fails naming only `b`, and `a` and `c` are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_with_one_key_lost_releases_the_others_redis() {
    let fx = Fx::new(Kind::Redis, "multi::extend_with_one_key_lost");
    let x = fx.node("x").await;
    let y = fx.node("y").await;
    let (guard, taken) = abc_with_b_taken(&fx, &x, &y).await;
    // Before the extend, `a` and `c` are still held by `x`.
    assert_held_by(&y, "a", "x").await;
    assert_held_by(&y, "c", "x").await;
    let e = guard.extend(LONG).await.expect_err("b is lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(e.message().contains("`b`"), "{e}");
    assert!(
        !e.message().contains("`a`") && !e.message().contains("`c`"),
        "only b was lost: {e}"
    );
    assert_free(&y, "a").await;
    assert_free(&y, "c").await;
    assert_held_by(&y, "b", "y").await;
    let e = guard.release().await.expect_err("nothing left to release");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    taken.release().await.expect("y's lock is intact");
}

/// Release with exactly one key lost (Redis): `LockLost` naming it alone, the rest
/// released; the other node's lock on it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_with_one_key_lost_reports_it_redis() {
    let fx = Fx::new(Kind::Redis, "multi::release_with_one_key_lost");
    let x = fx.node("x").await;
    let y = fx.node("y").await;
    let (guard, taken) = abc_with_b_taken(&fx, &x, &y).await;
    let e = guard.release().await.expect_err("b was lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(e.message().contains("`b`"), "{e}");
    assert!(
        !e.message().contains("`a`") && !e.message().contains("`c`"),
        "only b was lost: {e}"
    );
    assert_free(&y, "a").await;
    assert_free(&y, "c").await;
    assert_held_by(&y, "b", "y").await;
    taken.release().await.expect("y's lock is intact");
}

/// Duplicates are ignored: `multi(a, a, b)` holds `a` and `b`, once each.
async fn duplicates_are_ignored(fx: Fx) {
    let herd = fx.node("dup").await;
    let other = fx.node("other").await;
    let guard = herd
        .multi(&["a", "a", "b", "a"], Duration::from_secs(5))
        .await
        .expect("multi");
    assert_eq!(guard.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(guard.fences().count(), 2);
    for key in ["a", "b"] {
        assert!(other.try_lock(key).await.expect("try").is_busy(), "{key}");
    }
    guard.release().await.expect("release");
    assert_free(&other, "a").await;
    assert_free(&other, "b").await;
    // The set is what counts: 64 distinct keys, one repeated, is within the limit.
    let mut keys: Vec<String> = (0..herdlock::limits::MAX_MULTI_KEYS)
        .map(|i| format!("k{i}"))
        .collect();
    keys.push("k0".to_owned());
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let all = acquired(herd.try_multi(&refs).await.expect("64 distinct keys"));
    assert_eq!(all.keys().count(), herdlock::limits::MAX_MULTI_KEYS);
    all.release().await.expect("release");
}

/// Empty and oversized key sets, bad keys, waits and TTLs are `InvalidInput`, and nothing
/// is left locked by a rejected request.
async fn bad_input_is_rejected(fx: Fx) {
    let herd = fx.node("bad").await;
    let too_many: Vec<String> = (0..=herdlock::limits::MAX_MULTI_KEYS)
        .map(|i| format!("k{i}"))
        .collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let long_key = "k".repeat(herdlock::limits::MAX_KEY_LEN + 1);
    let wait = Duration::from_secs(1);
    let cases = [
        herd.try_multi(&[]).await.map(|_| ()),
        herd.multi(&[], wait).await.map(|_| ()),
        herd.try_multi(&too_many).await.map(|_| ()),
        herd.multi(&too_many, wait).await.map(|_| ()),
        herd.try_multi(&["a", "", "b"]).await.map(|_| ()),
        herd.try_multi(&["a", "x{", "b"]).await.map(|_| ()),
        herd.try_multi(&["a", &long_key]).await.map(|_| ()),
        herd.multi(&["a", "{}", "b"], wait).await.map(|_| ()),
        herd.multi(&["a", "b"], Duration::ZERO).await.map(|_| ()),
        herd.multi(&["a", "b"], herdlock::limits::MAX_WAIT * 2)
            .await
            .map(|_| ()),
        herd.try_multi_with(&["a", "b"], &MultiOptions::new().ttl(Duration::ZERO))
            .await
            .map(|_| ()),
        herd.multi_with(
            &["a", "b"],
            wait,
            &MultiOptions::new().ttl(herdlock::limits::MAX_TTL * 2),
        )
        .await
        .map(|_| ()),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let e = case.expect_err("bad input accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "case {i}: {e}");
        assert!(!e.message().is_empty());
    }
    assert_free(&herd, "a").await;
    assert_free(&herd, "b").await;
    // A bad TTL on extend is rejected before anything is touched: the guard still holds.
    let guard = acquired(herd.try_multi(&["a", "b"]).await.expect("try_multi"));
    let e = guard.extend(Duration::ZERO).await.expect_err("zero ttl");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    guard.extend(LONG).await.expect("still held");
    guard.release().await.expect("release");
}

/// Blocking form: `multi(a, b)` waits while `b` is held (TTL 30 s), holds nothing while it
/// waits, and is woken by `b`'s release within 3 s.
async fn blocking_multi_is_woken_by_release(fx: Fx) {
    let holder = fx.node("holder").await;
    let waiter = fx.node("waiter").await;
    let bystander = fx.node("bystander").await;
    let guard = holder
        .try_lock_with("b", &long())
        .await
        .expect("try_lock")
        .acquired()
        .expect("free");
    let task = tokio::spawn(async move {
        let got = waiter
            .multi_with(&["a", "b"], Duration::from_secs(20), &long_multi())
            .await;
        (got, Instant::now())
    });
    fx.wait_subscribed(&["a", "b"]).await;
    assert!(!task.is_finished(), "the waiter must wait while b is held");
    // Waiting holds no subset: `a` is free for others meanwhile.
    assert_free(&bystander, "a").await;
    let released_at = Instant::now();
    guard.release().await.expect("release");
    let (got, acquired_at) = within(Duration::from_secs(10), "multi waiter", task)
        .await
        .expect("waiter task");
    let got = got.expect("the waiter got both keys");
    let delay = acquired_at.saturating_duration_since(released_at);
    assert!(
        delay < Duration::from_secs(3),
        "woken {delay:?} after the release"
    );
    assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_held_by(&bystander, "a", "waiter").await;
    assert_held_by(&bystander, "b", "waiter").await;
    got.release().await.expect("release");
}

/// Blocking form with nobody releasing: `Timeout` naming the held key (only it) and its
/// holder, after the
/// wait and not much later; nothing is left locked.
async fn blocking_multi_times_out_naming_held_key(fx: Fx) {
    let holder = fx.node("holder").await;
    let waiter = fx.node("waiter").await;
    let guard = holder
        .try_lock_with("held", &long())
        .await
        .expect("try_lock")
        .acquired()
        .expect("free");
    let started = Instant::now();
    let e = waiter
        .multi(&["free", "held"], Duration::from_millis(300))
        .await
        .expect_err("must time out");
    let took = started.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.message().contains("`held`"), "{e}");
    assert!(!e.message().contains("`free`"), "{e}");
    // The holder it waited for: owner label and fencing token.
    let named = format!("`held` held by `holder` (fence {}", guard.fence());
    assert!(e.message().contains(&named), "{e}");
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_free(&waiter, "free").await;
    guard.extend(LONG).await.expect("the holder is unaffected");
    guard.release().await.expect("release");
}

/// Per-key fencing tokens increase across acquisitions, also when a key is taken alone in
/// between, and agree with `lock_status`.
async fn fences_increase_per_key(fx: Fx) {
    let herd = fx.node("fenced").await;
    let mut last: Option<(u64, u64)> = None;
    for round in 0..20 {
        if round % 5 == 4 {
            // Bump only x's fence.
            herd.lock("x", Duration::from_secs(5))
                .await
                .expect("lock")
                .release()
                .await
                .expect("release");
        }
        let guard = herd
            .multi(&["x", "y"], Duration::from_secs(5))
            .await
            .expect("multi");
        let fx_ = guard.fence("x").expect("x").get();
        let fy = guard.fence("y").expect("y").get();
        assert_eq!(guard.fence("z"), None);
        let listed: Vec<(String, u64)> = guard
            .fences()
            .map(|(k, f)| (k.to_owned(), f.get()))
            .collect();
        assert_eq!(listed, [("x".to_owned(), fx_), ("y".to_owned(), fy)]);
        if let Some((lx, ly)) = last {
            assert!(fx_ > lx, "x: {fx_} after {lx}");
            assert!(fy > ly, "y: {fy} after {ly}");
        }
        let status_fence = |key: &'static str| {
            let herd = &herd;
            async move {
                let status = herd.lock_status(key).await.expect("status");
                status.last_fence.map(herdlock::FencingToken::get)
            }
        };
        assert_eq!(status_fence("x").await, Some(fx_));
        assert_eq!(status_fence("y").await, Some(fy));
        last = Some((fx_, fy));
        guard.release().await.expect("release");
    }
    assert!(last.is_some(), "ran");
}

/// Keys with one hash tag lock together; on Redis every lock key sits in that tag's slot.
async fn hash_tag_keys_lock_together(fx: Fx) {
    let a = fx.node("bank-a").await;
    let b = fx.node("bank-b").await;
    let guard = acquired(
        a.try_multi(&["acct:{bank}:1", "acct:{bank}:2"])
            .await
            .expect("try_multi"),
    );
    match b
        .try_multi(&["acct:{bank}:2", "acct:{bank}:3"])
        .await
        .expect("try_multi")
    {
        TryMulti::Busy(held) => {
            assert_eq!(held.len(), 1, "{held:?}");
            assert_eq!(held[0].key, "acct:{bank}:2");
            assert_eq!(held[0].holder.owner, "bank-a");
        }
        TryMulti::Acquired(g) => panic!("acquired {g:?} while acct 2 is held"),
    }
    if fx.kind == Kind::Redis {
        let pattern = format!("{}:*:lock", fx.prefix);
        let out = fx.server().cmd(&["KEYS", &pattern]);
        let mut locks: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        locks.sort_unstable();
        assert_eq!(locks.len(), 2, "{locks:?}");
        let slot = format!("{}:{{bank}}:", fx.prefix);
        for lock in &locks {
            assert!(lock.starts_with(&slot), "{lock} is not under {slot}");
        }
    }
    guard.release().await.expect("release");
    let next = acquired(
        b.try_multi(&["acct:{bank}:2", "acct:{bank}:3"])
            .await
            .expect("try_multi"),
    );
    next.release().await.expect("release");
    if fx.kind == Kind::Redis {
        // Released locks leave no keys behind.
        let leftover: Vec<String> = fx
            .server()
            .keys_under(&fx.prefix)
            .into_iter()
            .filter(|k| k.ends_with(":lock"))
            .collect();
        assert!(leftover.is_empty(), "{leftover:?}");
    }
}

/// `extend` moves every key's TTL: a 300 ms multi-lock extended to 30 s outlives its
/// first TTL, all keys still held by it.
async fn extend_keeps_every_key(fx: Fx) {
    let x = fx.node("x").await;
    let y = fx.node("y").await;
    let short = MultiOptions::new()
        .ttl(Duration::from_millis(300))
        .auto_extend(false);
    let guard = acquired(
        x.try_multi_with(&["a", "b", "c"], &short)
            .await
            .expect("try_multi"),
    );
    guard.extend(LONG).await.expect("extend");
    // Past the first TTL (a wait for time to pass, not for another task).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for key in ["a", "b", "c"] {
        assert_held_by(&y, key, "x").await;
        let remaining = y
            .lock_status(key)
            .await
            .expect("status")
            .holder
            .and_then(|h| h.remaining)
            .expect("a ttl");
        assert!(remaining > Duration::from_secs(20), "{key}: {remaining:?}");
    }
    assert!(matches!(
        y.try_multi(&["c"]).await.expect("try_multi"),
        TryMulti::Busy(_)
    ));
    guard.release().await.expect("release");
}

/// A dropped guard is released in the background: a waiter gets every key long before
/// the 30 s TTL.
async fn dropped_guard_is_released(fx: Fx) {
    let x = fx.node("x").await;
    let y = fx.node("y").await;
    let guard = acquired(
        x.try_multi_with(&["a", "b"], &long_multi())
            .await
            .expect("try_multi"),
    );
    drop(guard);
    let started = Instant::now();
    let again = within(
        Duration::from_secs(10),
        "re-acquire",
        y.multi(&["b", "a"], Duration::from_secs(20)),
    )
    .await
    .expect("re-acquired");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    again.release().await.expect("release");
}

/// The `Timeout` of a blocking multi-lock names the keys even when the wait ends before
/// the backend's first reply (a private Redis, paused, answers late): the caller must learn
/// which keys it was waiting for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_before_the_first_reply_still_names_the_keys_redis() {
    let server = crate::common::RedisServer::start();
    let prefix = crate::common::unique_prefix("multi::timeout_before_reply");
    let url = server.url();
    let connect = |owner: &'static str| {
        Herd::builder()
            .prefix(prefix.clone())
            .owner(owner)
            .connect(&url)
    };
    let holder = connect("holder").await.expect("connect");
    let waiter = connect("waiter").await.expect("connect");
    let guard = holder
        .try_lock_with("held", &long())
        .await
        .expect("try_lock")
        .acquired()
        .expect("free");
    // Load the multi-lock script, so the paused request is the acquisition itself.
    acquired(waiter.try_multi(&["warm"]).await.expect("try_multi"))
        .release()
        .await
        .expect("release");
    assert_eq!(server.cmd(&["CLIENT", "PAUSE", "500", "ALL"]), "OK");
    let e = waiter
        .multi(&["free", "held"], Duration::from_millis(100))
        .await
        .expect_err("must time out");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.message().contains("`held`"), "{e}");
    guard.release().await.expect("release");
}
