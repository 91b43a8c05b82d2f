//! A serialized, fair queue: a semaphore with one permit admits workers one at a time, in
//! arrival order, cluster-wide.
//!
//! ```text
//! cargo run --example queue
//! ```

use std::time::Duration;

use herdlock::{Herd, SemaphoreOptions};

#[tokio::main]
async fn main() -> Result<(), herdlock::Error> {
    let herd = if let Ok(url) = std::env::var("REDIS_URL") {
        println!("backend: redis at {url}");
        Herd::builder()
            .prefix("example-queue")
            .connect(&url)
            .await?
    } else {
        println!("backend: in-memory (set REDIS_URL for Redis)");
        Herd::memory()
    };
    let exports = herd.semaphore_with("exports", 1, &SemaphoreOptions::new().fair(true))?;
    let mut workers = Vec::new();
    for n in 0..4 {
        let exports = exports.clone();
        workers.push(tokio::spawn(async move {
            let permit = exports.acquire(Duration::from_secs(10)).await?;
            println!("export {n} running alone");
            tokio::time::sleep(Duration::from_millis(50)).await;
            permit.release().await
        }));
        // Arrive in a known order.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for worker in workers {
        worker.await.expect("task")?;
    }
    let status = exports.status().await?;
    println!("done: {} in use, {} queued", status.in_use, status.queued);
    Ok(())
}
