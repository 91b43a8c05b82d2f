//! herdlock's test harness: real `redis-server` processes for the tests, the examples'
//! load generator and the benches, never a mock.
//!
//! - [`server`]: one `redis-server` on a free loopback port, in its own temp dir, killed on
//!   drop (or by a watchdog when the owning process dies); [`server::shared`] is one server
//!   per process for tests that keep apart with [`server::unique_prefix`].
//! - [`cluster`]: a Redis Cluster (3 masters + 3 replicas by default), with failover and slot
//!   migration helpers.
//! - [`sentinel`]: a master, a replica and 3 pre-seeded Sentinels.
//! - [`tls`]: certificates made at test time with `openssl`, for TLS servers, clusters and
//!   Sentinel groups.
//! - [`proxy`]: a freezable TCP proxy, for partitions.
//! - [`procs`]: worker processes that re-run the current test binary in a role.
//!
//! It does not depend on herdlock: a dev-dependency cycle would give herdlock's unit tests a
//! second copy of the crate. The binaries come from `PATH` unless `HERDLOCK_REDIS_SERVER` /
//! `HERDLOCK_REDIS_CLI` / `HERDLOCK_OPENSSL` name others; `scripts/test` installs them on
//! Debian.
//!
//! A harness reports a broken environment (no `redis-server`, a server that does not answer)
//! by panicking, which fails the test that asked; each function's docs say when.

// Every function here may panic by design (see above); a `# Panics` section on each would
// repeat the crate docs.
#![allow(clippy::missing_panics_doc)]

pub mod cluster;
pub mod procs;
pub mod proxy;
pub mod sentinel;
pub mod server;
pub mod tls;

pub use cluster::{ClusterConfig, RedisCluster};
pub use sentinel::{SentinelConfig, SentinelGroup};
pub use server::{shared, unique_prefix, RedisServer, ServerConfig};
pub use tls::{tls_or_skip, AuthClients, Tls, TlsCerts};
