//! A Sentinel group for the tests: one master, one replica and (by default) three Sentinels on
//! free loopback ports, each a [`RedisServer`] with its own dir, log and watchdog.
//!
//! Sentinels normally find each other and the replica through the master over several
//! seconds. Here every Sentinel starts from its own pre-seeded `sentinel.conf` (its `myid`,
//! the master, `known-replica`, every other Sentinel as `known-sentinel`, a 500 ms
//! `down-after-milliseconds`, a 2 s `failover-timeout`), so the group is ready in well under a
//! second. Because each config names the other Sentinels' ports, the Sentinels' ports are
//! picked together, and the Sentinels start again on fresh ones if another process takes one
//! first.
//!
//! [`SentinelGroup::start`] returns once the replica is in sync and every Sentinel sees the
//! master, the replica and every other Sentinel, and can reach its quorum
//! (`SENTINEL CKQUORUM`). [`SentinelGroup::kill_master_and_wait_failover`] kills the master
//! with SIGKILL and returns once every Sentinel names the promoted replica.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::start_all;
use crate::server::{free_port, PortsTaken, RedisServer, ServerConfig};
use crate::tls::Tls;

/// How long a new group may take to be ready (measured: about 0.5 s).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the Sentinels may take to promote the replica after the master dies (measured:
/// 1 to 2.5 s).
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);

/// Sentinel's `ping-period` while the group starts: a Sentinel retries a link that failed
/// (a peer Sentinel that was not listening yet when it started) only after this long.
/// With the default 1 s, a group was ready in about 1.2 s; with 100 ms, in 0.2-0.4 s.
const STARTUP_PING_PERIOD_MS: u64 = 100;

/// Sentinel's `ping-period` once the group is ready: the default. It must stay so: a
/// replica whose last `INFO` is older than 5 ping periods cannot be promoted, and Sentinel
/// asks a replica for `INFO` only every second during a failover (with 100 ms, failovers
/// failed and were retried 4 s later).
const PING_PERIOD_MS: u64 = 1000;

/// Sentinel's `info-period` (default 10 s): how often a Sentinel asks each server for
/// `INFO` outside a failover. With the default, a restarted server that first said it was a
/// master was seen as a replica only 10 s later.
const INFO_PERIOD_MS: u64 = 1000;

/// How many times the Sentinels start again on fresh ports when a port was taken.
const START_ATTEMPTS: u32 = 5;

/// The pause between two looks at the group while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How a Sentinel group is built. `SentinelConfig::default()`: master name `herdlock`, 3
/// Sentinels, quorum 2, no password, plain TCP.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    /// The name the Sentinels monitor the master by.
    pub master_name: String,
    /// How many Sentinels.
    pub sentinels: usize,
    /// How many Sentinels must agree the master is down.
    pub quorum: usize,
    /// `--requirepass` (and `--masterauth`) on the master and the replica; the Sentinels
    /// use it (`sentinel auth-pass`) and need none themselves.
    pub password: Option<String>,
    /// TLS on every server, the Sentinels included, and on replication.
    pub tls: Option<Tls>,
}

impl Default for SentinelConfig {
    fn default() -> SentinelConfig {
        SentinelConfig {
            master_name: "herdlock".to_owned(),
            sentinels: 3,
            quorum: 2,
            password: None,
            tls: None,
        }
    }
}

/// A running Sentinel group; dropping it kills every server.
///
/// The data nodes are addressed by index: 0 starts as the master, 1 as its replica; an index
/// keeps naming the same server whatever its role becomes.
#[derive(Debug)]
pub struct SentinelGroup {
    /// The master and the replica, in start order.
    data: Vec<RedisServer>,
    /// The Sentinels.
    sentinels: Vec<RedisServer>,
    /// What the Sentinels call the master.
    master_name: String,
    /// The data node the harness last saw as the master.
    master: usize,
    /// From the first spawn to ready.
    started_in: Duration,
}

/// What [`SentinelGroup::kill_master_and_wait_failover`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    /// The data node that became the master.
    pub promoted: usize,
    /// From the kill until every running Sentinel named the new master and it said so.
    pub promoted_after: Duration,
}

