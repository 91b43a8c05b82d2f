//! Whether a herd still takes work: open, draining (no new acquisitions or runs; running
//! fan-out jobs may still complete, holders may still release) or closed (no waits go on:
//! extensions, subscriptions and fan-out checks are refused; releases, completions and
//! status reads still run, so nothing the herd holds is left to its TTL).
//! One gate per herd, shared by its backend and its watchdog's ([`Herd::shutdown`]).
//!
//! [`Herd::shutdown`]: crate::Herd::shutdown

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::error::{Error, ErrorKind, Result};

/// Where a herd stands in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    Open,
    Draining,
    Closed,
}

#[derive(Debug)]
pub(crate) struct Gate {
    stage: watch::Sender<Stage>,
    /// Background cleanups of this herd in flight (a cut-off acquire step finished and
    /// undone, a dropped guard's release): `Herd::shutdown` waits for them.
    cleanups: InFlight,
}

/// A count of things in flight that can be awaited down to zero (a shutdown waiting for
/// the herd's runs or cleanups to end).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    ended: Notify,
}

impl InFlight {
    pub(crate) fn begin(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn end(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.ended.notify_waiters();
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once nothing is in flight (at once if nothing is).
    pub(crate) async fn none(&self) {
        loop {
            let ended = self.ended.notified();
            if self.count() == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            stage: watch::Sender::new(Stage::Open),
            cleanups: InFlight::default(),
        }
    }
}

/// Counts one background cleanup while it lives.
pub(crate) struct Cleanup(Arc<Gate>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.0.cleanups.end();
    }
}

impl Gate {
    pub(crate) fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    /// Moves on to `stage` (never back); `true` if this call moved it.
    pub(crate) fn advance(&self, stage: Stage) -> bool {
        self.stage.send_if_modified(|current| {
            let moved = *current < stage;
            if moved {
                *current = stage;
            }
            moved
        })
    }

    /// Refuses a new acquisition or run once draining.
    pub(crate) fn admit_acquire(&self, what: &str) -> Result<()> {
        if self.stage() >= Stage::Draining {
            return Err(shutting_down(what));
        }
        Ok(())
    }

    /// Refuses anything but a release once closed.
    pub(crate) fn admit(&self, what: &str) -> Result<()> {
        if self.stage() >= Stage::Closed {
            return Err(shutting_down(what));
        }
        Ok(())
    }

    /// Counts a background cleanup until the returned guard drops.
    pub(crate) fn cleanup(self: &Arc<Self>) -> Cleanup {
        self.cleanups.begin();
        Cleanup(Arc::clone(self))
    }

    /// Resolves once no background cleanup of this herd runs.
    pub(crate) async fn cleanups_done(&self) {
        self.cleanups.none().await;
    }

    /// Resolves once the gate reaches `stage` (at once if it has).
    pub(crate) async fn reached(&self, stage: Stage) {
        let mut rx = self.stage.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail while we borrow it.
        let _ = rx.wait_for(|s| *s >= stage).await;
    }
}

pub(crate) fn shutting_down(what: &str) -> Error {
    Error::new(
        ErrorKind::ShuttingDown,
        format!("the herd is shutting down (Herd::shutdown): {what} refused"),
    )
}

/// A holder's `release` after [`Herd::shutdown`](crate::Herd::shutdown) released its lease.
pub(crate) fn released_by_shutdown(what: &str) -> Error {
    Error::new(
        ErrorKind::ShuttingDown,
        format!("the herd shut down (Herd::shutdown) and released this {what} already"),
    )
}
