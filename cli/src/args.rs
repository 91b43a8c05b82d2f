//! The command line's arguments (clap) and its duration parser.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The shortest lock TTL (and permit lease) the command line accepts. The watchdog renews a
/// lease every third of its TTL across a network round trip; a lease shorter than this is
/// always a mistake (`--ttl 1` meant seconds, and it is: integers are seconds).
pub(crate) const MIN_TTL: Duration = Duration::from_secs(1);

/// Run commands once across machines, coordinated by Redis.
///
/// Durations take a unit (`750ms`, `30s`, `10m`, `1h30m`); a bare integer is seconds.
#[derive(Debug, Parser)]
#[command(
    name = "herdlock",
    version,
    after_help = "Exit codes: COMMAND's own when it ran (with --fanout, the run's, on every caller); \
128+n when COMMAND was killed by signal n or herdlock got SIGTERM/SIGINT and forwarded it; \
64 bad arguments; 69 Redis unreachable or failing; 70 internal failure; 74 --fanout output \
over --max-output; 75 busy or the wait timed out; 76 the lock was lost while COMMAND ran; \
77 Redis permission missing; 78 Redis may evict keys; 126/127 COMMAND not executable/not found."
)]
pub(crate) struct Cli {
    /// Redis URL (`redis://[user:password@]host:port[/db]`; `redis+cluster://h1:p1,h2:p2/`
    /// for a cluster); defaults to `$REDIS_URL`, whose value is never printed.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub(crate) url: String,
    /// Key prefix.
    #[arg(long, default_value = "herdlock")]
    pub(crate) prefix: String,
    /// Owner label stamped on locks (default: `<hostname>.<pid>`).
    #[arg(long)]
    pub(crate) owner: Option<String>,
    /// Run even if Redis may evict keys (a maxmemory-policy other than noeviction), which
    /// can evict a held lock.
    #[arg(long)]
    pub(crate) allow_eviction: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run COMMAND under the lock KEY if nobody holds it; exit 75 at once if someone does.
    Once {
        /// The lock's key.
        key: String,
        /// Keep the lock this long after COMMAND succeeds (exit 0), so a late duplicate
        /// trigger skips too; a failed COMMAND releases the lock at once.
        #[arg(long, default_value = "0s", value_parser = parse_grace, conflicts_with = "fanout")]
        grace: Duration,
        /// With --fanout: how long a caller that finds the run going waits for it.
        #[arg(long, default_value = "1h", value_parser = parse_wait, requires = "fanout")]
        wait: Duration,
        #[command(flatten)]
        fanout: FanoutArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Wait up to --wait for the lock KEY, then run COMMAND under it.
    Lock {
        /// The lock's key.
        key: String,
        /// How long to wait for the lock (with --fanout: for the run going elsewhere).
        #[arg(long, default_value = "60s", value_parser = parse_wait)]
        wait: Duration,
        #[command(flatten)]
        fanout: FanoutArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run COMMAND holding one of --permits permits of the semaphore KEY.
    Semaphore {
        /// The semaphore's key.
        key: String,
        /// How many holders the semaphore admits at once (every caller must agree).
        #[arg(long)]
        permits: u32,
        /// How long to wait for a permit; without it, exit 75 at once when all are held.
        #[arg(long, value_parser = parse_wait)]
        wait: Option<Duration>,
        /// Hand permits out in arrival order.
        #[arg(long)]
        fair: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Print who holds KEY, its fence and TTL left, and the last fencing token.
    Status {
        /// The lock's key.
        key: String,
        /// One JSON object on stdout, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List what is held under the prefix: locks, fan-out runs and semaphore permits (found
    /// with SCAN, never KEYS).
    List {
        /// One JSON array on stdout, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Break the lock (or fan-out run) KEY, whoever holds it, printing who did.
    Release {
        /// The lock's key.
        key: String,
        /// Required: the holder is not asked, and learns it lost the lock at its next
        /// renewal.
        #[arg(long)]
        force: bool,
    },
}

/// What every command that runs COMMAND takes.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Lock TTL (permit lease for `semaphore`), at least 1s; the lock is kept alive while
    /// COMMAND runs, so this only bounds how long a crashed herdlock blocks the others.
    #[arg(long, default_value = "30s", value_parser = parse_ttl)]
    pub(crate) ttl: Duration,
    /// On SIGTERM or SIGINT, how long COMMAND's process group may take to exit after the
    /// signal is forwarded, before it gets SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) kill_after: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

/// `--fanout` and its cap.
#[derive(Debug, Args)]
pub(crate) struct FanoutArgs {
    /// One run for every caller: callers that find the run going do not run COMMAND; when
    /// it ends they print its stdout and stderr and exit with its exit code.
    #[arg(long)]
    pub(crate) fanout: bool,
    /// With --fanout: the most output (stdout and stderr together, in bytes) the run may
    /// leave for the others; over it they get an error (exit 74), never part of it.
    #[arg(
        long,
        default_value_t = crate::output::DEFAULT_MAX_OUTPUT,
        value_parser = parse_max_output,
        requires = "fanout"
    )]
    pub(crate) max_output: usize,
}

/// A duration in human form (`750ms`, `30s`, `10m`, `1h30m`) or a bare integer of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| format!("{text:?}: {e}"));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write `750ms`, `30s`, `10m`, `1h30m` or seconds")
    })
}

