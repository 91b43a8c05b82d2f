//! herdlock's integration tests: one test binary, one module per area (STYLE.md, "Tests").

// The harness: a real redis-server per test binary, worker processes.
mod common;
// Self-tests of the harness.
mod harness;
// Fixtures: one scenario on both backends.
mod fixture;
// Locks: try/once/blocking, guards, fencing, grace, status, bad input.
mod lock;
// Fan-out and push in one process.
mod fanout;
// Herd::stats: every primitive's counters, the lost-notice detector.
mod stats;
// Feature `metrics`: the Prometheus example's scrape, reconnects and resyncs.
#[cfg(feature = "metrics")]
mod metrics;
// Abandoned runs: a job nobody waits for any more is cancelled (opt-in).
mod abandon;
// Graceful shutdown: drain, finish runs, release everything at once.
mod shutdown;
// Jobs: inference, every error type as a job error, the waiting closure form.
mod jobs;
// Real faults: killed/restarted/paused server, killed pub/sub, bad credentials, garbage.
mod faults;
// Cross-process behaviour with real OS processes.
mod cross_process;
// The worker side of the cross-process tests.
mod workers;
// Multi-key locks: all or none, per-key outcomes, waiting, fencing, hash tags.
mod multi;
// Semaphores: N holders, status, wake-ups, watchdog, fair queueing, changing N.
mod semaphore;
// Leases: blocked runtimes, lock-lost detection, takeover, outages, replicas.
mod leases;
// Worker roles of the lease tests.
mod workers_lease;
// Multi-key locks and semaphores across real OS processes.
mod cross_process_sem;
// Worker roles of the cross-process multi-lock and semaphore tests.
mod workers_sem;
// The chaos run: killed workers, killed pub/sub, paused Redis; ledger-checked.
mod chaos;
// Connect checks: eviction refused, permissions checked, least privilege, nothing half done.
mod permissions;
// Partitions (a frozen TCP proxy) and stalls: the holder is told before anyone else acquires.
mod partitions;
// Releases retried through a killed or cut connection.
mod release_retries;
// Results that cannot make the round trip through their codec (both backends).
mod round_trip;
// Waiting: the in-memory clock, deadlines during an acquire step, the shared wait helper.
mod wait;
// Data loss (FLUSHALL) during a fan-out run, across processes.
mod data_loss;
// Property test: random operation sequences with clock advances agree on both backends.
mod props;
// Protocol v2 (issue 10): bounded footprint, fences across expiry, no coalescing misses,
// Redis commands per lock cycle.
mod protocol_v2;
// TLS (`rediss://`): the smoke set, mutual TLS, plain/TLS mismatches (feature `tls-rustls`).
#[cfg(feature = "tls-rustls")]
mod tls;
// The request-coalescing tower layer (feature `tower`), both backends.
#[cfg(feature = "tower")]
mod tower;
// Every example as a real process, on both backends.
mod examples;
// Tenants: two prefixes (one a prefix of the other) on one Redis never see each other.
mod tenants;
// Sentinel: connect by master name, follow a failover (herds, held locks, waiters).
mod sentinel;
// Redis Cluster: the behaviour suites on a 3-master + 3-replica cluster, sharded pub/sub,
// slot migration and failover.
mod cluster;
// Least privilege at scale: the README ACL rules on a Redis Cluster and through Sentinel.
mod acl_scale;
// The smoke set those permission tests run as restricted users.
mod smoke;
// One shape for every guard: coalescing heartbeats, lost tokens, refused options, Send/Sync.
mod guards;
