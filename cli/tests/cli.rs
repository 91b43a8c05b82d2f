//! The `herdlock` command line, as a real process (the built binary) against real
//! redis-servers from the testkit.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use herdlock::{Herd, LockOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use herdlock_testkit::server::{self, RedisServer, ServerConfig};

/// A generous bound for one step (a process starting, exiting, a line arriving).
const STEP: Duration = Duration::from_secs(30);

/// `herdlock --url <shared> --prefix <prefix> --owner cli-test`, ready for more arguments.
fn herdlock(prefix: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herdlock"));
    command.args([
        "--url",
        &server::shared().url(),
        "--prefix",
        prefix,
        "--owner",
        "cli-test",
    ]);
    command
}

fn cli(prefix: &str, args: &[&str]) -> Output {
    herdlock(prefix)
        .args(args)
        .output()
        .expect("the herdlock binary runs")
}

/// Spawns herdlock with `args`, stdout piped (and stdin piped, for commands that read it).
fn spawn(prefix: &str, args: &[&str]) -> Child {
    herdlock(prefix)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the herdlock binary runs")
}

/// Reads `child`'s stdout lines on a thread: the receiving end.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout: ChildStdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(STEP)
        .expect("a line from herdlock's command within the step timeout")
}

/// Waits (on a thread, bounded by [`STEP`]) for `child` to exit; its status and stderr.
fn finish(mut child: Child) -> (ExitStatus, String) {
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send((child.wait(), text));
    });
    if let Ok((status, text)) = rx.recv_timeout(STEP) {
        (status.expect("wait for herdlock"), text)
    } else {
        let _ = kill(pid_of(pid), Signal::SIGKILL);
        panic!("herdlock (pid {pid}) did not exit within {STEP:?}");
    }
}

fn pid_of(id: u32) -> Pid {
    Pid::from_raw(i32::try_from(id).expect("a pid fits an i32"))
}

/// Whether process `pid` is gone (reaped, so no zombie either).
fn gone(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_err()
}

/// The `started <pid>` line a test command prints first: the command's pid.
fn started(lines: &mpsc::Receiver<String>) -> i32 {
    let line = next_line(lines);
    line.strip_prefix("started ")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected `started <pid>`, got {line:?}"))
}

async fn herd(prefix: &str, owner: &str) -> Herd {
    Herd::builder()
        .prefix(prefix)
        .owner(owner)
        .connect(&server::shared().url())
        .await
        .expect("connect")
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

/// A command that prints `started <its pid>`, then traps SIGTERM and SIGINT (printing
/// `trapped`) and otherwise runs until killed.
const TRAPPING: &str =
    r#"trap 'echo trapped; exit 0' TERM INT; echo "started $$"; while :; do sleep 0.05; done"#;

/// Like [`TRAPPING`], but ignores SIGTERM and SIGINT.
const IGNORING: &str = r#"trap '' TERM INT; echo "started $$"; while :; do sleep 0.05; done"#;

/// Issue 13: SIGTERM or SIGINT to herdlock goes to the command's process group; herdlock
/// waits for it, releases the lock at once (not after its TTL) and exits 128 + n.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_the_command_and_the_lock_is_released_at_once() {
    let prefix = server::unique_prefix("cli_signals");
    let observer = herd(&prefix, "observer").await;
    for (signal, code) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        for run in [
            vec!["lock", "job", "--ttl", "60s"],
            vec!["once", "job", "--ttl", "60s"],
            vec!["semaphore", "job", "--permits", "1", "--ttl", "60s"],
            vec!["lock", "job", "--fanout", "--ttl", "60s"],
        ] {
            let mut args = run.clone();
            args.extend(["--", "sh", "-c", TRAPPING]);
            let mut child = spawn(&prefix, &args);
            let out = lines(&mut child);
            let pid = started(&out);
            kill(pid_of(child.id()), signal).expect("signal herdlock");
            let (status, stderr) = finish(child);
            assert_eq!(status.code(), Some(code), "{run:?} {signal}: {stderr}");
            assert_eq!(
                next_line(&out),
                "trapped",
                "{run:?}: the command got {signal}"
            );
            assert!(gone(pid), "{run:?}: the command outlived herdlock");
            // Free now, not after the 60 s TTL.
            if run[0] == "semaphore" {
                let status = observer
                    .semaphore("job", 1)
                    .expect("semaphore")
                    .status()
                    .await
                    .expect("status");
                assert_eq!(status.in_use, 0, "{run:?}");
            } else {
                let status = observer.lock_status("job").await.expect("status");
                assert_eq!(status.holder, None, "{run:?}");
            }
        }
    }
}

