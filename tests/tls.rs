//! TLS (`rediss://`, feature `tls-rustls`): the smoke set over TLS with the test CA, mutual
//! TLS with a client certificate, and plain/TLS mismatches that fail clearly and quickly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herdlock::{ErrorKind, Herd, Outcome, TryLock, TryMulti, TryPermit};

use crate::common::server::{shared, unique_prefix, RedisServer, ServerConfig};
use crate::common::tls::{tls_or_skip, AuthClients, Tls, TlsCerts};
use crate::fixture::within;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// What a failed connect may take beyond its timeout (scheduling on a busy machine).
const SLACK: Duration = Duration::from_millis(500);

fn tls_server(auth: AuthClients) -> RedisServer {
    RedisServer::start_with(ServerConfig {
        tls: Some(Tls::shared(auth)),
        ..ServerConfig::default()
    })
}

fn ca() -> Vec<u8> {
    TlsCerts::read(&TlsCerts::shared().ca_cert())
}

fn builder(prefix: &str) -> herdlock::Builder {
    Herd::builder()
        .prefix(prefix)
        .connect_timeout(CONNECT_TIMEOUT)
        .command_timeout(COMMAND_TIMEOUT)
}

/// The smoke set: a fan-out herd of two nodes runs once, a lock excludes, once runs once,
/// a multi-lock excludes (its keys share a hash tag, for a cluster), a semaphore admits N.
async fn smoke(a: &Herd, b: &Herd) {
    let runs = Arc::new(AtomicUsize::new(0));
    let calls = (0..8).map(|i| {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        let runs = Arc::clone(&runs);
        async move {
            node.fanout("job", Duration::from_secs(5), move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(42u32)
            })
            .await
        }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.expect("fan-out over TLS"), 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the herd ran the job once");

    let guard = a
        .try_lock("lock")
        .await
        .expect("try_lock")
        .acquired()
        .expect("free");
    assert!(b.try_lock("lock").await.expect("try_lock").is_busy());
    guard.release().await.expect("release");
    match b.try_lock("lock").await.expect("try_lock") {
        TryLock::Acquired(g) => g.release().await.expect("release"),
        TryLock::Busy(h) => panic!("released lock still held by {h:?}"),
    }

    let ran = a.once("once", || async { Ok(7) }).await.expect("once");
    assert_eq!(ran, Outcome::Ran(7));

    let multi = match a.try_multi(&["{m}:1", "{m}:2"]).await.expect("try_multi") {
        TryMulti::Acquired(g) => g,
        TryMulti::Busy(held) => panic!("multi busy: {held:?}"),
    };
    assert!(matches!(
        b.try_multi(&["{m}:2", "{m}:3"]).await.expect("try_multi"),
        TryMulti::Busy(_)
    ));
    multi.release().await.expect("multi release");

    let sem_a = a.semaphore("sem", 2).expect("semaphore");
    let sem_b = b.semaphore("sem", 2).expect("semaphore");
    let p1 = sem_a.try_acquire().await.expect("try_acquire").acquired();
    let p2 = sem_b.try_acquire().await.expect("try_acquire").acquired();
    assert!(p1.is_some() && p2.is_some(), "two permits of two");
    assert!(matches!(
        sem_b.try_acquire().await.expect("try_acquire"),
        TryPermit::Busy { .. }
    ));
    drop((p1, p2));
}

/// The smoke set over `rediss://` with the test CA (no client certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_set_over_tls_with_custom_ca() {
    if !tls_or_skip("tls::smoke_set_over_tls_with_custom_ca") {
        return;
    }
    let server = tls_server(AuthClients::No);
    assert!(server.url().starts_with("rediss://"));
    let prefix = unique_prefix("tls::smoke");
    let started = Instant::now();
    let a = builder(&prefix)
        .owner("a")
        .tls_ca(ca())
        .connect(&server.url())
        .await
        .expect("connect over TLS with the test CA");
    eprintln!("tls timing: connect (with checks) {:?}", started.elapsed());
    let b = builder(&prefix)
        .owner("b")
        .tls_ca(ca())
        .connect_lazy(&server.url())
        .expect("lazy connect over TLS");
    let started = Instant::now();
    within(
        Duration::from_secs(30),
        "smoke set over TLS",
        Box::pin(smoke(&a, &b)),
    )
    .await;
    eprintln!("tls timing: smoke set {:?}", started.elapsed());
}

/// Mutual TLS: with the client certificate the smoke set passes; without one the server
/// refuses, and the error is a clear `Connection` error within the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_client_certificate() {
    if !tls_or_skip("tls::mutual_tls_with_client_certificate") {
        return;
    }
    let server = tls_server(AuthClients::Yes);
    let certs = TlsCerts::shared();
    let cert = TlsCerts::read(&certs.client_cert());
    let key = TlsCerts::read(&certs.client_key());
    let prefix = unique_prefix("tls::mutual");
    let node = |owner: &str| {
        builder(&prefix)
            .owner(owner)
            .tls_ca(ca())
            .tls_client_cert(cert.clone(), key.clone())
    };
    let a = node("a")
        .connect(&server.url())
        .await
        .expect("mutual TLS connect");
    let b = node("b")
        .connect(&server.url())
        .await
        .expect("mutual TLS connect");
    within(
        Duration::from_secs(30),
        "smoke set over mutual TLS",
        Box::pin(smoke(&a, &b)),
    )
    .await;

    let started = Instant::now();
    let refused = builder(&prefix)
        .tls_ca(ca())
        .connect(&server.url())
        .await
        .expect_err("no client certificate: refused");
    let took = started.elapsed();
    eprintln!("tls timing: no client certificate refused after {took:?}: {refused:?}");
    assert_eq!(refused.kind(), ErrorKind::Connection, "{refused:?}");
    assert!(took < CONNECT_TIMEOUT + SLACK, "took {took:?}");
}

