//! Self-tests of the test harness: servers, their faults, and worker processes.

use std::net::{Ipv4Addr, TcpStream};

use crate::common::{
    emit, ready_then_go, shared, unique_prefix, worker_param, worker_read_line,
    worker_ready_and_wait_go, worker_role, RedisServer, ServerConfig, Worker, STEP_TIMEOUT,
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
