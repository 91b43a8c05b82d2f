//! Partitions and stalls (issue 9, tests 1 and 2): a holder whose path to Redis is frozen
//! (a TCP proxy, Redis up for everyone else) or whose Redis sleeps is told it lost its lock
//! no later than the instant another contender acquires it, on its own clock.
//!
//! Every instant is an [`Instant`] taken in this process, so the orderings asserted here
//! are exact; each test prints its figures (`cargo test -- --nocapture partitions`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd, JobError, LockOptions, Role, TryLock};
use redis::aio::MultiplexedConnection;

use crate::common::proxy::Proxy;
use crate::common::server::{self, RedisServer};
use crate::common::STEP_TIMEOUT;
use crate::fixture::within;

const SHORT: Duration = Duration::from_secs(2);
const DEFAULT: Duration = Duration::from_secs(10);

async fn herd(prefix: &str, owner: &str, url: &str, ttl: Duration) -> Herd {
    Herd::builder()
        .prefix(prefix)
        .owner(owner)
        .lock_ttl(ttl)
        .connect(url)
        .await
        .expect("connect")
}

/// A direct connection to `server` without a response timeout (a test step may wait out a
/// stalled server on purpose).
async fn raw(server: &RedisServer) -> MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("raw connection")
}

fn lock_key(prefix: &str, key: &str) -> String {
    format!("{prefix}:{{{key}}}:lock")
}

