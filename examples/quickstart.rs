//! The quick start: a cron guard, a blocking lock and a fan-out herd.
//!
//! ```text
//! cargo run --example quickstart                                  # in-memory backend
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example quickstart  # a real Redis
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{FanoutOptions, Herd, Outcome, Role};

#[tokio::main]
async fn main() -> Result<(), herdlock::Error> {
    let herd = if let Ok(url) = std::env::var("REDIS_URL") {
        println!("backend: redis at {url}");
        Herd::connect(&url).await?
    } else {
        println!("backend: in-memory (set REDIS_URL to use Redis)");
        Herd::memory()
    };
    println!("owner label: {}", herd.owner());

    // 1. A cron guard: `once` runs the work only if nobody else is running it.
    let outcome = herd
        .once("quickstart:nightly-import", || async {
            Ok("imported 1200 rows")
        })
        .await?;
    match outcome {
        Outcome::Ran(summary) => println!("once: ran -> {summary}"),
        Outcome::Busy(holder) => println!("once: busy, held by {}", holder.owner),
    }

    // 2. A blocking lock, with its fencing token.
    let guard = herd
        .lock("quickstart:migrations", Duration::from_secs(5))
        .await?;
    let status = herd.lock_status("quickstart:migrations").await?;
    println!(
        "lock: held with fencing token {} (status: holder {:?})",
        guard.fence(),
        status.holder.map(|h| h.owner)
    );
    guard.release().await?;

    // 3. A fan-out herd: 100 concurrent callers of one job id, one run.
    let runs = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..100 {
        let herd = herd.clone();
        let runs = Arc::clone(&runs);
        callers.push(tokio::spawn(async move {
            let options = FanoutOptions::new();
            herd.fanout_with(
                "quickstart:user:42",
                Duration::from_secs(5),
                &options,
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok("profile of user 42".to_string())
                },
            )
            .await
        }));
    }
    let (mut leaders, mut followers) = (0, 0);
    for caller in callers {
        let fanned = caller.await.expect("caller task panicked")?;
        match fanned.role {
            Role::Leader => leaders += 1,
            _ => followers += 1,
        }
    }
    println!(
        "fanout: 100 callers, job ran {} time(s), {leaders} leader, {followers} followers, {:?}",
        runs.load(Ordering::SeqCst),
        started.elapsed()
    );
    Ok(())
}
