//! The checks a Redis herd runs when it connects (or, for a lazy herd, before its first
//! call): the server must not evict keys, and the Redis user must be allowed everything
//! herdlock does under the herd's prefix. Both failures would otherwise be silent: an
//! evicted lock lets a second holder in, and a user without pub/sub rights leaves every
//! waiter asleep until a TTL runs out.
//!
//! ## How
//!
//! 1. The eviction policy: `INFO memory` (its `maxmemory_policy` field), else
//!    `CONFIG GET maxmemory-policy`. `INFO` comes first because the least-privilege rule
//!    allows it (`+info|memory`) and `CONFIG` is an admin command: a user who may run
//!    neither is never refused for it, but gets one `warn` per check.
//! 2. Permissions, by `ACL DRYRUN <user> <command> <args>` for every command herdlock
//!    runs, on a key and a channel under the prefix (one pipelined round trip, nothing
//!    executed). A user who may not run `ACL DRYRUN` (it is an admin command) is probed
//!    with real, harmless commands instead: `PING`, `SCRIPT LOAD` and `EVALSHA` of
//!    `scripts/probe.lua` (which runs every command the real scripts run, under the
//!    caller's permissions, on two probe keys with a short TTL and a probe channel), and a
//!    `SUBSCRIBE` + `UNSUBSCRIBE` of the probe channel on a pub/sub connection.
//!
//! The probe names, `prefix:{herdlock.probe}:probe` (channel) and `…:probe:str` /
//! `…:probe:zset` (keys), can be no herdlock key's or channel's name: those end in a
//! fixed suffix (`:lock`, `:result`, …) or, for a channel, in the key itself.

use std::fmt::Write as _;
use std::time::Duration;

use redis::aio::{ConnectionLike, PubSub};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Script, Value};

use super::target::{build_client, with_cluster_tls, TlsFiles};
use crate::error::{Error, ErrorKind, Result};

/// What a Redis herd checks at connect: its prefix (the keys and channels it needs) and
/// whether the user accepted an evicting server; the TLS certificates its own connections
/// to a cluster's masters use.
#[derive(Debug, Clone)]
pub(crate) struct Preflight {
    pub(crate) prefix: String,
    pub(crate) allow_eviction: bool,
    pub(crate) tls: TlsFiles,
}

