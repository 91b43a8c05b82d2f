//! The Notifier: fans pub/sub notices out to local subscribers, one listener task per herd.
//!
//! The bookkeeping (which channels have local subscribers, on which connection epoch each
//! was confirmed, the idle sweep) is the same for every engine; what differs sits behind
//! a small seam, [`Sink`] (how to subscribe and unsubscribe) and the listener task:
//!
//! - [`single`]: one node, classic `SUBSCRIBE` on a dedicated pub/sub connection. When it
//!   drops, the task reconnects with backoff (50 ms doubling to 2 s), re-subscribes every
//!   channel that still has local subscribers, and then sends every local subscriber a
//!   `Resync` notice, because messages published while disconnected are gone. A refused
//!   re-subscribe (a channel permission revoked; Redis also closes the connection then)
//!   backs off from 100 ms doubling to 5 s, with a `warn` each time.
//!
//! - [`sharded`]: a Redis Cluster, sharded pub/sub (`SSUBSCRIBE` on a RESP3 cluster
//!   connection, `SPUBLISH` in the scripts): a notice reaches only the shard that owns the
//!   key. redis-rs does not keep sharded subscriptions alive, so the listener heals them:
//!   an unrequested `SUNSUBSCRIBE` (the slot moved) re-subscribes that channel, a
//!   `Disconnection` (a node dropped, maybe a failover) every channel, retried with backoff
//!   (50 ms doubling to 1 s) until the slot's current master confirms; each channel then
//!   gets a `Resync`.
//!
//! The task holds only a `Weak` reference and ends when the herd is dropped.

mod sharded;
mod single;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::{PubSub, PubSubSink};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, RedisResult};
use tokio::sync::{broadcast, oneshot};

use super::ConnectSettings;
use crate::backend::{Notice, Subscription};

/// Capacity of a key's local notice queue; a receiver that falls further behind sees a
/// Resync and re-checks state.
const CHANNEL_CAPACITY: usize = 16;

/// The subscribing half of the notifier's connection: the seam between the engines.
#[derive(Clone)]
pub(super) enum Sink {
    /// A dedicated pub/sub connection to one node (`SUBSCRIBE`).
    Single(PubSubSink),
    /// A RESP3 cluster connection (`SSUBSCRIBE`, one channel at a time: each is routed to
    /// its own slot's master).
    Sharded(ClusterConnection),
}

impl Sink {
    /// Subscribes `channels` and waits for the confirmation.
    async fn subscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.subscribe(channels).await,
            Sink::Sharded(conn) => {
                for channel in channels {
                    conn.ssubscribe(channel).await?;
                }
                Ok(())
            }
        }
    }

    /// Unsubscribes `channels` (sent by the idle sweep only).
    async fn unsubscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.unsubscribe(channels).await,
            Sink::Sharded(conn) => {
                for channel in channels {
                    conn.sunsubscribe(channel).await?;
                }
                Ok(())
            }
        }
    }
}

/// Fans pub/sub messages from the one dedicated connection out to local subscribers.
#[derive(Clone)]
pub(super) struct Notifier {
    shared: Arc<NotifierShared>,
}

/// How long a channel nobody listens to stays subscribed before the sweep unsubscribes it.
/// A waiter that comes back within it (a hot key) subscribes with no round trip at all.
const IDLE_UNSUBSCRIBE: Duration = Duration::from_secs(1);

struct NotifierShared {
    /// Channel name → local subscribers.
    ///
    /// Invariants: a channel with live [`ChannelGuard`]s is in this map; an entry is removed
    /// only by the sweep, under the `sink` lock, and only while it has no guard. Every
    /// channel in the map is subscribed on the current connection, is being subscribed by
    /// the caller that registered it, or will be re-subscribed (followed by a Resync) when
    /// the connection comes back.
    channels: Mutex<HashMap<String, ChannelEntry>>,
    /// The sending half of the current pub/sub connection and its epoch; `None` while
    /// (re)connecting. Held only to clone the sink, by the listener while it swaps
    /// connections (re-subscribing everything), and by the sweep across its UNSUBSCRIBE, so
    /// no SUBSCRIBE sent after a registration can be overtaken by a stale UNSUBSCRIBE.
    sink: tokio::sync::Mutex<Option<(Sink, u64)>>,
    /// The epoch of the installed sink (0 while reconnecting), readable without the sink
    /// lock: a channel confirmed on this epoch needs neither a SUBSCRIBE nor the lock
    /// (which the sweep holds across its UNSUBSCRIBE).
    epoch: AtomicU64,
    command_timeout: Duration,
    /// Dropped with this struct (or taken by [`Notifier::close`]), which tells the
    /// listener task to stop.
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
}

