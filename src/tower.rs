//! Request coalescing for HTTP services (feature `tower`): [`CoalesceLayer`].
//!
//! A [`tower`](https://docs.rs/tower) layer that makes identical in-flight requests, in every
//! instance of a service, share one call of the inner service. The user derives a key from
//! each request (a closure `Fn(&Request<B>) -> Option<String>`); requests with equal keys
//! are one [fan-out](crate::Herd::fanout_with) job: the first caller anywhere (any process
//! that shares the herd's Redis and prefix) calls the inner service, and every other caller
//! with that key, while that call is in flight, receives the same response. A request whose
//! key is `None` passes straight through, its response body streamed as the inner service
//! produced it.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Method, Request, Response};
//! use http_body_util::Full;
//! use herdlock::tower::CoalesceLayer;
//! use tower_layer::Layer;
//!
//! # async fn inner(_: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> { unimplemented!() }
//! # fn main() -> Result<(), herdlock::Error> {
//! let herd = herdlock::Herd::builder().prefix("myapp-http").memory()?;
//! // Coalesce GETs by path and query; everything else runs as usual.
//! let layer = CoalesceLayer::new(herd, |req: &Request<()>| {
//!     (req.method() == Method::GET).then(|| format!("GET {}", req.uri()))
//! });
//! # let service = tower_service_fn(inner);
//! let service = layer.layer(service);
//! # let _ = service;
//! # Ok(()) }
//! # #[derive(Clone)] struct ServiceFn<F>(F);
//! # fn tower_service_fn<F>(f: F) -> ServiceFn<F> { ServiceFn(f) }
//! # impl<F, Fut> tower_service::Service<Request<()>> for ServiceFn<F>
//! # where F: Fn(Request<()>) -> Fut, Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> {
//! #     type Response = Response<Full<Bytes>>; type Error = Infallible; type Future = Fut;
//! #     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> { std::task::Poll::Ready(Ok(())) }
//! #     fn call(&mut self, req: Request<()>) -> Fut { (self.0)(req) }
//! # }
//! ```
//!
//! # What is shared
//!
//! The status, the headers named by [`keep_headers`](CoalesceLayer::keep_headers) (by
//! default [`DEFAULT_KEPT_HEADERS`]: content type, encoding and language, cache control,
//! `ETag`, `Last-Modified`, `Expires`, `Vary`; never `Set-Cookie` unless named), and the body
//! bytes. Every caller, the leader included, receives a response rebuilt from that shared
//! form (a [`Full`] body), so all callers see exactly the same thing. Header values that are
//! not visible ASCII are not shared. Non-2xx responses are shared like any other.
//!
//! Only coalesce requests whose response is a function of the key alone: the key decides
//! which requests are "identical". Everything else the inner service could look at (a
//! cookie, an `Authorization` header, the body) must be part of the key or the request
//! must not be coalesced. Keys share the herd's key namespace (give the layer a herd with a
//! [prefix](crate::Builder::prefix) of its own) and must be valid herdlock keys: at most
//! [`MAX_KEY_LEN`](crate::limits::MAX_KEY_LEN) bytes, braces only as one hash tag; hash a key
//! that may break these rules.
//!
//! # Size cap
//!
//! The inner response body is read up to [`max_body`](CoalesceLayer::max_body) bytes
//! (default [`DEFAULT_MAX_BODY`], 512 KiB; at most [`MAX_BODY_LIMIT`]). A longer body is
//! not shared and not truncated: the run fails, and every caller gets the failure
//! (below) with code [`BODY_TOO_LARGE`]. The body is stored in Redis for the run's
//! [linger](crate::FanoutOptions::linger) and published to every subscribed process,
//! base64-encoded (4/3 of its size); the layer sets the fan-out's
//! [`max_result_size`](crate::FanoutOptions::max_result_size) to fit `max_body`.
//!
//! # Errors: a response or an error
//!
//! When a coalesced request cannot be answered with a shared response (the inner service
//! returned an error, its body failed or was too large, Redis is unreachable, this
//! caller's [wait](CoalesceLayer::wait) ran out, the leader died without a successor in
//! time, …), the layer's failure handler turns the [`Error`] into the caller's result. The
//! default, [`FailureResponse`], answers with a plain-text response whose body is the
//! error's message:
//!
//! | status | when |
//! |---|---|
//! | `504` | the caller's wait ran out, or the run passed its [`max_duration`](crate::FanoutOptions::max_duration) |
//! | `502` | the inner service or its body failed ([`Error::job_error`] has the code [`INNER_SERVICE_FAILED`], [`BODY_FAILED`] or [`BODY_TOO_LARGE`], and the message the inner error's `Display`) |
//! | `503` | the coordination backend failed (connection, auth, permission, a run abandoned), or the herd is [shutting down](crate::Herd::shutdown) |
//! | `500` | anything else (a key herdlock refuses, a body cap over [`MAX_BODY_LIMIT`]) |
//!
//! [`on_failure`](CoalesceLayer::on_failure) replaces it with any closure
//! `Fn(herdlock::Error) -> Result<Response<Full<Bytes>>, E>`, where `E` is the inner
//! service's error type: return `Err` to fail the request as an error instead. Every caller
//! of one run, the leader included, sees the same failure. Requests that pass through (key
//! `None`) return the inner service's own response and error.
//!
//! # Cancel safety
//!
//! The service's futures are cancel safe. The inner service is called on a task the herd
//! owns: when the leader's client disconnects (its future is dropped), the inner call
//! carries on for every other caller; dropping any caller's future only stops that caller
//! waiting. A pass-through request's future is the inner service's own.
//!
//! # Requirements
//!
//! The inner service must be `Clone + Send + 'static` with a `Send` future (it is called
//! from the herd's task), its request body `Send + 'static` (it moves into the job; a
//! caller that does not lead drops its request unread), its response body a
//! [`Body<Data = Bytes>`](http_body::Body) whose error converts into a boxed error, and its
//! error `Display`. The layer calls [`poll_ready`](tower_service::Service::poll_ready) on
//! the inner service before every request, coalesced or not.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use tower_layer::Layer;
use tower_service::Service;

