//! Release through a transient connection error (issue 9, test 6): releases compare the
//! holder, so they are retried within the command timeout; a retry that finds the lock
//! gone succeeds, one that finds another holder reports `LockLost`.
//!
//! Two kinds of fault: `CLIENT KILL TYPE normal` on a private server (the connection is dead
//! when the release is sent), and a proxy cut at a chosen instant (the request held before
//! it reached Redis, or the reply held after Redis applied it).

use std::time::Duration;

use herdlock::{ErrorKind, Herd, LockOptions, MultiOptions, SemaphoreOptions};
use redis::aio::MultiplexedConnection;

use crate::common::proxy::{Direction, Proxy};
use crate::common::server::{self, RedisServer};
use crate::common::STEP_TIMEOUT;
use crate::fixture::within;

async fn herd(prefix: &str, owner: &str, url: &str) -> Herd {
    Herd::builder()
        .prefix(prefix)
        .owner(owner)
        .connect(url)
        .await
        .expect("connect")
}

async fn raw(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .expect("EXISTS");
    n == 1
}

fn lock_key(prefix: &str, key: &str) -> String {
    format!("{prefix}:{{{key}}}:lock")
}

fn sem_key(prefix: &str, key: &str) -> String {
    format!("{prefix}:{{{key}}}:sem")
}

/// What is held: a lock, a multi-lock over two keys, or a semaphore permit.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Lock,
    Multi,
    Permit,
}

enum Held {
    Lock(herdlock::LockGuard),
    Multi(herdlock::MultiGuard),
    Permit(herdlock::Permit),
}

/// How a release ended, the same way for every kind.
#[derive(Debug, PartialEq, Eq)]
enum Released {
    Ok,
    Lost,
}

/// Takes the lock, multi-lock or permit (auto-extend off for locks: nothing but the release
/// talks to Redis).
async fn take(herd: &Herd, kind: Kind, ttl: Duration) -> Held {
    let options = LockOptions::new().ttl(ttl).auto_extend(false);
    match kind {
        Kind::Lock => Held::Lock(
            herd.try_lock_with("k", &options)
                .await
                .expect("try")
                .acquired()
                .expect("free"),
        ),
        Kind::Multi => Held::Multi(
            herd.try_multi_with(
                &["k", "k2"],
                &MultiOptions::new().ttl(ttl).auto_extend(false),
            )
            .await
            .expect("try")
            .acquired()
            .expect("free"),
        ),
        Kind::Permit => Held::Permit(
            herd.semaphore_with("k", 1, &SemaphoreOptions::new().lease(ttl))
                .expect("semaphore")
                .try_acquire()
                .await
                .expect("try")
                .acquired()
                .expect("free"),
        ),
    }
}

async fn release(held: Held) -> herdlock::Result<Released> {
    match held {
        Held::Lock(guard) => match guard.release().await {
            Ok(()) => Ok(Released::Ok),
            Err(e) if e.kind() == ErrorKind::LockLost => Ok(Released::Lost),
            Err(e) => Err(e),
        },
        Held::Multi(guard) => match guard.release().await {
            Ok(()) => Ok(Released::Ok),
            Err(e) if e.kind() == ErrorKind::LockLost => {
                // Both keys share one fate (one lease, one script).
                assert!(
                    e.message().contains("`k`") && e.message().contains("`k2`"),
                    "{e}"
                );
                Ok(Released::Lost)
            }
            Err(e) => Err(e),
        },
        Held::Permit(permit) => match permit.release().await {
            Ok(()) => Ok(Released::Ok),
            Err(e) if e.kind() == ErrorKind::LockLost => Ok(Released::Lost),
            Err(e) => Err(e),
        },
    }
}

/// Takes and releases once (so Redis has the scripts cached: a held `NOSCRIPT` reply would
/// stall the scenario), then takes again.
async fn warm_then_take(herd: &Herd, kind: Kind, ttl: Duration) -> Held {
    let warm = take(herd, kind, ttl).await;
    assert_eq!(release(warm).await.expect("release"), Released::Ok);
    take(herd, kind, ttl).await
}

/// The Redis keys that show the hold.
fn held_keys(prefix: &str, kind: Kind) -> Vec<String> {
    match kind {
        Kind::Lock => vec![lock_key(prefix, "k")],
        Kind::Multi => vec![lock_key(prefix, "k"), lock_key(prefix, "k2")],
        Kind::Permit => vec![sem_key(prefix, "k")],
    }
}

async fn all_free(conn: &mut MultiplexedConnection, prefix: &str, kind: Kind) -> bool {
    for key in held_keys(prefix, kind) {
        if exists(conn, &key).await {
            return false;
        }
    }
    true
}