struct ChannelEntry {
    tx: broadcast::Sender<Notice>,
    refs: usize,
    /// The connection epoch on which the subscription was confirmed (0: not confirmed).
    confirmed: u64,
    /// Since when nobody listens (for the sweep).
    idle_since: Option<tokio::time::Instant>,
}

impl NotifierShared {
    fn channels(&self) -> MutexGuard<'_, HashMap<String, ChannelEntry>> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        if let Some(entry) = self.channels().get(channel) {
            // An idle channel (nobody waits; a leader hears its own completion) costs no copy.
            if entry.tx.receiver_count() > 0 {
                let _ = entry.tx.send(Notice::Message(Arc::from(payload)));
            }
        }
    }

    fn resync_all(&self) {
        let channels = self.channels();
        for entry in channels.values() {
            let _ = entry.tx.send(Notice::Resync);
        }
        crate::obs::resync(channels.len());
    }

    /// Unsubscribes channels idle for longer than [`IDLE_UNSUBSCRIBE`], in one command.
    async fn sweep(&self) {
        let mut slot = self.sink.lock().await;
        let idle: Vec<String> = {
            let mut channels = self.channels();
            let now = tokio::time::Instant::now();
            let idle: Vec<String> = channels
                .iter()
                .filter(|(_, e)| {
                    e.refs == 0 && e.idle_since.is_some_and(|t| now - t >= IDLE_UNSUBSCRIBE)
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in &idle {
                channels.remove(name);
            }
            idle
        };
        if idle.is_empty() {
            return;
        }
        if let Some((sink, _)) = slot.as_mut() {
            let _ = tokio::time::timeout(self.command_timeout, sink.unsubscribe(&idle)).await;
        }
    }
}

impl Notifier {
    /// Starts a one-node notifier on `target` (followed to a new master after a Sentinel
    /// failover); `first` is a pub/sub connection made at connect.
    pub(super) fn start(
        target: Arc<crate::backend::target::Target>,
        first: Option<PubSub>,
        settings: ConnectSettings,
    ) -> Notifier {
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let shared = Arc::new(NotifierShared {
            channels: Mutex::new(HashMap::new()),
            sink: tokio::sync::Mutex::new(None),
            epoch: AtomicU64::new(0),
            command_timeout: settings.command_timeout,
            shutdown: Mutex::new(Some(shutdown_tx)),
        });
        tokio::spawn(single::listen(
            Arc::downgrade(&shared),
            target,
            first,
            shutdown_rx,
            settings.connect_timeout,
        ));
        Notifier { shared }
    }

    /// Starts a sharded notifier on `conn`, a RESP3 cluster connection whose pushes arrive
    /// on `pushes`.
    pub(super) fn start_sharded(
        conn: ClusterConnection,
        pushes: tokio::sync::mpsc::UnboundedReceiver<PushInfo>,
        settings: ConnectSettings,
    ) -> Notifier {
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        // The cluster connection reconnects to its nodes on its own: one epoch for its
        // life. A channel whose subscription is lost goes back to unconfirmed (0) and is
        // re-subscribed by the listener.
        let shared = Arc::new(NotifierShared {
            channels: Mutex::new(HashMap::new()),
            sink: tokio::sync::Mutex::new(Some((Sink::Sharded(conn), 1))),
            epoch: AtomicU64::new(1),
            command_timeout: settings.command_timeout,
            shutdown: Mutex::new(Some(shutdown_tx)),
        });
        tokio::spawn(sharded::listen(
            Arc::downgrade(&shared),
            pushes,
            shutdown_rx,
        ));
        Notifier { shared }
    }

    /// Sends every local subscriber a `Resync`: re-check now.
    pub(super) fn resync_all(&self) {
        self.shared.resync_all();
    }

    /// Stops the listener task (closing the pub/sub connection) and makes every local
    /// subscriber re-check.
    pub(super) fn close(&self) {
        let stop = self
            .shared
            .shutdown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        self.shared.resync_all();
    }

    /// Registers a local subscriber, then, unless the channel is already confirmed on the
    /// current connection, subscribes and waits for the confirmation. If the connection is
    /// down, returns at once: the listener re-subscribes on reconnect and sends a Resync,
    /// so nothing published meanwhile is silently missed.
    pub(super) async fn subscribe(&self, channel: &str) -> Subscription {
        let (rx, confirmed) = self.register(channel);
        let guard = ChannelGuard {
            shared: Arc::clone(&self.shared),
            channel: channel.to_owned(),
        };
        let live = self.shared.epoch.load(Ordering::Acquire);
        if live != 0 && confirmed == live {
            return Subscription::new(rx, Some(guard), true); // warm: no round trip, no lock
        }
        let current = self.shared.sink.lock().await.clone();
        let Some((mut sink, epoch)) = current else {
            return Subscription::new(rx, Some(guard), false);
        };
        if confirmed == epoch {
            return Subscription::new(rx, Some(guard), true); // already subscribed: no round trip
        }
        let ok = match tokio::time::timeout(
            self.shared.command_timeout,
            sink.subscribe(std::slice::from_ref(&channel.to_owned())),
        )
        .await
        {
            Ok(Ok(())) => {
                if let Some(entry) = self.shared.channels().get_mut(channel) {
                    entry.confirmed = entry.confirmed.max(epoch);
                }
                true
            }
            Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                // The connect check found SUBSCRIBE allowed: the right was revoked since.
                tracing::warn!(channel, error = %e, "subscribe refused; waiting for the holder's TTL instead");
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(channel, error = %e, "subscribe failed; relying on resync");
                false
            }
            Err(_) => {
                tracing::debug!(channel, "subscribe timed out; relying on resync");
                false
            }
        };
        Subscription::new(rx, Some(guard), ok)
    }

    /// A subscription if the channel is already confirmed on the current connection (no
    /// round trip); otherwise nothing is registered.
    pub(super) fn subscribe_if_warm(&self, channel: &str) -> Option<Subscription> {
        let live = self.shared.epoch.load(Ordering::Acquire);
        if live == 0 {
            return None;
        }
        let rx = {
            let mut channels = self.shared.channels();
            let entry = channels.get_mut(channel).filter(|e| e.confirmed == live)?;
            entry.refs += 1;
            entry.idle_since = None;
            entry.tx.subscribe()
        };
        let guard = ChannelGuard {
            shared: Arc::clone(&self.shared),
            channel: channel.to_owned(),
        };
        Some(Subscription::new(rx, Some(guard), true))
    }

    /// Registers a local subscriber of `channel`: its receiver, and the epoch on which the
    /// channel was confirmed (0: not yet).
    fn register(&self, channel: &str) -> (broadcast::Receiver<Notice>, u64) {
        let mut channels = self.shared.channels();
        let entry = channels
            .entry(channel.to_owned())
            .or_insert_with(|| ChannelEntry {
                tx: broadcast::channel(CHANNEL_CAPACITY).0,
                refs: 0,
                confirmed: 0,
                idle_since: None,
            });
        entry.refs += 1;
        entry.idle_since = None;
        (entry.tx.subscribe(), entry.confirmed)
    }
}

/// Keeps one local subscription to a channel registered. When the last one goes, the
/// channel turns idle and the sweep unsubscribes it a little later.
pub(crate) struct ChannelGuard {
    shared: Arc<NotifierShared>,
    channel: String,
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if let Some(entry) = self.shared.channels().get_mut(&self.channel) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                entry.idle_since = Some(tokio::time::Instant::now());
            }
        }
    }
}
