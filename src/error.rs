//! The one error type of the crate: [`Error`], with its [`ErrorKind`].

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use crate::codec::JobError;

/// A specialized `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, for callers that branch on it.
///
/// Contention ("held by someone else") is deliberately *not* a kind: the `try_*` and `once`
/// forms report it as an ordinary value ([`TryLock::Busy`](crate::TryLock::Busy),
/// [`Outcome::Busy`](crate::Outcome::Busy)), so it can never be confused with an infrastructure
/// failure.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An argument was rejected before anything was sent: an empty or oversized key, a zero
    /// or absurd duration, an invalid option.
    InvalidInput,
    /// The caller's own deadline passed while it waited (the `wait` or `timeout` argument
    /// of the call). A job stopped by its [`max_duration`](crate::FanoutOptions::max_duration)
    /// is [`JobTimedOut`](ErrorKind::JobTimedOut) instead.
    Timeout,
    /// The lock (or run) this handle held has expired or was taken over by another holder.
    LockLost,
    /// Redis could not be reached, the connection dropped, or a command did not answer in
    /// time.
    Connection,
    /// Redis refused the credentials (wrong password, unknown ACL user, missing `AUTH`).
    Auth,
    /// Redis answered with an error or an unexpected reply (a script error, a
    /// malformed value under one of herdlock's keys).
    Redis,
    /// A value could not be serialized or deserialized, or a stored envelope was malformed.
    Codec,
    /// A job returned an error: a fan-out job (every caller gets it, with the
    /// [`JobError`] in [`Error::job_error`]), or the work of [`Herd::once`](crate::Herd::once)
    /// or [`Herd::run_locked`](crate::Herd::run_locked) (with the original error as the
    /// [`source`](std::error::Error::source)). The message is the job's.
    JobFailed,
    /// A fan-out job panicked. (The work of `once` and `run_locked` runs in the caller's task,
    /// so its panic resumes there instead.)
    JobPanicked,
    /// A fan-out job ran past its [`max_duration`](crate::FanoutOptions::max_duration) and
    /// was stopped; every caller of the run gets this, whatever its own deadline.
    JobTimedOut,
    /// The run this caller waited for was abandoned before it produced a result.
    Abandoned,
    /// Too few replicas acknowledged an acquisition (see
    /// [`LockOptions::replicas`](crate::LockOptions::replicas)); it was released.
    NotReplicated,
    /// The Redis user may not do something herdlock needs: run one of its commands, or use
    /// the keys or channels under the herd's prefix (ACL rules). From `connect`, the message
    /// names everything missing and the `ACL SETUSER` rule that grants it; later (a right
    /// revoked while running), the step that was refused changed nothing.
    Permission,
    /// The Redis server is configured in a way herdlock cannot run safely on: an eviction
    /// policy other than `noeviction`, which could evict a held lock (see
    /// [`Builder::allow_eviction`](crate::Builder::allow_eviction)).
    ServerConfig,
    /// The herd is shutting down ([`Herd::shutdown`](crate::Herd::shutdown)): it takes no
    /// new acquisitions or runs, its waits end, and a lock it released on the way out is
    /// reported with this kind to its holder.
    ShuttingDown,
}

impl ErrorKind {
    /// A stable `snake_case` name for the kind (`"timeout"`, `"lock_lost"`, …): the
    /// [code](crate::JobError::code) a job's error gets when it is a herdlock error.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Timeout => "timeout",
            ErrorKind::LockLost => "lock_lost",
            ErrorKind::Connection => "connection",
            ErrorKind::Auth => "auth",
            ErrorKind::Redis => "redis",
            ErrorKind::Codec => "codec",
            ErrorKind::JobFailed => "job_failed",
            ErrorKind::JobPanicked => "job_panicked",
            ErrorKind::JobTimedOut => "job_timed_out",
            ErrorKind::Abandoned => "abandoned",
            ErrorKind::NotReplicated => "not_replicated",
            ErrorKind::Permission => "permission",
            ErrorKind::ServerConfig => "server_config",
            ErrorKind::ShuttingDown => "shutting_down",
        }
    }

    /// The kind [`as_str`](ErrorKind::as_str) names.
    pub(crate) fn from_code(code: &str) -> Option<ErrorKind> {
        ALL_KINDS.iter().copied().find(|k| k.as_str() == code)
    }
}