/// A command that ignores the forwarded signal gets SIGKILL after `--kill-after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_ignores_the_signal_is_killed_after_the_delay() {
    let prefix = server::unique_prefix("cli_kill_after");
    let observer = herd(&prefix, "observer").await;
    let mut child = spawn(
        &prefix,
        &[
            "lock",
            "job",
            "--kill-after",
            "700ms",
            "--",
            "sh",
            "-c",
            IGNORING,
        ],
    );
    let out = lines(&mut child);
    let pid = started(&out);
    let signalled = Instant::now();
    kill(pid_of(child.id()), Signal::SIGTERM).expect("signal herdlock");
    let (status, stderr) = finish(child);
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(took >= Duration::from_millis(700), "killed after {took:?}");
    assert!(gone(pid));
    assert_eq!(
        observer.lock_status("job").await.expect("status").holder,
        None
    );
}

/// Issue 13: `once --grace` keeps the lock only after the command succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_is_kept_only_after_success() {
    let prefix = server::unique_prefix("cli_grace");
    let observer = herd(&prefix, "observer").await;
    let out = cli(&prefix, &["once", "job", "--grace", "30s", "--", "false"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        observer.lock_status("job").await.expect("status").holder,
        None
    );
    // A retry runs at once.
    let out = cli(&prefix, &["once", "job", "--grace", "30s", "--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    let holder = observer
        .lock_status("job")
        .await
        .expect("status")
        .holder
        .expect("held for the grace period after success");
    assert_eq!(holder.owner, "cli-test");
    let left = holder.remaining.expect("a TTL");
    assert!(
        left > Duration::from_secs(25) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    let out = cli(&prefix, &["once", "job", "--", "echo", "never"]);
    assert_eq!(out.status.code(), Some(75));
    assert!(out.stdout.is_empty());
    observer.force_release("job").await.expect("clean up");
}

/// Issue 13: a lock (or permit) lost while the command runs kills the command's process
/// group, and herdlock exits 76.
#[test]
fn a_lost_lock_kills_the_command() {
    let prefix = server::unique_prefix("cli_lost");
    let redis = server::shared();
    for (run, key) in [
        (vec!["lock", "job"], format!("{prefix}:{{job}}:lock")),
        (vec!["once", "job"], format!("{prefix}:{{job}}:lock")),
        (
            vec!["lock", "job", "--fanout"],
            format!("{prefix}:{{job}}:lock"),
        ),
        (
            vec!["semaphore", "job", "--permits", "1"],
            format!("{prefix}:{{job}}:sem"),
        ),
    ] {
        let mut args = run.clone();
        args.extend(["--ttl", "1s", "--", "sh", "-c", TRAPPING]);
        let mut child = spawn(&prefix, &args);
        let out = lines(&mut child);
        let pid = started(&out);
        // Another party breaks the lock behind the holder's back.
        assert_eq!(redis.cmd(&["DEL", &key]), "1", "{run:?}");
        let (status, stderr) = finish(child);
        assert_eq!(status.code(), Some(76), "{run:?}: {stderr}");
        assert!(stderr.contains("lost the lock"), "{run:?}: {stderr}");
        assert!(gone(pid), "{run:?}: the command survived");
    }
}

/// Issue 13: bad arguments exit 64, as the README's exit-code table says; `--help` and
/// `--version` exit 0.
#[test]
fn bad_arguments_exit_as_the_readme_says() {
    let readme = include_str!("../../README.md");
    assert!(
        readme
            .lines()
            .any(|l| l.starts_with("| 64 | bad arguments")),
        "README.md's exit-code table documents 64 for bad arguments"
    );
    let prefix = server::unique_prefix("cli_usage");
    for bad in [
        &["once", "job"][..],
        &["once", "job", "--ttl", "0", "--", "true"],
        &["once", "job", "--ttl", "0s", "--", "true"],
        &["once", "job", "--ttl", "999ms", "--", "true"],
        &["once", "job", "--ttl", "soon", "--", "true"],
        &["lock", "job", "--wait", "0", "--", "true"],
        &["once", "job", "--wait", "5s", "--", "true"],
        &["once", "job", "--fanout", "--grace", "5s", "--", "true"],
        &["semaphore", "job", "--", "true"],
        &["release", "job"],
        &["frobnicate"],
        &["status", ""],
    ] {
        let out = cli(&prefix, bad);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {out:?}");
    }
    for fine in [&["--help"][..], &["--version"], &["once", "--help"]] {
        let out = cli(&prefix, fine);
        assert_eq!(out.status.code(), Some(0), "{fine:?}: {out:?}");
    }
    let help = cli(&prefix, &["--help"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("64 bad arguments"),
        "--help lists the exit codes: {help:?}"
    );
}

/// Issue 13: `--help` shows where the URL comes from, never `REDIS_URL`'s value; nor do
/// errors print the password.
#[test]
fn no_secret_is_printed() {
    let port = server::free_port();
    let url = format!("redis://:s3cret-pw@127.0.0.1:{port}/");
    for args in [&["--help"][..], &["once", "--help"], &["status", "x"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_herdlock"))
            .env("REDIS_URL", &url)
            .args(args)
            .output()
            .expect("runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("s3cret-pw"),
            "{args:?} printed the password: {text}"
        );
        if args[0] == "--help" {
            assert!(text.contains("REDIS_URL"), "{text}");
        }
    }
}

/// Issue 13: a command killed by a signal makes herdlock exit 128 + n, like a shell.
#[test]
fn a_command_killed_by_a_signal_exits_128_plus_n() {
    let prefix = server::unique_prefix("cli_killed");
    for (script, code) in [("kill -KILL $$", 137), ("kill -TERM $$", 143)] {
        let out = cli(&prefix, &["once", "job", "--", "sh", "-c", script]);
        assert_eq!(out.status.code(), Some(code), "{script}: {out:?}");
    }
    let out = cli(&prefix, &["once", "job", "--", "/nonexistent/command"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
}

/// Issue 13: errors print their cause chain, not only the top line: the server's own words
/// (`WRONGPASS`, `OOM`) reach the operator, one `caused by:` line per source that the line
/// above does not already say.
#[test]
fn errors_print_their_cause_chain() {
    let check = |out: &Output, needles: &[&str]| {
        assert_eq!(out.status.code(), Some(69), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(lines[0].starts_with("herdlock: "), "{stderr}");
        assert!(
            lines[1..].iter().all(|l| l.starts_with("  caused by: ")),
            "{stderr}"
        );
        assert!(needles.iter().any(|n| stderr.contains(n)), "{stderr}");
    };
    let redis = RedisServer::start_with(ServerConfig {
        password: Some("right".to_owned()),
        ..ServerConfig::default()
    });
    let out = Command::new(env!("CARGO_BIN_EXE_herdlock"))
        .args(["--url", &redis.url_with_password("wrong"), "status", "x"])
        .output()
        .expect("runs");
    check(&out, &["WRONGPASS", "uthentication"]);

    // A full server (noeviction, so herdlock connects) refuses the acquire script.
    let full = RedisServer::start_with(ServerConfig {
        extra_args: vec!["--maxmemory".to_owned(), "1".to_owned()],
        ..ServerConfig::default()
    });
    let out = Command::new(env!("CARGO_BIN_EXE_herdlock"))
        .args(["--url", &full.url(), "once", "job", "--", "echo", "never"])
        .output()
        .expect("runs");
    check(&out, &["OOM"]);
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// Issue 13: `--fanout`: the leader streams its command's output live; a caller that finds
/// the run going prints the leader's captured stdout and stderr, separately, and exits with
/// its exit code.
#[test]
fn fanout_followers_replay_the_leaders_output_and_exit_code() {
    let prefix = server::unique_prefix("cli_fanout");
    let redis = server::shared();
    let script = r#"echo "started $$"; read word; echo "out-$word"; echo "err-$word" >&2; exit 3"#;
    let mut leader = spawn(
        &prefix,
        &["lock", "job", "--fanout", "--", "sh", "-c", script],
    );
    let leader_out = lines(&mut leader);
    // Streamed live: the leader's first line is here while its command still runs.
    started(&leader_out);
    let channel = format!("{prefix}:{{job}}");
    let before = redis.subscribers(&channel);
    let follower = spawn(&prefix, &["lock", "job", "--fanout", "--", "echo", "never"]);
    // The follower waits on the run's channel.
    redis.wait_subscribers(&channel, before + 1, STEP);
    let mut stdin = leader.stdin.take().expect("stdin is piped");
    writeln!(stdin, "go").expect("write to the leader's command");
    drop(stdin);
    let (status, stderr) = finish(leader);
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert_eq!(next_line(&leader_out), "out-go");
    assert_eq!(stderr, "err-go\n");

    let output = follower.wait_with_output().expect("the follower exits");
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("started "),
        "{output:?}"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).ends_with("\nout-go\n"),
        "{output:?}"
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "err-go\n");
}

/// Issue 13: output over `--max-output` is an error for the followers (exit 74), never a
/// truncated replay; the leader still streamed all of it.
#[test]
fn fanout_output_over_the_cap_is_an_error_for_followers() {
    let prefix = server::unique_prefix("cli_fanout_cap");
    let redis = server::shared();
    let script = r#"echo "started $$"; read word; seq 1 100; exit 0"#;
    let mut leader = spawn(
        &prefix,
        &[
            "once",
            "job",
            "--fanout",
            "--max-output",
            "64",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let leader_out = lines(&mut leader);
    started(&leader_out);
    let channel = format!("{prefix}:{{job}}");
    let before = redis.subscribers(&channel);
    let follower = spawn(&prefix, &["once", "job", "--fanout", "--", "true"]);
    redis.wait_subscribers(&channel, before + 1, STEP);
    let mut stdin = leader.stdin.take().expect("stdin is piped");
    writeln!(stdin, "go").expect("write to the leader's command");
    drop(stdin);
    let (status, stderr) = finish(leader);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let streamed: Vec<String> = (0..100).map(|_| next_line(&leader_out)).collect();
    assert_eq!(streamed.last().map(String::as_str), Some("100"));

    let output = follower.wait_with_output().expect("the follower exits");
    assert_eq!(output.status.code(), Some(74), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--max-output cap of 64 bytes"), "{stderr}");
}

/// Issue 13: `semaphore KEY --permits N`: runs holding a permit; busy (75) at once without
/// `--wait`; with `--wait`, runs when a permit comes free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_runs_under_one_of_n_permits() {
    let prefix = server::unique_prefix("cli_sem");
    let out = cli(
        &prefix,
        &[
            "semaphore",
            "pool",
            "--permits",
            "2",
            "--",
            "sh",
            "-c",
            "exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    let other = herd(&prefix, "other-host").await;
    let pool = other.semaphore("pool", 2).expect("semaphore");
    let first = pool.acquire(STEP).await.expect("permit 1");
    let second = pool.acquire(STEP).await.expect("permit 2");
    let p = prefix.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &p,
            &["semaphore", "pool", "--permits", "2", "--", "echo", "never"],
        )
    })
    .await
    .expect("task");
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("other-host"),
        "{out:?}"
    );

    let p = prefix.clone();
    let waiter = tokio::task::spawn_blocking(move || {
        let mut child = spawn(
            &p,
            &[
                "semaphore",
                "pool",
                "--permits",
                "2",
                "--wait",
                "20s",
                "--",
                "echo",
                "ran",
            ],
        );
        let out = lines(&mut child);
        let (status, stderr) = finish(child);
        (status, stderr, next_line(&out))
    });
    let channel = format!("{prefix}:{{pool}}");
    tokio::task::spawn_blocking(move || server::shared().wait_subscribers(&channel, 1, STEP))
        .await
        .expect("task");
    first.release().await.expect("release");
    let (status, stderr, line) = waiter.await.expect("task");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(line, "ran");
    second.release().await.expect("release");
}

/// Issue 13: `list` shows what is held under the prefix (SCAN), `release --force` breaks a
/// lock and says who held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_force_release() {
    let prefix = server::unique_prefix("cli_list");
    let other = herd(&prefix, "other-host").await;
    let options = LockOptions::new().ttl(Duration::from_secs(30));
    let guard = other
        .try_lock_with("stuck", &options)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let tagged = other
        .try_lock_with("acct:{bank}:1", &options)
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let permit = other
        .semaphore("pool", 3)
        .expect("semaphore")
        .acquire(STEP)
        .await
        .expect("permit");
    let p = prefix.clone();
    let (text, json) =
        tokio::task::spawn_blocking(move || (cli(&p, &["list"]), cli(&p, &["list", "--json"])))
            .await
            .expect("task");
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    let listed: Vec<&str> = text.lines().collect();
    assert_eq!(listed.len(), 3, "{text}");
    assert!(
        listed[0].starts_with("lock       acct:{bank}:1  held by other-host"),
        "{text}"
    );
    assert!(
        listed[1].starts_with("semaphore  pool  1 permit(s) in use by other-host"),
        "{text}"
    );
    assert!(
        listed[2].starts_with("lock       stuck  held by other-host"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let kinds: Vec<(&str, &str)> = json
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or(""),
                e["key"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("lock", "acct:{bank}:1"),
            ("semaphore", "pool"),
            ("lock", "stuck")
        ]
    );

    let p = prefix.clone();
    let out = tokio::task::spawn_blocking(move || cli(&p, &["release", "stuck", "--force"]))
        .await
        .expect("task");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("held by other-host"), "{said}");
    assert!(said.contains(&format!("fence {}", guard.fence())), "{said}");
    assert_eq!(
        other.lock_status("stuck").await.expect("status").holder,
        None
    );
    assert!(guard.release().await.expect_err("broken").is_lock_lost());
    let p = prefix.clone();
    let out = tokio::task::spawn_blocking(move || cli(&p, &["release", "stuck", "--force"]))
        .await
        .expect("task");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("was not held"),
        "{out:?}"
    );
    tagged.release().await.expect("release");
    permit.release().await.expect("release");
}

/// Issue 13: durations in human form on every duration flag, integer seconds too; `status
/// --json`; and no status line when stderr is not a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_durations_status_json_and_no_status_line_off_a_terminal() {
    let prefix = server::unique_prefix("cli_durations");
    let p = prefix.clone();
    let (human, json) = tokio::task::spawn_blocking(move || {
        let human = cli(
            &p,
            &["once", "a", "--ttl", "1m30s", "--grace", "1m", "--", "true"],
        );
        (human, cli(&p, &["status", "a", "--json"]))
    })
    .await
    .expect("task");
    assert!(human.status.success(), "{human:?}");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(json["key"], "a");
    assert_eq!(json["held"], true);
    assert_eq!(json["holder"]["owner"], "cli-test");
    let left = json["holder"]["remaining_ms"].as_u64().expect("ms left");
    assert!(left > 55_000 && left <= 60_000, "{json}");
    assert_eq!(json["holder"]["fence"], json["last_fence"]);

    let p = prefix.clone();
    let (seconds, json) = tokio::task::spawn_blocking(move || {
        let seconds = cli(
            &p,
            &["once", "b", "--ttl", "120", "--grace", "90", "--", "true"],
        );
        (seconds, cli(&p, &["status", "b", "--json"]))
    })
    .await
    .expect("task");
    assert!(seconds.status.success(), "{seconds:?}");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let left = json["holder"]["remaining_ms"].as_u64().expect("ms left");
    assert!(left > 85_000 && left <= 90_000, "{json}");

    // A wait of 2.5 s on a held lock: on a terminal a status line would be drawn after 1 s;
    // with stderr a pipe, only the timeout's message.
    let p = prefix.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &p,
            &["lock", "a", "--wait", "2500ms", "--", "echo", "never"],
        )
    })
    .await
    .expect("task");
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("waiting for `a` ("), "{stderr}");
    assert!(!stderr.contains(['\r', '\u{1b}']), "{stderr}");
    let status = tokio::task::spawn_blocking(move || cli(&prefix, &["status", "nobody", "--json"]))
        .await
        .expect("task");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(json["held"], false);
    assert_eq!(json["holder"], serde_json::Value::Null);
}