/// An argument of a command herdlock runs, for `ACL DRYRUN`.
#[derive(Debug, Clone, Copy)]
enum Arg {
    /// A string key under the prefix.
    Key,
    /// A sorted-set key under the prefix.
    Zset,
    /// A channel under the prefix.
    Channel,
    Text(&'static str),
}

use Arg::{Channel, Key, Text, Zset};

/// Every command herdlock runs, as the name its ACL rule uses (`+name`), with arguments
/// for `ACL DRYRUN` (the command's own words first). `scripts/probe.lua` runs each of the
/// ones scripts run (a unit test keeps the three lists in step with `src/scripts/`).
const NEEDED: &[(&str, &[Arg])] = &[
    ("ping", &[Text("PING")]),
    (
        "evalsha",
        &[
            Text("EVALSHA"),
            Text("0000000000000000000000000000000000000000"),
            Text("2"),
            Key,
            Zset,
        ],
    ),
    (
        "script|load",
        &[Text("SCRIPT"), Text("LOAD"), Text("return 1")],
    ),
    ("subscribe", &[Text("SUBSCRIBE"), Channel]),
    ("unsubscribe", &[Text("UNSUBSCRIBE"), Channel]),
    ("publish", &[Text("PUBLISH"), Channel, Text("probe")]),
    ("get", &[Text("GET"), Key]),
    (
        "set",
        &[Text("SET"), Key, Text("0"), Text("PX"), Text("5000")],
    ),
    ("del", &[Text("DEL"), Key]),
    ("getdel", &[Text("GETDEL"), Key]),
    ("incr", &[Text("INCR"), Key]),
    ("pexpire", &[Text("PEXPIRE"), Key, Text("5000")]),
    ("pttl", &[Text("PTTL"), Key]),
    ("time", &[Text("TIME")]),
    ("zadd", &[Text("ZADD"), Zset, Text("0"), Text("probe")]),
    ("zcard", &[Text("ZCARD"), Zset]),
    (
        "zrange",
        &[
            Text("ZRANGE"),
            Zset,
            Text("0"),
            Text("0"),
            Text("WITHSCORES"),
        ],
    ),
    (
        "zrangebyscore",
        &[Text("ZRANGEBYSCORE"), Zset, Text("-inf"), Text("0")],
    ),
    ("zrank", &[Text("ZRANK"), Zset, Text("probe")]),
    ("zrem", &[Text("ZREM"), Zset, Text("probe")]),
    (
        "zremrangebyscore",
        &[Text("ZREMRANGEBYSCORE"), Zset, Text("-inf"), Text("-1")],
    ),
    ("zscore", &[Text("ZSCORE"), Zset, Text("probe")]),
];

/// What a Redis Cluster needs instead of, or besides, [`NEEDED`]'s one-node pub/sub:
/// sharded pub/sub, `EVAL` (the reload after a failover, routed by key), and the slot map.
const NEEDED_CLUSTER: &[(&str, &[Arg])] = &[
    ("ssubscribe", &[Text("SSUBSCRIBE"), Channel]),
    ("sunsubscribe", &[Text("SUNSUBSCRIBE"), Channel]),
    ("spublish", &[Text("SPUBLISH"), Channel, Text("probe")]),
    (
        "eval",
        &[Text("EVAL"), Text("return 1"), Text("2"), Key, Zset],
    ),
    ("cluster|slots", &[Text("CLUSTER"), Text("SLOTS")]),
];

/// The one-node commands a cluster does not use (its pub/sub is sharded).
const SINGLE_ONLY: &[&str] = &["subscribe", "unsubscribe", "publish"];

/// Allowed by the least-privilege rule though herdlock works without it: the eviction
/// check reads `INFO memory`; newer redis-rs versions and tools read `CLUSTER SHARDS`.
const OPTIONAL: &[&str] = &["info|memory", "cluster|shards"];

/// The commands a herd on a cluster (`sharded`) or one node runs.
fn needed(sharded: bool) -> Vec<(&'static str, &'static [Arg])> {
    if sharded {
        NEEDED
            .iter()
            .filter(|(name, _)| !SINGLE_ONLY.contains(name))
            .chain(NEEDED_CLUSTER)
            .copied()
            .collect()
    } else {
        NEEDED.to_vec()
    }
}

/// The `ACL SETUSER` rule for a user that does nothing but herdlock under `prefix`: the
/// one README ("Redis requirements") documents, for one node and for a Redis Cluster
/// alike (sharded pub/sub and the slot map are in it). Add `+wait` for
/// `LockOptions::replicas` and `+select` for a database other than 0.
pub(crate) fn least_privilege_rule(user: &str, prefix: &str) -> String {
    let pattern = format!("{}:*", acl_escape(prefix));
    let mut rule =
        format!("ACL SETUSER {user} reset on >PASSWORD resetchannels ~{pattern} &{pattern} -@all");
    for name in NEEDED
        .iter()
        .chain(NEEDED_CLUSTER)
        .map(|(name, _)| *name)
        .chain(OPTIONAL.iter().copied())
    {
        let _ = write!(rule, " +{name}");
    }
    rule
}

impl Preflight {
    /// Runs both checks on `conn` (a working command connection of `client`). `pubsub`, if
    /// given, is the herd's pub/sub connection; otherwise the subscribe probe (needed only
    /// when `ACL DRYRUN` is refused) opens one of its own.
    pub(crate) async fn run<C: ConnectionLike + Send>(
        &self,
        client: &Client,
        conn: &mut C,
        pubsub: Option<&mut PubSub>,
        timeout: Duration,
    ) -> Result<()> {
        self.check_eviction(conn, timeout).await?;
        let names = ProbeNames::new(&self.prefix);
        let user = client
            .get_connection_info()
            .redis_settings()
            .username()
            .unwrap_or("default")
            .to_owned();
        let refused = match dry_run(conn, &user, &names, &needed(false), timeout).await? {
            Some(refused) => refused,
            None => probe(client, conn, pubsub, &names, timeout).await?,
        };
        if refused.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Permission,
            self.permission_message(&user, &refused),
        ))
    }

    /// Runs both checks on a Redis Cluster: on every master (found with `CLUSTER SLOTS`
    /// on `conn`), over a connection of its own with the seed's credentials, the eviction
    /// policy and `ACL DRYRUN` (ACL users are per node). A user who may not run `ACL
    /// DRYRUN` is probed on the probe key's slot (the probe script by `EVAL`, and
    /// `SSUBSCRIBE` + `SUNSUBSCRIBE` of the probe channel).
    pub(crate) async fn run_cluster(
        &self,
        nodes: &[String],
        conn: &mut ClusterConnection,
        timeout: Duration,
    ) -> Result<()> {
        let seed = nodes
            .first()
            .ok_or_else(|| Error::invalid("a redis cluster url names at least one node"))?;
        let seed = Client::open(seed.as_str())
            .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "invalid redis url", e))?;
        let info = seed.get_connection_info().clone();
        let user = info
            .redis_settings()
            .username()
            .unwrap_or("default")
            .to_owned();
        let slots = bounded(
            "connect check (cluster slots)",
            timeout,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(conn),
        )
        .await?;
        let names = ProbeNames::new(&self.prefix);
        let needed = needed(true);
        let mut refused: Vec<Refused> = Vec::new();
        let mut dry_run_refused = false;
        for (host, port) in masters(&slots) {
            let addr = match info.addr() {
                redis::ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: *insecure,
                    tls_params: tls_params.clone(),
                },
                _ => redis::ConnectionAddr::Tcp(host, port),
            };
            let client = build_client(info.clone().set_addr(addr), &self.tls)?;
            let mut node = bounded(
                "connect check (cluster master)",
                timeout,
                client.get_multiplexed_async_connection(),
            )
            .await?;
            self.check_eviction(&mut node, timeout).await?;
            match dry_run(&mut node, &user, &names, &needed, timeout).await? {
                Some(found) => {
                    for r in found {
                        if !refused.contains(&r) {
                            refused.push(r);
                        }
                    }
                }
                None => dry_run_refused = true,
            }
        }
        if dry_run_refused {
            refused = probe_cluster(nodes, &self.tls, conn, &names, timeout).await?;
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Permission,
            self.permission_message(&user, &refused),
        ))
    }

    async fn check_eviction<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        timeout: Duration,
    ) -> Result<()> {
        let Some(policy) = eviction_policy(conn, timeout).await? else {
            tracing::warn!(
                "cannot read the redis maxmemory-policy (neither `INFO memory` nor \
                 `CONFIG GET` is permitted): herdlock needs `noeviction`, or a held lock \
                 can be evicted and a second holder let in; allow `+info|memory` to check it"
            );
            return Ok(());
        };
        if policy == "noeviction" {
            return Ok(());
        }
        if self.allow_eviction {
            tracing::info!(
                policy,
                "redis may evict keys; allowed by Builder::allow_eviction"
            );
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::ServerConfig,
            format!(
                "redis evicts keys under memory pressure (maxmemory-policy is `{policy}`): \
                 it could evict a held lock and let a second holder in; run `CONFIG SET maxmemory-policy noeviction` (and set it in \
                 redis.conf), or opt out with `Builder::allow_eviction(true)`"
            ),
        ))
    }

    fn permission_message(&self, user: &str, refused: &[Refused]) -> String {
        let pattern = format!("{}:*", self.prefix);
        let items: Vec<String> = refused
            .iter()
            .map(|r| match &r.why {
                Why::Command => format!("`{}` (command not allowed)", r.command),
                Why::Key => format!("`{}` (no access to keys `{pattern}`)", r.command),
                Why::Channel => format!("`{}` (no access to channels `{pattern}`)", r.command),
                Why::Other(text) => format!("`{}` ({text})", r.command),
            })
            .collect();
        let mut message = format!(
            "redis user `{user}` may not do what herdlock needs under prefix `{}`: {}",
            self.prefix,
            items.join(", ")
        );
        // Only what is missing: adding `~p:*` to a user who has `allkeys` is an error.
        let escaped = format!("{}:*", acl_escape(&self.prefix));
        let mut grant = Vec::new();
        if refused.iter().any(|r| r.why == Why::Key) {
            grant.push(format!("~{escaped}"));
        }
        if refused.iter().any(|r| r.why == Why::Channel) {
            grant.push(format!("&{escaped}"));
        }
        for r in refused.iter().filter(|r| r.why == Why::Command) {
            let rule = format!("+{}", r.command);
            if !grant.contains(&rule) {
                grant.push(rule);
            }
        }
        if !grant.is_empty() {
            let _ = write!(
                message,
                "; grant them with `ACL SETUSER {user} {}`",
                grant.join(" ")
            );
        }
        let _ = write!(
            message,
            " (the least-privilege rule: `{}`)",
            least_privilege_rule(user, &self.prefix)
        );
        message
    }
}

