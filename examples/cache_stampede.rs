//! Cache-stampede protection: a read-through cache where a cold key under load is computed
//! once, however many readers on however many nodes miss it at the same moment.
//!
//! ```text
//! cargo run --example cache_stampede                                    # in-memory cache and herd
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example cache_stampede   # values in Redis with a TTL
//! ```
//!
//! A read is: look the key up in the cache; on a miss, [`fanout_with`](herdlock::Herd::fanout_with)
//! computes it (the slow part), writes it to the cache with a TTL and hands it to every
//! reader that missed at the same time, in every process. The fan-out's
//! [cache age](herdlock::FanoutOptions::cache_age) closes the last gap: a reader that missed
//! the cache just before the leader wrote it, but asks the fan-out just after the run
//! finished, takes that run's result instead of computing again.
//!
//! Two nodes (herds with their own connections; on Redis they could be two machines) serve
//! 50 concurrent readers of one cold key, then 50 more: one computation, then cache hits
//! only. Exits with 1 if the key was computed more than once.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herdlock::{FanoutOptions, Herd, Role};

type BoxError = Box<dyn StdError + Send + Sync>;

/// How long a computed value stays in the cache.
const TTL: Duration = Duration::from_secs(60);
const PREFIX: &str = "example-cache-stampede";
/// How long a reader waits for a computation.
const WAIT: Duration = Duration::from_secs(10);

/// Where values live: Redis (`SET … PX`) or a map in this process.
#[derive(Clone)]
enum Store {
    Redis(redis::aio::MultiplexedConnection),
    Memory(Arc<Mutex<HashMap<String, (String, Instant)>>>),
}

impl Store {
    async fn get(&self, key: &str) -> Result<Option<String>, BoxError> {
        match self {
            Store::Redis(conn) => Ok(redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn.clone())
                .await?),
            Store::Memory(map) => {
                let map = map.lock().map_err(|_| "cache lock poisoned")?;
                Ok(map
                    .get(key)
                    .filter(|(_, expires)| *expires > Instant::now())
                    .map(|(value, _)| value.clone()))
            }
        }
    }

    async fn set(&self, key: &str, value: &str) -> Result<(), BoxError> {
        match self {
            Store::Redis(conn) => {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(TTL.as_millis() as u64)
                    .query_async::<()>(&mut conn.clone())
                    .await?;
            }
            Store::Memory(map) => {
                let mut map = map.lock().map_err(|_| "cache lock poisoned")?;
                map.insert(key.to_owned(), (value.to_owned(), Instant::now() + TTL));
            }
        }
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), BoxError> {
        match self {
            Store::Redis(conn) => {
                redis::cmd("DEL")
                    .arg(key)
                    .query_async::<()>(&mut conn.clone())
                    .await?;
            }
            Store::Memory(map) => {
                map.lock().map_err(|_| "cache lock poisoned")?.remove(key);
            }
        }
        Ok(())
    }
}

/// How a reader got its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// Found in the cache.
    Hit,
    /// This reader's miss computed it.
    Computed,
    /// Another reader's computation, in flight when this one missed.
    Shared,
    /// A computation that had just finished (the fan-out's cache age).
    RecentRun,
}

/// One node of the service: a herd and the cache it reads through.
#[derive(Clone)]
struct Cache {
    herd: Herd,
    store: Store,
    computations: Arc<AtomicUsize>,
}

impl Cache {
    /// Read-through: the cache, else one computation for every reader that missed.
    async fn get(&self, key: &str) -> Result<(String, Source), BoxError> {
        let cache_key = format!("example-cache:{key}");
        if let Some(value) = self.store.get(&cache_key).await? {
            return Ok((value, Source::Hit));
        }
        let options = FanoutOptions::new()
            // Keep a finished run's result 10 s, and let a reader that just missed the
            // cache take a result up to 10 s old.
            .linger(Duration::from_secs(10))
            .cache_age(Duration::from_secs(10));
        let (store, computations, key) = (
            self.store.clone(),
            Arc::clone(&self.computations),
            key.to_owned(),
        );
        let fanned = self
            .herd
            .fanout_with(
                &format!("compute:{key}"),
                WAIT,
                &options,
                move || async move {
                    computations.fetch_add(1, Ordering::SeqCst);
                    let value = expensive_computation(&key).await;
                    store.set(&cache_key, &value).await?; // any error converts into the job's
                    Ok(value)
                },
            )
            .await?;
        let source = match fanned.role {
            Role::Leader => Source::Computed,
            Role::Cached => Source::RecentRun,
            _ => Source::Shared,
        };
        Ok((fanned.value, source))
    }
}

