//! Load generator: herdlock against a raw redis-rs baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p herdlock-loadgen -- [--quick] [--cycles N] [--cluster] [workload ...]
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --release -p herdlock-loadgen -- once-cycles
//! ```
//!
//! Workloads (all five when none is named):
//!
//! - `once-cycles`: `try_lock` + `release` of distinct keys, 50 in flight, one process;
//!   baseline: `SET k tok NX PX ttl` + `EVALSHA` compare-and-delete on one multiplexed
//!   connection, same concurrency; fenced floor: the same with the least a fenced lock
//!   does (`SET NX PX` + `INCR` fence in one script). Segments alternate to cancel drift.
//! - `fanout-herd`: 1,000 callers over 4 processes on one key, a 50 ms job, 20 rounds;
//!   runs per round, end-to-end time per round and follower notification latency;
//!   baseline: raw `PUBLISH` → subscriber delivery to the same processes.
//! - `fanout-throughput`: 10,000 job ids, each requested by 4 processes, in waves of 256
//!   ids that every process requests at once; a 0 ms job that notes its start and end
//!   (overlaps are found from those, across processes); jobs/s, timeouts, overlapping
//!   runs, and every run after an id's first split into *misses* (its caller called
//!   before the previous run of the id finished) and *late re-runs* (it called after);
//!   baseline: the same 4 processes doing `SET NX` on the same ids.
//! - `semaphore-handoff`: one permit, 25 clients in each of 4 processes, 20 holds each
//!   (2,000 holds), 0 ms hold; unfair and fair; holds/s and wait from calling `acquire` to
//!   holding the permit; baseline: the same clients on a raw `SET NX PX` mutex retried every
//!   1 ms, released by `EVALSHA` compare-and-delete. Sides alternate ABBA over two halves.
//! - `multi-cycles`: `try_multi` + `release` of distinct 3-key sets, 50 in flight, one
//!   process; baseline: one `EVALSHA` taking all 3 keys with `SET NX PX` or none (checked
//!   with `EXISTS` first), then one owner-checked 3-key delete. ABBA segments as above.
//!
//! `--cluster` then runs `once-cycles` and `fanout-throughput` again on a private Redis
//! Cluster (3 masters + 3 replicas on free loopback ports, formed with `redis-cli --cluster
//! create`): herds connect with `connect_cluster`, the raw baselines with
//! `redis::cluster_async`, and Redis commands and CPU are summed over the 3 masters. Each
//! cluster report carries `"deployment": "cluster-3x3"`, the same run's standalone headline
//! figures (`standalone_same_run`) and a note: on a 2-core machine it measures the cluster's
//! overhead, not its speed-up. Without workloads named, `--cluster` runs just those two.
//!
//! Each workload prints one JSON object on stdout; progress goes to stderr. Without
//! `REDIS_URL` a private `redis-server` is started on a free loopback port and killed at
//! exit. `--quick` scales every count down 10× for a smoke run.
//!
//! Multi-process workloads re-execute this binary with a hidden `--worker` mode. The
//! parent and its workers talk in lines: a worker says `ready`, the parent says `go` to
//! all of them at once, and each worker answers with one JSON line of measurements.

mod raw;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use herdlock::{FanoutOptions, Herd, Role, SemaphoreOptions, TryLock, TryMulti};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines, Stdin};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;

use herdlock_testkit::{RedisCluster, RedisServer};
use raw::{set_nx, COMPARE_AND_DELETE, RAW_TTL_MS};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Worker processes of the multi-process workloads.
const PROCESSES: usize = 4;
/// Concurrency of `once-cycles` (both sides).
const CYCLE_IN_FLIGHT: usize = 50;
/// ABBA segments per side in `once-cycles`.
const CYCLE_SEGMENTS: u64 = 4;
/// Per-process concurrency of `fanout-throughput` (both sides).
const TPUT_IN_FLIGHT: usize = 256;
/// The `fanout-herd` job's duration.
const HERD_JOB: Duration = Duration::from_millis(50);
/// Every fan-out caller's own timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Every fan-out run's lease.
const RUN_TTL: Duration = Duration::from_secs(5);
/// Upper bound on one measured loop; a loop that hits it stops and says so.
const PHASE_BUDGET: Duration = Duration::from_secs(50);
/// How long the parent waits for any one line from a worker.
const WORKER_LINE_TIMEOUT: Duration = Duration::from_secs(90);
/// The `once-cycles` fenced floor's acquire: the least a fenced lock must do in Redis
/// (`SET NX PX`, then `INCR` the fence on success); 0 when busy, else the fence.
const FENCED_SET_NX: &str = "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) \
    then return redis.call('INCR', KEYS[2]) end return 0";
/// Keys per `multi-cycles` cycle (both sides).
const MULTI_KEYS: usize = 3;
/// The `multi-cycles` baseline's all-or-none acquire: 1 when every key was set, else 0.
const MULTI_SET_NX: &str = "for i = 1, #KEYS do \
    if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end end \
    for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) end return 1";
/// The `multi-cycles` baseline's owner-checked delete: how many keys it deleted.
const MULTI_COMPARE_AND_DELETE: &str = "local n = 0 for i = 1, #KEYS do \
    if redis.call('GET', KEYS[i]) == ARGV[1] then n = n + redis.call('DEL', KEYS[i]) end end \
    return n";
/// Clients per process in `semaphore-handoff` (both sides).
const HANDOFF_CLIENTS: usize = 25;
/// How long a `semaphore-handoff` client waits for one hold before it counts a timeout.
const HANDOFF_WAIT: Duration = Duration::from_secs(20);
/// The raw mutex baseline's pause between `SET NX` attempts.
const RAW_RETRY: Duration = Duration::from_millis(1);
/// `semaphore-handoff` target: at least this many holds per second (both modes).
const HANDOFF_TARGET_HOLDS_S: f64 = 2_000.0;
/// `semaphore-handoff` target: fair mode's wait p99 under this.
const HANDOFF_TARGET_FAIR_P99: Duration = Duration::from_millis(100);

fn main() -> Res<()> {
    let args = Args::parse(std::env::args().skip(1))?;
    match args.worker {
        // A worker is one of several processes sharing the machine's cores: one thread
        // each (as a service instance per core would run), for herdlock and the baseline
        // alike. The parent runs one-process workloads on all cores.
        Some(worker) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(worker_main(worker)),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(parent_main(&args)),
    }
}

// ---------------------------------------------------------------------------------------
// Command line

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    OnceCycles,
    FanoutHerd,
    FanoutThroughput,
    SemaphoreHandoff,
    MultiCycles,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::OnceCycles,
        Workload::FanoutHerd,
        Workload::FanoutThroughput,
        Workload::SemaphoreHandoff,
        Workload::MultiCycles,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::OnceCycles => "once-cycles",
            Workload::FanoutHerd => "fanout-herd",
            Workload::FanoutThroughput => "fanout-throughput",
            Workload::SemaphoreHandoff => "semaphore-handoff",
            Workload::MultiCycles => "multi-cycles",
        }
    }

    fn parse(name: &str) -> Res<Workload> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == name)
            .ok_or_else(|| format!("unknown workload `{name}` (try --help)").into())
    }
}

#[derive(Debug, Default)]
struct Args {
    workloads: Vec<Workload>,
    quick: bool,
    cycles: Option<u64>,
    /// `--cluster`: also run the cluster-capable workloads on a 3+3 Redis Cluster.
    cluster: bool,
    worker: Option<WorkerArgs>,
}

/// The hidden `--worker <workload> --url <url> --prefix <p> --index <i>` mode (`<url>` is a
/// comma-separated list of node URLs for a cluster).
#[derive(Debug)]
struct WorkerArgs {
    url: String,
    prefix: String,
    index: usize,
}

const USAGE: &str =
    "usage: loadgen [--quick] [--cycles N] [--cluster] [once-cycles] [fanout-herd] \
[fanout-throughput] [semaphore-handoff] [multi-cycles]
  --quick       scale every count down 10x (smoke run)
  --cluster     after the standalone runs, run once-cycles and fanout-throughput again on a
                private 3-master + 3-replica Redis Cluster (the default workloads become
                those two)
  --cycles N    once-cycles: cycles per side (default 200000)
  REDIS_URL     use this Redis instead of starting a private redis-server";

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Res<Args> {
        let mut parsed = Args::default();
        let (mut worker, mut url, mut prefix, mut index) = (false, None, None, None);
        let mut args = args;
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
            match arg.as_str() {
                "--quick" => parsed.quick = true,
                "--cluster" => parsed.cluster = true,
                "--cycles" => parsed.cycles = Some(value("--cycles")?.parse()?),
                "--worker" => {
                    Workload::parse(&value("--worker")?)?;
                    worker = true;
                }
                "--url" => url = Some(value("--url")?),
                "--prefix" => prefix = Some(value("--prefix")?),
                "--index" => index = Some(value("--index")?.parse()?),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                flag if flag.starts_with('-') => {
                    return Err(format!("unknown flag `{flag}`\n{USAGE}").into())
                }
                name => parsed.workloads.push(Workload::parse(name)?),
            }
        }
        if worker {
            parsed.worker = Some(WorkerArgs {
                url: url.ok_or("--worker needs --url")?,
                prefix: prefix.ok_or("--worker needs --prefix")?,
                index: index.ok_or("--worker needs --index")?,
            });
        }
        if parsed.workloads.is_empty() {
            parsed.workloads = if parsed.cluster {
                vec![Workload::OnceCycles, Workload::FanoutThroughput]
            } else {
                Workload::ALL.to_vec()
            };
        }
        if parsed.cycles == Some(0) {
            return Err("--cycles must be at least 1".into());
        }
        Ok(parsed)
    }
}

