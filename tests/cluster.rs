//! Redis Cluster (issue 11, cluster tests 1-3): herdlock on a real 3-master + 3-replica
//! cluster. Behaviour tests share one cluster (`cluster::shared()`, a prefix each); the
//! slot migration and the `kill -9` of a master each start a private one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, Herd, JobError, SemaphoreOptions, TryLock, TryMulti, TryPermit};
use tokio::sync::oneshot;

use crate::common::cluster::{self, RedisCluster};
use crate::common::unique_prefix;
use crate::fixture::within;

async fn herd(cluster: &RedisCluster, prefix: &str, owner: &str) -> Herd {
    Herd::builder()
        .prefix(prefix)
        .owner(owner)
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(2))
        .connect_cluster(&cluster.urls())
        .await
        .expect("connect to the cluster")
}

/// The cluster URL form: `redis+cluster://host:port,host:port/`.
pub(crate) fn cluster_url(cluster: &RedisCluster) -> String {
    let hosts: Vec<String> = cluster
        .urls()
        .iter()
        .map(|u| {
            u.trim_start_matches("redis://")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    format!("redis+cluster://{}/", hosts.join(","))
}

/// A job that counts its runs and finishes when `go` fires (or at once without one).
fn gated_job(
    runs: &Arc<AtomicUsize>,
    go: Option<oneshot::Receiver<()>>,
    value: &str,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<String, JobError>> + Send + 'static
{
    let runs = Arc::clone(runs);
    let value = value.to_owned();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if let Some(go) = go {
                let _ = go.await;
            }
            Ok(value)
        })
    }
}