/// The connection is killed (`CLIENT KILL TYPE normal`) right before the release: the
/// release still succeeds, and the lock is free.
async fn killed_connection(kind: Kind) {
    let server = RedisServer::start();
    let prefix = server::unique_prefix(&format!("release_killed_{kind:?}"));
    let holder = herd(&prefix, "holder", &server.url()).await;
    let mut conn = raw(&server).await;
    let held = take(&holder, kind, Duration::from_secs(30)).await;
    assert!(!all_free(&mut conn, &prefix, kind).await);
    let connections_before = total_connections(&mut conn).await;
    let killed = server.cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert_ne!(killed, "0", "no connection was killed");
    let mut conn = raw(&server).await;
    let started = std::time::Instant::now();
    let released = within(STEP_TIMEOUT, "release", release(held))
        .await
        .expect("the release succeeds on a retry");
    println!(
        "release [{kind:?}] through a killed connection: {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(released, Released::Ok);
    assert!(
        all_free(&mut conn, &prefix, kind).await,
        "the lock was left held"
    );
    // The release had to open a new connection (the raw one above is one of them).
    assert!(total_connections(&mut conn).await >= connections_before + 2);
}

async fn total_connections(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats has total_connections_received")
}

/// The release request is held by a frozen proxy, then the connection is cut: the request
/// never reached Redis, the retry releases.
async fn request_cut(kind: Kind) {
    let server = server::shared();
    let prefix = server::unique_prefix(&format!("release_request_cut_{kind:?}"));
    let proxy = Proxy::start(server);
    let holder = herd(&prefix, "holder", &proxy.url()).await;
    let mut conn = raw(server).await;
    let held = warm_then_take(&holder, kind, Duration::from_secs(30)).await;
    proxy.freeze();
    let releasing = tokio::spawn(release(held));
    proxy.wait_held(Direction::ToServer, 1, STEP_TIMEOUT).await;
    assert!(
        !all_free(&mut conn, &prefix, kind).await,
        "nothing got through"
    );
    proxy.cut();
    proxy.thaw();
    let released = within(STEP_TIMEOUT, "release", releasing)
        .await
        .expect("task")
        .expect("the release succeeds on a retry");
    assert_eq!(released, Released::Ok);
    assert!(
        all_free(&mut conn, &prefix, kind).await,
        "the lock was left held"
    );
}

/// Redis applies the release, its reply is held by the proxy, then the connection is cut:
/// the retry finds the lock already released by this holder, which is a success.
async fn reply_cut(kind: Kind) {
    let server = server::shared();
    let prefix = server::unique_prefix(&format!("release_reply_cut_{kind:?}"));
    let proxy = Proxy::start(server);
    let holder = herd(&prefix, "holder", &proxy.url()).await;
    let mut conn = raw(server).await;
    let held = warm_then_take(&holder, kind, Duration::from_secs(30)).await;
    proxy.freeze_replies();
    let releasing = tokio::spawn(release(held));
    proxy.wait_held(Direction::ToClient, 1, STEP_TIMEOUT).await;
    assert!(
        all_free(&mut conn, &prefix, kind).await,
        "the release was applied"
    );
    proxy.cut();
    proxy.thaw();
    let released = within(STEP_TIMEOUT, "release", releasing)
        .await
        .expect("task")
        .expect("the retry reports the release");
    assert_eq!(
        released,
        Released::Ok,
        "a second release of a released lock is a success"
    );
}

/// Redis applies the release (a waiter marked the lock, so it publishes), the waiter takes
/// the lock at once, and the release's reply is held, then cut: the retry finds the waiter
/// holding it. The release was sent before the lease's local deadline, so the lock cannot
/// have expired: the first attempt released it, which is a success (not `LockLost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_taking_the_lock_after_a_lost_reply_is_no_loss() {
    let server = server::shared();
    let prefix = server::unique_prefix("release_reply_cut_waiter");
    let proxy = Proxy::start(server);
    let holder = herd(&prefix, "holder", &proxy.url()).await;
    let other = herd(&prefix, "other", &server.url()).await;
    let Held::Lock(held) = warm_then_take(&holder, Kind::Lock, Duration::from_secs(30)).await
    else {
        unreachable!("a lock was taken");
    };
    let waiter = tokio::spawn(async move { other.lock("k", STEP_TIMEOUT).await });
    // The waiter is subscribed once its mark is on the holder value.
    let mut conn = raw(server).await;
    wait_for_lock(
        &mut conn,
        &lock_key(&prefix, "k"),
        "the waiter marked the lock",
        marked,
    )
    .await;
    proxy.freeze_replies();
    let releasing = tokio::spawn(release(Held::Lock(held)));
    let taken = within(STEP_TIMEOUT, "waiter", waiter)
        .await
        .expect("task")
        .expect("the waiter takes the released lock");
    proxy.cut();
    proxy.thaw();
    let released = within(STEP_TIMEOUT, "release", releasing)
        .await
        .expect("task")
        .expect("the retry answers");
    assert_eq!(
        released,
        Released::Ok,
        "the release was applied before the waiter took it"
    );
    taken.release().await.expect("release");
}

