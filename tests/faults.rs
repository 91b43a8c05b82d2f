//! Real faults against a real Redis: a killed and restarted server, killed pub/sub
//! connections, a paused server, bad credentials, garbage on the channels. Each test that
//! breaks its server gets a private one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd, LockOptions};

use crate::common::server::{self, RedisServer, ServerConfig};
use crate::fixture::within;

async fn herd_on(server: &RedisServer, owner: &str) -> Herd {
    Herd::builder()
        .prefix(server::unique_prefix(owner))
        .owner(owner)
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_secs(1))
        .connect(&server.url())
        .await
        .expect("connect")
}

/// Issue 2, test 8: server killed, calls fail fast with a connection error; restarted on
/// the same port, calls succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted() {
    let mut server = RedisServer::start();
    let herd = Herd::builder()
        .owner("survivor")
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_secs(1))
        .connect(&server.url())
        .await
        .expect("connect");
    herd.try_lock("k")
        .await
        .expect("works")
        .acquired()
        .expect("free")
        .release()
        .await
        .expect("release");
    server.stop();
    for attempt in 0..3 {
        let started = Instant::now();
        let e = herd.try_lock("k").await.expect_err("redis is down");
        assert!(e.is_connection(), "attempt {attempt}: {e:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
    }
    let started = Instant::now();
    let e = herd
        .lock("k", Duration::from_secs(10))
        .await
        .expect_err("down");
    assert!(e.is_connection(), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    let e = herd
        .fanout("job", Duration::from_secs(10), || async { Ok(1) })
        .await
        .expect_err("down");
    assert!(e.is_connection(), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(8));

    server.restart();
    // The command connection reconnects on the first call after the restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    let guard = loop {
        match herd.try_lock("k").await {
            Ok(t) => break t.acquired().expect("free after restart"),
            Err(e) => {
                assert!(e.is_connection(), "{e:?}");
                assert!(Instant::now() < deadline, "never reconnected: {e:?}");
            }
        }
    };
    guard.release().await.expect("release");
    assert_eq!(
        herd.fanout("job", Duration::from_secs(5), || async { Ok(2) })
            .await
            .expect("fanout after restart"),
        2
    );
}

/// Issue 2, test 8: the first call after a restart succeeds outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_call_after_restart_succeeds() {
    let mut server = RedisServer::start();
    let herd = herd_on(&server, "next-call").await;
    herd.try_lock("k")
        .await
        .expect("works")
        .acquired()
        .expect("free")
        .release()
        .await
        .expect("release");
    server.stop();
    server.restart();
    let guard = herd
        .try_lock("k")
        .await
        .expect("first call after restart")
        .acquired()
        .expect("free");
    guard.release().await.expect("release");
}

/// Issue 2, test 8: `CLIENT KILL TYPE pubsub` while a waiter waits; the release still
/// wakes it, long before the 30 s TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_killed_while_waiting() {
    let server = RedisServer::start();
    let holder = herd_on(&server, "holder").await;
    let waiter = Herd::builder()
        .prefix(holder.prefix())
        .owner("waiter")
        .connect(&server.url())
        .await
        .expect("connect");
    let long = LockOptions::new().ttl(Duration::from_secs(30));
    let guard = holder
        .lock_with("k", Duration::from_secs(1), &long)
        .await
        .expect("lock");
    let task = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            waiter
                .lock("k", Duration::from_secs(25))
                .await
                .map(|g| (g, Instant::now()))
        }
    });
    let channel = format!("{}:{{k}}", holder.prefix());
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));
    let killed = server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(
        killed.trim().parse::<u32>().unwrap_or(0) >= 1,
        "killed: {killed}"
    );
    // The notifier reconnects and re-subscribes.
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));
    let released = Instant::now();
    guard.release().await.expect("release");
    let (got, at) = within(Duration::from_secs(10), "waiter", task)
        .await
        .expect("task")
        .expect("lock");
    assert!(at.duration_since(released) < Duration::from_secs(3));
    got.release().await.expect("release");
}

