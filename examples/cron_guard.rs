//! A cron guard: the nightly job is scheduled on three hosts (for redundancy) and runs once.
//!
//! ```text
//! cargo run --example cron_guard                                    # in-memory: three "hosts" in this process
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example cron_guard   # three host processes
//! ```
//!
//! Every host's cron fires at the same minute and calls [`once_with`](herdlock::Herd::once_with)
//! on the same key, `nightly-report:<date>`: the first to take the lock runs the job, the
//! others see who holds it and skip. The job keeps the lock for a *grace period* after it
//! finishes, so a host whose cron fires late (a clock a little behind, a slow start, a retry)
//! still skips instead of running the job a second time. Then a late retry shows exactly that.
//!
//! On Redis the three hosts are child processes of this one (`cron_guard host NAME KEY`), as
//! they would be three machines; on the in-memory backend they are three tasks in this
//! process, since the in-memory engine does not cross processes. The key carries a run id in
//! place of the date, so that the demo can run again at once (a real job would use the
//! date, and the grace period would cover the rest of the night).
//!
//! Exits with 1 unless the job ran exactly once.

use std::error::Error as StdError;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herdlock::{Herd, LockOptions, Outcome};
use tokio::io::{AsyncBufReadExt, BufReader};

type BoxError = Box<dyn StdError + Send + Sync>;

const PREFIX: &str = "example-cron-guard";
/// How long the lock is kept after the job succeeded.
const GRACE: Duration = Duration::from_secs(60);

/// The job: a report that takes a moment. It gets the lock's fencing token to pass to
/// whatever it writes, so a write of an older run could be refused.
async fn nightly_report(host: &str, fence: u64) -> std::io::Result<String> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(format!(
        "report written by {host} with fencing token {fence}"
    ))
}

/// One host's cron entry: run the job unless another host runs it or ran it within the
/// grace period. Returns the line this host reports.
async fn cron_entry(herd: &Herd, key: &str) -> Result<String, herdlock::Error> {
    let options = LockOptions::new().ttl(Duration::from_secs(30)).grace(GRACE);
    let host = herd.owner().to_owned();
    let status_herd = herd.clone();
    let status_key = key.to_owned();
    let outcome = herd
        .once_with(key, &options, || async move {
            // The holder is this host: its fence is the token of this run.
            let status = status_herd.lock_status(&status_key).await?;
            let fence = status.holder.map_or(0, |h| h.fence.get());
            Ok(nightly_report(&host, fence).await?)
        })
        .await?;
    Ok(match outcome {
        Outcome::Ran(report) => format!("RAN {}: {report}", herd.owner()),
        Outcome::Busy(holder) => format!(
            "SKIPPED {}: {} holds it (fence {}, {:?} left)",
            herd.owner(),
            holder.owner,
            holder.fence.get(),
            holder.remaining.unwrap_or_default()
        ),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let redis = std::env::var("REDIS_URL").ok();
    if args.first().map(String::as_str) == Some("host") {
        // One host, started by the demo below (or by hand, or by cron).
        let (Some(name), Some(key), Some(url)) = (args.get(1), args.get(2), redis) else {
            eprintln!("usage: REDIS_URL=… cron_guard host NAME KEY");
            std::process::exit(64);
        };
        let herd = Herd::builder()
            .prefix(PREFIX)
            .owner(name)
            .connect(&url)
            .await?;
        println!("{}", cron_entry(&herd, key).await?);
        return Ok(());
    }

    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
    let key = format!("nightly-report:run-{run}");
    let hosts = ["host-a", "host-b", "host-c"];
    let mut lines = Vec::new();
    if let Some(url) = &redis {
        println!("backend: redis at {url}; three host processes, key {key}");
        let mut children = Vec::new();
        for host in hosts {
            children.push(spawn_host(host, &key)?);
        }
        for child in children {
            lines.push(finish_host(child).await?);
        }
        // A late trigger: host-a's cron retries after the job finished.
        lines.push(finish_host(spawn_host("host-a", &key)?).await?);
    } else {
        println!("backend: in-memory; three \"hosts\" are tasks in this process (set REDIS_URL for processes), key {key}");
        let first = Herd::builder().prefix(PREFIX).owner(hosts[0]).memory()?;
        let mut herds = vec![first.clone()];
        for host in &hosts[1..] {
            herds.push(
                Herd::builder()
                    .prefix(PREFIX)
                    .owner(*host)
                    .memory_peer(&first)?,
            );
        }
        let tasks: Vec<_> = herds
            .iter()
            .map(|herd| {
                let (herd, key) = (herd.clone(), key.clone());
                tokio::spawn(async move { cron_entry(&herd, &key).await })
            })
            .collect();
        for task in tasks {
            lines.push(task.await??);
        }
        lines.push(cron_entry(&herds[0], &key).await?);
    }
    for line in &lines {
        println!("{line}");
    }
    let ran = lines.iter().filter(|l| l.starts_with("RAN")).count();
    println!(
        "the nightly job ran {ran} time(s) on 3 hosts; the late retry was {}",
        if lines.last().is_some_and(|l| l.starts_with("SKIPPED")) {
            "skipped (grace period)"
        } else {
            "NOT skipped"
        }
    );
    if ran != 1 {
        std::process::exit(1);
    }
    Ok(())
}

fn spawn_host(name: &str, key: &str) -> Result<tokio::process::Child, BoxError> {
    Ok(tokio::process::Command::new(std::env::current_exe()?)
        .args(["host", name, key])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

/// The host's report line, once it exited successfully.
async fn finish_host(mut child: tokio::process::Child) -> Result<String, BoxError> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    let mut stdout = BufReader::new(stdout);
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line)).await??;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    if !status.success() {
        return Err(format!("a host exited with {status}").into());
    }
    Ok(line.trim_end().to_owned())
}
