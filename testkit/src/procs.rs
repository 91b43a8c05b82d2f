//! Cross-process tests: real OS processes, made by re-running this test binary.
//!
//! The parent test spawns [`Worker`]s. Each re-executes the current test binary on exactly one
//! test, the *worker entry*, with `HERDLOCK_WORKER_ROLE=<role>` and the role's params in its
//! environment. The worker entry returns at once when no role is set, so it passes in a
//! normal run, and otherwise plays the role:
//!
//! ```ignore
//! #[test]
//! fn worker_entry() {
//!     let Some(role) = worker_role() else { return };
//!     match role.as_str() {
//!         "leader" => {
//!             let url = worker_param("url");
//!             worker_ready_and_wait_go();
//!             // ... take part in the herd ...
//!             emit(r#"{"led":true}"#);
//!         }
//!         other => panic!("unknown worker role {other:?}"),
//!     }
//! }
//! ```
//!
//! Protocol: a worker writes lines to stdout with [`emit`] (JSON, or `KEY value`); the parent
//! reads them with [`Worker::wait_line_prefix`] / [`Worker::wait_value`] and collects the rest
//! with [`Worker::finish`]. The parent writes lines to the worker's stdin with
//! [`Worker::send_line`]; a start barrier is [`ready_then_go`] on the parent side and
//! [`worker_ready_and_wait_go`] on the worker side. A worker's stderr goes to the parent's
//! stderr, so its panics show up in the test output.
//!
//! A worker must not call [`shared`](crate::server::shared): it connects to the URL the parent
//! passes as a param, and uses the key prefix the parent passes.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Env var holding a worker's role; unset in the parent test process.
pub const ROLE_ENV: &str = "HERDLOCK_WORKER_ROLE";

/// Prefix of the env vars holding a worker's params: param `url` is `HERDLOCK_WORKER_PARAM_url`.
pub const PARAM_ENV_PREFIX: &str = "HERDLOCK_WORKER_PARAM_";

/// The exit code of a worker whose stdin closed while it was reading it: its parent is gone
/// (see [`worker_read_line`]).
pub const ORPHAN_EXIT_CODE: i32 = 70;

/// A worker process: this test binary running one test in a role.
///
/// Dropping it kills the process (SIGKILL) if it still runs, and reaps it.
#[derive(Debug)]
pub struct Worker {
    /// The role, for messages.
    role: String,
    /// The process.
    child: Child,
    /// The write end of its stdin. Kept open until the `Worker` is dropped: a worker that reads
    /// stdin exits when it closes.
    stdin: Option<ChildStdin>,
    /// Protocol lines from its stdout, read by a thread (std pipes have no read timeout);
    /// disconnected at EOF.
    lines: Receiver<String>,
    /// Lines received but not yet consumed by `wait_line_prefix`, oldest first.
    backlog: VecDeque<String>,
}

/// What a worker printed and how it ended, from [`Worker::finish`].
#[derive(Debug)]
pub struct WorkerOutput {
    /// How the process ended: `success()` if the worker entry passed.
    pub status: ExitStatus,
    /// Every protocol line not consumed by `wait_line_prefix`, in order; libtest's own lines
    /// are left out.
    pub lines: Vec<String>,
}

impl WorkerOutput {
    /// Panics, showing the lines, unless the worker exited with success.
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "worker failed with {}; its lines: {:#?} (its stderr is above)",
            self.status,
            self.lines
        );
    }

    /// The values of the `KEY value` lines with this key, in order.
    pub fn values(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
            .collect()
    }
}

