//! The only module that knows the wire format: the versioned result envelope and the
//! payload codecs.
//!
//! ## Envelope, version 1
//!
//! ```text
//! offset  size  field
//! 0       4     magic and version: b"HLE1"
//! 4       1     status: 0 ok, 1 job error, 2 job panicked, 3 result rejected, 4 timed out
//! 5       1     codec of the payload: 1 JSON, 2 bincode (errors are always JSON)
//! 6       8     generation (the run's fencing token), big endian
//! 14      2     length n of the run's holder token, big endian
//! 16      n     the run's holder token (UTF-8)
//! 16+n    ..    payload
//! ```
//!
//! Everything read back from Redis or pub/sub goes through [`Envelope::decode`], which
//! checks every field and never panics: garbage is an error, not a result.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CodecError, Error, ErrorKind};

const MAGIC: &[u8; 4] = b"HLE1";
const HEADER: usize = 16;

/// How fan-out results are serialized on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Codec {
    /// `serde_json`: readable in `redis-cli`, works with every serde type. The default.
    #[default]
    Json,
    /// bincode 2 (standard configuration): smaller and faster; needs types whose serde
    /// impls do not rely on self-description (`#[serde(flatten)]`, untagged enums).
    Bincode,
}

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::Json => 1,
            Codec::Bincode => 2,
        }
    }

    fn from_id(id: u8) -> Option<Codec> {
        match id {
            1 => Some(Codec::Json),
            2 => Some(Codec::Bincode),
            _ => None,
        }
    }

    pub(crate) fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        Ok(match self {
            Codec::Json => serde_json::to_vec(value)?,
            Codec::Bincode => bincode::serde::encode_to_vec(value, bincode::config::standard())?,
        })
    }

    pub(crate) fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(match self {
            Codec::Json => serde_json::from_slice(bytes)?,
            Codec::Bincode => {
                let (value, used) =
                    bincode::serde::decode_from_slice(bytes, bincode::config::standard())?;
                if used != bytes.len() {
                    return Err(CodecError::Malformed(
                        "trailing bytes after the bincode payload".into(),
                    ));
                }
                value
            }
        })
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    JobFailed,
    JobPanicked,
    /// The result could not be serialized or was larger than allowed.
    Rejected,
    /// The job ran past its maximum duration.
    TimedOut,
}

impl Status {
    fn id(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::JobFailed => 1,
            Status::JobPanicked => 2,
            Status::Rejected => 3,
            Status::TimedOut => 4,
        }
    }

    fn from_id(id: u8) -> Option<Status> {
        Some(match id {
            0 => Status::Ok,
            1 => Status::JobFailed,
            2 => Status::JobPanicked,
            3 => Status::Rejected,
            4 => Status::TimedOut,
            _ => return None,
        })
    }
}

/// The body of a run's outcome, before it is tagged with its generation.
#[derive(Debug, Clone)]
pub(crate) struct Body {
    pub(crate) status: Status,
    pub(crate) codec: Codec,
    pub(crate) payload: Vec<u8>,
}

/// A decoded envelope.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) generation: u64,
    pub(crate) token: String,
    pub(crate) status: Status,
    pub(crate) codec: Codec,
    pub(crate) payload: Vec<u8>,
}

impl Envelope {
    pub(crate) fn encode(generation: u64, token: &str, body: &Body) -> Vec<u8> {
        let token = token.as_bytes();
        // Holder tokens are bounded by the key and owner limits, far below u16::MAX.
        let token_len = u16::try_from(token.len()).unwrap_or(u16::MAX);
        let token = &token[..usize::from(token_len)];
        let mut out = Vec::with_capacity(HEADER + token.len() + body.payload.len());
        out.extend_from_slice(MAGIC);
        out.push(body.status.id());
        out.push(body.codec.id());
        out.extend_from_slice(&generation.to_be_bytes());
        out.extend_from_slice(&token_len.to_be_bytes());
        out.extend_from_slice(token);
        out.extend_from_slice(&body.payload);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
        let bad = |why: &str| CodecError::Malformed(format!("malformed result envelope: {why}"));
        if bytes.len() < HEADER {
            return Err(bad("too short"));
        }
        if &bytes[..4] != MAGIC {
            return Err(bad("unknown magic or version"));
        }
        let status = Status::from_id(bytes[4]).ok_or_else(|| bad("unknown status"))?;
        let codec = Codec::from_id(bytes[5]).ok_or_else(|| bad("unknown codec"))?;
        let mut generation = [0u8; 8];
        generation.copy_from_slice(&bytes[6..14]);
        let token_len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        let rest = &bytes[HEADER..];
        if rest.len() < token_len {
            return Err(bad("token runs past the end"));
        }
        let token = std::str::from_utf8(&rest[..token_len])
            .map_err(|_| bad("token is not UTF-8"))?
            .to_owned();
        Ok(Envelope {
            generation: u64::from_be_bytes(generation),
            token,
            status,
            codec,
            payload: rest[token_len..].to_vec(),
        })
    }
}

