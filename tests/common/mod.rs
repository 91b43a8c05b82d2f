//! The test harness, from `herdlock-testkit` (testkit/): a real `redis-server` ([`server`]), a
//! Redis Cluster ([`cluster`]), a Sentinel group ([`sentinel`]), TLS certificates made at test
//! time ([`tls`]), worker processes ([`procs`]) and a freezable TCP proxy for partitions
//! ([`proxy`]). Re-exported here under the names the test modules use.
//!
//! Every test module uses some of these helpers and none uses all, so unused ones are not
//! warnings here.
#![allow(dead_code, unused_imports)]

use std::time::Duration;

pub(crate) use herdlock_testkit::{cluster, procs, proxy, sentinel, server, tls};

pub(crate) use cluster::{ClusterConfig, RedisCluster};
pub(crate) use procs::{
    emit, ready_then_go, worker_param, worker_read_line, worker_ready_and_wait_go, worker_role,
    Worker,
};
pub(crate) use sentinel::{SentinelConfig, SentinelGroup};
pub(crate) use server::{shared, unique_prefix, RedisServer, ServerConfig};
pub(crate) use tls::{tls_or_skip, AuthClients, Tls, TlsCerts};

/// A generous bound for one step of a test (a worker getting ready, a line arriving, a
/// process exiting): long enough for a loaded CI machine, short enough to fail a hung test.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(30);
