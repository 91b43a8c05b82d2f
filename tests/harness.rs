//! Self-tests of the test harness: servers, clusters, Sentinel groups, TLS servers, their
//! faults, and worker processes.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::{
    emit, ready_then_go, shared, tls_or_skip, unique_prefix, worker_param, worker_read_line,
    worker_ready_and_wait_go, worker_role, AuthClients, ClusterConfig, RedisCluster, RedisServer,
    SentinelConfig, SentinelGroup, ServerConfig, Tls, TlsCerts, Worker, STEP_TIMEOUT,
};

/// The test path workers of this module run.
const WORKER_ENTRY: &str = "harness::worker_entry";

#[test]
fn private_server_answers_commands() {
    let server = RedisServer::start();
    assert_eq!(server.cmd(&["PING"]), "PONG");
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    assert!(server.dir().join("redis.log").exists());
    // Fault tests rely on DEBUG being enabled.
    assert_eq!(server.cmd(&["DEBUG", "SLEEP", "0"]), "OK");
    // Several commands on one connection, arguments quoted whatever they hold.
    let odd = "a b\"c\\d\ne'f";
    let replies = server.cmds(&[
        &["SET", odd, "v"],
        &["GET", odd],
        &["CLIENT", "ID"],
        &["CLIENT", "ID"],
    ]);
    let replies: Vec<&str> = replies.lines().collect();
    assert_eq!(replies[..2], ["OK", "v"]);
    assert_eq!(replies[2], replies[3], "one connection");
    assert_eq!(
        server.cmd(&["EXISTS", odd]),
        "1",
        "the key is exactly {odd:?}"
    );
}

#[test]
fn shared_server_is_one_server() {
    assert!(std::ptr::eq(shared(), shared()));
    assert_eq!(shared().cmd(&["PING"]), "PONG");
}

#[test]
fn stop_and_restart_keep_port_and_dir() {
    let mut server = RedisServer::start();
    let port = server.port();
    let dir = server.dir().to_owned();
    let first_pid = server.pid().expect("a started server runs");
    assert_eq!(server.cmd(&["SET", "k", "v"]), "OK");

    server.stop();
    assert_eq!(server.pid(), None);
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
        "a stopped server refuses connections"
    );

    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.dir(), dir);
    assert_ne!(server.pid(), Some(first_pid));
    assert_eq!(server.cmd(&["PING"]), "PONG");
    assert_eq!(
        server.cmd(&["GET", "k"]),
        "",
        "no persistence: a restart loses data"
    );
}

#[test]
fn drop_kills_the_server_and_removes_its_dir() {
    let server = RedisServer::start();
    let port = server.port();
    let dir = server.dir().to_owned();
    drop(server);
    assert!(!dir.exists());
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
}

#[tokio::test]
async fn password_is_required_and_checked() {
    let server = RedisServer::start_with(ServerConfig {
        password: Some("s3cret/pw".to_owned()),
        ..ServerConfig::default()
    });
    assert_eq!(server.cmd(&["PING"]), "PONG");
    assert_eq!(
        server.url(),
        format!("redis://:s3cret%2Fpw@127.0.0.1:{}/", server.port())
    );

    let client = redis::Client::open(server.url()).expect("the URL parses");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("the right password connects");
    let pong: String = redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .expect("PING works");
    assert_eq!(pong, "PONG");

    let wrong = redis::Client::open(server.url_with_password("wrong")).expect("the URL parses");
    assert!(wrong.get_multiplexed_async_connection().await.is_err());
}

#[test]
fn prefixes_are_unique_and_keys_under_finds_them() {
    let server = shared();
    let prefix = unique_prefix("harness::prefixes_are_unique");
    let other = unique_prefix("harness::prefixes_are_unique");
    assert_ne!(prefix, other);
    assert!(!prefix.contains(['{', '}', ':']));

    assert!(server.keys_under(&prefix).is_empty());
    let key = format!("{prefix}:{{job}}:lock");
    server.cmd(&["SET", &key, "1"]);
    server.cmd(&["SET", &format!("{other}:x"), "1"]);
    assert_eq!(server.keys_under(&prefix), vec![key.clone()]);
    server.cmd(&["DEL", &key, &format!("{other}:x")]);
    assert!(server.keys_under(&prefix).is_empty());
}

