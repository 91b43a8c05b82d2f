//! The command connection, whatever the engine: the command steps of `mod.rs` run on a
//! [`Conn`], which is a [`redis::aio::ConnectionLike`] over every engine variant, and call
//! scripts through [`Lua`] and [`Invocation`].
//!
//! - One node: a redis-rs `ConnectionManager`, which reconnects on its own after an I/O
//!   error, and is replaced when a Sentinel master moves (`backend/target.rs`). A script is sent by `EVALSHA`; on `NOSCRIPT` (a restarted or flushed server)
//!   it is loaded with `SCRIPT LOAD` and sent again, once.
//! - Redis Cluster: a redis-rs `ClusterConnection` (one multiplexed connection per node,
//!   commands routed by their first key's slot, `MOVED`/`ASK` followed, the slot map
//!   refreshed after a failover). On `NOSCRIPT` the script is sent again as `EVAL`, routed
//!   by the same key: redis-rs's own reload (`SCRIPT LOAD` on every node) fails while any
//!   node is down, which is exactly when a promoted replica lacks the script.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Script, ToRedisArgs, Value};

use super::ConnectSettings;
use crate::backend::target::{parse_url, with_cluster_tls, Managed, TlsFiles};
use crate::error::{Error, ErrorKind, Result};

/// The command connection of one engine variant. Cheap to clone (every variant is a
/// handle on one multiplexed connection).
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis node.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where the command steps get their [`Conn`]: one node's connection manager, rebuilt
/// on a new master after a Sentinel failover, or the cluster connection.
pub(super) enum Commands {
    /// One Redis node (or a Sentinel group's master).
    Single(Managed),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl Commands {
    /// The connection to run a command on now (a cheap clone), and the generation of the
    /// target it belongs to (always 0 on a cluster).
    pub(super) fn get(&self) -> Result<(Conn, u64)> {
        match self {
            Commands::Single(managed) => {
                let (conn, generation) = managed.get()?;
                Ok((Conn::Single(conn), generation))
            }
            Commands::Cluster(conn) => Ok((Conn::Cluster(conn.clone()), 0)),
        }
    }
}

/// A Lua script: its source (for `SCRIPT LOAD` or `EVAL`) and its SHA-1 (for `EVALSHA`).
pub(super) struct Lua {
    script: Script,
    source: String,
}

impl Lua {
    /// The script `source`; with `sharded`, its notices go out by `SPUBLISH` (a Redis
    /// Cluster: the channel `prefix:{key}` lives in the key's slot) instead of `PUBLISH`.
    pub(super) fn new(source: &str, sharded: bool) -> Lua {
        let source = if sharded {
            source.replace("'PUBLISH'", "'SPUBLISH'")
        } else {
            source.to_owned()
        };
        Lua {
            script: Script::new(&source),
            source,
        }
    }

    /// A call of this script, to which keys and arguments are added.
    pub(super) fn prepare_invoke(&self) -> Invocation<'_> {
        Invocation {
            lua: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One call of a [`Lua`] script: its `KEYS` and `ARGV`.
pub(super) struct Invocation<'a> {
    lua: &'a Lua,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Invocation<'_> {
    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// `EVALSHA` (`by_sha`) or `EVAL` of the script with these keys and arguments. Either
    /// is routed by its first key on a cluster.
    fn command(&self, by_sha: bool) -> Cmd {
        let mut cmd = if by_sha {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.lua.script.get_hash());
            cmd
        } else {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(&self.lua.source);
            cmd
        };
        cmd.arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        cmd
    }

    /// Runs the script on `conn`: `EVALSHA`, and on `NOSCRIPT` the engine's fallback (see
    /// the module docs).
    pub(super) async fn invoke_async(&self, conn: &mut Conn) -> RedisResult<Value> {
        match self.command(true).query_async::<Value>(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                match conn {
                    Conn::Single(_) => {
                        self.lua.script.load_async(conn).await?;
                        self.command(true).query_async(conn).await
                    }
                    Conn::Cluster(_) => self.command(false).query_async(conn).await,
                }
            }
            other => other,
        }
    }
}

/// The configuration of a one-node command connection.
pub(super) fn manager_config(settings: ConnectSettings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        // Every call is already bounded by the command timeout (`bounded`, `invoke*`): a
        // second timer per request inside the manager would only cost time.
        .set_response_timeout(None)
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500))
}

/// The configuration of a Redis Cluster connection.
pub(super) fn cluster_config(settings: ConnectSettings) -> redis::cluster::ClusterConfig {
    redis::cluster::ClusterConfig::new().set_connection_timeout(settings.connect_timeout)
}

/// A Redis Cluster client for `nodes` (the seed URLs); `push` makes it speak RESP3 and
/// hand every push (sharded messages, unsubscribes, disconnections) to that channel.
///
/// `tls`, when not empty, is the CA and client certificate for `rediss://` nodes (all of
/// them must be).
pub(super) fn cluster_client(
    nodes: &[String],
    settings: ConnectSettings,
    tls: &TlsFiles,
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<redis::cluster::ClusterClient> {
    for node in nodes {
        // Refuses rediss:// without the feature, with the same message as one node.
        parse_url(node, "redis cluster node url")?;
    }
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(settings.connect_timeout)
        // Every call is bounded by the command timeout; within it, redis-rs retries
        // through MOVED, ASK, TRYAGAIN and a failover's refused connections.
        .retries(8)
        .min_retry_wait(10)
        .max_retry_wait(500);
    if !tls.is_empty() && !nodes.iter().all(|n| n.starts_with("rediss://")) {
        return Err(Error::invalid(
            "TLS certificates were given (tls_ca / tls_client_cert) but the cluster urls are not rediss://",
        ));
    }
    // The CA and client certificate for every node.
    builder = with_cluster_tls(builder, tls);
    if let Some(push) = push {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push);
    }
    builder
        .build()
        .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "invalid redis cluster url", e))
}

/// The node URLs of a cluster URL `redis+cluster://[user:password@]host:port,host:port[/]`
/// (`rediss+cluster://` for TLS): one `redis://[user:password@]host:port/` per node.
/// `None` when `url` is not a cluster URL.
pub(crate) fn cluster_nodes(url: &str) -> Option<Result<Vec<String>>> {
    let (scheme, rest) = url.split_once("://")?;
    let plain = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return None,
    };
    let (authority, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    // The fragment (`#insecure`) and query carry to every node; a path (a database) does
    // not exist on a cluster.
    let extra = tail.trim_start_matches('/');
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{plain}://{userinfo}{h}/{extra}"))
        .collect();
    if nodes.is_empty() {
        return Some(Err(Error::invalid(
            "a redis cluster url names at least one node: redis+cluster://host:port,host:port/",
        )));
    }
    Some(Ok(nodes))
}

/// Runs `fut` under a deadline, mapping both redis errors and the deadline to [`Error`].
pub(super) async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
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
