//! herdlock makes a herd of callers, spread over many processes and machines, do a piece
//! of work **once**.
//!
//! This release provides the foundation: distributed locks with fencing tokens, backed
//! by Redis (one multiplexed command connection running Lua scripts, one dedicated pub/sub
//! connection for wake-ups) or by an in-memory engine with the same semantics.
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
//! match herd.once("nightly-import", || async { Ok::<_, herdlock::Error>(42) }).await? {
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
//! - A guard whose lock expired gets [`ErrorKind::LockLost`] from `extend` and `release`,
//!   and the new holder's lock is left untouched.
//! - Contention is never an error: [`TryLock::Busy`] and [`Outcome::Busy`] carry the
//!   current [`Holder`].
//! - Pub/sub is a hint, not the truth: a waiter that misses a release notice re-checks
//!   when the holder's TTL runs out, and after the pub/sub connection reconnects every
//!   local waiter re-checks at once.
//!
//! # Backends
//!
//! [`Herd::connect`] (or [`Builder::connect`]) for Redis, [`Herd::memory`] for the
//! in-memory engine. Every Redis key of one lock shares the hash tag `{key}`:
//! `prefix:{key}:lock` holds the holder value `fence:nonce:owner` with a `PX` TTL,
//! `prefix:{key}:fence` is the fence counter, and `prefix:{key}` is the notice channel.
//! All time comes from Redis itself (`PX`, `PTTL`), never from client clocks.
//!
//! # Cancel safety
//!
//! Every public future documents its cancel safety. In short: cancelling a wait leaves
//! nothing behind; cancelling an acquire or release step may leave the lock taken until its
//! TTL runs out.

#![doc(test(attr(deny(warnings))))]

mod backend;
mod coalesce;
mod codec;
mod error;
mod fanout;
mod herd;
mod keys;
mod lock;
mod multi;
mod semaphore;
mod watchdog;

pub use codec::{Codec, JobError};
pub use error::{Error, ErrorKind, Result};
pub use fanout::{Completer, Fanned, FanoutOptions, Follower, Push, Role, MAX_RESULT_SIZE_LIMIT};
pub use herd::{Builder, Herd, HerdStats};
pub use keys::{MAX_KEY_LEN, MAX_OWNER_LEN, MAX_PREFIX_LEN, MAX_TTL, MAX_WAIT, MIN_TTL};
pub use lock::{FencingToken, Holder, LockGuard, LockOptions, LockStatus, Outcome, TryLock};
pub use multi::{HeldKey, KeyRelease, MultiGuard, TryMulti, MAX_MULTI_KEYS};
pub use semaphore::{
    Permit, PermitHolder, Semaphore, SemaphoreOptions, SemaphoreStatus, TryPermit, MAX_PERMITS,
    QUEUE_TTL,
};

/// The README's examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}