/// The release request is held while the lock expires and another holder takes it; the
/// connection is cut: the retry finds the other holder and reports `LockLost`, leaving the
/// other holder's lock alone.
async fn retry_finds_another_holder(kind: Kind) {
    let server = server::shared();
    let prefix = server::unique_prefix(&format!("release_other_holder_{kind:?}"));
    let proxy = Proxy::start(server);
    let holder = herd(&prefix, "holder", &proxy.url()).await;
    let other = herd(&prefix, "other", &server.url()).await;
    let mut conn = raw(server).await;
    let ttl = Duration::from_millis(300);
    let held = warm_then_take(&holder, kind, ttl).await;
    proxy.freeze();
    let releasing = tokio::spawn(release(held));
    proxy.wait_held(Direction::ToServer, 1, STEP_TIMEOUT).await;
    // The other holder waits for the lease to run out (no polling: its own waiter).
    let taken = match kind {
        Kind::Lock => Held::Lock(other.lock("k", STEP_TIMEOUT).await.expect("lock")),
        Kind::Multi => Held::Multi(
            other
                .multi(&["k", "k2"], STEP_TIMEOUT)
                .await
                .expect("multi"),
        ),
        Kind::Permit => Held::Permit(
            other
                .semaphore("k", 1)
                .expect("semaphore")
                .acquire(STEP_TIMEOUT)
                .await
                .expect("permit"),
        ),
    };
    proxy.cut();
    proxy.thaw();
    let released = within(STEP_TIMEOUT, "release", releasing)
        .await
        .expect("task")
        .expect("the retry answers");
    match kind {
        // Permits are members of a set: a permit gone is released, whoever holds others.
        Kind::Permit => assert_eq!(released, Released::Ok),
        Kind::Lock | Kind::Multi => assert_eq!(released, Released::Lost),
    }
    assert!(
        !all_free(&mut conn, &prefix, kind).await,
        "the other holder's lock was released"
    );
    assert_eq!(release(taken).await.expect("release"), Released::Ok);
}

macro_rules! per_kind {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use super::Kind;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn lock() {
                    super::$scenario(Kind::Lock).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn multi() {
                    super::$scenario(Kind::Multi).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn permit() {
                    super::$scenario(Kind::Permit).await;
                }
            }
        )*
    };
}

per_kind!(
    killed_connection,
    request_cut,
    reply_cut,
    retry_finds_another_holder
);

/// A fan-out leader's completion whose request is held and then cut (it never reached
/// Redis) is retried on a new connection: a follower in another herd gets the result at
/// once, not after the run's 30 s TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_through_a_cut_connection_is_retried() {
    let server = server::shared();
    let prefix = server::unique_prefix("complete_cut");
    let proxy = Proxy::start(server);
    let leader = herd(&prefix, "leader", &proxy.url()).await;
    let follower = herd(&prefix, "follower", &server.url()).await;
    let options = herdlock::FanoutOptions::new().ttl(Duration::from_secs(30));
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let leading = tokio::spawn({
        let options = options.clone();
        async move {
            leader
                .fanout_with(
                    "job",
                    Duration::from_secs(60),
                    &options,
                    move || async move {
                        let _ = go_rx.await;
                        Ok(42u32)
                    },
                )
                .await
        }
    });
    let mut conn = raw(server).await;
    let lock = lock_key(&prefix, "job");
    wait_for_lock(&mut conn, &lock, "the run started", |v| v.is_some()).await;
    let following = tokio::spawn(async move {
        follower
            .fanout_with("job", Duration::from_secs(60), &options, || async {
                Ok(0u32)
            })
            .await
    });
    // The follower marked the run as waited for: it is subscribed and waiting.
    wait_for_lock(&mut conn, &lock, "the follower waited", marked).await;
    proxy.freeze();
    let _ = go_tx.send(());
    proxy.wait_held(Direction::ToServer, 1, STEP_TIMEOUT).await;
    proxy.cut();
    proxy.thaw();
    let got = within(Duration::from_secs(10), "follower", following)
        .await
        .expect("task")
        .expect("the follower gets the result");
    assert_eq!(got.value, 42);
    let led = within(Duration::from_secs(10), "leader", leading)
        .await
        .expect("task")
        .expect("the leader has its value");
    assert_eq!(led.value, 42);
}

/// Whether a holder value carries the waited-for mark (its fourth field).
fn marked(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.split(':').nth(3) == Some("1"))
}

/// Polls (bounded by `STEP_TIMEOUT`) until the lock key's value satisfies `done`.
async fn wait_for_lock(
    conn: &mut MultiplexedConnection,
    key: &str,
    what: &str,
    done: impl Fn(Option<&str>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(conn)
            .await
            .expect("get");
        if done(value.as_deref()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
