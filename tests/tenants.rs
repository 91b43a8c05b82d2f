//! Tenants: two herds with different prefixes on one Redis, one prefix a prefix of the other
//! (`P` and `P:x`), never see each other's locks, results, semaphores or notices, whatever
//! their keys contain (`{`, `}`, `:`, the other prefix, the other's suffix).
//!
//! Why it holds (keys.rs): every name is `prefix:{…`, and a prefix has no brace, so the
//! first `{` of a name ends its prefix. The tests check it on a real server.

use std::collections::BTreeSet;
use std::time::Duration;

use herdlock::{FanoutOptions, Herd, Role, TryLock, TryPermit};

use crate::common::server::{shared, unique_prefix};
use crate::fixture::within;

/// Keys that could confuse a layout: the other prefix's tail, the other prefix itself,
/// colons, hash tags, the suffixes herdlock appends.
fn keys(a: &str, b: &str) -> Vec<String> {
    [
        "job",
        "x",
        "x:job",
        ":",
        "a:b:",
        "{x}",
        "{x}:job",
        "x:{job}",
        "{job}",
        "lock",
        "result",
        "x:{x}:lock",
        "{x}:lock",
        "sem",
        ":{x}",
    ]
    .iter()
    .map(|k| (*k).to_owned())
    .chain([a.to_owned(), b.to_owned(), format!("{b}:job")])
    .collect()
}

async fn tenants(test: &str) -> (String, String, Herd, Herd, Herd, Herd) {
    let a = unique_prefix(test);
    let b = format!("{a}:x");
    let url = shared().url();
    let node = |prefix: &str, owner: &str| {
        let (prefix, owner, url) = (prefix.to_owned(), owner.to_owned(), url.clone());
        async move {
            Herd::builder()
                .prefix(prefix)
                .owner(owner)
                .connect(&url)
                .await
                .expect("connect")
        }
    };
    let a1 = node(&a, "a1").await;
    let a2 = node(&a, "a2").await;
    let b1 = node(&b, "b1").await;
    let b2 = node(&b, "b2").await;
    (a, b, a1, a2, b1, b2)
}

/// Locks of one tenant are invisible to the other, key for key; every Redis key one tenant
/// makes starts with `its prefix:{`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_semaphores_are_separate() {
    let (pa, pb, a1, _a2, b1, _b2) = tenants("tenants::locks").await;
    let mut held = Vec::new();
    let mut guards = Vec::new();
    for key in keys(&pa, &pb) {
        let ga = a1
            .try_lock(&key)
            .await
            .expect("a try_lock")
            .acquired()
            .unwrap_or_else(|| panic!("{key}: a finds it busy"));
        let gb = match b1.try_lock(&key).await.expect("b try_lock") {
            TryLock::Acquired(g) => g,
            TryLock::Busy(h) => panic!("{key}: b sees a's lock: {h:?}"),
        };
        let status = b1.lock_status(&key).await.expect("status");
        assert_eq!(
            status.holder.map(|h| h.owner).as_deref(),
            Some("b1"),
            "{key}"
        );
        let status = a1.lock_status(&key).await.expect("status");
        assert_eq!(
            status.holder.map(|h| h.owner).as_deref(),
            Some("a1"),
            "{key}"
        );

        let sa = a1.semaphore(&key, 1).expect("semaphore");
        let sb = b1.semaphore(&key, 1).expect("semaphore");
        let pa1 = sa.try_acquire().await.expect("a permit").acquired();
        assert!(pa1.is_some(), "{key}: a's semaphore");
        match sb.try_acquire().await.expect("b permit") {
            TryPermit::Acquired(p) => held.push(p),
            TryPermit::Busy { in_use } => panic!("{key}: b sees a's permit ({in_use} in use)"),
        }
        held.extend(pa1);
        guards.push(ga);
        guards.push(gb);
    }
    let server = shared();
    let a_keys: Vec<String> = server
        .keys_under(&pa)
        .into_iter()
        .filter(|k| !k.starts_with(&format!("{pb}:")))
        .collect();
    let b_keys = server.keys_under(&pb);
    assert!(!a_keys.is_empty() && !b_keys.is_empty());
    for k in &a_keys {
        assert!(k.starts_with(&format!("{pa}:{{")), "a made {k}");
    }
    for k in &b_keys {
        assert!(k.starts_with(&format!("{pb}:{{")), "b made {k}");
    }
    drop(held);
    for g in guards {
        g.release().await.expect("release");
    }
}

