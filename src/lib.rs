//! herdlock makes a herd of callers, spread over many processes and machines, do a piece
//! of work **once**.
//!
//! - [`Herd::fanout`]: the first caller anywhere runs a job; every other caller of the same
//!   id, in any process, receives its serialized result or error (request deduplication,
//!   cache-stampede protection). [`Herd::push`] is the lower-level form.
//! - [`Herd::try_lock`], [`Herd::lock`]: non-blocking and blocking locks with fencing
//!   tokens; [`Herd::once`] and [`Herd::run_locked`]: their closure forms (run unless held,
//!   or wait for the lock and run), released on success, error and panic.
//! - [`Herd::try_multi`], [`Herd::multi`]: several locks, all or none.
//! - [`Herd::semaphore`]: at most N holders cluster-wide, optionally fair.
//!
//! Everything runs on Redis (one multiplexed command connection running Lua scripts, one
//! dedicated pub/sub connection for wake-ups and results) or on an in-memory engine with
//! the same semantics.
//!
//! # Quick example
//!
//! ```
//! use std::time::Duration;
//! use herdlock::{Herd, Outcome};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), herdlock::Error> {
//! // `Herd::connect("redis://127.0.0.1/").await?` for the real thing.
//! let herd = Herd::memory();
//!
//! // A cron guard: run the import only if no other host is running it right now.
//! match herd.once("nightly-import", || async { Ok(42) }).await? {
//!     Outcome::Ran(n) => println!("imported {n} rows"),
//!     Outcome::Busy(holder) => println!("{} is already on it", holder.owner),
//! }
//!
//! // A blocking lock: wait up to 5 s for the migration lock.
//! let guard = herd.lock("migrations", Duration::from_secs(5)).await?;
//! println!("fencing token {}", guard.fence());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # Concepts
//!
//! - **Lock**: a key that at most one holder has at a time. A holder is stamped with an
//!   **owner** label (`<hostname>.<pid>` by default) so contenders and operators can see
//!   who holds it ([`Herd::lock_status`]).
//! - **TTL**: every lock expires unless extended ([`LockGuard::extend`]). The TTL is the
//!   backstop when a holder crashes: nobody waits longer than it for a dead holder.
//! - **Fencing token**: every acquisition of a key gets a number strictly greater than
//!   every earlier one ([`FencingToken`]).
//! - **Grace period**: optionally keep the lock a while after the work is done, so a late
//!   duplicate trigger does not redo it ([`LockOptions::grace`]).
//!
//! # Waiting
//!
//! One rule for every primitive: **how long a call may wait is the positional argument right
//! after the key** (or keys, or job id), and options never hold it:
//!
//! | never waits | waits up to `wait` |
//! |---|---|
//! | [`try_lock(key)`](Herd::try_lock), [`try_lock_with(key, &opts)`](Herd::try_lock_with) | [`lock(key, wait)`](Herd::lock), [`lock_with(key, wait, &opts)`](Herd::lock_with) |
//! | [`once(key, work)`](Herd::once), [`once_with(key, &opts, work)`](Herd::once_with) | [`run_locked(key, wait, work)`](Herd::run_locked), [`run_locked_with(key, wait, &opts, work)`](Herd::run_locked_with) |
//! | [`try_multi(keys)`](Herd::try_multi), [`try_multi_with(keys, &opts)`](Herd::try_multi_with) | [`multi(keys, wait)`](Herd::multi), [`multi_with(keys, wait, &opts)`](Herd::multi_with) |
//! | [`Semaphore::try_acquire()`] | [`Semaphore::acquire(wait)`](Semaphore::acquire) (the key is the semaphore's) |
//! | | [`fanout(id, wait, job)`](Herd::fanout), [`fanout_with(id, wait, &opts, job)`](Herd::fanout_with), [`push(id, wait, &opts)`](Herd::push) |
//!
//! Options come after the wait, and the closure last. A wait is from 1 ms to
//! [`limits::MAX_WAIT`]; it bounds only the waiting (for a lock, or for a fan-out result),
//! never work that runs once the lock is held. When it passes the call fails with
//! [`ErrorKind::Timeout`], naming what it waited for (the holder of a lock, the holders of
//! a multi-lock's keys); the forms that never wait report contention as a value instead.
//! A fan-out job stopped by its own [`max_duration`](FanoutOptions::max_duration) fails
//! with [`ErrorKind::JobTimedOut`], not `Timeout`.
//!
//! Durations in options bound other things, never the caller's wait:
//! [`LockOptions::replicas`]'s timeout bounds the replicas' acknowledgement of a lock
//! already taken, [`FanoutOptions::max_duration`] the job, and the [`Builder`]'s connect
//! and command timeouts each Redis round trip.
//!
//! # Jobs and their errors
//!
//! Every closure herdlock runs (a fan-out job, the work of [`Herd::once`] and
//! [`Herd::run_locked`]) returns a [`JobResult<T>`](JobResult), `Result<T, JobError>`: one
//! fixed error type, so `Ok(value)` needs no annotation, and `?` converts any error into it
//! (`std` errors, `anyhow::Error`, boxed errors, `String`; a [`herdlock::Error`](Error)
//! keeps its kind as the [code](JobError::code)). A fan-out job's error reaches every caller
//! as [`ErrorKind::JobFailed`] with the [`JobError`] in [`Error::job_error`]; the work of
//! `once` and `run_locked` fails the caller with its own `herdlock::Error` unchanged, or
//! `JobFailed` with the original error as its [`source`](std::error::Error::source).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), herdlock::Error> {
//! use std::time::Duration;
//! let herd = herdlock::Herd::memory();
//! let port: u16 = herd
//!     .fanout("config:port", Duration::from_secs(5), || async {
//!         let text = "8080"; // e.g. read from a config service
//!         Ok(text.parse()?) // a ParseIntError converts with `?`
//!     })
//!     .await?;
//! assert_eq!(port, 8080);
//! # Ok(()) }
//! ```
//!
//! # Fan-out semantics
//!
//! - **One run at a time per job id.** A run is the holder of the job id's lock; its
//!   fencing token is the run's *generation*. All callers in one process share one attempt
//!   ([`HerdStats`]), so a herd costs the same Redis commands as one caller.
//! - **Fresh results only.** A caller receives the result of the run in progress when it
//!   arrived, or of a later one, never of a run that finished before it asked (unless it
//!   opts into a [cache age](FanoutOptions::cache_age)).
//! - **Every caller keeps its own deadline.** A caller's timeout fails that caller only; the
//!   job, its lock and the other callers carry on. Dropping a caller's future (the leader's
//!   included) never cancels the job: it runs on a task the herd owns, unless the run opts
//!   into [cancelling when nobody waits any more](FanoutOptions::cancel_when_abandoned).
//! - **Errors fan out.** A job's error reaches every caller as [`ErrorKind::JobFailed`] with
//!   the same message, code and detail ([`Error::job_error`]); a panic as
//!   [`ErrorKind::JobPanicked`]; an unserializable or oversized result as
//!   [`ErrorKind::Codec`].
//! - **Leader death.** If the leader's process dies, its lease runs out (at most one TTL) and
//!   one of the waiters runs the job again as the next generation; the others receive that
//!   result. A leader that loses its lease while alive (paused, partitioned) cancels its
//!   job and publishes nothing.
//!
//! # Failure semantics
//!
//! A Redis lock is an *efficiency* lock: it stops duplicate work in all normal operation,
//! including crashes (the TTL frees the lock) and restarts of the client. It cannot, on
//! its own, guarantee mutual exclusion against a holder that is paused (GC, `SIGSTOP`, a
//! blocked runtime) or partitioned past its TTL, nor across a Redis failover that loses
//! the latest writes, nor across a restart of a Redis without persistence (the fence
//! counter restarts too). When correctness depends on exclusion, pass the
//! [`FencingToken`] to the protected system and have it reject tokens lower than the
//! highest it has seen.
//!
//! - A call that needs Redis fails with [`ErrorKind::Connection`] (or
//!   [`ErrorKind::Auth`]) within the command timeout when Redis is down; it never hangs.
//! - Held locks, fan-out runs and permits are renewed every third of their TTL by the
//!   herd's watchdog thread, on its own runtime and connection, so a blocked async runtime
//!   keeps its leases. A lease is *lost* when a renewal finds another holder or none
//!   succeeds before it runs out: [`LockGuard::lost`] resolves, `once` and fan-out leaders
//!   cancel their work (unless told not to), and `extend`/`release` return
//!   [`ErrorKind::LockLost`], leaving the new holder's lock untouched.
//! - [`Builder::connect`] refuses a Redis that may evict keys (an evicted lock lets a
//!   second holder in) with [`ErrorKind::ServerConfig`] unless
//!   [`Builder::allow_eviction`] says otherwise, and a Redis user without a permission
//!   herdlock needs with [`ErrorKind::Permission`], naming what is missing. A step refused
//!   later (a permission revoked while running) changes nothing: every script publishes
//!   its notices before its first write.
//! - Contention is never an error: [`TryLock::Busy`] and [`Outcome::Busy`] carry the
//!   current [`Holder`].
//! - Pub/sub is a hint, not the truth: a waiter that misses a release notice re-checks
//!   when the holder's TTL runs out (and at least every 30 s), and after the pub/sub
//!   connection reconnects every local waiter re-checks at once.
//!
//! # One shape for every primitive
//!
//! - **Guards read alike.** [`LockGuard`], [`MultiGuard`] and [`Permit`] each have
//!   `extend(&self, ttl)`, `heartbeat()`, `is_lost()`, `lost()`, `lost_token()` and a
//!   consuming `release()`; a lock lost before its release is
//!   [`LockLost`](ErrorKind::LockLost) from `release` for all three.
//! - **Heartbeats coalesce.** `heartbeat()` fails at once when the lease is known lost and
//!   otherwise renews at most once per third of the TTL, one renewal shared by every caller
//!   and the watchdog: call it in a hot loop.
//! - **A loss signal that travels.** [`LostToken`] is cloneable and `'static`: move it into
//!   a spawned task. Every guard and permit, a push [`Completer`], and (through
//!   [`LostToken::current`]) a fan-out job or a `once` closure hand one out.
//! - **The wait is positional.** How long a call may wait is always the argument after the
//!   key, never an option ([Waiting](#waiting)); every closure returns a
//!   [`JobResult`] ([Jobs and their errors](#jobs-and-their-errors)).
//! - **Non-blocking results read alike.** [`TryLock`], [`TryMulti`] and [`TryPermit`] have
//!   `acquired()`, `is_acquired()`, `is_busy()`, and what was busy.
//! - **Options are honoured or refused.** Each primitive takes options it honours
//!   ([`LockOptions`], [`MultiOptions`], [`SemaphoreOptions`], [`FanoutOptions`]); an option
//!   a call cannot honour (`cancel_on_lost` on a guard form) is
//!   [`InvalidInput`](ErrorKind::InvalidInput), never silently ignored. Input limits are in
//!   [`limits`].
//! - Every public future, guard and handle is `Send`, and every guard and handle `Sync`.
//!
//! # Backends
//!
//! [`Herd::connect`] (or [`Builder::connect`]) for Redis, [`Herd::memory`] for the
//! in-memory engine. Every Redis key of one lock shares the hash tag `{key}`:
//! `prefix:{key}:lock` holds the holder value `<fence>:<nonce>:<ttl>:<waited>:<owner>`
//! with a `PX` TTL, and `prefix:{key}` is the notice channel; no key lives forever.
//! Fencing tokens are Redis `TIME` in µs at acquisition. Expiry and ages come from Redis
//! (`PX`, `TIME`); a client only bounds Redis's clock from its own round trips, and
//! decides a lease's loss on its own monotonic clock, never later than Redis would.
//!
//! # Observability
//!
//! [`Herd::stats`] counts every primitive's acquisitions, contention, timeouts, losses and
//! releases ([`HerdStats`], [`PrimitiveStats`], [`FanoutStats`]). `tracing` events on the
//! `herdlock` target (`debug` and `trace`) name the key, the owner and the fence of every
//! acquisition, contention, wait, release, loss, lead, follow and takeover. With the crate
//! feature `metrics`, the same goes to the [`metrics`](https://docs.rs/metrics) facade;
//! README.md, "Observability", lists the metric names.
//!
//! # Cancel safety
//!
//! Every public future documents its cancel safety. In short: cancelling a wait, or an
//! acquire step of a lock or multi-lock, leaves nothing behind (a step already sent is
//! finished in the background and what it took is released; a wait's deadline does the
//! same); cancelling a release step may leave the lock taken until its TTL runs out.