/// A server certificate the client does not trust (the built-in roots, no `tls_ca`) is a
/// clear `Connection` error naming the certificate, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_server_certificate_is_refused() {
    if !tls_or_skip("tls::untrusted_server_certificate_is_refused") {
        return;
    }
    let server = tls_server(AuthClients::No);
    let started = Instant::now();
    let err = builder(&unique_prefix("tls::untrusted"))
        .connect(&server.url())
        .await
        .expect_err("untrusted certificate");
    let took = started.elapsed();
    eprintln!("tls timing: untrusted certificate refused after {took:?}: {err:?}");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err:?}");
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    assert!(took < CONNECT_TIMEOUT + SLACK, "took {took:?}");
}

/// A plain client on the TLS-only port, and a TLS client on a plain port: both fail with a
/// `Connection` error within the connect timeout (no hang), eager and lazy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_tls_mismatches_fail_quickly() {
    if !tls_or_skip("tls::plain_and_tls_mismatches_fail_quickly") {
        return;
    }
    let server = tls_server(AuthClients::No);
    let plain_url = server.url().replacen("rediss://", "redis://", 1);
    let tls_url = shared().url().replacen("redis://", "rediss://", 1);
    let prefix = unique_prefix("tls::mismatch");
    for (what, url) in [
        ("plain client, TLS port", plain_url.as_str()),
        ("TLS client, plain port", tls_url.as_str()),
    ] {
        let started = Instant::now();
        let err = builder(&prefix)
            .tls_ca(ca())
            .connect(url)
            .await
            .map(|_| ())
            .map_err(|e| e.kind());
        let took = started.elapsed();
        eprintln!("tls timing: {what}: connect failed after {took:?}: {err:?}");
        if url.starts_with("redis://") {
            // tls_ca with a redis:// url is refused before anything is sent.
            assert_eq!(err, Err(ErrorKind::InvalidInput), "{what}");
            let started = Instant::now();
            let err = builder(&prefix)
                .connect(url)
                .await
                .expect_err("plain client on a TLS port");
            let took = started.elapsed();
            eprintln!("tls timing: {what}: connect failed after {took:?}: {err:?}");
            assert_eq!(err.kind(), ErrorKind::Connection, "{what}: {err:?}");
            assert!(took < CONNECT_TIMEOUT + SLACK, "{what}: took {took:?}");
        } else {
            assert_eq!(err, Err(ErrorKind::Connection), "{what}");
            assert!(took < CONNECT_TIMEOUT + SLACK, "{what}: took {took:?}");
        }
        // Lazy: the first call fails the same way, within the connect timeout.
        let lazy = if url.starts_with("rediss://") {
            builder(&prefix).tls_ca(ca())
        } else {
            builder(&prefix)
        }
        .connect_lazy(url)
        .expect("a lazy herd only parses the url");
        let started = Instant::now();
        let err = within(Duration::from_secs(20), what, lazy.try_lock("k"))
            .await
            .expect_err("mismatch");
        let took = started.elapsed();
        eprintln!("tls timing: {what}: first lazy call failed after {took:?}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::Connection, "{what}: {err:?}");
        // A lazy herd's first call runs the connect checks, bounded by the command timeout.
        assert!(took < COMMAND_TIMEOUT + SLACK, "{what}: took {took:?}");
    }
}

/// Redis Cluster over mutual TLS: `connect_cluster` with `rediss://` seeds and
/// `connect_lazy` with a `rediss+cluster://` URL, both with the test CA and the client
/// certificate, run the smoke set (with a multi-lock on one hash tag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_mutual_tls() {
    use crate::common::cluster::{ClusterConfig, RedisCluster};
    if !tls_or_skip("tls::cluster_over_mutual_tls") {
        return;
    }
    let cluster = tokio::task::spawn_blocking(|| {
        RedisCluster::start_with(ClusterConfig {
            tls: Some(Tls::shared(AuthClients::Yes)),
            ..ClusterConfig::default()
        })
    })
    .await
    .expect("cluster start");
    let urls = cluster.urls();
    assert!(urls.iter().all(|u| u.starts_with("rediss://")), "{urls:?}");
    let certs = TlsCerts::shared();
    let cert = TlsCerts::read(&certs.client_cert());
    let key = TlsCerts::read(&certs.client_key());
    let prefix = unique_prefix("tls::cluster");
    let node = |owner: &str| {
        builder(&prefix)
            .owner(owner)
            .tls_ca(ca())
            .tls_client_cert(cert.clone(), key.clone())
    };
    let a = node("a")
        .connect_cluster(&urls)
        .await
        .expect("cluster connect over mutual TLS");
    let hosts: Vec<&str> = urls
        .iter()
        .map(|u| u.trim_start_matches("rediss://").trim_end_matches('/'))
        .collect();
    let b = node("b")
        .connect_lazy(&format!("rediss+cluster://{}/", hosts.join(",")))
        .expect("lazy cluster connect over TLS");
    within(
        Duration::from_secs(30),
        "smoke set over a TLS cluster",
        Box::pin(smoke(&a, &b)),
    )
    .await;

    // Certificates with plain cluster urls: refused up front.
    let plain: Vec<String> = urls
        .iter()
        .map(|u| u.replacen("rediss://", "redis://", 1))
        .collect();
    let refused = node("c")
        .connect_cluster(&plain)
        .await
        .expect_err("certificates with redis:// cluster urls");
    assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{refused:?}");
}
