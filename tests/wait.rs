//! Waiting and acquiring under time pressure: the in-memory clock read once per step, a
//! deadline that fires while an acquire step is in flight, and the shared wait helper.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, Herd, LockOptions, TryLock, TryMulti};

use crate::common::server::RedisServer;
use crate::fixture::within;

/// The TTL of the locks the deadline tests take: far longer than the tests, so a lock that
/// is gone was released, not expired.
const LONG_TTL: Duration = Duration::from_secs(60);

/// How many clients Redis holds blocked (here: paused by `CLIENT PAUSE WRITE`).
fn blocked_clients(server: &RedisServer) -> u32 {
    server
        .cmd(&["INFO", "clients"])
        .lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls (bounded) until `done` holds, panicking with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A private server and a herd on it whose scripts are loaded (so the paused step is the
/// acquire script itself, not a SCRIPT LOAD).
async fn paused_setup(prefix: &str) -> (RedisServer, Herd) {
    let server = RedisServer::start();
    let herd = Herd::builder()
        .prefix(prefix)
        .connect(&server.url())
        .await
        .expect("connect");
    let warm = herd
        .try_multi(&["warm-up"])
        .await
        .expect("try_multi")
        .acquired()
        .expect("free");
    warm.release().await.expect("release");
    herd.try_lock("warm-up")
        .await
        .expect("try_lock")
        .acquired()
        .expect("free")
        .release()
        .await
        .expect("release");
    // Writes (and every script) wait from now on; reads from redis-cli still answer.
    assert_eq!(server.cmd(&["CLIENT", "PAUSE", "30000", "WRITE"]), "OK");
    (server, herd)
}

/// After the pause ends, the acquire script that was cut off runs and wins (its `SET`s
/// are counted), and the background undo releases what it took well before the TTL.
async fn unpause_and_expect_released(server: &RedisServer, prefix: &str, keys: &[&str]) {
    for key in keys {
        assert_eq!(
            server.cmd(&["EXISTS", &format!("{prefix}:{{{key}}}:lock")]),
            "0",
            "nothing ran while paused"
        );
    }
    let sets_before = server.command_calls(&["set"]);
    assert_eq!(server.cmd(&["CLIENT", "UNPAUSE"]), "OK");
    let unpaused = Instant::now();
    // One SET per key: the cut-off script ran and took every key (nothing else writes on
    // this private server).
    eventually(
        Duration::from_secs(10),
        "the cut-off acquire script ran and won after the deadline",
        || server.command_calls(&["set"]) >= sets_before + keys.len() as u64,
    )
    .await;
    for key in keys {
        let lock = format!("{prefix}:{{{key}}}:lock");
        eventually(
            Duration::from_secs(10),
            "the lock it took was released (not left for its 60 s TTL)",
            || server.cmd(&["EXISTS", &lock]) == "0",
        )
        .await;
    }
    eprintln!(
        "{prefix}: the cut-off step's lock on {keys:?} was gone {:?} after the pause ended",
        unpaused.elapsed()
    );
}

/// Issue 9, test 8 (`lock`): the caller's deadline fires while its acquire script waits on
/// a paused Redis. The call times out on time, and once the script runs and wins, the lock
/// it took is released: nothing is left behind for the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_deadline_during_acquire_leaves_no_lock() {
    let (server, herd) = paused_setup("dl").await;
    let started = Instant::now();
    let err = herd
        .lock_with(
            "k",
            Duration::from_millis(300),
            &LockOptions::new().ttl(LONG_TTL),
        )
        .await
        .expect_err("Redis is paused: the lock cannot be taken in time");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        took < Duration::from_secs(2),
        "the deadline was kept: {took:?}"
    );
    // The script is queued on the paused server (it was sent before the deadline, or is
    // sent by the background task that finishes it).
    eventually(
        Duration::from_secs(10),
        "the acquire script in flight",
        || blocked_clients(&server) >= 1,
    )
    .await;
    unpause_and_expect_released(&server, "dl", &["k"]).await;
    assert!(herd
        .try_lock("k")
        .await
        .expect("try_lock")
        .acquired()
        .is_some());
}