const ALL_KINDS: [ErrorKind; 15] = [
    ErrorKind::InvalidInput,
    ErrorKind::Timeout,
    ErrorKind::LockLost,
    ErrorKind::Connection,
    ErrorKind::Auth,
    ErrorKind::Redis,
    ErrorKind::Codec,
    ErrorKind::JobFailed,
    ErrorKind::JobPanicked,
    ErrorKind::JobTimedOut,
    ErrorKind::Abandoned,
    ErrorKind::NotReplicated,
    ErrorKind::Permission,
    ErrorKind::ServerConfig,
    ErrorKind::ShuttingDown,
];

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error type of every fallible herdlock call.
///
/// It is opaque: match on [`kind`](Error::kind) or use the predicates. It is `Clone` (its
/// source sits behind an `Arc`) because one fan-out outcome reaches many waiters.
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn StdError + Send + Sync>>,
    job: Option<JobError>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: None,
                job: None,
            }),
        }
    }

    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Error {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: Some(Arc::new(source)),
                job: None,
            }),
        }
    }

    /// An error carrying what a fan-out job reported.
    pub(crate) fn job(kind: ErrorKind, message: impl Into<String>, job: JobError) -> Error {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: job.source_error().cloned(),
                job: Some(job),
            }),
        }
    }

    /// What the fan-out job reported (message, code, detail), when this error is a job's
    /// failure, panic or rejected result, as received by every waiter.
    pub fn job_error(&self) -> Option<&JobError> {
        self.inner.job.as_ref()
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Maps a redis-rs error, naming the operation that failed and what the server (or the
    /// connection) said: a server error's code and message (`OOM command not allowed …`,
    /// `NOPERM …`, a script error), else redis-rs's description.
    pub(crate) fn redis(what: &str, err: redis::RedisError) -> Error {
        let kind = redis_kind(&err);
        let said = match (err.code(), err.detail()) {
            (Some(code), Some(detail)) => format!("{code} {detail}"),
            (Some(code), None) => code.to_owned(),
            _ => err.to_string(),
        };
        let message = match kind {
            ErrorKind::Auth => format!("redis rejected the credentials during {what}: {said}"),
            ErrorKind::Connection => format!("redis connection failed during {what}: {said}"),
            ErrorKind::Permission => format!("redis refused a permission during {what}: {said}"),
            _ => format!("redis returned an error during {what}: {said}"),
        };
        Error::with_source(kind, message, err)
    }

    /// The same error with `hint` appended to its message.
    pub(crate) fn with_hint(&self, hint: &str) -> Error {
        Error {
            inner: Arc::new(Inner {
                kind: self.inner.kind,
                message: format!("{}{hint}", self.inner.message),
                source: self.inner.source.clone(),
                job: self.inner.job.clone(),
            }),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The caller's own wait deadline passed ([`ErrorKind::Timeout`]). Not a job stopped by
    /// its maximum duration: that is [`is_job_failure`](Error::is_job_failure).
    pub fn is_timeout(&self) -> bool {
        self.kind() == ErrorKind::Timeout
    }

    /// The lock or run was lost to expiry or to another holder.
    pub fn is_lock_lost(&self) -> bool {
        self.kind() == ErrorKind::LockLost
    }

    /// Redis was unreachable, the connection dropped, or a command did not answer in time
    /// ([`ErrorKind::Connection`]): worth retrying later. Refused credentials are not a
    /// connection failure (retrying does not help): see [`is_auth`](Error::is_auth).
    ///
    /// The predicates are disjoint: at most one of `is_timeout`, `is_lock_lost`,
    /// `is_connection`, `is_auth`, `is_invalid_input`, `is_job_failure` and
    /// `is_shutting_down` is true.
    pub fn is_connection(&self) -> bool {
        self.kind() == ErrorKind::Connection
    }

    /// Redis refused the credentials ([`ErrorKind::Auth`]).
    pub fn is_auth(&self) -> bool {
        self.kind() == ErrorKind::Auth
    }

    /// The herd is shutting down ([`ErrorKind::ShuttingDown`]).
    pub fn is_shutting_down(&self) -> bool {
        self.kind() == ErrorKind::ShuttingDown
    }

    /// The caller passed an argument herdlock rejects.
    pub fn is_invalid_input(&self) -> bool {
        self.kind() == ErrorKind::InvalidInput
    }

    /// A job failed, panicked or exceeded its maximum duration ([`ErrorKind::JobFailed`],
    /// [`ErrorKind::JobPanicked`], [`ErrorKind::JobTimedOut`]). A result rejected by its
    /// codec is [`ErrorKind::Codec`], not a job failure, though it carries a
    /// [`job_error`](Error::job_error) too.
    pub fn is_job_failure(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::JobFailed | ErrorKind::JobPanicked | ErrorKind::JobTimedOut
        )
    }

    /// The message without the source chain (what [`Display`](fmt::Display) prints).
    pub fn message(&self) -> &str {
        &self.inner.message
    }
}

fn redis_kind(err: &redis::RedisError) -> ErrorKind {
    use redis::ErrorKind as K;
    let text = err.to_string();
    if err.kind() == K::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("invalid password")
        || text.contains("invalid username-password")
    {
        return ErrorKind::Auth;
    }
    // An ACL refusal: `NOPERM` for a command sent directly; inside a script, Redis reports
    // it as a script error ("The user executing the script can't ..."), Valkey as "ACL
    // failure in script: User … has no permissions to run …".
    if err.kind() == K::Server(redis::ServerErrorKind::NoPerm)
        || text.contains("user executing the script can't")
        || text.contains("ACL failure in script")
    {
        return ErrorKind::Permission;
    }
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.kind() == K::Io
    {
        return ErrorKind::Connection;
    }
    ErrorKind::Redis
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("message", &self.inner.message);
        if let Some(source) = &self.inner.source {
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn StdError + 'static))
    }
}

/// Errors a codec or envelope check raises inside the crate; turned into [`Error`] at the
/// boundary. Kept separate so `source()` carries the precise cause.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[cfg(feature = "bincode")]
    #[error("bincode encode: {0}")]
    BincodeEncode(#[from] bincode::error::EncodeError),
    #[cfg(feature = "bincode")]
    #[error("bincode decode: {0}")]
    BincodeDecode(#[from] bincode::error::DecodeError),
    #[error("{0}")]
    Malformed(String),
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn predicates_are_disjoint_and_codes_round_trip() {
        for kind in ALL_KINDS {
            let e = Error::new(kind, "x");
            let true_ones = [
                e.is_timeout(),
                e.is_lock_lost(),
                e.is_connection(),
                e.is_auth(),
                e.is_invalid_input(),
                e.is_job_failure(),
                e.is_shutting_down(),
            ]
            .into_iter()
            .filter(|p| *p)
            .count();
            assert!(true_ones <= 1, "{kind:?}: {true_ones} predicates");
            assert_eq!(ErrorKind::from_code(kind.as_str()), Some(kind));
        }
        assert!(Error::new(ErrorKind::Auth, "x").is_auth());
        assert!(!Error::new(ErrorKind::Auth, "x").is_connection());
        assert!(Error::new(ErrorKind::JobTimedOut, "x").is_job_failure());
    }
}
