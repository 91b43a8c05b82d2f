//! A Redis Cluster for the tests: by default 3 masters and 3 replicas on free loopback ports,
//! each node a [`RedisServer`] in cluster mode ([`ServerConfig::cluster`]) with its own dir,
//! `nodes.conf`, log and watchdog, formed with `redis-cli --cluster create`.
//!
//! [`RedisCluster::start`] returns once every node says `cluster_state:ok`, every slot is
//! served, every node sees the same slot owners and every replica's link to its master is up
//! (about 2 s). Dropping the cluster kills every node; if the test process dies first, each
//! node's watchdog does.
//!
//! Faults and changes, each returning once the cluster is stable again:
//! [`RedisCluster::kill_master_and_wait_failover`] (`kill -9` of a master, its replica takes
//! over), [`RedisCluster::migrate_slot`] (`CLUSTER SETSLOT … IMPORTING/MIGRATING`, `MIGRATE`,
//! `SETSLOT … NODE`; the three steps are public too), [`RedisCluster::restart_node`].
//!
//! The topology comes from `CLUSTER NODES`; a node's own line is the truth about its role and
//! the slots it serves. Keys are listed with `redis-cli`, so a key containing a newline cannot
//! be migrated by this harness.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::server::{RedisServer, ServerConfig};
use crate::tls::Tls;

/// How many hash slots a Redis Cluster has.
pub const SLOTS: u16 = 16_384;

/// How long a new cluster may take to be ready, and a change (migration, restart) to settle.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a replica may take to replace a killed master (measured: about 2.5 s).
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);

/// The pause between two looks at the cluster while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How a cluster is built. `ClusterConfig::default()`: 3 masters, 1 replica each, no
/// password, plain TCP.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How many masters share the slots (at least 3: `redis-cli --cluster create` wants 3).
    pub masters: usize,
    /// How many replicas each master has.
    pub replicas_per_master: usize,
    /// `--requirepass` (and `--masterauth`) on every node.
    pub password: Option<String>,
    /// TLS on every node, the cluster bus and replication included.
    pub tls: Option<Tls>,
    /// More `redis-server` arguments for every node.
    pub extra_args: Vec<String>,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            masters: 3,
            replicas_per_master: 1,
            password: None,
            tls: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running Redis Cluster; dropping it kills every node.
///
/// Nodes are addressed by index (`0..len()`), in start order; an index keeps naming the same
/// node (port, dir, node id) whatever its role becomes.
#[derive(Debug)]
pub struct RedisCluster {
    /// Every node, stopped ones included.
    nodes: Vec<RedisServer>,
    /// Each node's cluster node id (`CLUSTER MYID`), by index.
    ids: Vec<String>,
    /// `--requirepass` of every node, for `MIGRATE … AUTH`.
    password: Option<String>,
    /// From the first spawn to ready.
    started_in: Duration,
}

/// One node as a node sees it: a line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// The node id.
    pub id: String,
    /// The client port (0 for a node without an address yet).
    pub port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, `noaddr`, …
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Whether the cluster bus link to it is up (`connected`).
    pub connected: bool,
    /// The slots it serves, as inclusive ranges (importing/migrating markers left out).
    pub slots: Vec<(u16, u16)>,
}

impl NodeEntry {
    /// Parses one line of `CLUSTER NODES`.
    fn parse(line: &str) -> Option<NodeEntry> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return None;
        }
        let address = fields[1].split('@').next()?;
        let port = address.rsplit_once(':')?.1.parse().ok()?;
        let slots = fields[8..]
            .iter()
            .filter(|slot| !slot.starts_with('['))
            .filter_map(|slot| {
                let (start, end) = slot.split_once('-').unwrap_or((slot, slot));
                Some((start.parse().ok()?, end.parse().ok()?))
            })
            .collect();
        Some(NodeEntry {
            id: fields[0].to_owned(),
            port,
            flags: fields[2].split(',').map(str::to_owned).collect(),
            master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
            connected: fields[7] == "connected",
            slots,
        })
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Whether it is a master (flag `master`).
    pub fn is_master(&self) -> bool {
        self.has_flag("master")
    }

    /// Whether it is marked failing (`fail` or `fail?`).
    pub fn is_failing(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?")
    }

    /// Whether it serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(start, end)| start <= slot && slot <= end)
    }
}

