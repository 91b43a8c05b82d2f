//! The in-memory engine: the same atomic steps as the Redis scripts, inside one process.
//!
//! Every step runs under one mutex, which makes it atomic exactly as a Lua script is on
//! Redis. Time is `tokio::time::Instant`, so tests may pause and advance it. Expired
//! entries are dropped when next touched, as Redis does lazily.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::gate::Gate;
use super::wire::{held_by, holder_value, wake_notice, RELEASED};
use super::{
    AcquireReply, CheckReply, FanoutReply, MultiReply, Notice, ResultAges, SemArgs, SemOp,
    SemReply, StatusReply, Subscription,
};
use crate::keys::JobKeys;

/// Capacity of a key's notice queue; a receiver that falls further behind sees a Resync.
const CHANNEL_CAPACITY: usize = 16;

#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryBackend {
    state: Arc<Mutex<State>>,
    /// This herd's gate: each peer has its own (it is one "process").
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct State {
    /// Invariant: an entry whose deadline has passed is treated as absent by every step.
    values: HashMap<String, Entry>,
    /// The last fence handed out (fences are wall-clock µs, kept strictly increasing).
    last_fence: u64,
    /// Steps since the last sweep of expired entries.
    steps: u32,
    results: HashMap<String, Stored>,
    semaphores: HashMap<String, Sem>,
    channels: HashMap<String, broadcast::Sender<Notice>>,
}

/// One semaphore: holders with lease deadlines, and the fair queue.
#[derive(Debug, Default)]
struct Sem {
    holders: HashMap<String, Instant>,
    /// Ticket → member, in arrival order.
    queue: BTreeMap<u64, String>,
    /// Member → (ticket, liveness deadline).
    queued: HashMap<String, (u64, Instant)>,
    next_ticket: u64,
}

impl Sem {
    /// Nothing held and nobody queued: the semaphore can be forgotten (its ticket counter
    /// too, as `semt` expires on Redis).
    fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.queued.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        self.holders.retain(|_, until| *until > now);
        let dead: Vec<String> = self
            .queued
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(m, _)| m.clone())
            .collect();
        for m in dead {
            self.leave(&m);
        }
    }

    fn leave(&mut self, member: &str) -> bool {
        match self.queued.remove(member) {
            Some((ticket, _)) => {
                self.queue.remove(&ticket);
                true
            }
            None => false,
        }
    }

    fn rank(&self, member: &str) -> Option<usize> {
        let (ticket, _) = self.queued.get(member)?;
        Some(self.queue.range(..*ticket).count())
    }

    fn soonest_ms(&self, now: Instant) -> i64 {
        self.holders.values().min().map_or(-1, |t| {
            i64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(i64::MAX)
        })
    }

    /// The members at the head of the queue that free permits could admit.
    fn heads(&self, permits: u32) -> Vec<String> {
        let free = (permits as usize).saturating_sub(self.holders.len());
        self.queue.values().take(free).cloned().collect()
    }
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
    /// The live entry under `key` at `now` (an expired one is dropped first).
    fn get(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        if self
            .values
            .get(key)
            .is_some_and(|e| e.expires.is_some_and(|t| t <= now))
        {
            self.values.remove(key);
        }
        self.values.get_mut(key)
    }

    /// The live entry's value and remaining TTL at `now` (`PTTL`: -1 no expiry), read
    /// together so that they can never disagree.
    fn get_with_pttl(&mut self, key: &str, now: Instant) -> Option<(String, i64)> {
        self.get(key, now)
            .map(|e| (e.value.clone(), pttl(e.expires, now)))
    }

    fn result(&mut self, key: &str, now: Instant) -> Option<&Stored> {
        if self.results.get(key).is_some_and(|r| r.expires <= now) {
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

    /// The acquire step at `now` (the caller holds the state lock: one atomic step).
    fn acquire(
        &mut self,
        now: Instant,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
    ) -> AcquireReply {
        self.sweep_now_and_then(now);
        if let Some((holder, pttl_ms)) = self.get_with_pttl(&keys.lock, now) {
            return AcquireReply::Busy { holder, pttl_ms };
        }
        let fence = self.next_fence();
        let (token, value) = holder_value(fence, nonce, ttl, owner);
        self.values.insert(
            keys.lock.clone(),
            Entry {
                value,
                expires: Some(now + ttl),
            },
        );
        // One clock: a result completed after the call is always served, never missed.
        AcquireReply::Acquired {
            token,
            fence,
            maybe_missed: false,
        }
    }

    /// A fence as on Redis (µs of the wall clock), strictly greater than every earlier one.
    fn next_fence(&mut self) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.last_fence = wall.max(self.last_fence + 1);
        self.last_fence
    }

    /// Every 1,024 steps, drops whatever has expired (as Redis's active expiry does), so
    /// that the map holds nothing once every TTL has run out.
    fn sweep_now_and_then(&mut self, now: Instant) {
        self.steps += 1;
        if self.steps < 1_024 {
            return;
        }
        self.steps = 0;
        self.sweep(now);
    }

    fn sweep(&mut self, now: Instant) {
        self.values.retain(|_, e| e.expires.is_none_or(|t| t > now));
        self.results.retain(|_, r| r.expires > now);
        for sem in self.semaphores.values_mut() {
            sem.expire(now);
        }
        self.semaphores.retain(|_, sem| !sem.is_empty());
        self.channels.retain(|_, tx| tx.receiver_count() > 0);
    }

    /// How many entries of any kind the engine holds (expired ones swept first).
    fn len(&mut self, now: Instant) -> usize {
        self.sweep(now);
        self.values.len() + self.results.len() + self.semaphores.len()
    }
}

