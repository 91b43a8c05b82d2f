//! Sentinel: herds connect by master name and follow a failover (`kill -9` of the master,
//! the replica promoted) without restarting: a fan-out herd in flight and held locks
//! recover, waiters resolve before their deadlines, and a lock lost in the failover (its
//! write never reached the replica) is reported lost to its holder while a replicated one is
//! kept.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd, LockOptions, TryLock};

use crate::common::sentinel::SentinelGroup;
use crate::common::server::unique_prefix;
use crate::fixture::within;

async fn node(group: &SentinelGroup, prefix: &str, owner: &str) -> Herd {
    Herd::builder()
        .prefix(prefix)
        .owner(owner)
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_secs(1))
        .connect_sentinel(group.master_name(), &group.sentinel_urls())
        .await
        .expect("connect through the sentinels")
}

/// Polls (bounded) until the replica has `key`: the write replicated.
async fn wait_replicated(group: &SentinelGroup, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while group.replica().cmd(&["EXISTS", key]).trim() != "1" {
        assert!(Instant::now() < deadline, "{key} never reached the replica");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn kill_master(group: &mut SentinelGroup) -> Duration {
    let failover = tokio::task::block_in_place(|| group.kill_master_and_wait_failover());
    eprintln!(
        "sentinel timing: promoted after {:?}",
        failover.promoted_after
    );
    failover.promoted_after
}

/// The master dies while a fan-out herd waits on a running job (its lock replicated): after
/// the promotion the leader completes on the new master, and every caller of both nodes
/// gets the one run's result before its deadline; later calls work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_herd_survives_failover() {
    let mut group = SentinelGroup::start();
    let prefix = unique_prefix("sentinel::fanout");
    let a = node(&group, &prefix, "a").await;
    let b = node(&group, &prefix, "b").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let options = FanoutOptions::new().ttl(Duration::from_secs(5));
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let node = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (runs, options, mut go) = (Arc::clone(&runs), options.clone(), go_rx.clone());
            tokio::spawn(async move {
                node.fanout_with(
                    "job",
                    Duration::from_secs(20),
                    &options,
                    move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = go.wait_for(|go| *go).await;
                        Ok("done".to_owned())
                    },
                )
                .await
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_replicated(&group, &format!("{prefix}:{{job}}:lock")).await;
    let started = Instant::now();
    kill_master(&mut group);
    go_tx.send(true).expect("job waits");
    for call in calls {
        let fanned = within(Duration::from_secs(25), "a fan-out caller", call)
            .await
            .expect("task")
            .expect("every caller gets the result after the failover");
        assert_eq!(fanned.value, "done");
    }
    eprintln!(
        "sentinel timing: fan-out herd resolved {:?} after the kill",
        started.elapsed()
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the replicated run was kept"
    );
    // Later calls work on the new master, from both nodes.
    for n in [&a, &b] {
        let g = n.try_lock("after").await.expect("try_lock").acquired();
        g.expect("free").release().await.expect("release");
    }
}

/// Held locks through a failover: one taken with `replicas(1)` is kept (its holder renews it
/// on the new master, a contender finds it busy, and a waiter gets it on release), one
/// whose write never reached the replica (deleted there before the kill) is reported lost
/// to its holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_locks_through_failover() {
    let mut group = SentinelGroup::start();
    let prefix = unique_prefix("sentinel::locks");
    let holder = node(&group, &prefix, "holder").await;
    let other = node(&group, &prefix, "other").await;
    let ttl = Duration::from_secs(4);
    let kept = match holder
        .try_lock_with(
            "kept",
            &LockOptions::new()
                .ttl(ttl)
                .replicas(1, Duration::from_secs(2)),
        )
        .await
        .expect("try_lock kept")
    {
        TryLock::Acquired(g) => g,
        TryLock::Busy(h) => panic!("busy: {h:?}"),
    };
    let lost = holder
        .try_lock_with("lost", &LockOptions::new().ttl(ttl))
        .await
        .expect("try_lock lost")
        .acquired()
        .expect("free");
    // The write of `lost` never reached the replica: make it so on the replica itself.
    let lost_key = format!("{prefix}:{{lost}}:lock");
    wait_replicated(&group, &lost_key).await;
    group
        .replica()
        .cmd(&["CONFIG", "SET", "replica-read-only", "no"]);
    assert_eq!(group.replica().cmd(&["DEL", &lost_key]).trim(), "1");
    // A waiter for `kept` across the failover.
    let waiter = tokio::spawn({
        let other = other.clone();
        async move { other.lock("kept", Duration::from_secs(30)).await }
    });
    // The waiter is waiting once it marked the holder value as waited for
    // (`fence:nonce:ttl:1:owner`).
    let kept_key = format!("{prefix}:{{kept}}:lock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while group.master().cmd(&["GET", &kept_key]).split(':').nth(3) != Some("1") {
        assert!(Instant::now() < deadline, "the waiter never waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_replicated(&group, &kept_key).await;
    let killed = Instant::now();
    kill_master(&mut group);

    within(Duration::from_secs(15), "the lost lock's loss", lost.lost()).await;
    eprintln!(
        "sentinel timing: loss of the unreplicated lock reported {:?} after the kill",
        killed.elapsed()
    );
    assert!(lost.is_lost());
    let err = lost.release().await.expect_err("a lost lock's release");
    assert_eq!(err.kind(), ErrorKind::LockLost, "{err:?}");
    // The replicated lock: still ours on the new master.
    let extended = within(Duration::from_secs(10), "extend on the new master", async {
        loop {
            match kept.extend(ttl).await {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::Connection => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("extend after the failover: {e:?}"),
            }
        }
    });
    extended.await;
    assert!(!kept.is_lost());
    assert!(
        other.try_lock("kept").await.expect("try_lock").is_busy(),
        "the replicated lock is still held"
    );
    if waiter.is_finished() {
        let r = waiter.await.expect("task");
        panic!("the waiter resolved while the lock is held: {r:?}");
    }
    let fence = kept.fence();
    kept.release().await.expect("release on the new master");
    let got = within(Duration::from_secs(10), "the waiter", waiter)
        .await
        .expect("task")
        .expect("the waiter acquires after the release");
    assert!(got.fence() > fence);
    eprintln!(
        "sentinel timing: waiter resolved {:?} after the kill",
        killed.elapsed()
    );
    got.release().await.expect("release");
}

/// No Sentinel knows the master name: a clear `Connection` error; a bad name is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_master_is_a_connection_error() {
    let group = SentinelGroup::start();
    let err = Herd::builder()
        .connect_timeout(Duration::from_millis(500))
        .connect_sentinel("nobody", &group.sentinel_urls())
        .await
        .expect_err("unknown master");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err:?}");
    let err = Herd::builder()
        .connect_sentinel("two words", &group.sentinel_urls())
        .await
        .expect_err("bad name");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err:?}");
    let none: [&str; 0] = [];
    let err = Herd::builder()
        .connect_sentinel("herdlock", &none)
        .await
        .expect_err("no sentinels");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err:?}");
}