impl Worker {
    /// Spawns this test binary running only `test_fn_path` (for example
    /// `"harness::worker_entry"`), with `HERDLOCK_WORKER_ROLE=role` and each `(name, value)`
    /// of `params` as env var `HERDLOCK_WORKER_PARAM_<name>`. Stdin and stdout are piped,
    /// stderr is inherited.
    ///
    /// # Panics
    ///
    /// If a param name is not a valid env var name or the process cannot be spawned.
    pub fn spawn(test_fn_path: &str, role: &str, params: &[(&str, String)]) -> Worker {
        let exe = std::env::current_exe().expect("the test binary can find its own path");
        let mut command = Command::new(exe);
        command
            .args([
                "--exact",
                test_fn_path,
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(ROLE_ENV, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in params {
            assert!(
                !name.is_empty() && !name.contains(['=', '\0']),
                "worker param name {name:?} cannot be part of an env var name"
            );
            command.env(format!("{PARAM_ENV_PREFIX}{name}"), value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn worker {role:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("the worker's stdout is piped");
        let (sender, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("worker-{role}-{}-stdout", child.id()))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if is_libtest_noise(&line) {
                        continue;
                    }
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            })
            .expect("a thread can be spawned to read the worker's stdout");
        Worker {
            role: role.to_owned(),
            child,
            stdin,
            lines,
            backlog: VecDeque::new(),
        }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the first unconsumed line starting with `prefix`, waiting up to `timeout` for
    /// it. Lines passed over stay unconsumed: a later call or [`Worker::finish`] gets them.
    ///
    /// # Panics
    ///
    /// If no such line comes within `timeout`, or the worker closes its stdout first. (The
    /// worker is then killed when the `Worker` is dropped.)
    pub fn wait_line_prefix(&mut self, prefix: &str, timeout: Duration) -> String {
        if let Some(index) = self.backlog.iter().position(|l| l.starts_with(prefix)) {
            return self
                .backlog
                .remove(index)
                .expect("the index was just found");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => self.backlog.push_back(line),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "worker {:?} (pid {}) printed no line starting with {prefix:?} within {timeout:?}; unconsumed lines: {:#?}",
                    self.role,
                    self.pid(),
                    self.backlog
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait();
                    panic!(
                        "worker {:?} (pid {}) closed stdout ({status:?}) before printing a line starting with {prefix:?}; unconsumed lines: {:#?}",
                        self.role,
                        self.pid(),
                        self.backlog
                    )
                }
            }
        }
    }

    /// Waits (like [`Worker::wait_line_prefix`]) for a `KEY value` line with this key and
    /// returns its value.
    ///
    /// # Panics
    ///
    /// Like [`Worker::wait_line_prefix`].
    pub fn wait_value(&mut self, key: &str, timeout: Duration) -> String {
        let line = self.wait_line_prefix(&format!("{key} "), timeout);
        line[key.len() + 1..].to_owned()
    }

    /// Writes `line` and a newline to the worker's stdin.
    ///
    /// # Panics
    ///
    /// If `line` contains a newline or the worker's stdin is closed (it exited).
    pub fn send_line(&mut self, line: &str) {
        assert!(!line.contains('\n'), "a line has no newline: {line:?}");
        let role = &self.role;
        let pid = self.child.id();
        let stdin = self
            .stdin
            .as_mut()
            .expect("the stdin of a live Worker is open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {line:?} to worker {role:?} (pid {pid}): {e}"));
    }

    /// Kills the worker with SIGKILL (`kill -9`) and reaps it, so it is surely dead when this
    /// returns. Its remaining lines can still be collected with [`Worker::finish`]. Killing a
    /// worker that already exited only reaps it.
    ///
    /// # Panics
    ///
    /// If the process cannot be waited for.
    pub fn kill9(&mut self) -> ExitStatus {
        // On Unix `Child::kill` is SIGKILL; it fails only if the child was already reaped.
        let _ = self.child.kill();
        self.child.wait().expect("a killed worker can be reaped")
    }

    /// Waits up to `timeout` for the worker to exit and returns its unconsumed lines and exit
    /// status. Its stdin stays open until it has exited. Check the status, for example with
    /// [`WorkerOutput::assert_success`].
    ///
    /// # Panics
    ///
    /// If the worker does not exit within `timeout`: it is killed and the lines so far shown.
    pub fn finish(mut self, timeout: Duration) -> WorkerOutput {
        let deadline = Instant::now() + timeout;
        let mut lines: Vec<String> = self.backlog.drain(..).collect();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    self.kill9();
                    panic!(
                        "worker {:?} (pid {}) did not finish within {timeout:?}, killed it; its lines: {lines:#?}",
                        self.role,
                        self.pid()
                    );
                }
            }
        }
        // Stdout is closed, so the process is exiting; bounded polling for its status.
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return WorkerOutput { status, lines },
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    self.kill9();
                    panic!(
                        "worker {:?} (pid {}) closed stdout but did not exit within {timeout:?}, killed it; its lines: {lines:#?}",
                        self.role,
                        self.pid()
                    );
                }
                Err(e) => panic!("cannot wait for worker {:?}: {e}", self.role),
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The start barrier, parent side: waits up to `timeout` (in all) for every worker to print
/// `ready`, then sends `go` to each.
///
/// # Panics
///
/// If a worker is not ready in time.
pub fn ready_then_go(workers: &mut [Worker], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for worker in workers.iter_mut() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = worker.wait_line_prefix("ready", remaining);
        assert_eq!(
            line, "ready",
            "worker {:?} sent a bad ready line",
            worker.role
        );
    }
    for worker in workers.iter_mut() {
        worker.send_line("go");
    }
}