/// Something the user may not do.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refused {
    /// The command, as its ACL rule names it.
    command: String,
    why: Why,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    Command,
    Key,
    Channel,
    /// Not an ACL refusal (a renamed command, scripting disabled): the server's words.
    Other(String),
}

impl Refused {
    /// Classifies the server's words: an `ACL DRYRUN` answer, a `NOPERM` error or a
    /// script's refusal all name the channel or key they refused; anything else that says
    /// "permission" / "can't" refused the command itself.
    fn new(command: &str, text: &str) -> Refused {
        let lower = text.to_ascii_lowercase();
        let acl = lower.contains("noperm")
            || lower.contains("no permissions")
            || lower.contains("user executing the script can't");
        let why = if !acl {
            Why::Other(text.trim().to_owned())
        } else if lower.contains("channel") {
            Why::Channel
        } else if lower.contains("key") {
            Why::Key
        } else {
            Why::Command
        };
        Refused {
            command: command.to_owned(),
            why,
        }
    }
}

/// The probe's key and channel names under a prefix.
struct ProbeNames {
    key: String,
    zset: String,
    channel: String,
}

impl ProbeNames {
    fn new(prefix: &str) -> ProbeNames {
        let channel = format!("{prefix}:{{herdlock.probe}}:probe");
        ProbeNames {
            key: format!("{channel}:str"),
            zset: format!("{channel}:zset"),
            channel,
        }
    }

