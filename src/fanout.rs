//! Fan-out: run a job once across the cluster and hand its result to every caller.
//! [`Herd::fanout`], [`Herd::fanout_with`] and the lower-level [`Herd::push`].

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::coalesce::{self, How, Mode, ResultType, RunSettings, Waiter};
use crate::codec::{self, Body, Codec, JobResult};
use crate::error::{Error, ErrorKind, Result};
use crate::herd::Herd;
use crate::keys;
use crate::limits::MAX_RESULT_SIZE_LIMIT;
use crate::lock::FencingToken;
use crate::obs;
use crate::watchdog::LostToken;

/// How often a leader whose callers are all gone checks whether another process still
/// waits for its run ([`FanoutOptions::cancel_when_abandoned`]).
pub(crate) const ABANDON_CHECK_EVERY: Duration = Duration::from_millis(500);

/// How a caller obtained its fan-out result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// This caller started the run that produced the result: the job ran in this process.
    Leader,
    /// The result was shared: another caller (in this process or another) ran the job.
    Follower,
    /// A stored result no older than the requested [cache age](FanoutOptions::cache_age)
    /// was served; no job ran.
    Cached,
}

/// A fan-out result and how this caller obtained it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fanned<T> {
    /// The job's result, after the same serialization round trip every caller sees.
    pub value: T,
    /// Whether this caller led, followed or was served from the cache.
    pub role: Role,
    /// The generation of the run that produced the value: its fencing token, strictly
    /// increasing per job id.
    pub generation: FencingToken,
}

/// Options of one fan-out call. Every field has a documented default.
///
/// When several callers in one process join the same run, the run uses the options of
/// the caller that started it. A caller's wait is not an option: it is the positional
/// argument after the job id of [`Herd::fanout_with`] and [`Herd::push`] (the crate-wide
/// rule, see [the crate docs](crate#waiting)), and always the caller's own.
#[derive(Debug, Clone)]
#[must_use]
pub struct FanoutOptions {
    ttl: Option<Duration>,
    codec: Codec,
    linger: Duration,
    cache_age: Option<Duration>,
    max_duration: Option<Duration>,
    max_result_size: usize,
    cancel_on_lost: bool,
    cancel_when_abandoned: bool,
}

impl Default for FanoutOptions {
    fn default() -> Self {
        FanoutOptions {
            ttl: None,
            codec: Codec::Json,
            linger: Duration::from_secs(5),
            cache_age: None,
            max_duration: None,
            max_result_size: 1024 * 1024,
            cancel_on_lost: true,
            cancel_when_abandoned: false,
        }
    }
}

impl FanoutOptions {
    /// Options with every field at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// The run's lease. A watchdog extends it every third of the TTL while the job runs,
    /// so a job may run longer than the TTL; if the leader dies, waiters take over within
    /// about one TTL.
    ///
    /// Default: the herd's [`lock_ttl`](crate::Builder::lock_ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How results are serialized. Default: [`Codec::Json`].
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// How long a finished run's result stays in Redis.
    ///
    /// Default: 5 s. It must outlast the moment between a waiter finding the run in
    /// progress and checking for its result (milliseconds), and it bounds how old a
    /// [cached](FanoutOptions::cache_age) result can be.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Accept a successful result that finished at most `age` ago instead of starting a
    /// new run (cache-stampede protection).
    ///
    /// Default: none: a caller that arrives after a run finished starts a new run, so it
    /// never receives a result computed before it asked. Cached results can only be as old
    /// as the [linger](FanoutOptions::linger) of the run that stored them.
    pub fn cache_age(mut self, age: Duration) -> Self {
        self.cache_age = Some(age);
        self
    }

    /// Stop a job that runs longer than this and give every waiter a
    /// [`JobTimedOut`](ErrorKind::JobTimedOut) error (distinct from a caller's own
    /// [`Timeout`](ErrorKind::Timeout)).
    ///
    /// Default: none (the job runs until it finishes; every caller has its own timeout).
    pub fn max_duration(mut self, limit: Duration) -> Self {
        self.max_duration = Some(limit);
        self
    }

