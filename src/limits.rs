//! Every limit herdlock enforces on its input, in one place.
//!
//! Input beyond a limit is refused with [`InvalidInput`](crate::ErrorKind::InvalidInput),
//! never a panic.

use std::time::Duration;

/// The longest accepted key (job id / lock name), in bytes.
///
/// Redis accepts far longer keys, but a key is copied into every script call and
/// every notice; 512 bytes is ample for ids and keeps a runaway caller from bloating Redis.
pub const MAX_KEY_LEN: usize = 512;

/// The longest accepted key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 128;

/// The longest accepted owner label, in bytes.
pub const MAX_OWNER_LEN: usize = 256;

/// The longest accepted lock TTL (and grace period): 7 days.
///
/// A lease longer than this is almost always a unit mistake (seconds passed as
/// milliseconds); a job that truly runs for weeks should extend its lock as it goes.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest accepted wait timeout: 24 hours.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The shortest accepted lock TTL: 1 ms, the resolution of Redis `PX`.
pub const MIN_TTL: Duration = Duration::from_millis(1);

/// The most keys one multi-key lock may hold.
///
/// One script call carries every key; 64 keeps that call small and its atomic section short
/// (Redis runs nothing else meanwhile).
pub const MAX_MULTI_KEYS: usize = 64;

/// The largest accepted number of permits of a semaphore.
pub const MAX_PERMITS: u32 = 100_000;

/// How long a queued fair semaphore waiter keeps its place without refreshing it. Waiters
/// refresh every third of it, so a waiter that died blocks the queue for at most this long.
pub const QUEUE_TTL: Duration = Duration::from_secs(3);

/// The largest accepted [`FanoutOptions::max_result_size`](crate::FanoutOptions::max_result_size):
/// 512 MiB, Redis' own limit for one string.
pub const MAX_RESULT_SIZE_LIMIT: usize = 512 * 1024 * 1024;
