//! Request deduplication for an HTTP service: `herdlock::tower::CoalesceLayer` makes
//! identical in-flight requests, across every instance of the service, share one call of
//! the slow upstream behind it.
//!
//! ```text
//! cargo run --features tower --example request_dedup                     # in-memory: both services in this process
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --features tower --example request_dedup   # two service processes
//!
//! # or by hand, each in its own terminal (Redis only: instances share state through it):
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --features tower --example request_dedup -- serve 3001
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --features tower --example request_dedup -- serve 3002
//! cargo run --features tower --example request_dedup -- client http://127.0.0.1:3001 http://127.0.0.1:3002 20
//! ```
//!
//! The service answers `GET /report/<id>` from a slow "upstream" (a report that takes a
//! while to compute). The layer coalesces those GETs by URI; `GET /stats` and
//! `POST /release` are not coalesced. So that the demo can show every request in flight at
//! once, the upstream answers when the client says so (`POST /release`, after `/stats`
//! shows all N requests waiting, one service's run leading and the other's following it)
//! or after 5 s, whichever comes first; a real upstream simply takes its time.
//!
//! The client fires N identical requests, alternating between the two services, and
//! reports how many upstream calls they caused (one), the role of each response (header
//! `x-herdlock-role`: one `leader`, the rest `follower`) and that every body is the same.
//! It exits with 1 if not.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use herdlock::tower::CoalesceLayer;
use herdlock::Herd;
use http::header::{HeaderName, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_layer::Layer;
use tower_service::Service;

type BoxError = Box<dyn StdError + Send + Sync>;

const PREFIX: &str = "example-request-dedup";
const ROLE_HEADER: &str = "x-herdlock-role";
/// The upstream answers after this long if nobody releases it.
const UPSTREAM_MAX: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let redis = std::env::var("REDIS_URL").ok();
    match args.first().map(String::as_str) {
        None => demo(redis.as_deref()).await,
        Some("serve") => {
            let port: u16 = args.get(1).map_or(Ok(0), |p| p.parse())?;
            let herd = if let Some(url) = &redis {
                Herd::builder().prefix(PREFIX).connect(url).await?
            } else {
                eprintln!("serve: no REDIS_URL, so this instance coalesces only its own requests");
                Herd::builder().prefix(PREFIX).memory()?
            };
            let addr = serve(herd, port).await?;
            println!("listening on http://{addr}");
            // Run until killed, or until the parent that started us closes our stdin.
            if args.iter().any(|a| a == "--until-stdin-closes") {
                let mut sink = Vec::new();
                tokio::io::stdin().read_to_end(&mut sink).await?;
                Ok(())
            } else {
                std::future::pending().await
            }
        }
        Some("client") if args.len() >= 3 => {
            let n = args.get(3).map_or(Ok(20), |n| n.parse())?;
            let ok = client(&[args[1].clone(), args[2].clone()], n).await?;
            if ok {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        _ => {
            eprintln!("usage: request_dedup [serve [PORT] | client URL1 URL2 [N]]");
            std::process::exit(64)
        }
    }
}

/// Two services and a client round: in this process on the in-memory backend, as two
/// child processes on Redis.
async fn demo(redis: Option<&str>) -> Result<(), BoxError> {
    let n = 20;
    let ok = if let Some(url) = redis {
        println!("backend: redis at {url}; two service processes");
        let mut children = Vec::new();
        let mut urls = Vec::new();
        for _ in 0..2 {
            let mut child = tokio::process::Command::new(std::env::current_exe()?)
                .args(["serve", "0", "--until-stdin-closes"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let mut line = String::new();
            let mut stdout = BufReader::new(stdout);
            tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line)).await??;
            let line = line.trim_end();
            let url = line
                .trim()
                .strip_prefix("listening on ")
                .ok_or_else(|| format!("unexpected first line from a service: {line:?}"))?;
            println!("service process {} {line}", child.id().unwrap_or(0));
            urls.push(url.to_owned());
            children.push(child);
        }
        let ok = client(&urls, n).await?;
        for mut child in children {
            drop(child.stdin.take()); // the service exits
            tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
        }
        ok
    } else {
        println!("backend: in-memory; both services run in this process (set REDIS_URL for two processes)");
        let a = Herd::builder().prefix(PREFIX).owner("service-a").memory()?;
        let b = Herd::builder()
            .prefix(PREFIX)
            .owner("service-b")
            .memory_peer(&a)?;
        let urls = [
            format!("http://{}", serve(a, 0).await?),
            format!("http://{}", serve(b, 0).await?),
        ];
        client(&urls, n).await?
    };
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------- the service

/// The upstream's state: calls made, and the release counter its calls wait on.
struct State {
    herd: Herd,
    calls: AtomicUsize,
    release: watch::Sender<u64>,
}

/// The inner service: the slow upstream, `/stats` and `/release`.
#[derive(Clone)]
struct Upstream(Arc<State>);

impl Service<Request<Incoming>> for Upstream {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let (status, body) = match (request.method(), path.as_str()) {
                (&Method::GET, "/stats") => {
                    let herd_stats = state.herd.stats();
                    (
                        StatusCode::OK,
                        format!(
                            "{{\"upstream_calls\":{},\"waiting\":{},\"in_flight\":{},\"following\":{}}}",
                            state.calls.load(Ordering::SeqCst),
                            herd_stats.waiting,
                            herd_stats.in_flight,
                            herd_stats.following
                        ),
                    )
                }
                (&Method::POST, "/release") => {
                    state.release.send_modify(|n| *n += 1);
                    (StatusCode::OK, String::from("{}"))
                }
                (&Method::GET, p) if p.starts_with("/report/") => {
                    let call = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut release = state.release.subscribe();
                    let seen = *release.borrow_and_update();
                    // The slow part: until released, at most UPSTREAM_MAX.
                    let _ =
                        tokio::time::timeout(UPSTREAM_MAX, release.wait_for(|n| *n > seen)).await;
                    let id = &p["/report/".len()..];
                    (
                        StatusCode::OK,
                        format!(
                            "{{\"report\":\"{id}\",\"computed_by\":\"{}\",\"call\":{call}}}",
                            state.herd.owner()
                        ),
                    )
                }
                _ => (
                    StatusCode::NOT_FOUND,
                    String::from("{\"error\":\"not found\"}"),
                ),
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok(response)
        })
    }
}

/// Coalesce `GET /report/...` by URI; nothing else.
fn report_key(request: &Request<Incoming>) -> Option<String> {
    let coalesce = request.method() == Method::GET && request.uri().path().starts_with("/report/");
    coalesce.then(|| format!("GET {}", request.uri()))
}

/// Serves the upstream behind the coalescing layer on `127.0.0.1:port` (0: any free port).
async fn serve(herd: Herd, port: u16) -> Result<SocketAddr, BoxError> {
    let upstream = Upstream(Arc::new(State {
        herd: herd.clone(),
        calls: AtomicUsize::new(0),
        release: watch::Sender::new(0),
    }));
    let service = CoalesceLayer::new(herd, report_key)
        .wait(Duration::from_secs(10))
        .role_header(HeaderName::from_static(ROLE_HEADER))
        .layer(upstream);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    eprintln!("connection error: {e}");
                }
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------- the client

/// One request over a fresh connection: status, role header, body.
async fn fetch(
    base: &str,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Option<String>, String), BoxError> {
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let stream = TcpStream::connect(authority).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let role = response
        .headers()
        .get(ROLE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, role, String::from_utf8_lossy(&body).into_owned()))
}