    /// The largest serialized result accepted. A larger result is not stored; every
    /// waiter gets a [`Codec`](ErrorKind::Codec) error instead.
    ///
    /// Default: 1 MiB, which protects Redis memory (the result is stored for the linger
    /// and sent to every subscribed process). At most [`MAX_RESULT_SIZE_LIMIT`](crate::limits::MAX_RESULT_SIZE_LIMIT).
    pub fn max_result_size(mut self, bytes: usize) -> Self {
        self.max_result_size = bytes;
        self
    }

    /// Whether the leader cancels its job when the run's lease is lost (the watchdog found
    /// another holder, or could not renew in time, e.g. after the process was paused).
    /// The leader's local callers then get [`LockLost`](ErrorKind::LockLost), and nothing is
    /// published under a generation the leader no longer owns.
    ///
    /// Default: on. Off lets the job finish; its result then reaches only this process's
    /// callers (the completion script refuses to publish it).
    pub fn cancel_on_lost(mut self, on: bool) -> Self {
        self.cancel_on_lost = on;
        self
    }

    /// Whether the leader cancels its job when nobody anywhere still waits for the run:
    /// every caller in this process timed out or was dropped, and no other process is
    /// subscribed to the job's channel (checked with `PUBSUB NUMSUB`, or `SHARDNUMSUB` on a
    /// cluster, every 500 ms while
    /// this process has no caller left). The lock is then released at once and nothing is
    /// stored or published; a caller that arrives later starts a new run.
    ///
    /// Default: off: the job finishes for whoever comes next (a caller that arrives while
    /// it runs gets its result). Only the leader's option counts, and it needs no option
    /// on the followers: every waiter, whatever its options, keeps the run alive. A
    /// process's subscription outlives its last waiter by about a second, so cancelling
    /// takes up to that long after the last caller left. On Redis the herd's user needs
    /// `+pubsub|numsub` (`+pubsub|shardnumsub` on a cluster); without it the job is never
    /// cancelled for this reason, and a warning is logged.
    pub fn cancel_when_abandoned(mut self, on: bool) -> Self {
        self.cancel_when_abandoned = on;
        self
    }

    fn validate(&self, herd: &Herd, timeout: Duration) -> Result<RunSettings> {
        keys::validate_wait(timeout).map_err(|_| {
            Error::invalid(format!(
                "fan-out timeout must be between 1 ms and {:?}, got {timeout:?}",
                keys::MAX_WAIT,
            ))
        })?;
        let ttl = self.ttl.unwrap_or(herd.inner.lock_ttl);
        keys::validate_ttl("fan-out ttl", ttl)?;
        keys::validate_ttl("result linger", self.linger)?;
        if let Some(age) = self.cache_age {
            keys::validate_ttl("cache age", age)?;
        }
        if let Some(limit) = self.max_duration {
            keys::validate_ttl("maximum job duration", limit)?;
        }
        if self.max_result_size == 0 || self.max_result_size > MAX_RESULT_SIZE_LIMIT {
            return Err(Error::invalid(format!(
                "maximum result size must be between 1 and {MAX_RESULT_SIZE_LIMIT} bytes, got {}",
                self.max_result_size
            )));
        }
        Ok(RunSettings {
            ttl,
            linger: self.linger,
            cache_age: self.cache_age,
            max_duration: self.max_duration,
            cancel_on_lost: self.cancel_on_lost,
            cancel_when_abandoned: self.cancel_when_abandoned,
        })
    }
}

