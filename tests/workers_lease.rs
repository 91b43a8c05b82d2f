//! Worker roles for the lease and chaos tests (`leases.rs`, `chaos.rs`).

use std::time::Duration;

use herdlock::{FanoutOptions, Herd, LockOptions};

use crate::common::procs::{emit, worker_param, worker_read_line, worker_ready_and_wait_go};
use crate::workers::herd;

fn ms(name: &str) -> Duration {
    Duration::from_millis(worker_param(name).parse().expect("milliseconds"))
}

/// Takes the lock (auto-extended, TTL `TTL_MS`), reports its fence, then waits until the
/// lock is lost or `done` arrives; reports what happened and whether `heartbeat` fails.
pub(crate) async fn lease_holder() {
    let herd = herd().await;
    worker_ready_and_wait_go();
    let options = LockOptions::new().ttl(ms("TTL_MS"));
    let guard = herd
        .lock_with("leased", Duration::from_secs(20), &options)
        .await
        .expect("lock");
    emit(&format!("holding {}", guard.fence().get()));
    // A detached thread, so a worker that ends first does not wait for its stdin.
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        while worker_read_line() != "done" {}
        let _ = done_tx.send(());
    });
    tokio::select! {
        () = guard.lost() => {
            emit(&format!("lost {}", guard.fence().get()));
            match guard.heartbeat().await {
                Err(e) if e.is_lock_lost() => emit("heartbeat lock-lost"),
                other => emit(&format!("heartbeat {other:?}")),
            }
        }
        _ = done => emit("released"),
    }
}

/// Blocks on the lock until it is free, then reports the fence it got.
pub(crate) async fn lease_waiter() {
    let herd = herd().await;
    worker_ready_and_wait_go();
    let options = LockOptions::new().ttl(ms("TTL_MS"));
    let started = std::time::Instant::now();
    let guard = herd
        .lock_with("leased", Duration::from_secs(20), &options)
        .await
        .expect("lock");
    emit(&format!(
        "acquired {} after_ms {}",
        guard.fence().get(),
        started.elapsed().as_millis()
    ));
    guard.release().await.expect("release");
}

/// A fan-out caller whose job names this process and runs `JOB_MS`.
pub(crate) async fn lease_fanout() {
    let herd = herd().await;
    worker_ready_and_wait_go();
    let options = FanoutOptions::new().ttl(ms("TTL_MS"));
    let job_time = ms("JOB_MS");
    let owner = worker_param("OWNER");
    let result = herd
        .fanout_with(
            "leased-job",
            Duration::from_secs(20),
            &options,
            move || async move {
                emit("running");
                tokio::time::sleep(job_time).await;
                Ok(format!("from {owner}"))
            },
        )
        .await;
    match result {
        Ok(fanned) => emit(&format!("value {}", fanned.value)),
        Err(e) => emit(&format!("error {:?}", e.kind())),
    }
}

/// Ledger scripts: every protected write checks the holder's fencing token, and the ledger
/// notices a holder overtaken by the next one while it was still inside.
///
/// An overtaken holder is a violation unless it had been *told* it lost the lock before the
/// next holder entered: herdlock promises to tell a holder no later than its lease can have
/// run out, not that the holder reacts in no time, so a holder that was told in time and
/// left a moment later is a *late exit* (counted, not a violation). Both instants are the
/// same host's wall clock (the holder's `SystemTime`, Redis's `TIME`): the test runs every
/// process on one machine.
const LEDGER_ENTER: &str = r"
-- KEYS[1] last fence, KEYS[2] the holder currently inside, KEYS[3] the slot of that holder
-- ARGV[1] fence, ARGV[2] the slot (worker index) of this holder
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local fence = tonumber(ARGV[1])
if fence <= last then
  redis.call('INCR', KEYS[1] .. ':stale')
  return 0
end
local inside = redis.call('GET', KEYS[2])
if inside then
  -- Whoever is inside is overtaken now (Redis time, microseconds).
  local t = redis.call('TIME')
  local now = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
  redis.call('SET', KEYS[1] .. ':overtaken:' .. inside, now, 'NX', 'EX', 600)
end
redis.call('SET', KEYS[1], fence)
redis.call('SET', KEYS[2], fence)
redis.call('SET', KEYS[3], ARGV[2])
return 1
";
const LEDGER_EXIT: &str = r"
-- KEYS[1] last fence, KEYS[2] inside, KEYS[3] violations, KEYS[4] late exits,
-- KEYS[5] the slot of the holder inside; ARGV[1] fence, ARGV[2] when this holder was told it lost the lock (wall clock,
-- microseconds; 0: it was not told)
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then
  -- Someone else entered while this holder was inside.
  local overtaken = tonumber(redis.call('GET', KEYS[1] .. ':overtaken:' .. ARGV[1]) or '0')
  local told = tonumber(ARGV[2])
  if told > 0 and overtaken > 0 and told <= overtaken then
    redis.call('INCR', KEYS[4])
  else
    redis.call('INCR', KEYS[3])
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2], KEYS[5])
end
return 1
";
const SEM_ENTER: &str = r"
-- KEYS[1] zset of holders inside (score: entry ms), KEYS[2] violations
-- ARGV[1] member, ARGV[2] permits, ARGV[3] forget entries older than this (ms)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], now, ARGV[1])
if redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[2]) then
  redis.call('INCR', KEYS[2])
end
return 1
";

