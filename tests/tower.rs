//! `herdlock::tower::CoalesceLayer` (feature `tower`), both backends: one inner call for
//! identical requests on two nodes, pass-through, the body cap, failures as responses or
//! errors, cache age, per-caller timeouts, a dropped leader request, shutdown.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use herdlock::tower::{Coalesce, CoalesceLayer, BODY_TOO_LARGE, INNER_SERVICE_FAILED};
use herdlock::{FanoutOptions, Herd};
use http::header::{HeaderName, CONTENT_TYPE, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tower_layer::Layer;
use tower_service::Service;

use crate::fixture::{both_backends, within, Fx};

both_backends!(
    identical_requests_on_two_nodes_make_one_inner_call,
    requests_without_a_key_pass_through,
    a_body_over_the_cap_fails_every_caller,
    inner_errors_become_errors_when_asked,
    cache_age_serves_a_finished_response,
    each_caller_keeps_its_timeout,
    a_dropped_leader_request_keeps_the_inner_call,
    a_herd_shutting_down_answers_503,
);

const LIMIT: Duration = Duration::from_secs(30);

fn role() -> HeaderName {
    HeaderName::from_static("x-role")
}

/// What the inner service answers.
#[derive(Clone, Copy)]
enum Reply {
    /// 200, JSON, a cookie, the call number in the body.
    Json,
    /// 200 with a body of this many bytes.
    Bytes(usize),
    /// The inner service's error.
    Fail,
}

/// The inner service: counts its calls and answers once the gate is open.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
    reply: Reply,
}

impl Upstream {
    fn new(reply: Reply) -> (Upstream, watch::Sender<bool>) {
        let (open, gate) = watch::channel(false);
        let upstream = Upstream {
            calls: Arc::new(AtomicUsize::new(0)),
            gate,
            reply,
        };
        (upstream, open)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<()>> for Upstream {
    type Response = Response<Full<Bytes>>;
    type Error = String;
    type Future = BoxFuture<'static, Result<Response<Full<Bytes>>, String>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), String>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<()>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut gate = self.gate.clone();
        let reply = self.reply;
        async move {
            gate.wait_for(|open| *open)
                .await
                .map_err(|_| String::from("gate dropped"))?;
            match reply {
                Reply::Json => Ok(Response::builder()
                    .header(CONTENT_TYPE, "application/json")
                    .header(SET_COOKIE, "session=secret")
                    .body(Full::new(Bytes::from(format!("{{\"call\":{n}}}"))))
                    .map_err(|e| e.to_string())?),
                Reply::Bytes(len) => Ok(Response::new(Full::new(Bytes::from(vec![7u8; len])))),
                Reply::Fail => Err(String::from("upstream exploded")),
            }
        }
        .boxed()
    }
}

/// The key: GETs by URI; anything else is not coalesced.
fn key(request: &Request<()>) -> Option<String> {
    (request.method() == Method::GET).then(|| format!("GET {}", request.uri()))
}

fn get(path: &str) -> Request<()> {
    Request::get(path).body(()).expect("request")
}

/// One request through `service`: ready, then call.
async fn send<S>(mut service: S, request: Request<()>) -> Result<S::Response, S::Error>
where
    S: Service<Request<()>>,
{
    poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(request).await
}

/// A response's status, header `name` (if any) and body text.
async fn read<B>(response: Response<B>, name: &HeaderName) -> (StatusCode, Option<String>, String)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let status = response.status();
    let header = response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, header, String::from_utf8_lossy(&body).into_owned())
}

type Svc = Coalesce<Upstream, fn(&Request<()>) -> Option<String>>;

async fn two_nodes(
    fx: &Fx,
    upstream: &Upstream,
    tweak: fn(Layer2) -> Layer2,
) -> (Svc, Svc, [Herd; 2]) {
    let herds = [fx.node("node-a").await, fx.node("node-b").await];
    let service = |herd: &Herd| {
        let layer = CoalesceLayer::new(herd.clone(), key as fn(&Request<()>) -> Option<String>)
            .role_header(role());
        tweak(layer).layer(upstream.clone())
    };
    (service(&herds[0]), service(&herds[1]), herds)
}

