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
///
/// JSON is the default and always available. bincode is behind the crate feature `bincode`
/// (off by default) because bincode 2 is flagged unmaintained (RUSTSEC-2025-0141): a
/// service that wants it opts in knowingly. A process built without the feature that
/// receives a bincode result (another process of the same job id used it) fails that call
/// with [`Codec`](ErrorKind::Codec), naming the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Codec {
    /// `serde_json`: readable in `redis-cli`, works with every serde type. The default.
    #[default]
    Json,
    /// bincode 2 (standard configuration): smaller and faster; needs types whose serde
    /// impls do not rely on self-description (`#[serde(flatten)]`, untagged enums). Crate
    /// feature `bincode` (see above for why it is off by default).
    #[cfg(feature = "bincode")]
    Bincode,
}

/// The wire id of bincode payloads, known even to builds without the feature.
const BINCODE_ID: u8 = 2;

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::Json => 1,
            #[cfg(feature = "bincode")]
            Codec::Bincode => BINCODE_ID,
        }
    }

    fn from_id(id: u8) -> Option<Codec> {
        match id {
            1 => Some(Codec::Json),
            #[cfg(feature = "bincode")]
            BINCODE_ID => Some(Codec::Bincode),
            _ => None,
        }
    }

    pub(crate) fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        Ok(match self {
            Codec::Json => serde_json::to_vec(value)?,
            #[cfg(feature = "bincode")]
            Codec::Bincode => bincode::serde::encode_to_vec(value, bincode::config::standard())?,
        })
    }

    pub(crate) fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(match self {
            Codec::Json => serde_json::from_slice(bytes)?,
            #[cfg(feature = "bincode")]
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
        let codec = match Codec::from_id(bytes[5]) {
            Some(codec) => codec,
            None if bytes[5] == BINCODE_ID => {
                return Err(CodecError::Malformed(
                    "the result was serialized with bincode, which this build of herdlock \
                     leaves out: enable its `bincode` feature"
                        .into(),
                ))
            }
            None => return Err(bad("unknown codec")),
        };
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

/// The error type of every job: fan-out jobs ([`Herd::fanout`](crate::Herd::fanout)), the
/// closures of [`Herd::once`](crate::Herd::once) and [`Herd::run_locked`](crate::Herd::run_locked),
/// and [`Completer::complete`](crate::Completer::complete). Because it is one fixed type,
/// `Ok(value)` needs no annotation.
///
/// What a failed job reports to every waiter: a message, an optional machine-readable
/// code, optional structured detail (JSON), and the messages of its cause chain.
///
/// `?` converts into it from anything that converts into
/// `Box<dyn std::error::Error + Send + Sync>`: every error type that is `Send + Sync +
/// 'static` (including [`herdlock::Error`](crate::Error)), `anyhow::Error`, boxed errors,
/// `String` and `&str`.
/// The message is the error's `Display`, the [causes](JobError::causes) those of its
/// [`source`](std::error::Error::source) chain. When the error, or any error in its chain,
/// is a [`herdlock::Error`](crate::Error), its kind becomes the code
/// ([`ErrorKind::as_str`], read back with [`JobError::kind`]). Build one by hand for a code
/// or detail:
///
/// ```
/// let e = herdlock::JobError::new("upstream returned 503")
///     .with_code("upstream_unavailable")
///     .with_detail(serde_json::json!({ "status": 503 }));
/// assert_eq!(e.code(), Some("upstream_unavailable"));
/// ```
///
/// It deliberately does not implement `std::error::Error` (as `anyhow::Error` does not),
/// which is what lets `?` convert every error into it. A job's error reaches callers
/// inside a [`herdlock::Error`](crate::Error) ([`Error::job_error`](crate::Error::job_error)).
#[derive(Clone, Serialize, Deserialize)]
pub struct JobError {
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    causes: Vec<String>,
    /// The original error, in the process that raised it (never serialized).
    #[serde(skip)]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// The result type of a job: `Result<T, JobError>`.
pub type JobResult<T> = Result<T, JobError>;

impl JobError {
    /// An error with this message and no code or detail.
    pub fn new(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            code: None,
            detail: None,
            causes: Vec::new(),
            source: None,
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

    /// The code, if one was set (for a [`herdlock::Error`](crate::Error), its kind's
    /// [`as_str`](ErrorKind::as_str)).
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The [`ErrorKind`] the code names, when the job failed with a
    /// [`herdlock::Error`](crate::Error) (or an error caused by one).
    pub fn kind(&self) -> Option<ErrorKind> {
        self.code.as_deref().and_then(ErrorKind::from_code)
    }

    /// The structured detail, if any.
    pub fn detail(&self) -> Option<&serde_json::Value> {
        self.detail.as_ref()
    }

    /// The messages of the original error's cause chain, outermost first (empty when it had
    /// none). They travel with the error to every waiter.
    pub fn causes(&self) -> impl Iterator<Item = &str> {
        self.causes.iter().map(String::as_str)
    }

    /// The original error, in the process where the job ran (`None` in other processes and
    /// for errors built with [`new`](JobError::new)).
    pub(crate) fn source_error(&self) -> Option<&Arc<dyn std::error::Error + Send + Sync>> {
        self.source.as_ref()
    }

    /// The message followed by every cause not already part of it, `: `-separated.
    pub(crate) fn full_message(&self) -> String {
        let mut out = self.message.clone();
        for cause in &self.causes {
            if !out.contains(cause.as_str()) {
                out.push_str(": ");
                out.push_str(cause);
            }
        }
        out
    }
}

impl std::fmt::Debug for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("JobError");
        d.field("message", &self.message);
        if let Some(code) = &self.code {
            d.field("code", code);
        }
        if let Some(detail) = &self.detail {
            d.field("detail", detail);
        }
        if !self.causes.is_empty() {
            d.field("causes", &self.causes);
        }
        d.finish_non_exhaustive()
    }
}

/// Equal when message, code, detail and causes are (the original error is not compared).
impl PartialEq for JobError {
    fn eq(&self, other: &JobError) -> bool {
        self.message == other.message
            && self.code == other.code
            && self.detail == other.detail
            && self.causes == other.causes
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E> From<E> for JobError
where
    E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    fn from(error: E) -> JobError {
        let boxed: Box<dyn std::error::Error + Send + Sync + 'static> = error.into();
        let top: &(dyn std::error::Error + 'static) = &*boxed;
        let chain = std::iter::successors(Some(top), |e| e.source());
        let code = chain
            .clone()
            .find_map(|e| e.downcast_ref::<Error>())
            .map(|e| e.kind().as_str().to_owned());
        let causes = chain.skip(1).map(ToString::to_string).collect();
        JobError {
            message: boxed.to_string(),
            code,
            detail: None,
            causes,
            source: Some(Arc::from(boxed)),
        }
    }
}

/// Encodes a job's outcome into a body (never fails: encoding problems become a
/// `Rejected` body that every waiter receives as an error).
///
/// A result is accepted only if every caller will get it back as it is: it must serialize,
/// fit `max_size`, hold no non-finite float when the codec is JSON (`serde_json` writes NaN
/// and infinities as `null`, so an `Option<f64>` would arrive as `None` and an `f64` not at
/// all), and its bytes must decode back into `T` (a bincode payload of a type that needs a
/// self-describing format would not). The leader checks this before anything is stored or
/// published, so a result that cannot round-trip reaches the leader's callers and every
/// follower as the same [`Codec`](ErrorKind::Codec) error, and is never stored as a success.
pub(crate) fn body_of<T: Serialize + DeserializeOwned>(
    result: Result<T, JobError>,
    codec: Codec,
    max_size: usize,
) -> Body {
    match result {
        Ok(value) => match encode_result(&value, codec, max_size) {
            Ok(payload) => Body {
                status: Status::Ok,
                codec,
                payload,
            },
            Err(why) => failure(Status::Rejected, &why),
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

/// Encodes a successful result, or says why every caller could not get it back as it is.
fn encode_result<T: Serialize + DeserializeOwned>(
    value: &T,
    codec: Codec,
    max_size: usize,
) -> Result<Vec<u8>, String> {
    if codec == Codec::Json {
        finite::check(value).map_err(|e| {
            format!(
                "the job's result holds a non-finite float ({e}), which JSON cannot carry \
                 (it would arrive as null); use the bincode codec or a finite value"
            )
        })?;
    }
    let payload = codec
        .encode(value)
        .map_err(|e| format!("the job's result could not be serialized: {e}"))?;
    if payload.len() > max_size {
        return Err(format!(
            "the job's result is {} bytes, more than the limit of {max_size}",
            payload.len()
        ));
    }
    codec.decode::<T>(&payload).map_err(|e| {
        format!("the job's result does not decode back into its own type with {codec:?}: {e}")
    })?;
    Ok(payload)
}

/// Finds non-finite floats in a value, by serializing it into nothing.
mod finite {
    use std::fmt;

    use serde::ser::{self, Serialize};

    /// Checks every `f32` and `f64` in `value`; the error names the first non-finite one.
    pub(super) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), NonFinite> {
        value.serialize(Probe)
    }

    /// A non-finite float (or an error the value's own `Serialize` raised).
    #[derive(Debug)]
    pub(super) struct NonFinite(String);

    impl fmt::Display for NonFinite {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for NonFinite {}

    impl ser::Error for NonFinite {
        fn custom<M: fmt::Display>(message: M) -> Self {
            NonFinite(message.to_string())
        }
    }

    fn float(v: f64) -> Result<(), NonFinite> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(NonFinite(v.to_string()))
        }
    }

    /// A serializer that produces nothing and fails on a non-finite float.
    #[derive(Clone, Copy)]
    struct Probe;

    type Done = Result<(), NonFinite>;

    impl ser::Serializer for Probe {
        type Ok = ();
        type Error = NonFinite;
        type SerializeSeq = Probe;
        type SerializeTuple = Probe;
        type SerializeTupleStruct = Probe;
        type SerializeTupleVariant = Probe;
        type SerializeMap = Probe;
        type SerializeStruct = Probe;
        type SerializeStructVariant = Probe;

        fn serialize_bool(self, _: bool) -> Done {
            Ok(())
        }
        fn serialize_i8(self, _: i8) -> Done {
            Ok(())
        }
        fn serialize_i16(self, _: i16) -> Done {
            Ok(())
        }
        fn serialize_i32(self, _: i32) -> Done {
            Ok(())
        }
        fn serialize_i64(self, _: i64) -> Done {
            Ok(())
        }
        fn serialize_i128(self, _: i128) -> Done {
            Ok(())
        }
        fn serialize_u8(self, _: u8) -> Done {
            Ok(())
        }
        fn serialize_u16(self, _: u16) -> Done {
            Ok(())
        }
        fn serialize_u32(self, _: u32) -> Done {
            Ok(())
        }
        fn serialize_u64(self, _: u64) -> Done {
            Ok(())
        }
        fn serialize_u128(self, _: u128) -> Done {
            Ok(())
        }
        fn serialize_f32(self, v: f32) -> Done {
            float(f64::from(v))
        }
        fn serialize_f64(self, v: f64) -> Done {
            float(v)
        }
        fn serialize_char(self, _: char) -> Done {
            Ok(())
        }
        fn serialize_str(self, _: &str) -> Done {
            Ok(())
        }
        fn serialize_bytes(self, _: &[u8]) -> Done {
            Ok(())
        }
        fn serialize_none(self) -> Done {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Done {
            value.serialize(self)
        }
        fn serialize_unit(self) -> Done {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> Done {
            Ok(())
        }
        fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Done {
            Ok(())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            value: &T,
        ) -> Done {
            value.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            value: &T,
        ) -> Done {
            value.serialize(self)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Probe, NonFinite> {
            Ok(self)
        }
        fn serialize_tuple(self, _: usize) -> Result<Probe, NonFinite> {
            Ok(self)
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Probe, NonFinite> {
            Ok(self)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Probe, NonFinite> {
            Ok(self)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Probe, NonFinite> {
            Ok(self)
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Probe, NonFinite> {
            Ok(self)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Probe, NonFinite> {
            Ok(self)
        }
    }

    /// The compound serializers: every element (or field) is probed the same way.
    macro_rules! probe_elements {
        ($($trait:ident :: $method:ident),* $(,)?) => {$(
            impl ser::$trait for Probe {
                type Ok = ();
                type Error = NonFinite;
                fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
                    value.serialize(Probe)
                }
                fn end(self) -> Done {
                    Ok(())
                }
            }
        )*};
    }
    probe_elements!(
        SerializeSeq::serialize_element,
        SerializeTuple::serialize_element,
        SerializeTupleStruct::serialize_field,
        SerializeTupleVariant::serialize_field,
    );

    /// The same for the serializers whose fields are named.
    macro_rules! probe_fields {
        ($($trait:ident),* $(,)?) => {$(
            impl ser::$trait for Probe {
                type Ok = ();
                type Error = NonFinite;
                fn serialize_field<T: Serialize + ?Sized>(
                    &mut self,
                    _: &'static str,
                    value: &T,
                ) -> Done {
                    value.serialize(Probe)
                }
                fn end(self) -> Done {
                    Ok(())
                }
            }
        )*};
    }
    probe_fields!(SerializeStruct, SerializeStructVariant);

    impl ser::SerializeMap for Probe {
        type Ok = ();
        type Error = NonFinite;
        fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Done {
            key.serialize(Probe)
        }
        fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
            value.serialize(Probe)
        }
        fn end(self) -> Done {
            Ok(())
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
                format!("job `{job_id}` failed: {}", je.full_message()),
                je,
            ))
        }
        Status::JobPanicked => {
            let je = job_error();
            Err(Error::job(
                ErrorKind::JobPanicked,
                format!("job `{job_id}` panicked: {}", je.full_message()),
                je,
            ))
        }
        Status::Rejected => {
            let je = job_error();
            Err(Error::job(
                ErrorKind::Codec,
                format!(
                    "job `{job_id}` produced an unusable result: {}",
                    je.full_message()
                ),
                je,
            ))
        }
        Status::TimedOut => {
            let je = job_error();
            Err(Error::job(
                ErrorKind::JobTimedOut,
                format!("job `{job_id}` {}", je.full_message()),
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
        let codecs = [
            Codec::Json,
            #[cfg(feature = "bincode")]
            Codec::Bincode,
        ];
        for codec in codecs {
            let body = body_of(Ok(vec![1u32, 2, 3]), codec, 1 << 20);
            let bytes = Envelope::encode(42, "42:abc:host.1", &body);
            let env = Envelope::decode(&bytes).expect("decodes");
            assert_eq!(env.generation, 42);
            assert_eq!(env.token, "42:abc:host.1");
            assert_eq!(env.status, Status::Ok);
            let v: Vec<u32> = open("j", &Arc::new(env)).expect("ok");
            assert_eq!(v, vec![1, 2, 3]);
        }
    }

    /// A bincode result reaching a build without the feature names the feature.
    #[cfg(not(feature = "bincode"))]
    #[test]
    fn a_bincode_result_without_the_feature_names_it() {
        let mut bytes = Envelope::encode(1, "t", &body_of(Ok(1u8), Codec::Json, 1 << 20));
        bytes[5] = BINCODE_ID;
        let e = Envelope::decode(&bytes).expect_err("no bincode here");
        assert!(e.to_string().contains("`bincode` feature"), "{e}");
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

    #[derive(Debug, Serialize, Deserialize)]
    struct Stats {
        mean: Option<f64>,
        samples: Vec<f32>,
    }

    /// A type that needs a self-describing format: bincode encodes it, cannot decode it.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(untagged)]
    enum Loose {
        Number(u32),
        Text(String),
    }

    #[test]
    fn results_that_cannot_round_trip_are_rejected() {
        let rejected = |body: Body| {
            assert_eq!(body.status, Status::Rejected);
            let env =
                Arc::new(Envelope::decode(&Envelope::encode(1, "t", &body)).expect("decodes"));
            let err = open::<serde_json::Value>("j", &env).expect_err("rejected");
            assert_eq!(err.kind(), ErrorKind::Codec);
            err.to_string()
        };
        let max = 1 << 20;
        let e = rejected(body_of(Ok(f64::NAN), Codec::Json, max));
        assert!(e.contains("non-finite") && e.contains("NaN"), "{e}");
        rejected(body_of(Ok(f64::INFINITY), Codec::Json, max));
        // Would silently arrive as `None` / fail to decode without the check.
        let nan_inside = || Stats {
            mean: Some(f64::NAN),
            samples: vec![1.0, f32::NEG_INFINITY],
        };
        rejected(body_of(Ok(nan_inside()), Codec::Json, max));
        rejected(body_of(
            Ok(vec![Some(0.5), Some(f64::NAN)]),
            Codec::Json,
            max,
        ));
        let mut keyed = std::collections::BTreeMap::new();
        keyed.insert("k".to_owned(), (1u8, f32::NAN));
        rejected(body_of(Ok(keyed), Codec::Json, max));
        // bincode carries NaN faithfully, but not a type that needs a self-describing format.
        #[cfg(feature = "bincode")]
        {
            let body = body_of(Ok(nan_inside()), Codec::Bincode, max);
            assert_eq!(body.status, Status::Ok);
            let e = rejected(body_of(Ok(Loose::Number(3)), Codec::Bincode, max));
            assert!(e.contains("decode back"), "{e}");
        }
        // Finite values and self-describing JSON pass.
        for body in [
            body_of(
                Ok(Stats {
                    mean: Some(0.25),
                    samples: vec![1.0, -2.5, f32::MAX],
                }),
                Codec::Json,
                max,
            ),
            body_of(Ok(Loose::Text("x".into())), Codec::Json, max),
            body_of(Ok(f64::MIN_POSITIVE), Codec::Json, max),
        ] {
            assert_eq!(
                body.status,
                Status::Ok,
                "{:?}",
                String::from_utf8_lossy(&body.payload)
            );
        }
    }

    #[test]
    fn oversized_results_become_errors() {
        let body = body_of(Ok("x".repeat(100)), Codec::Json, 10);
        assert_eq!(body.status, Status::Rejected);
        let env = Arc::new(Envelope::decode(&Envelope::encode(1, "t", &body)).expect("decodes"));
        let err = open::<String>("j", &env).expect_err("rejected");
        assert_eq!(err.kind(), ErrorKind::Codec);
    }
}
