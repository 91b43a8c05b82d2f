//! `herdlock`: a thin command line over the library, for shell scripts and cron jobs.
//!
//! ```text
//! herdlock once nightly-import --grace 5m -- ./import.sh   # run unless running elsewhere
//! herdlock lock migrations --wait 60 -- ./migrate.sh       # wait for the lock, then run
//! herdlock lock report --fanout -- ./report.sh             # one run; the others print its output
//! herdlock semaphore exports --permits 2 --wait 10m -- ./export.sh
//! herdlock status nightly-import --json
//! herdlock list
//! herdlock release nightly-import --force
//! ```
//!
//! The Redis URL comes from `--url` or `$REDIS_URL` (never printed: `--help` hides it).
//! Exit codes are the [`exit`] module's; README.md has the table.

mod args;
mod child;
mod exit;
mod output;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use herdlock::{FanoutOptions, Herd, LockOptions, Role, SemaphoreOptions, TryPermit};

use args::{Cli, Command, FanoutArgs, RunArgs};
use child::{Ended, Signals};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit::usage(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herdlock: cannot start a runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let secret = exit::Secret::of_url(&cli.url);
    // Listen before anything runs: a signal from here on is ours to forward, not a kill.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("herdlock: cannot listen for signals: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let mut builder = Herd::builder()
        .prefix(cli.prefix)
        .allow_eviction(cli.allow_eviction);
    if let Some(owner) = cli.owner {
        builder = builder.owner(owner);
    }
    let connected = tokio::select! {
        connected = builder.connect(&cli.url) => connected,
        signal = signals.recv() => return exit::signaled(signal),
    };
    let herd = match connected {
        Ok(herd) => herd,
        Err(e) => return exit::error(&e, &secret),
    };
    let code = match cli.command {
        Command::Status { key, json } => status(&herd, &key, json).await,
        Command::List { json } => list(&herd, json).await,
        Command::Release { key, force } => release(&herd, &key, force).await,
        Command::Once {
            key,
            grace,
            wait,
            fanout,
            run,
        } => {
            if fanout.fanout {
                fanned(&herd, &key, wait, &fanout, run, &mut signals).await
            } else {
                once(&herd, &key, grace, run, &mut signals).await
            }
        }
        Command::Lock {
            key,
            wait,
            fanout,
            run,
        } => {
            if fanout.fanout {
                fanned(&herd, &key, wait, &fanout, run, &mut signals).await
            } else {
                lock(&herd, &key, wait, run, &mut signals).await
            }
        }
        Command::Semaphore {
            key,
            permits,
            wait,
            fair,
            run,
        } => semaphore(&herd, &key, permits, wait, fair, run, &mut signals).await,
    };
    // A run cancelled under us (a lost lock) killed its command: reap it before exiting.
    child::reap_dropped(Duration::from_secs(5)).await;
    match code {
        Ok(code) => code,
        Err(e) => exit::error(&e, &secret),
    }
}

/// `once`: run under the lock if it is free; grace only after the command succeeded (the
/// library's `once`: a failed command releases at once, so a retry may run).
async fn once(
    herd: &Herd,
    key: &str,
    grace: Duration,
    run: RunArgs,
    signals: &mut Signals,
) -> herdlock::Result<ExitCode> {
    let options = LockOptions::new().ttl(run.ttl).grace(grace);
    let kill_after = run.kill_after;
    let command = run.command;
    // How the command ended, when it ran to an end here.
    let mut ended: Option<std::io::Result<Ended>> = None;
    // The work runs inside `once_with`, which keeps the grace only when it succeeds, and
    // cancels it (dropping the child, whose whole process group then gets SIGKILL) as soon
    // as the lock is lost.
    let outcome = herd
        .once_with(key, &options, || async {
            let result = child::run(&command, std::future::pending(), signals, kill_after).await;
            let succeeded = matches!(result, Ok(Ended::Exited(0)));
            ended = Some(result);
            if succeeded {
                Ok(())
            } else {
                Err(herdlock::JobError::new("the command did not succeed"))
            }
        })
        .await;
    Ok(match (outcome, ended) {
        (Ok(herdlock::Outcome::Ran(())), _) => ExitCode::SUCCESS,
        (Ok(herdlock::Outcome::Busy(holder)), _) => {
            eprintln!(
                "herdlock: `{key}` is held by {} (fence {}); not running",
                holder.owner, holder.fence
            );
            ExitCode::from(exit::TEMPFAIL)
        }
        (Err(_), Some(Ok(ended))) => ended.exit_code(),
        (Err(_), Some(Err(e))) => exit::spawn_failed(&e),
        (Err(e), None) if e.is_lock_lost() => exit::lock_lost(key),
        (Err(e), None) => return Err(e),
    })
}