async fn wait_until_held(herd: &Herd, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while herd
        .lock_status(key)
        .await
        .expect("status")
        .holder
        .is_none()
    {
        assert!(Instant::now() < deadline, "{key} never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// herdlock's slot computation agrees with `CLUSTER KEYSLOT`, hash tags included.
#[test]
fn slots_agree_with_cluster_keyslot() {
    let cluster = cluster::shared();
    let keys = [
        "foo",
        "123456789",
        "herdlock:{order:7}:lock",
        "p:{a}:x:{b}",
        "{}{z}",
        "a{}b",
        "{{x}}",
        "x{y",
        "ü-ñ:{ü}",
        "p:{t}:a:{t}:b:lock",
    ];
    for key in keys {
        assert_eq!(herdlock::cluster_slot(key), cluster.keyslot(key), "{key}");
    }
    for i in 0..40 {
        let key = format!("k{i}:{{tag{}}}:rest", i * 7919);
        assert_eq!(herdlock::cluster_slot(&key), cluster.keyslot(&key), "{key}");
    }
}

/// Fan-out on a cluster: three herds (separate connections, like three processes), many
/// callers each, one run, every caller gets the result; the completion goes out by
/// `SPUBLISH` on the owning shard only, never by classic `PUBLISH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_runs_once_and_delivers_on_the_owning_shard() {
    let cluster = cluster::shared();
    let prefix = unique_prefix("cluster::fanout");
    let herds = [
        herd(cluster, &prefix, "a").await,
        herd(cluster, &prefix, "b").await,
        herd(cluster, &prefix, "c").await,
    ];
    let job = "report:42";
    let channel = format!("{prefix}:{{{job}}}");
    let owner = cluster.master_of_key(&channel);
    let classic_before: u64 = cluster
        .command_calls(&["publish"])
        .iter()
        .map(|c| c.1)
        .sum();
    let runs = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = oneshot::channel();
    let leader = tokio::spawn({
        let herd = herds[0].clone();
        let job_fn = gated_job(&runs, Some(go_rx), "done");
        async move { herd.fanout(job, Duration::from_secs(10), job_fn).await }
    });
    wait_until_held(&herds[0], job).await;
    let mut callers = Vec::new();
    for herd in &herds {
        for _ in 0..5 {
            let herd = herd.clone();
            let job_fn = gated_job(&runs, None, "rerun");
            callers.push(tokio::spawn(async move {
                herd.fanout(job, Duration::from_secs(10), job_fn).await
            }));
        }
    }
    // Followers in herds b and c subscribe on the shard that owns the job, nowhere else.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let subs = cluster.shard_subscribers(&channel);
        let on_owner = subs.iter().find(|(n, _)| *n == owner).map_or(0, |s| s.1);
        let elsewhere: u64 = subs.iter().filter(|(n, _)| *n != owner).map(|s| s.1).sum();
        assert_eq!(elsewhere, 0, "subscribed off the owning shard: {subs:?}");
        if on_owner >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "followers never subscribed: {subs:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let released = Instant::now();
    go_tx.send(()).expect("leader waits");
    let led = within(Duration::from_secs(5), "leader", leader)
        .await
        .expect("task");
    assert_eq!(led.expect("leader"), "done");
    for caller in callers {
        let got = within(Duration::from_secs(5), "caller", caller)
            .await
            .expect("task");
        assert_eq!(got.expect("caller"), "done");
    }
    // Woken by the notice, not by a TTL re-check (the lock TTL is 10 s).
    assert!(
        released.elapsed() < Duration::from_secs(3),
        "{:?}",
        released.elapsed()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for 16 callers");
    let classic_after: u64 = cluster
        .command_calls(&["publish"])
        .iter()
        .map(|c| c.1)
        .sum();
    assert_eq!(
        classic_after, classic_before,
        "no classic PUBLISH on a cluster"
    );
}

/// Locks, `try_lock`, `once` and lazy connect by the cluster URL: a waiter is woken by the
/// release's sharded notice, long before the holder's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_once_behave_as_on_one_node() {
    let cluster = cluster::shared();
    let prefix = unique_prefix("cluster::locks");
    let a = herd(cluster, &prefix, "a").await;
    let b = Herd::builder()
        .prefix(&prefix)
        .owner("b")
        .connect_lazy(&cluster_url(cluster))
        .expect("lazy cluster herd");
    for key in ["plain", "tagged:{t1}:x", "other"] {
        let guard = match a.try_lock(key).await.expect("try_lock") {
            TryLock::Acquired(g) => g,
            TryLock::Busy(h) => panic!("{key} busy: {h:?}"),
        };
        let busy = b.try_lock(key).await.expect("try_lock b");
        assert!(busy.is_busy(), "{key}");
        let status = b.lock_status(key).await.expect("status");
        assert_eq!(status.holder.expect("holder").owner, "a");
        let waiter = tokio::spawn({
            let b = b.clone();
            let key = key.to_owned();
            async move {
                let started = Instant::now();
                let g = b.lock(&key, Duration::from_secs(8)).await;
                (g, started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        guard.release().await.expect("release");
        let (got, took) = within(Duration::from_secs(8), "waiter", waiter)
            .await
            .expect("task");
        let g = got.expect("waiter gets the lock");
        assert!(took < Duration::from_secs(3), "woken late: {took:?}");
        g.release().await.expect("release b");
    }
    let ran = a.once("once-key", || async { Ok(7) }).await.expect("once");
    assert!(ran.ran(), "once ran");
}

/// `list_held` on a cluster scans every master: locks whose slots are spread over the three
/// masters are all listed, and `force_release` breaks one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_held_scans_every_master() {
    let cluster = cluster::shared();
    let prefix = unique_prefix("cluster::list");
    let a = herd(cluster, &prefix, "a").await;
    let keys: Vec<String> = (0..24).map(|i| format!("k{i}")).collect();
    let masters: std::collections::BTreeSet<usize> = keys
        .iter()
        .map(|k| cluster.master_of_key(&format!("{prefix}:{{{k}}}:lock")))
        .collect();
    assert_eq!(masters.len(), 3, "the keys span every master");
    let mut guards = Vec::new();
    for key in &keys {
        let guard = match a.try_lock(key).await.expect("try_lock") {
            TryLock::Acquired(g) => g,
            TryLock::Busy(h) => panic!("{key} busy: {h:?}"),
        };
        guards.push(guard);
    }
    let mut listed: Vec<String> = a
        .list_held()
        .await
        .expect("list")
        .into_iter()
        .map(|h| h.key)
        .collect();
    let mut expected = keys.clone();
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected);
    let holder = a.force_release("k0").await.expect("force").expect("held");
    assert_eq!(holder.owner, "a");
    assert_eq!(a.list_held().await.expect("list").len(), keys.len() - 1);
    for (i, guard) in guards.into_iter().enumerate() {
        let released = guard.release().await;
        assert_eq!(released.is_ok(), i != 0, "{i}: {released:?}");
    }
}

/// Multi-locks on a cluster: keys sharing a hash tag (or merely a slot) work and wake their
/// waiters; keys in different slots are refused up front with a clear `InvalidInput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_needs_one_slot_and_says_so() {
    let cluster = cluster::shared();
    let prefix = unique_prefix("cluster::multi");
    let a = herd(cluster, &prefix, "a").await;
    let b = herd(cluster, &prefix, "b").await;
    let keys = ["{order-7}:a", "{order-7}:b", "{order-7}:c"];
    let guard = match a.try_multi(&keys).await.expect("multi") {
        TryMulti::Acquired(g) => g,
        TryMulti::Busy(held) => panic!("busy: {held:?}"),
    };
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            let started = Instant::now();
            let g = b.multi(&keys, Duration::from_secs(8)).await;
            (g, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    guard.release().await.expect("release");
    let (got, took) = within(Duration::from_secs(8), "multi waiter", waiter)
        .await
        .expect("task");
    got.expect("waiter").release().await.expect("release b");
    assert!(took < Duration::from_secs(3), "woken late: {took:?}");

    // Different slots: refused before anything reaches Redis, naming the keys and the fix.
    let err = a
        .try_multi(&["alpha", "beta"])
        .await
        .map(|_| ())
        .expect_err("cross-slot multi");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let text = err.to_string();
    for needle in ["`alpha`", "`beta`", "hash tag", "{"] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    assert!(!text.contains("CROSSSLOT"), "{text}");
    // Two different tags that hash to one slot are fine: the check is by slot.
    let first = "{t0}:x".to_owned();
    let slot = herdlock::cluster_slot(&format!("{prefix}:{{t0}}:x"));
    let second = (1..200_000)
        .map(|i| format!("{{t{i}}}:y"))
        .find(|k| herdlock::cluster_slot(&format!("{prefix}:{k}")) == slot)
        .expect("a colliding tag");
    let pair = [first.as_str(), second.as_str()];
    match a.try_multi(&pair).await.expect("same slot, two tags") {
        TryMulti::Acquired(g) => {
            g.release().await.expect("release");
        }
        TryMulti::Busy(held) => panic!("busy: {held:?}"),
    }
}

/// Semaphores, unfair and fair: N holders, a waiter woken by the sharded release notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphores_behave_as_on_one_node() {
    let cluster = cluster::shared();
    let prefix = unique_prefix("cluster::sem");
    let a = herd(cluster, &prefix, "a").await;
    let b = herd(cluster, &prefix, "b").await;
    for fair in [false, true] {
        let key = if fair { "fair-pool" } else { "pool" };
        let options = SemaphoreOptions::new().fair(fair);
        let sa = a.semaphore_with(key, 2, &options).expect("sem a");
        let sb = b.semaphore_with(key, 2, &options).expect("sem b");
        let p1 = sa.acquire(Duration::from_secs(2)).await.expect("p1");
        let p2 = sa.acquire(Duration::from_secs(2)).await.expect("p2");
        assert!(matches!(
            sb.try_acquire().await.expect("try"),
            TryPermit::Busy { .. }
        ));
        let waiter = tokio::spawn(async move {
            let started = Instant::now();
            let p = sb.acquire(Duration::from_secs(8)).await;
            (p, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        p1.release().await.expect("release p1");
        let (got, took) = within(Duration::from_secs(8), "sem waiter", waiter)
            .await
            .expect("task");
        got.expect("permit").release().await.expect("release");
        assert!(
            took < Duration::from_secs(3),
            "fair={fair}: woken late: {took:?}"
        );
        p2.release().await.expect("release p2");
    }
}

/// Followers of a busy job on one herd, plus a leader on another: the shared setup of the
/// two fault tests. Returns the leader task, its gate, the followers and the run counter.
struct Busy {
    leader: tokio::task::JoinHandle<herdlock::Result<String>>,
    go: oneshot::Sender<()>,
    followers: Vec<tokio::task::JoinHandle<herdlock::Result<String>>>,
    runs: Arc<AtomicUsize>,
    deadline: Instant,
}

const FOLLOW_TIMEOUT: Duration = Duration::from_secs(20);

impl Busy {
    /// Lets the leader finish and checks that every follower got its result, before its
    /// deadline and by notice (well within 3 s, not at a TTL re-check). Returns how long
    /// the delivery took after the release, and how many runs there were.
    async fn finish(self, leader_completes: &str) -> (Duration, usize) {
        let completed = Instant::now();
        self.go.send(()).expect("leader waits");
        let led = within(Duration::from_secs(10), "leader", self.leader)
            .await
            .expect("task");
        assert_eq!(led.expect(leader_completes), "leader");
        for follower in self.followers {
            let got = within(Duration::from_secs(10), "follower", follower)
                .await
                .expect("task");
            assert_eq!(got.expect("follower"), "leader");
            assert!(Instant::now() < self.deadline);
        }
        let delivered_in = completed.elapsed();
        assert!(
            delivered_in < Duration::from_secs(3),
            "followers waited for a TTL re-check: {delivered_in:?}"
        );
        (delivered_in, self.runs.load(Ordering::SeqCst))
    }
}

async fn busy_job(leader: &Herd, followers: &[Herd], job: &'static str) -> Busy {
    let runs = Arc::new(AtomicUsize::new(0));
    let (go, go_rx) = oneshot::channel();
    let lead = tokio::spawn({
        let herd = leader.clone();
        let job_fn = gated_job(&runs, Some(go_rx), "leader");
        async move { herd.fanout(job, FOLLOW_TIMEOUT, job_fn).await }
    });
    wait_until_held(leader, job).await;
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let mut tasks = Vec::new();
    for herd in followers {
        for _ in 0..3 {
            let herd = herd.clone();
            let job_fn = gated_job(&runs, None, "rerun");
            tasks.push(tokio::spawn(async move {
                herd.fanout(job, FOLLOW_TIMEOUT, job_fn).await
            }));
        }
    }
    Busy {
        leader: lead,
        go,
        followers: tasks,
        runs,
        deadline,
    }
}

/// Waits until every follower herd's subscription is in place on `node`.
async fn wait_subscribed(cluster: &RedisCluster, node: usize, channel: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.shard_numsub(node, channel) < n {
        assert!(
            Instant::now() < deadline,
            "not subscribed on node {node}: {:?}",
            cluster.shard_subscribers(channel)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Slot migration of a busy job's slot while followers wait (issue 11, cluster test 2):
/// the server drops the sharded subscriptions with the slot, herdlock re-subscribes on the
/// new owner, and every follower gets the leader's result by notice, before its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_while_followers_wait() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("start cluster");
    let prefix = unique_prefix("cluster::migration");
    let leader = herd(&cluster, &prefix, "leader").await;
    let followers = [
        herd(&cluster, &prefix, "f1").await,
        herd(&cluster, &prefix, "f2").await,
    ];
    let job = "migrating-job";
    let channel = format!("{prefix}:{{{job}}}");
    let slot = cluster.keyslot(&channel);
    let from = cluster.master_of_key(&channel);
    let busy = busy_job(&leader, &followers, job).await;
    wait_subscribed(&cluster, from, &channel, 2).await;
    let to = cluster
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("another master");
    let cluster = Arc::new(cluster);
    let moved = Instant::now();
    tokio::task::spawn_blocking({
        let cluster = Arc::clone(&cluster);
        move || cluster.migrate_slot(slot, to)
    })
    .await
    .expect("migrate");
    let migrated_in = moved.elapsed();
    // The followers' notifiers re-subscribe on the new owner by themselves.
    wait_subscribed(&cluster, to, &channel, 2).await;
    let healed_in = moved.elapsed();
    let (delivered_in, runs) = busy.finish("leader completes on the new owner").await;
    assert_eq!(runs, 1);
    eprintln!(
        "cluster timing: slot {slot} migrated in {migrated_in:?}, re-subscribed on the new owner after {healed_in:?}, result delivered {delivered_in:?} after completion"
    );
    // Later calls succeed on the new owner.
    let runs = Arc::new(AtomicUsize::new(0));
    let again = leader
        .fanout(
            "migrating-job",
            Duration::from_secs(5),
            gated_job(&runs, None, "again"),
        )
        .await
        .expect("later fanout");
    assert!(again == "again" || again == "leader", "{again}");
    let cluster = Arc::try_unwrap(cluster).expect("one owner");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stop cluster");
}

/// `kill -9` of the master that owns a busy job's slot (issue 11, cluster test 3): its
/// replica takes over (without the scripts: `NOSCRIPT` is answered by `EVAL`), every
/// waiter resolves before its deadline, and later calls succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_while_followers_wait() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("start cluster");
    let prefix = unique_prefix("cluster::failover");
    let leader = herd(&cluster, &prefix, "leader").await;
    let followers = [
        herd(&cluster, &prefix, "f1").await,
        herd(&cluster, &prefix, "f2").await,
    ];
    let job = "failover-job";
    let channel = format!("{prefix}:{{{job}}}");
    let owner = cluster.master_of_key(&channel);
    let busy = busy_job(&leader, &followers, job).await;
    wait_subscribed(&cluster, owner, &channel, 2).await;
    // Let the lock reach the replica before the kill (replication is asynchronous).
    let replica = cluster.replicas_of(owner)[0];
    // (A private cluster: the lock is the only key of that shard.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.node(replica).cmd(&["DBSIZE"]).trim() == "0" {
        assert!(Instant::now() < deadline, "lock never replicated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (cluster, failover) = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        let failover = cluster.kill_master_and_wait_failover(owner);
        (cluster, failover)
    })
    .await
    .expect("failover");
    wait_subscribed(&cluster, failover.promoted, &channel, 2).await;
    let (delivered_in, _) = busy
        .finish("the leader completes on the promoted replica")
        .await;
    eprintln!(
        "cluster timing: replica promoted {:?} after kill -9, cluster stable after {:?}, result delivered {delivered_in:?} after completion",
        failover.promoted_after, failover.stable_after
    );
    // Later calls succeed: a lock and a fresh fan-out on the promoted master.
    let guard = match followers[0].try_lock("after-failover:{failover-job}").await {
        Ok(TryLock::Acquired(g)) => g,
        other => panic!("lock after failover: {other:?}"),
    };
    guard.release().await.expect("release");
    let runs = Arc::new(AtomicUsize::new(0));
    let again = followers[1]
        .fanout(
            "failover-job:2",
            Duration::from_secs(5),
            gated_job(&runs, None, "v"),
        )
        .await
        .expect("later fanout");
    assert_eq!(again, "v");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stop cluster");
}