/// Counts, full size or `--quick` (10× smaller).
#[derive(Debug, Clone, Copy)]
struct Scale {
    cycles: u64,
    herd_callers: usize,
    herd_rounds: usize,
    tput_ids: usize,
    /// `semaphore-handoff`: holds per client per side.
    handoff_holds: usize,
    /// `multi-cycles`: cycles per side.
    multi_cycles: u64,
}

impl Scale {
    fn new(args: &Args) -> Scale {
        let div = if args.quick { 10 } else { 1 };
        Scale {
            cycles: args.cycles.unwrap_or(200_000 / div as u64),
            herd_callers: 1_000 / div,
            herd_rounds: 20 / div,
            tput_ids: 10_000 / div,
            handoff_holds: 20 / div,
            multi_cycles: 100_000 / div as u64,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parent

async fn parent_main(args: &Args) -> Res<()> {
    let scale = Scale::new(args);
    let external = std::env::var("REDIS_URL").ok();
    let server = match external {
        Some(_) => None,
        None => Some(RedisServer::try_start()?),
    };
    let url = match (&external, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => unreachable!("a server is started when REDIS_URL is unset"),
    };
    let prefix = run_prefix();
    eprintln!(
        "loadgen: redis at {url} ({}), key prefix {prefix}, {} cores",
        if external.is_some() {
            "REDIS_URL"
        } else {
            "private redis-server"
        },
        cores()
    );
    let work = async {
        let probes = [url.clone()];
        let mut standalone = BTreeMap::new();
        for workload in &args.workloads {
            eprintln!("loadgen: {} ...", workload.name());
            let prefix = format!("{prefix}{}", workload.name().replace('-', ""));
            let report = match workload {
                Workload::OnceCycles => once_cycles(&url, &probes, &prefix, scale).await?,
                Workload::FanoutHerd => fanout_herd(&url, &prefix, scale).await?,
                Workload::FanoutThroughput => {
                    fanout_throughput(&url, &probes, &prefix, scale).await?
                }
                Workload::SemaphoreHandoff => semaphore_handoff(&url, &prefix, scale).await?,
                Workload::MultiCycles => multi_cycles(&url, &probes, &prefix, scale).await?,
            };
            println!("{report}");
            standalone.insert(workload.name(), report);
        }
        if args.cluster {
            cluster_runs(args, scale, &prefix, &standalone).await?;
        }
        Ok::<(), BoxError>(())
    };
    let result = tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    if external.is_some() {
        if let Err(e) = cleanup(&url, &prefix).await {
            eprintln!("loadgen: cleaning up keys {prefix}* failed: {e}");
        }
    }
    drop(server); // kills the private redis-server (also on the error path above)
    result
}

/// What a 2-core machine can and cannot show about a cluster.
const CLUSTER_NOTE: &str = "3 masters + 3 replicas on one machine: on 2 cores the cluster's \
6 redis-server processes share the cores with the clients, so this measures the cluster's \
overhead (routing, per-shard connections, sharded pub/sub), not its speed-up; Redis commands \
and CPU are summed over the 3 masters (replicas not counted)";

/// `--cluster`: starts a private 3+3 cluster and runs the cluster-capable workloads on it,
/// each report next to the same run's standalone figures.
async fn cluster_runs(
    args: &Args,
    scale: Scale,
    prefix: &str,
    standalone: &BTreeMap<&str, Value>,
) -> Res<()> {
    eprintln!("loadgen: starting a 3-master + 3-replica Redis Cluster ...");
    let started = Instant::now();
    let cluster = tokio::task::block_in_place(RedisCluster::start);
    let urls = cluster.urls().join(",");
    let masters: Vec<String> = cluster
        .masters()
        .into_iter()
        .map(|index| cluster.node(index).url())
        .collect();
    eprintln!(
        "loadgen: cluster ready in {:.1} s, masters {masters:?}",
        started.elapsed().as_secs_f64()
    );
    for workload in &args.workloads {
        let prefix = format!("{prefix}c{}", workload.name().replace('-', ""));
        let mut report = match workload {
            Workload::OnceCycles => {
                eprintln!("loadgen: cluster {} ...", workload.name());
                once_cycles(&urls, &masters, &prefix, scale).await?
            }
            Workload::FanoutThroughput => {
                eprintln!("loadgen: cluster {} ...", workload.name());
                fanout_throughput(&urls, &masters, &prefix, scale).await?
            }
            other => {
                eprintln!("loadgen: {} runs standalone only", other.name());
                continue;
            }
        };
        report["deployment"] = json!("cluster-3x3");
        report["note"] = json!(CLUSTER_NOTE);
        report["masters"] = json!(masters.len());
        if let Some(base) = standalone.get(workload.name()) {
            report["standalone_same_run"] = headline(base);
        }
        println!("{report}");
    }
    drop(cluster); // kills every node
    Ok(())
}

/// A report's headline figures, to print next to another deployment's.
fn headline(report: &Value) -> Value {
    let pick = |side: &str, keys: &[&str]| -> Value {
        let mut out = serde_json::Map::new();
        for k in keys {
            if let Some(v) = report[side].get(*k) {
                out.insert((*k).to_owned(), v.clone());
            }
        }
        Value::Object(out)
    };
    let herd = [
        "jobs_per_s",
        "calls_per_s",
        "cycles_per_s",
        "misses",
        "late_reruns",
        "overlapping_runs",
        "timeouts",
        "errors",
        "redis_commands_per_job",
        "redis_cpu_us_per_job",
        "redis_commands_per_cycle",
        "redis_cpu_us_per_cycle",
    ];
    let base = [
        "ops_per_s",
        "cycles_per_s",
        "redis_commands_per_op",
        "redis_cpu_us_per_op",
        "redis_commands_per_cycle",
        "redis_cpu_us_per_cycle",
    ];
    json!({"herdlock": pick("herdlock", &herd), "baseline": pick("baseline", &base)})
}

/// A key prefix unique to this run, so runs against a shared Redis never collide.
fn run_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("lg{}x{nanos:x}", std::process::id())
}

/// The load generator runs on jemalloc, as a production service usually picks a modern
/// allocator. With glibc's malloc, short-lived allocations of 1-2 KiB (task cells, boxed
/// redis-rs request futures) take glibc's slow path and dominate the client's CPU for both
/// herdlock and the raw baselines. `--features system-allocator` measures on the system
/// allocator instead; every report names the allocator it ran on.
#[cfg(all(not(feature = "system-allocator"), not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(not(feature = "system-allocator"), not(target_env = "msvc")))]
const ALLOCATOR: &str = "jemalloc";
#[cfg(any(feature = "system-allocator", target_env = "msvc"))]
const ALLOCATOR: &str = "system";

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Deletes this run's keys from an external Redis.
async fn cleanup(url: &str, prefix: &str) -> Res<()> {
    let mut conn = single_connection(url).await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<i64>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

async fn single_connection(url: &str) -> Res<MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// The raw baselines' connection: one multiplexed connection to a standalone Redis, or a
/// `redis::cluster_async` connection when `url` lists several nodes (comma-separated).
#[derive(Clone)]
enum RawConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RawConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RawConn::Single(c) => c.req_packed_command(cmd),
            RawConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RawConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RawConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RawConn::Single(c) => c.get_db(),
            RawConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Node URLs when `url` is a comma-separated cluster list.
fn cluster_nodes(url: &str) -> Option<Vec<&str>> {
    url.contains(',').then(|| url.split(',').collect())
}

async fn raw_connection(url: &str) -> Res<RawConn> {
    Ok(match cluster_nodes(url) {
        Some(nodes) => RawConn::Cluster(
            redis::cluster::ClusterClient::new(nodes)?
                .get_async_connection()
                .await?,
        ),
        None => RawConn::Single(single_connection(url).await?),
    })
}

async fn connect_herd(url: &str, prefix: &str, owner: &str) -> Res<Herd> {
    let builder = Herd::builder().prefix(prefix).owner(owner);
    Ok(match cluster_nodes(url) {
        Some(nodes) => builder.connect_cluster(&nodes).await?,
        None => builder.connect(url).await?,
    })
}

/// One connection to each node whose `INFO commandstats` / `INFO cpu` a workload sums
/// (the standalone server, or every cluster master).
struct Probes(Vec<MultiplexedConnection>);

impl Probes {
    async fn connect(urls: &[String]) -> Res<Probes> {
        let mut conns = Vec::new();
        for url in urls {
            conns.push(single_connection(url).await?);
        }
        Ok(Probes(conns))
    }

    /// (Redis CPU, commands run) so far, summed over the nodes.
    async fn sample(&mut self) -> (Option<Duration>, Option<u64>) {
        let (mut cpu, mut calls) = (Some(Duration::ZERO), Some(0));
        for conn in &mut self.0 {
            let c = redis_calls(conn).await.map(|m| m.values().sum::<u64>());
            calls = calls.zip(c).map(|(a, b)| a + b);
            cpu = cpu.zip(redis_cpu(conn).await).map(|(a, b)| a + b);
        }
        (cpu, calls)
    }

    /// The commands one [`Probes::sample`] itself adds to the next one.
    fn own_calls(&self) -> u64 {
        2 * self.0.len() as u64
    }
}

// ---------------------------------------------------------------------------------------
// once-cycles

#[derive(Debug, Default, Clone, Copy)]
struct Segment {
    cycles: u64,
    elapsed: Duration,
    busy: u64,
    errors: u64,
    /// CPU time this process used (all threads), when `/proc` tells.
    client_cpu: Duration,
    /// CPU time the Redis server used (`INFO cpu`).
    redis_cpu: Duration,
    /// Redis commands run (`INFO commandstats`, commands inside scripts included; the
    /// measurement's own `INFO` calls left out).
    redis_commands: u64,
}

impl Segment {
    fn add(&mut self, other: Segment) {
        self.cycles += other.cycles;
        self.elapsed += other.elapsed;
        self.busy += other.busy;
        self.errors += other.errors;
        self.client_cpu += other.client_cpu;
        self.redis_cpu += other.redis_cpu;
        self.redis_commands += other.redis_commands;
    }

    fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn json(&self) -> Value {
        json!({
            "cycles": self.cycles,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "cycles_per_s": self.rate().round(),
            "busy": self.busy,
            "errors": self.errors,
            "client_cpu_us_per_cycle": round3(per_cycle(self.client_cpu, self.cycles)),
            "redis_cpu_us_per_cycle": round3(per_cycle(self.redis_cpu, self.cycles)),
            "redis_commands_per_cycle": round3(self.redis_commands as f64 / self.cycles.max(1) as f64),
        })
    }
}

#[derive(Clone, Copy)]
enum Side {
    Herdlock,
    Baseline,
    /// `once-cycles` only: the fenced floor (a raw client running the minimal fenced
    /// acquire script, then the compare-and-delete).
    Floor,
}

async fn once_cycles(url: &str, probes: &[String], prefix: &str, scale: Scale) -> Res<Value> {
    let ctx = CycleCtx::connect(CycleKind::Once, url, probes, prefix).await?;
    let (herd_total, raw_total, floor_total, segments) = ctx.abba(scale.cycles).await;
    let ratio = herd_total.rate() / raw_total.rate();
    Ok(json!({
        "workload": "once-cycles",
        "cores": cores(),
        "allocator": ALLOCATOR,
        "processes": 1,
        "in_flight": CYCLE_IN_FLIGHT,
        "cycles_per_side": scale.cycles,
        "herdlock": herd_total.json(),
        "baseline": labelled(raw_total.json(), "SET NX PX + EVALSHA compare-and-delete"),
        "fenced_floor": labelled(
            floor_total.json(),
            "EVALSHA SET NX PX + INCR fence + EVALSHA compare-and-delete (the least a fenced lock does)",
        ),
        "ratio": round3(ratio),
        "floor_ratio": round3(floor_total.rate() / raw_total.rate()),
        "herdlock_over_floor": round3(herd_total.rate() / floor_total.rate()),
        "target_ratio": 0.75,
        "target_met": ratio >= 0.75,
        "commands_target": 5,
        "commands_target_met": herd_total.redis_commands <= 5 * herd_total.cycles,
        "segments": segments,
    }))
}

fn labelled(mut v: Value, what: &str) -> Value {
    v["what"] = json!(what);
    v
}

/// What one cycle of a cycle workload locks.
#[derive(Clone, Copy)]
enum CycleKind {
    /// `once-cycles`: one key.
    Once,
    /// `multi-cycles`: `MULTI_KEYS` keys at once.
    Multi,
}

/// The raw baseline's scripts (loaded on first use by `redis::Script`).
struct RawScripts {
    compare_and_delete: redis::Script,
    fenced_set_nx: redis::Script,
    multi_set_nx: redis::Script,
    multi_compare_and_delete: redis::Script,
}

struct CycleCtx {
    kind: CycleKind,
    herd: Herd,
    raw: RawConn,
    probes: tokio::sync::Mutex<Probes>,
    scripts: Arc<RawScripts>,
    prefix: String,
}

impl CycleCtx {
    async fn connect(kind: CycleKind, url: &str, probes: &[String], prefix: &str) -> Res<CycleCtx> {
        Ok(CycleCtx {
            kind,
            herd: connect_herd(url, prefix, "loadgen").await?,
            raw: raw_connection(url).await?,
            probes: tokio::sync::Mutex::new(Probes::connect(probes).await?),
            scripts: Arc::new(RawScripts {
                compare_and_delete: redis::Script::new(COMPARE_AND_DELETE),
                fenced_set_nx: redis::Script::new(FENCED_SET_NX),
                multi_set_nx: redis::Script::new(MULTI_SET_NX),
                multi_compare_and_delete: redis::Script::new(MULTI_COMPARE_AND_DELETE),
            }),
            prefix: prefix.to_owned(),
        })
    }

    /// A warm-up of each side, then `cycles` per side in `CYCLE_SEGMENTS` ABBA segments:
    /// (herdlock total, baseline total, per-segment JSON).
    async fn abba(&self, cycles: u64) -> (Segment, Segment, Segment, Vec<Value>) {
        let sides: &[Side] = match self.kind {
            CycleKind::Once => &[Side::Baseline, Side::Floor, Side::Herdlock],
            CycleKind::Multi => &[Side::Baseline, Side::Herdlock],
        };
        // Warm up every path (script load, connection buffers, allocator).
        let warm = (cycles / 20).clamp(100, 5_000);
        for &side in sides {
            self.run(side, "warm", warm).await;
        }
        let per_segment = cycles.div_ceil(CYCLE_SEGMENTS);
        let mut totals = [Segment::default(); 3];
        let mut segments = Vec::new();
        for s in 0..CYCLE_SEGMENTS {
            // ABBA: the sides in order in even segments, reversed in odd ones.
            let mut order = sides.to_vec();
            if s % 2 == 1 {
                order.reverse();
            }
            let mut this = [Segment::default(); 3];
            for side in order {
                this[side as usize] = self.run(side, &format!("s{s}"), per_segment).await;
            }
            let [h, b, f] = this;
            eprintln!(
                "  segment {s}: herdlock {:.0}/s, baseline {:.0}/s, ratio {:.3}",
                h.rate(),
                b.rate(),
                h.rate() / b.rate()
            );
            let mut seg = json!({
                "herdlock_cycles_per_s": h.rate().round(),
                "baseline_cycles_per_s": b.rate().round(),
                "ratio": round3(h.rate() / b.rate()),
            });
            if f.cycles > 0 {
                seg["fenced_floor_cycles_per_s"] = json!(f.rate().round());
            }
            segments.push(seg);
            for (total, part) in totals.iter_mut().zip(this) {
                total.add(part);
            }
        }
        let [h, b, f] = totals;
        (h, b, f, segments)
    }

    /// `cycles` lock/unlock cycles of distinct keys on `CYCLE_IN_FLIGHT` tasks.
    async fn run(&self, side: Side, tag: &str, cycles: u64) -> Segment {
        let mut probes = self.probes.lock().await;
        let (redis_before, calls_before) = probes.sample().await;
        let client_before = process_cpu();
        let next = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + PHASE_BUDGET;
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..CYCLE_IN_FLIGHT {
            let next = Arc::clone(&next);
            let tag = tag.to_owned();
            let kind = self.kind;
            let herd = self.herd.clone();
            let mut raw = self.raw.clone();
            let scripts = Arc::clone(&self.scripts);
            let prefix = self.prefix.clone();
            tasks.spawn(async move {
                let mut seg = Segment::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= cycles || Instant::now() >= deadline {
                        return seg;
                    }
                    let outcome = match (kind, side) {
                        (CycleKind::Once, Side::Herdlock) => {
                            herd_cycle(&herd, &format!("oc-{tag}-{i}")).await
                        }
                        (CycleKind::Once, Side::Baseline) => {
                            let key = format!("oc-{tag}-{i}");
                            raw_cycle(&mut raw, &scripts, &prefix, &key, i, false).await
                        }
                        (CycleKind::Once, Side::Floor) => {
                            let key = format!("of-{tag}-{i}");
                            raw_cycle(&mut raw, &scripts, &prefix, &key, i, true).await
                        }
                        (CycleKind::Multi, Side::Floor) => Ok(false),
                        (CycleKind::Multi, Side::Herdlock) => {
                            herd_multi_cycle(&herd, &multi_keys(&tag, i)).await
                        }
                        (CycleKind::Multi, Side::Baseline) => {
                            let keys = multi_keys(&tag, i);
                            raw_multi_cycle(&mut raw, &scripts, &prefix, &keys, i).await
                        }
                    };
                    match outcome {
                        Ok(true) => seg.cycles += 1,
                        Ok(false) => seg.busy += 1,
                        Err(_) => seg.errors += 1,
                    }
                }
            });
        }
        let mut total = Segment::default();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(seg) = joined {
                total.add(seg);
            } else {
                total.errors += 1;
            }
        }
        total.elapsed = started.elapsed();
        if let (Some(before), Some(after)) = (client_before, process_cpu()) {
            total.client_cpu = after.saturating_sub(before);
        }
        let (redis_after, calls_after) = probes.sample().await;
        if let (Some(before), Some(after)) = (redis_before, redis_after) {
            total.redis_cpu = after.saturating_sub(before);
        }
        if let (Some(before), Some(after)) = (calls_before, calls_after) {
            // Less the measurement's own calls (the INFO commands of the first sample).
            total.redis_commands = after
                .saturating_sub(before)
                .saturating_sub(probes.own_calls());
        }
        total
    }
}

/// One herdlock cycle; `Ok(false)` when the (fresh) key was unexpectedly busy.
async fn herd_cycle(herd: &Herd, key: &str) -> Res<bool> {
    match herd.try_lock(key).await? {
        TryLock::Acquired(guard) => {
            guard.release().await?;
            Ok(true)
        }
        TryLock::Busy(_) => Ok(false),
    }
}

/// One baseline cycle: `SET key tok NX PX ttl` (or, for the fenced floor, the minimal
/// fenced acquire script), then the owner-checked delete.
async fn raw_cycle(
    conn: &mut RawConn,
    scripts: &RawScripts,
    prefix: &str,
    key: &str,
    i: u64,
    fenced: bool,
) -> Res<bool> {
    // Same shape and size as herdlock's key and holder value (`fence:nonce:owner`).
    let lock = format!("{prefix}:{{{key}}}:lock");
    let token = format!("{i}:{:016x}{i:x}:loadgen", 0x5eed_u64);
    let acquired = if fenced {
        let fence = format!("{prefix}:{{{key}}}:fence");
        let fence: i64 = scripts
            .fenced_set_nx
            .key(&lock)
            .key(&fence)
            .arg(&token)
            .arg(RAW_TTL_MS)
            .invoke_async(conn)
            .await?;
        fence > 0
    } else {
        set_nx(conn, &lock, &token).await?
    };
    if !acquired {
        return Ok(false);
    }
    let deleted: i64 = scripts
        .compare_and_delete
        .key(&lock)
        .arg(&token)
        .invoke_async(conn)
        .await?;
    Ok(deleted == 1)
}

// ---------------------------------------------------------------------------------------
// multi-cycles

async fn multi_cycles(url: &str, probes: &[String], prefix: &str, scale: Scale) -> Res<Value> {
    let ctx = CycleCtx::connect(CycleKind::Multi, url, probes, prefix).await?;
    let (herd_total, raw_total, _, segments) = ctx.abba(scale.multi_cycles).await;
    let ratio = herd_total.rate() / raw_total.rate();
    Ok(json!({
        "workload": "multi-cycles",
        "cores": cores(),
        "allocator": ALLOCATOR,
        "processes": 1,
        "in_flight": CYCLE_IN_FLIGHT,
        "keys_per_cycle": MULTI_KEYS,
        "cycles_per_side": scale.multi_cycles,
        "herdlock": herd_total.json(),
        "baseline": labelled(
            raw_total.json(),
            "EVALSHA all-or-none SET NX PX of 3 keys + EVALSHA owner-checked 3-key delete",
        ),
        "ratio": round3(ratio),
        "segments": segments,
    }))
}

/// The distinct keys of multi cycle `i`.
fn multi_keys(tag: &str, i: u64) -> [String; MULTI_KEYS] {
    std::array::from_fn(|k| format!("mc-{tag}-{i}-{k}"))
}

/// One herdlock multi cycle; `Ok(false)` when a (fresh) key was unexpectedly busy or a
/// key was not released.
async fn herd_multi_cycle(herd: &Herd, keys: &[String; MULTI_KEYS]) -> Res<bool> {
    let keys = keys.each_ref().map(String::as_str);
    match herd.try_multi(&keys).await? {
        TryMulti::Acquired(guard) => match guard.release().await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == herdlock::ErrorKind::LockLost => Ok(false),
            Err(e) => Err(e.into()),
        },
        TryMulti::Busy(_) => Ok(false),
    }
}

