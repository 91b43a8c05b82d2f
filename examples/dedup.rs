//! Request deduplication and cache-stampede protection with `fanout`.
//!
//! Two "nodes" (herds) each get 50 concurrent requests for the same user profile: the
//! slow loader runs once for all 100. Then a cache age lets later callers reuse the result.
//!
//! ```text
//! cargo run --example dedup                                    # in-memory
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example dedup   # Redis
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herdlock::{FanoutOptions, Herd, Role};

async fn node(name: &str, first: Option<&Herd>) -> Result<Herd, herdlock::Error> {
    let builder = Herd::builder().prefix("example-dedup").owner(name);
    if first.is_none() {
        match std::env::var("REDIS_URL") {
            Ok(url) => println!("backend: redis at {url}"),
            Err(_) => println!("backend: in-memory; both nodes in one process (set REDIS_URL)"),
        }
    }
    match (std::env::var("REDIS_URL"), first) {
        (Ok(url), _) => builder.connect(&url).await,
        (Err(_), Some(first)) => builder.memory_peer(first),
        (Err(_), None) => builder.memory(),
    }
}

#[tokio::main]
async fn main() -> Result<(), herdlock::Error> {
    let a = node("node-a", None).await?;
    let b = node("node-b", Some(&a)).await?;
    let loads = Arc::new(AtomicUsize::new(0));

    let mut callers = Vec::new();
    for i in 0..100 {
        let herd = if i % 2 == 0 { a.clone() } else { b.clone() };
        let loads = Arc::clone(&loads);
        callers.push(tokio::spawn(async move {
            let options = FanoutOptions::new();
            herd.fanout_with(
                "user:42",
                Duration::from_secs(5),
                &options,
                move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await; // the slow database
                    Ok(String::from("profile of user 42"))
                },
            )
            .await
        }));
    }
    let mut roles = [0usize; 3];
    for caller in callers {
        let fanned = caller.await.expect("caller task")?;
        roles[match fanned.role {
            Role::Leader => 0,
            Role::Follower => 1,
            _ => 2,
        }] += 1;
    }
    println!(
        "100 requests, {} load(s): {} leader, {} followers",
        loads.load(Ordering::SeqCst),
        roles[0],
        roles[1]
    );

    // Cache-stampede protection: accept a result up to 2 s old.
    let cached = FanoutOptions::new().cache_age(Duration::from_secs(2));
    let first = a
        .fanout_with("prices", Duration::from_secs(5), &cached, || async {
            Ok(vec![1.5, 2.25])
        })
        .await?;
    let second = b
        .fanout_with("prices", Duration::from_secs(5), &cached, || async {
            Ok(vec![9.9])
        })
        .await?;
    println!(
        "prices: first call {:?} ({:?}), second call {:?} ({:?})",
        first.value, first.role, second.value, second.role
    );
    Ok(())
}