/// Waits until the inner service was called once and, of the flights on `herds`, one leads
/// and every other one follows it: from then on no request can miss that run (a follower's
/// own acquire step has found it in progress).
async fn one_leads_the_rest_follow(herds: &[Herd], upstream: &Upstream) {
    within(LIMIT, "one flight leading, the others following", async {
        loop {
            let (in_flight, following) = herds.iter().fold((0, 0), |(i, f), herd| {
                let stats = herd.stats();
                (i + stats.in_flight, f + stats.following)
            });
            if upstream.calls() == 1 && in_flight == following + 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

type Layer2 = CoalesceLayer<fn(&Request<()>) -> Option<String>>;

/// 16 GETs of one URI, alternating between two nodes, all in flight before the inner
/// service may answer: one inner call, one leader, everyone gets the same response, and
/// only the kept headers.
async fn identical_requests_on_two_nodes_make_one_inner_call(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Json);
    let (a, b, herds) = two_nodes(&fx, &upstream, |l| l).await;
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let service = if i % 2 == 0 { a.clone() } else { b.clone() };
            send(service, get("/report/7?format=json"))
        })
        .collect();
    let mut all = Box::pin(join_all(calls));
    // One poll: every request has joined (or started) the fan-out of its key.
    assert!(futures::poll!(all.as_mut()).is_pending());
    one_leads_the_rest_follow(&herds, &upstream).await;
    open.send_replace(true);
    let responses = within(LIMIT, "the coalesced requests", all).await;
    assert_eq!(upstream.calls(), 1, "one inner call for 16 requests");
    let mut leaders = 0;
    for response in responses {
        let response = response.expect("a response");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert!(
            response.headers().get(SET_COOKIE).is_none(),
            "cookies are not shared"
        );
        let (status, role, body) = read(response, &role()).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"call\":1}"));
        match role.as_deref() {
            Some("leader") => leaders += 1,
            Some("follower") => {}
            other => panic!("unexpected role {other:?}"),
        }
    }
    assert_eq!(leaders, 1);
}

/// A request whose key is `None` runs the inner service itself and keeps every header.
async fn requests_without_a_key_pass_through(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Json);
    open.send_replace(true);
    let (a, b, _) = two_nodes(&fx, &upstream, |l| l).await;
    for service in [a.clone(), b, a] {
        let request = Request::post("/report/7").body(()).expect("request");
        let response = within(LIMIT, "a pass-through", send(service, request))
            .await
            .expect("a response");
        assert_eq!(response.headers()[SET_COOKIE], "session=secret");
        assert!(
            matches!(response.body(), http_body_util::Either::Right(_)),
            "the inner body, streamed"
        );
        let (_, role, _) = read(response, &role()).await;
        assert_eq!(role, None);
    }
    assert_eq!(upstream.calls(), 3);
}

/// A body over the cap is not shared, not truncated: every caller gets a 502 naming the
/// cap, from one inner call.
async fn a_body_over_the_cap_fails_every_caller(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Bytes(100));
    let (a, b, herds) = two_nodes(&fx, &upstream, |l| l.max_body(64)).await;
    let mut both = Box::pin(futures::future::join(
        send(a.clone(), get("/big")),
        send(b, get("/big")),
    ));
    assert!(futures::poll!(both.as_mut()).is_pending());
    one_leads_the_rest_follow(&herds, &upstream).await;
    open.send_replace(true);
    let (one, two) = within(LIMIT, "the oversized requests", both).await;
    for response in [one, two] {
        let (status, _, body) = read(response.expect("a response"), &role()).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("cap of 64 bytes"), "{body}");
    }
    assert_eq!(upstream.calls(), 1);
    // At the cap exactly, it is shared.
    let (upstream, open) = Upstream::new(Reply::Bytes(64));
    open.send_replace(true);
    let (a, ..) = two_nodes(&fx, &upstream, |l| l.max_body(64)).await;
    let (status, _, body) = read(
        within(LIMIT, "a body at the cap", send(a, get("/at-cap")))
            .await
            .expect("a response"),
        &role(),
    )
    .await;
    assert_eq!((status, body.len()), (StatusCode::OK, 64));
}

/// With a failure handler that returns `Err`, an inner error reaches every caller as the
/// inner service's error type, carrying the job error's code; the default answers 502.
async fn inner_errors_become_errors_when_asked(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Fail);
    open.send_replace(true);
    let mut services = Vec::new();
    for owner in ["node-a", "node-b"] {
        let layer = CoalesceLayer::new(fx.node(owner).await, key).on_failure(
            |error: herdlock::Error| -> Result<Response<Full<Bytes>>, String> {
                let code = error.job_error().and_then(|j| j.code()).unwrap_or("none");
                Err(format!("{code}: {error}"))
            },
        );
        services.push(layer.layer(upstream.clone()));
    }
    for service in services {
        let error = within(LIMIT, "a failing request", send(service, get("/fails")))
            .await
            .expect_err("an error");
        assert!(
            error.starts_with(INNER_SERVICE_FAILED) && error.contains("upstream exploded"),
            "{error}"
        );
    }
    let (a, ..) = two_nodes(&fx, &upstream, |l| l).await;
    let (status, _, body) = read(
        within(LIMIT, "a failing request", send(a, get("/fails-too")))
            .await
            .expect("a response"),
        &role(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("upstream exploded"), "{body}");
    assert_ne!(BODY_TOO_LARGE, INNER_SERVICE_FAILED);
}

