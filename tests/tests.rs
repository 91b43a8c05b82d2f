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
// Real faults: killed/restarted/paused server, killed pub/sub, bad credentials, garbage.
mod faults;
// Cross-process behaviour with real OS processes.
mod cross_process;
// The worker side of the cross-process tests.
mod workers;
