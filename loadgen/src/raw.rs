//! The raw redis-rs lock steps that the load generator and `benches/herdlock.rs` measure
//! herdlock against: a hand-written Redis lock with no library around it (the bench
//! includes this file by `#[path]`).

use redis::aio::ConnectionLike;

/// TTL of the baseline's raw locks.
pub(crate) const RAW_TTL_MS: u64 = 10_000;

/// The baseline's owner-checked delete: 1 when `KEYS[1]` still held `ARGV[1]` and was
/// deleted, else 0.
pub(crate) const COMPARE_AND_DELETE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// `SET key token NX PX RAW_TTL_MS`: whether the lock was taken.
pub(crate) async fn set_nx<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    token: &str,
) -> redis::RedisResult<bool> {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(RAW_TTL_MS)
        .query_async(conn)
        .await?;
    Ok(set.is_some())
}