/// `--max-output`: bytes, at most [`crate::output::MAX_MAX_OUTPUT`].
fn parse_max_output(text: &str) -> Result<usize, String> {
    let bytes: usize = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a number of bytes ({e})"))?;
    if bytes > crate::output::MAX_MAX_OUTPUT {
        return Err(format!(
            "--max-output must be at most {} bytes (the run travels through Redis to every caller)",
            crate::output::MAX_MAX_OUTPUT
        ));
    }
    Ok(bytes)
}

/// A lock TTL: at least [`MIN_TTL`], at most the library's limit. Never zero: a lock
/// without expiry would outlive a crashed herdlock.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < MIN_TTL {
        return Err(format!(
            "a TTL must be at least {} (got {})",
            humantime::format_duration(MIN_TTL),
            humantime::format_duration(ttl)
        ));
    }
    if ttl > herdlock::limits::MAX_TTL {
        return Err(format!(
            "a TTL must be at most {}",
            humantime::format_duration(herdlock::limits::MAX_TTL)
        ));
    }
    Ok(ttl)
}

/// A grace period: zero (none) up to the library's TTL limit.
fn parse_grace(text: &str) -> Result<Duration, String> {
    let grace = parse_duration(text)?;
    if grace > herdlock::limits::MAX_TTL {
        return Err(format!(
            "a grace period must be at most {}",
            humantime::format_duration(herdlock::limits::MAX_TTL)
        ));
    }
    Ok(grace)
}

/// A wait: more than zero (`once` is the command that does not wait), up to the library's
/// limit.
fn parse_wait(text: &str) -> Result<Duration, String> {
    let wait = parse_duration(text)?;
    if wait.is_zero() {
        return Err("a wait must be longer than zero (`once` does not wait)".to_owned());
    }
    if wait > herdlock::limits::MAX_WAIT {
        return Err(format!(
            "a wait must be at most {}",
            humantime::format_duration(herdlock::limits::MAX_WAIT)
        ));
    }
    Ok(wait)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn durations_take_units_and_bare_seconds() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("750ms"), Ok(Duration::from_millis(750)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn ttls_below_the_minimum_and_zero_waits_are_refused() {
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("999ms").is_err());
        assert_eq!(parse_ttl("1"), Ok(Duration::from_secs(1)));
        assert!(parse_ttl("8d").is_err());
        assert!(parse_wait("0ms").is_err());
        assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
    }
}
