//! Waiting and acquiring under time pressure: the in-memory clock read once per step, a
//! deadline that fires while an acquire step is in flight, and the shared wait helper.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herdlock::{Herd, LockOptions, TryLock, TryMulti};

use crate::fixture::within;

/// Issue 9: the in-memory engine read the clock several times inside one step, so a lock
/// expiring between two reads was reported busy with an empty holder ("malformed holder
/// value", `ErrorKind::Redis`). Contenders hammer 1 ms locks that expire under them, with
/// every step that reads a holder (try_lock, try_multi, lock_status, a fan-out); not one
/// call may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_contended_expiries_never_error() {
    const CONTENDERS: usize = 4;
    const ROUNDS: usize = 3_000;
    let herd = Herd::builder()
        .prefix("memclock")
        .memory()
        .expect("memory herd");
    let opts = LockOptions::new()
        .ttl(Duration::from_millis(1))
        .auto_extend(false);
    let busy_seen = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CONTENDERS)
        .map(|i| {
            let (herd, opts, busy_seen) = (herd.clone(), opts.clone(), Arc::clone(&busy_seen));
            tokio::spawn(async move {
                let mut held = Vec::new();
                for round in 0..ROUNDS {
                    match herd.try_lock_with("hot", &opts).await {
                        Ok(TryLock::Acquired(guard)) => held.push(guard),
                        Ok(TryLock::Busy(_)) => {
                            busy_seen.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("contender {i}, round {round}: try_lock failed: {e}"),
                    }
                    match herd.try_multi_with(&["hot", "cold"], &opts).await {
                        Ok(TryMulti::Acquired(guard)) => drop(guard),
                        Ok(TryMulti::Busy(_)) => {}
                        Err(e) => panic!("contender {i}, round {round}: try_multi failed: {e}"),
                    }
                    if let Err(e) = herd.lock_status("hot").await {
                        panic!("contender {i}, round {round}: lock_status failed: {e}");
                    }
                    if round % 50 == 0 {
                        // The guards are not released: they run out, which is the point.
                        held.clear();
                        tokio::task::yield_now().await;
                    }
                }
                // Forgetting would leak; dropping releases in the background (lost: fine).
                drop(held);
            })
        })
        .collect();
    within(Duration::from_secs(60), "the contenders", async {
        for task in tasks {
            task.await.expect("a contender panicked");
        }
    })
    .await;
    assert!(
        busy_seen.load(Ordering::Relaxed) > 0,
        "the contenders never met a held lock: the test exercised nothing"
    );
}
