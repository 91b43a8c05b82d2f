//! The cluster listener: sharded pub/sub on a RESP3 cluster connection, healed by hand.
//!
//! redis-rs 1.8 drops a sharded subscription when the server unsubscribes it (a slot
//! migration sends an unrequested `SUNSUBSCRIBE`), and after a master failover no node
//! may hold it for seconds. So every channel that still has local subscribers and whose
//! subscription was lost is re-subscribed here, with backoff until it is confirmed, and
//! its waiters get a `Resync` (messages may have been missed meanwhile). Pub/sub stays a
//! hint: every waiter also re-checks when its holder's TTL runs out.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};

use super::{NotifierShared, IDLE_UNSUBSCRIBE};
use crate::backend::Notice;

/// Backoff of a failed re-subscribe (the slot's master is down, the slot map is stale):
/// 50 ms doubling to 1 s, until it succeeds.
const HEAL_MIN: Duration = Duration::from_millis(50);
const HEAL_MAX: Duration = Duration::from_secs(1);

pub(super) async fn listen(
    weak: Weak<NotifierShared>,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut shutdown: oneshot::Receiver<()>,
) {
    // Channels whose subscription was lost and not yet restored.
    let mut lost: BTreeSet<String> = BTreeSet::new();
    let mut backoff = HEAL_MIN;
    let mut sweep = tokio::time::interval(IDLE_UNSUBSCRIBE);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Not armed until something is lost.
    let heal = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(heal);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            push = pushes.recv() => {
                let Some(push) = push else { return };
                let Some(shared) = weak.upgrade() else { return };
                let was_empty = lost.is_empty();
                on_push(&shared, &push, &mut lost);
                if was_empty && !lost.is_empty() {
                    backoff = HEAL_MIN;
                    heal.as_mut().reset(tokio::time::Instant::now());
                }
            }
            () = &mut heal, if !lost.is_empty() => {
                let Some(shared) = weak.upgrade() else { return };
                if resubscribe(&shared, &mut lost).await {
                    backoff = HEAL_MIN;
                } else {
                    backoff = (backoff * 2).min(HEAL_MAX);
                }
                heal.as_mut().reset(tokio::time::Instant::now() + backoff);
            }
            _ = sweep.tick() => {
                let Some(shared) = weak.upgrade() else { return };
                shared.sweep().await;
            }
        }
    }
}

/// Handles one push: a sharded message goes to its channel's subscribers; an unrequested
/// `SUNSUBSCRIBE` of a channel still in use, or a dropped node connection, marks channels
/// lost.
fn on_push(shared: &NotifierShared, push: &PushInfo, lost: &mut BTreeSet<String>) {
    match push.kind {
        PushKind::SMessage | PushKind::Message => {
            if let [channel, payload, ..] = push.data.as_slice() {
                if let (Some(channel), Some(payload)) = (text(channel), raw(payload)) {
                    shared.dispatch(&channel, payload);
                }
            }
        }
        PushKind::SUnsubscribe => {
            let Some(channel) = push.data.first().and_then(text) else {
                return;
            };
            // A channel the sweep unsubscribed is no longer in the map: nothing to heal.
            let mut channels = shared.channels();
            if let Some(entry) = channels.get_mut(&channel) {
                tracing::debug!(
                    channel,
                    "sharded subscription dropped by the server; re-subscribing"
                );
                entry.confirmed = 0;
                lost.insert(channel);
            }
        }
        PushKind::Disconnection => {
            tracing::debug!("a cluster node connection dropped; re-subscribing every channel");
            crate::obs::reconnect("cluster node connection");
            let mut channels = shared.channels();
            for (name, entry) in channels.iter_mut() {
                entry.confirmed = 0;
                lost.insert(name.clone());
            }
        }
        _ => {}
    }
}

/// Re-subscribes every lost channel that still has an entry, concurrently; each one
/// confirmed gets a Resync. Returns whether all succeeded.
async fn resubscribe(shared: &NotifierShared, lost: &mut BTreeSet<String>) -> bool {
    let sink = shared.sink.lock().await.clone();
    let Some((sink, epoch)) = sink else {
        return false;
    };
    lost.retain(|name| shared.channels().contains_key(name));
    let attempts = lost.iter().map(|name| {
        let mut sink = sink.clone();
        let name = name.clone();
        async move {
            let channels = [name];
            let sent =
                tokio::time::timeout(shared.command_timeout, sink.subscribe(&channels)).await;
            let [name] = channels;
            (name, sent)
        }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let mut all = true;
    for (name, sent) in outcomes {
        match sent {
            Ok(Ok(())) => {
                lost.remove(&name);
                if let Some(entry) = shared.channels().get_mut(&name) {
                    entry.confirmed = epoch;
                    let _ = entry.tx.send(Notice::Resync);
                    crate::obs::resync(1);
                }
            }
            Ok(Err(e)) => {
                all = false;
                tracing::debug!(channel = name, error = %e, "sharded re-subscribe failed; retrying");
            }
            Err(_) => {
                all = false;
                tracing::debug!(channel = name, "sharded re-subscribe timed out; retrying");
            }
        }
    }
    if !all {
        tracing::warn!(
            channels = lost.len(),
            "sharded pub/sub re-subscribe incomplete; waiters fall back to TTL re-checks until it succeeds"
        );
    }
    all
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn raw(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}
