//! Key validation and the Redis key layout (ARCHITECTURE.md, "Redis data model").

use std::time::Duration;

use crate::error::{Error, Result};

pub(crate) use crate::limits::{
    MAX_KEY_LEN, MAX_OWNER_LEN, MAX_PREFIX_LEN, MAX_TTL, MAX_WAIT, MIN_TTL,
};

/// Every Redis name one key uses. All share one hash tag, so a script that touches several
/// of them stays in one Redis Cluster slot.
///
/// A plain key `k` maps to `prefix:{k}:…`. A key that contains a hash tag of its own,
/// `a:{t}:b`, maps to `prefix:{t}:a:{t}:b:…`: every key with the tag `t` then lands in one
/// slot, which is how keys that must be locked together atomically ([`multi`]) are placed
/// on a Redis Cluster.
///
/// [`multi`]: crate::Herd::try_multi
#[derive(Debug, Clone)]
pub(crate) struct JobKeys {
    /// The caller's key, as given.
    pub(crate) key: String,
    /// `prefix:{key}:lock`: the holder token, with a PX TTL.
    pub(crate) lock: String,
    /// `prefix:{key}`: the pub/sub channel for release and completion notices.
    pub(crate) channel: String,
}

impl JobKeys {
    pub(crate) fn new(prefix: &str, key: &str) -> JobKeys {
        let base = match hash_tag(key) {
            Some(tag) => format!("{prefix}:{{{tag}}}:{key}"),
            None => format!("{prefix}:{{{key}}}"),
        };
        JobKeys {
            key: key.to_owned(),
            lock: format!("{base}:lock"),
            channel: base,
        }
    }
}

/// The key's own hash tag: the text between its one `{` and the `}` after it.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open..].find('}')? + open;
    Some(&key[open + 1..close])
}

/// The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (the text between the
/// first `{` and the next `}`, when not empty), else of the whole key, modulo 16384.
pub(crate) fn cluster_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let len = key[open + 1..].iter().position(|&b| b == b'}')?;
        (len > 0).then(|| &key[open + 1..open + 1 + len])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc % 16_384
}

impl JobKeys {
    /// The Redis Cluster slot every key and the channel of this job hash to.
    pub(crate) fn slot(&self) -> u16 {
        cluster_slot(self.lock.as_bytes())
    }

    // The names below are built on demand: a lock needs only `lock` and `channel`, and
    // building every name up front cost an allocation each per call.

    /// `prefix:{key}:result`: the last fan-out result (`r2:<ok>:<completed µs>:` + envelope),
    /// with a short linger.
    pub(crate) fn result(&self) -> String {
        format!("{}:result", self.channel)
    }

    /// `prefix:{key}:sem`: semaphore holders, scored by lease expiry.
    pub(crate) fn sem(&self) -> String {
        format!("{}:sem", self.channel)
    }

    /// `prefix:{key}:semq`: the fair semaphore queue, scored by ticket.
    pub(crate) fn sem_queue(&self) -> String {
        format!("{}:semq", self.channel)
    }

    /// `prefix:{key}:semqx`: liveness of queued waiters, scored by expiry.
    pub(crate) fn sem_queue_expiry(&self) -> String {
        format!("{}:semqx", self.channel)
    }

    /// `prefix:{key}:semt`: the fair semaphore's ticket counter.
    pub(crate) fn sem_ticket(&self) -> String {
        format!("{}:semt", self.channel)
    }
}

pub(crate) fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key must not be empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::invalid(format!(
            "key is {} bytes long, more than the limit of {MAX_KEY_LEN}",
            key.len()
        )));
    }
    let opens = key.matches('{').count();
    let closes = key.matches('}').count();
    if opens + closes > 0
        && !(opens == 1 && closes == 1 && hash_tag(key).is_some_and(|t| !t.is_empty()))
    {
        return Err(Error::invalid(
            "a key may contain braces only as one non-empty hash tag, like `account:{bank-1}:42`",
        ));
    }
    Ok(())
}

pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Err(Error::invalid("key prefix must not be empty"));
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(Error::invalid(format!(
            "key prefix is {} bytes long, more than the limit of {MAX_PREFIX_LEN}",
            prefix.len()
        )));
    }
    if prefix.contains(['{', '}']) {
        return Err(Error::invalid(
            "key prefix must not contain `{` or `}`: the hash tag belongs to the key",
        ));
    }
    Ok(())
}

pub(crate) fn validate_owner(owner: &str) -> Result<()> {
    if owner.is_empty() {
        return Err(Error::invalid("owner label must not be empty"));
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(Error::invalid(format!(
            "owner label is {} bytes long, more than the limit of {MAX_OWNER_LEN}",
            owner.len()
        )));
    }
    if owner.chars().any(char::is_control) {
        return Err(Error::invalid(
            "owner label must not contain control characters",
        ));
    }
    Ok(())
}

pub(crate) fn validate_ttl(what: &str, ttl: Duration) -> Result<()> {
    if ttl < MIN_TTL {
        return Err(Error::invalid(format!(
            "{what} must be at least 1 ms, got {ttl:?}"
        )));
    }
    if ttl > MAX_TTL {
        return Err(Error::invalid(format!(
            "{what} of {ttl:?} is longer than the limit of {MAX_TTL:?}"
        )));
    }
    Ok(())
}

pub(crate) fn validate_wait(wait: Duration) -> Result<()> {
    if wait.is_zero() {
        return Err(Error::invalid(
            "wait timeout must be greater than zero (use the try_ form to not wait)",
        ));
    }
    if wait > MAX_WAIT {
        return Err(Error::invalid(format!(
            "wait timeout of {wait:?} is longer than the limit of {MAX_WAIT:?}"
        )));
    }
    Ok(())
}

/// Whole milliseconds, rounded up so that 1.5 ms never becomes 1 ms of lease.
pub(crate) fn millis(d: Duration) -> u64 {
    let ms = d.as_millis();
    let ms = if d.as_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms + 1
    };
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Whole microseconds, rounded down (saturating).
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn cluster_slots_are_crc16_of_the_hash_tag() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(cluster_slot(b"123456789"), 0x31C3);
        assert_eq!(cluster_slot(b"foo"), 12_182);
        assert_eq!(
            cluster_slot(b"{user1000}.following"),
            cluster_slot(b"user1000")
        );
        assert_eq!(cluster_slot(b"foo{}{bar}"), cluster_slot(b"foo{}{bar}"));
        assert_ne!(cluster_slot(b"foo{}{bar}"), cluster_slot(b"bar"));
        assert_eq!(cluster_slot(b"foo{{bar}}zap"), cluster_slot(b"{bar"));
        let keys = JobKeys::new("p", "order:7");
        assert_eq!(keys.slot(), cluster_slot(b"order:7"));
        assert_eq!(cluster_slot(keys.channel.as_bytes()), keys.slot());
        assert_eq!(cluster_slot(keys.sem_ticket().as_bytes()), keys.slot());
    }

    #[test]
    fn key_layout_shares_one_hash_tag() {
        let k = JobKeys::new("herdlock", "job:1");
        assert_eq!(k.lock, "herdlock:{job:1}:lock");
        assert_eq!(k.channel, "herdlock:{job:1}");
    }

    #[test]
    fn a_keys_own_hash_tag_places_it() {
        let k = JobKeys::new("p", "acct:{bank}:1");
        assert_eq!(k.lock, "p:{bank}:acct:{bank}:1:lock");
        assert_eq!(k.channel, "p:{bank}:acct:{bank}:1");
        assert!(validate_key("acct:{bank}:1").is_ok());
        for bad in ["a{", "a}", "{}", "a}b{", "{a}{b}", "a{b"] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(validate_ttl("ttl", Duration::ZERO).is_err());
        assert!(validate_ttl("ttl", MAX_TTL + Duration::from_secs(1)).is_err());
        assert!(validate_wait(Duration::ZERO).is_err());
        assert!(validate_wait(MAX_WAIT * 2).is_err());
        assert!(validate_prefix("a{b").is_err());
        assert!(validate_owner("a\nb").is_err());
    }

    #[test]
    fn millis_rounds_up() {
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_millis(7)), 7);
    }
}
