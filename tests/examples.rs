//! Every example runs as a real process, on the in-memory backend and on a private
//! `redis-server` (through `REDIS_URL`), exits 0 and prints what it promises
//! (`request_dedup` needs the feature `tower`, `metrics_prometheus` the feature `metrics`).
//!
//! The example binaries are the ones cargo built next to this test binary
//! (`target/<profile>/examples/`) with `cargo build --examples --features
//! herdlock/tower,herdlock/metrics`, which `scripts/test` runs before the tests (`cargo test
//! --all-targets` builds examples only as test harnesses). A missing binary, or one older than its source, fails its test with the
//! command that builds it.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;

use crate::common::{RedisServer, STEP_TIMEOUT};

/// Where cargo put example `name`.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/tests-<hash> → target/<profile>/examples/<name>
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>");
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let how =
        "build the examples first: `cargo build --examples --features herdlock/tower,herdlock/metrics`";
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {how}", binary.display()));
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.rs"));
    let written = std::fs::metadata(&source)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    assert!(
        built >= written,
        "{} is older than {}: {how}",
        binary.display(),
        source.display()
    );
    binary
}

/// Runs example `name` (on Redis at `redis` if given) to its end and returns its stdout,
/// failing the test if it exits unsuccessfully or takes longer than two test steps.
fn run_example(name: &str, redis: Option<&RedisServer>) -> String {
    let mut command = Command::new(example_binary(name));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("REDIS_URL");
    if let Some(server) = redis {
        command.env("REDIS_URL", server.url());
    }
    let mut child = command.spawn().expect("spawn the example");
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let (mut out, mut err) = (String::new(), String::new());
        let err_reader = thread::spawn(move || stderr.read_to_string(&mut err).map(|_| err));
        let out_result = stdout.read_to_string(&mut out).map(|_| out);
        let err_result = err_reader.join().expect("stderr reader");
        let status = child.wait();
        let _ = done_tx.send(());
        (status, out_result, err_result)
    });
    if done_rx.recv_timeout(STEP_TIMEOUT * 2).is_err() {
        // Hung: kill it (its own children exit with it: they are killed on drop or read
        // their stdin to EOF), then report.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let (_, out, err) = waiter.join().expect("waiter");
        panic!(
            "example {name} did not finish within {:?}\nstdout:\n{}\nstderr:\n{}",
            STEP_TIMEOUT * 2,
            out.unwrap_or_default(),
            err.unwrap_or_default()
        );
    }
    let (status, out, err) = waiter.join().expect("waiter");
    let (status, out, err) = (
        status.expect("wait"),
        out.expect("stdout"),
        err.expect("stderr"),
    );
    assert!(
        status.success(),
        "example {name} exited with {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

fn assert_says(name: &str, out: &str, expected: &[&str]) {
    for line in expected {
        assert!(
            out.contains(line),
            "example {name} did not print {line:?}; it printed:\n{out}"
        );
    }
}

/// `mod $example { memory, redis }`: runs the example on each backend and checks that its
/// output contains every string of the first list (both backends) and of the second
/// (Redis only).
macro_rules! examples {
    ($($example:ident: [$($both:expr),* $(,)?], redis: [$($redis:expr),* $(,)?];)*) => {
        $(
            mod $example {
                #[test]
                fn memory() {
                    let name = stringify!($example);
                    let out = super::run_example(name, None);
                    super::assert_says(name, &out, &["backend: in-memory" $(, $both)*]);
                }

                #[test]
                fn redis() {
                    let name = stringify!($example);
                    let server = crate::common::RedisServer::start();
                    let out = super::run_example(name, Some(&server));
                    super::assert_says(name, &out, &["backend: redis" $(, $both)* $(, $redis)*]);
                }
            }
        )*
    };
}

examples! {
    quickstart: ["once: ran", "lock: held with fencing token", "job ran 1 time(s), 1 leader, 99 followers"],
        redis: [];
    dedup: ["100 requests, 1 load(s): 1 leader, 99 followers", "second call [1.5, 2.25] (Cached)"],
        redis: [];
    transfer: ["moved 10 from alice to bob", "moved 5 from bob to alice"],
        redis: [];
    queue: ["export 0 running alone", "export 3 running alone", "done: 0 in use, 0 queued"],
        redis: [];
    lock_lost: ["lost the lock after", "heartbeat says"],
        redis: [];
    cache_stampede: [
        "cold key, 50 readers on 2 nodes",
        "warm key, 50 readers on 2 nodes in",
        ": 50 cache hit(s)",
        "computations: 1",
    ],
        redis: [];
    cron_guard: [
        "SKIPPED host-",
        "the nightly job ran 1 time(s) on 3 hosts; the late retry was skipped (grace period)",
    ],
        redis: ["three host processes"];
}

#[cfg(feature = "tower")]
examples! {
    request_dedup: ["upstream calls: 1; 1 leader, 19 followers; 1 distinct body"],
        redis: ["two service processes", "listening on http://127.0.0.1:"];
}

/// `metrics_prometheus` prints the Prometheus scrape itself on stdout (no backend line, so
/// the output stays a valid exposition); it is also compiled into `tests/metrics.rs`.
#[cfg(feature = "metrics")]
mod metrics_prometheus {
    const SCRAPE: &[&str] = &[
        "# TYPE herdlock_acquired_total counter",
        "herdlock_acquired_total{primitive=\"lock\"}",
        "herdlock_runs_led_total 1",
        "herdlock_cached_hits_total 1",
    ];

    #[test]
    fn memory() {
        let out = super::run_example("metrics_prometheus", None);
        super::assert_says("metrics_prometheus", &out, SCRAPE);
    }

    #[test]
    fn redis() {
        let server = crate::common::RedisServer::start();
        let out = super::run_example("metrics_prometheus", Some(&server));
        super::assert_says("metrics_prometheus", &out, SCRAPE);
    }
}