impl SentinelGroup {
    /// Starts a master, a replica and 3 Sentinels, and waits until the group is ready.
    ///
    /// # Panics
    ///
    /// If a server cannot be started or the group is not ready within 20 s.
    pub fn start() -> SentinelGroup {
        SentinelGroup::start_with(SentinelConfig::default())
    }

    /// Starts a group as `config` says and waits until it is ready.
    ///
    /// # Panics
    ///
    /// Like [`SentinelGroup::start`].
    pub fn start_with(config: SentinelConfig) -> SentinelGroup {
        let started = Instant::now();
        let mut auth_args = Vec::new();
        if let Some(password) = &config.password {
            auth_args.extend(["--masterauth".to_owned(), password.clone()]);
        }
        let master = RedisServer::start_with(ServerConfig {
            password: config.password.clone(),
            extra_args: auth_args.clone(),
            tls: config.tls.clone(),
            ..ServerConfig::default()
        });
        let mut replica_args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port().to_string(),
        ];
        replica_args.extend(auth_args);
        let replica = RedisServer::start_with(ServerConfig {
            password: config.password.clone(),
            extra_args: replica_args,
            tls: config.tls.clone(),
            ..ServerConfig::default()
        });
        let sentinels = start_sentinels(&config, master.port(), replica.port());
        for sentinel in &sentinels {
            sentinel_debug(sentinel, "ping-period", STARTUP_PING_PERIOD_MS);
            sentinel_debug(sentinel, "info-period", INFO_PERIOD_MS);
        }
        let mut group = SentinelGroup {
            data: vec![master, replica],
            sentinels,
            master_name: config.master_name,
            master: 0,
            started_in: Duration::ZERO,
        };
        group.wait_settled(READY_TIMEOUT);
        for sentinel in &group.sentinels {
            sentinel_debug(sentinel, "ping-period", PING_PERIOD_MS);
        }
        group.started_in = started.elapsed();
        group
    }

    /// How long [`SentinelGroup::start_with`] took, from the first spawn to ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The name the Sentinels monitor the master by.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The Sentinels' addresses, `("127.0.0.1", port)`, stopped ones included.
    pub fn sentinel_addrs(&self) -> Vec<(String, u16)> {
        self.sentinels
            .iter()
            .map(|sentinel| ("127.0.0.1".to_owned(), sentinel.port()))
            .collect()
    }

    /// The Sentinels' URLs (`redis://127.0.0.1:PORT/`, or `rediss://`), stopped ones
    /// included.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// Sentinel `index`.
    pub fn sentinel(&self, index: usize) -> &RedisServer {
        &self.sentinels[index]
    }

    /// Sentinel `index`, to stop or restart it.
    pub fn sentinel_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.sentinels[index]
    }

    /// Data node `index` (0: the first master, 1: the first replica).
    pub fn data_node(&self, index: usize) -> &RedisServer {
        &self.data[index]
    }

    /// Data node `index`, to stop it or to inspect it.
    pub fn data_node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.data[index]
    }

    /// The index of the data node the harness last saw promoted (0 until a failover).
    pub fn master_index(&self) -> usize {
        self.master
    }

    /// The data node the harness last saw promoted.
    pub fn master(&self) -> &RedisServer {
        &self.data[self.master]
    }

    /// The other data node.
    pub fn replica(&self) -> &RedisServer {
        &self.data[1 - self.master]
    }

    /// The master's address as the first running Sentinel reports it
    /// (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    ///
    /// # Panics
    ///
    /// If no Sentinel runs or the reply is not an address.
    pub fn master_addr(&self) -> (String, u16) {
        let sentinel = self
            .sentinels
            .iter()
            .find(|sentinel| sentinel.pid().is_some())
            .expect("a running Sentinel");
        self.master_addr_from(sentinel)
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Kills the master and waits for the failover: [`SentinelGroup::kill_master`], then
    /// [`SentinelGroup::wait_failover`].
    ///
    /// # Panics
    ///
    /// Like those.
    pub fn kill_master_and_wait_failover(&mut self) -> Failover {
        let killed = self.kill_master();
        self.wait_failover(killed)
    }

    /// Waits until the group is settled (see [`SentinelGroup::wait_settled`]: a replica in
    /// sync, no failover still running), kills the master with SIGKILL and returns at once
    /// with the kill's time, for [`SentinelGroup::wait_failover`]: for a test that acts
    /// between the kill and the promotion.
    ///
    /// # Panics
    ///
    /// If the group does not settle within 20 s.
    pub fn kill_master(&mut self) -> Instant {
        self.wait_settled(READY_TIMEOUT);
        self.data[self.master].stop();
        Instant::now()
    }

    /// After [`SentinelGroup::kill_master`] (at `killed`), waits until every running Sentinel
    /// names the replica as the master and the replica says it is one.
    ///
    /// It returns as soon as clients asking any Sentinel get the new master. The Sentinel
    /// that led the failover may still be ending it (it waits up to the 2 s
    /// `failover-timeout` to reconfigure the dead master as a replica); the next
    /// [`SentinelGroup::kill_master`] or [`SentinelGroup::restart_data_node`] waits for that.
    ///
    /// # Panics
    ///
    /// If the failover does not happen within [`FAILOVER_TIMEOUT`] of the kill.
    pub fn wait_failover(&mut self, killed: Instant) -> Failover {
        let promoted = 1 - self.master;
        assert!(
            self.data[self.master].pid().is_none(),
            "kill the master first (kill_master)"
        );
        let want_port = self.data[promoted].port();
        let deadline = killed + FAILOVER_TIMEOUT;
        loop {
            let reported: Vec<Result<(String, u16), String>> = self
                .sentinels
                .iter()
                .filter(|sentinel| sentinel.pid().is_some())
                .map(|sentinel| self.master_addr_from(sentinel))
                .collect();
            let named = reported
                .iter()
                .all(|addr| matches!(addr, Ok((_, port)) if *port == want_port));
            if named && info_field(&self.data[promoted], "replication", "role") == "master" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Sentinels did not promote port {want_port} within {FAILOVER_TIMEOUT:?}: they report {reported:?}"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
        self.master = promoted;
        Failover {
            promoted,
            promoted_after: killed.elapsed(),
        }
    }

    /// Restarts the stopped data node `index` (empty) as a replica of the current master and
    /// waits until it is in sync and every Sentinel sees it: after a failover, this gives the
    /// group a replica again, so the next failover can happen.
    ///
    /// # Panics
    ///
    /// If it does not come back, or the group does not settle within 20 s.
    pub fn restart_data_node(&mut self, index: usize) {
        assert_ne!(index, self.master, "restart the replica, not the master");
        self.data[index].restart();
        let master_port = self.data[self.master].port().to_string();
        let reply = self.data[index].cmd(&["REPLICAOF", "127.0.0.1", &master_port]);
        assert!(reply.starts_with("OK"), "REPLICAOF: {reply}");
        self.wait_settled(READY_TIMEOUT);
    }

    /// Waits until the replica is in sync with the master and every running Sentinel names
    /// the master, sees it up (flags `master`, no failover in progress), sees the replica up
    /// with its link to the master up, sees every other Sentinel, and can reach its quorum.
    ///
    /// # Panics
    ///
    /// If that does not happen within `timeout`; the message says what was missing.
    pub fn wait_settled(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let Err(why) = self.check_settled() else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "the Sentinel group is not settled after {timeout:?}: {why}"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn check_settled(&self) -> Result<(), String> {
        let master_port = self.data[self.master].port();
        let replica = &self.data[1 - self.master];
        if replica.pid().is_some()
            && info_field(replica, "replication", "master_link_status") != "up"
        {
            return Err("the replica is not in sync with the master".to_owned());
        }
        let name = self.master_name.as_str();
        let running: Vec<&RedisServer> = self
            .sentinels
            .iter()
            .filter(|sentinel| sentinel.pid().is_some())
            .collect();
        let others = (self.sentinels.len() - 1).to_string();
        for (i, sentinel) in running.iter().enumerate() {
            let addr = self.master_addr_from(sentinel)?;
            if addr.1 != master_port {
                return Err(format!(
                    "Sentinel {i} names {addr:?}, not port {master_port}"
                ));
            }
            let master = fields(&sentinel.cmd(&["SENTINEL", "MASTER", name]));
            let want_replicas = if replica.pid().is_some() { "1" } else { "0" };
            for (key, want) in [
                ("flags", "master"),
                ("num-other-sentinels", others.as_str()),
            ] {
                if master.get(key).map(String::as_str) != Some(want) {
                    return Err(format!(
                        "Sentinel {i} sees the master as {:?} with {:?} other Sentinels",
                        master.get("flags"),
                        master.get("num-other-sentinels")
                    ));
                }
            }
            if replica.pid().is_some() {
                let replicas = entries(&sentinel.cmd(&["SENTINEL", "REPLICAS", name]));
                let up = replicas.iter().any(|entry| {
                    entry.get("port").map(String::as_str) == Some(&replica.port().to_string())
                        && entry.get("flags").map(String::as_str) == Some("slave")
                        && entry.get("master-link-status").map(String::as_str) == Some("ok")
                        && entry.get("master-port").map(String::as_str)
                            == Some(&master_port.to_string())
                });
                if !up {
                    return Err(format!(
                        "Sentinel {i} does not see the replica up ({want_replicas} wanted): {replicas:?}"
                    ));
                }
            }
            let peers = entries(&sentinel.cmd(&["SENTINEL", "SENTINELS", name]));
            let connected = peers
                .iter()
                .filter(|peer| {
                    // `master_down` (the peer's last vote on an old master) may stay for 5 s
                    // after a failover; it does not matter.
                    peer.get("flags").is_some_and(|flags| {
                        flags
                            .split(',')
                            .all(|flag| flag == "sentinel" || flag == "master_down")
                    })
                })
                .count();
            if connected + 1 < running.len() {
                return Err(format!(
                    "Sentinel {i} is connected to {connected} other Sentinels: {peers:?}"
                ));
            }
            let quorum = sentinel.cmd(&["SENTINEL", "CKQUORUM", name]);
            if !quorum.starts_with("OK") {
                return Err(format!("Sentinel {i}: CKQUORUM answered {quorum}"));
            }
        }
        Ok(())
    }

    /// What `sentinel` says the master's address is.
    fn master_addr_from(&self, sentinel: &RedisServer) -> Result<(String, u16), String> {
        let reply = sentinel.cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name]);
        let mut lines = reply.lines();
        match (
            lines.next(),
            lines.next().and_then(|port| port.trim().parse().ok()),
        ) {
            (Some(host), Some(port)) => Ok((host.trim().to_owned(), port)),
            _ => Err(format!(
                "Sentinel on port {} answered GET-MASTER-ADDR-BY-NAME with {reply:?}",
                sentinel.port()
            )),
        }
    }
}

