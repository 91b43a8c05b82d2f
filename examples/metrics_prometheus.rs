//! herdlock's metrics in Prometheus text format.
//!
//! With the crate feature `metrics`, herdlock records counters and histograms through the
//! `metrics` facade (README, "Observability", lists them). This program installs
//! `metrics-exporter-prometheus` as the recorder, drives every primitive once (a contended
//! lock, `once`, a multi-lock, a semaphore, a fan-out herd with a cached call and a caller
//! that times out), and then:
//!
//! - prints the scrape to stdout (the default), or
//! - with `METRICS_ADDR=127.0.0.1:9898`, serves it on `GET /metrics` until Ctrl-C, for
//!   `curl` or a Prometheus scrape job.
//!
//! ```text
//! cargo run --example metrics_prometheus --features metrics
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example metrics_prometheus --features metrics
//! ```

use std::time::Duration;

use herdlock::{FanoutOptions, Herd, LockOptions, TryLock};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Histogram buckets (seconds) for herdlock's wait, hold, job and follower latencies.
const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// Installs the Prometheus recorder as the process's `metrics` recorder. Do it before the
/// first herdlock call: records made before it are not kept.
pub(crate) fn install() -> Result<PrometheusHandle, BuildError> {
    PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .install_recorder()
}

/// The herd: Redis at `REDIS_URL`, else in-memory.
async fn herd() -> Result<Herd, herdlock::Error> {
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            Herd::builder()
                .prefix("metrics-example")
                .connect(&url)
                .await
        }
        Err(_) => Ok(Herd::memory()),
    }
}

/// What the example's steps fail with (the test that runs them too).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Drives every primitive once, so each of herdlock's metrics has a value.
pub(crate) async fn workload(herd: &Herd) -> Result<(), BoxError> {
    // A lock, contended: a waiter waits (wait time) and takes it after the release (hold
    // time); a try finds it busy; a waiter with a short wait times out.
    let first = herd.lock("report", Duration::from_secs(1)).await?;
    let waiter = tokio::spawn({
        let herd = herd.clone();
        async move { herd.lock("report", Duration::from_secs(5)).await }
    });
    assert!(matches!(herd.try_lock("report").await?, TryLock::Busy(_)));
    let timed_out = herd.lock("report", Duration::from_millis(20)).await;
    assert!(timed_out.is_err());
    first.release().await?;
    let second = waiter.await??;
    second.release().await?;

    let ran = herd.once("nightly", || async { Ok(()) });
    assert!(ran.await?.ran());
    herd.multi(&["{acct}:alice", "{acct}:bob"], Duration::from_secs(1))
        .await?
        .release()
        .await?;
    let semaphore = herd.semaphore("pool", 2)?;
    semaphore
        .acquire(Duration::from_secs(1))
        .await?
        .release()
        .await?;

    // A fan-out herd of 10 callers (one runs the job, the others follow it), then a call
    // served from the cache.
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let herd = herd.clone();
            tokio::spawn(async move {
                herd.fanout("prices", Duration::from_secs(5), || async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(42)
                })
                .await
            })
        })
        .collect();
    for caller in callers {
        caller.await??;
    }
    let cached = FanoutOptions::new().cache_age(Duration::from_secs(60));
    herd.fanout_with("prices", Duration::from_secs(5), &cached, || async {
        Ok(0)
    })
    .await?;
    // A lock with a TTL and no renewal, held past it: a lost lease.
    let short = LockOptions::new()
        .ttl(Duration::from_millis(50))
        .auto_extend(false);
    let doomed = herd
        .lock_with("doomed", Duration::from_secs(1), &short)
        .await?;
    doomed.lost().await;
    drop(doomed);
    Ok(())
}

/// Serves `GET /metrics` (the scrape) on `listener`, one connection at a time, forever.
pub(crate) async fn serve(listener: TcpListener, handle: PrometheusHandle) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        if let Err(e) = answer(stream, &handle).await {
            eprintln!("metrics request failed: {e}");
        }
    }
}

/// Answers one HTTP/1.1 request: the scrape for `GET /metrics`, 404 for anything else.
async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let (status, body) = if request.starts_with(b"GET /metrics ") {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "try GET /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let handle = install()?;
    let herd = herd().await?;
    workload(&herd).await?;
    match std::env::var("METRICS_ADDR") {
        Ok(addr) => {
            let listener = TcpListener::bind(&addr).await?;
            println!(
                "serving http://{}/metrics (Ctrl-C stops)",
                listener.local_addr()?
            );
            tokio::select! {
                served = serve(listener, handle) => served?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => print!("{}", handle.render()),
    }
    Ok(())
}