/// A signal while waiting (no command runs yet): shut the herd down, which ends the wait
/// and releases anything an acquisition cut off by the signal won (instead of leaving it
/// to its TTL), then exit 128 + n.
async fn interrupted(herd: &Herd, signal: i32) -> ExitCode {
    if let Err(e) = herd.shutdown(Duration::ZERO).await {
        eprintln!("herdlock: shutting down after the signal: {e}");
    }
    exit::signaled(signal)
}

/// `lock`: wait for the lock, run under it, release it.
async fn lock(
    herd: &Herd,
    key: &str,
    wait: Duration,
    run: RunArgs,
    signals: &mut Signals,
) -> herdlock::Result<ExitCode> {
    let options = LockOptions::new().ttl(run.ttl);
    let acquired = tokio::select! {
        acquired = herd.lock_with(key, wait, &options) => acquired,
        () = status_line(herd, key, wait) => unreachable!("the status line never ends"),
        signal = signals.recv() => return Ok(interrupted(herd, signal).await),
    };
    let guard = acquired?;
    let ended = child::run(&run.command, guard.lost(), signals, run.kill_after).await;
    let lost = guard.is_lost();
    if let Err(e) = guard.release().await {
        if !lost {
            eprintln!("herdlock: releasing the lock failed: {e}");
        }
    }
    Ok(match ended {
        Ok(Ended::Lost) => exit::lock_lost(key),
        Ok(ended) => ended.exit_code(),
        Err(e) => exit::spawn_failed(&e),
    })
}