/// Issue 2, test 8: a wrong password is an auth error, not "busy" and not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_auth_error() {
    let server = RedisServer::start_with(ServerConfig {
        password: Some("s3cret".into()),
        ..ServerConfig::default()
    });
    let started = Instant::now();
    let e = Herd::connect(&server.url_with_password("wrong"))
        .await
        .expect_err("wrong password");
    assert_eq!(e.kind(), ErrorKind::Auth, "{e:?}");
    // Disjoint predicates: refused credentials are not a connection failure.
    assert!(e.is_auth() && !e.is_connection(), "{e:?}");
    let text = e.to_string().to_lowercase();
    assert!(text.contains("authentication failed"), "what failed: {e}");
    let port = server.port();
    let e = Herd::connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .expect_err("no password");
    assert_eq!(e.kind(), ErrorKind::Auth, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let herd = Herd::connect(&server.url()).await.expect("right password");
    herd.try_lock("k")
        .await
        .expect("works")
        .acquired()
        .expect("free")
        .release()
        .await
        .expect("release");

    // The lazy form reports the same error from the first call.
    let lazy = Herd::builder()
        .connect_lazy(&server.url_with_password("wrong"))
        .expect("url is fine");
    let e = lazy
        .try_lock("k")
        .await
        .expect_err("auth fails on first use");
    assert_eq!(e.kind(), ErrorKind::Auth, "{e:?}");
}

/// Nothing listens: a connection error within the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_connection_error() {
    let port = server::free_port();
    let started = Instant::now();
    let e = Herd::builder()
        .connect_timeout(Duration::from_millis(500))
        .connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .expect_err("nothing listens");
    assert_eq!(e.kind(), ErrorKind::Connection, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Issue 3, test 9: garbage and forged envelopes on a job's channel are never accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_channel_is_ignored() {
    let server = server::shared();
    let prefix = server::unique_prefix("garbage");
    let leader = Herd::builder()
        .prefix(prefix.clone())
        .owner("leader")
        .connect(&server.url())
        .await
        .expect("connect");
    let follower = Herd::builder()
        .prefix(prefix.clone())
        .owner("follower")
        .connect(&server.url())
        .await
        .expect("connect");
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let lead = tokio::spawn({
        let leader = leader.clone();
        async move {
            leader
                .fanout("g", Duration::from_secs(20), move || async move {
                    let _ = go_rx.await;
                    Ok("real".to_owned())
                })
                .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let holder = loop {
        if let Some(h) = leader.lock_status("g").await.expect("status").holder {
            break h;
        }
        assert!(Instant::now() < deadline, "leader never started");
        tokio::task::yield_now().await;
    };
    let follow = tokio::spawn({
        let follower = follower.clone();
        async move {
            follower
                .fanout("g", Duration::from_secs(20), || async {
                    Ok("mine".to_owned())
                })
                .await
        }
    });
    let channel = format!("{prefix}:{{g}}");
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));
    let generation = holder.fence.get();
    let forged = |generation: u64, token: &str, payload: &[u8]| {
        let mut bytes = b"HLE1\x00\x01".to_vec();
        bytes.extend_from_slice(&generation.to_be_bytes());
        bytes.extend_from_slice(&u16::try_from(token.len()).expect("short").to_be_bytes());
        bytes.extend_from_slice(token.as_bytes());
        bytes.extend_from_slice(payload);
        bytes
    };
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let messages: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"garbage".to_vec(),
        b"HLE1".to_vec(),
        vec![0xff; 300],
        b"released".to_vec(),
        forged(generation, "not-the-token", b"\"forged\""),
        forged(generation - 1, "old", b"\"stale\""),
        forged(generation + 7, "future", b"\"future\""),
        forged(generation, "", b"\"forged\""),
    ];
    for message in &messages {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(message.as_slice())
            .query_async(&mut conn)
            .await
            .expect("publish");
    }
    // Every forged message only made the follower re-check; it is still waiting.
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));
    assert!(!follow.is_finished(), "follower accepted a forged message");
    let _ = go_tx.send(());
    for task in [lead, follow] {
        let value = within(Duration::from_secs(10), "caller", task)
            .await
            .expect("task")
            .expect("fanout");
        assert_eq!(value, "real");
    }
}