impl Herd {
    /// Runs `job` once across the cluster for `job_id` and returns its result to every
    /// caller.
    ///
    /// The first caller anywhere becomes the leader and runs `job` on a task the herd owns;
    /// every other caller of the same `job_id` (in this process or any other) waits for
    /// the leader's result, serialized with the [codec](FanoutOptions::codec), or its
    /// error. Callers in one process share one remote attempt. A caller that arrives after
    /// a run finished starts a new run. See [`fanout_with`](Herd::fanout_with) for options
    /// and the caller's role.
    ///
    /// # Examples
    ///
    /// Deduplicate concurrent requests: eight callers, one run.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// let herd = herdlock::Herd::memory();
    /// let runs = Arc::new(AtomicUsize::new(0));
    /// let mut callers = Vec::new();
    /// for _ in 0..8 {
    ///     let (herd, runs) = (herd.clone(), runs.clone());
    ///     callers.push(tokio::spawn(async move {
    ///         herd.fanout("user:42", Duration::from_secs(5), move || async move {
    ///             runs.fetch_add(1, Ordering::SeqCst);
    ///             tokio::time::sleep(Duration::from_millis(50)).await;
    ///             Ok(String::from("profile of user 42"))
    ///         })
    ///         .await
    ///     }));
    /// }
    /// for caller in callers {
    ///     assert_eq!(caller.await.expect("task ran")?, "profile of user 42");
    /// }
    /// assert_eq!(runs.load(Ordering::SeqCst), 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Timeout`](ErrorKind::Timeout) when `wait` passes (the job carries on for the
    /// others); [`JobFailed`](ErrorKind::JobFailed) with the job's message (and
    /// [`Error::job_error`]) when the job returned an error; [`JobPanicked`](ErrorKind::JobPanicked);
    /// [`JobTimedOut`](ErrorKind::JobTimedOut) when it ran past its
    /// [`max_duration`](FanoutOptions::max_duration);
    /// [`Codec`](ErrorKind::Codec) when the result could not be serialized, was too large,
    /// cannot make the round trip through the codec unchanged (a NaN or an infinity with
    /// JSON: the leader checks before publishing, so every caller gets the same error and
    /// nothing is stored as a success), or could not be decoded as `T`;
    /// [`Abandoned`](ErrorKind::Abandoned) when the runtime shut down;
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a bad job id, or when the job id is in
    /// flight in this process for another result type `T` (one job id names one job with one
    /// result type); connection errors.
    ///
    /// A caller never starts a new run when a run of its job id completed after it called:
    /// it gets that run's result (or error), wherever the run took place, with no extra
    /// round trip. A caller that calls after a run completed never gets that run's result
    /// (unless it asked for a [cache age](FanoutOptions::cache_age)).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future only stops this caller from waiting. The job, if
    /// this caller started it, keeps running for the others.
    pub async fn fanout<T, F, Fut>(&self, job_id: &str, wait: Duration, job: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = JobResult<T>> + Send + 'static,
    {
        let options = FanoutOptions::default();
        Ok(self.fanout_with(job_id, wait, &options, job).await?.value)
    }

    /// [`fanout`](Herd::fanout) with options, also reporting this caller's [`Role`].
    /// `wait` is this caller's own, as in `fanout`.
    ///
    /// # Examples
    ///
    /// Cache-stampede protection: accept a result up to 2 s old.
    ///
    /// ```
    /// use std::time::Duration;
    /// use herdlock::{FanoutOptions, Role};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// let herd = herdlock::Herd::memory();
    /// let options = FanoutOptions::new().cache_age(Duration::from_secs(2));
    /// let wait = Duration::from_secs(5);
    /// let first = herd.fanout_with("prices", wait, &options, || async { Ok(7) }).await?;
    /// let second = herd.fanout_with("prices", wait, &options, || async { Ok(8) }).await?;
    /// assert_eq!((first.value, first.role), (7, Role::Leader));
    /// assert_eq!((second.value, second.role), (7, Role::Cached));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`fanout`](Herd::fanout), plus [`InvalidInput`](ErrorKind::InvalidInput) for
    /// options out of range.
    ///
    /// # Cancel safety
    ///
    /// As [`fanout`](Herd::fanout).
    pub async fn fanout_with<T, F, Fut>(
        &self,
        job_id: &str,
        wait: Duration,
        options: &FanoutOptions,
        job: F,
    ) -> Result<Fanned<T>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = JobResult<T>> + Send + 'static,
    {
        let keys = self.job_keys(job_id)?;
        let settings = options.validate(self, wait)?;
        let deadline = Instant::now() + wait;
        let codec = options.codec;
        let max_size = options.max_result_size;
        let job: coalesce::JobFn =
            Box::new(move || async move { codec::body_of(job().await, codec, max_size) }.boxed());
        let (waiter, started) =
            coalesce::join_or_start(self, &keys, ResultType::of::<T>(), settings, Mode::Run(job))?;
        settle(self, job_id, waiter, started, deadline, wait).await
    }

    /// The lower-level form of fan-out (after dlock's `push`): registers interest in
    /// `job_id` and returns this caller's role. The leader gets a [`Completer`] to finish
    /// the run later, from any task; everyone else gets a [`Follower`] to await the
    /// result, for up to `wait` from this call.
    ///
    /// If the leader drops every clone of its completer without completing, the run is
    /// released at once and its followers fail with [`Abandoned`](ErrorKind::Abandoned)
    /// (they have no job to take over with). The leader's lease is kept alive by a
    /// watchdog until it completes; [`max_duration`](FanoutOptions::max_duration) bounds
    /// how long that may take.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use herdlock::{FanoutOptions, Push};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), herdlock::Error> {
    /// let herd = herdlock::Herd::memory();
    /// let (wait, options) = (Duration::from_secs(5), FanoutOptions::new());
    /// let Push::Leader(completer) = herd.push::<u32>("report", wait, &options).await? else {
    ///     unreachable!("first caller leads");
    /// };
    /// let Push::Follower(follower) = herd.push::<u32>("report", wait, &options).await? else {
    ///     unreachable!("second caller follows");
    /// };
    /// tokio::spawn(async move { completer.complete(Ok(99)) });
    /// assert_eq!(follower.wait().await?, 99);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a bad id or options. Backend errors
    /// reach the [`Follower`].
    ///
    /// # Cancel safety
    ///
    /// Cancelling before the role is known gives the run up (as a dropped completer).
    pub async fn push<T>(
        &self,
        job_id: &str,
        wait: Duration,
        options: &FanoutOptions,
    ) -> Result<Push<T>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let keys = self.job_keys(job_id)?;
        let settings = options.validate(self, wait)?;
        let deadline = Instant::now() + wait;
        let (role_tx, role_rx) = oneshot::channel();
        let (waiter, started) = coalesce::join_or_start(
            self,
            &keys,
            ResultType::of::<T>(),
            settings,
            Mode::Push(Some(role_tx)),
        )?;
        let follower = |waiter| Follower {
            herd: self.clone(),
            job_id: job_id.to_owned(),
            waiter,
            started: false,
            deadline,
            timeout: wait,
            _value: PhantomData,
        };
        if !started {
            return Ok(Push::Follower(follower(waiter)));
        }
        match role_rx.await {
            Ok(Some((done, token))) => Ok(Push::Leader(Completer {
                done: Arc::new(Mutex::new(Some(done))),
                token,
                cancel_on_lost: options.cancel_on_lost,
                codec: options.codec,
                max_size: options.max_result_size,
                _value: PhantomData,
            })),
            // Follower, cached, or the flight failed before a role: the waiter tells.
            Ok(None) | Err(_) => Ok(Push::Follower(Follower {
                started: true,
                ..follower(waiter)
            })),
        }
    }
}

