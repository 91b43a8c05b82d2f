//! The `herdlock` command line, as a real process against the shared redis-server.

use std::process::{Command, Output};
use std::time::Duration;

use herdlock::{Herd, LockOptions};

use herdlock_testkit::server::{self, RedisServer, ServerConfig};

fn cli(prefix: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herdlock"))
        .args([
            "--url",
            &server::shared().url(),
            "--prefix",
            prefix,
            "--owner",
            "cli-test",
        ])
        .args(args)
        .output()
        .expect("the herdlock binary runs")
}

#[test]
fn once_runs_the_command_and_passes_its_exit_code() {
    let prefix = server::unique_prefix("cli_once");
    let out = cli(
        &prefix,
        &["once", "job", "--", "sh", "-c", "echo ran; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ran");
    let out = cli(&prefix, &["status", "job"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("free"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_does_not_run_while_held_and_lock_waits() {
    let prefix = server::unique_prefix("cli_busy");
    let herd = Herd::builder()
        .prefix(prefix.clone())
        .owner("other-host")
        .connect(&server::shared().url())
        .await
        .expect("connect");
    let guard = herd
        .try_lock_with("job", &LockOptions::new().ttl(Duration::from_secs(30)))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let p = prefix.clone();
    let out = tokio::task::spawn_blocking(move || cli(&p, &["once", "job", "--", "echo", "never"]))
        .await
        .expect("task");
    assert_eq!(out.status.code(), Some(75));
    assert!(out.stdout.is_empty(), "the command ran");
    assert!(String::from_utf8_lossy(&out.stderr).contains("other-host"));
    let p = prefix.clone();
    let out = tokio::task::spawn_blocking(move || cli(&p, &["status", "job"]))
        .await
        .expect("task");
    assert!(String::from_utf8_lossy(&out.stdout).contains("held by other-host"));

    // `lock` waits for the release, then runs.
    let p = prefix.clone();
    let waiter = tokio::task::spawn_blocking(move || {
        cli(&p, &["lock", "job", "--wait", "20", "--", "echo", "waited"])
    });
    // The waiter is waiting once it is subscribed to the lock's channel.
    let channel = format!("{prefix}:{{job}}");
    tokio::task::spawn_blocking(move || {
        server::shared().wait_subscribers(&channel, 1, Duration::from_secs(20));
    })
    .await
    .expect("task");
    guard.release().await.expect("release");
    let out = waiter.await.expect("task");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "waited");
}

#[test]
fn unreachable_redis_and_bad_input_have_their_exit_codes() {
    let port = server::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_herdlock"))
        .args([
            "--url",
            &format!("redis://127.0.0.1:{port}/"),
            "status",
            "x",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(69));
    let prefix = server::unique_prefix("cli_bad");
    let out = cli(&prefix, &["status", ""]);
    assert_eq!(out.status.code(), Some(64));
}

/// Issue 9: the command line refuses an evicting server with `EX_CONFIG` (78) unless
/// given `--allow-eviction`, and a user without the rights with `EX_NOPERM` (77).
#[test]
fn the_command_line_reports_refusals_with_their_own_exit_codes() {
    let cli = |url: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_herdlock"))
            .args(["--url", url, "--prefix", "cli-refusals"])
            .args(args)
            .output()
            .expect("the herdlock binary runs")
    };
    let server = RedisServer::start_with(ServerConfig {
        extra_args: vec!["--maxmemory-policy".to_owned(), "allkeys-lru".to_owned()],
        ..ServerConfig::default()
    });
    let out = cli(&server.url(), &["status", "job"]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("maxmemory-policy is `allkeys-lru`"),
        "{out:?}"
    );
    let out = cli(&server.url(), &["--allow-eviction", "status", "job"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let server = RedisServer::start();
    // The README's least-privilege rule for the prefix, without its channel rule.
    let readme = include_str!("../../README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("ACL SETUSER herdlock reset on >PASSWORD "))
        .expect("README.md documents the least-privilege ACL rule");
    let rule: Vec<String> = line
        .split_whitespace()
        .skip(3)
        .filter(|w| !matches!(*w, "reset" | ">PASSWORD" | "&herdlock:*"))
        .map(|w| w.replace("herdlock:*", "cli-refusals:*"))
        .collect();
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    let url = server.acl_user("nochannels", "secret", &rule);
    let out = cli(&url, &["status", "job"]);
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`subscribe` (no access to channels"),
        "{out:?}"
    );
}