/// Sets one of Sentinel's timings (`SENTINEL DEBUG PARAM VALUE`, there for tests).
fn sentinel_debug(sentinel: &RedisServer, param: &str, millis: u64) {
    let value = millis.to_string();
    let reply = sentinel.cmd(&["SENTINEL", "DEBUG", param, &value]);
    assert_eq!(reply, "OK", "SENTINEL DEBUG {param} {value}");
}

/// Starts the Sentinels on ports picked together, each with a config naming the others;
/// starts them all again on fresh ports if one was taken.
fn start_sentinels(
    config: &SentinelConfig,
    master_port: u16,
    replica_port: u16,
) -> Vec<RedisServer> {
    let mut clashes = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let mut ports: Vec<u16> = Vec::with_capacity(config.sentinels);
        while ports.len() < config.sentinels {
            let port = free_port();
            if !ports.contains(&port) && port != master_port && port != replica_port {
                ports.push(port);
            }
        }
        let ids: Vec<String> = ports.iter().map(|_| sentinel_id()).collect();
        let started = start_all(config.sentinels, {
            let next = AtomicU64::new(0);
            let ports = &ports;
            let ids = &ids;
            move || {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                RedisServer::try_start_with(ServerConfig {
                    sentinel_conf: Some(sentinel_conf(
                        config,
                        (ports[i], &ids[i]),
                        master_port,
                        replica_port,
                        ports
                            .iter()
                            .copied()
                            .zip(ids.iter())
                            .filter(|&(port, _)| port != ports[i]),
                    )),
                    tls: config.tls.clone(),
                    port: Some(ports[i]),
                    ..ServerConfig::default()
                })
            }
        });
        let mut sentinels = Vec::with_capacity(config.sentinels);
        let mut taken = false;
        for result in started {
            match result {
                Ok(sentinel) => sentinels.push(sentinel),
                Err(PortsTaken(ports)) => {
                    taken = true;
                    clashes.extend(ports);
                }
            }
        }
        if !taken {
            return sentinels;
        }
        // Dropping `sentinels` kills those that did start.
    }
    panic!("the Sentinels could not bind free ports; ports taken before they could bind them: {clashes:?}");
}