    fn arg(&self, arg: Arg) -> &str {
        match arg {
            Key => &self.key,
            Zset => &self.zset,
            Channel => &self.channel,
            Text(t) => t,
        }
    }
}

/// The server's eviction policy, or `None` if the user may read it neither way. Only a
/// connection failure is an error.
async fn eviction_policy<C: ConnectionLike + Send>(
    conn: &mut C,
    timeout: Duration,
) -> Result<Option<String>> {
    let info = query::<String, C>(conn, redis::cmd("INFO").arg("memory"), timeout).await?;
    if let Some(policy) = info.ok().as_deref().and_then(policy_from_info) {
        return Ok(Some(policy));
    }
    let config = query::<Value, C>(
        conn,
        redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
        timeout,
    )
    .await?;
    Ok(config.ok().as_ref().and_then(policy_from_config))
}

/// `maxmemory_policy:<policy>` from an `INFO memory` reply.
fn policy_from_info(info: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix("maxmemory_policy:"))
        .map(str::to_owned)
}

/// The value from a `CONFIG GET maxmemory-policy` reply (an array `[name, value]`, or a
/// map under RESP3).
fn policy_from_config(reply: &Value) -> Option<String> {
    let value = match reply {
        Value::Array(items) if items.len() == 2 => &items[1],
        Value::Map(pairs) if pairs.len() == 1 => &pairs[0].1,
        _ => return None,
    };
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Asks `ACL DRYRUN` about every needed command. `None` when the user may not ask (or the
/// server has no `ACL DRYRUN`, before Redis 7).
async fn dry_run<C: ConnectionLike + Send>(
    conn: &mut C,
    user: &str,
    names: &ProbeNames,
    needed: &[(&'static str, &'static [Arg])],
    timeout: Duration,
) -> Result<Option<Vec<Refused>>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (_, args) in needed {
        let cmd = pipe.cmd("ACL").arg("DRYRUN").arg(user);
        for arg in *args {
            cmd.arg(names.arg(*arg));
        }
    }
    let replies = bounded(
        "connect check (acl dryrun)",
        timeout,
        pipe.query_async::<Vec<Value>>(conn),
    )
    .await?;
    if replies.len() != needed.len() || replies.iter().any(|r| matches!(r, Value::ServerError(_))) {
        return Ok(None);
    }
    let mut refused = Vec::new();
    for ((name, _), reply) in needed.iter().zip(&replies) {
        match reply {
            Value::Okay => {}
            Value::SimpleString(s) if s == "OK" => {}
            Value::BulkString(b) => refused.push(Refused::new(name, &String::from_utf8_lossy(b))),
            other => refused.push(Refused::new(name, &format!("{other:?}"))),
        }
    }
    Ok(Some(refused))
}

/// Probes with real, harmless commands (see the module docs).
async fn probe<C: ConnectionLike + Send>(
    client: &Client,
    conn: &mut C,
    pubsub: Option<&mut PubSub>,
    names: &ProbeNames,
    timeout: Duration,
) -> Result<Vec<Refused>> {
    let script = Script::new(include_str!("../scripts/probe.lua"));
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("PING");
    pipe.cmd("SCRIPT")
        .arg("LOAD")
        .arg(include_str!("../scripts/probe.lua"));
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(2)
        .arg(&names.key)
        .arg(&names.zset)
        .arg(&names.channel);
    let replies = bounded(
        "connect check (probe)",
        timeout,
        pipe.query_async::<Vec<Value>>(conn),
    )
    .await?;
    let mut refused = Vec::new();
    let [ping, load, eval] = replies.as_slice() else {
        return Err(Error::new(
            ErrorKind::Redis,
            "unexpected reply to the connect check",
        ));
    };
    for (name, reply) in [("ping", ping), ("script|load", load)] {
        if let Value::ServerError(e) = reply {
            refused.push(Refused::new(name, &server_error_text(e)));
        }
    }
    match eval {
        Value::Array(items) => {
            for pair in items.chunks(2) {
                let [Value::BulkString(name), Value::BulkString(text)] = pair else {
                    continue;
                };
                refused.push(Refused::new(
                    &String::from_utf8_lossy(name),
                    &String::from_utf8_lossy(text),
                ));
            }
        }
        // Not loaded because SCRIPT LOAD was refused: already reported.
        Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript) => {}
        Value::ServerError(e) => refused.push(Refused::new("evalsha", &server_error_text(e))),
        _ => {}
    }
    refused.extend(probe_subscribe(client, pubsub, &names.channel, timeout).await?);
    Ok(refused)
}