use crate::codec::JobError;
use crate::error::{Error, ErrorKind};
use crate::fanout::{FanoutOptions, Role};
use crate::herd::Herd;
use crate::limits::MAX_RESULT_SIZE_LIMIT;

/// The response body of a [`Coalesce`] service: [`Either::Left`] for a shared (or failure)
/// response, [`Either::Right`] for the inner service's own body of a request that passed
/// through.
pub type CoalesceBody<B> = Either<Full<Bytes>, B>;

/// The default [`CoalesceLayer::max_body`]: 512 KiB.
pub const DEFAULT_MAX_BODY: usize = 512 * 1024;

/// The largest accepted [`CoalesceLayer::max_body`]: 256 MiB (its base64 form and the
/// headers must fit in [`MAX_RESULT_SIZE_LIMIT`]).
pub const MAX_BODY_LIMIT: usize = 256 * 1024 * 1024;

/// The headers shared by default (see [`CoalesceLayer::keep_headers`]).
pub const DEFAULT_KEPT_HEADERS: [HeaderName; 8] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CACHE_CONTROL,
    header::ETAG,
    header::LAST_MODIFIED,
    header::EXPIRES,
    header::VARY,
];

/// [`JobError::code`] of a run whose inner service returned an error.
pub const INNER_SERVICE_FAILED: &str = "inner_service_failed";
/// [`JobError::code`] of a run whose response body returned an error while being read.
pub const BODY_FAILED: &str = "body_failed";
/// [`JobError::code`] of a run whose response body was longer than
/// [`CoalesceLayer::max_body`].
pub const BODY_TOO_LARGE: &str = "body_too_large";

/// Room for the status and the kept headers in a stored response, beyond the body.
const HEADROOM: usize = 64 * 1024;

/// Turns a coalesced request's failure into the caller's result: a response, or the inner
/// service's error type `E`. See [the module docs](self#errors-a-response-or-an-error).
///
/// Implemented by [`FailureResponse`] (the default) and by every
/// `Fn(Error) -> Result<Response<Full<Bytes>>, E>`.
pub trait OnFailure<E> {
    /// The caller's result for `error`.
    ///
    /// # Errors
    ///
    /// Whatever the handler chooses: an `Err` fails the request with the inner service's
    /// error type.
    fn on_failure(&self, error: Error) -> Result<Response<Full<Bytes>>, E>;
}

impl<E, G> OnFailure<E> for G
where
    G: Fn(Error) -> Result<Response<Full<Bytes>>, E>,
{
    fn on_failure(&self, error: Error) -> Result<Response<Full<Bytes>>, E> {
        self(error)
    }
}

