//! The wire formats, in one place: the holder value stored under a lock key, the notices
//! published on a key's channel, the stored-result header, and the parsing of the Redis
//! scripts' replies. Everything read here comes from Redis (or anyone who can write to it)
//! and is parsed without panics: a malformed value is an error for that call.

use std::time::Duration;

use redis::Value;

use super::{AcquireReply, CheckReply, FanoutReply, MultiReply, SemOp, SemReply, StatusReply};
use crate::error::{Error, ErrorKind, Result};

// --- Holder values -------------------------------------------------------------------------

/// The fields of a stored holder value `<fence>:<nonce>:<ttl ms>:<waited 0|1>:<owner>`.
struct HolderFields<'a> {
    fence: u64,
    nonce: &'a str,
    /// `<fence>:<nonce>`: what the holder compares with (release, extend, complete).
    token: &'a str,
    owner: &'a str,
}

fn holder_fields(value: &str) -> Option<HolderFields<'_>> {
    let mut parts = value.splitn(5, ':');
    let fence_text = parts.next()?;
    let fence = fence_text.parse::<u64>().ok()?;
    let nonce = parts.next()?;
    let _ttl = parts.next()?.parse::<u64>().ok()?;
    let _waited = parts.next().filter(|w| *w == "0" || *w == "1")?;
    let owner = parts.next()?;
    Some(HolderFields {
        fence,
        nonce,
        token: &value[..fence_text.len() + 1 + nonce.len()],
        owner,
    })
}

fn malformed_holder() -> Error {
    Error::new(
        ErrorKind::Redis,
        "malformed holder value stored under a lock key (written by another version of \
         herdlock, or not by herdlock)",
    )
}

/// Parses a stored holder value: its fence and owner label.
pub(crate) fn parse_holder(value: &str) -> Result<(u64, &str)> {
    holder_fields(value)
        .map(|f| (f.fence, f.owner))
        .ok_or_else(malformed_holder)
}

/// The token (`<fence>:<nonce>`) of a stored holder value, if it is well formed.
pub(crate) fn holder_token(value: &str) -> Option<&str> {
    holder_fields(value).map(|f| f.token)
}

/// The nonce of a stored holder value, if it is well formed.
pub(crate) fn holder_nonce(value: &str) -> Option<&str> {
    holder_fields(value).map(|f| f.nonce)
}

/// The fence of a holder token `<fence>:<nonce>` (what an acquisition returns).
pub(crate) fn token_fence(token: &str) -> Result<u64> {
    token
        .split_once(':')
        .and_then(|(fence, _)| fence.parse::<u64>().ok())
        .ok_or_else(malformed_holder)
}

/// A holder value as the Redis scripts write it, `<fence>:<nonce>:<ttl ms>:0:<owner>`, and
/// its token `<fence>:<nonce>`.
pub(crate) fn holder_value(
    fence: u64,
    nonce: &str,
    ttl: Duration,
    owner: &str,
) -> (String, String) {
    let token = format!("{fence}:{nonce}");
    let value = format!("{token}:{}:0:{owner}", crate::keys::millis(ttl));
    (token, value)
}

/// Whether a stored holder value belongs to `token`.
pub(crate) fn held_by(value: &str, token: &str) -> bool {
    value
        .strip_prefix(token)
        .is_some_and(|rest| rest.starts_with(':'))
}

// --- Notices ------------------------------------------------------------------------------

/// The notice a release publishes on the key's channel when someone waits.
pub(crate) const RELEASED: &[u8] = b"released";

/// The notice that wakes the fair semaphore waiter `member` (`wake:<member>`).
pub(crate) fn wake_notice(member: &str) -> String {
    format!("wake:{member}")
}

// --- Redis replies -------------------------------------------------------------------------

/// Parses `{1, holder, fence}`, `{0, holder, pttl}` or `{2, envelope, age}`.
pub(crate) fn parse_acquire(items: &[Value], what: &str) -> Result<FanoutReply> {
    let [_, _, _] = items else {
        return Err(malformed(what));
    };
    let n = int(&items[2], what)?;
    Ok(match int(&items[0], what)? {
        1 => FanoutReply::Lock(AcquireReply::Acquired {
            token: string(&items[1], what)?,
            fence: u64::try_from(n).map_err(|_| malformed(what))?,
            maybe_missed: false,
        }),
        0 => FanoutReply::Lock(AcquireReply::Busy {
            holder: string(&items[1], what)?,
            pttl_ms: n,
        }),
        2 => FanoutReply::Cached {
            envelope: stored_envelope(bytes(&items[1], what)?, what)?,
        },
        3 => FanoutReply::Fresh {
            envelope: stored_envelope(bytes(&items[1], what)?, what)?,
        },
        _ => return Err(malformed(what)),
    })
}

/// The envelope inside a stored result (`r2:<ok>:<completed µs>:` + envelope, as
/// `complete.lua` writes it).
fn stored_envelope(mut stored: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    let header = stored
        .strip_prefix(b"r2:")
        .and_then(|rest| {
            let ok = rest.iter().position(|&b| b == b':')?;
            let done = rest[ok + 1..].iter().position(|&b| b == b':')?;
            Some(3 + ok + 1 + done + 1)
        })
        .ok_or_else(|| malformed(what))?;
    stored.drain(..header);
    Ok(stored)
}

