//! Issue 9: the server and the user are checked at connect. An evicting server is refused
//! (unless the user opts out); a user without the rights herdlock needs is refused with a
//! message naming them, with no reconnect storm; a user restricted to exactly the
//! documented least-privilege rule runs the smoke set; a right revoked while running fails
//! a step without leaving it half done.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use herdlock::{Error, ErrorKind, FanoutOptions, Herd, SemaphoreOptions};

use crate::common::server::{unique_prefix, RedisServer, ServerConfig};
use crate::fixture::within;
use crate::smoke;

const PASSWORD: &str = "s3cret-pass";

/// The least-privilege rule exactly as README.md documents it, for `prefix`: the
/// arguments after `ACL SETUSER <user> reset >PASSWORD` (which [`RedisServer::acl_user`]
/// adds itself).
fn least_privilege(prefix: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("ACL SETUSER herdlock reset on >PASSWORD "))
        .expect("README.md documents the least-privilege ACL rule");
    line.split_whitespace()
        .skip(3) // ACL SETUSER herdlock
        .filter(|w| *w != "reset" && *w != ">PASSWORD")
        .map(|w| w.replace("herdlock:*", &format!("{prefix}:*")))
        .collect()
}

/// The least-privilege rule without the rules `drop`, plus `add`.
fn rule_without(prefix: &str, drop: &[&str], add: &[&str]) -> Vec<String> {
    let mut rule: Vec<String> = least_privilege(prefix)
        .into_iter()
        .filter(|r| !drop.contains(&r.as_str()))
        .collect();
    rule.extend(add.iter().map(|r| (*r).to_owned()));
    rule
}

fn user(server: &RedisServer, name: &str, rule: &[String]) -> String {
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    server.acl_user(name, PASSWORD, &rule)
}

fn builder(prefix: &str) -> herdlock::Builder {
    Herd::builder()
        .prefix(prefix)
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(2))
}

async fn connect(url: &str, prefix: &str) -> Result<Herd, Error> {
    builder(prefix).connect(url).await
}

fn expect_refusal(result: Result<Herd, Error>, kind: ErrorKind, what: &str) -> Error {
    match result {
        Ok(_) => panic!("{what}: connect succeeded, expected {kind:?}"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{what}: {e}");
            assert!(!e.message().ends_with('.'), "{what}: {e}");
            e
        }
    }
}

/// Polls until the server has only `n` clients besides the `redis-cli` that asks: what a
/// refused connect left behind is gone.
fn wait_clients(server: &RedisServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let clients = server
            .cmd(&["INFO", "clients"])
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("connected_clients:"))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("INFO clients has connected_clients");
        if clients <= n + 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} clients still connected",
            clients - 1
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// Eviction
// ---------------------------------------------------------------------------------------

fn server_with_policy(policy: &str) -> RedisServer {
    RedisServer::start_with(ServerConfig {
        extra_args: vec!["--maxmemory-policy".to_owned(), policy.to_owned()],
        ..ServerConfig::default()
    })
}

/// Issue 9, test 3: every evicting policy is refused by `connect` (and by a lazy herd's
/// first call) with a message that says why and how to fix it; nothing keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_policies_are_refused_at_connect() {
    for policy in ["allkeys-lru", "volatile-lru", "volatile-ttl", "allkeys-lfu"] {
        let server = server_with_policy(policy);
        let prefix = unique_prefix("evict");
        let started = Instant::now();
        let e = expect_refusal(
            connect(&server.url(), &prefix).await,
            ErrorKind::ServerConfig,
            policy,
        );
        let took = started.elapsed();
        let message = e.message();
        for needle in [
            &format!("maxmemory-policy is `{policy}`"),
            "evict a held lock",
            "second holder",
            "CONFIG SET maxmemory-policy noeviction",
            "Builder::allow_eviction(true)",
        ] {
            assert!(message.contains(needle), "{policy}: {message}");
        }
        eprintln!("{policy}: refused in {took:?}");
        assert!(took < Duration::from_secs(2), "{policy}: took {took:?}");
        wait_clients(&server, 0);

        let lazy = builder(&prefix).connect_lazy(&server.url()).expect("lazy");
        let e = lazy
            .try_lock("k")
            .await
            .expect_err("lazy herd on an evicting server");
        assert_eq!(e.kind(), ErrorKind::ServerConfig, "{policy} (lazy): {e}");
        assert!(
            server.keys_under(&prefix).is_empty(),
            "{policy}: wrote keys"
        );
    }
}