/// With a cache age, a request after the run finished gets its response as `cached`.
async fn cache_age_serves_a_finished_response(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Json);
    open.send_replace(true);
    let cached = |l: Layer2| {
        l.options(
            FanoutOptions::new()
                .linger(Duration::from_secs(10))
                .cache_age(Duration::from_secs(10)),
        )
    };
    let (a, b, _) = two_nodes(&fx, &upstream, cached).await;
    let mut roles = Vec::new();
    for service in [a, b] {
        let response = within(LIMIT, "a cached request", send(service, get("/prices")))
            .await
            .expect("a response");
        let (status, role, body) = read(response, &role()).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"call\":1}"));
        roles.push(role.unwrap_or_default());
    }
    assert_eq!(roles, ["leader", "cached"]);
    assert_eq!(upstream.calls(), 1);
}

/// A caller whose timeout passes gets a 504; the run carries on, and a caller that joined
/// it later still gets the response.
async fn each_caller_keeps_its_timeout(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Json);
    let (a, ..) = two_nodes(&fx, &upstream, |l| l.wait(Duration::from_millis(200))).await;
    let (_, b, herds) = two_nodes(&fx, &upstream, |l| l).await;
    let mut patient = Box::pin(send(b, get("/slow")));
    assert!(futures::poll!(patient.as_mut()).is_pending());
    one_leads_the_rest_follow(&herds, &upstream).await;
    let hasty = within(LIMIT, "the hasty request", send(a, get("/slow")))
        .await
        .expect("a response");
    assert_eq!(hasty.status(), StatusCode::GATEWAY_TIMEOUT);
    open.send_replace(true);
    let response: Response<_> = within(LIMIT, "the patient request", patient)
        .await
        .expect("a response");
    let (status, _, body) = read(response, &role()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"call\":1}"));
    assert_eq!(upstream.calls(), 1);
}

/// Cancel safety: the client of the request that leads disconnects (its future is dropped)
/// while the inner call is in flight; the inner call carries on and the other node's
/// request still gets its response, from that one call.
async fn a_dropped_leader_request_keeps_the_inner_call(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Json);
    let (a, b, herds) = two_nodes(&fx, &upstream, |l| l).await;
    let mut leader = Box::pin(send(a, get("/dropped")));
    assert!(futures::poll!(leader.as_mut()).is_pending());
    // Node a's request leads once the inner service has been called (the flight runs on
    // the herd's task, not in this future).
    one_leads_the_rest_follow(&herds[..1], &upstream).await;
    let mut follower = Box::pin(send(b, get("/dropped")));
    assert!(futures::poll!(follower.as_mut()).is_pending());
    one_leads_the_rest_follow(&herds, &upstream).await;
    drop(leader);
    open.send_replace(true);
    let response = within(LIMIT, "the remaining request", follower)
        .await
        .expect("a response");
    let (status, _, body) = read(response, &role()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"call\":1}"));
    assert_eq!(upstream.calls(), 1);
}

/// A herd that was shut down (a service draining for a deploy) answers coalesced requests
/// with 503 without calling the inner service; requests that pass through still run.
async fn a_herd_shutting_down_answers_503(fx: Fx) {
    let (upstream, open) = Upstream::new(Reply::Json);
    open.send_replace(true);
    let (a, _, herds) = two_nodes(&fx, &upstream, |l| l).await;
    within(LIMIT, "shutdown", herds[0].shutdown(Duration::from_secs(5)))
        .await
        .expect("shutdown");
    let response = within(
        LIMIT,
        "a request while draining",
        send(a.clone(), get("/late")),
    )
    .await
    .expect("a response");
    let (status, _, body) = read(response, &role()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(upstream.calls(), 0);
    let request = Request::post("/late").body(()).expect("request");
    let response = within(LIMIT, "a pass-through while draining", send(a, request))
        .await
        .expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.calls(), 1);
}
