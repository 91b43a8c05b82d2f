//! `herdlock`: a thin command line over the library, for shell scripts and cron jobs.
//!
//! ```text
//! herdlock --url redis://127.0.0.1/ once nightly-import -- ./import.sh   # run unless running elsewhere
//! herdlock --url redis://127.0.0.1/ lock migrations --wait 60 -- ./migrate.sh
//! herdlock --url redis://127.0.0.1/ status nightly-import
//! ```
//!
//! Exit codes: the command's own code when it ran; 75 (`EX_TEMPFAIL`) when the lock was
//! busy (`once`) or the wait timed out (`lock`); 69 (`EX_UNAVAILABLE`) when Redis could not
//! be reached; 77 (`EX_NOPERM`) when the Redis user lacks a permission herdlock needs; 78
//! (`EX_CONFIG`) when the server may evict keys (see `--allow-eviction`); 64 (`EX_USAGE`)
//! for bad arguments.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use herdlock::{Herd, LockOptions, TryLock};

/// Run commands once across machines, coordinated by Redis.
#[derive(Debug, Parser)]
#[command(name = "herdlock", version)]
struct Cli {
    /// Redis URL (`redis://[user:password@]host:port[/db]`); defaults to `$REDIS_URL`.
    #[arg(long, env = "REDIS_URL")]
    url: String,
    /// Key prefix.
    #[arg(long, default_value = "herdlock")]
    prefix: String,
    /// Owner label stamped on locks (default: `<hostname>.<pid>`).
    #[arg(long)]
    owner: Option<String>,
    /// Run even if Redis may evict keys (a maxmemory-policy other than noeviction), which
    /// can evict a held lock.
    #[arg(long)]
    allow_eviction: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run COMMAND under the lock KEY if nobody holds it; exit 75 at once if someone does.
    Once {
        /// The lock's key.
        key: String,
        /// Lock TTL in seconds (the lock is kept alive while COMMAND runs).
        #[arg(long, default_value_t = 30)]
        ttl: u64,
        /// Keep the lock this many seconds after COMMAND succeeds.
        #[arg(long, default_value_t = 0)]
        grace: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Wait up to --wait seconds for the lock KEY, then run COMMAND under it.
    Lock {
        /// The lock's key.
        key: String,
        /// How long to wait for the lock, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Lock TTL in seconds (the lock is kept alive while COMMAND runs).
        #[arg(long, default_value_t = 30)]
        ttl: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print who holds KEY, its remaining TTL and its last fencing token.
    Status {
        /// The lock's key.
        key: String,
    },
}

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_TEMPFAIL: u8 = 75;
const EX_NOPERM: u8 = 77;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herdlock: cannot start a runtime: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let mut builder = Herd::builder()
        .prefix(cli.prefix)
        .allow_eviction(cli.allow_eviction);
    if let Some(owner) = cli.owner {
        builder = builder.owner(owner);
    }
    let herd = match builder.connect(&cli.url).await {
        Ok(herd) => herd,
        Err(e) => return fail(&e),
    };
    match cli.command {
        Command::Status { key } => match herd.lock_status(&key).await {
            Ok(status) => {
                match status.holder {
                    Some(h) => println!(
                        "held by {} (fence {}, {} ms left)",
                        h.owner,
                        h.fence,
                        h.remaining.map_or(0, |r| r.as_millis())
                    ),
                    None => println!("free"),
                }
                println!("last fence {}", status.last_fence);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Once {
            key,
            ttl,
            grace,
            command,
        } => {
            let options = LockOptions::new()
                .ttl(Duration::from_secs(ttl))
                .grace(Duration::from_secs(grace));
            match herd.try_lock_with(&key, &options).await {
                Ok(TryLock::Acquired(guard)) => {
                    let code = run_command(command).await;
                    finish(guard, code).await
                }
                Ok(TryLock::Busy(holder)) => {
                    eprintln!("herdlock: `{key}` is held by {}; not running", holder.owner);
                    ExitCode::from(EX_TEMPFAIL)
                }
                Err(e) => fail(&e),
            }
        }
        Command::Lock {
            key,
            wait,
            ttl,
            command,
        } => {
            let options = LockOptions::new().ttl(Duration::from_secs(ttl));
            match herd
                .lock_with(&key, Duration::from_secs(wait), &options)
                .await
            {
                Ok(guard) => {
                    let code = run_command(command).await;
                    finish(guard, code).await
                }
                Err(e) => fail(&e),
            }
        }
    }
}

/// Runs the command on a blocking thread (the lock's watchdog keeps renewing meanwhile).
async fn run_command(command: Vec<String>) -> u8 {
    let joined = tokio::task::spawn_blocking(move || {
        let (program, args) = command.split_first()?;
        let status = std::process::Command::new(program).args(args).status();
        Some(status)
    })
    .await;
    match joined {
        Ok(Some(Ok(status))) => status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
        Ok(Some(Err(e))) => {
            eprintln!("herdlock: cannot run the command: {e}");
            127
        }
        Ok(None) => EX_USAGE,
        Err(_) => 1,
    }
}

async fn finish(guard: herdlock::LockGuard, code: u8) -> ExitCode {
    if let Err(e) = guard.release().await {
        eprintln!("herdlock: releasing the lock failed: {e}");
    }
    ExitCode::from(code)
}

fn fail(e: &herdlock::Error) -> ExitCode {
    eprintln!("herdlock: {e}");
    if e.is_timeout() {
        ExitCode::from(EX_TEMPFAIL)
    } else if e.is_invalid_input() {
        ExitCode::from(EX_USAGE)
    } else if e.kind() == herdlock::ErrorKind::Permission {
        ExitCode::from(EX_NOPERM)
    } else if e.kind() == herdlock::ErrorKind::ServerConfig {
        ExitCode::from(EX_CONFIG)
    } else {
        ExitCode::from(EX_UNAVAILABLE)
    }
}
