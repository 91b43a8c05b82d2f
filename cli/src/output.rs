//! What the command line prints: a fan-out run's captured output (kept up to a cap, replayed
//! by followers), durations, and the live status line of a wait.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// `--max-output`'s default: 1 MiB of stdout and stderr together.
pub(crate) const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;

/// The largest `--max-output`: 64 MiB (a result travels through Redis to every follower).
pub(crate) const MAX_MAX_OUTPUT: usize = 64 * 1024 * 1024;

/// The job error code of a run whose output was over the cap.
pub(crate) const TOO_LARGE: &str = "output-over-cap";

/// The job error code of a run whose output was still held open (by a process the command
/// left behind) when herdlock stopped reading it.
pub(crate) const INCOMPLETE: &str = "output-incomplete";

/// A fan-out run as its followers receive it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LeaderRun {
    /// The leader's exit code (the command's, or 128 + a signal).
    code: u8,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl LeaderRun {
    /// Prints the leader's stdout and stderr to ours, and returns its exit code.
    pub(crate) fn replay(&self) -> ExitCode {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&self.stdout).and_then(|()| out.flush());
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&self.stderr).and_then(|()| err.flush());
        ExitCode::from(self.code)
    }
}

/// The fan-out result size that fits `cap` bytes of output: JSON writes a byte as up to 4
/// characters (`255,`).
pub(crate) fn max_result_size(cap: usize) -> usize {
    cap.saturating_mul(4)
        .saturating_add(4096)
        .min(herdlock::limits::MAX_RESULT_SIZE_LIMIT)
}

/// Output captured while it streams, up to a cap over stdout and stderr together.
#[derive(Debug, Clone)]
pub(crate) struct Capture {
    inner: Arc<Mutex<Captured>>,
}

/// What a [`Capture`] kept.
#[derive(Debug, Default)]
pub(crate) struct Captured {
    cap: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Every byte seen, kept or not.
    total: usize,
    /// The pipes were still open when reading stopped.
    incomplete: bool,
}

impl Capture {
    pub(crate) fn new(cap: usize) -> Capture {
        Capture {
            inner: Arc::new(Mutex::new(Captured {
                cap,
                ..Captured::default()
            })),
        }
    }

    /// Copies `from` to `to` as it arrives, keeping what fits under the cap.
    pub(crate) async fn pump(
        &self,
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        is_stdout: bool,
    ) {
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Our own stdout closed (a pipe whose reader left) does not stop the capture.
            let _ = to.write_all(&buf[..n]).await;
            let _ = to.flush().await;
            let mut captured = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            captured.total = captured.total.saturating_add(n);
            if captured.total <= captured.cap {
                if is_stdout {
                    captured.stdout.extend_from_slice(&buf[..n]);
                } else {
                    captured.stderr.extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    pub(crate) fn finish(self) -> Captured {
        let mut captured = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *captured)
    }
}

impl Captured {
    pub(crate) fn mark_incomplete(&mut self) {
        self.incomplete = true;
    }

    /// The run for the followers, or, over the cap or incomplete, the error they get
    /// instead (never a part of the output passed off as all of it).
    pub(crate) fn into_result(self, code: u8) -> Result<LeaderRun, herdlock::JobError> {
        if self.incomplete {
            return Err(herdlock::JobError::new(format!(
                "the run's output is incomplete (a process the command started kept it open \
                 after the command exited), so it is not passed on; the run exited with {code}"
            ))
            .with_code(INCOMPLETE)
            .with_detail(serde_json::json!({ "exit_code": code })));
        }
        if self.total > self.cap {
            return Err(herdlock::JobError::new(format!(
                "the run's output ({} bytes) is over the --max-output cap of {} bytes, so it \
                 is not passed on; the run exited with {code}",
                self.total, self.cap
            ))
            .with_code(TOO_LARGE)
            .with_detail(serde_json::json!({ "exit_code": code, "bytes": self.total })));
        }
        Ok(LeaderRun {
            code,
            stdout: self.stdout,
            stderr: self.stderr,
        })
    }
}

/// A follower's exit when the leader's output was over the cap or incomplete: the message,
/// and [`crate::exit::IOERR`].
pub(crate) fn undeliverable(e: &herdlock::Error) -> Option<ExitCode> {
    let job = e.job_error()?;
    matches!(job.code(), Some(TOO_LARGE | INCOMPLETE)).then(|| {
        eprintln!("herdlock: {}", job.message());
        ExitCode::from(crate::exit::IOERR)
    })
}

/// A remaining TTL for people: `2s 350ms`, or `no expiry`.
pub(crate) fn remaining(left: Option<Duration>) -> String {
    match left {
        Some(left) => humantime::format_duration(Duration::from_millis(
            u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        ))
        .to_string(),
        None => "no expiry".to_owned(),
    }
}

/// Redraws the wait's status line on stderr (a terminal: the caller checked).
pub(crate) fn draw_status(key: &str, text: &str, waited: Duration, wait: Duration) {
    let waited = Duration::from_secs(waited.as_secs());
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r\x1b[Kherdlock: waiting for `{key}` ({} of {}): {text}",
        humantime::format_duration(waited),
        humantime::format_duration(wait)
    );
    let _ = err.flush();
}

/// Clears the status line when the wait ends, however it ends.
#[derive(Debug)]
pub(crate) struct ClearLine;

impl Drop for ClearLine {
    fn drop(&mut self) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
}