/// Issue 9, test 3: `noeviction` passes, and `allow_eviction(true)` lets a herd run on
/// an evicting server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noeviction_passes_and_the_opt_out_works() {
    let server = server_with_policy("noeviction");
    let herd = connect(&server.url(), &unique_prefix("noevict"))
        .await
        .expect("noeviction is fine");
    let guard = herd.try_lock("k").await.expect("try_lock").acquired();
    guard.expect("free").release().await.expect("release");

    let server = server_with_policy("allkeys-lru");
    let herd = builder(&unique_prefix("optout"))
        .allow_eviction(true)
        .connect(&server.url())
        .await
        .expect("allow_eviction(true) accepts an evicting server");
    let guard = herd.try_lock("k").await.expect("try_lock").acquired();
    guard.expect("free").release().await.expect("release");
}

/// Issue 9: the policy is read from `INFO memory`, else `CONFIG GET`; a user allowed
/// neither is not refused, and gets exactly one `warn`.
#[tokio::test(flavor = "current_thread")]
async fn eviction_policy_is_read_from_info_or_config_else_warned() {
    let server = server_with_policy("allkeys-lru");
    let prefix = unique_prefix("evict-read");
    let info_only = user(&server, "info-only", &least_privilege(&prefix));
    let config_only = user(
        &server,
        "config-only",
        &rule_without(&prefix, &["+info|memory"], &["+config|get"]),
    );
    let neither = user(
        &server,
        "neither",
        &rule_without(&prefix, &["+info|memory"], &[]),
    );
    for (what, url) in [("INFO", &info_only), ("CONFIG GET", &config_only)] {
        expect_refusal(connect(url, &prefix).await, ErrorKind::ServerConfig, what);
    }

    let warnings = Arc::new(Mutex::new(Vec::new()));
    let herd = {
        let _capture = tracing::subscriber::set_default(Warnings(Arc::clone(&warnings)));
        connect(&neither, &prefix)
            .await
            .expect("a user who cannot read the policy is not refused")
    };
    let warnings = warnings.lock().expect("warnings").clone();
    let about_policy: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("maxmemory-policy"))
        .collect();
    assert_eq!(about_policy.len(), 1, "{warnings:?}");
    assert!(about_policy[0].contains("noeviction"), "{warnings:?}");
    drop(herd);
}

