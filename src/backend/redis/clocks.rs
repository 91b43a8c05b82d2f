//! Redis Cluster: one clock bound per master.
//!
//! A fan-out caller sends an upper bound on Redis's clock at its call (`backend/clock.rs`),
//! and the bound must be of the clock of the server that runs the script: the master that
//! owns the job's slot. Masters' clocks need not agree, so each master has a
//! [`RedisClock`] of its own, sampled from the fan-out replies of its slots, from a `TIME`
//! routed to it when it has no sample, and from a probe thread with a connection of its
//! own while fan-out runs on it.
//!
//! Which master owns a slot comes from `CLUSTER SLOTS` (the command redis-rs itself maps
//! the cluster with, so a least-privilege user already may run it), fetched on the first
//! fan-out and again every [`REFRESH_EVERY`] while fan-out is in use. Between a slot's move
//! (a migration or a failover) and the next refresh, the old master's bound is sent for it.
//! Every reply carries the answering server's clock, and one that reads outside what the
//! bound's sample allows shows the move: earlier ([`RedisClock::contradicts`]: the bound was
//! loose, a run more at worst) or later (the bound may have been too low, so a stored result
//! served on it may predate the call). Either way a served result is asked for again
//! without a bound (only the time since the call counts then), the master's clock starts
//! afresh and the map is fetched again before the next bound. What remains: a result that
//! migrated with its slot carries the old master's completion time, compared with the new
//! master's clock; masters whose clocks agree (NTP) keep that within their offset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ConnectionAddr, ConnectionInfo, Value};

use super::super::clock::{ClientSource, RedisClock};
use super::super::target::{self, TlsFiles};

/// How often the slot map is fetched again while fan-out is in use.
pub(super) const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// A master's address as `CLUSTER SLOTS` names it.
pub(super) type Node = (String, u16);

/// Each master's clock and which master owns which slot.
pub(super) struct ClusterClocks {
    /// The first seed node's connection settings (user, password, TLS), for the probe
    /// threads' connections to each master.
    template: Option<ConnectionInfo>,
    tls: TlsFiles,
    state: Mutex<State>,
    /// Held while the slot map is fetched, so that concurrent callers wait for one fetch.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Slot ranges (inclusive) and their masters, sorted by start.
    ranges: Vec<(u16, u16, Node)>,
    /// When the map was fetched; `None`: never, or a reply showed it stale.
    fetched: Option<Instant>,
    clocks: HashMap<Node, Arc<RedisClock>>,
}

impl ClusterClocks {
    pub(super) fn new(nodes: &[String], tls: &TlsFiles) -> ClusterClocks {
        ClusterClocks {
            template: nodes
                .first()
                .and_then(|url| target::parse_url(url, "cluster node url").ok()),
            tls: tls.clone(),
            state: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The master that owns `slot` and its clock, fetching the slot map first when it is
    /// missing or older than [`REFRESH_EVERY`]. `None` when the map cannot be had (the
    /// caller then sends no bound).
    pub(super) async fn for_slot(
        &self,
        conn: &mut ClusterConnection,
        slot: u16,
        timeout: Duration,
    ) -> Option<(Node, Arc<RedisClock>)> {
        if !self.fresh() {
            let _one = self.fetching.lock().await;
            if !self.fresh() {
                self.fetch(conn, timeout).await;
            }
        }
        let mut state = self.state();
        let index = state.ranges.partition_point(|(start, _, _)| *start <= slot);
        let (_, end, node) = state.ranges.get(index.checked_sub(1)?)?;
        if slot > *end {
            return None;
        }
        let node = node.clone();
        let clock = Arc::clone(state.clocks.entry(node.clone()).or_default());
        Some((node, clock))
    }

    fn fresh(&self) -> bool {
        self.state()
            .fetched
            .is_some_and(|at| at.elapsed() < REFRESH_EVERY)
    }

    /// Fetches the slot map with `CLUSTER SLOTS`; on failure the old map stays (and is
    /// fetched again on the next call).
    async fn fetch(&self, conn: &mut ClusterConnection, timeout: Duration) {
        let reply = tokio::time::timeout(
            timeout,
            conn.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            ),
        )
        .await;
        let Some(mut ranges) = reply.ok().and_then(Result::ok).and_then(parse_slots) else {
            tracing::debug!("CLUSTER SLOTS failed: no clock bound until it answers");
            return;
        };
        ranges.sort_by_key(|(start, _, _)| *start);
        let mut state = self.state();
        // A master that owns no slot any more keeps no clock.
        state
            .clocks
            .retain(|node, _| ranges.iter().any(|(_, _, n)| n == node));
        state.ranges = ranges;
        state.fetched = Some(Instant::now());
    }

    /// A reply for `node`'s slots came from another clock: fetch the map before the next
    /// bound, and start that master's clock afresh.
    pub(super) fn moved(&self, node: &Node) {
        let mut state = self.state();
        state.fetched = None;
        if let Some(clock) = state.clocks.get(node) {
            clock.reset();
        }
    }

    /// Where `node`'s probe thread connects: a client with the seed node's settings at
    /// `node`'s address.
    pub(super) fn probe_source(&self, node: &Node) -> ClientSource {
        let client = self.template.clone().and_then(|info| {
            let addr = match info.addr() {
                ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                    host: node.0.clone(),
                    port: node.1,
                    insecure: *insecure,
                    tls_params: None,
                },
                _ => ConnectionAddr::Tcp(node.0.clone(), node.1),
            };
            target::build_client(info.set_addr(addr), &self.tls).ok()
        });
        Box::new(move || client.clone().map(|c| (c, 0)))
    }
}

/// Every master that owns a slot, once each, from a `CLUSTER SLOTS` reply.
pub(super) fn masters_of(reply: Value) -> Option<Vec<Node>> {
    let mut masters: Vec<Node> = parse_slots(reply)?
        .into_iter()
        .map(|(_, _, node)| node)
        .collect();
    masters.sort();
    masters.dedup();
    Some(masters)
}

/// `(start, end, master)` for each range of a `CLUSTER SLOTS` reply.
fn parse_slots(reply: Value) -> Option<Vec<(u16, u16, Node)>> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    entries
        .iter()
        .map(|entry| {
            let Value::Array(items) = entry else {
                return None;
            };
            let Value::Array(master) = items.get(2)? else {
                return None;
            };
            let host = text(master.first()?)?;
            let port = int(master.get(1)?)?;
            Some((int(items.first()?)?, int(items.get(1)?)?, (host, port)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slots_reply_parses_into_sorted_ranges() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
            ]),
        ]);
        let ranges = parse_slots(reply).expect("parses");
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (5461, 16383, ("127.0.0.1".to_owned(), 7001)));
        assert!(parse_slots(Value::Int(1)).is_none());
        assert!(parse_slots(Value::Array(vec![Value::Array(vec![Value::Int(0)])])).is_none());
    }
}
