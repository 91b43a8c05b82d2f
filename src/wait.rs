//! How every waiter waits, and how an acquire step survives its caller giving up.
//!
//! ## Waiting ([`wait`])
//!
//! Lock, multi-lock and semaphore waiters and fan-out followers all wait the same way: on
//! their subscription(s) for a notice, or until a *re-check instant*, whichever comes
//! first, within the caller's deadline (when there is one). Pub/sub is a hint
//! (ARCHITECTURE invariant 5), so the re-check instant is when the holder's lease would
//! have run out if nobody extends it: its remaining TTL plus [`RECHECK_MARGIN`] (so the
//! re-check finds it expired, not about to), [`FALLBACK_RECHECK`] when the TTL is unknown,
//! and never more than [`MAX_RECHECK`] away (a lock lost with Redis's data sends no notice).
//! A [`Notice::Resync`] (notices may have been lost) always means "re-check"; what a message
//! means is the waiter's to say ([`Hint`]).
//!
//! ## Acquire steps are finished ([`Finished`])
//!
//! An acquire step that is cut off (by the caller's deadline, or because the caller was
//! dropped) after its request was sent may still win on the server. Instead of dropping it,
//! [`Finished`] hands the step to a background task that lets it complete and undoes a
//! win (releases what it took), so a deadline leaves nothing behind.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{select_all, BoxFuture};
use futures::FutureExt;
use tokio::time::Instant;

use crate::backend::{Notice, Subscription};
use crate::error::Result;

/// When the holder's remaining TTL is unknown (no TTL reported), re-check this often.
pub(crate) const FALLBACK_RECHECK: Duration = Duration::from_secs(1);

/// Added to a holder's remaining TTL before re-checking, so that the re-check finds the lease
/// expired rather than a millisecond short of it (Redis reports whole milliseconds, rounded
/// down, and expires a key only once its deadline has passed).
pub(crate) const RECHECK_MARGIN: Duration = Duration::from_millis(5);

/// The longest a waiter goes without re-checking, however long the holder's TTL: a lock
/// that vanished with Redis's data (a restart without persistence, a failover) sends no
/// notice, and this bounds how long a waiter can miss that.
pub(crate) const MAX_RECHECK: Duration = Duration::from_secs(30);

/// The remaining TTL a step reported (`PTTL`: negative when the key has none or is gone).
pub(crate) fn remaining(pttl_ms: i64) -> Option<Duration> {
    u64::try_from(pttl_ms).ok().map(Duration::from_millis)
}

/// When a waiter stops waiting without a notice: its re-check instant and its deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Until {
    recheck: Instant,
    deadline: Option<Instant>,
}

impl Until {
    /// Re-check when a lease with `remaining` TTL (`None`: unknown) would have run out.
    pub(crate) fn lease(remaining: Option<Duration>) -> Until {
        let after = remaining
            .map_or(FALLBACK_RECHECK, |r| r.saturating_add(RECHECK_MARGIN))
            .min(MAX_RECHECK);
        Until {
            recheck: Instant::now() + after,
            deadline: None,
        }
    }

    /// Re-check at most `cap` from now (a fair waiter refreshing its queue place).
    pub(crate) fn cap(self, cap: Duration) -> Until {
        Until {
            recheck: self.recheck.min(Instant::now() + cap),
            ..self
        }
    }

    /// Give up at the caller's `deadline`.
    pub(crate) fn deadline(self, deadline: Instant) -> Until {
        Until {
            deadline: Some(deadline),
            ..self
        }
    }
}

/// What a message on a waiter's channel means to it.
#[derive(Debug)]
pub(crate) enum Hint<T> {
    /// The wait is over: the message carries what the waiter waited for.
    Done(T),
    /// State may have changed: re-check it.
    Recheck,
    /// Not for this waiter: keep waiting (until the same instants).
    Ignore,
}

