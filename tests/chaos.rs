//! The chaos run (issue 5, test 6; issue 9, test 9): 4 worker processes do mixed fan-out /
//! lock / semaphore work for a fixed number of operations while a driver `kill -9`s and
//! restarts workers, kills pub/sub connections, pauses Redis, partitions workers (freezes a
//! worker's path to Redis for longer than the 1 s TTL, then thaws it) and cuts their
//! connections. Each worker reaches Redis through a proxy of its own (testkit/src/proxy.rs);
//! the ledger, which stands for the resource the locks protect, stays reachable. Bounded in
//! operations and time; prints its figures at the end.

use std::time::{Duration, Instant};

use crate::common::procs::{ready_then_go, Worker};
use crate::common::proxy::Proxy;
use crate::common::server::{self, RedisServer};

const WORKERS: usize = 4;
const OPS: usize = 150;
const FAULTS: usize = 12;

/// A small deterministic generator (xorshift), seeded from the clock; the seed is printed
/// so a failing run can be replayed by setting `HERDLOCK_CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A partition lasts this long plus up to `PARTITION_SPREAD`: longer than the workers'
/// 1 s TTL, so a partitioned holder always loses its lock.
const PARTITION_MIN: Duration = Duration::from_millis(1200);
const PARTITION_SPREAD: u64 = 600;

fn spawn(server: &RedisServer, proxy: &Proxy, prefix: &str, n: usize, generation: usize) -> Worker {
    let mut w = Worker::spawn(
        "workers::worker_entry",
        "chaos",
        &[
            ("URL", proxy.url()),
            ("LEDGER_URL", server.url()),
            ("PREFIX", prefix.to_owned()),
            ("OWNER", format!("chaos-{n}-{generation}")),
            ("SLOT", n.to_string()),
            ("OPS", OPS.to_string()),
        ],
    );
    ready_then_go(std::slice::from_mut(&mut w), Duration::from_secs(30));
    w
}

/// The slot of the worker inside the ledger's critical section right now, if any (one
/// round trip on the driver's own connection: a holder is inside for some 30 ms).
fn ledger_slot(conn: &mut redis::Connection, prefix: &str) -> Option<usize> {
    let slot: Option<usize> = redis::cmd("GET")
        .arg(format!("{prefix}:ledger:inside:slot"))
        .query(conn)
        .ok()
        .flatten();
    slot.filter(|slot| *slot < WORKERS)
}

/// Waits up to a second for a worker to be inside the ledger's critical section (they take
/// turns at the lock, so one usually is) and returns its slot.
fn holder_inside(conn: &mut redis::Connection, prefix: &str) -> Option<usize> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let slot = ledger_slot(conn, prefix);
        if slot.is_some() || Instant::now() >= deadline {
            return slot;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn counter(server: &RedisServer, key: &str) -> u64 {
    server.cmd(&["GET", key]).trim().parse().unwrap_or(0)
}

/// The fault injector: the server, one proxy and one worker per slot, and what it did.
struct Driver<'a> {
    server: &'a RedisServer,
    prefix: &'a str,
    proxies: Vec<Proxy>,
    /// A connection of the driver's own, to find who is inside the ledger.
    conn: redis::Connection,
    workers: Vec<Option<Worker>>,
    generations: [usize; WORKERS],
    kills: usize,
    pubsub_kills: usize,
    pauses: usize,
    partitions: usize,
    partitioned_holders: usize,
    cuts: usize,
}