/// One baseline multi cycle: the all-or-none `SET NX PX` script, then the owner-checked
/// delete script.
async fn raw_multi_cycle(
    conn: &mut RawConn,
    scripts: &RawScripts,
    prefix: &str,
    keys: &[String; MULTI_KEYS],
    i: u64,
) -> Res<bool> {
    // Same key shape as herdlock's; one token (`fence:nonce:owner` shaped) for all keys.
    let keys = keys
        .each_ref()
        .map(|key| format!("{prefix}:{{{key}}}:lock"));
    let token = format!("{i}:{:016x}{i:x}:loadgen", 0x5eed_u64);
    let set: i64 = scripts
        .multi_set_nx
        .key(&keys[..])
        .arg(&token)
        .arg(RAW_TTL_MS)
        .invoke_async(conn)
        .await?;
    if set != 1 {
        return Ok(false);
    }
    let deleted: usize = scripts
        .multi_compare_and_delete
        .key(&keys[..])
        .arg(&token)
        .invoke_async(conn)
        .await?;
    Ok(deleted == MULTI_KEYS)
}

// ---------------------------------------------------------------------------------------
// Worker processes: spawning and the line protocol

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// The parent's handle on its workers. Dropping it kills them (`kill_on_drop`).
struct Workers {
    procs: Vec<WorkerProc>,
}