/// Records the message of every `warn` and `error` event on this thread.
struct Warnings(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Warnings {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                let _ = write!(self.0, "{}={value:?} ", field.name());
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0.lock().expect("warnings").push(message.0);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

// ---------------------------------------------------------------------------------------
// Least privilege
// ---------------------------------------------------------------------------------------

/// Issue 9, test 4: a user restricted to exactly the README's least-privilege rule runs
/// the smoke set (fan-out across two herds, lock, once, multi, unfair and fair
/// semaphores, status), every wake-up by pub/sub (well before the 30 s TTLs), and the
/// server refuses it nothing but the `ACL DRYRUN` the connect check tries first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_user_runs_the_smoke_set() {
    let server = RedisServer::start();
    let prefix = unique_prefix("least-priv");
    let url = user(&server, "app", &least_privilege(&prefix));
    let a = builder(&prefix).owner("a").connect(&url).await.expect("a");
    let b = builder(&prefix).owner("b").connect(&url).await.expect("b");
    let subscribed = |key: &str| server.subscribers(&smoke::channel(&prefix, key)) >= 1;
    smoke::fanout(&a, &b).await;
    smoke::lock(&a, &b, subscribed).await;
    smoke::once(&a, &b).await;
    smoke::multi(&a, &b, subscribed).await;
    smoke::semaphore(&a, &b, false, subscribed).await;
    smoke::semaphore(&a, &b, true, subscribed).await;

    // Refused: nothing but the connect check's `ACL DRYRUN` (and, on servers that have it,
    // the `CLIENT SETINFO` redis-rs sends on every connect and ignores when refused).
    let acl_log = server.cmd(&["ACL", "LOG"]);
    let objects: Vec<&str> = acl_log
        .lines()
        .zip(acl_log.lines().skip(1))
        .filter(|(name, _)| *name == "object")
        .map(|(_, value)| value)
        .collect();
    assert!(
        !objects.is_empty(),
        "the ACL DRYRUN refusal is missing:\n{acl_log}"
    );
    assert!(
        objects
            .iter()
            .all(|o| *o == "acl|dryrun" || *o == "client|setinfo"),
        "refused: {objects:?}\n{acl_log}"
    );
    // Nothing is left (the probe's keys are gone again, and no key lives forever).
    drop((a, b));
    let deadline = Instant::now() + smoke::QUICK;
    while !server.keys_under(&prefix).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left: {:?}",
            server.keys_under(&prefix)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Missing rights
// ---------------------------------------------------------------------------------------

/// Issue 9, test 4: users without channel rights, without SUBSCRIBE or without PUBLISH
/// are refused at connect (eager and lazy) with an error naming what is missing, whether
/// the check could use `ACL DRYRUN` (users with `+@all`) or had to probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_rights_are_refused_at_connect() {
    let server = RedisServer::start();
    let prefix = unique_prefix("rights");
    let keys = format!("~{prefix}:*");
    let all = |extra: &[&str]| {
        let mut rule = vec!["on".to_owned(), keys.clone(), "+@all".to_owned()];
        rule.extend(extra.iter().map(|r| (*r).to_owned()));
        rule
    };
    let grant = |name: &str, rights: &str| format!("grant them with `ACL SETUSER {name} {rights}`");
    let channels = format!("&{prefix}:*");
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        // Probed: the least-privilege rule minus one right.
        (
            "probe-nochannels",
            rule_without(&prefix, &[&channels], &[]),
            vec![
                "`subscribe` (no access to channels".to_owned(),
                "`publish` (no access to channels".to_owned(),
                grant("probe-nochannels", &channels),
            ],
        ),
        (
            "probe-nosubscribe",
            rule_without(&prefix, &["+subscribe"], &[]),
            vec![
                "`subscribe` (command not allowed)".to_owned(),
                grant("probe-nosubscribe", "+subscribe"),
            ],
        ),
        (
            "probe-nopublish",
            rule_without(&prefix, &["+publish"], &[]),
            vec![
                "`publish` (command not allowed)".to_owned(),
                grant("probe-nopublish", "+publish"),
            ],
        ),
        // Dry-run: everything but channels (Redis 7's default for a new user) or one command.
        (
            "dryrun-nochannels",
            all(&["resetchannels"]),
            vec![
                "`subscribe` (no access to channels".to_owned(),
                "`publish` (no access to channels".to_owned(),
                grant("dryrun-nochannels", &channels),
            ],
        ),
        (
            "dryrun-nosubscribe",
            all(&["allchannels", "-subscribe"]),
            vec![
                "`subscribe` (command not allowed)".to_owned(),
                grant("dryrun-nosubscribe", "+subscribe"),
            ],
        ),
        (
            "dryrun-nopublish",
            all(&["allchannels", "-publish"]),
            vec![
                "`publish` (command not allowed)".to_owned(),
                grant("dryrun-nopublish", "+publish"),
            ],
        ),
    ];
    for (name, rule, needles) in cases {
        let url = user(&server, name, &rule);
        let started = Instant::now();
        let e = expect_refusal(connect(&url, &prefix).await, ErrorKind::Permission, name);
        let took = started.elapsed();
        eprintln!("{name}: refused in {took:?}: {e}");
        assert!(took < Duration::from_secs(2), "{name}: took {took:?}");
        let message = e.message();
        assert!(
            message.contains(&format!("redis user `{name}`")),
            "{name}: {message}"
        );
        for needle in &needles {
            assert!(
                message.contains(needle.as_str()),
                "{name}: no {needle:?} in {message}"
            );
        }
        assert!(
            message.contains("the least-privilege rule"),
            "{name}: {message}"
        );

        let lazy = builder(&prefix).connect_lazy(&url).expect("lazy");
        let e = lazy
            .try_lock("k")
            .await
            .expect_err("lazy herd without the rights");
        assert_eq!(e.kind(), ErrorKind::Permission, "{name} (lazy): {e}");
    }
    assert!(
        server.keys_under(&prefix).is_empty(),
        "{:?}",
        server.keys_under(&prefix)
    );
    wait_clients(&server, 0);
}

