//! The in-memory engine: the same atomic steps as the Redis scripts, inside one process.
//!
//! Every step runs under one mutex, which makes it atomic exactly as a Lua script is on
//! Redis. Time is `tokio::time::Instant`, so tests may pause and advance it. Expired
//! entries are dropped when next touched, as Redis does lazily.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{AcquireReply, CheckReply, FanoutReply, MultiReply, Notice, StatusReply, Subscription};
use crate::keys::JobKeys;

/// Capacity of a key's notice queue; a receiver that falls further behind sees a Resync.
const CHANNEL_CAPACITY: usize = 64;

#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryBackend {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Invariant: an entry whose deadline has passed is treated as absent by every step.
    values: HashMap<String, Entry>,
    counters: HashMap<String, u64>,
    results: HashMap<String, Stored>,
    channels: HashMap<String, broadcast::Sender<Notice>>,
}

#[derive(Debug)]
struct Stored {
    envelope: Vec<u8>,
    ok: bool,
    at: Instant,
    expires: Instant,
}

#[derive(Debug)]
struct Entry {
    value: String,
    expires: Option<Instant>,
}

impl State {
    fn get(&mut self, key: &str) -> Option<&mut Entry> {
        let now = Instant::now();
        if self
            .values
            .get(key)
            .is_some_and(|e| e.expires.is_some_and(|t| t <= now))
        {
            self.values.remove(key);
        }
        self.values.get_mut(key)
    }

    fn pttl(&mut self, key: &str) -> i64 {
        let now = Instant::now();
        match self.get(key) {
            None => -2,
            Some(Entry { expires: None, .. }) => -1,
            Some(Entry {
                expires: Some(t), ..
            }) => i64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn result(&mut self, key: &str) -> Option<&Stored> {
        if self
            .results
            .get(key)
            .is_some_and(|r| r.expires <= Instant::now())
        {
            self.results.remove(key);
        }
        self.results.get(key)
    }

    fn publish(&mut self, channel: &str, payload: &[u8]) {
        if let Some(tx) = self.channels.get(channel) {
            if tx.send(Notice::Message(Arc::from(payload))).is_err() {
                // No receiver left: forget the channel.
                self.channels.remove(channel);
            }
        }
    }
}

impl MemoryBackend {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this mutex can only come from a bug in this file; the state
        // is still consistent between steps, so recover it rather than poison every caller.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn acquire(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
    ) -> AcquireReply {
        let mut st = self.lock();
        if st.get(&keys.lock).is_some() {
            let pttl_ms = st.pttl(&keys.lock);
            let holder = st
                .get(&keys.lock)
                .map(|e| e.value.clone())
                .unwrap_or_default();
            return AcquireReply::Busy { holder, pttl_ms };
        }
        let counter = st.counters.entry(keys.fence.clone()).or_insert(0);
        *counter += 1;
        let fence = *counter;
        let token = format!("{fence}:{nonce}:{owner}");
        st.values.insert(
            keys.lock.clone(),
            Entry {
                value: token.clone(),
                expires: Some(Instant::now() + ttl),
            },
        );
        AcquireReply::Acquired { token, fence }
    }

    pub(crate) fn multi_acquire(
        &self,
        keys: &[JobKeys],
        nonce: &str,
        owner: &str,
        ttl: Duration,
    ) -> MultiReply {
        let mut st = self.lock();
        let mut busy = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if let Some(entry) = st.get(&k.lock) {
                let holder = entry.value.clone();
                let pttl = st.pttl(&k.lock);
                busy.push((i, holder, pttl));
            }
        }
        if !busy.is_empty() {
            return MultiReply::Busy(busy);
        }
        let expires = Some(Instant::now() + ttl);
        let values = keys
            .iter()
            .map(|k| {
                let counter = st.counters.entry(k.fence.clone()).or_insert(0);
                *counter += 1;
                let value = format!("{counter}:{nonce}:{owner}");
                st.values.insert(
                    k.lock.clone(),
                    Entry {
                        value: value.clone(),
                        expires,
                    },
                );
                value
            })
            .collect();
        MultiReply::Acquired(values)
    }