/// The chaos worker: `OPS` mixed operations (once + ledger, fan-out + freshness check,
/// semaphore + occupancy check), each with its own deadline; prints a summary line.
pub(crate) async fn chaos() {
    // The herd's path to Redis (`URL`) goes through a proxy the parent may freeze; the
    // ledger (`LEDGER_URL`), which stands for the resource the locks protect, stays reachable.
    let herd = Herd::builder()
        .prefix(worker_param("PREFIX"))
        .owner(worker_param("OWNER"))
        .lock_ttl(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_secs(1))
        .connect(&worker_param("URL"))
        .await
        .expect("worker connects");
    let prefix = worker_param("PREFIX");
    let client = redis::Client::open(worker_param("LEDGER_URL")).expect("url");
    let mut conn = redis::aio::ConnectionManager::new(client)
        .await
        .expect("raw connection");
    let enter = redis::Script::new(LEDGER_ENTER);
    let exit = redis::Script::new(LEDGER_EXIT);
    let sem_enter = redis::Script::new(SEM_ENTER);
    let ops: usize = worker_param("OPS").parse().expect("OPS");
    let sem = herd.semaphore("chaos-sem", 2).expect("semaphore");
    worker_ready_and_wait_go();
    let (mut ok, mut errors, mut hung, mut stale) = (0u64, 0u64, 0u64, 0u64);
    let deadline = Duration::from_secs(4);
    let slack = Duration::from_secs(3);
    for i in 0..ops {
        let started = std::time::Instant::now();
        let result: Result<(), herdlock::Error> = match tokio::time::timeout(
            deadline + slack,
            run_op(
                &herd,
                &sem,
                &mut conn,
                (&enter, &exit, &sem_enter),
                &prefix,
                i,
            ),
        )
        .await
        {
            Ok(Ok(Some(was_stale))) => {
                stale += u64::from(was_stale);
                Ok(())
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                hung += 1;
                continue;
            }
        };
        if started.elapsed() > deadline + slack {
            hung += 1;
        }
        match result {
            Ok(()) => ok += 1,
            Err(_) => errors += 1,
        }
    }
    emit(&format!(
        "summary ok={ok} errors={errors} hung={hung} stale={stale}"
    ));
}

type Scripts<'a> = (&'a redis::Script, &'a redis::Script, &'a redis::Script);

/// Microseconds since the Unix epoch on this host's clock (Redis `TIME` uses the same).
fn wall_clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One chaos operation. For fan-out, returns whether the result was stale.
async fn run_op(
    herd: &Herd,
    sem: &herdlock::Semaphore,
    conn: &mut redis::aio::ConnectionManager,
    (enter, exit, sem_enter): Scripts<'_>,
    prefix: &str,
    i: usize,
) -> Result<Option<bool>, herdlock::Error> {
    let deadline = Duration::from_secs(4);
    match i % 3 {
        0 => {
            let guard = herd.lock("chaos-lock", deadline).await?;
            let fence = guard.fence().get();
            let last = format!("{prefix}:ledger:last");
            let inside = format!("{prefix}:ledger:inside");
            let entered: redis::RedisResult<i64> = enter
                .key(&last)
                .key(&inside)
                .key(format!("{prefix}:ledger:inside:slot"))
                .arg(fence)
                .arg(worker_param("SLOT"))
                .invoke_async(conn)
                .await;
            if entered == Ok(1) {
                // Work that checks in with the lock service (through the herd's path, which
                // a partition freezes), raced against loss: told, the holder leaves at once.
                let told = tokio::select! {
                    () = guard.lost() => wall_clock_micros(),
                    () = async {
                        for _ in 0..3 {
                            let _ = guard.heartbeat().await;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    } => 0,
                };
                let _: redis::RedisResult<i64> = exit
                    .key(&last)
                    .key(&inside)
                    .key(format!("{prefix}:ledger:violations"))
                    .key(format!("{prefix}:ledger:late"))
                    .key(format!("{prefix}:ledger:inside:slot"))
                    .arg(fence)
                    .arg(told)
                    .invoke_async(conn)
                    .await;
            }
            let _ = guard.release().await;
            Ok(None)
        }
        1 => {
            let job = format!("chaos-job-{}", (i / 3) % 4);
            // The oldest generation this caller may accept: the run in progress now, or a
            // run that starts after the last finished one.
            let status = herd.lock_status(&job).await?;
            let oldest = status.holder.map_or(1, |h| h.fence.get());
            let options = FanoutOptions::new().ttl(Duration::from_secs(1));
            let fanned = herd
                .fanout_with(&job, deadline, &options, || async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(())
                })
                .await?;
            Ok(Some(fanned.generation.get() < oldest))
        }
        _ => {
            let permit = sem.acquire(deadline).await?;
            let member = format!("{}-{i}", worker_param("OWNER"));
            let _: redis::RedisResult<i64> = sem_enter
                .key(format!("{prefix}:sem:inside"))
                .key(format!("{prefix}:sem:violations"))
                .arg(&member)
                .arg(2)
                // Forget entries before one lease (1 s) has passed: a killed holder's permit
                // returns no sooner than a lease after its admission, so its stale entry is
                // gone before a successor can be admitted; a live hold (2 ms, or a few
                // hundred ms across a Redis pause) is far shorter than 800 ms.
                .arg(800)
                .invoke_async(conn)
                .await;
            tokio::time::sleep(Duration::from_millis(2)).await;
            let _: redis::RedisResult<i64> = redis::cmd("ZREM")
                .arg(format!("{prefix}:sem:inside"))
                .arg(&member)
                .query_async(conn)
                .await;
            let _ = permit.release().await;
            Ok(None)
        }
    }
}