/// A result one tenant stored (lingering, cacheable) is never served to the other: each runs
/// its own job and gets its own value; each tenant's cache serves only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_separate() {
    let (pa, pb, a1, a2, b1, b2) = tenants("tenants::results").await;
    let options = FanoutOptions::new()
        .linger(Duration::from_secs(30))
        .cache_age(Duration::from_secs(30));
    for key in keys(&pa, &pb) {
        let ra = a1
            .fanout_with(&key, Duration::from_secs(10), &options, {
                let v = format!("a:{key}");
                move || async move { Ok(v) }
            })
            .await
            .expect("a fanout");
        assert_eq!(ra.value, format!("a:{key}"));
        let rb = b1
            .fanout_with(&key, Duration::from_secs(10), &options, {
                let v = format!("b:{key}");
                move || async move { Ok(v) }
            })
            .await
            .expect("b fanout");
        assert_eq!(rb.value, format!("b:{key}"), "{key}: b got a's result");
        assert_eq!(rb.role, Role::Leader, "{key}");
        // Each tenant's other node is served its own tenant's cached result.
        for (node, want) in [(&a2, format!("a:{key}")), (&b2, format!("b:{key}"))] {
            let got = node
                .fanout_with(&key, Duration::from_secs(10), &options, || async {
                    Ok("ran again".to_owned())
                })
                .await
                .expect("cached fanout");
            assert_eq!(got.value, want, "{key}");
            assert_eq!(got.role, Role::Cached, "{key}");
        }
    }
}

/// Notices: with a waiter of each tenant on every key (each behind a holder of its own
/// tenant), the two tenants' channels are disjoint; releasing one tenant's locks wakes
/// only that tenant's waiters, and the other's keep waiting until their own release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_are_separate() {
    let (pa, pb, a1, a2, b1, b2) = tenants("tenants::notices").await;
    let keys = keys(&pa, &pb);
    let mut holders_a = Vec::new();
    let mut holders_b = Vec::new();
    for key in &keys {
        holders_a.push(a1.try_lock(key).await.expect("a").acquired().expect("free"));
        holders_b.push(b1.try_lock(key).await.expect("b").acquired().expect("free"));
    }
    let wait = Duration::from_secs(20);
    let spawn_waiters = |node: &Herd| {
        keys.iter()
            .map(|key| {
                let (node, key) = (node.clone(), key.clone());
                tokio::spawn(async move { node.lock(&key, wait).await })
            })
            .collect::<Vec<_>>()
    };
    let waiters_a = spawn_waiters(&a2);
    let waiters_b = spawn_waiters(&b2);
    let server = shared();
    let channels = |pattern: &str| -> BTreeSet<String> {
        server
            .cmd(&["PUBSUB", "CHANNELS", pattern])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    // Every waiter subscribed (bounded poll): one channel per key and tenant.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (ca, cb) = loop {
        let ca: BTreeSet<String> = channels(&format!("{pa}:{{*"));
        let cb: BTreeSet<String> = channels(&format!("{pb}:{{*"));
        if ca.len() == keys.len() && cb.len() == keys.len() {
            break (ca, cb);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waiters did not subscribe: {ca:?} {cb:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        ca.is_disjoint(&cb),
        "shared channels: {:?}",
        ca.intersection(&cb)
    );

    for g in holders_a {
        g.release().await.expect("release a");
    }
    for w in waiters_a {
        let guard = within(Duration::from_secs(10), "a waiter", w)
            .await
            .expect("task")
            .expect("a waiter acquires after a's release");
        assert_eq!(guard.owner(), "a2");
        guard.release().await.expect("release");
    }
    for w in &waiters_b {
        assert!(!w.is_finished(), "a b waiter resolved on a's release");
    }
    for key in &keys {
        let status = b2.lock_status(key).await.expect("status");
        assert_eq!(
            status.holder.map(|h| h.owner).as_deref(),
            Some("b1"),
            "{key}"
        );
    }
    for g in holders_b {
        g.release().await.expect("release b");
    }
    for w in waiters_b {
        let guard = within(Duration::from_secs(10), "b waiter", w)
            .await
            .expect("task")
            .expect("b waiter acquires after b's release");
        assert_eq!(guard.owner(), "b2");
        guard.release().await.expect("release");
    }
}