impl Workers {
    async fn spawn(workload: Workload, url: &str, prefix: &str) -> Res<Workers> {
        let exe = std::env::current_exe()?;
        let mut procs = Vec::new();
        for index in 0..PROCESSES {
            let mut child = Command::new(&exe)
                .args([
                    "--worker",
                    workload.name(),
                    "--url",
                    url,
                    "--prefix",
                    prefix,
                ])
                .args(["--index", &index.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take().ok_or("worker stdin not piped")?;
            let stdout = child.stdout.take().ok_or("worker stdout not piped")?;
            procs.push(WorkerProc {
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            });
        }
        let mut workers = Workers { procs };
        workers.expect_all("ready").await?;
        Ok(workers)
    }

    async fn send_all(&mut self, line: &str) -> Res<()> {
        let line = format!("{line}\n");
        for p in &mut self.procs {
            p.stdin.write_all(line.as_bytes()).await?;
            p.stdin.flush().await?;
        }
        Ok(())
    }

    async fn read_all(&mut self) -> Res<Vec<String>> {
        let mut out = Vec::with_capacity(self.procs.len());
        for (i, p) in self.procs.iter_mut().enumerate() {
            match tokio::time::timeout(WORKER_LINE_TIMEOUT, p.lines.next_line()).await {
                Ok(Ok(Some(line))) => out.push(line),
                Ok(Ok(None)) => return Err(format!("worker {i} exited early").into()),
                Ok(Err(e)) => return Err(format!("worker {i}: {e}").into()),
                Err(_) => {
                    return Err(
                        format!("worker {i} said nothing for {WORKER_LINE_TIMEOUT:?}").into(),
                    )
                }
            }
        }
        Ok(out)
    }

    async fn expect_all(&mut self, want: &str) -> Res<()> {
        for (i, line) in self.read_all().await?.into_iter().enumerate() {
            if line != want {
                return Err(format!("worker {i} said {line:?}, expected {want:?}").into());
            }
        }
        Ok(())
    }

    async fn read_reports<T: DeserializeOwned>(&mut self) -> Res<Vec<T>> {
        self.read_all()
            .await?
            .iter()
            .map(|line| {
                serde_json::from_str(line).map_err(|e| format!("bad report {line:?}: {e}").into())
            })
            .collect()
    }

    /// `cmd` → all `ready` → `go` to all → one report from each.
    async fn step<T: DeserializeOwned>(&mut self, cmd: &str) -> Res<Vec<T>> {
        self.prepare(cmd).await?;
        self.send_all("go").await?;
        self.read_reports().await
    }

    async fn prepare(&mut self, cmd: &str) -> Res<()> {
        self.send_all(cmd).await?;
        self.expect_all("ready").await
    }

    async fn quit(mut self) -> Res<()> {
        self.send_all("quit").await?;
        for (i, p) in self.procs.iter_mut().enumerate() {
            match tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => return Err(format!("worker {i} exited with {status}").into()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(format!("worker {i} did not exit").into()),
            }
        }
        Ok(())
    }
}

/// Everything a worker process holds.
struct WorkerCtx {
    herd: Herd,
    /// This worker's `--index`.
    index: usize,
    raw: RawConn,
    prefix: String,
    stdin: Lines<BufReader<Stdin>>,
    /// Latest raw pub/sub message: (round, publisher's send time, reader's receive time).
    published: watch::Receiver<(i64, u64, u64)>,
}

impl WorkerCtx {
    fn say(line: &str) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        // The parent reads line by line; a write failure means it is gone.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            std::process::exit(1);
        }
    }

    /// Says `ready`, then waits for the parent's `go`.
    async fn barrier(&mut self) -> Res<()> {
        WorkerCtx::say("ready");
        match self.stdin.next_line().await? {
            Some(line) if line == "go" => Ok(()),
            other => Err(format!("expected go, got {other:?}").into()),
        }
    }
}

async fn worker_main(args: WorkerArgs) -> Res<()> {
    let owner = format!("worker{}", args.index);
    let herd = connect_herd(&args.url, &args.prefix, &owner).await?;
    let raw = raw_connection(&args.url).await?;
    let (tx, published) = watch::channel((-1_i64, 0_u64, 0_u64));
    // The raw pub/sub baseline's subscriber: one dedicated connection per process
    // (standalone only: fanout-herd does not run on a cluster).
    if cluster_nodes(&args.url).is_none() {
        let client = redis::Client::open(args.url.as_str())?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(pub_channel(&args.prefix)).await?;
        tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let received = now_us();
                let payload: String = msg.get_payload().unwrap_or_default();
                if let Some((round, sent)) = payload.split_once(':') {
                    if let (Ok(round), Ok(sent)) = (round.parse(), sent.parse()) {
                        tx.send_replace((round, sent, received));
                    }
                }
            }
        });
    }
    let mut ctx = WorkerCtx {
        herd,
        index: args.index,
        raw,
        prefix: args.prefix,
        stdin: BufReader::new(tokio::io::stdin()).lines(),
        published,
    };
    WorkerCtx::say("ready");
    while let Some(line) = ctx.stdin.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Res<usize> { Ok(words.get(i).ok_or("missing argument")?.parse()?) };
        let report = match words.first().copied() {
            Some("quit") => return Ok(()),
            Some("herd") => serde_json::to_string(&herd_round(&mut ctx, num(1)?, num(2)?).await?)?,
            Some("pub") => serde_json::to_string(&pub_round(&mut ctx, num(1)?, num(2)?).await?)?,
            Some("tput") => serde_json::to_string(
                &tput_round(&mut ctx, num(1)?, num(2)?..num(2)? + num(3)?).await?,
            )?,
            Some("setnx") => serde_json::to_string(
                &setnx_round(&mut ctx, num(1)?, num(2)?..num(2)? + num(3)?).await?,
            )?,
            Some("handoff") => {
                let side = Handoff::parse(words.get(1).ok_or("missing side")?)?;
                let round = words.get(2).ok_or("missing round")?.to_string();
                let report = handoff_round(&mut ctx, side, &round, num(3)?, num(4)?).await?;
                serde_json::to_string(&report)?
            }
            _ => return Err(format!("unknown command {line:?}").into()),
        };
        WorkerCtx::say(&report);
    }
    Ok(()) // stdin closed: the parent is gone
}