async fn settle<T: DeserializeOwned>(
    herd: &Herd,
    job_id: &str,
    waiter: Waiter,
    started: bool,
    deadline: Instant,
    timeout: Duration,
) -> Result<Fanned<T>> {
    let outcome = coalesce::wait(waiter, deadline, || {
        Error::new(
            ErrorKind::Timeout,
            format!("timed out after {timeout:?} waiting for job `{job_id}`"),
        )
    })
    .await;
    let took = timeout.saturating_sub(deadline.saturating_duration_since(Instant::now()));
    let outcome = obs::settled(herd, job_id, outcome, started, took)?;
    let role = match outcome.how {
        How::Led if started => Role::Leader,
        How::Led | How::Followed => Role::Follower,
        How::Cached => Role::Cached,
    };
    let envelope = outcome.result.clone()?;
    let value = codec::open(job_id, &envelope)?;
    Ok(Fanned {
        value,
        role,
        generation: FencingToken::new(envelope.generation),
    })
}

/// A caller's role after [`Herd::push`].
#[derive(Debug)]
#[must_use]
pub enum Push<T> {
    /// This caller leads the run and must complete it.
    Leader(Completer<T>),
    /// Another caller leads; await the result.
    Follower(Follower<T>),
}

/// Finishes a pushed run. Cheap to clone; completing is idempotent: the first
/// [`complete`](Completer::complete) wins and later ones are no-ops. Dropping every
/// clone without completing gives the run up.
#[must_use = "dropping the completer without completing abandons the run"]
pub struct Completer<T> {
    done: Arc<Mutex<Option<oneshot::Sender<Body>>>>,
    token: LostToken,
    /// The run is cancelled when its lease is lost: a completion after that reaches no one.
    cancel_on_lost: bool,
    codec: Codec,
    max_size: usize,
    _value: PhantomData<fn(T)>,
}