/// One Sentinel's `sentinel.conf`: everything it would otherwise learn over seconds.
fn sentinel_conf<'a>(
    config: &SentinelConfig,
    (port, id): (u16, &str),
    master_port: u16,
    replica_port: u16,
    others: impl Iterator<Item = (u16, &'a String)>,
) -> String {
    let name = &config.master_name;
    let mut conf = format!(
        "sentinel myid {id}\n\
         sentinel resolve-hostnames no\n\
         sentinel announce-hostnames no\n\
         sentinel announce-ip 127.0.0.1\n\
         sentinel announce-port {port}\n\
         sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
         sentinel down-after-milliseconds {name} 500\n\
         sentinel failover-timeout {name} 2000\n\
         sentinel parallel-syncs {name} 1\n\
         sentinel config-epoch {name} 0\n\
         sentinel leader-epoch {name} 0\n\
         sentinel known-replica {name} 127.0.0.1 {replica_port}\n",
        quorum = config.quorum,
    );
    if let Some(password) = &config.password {
        let _ = writeln!(conf, "sentinel auth-pass {name} {password}");
    }
    for (other_port, other_id) in others {
        let _ = writeln!(
            conf,
            "sentinel known-sentinel {name} 127.0.0.1 {other_port} {other_id}"
        );
    }
    conf.push_str("sentinel current-epoch 0\n");
    conf
}

