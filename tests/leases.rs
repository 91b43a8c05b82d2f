//! Leases that survive a blocked runtime, lock-lost detection and cancellation, takeover
//! after death, Redis outages, and replica acknowledgement (real Redis, real processes).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd, LockOptions};

use crate::common::procs::{ready_then_go, Worker};
use crate::common::server::{self, RedisServer, ServerConfig};

const ENTRY: &str = "workers::worker_entry";

fn worker(role: &str, prefix: &str, url: &str, owner: &str, extra: &[(&str, &str)]) -> Worker {
    let mut params = vec![
        ("URL", url.to_owned()),
        ("PREFIX", prefix.to_owned()),
        ("OWNER", owner.to_owned()),
    ];
    params.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Worker::spawn(ENTRY, role, &params)
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {pid}");
}

/// Issue 5, test 1: a fan-out job blocks its current-thread runtime with
/// `std::thread::sleep` for 3× the TTL; the watchdog thread keeps the lease, the job runs
/// once, and every waiter (on another runtime) gets the result.
#[test]
fn blocked_runtime_keeps_its_lease() {
    let server = server::shared();
    let prefix = server::unique_prefix("blocked_runtime");
    let url = server.url();
    let runs = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_millis(600);
    let options = FanoutOptions::new().ttl(ttl);

    let leader_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let leader = leader_rt
        .block_on(
            Herd::builder()
                .prefix(prefix.clone())
                .owner("blocked")
                .connect(&url),
        )
        .expect("connect");
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let leader_thread = {
        let (runs, options) = (runs.clone(), options.clone());
        std::thread::spawn(move || {
            leader_rt.block_on(async move {
                leader
                    .fanout_with(
                        "blocking",
                        Duration::from_secs(20),
                        &options,
                        move || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            let _ = started_tx.send(());
                            // Blocks the whole (current-thread) runtime for 3× the TTL.
                            std::thread::sleep(ttl * 3);
                            Ok("survived".to_owned())
                        },
                    )
                    .await
            })
        })
    };
    started_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the job started");

    let waiters_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let values = waiters_rt.block_on(async {
        let others = Herd::builder()
            .prefix(prefix.clone())
            .owner("waiter")
            .connect(&url)
            .await
            .expect("connect");
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (others, options, runs) = (others.clone(), options.clone(), runs.clone());
                tokio::spawn(async move {
                    others
                        .fanout_with(
                            "blocking",
                            Duration::from_secs(20),
                            &options,
                            move || async move {
                                runs.fetch_add(1, Ordering::SeqCst);
                                Ok("second run".to_owned())
                            },
                        )
                        .await
                })
            })
            .collect();
        let mut values = Vec::new();
        for t in tasks {
            values.push(t.await.expect("task").expect("fanout").value);
        }
        values
    });
    let leader_value = leader_thread
        .join()
        .expect("leader thread")
        .expect("leader fanout");
    assert_eq!(leader_value.value, "survived");
    assert!(values.iter().all(|v| v == "survived"), "{values:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Issue 5, test 2: a holder paused with SIGSTOP past its TTL loses the lock to another
/// process; resumed, it learns it lost (lost signal, heartbeat fails), and its fencing
/// token is older than the new holder's.
#[test]
fn paused_holder_learns_it_lost_the_lock() {
    let server = server::shared();
    let prefix = server::unique_prefix("sigstop_lock");
    let url = server.url();
    let mut holder = worker(
        "lease_holder",
        &prefix,
        &url,
        "paused",
        &[("TTL_MS", "1000")],
    );
    ready_then_go(std::slice::from_mut(&mut holder), Duration::from_secs(30));
    let held: u64 = holder
        .wait_value("holding", Duration::from_secs(20))
        .parse()
        .expect("fence");
    signal(holder.pid(), "-STOP");
    let mut waiter = worker(
        "lease_waiter",
        &prefix,
        &url,
        "successor",
        &[("TTL_MS", "1000")],
    );
    ready_then_go(std::slice::from_mut(&mut waiter), Duration::from_secs(30));
    let line = waiter.wait_value("acquired", Duration::from_secs(20));
    let successor: u64 = line
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("fence");
    assert!(successor > held, "{successor} <= {held}");
    signal(holder.pid(), "-CONT");
    let lost: u64 = holder
        .wait_value("lost", Duration::from_secs(20))
        .parse()
        .expect("fence");
    assert_eq!(lost, held);
    assert_eq!(
        holder.wait_value("heartbeat", Duration::from_secs(20)),
        "lock-lost"
    );
    holder.finish(Duration::from_secs(20)).assert_success();
    waiter.finish(Duration::from_secs(20)).assert_success();
}

/// Issue 5, test 2 (fan-out): a paused leader's run is taken over; resumed, its job is
/// cancelled, it publishes nothing, and every other caller gets the new run's result.
#[test]
fn paused_fanout_leader_publishes_nothing() {
    let server = server::shared();
    let prefix = server::unique_prefix("sigstop_fanout");
    let url = server.url();
    let params = [("TTL_MS", "1000"), ("JOB_MS", "4000")];
    let mut leader = worker("lease_fanout", &prefix, &url, "paused-leader", &params);
    ready_then_go(std::slice::from_mut(&mut leader), Duration::from_secs(30));
    leader.wait_line_prefix("running", Duration::from_secs(20));
    signal(leader.pid(), "-STOP");
    let mut follower = worker(
        "lease_fanout",
        &prefix,
        &url,
        "successor",
        &[("TTL_MS", "1000"), ("JOB_MS", "200")],
    );
    ready_then_go(std::slice::from_mut(&mut follower), Duration::from_secs(30));
    // The successor finds the paused run, waits out its lease, and runs the job itself.
    follower.wait_line_prefix("running", Duration::from_secs(20));
    assert_eq!(
        follower.wait_value("value", Duration::from_secs(20)),
        "from successor"
    );
    signal(leader.pid(), "-CONT");
    assert_eq!(
        leader.wait_value("error", Duration::from_secs(20)),
        "LockLost"
    );
    leader.finish(Duration::from_secs(20)).assert_success();
    follower.finish(Duration::from_secs(20)).assert_success();
    // The stored result is the successor's run, not the paused one.
    let stored = server.cmd(&["GET", &format!("{prefix}:{{leased-job}}:result")]);
    assert!(stored.contains("from successor"), "{stored}");
}

/// Issue 5, test 3: `kill -9` of a lock holder with TTL 2 s: a blocked waiter in another
/// process has the lock within 3 s, woken at the lease's end rather than by fast polling.
#[test]
fn killed_holder_is_taken_over_within_ttl() {
    let server = server::shared();
    let prefix = server::unique_prefix("kill_holder");
    let url = server.url();
    let mut holder = worker(
        "lease_holder",
        &prefix,
        &url,
        "doomed",
        &[("TTL_MS", "2000")],
    );
    ready_then_go(std::slice::from_mut(&mut holder), Duration::from_secs(30));
    holder.wait_value("holding", Duration::from_secs(20));
    let mut waiter = worker("lease_waiter", &prefix, &url, "heir", &[("TTL_MS", "2000")]);
    ready_then_go(std::slice::from_mut(&mut waiter), Duration::from_secs(30));
    // The waiter is blocked once it is subscribed to the lock's channel.
    let channel = format!("{prefix}:{{leased}}");
    server.wait_subscribers(&channel, 1, Duration::from_secs(20));
    let calls_before = server.command_calls(&["evalsha", "eval"]);
    let killed_at = Instant::now();
    holder.kill9();
    waiter.wait_value("acquired", Duration::from_secs(10));
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(3), "took over after {took:?}");
    waiter.finish(Duration::from_secs(20)).assert_success();
    // Woken by the lease's end, not by polling: a handful of checks, not hundreds.
    let checks = server.command_calls(&["evalsha", "eval"]) - calls_before;
    assert!(checks < 50, "{checks} script calls while waiting");
}