/// `PTTL` of an entry at `now`: -1 without expiry, else the whole milliseconds left.
fn pttl(expires: Option<Instant>, now: Instant) -> i64 {
    expires.map_or(-1, |t| {
        i64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(i64::MAX)
    })
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
        _waiting: bool,
    ) -> AcquireReply {
        let mut st = self.lock();
        st.acquire(Instant::now(), keys, nonce, owner, ttl)
    }

    pub(crate) fn multi_acquire(
        &self,
        keys: &[JobKeys],
        nonce: &str,
        owner: &str,
        ttl: Duration,
        _waiting: bool,
    ) -> MultiReply {
        let mut st = self.lock();
        let now = Instant::now();
        st.sweep_now_and_then(now);
        let busy: Vec<(usize, String, i64)> = keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| {
                st.get_with_pttl(&k.lock, now)
                    .map(|(holder, pttl_ms)| (i, holder, pttl_ms))
            })
            .collect();
        if !busy.is_empty() {
            return MultiReply::Busy(busy);
        }
        let expires = Some(now + ttl);
        let fence = st.next_fence();
        let (token, value) = holder_value(fence, nonce, ttl, owner);
        for k in keys {
            st.values.insert(
                k.lock.clone(),
                Entry {
                    value: value.clone(),
                    expires,
                },
            );
        }
        MultiReply::Acquired(vec![token; keys.len()])
    }

    pub(crate) fn multi_extend(
        &self,
        keys: &[JobKeys],
        tokens: &[String],
        ttl: Duration,
    ) -> Vec<usize> {
        let mut st = self.lock();
        let now = Instant::now();
        let lost: Vec<usize> = keys
            .iter()
            .zip(tokens)
            .enumerate()
            .filter(|(_, (k, t))| st.get(&k.lock, now).is_none_or(|e| !held_by(&e.value, t)))
            .map(|(i, _)| i)
            .collect();
        for (k, t) in keys.iter().zip(tokens) {
            if let Some(entry) = st.get(&k.lock, now) {
                if held_by(&entry.value, t) {
                    if lost.is_empty() {
                        entry.expires = Some(now + ttl);
                    } else {
                        st.values.remove(&k.lock);
                        st.publish(&k.channel, RELEASED);
                    }
                }
            }
        }
        lost
    }

    pub(crate) fn semaphore(&self, keys: &JobKeys, op: SemOp, args: SemArgs<'_>) -> SemReply {
        let mut st = self.lock();
        let now = Instant::now();
        let sem = st.semaphores.entry(keys.sem()).or_default();
        sem.expire(now);
        let member = args.member.to_owned();
        let mut notices: Vec<Vec<u8>> = Vec::new();
        let reply = match op {
            SemOp::Try | SemOp::Queue => {
                if sem.holders.contains_key(&member) {
                    SemReply::Admitted
                } else {
                    let in_use = sem.holders.len() as u32;
                    let free = args.permits.saturating_sub(in_use) as usize;
                    let admit = if op == SemOp::Try {
                        free > 0 && (sem.queue.is_empty() || sem.rank(&member) == Some(0))
                    } else {
                        if !sem.queued.contains_key(&member) {
                            sem.next_ticket += 1;
                            sem.queue.insert(sem.next_ticket, member.clone());
                            sem.queued.insert(member.clone(), (sem.next_ticket, now));
                        }
                        if let Some(entry) = sem.queued.get_mut(&member) {
                            entry.1 = now + args.queue_ttl;
                        }
                        sem.rank(&member).is_some_and(|rank| rank < free)
                    };
                    if admit {
                        sem.leave(&member);
                        sem.holders.insert(member, now + args.lease);
                        if op == SemOp::Queue {
                            notices.extend(
                                sem.heads(args.permits)
                                    .into_iter()
                                    .map(|m| wake_notice(&m).into_bytes()),
                            );
                        }
                        SemReply::Admitted
                    } else {
                        SemReply::Busy {
                            in_use,
                            soonest_ms: sem.soonest_ms(now),
                        }
                    }
                }
            }
            SemOp::Release => {
                let removed = sem.holders.remove(&member).is_some();
                if removed {
                    notices.push(RELEASED.to_vec());
                    notices.extend(
                        sem.heads(args.permits)
                            .into_iter()
                            .map(|m| wake_notice(&m).into_bytes()),
                    );
                }
                SemReply::Done(removed)
            }
            SemOp::Extend => match sem.holders.get_mut(&member) {
                Some(until) => {
                    *until = now + args.lease;
                    SemReply::Done(true)
                }
                None => SemReply::Done(false),
            },
            SemOp::Leave => {
                let queued = sem.leave(&member);
                // A cancelled attempt may have been admitted with nobody to own the permit.
                let held = sem.holders.remove(&member).is_some();
                if held {
                    notices.push(RELEASED.to_vec());
                }
                if queued || held {
                    notices.extend(
                        sem.heads(args.permits)
                            .into_iter()
                            .map(|m| wake_notice(&m).into_bytes()),
                    );
                }
                SemReply::Done(true)
            }
            SemOp::Status => SemReply::Status {
                in_use: sem.holders.len() as u32,
                queued: sem.queue.len() as u32,
                holders: sem
                    .holders
                    .iter()
                    .map(|(m, until)| {
                        let ms = i64::try_from(until.saturating_duration_since(now).as_millis())
                            .unwrap_or(i64::MAX);
                        (m.clone(), ms)
                    })
                    .collect(),
            },
        };
        if sem.holders.is_empty() && sem.queue.is_empty() {
            st.semaphores.remove(&keys.sem());
        }
        for notice in notices {
            st.publish(&keys.channel, &notice);
        }
        reply
    }

    pub(crate) fn fanout_acquire(
        &self,
        keys: &JobKeys,
        nonce: &str,
        owner: &str,
        ttl: Duration,
        ages: ResultAges,
    ) -> FanoutReply {
        let mut st = self.lock();
        let now = Instant::now();
        // As fanout_acquire.lua: a cached result first (even while a run is in progress),
        // then a run in progress, then a result produced after the newest call.
        let serve = |st: &mut State| {
            let stored = st.result(&keys.result(), now)?;
            let age = now.saturating_duration_since(stored.at);
            if stored.at > ages.newest_call {
                return Some(FanoutReply::Fresh {
                    envelope: stored.envelope.clone(),
                });
            }
            (stored.ok && ages.cache_age.is_some_and(|max_age| age <= max_age)).then(|| {
                FanoutReply::Cached {
                    envelope: stored.envelope.clone(),
                }
            })
        };
        if ages.cache_age.is_some() {
            if let Some(reply) = serve(&mut st) {
                return reply;
            }
        }
        if st.get(&keys.lock, now).is_none() {
            if let Some(reply) = serve(&mut st) {
                return reply;
            }
        }
        // One critical section: a result stored just before the acquire is served above.
        FanoutReply::Lock(st.acquire(now, keys, nonce, owner, ttl))
    }

    pub(crate) fn fanout_check(&self, keys: &JobKeys) -> CheckReply {
        let mut st = self.lock();
        let now = Instant::now();
        let (holder, pttl_ms) = match st.get_with_pttl(&keys.lock, now) {
            Some((holder, pttl_ms)) => (Some(holder), pttl_ms),
            None => (None, -2),
        };
        let envelope = st.result(&keys.result(), now).map(|r| r.envelope.clone());
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
        let now = Instant::now();
        if st
            .get(&keys.lock, now)
            .is_none_or(|e| !held_by(&e.value, token))
        {
            return false;
        }
        st.results.insert(
            keys.result(),
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
        let now = Instant::now();
        match st.get(&keys.lock, now) {
            Some(entry) if held_by(&entry.value, token) => {
                if grace.is_zero() {
                    st.values.remove(&keys.lock);
                    st.publish(&keys.channel, RELEASED);
                } else {
                    entry.expires = Some(now + grace);
                }
                true
            }
            _ => false,
        }
    }

    pub(crate) fn extend(&self, keys: &JobKeys, token: &str, ttl: Duration) -> bool {
        let mut st = self.lock();
        let now = Instant::now();
        match st.get(&keys.lock, now) {
            Some(entry) if held_by(&entry.value, token) => {
                entry.expires = Some(now + ttl);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn status(&self, keys: &JobKeys) -> StatusReply {
        let mut st = self.lock();
        let now = Instant::now();
        let (holder, pttl_ms) = match st.get_with_pttl(&keys.lock, now) {
            Some((holder, pttl_ms)) => (Some(holder), pttl_ms),
            None => (None, -2),
        };
        StatusReply { holder, pttl_ms }
    }

    /// The names of live locks and held semaphores that start with `start`.
    pub(crate) fn held_keys(&self, start: &str) -> Vec<String> {
        let mut st = self.lock();
        st.sweep(Instant::now());
        let locks = st.values.keys().filter(|k| k.ends_with(":lock"));
        let sems = st.semaphores.keys();
        locks
            .chain(sems)
            .filter(|k| k.starts_with(start))
            .cloned()
            .collect()
    }

    /// How many entries (locks, results, semaphores) the engine holds once everything
    /// expired has been dropped: 0 after every TTL, linger and queue TTL has run out.
    pub(crate) fn entries(&self) -> usize {
        self.lock().len(Instant::now())
    }

    /// Another herd ("process") on the same in-memory state, with a gate of its own.
    pub(crate) fn peer(&self) -> MemoryBackend {
        MemoryBackend {
            state: Arc::clone(&self.state),
            gate: Arc::default(),
        }
    }

    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Makes every waiter re-check now (every peer's: a spurious re-check is harmless).
    pub(crate) fn wake_all(&self) {
        for tx in self.lock().channels.values() {
            let _ = tx.send(Notice::Resync);
        }
    }

    /// How many subscriptions, across every herd of this engine, listen on `keys`' channel.
    pub(crate) fn subscribers(&self, keys: &JobKeys) -> u64 {
        self.lock()
            .channels
            .get(&keys.channel)
            .map_or(0, |tx| tx.receiver_count() as u64)
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
        Subscription::new(rx, None, true)
    }
}
