//! Exit codes (README.md, "The `herdlock` command", has the same table) and error reports.
//!
//! | code | meaning |
//! |---|---|
//! | COMMAND's own | COMMAND ran (with `--fanout`: the leader's, on every caller) |
//! | 128 + n | COMMAND was killed by signal n, or herdlock got SIGTERM/SIGINT (n), forwarded it to COMMAND's process group and waited for it |
//! | 64 | bad arguments |
//! | 69 | Redis unreachable, credentials refused, or a Redis error |
//! | 70 | an internal failure (no runtime, no signal handler, a leader that could not start COMMAND) |
//! | 74 | `--fanout` follower: the leader's output was over `--max-output`, or incomplete |
//! | 75 | busy (`once`, `semaphore` without `--wait`) or the wait timed out |
//! | 76 | the lock or permit was lost while COMMAND ran; COMMAND's process group got SIGKILL |
//! | 77 | the Redis user lacks a permission herdlock needs |
//! | 78 | Redis may evict keys (see `--allow-eviction`) |
//! | 126 / 127 | COMMAND could not be executed / was not found |

use std::error::Error as _;
use std::process::ExitCode;

/// `EX_USAGE`: bad arguments.
pub(crate) const USAGE: u8 = 64;
/// `EX_UNAVAILABLE`: Redis unreachable or failing.
pub(crate) const UNAVAILABLE: u8 = 69;
/// `EX_SOFTWARE`: an internal failure.
pub(crate) const SOFTWARE: u8 = 70;
/// `EX_IOERR`: a follower could not be given the leader's output (over the cap).
pub(crate) const IOERR: u8 = 74;
/// `EX_TEMPFAIL`: busy, or the wait timed out.
pub(crate) const TEMPFAIL: u8 = 75;
/// The lock or permit was lost while COMMAND ran (herdlock's own meaning of 76).
pub(crate) const LOST: u8 = 76;
/// `EX_NOPERM`: the Redis user lacks a permission.
pub(crate) const NOPERM: u8 = 77;
/// `EX_CONFIG`: the server may evict keys.
pub(crate) const CONFIG: u8 = 78;
/// A shell's "cannot execute".
const CANNOT_EXECUTE: u8 = 126;
/// A shell's "not found".
const NOT_FOUND: u8 = 127;

/// A clap error: `--help` and `--version` exit 0, anything else [`USAGE`].
pub(crate) fn usage(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    match e.kind() {
        clap::error::ErrorKind::DisplayHelp
        | clap::error::ErrorKind::DisplayVersion
        | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => ExitCode::SUCCESS,
        _ => ExitCode::from(USAGE),
    }
}

/// herdlock got signal `n` before COMMAND ran: nothing to forward.
pub(crate) fn signaled(n: i32) -> ExitCode {
    ExitCode::from(crate::child::signal_code(n))
}

/// The lock was lost while COMMAND ran.
pub(crate) fn lock_lost(key: &str) -> ExitCode {
    eprintln!(
        "herdlock: lost the lock `{key}` while the command ran (not renewed in time, or taken \
         over); the command's process group was killed"
    );
    ExitCode::from(LOST)
}

/// COMMAND could not be started.
pub(crate) fn spawn_failed(e: &std::io::Error) -> ExitCode {
    eprintln!("herdlock: cannot run the command: {e}");
    match e.kind() {
        std::io::ErrorKind::NotFound => ExitCode::from(NOT_FOUND),
        std::io::ErrorKind::PermissionDenied => ExitCode::from(CANNOT_EXECUTE),
        _ => ExitCode::from(SOFTWARE),
    }
}

/// Prints `e` with its cause chain (one `caused by:` line per source) and returns its exit
/// code.
pub(crate) fn error(e: &herdlock::Error, secret: &Secret) -> ExitCode {
    eprintln!("herdlock: {}", secret.redact(&e.to_string()));
    let mut printed = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their source's text in their own; say each thing once.
        if !text.is_empty() && !printed.contains(&text) {
            eprintln!("  caused by: {}", secret.redact(&text));
            printed = text;
        }
        source = cause.source();
    }
    if let Some(job) = e.job_error() {
        if let Some(detail) = job.detail() {
            eprintln!("  detail: {}", secret.redact(&detail.to_string()));
        }
    }
    ExitCode::from(code_of(e))
}

fn code_of(e: &herdlock::Error) -> u8 {
    use herdlock::ErrorKind;
    match e.kind() {
        ErrorKind::Timeout => TEMPFAIL,
        ErrorKind::InvalidInput => USAGE,
        ErrorKind::Permission => NOPERM,
        ErrorKind::ServerConfig => CONFIG,
        ErrorKind::LockLost => LOST,
        _ if e.is_job_failure() => SOFTWARE,
        _ => UNAVAILABLE,
    }
}

/// The password in the Redis URL, kept out of everything herdlock prints.
#[derive(Debug)]
pub(crate) struct Secret(Option<String>);

impl Secret {
    /// The password of `redis://user:password@host/` (of each such part of a cluster URL).
    pub(crate) fn of_url(url: &str) -> Secret {
        let password = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| password.to_owned())
            .filter(|p| !p.is_empty());
        Secret(password)
    }

    pub(crate) fn redact(&self, text: &str) -> String {
        match &self.0 {
            Some(password) => text.replace(password.as_str(), "***"),
            None => text.to_owned(),
        }
    }
}