/// Issue 9, test 4: no reconnect storm. A refused connect leaves nothing running, and a
/// refused lazy herd called in a tight loop for 5 s repeats its refusal instead of asking
/// Redis again (it re-checks once every 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_users_cause_no_reconnect_storm() {
    let server = RedisServer::start();
    let prefix = unique_prefix("storm");
    let url = user(
        &server,
        "nochannels",
        &rule_without(&prefix, &[&format!("&{prefix}:*")], &[]),
    );
    let before = server.connections_received();
    let e = connect(&url, &prefix).await.expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Permission);
    let lazy = builder(&prefix).connect_lazy(&url).expect("lazy");
    let window = Instant::now();
    let mut calls = 0u32;
    while window.elapsed() < Duration::from_secs(5) {
        let e = lazy.try_lock("k").await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::Permission, "{e}");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let connections = server.connections_received() - before - 1;
    let checks = server.command_calls(&["script|load"]);
    eprintln!(
        "refused eager connect + lazy herd called {calls} times in 5 s: {connections} connections, {checks} checks"
    );
    // Eager: 2 connections. Lazy: command + pub/sub listener + one probe pub/sub per
    // check (one at the start, one after 5 s).
    assert!(connections <= 8, "{connections} connections in 5 s");
    assert!(checks <= 3, "{checks} checks in 5 s");
    drop(lazy);
    wait_clients(&server, 0);
}

/// Issue 9: a channel right revoked while a waiter waits. Redis closes the pub/sub
/// connection; its re-SUBSCRIBE is refused, and the Notifier backs off (100 ms doubling
/// to 5 s) instead of reconnecting in a tight loop. Once the right is back, it
/// re-subscribes and the waiter is woken by pub/sub again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_channel_right_backs_off_instead_of_storming() {
    let server = RedisServer::start();
    let prefix = unique_prefix("revoke-channels");
    let holder = connect(&server.url(), &prefix).await.expect("holder");
    let url = user(&server, "waiter", &least_privilege(&prefix));
    let waiter = connect(&url, &prefix).await.expect("waiter");
    let long = herdlock::LockOptions::new().ttl(Duration::from_secs(60));
    let guard = holder
        .lock_with("k", Duration::from_secs(5), &long)
        .await
        .expect("lock");
    let channel = format!("{prefix}:{{k}}");
    let task = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.lock("k", Duration::from_secs(50)).await }
    });
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));

    let before = server.connections_received();
    server.cmd(&["ACL", "SETUSER", "waiter", "resetchannels"]);
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reconnects = server.connections_received() - before - 1;
    eprintln!("channel right revoked: {reconnects} reconnects in 5 s");
    assert!(reconnects <= 10, "{reconnects} reconnects in 5 s");
    assert!(reconnects >= 1, "the pub/sub connection never reconnected");
    assert!(!task.is_finished(), "the waiter gave up");

    let pattern = format!("&{prefix}:*");
    server.cmd(&["ACL", "SETUSER", "waiter", &pattern]);
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));
    let released = Instant::now();
    guard.release().await.expect("release");
    let got = within(Duration::from_secs(10), "waiter", task)
        .await
        .expect("task")
        .expect("lock");
    eprintln!(
        "after the right came back, woken {:?} after the release",
        released.elapsed()
    );
    assert!(released.elapsed() < Duration::from_secs(5));
    got.release().await.expect("release");
}

// ---------------------------------------------------------------------------------------
// Nothing half done
// ---------------------------------------------------------------------------------------