#![doc(test(attr(deny(warnings))))]

mod backend;
mod coalesce;
mod codec;
mod error;
mod fanout;
mod herd;
mod keys;
pub mod limits;
mod lock;
mod multi;
mod obs;
mod semaphore;
#[cfg(feature = "tower")]
pub mod tower;
mod wait;
mod watchdog;

pub use codec::{Codec, JobError, JobResult};
pub use error::{Error, ErrorKind, Result};
pub use fanout::{Completer, Fanned, FanoutOptions, Follower, Push, Role};
pub use herd::{Builder, FanoutStats, Herd, HerdStats, PrimitiveStats, ShutdownReport};
pub use lock::{
    FencingToken, Held, HeldKind, Holder, LockGuard, LockOptions, LockStatus, Outcome, TryLock,
};
pub use multi::{HeldKey, MultiGuard, MultiOptions, TryMulti};
pub use semaphore::{
    Permit, PermitHolder, Semaphore, SemaphoreOptions, SemaphoreStatus, TryPermit,
};
pub use watchdog::LostToken;

// Every guard and handle crosses threads (the futures are checked in tests/guards.rs).
const _: () = {
    const fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Herd>();
    send_sync::<LockGuard>();
    send_sync::<MultiGuard>();
    send_sync::<Permit>();
    send_sync::<Semaphore>();
    send_sync::<LostToken>();
    send_sync::<Completer<()>>();
    send_sync::<Follower<()>>();
    send_sync::<TryLock>();
    send_sync::<TryMulti>();
    send_sync::<TryPermit>();
    send_sync::<Error>();
};

/// The README's examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

/// The Redis Cluster hash slot of `key` (CRC16 of its hash tag, modulo 16384), as Redis
/// computes it: for tests and tools that check where herdlock's keys land.
#[doc(hidden)]
pub fn cluster_slot(key: &str) -> u16 {
    keys::cluster_slot(key.as_bytes())
}