pub(crate) fn bytes(v: &Value, what: &str) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b.clone()),
        Value::SimpleString(s) => Ok(s.clone().into_bytes()),
        _ => Err(malformed(what)),
    }
}

pub(crate) fn malformed(what: &str) -> Error {
    Error::new(
        ErrorKind::Redis,
        format!("unexpected reply from the {what} script"),
    )
}

pub(crate) fn array<'a>(v: &'a Value, len: usize, what: &str) -> Result<&'a [Value]> {
    match v {
        Value::Array(items) if items.len() == len => Ok(items),
        _ => Err(malformed(what)),
    }
}

pub(crate) fn int(v: &Value, what: &str) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed(what)),
        Value::SimpleString(s) => s.parse().map_err(|_| malformed(what)),
        _ => Err(malformed(what)),
    }
}

pub(crate) fn string(v: &Value, what: &str) -> Result<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| malformed(what)),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        _ => Err(malformed(what)),
    }
}

/// Parses the fan-out check reply `{holder, pttl, stored result}`.
pub(crate) fn parse_check(reply: &Value) -> Result<CheckReply> {
    let what = "fanout check";
    let items = array(reply, 3, what)?;
    let holder = string(&items[0], what)?;
    let pttl_ms = int(&items[1], what)?;
    let stored = bytes(&items[2], what)?;
    Ok(CheckReply {
        holder: (!holder.is_empty()).then_some(holder),
        pttl_ms,
        envelope: if stored.is_empty() {
            None
        } else {
            Some(stored_envelope(stored, what)?)
        },
    })
}

/// Parses the status reply `{holder, pttl}`.
pub(crate) fn parse_status(reply: &Value) -> Result<StatusReply> {
    let items = array(reply, 2, "status")?;
    let holder = string(&items[0], "status")?;
    let pttl_ms = int(&items[1], "status")?;
    Ok(StatusReply {
        holder: (!holder.is_empty()).then_some(holder),
        pttl_ms,
    })
}

/// Parses the multi acquire reply: `{1, {holder value per key}}` or
/// `{0, {index, holder, pttl, …}}` for `keys` keys.
pub(crate) fn parse_multi_acquire(reply: &Value, keys: usize) -> Result<MultiReply> {
    let what = "multi acquire";
    let items = array(reply, 2, what)?;
    let Value::Array(list) = &items[1] else {
        return Err(malformed(what));
    };
    if int(&items[0], what)? == 1 {
        if list.len() != keys {
            return Err(malformed(what));
        }
        return Ok(MultiReply::Acquired(
            list.iter()
                .map(|v| string(v, what))
                .collect::<Result<_>>()?,
        ));
    }
    let mut busy = Vec::new();
    for chunk in list.chunks(3) {
        let [index, holder, pttl] = chunk else {
            return Err(malformed(what));
        };
        busy.push((
            one_based(index, keys, what)?,
            string(holder, what)?,
            int(pttl, what)?,
        ));
    }
    Ok(MultiReply::Busy(busy))
}

/// Parses the multi extend reply: the 1-based indexes of the keys no longer held.
pub(crate) fn parse_multi_extend(reply: &Value, keys: usize) -> Result<Vec<usize>> {
    let what = "multi extend";
    let Value::Array(items) = reply else {
        return Err(malformed(what));
    };
    items.iter().map(|v| one_based(v, keys, what)).collect()
}

/// A 1-based index into `len` keys, as a 0-based one.
fn one_based(v: &Value, len: usize, what: &str) -> Result<usize> {
    usize::try_from(int(v, what)?)
        .ok()
        .and_then(|i| i.checked_sub(1))
        .filter(|i| *i < len)
        .ok_or_else(|| malformed(what))
}

/// Parses the reply of the semaphore step `op`.
pub(crate) fn parse_semaphore(reply: &Value, op: SemOp) -> Result<SemReply> {
    let what = "semaphore";
    let count = |v: &Value| u32::try_from(int(v, what)?).map_err(|_| malformed(what));
    Ok(match op {
        SemOp::Try | SemOp::Queue => {
            let items = array(reply, 3, what)?;
            if int(&items[0], what)? == 1 {
                SemReply::Admitted
            } else {
                SemReply::Busy {
                    in_use: count(&items[1])?,
                    soonest_ms: int(&items[2], what)?,
                }
            }
        }
        SemOp::Release | SemOp::Extend | SemOp::Leave => SemReply::Done(int(reply, what)? == 1),
        SemOp::Status => {
            let Value::Array(items) = reply else {
                return Err(malformed(what));
            };
            if items.len() < 2 || items.len() % 2 != 0 {
                return Err(malformed(what));
            }
            let holders = items[2..]
                .chunks(2)
                .map(|pair| Ok((string(&pair[0], what)?, int(&pair[1], what)?)))
                .collect::<Result<_>>()?;
            SemReply::Status {
                in_use: count(&items[0])?,
                queued: count(&items[1])?,
                holders,
            }
        }
    })
}
