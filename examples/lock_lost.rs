//! A failure scenario: a holder learns it lost its lock.
//!
//! The lock is extended by the watchdog, but only for `max_hold`; after that the lease runs
//! out, `lost()` resolves and `heartbeat()` fails, so long work stops instead of running on
//! without the lock. (On Redis, the same happens when another process takes the lock over
//! after this one was paused or cut off for longer than the TTL.)
//!
//! ```text
//! cargo run --example lock_lost
//! ```

use std::time::{Duration, Instant};

use herdlock::{Herd, LockOptions};

#[tokio::main]
async fn main() -> Result<(), herdlock::Error> {
    let herd = if let Ok(url) = std::env::var("REDIS_URL") {
        println!("backend: redis at {url}");
        Herd::builder().prefix("example-lost").connect(&url).await?
    } else {
        println!("backend: in-memory (set REDIS_URL for Redis)");
        Herd::memory()
    };
    let options = LockOptions::new()
        .ttl(Duration::from_millis(300))
        .max_hold(Duration::from_millis(600));
    let guard = herd
        .lock_with("report", Duration::from_secs(1), &options)
        .await?;
    let started = Instant::now();
    let mut steps = 0;
    loop {
        tokio::select! {
            () = guard.lost() => break,
            () = tokio::time::sleep(Duration::from_millis(100)) => steps += 1, // one step of work
        }
    }
    println!(
        "lost the lock after {:?} and {steps} steps; heartbeat says: {}",
        started.elapsed(),
        guard.heartbeat().await.expect_err("lost")
    );
    Ok(())
}