/// Waiters that give up mark these held locks as waited for (acquire.lua), so releasing
/// them must publish a notice (a release nobody waits for publishes nothing).
async fn mark_waited(herd: &Herd, keys: &[&str]) {
    for key in keys {
        let e = herd
            .lock(key, Duration::from_millis(100))
            .await
            .expect_err("held");
        assert!(e.is_timeout(), "{e}");
    }
}

/// Issue 9: PUBLISH revoked after connect (the check cannot be skipped, so the right is
/// taken away later). Release, multi-release, a multi-extend that releases, a permit
/// release and a fan-out completion each fail (the completion's failure reaches only the
/// log) and leave everything held: nothing is deleted behind an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_leaves_nothing_half_done() {
    let server = RedisServer::start();
    let prefix = unique_prefix("half-done");
    let url = user(&server, "app", &least_privilege(&prefix));
    let herd = connect(&url, &prefix).await.expect("connect");
    let long = herdlock::LockOptions::new().ttl(Duration::from_secs(60));
    let long_multi = herdlock::MultiOptions::new().ttl(Duration::from_secs(60));
    let lock = herd
        .try_lock_with("l", &long)
        .await
        .expect("try_lock")
        .acquired()
        .expect("free");
    let multi = herd
        .try_multi_with(&["m1", "m2"], &long_multi)
        .await
        .expect("try_multi")
        .acquired()
        .expect("free");
    let extended = herd
        .try_multi_with(&["e1", "e2"], &long_multi)
        .await
        .expect("try_multi")
        .acquired()
        .expect("free");
    let sem = herd
        .semaphore_with(
            "s",
            2,
            &SemaphoreOptions::new().lease(Duration::from_secs(60)),
        )
        .expect("semaphore");
    let permit = sem
        .try_acquire()
        .await
        .expect("try")
        .acquired()
        .expect("free");
    mark_waited(&herd, &["l", "m1", "m2", "e2"]).await;
    let (revoked_tx, revoked_rx) = tokio::sync::oneshot::channel::<()>();
    let fanout = tokio::spawn({
        let herd = herd.clone();
        let options = FanoutOptions::new().ttl(Duration::from_secs(60));
        async move {
            herd.fanout_with("f", Duration::from_secs(30), &options, move || async move {
                let _ = revoked_rx.await;
                Ok(7u32)
            })
            .await
        }
    });
    let lock_key = |key: &str| format!("{prefix}:{{{key}}}:lock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.cmd(&["EXISTS", &lock_key("f")]) != "1" {
        assert!(Instant::now() < deadline, "the fan-out run never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    server.cmd(&["ACL", "SETUSER", "app", "-publish"]);

    let e = lock.release().await.expect_err("release without PUBLISH");
    assert_eq!(e.kind(), ErrorKind::Permission, "{e}");
    assert_eq!(server.cmd(&["EXISTS", &lock_key("l")]), "1", "lock deleted");

    let e = multi
        .release()
        .await
        .expect_err("multi release without PUBLISH");
    assert_eq!(e.kind(), ErrorKind::Permission, "{e}");
    for key in ["m1", "m2"] {
        assert_eq!(
            server.cmd(&["EXISTS", &lock_key(key)]),
            "1",
            "{key} deleted"
        );
    }

    // An extend that finds one key lost releases the others, which publishes first.
    server.cmd(&["DEL", &lock_key("e1")]);
    let e = extended
        .extend(Duration::from_secs(60))
        .await
        .expect_err("extend without PUBLISH");
    assert_eq!(e.kind(), ErrorKind::Permission, "{e}");
    assert_eq!(server.cmd(&["EXISTS", &lock_key("e2")]), "1", "e2 deleted");

    let e = permit
        .release()
        .await
        .expect_err("permit release without PUBLISH");
    assert_eq!(e.kind(), ErrorKind::Permission, "{e}");
    let sem_key = format!("{prefix}:{{s}}:sem");
    assert_eq!(server.cmd(&["ZCARD", &sem_key]), "1", "permit given back");

    let _ = revoked_tx.send(());
    let fanned = within(Duration::from_secs(30), "fan-out leader", fanout)
        .await
        .expect("task");
    eprintln!("fan-out leader after a refused completion: {fanned:?}");
    assert_eq!(
        server.cmd(&["EXISTS", &lock_key("f")]),
        "1",
        "run's lock deleted"
    );
    let result_key = format!("{prefix}:{{f}}:result");
    assert_eq!(server.cmd(&["EXISTS", &result_key]), "0", "result stored");
}

/// Issue 9: the completion script under `maxmemory` (noeviction, full): refused before it
/// publishes anything, the lock untouched and no result stored. Release, whose only
/// write is a DEL, still works on a full server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_refuses_a_completion_before_it_publishes() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe("ch").await.expect("subscribe");
    // Marked as waited for (acquire.lua), so that the release publishes a notice.
    let holder = "1:nonce:60000:1:owner";
    let token = "1:nonce";
    server.cmd(&["SET", "{j}:lock", holder, "PX", "60000"]);
    server.cmd(&["CONFIG", "SET", "maxmemory", "1"]);

    let complete = redis::Script::new(include_str!("../src/scripts/complete.lua"));
    let refused = complete
        .key("{j}:lock")
        .key("{j}:result")
        .arg(token)
        .arg("envelope")
        .arg(5000)
        .arg("ch")
        .arg(1)
        .invoke_async::<i64>(&mut conn)
        .await
        .expect_err("complete on a full server");
    assert!(refused.to_string().contains("OOM"), "{refused}");
    // PUBLISH is not refused for memory: a sentinel published after the script arrives
    // first, so the script published nothing.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("ch")
        .arg("sentinel")
        .query_async(&mut conn)
        .await
        .expect("publish");
    let mut messages = pubsub.on_message();
    let first = within(Duration::from_secs(5), "sentinel", messages.next())
        .await
        .expect("message");
    assert_eq!(first.get_payload::<String>().expect("payload"), "sentinel");
    assert_eq!(server.cmd(&["GET", "{j}:lock"]), holder);
    assert_eq!(server.cmd(&["EXISTS", "{j}:result"]), "0");

    let release = redis::Script::new(include_str!("../src/scripts/release.lua"));
    let released: i64 = release
        .key("{j}:lock")
        .arg(token)
        .arg(0)
        .arg("ch")
        .invoke_async(&mut conn)
        .await
        .expect("release on a full server");
    assert_eq!(released, 1);
    let notice = within(Duration::from_secs(5), "released notice", messages.next())
        .await
        .expect("message");
    assert_eq!(notice.get_payload::<String>().expect("payload"), "released");
    assert_eq!(server.cmd(&["EXISTS", "{j}:lock"]), "0");
    server.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
}