/// What [`RedisCluster::kill_master_and_wait_failover`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    /// The index of the replica that took over the killed master's slots.
    pub promoted: usize,
    /// From the kill until the replica said it is a master serving those slots.
    pub promoted_after: Duration,
    /// From the kill until every live node agreed and said `cluster_state:ok`.
    pub stable_after: Duration,
}

/// A master [`RedisCluster::kill_master`] killed, for [`RedisCluster::wait_failover`].
#[derive(Debug, Clone)]
pub struct KilledMaster {
    /// Its index.
    pub index: usize,
    /// The slots it served.
    pub slots: Vec<(u16, u16)>,
    /// Its replicas when it died.
    pub replicas: Vec<usize>,
    /// When it was killed.
    pub at: Instant,
}

/// A slot on its way from one master to another: from [`RedisCluster::begin_slot_migration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMigration {
    /// The slot.
    pub slot: u16,
    /// The index of the master it leaves.
    pub from: usize,
    /// The index of the master it goes to.
    pub to: usize,
}

impl RedisCluster {
    /// Starts 3 masters and 3 replicas and waits until the cluster is ready.
    ///
    /// # Panics
    ///
    /// If a node cannot be started or the cluster is not ready within 30 s; the message says
    /// what was missing.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(ClusterConfig::default())
    }

    /// Starts a cluster as `config` says and waits until it is ready.
    ///
    /// # Panics
    ///
    /// Like [`RedisCluster::start`].
    pub fn start_with(config: ClusterConfig) -> RedisCluster {
        assert!(
            config.masters >= 3,
            "redis-cli --cluster create needs at least 3 masters"
        );
        let started = Instant::now();
        let count = config.masters * (1 + config.replicas_per_master);
        let mut extra_args = config.extra_args.clone();
        if let Some(password) = &config.password {
            extra_args.extend(["--masterauth".to_owned(), password.clone()]);
        }
        let server_config = ServerConfig {
            password: config.password.clone(),
            extra_args,
            cluster: true,
            tls: config.tls.clone(),
            ..ServerConfig::default()
        };
        let nodes = start_all(count, || RedisServer::start_with(server_config.clone()));
        let mut cluster = RedisCluster {
            ids: Vec::new(),
            nodes,
            password: config.password,
            started_in: Duration::ZERO,
        };

        let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|node| format!("127.0.0.1:{}", node.port())),
        );
        args.extend([
            "--cluster-replicas".to_owned(),
            config.replicas_per_master.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = cluster.nodes[0]
            .cli_command(&args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs: it started the nodes' readiness checks");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed with {}: {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.ids = cluster
            .nodes
            .iter()
            .map(|node| node.cmd(&["CLUSTER", "MYID"]))
            .collect();
        cluster.wait_stable(READY_TIMEOUT);
        cluster.started_in = started.elapsed();
        cluster
    }

    /// How long [`RedisCluster::start_with`] took, from the first spawn to ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// How many nodes the cluster has, stopped ones included (a cluster is never empty).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `index`.
    pub fn node(&self, index: usize) -> &RedisServer {
        &self.nodes[index]
    }

    /// Node `index`, to stop or restart it by hand (then call [`RedisCluster::wait_stable`]).
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }

    /// Node `index`'s cluster node id.
    pub fn node_id(&self, index: usize) -> &str {
        &self.ids[index]
    }

    /// The index of the node listening on `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|node| node.port() == port)
    }

    /// Whether node `index` runs (it has not been killed).
    pub fn is_alive(&self, index: usize) -> bool {
        self.nodes[index].pid().is_some()
    }

    /// The indexes of the running nodes.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.is_alive(i))
            .collect()
    }

    /// The URL of every running node (`redis://127.0.0.1:PORT/`, with the password, or
    /// `rediss://`): what a cluster client is given as its initial nodes.
    pub fn urls(&self) -> Vec<String> {
        self.live()
            .into_iter()
            .map(|i| self.nodes[i].url())
            .collect()
    }

    /// Creates the ACL user `user` on every running node (ACLs are per node, not replicated)
    /// with [`RedisServer::acl_user`], and returns its URL for every running node.
    ///
    /// # Panics
    ///
    /// If a node rejects a rule.
    pub fn acl_user(&self, user: &str, password: &str, rules: &[&str]) -> Vec<String> {
        self.live()
            .into_iter()
            .map(|i| self.nodes[i].acl_user(user, password, rules))
            .collect()
    }

    /// Runs a command with `redis-cli -c` (following `MOVED` and `ASK` redirects) through the
    /// first running node, and returns its output like [`RedisServer::cmd`].
    ///
    /// # Panics
    ///
    /// If no node runs, or like [`RedisServer::cmd`].
    pub fn cmd(&self, args: &[&str]) -> String {
        let entry = *self
            .live()
            .first()
            .expect("a running node to send the command to");
        let mut with_redirects = vec!["-c"];
        with_redirects.extend_from_slice(args);
        self.nodes[entry].cmd(&with_redirects)
    }

    /// Node `index`'s `CLUSTER NODES`: the whole cluster as that node sees it.
    ///
    /// # Panics
    ///
    /// If the node is stopped, or a line does not parse.
    pub fn view(&self, index: usize) -> Vec<NodeEntry> {
        self.nodes[index]
            .cmd(&["CLUSTER", "NODES"])
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                NodeEntry::parse(line).unwrap_or_else(|| panic!("bad CLUSTER NODES line {line:?}"))
            })
            .collect()
    }

    /// Node `index` as it sees itself: its role and the slots it serves.
    ///
    /// # Panics
    ///
    /// If the node is stopped.
    pub fn own_entry(&self, index: usize) -> NodeEntry {
        self.view(index)
            .into_iter()
            .find(|entry| entry.has_flag("myself"))
            .expect("CLUSTER NODES has a `myself` line")
    }

    /// The running masters, by their own account.
    pub fn masters(&self) -> Vec<usize> {
        self.live()
            .into_iter()
            .filter(|&i| self.own_entry(i).is_master())
            .collect()
    }

    /// The running replicas, by their own account.
    pub fn replicas(&self) -> Vec<usize> {
        self.live()
            .into_iter()
            .filter(|&i| !self.own_entry(i).is_master())
            .collect()
    }

    /// The running replicas of master `index`.
    pub fn replicas_of(&self, index: usize) -> Vec<usize> {
        let id = self.node_id(index);
        self.live()
            .into_iter()
            .filter(|&i| self.own_entry(i).master_id.as_deref() == Some(id))
            .collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    ///
    /// # Panics
    ///
    /// If no node runs.
    pub fn keyslot(&self, key: &str) -> u16 {
        let entry = *self.live().first().expect("a running node");
        let reply = self.nodes[entry].cmd(&["CLUSTER", "KEYSLOT", key]);
        reply
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key:?} answered {reply:?}"))
    }

    /// The running master that serves `slot`, by its own account, if one does.
    pub fn slot_owner(&self, slot: u16) -> Option<usize> {
        self.live().into_iter().find(|&i| {
            let own = self.own_entry(i);
            own.is_master() && own.serves(slot)
        })
    }

    /// The running master that serves `key`'s slot.
    ///
    /// # Panics
    ///
    /// If no running master serves it (say, between a kill and the failover).
    pub fn master_of_key(&self, key: &str) -> usize {
        let slot = self.keyslot(key);
        self.slot_owner(slot)
            .unwrap_or_else(|| panic!("no running master serves slot {slot} (key {key:?})"))
    }

    /// How many clients node `index` has subscribed to the shard channel `channel`
    /// (`PUBSUB SHARDNUMSUB`).
    ///
    /// # Panics
    ///
    /// If the node is stopped.
    pub fn shard_numsub(&self, index: usize, channel: &str) -> u64 {
        let reply = self.nodes[index].cmd(&["PUBSUB", "SHARDNUMSUB", channel]);
        reply
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("PUBSUB SHARDNUMSUB {channel:?} answered {reply:?}"))
    }

    /// `(index, PUBSUB SHARDNUMSUB channel)` for every running node: where a sharded
    /// subscription lives (the owning master, or one of its replicas).
    pub fn shard_subscribers(&self, channel: &str) -> Vec<(usize, u64)> {
        self.live()
            .into_iter()
            .map(|i| (i, self.shard_numsub(i, channel)))
            .collect()
    }

    /// Calls each running node has counted for `commands` ([`RedisServer::command_calls`]),
    /// as `(index, calls)`: for instance how many `SPUBLISH` each shard ran (commands run by
    /// scripts count too).
    pub fn command_calls(&self, commands: &[&str]) -> Vec<(usize, u64)> {
        self.live()
            .into_iter()
            .map(|i| (i, self.nodes[i].command_calls(commands)))
            .collect()
    }

    /// Kills master `index` with SIGKILL and waits until one of its replicas serves its slots
    /// and the cluster is stable again: [`RedisCluster::kill_master`], then
    /// [`RedisCluster::wait_failover`].
    ///
    /// # Panics
    ///
    /// Like those.
    pub fn kill_master_and_wait_failover(&mut self, index: usize) -> Failover {
        let killed = self.kill_master(index);
        self.wait_failover(&killed)
    }

    /// Kills master `index` with SIGKILL and returns at once, with what
    /// [`RedisCluster::wait_failover`] needs: for a test that acts between the kill and the
    /// promotion.
    ///
    /// # Panics
    ///
    /// If `index` is not a running master with a replica.
    pub fn kill_master(&mut self, index: usize) -> KilledMaster {
        let own = self.own_entry(index);
        assert!(own.is_master(), "node {index} is not a master: {own:?}");
        let replicas = self.replicas_of(index);
        assert!(
            !replicas.is_empty(),
            "master {index} has no replica to take over"
        );
        self.nodes[index].stop();
        KilledMaster {
            index,
            slots: own.slots,
            replicas,
            at: Instant::now(),
        }
    }

    /// Waits until a replica of the killed master serves its slots, then until the cluster is
    /// stable (see [`RedisCluster::wait_stable`]).
    ///
    /// # Panics
    ///
    /// If that does not happen within [`FAILOVER_TIMEOUT`] of the kill.
    pub fn wait_failover(&self, killed: &KilledMaster) -> Failover {
        let deadline = killed.at + FAILOVER_TIMEOUT;
        let promoted = loop {
            let promoted = killed.replicas.iter().copied().find(|&r| {
                let entry = self.own_entry(r);
                entry.is_master() && entry.slots == killed.slots
            });
            if let Some(promoted) = promoted {
                break promoted;
            }
            assert!(
                Instant::now() < deadline,
                "no replica of node {} ({:?}) took over its slots within {FAILOVER_TIMEOUT:?}; views:\n{}",
                killed.index,
                killed.replicas,
                self.describe()
            );
            std::thread::sleep(POLL_INTERVAL);
        };
        let promoted_after = killed.at.elapsed();
        self.wait_stable(deadline.saturating_duration_since(Instant::now()));
        Failover {
            promoted,
            promoted_after,
            stable_after: killed.at.elapsed(),
        }
    }

    /// Restarts node `index` (empty: there is no persistence) on its port and dir; it keeps
    /// its node id and rejoins (a killed master comes back as a replica of the node that
    /// took over). Waits until the cluster is stable.
    ///
    /// # Panics
    ///
    /// If the node does not come back or the cluster does not settle within 30 s.
    pub fn restart_node(&mut self, index: usize) {
        self.nodes[index].restart();
        self.wait_stable(READY_TIMEOUT);
    }

    /// Moves `slot` to master `to` with its keys, and waits until every node agrees:
    /// [`RedisCluster::begin_slot_migration`], [`RedisCluster::move_slot_keys`],
    /// [`RedisCluster::finish_slot_migration`].
    ///
    /// # Panics
    ///
    /// Like those.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let migration = self.begin_slot_migration(slot, to);
        self.move_slot_keys(migration);
        self.finish_slot_migration(migration);
    }

    /// Marks `slot` importing on master `to` and migrating on the master that serves it: from
    /// now on that master answers `ASK` for the slot's keys it no longer has.
    ///
    /// # Panics
    ///
    /// If no running master serves `slot`, `to` serves it already or is not a master, or a
    /// node refuses.
    pub fn begin_slot_migration(&self, slot: u16, to: usize) -> SlotMigration {
        let from = self
            .slot_owner(slot)
            .unwrap_or_else(|| panic!("no running master serves slot {slot}"));
        assert_ne!(from, to, "node {to} serves slot {slot} already");
        assert!(self.own_entry(to).is_master(), "node {to} is not a master");
        let slot_arg = slot.to_string();
        let reply = self.nodes[to].cmd(&[
            "CLUSTER",
            "SETSLOT",
            &slot_arg,
            "IMPORTING",
            self.node_id(from),
        ]);
        assert_eq!(reply, "OK", "SETSLOT {slot} IMPORTING on node {to}");
        let reply = self.nodes[from].cmd(&[
            "CLUSTER",
            "SETSLOT",
            &slot_arg,
            "MIGRATING",
            self.node_id(to),
        ]);
        assert_eq!(reply, "OK", "SETSLOT {slot} MIGRATING on node {from}");
        SlotMigration { slot, from, to }
    }

    /// Moves every key of the migrating slot (`CLUSTER GETKEYSINSLOT`, then `MIGRATE … KEYS`
    /// in batches of 100) to the importing master. Keys written meanwhile go to the importing
    /// master (`ASK`); call it again to move stragglers.
    ///
    /// # Panics
    ///
    /// If `MIGRATE` fails.
    pub fn move_slot_keys(&self, migration: SlotMigration) {
        let source = &self.nodes[migration.from];
        let target_port = self.nodes[migration.to].port().to_string();
        let slot_arg = migration.slot.to_string();
        loop {
            let listed = source.cmd(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            let keys: Vec<&str> = listed.lines().filter(|key| !key.is_empty()).collect();
            if keys.is_empty() {
                return;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &target_port, "", "0", "5000"];
            if let Some(password) = &self.password {
                args.extend(["AUTH", password]);
            }
            args.push("KEYS");
            args.extend(&keys);
            let reply = source.cmd(&args);
            assert!(
                reply == "OK" || reply == "NOKEY",
                "MIGRATE of slot {} from node {} to node {}: {reply}",
                migration.slot,
                migration.from,
                migration.to
            );
        }
    }

    /// Gives the slot to the importing master (`CLUSTER SETSLOT slot NODE id` on it, on the
    /// old owner, then on every other running master) and waits until every node agrees.
    /// The old owner then sends its sharded subscribers of the slot's channels an unrequested
    /// `SUNSUBSCRIBE`.
    ///
    /// # Panics
    ///
    /// If a node refuses, or the cluster does not settle within 30 s.
    pub fn finish_slot_migration(&self, migration: SlotMigration) {
        let slot_arg = migration.slot.to_string();
        let target_id = self.node_id(migration.to).to_owned();
        let mut order = vec![migration.to, migration.from];
        order.extend(
            self.masters()
                .into_iter()
                .filter(|&i| i != migration.to && i != migration.from),
        );
        for i in order {
            let reply = self.nodes[i].cmd(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &target_id]);
            assert_eq!(reply, "OK", "SETSLOT {} NODE on node {i}", migration.slot);
        }
        self.wait_stable(READY_TIMEOUT);
    }

    /// Waits until the cluster is stable: every running node says `cluster_state:ok` and
    /// serves-or-routes all 16384 slots, sees every other running node connected and not
    /// failing, and agrees with every other on which master serves which slot (each master's
    /// own account included); every running replica's link to its master is up.
    ///
    /// # Panics
    ///
    /// If that does not happen within `timeout`; the message says what was missing.
    pub fn wait_stable(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let Err(why) = self.check_stable() else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "the cluster is not stable after {timeout:?}: {why}; views:\n{}",
                self.describe()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Why the cluster is not stable yet, if it is not.
    fn check_stable(&self) -> Result<(), String> {
        let live = self.live();
        for &i in &live {
            let info = self.nodes[i].cmd(&["CLUSTER", "INFO"]);
            for want in ["cluster_state:ok", "cluster_slots_ok:16384"] {
                if !info.lines().any(|line| line.trim_end() == want) {
                    return Err(format!("node {i} lacks {want}"));
                }
            }
        }
        let live_ports: Vec<u16> = live.iter().map(|&i| self.nodes[i].port()).collect();
        let mut agreed: Option<BTreeMap<u16, String>> = None;
        for &i in &live {
            let view = self.view(i);
            for &port in &live_ports {
                let Some(entry) = view.iter().find(|entry| entry.port == port) else {
                    return Err(format!("node {i} does not know port {port}"));
                };
                if entry.is_failing()
                    || entry.has_flag("handshake")
                    || entry.has_flag("noaddr")
                    || !entry.connected
                {
                    return Err(format!("node {i} sees port {port} as {entry:?}"));
                }
            }
            let own = view
                .iter()
                .find(|entry| entry.has_flag("myself"))
                .ok_or_else(|| format!("node {i} has no myself line"))?;
            if !own.is_master() {
                let replication = self.nodes[i].cmd(&["INFO", "replication"]);
                if !replication
                    .lines()
                    .any(|line| line.trim_end() == "master_link_status:up")
                {
                    return Err(format!("replica {i}'s link to its master is down"));
                }
            }
            // Slot start -> owner id, from the masters this node does not see failing.
            let mut owners = BTreeMap::new();
            for entry in view
                .iter()
                .filter(|entry| entry.is_master() && !entry.is_failing())
            {
                for &(start, end) in &entry.slots {
                    owners.insert(start, format!("{}-{end}", entry.id));
                }
            }
            match &agreed {
                None => agreed = Some(owners),
                Some(first) if *first != owners => {
                    return Err(format!(
                        "node {i} disagrees with node {} on slot owners",
                        live[0]
                    ))
                }
                Some(_) => {}
            }
        }
        // And every master's own account matches the common view.
        if let Some(agreed) = &agreed {
            for &i in &live {
                let own = self.own_entry(i);
                if !own.is_master() {
                    continue;
                }
                for &(start, end) in &own.slots {
                    if agreed.get(&start) != Some(&format!("{}-{end}", own.id)) {
                        return Err(format!(
                            "master {i} serves {start}-{end}, the others do not know yet"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every running node's `CLUSTER NODES`, for failure messages.
    fn describe(&self) -> String {
        self.live()
            .into_iter()
            .map(|i| {
                format!(
                    "node {i} (port {}):\n{}",
                    self.nodes[i].port(),
                    self.nodes[i].cmd(&["CLUSTER", "NODES"])
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The cluster shared by every test in this test binary, started on first use: for
/// behaviour tests that keep apart with [`unique_prefix`](crate::server::unique_prefix)
/// and never break it. Tests that kill, restart or migrate start their own. The nodes are
/// killed when the test binary exits (their watchdogs do it).
///
/// # Panics
///
/// If the cluster cannot be started, or in a worker process.
pub fn shared() -> &'static RedisCluster {
    static SHARED: OnceLock<RedisCluster> = OnceLock::new();
    assert!(
        crate::procs::worker_role().is_none(),
        "a worker process must not start its own shared cluster: pass the parent's `urls()` as a worker param"
    );
    SHARED.get_or_init(RedisCluster::start)
}

/// Runs `start` `count` times on as many threads and returns the results in order. A panic
/// in one is re-raised once all have finished (the others' servers are dropped, so killed).
pub fn start_all<T: Send>(count: usize, start: impl Fn() -> T + Sync) -> Vec<T> {
    let results: Vec<std::thread::Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count).map(|_| scope.spawn(&start)).collect();
        handles
            .into_iter()
            .map(std::thread::ScopedJoinHandle::join)
            .collect()
    });
    let mut started = Vec::with_capacity(count);
    for result in results {
        match result {
            Ok(value) => started.push(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    started
}