/// This process's worker role, or `None` in a normal test run.
pub fn worker_role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// The worker param `name`, as passed to [`Worker::spawn`].
///
/// # Panics
///
/// If the parent did not pass it.
pub fn worker_param(name: &str) -> String {
    std::env::var(format!("{PARAM_ENV_PREFIX}{name}"))
        .unwrap_or_else(|_| panic!("worker param {name:?} was not passed to Worker::spawn"))
}

/// Writes one protocol line to stdout and flushes it, so the parent sees it at once.
///
/// Lines that libtest could also print are dropped by the parent: keep lines non-empty, not
/// starting with whitespace, `running `, `test `, `failures:` or `successes:`, and not made only
/// of `.`, `F` and `i` (libtest's progress marks).
///
/// # Panics
///
/// If `line` contains a newline or stdout is closed.
pub fn emit(line: &str) {
    assert!(!line.contains('\n'), "a line has no newline: {line:?}");
    // Straight to the stdout handle, which libtest never captures.
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .expect("the parent reads the worker's stdout");
}

/// The start barrier, worker side: emits `ready`, then blocks until the parent sends `go`.
///
/// # Panics
///
/// If the parent sends another line first.
pub fn worker_ready_and_wait_go() {
    emit("ready");
    let line = worker_read_line();
    assert_eq!(line, "go", "the parent sent {line:?} instead of go");
}

/// Blocks until the next line from the parent arrives on stdin, and returns it.
///
/// The first call starts a thread that reads stdin for the rest of the process's life. Once
/// stdin is closed and every line sent before has been read, the parent is gone (its `Worker`
/// was dropped, or the parent process died): this exits the process with [`ORPHAN_EXIT_CODE`]
/// rather than wait forever, so a worker waiting for its parent never outlives the test.
pub fn worker_read_line() -> String {
    static LINES: OnceLock<Mutex<Receiver<String>>> = OnceLock::new();
    let lines = LINES.get_or_init(|| {
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("worker-stdin".to_owned())
            .spawn(move || {
                for line in io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
                // Dropping `sender` here tells `recv` below that no more lines will come.
            })
            .expect("a thread can be spawned to read stdin");
        Mutex::new(receiver)
    });
    let next = lines
        .lock()
        .expect("no reader panics while holding the stdin lock")
        .recv();
    if let Ok(line) = next {
        return line;
    }
    eprintln!(
        "worker {}: stdin closed, the parent is gone; exiting",
        std::process::id()
    );
    std::process::exit(ORPHAN_EXIT_CODE);
}

/// Whether libtest printed `line` (with `-q --nocapture`) rather than the worker.
fn is_libtest_noise(line: &str) -> bool {
    line.trim().is_empty()
        || line.starts_with(char::is_whitespace)
        || line.chars().all(|c| matches!(c, '.' | 'F' | 'i'))
        || line.starts_with("running ")
        || line.starts_with("test ")
        || line.starts_with("failures:")
        || line.starts_with("successes:")
}