/// A Sentinel id no other Sentinel in this process (nor, very likely, another process) has:
/// 40 hex digits.
fn sentinel_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    format!(
        "{:016x}{:08x}{nanos:08x}{n:08x}",
        0x6865_7264_6c6f_636b_u64,
        std::process::id()
    )
}

/// The value of `field` in `INFO section` of `server`, or "" if missing.
fn info_field(server: &RedisServer, section: &str, field: &str) -> String {
    let prefix = format!("{field}:");
    server
        .cmd(&["INFO", section])
        .lines()
        .find_map(|line| line.trim_end().strip_prefix(&prefix).map(str::to_owned))
        .unwrap_or_default()
}

/// A flat `key value key value …` reply (one element per line, as `redis-cli` prints a map
/// such as `SENTINEL MASTER`'s) as a map.
fn fields(reply: &str) -> HashMap<String, String> {
    let lines: Vec<&str> = reply.lines().collect();
    lines
        .chunks(2)
        .filter(|pair| pair.len() == 2)
        .map(|pair| (pair[0].to_owned(), pair[1].to_owned()))
        .collect()
}

/// A list of such maps (`SENTINEL REPLICAS`, `SENTINEL SENTINELS`), which `redis-cli`
/// prints flattened: a new entry starts at each `name` key.
fn entries(reply: &str) -> Vec<HashMap<String, String>> {
    let lines: Vec<&str> = reply.lines().collect();
    let mut out: Vec<HashMap<String, String>> = Vec::new();
    for pair in lines.chunks(2).filter(|pair| pair.len() == 2) {
        if pair[0] == "name" || out.is_empty() {
            out.push(HashMap::new());
        }
        if let Some(entry) = out.last_mut() {
            entry.insert(pair[0].to_owned(), pair[1].to_owned());
        }
    }
    out
}