/// What a failed job reports to every waiter: a message, an optional machine-readable
/// code, and optional structured detail (JSON).
///
/// Any `std::error::Error` converts into it (the code is then `None`, the message its
/// `Display`); a [`herdlock::Error`](crate::Error) keeps its kind as the code. Build one
/// by hand for a code or detail:
///
/// ```
/// let e = herdlock::JobError::new("upstream returned 503")
///     .with_code("upstream_unavailable")
///     .with_detail(serde_json::json!({ "status": 503 }));
/// assert_eq!(e.code(), Some("upstream_unavailable"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<serde_json::Value>,
}

impl JobError {
    /// An error with this message and no code or detail.
    pub fn new(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            code: None,
            detail: None,
        }
    }

    /// Sets a machine-readable code.
    #[must_use]
    pub fn with_code(mut self, code: impl Into<String>) -> JobError {
        self.code = Some(code.into());
        self
    }

    /// Attaches structured detail.
    #[must_use]
    pub fn with_detail(mut self, detail: serde_json::Value) -> JobError {
        self.detail = Some(detail);
        self
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The code, if one was set.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The structured detail, if any.
    pub fn detail(&self) -> Option<&serde_json::Value> {
        self.detail.as_ref()
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> JobError {
        JobError::new(e.to_string())
    }
}

/// Encodes a job's outcome into a body (never fails: encoding problems become a
/// `Rejected` body that every waiter receives as an error).
pub(crate) fn body_of<T: Serialize>(
    result: Result<T, JobError>,
    codec: Codec,
    max_size: usize,
) -> Body {
    match result {
        Ok(value) => match codec.encode(&value) {
            Ok(payload) if payload.len() <= max_size => Body {
                status: Status::Ok,
                codec,
                payload,
            },
            Ok(payload) => failure(
                Status::Rejected,
                &format!(
                    "the job's result is {} bytes, more than the limit of {max_size}",
                    payload.len()
                ),
            ),
            Err(e) => failure(
                Status::Rejected,
                &format!("the job's result could not be serialized: {e}"),
            ),
        },
        Err(job_error) => {
            let payload = serde_json::to_vec(&job_error).unwrap_or_else(|_| {
                serde_json::to_vec(&JobError::new(job_error.message.clone())).unwrap_or_default()
            });
            if payload.len() > max_size {
                return failure(
                    Status::JobFailed,
                    &format!(
                        "{} (detail dropped: the error was larger than {max_size} bytes)",
                        truncate(&job_error.message, 1024)
                    ),
                );
            }
            Body {
                status: Status::JobFailed,
                codec: Codec::Json,
                payload,
            }
        }
    }
}

/// A body carrying a herdlock-side failure message (panic, rejection, time-out).
pub(crate) fn failure(status: Status, message: &str) -> Body {
    Body {
        status,
        codec: Codec::Json,
        payload: serde_json::to_vec(&JobError::new(message)).unwrap_or_default(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Turns an envelope into the caller's value or the run's error.
pub(crate) fn open<T: DeserializeOwned>(job_id: &str, env: &Arc<Envelope>) -> Result<T, Error> {
    let job_error = || -> JobError {
        serde_json::from_slice(&env.payload)
            .unwrap_or_else(|_| JobError::new("(the error could not be decoded)"))
    };
    match env.status {
        Status::Ok => env.codec.decode(&env.payload).map_err(|e| {
            Error::with_source(
                ErrorKind::Codec,
                format!("the result of job `{job_id}` could not be decoded"),
                e,
            )
        }),
        Status::JobFailed => {
            let je = job_error();
            Err(Error::job(
                ErrorKind::JobFailed,
                format!("job `{job_id}` failed: {}", je.message),
                je,
            ))
        }
        Status::JobPanicked => {
            let je = job_error();
            Err(Error::job(
                ErrorKind::JobPanicked,
                format!("job `{job_id}` panicked: {}", je.message),
                je,
            ))
        }
        Status::Rejected => {
            let je = job_error();
            Err(Error::job(
                ErrorKind::Codec,
                format!("job `{job_id}` produced an unusable result: {}", je.message),
                je,
            ))
        }
        Status::TimedOut => {
            let je = job_error();
            Err(Error::job(
                ErrorKind::Timeout,
                format!("job `{job_id}` {}", je.message),
                je,
            ))
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let body = body_of(Ok::<_, JobError>(vec![1u32, 2, 3]), Codec::Bincode, 1 << 20);
        let bytes = Envelope::encode(42, "42:abc:host.1", &body);
        let env = Envelope::decode(&bytes).expect("decodes");
        assert_eq!(env.generation, 42);
        assert_eq!(env.token, "42:abc:host.1");
        assert_eq!(env.status, Status::Ok);
        let v: Vec<u32> = open("j", &Arc::new(env)).expect("ok");
        assert_eq!(v, vec![1, 2, 3]);
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        for bytes in [
            &b""[..],
            b"HLE1",
            b"HLE1\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\xff\xff",
            b"XXXX\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00",
            b"HLE1\x09\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00",
            b"HLE1\x00\x07\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00",
        ] {
            assert!(Envelope::decode(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn oversized_results_become_errors() {
        let body = body_of(Ok::<_, JobError>("x".repeat(100)), Codec::Json, 10);
        assert_eq!(body.status, Status::Rejected);
        let env = Arc::new(Envelope::decode(&Envelope::encode(1, "t", &body)).expect("decodes"));
        let err = open::<String>("j", &env).expect_err("rejected");
        assert_eq!(err.kind(), ErrorKind::Codec);
    }
}