fn pub_channel(prefix: &str) -> String {
    format!("{prefix}:baseline-pub")
}

// ---------------------------------------------------------------------------------------
// fanout-herd

#[derive(Debug, Serialize, Deserialize)]
struct HerdReport {
    first_call_us: u64,
    last_resolve_us: u64,
    leaders: u64,
    followers: u64,
    timeouts: u64,
    errors: u64,
    /// When the job started and ended (from the result; 0 if no caller succeeded).
    job_start_us: u64,
    job_end_us: u64,
    /// Job end → this caller resolved, per successful caller.
    notify_us: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PubReport {
    /// Publisher's send → this process' subscriber connection read it.
    reader_us: u64,
    /// Publisher's send → each local waiter woke (the message handed on by a watch channel).
    waiter_us: Vec<u64>,
}

async fn herd_round(ctx: &mut WorkerCtx, round: usize, callers: usize) -> Res<HerdReport> {
    let job_id = format!("herd-{round}");
    let runs_key = format!("{}:runs:herd-{round}", ctx.prefix);
    let options = FanoutOptions::new().ttl(RUN_TTL);
    ctx.barrier().await?;
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let (herd, raw) = (ctx.herd.clone(), ctx.raw.clone());
        let (job_id, runs_key, options) = (job_id.clone(), runs_key.clone(), options.clone());
        tasks.spawn(async move {
            let start = now_us();
            let result = herd
                .fanout_with(&job_id, CALL_TIMEOUT, &options, move || async move {
                    let (mut raw, job_start) = (raw, now_us());
                    // Count the run while the job "works", so the count costs no job time.
                    let mut incr = redis::cmd("INCR");
                    incr.arg(&runs_key);
                    let counted = incr.query_async::<i64>(&mut raw);
                    let (counted, ()) = tokio::join!(counted, tokio::time::sleep(HERD_JOB));
                    counted?;
                    Ok((job_start, now_us()))
                })
                .await;
            (start, now_us(), result)
        });
    }
    let mut report = HerdReport {
        first_call_us: u64::MAX,
        last_resolve_us: 0,
        leaders: 0,
        followers: 0,
        timeouts: 0,
        errors: 0,
        job_start_us: 0,
        job_end_us: 0,
        notify_us: Vec::with_capacity(callers),
    };
    let joined = tokio::time::timeout(PHASE_BUDGET, async {
        while let Some(joined) = tasks.join_next().await {
            let Ok((start, end, result)) = joined else {
                report.errors += 1;
                continue;
            };
            report.first_call_us = report.first_call_us.min(start);
            report.last_resolve_us = report.last_resolve_us.max(end);
            match result {
                Ok(fanned) => {
                    match fanned.role {
                        Role::Leader => report.leaders += 1,
                        _ => report.followers += 1,
                    }
                    let (job_start, job_end) = fanned.value;
                    (report.job_start_us, report.job_end_us) = (job_start, job_end);
                    report.notify_us.push(end.saturating_sub(job_end));
                }
                Err(e) if e.is_timeout() => report.timeouts += 1,
                Err(_) => report.errors += 1,
            }
        }
    })
    .await;
    if joined.is_err() {
        return Err(format!("herd round {round} exceeded {PHASE_BUDGET:?}").into());
    }
    Ok(report)
}

async fn pub_round(ctx: &mut WorkerCtx, round: usize, waiters: usize) -> Res<PubReport> {
    let round = i64::try_from(round)?;
    let mut tasks = JoinSet::new();
    for _ in 0..waiters {
        let mut rx = ctx.published.clone();
        tasks.spawn(async move {
            let msg = *rx.wait_for(|m| m.0 == round).await.ok()?;
            Some((msg, now_us()))
        });
    }
    tokio::task::yield_now().await;
    ctx.barrier().await?;
    let mut report = PubReport {
        reader_us: 0,
        waiter_us: Vec::with_capacity(waiters),
    };
    let joined = tokio::time::timeout(PHASE_BUDGET, async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Some(((_, sent, read), woke))) = joined {
                report.reader_us = read.saturating_sub(sent);
                report.waiter_us.push(woke.saturating_sub(sent));
            }
        }
    })
    .await;
    if joined.is_err() {
        return Err(format!("pub/sub round {round} exceeded {PHASE_BUDGET:?}").into());
    }
    Ok(report)
}

async fn fanout_herd(url: &str, prefix: &str, scale: Scale) -> Res<Value> {
    let per_process = scale.herd_callers / PROCESSES;
    let mut workers = Workers::spawn(Workload::FanoutHerd, url, prefix).await?;
    let mut raw = single_connection(url).await?;
    let channel = pub_channel(prefix);
    let mut agg = HerdAgg::default();
    for round in 0..scale.herd_rounds {
        // herdlock: 1,000 callers over 4 processes, one fresh job id.
        let reports: Vec<HerdReport> = workers.step(&format!("herd {round} {per_process}")).await?;
        let runs: Option<u64> = redis::cmd("GET")
            .arg(format!("{prefix}:runs:herd-{round}"))
            .query_async(&mut raw)
            .await?;
        agg.add_herd(&reports, runs.unwrap_or(0));
        // Baseline: one PUBLISH to the same 4 processes, handed to as many local waiters.
        workers
            .prepare(&format!("pub {round} {per_process}"))
            .await?;
        workers.send_all("go").await?;
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(format!("{round}:{}", now_us()))
            .query_async(&mut raw)
            .await?;
        if usize::try_from(receivers).ok() != Some(PROCESSES) {
            return Err(format!("PUBLISH reached {receivers} subscribers, not {PROCESSES}").into());
        }
        let reports: Vec<PubReport> = workers.read_reports().await?;
        for r in reports {
            agg.pub_reader.push(r.reader_us);
            agg.pub_waiter.extend(r.waiter_us);
        }
        eprintln!(
            "  round {round}: runs {}, end-to-end {:.1} ms",
            runs.unwrap_or(0),
            agg.e2e_us.last().copied().unwrap_or(0) as f64 / 1000.0
        );
    }
    workers.quit().await?;
    Ok(agg.report(scale, per_process))
}

#[derive(Debug, Default)]
struct HerdAgg {
    rounds: u64,
    runs_per_round: Vec<u64>,
    leaders_per_round: Vec<u64>,
    e2e_us: Vec<u64>,
    /// Per round: last process' first call − first process' first call.
    start_skew_us: Vec<u64>,
    /// Per round: first call anywhere → the job started.
    to_job_start_us: Vec<u64>,
    /// Per round: the job's own duration.
    job_us: Vec<u64>,
    /// Per round: job end → last caller resolved.
    job_end_to_last_us: Vec<u64>,
    notify_all: Vec<u64>,
    /// Callers in processes that did not run the job (they learn by pub/sub).
    notify_remote: Vec<u64>,
    /// Callers in the process that ran the job (they learn from the local flight).
    notify_local: Vec<u64>,
    timeouts: u64,
    errors: u64,
    pub_reader: Vec<u64>,
    pub_waiter: Vec<u64>,
}

impl HerdAgg {
    fn add_herd(&mut self, reports: &[HerdReport], runs: u64) {
        self.rounds += 1;
        self.runs_per_round.push(runs);
        self.leaders_per_round
            .push(reports.iter().map(|r| r.leaders).sum());
        let first = reports.iter().map(|r| r.first_call_us).min().unwrap_or(0);
        let last = reports.iter().map(|r| r.last_resolve_us).max().unwrap_or(0);
        self.e2e_us.push(last.saturating_sub(first));
        let latest_first = reports.iter().map(|r| r.first_call_us).max().unwrap_or(0);
        self.start_skew_us.push(latest_first.saturating_sub(first));
        if let Some(r) = reports.iter().find(|r| r.job_end_us > 0) {
            self.to_job_start_us
                .push(r.job_start_us.saturating_sub(first));
            self.job_us
                .push(r.job_end_us.saturating_sub(r.job_start_us));
            self.job_end_to_last_us
                .push(last.saturating_sub(r.job_end_us));
        }
        for r in reports {
            self.timeouts += r.timeouts;
            self.errors += r.errors;
            self.notify_all.extend(&r.notify_us);
            if r.leaders > 0 {
                self.notify_local.extend(&r.notify_us);
            } else {
                self.notify_remote.extend(&r.notify_us);
            }
        }
    }