impl<T> Clone for Completer<T> {
    fn clone(&self) -> Self {
        Completer {
            done: Arc::clone(&self.done),
            token: self.token.clone(),
            cancel_on_lost: self.cancel_on_lost,
            codec: self.codec,
            max_size: self.max_size,
            _value: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Completer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completer")
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl<T> Completer<T> {
    /// The run's loss signal, cloneable and `'static`: it fires when the run's lease is lost
    /// before completion (the run is then cancelled unless
    /// [`cancel_on_lost`](FanoutOptions::cancel_on_lost) is off, and a later `complete`
    /// reaches no one), and [ends](LostToken::ended) when the run completes or is given up.
    pub fn lost_token(&self) -> LostToken {
        self.token.clone()
    }
}

impl<T: Serialize + DeserializeOwned> Completer<T> {
    /// Completes the run with `result`, which every follower receives (serialized with the
    /// codec of the push options). Returns `true` if this call completed the run, `false`
    /// if it had already been completed (a no-op), was given up, or its lease is known lost
    /// (with [`cancel_on_lost`](FanoutOptions::cancel_on_lost) on, the default).
    ///
    /// A value that cannot make the round trip through the codec unchanged (a NaN or an
    /// infinity with JSON, which would arrive as `null`; a payload that does not decode back
    /// into `T`) completes the run with a [`Codec`](ErrorKind::Codec) error for every caller
    /// instead; nothing is stored as a success.
    pub fn complete(&self, result: JobResult<T>) -> bool {
        // A run known lost is being cancelled: refuse now rather than race the flight
        // dropping its end of the channel.
        if self.cancel_on_lost && self.token.is_lost() {
            return false;
        }
        let sender = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match sender {
            Some(sender) => sender
                .send(codec::body_of(result, self.codec, self.max_size))
                .is_ok(),
            None => false,
        }
    }
}

/// Awaits a pushed run's result.
#[must_use = "a follower does nothing unless waited on"]
pub struct Follower<T> {
    herd: Herd,
    job_id: String,
    waiter: Waiter,
    started: bool,
    deadline: Instant,
    timeout: Duration,
    _value: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Follower<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower")
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Follower<T> {
    /// Waits for the run's result, until the push call's timeout (counted from the push).
    ///
    /// # Errors
    ///
    /// As [`Herd::fanout`], plus [`Abandoned`](ErrorKind::Abandoned) when the leader gave
    /// the run up or died.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait(self) -> Result<T> {
        let fanned: Fanned<T> = settle(
            &self.herd,
            &self.job_id,
            self.waiter,
            self.started,
            self.deadline,
            self.timeout,
        )
        .await?;
        Ok(fanned.value)
    }
}