/// The default failure handler: a plain-text response whose status says what failed (see
/// [the module docs](self#errors-a-response-or-an-error)) and whose body is the error's
/// message.
#[derive(Debug, Clone, Copy, Default)]
pub struct FailureResponse;

impl FailureResponse {
    /// The status this handler answers `error` with.
    pub fn status(error: &Error) -> StatusCode {
        match error.kind() {
            ErrorKind::Timeout | ErrorKind::JobTimedOut => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::JobFailed | ErrorKind::JobPanicked => StatusCode::BAD_GATEWAY,
            ErrorKind::Connection
            | ErrorKind::Auth
            | ErrorKind::Redis
            | ErrorKind::Permission
            | ErrorKind::ServerConfig
            | ErrorKind::Abandoned
            | ErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response this handler answers `error` with.
    pub fn response(error: &Error) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(format!("{error}\n"))));
        *response.status_mut() = FailureResponse::status(error);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl<E> OnFailure<E> for FailureResponse {
    fn on_failure(&self, error: Error) -> Result<Response<Full<Bytes>>, E> {
        Ok(FailureResponse::response(&error))
    }
}

/// A [`Layer`] that coalesces identical in-flight requests across every instance of a
/// service. See [the module docs](self).
///
/// `K` derives the key from a request; `F` handles failures ([`FailureResponse`] unless
/// [`on_failure`](CoalesceLayer::on_failure) set another). Cheap to clone.
#[must_use]
pub struct CoalesceLayer<K, F = FailureResponse> {
    herd: Herd,
    key: Arc<K>,
    options: FanoutOptions,
    wait: Duration,
    max_body: usize,
    kept: Arc<[HeaderName]>,
    role_header: Option<HeaderName>,
    on_failure: F,
}

impl<K, F: Clone> Clone for CoalesceLayer<K, F> {
    fn clone(&self) -> Self {
        CoalesceLayer {
            herd: self.herd.clone(),
            key: Arc::clone(&self.key),
            options: self.options.clone(),
            wait: self.wait,
            max_body: self.max_body,
            kept: Arc::clone(&self.kept),
            role_header: self.role_header.clone(),
            on_failure: self.on_failure.clone(),
        }
    }
}

impl<K, F: fmt::Debug> fmt::Debug for CoalesceLayer<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("herd", &self.herd)
            .field("options", &self.options)
            .field("wait", &self.wait)
            .field("max_body", &self.max_body)
            .field("kept", &self.kept)
            .field("role_header", &self.role_header)
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl<K> CoalesceLayer<K> {
    /// A layer that coalesces requests through `herd` by the key `key` derives from each
    /// request (`None`: do not coalesce this one).
    ///
    /// Defaults: each caller waits at most 30 s ([`wait`](CoalesceLayer::wait)),
    /// default [`FanoutOptions`], a body cap of [`DEFAULT_MAX_BODY`], the
    /// [`DEFAULT_KEPT_HEADERS`], no role header, failures as [`FailureResponse`]s.
    pub fn new(herd: Herd, key: K) -> CoalesceLayer<K> {
        CoalesceLayer {
            herd,
            key: Arc::new(key),
            options: FanoutOptions::new(),
            wait: Duration::from_secs(30),
            max_body: DEFAULT_MAX_BODY,
            kept: Arc::from(DEFAULT_KEPT_HEADERS.to_vec()),
            role_header: None,
            on_failure: FailureResponse,
        }
    }
}

impl<K, F> CoalesceLayer<K, F> {
    /// How long each caller waits for the shared response before its failure handler gets
    /// a [`Timeout`](ErrorKind::Timeout) error. Default: 30 s. The run carries on for the
    /// others.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The fan-out options of every run: its lease, its [linger](FanoutOptions::linger),
    /// a [cache age](FanoutOptions::cache_age) (serve a response that completed at most
    /// that long ago without calling the inner service), a
    /// [maximum duration](FanoutOptions::max_duration). Their
    /// [`max_result_size`](FanoutOptions::max_result_size) is replaced by one that fits
    /// [`max_body`](CoalesceLayer::max_body). Default: [`FanoutOptions::new`].
    pub fn options(mut self, options: FanoutOptions) -> Self {
        self.options = options;
        self
    }

