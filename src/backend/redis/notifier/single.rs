//! The one-node listener: a dedicated pub/sub connection (`SUBSCRIBE`), reconnected with
//! backoff; every reconnect re-subscribes every known channel and resyncs every waiter.
//! It also moves to a new master when the target's generation moves (a Sentinel failover),
//! and reports its connection failures to the target (which may re-resolve the master).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSub;
use tokio::sync::oneshot;

use super::{NotifierShared, Sink, IDLE_UNSUBSCRIBE};
use crate::backend::target::Target;
use crate::error::{Error, ErrorKind};

const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Backoff after the re-SUBSCRIBE of a fresh pub/sub connection failed (a revoked channel
/// permission fails every time): 100 ms doubling to 5 s, with a `warn` each time.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// The listener task: owns the pub/sub stream, reconnects, re-subscribes and resyncs, and
/// sweeps idle channels; follows the target to a new master.
#[allow(clippy::too_many_lines)] // one reconnect loop
pub(super) async fn listen(
    weak: Weak<NotifierShared>,
    target: Arc<Target>,
    mut first: Option<PubSub>,
    mut shutdown: oneshot::Receiver<()>,
    connect_timeout: Duration,
) {
    let mut backoff = RECONNECT_MIN;
    let mut resubscribe_backoff = RESUBSCRIBE_MIN;
    let mut epoch = 0u64;
    let mut moved = target.watch();
    loop {
        moved.borrow_and_update();
        let pubsub = if let Some(p) = first.take() {
            p
        } else {
            let client = target.client().0;
            let attempt = tokio::time::timeout(connect_timeout, client.get_async_pubsub());
            let outcome = tokio::select! {
                _ = &mut shutdown => return,
                r = attempt => r,
            };
            match outcome {
                Ok(Ok(p)) => p,
                other => {
                    if let Ok(Err(e)) = other {
                        tracing::debug!(error = %e, "pub/sub reconnect failed");
                    }
                    target.noticed(&Error::new(
                        ErrorKind::Connection,
                        "pub/sub reconnect failed",
                    ));
                    tokio::select! {
                        _ = &mut shutdown => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue;
                }
            }
        };
        let (sink, mut stream) = pubsub.split();
        let mut sink = Sink::Single(sink);
        epoch += 1;
        {
            let Some(shared) = weak.upgrade() else { return };
            let mut slot = shared.sink.lock().await;
            let names: Vec<String> = shared.channels().keys().cloned().collect();
            if !names.is_empty() {
                let resubscribed =
                    tokio::time::timeout(shared.command_timeout, sink.subscribe(&names)).await;
                if !matches!(resubscribed, Ok(Ok(()))) {
                    // A refused SUBSCRIBE (a channel permission revoked) fails on every new
                    // connection: back off instead of reconnecting in a tight loop. Waiters
                    // meanwhile re-check when their holder's TTL runs out.
                    let error = match resubscribed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", shared.command_timeout),
                    };
                    tracing::warn!(
                        channels = names.len(),
                        %error,
                        retry_in = ?resubscribe_backoff,
                        "pub/sub re-subscribe failed; waiters fall back to TTL re-checks until it succeeds"
                    );
                    drop(slot);
                    drop(shared);
                    drop((sink, stream));
                    tokio::select! {
                        _ = &mut shutdown => return,
                        () = tokio::time::sleep(resubscribe_backoff) => {}
                    }
                    resubscribe_backoff = (resubscribe_backoff * 2).min(RESUBSCRIBE_MAX);
                    continue;
                }
                resubscribe_backoff = RESUBSCRIBE_MIN;
                let mut channels = shared.channels();
                for name in &names {
                    if let Some(entry) = channels.get_mut(name) {
                        entry.confirmed = epoch;
                    }
                }
            }
            *slot = Some((sink, epoch));
            shared.epoch.store(epoch, Ordering::Release);
            drop(slot);
            if epoch > 1 {
                crate::obs::reconnect("pub/sub connection");
            }
            shared.resync_all();
        }
        backoff = RECONNECT_MIN;
        let mut sweep = tokio::time::interval(IDLE_UNSUBSCRIBE);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut master_moved = false;
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => return,
                msg = stream.next() => msg,
                // A new master (Sentinel failover): reconnect there, re-subscribe, resync.
                _ = moved.changed() => {
                    master_moved = true;
                    None
                }
                _ = sweep.tick() => {
                    let Some(shared) = weak.upgrade() else { return };
                    shared.sweep().await;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            let Some(shared) = weak.upgrade() else { return };
            shared.dispatch(msg.get_channel_name(), msg.get_payload_bytes());
        }
        if master_moved {
            tracing::debug!("sentinel master moved; pub/sub reconnecting there");
        } else {
            tracing::debug!("pub/sub connection lost; reconnecting");
            target.noticed(&Error::new(
                ErrorKind::Connection,
                "pub/sub connection lost",
            ));
        }
        let Some(shared) = weak.upgrade() else { return };
        let mut slot = shared.sink.lock().await;
        *slot = None;
        shared.epoch.store(0, Ordering::Release);
        drop(slot);
        drop(shared);
    }
}