    pub(crate) fn multi_extend(
        &self,
        keys: &[JobKeys],
        tokens: &[String],
        ttl: Duration,
    ) -> Vec<usize> {
        let mut st = self.lock();
        let lost: Vec<usize> = keys
            .iter()
            .zip(tokens)
            .enumerate()
            .filter(|(_, (k, t))| st.get(&k.lock).is_none_or(|e| &e.value != *t))
            .map(|(i, _)| i)
            .collect();
        for (k, t) in keys.iter().zip(tokens) {
            if let Some(entry) = st.get(&k.lock) {
                if &entry.value == t {
                    if lost.is_empty() {
                        entry.expires = Some(Instant::now() + ttl);
                    } else {
                        st.values.remove(&k.lock);
                        st.publish(&k.channel, b"released");
                    }
                }
            }
        }
        lost
    }

    pub(crate) fn fanout_acquire(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
        cache_age: Option<Duration>,
    ) -> FanoutReply {
        if let Some(max_age) = cache_age {
            let mut st = self.lock();
            if let Some(stored) = st.result(&keys.result) {
                if stored.ok && stored.at.elapsed() <= max_age {
                    return FanoutReply::Cached {
                        envelope: stored.envelope.clone(),
                    };
                }
            }
        }
        // The cache check and the acquire are two critical sections; that is fine because a
        // result stored in between is simply not served from the cache (as if it came later).
        FanoutReply::Lock(self.acquire(keys, nonce, owner, ttl))
    }

    pub(crate) fn fanout_check(&self, keys: &JobKeys) -> CheckReply {
        let mut st = self.lock();
        let pttl_ms = st.pttl(&keys.lock);
        let holder = st.get(&keys.lock).map(|e| e.value.clone());
        let envelope = st.result(&keys.result).map(|r| r.envelope.clone());
        CheckReply {
            holder,
            pttl_ms,
            envelope,
        }
    }

    pub(crate) fn complete(
        &self,
        keys: &JobKeys,
        token: &str,
        envelope: &[u8],
        ok: bool,
        linger: Duration,
    ) -> bool {
        let mut st = self.lock();
        if st.get(&keys.lock).is_none_or(|e| e.value != token) {
            return false;
        }
        let now = Instant::now();
        st.results.insert(
            keys.result.clone(),
            Stored {
                envelope: envelope.to_vec(),
                ok,
                at: now,
                expires: now + linger,
            },
        );
        st.values.remove(&keys.lock);
        st.publish(&keys.channel, envelope);
        true
    }

    pub(crate) fn release(&self, keys: &JobKeys, token: &str, grace: Duration) -> bool {
        let mut st = self.lock();
        match st.get(&keys.lock) {
            Some(entry) if entry.value == token => {
                if grace.is_zero() {
                    st.values.remove(&keys.lock);
                    st.publish(&keys.channel, b"released");
                } else {
                    entry.expires = Some(Instant::now() + grace);
                }
                true
            }
            _ => false,
        }
    }

    pub(crate) fn extend(&self, keys: &JobKeys, token: &str, ttl: Duration) -> bool {
        let mut st = self.lock();
        match st.get(&keys.lock) {
            Some(entry) if entry.value == token => {
                entry.expires = Some(Instant::now() + ttl);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn status(&self, keys: &JobKeys) -> StatusReply {
        let mut st = self.lock();
        let pttl_ms = st.pttl(&keys.lock);
        let holder = st.get(&keys.lock).map(|e| e.value.clone());
        let last_fence = st.counters.get(&keys.fence).copied().unwrap_or(0);
        StatusReply {
            holder,
            pttl_ms,
            last_fence,
        }
    }

    pub(crate) fn subscribe(&self, keys: &JobKeys) -> Subscription {
        let mut st = self.lock();
        let rx = if let Some(tx) = st.channels.get(&keys.channel) {
            tx.subscribe()
        } else {
            let (tx, rx) = broadcast::channel(CHANNEL_CAPACITY);
            st.channels.insert(keys.channel.clone(), tx);
            rx
        };
        Subscription::new(rx, None)
    }
}