/// `semaphore`: run holding one of `permits` permits; without `--wait`, exit 75 at once when
/// every permit is held.
async fn semaphore(
    herd: &Herd,
    key: &str,
    permits: u32,
    wait: Option<Duration>,
    fair: bool,
    run: RunArgs,
    signals: &mut Signals,
) -> herdlock::Result<ExitCode> {
    let options = SemaphoreOptions::new().lease(run.ttl).fair(fair);
    let semaphore = herd.semaphore_with(key, permits, &options)?;
    let permit = match wait {
        None => match semaphore.try_acquire().await? {
            TryPermit::Acquired(permit) => permit,
            TryPermit::Busy { in_use } => {
                let owners = match semaphore.status().await {
                    Ok(status) => status
                        .holders
                        .iter()
                        .map(|h| h.owner.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    Err(_) => "unknown holders".to_owned(),
                };
                eprintln!(
                    "herdlock: {in_use} of {permits} permits of `{key}` are held (by {owners}); not running"
                );
                return Ok(ExitCode::from(exit::TEMPFAIL));
            }
        },
        Some(wait) => {
            let acquired = tokio::select! {
                acquired = semaphore.acquire(wait) => acquired,
                () = semaphore_status_line(&semaphore, wait) => unreachable!("never ends"),
                signal = signals.recv() => return Ok(interrupted(herd, signal).await),
            };
            acquired?
        }
    };
    let ended = child::run(&run.command, permit.lost(), signals, run.kill_after).await;
    let lost = permit.is_lost();
    if let Err(e) = permit.release().await {
        if !lost {
            eprintln!("herdlock: releasing the permit failed: {e}");
        }
    }
    Ok(match ended {
        Ok(Ended::Lost) => exit::lock_lost(key),
        Ok(ended) => ended.exit_code(),
        Err(e) => exit::spawn_failed(&e),
    })
}

/// `--fanout`: the first caller runs the command, streaming its output live; callers that
/// find the run going wait for it, then print its captured stdout and stderr and exit with
/// its exit code.
async fn fanned(
    herd: &Herd,
    key: &str,
    wait: Duration,
    fanout: &FanoutArgs,
    run: RunArgs,
    signals: &mut Signals,
) -> herdlock::Result<ExitCode> {
    let cap = fanout.max_output;
    let options = FanoutOptions::new()
        .ttl(run.ttl)
        .max_result_size(output::max_result_size(cap));
    // Set by the job when it runs in this process: then this process leads, whatever the
    // result, and its command's output is streamed live here.
    let led: Arc<Mutex<Led>> = Arc::default();
    let job_led = Arc::clone(&led);
    // The job runs on a task of the herd's, with listeners of its own, made now so that no
    // signal between the job's start and its command's falls through.
    let mut job_signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("herdlock: cannot listen for signals: {e}");
            return Ok(ExitCode::from(exit::SOFTWARE));
        }
    };
    let command = run.command;
    let kill_after = run.kill_after;
    let result = herd.fanout_with(key, wait, &options, move || async move {
        Led::update(&job_led, |led| led.running = true);
        let ran = child::run_captured(&command, cap, &mut job_signals, kill_after).await;
        let (ended, captured) = match ran {
            Ok(ran) => ran,
            Err(e) => {
                let code = exit::spawn_failed(&e);
                Led::update(&job_led, |led| led.code = Some(code));
                return Err(spawn_job_error(&e));
            }
        };
        Led::update(&job_led, |led| led.code = Some(ended.exit_code()));
        captured.into_result(ended.code())
    });
    let mut result = std::pin::pin!(result);
    let result = loop {
        tokio::select! {
            result = &mut result => break result,
            signal = signals.recv() => {
                // A leader's job forwards the signal to its command and finishes the run
                // (its own listener got the signal too); a follower just stops waiting.
                if !Led::update(&led, |led| led.running) {
                    return Ok(interrupted(herd, signal).await);
                }
            }
        }
    };
    let (running, leader_code) = Led::update(&led, |led| (led.running, led.code));
    match result {
        Ok(fanned) if fanned.role == Role::Leader => Ok(leader_code.unwrap_or(ExitCode::SUCCESS)),
        Ok(fanned) => Ok(fanned.value.replay()),
        // The run was cancelled here: the command's process group got SIGKILL.
        Err(e) if running && e.is_lock_lost() => Ok(exit::lock_lost(key)),
        Err(e) => {
            if let Some(code) = leader_code {
                // This process ran the command (and streamed its output); an output over
                // the cap only keeps the followers from getting it.
                if let Some(job) = e.job_error() {
                    if matches!(job.code(), Some(output::TOO_LARGE | output::INCOMPLETE)) {
                        eprintln!("herdlock: {}", job.message());
                    }
                }
                return Ok(code);
            }
            if let Some(code) = output::undeliverable(&e) {
                return Ok(code);
            }
            Err(e)
        }
    }
}

/// Whether this process leads a `--fanout` run, and how its command ended.
#[derive(Debug, Default)]
struct Led {
    running: bool,
    code: Option<ExitCode>,
}