/// The masters' addresses in a `CLUSTER SLOTS` reply (`[start, end, [host, port, id],
/// replicas…]` per range), each once.
fn masters(slots: &Value) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = slots else {
        return out;
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let Some(Value::Array(master)) = fields.get(2) else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !out.iter().any(|(h, p)| *h == host && *p == port) {
            out.push((host, port));
        }
    }
    out
}

/// The probe on a cluster: the probe script (its `SPUBLISH` variant) by `EVAL` routed by
/// the probe key, and `SSUBSCRIBE` + `SUNSUBSCRIBE` of the probe channel on a RESP3
/// cluster connection of its own.
async fn probe_cluster(
    nodes: &[String],
    tls: &TlsFiles,
    conn: &mut ClusterConnection,
    names: &ProbeNames,
    timeout: Duration,
) -> Result<Vec<Refused>> {
    let source = include_str!("../scripts/probe.lua").replace("'PUBLISH'", "'SPUBLISH'");
    let mut refused = Vec::new();
    let eval = query::<Value, _>(
        conn,
        redis::cmd("EVAL")
            .arg(source)
            .arg(2)
            .arg(&names.key)
            .arg(&names.zset)
            .arg(&names.channel),
        timeout,
    )
    .await?;
    match eval {
        Ok(Value::Array(items)) => {
            for pair in items.chunks(2) {
                let [Value::BulkString(name), Value::BulkString(text)] = pair else {
                    continue;
                };
                refused.push(Refused::new(
                    &String::from_utf8_lossy(name),
                    &String::from_utf8_lossy(text),
                ));
            }
        }
        Ok(_) => {}
        Err(e) => refused.push(Refused::new("eval", e.message())),
    }
    let builder = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .use_protocol(redis::ProtocolVersion::RESP3);
    let client = with_cluster_tls(builder, tls)
        .build()
        .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "invalid redis url", e))?;
    let mut own = bounded(
        "connect check (cluster pub/sub)",
        timeout,
        client.get_async_connection(),
    )
    .await?;
    for (name, unsubscribe) in [("ssubscribe", false), ("sunsubscribe", true)] {
        let sent = if unsubscribe {
            tokio::time::timeout(timeout, own.sunsubscribe(&names.channel)).await
        } else {
            tokio::time::timeout(timeout, own.ssubscribe(&names.channel)).await
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                refused.push(Refused::new(name, &e.to_string()));
                break;
            }
            Ok(Err(e)) => return Err(Error::redis("connect check (pub/sub)", e)),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!("redis did not answer {name} within {timeout:?}"),
                ))
            }
        }
    }
    Ok(refused)
}