#[test]
fn worker_echoes_lines() {
    let mut workers = vec![Worker::spawn(
        WORKER_ENTRY,
        "echo",
        &[("greeting", "hello there".to_owned())],
    )];
    ready_then_go(&mut workers, STEP_TIMEOUT);
    let mut worker = workers.pop().expect("one worker");

    assert_eq!(worker.wait_value("greeting", STEP_TIMEOUT), "hello there");
    worker.send_line("ping 42");
    assert_eq!(
        worker.wait_line_prefix("echo ", STEP_TIMEOUT),
        "echo ping 42"
    );
    worker.send_line("bye");

    let output = worker.finish(STEP_TIMEOUT);
    output.assert_success();
    assert_eq!(output.lines, vec![r#"{"done":true}"#]);
}

#[test]
fn killed_worker_dies_by_sigkill() {
    use std::os::unix::process::ExitStatusExt;

    let mut worker = Worker::spawn(WORKER_ENTRY, "hang", &[]);
    worker.wait_line_prefix("ready", STEP_TIMEOUT);
    let status = worker.kill9();
    assert_eq!(status.signal(), Some(9));
    let output = worker.finish(STEP_TIMEOUT);
    assert!(!output.status.success());
}

#[test]
fn workers_share_the_parents_server() {
    let server = shared();
    let prefix = unique_prefix("harness::workers_share_the_parents_server");
    let params = [("url", server.url()), ("prefix", prefix.clone())];
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::spawn(WORKER_ENTRY, "incr", &params))
        .collect();
    ready_then_go(&mut workers, STEP_TIMEOUT);

    let mut seen: Vec<u64> = workers
        .into_iter()
        .map(|worker| {
            let output = worker.finish(STEP_TIMEOUT);
            output.assert_success();
            output.values("incr")[0]
                .parse()
                .expect("the worker prints a number")
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3]);

    let counter = format!("{prefix}:counter");
    assert_eq!(server.cmd(&["GET", &counter]), "3");
    server.cmd(&["DEL", &counter]);
    assert!(server.keys_under(&prefix).is_empty());
}

/// The worker entry of this module: returns at once in a normal test run.
#[test]
fn worker_entry() {
    let Some(role) = worker_role() else {
        return;
    };
    match role.as_str() {
        "echo" => {
            worker_ready_and_wait_go();
            emit(&format!("greeting {}", worker_param("greeting")));
            loop {
                let line = worker_read_line();
                if line == "bye" {
                    break;
                }
                emit(&format!("echo {line}"));
            }
            emit(r#"{"done":true}"#);
        }
        "hang" => {
            emit("ready");
            // Nothing is ever sent: the parent kills this worker.
            worker_read_line();
            unreachable!("the parent sends nothing to a hanging worker");
        }
        "incr" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime can be built");
            runtime.block_on(async {
                let client = redis::Client::open(worker_param("url")).expect("the URL parses");
                let mut connection = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("the parent's server is up");
                worker_ready_and_wait_go();
                let counter = format!("{}:counter", worker_param("prefix"));
                let value: u64 = redis::cmd("INCR")
                    .arg(&counter)
                    .query_async(&mut connection)
                    .await
                    .expect("INCR works");
                emit(&format!("incr {value}"));
            });
        }
        other => panic!("unknown worker role {other:?}"),
    }
}

/// The proxy forwards both ways; a freeze holds bytes without closing anything, a thaw
/// delivers them, a reply-only freeze lets a command apply while its reply waits, and a cut
/// closes every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_freezes_thaws_and_cuts() {
    use crate::common::proxy::{Direction, Proxy};
    use std::time::Duration;

    let server = shared();
    let key = format!("{}:proxied", unique_prefix("proxy_self_test"));
    let proxy = Proxy::start(server);
    assert_ne!(proxy.port(), server.port());
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = redis::Client::open(proxy.url())
        .expect("the proxy URL parses")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connects through the proxy");
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    assert_eq!(proxy.connections(), 1);

    // Frozen: the request is held, nothing reaches the server, the socket stays open.
    proxy.freeze();
    let set = tokio::spawn({
        let (mut conn, key) = (conn.clone(), key.clone());
        async move {
            redis::cmd("SET")
                .arg(&key)
                .arg("v")
                .query_async::<String>(&mut conn)
                .await
        }
    });
    proxy.wait_held(Direction::ToServer, 1, STEP_TIMEOUT).await;
    assert_eq!(server.cmd(&["EXISTS", &key]), "0", "nothing got through");
    assert!(!set.is_finished());
    assert_eq!(proxy.connections(), 1);
    proxy.thaw();
    let reply = tokio::time::timeout(STEP_TIMEOUT, set)
        .await
        .expect("delivered after the thaw")
        .expect("task");
    assert_eq!(reply.expect("SET"), "OK");

    // Replies frozen: the command is applied, its reply is held.
    proxy.freeze_replies();
    let del = tokio::spawn({
        let (mut conn, key) = (conn.clone(), key.clone());
        async move {
            redis::cmd("DEL")
                .arg(&key)
                .query_async::<i64>(&mut conn)
                .await
        }
    });
    proxy.wait_held(Direction::ToClient, 1, STEP_TIMEOUT).await;
    assert_eq!(server.cmd(&["EXISTS", &key]), "0", "the DEL was applied");
    assert!(!del.is_finished());

    // Cut: the held reply is dropped and the connection closes.
    proxy.cut();
    let reply = tokio::time::timeout(STEP_TIMEOUT, del)
        .await
        .expect("the cut ends the call")
        .expect("task");
    let e = reply.expect_err("the connection was cut");
    assert!(e.is_io_error() || e.is_connection_dropped(), "{e:?}");
    proxy.thaw();
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while proxy.connections() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cut closed nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(proxy.held(Direction::ToClient), 0);
    assert_eq!(proxy.accepted(), 1);
}