impl<'a> Driver<'a> {
    fn start(server: &'a RedisServer, prefix: &'a str) -> Driver<'a> {
        let proxies: Vec<Proxy> = (0..WORKERS).map(|_| Proxy::start(server)).collect();
        let conn = redis::Client::open(server.url())
            .and_then(|c| c.get_connection())
            .expect("the driver's connection");
        let workers = (0..WORKERS)
            .map(|n| Some(spawn(server, &proxies[n], prefix, n, 0)))
            .collect();
        Driver {
            server,
            prefix,
            proxies,
            conn,
            workers,
            generations: [0; WORKERS],
            kills: 0,
            pubsub_kills: 0,
            pauses: 0,
            partitions: 0,
            partitioned_holders: 0,
            cuts: 0,
        }
    }

    /// Injects fault `kind` (0 to 4), aimed at `worker` where it needs one.
    fn inject(&mut self, kind: u64, worker: usize, rng: &mut Rng) {
        match kind {
            0 => {
                if let Some(mut w) = self.workers[worker].take() {
                    w.kill9();
                    self.kills += 1;
                    self.generations[worker] += 1;
                    self.workers[worker] = Some(spawn(
                        self.server,
                        &self.proxies[worker],
                        self.prefix,
                        worker,
                        self.generations[worker],
                    ));
                }
            }
            1 => {
                self.server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
                self.pubsub_kills += 1;
            }
            2 => {
                self.server.cmd(&["CLIENT", "PAUSE", "300"]);
                self.pauses += 1;
            }
            3 => {
                // Partition the worker inside the lock's critical section if there is one
                // (the hard case: it must be told before anyone else can enter), else
                // `worker`.
                let inside = holder_inside(&mut self.conn, self.prefix);
                let target = inside.unwrap_or(worker);
                self.proxies[target].freeze();
                std::thread::sleep(
                    PARTITION_MIN + Duration::from_millis(rng.below(PARTITION_SPREAD)),
                );
                self.proxies[target].thaw();
                self.partitions += 1;
                self.partitioned_holders += usize::from(inside.is_some());
            }
            _ => {
                self.proxies[worker].cut();
                self.cuts += 1;
            }
        }
    }

    fn faults(&self) -> String {
        format!(
            "{} kill -9, {} pub/sub kills, {} pauses, {} partitions ({} of a holder inside \
             the ledger), {} connection cuts",
            self.kills,
            self.pubsub_kills,
            self.pauses,
            self.partitions,
            self.partitioned_holders,
            self.cuts
        )
    }
}

#[test]
fn chaos_run() {
    let server = RedisServer::start();
    let prefix = server::unique_prefix("chaos");
    let seed = std::env::var("HERDLOCK_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1)
        });
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut driver = Driver::start(&server, &prefix);
    for fault in 0..FAULTS {
        std::thread::sleep(Duration::from_millis(150 + rng.below(250)));
        let worker = usize::try_from(rng.below(WORKERS as u64)).unwrap_or(0);
        // Every fourth fault is a partition, so every run has some; the others are random.
        let kind = if fault % 4 == 3 { 3 } else { rng.below(5) };
        driver.inject(kind, worker, &mut rng);
    }
    let faults = driver.faults();
    let mut summaries: Vec<String> = Vec::new();
    for w in std::mem::take(&mut driver.workers).into_iter().flatten() {
        let out = w.finish(Duration::from_secs(120));
        out.assert_success(); // a panic in a worker fails here
        summaries.extend(out.values("summary").into_iter().map(str::to_owned));
    }
    let mut totals = [0u64; 4];
    for s in &summaries {
        for (i, part) in s.split_whitespace().enumerate() {
            let value: u64 = part
                .split('=')
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            totals[i] += value;
        }
    }
    let [ok, errors, hung, stale] = totals;
    let lock_violations = counter(&server, &format!("{prefix}:ledger:violations"));
    let stale_writes = counter(&server, &format!("{prefix}:ledger:last:stale"));
    let sem_violations = counter(&server, &format!("{prefix}:sem:violations"));
    let late_exits = counter(&server, &format!("{prefix}:ledger:late"));
    println!(
        "chaos: seed {seed}, {:.1}s, workers finished {}, operations ok {ok} errors {errors}, \
         faults: {faults}; violations: lock overlaps {lock_violations}, \
         stale ledger writes {stale_writes}, semaphore over-admissions {sem_violations}, \
         stale fan-out results {stale}, hung calls {hung}; holders told in time that left \
         after the next one entered: {late_exits}",
        started.elapsed().as_secs_f64(),
        summaries.len()
    );
    assert_eq!(summaries.len(), WORKERS);
    assert!(ok > 0);
    assert_eq!(
        lock_violations, 0,
        "a lock holder was overtaken before it was told it lost the lock"
    );
    assert_eq!(sem_violations, 0, "semaphore admitted more than N");
    assert_eq!(
        stale, 0,
        "a fan-out caller got a result older than its call"
    );
    assert_eq!(hung, 0, "a call outlived its deadline");
}