/// Issue 12: an error Redis returns says what Redis said, code and message: `OOM` on a full
/// server (noeviction), a script error (`WRONGTYPE` under a herdlock key), `NOPERM` for a
/// right revoked while running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_errors_carry_the_servers_reply() {
    let server = RedisServer::start();
    let prefix = unique_prefix("server-said");
    let url = user(&server, "app", &least_privilege(&prefix));
    let herd = connect(&url, &prefix).await.expect("connect");

    // A full server: the acquire script's first write is refused.
    server.cmd(&["CONFIG", "SET", "maxmemory", "1"]);
    let e = herd.try_lock("full").await.expect_err("OOM");
    server.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_eq!(e.kind(), ErrorKind::Redis, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("during acquire") && text.contains("OOM") && text.contains("maxmemory"),
        "{text}"
    );

    // A script error: a value of the wrong type under a semaphore's key.
    server.cmd(&["SET", &format!("{prefix}:{{s}}:sem"), "not a zset"]);
    let sem = herd.semaphore("s", 2).expect("semaphore");
    let e = sem.try_acquire().await.expect_err("WRONGTYPE");
    assert_eq!(e.kind(), ErrorKind::Redis, "{e}");
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");

    // A right revoked: EVALSHA is refused before any script runs.
    server.cmd(&["ACL", "SETUSER", "app", "-evalsha"]);
    let e = herd.try_lock("revoked").await.expect_err("NOPERM");
    assert_eq!(e.kind(), ErrorKind::Permission, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("NOPERM") && text.contains("evalsha"),
        "{text}"
    );
}