/// Issue 5, test 4: Redis killed and restarted under load: every call resolves (value or
/// error) before its deadline, and calls after the restart succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_load() {
    let mut server = RedisServer::start();
    let herd = Herd::builder()
        .prefix(server::unique_prefix("restart_load"))
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_secs(1))
        .connect(&server.url())
        .await
        .expect("connect");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (herd, stop, late, calls) = (herd.clone(), stop.clone(), late.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let deadline = Duration::from_secs(3);
                let started = Instant::now();
                let key = format!("k{i}-{}", n % 4);
                let call = async {
                    if i % 2 == 0 {
                        herd.lock(&key, Duration::from_millis(500)).await.map(drop)
                    } else {
                        herd.fanout(&key, Duration::from_millis(800), || async { Ok(1) })
                            .await
                            .map(|_| ())
                    }
                };
                let _ = call.await;
                calls.fetch_add(1, Ordering::SeqCst);
                // The call's own deadline plus the command timeout bounds every call.
                if started.elapsed() > deadline {
                    late.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let wait_calls = |n: usize| {
        let calls = calls.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while calls.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "load stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_calls(50).await;
    server.stop();
    let during = calls.load(Ordering::SeqCst);
    wait_calls(during + 20).await; // calls keep resolving (with errors) while Redis is down
    server.restart();
    // After the restart, calls succeed again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match herd.try_lock("after-restart").await {
            Ok(t) => {
                t.acquired()
                    .expect("free")
                    .release()
                    .await
                    .expect("release");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e:?}"),
        }
    }
    assert_eq!(
        herd.fanout("after-restart-job", Duration::from_secs(5), || async {
            Ok(9)
        })
        .await
        .expect("fanout after restart"),
        9
    );
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("load task ends")
            .expect("task");
    }
    assert_eq!(
        late.load(Ordering::SeqCst),
        0,
        "calls resolved past their deadline"
    );
}