    /// The longest response body shared, in bytes. Default: [`DEFAULT_MAX_BODY`]; at most
    /// [`MAX_BODY_LIMIT`] (a larger value fails every coalesced request with
    /// [`InvalidInput`](ErrorKind::InvalidInput)). See [the module docs](self#size-cap).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The response headers shared with every caller, replacing the default list
    /// ([`DEFAULT_KEPT_HEADERS`]). Headers not named are dropped from coalesced
    /// responses, the leader's included.
    pub fn keep_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.kept = names.into_iter().collect();
        self
    }

    /// Adds a header `name` to every coalesced response saying how its caller got it:
    /// `leader` (this caller's request ran the inner service), `follower` (another
    /// caller's did, in this process or another) or `cached` (a stored response within
    /// the [cache age](FanoutOptions::cache_age)). Default: none.
    pub fn role_header(mut self, name: HeaderName) -> Self {
        self.role_header = Some(name);
        self
    }

    /// Replaces the failure handler (default [`FailureResponse`]) with `handler`, e.g. a
    /// closure `|error: herdlock::Error| -> Result<Response<Full<Bytes>>, E>` where `E` is
    /// the inner service's error type. See [the module docs](self#errors-a-response-or-an-error).
    pub fn on_failure<G>(self, handler: G) -> CoalesceLayer<K, G> {
        CoalesceLayer {
            herd: self.herd,
            key: self.key,
            options: self.options,
            wait: self.wait,
            max_body: self.max_body,
            kept: self.kept,
            role_header: self.role_header,
            on_failure: handler,
        }
    }
}

impl<S, K, F: Clone> Layer<S> for CoalesceLayer<K, F> {
    type Service = Coalesce<S, K, F>;

    fn layer(&self, inner: S) -> Coalesce<S, K, F> {
        Coalesce {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// The service [`CoalesceLayer`] wraps around an inner service. Cheap to clone when the
/// inner service is.
pub struct Coalesce<S, K, F = FailureResponse> {
    inner: S,
    config: Arc<CoalesceLayer<K, F>>,
}

impl<S: Clone, K, F> Clone for Coalesce<S, K, F> {
    fn clone(&self) -> Self {
        Coalesce {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: fmt::Debug, K, F: fmt::Debug> fmt::Debug for Coalesce<S, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

/// A boxed error, as `http-body-util` uses.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future of a [`Coalesce`] service.
pub type CoalesceFuture<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, K, F, ReqB, ResB> Service<Request<ReqB>> for Coalesce<S, K, F>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: fmt::Display + Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    K: Fn(&Request<ReqB>) -> Option<String> + Send + Sync + 'static,
    F: OnFailure<S::Error> + Send + Sync + 'static,
{
    type Response = Response<CoalesceBody<ResB>>;
    type Error = S::Error;
    type Future = CoalesceFuture<CoalesceBody<ResB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The ready service goes with this request; a fresh clone awaits the next
        // `poll_ready` (tower's usual hand-over).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let Some(key) = (self.config.key)(&request) else {
            let call = inner.call(request);
            return Box::pin(async move { Ok(call.await?.map(Either::Right)) });
        };
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let result = coalesce(&config, &key, inner, request).await;
            let response = match result {
                Ok((shared, role)) => shared.into_response(role, config.role_header.as_ref()),
                Err(error) => Err(error),
            };
            match response {
                Ok(response) => Ok(response.map(Either::Left)),
                Err(error) => Ok(config.on_failure.on_failure(error)?.map(Either::Left)),
            }
        })
    }
}

/// Runs (or joins) the fan-out of `key`; the job calls `inner` and reads its response.
async fn coalesce<S, K, F, ReqB, ResB>(
    config: &CoalesceLayer<K, F>,
    key: &str,
    mut inner: S,
    request: Request<ReqB>,
) -> Result<(SharedResponse, Role), Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: fmt::Display + Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    if config.max_body > MAX_BODY_LIMIT {
        return Err(Error::invalid(format!(
            "the coalescing layer's body cap must be at most {MAX_BODY_LIMIT} bytes, got {}",
            config.max_body
        )));
    }
    let max_body = config.max_body;
    let max_result = (max_body.div_ceil(3) * 4 + HEADROOM).min(MAX_RESULT_SIZE_LIMIT);
    let options = config.options.clone().max_result_size(max_result);
    let kept = Arc::clone(&config.kept);
    let job = move || async move {
        let response = inner.call(request).await.map_err(|e| {
            JobError::new(format!("the inner service failed: {e}")).with_code(INNER_SERVICE_FAILED)
        })?;
        let (parts, body) = response.into_parts();
        let body = match Limited::new(body, max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return Err(JobError::new(format!(
                "the response body is longer than the coalescing layer's cap of {max_body} bytes"
            ))
                .with_code(BODY_TOO_LARGE))
            }
            Err(e) => {
                return Err(
                    JobError::new(format!("reading the response body failed: {e}"))
                        .with_code(BODY_FAILED),
                )
            }
        };
        Ok(SharedResponse::new(&parts, &kept, &body))
    };
    let fanned = config
        .herd
        .fanout_with(key, config.wait, &options, job)
        .await?;
    Ok((fanned.value, fanned.role))
}

