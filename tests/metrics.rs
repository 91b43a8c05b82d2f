//! The `metrics` feature: `examples/metrics_prometheus.rs` (compiled in here) installs the
//! Prometheus recorder, drives every primitive and serves the scrape over HTTP; the scrape
//! carries every primitive's counters and histograms, at least what `Herd::stats` counted.
//! A killed pub/sub connection shows up as a reconnect and resyncs.
//!
//! The recorder is global to the test binary, so other tests running meanwhile add to the
//! same metrics: every check is "at least".

use std::sync::OnceLock;
use std::time::Duration;

use herdlock::Herd;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::server::{unique_prefix, RedisServer};
use crate::fixture::within;

#[allow(dead_code)] // its `main` is the example's, not ours
#[path = "../examples/metrics_prometheus.rs"]
mod example;

/// The process's Prometheus recorder, installed once.
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| example::install().expect("install the Prometheus recorder"))
        .clone()
}

/// One HTTP/1.1 GET: the status line and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of the sample `series` (name and labels, as rendered) in a scrape.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in the scrape:\n{scrape}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_every_primitive_s_metrics() {
    let handle = recorder();
    let herd = Herd::memory();
    within(
        Duration::from_secs(30),
        "workload",
        Box::pin(example::workload(&herd)),
    )
    .await
    .expect("workload");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(example::serve(listener, handle));

    let (code, scrape) = within(Duration::from_secs(10), "scrape", get(addr, "/metrics")).await;
    assert_eq!(code, "HTTP/1.1 200 OK");
    let stats = herd.stats();
    for (primitive, counted) in [
        ("lock", stats.lock),
        ("multi", stats.multi),
        ("semaphore", stats.semaphore),
        ("fanout", stats.fanout),
    ] {
        let at_least = |name: &str, n: u64| {
            let series = format!("{name}{{primitive=\"{primitive}\"}}");
            let value = sample(&scrape, &series);
            assert!(value >= n as f64, "{series} = {value} < {n}");
        };
        at_least("herdlock_acquired_total", counted.acquired);
        at_least("herdlock_released_total", counted.released);
        at_least(
            "herdlock_hold_seconds_count",
            counted.released + counted.lost,
        );
        assert!(counted.acquired >= 1, "{primitive}: {counted:?}");
    }
    for (series, n) in [
        ("herdlock_busy_total{primitive=\"lock\"}", stats.lock.busy),
        (
            "herdlock_timeouts_total{primitive=\"lock\"}",
            stats.lock.timeouts,
        ),
        ("herdlock_lost_total{primitive=\"lock\"}", stats.lock.lost),
        ("herdlock_wait_seconds_count{primitive=\"lock\"}", 2),
        ("herdlock_wait_seconds_count{primitive=\"multi\"}", 1),
        ("herdlock_wait_seconds_count{primitive=\"semaphore\"}", 1),
        ("herdlock_runs_led_total", stats.runs.led),
        ("herdlock_results_followed_total", stats.runs.followed),
        ("herdlock_cached_hits_total", stats.runs.cached),
        ("herdlock_job_duration_seconds_count", 1),
        (
            "herdlock_follower_latency_seconds_count",
            stats.runs.followed,
        ),
    ] {
        let value = sample(&scrape, series);
        assert!(
            value >= n as f64 && n >= 1,
            "{series} = {value}, counted {n}"
        );
    }
    // Histograms come with buckets.
    assert!(scrape.contains("herdlock_wait_seconds_bucket{primitive=\"lock\",le=\"0.005\"}"));

    let (not_found, _) = get(addr, "/").await;
    assert_eq!(not_found, "HTTP/1.1 404 Not Found");
    server.abort();
}

/// `CLIENT KILL TYPE pubsub` while a waiter waits: the Notifier reconnects (one reconnect)
/// and tells the waiter to re-check (a resync per subscribed channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_reconnect_and_its_resyncs_are_recorded() {
    let handle = recorder();
    let server = RedisServer::start();
    let herd = Herd::builder()
        .prefix(unique_prefix("metrics-reconnect"))
        .connect(&server.url())
        .await
        .expect("connect");
    let guard = herd.lock("k", Duration::from_secs(1)).await.expect("lock");
    let waiter = tokio::spawn({
        let herd = herd.clone();
        async move { herd.lock("k", Duration::from_secs(20)).await }
    });
    let channel = format!("{}:{{k}}", herd.prefix());
    server.wait_subscribers(&channel, 1, Duration::from_secs(10));
    let scrape = handle.render();
    let count = |scrape: &str, name: &str| {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (reconnects, resyncs) = (
        count(&scrape, "herdlock_pubsub_reconnects_total"),
        count(&scrape, "herdlock_resyncs_total"),
    );
    server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = handle.render();
        if count(&scrape, "herdlock_pubsub_reconnects_total") > reconnects
            && count(&scrape, "herdlock_resyncs_total") > resyncs
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reconnect or resync recorded:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    guard.release().await.expect("release");
    let got = within(Duration::from_secs(10), "waiter", waiter)
        .await
        .expect("task")
        .expect("lock");
    got.release().await.expect("release");
}