    fn report(self, scale: Scale, per_process: usize) -> Value {
        let job_us = HERD_JOB.as_micros() as u64;
        let e2e = Summary::of(self.e2e_us);
        let remote = Summary::of(self.notify_remote);
        let waiter = Summary::of(self.pub_waiter);
        let all_one = self.runs_per_round.iter().all(|&r| r == 1)
            && self.leaders_per_round.iter().all(|&l| l == 1);
        json!({
            "workload": "fanout-herd",
            "cores": cores(),
        "allocator": ALLOCATOR,
            "processes": PROCESSES,
            "callers_per_round": per_process * PROCESSES,
            "rounds": scale.herd_rounds,
            "job_ms": HERD_JOB.as_millis() as u64,
            "runs_per_round": self.runs_per_round,
            "leaders_per_round": self.leaders_per_round,
            "one_run_per_round": all_one,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "end_to_end_us": e2e.json(),
            "end_to_end_breakdown_us": {
                "start_skew_between_processes": Summary::of(self.start_skew_us).json(),
                "first_call_to_job_start": Summary::of(self.to_job_start_us).json(),
                "job": Summary::of(self.job_us).json(),
                "job_end_to_last_resolve": Summary::of(self.job_end_to_last_us).json(),
            },
            "end_to_end_over_job": {
                "p50": round3(e2e.p50 as f64 / job_us as f64),
                "p99": round3(e2e.p99 as f64 / job_us as f64),
            },
            "notify_us": {
                "all": Summary::of(self.notify_all).json(),
                "remote_processes": remote.json(),
                "leader_process": Summary::of(self.notify_local).json(),
            },
            "baseline_publish_us": {
                "subscriber_read": Summary::of(self.pub_reader).json(),
                "local_waiters": waiter.json(),
            },
            "remote_notify_over_baseline": {
                "p50": round3(remote.p50 as f64 / waiter.p50.max(1) as f64),
                "p99": round3(remote.p99 as f64 / waiter.p99.max(1) as f64),
            },
        })
    }
}

// ---------------------------------------------------------------------------------------
// fanout-throughput

#[derive(Debug, Default, Serialize, Deserialize)]
struct TputReport {
    calls: u64,
    ok: u64,
    leaders: u64,
    timeouts: u64,
    errors: u64,
    unfinished: u64,
    start_us: u64,
    end_us: u64,
    /// Every run of the job in this process: (job index, start ns, end ns, when the caller
    /// whose job ran called, ns), wall clock.
    #[serde(default)]
    runs: Vec<(u32, u64, u64, u64)>,
}

/// Nanoseconds since the epoch: one clock for every process on this machine, so run
/// intervals from different workers can be compared.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How the runs of every job id, over every process, came about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RunKinds {
    /// The first run of an id.
    first: u64,
    /// A later run started by a caller that called *before* the previous run of its id
    /// finished: that caller should have received the previous run's result.
    misses: u64,
    /// A later run started by a caller that called after the previous run finished (a
    /// legitimate fresh run: results are never served to later callers without a cache
    /// age).
    late: u64,
    /// Pairs of runs of one id whose intervals overlap (two leaders at once).
    overlaps: u64,
}

/// Classifies every run (job, start, end, called) of every process.
fn classify_runs(runs: &mut [(u32, u64, u64, u64)]) -> RunKinds {
    runs.sort_unstable();
    let mut kinds = RunKinds::default();
    let mut previous: Option<(u32, u64)> = None; // (job, latest end so far)
    for &(job, start, end, called) in runs.iter() {
        match previous {
            Some((j, e)) if j == job => {
                if start < e {
                    kinds.overlaps += 1;
                }
                if called < e {
                    kinds.misses += 1;
                    if std::env::var_os("LOADGEN_DEBUG_MISSES").is_some() {
                        eprintln!("miss: job {job} called {} us before the previous run ended; started {} us after", (e - called) / 1000, (start.saturating_sub(e)) / 1000);
                    }
                } else {
                    kinds.late += 1;
                }
                previous = Some((job, e.max(end)));
            }
            _ => {
                kinds.first += 1;
                previous = Some((job, end));
            }
        }
    }
    kinds
}

impl TputReport {
    fn add(&mut self, other: &TputReport) {
        self.calls += other.calls;
        self.ok += other.ok;
        self.leaders += other.leaders;
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        self.unfinished += other.unfinished;
        self.runs.extend_from_slice(&other.runs);
    }
}

/// Runs `one(i)` for `i` in `0..ids` on `TPUT_IN_FLIGHT` tasks; each call reports into a
/// fresh [`TputReport`] that is summed.
async fn drive_ids<F, Fut>(ids: std::ops::Range<usize>, one: F) -> TputReport
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = TputReport> + Send,
{
    let one = Arc::new(one);
    let next = Arc::new(AtomicUsize::new(ids.start));
    let end = ids.end;
    let deadline = Instant::now() + PHASE_BUDGET;
    let mut total = TputReport {
        start_us: now_us(),
        ..TputReport::default()
    };
    let mut tasks = JoinSet::new();
    for _ in 0..TPUT_IN_FLIGHT.min(ids.len()) {
        let (one, next) = (Arc::clone(&one), Arc::clone(&next));
        tasks.spawn(async move {
            let mut sum = TputReport::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return sum;
                }
                if Instant::now() >= deadline {
                    sum.unfinished += 1;
                    continue;
                }
                sum.add(&one(i).await);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(sum) => total.add(&sum),
            Err(_) => total.errors += 1,
        }
    }
    total.end_us = now_us();
    total
}

async fn tput_round(
    ctx: &mut WorkerCtx,
    round: usize,
    ids: std::ops::Range<usize>,
) -> Res<TputReport> {
    let options = FanoutOptions::new().ttl(RUN_TTL);
    let herd = ctx.herd.clone();
    ctx.barrier().await?;
    Ok(drive_ids(ids, move |i| {
        let (herd, options) = (herd.clone(), options.clone());
        let job_id = format!("t{round}-{i}");
        async move {
            // The job (0 ms) notes when it ran; the parent checks the runs of every
            // process for overlaps. No Redis command of its own, so only herdlock's
            // traffic is measured.
            let ran = Arc::new(std::sync::Mutex::new(None));
            let note = Arc::clone(&ran);
            let called = now_ns();
            let result = herd
                .fanout_with(&job_id, CALL_TIMEOUT, &options, move || async move {
                    let start = now_ns();
                    let end = now_ns();
                    if let Ok(mut slot) = note.lock() {
                        *slot = Some((start, end, called));
                    }
                    Ok(0)
                })
                .await;
            let mut r = TputReport {
                calls: 1,
                ..TputReport::default()
            };
            let run = ran.lock().ok().and_then(|mut slot| slot.take());
            if let Some((start, end, called)) = run {
                r.runs
                    .push((u32::try_from(i).unwrap_or(u32::MAX), start, end, called));
            }
            match result {
                Ok(fanned) => {
                    r.ok = 1;
                    r.leaders = u64::from(fanned.role == Role::Leader);
                }
                Err(e) if e.is_timeout() => r.timeouts = 1,
                Err(_) => r.errors = 1,
            }
            r
        }
    })
    .await)
}

async fn setnx_round(
    ctx: &mut WorkerCtx,
    round: usize,
    ids: std::ops::Range<usize>,
) -> Res<TputReport> {
    let (raw, prefix) = (ctx.raw.clone(), ctx.prefix.clone());
    ctx.barrier().await?;
    Ok(drive_ids(ids, move |i| {
        let mut raw = raw.clone();
        let key = format!("{prefix}:raw:{{t{round}-{i}}}:lock");
        async move {
            let set = set_nx(&mut raw, &key, "1").await;
            TputReport {
                calls: 1,
                ok: u64::from(set.is_ok()),
                leaders: u64::from(matches!(set, Ok(true))),
                errors: u64::from(set.is_err()),
                ..TputReport::default()
            }
        }
    })
    .await)
}

/// Sums the workers' reports of one phase; the phase lasts from the first worker's start
/// to the last worker's end.
fn phase(reports: &[TputReport]) -> (TputReport, Duration) {
    let mut sum = TputReport::default();
    for r in reports {
        sum.add(r);
    }
    let start = reports.iter().map(|r| r.start_us).min().unwrap_or(0);
    let end = reports.iter().map(|r| r.end_us).max().unwrap_or(0);
    (sum, Duration::from_micros(end.saturating_sub(start)))
}