/// Issue 3, test 3: 10,000 concurrent callers of one key in one process cost the same
/// Redis commands as one caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_do_not_grow_with_callers() {
    let server = RedisServer::start();
    let herd = herd_on(&server, "counted").await;
    // Warm up: scripts loaded, connections made.
    herd.fanout("warm", Duration::from_secs(5), || async { Ok(0) })
        .await
        .expect("warm");
    let mut deltas = Vec::new();
    for (round, callers) in [(0, 1usize), (1, 10_000)] {
        let runs = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let before = counted_calls(&server);
        let mut tasks = Vec::with_capacity(callers);
        for _ in 0..callers {
            let herd = herd.clone();
            let runs = Arc::clone(&runs);
            let mut go_rx = go_rx.clone();
            tasks.push(tokio::spawn(async move {
                herd.fanout(
                    &format!("counted-{round}"),
                    Duration::from_secs(30),
                    move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        // Finish only once every caller has joined the run.
                        let _ = go_rx.wait_for(|go| *go).await;
                        Ok(7)
                    },
                )
                .await
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while herd.stats().waiting < callers {
            assert!(Instant::now() < deadline, "callers never joined");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        go_tx.send_replace(true);
        for task in tasks {
            assert_eq!(task.await.expect("task").expect("fanout"), 7);
        }
        let after = counted_calls(&server);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let delta: std::collections::BTreeMap<String, u64> = after
            .into_iter()
            .map(|(cmd, n)| {
                let was = before.get(&cmd).copied().unwrap_or(0);
                (cmd, n - was)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        deltas.push(delta);
    }
    assert_eq!(
        deltas[0], deltas[1],
        "commands for 1 caller vs 10,000: {deltas:?}"
    );
}

/// Calls per command so far, less those that do not depend on the callers: `INFO` (this
/// measurement), `TIME` (the clock probe, every 100 ms while fan-out is in use),
/// `UNSUBSCRIBE` (the sweep of channels idle for a second) and `CLIENT SETINFO` (sent by
/// redis-rs when a connection is made, on servers that have it).
fn counted_calls(server: &RedisServer) -> std::collections::BTreeMap<String, u64> {
    let mut calls = crate::protocol_v2::command_stats(server);
    calls.retain(|name, _| {
        !matches!(
            name.as_str(),
            "info" | "time" | "unsubscribe" | "client|setinfo"
        )
    });
    calls
}

/// DESIGN invariant 6: a paused server and a killed pub/sub connection during a herd;
/// every waiter still resolves with the one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_survives_pause_and_pubsub_kill() {
    let server = RedisServer::start();
    // Command timeouts well above the 1 s pause: a command sent as the pause begins waits
    // it out (Valkey answers it a little after the pause's end), and must not time out.
    let builder = |owner: &str, prefix: String| {
        Herd::builder()
            .prefix(prefix)
            .owner(owner)
            .command_timeout(Duration::from_secs(5))
    };
    let a = builder("a", server::unique_prefix("a"))
        .connect(&server.url())
        .await
        .expect("connect");
    let b = builder("b", a.prefix().to_owned())
        .connect(&server.url())
        .await
        .expect("connect");
    let runs = Arc::new(AtomicUsize::new(0));
    let options = FanoutOptions::new().ttl(Duration::from_secs(5));
    let mut tasks = Vec::new();
    for (i, node) in [a.clone(), b.clone(), b.clone()].into_iter().enumerate() {
        let (runs, options) = (runs.clone(), options.clone());
        tasks.push(tokio::spawn(async move {
            node.fanout_with(
                "paused",
                Duration::from_secs(15),
                &options,
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok(format!("from {i}"))
                },
            )
            .await
        }));
    }
    let channel = format!("{}:{{paused}}", a.prefix());
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));
    server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    server.cmd(&["CLIENT", "PAUSE", "1000"]);
    let mut values = Vec::new();
    for task in tasks {
        let fanned = within(Duration::from_secs(20), "caller", task)
            .await
            .expect("task")
            .expect("fanout");
        values.push(fanned.value);
    }
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Subscriptions are shared and kept warm: a second wait on a hot key costs no SUBSCRIBE,
/// and a channel nobody listens to is unsubscribed by the sweep a little later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_channels_skip_subscribe_and_idle_ones_are_swept() {
    let server = RedisServer::start();
    let holder = herd_on(&server, "holder").await;
    let waiter = Herd::builder()
        .prefix(holder.prefix())
        .owner("waiter")
        .connect(&server.url())
        .await
        .expect("connect");
    let channel = format!("{}:{{hot}}", holder.prefix());
    let long = LockOptions::new().ttl(Duration::from_secs(30));
    let mut subscribes = Vec::new();
    for _ in 0..3 {
        let guard = holder
            .lock_with("hot", Duration::from_secs(1), &long)
            .await
            .expect("lock");
        let before = server.command_calls(&["evalsha"]);
        let task = tokio::spawn({
            let waiter = waiter.clone();
            async move { waiter.lock("hot", Duration::from_secs(20)).await }
        });
        // The waiter is waiting once it has tried twice: before and after subscribing.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.command_calls(&["evalsha"]) < before + 2 {
            assert!(Instant::now() < deadline, "waiter never reached its wait");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        guard.release().await.expect("release");
        let got = within(Duration::from_secs(10), "waiter", task)
            .await
            .expect("task")
            .expect("lock");
        got.release().await.expect("release");
        subscribes.push(server.command_calls(&["subscribe"]));
    }
    // One SUBSCRIBE for the first wait; the later waits found the channel still confirmed.
    assert_eq!(subscribes[0], subscribes[2], "{subscribes:?}");
    // Nobody waits any more: the sweep unsubscribes within a couple of sweep periods.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.subscribers(&channel) > 0 {
        assert!(Instant::now() < deadline, "idle channel never unsubscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