/// `SUBSCRIBE` then `UNSUBSCRIBE` the probe channel, on `pubsub` or a connection of its
/// own.
async fn probe_subscribe(
    client: &Client,
    pubsub: Option<&mut PubSub>,
    channel: &str,
    timeout: Duration,
) -> Result<Vec<Refused>> {
    let mut own;
    let pubsub = if let Some(p) = pubsub {
        p
    } else {
        own = bounded(
            "connect check (pub/sub)",
            timeout,
            client.get_async_pubsub(),
        )
        .await?;
        &mut own
    };
    for (name, unsubscribe) in [("subscribe", false), ("unsubscribe", true)] {
        let sent = if unsubscribe {
            tokio::time::timeout(timeout, pubsub.unsubscribe(channel)).await
        } else {
            tokio::time::timeout(timeout, pubsub.subscribe(channel)).await
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                // Nothing to unsubscribe after a refused SUBSCRIBE.
                return Ok(vec![Refused::new(name, &e.to_string())]);
            }
            Ok(Err(e)) => return Err(Error::redis("connect check (pub/sub)", e)),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!("redis did not answer {name} within {timeout:?}"),
                ))
            }
        }
    }
    Ok(Vec::new())
}

fn server_error_text(e: &redis::ServerError) -> String {
    match e.details() {
        Some(details) => format!("{} {details}", e.code()),
        None => e.code().to_owned(),
    }
}

/// One command: its reply, or the server's refusal as `Ok(Err(..))`; a connection failure
/// or timeout is the only `Err`.
async fn query<T: redis::FromRedisValue, C: ConnectionLike + Send>(
    conn: &mut C,
    cmd: &redis::Cmd,
    timeout: Duration,
) -> Result<std::result::Result<T, Error>> {
    match bounded("connect check", timeout, cmd.query_async::<T>(conn)).await {
        Ok(v) => Ok(Ok(v)),
        Err(e) if e.kind() == ErrorKind::Connection || e.kind() == ErrorKind::Auth => Err(e),
        Err(e) => Ok(Err(e)),
    }
}

async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::redis(what, e)),
        Err(_) => Err(Error::new(
            ErrorKind::Connection,
            format!("redis did not answer {what} within {limit:?}"),
        )),
    }
}