/// Why [`wait`] returned.
#[derive(Debug)]
pub(crate) enum Woken<T> {
    /// A message the waiter accepted ([`Hint::Done`]).
    Done(T),
    /// Re-check the state: a notice that may mean a change, or a resync.
    Recheck,
    /// Re-check the state: the re-check instant passed without a notice (what the
    /// re-check finds then, a notice would have said: see `obs::Waiting::found`).
    Timer,
    /// The caller's deadline passed.
    Deadline,
}

/// Waits on `subs` for a notice, until `until`'s re-check instant or deadline (see the
/// module docs). `hint` says what each message means; a [`Notice::Resync`] always means
/// re-check.
///
/// # Cancel safety
///
/// Cancel safe: a notice is either handled or stays queued in its subscription.
pub(crate) async fn wait<T>(
    subs: &mut [Subscription],
    until: Until,
    mut hint: impl FnMut(&[u8]) -> Hint<T>,
) -> Woken<T> {
    let (wake_at, at_deadline) = match until.deadline {
        Some(deadline) if deadline <= until.recheck => (deadline, true),
        _ => (until.recheck, false),
    };
    let timer = tokio::time::sleep_until(wake_at);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            notice = next_notice(subs) => match notice {
                Notice::Resync => return Woken::Recheck,
                Notice::Message(bytes) => match hint(&bytes) {
                    Hint::Done(value) => return Woken::Done(value),
                    Hint::Recheck => return Woken::Recheck,
                    Hint::Ignore => {}
                },
            },
            () = &mut timer => {
                return if at_deadline { Woken::Deadline } else { Woken::Timer };
            }
        }
    }
}

/// The next notice on any of `subs` (never, if there are none).
async fn next_notice(subs: &mut [Subscription]) -> Notice {
    match subs {
        [] => std::future::pending().await,
        [one] => one.recv().await,
        many => {
            select_all(many.iter_mut().map(|s| s.recv().boxed()))
                .await
                .0
        }
    }
}

/// A step that is finished even when its caller stops waiting for it: dropped before it
/// completed, it is handed to a background task that completes it and passes its output to
/// `undo` (which releases whatever the step took). Awaited to the end, it is an ordinary
/// future and `undo` is never called.
///
/// The step and `undo` own everything they use (`'static`): the step usually returns its
/// inputs along with its reply, so the caller gets them back without a copy.
pub(crate) struct Finished<T: Send + 'static> {
    /// The herd's gate, which counts the background finish (`Herd::shutdown` waits for it).
    gate: std::sync::Arc<crate::backend::gate::Gate>,
    what: &'static str,
    step: Option<BoxFuture<'static, T>>,
    undo: Option<Undo<T>>,
}

/// What undoes a [`Finished`] step's output.
type Undo<T> = Box<dyn FnOnce(T) -> BoxFuture<'static, Result<()>> + Send>;

impl<T: Send + 'static> Finished<T> {
    /// `what` names the step in the log line of a failed undo.
    pub(crate) fn new<S, U, F>(
        gate: &std::sync::Arc<crate::backend::gate::Gate>,
        what: &'static str,
        step: S,
        undo: U,
    ) -> Finished<T>
    where
        S: Future<Output = T> + Send + 'static,
        U: FnOnce(T) -> F + Send + 'static,
        F: Future<Output = Result<()>> + Send + 'static,
    {
        Finished {
            gate: std::sync::Arc::clone(gate),
            what,
            step: Some(step.boxed()),
            undo: Some(Box::new(move |out| undo(out).boxed())),
        }
    }
}

impl<T: Send + 'static> Future for Finished<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(step) = self.step.as_mut() else {
            panic!("`Finished` polled after it completed");
        };
        let out = std::task::ready!(step.as_mut().poll(cx));
        self.step = None;
        self.undo = None;
        Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for Finished<T> {
    fn drop(&mut self) {
        let (Some(step), Some(undo)) = (self.step.take(), self.undo.take()) else {
            return;
        };
        crate::herd::spawn_cleanup(&self.gate, self.what, async move { undo(step.await).await });
    }
}

impl<T: Send + 'static> std::fmt::Debug for Finished<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finished")
            .field("what", &self.what)
            .field("pending", &self.step.is_some())
            .finish_non_exhaustive()
    }
}
