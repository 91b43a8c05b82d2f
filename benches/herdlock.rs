//! Criterion benches: each herdlock operation on both backends, against a raw redis-rs
//! baseline measured in the same run, one caller at a time (round-trip latency).
//!
//! ```text
//! cargo bench --bench herdlock                                    # private redis-server
//! REDIS_URL=redis://127.0.0.1:6379/ cargo bench --bench herdlock  # an existing Redis
//! ```
//!
//! Groups:
//!
//! - `lock_cycle`: `try_lock` + `release` of one key (`memory`, `redis`), and the raw
//!   baseline `SET k tok NX PX ttl` + `EVALSHA` compare-and-delete (`raw_redis`).
//! - `fanout_uncontended`: one caller, a 0 ms job, so every call leads a new run
//!   (`memory`, `redis`); the raw baseline is the least a Redis leader must do:
//!   `SET NX PX`, then one `EVALSHA` that checks the owner, stores the result, deletes the
//!   lock and publishes (`raw_redis`).
//!
//! Without `REDIS_URL` a private `redis-server` is started on a free loopback port; when
//! none can be started, the Redis benches are skipped with a message and the in-memory
//! ones still run.

#[path = "../loadgen/src/raw.rs"]
mod raw;

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion};
use herdlock::{Herd, TryLock};
use redis::aio::MultiplexedConnection;
use tokio::runtime::Runtime;

use herdlock_testkit::RedisServer;
use raw::{set_nx, COMPARE_AND_DELETE};

/// KEYS: lock, result. ARGV: holder, result, linger ms, channel.
const COMPARE_AND_COMPLETE: &str = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1";

const FANOUT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime builds");
    let mut criterion = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    let prefix = format!("bench{}", std::process::id());

    // Keep the server alive until every bench has run; dropping it kills it.
    let (_server, url) = match std::env::var("REDIS_URL") {
        Ok(url) => (None, Some(url)),
        Err(_) => match RedisServer::try_start() {
            Ok(server) => {
                let url = server.url();
                (Some(server), Some(url))
            }
            Err(e) => {
                eprintln!("herdlock bench: no redis-server ({e}); skipping the Redis benches");
                (None, None)
            }
        },
    };
    let backends = url.map(|url| {
        runtime.block_on(async {
            let herd = Herd::builder()
                .prefix(prefix.as_str())
                .owner("bench")
                .connect(&url)
                .await
                .expect("connect herdlock to the bench redis");
            let client = redis::Client::open(url.as_str()).expect("a valid redis url");
            let raw = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect redis-rs to the bench redis");
            (herd, raw)
        })
    });
    let memory = Herd::builder()
        .prefix(prefix.as_str())
        .owner("bench")
        .memory()
        .expect("valid in-memory options");

    {
        let mut group = criterion.benchmark_group("lock_cycle");
        lock_cycle(&mut group, &runtime, "memory", &memory);
        if let Some((herd, raw)) = &backends {
            lock_cycle(&mut group, &runtime, "redis", herd);
            raw_lock_cycle(&mut group, &runtime, raw, &prefix);
        }
        group.finish();
    }
    {
        let mut group = criterion.benchmark_group("fanout_uncontended");
        fanout(&mut group, &runtime, "memory", &memory);
        if let Some((herd, raw)) = &backends {
            fanout(&mut group, &runtime, "redis", herd);
            raw_fanout(&mut group, &runtime, raw, &prefix);
        }
        group.finish();
    }
    criterion.final_summary();
}

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn lock_cycle(group: &mut Group<'_>, runtime: &Runtime, name: &str, herd: &Herd) {
    group.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            match herd.try_lock("bench-lock").await {
                Ok(TryLock::Acquired(guard)) => guard.release().await.expect("release"),
                Ok(TryLock::Busy(holder)) => panic!("bench lock held by {}", holder.owner),
                Err(e) => panic!("try_lock failed: {e}"),
            }
        });
    });
}

fn raw_lock_cycle(
    group: &mut Group<'_>,
    runtime: &Runtime,
    conn: &MultiplexedConnection,
    prefix: &str,
) {
    let script = redis::Script::new(COMPARE_AND_DELETE);
    // Same shape and size as herdlock's lock key and holder value.
    let key = format!("{prefix}:{{raw-lock}}:lock");
    let token = format!("1:{:016x}1:bench", 0x5eed_u64);
    group.bench_function("raw_redis", |b| {
        b.to_async(runtime).iter(|| {
            let (mut conn, script, key, token) = (conn.clone(), &script, &key, &token);
            async move {
                let acquired = set_nx(&mut conn, key, token).await.expect("SET NX PX");
                assert!(acquired, "raw bench lock was busy");
                let deleted: i64 = script
                    .key(key)
                    .arg(token)
                    .invoke_async(&mut conn)
                    .await
                    .expect("EVALSHA compare-and-delete");
                assert_eq!(deleted, 1, "raw bench lock was lost");
            }
        });
    });
}

fn fanout(group: &mut Group<'_>, runtime: &Runtime, name: &str, herd: &Herd) {
    group.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            let value = herd
                .fanout("bench-fanout", FANOUT_TIMEOUT, || async { Ok(42) })
                .await
                .expect("fanout");
            assert_eq!(value, 42);
        });
    });
}

fn raw_fanout(
    group: &mut Group<'_>,
    runtime: &Runtime,
    conn: &MultiplexedConnection,
    prefix: &str,
) {
    let script = redis::Script::new(COMPARE_AND_COMPLETE);
    let lock = format!("{prefix}:{{raw-fanout}}:lock");
    let result = format!("{prefix}:{{raw-fanout}}:result");
    let channel = format!("{prefix}:{{raw-fanout}}");
    let token = format!("1:{:016x}1:bench", 0x5eed_u64);
    group.bench_function("raw_redis", |b| {
        b.to_async(runtime).iter(|| {
            let mut conn = conn.clone();
            let (script, lock, result, channel, token) =
                (&script, &lock, &result, &channel, &token);
            async move {
                let acquired = set_nx(&mut conn, lock, token).await.expect("SET NX PX");
                assert!(acquired, "raw bench run was busy");
                // The job's "result": a JSON number, as herdlock's JSON codec would send.
                let done: i64 = script
                    .key(lock)
                    .key(result)
                    .arg(token)
                    .arg("42")
                    .arg(5_000)
                    .arg(channel)
                    .invoke_async(&mut conn)
                    .await
                    .expect("EVALSHA compare-and-complete");
                assert_eq!(done, 1, "raw bench run was lost");
            }
        });
    });
}