/// A response in the form every caller shares: status, kept headers, base64 body.
#[derive(Debug, Serialize, Deserialize)]
struct SharedResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl SharedResponse {
    fn new(parts: &http::response::Parts, kept: &[HeaderName], body: &[u8]) -> SharedResponse {
        let headers = kept
            .iter()
            .flat_map(|name| {
                parts.headers.get_all(name).iter().filter_map(move |value| {
                    let value = value.to_str().ok()?;
                    Some((name.as_str().to_owned(), value.to_owned()))
                })
            })
            .collect();
        SharedResponse {
            status: parts.status.as_u16(),
            headers,
            body: base64::encode(body),
        }
    }

    fn into_response(
        self,
        role: Role,
        role_header: Option<&HeaderName>,
    ) -> Result<Response<Full<Bytes>>, Error> {
        let malformed = |what: &str| {
            Error::new(
                ErrorKind::Codec,
                format!("a shared response has a malformed {what}"),
            )
        };
        let body = base64::decode(&self.body).ok_or_else(|| malformed("body"))?;
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() =
            StatusCode::from_u16(self.status).map_err(|_| malformed("status"))?;
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            let name = HeaderName::try_from(name).map_err(|_| malformed("header name"))?;
            let value = HeaderValue::try_from(value).map_err(|_| malformed("header value"))?;
            headers.append(name, value);
        }
        if let Some(name) = role_header {
            let role = match role {
                Role::Leader => "leader",
                Role::Follower => "follower",
                Role::Cached => "cached",
            };
            headers.insert(name.clone(), HeaderValue::from_static(role));
        }
        Ok(response)
    }
}

/// Standard base64 with padding (RFC 4648, section 4), for bodies inside the JSON envelope.
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
            let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        let bytes = text.as_bytes();
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let groups = bytes.len() / 4;
        let mut out = Vec::with_capacity(groups * 3);
        for (index, chunk) in bytes.chunks(4).enumerate() {
            let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && index + 1 != groups) {
                return None;
            }
            let mut n = 0u32;
            for &c in &chunk[..4 - pad] {
                n = (n << 6) | value(c)?;
            }
            n <<= 6 * pad;
            let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&decoded[..3 - pad]);
        }
        Some(out)
    }

    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::{decode, encode};

        #[test]
        fn round_trips_every_length_and_byte() {
            let all: Vec<u8> = (0..=255).collect();
            for len in 0..all.len() {
                let text = encode(&all[..len]);
                assert_eq!(text.len(), len.div_ceil(3) * 4);
                assert_eq!(decode(&text).as_deref(), Some(&all[..len]), "length {len}");
            }
            assert_eq!(encode(b"foobar"), "Zm9vYmFy");
            assert_eq!(encode(b"fo"), "Zm8=");
        }

        #[test]
        fn refuses_malformed_text() {
            for bad in ["Zm8", "Zm=8", "Z===", "Zm8=Zm8=", "Zm9v\n", "Zm9-"] {
                assert_eq!(decode(bad), None, "{bad:?}");
            }
        }
    }
}

/// Compile-time checks: the default handler serves `Infallible` services (most HTTP
/// frameworks'), and the layer and its service can be shared across threads (axum's
/// `Router::layer` wants `Send + Sync`).
const _: () = {
    const fn serves<E, F: OnFailure<E>>() {}
    const fn send_sync<T: Send + Sync>() {}
    type Key = fn(&Request<()>) -> Option<String>;
    serves::<Infallible, FailureResponse>();
    send_sync::<FailureResponse>();
    send_sync::<CoalesceLayer<Key>>();
    send_sync::<Coalesce<(), Key>>();
};