async fn fanout_throughput(
    url: &str,
    probe_urls: &[String],
    prefix: &str,
    scale: Scale,
) -> Res<Value> {
    let mut workers = Workers::spawn(Workload::FanoutThroughput, url, prefix).await?;
    let mut probes = Probes::connect(probe_urls).await?;
    // Redis (CPU, commands) per side, summed over the probed nodes: [herdlock, baseline].
    let mut redis_cost = [(Duration::ZERO, 0_u64); 2];
    let half = scale.tput_ids / 2;
    let (mut herd, mut herd_time, mut base, mut base_time) = (
        TputReport::default(),
        Duration::ZERO,
        TputReport::default(),
        Duration::ZERO,
    );
    let (mut runs, mut kinds) = (0, RunKinds::default());
    // ABBA over two rounds of half the ids each. Each round goes in waves of
    // TPUT_IN_FLIGHT ids: every process requests all ids of a wave at once, and the
    // next wave starts when every process is done (the time between waves, spent on
    // coordination, is not counted).
    for (round, cmd) in [(0, "setnx"), (0, "tput"), (1, "tput"), (1, "setnx")] {
        let (mut sum, mut time) = (TputReport::default(), Duration::ZERO);
        let (cpu_before, calls_before) = probes.sample().await;
        for start in (0..half).step_by(TPUT_IN_FLIGHT) {
            let len = TPUT_IN_FLIGHT.min(half - start);
            let reports: Vec<TputReport> = workers
                .step(&format!("{cmd} {round} {start} {len}"))
                .await?;
            let (wave, wave_time) = phase(&reports);
            sum.add(&wave);
            time += wave_time;
        }
        let (cpu_after, calls_after) = probes.sample().await;
        // Between waves only the workers' own idle traffic reaches Redis, so the round's
        // whole span is charged to it.
        let cost = &mut redis_cost[usize::from(cmd != "tput")];
        if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
            cost.0 += after.saturating_sub(before);
        }
        if let (Some(before), Some(after)) = (calls_before, calls_after) {
            cost.1 += after
                .saturating_sub(before)
                .saturating_sub(probes.own_calls());
        }
        let rate = sum.calls as f64 / time.as_secs_f64().max(1e-9);
        if cmd == "tput" {
            let mut round_runs = std::mem::take(&mut sum.runs);
            runs += round_runs.len() as u64;
            let round_kinds = classify_runs(&mut round_runs);
            kinds.first += round_kinds.first;
            kinds.misses += round_kinds.misses;
            kinds.late += round_kinds.late;
            kinds.overlaps += round_kinds.overlaps;
            herd.add(&sum);
            herd_time += time;
            eprintln!("  herdlock round {round}: {rate:.0} calls/s, {half} ids");
        } else {
            base.add(&sum);
            base_time += time;
            eprintln!("  baseline round {round}: {rate:.0} SET NX/s");
        }
    }
    workers.quit().await?;
    let ids = (half * 2) as u64;
    let herd_calls_s = herd.calls as f64 / herd_time.as_secs_f64().max(1e-9);
    let base_ops_s = base.calls as f64 / base_time.as_secs_f64().max(1e-9);
    Ok(json!({
        "workload": "fanout-throughput",
        "cores": cores(),
        "allocator": ALLOCATOR,
        "processes": PROCESSES,
        "in_flight_per_process": TPUT_IN_FLIGHT,
        "job_ids": ids,
        "herdlock": {
            "elapsed_s": round3(herd_time.as_secs_f64()),
            "jobs_per_s": (ids as f64 / herd_time.as_secs_f64().max(1e-9)).round(),
            "calls_per_s": herd_calls_s.round(),
            "calls": herd.calls,
            "ok": herd.ok,
            "runs": runs,
            "runs_per_job": round3(runs as f64 / ids.max(1) as f64),
            "first_runs": kinds.first,
            "misses": kinds.misses,
            "late_reruns": kinds.late,
            "leaders": herd.leaders,
            "timeouts": herd.timeouts,
            "errors": herd.errors,
            "overlapping_runs": kinds.overlaps,
            "unfinished": herd.unfinished,
            "redis_commands_per_job": round3(redis_cost[0].1 as f64 / ids.max(1) as f64),
            "redis_cpu_us_per_job": round3(per_cycle(redis_cost[0].0, ids)),
        },
        "baseline": {
            "what": "SET NX PX on the same ids, same processes and concurrency",
            "elapsed_s": round3(base_time.as_secs_f64()),
            "ops_per_s": base_ops_s.round(),
            "errors": base.errors,
            "unfinished": base.unfinished,
            "redis_commands_per_op": round3(redis_cost[1].1 as f64 / base.calls.max(1) as f64),
            "redis_cpu_us_per_op": round3(per_cycle(redis_cost[1].0, base.calls)),
        },
        "calls_ratio": round3(herd_calls_s / base_ops_s.max(1e-9)),
        "timeouts_ok": herd.timeouts == 0,
        "overlaps_ok": kinds.overlaps == 0,
        "misses_ok": kinds.misses == 0,
    }))
}

// ---------------------------------------------------------------------------------------
// semaphore-handoff

/// The three sides of `semaphore-handoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handoff {
    /// `herd.semaphore(key, 1)`.
    Unfair,
    /// `herd.semaphore_with(key, 1, fair)`.
    Fair,
    /// Baseline: `SET NX PX` retried every `RAW_RETRY`, then `EVALSHA` compare-and-delete.
    Raw,
}

impl Handoff {
    fn name(self) -> &'static str {
        match self {
            Handoff::Unfair => "unfair",
            Handoff::Fair => "fair",
            Handoff::Raw => "raw",
        }
    }

    fn parse(name: &str) -> Res<Handoff> {
        [Handoff::Unfair, Handoff::Fair, Handoff::Raw]
            .into_iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| format!("unknown handoff side `{name}`").into())
    }
}

/// One worker's measurements of one `semaphore-handoff` phase.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HandoffReport {
    holds: u64,
    timeouts: u64,
    errors: u64,
    unfinished: u64,
    /// Baseline only: `SET NX` attempts, the successful ones included.
    attempts: u64,
    /// CPU time this worker process used during the phase.
    cpu_us: u64,
    start_us: u64,
    end_us: u64,
    /// Per hold: calling `acquire` (first `SET NX`) → holding the permit (lock).
    wait_us: Vec<u64>,
}

impl HandoffReport {
    fn add(&mut self, other: HandoffReport) {
        self.holds += other.holds;
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        self.unfinished += other.unfinished;
        self.attempts += other.attempts;
        self.cpu_us += other.cpu_us;
        self.wait_us.extend(other.wait_us);
    }
}

/// One `semaphore-handoff` side (or phase), summed over its phases and processes.
#[derive(Debug, Default)]
struct HandoffAgg {
    sum: HandoffReport,
    elapsed: Duration,
    redis_cpu: Duration,
    /// Redis command calls (`INFO commandstats`, script-inner commands included).
    redis_calls: BTreeMap<String, u64>,
}

impl HandoffAgg {
    fn add(&mut self, other: HandoffAgg) {
        self.sum.add(other.sum);
        self.elapsed += other.elapsed;
        self.redis_cpu += other.redis_cpu;
        for (cmd, calls) in other.redis_calls {
            *self.redis_calls.entry(cmd).or_default() += calls;
        }
    }

    fn rate(&self) -> f64 {
        self.sum.holds as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn wait(&self) -> Summary {
        Summary::of(self.sum.wait_us.clone())
    }

    fn wait_mean_us(&self) -> f64 {
        let waits = &self.sum.wait_us;
        waits.iter().sum::<u64>() as f64 / waits.len().max(1) as f64
    }

    fn json(&self) -> Value {
        let holds = self.sum.holds;
        let calls: serde_json::Map<String, Value> = self
            .redis_calls
            .iter()
            .map(|(cmd, &n)| (cmd.clone(), json!(round3(n as f64 / holds.max(1) as f64))))
            .collect();
        let mut v = json!({
            "holds": holds,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "holds_per_s": self.rate().round(),
            "wait_us": self.wait().json(),
            "wait_mean_us": self.wait_mean_us().round(),
            "timeouts": self.sum.timeouts,
            "errors": self.sum.errors,
            "unfinished": self.sum.unfinished,
            "client_cpu_us_per_hold":
                round3(per_cycle(Duration::from_micros(self.sum.cpu_us), holds)),
            "redis_cpu_us_per_hold": round3(per_cycle(self.redis_cpu, holds)),
            "redis_calls_per_hold": calls,
        });
        if self.sum.attempts > 0 {
            v["set_nx_attempts"] = json!(self.sum.attempts);
            v["set_nx_attempts_per_hold"] =
                json!(round3(self.sum.attempts as f64 / holds.max(1) as f64));
        }
        v
    }
}

/// Worker: `clients` tasks, each taking and releasing the one permit (or raw lock)
/// `holds` times with no work in between.
async fn handoff_round(
    ctx: &mut WorkerCtx,
    side: Handoff,
    round: &str,
    clients: usize,
    holds: usize,
) -> Res<HandoffReport> {
    let key = format!("sh-{}-{round}", side.name());
    let sem = match side {
        Handoff::Unfair => Some(ctx.herd.semaphore(&key, 1)?),
        Handoff::Fair => Some(ctx.herd.semaphore_with(
            &key,
            1,
            &SemaphoreOptions::new().fair(true),
        )?),
        Handoff::Raw => None,
    };
    // Same key shape as herdlock's.
    let raw_key = Arc::new(format!("{}:{{{key}}}:lock", ctx.prefix));
    let script = Arc::new(redis::Script::new(COMPARE_AND_DELETE));
    let owner = format!("worker{}", ctx.index);
    ctx.barrier().await?;
    let cpu_before = process_cpu();
    let deadline = Instant::now() + PHASE_BUDGET;
    let mut total = HandoffReport {
        start_us: now_us(),
        ..HandoffReport::default()
    };
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let (sem, mut raw) = (sem.clone(), ctx.raw.clone());
        let (raw_key, script) = (Arc::clone(&raw_key), Arc::clone(&script));
        let owner = owner.clone();
        tasks.spawn(async move {
            let mut r = HandoffReport {
                wait_us: Vec::with_capacity(holds),
                ..HandoffReport::default()
            };
            for h in 0..holds {
                if Instant::now() >= deadline {
                    r.unfinished += (holds - h) as u64;
                    break;
                }
                let called = Instant::now();
                let held = if let Some(sem) = &sem {
                    sem_hold(sem, called, &mut r).await
                } else {
                    // Same shape as herdlock's holder value (`nonce:owner`).
                    let token = format!("{:016x}{client:04x}{h:04x}:{owner}", 0x5eed_u64);
                    raw_hold(&mut raw, &script, &raw_key, &token, called, &mut r).await
                };
                match held {
                    Ok(()) => r.holds += 1,
                    Err(HoldError::Timeout) => r.timeouts += 1,
                    Err(HoldError::Other(e)) => {
                        if r.errors == 0 {
                            eprintln!("  {owner} client {client}: {e}");
                        }
                        r.errors += 1;
                    }
                }
            }
            r
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => total.add(r),
            Err(_) => total.errors += 1,
        }
    }
    total.end_us = now_us();
    if let (Some(before), Some(after)) = (cpu_before, process_cpu()) {
        total.cpu_us = after.saturating_sub(before).as_micros() as u64;
    }
    Ok(total)
}

enum HoldError {
    Timeout,
    Other(BoxError),
}

impl<E: Into<BoxError>> From<E> for HoldError {
    fn from(e: E) -> HoldError {
        HoldError::Other(e.into())
    }
}

/// One herdlock hold: `acquire`, then `release` at once.
async fn sem_hold(
    sem: &herdlock::Semaphore,
    called: Instant,
    r: &mut HandoffReport,
) -> Result<(), HoldError> {
    let permit = match sem.acquire(HANDOFF_WAIT).await {
        Ok(permit) => permit,
        Err(e) if e.is_timeout() => return Err(HoldError::Timeout),
        Err(e) => return Err(e.into()),
    };
    r.wait_us.push(called.elapsed().as_micros() as u64);
    permit.release().await?;
    Ok(())
}

/// One baseline hold: `SET key tok NX PX ttl` every `RAW_RETRY` until it succeeds, then
/// the owner-checked delete.
async fn raw_hold(
    conn: &mut RawConn,
    script: &redis::Script,
    key: &str,
    token: &str,
    called: Instant,
    r: &mut HandoffReport,
) -> Result<(), HoldError> {
    loop {
        r.attempts += 1;
        if set_nx(conn, key, token).await? {
            break;
        }
        if called.elapsed() >= HANDOFF_WAIT {
            return Err(HoldError::Timeout);
        }
        tokio::time::sleep(RAW_RETRY).await;
    }
    r.wait_us.push(called.elapsed().as_micros() as u64);
    let deleted: i64 = script.key(key).arg(token).invoke_async(conn).await?;
    if deleted != 1 {
        return Err("the raw lock was lost before its release".into());
    }
    Ok(())
}

/// Runs one phase on every worker; returns it summed, with its span (first worker's start
/// to last worker's end) and what it cost Redis.
async fn handoff_phase(
    workers: &mut Workers,
    info: &mut MultiplexedConnection,
    side: Handoff,
    round: &str,
    holds: usize,
) -> Res<HandoffAgg> {
    let cmd = format!("handoff {} {round} {HANDOFF_CLIENTS} {holds}", side.name());
    workers.prepare(&cmd).await?;
    let (cpu_before, calls_before) = (redis_cpu(info).await, redis_calls(info).await);
    workers.send_all("go").await?;
    let reports: Vec<HandoffReport> = workers.read_reports().await?;
    let (cpu_after, calls_after) = (redis_cpu(info).await, redis_calls(info).await);
    let mut phase = HandoffAgg::default();
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        phase.redis_cpu = after.saturating_sub(before);
    }
    if let (Some(before), Some(after)) = (calls_before, calls_after) {
        for (cmd, n) in after {
            let n = n.saturating_sub(before.get(&cmd).copied().unwrap_or(0));
            if n > 0 && cmd != "info" {
                phase.redis_calls.insert(cmd, n);
            }
        }
    }
    let start = reports.iter().map(|r| r.start_us).min().unwrap_or(0);
    let end = reports.iter().map(|r| r.end_us).max().unwrap_or(0);
    phase.elapsed = Duration::from_micros(end.saturating_sub(start));
    for r in reports {
        phase.sum.add(r);
    }
    Ok(phase)
}