/// The durability option: with a replica attached, `replicas(1, …)` succeeds; without
/// one, the acquisition is released and fails with `NotReplicated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_acknowledgement() {
    let primary = RedisServer::start();
    let herd = Herd::builder()
        .prefix(server::unique_prefix("replicas"))
        .connect(&primary.url())
        .await
        .expect("connect");
    let wants_one = LockOptions::new().replicas(1, Duration::from_millis(300));
    let e = herd
        .try_lock_with("durable", &wants_one)
        .await
        .expect_err("no replica");
    assert_eq!(e.kind(), ErrorKind::NotReplicated, "{e:?}");
    assert!(herd
        .lock_status("durable")
        .await
        .expect("status")
        .holder
        .is_none());

    let replica = RedisServer::start_with(ServerConfig {
        extra_args: vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port().to_string(),
        ],
        ..ServerConfig::default()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !replica
        .cmd(&["INFO", "replication"])
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "replica never synced");
        std::thread::sleep(Duration::from_millis(20));
    }
    let wants_one = LockOptions::new().replicas(1, Duration::from_secs(5));
    let guard = herd
        .try_lock_with("durable", &wants_one)
        .await
        .expect("acknowledged")
        .acquired()
        .expect("free");
    guard.release().await.expect("release");
}

/// `max_hold`: the watchdog stops extending after the maximum hold time, so the lock runs
/// out and the holder learns it lost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hold_stops_renewal() {
    let herd = Herd::builder()
        .prefix(server::unique_prefix("max_hold"))
        .connect(&server::shared().url())
        .await
        .expect("connect");
    let options = LockOptions::new()
        .ttl(Duration::from_millis(300))
        .max_hold(Duration::from_millis(600));
    let guard = herd
        .try_lock_with("bounded", &options)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost after max hold + ttl");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "lost too early: {took:?}"
    );
    assert!(guard.heartbeat().await.expect_err("lost").is_lock_lost());
}

/// `once` cancels its work when the lock is lost (the default), and reports `LockLost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_cancels_work_when_the_lock_is_lost() {
    let server = server::shared();
    let prefix = server::unique_prefix("once_lost");
    let herd = Herd::builder()
        .prefix(prefix.clone())
        .connect(&server.url())
        .await
        .expect("connect");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = finished.clone();
    let work = tokio::spawn({
        let herd = herd.clone();
        async move {
            herd.once_with(
                "stolen",
                &LockOptions::new().ttl(Duration::from_millis(300)),
                move || async move {
                    let _ = started_tx.send(());
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    f.store(true, Ordering::SeqCst);
                    Ok(())
                },
            )
            .await
        }
    });
    started_rx.await.expect("work started");
    // Another holder takes the key over behind the holder's back.
    server.cmd(&[
        "SET",
        &format!("{prefix}:{{stolen}}:lock"),
        "999:x:thief",
        "PX",
        "30000",
    ]);
    let e = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .expect("work cancelled promptly")
        .expect("task")
        .expect_err("lock lost");
    assert!(e.is_lock_lost(), "{e:?}");
    assert!(!finished.load(Ordering::SeqCst));
    // The thief's lock was left alone.
    assert_eq!(
        server.cmd(&["GET", &format!("{prefix}:{{stolen}}:lock")]),
        "999:x:thief"
    );
}