/// Whether `port` on loopback refuses connections (nothing listens).
fn refuses(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err()
}

/// Polls (bounded) until `done` holds.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Keys `PREFIX:{tagN}:k`, one per master of `cluster`: each master serves one of them.
fn one_key_per_master(cluster: &RedisCluster, prefix: &str) -> Vec<(usize, String)> {
    let masters = cluster.masters();
    let mut keys: Vec<(usize, String)> = Vec::new();
    for n in 0..1000 {
        let key = format!("{prefix}:{{tag{n}}}:k");
        let owner = cluster.master_of_key(&key);
        if !keys.iter().any(|(m, _)| *m == owner) {
            keys.push((owner, key));
        }
        if keys.len() == masters.len() {
            return keys;
        }
    }
    panic!("1000 hash tags did not reach every master");
}

/// A cluster of 3 masters and 3 replicas: ready with every slot served, `redis-cli -c`
/// follows redirects, the slot owner lookup names the master that answers without a
/// redirect, sharded subscriptions are counted on the node that holds them, and dropping the
/// cluster kills every node and removes its dir.
#[test]
fn cluster_starts_routes_and_finds_slot_owners() {
    let cluster = RedisCluster::start();
    eprintln!(
        "harness timing: cluster of 3 masters + 3 replicas ready in {:?}",
        cluster.started_in()
    );
    assert_eq!(cluster.len(), 6);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    assert_eq!(cluster.replicas().len(), 3);
    for &master in &masters {
        assert_eq!(cluster.replicas_of(master).len(), 1);
    }
    assert_eq!(cluster.urls().len(), 6);
    assert!(cluster.urls()[0].starts_with("redis://127.0.0.1:"));
    let mut served = 0_u32;
    for slot in [0, 1, 5460, 5461, 10922, 10923, 16383] {
        assert!(cluster.slot_owner(slot).is_some(), "slot {slot}");
        served += 1;
    }
    assert_eq!(served, 7);

    let prefix = unique_prefix("harness::cluster_starts_routes");
    for (owner, key) in one_key_per_master(&cluster, &prefix) {
        assert_eq!(cluster.cmd(&["SET", &key, "v"]), "OK");
        assert_eq!(cluster.cmd(&["GET", &key]), "v");
        // The owner answers itself; any other master redirects to it.
        assert_eq!(cluster.node(owner).cmd(&["GET", &key]), "v");
        let slot = cluster.keyslot(&key);
        let other = *masters.iter().find(|&&m| m != owner).expect("3 masters");
        assert_eq!(
            cluster.node(other).cmd(&["GET", &key]).trim_end(),
            format!("MOVED {slot} 127.0.0.1:{}", cluster.node(owner).port())
        );
        // A sharded subscription lives on the node it was made on.
        let channel = format!(
            "{prefix}:{{{}}}",
            key.split(['{', '}']).nth(1).expect("tag")
        );
        assert_eq!(cluster.keyslot(&channel), slot);
        let mut subscriber = cluster.node(owner).spawn_cmd(&["SSUBSCRIBE", &channel]);
        wait_until("the SSUBSCRIBE arrives", STEP_TIMEOUT, || {
            cluster.shard_numsub(owner, &channel) == 1
        });
        for (node, count) in cluster.shard_subscribers(&channel) {
            assert_eq!(count, u64::from(node == owner), "node {node}");
        }
        assert_eq!(cluster.cmd(&["SPUBLISH", &channel, "hello"]), "1");
        let _ = subscriber.kill();
        let _ = subscriber.wait();
        assert_eq!(cluster.cmd(&["DEL", &key]), "1");
    }

    let ports: Vec<u16> = (0..cluster.len()).map(|i| cluster.node(i).port()).collect();
    let dirs: Vec<_> = (0..cluster.len())
        .map(|i| cluster.node(i).dir().to_owned())
        .collect();
    drop(cluster);
    for (port, dir) in ports.into_iter().zip(dirs) {
        assert!(refuses(port), "port {port} still answers");
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

/// `kill -9` of the master that owns a key: its replica takes over with the key, the cluster
/// serves every slot again, and the killed node comes back as the new master's replica.
#[test]
fn cluster_fails_over_a_killed_master() {
    let mut cluster = RedisCluster::start();
    let key = format!("{}:{{job}}:k", unique_prefix("harness::cluster_fails_over"));
    let owner = cluster.master_of_key(&key);
    // The replica has the write before the kill (one connection: WAIT counts the replicas
    // that have this connection's writes).
    assert_eq!(
        cluster
            .node(owner)
            .cmds(&[&["SET", &key, "v"], &["WAIT", "1", "5000"]]),
        "OK\n1"
    );

    // The two halves, for tests that act between the kill and the promotion.
    let killed = cluster.kill_master(owner);
    assert_eq!(killed.replicas.len(), 1);
    let failover = cluster.wait_failover(&killed);
    eprintln!(
        "harness timing: cluster failover: replica promoted {:?} after the kill, cluster stable after {:?}",
        failover.promoted_after, failover.stable_after
    );
    assert!(!cluster.is_alive(owner));
    assert_eq!(cluster.master_of_key(&key), failover.promoted);
    assert_eq!(cluster.cmd(&["GET", &key]), "v");
    assert_eq!(cluster.cmd(&["SET", &key, "w"]), "OK");
    assert_eq!(cluster.masters().len(), 3);

    let restarted = Instant::now();
    cluster.restart_node(owner);
    eprintln!(
        "harness timing: killed master back as a replica in {:?}",
        restarted.elapsed()
    );
    assert_eq!(
        cluster.own_entry(owner).master_id.as_deref(),
        Some(cluster.node_id(failover.promoted))
    );
    assert_eq!(cluster.node(owner).cmd(&["READONLY"]), "OK");
}

/// A slot moves to another master with its keys, in steps: while it migrates, a new key goes
/// to the importing master (`ASK`); afterwards the new owner serves every key, the old one
/// redirects, and the old one has dropped the slot's sharded subscribers.
#[test]
fn cluster_migrates_a_slot() {
    let cluster = RedisCluster::start();
    let prefix = unique_prefix("harness::cluster_migrates_a_slot");
    let keys: Vec<String> = (0..5).map(|n| format!("{prefix}:{{job}}:{n}")).collect();
    for key in &keys[..4] {
        assert_eq!(cluster.cmd(&["SET", key, "v"]), "OK");
    }
    let slot = cluster.keyslot(&keys[0]);
    let from = cluster.master_of_key(&keys[0]);
    let to = *cluster
        .masters()
        .iter()
        .find(|&&m| m != from)
        .expect("3 masters");
    let channel = format!("{prefix}:{{job}}");
    let mut subscriber = cluster.node(from).spawn_cmd(&["SSUBSCRIBE", &channel]);
    wait_until("the SSUBSCRIBE arrives", STEP_TIMEOUT, || {
        cluster.shard_numsub(from, &channel) == 1
    });

    let started = Instant::now();
    let migration = cluster.begin_slot_migration(slot, to);
    // A key the old owner does not have goes to the importing master.
    assert_eq!(cluster.cmd(&["SET", &keys[4], "new"]), "OK");
    assert_eq!(
        cluster.node(from).cmd(&["GET", &keys[4]]).trim_end(),
        format!("ASK {slot} 127.0.0.1:{}", cluster.node(to).port())
    );
    cluster.move_slot_keys(migration);
    cluster.finish_slot_migration(migration);
    eprintln!(
        "harness timing: slot migration of 4 keys, every node agreeing, in {:?}",
        started.elapsed()
    );

    assert_eq!(cluster.slot_owner(slot), Some(to));
    for key in &keys {
        assert_ne!(cluster.node(to).cmd(&["GET", key]), "", "{key}");
        assert_eq!(
            cluster.node(from).cmd(&["GET", key]).trim_end(),
            format!("MOVED {slot} 127.0.0.1:{}", cluster.node(to).port())
        );
    }
    assert_eq!(cluster.cmd(&["GET", &keys[4]]), "new");
    // The old owner unsubscribed the slot's sharded subscribers itself.
    wait_until("the old owner drops the subscriber", STEP_TIMEOUT, || {
        cluster.shard_numsub(from, &channel) == 0
    });
    let _ = subscriber.kill();
    let _ = subscriber.wait();
}

/// A Sentinel group (master, replica, 3 Sentinels) is ready fast, names its master, and after
/// `kill -9` of the master names the promoted replica, which takes writes; the old master
/// comes back as a replica and a second failover promotes it again.
#[test]
fn sentinel_group_starts_and_fails_over() {
    let mut group = SentinelGroup::start();
    eprintln!(
        "harness timing: sentinel group (1 master, 1 replica, 3 sentinels) ready in {:?}",
        group.started_in()
    );
    assert_eq!(group.master_name(), "herdlock");
    assert_eq!(group.sentinel_addrs().len(), 3);
    assert!(group.sentinel_urls()[0].starts_with("redis://127.0.0.1:"));
    assert_eq!(
        group.master_addr(),
        ("127.0.0.1".to_owned(), group.data_node(0).port())
    );
    // One connection: WAIT counts the replicas that have this connection's writes.
    assert_eq!(
        group
            .master()
            .cmds(&[&["SET", "k", "v"], &["WAIT", "1", "5000"]]),
        "OK\n1"
    );
    assert!(group
        .replica()
        .cmd(&["SET", "k", "w"])
        .starts_with("READONLY"));

    let failover = group.kill_master_and_wait_failover();
    eprintln!(
        "harness timing: sentinel failover: every sentinel names the replica {:?} after the kill",
        failover.promoted_after
    );
    assert_eq!(failover.promoted, 1);
    assert_eq!(group.master_index(), 1);
    assert_eq!(group.master_addr().1, group.data_node(1).port());
    assert_eq!(group.master().cmd(&["GET", "k"]), "v");
    assert_eq!(
        group
            .master()
            .cmds(&[&["SET", "k", "w"], &["WAIT", "0", "0"]]),
        "OK\n0",
        "several commands on one connection"
    );
    // A second failover (the old master restarted as a replica, then the new master
    // killed) is left out: Sentinels with stale state about the restarted node sometimes
    // demoted the new master, and no library test needs a second failover.
}

/// A TLS-only server: `redis-cli --tls` with the test CA gets a PONG; a plain connection to
/// the TLS port is dropped at once (no reply, no hang); a TLS client that does not trust the
/// test CA is refused.
#[test]
fn tls_server_answers_over_tls_only() {
    if !tls_or_skip("harness::tls_server_answers_over_tls_only") {
        return;
    }
    let started = Instant::now();
    let server = RedisServer::start_with(ServerConfig {
        tls: Some(Tls::shared(AuthClients::Optional)),
        ..ServerConfig::default()
    });
    eprintln!(
        "harness timing: TLS server (certificates included) ready in {:?}",
        started.elapsed()
    );
    let port = server.port();
    assert_eq!(server.url(), format!("rediss://127.0.0.1:{port}/"));
    assert_eq!(server.cmd(&["PING"]), "PONG");
    let certs = &server.tls().expect("a TLS server").certs;
    for file in [
        certs.ca_cert(),
        certs.server_cert(),
        certs.client_cert(),
        certs.client_key(),
    ] {
        assert!(file.exists(), "{}", file.display());
    }

    // Plain RESP on the TLS port: the server drops the connection without a reply.
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("the port listens");
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .expect("set a timeout");
    let asked = Instant::now();
    stream
        .write_all(b"*1\r\n$4\r\nPING\r\n")
        .expect("the first bytes go out");
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => assert!(
            !String::from_utf8_lossy(&reply).contains("PONG"),
            "a plain PING was answered: {reply:?}"
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server held a plain connection open: {e}"
        ),
    }
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked.elapsed()
    );

    let plain = cli(&["-p", &port.to_string(), "PING"]);
    assert!(!plain.contains("PONG"), "plain redis-cli: {plain}");
    let untrusted = cli(&["--tls", "-p", &port.to_string(), "PING"]);
    assert!(
        !untrusted.contains("PONG") && untrusted.contains("certificate verify failed"),
        "redis-cli --tls without the CA: {untrusted}"
    );
    // Nor does a client that trusts another CA.
    let other = TlsCerts::generate();
    let other_ca = other.ca_cert();
    let other_ca = other_ca.to_str().expect("UTF-8 temp path");
    let wrong_ca = cli(&[
        "--tls",
        "--cacert",
        other_ca,
        "-p",
        &port.to_string(),
        "PING",
    ]);
    assert!(
        !wrong_ca.contains("PONG") && wrong_ca.contains("certificate verify failed"),
        "redis-cli --tls with another CA: {wrong_ca}"
    );
    let other_dir = other.dir().to_owned();
    drop(other);
    assert!(!other_dir.exists(), "dropping certificates removes them");
}