/// The slow part: a database aggregate, a rendered page, a call to a rate-limited API.
async fn expensive_computation(key: &str) -> String {
    tokio::time::sleep(Duration::from_millis(300)).await;
    format!(
        "price list for {key}, computed at {:?}",
        std::time::SystemTime::now()
    )
}

/// `readers` concurrent reads of `key`, alternating over `nodes`; counts by source.
async fn wave(
    nodes: &[Cache],
    key: &str,
    readers: usize,
) -> Result<Vec<(Source, usize)>, BoxError> {
    let tasks: Vec<_> = (0..readers)
        .map(|i| {
            let node = nodes[i % nodes.len()].clone();
            let key = key.to_owned();
            tokio::spawn(async move { node.get(&key).await })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    let mut values = std::collections::BTreeSet::new();
    for task in tasks {
        let (value, source) = task.await??;
        *counts.entry(source).or_insert(0) += 1;
        values.insert(value);
    }
    if values.len() != 1 {
        return Err(format!("readers saw {} different values", values.len()).into());
    }
    Ok(counts.into_iter().collect())
}

fn describe(counts: &[(Source, usize)]) -> String {
    let parts: Vec<String> = counts
        .iter()
        .map(|(source, n)| match source {
            Source::Hit => format!("{n} cache hit(s)"),
            Source::Computed => format!("{n} computed it"),
            Source::Shared => format!("{n} shared that computation"),
            Source::RecentRun => format!("{n} took the just-finished computation (cache age)"),
        })
        .collect();
    parts.join(", ")
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let computations = Arc::new(AtomicUsize::new(0));
    let mut nodes = Vec::new();
    if let Ok(url) = std::env::var("REDIS_URL") {
        println!("backend: redis at {url}; values cached in Redis for {TTL:?}");
        for name in ["node-a", "node-b"] {
            let herd = Herd::builder()
                .prefix(PREFIX)
                .owner(name)
                .connect(&url)
                .await?;
            let client = redis::Client::open(url.as_str())?;
            let store = Store::Redis(client.get_multiplexed_async_connection().await?);
            nodes.push(Cache {
                herd,
                store,
                computations: Arc::clone(&computations),
            });
        }
    } else {
        println!("backend: in-memory; values cached in this process for {TTL:?} (set REDIS_URL for Redis)");
        let store = Store::Memory(Arc::default());
        let a = Herd::builder().prefix(PREFIX).owner("node-a").memory()?;
        let b = Herd::builder()
            .prefix(PREFIX)
            .owner("node-b")
            .memory_peer(&a)?;
        for herd in [a, b] {
            nodes.push(Cache {
                herd,
                store: store.clone(),
                computations: Arc::clone(&computations),
            });
        }
    }

    let key = "product:42";
    nodes[0]
        .store
        .delete(&format!("example-cache:{key}"))
        .await?; // start cold
    let started = Instant::now();
    let cold = wave(&nodes, key, 50).await?;
    println!(
        "cold key, 50 readers on 2 nodes in {:?}: {}",
        started.elapsed(),
        describe(&cold)
    );
    let started = Instant::now();
    let warm = wave(&nodes, key, 50).await?;
    println!(
        "warm key, 50 readers on 2 nodes in {:?}: {}",
        started.elapsed(),
        describe(&warm)
    );
    let computed = computations.load(Ordering::SeqCst);
    println!("computations: {computed}");
    if computed != 1 {
        std::process::exit(1);
    }
    Ok(())
}