/// Issue 13: on a terminal, a long wait shows a live status line on stderr (who holds the
/// lock, fence, time left), run under `script` for a pseudo-terminal; skipped without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_wait_on_a_terminal_shows_a_status_line() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` (util-linux) for a pseudo-terminal");
        return;
    }
    let prefix = server::unique_prefix("cli_tty");
    let other = herd(&prefix, "other-host").await;
    let guard = other
        .try_lock_with("a", &LockOptions::new().ttl(Duration::from_secs(30)))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let line = format!(
        "{} --url {} --prefix {prefix} lock a --wait 2500ms -- true",
        env!("CARGO_BIN_EXE_herdlock"),
        server::shared().url()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("script runs")
    })
    .await
    .expect("task");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(75), "{text}");
    assert!(text.contains("herdlock: waiting for `a` ("), "{text}");
    assert!(text.contains("held by other-host (fence "), "{text}");
    assert!(text.contains("\r\u{1b}[K"), "{text}");
    guard.release().await.expect("release");
}

/// A `--fanout` command that leaves a process behind holding its output open: the leader
/// stops reading `--kill-after` after the command exited, says so, and its followers get
/// an error (exit 74), not an output that may be missing its end.
#[test]
fn fanout_output_held_open_by_a_leftover_process_is_not_waited_for() {
    let prefix = server::unique_prefix("cli_fanout_open");
    let redis = server::shared();
    let script = r#"echo "started $$"; read word; sleep 30 & echo "out-$word"; exit 0"#;
    let mut leader = spawn(
        &prefix,
        &[
            "lock",
            "job",
            "--fanout",
            "--kill-after",
            "500ms",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let leader_out = lines(&mut leader);
    let pid = started(&leader_out);
    let channel = format!("{prefix}:{{job}}");
    let before = redis.subscribers(&channel);
    let follower = spawn(&prefix, &["lock", "job", "--fanout", "--", "true"]);
    redis.wait_subscribers(&channel, before + 1, STEP);
    let mut stdin = leader.stdin.take().expect("stdin is piped");
    writeln!(stdin, "go").expect("write to the leader's command");
    drop(stdin);
    let (status, stderr) = finish(leader);
    // The leftover `sleep` is in the command's process group (its pgid is the command's pid).
    let _ = nix::sys::signal::killpg(pid_of(u32::try_from(pid).expect("a pid")), Signal::SIGKILL);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("still holds its output open"), "{stderr}");
    assert_eq!(next_line(&leader_out), "out-go");
    let output = follower.wait_with_output().expect("the follower exits");
    assert_eq!(output.status.code(), Some(74), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("output is incomplete"),
        "{output:?}"
    );
}

/// A signal while herdlock waits for a lock ends the wait at once (exit 128 + n), runs
/// nothing, and leaves nothing held: the holder's release frees the lock for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_waiting_ends_the_wait_and_leaves_nothing_held() {
    let prefix = server::unique_prefix("cli_wait_signal");
    let other = herd(&prefix, "other-host").await;
    let guard = other
        .try_lock_with("job", &LockOptions::new().ttl(Duration::from_secs(30)))
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let p = prefix.clone();
    let child = tokio::task::spawn_blocking(move || {
        spawn(&p, &["lock", "job", "--wait", "20s", "--", "echo", "never"])
    })
    .await
    .expect("task");
    let channel = format!("{prefix}:{{job}}");
    tokio::task::spawn_blocking(move || server::shared().wait_subscribers(&channel, 1, STEP))
        .await
        .expect("task");
    let mut child = child;
    let out = lines(&mut child);
    kill(pid_of(child.id()), Signal::SIGTERM).expect("signal herdlock");
    let (status, stderr) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .expect("task");
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(out.try_recv().is_err(), "the command ran");
    guard.release().await.expect("release");
    assert_eq!(other.lock_status("job").await.expect("status").holder, None);
}