/// Mutual TLS (`tls-auth-clients yes`): a client with the test client certificate gets in, one
/// without is refused.
#[test]
fn tls_mutual_auth_wants_a_client_certificate() {
    if !tls_or_skip("harness::tls_mutual_auth_wants_a_client_certificate") {
        return;
    }
    let server = RedisServer::start_with(ServerConfig {
        tls: Some(Tls::shared(AuthClients::Yes)),
        ..ServerConfig::default()
    });
    assert_eq!(server.cmd(&["PING"]), "PONG");
    let certs = &server.tls().expect("a TLS server").certs;
    let ca = certs.ca_cert();
    let ca = ca.to_str().expect("UTF-8 temp path");
    let port = server.port().to_string();
    let without = cli(&["--tls", "--cacert", ca, "-p", &port, "PING"]);
    assert!(
        !without.contains("PONG"),
        "redis-cli without a client certificate: {without}"
    );
}

/// `redis-cli -h 127.0.0.1 ARGS...`: stdout and stderr together, whatever the exit status.
fn cli(args: &[&str]) -> String {
    let output = std::process::Command::new(crate::common::server::cli_binary())
        .args(["-h", "127.0.0.1"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("redis-cli runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// TLS everywhere: a cluster whose nodes, bus and replication use TLS, and a Sentinel group
/// whose Sentinels and data nodes do, both under mutual TLS; `redis-cli --tls` reaches them
/// and a plain `redis-cli` does not.
#[test]
fn tls_cluster_and_sentinel_group_start() {
    if !tls_or_skip("harness::tls_cluster_and_sentinel_group_start") {
        return;
    }
    let tls = Tls::shared(AuthClients::Yes);
    let cluster = RedisCluster::start_with(ClusterConfig {
        tls: Some(tls.clone()),
        ..ClusterConfig::default()
    });
    eprintln!(
        "harness timing: TLS cluster ready in {:?}",
        cluster.started_in()
    );
    assert!(cluster.urls()[0].starts_with("rediss://127.0.0.1:"));
    let key = format!("{}:{{job}}:k", unique_prefix("harness::tls_cluster"));
    assert_eq!(cluster.cmd(&["SET", &key, "v"]), "OK");
    assert_eq!(cluster.cmd(&["GET", &key]), "v");
    let port = cluster.node(0).port().to_string();
    assert!(!cli(&["-p", &port, "PING"]).contains("PONG"));

    let group = SentinelGroup::start_with(SentinelConfig {
        tls: Some(tls),
        ..SentinelConfig::default()
    });
    eprintln!(
        "harness timing: TLS sentinel group ready in {:?}",
        group.started_in()
    );
    assert!(group.sentinel_urls()[0].starts_with("rediss://127.0.0.1:"));
    assert_eq!(group.master_addr().1, group.master().port());
    let port = group.sentinel(0).port().to_string();
    assert!(!cli(&["-p", &port, "PING"]).contains("PONG"));
}