async fn semaphore_handoff(url: &str, prefix: &str, scale: Scale) -> Res<Value> {
    let mut workers = Workers::spawn(Workload::SemaphoreHandoff, url, prefix).await?;
    let mut info = single_connection(url).await?;
    // Warm up every side (script loads, pub/sub connections), one hold per client.
    for side in [Handoff::Raw, Handoff::Unfair, Handoff::Fair] {
        handoff_phase(&mut workers, &mut info, side, "warm", 1).await?;
    }
    // ABBA over two halves of the holds: B U F | F U B.
    let half = (scale.handoff_holds / 2).max(1);
    // Indexed by `Handoff as usize`: unfair, fair, raw.
    let mut aggs = [
        HandoffAgg::default(),
        HandoffAgg::default(),
        HandoffAgg::default(),
    ];
    let order = [
        (Handoff::Raw, 0),
        (Handoff::Unfair, 0),
        (Handoff::Fair, 0),
        (Handoff::Fair, 1),
        (Handoff::Unfair, 1),
        (Handoff::Raw, 1),
    ];
    for (side, round) in order {
        let phase = handoff_phase(&mut workers, &mut info, side, &round.to_string(), half).await?;
        let wait = phase.wait();
        eprintln!(
            "  {} round {round}: {:.0} holds/s, wait p50 {:.1} ms, p99 {:.1} ms",
            side.name(),
            phase.rate(),
            wait.p50 as f64 / 1000.0,
            wait.p99 as f64 / 1000.0,
        );
        aggs[side as usize].add(phase);
    }
    workers.quit().await?;
    let [unfair, fair, raw] = aggs;
    let (unfair_wait, fair_wait, raw_wait) = (unfair.wait(), fair.wait(), raw.wait());
    let p99_target = HANDOFF_TARGET_FAIR_P99.as_micros() as u64;
    let clean = |a: &HandoffAgg| a.sum.timeouts + a.sum.errors + a.sum.unfinished == 0;
    let unfair_rate_met = unfair.rate() >= HANDOFF_TARGET_HOLDS_S && clean(&unfair);
    let fair_rate_met = fair.rate() >= HANDOFF_TARGET_HOLDS_S && clean(&fair);
    let fair_p99_met = fair_wait.p99 < p99_target && clean(&fair);
    let ratio = |a: u64, b: u64| round3(a as f64 / b.max(1) as f64);
    Ok(json!({
        "workload": "semaphore-handoff",
        "cores": cores(),
        "allocator": ALLOCATOR,
        "processes": PROCESSES,
        "clients_per_process": HANDOFF_CLIENTS,
        "holds_per_client": half * 2,
        "permits": 1,
        "hold_ms": 0,
        "herdlock_unfair": unfair.json(),
        "herdlock_fair": fair.json(),
        "baseline": labelled(
            raw.json(),
            "SET NX PX retried every 1 ms until acquired + EVALSHA compare-and-delete",
        ),
        "holds_ratio": {
            "unfair": round3(unfair.rate() / raw.rate().max(1e-9)),
            "fair": round3(fair.rate() / raw.rate().max(1e-9)),
        },
        "wait_mean_ratio": {
            "unfair": round3(unfair.wait_mean_us() / raw.wait_mean_us().max(1.0)),
            "fair": round3(fair.wait_mean_us() / raw.wait_mean_us().max(1.0)),
        },
        "wait_p50_ratio": {
            "unfair": ratio(unfair_wait.p50, raw_wait.p50),
            "fair": ratio(fair_wait.p50, raw_wait.p50),
        },
        "wait_p99_ratio": {
            "unfair": ratio(unfair_wait.p99, raw_wait.p99),
            "fair": ratio(fair_wait.p99, raw_wait.p99),
        },
        "targets": {
            "holds_per_s_min": HANDOFF_TARGET_HOLDS_S,
            "fair_wait_p99_ms_max": HANDOFF_TARGET_FAIR_P99.as_millis() as u64,
            "unfair_holds_per_s_met": unfair_rate_met,
            "fair_holds_per_s_met": fair_rate_met,
            "fair_wait_p99_met": fair_p99_met,
        },
        "target_met": unfair_rate_met && fair_rate_met && fair_p99_met,
    }))
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn per_cycle(cpu: Duration, cycles: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / cycles.max(1) as f64
}

/// CPU time used by this process so far (utime + stime from `/proc/self/stat`, in the
/// fixed `USER_HZ` = 100 ticks of the Linux ABI); `None` where there is no `/proc`.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Calls per command so far (`INFO commandstats`; commands run by scripts included).
async fn redis_calls(conn: &mut MultiplexedConnection) -> Option<BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .ok()?;
    let mut calls = BTreeMap::new();
    for line in info.lines() {
        let Some((cmd, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let n = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
        calls.insert(cmd.to_owned(), n.trim().parse().ok()?);
    }
    Some(calls)
}

/// CPU time the Redis server has used (`INFO cpu`: `used_cpu_user` + `used_cpu_sys`).
async fn redis_cpu(conn: &mut MultiplexedConnection) -> Option<Duration> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await.ok()?;
    let mut secs = 0.0;
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_user:")
            .or_else(|| line.strip_prefix("used_cpu_sys:"))
        {
            secs += v.trim().parse::<f64>().ok()?;
        }
    }
    Some(Duration::from_secs_f64(secs))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Nearest-rank percentiles of a sample.
#[derive(Debug, Clone, Copy)]
struct Summary {
    n: usize,
    p50: u64,
    p99: u64,
    max: u64,
}

impl Summary {
    fn of(mut sample: Vec<u64>) -> Summary {
        sample.sort_unstable();
        let rank = |p: f64| -> u64 {
            if sample.is_empty() {
                return 0;
            }
            let r = (p / 100.0 * sample.len() as f64).ceil() as usize;
            sample[r.clamp(1, sample.len()) - 1]
        };
        Summary {
            n: sample.len(),
            p50: rank(50.0),
            p99: rank(99.0),
            max: sample.last().copied().unwrap_or(0),
        }
    }

    fn json(self) -> Value {
        json!({ "n": self.n, "p50": self.p50, "p99": self.p99, "max": self.max })
    }
}