/// Waits until the holder's watchdog has renewed `key` once (its PTTL went back up), so a
/// freeze after this catches a lease with a renewal history, as in production.
async fn wait_renewed(conn: &mut MultiplexedConnection, key: &str, ttl: Duration) {
    let deadline = Instant::now() + ttl * 2 + STEP_TIMEOUT;
    let mut lowest = i64::MAX;
    let rise = i64::try_from(ttl.as_millis() / 6).expect("small ttl");
    loop {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(conn)
            .await
            .expect("PTTL");
        assert!(pttl > 0, "{key} is not held (PTTL {pttl})");
        if pttl > lowest.saturating_add(rise) {
            return;
        }
        lowest = lowest.min(pttl);
        assert!(Instant::now() < deadline, "{key} was never renewed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An instant recorded by one task and read by another.
type Stamped = Arc<Mutex<Option<Instant>>>;

/// Records the instant it is dropped, unless disarmed: put one in a job or closure to learn
/// when it was cancelled.
struct Stamp {
    at: Stamped,
    armed: bool,
}

impl Stamp {
    fn new(at: &Stamped) -> Stamp {
        Stamp {
            at: Arc::clone(at),
            armed: true,
        }
    }
}

impl Drop for Stamp {
    fn drop(&mut self) {
        if self.armed {
            *self.at.lock().expect("stamp") = Some(Instant::now());
        }
    }
}

fn read(at: &Stamped) -> Option<Instant> {
    *at.lock().expect("stamp")
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// The figures of one partition run, printed for the README.
fn report(what: &str, ttl: Duration, frozen_at: Instant, lost_at: Instant, acquired_at: Instant) {
    let margin = if lost_at <= acquired_at {
        format!("told {:.1} ms before", millis(acquired_at - lost_at))
    } else {
        format!("told {:.1} ms AFTER", millis(lost_at - acquired_at))
    };
    println!(
        "partition [{what}, ttl {ttl:?}]: holder told it lost the lock {:.1} ms after the freeze, \
         the other contender acquired {:.1} ms after the freeze: {margin}",
        millis(lost_at - frozen_at),
        millis(acquired_at - frozen_at),
    );
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Test 1, `try_lock` guard: the frozen holder's `lost()` resolves (and `is_lost()` says so)
/// no later than the instant the contender's `lock` returns with the lock.
async fn frozen_guard(ttl: Duration) {
    let server = server::shared();
    let prefix = server::unique_prefix(&format!("partition_guard_{}", ttl.as_secs()));
    let proxy = Proxy::start(server);
    let holder = herd(&prefix, "frozen", &proxy.url(), ttl).await;
    let other = herd(&prefix, "other", &server.url(), ttl).await;
    let mut conn = raw(server).await;
    let options = LockOptions::new().ttl(ttl);
    let TryLock::Acquired(guard) = holder.try_lock_with("k", &options).await.expect("try") else {
        panic!("the lock is free");
    };
    let guard = Arc::new(guard);
    wait_renewed(&mut conn, &lock_key(&prefix, "k"), ttl).await;

    proxy.freeze();
    let frozen_at = Instant::now();
    let lost = tokio::spawn({
        let guard = Arc::clone(&guard);
        async move {
            guard.lost().await;
            Instant::now()
        }
    });
    let contender = tokio::spawn({
        let guard = Arc::clone(&guard);
        let options = options.clone();
        async move {
            let taken = other.lock_with("k", ttl * 2 + STEP_TIMEOUT, &options).await;
            let acquired_at = Instant::now();
            // Read at once: the holder must already know.
            (taken, acquired_at, guard.is_lost())
        }
    });
    let (taken, acquired_at, lost_when_acquired) =
        within(ttl * 3 + STEP_TIMEOUT, "the contender", contender)
            .await
            .expect("task");
    let taken = taken.expect("the contender acquires once the lease ran out");
    let lost_at = within(STEP_TIMEOUT, "lost()", lost).await.expect("task");
    report("try_lock guard", ttl, frozen_at, lost_at, acquired_at);
    assert!(
        lost_when_acquired,
        "the contender acquired while the frozen holder's is_lost() was still false"
    );
    assert!(
        lost_at <= acquired_at,
        "lost() resolved {} ms after the contender acquired",
        ms(lost_at - acquired_at)
    );
    assert!(taken.fence() > guard.fence());

    // Thawed, the old holder's release cannot touch the new holder's lock.
    proxy.thaw();
    let guard = Arc::into_inner(guard).expect("the tasks are done");
    let e = guard.release().await.expect_err("lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e:?}");
    taken
        .release()
        .await
        .expect("the new holder still holds it");
}

/// Test 1, `once`: the frozen holder's closure is cancelled, and `once` returns
/// `LockLost`, no later than the instant the contender acquires.
async fn frozen_once(ttl: Duration) {
    let server = server::shared();
    let prefix = server::unique_prefix(&format!("partition_once_{}", ttl.as_secs()));
    let proxy = Proxy::start(server);
    let holder = herd(&prefix, "frozen", &proxy.url(), ttl).await;
    let other = herd(&prefix, "other", &server.url(), ttl).await;
    let mut conn = raw(server).await;
    let options = LockOptions::new().ttl(ttl);
    let cancelled: Stamped = Arc::default();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let once = tokio::spawn({
        let (cancelled, options) = (Arc::clone(&cancelled), options.clone());
        async move {
            let outcome = holder
                .once_with("k", &options, move || async move {
                    let _stamp = Stamp::new(&cancelled);
                    let _ = started_tx.send(());
                    std::future::pending::<()>().await;
                    Ok(())
                })
                .await;
            (outcome, Instant::now())
        }
    });
    within(STEP_TIMEOUT, "the closure starts", started_rx)
        .await
        .expect("started");
    wait_renewed(&mut conn, &lock_key(&prefix, "k"), ttl).await;

    proxy.freeze();
    let frozen_at = Instant::now();
    let contender = tokio::spawn({
        let cancelled = Arc::clone(&cancelled);
        async move {
            let taken = other.lock_with("k", ttl * 2 + STEP_TIMEOUT, &options).await;
            (taken, Instant::now(), read(&cancelled))
        }
    });
    let (taken, acquired_at, cancelled_when_acquired) =
        within(ttl * 3 + STEP_TIMEOUT, "the contender", contender)
            .await
            .expect("task");
    let taken = taken.expect("the contender acquires once the lease ran out");
    let (outcome, returned_at) = within(STEP_TIMEOUT, "once", once).await.expect("task");
    let e = outcome.expect_err("the frozen holder lost its lock");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e:?}");
    let cancelled_at = read(&cancelled).expect("the closure was cancelled");
    report("once", ttl, frozen_at, cancelled_at, acquired_at);
    println!(
        "partition [once, ttl {ttl:?}]: once returned LockLost {:.1} ms after its closure was cancelled",
        millis(returned_at - cancelled_at)
    );
    assert!(
        cancelled_when_acquired.is_some(),
        "the contender acquired while the frozen holder's closure still ran"
    );
    assert!(cancelled_at <= acquired_at);
    assert!(
        returned_at <= acquired_at,
        "once returned {} ms after the contender acquired",
        ms(returned_at - acquired_at)
    );
    proxy.thaw();
    taken
        .release()
        .await
        .expect("the new holder still holds it");
}

/// Test 1, fan-out leader: the frozen leader's job is cancelled and it publishes nothing;
/// the waiting contender runs the job itself, after the old leader was told, and never
/// receives a result from the old leader.
async fn frozen_fanout_leader(ttl: Duration) {
    let server = server::shared();
    let prefix = server::unique_prefix(&format!("partition_fanout_{}", ttl.as_secs()));
    let proxy = Proxy::start(server);
    let holder = herd(&prefix, "frozen", &proxy.url(), ttl).await;
    let other = herd(&prefix, "other", &server.url(), ttl).await;
    let mut conn = raw(server).await;
    let job = "partitioned-job";
    let (wait, options) = (ttl * 3 + STEP_TIMEOUT, FanoutOptions::new().ttl(ttl));
    let published = Published::start(server, &format!("{prefix}:{{{job}}}")).await;
    let cancelled: Stamped = Arc::default();
    let release_stale = Arc::new(tokio::sync::Notify::new());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let leader = tokio::spawn({
        let (holder, options) = (holder.clone(), options.clone());
        let (cancelled, release_stale) = (Arc::clone(&cancelled), Arc::clone(&release_stale));
        async move {
            let result = holder
                .fanout_with(job, wait, &options, move || async move {
                    let mut stamp = Stamp::new(&cancelled);
                    let _ = started_tx.send(());
                    release_stale.notified().await;
                    stamp.armed = false;
                    Ok("stale".to_owned())
                })
                .await;
            (result, Instant::now())
        }
    });
    within(STEP_TIMEOUT, "the frozen leader's job starts", started_rx)
        .await
        .expect("started");
    wait_renewed(&mut conn, &lock_key(&prefix, job), ttl).await;

    // The contender follows the run in progress, and takes over when it is gone.
    let took_over: Stamped = Arc::default();
    let cancelled_when_taken: Stamped = Arc::default();
    let contender = tokio::spawn({
        let (other, options) = (other.clone(), options.clone());
        let job_fn = fresh_job(&cancelled, &took_over, &cancelled_when_taken);
        async move { other.fanout_with(job, wait, &options, job_fn).await }
    });
    let deadline = Instant::now() + STEP_TIMEOUT;
    while other.stats().following == 0 {
        assert!(Instant::now() < deadline, "the contender never followed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    proxy.freeze();
    let frozen_at = Instant::now();
    let fanned = within(ttl * 3 + STEP_TIMEOUT, "the contender", contender)
        .await
        .expect("task")
        .expect("the contender gets a result");
    assert_eq!(
        fanned.value, "fresh",
        "a stale result reached the contender"
    );
    assert_eq!(
        fanned.role,
        Role::Leader,
        "the contender ran the job itself"
    );
    let acquired_at = read(&took_over).expect("the contender's job ran");
    let cancelled_when_acquired = read(&cancelled_when_taken);
    let (result, returned_at) = within(STEP_TIMEOUT, "the frozen leader", leader)
        .await
        .expect("task");
    let e = result.expect_err("the frozen leader lost its run");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e:?}");
    let cancelled_at = read(&cancelled).expect("the frozen leader's job was cancelled");
    report("fan-out leader", ttl, frozen_at, cancelled_at, acquired_at);
    assert!(
        cancelled_when_acquired.is_some(),
        "the contender's run started while the frozen leader's job still ran"
    );
    assert!(cancelled_at <= acquired_at);
    assert!(
        returned_at <= acquired_at,
        "the frozen leader's callers were told {} ms after the contender took over",
        ms(returned_at - acquired_at)
    );

    // Thawed: the old leader's job is gone for good and nothing it held back gets out.
    proxy.thaw();
    release_stale.notify_waiters();
    holder
        .lock_status(job)
        .await
        .expect("the holder's path works again");
    assert_eq!(holder.stats().in_flight, 0);
    published.wait_for(b"fresh", b"stale").await;
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(format!("{prefix}:{{{job}}}:result"))
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert!(
        stored.windows(5).any(|w| w == b"fresh"),
        "stored: {stored:?}"
    );
}

/// The contender's job: notes when it started (just after its run acquired the lock) and
/// whether the frozen leader's job had been cancelled by then.
fn fresh_job(
    cancelled: &Stamped,
    took_over: &Stamped,
    cancelled_when_taken: &Stamped,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<String, JobError>> + Send + 'static
{
    let (cancelled, took_over, cancelled_when_taken) = (
        Arc::clone(cancelled),
        Arc::clone(took_over),
        Arc::clone(cancelled_when_taken),
    );
    move || {
        Box::pin(async move {
            *took_over.lock().expect("took over") = Some(Instant::now());
            *cancelled_when_taken.lock().expect("cancelled") = read(&cancelled);
            Ok("fresh".to_owned())
        })
    }
}

/// Records everything published on one channel, seen from outside (a direct connection).
struct Published {
    messages: Arc<Mutex<Vec<Vec<u8>>>>,
    listener: tokio::task::JoinHandle<()>,
}

impl Published {
    /// Subscribes (confirmed when this returns) and starts recording.
    async fn start(server: &RedisServer, channel: &str) -> Published {
        let mut pubsub = redis::Client::open(server.url())
            .expect("url")
            .get_async_pubsub()
            .await
            .expect("pub/sub");
        pubsub.subscribe(channel).await.expect("subscribe");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::spawn({
            let messages = Arc::clone(&messages);
            async move {
                use futures::StreamExt;
                let mut stream = pubsub.into_on_message();
                while let Some(msg) = stream.next().await {
                    messages
                        .lock()
                        .expect("published")
                        .push(msg.get_payload_bytes().to_vec());
                }
            }
        });
        Published { messages, listener }
    }

    /// Waits until a message containing `wanted` was published, failing if one containing
    /// `never` ever was.
    async fn wait_for(&self, wanted: &[u8], never: &[u8]) {
        let contains = |m: &Vec<u8>, part: &[u8]| m.windows(part.len()).any(|w| w == part);
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let messages = self.messages.lock().expect("published").clone();
            assert!(
                !messages.iter().any(|m| contains(m, never)),
                "a message with {:?} was published",
                String::from_utf8_lossy(never)
            );
            if messages.iter().any(|m| contains(m, wanted)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no message with {:?} was published",
                String::from_utf8_lossy(wanted)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_guard_ttl_2s() {
    frozen_guard(SHORT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_guard_ttl_10s() {
    frozen_guard(DEFAULT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_once_ttl_2s() {
    frozen_once(SHORT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_once_ttl_10s() {
    frozen_once(DEFAULT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_fanout_leader_ttl_2s() {
    frozen_fanout_leader(SHORT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_fanout_leader_ttl_10s() {
    frozen_fanout_leader(DEFAULT).await;
}

/// Test 2: Redis stalls (`DEBUG SLEEP 3`) past a 1 s lease. The holder is told by the
/// lease's local deadline: at most one TTL after its last successful renewal started, which
/// was before the stall began; not when Redis wakes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_loss_by_the_local_deadline() {
    let ttl = Duration::from_secs(1);
    let sleep = Duration::from_secs(3);
    let server = RedisServer::start();
    let prefix = server::unique_prefix("debug_sleep_lease");
    let holder = herd(&prefix, "stalled", &server.url(), ttl).await;
    let mut conn = raw(&server).await;
    let TryLock::Acquired(guard) = holder
        .try_lock_with("k", &LockOptions::new().ttl(ttl))
        .await
        .expect("try")
    else {
        panic!("the lock is free");
    };
    wait_renewed(&mut conn, &lock_key(&prefix, "k"), ttl).await;

    // A pinger finds when the stall began: the first PING that does not come back at once
    // was sent after the server went to sleep (or just before), so the stall began no
    // later than that PING's send time, and every renewal that succeeded started before.
    let pinger = tokio::spawn({
        let mut conn = conn.clone();
        async move {
            loop {
                let sent = Instant::now();
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .expect("PING");
                let answered = Instant::now();
                if answered - sent > Duration::from_millis(500) {
                    return (sent, answered);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let lost = tokio::spawn({
        let guard_lost = Arc::new(guard);
        let g = Arc::clone(&guard_lost);
        async move {
            g.lost().await;
            (Instant::now(), guard_lost)
        }
    });
    let seconds = sleep.as_secs().to_string();
    let sleeper = server.spawn_cmd(&["DEBUG", "SLEEP", &seconds]);
    let (stalled_from, woke_at) = within(STEP_TIMEOUT, "the pinger", pinger)
        .await
        .expect("task");
    let (lost_at, guard) = within(STEP_TIMEOUT, "lost()", lost).await.expect("task");
    let output = tokio::task::spawn_blocking(move || sleeper.wait_with_output())
        .await
        .expect("task")
        .expect("redis-cli");
    assert!(output.status.success(), "DEBUG SLEEP: {output:?}");
    println!(
        "stall [DEBUG SLEEP {}, ttl {ttl:?}]: holder told it lost the lock {:.1} ms after the \
         stall began (at the latest), Redis woke up after {:.1} ms",
        sleep.as_secs(),
        millis(lost_at.saturating_duration_since(stalled_from)),
        millis(woke_at - stalled_from)
    );
    assert!(
        lost_at < woke_at,
        "loss was reported only after Redis woke up"
    );
    assert!(
        lost_at <= stalled_from + ttl,
        "loss was reported {} ms after the stall began, more than the TTL",
        ms(lost_at - stalled_from)
    );
    // A renewal answered after the stall does not bring the lease back.
    assert!(guard.is_lost());
    let guard = Arc::into_inner(guard).expect("the task is done");
    let e = guard.release().await.expect_err("lost");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e:?}");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(lock_key(&prefix, "k"))
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "the lost lock was left behind");
}