/// Issue 9, test 8 (`multi`): as above, for a multi-lock over two keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_deadline_during_acquire_leaves_no_lock() {
    let (server, herd) = paused_setup("dm").await;
    let started = Instant::now();
    let err = herd
        .multi_with(
            &["a", "b"],
            Duration::from_millis(300),
            &herdlock::MultiOptions::new().ttl(LONG_TTL),
        )
        .await
        .expect_err("Redis is paused: the locks cannot be taken in time");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        took < Duration::from_secs(2),
        "the deadline was kept: {took:?}"
    );
    assert!(
        blocked_clients(&server) >= 1,
        "the acquire script was in flight"
    );
    unpause_and_expect_released(&server, "dm", &["a", "b"]).await;
    assert!(herd
        .try_multi(&["a", "b"])
        .await
        .expect("try_multi")
        .acquired()
        .is_some());
}

/// Cancelling a `try_lock` whose script is in flight (the caller's own timeout drops it)
/// leaves nothing behind either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_try_lock_leaves_no_lock() {
    let (server, herd) = paused_setup("dc").await;
    let options = LockOptions::new().ttl(LONG_TTL);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        herd.try_lock_with("k", &options),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "Redis is paused: try_lock cannot answer"
    );
    assert!(
        blocked_clients(&server) >= 1,
        "the acquire script was in flight"
    );
    unpause_and_expect_released(&server, "dc", &["k"]).await;
}

/// Issue 9: the in-memory engine read the clock several times inside one step, so a lock
/// expiring between two reads was reported busy with an empty holder ("malformed holder
/// value", `ErrorKind::Redis`). Contenders hammer 1 ms locks that expire under them, with
/// every step that reads a holder (`try_lock`, `try_multi`, `lock_status`; a fan-out's
/// acquire is the same step); not one call may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_contended_expiries_never_error() {
    const CONTENDERS: usize = 4;
    const ROUNDS: usize = 3_000;
    let herd = Herd::builder()
        .prefix("memclock")
        .memory()
        .expect("memory herd");
    let opts = LockOptions::new()
        .ttl(Duration::from_millis(1))
        .auto_extend(false);
    let multi_opts = herdlock::MultiOptions::new()
        .ttl(Duration::from_millis(1))
        .auto_extend(false);
    let busy_seen = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CONTENDERS)
        .map(|i| {
            let (herd, opts, multi_opts, busy_seen) = (
                herd.clone(),
                opts.clone(),
                multi_opts.clone(),
                Arc::clone(&busy_seen),
            );
            tokio::spawn(async move {
                let mut guards = Vec::new();
                for round in 0..ROUNDS {
                    match herd.try_lock_with("hot", &opts).await {
                        Ok(TryLock::Acquired(guard)) => guards.push(guard),
                        Ok(TryLock::Busy(_)) => {
                            busy_seen.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("contender {i}, round {round}: try_lock failed: {e}"),
                    }
                    match herd.try_multi_with(&["hot", "cold"], &multi_opts).await {
                        Ok(TryMulti::Acquired(guard)) => drop(guard),
                        Ok(TryMulti::Busy(_)) => {}
                        Err(e) => panic!("contender {i}, round {round}: try_multi failed: {e}"),
                    }
                    if let Err(e) = herd.lock_status("hot").await {
                        panic!("contender {i}, round {round}: lock_status failed: {e}");
                    }
                    if round % 50 == 0 {
                        // The guards are not released: they run out, which is the point.
                        guards.clear();
                        tokio::task::yield_now().await;
                    }
                }
                // Forgetting would leak; dropping releases in the background (lost: fine).
                drop(guards);
            })
        })
        .collect();
    within(Duration::from_secs(60), "the contenders", async {
        for task in tasks {
            task.await.expect("a contender panicked");
        }
    })
    .await;
    assert!(
        busy_seen.load(Ordering::Relaxed) > 0,
        "the contenders never met a held lock: the test exercised nothing"
    );
}