impl Led {
    fn update<T>(led: &Mutex<Led>, f: impl FnOnce(&mut Led) -> T) -> T {
        f(&mut led
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

fn spawn_job_error(e: &std::io::Error) -> herdlock::JobError {
    herdlock::JobError::new(format!("the leader could not run the command: {e}"))
        .with_code("spawn-failed")
}

/// `status`: the holder of KEY, its fence and TTL left, and the last fencing token.
async fn status(herd: &Herd, key: &str, json: bool) -> herdlock::Result<ExitCode> {
    let status = herd.lock_status(key).await?;
    if json {
        let holder = status.holder.as_ref().map(|h| {
            serde_json::json!({
                "owner": h.owner,
                "fence": h.fence.get(),
                "remaining_ms": h.remaining.map(|r| r.as_millis()),
            })
        });
        let value = serde_json::json!({
            "key": key,
            "held": status.holder.is_some(),
            "holder": holder,
            "last_fence": status.last_fence.map_or(0, herdlock::FencingToken::get),
        });
        println!("{value}");
    } else {
        match &status.holder {
            Some(h) => println!(
                "held by {} (fence {}, {} left)",
                h.owner,
                h.fence,
                output::remaining(h.remaining)
            ),
            None => println!("free"),
        }
        println!(
            "last fence {}",
            status.last_fence.map_or(0, herdlock::FencingToken::get)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `list`: every lock, fan-out run and semaphore held under the prefix (found with `SCAN`).
async fn list(herd: &Herd, json: bool) -> herdlock::Result<ExitCode> {
    let entries = herd.list_held().await?;
    let mut rows = Vec::new();
    for entry in &entries {
        match entry.kind {
            herdlock::HeldKind::Lock => {
                let status = herd.lock_status(&entry.key).await?;
                let Some(h) = status.holder else { continue };
                if json {
                    rows.push(serde_json::json!({
                        "kind": "lock",
                        "key": entry.key,
                        "owner": h.owner,
                        "fence": h.fence.get(),
                        "remaining_ms": h.remaining.map(|r| r.as_millis()),
                    }));
                } else {
                    println!(
                        "lock       {}  held by {} (fence {}, {} left)",
                        entry.key,
                        h.owner,
                        h.fence,
                        output::remaining(h.remaining)
                    );
                }
            }
            herdlock::HeldKind::Semaphore => {
                let status = herd.semaphore(&entry.key, 1)?.status().await?;
                if status.holders.is_empty() {
                    continue;
                }
                if json {
                    let holders: Vec<_> = status
                        .holders
                        .iter()
                        .map(|h| {
                            serde_json::json!({
                                "owner": h.owner,
                                "remaining_ms": h.remaining.as_millis(),
                            })
                        })
                        .collect();
                    rows.push(serde_json::json!({
                        "kind": "semaphore",
                        "key": entry.key,
                        "in_use": status.in_use,
                        "queued": status.queued,
                        "holders": holders,
                    }));
                } else {
                    let owners: Vec<&str> =
                        status.holders.iter().map(|h| h.owner.as_str()).collect();
                    println!(
                        "semaphore  {}  {} permit(s) in use by {}, {} queued",
                        entry.key,
                        status.in_use,
                        owners.join(", "),
                        status.queued
                    );
                }
            }
            _ => {}
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `release --force`: break a stuck lock (or fan-out run), printing who held it.
async fn release(herd: &Herd, key: &str, force: bool) -> herdlock::Result<ExitCode> {
    if !force {
        eprintln!(
            "herdlock: `release` breaks the lock of whoever holds `{key}`; say --force to do it"
        );
        return Ok(ExitCode::from(exit::USAGE));
    }
    match herd.force_release(key).await? {
        Some(holder) => println!(
            "released `{key}`, held by {} (fence {}, {} left)",
            holder.owner,
            holder.fence,
            output::remaining(holder.remaining)
        ),
        None => println!("`{key}` was not held"),
    }
    Ok(ExitCode::SUCCESS)
}

/// While waiting for a lock, on a terminal only: one status line on stderr, redrawn every
/// second (who holds it, fence, TTL left, time waited). Never resolves.
async fn status_line(herd: &Herd, key: &str, wait: Duration) {
    if !std::io::stderr().is_terminal() {
        return std::future::pending().await;
    }
    let started = Instant::now();
    // Clears the line when the wait ends (this future is dropped), once one was drawn.
    let mut clear: Option<output::ClearLine> = None;
    loop {
        // Only a wait that lasts gets a line.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = match herd.lock_status(key).await {
            Ok(status) => match status.holder {
                Some(h) => format!(
                    "held by {} (fence {}, {} left)",
                    h.owner,
                    h.fence,
                    output::remaining(h.remaining)
                ),
                None => "free, acquiring".to_owned(),
            },
            Err(e) => format!("status unavailable: {e}"),
        };
        output::draw_status(key, &text, started.elapsed(), wait);
        clear.get_or_insert(output::ClearLine);
    }
}

/// [`status_line`] for a semaphore.
async fn semaphore_status_line(semaphore: &herdlock::Semaphore, wait: Duration) {
    if !std::io::stderr().is_terminal() {
        return std::future::pending().await;
    }
    let started = Instant::now();
    // Clears the line when the wait ends (this future is dropped), once one was drawn.
    let mut clear: Option<output::ClearLine> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = match semaphore.status().await {
            Ok(status) => {
                let owners: Vec<&str> = status.holders.iter().map(|h| h.owner.as_str()).collect();
                format!(
                    "{}/{} permits held by {}, {} queued",
                    status.in_use,
                    semaphore.permits(),
                    owners.join(", "),
                    status.queued
                )
            }
            Err(e) => format!("status unavailable: {e}"),
        };
        output::draw_status(semaphore.key(), &text, started.elapsed(), wait);
        clear.get_or_insert(output::ClearLine);
    }
}