/// A number field of `/stats`' JSON.
fn stat(json: &str, field: &str) -> Result<usize, BoxError> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    value[field]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| format!("no {field} in {json}").into())
}

/// Sums `field` of every service's `/stats`.
async fn total(urls: &[String], field: &str) -> Result<usize, BoxError> {
    let mut sum = 0;
    for url in urls {
        sum += stat(&fetch(url, Method::GET, "/stats").await?.2, field)?;
    }
    Ok(sum)
}

/// Whether `n` requests wait on the services' runs, one run leading and the rest following.
async fn all_in_flight(urls: &[String], n: usize) -> Result<bool, BoxError> {
    let (mut waiting, mut in_flight, mut following) = (0, 0, 0);
    for url in urls {
        let stats = fetch(url, Method::GET, "/stats").await?.2;
        waiting += stat(&stats, "waiting")?;
        in_flight += stat(&stats, "in_flight")?;
        following += stat(&stats, "following")?;
    }
    Ok(waiting == n && in_flight == following + 1)
}

/// Fires `n` identical requests alternating over `urls`; true if they made one upstream
/// call and got one body.
async fn client(urls: &[String], n: usize) -> Result<bool, BoxError> {
    let before = total(urls, "upstream_calls").await?;
    let path = "/report/2026-12?region=eu";
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            tokio::spawn(async move { fetch(&url, Method::GET, path).await })
        })
        .collect();
    // Wait until every request is in flight: all n waiting on a run, one service's run
    // leading and the other's following it (its fan-out found the run in progress). Then
    // let the upstream answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_in_flight(urls, n).await? && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for url in urls {
        fetch(url, Method::POST, "/release").await?;
    }
    let mut bodies = std::collections::BTreeSet::new();
    let (mut leaders, mut followers) = (0, 0);
    for request in requests {
        let (status, role, body) = request.await??;
        if status != StatusCode::OK {
            return Err(format!("{status}: {body}").into());
        }
        match role.as_deref() {
            Some("leader") => leaders += 1,
            Some("follower") => followers += 1,
            other => return Err(format!("unexpected role {other:?}").into()),
        }
        bodies.insert(body);
    }
    let calls = total(urls, "upstream_calls").await? - before;
    println!(
        "{n} identical requests to {} services: upstream calls: {calls}; {leaders} leader, {followers} followers; {} distinct body: {}",
        urls.len(),
        bodies.len(),
        bodies.iter().next().map_or("", String::as_str)
    );
    Ok(calls == 1 && leaders == 1 && bodies.len() == 1)
}