/// Escapes the glob characters of an ACL key or channel pattern.
fn acl_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPTS: &[(&str, &str)] = &[
        ("acquire", include_str!("../scripts/acquire.lua")),
        ("release", include_str!("../scripts/release.lua")),
        ("extend", include_str!("../scripts/extend.lua")),
        ("status", include_str!("../scripts/status.lua")),
        (
            "fanout_acquire",
            include_str!("../scripts/fanout_acquire.lua"),
        ),
        ("fanout_check", include_str!("../scripts/fanout_check.lua")),
        ("complete", include_str!("../scripts/complete.lua")),
        (
            "multi_acquire",
            include_str!("../scripts/multi_acquire.lua"),
        ),
        (
            "multi_release",
            include_str!("../scripts/multi_release.lua"),
        ),
        ("multi_extend", include_str!("../scripts/multi_extend.lua")),
        ("semaphore", include_str!("../scripts/semaphore.lua")),
    ];

    /// The commands a script source calls: `redis.call('NAME'` and `redis.pcall('NAME'`.
    fn called(source: &str) -> Vec<String> {
        let mut out = Vec::new();
        for marker in ["redis.call('", "redis.pcall('"] {
            for (i, _) in source.match_indices(marker) {
                let rest = &source[i + marker.len()..];
                if let Some(end) = rest.find('\'') {
                    out.push(rest[..end].to_ascii_lowercase());
                }
            }
        }
        out
    }

    #[test]
    fn every_command_a_script_runs_is_checked_and_probed() {
        let probe = include_str!("../scripts/probe.lua");
        for (script, source) in SCRIPTS {
            for command in called(source) {
                assert!(
                    NEEDED.iter().any(|(name, _)| *name == command),
                    "{script}.lua runs {command}, which the connect check does not check"
                );
                assert!(
                    probe.contains(&format!("try('{}'", command.to_ascii_uppercase())),
                    "{script}.lua runs {command}, which probe.lua does not try"
                );
            }
        }
    }

    #[test]
    fn every_command_a_cluster_script_runs_is_checked_and_probed() {
        let probe = include_str!("../scripts/probe.lua").replace("'PUBLISH'", "'SPUBLISH'");
        let needed = needed(true);
        let rule = least_privilege_rule("u", "p");
        for (script, source) in SCRIPTS {
            let source = source.replace("'PUBLISH'", "'SPUBLISH'");
            for command in called(&source) {
                assert!(
                    needed.iter().any(|(name, _)| *name == command),
                    "{script}.lua runs {command} on a cluster, which the connect check does not check"
                );
                assert!(
                    probe.contains(&format!("try('{}'", command.to_ascii_uppercase())),
                    "{script}.lua runs {command} on a cluster, which probe.lua does not try"
                );
                assert!(rule.contains(&format!(" +{command}")), "{command}");
            }
        }
        for name in [
            "ssubscribe",
            "sunsubscribe",
            "spublish",
            "eval",
            "cluster|slots",
            "cluster|shards",
        ] {
            assert!(
                rule.contains(&format!(" +{name}")),
                "the rule lacks +{name}: {rule}"
            );
        }
        assert!(!needed.iter().any(|(name, _)| SINGLE_ONLY.contains(name)));
    }

    #[test]
    fn the_readme_documents_the_least_privilege_rule() {
        let readme = include_str!("../../README.md");
        let rule = least_privilege_rule("herdlock", "herdlock");
        assert!(
            readme.contains(&rule),
            "README.md must contain the least-privilege rule:\n{rule}"
        );
    }

    #[test]
    fn refusals_are_classified_from_the_servers_words() {
        let cases = [
            ("This user has no permissions to run the 'set' command", Why::Command),
            ("This user has no permissions to access the 'x' key", Why::Key),
            ("This user has no permissions to access the 'p:c' channel", Why::Channel),
            (
                "ERR The user executing the script can't run this command or subcommand",
                Why::Command,
            ),
            (
                "ERR The user executing the script can't access at least one of the keys mentioned in the command arguments",
                Why::Key,
            ),
            (
                "ERR The user executing the script can't publish to the channel mentioned in the command",
                Why::Channel,
            ),
            (
                "NOPERM this user has no permissions to access one of the channels used as arguments",
                Why::Channel,
            ),
            (
                "ERR unknown command 'EVALSHA'",
                Why::Other("ERR unknown command 'EVALSHA'".to_owned()),
            ),
        ];
        for (text, why) in cases {
            assert_eq!(Refused::new("x", text).why, why, "{text}");
        }
    }

    #[test]
    fn the_grant_names_only_what_is_missing() {
        let preflight = Preflight {
            prefix: "app".to_owned(),
            allow_eviction: false,
            tls: TlsFiles::default(),
        };
        let message = preflight.permission_message(
            "u",
            &[
                Refused::new(
                    "subscribe",
                    "NOPERM this user has no permissions to run the 'subscribe' command",
                ),
                Refused::new(
                    "publish",
                    "This user has no permissions to access the 'app:c' channel",
                ),
            ],
        );
        assert!(
            message.contains("grant them with `ACL SETUSER u &app:* +subscribe`"),
            "{message}"
        );
        assert!(!message.ends_with('.'), "{message}");
    }

    #[test]
    fn policies_are_parsed_from_info_and_config() {
        let info = "# Memory\r\nused_memory:1\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(policy_from_info(info).as_deref(), Some("allkeys-lru"));
        let config = Value::Array(vec![
            Value::BulkString(b"maxmemory-policy".to_vec()),
            Value::BulkString(b"noeviction".to_vec()),
        ]);
        assert_eq!(policy_from_config(&config).as_deref(), Some("noeviction"));
        assert_eq!(policy_from_config(&Value::Array(vec![])), None);
    }
}
