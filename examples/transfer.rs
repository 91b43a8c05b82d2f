//! A multi-resource transaction: a transfer holds both accounts or neither.
//!
//! Two transfers in opposite directions run concurrently; the all-or-nothing `multi` never
//! deadlocks, and each transfer passes its per-key fencing tokens to the "ledger".
//!
//! ```text
//! cargo run --example transfer
//! ```

use std::time::Duration;

use herdlock::Herd;

async fn transfer(herd: Herd, from: &str, to: &str, amount: u64) -> Result<(), herdlock::Error> {
    let accounts = [
        format!("account:{{bank}}:{from}"),
        format!("account:{{bank}}:{to}"),
    ];
    let keys: Vec<&str> = accounts.iter().map(String::as_str).collect();
    let guard = herd.multi(&keys, Duration::from_secs(5)).await?;
    let fences: Vec<String> = guard.fences().map(|(k, f)| format!("{k}@{f}")).collect();
    tokio::time::sleep(Duration::from_millis(20)).await; // debit, credit
    println!(
        "moved {amount} from {from} to {to} holding {}",
        fences.join(", ")
    );
    guard.release().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), herdlock::Error> {
    let herd = if let Ok(url) = std::env::var("REDIS_URL") {
        println!("backend: redis at {url}");
        Herd::builder()
            .prefix("example-transfer")
            .connect(&url)
            .await?
    } else {
        println!("backend: in-memory (set REDIS_URL for Redis)");
        Herd::memory()
    };
    let one = tokio::spawn(transfer(herd.clone(), "alice", "bob", 10));
    let two = tokio::spawn(transfer(herd.clone(), "bob", "alice", 5));
    one.await.expect("task")?;
    two.await.expect("task")?;
    Ok(())
}
