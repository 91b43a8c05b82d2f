//! Cross-process behaviour with real OS processes (see `workers.rs` for their side).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::common::procs::{ready_then_go, Worker, WorkerOutput};
use crate::common::server::{self, RedisServer};

const ENTRY: &str = "workers::worker_entry";

fn spawn_workers(
    role: &str,
    count: usize,
    prefix: &str,
    url: &str,
    params: &[(&str, String)],
) -> Vec<Worker> {
    (0..count)
        .map(|i| {
            let mut all = vec![
                ("URL", url.to_owned()),
                ("PREFIX", prefix.to_owned()),
                ("OWNER", format!("proc-{i}")),
            ];
            all.extend(params.iter().cloned());
            Worker::spawn(ENTRY, role, &all)
        })
        .collect()
}

fn finish_all(workers: Vec<Worker>, timeout: Duration) -> Vec<WorkerOutput> {
    workers
        .into_iter()
        .map(|w| {
            let out = w.finish(timeout);
            out.assert_success();
            out
        })
        .collect()
}

fn get(server: &RedisServer, key: &str) -> u64 {
    server.cmd(&["GET", key]).trim().parse().unwrap_or(0)
}

/// Issue 2, test 1: 16 contenders in 4 processes race one key; one wins, 15 see its owner.
#[test]
fn once_race_across_processes() {
    let server = server::shared();
    let prefix = server::unique_prefix("once_race");
    let mut workers = spawn_workers(
        "once_race",
        4,
        &prefix,
        &server.url(),
        &[("CONTENDERS", "4".into())],
    );
    ready_then_go(&mut workers, Duration::from_secs(30));
    let mut results = Vec::new();
    for (i, w) in workers.iter_mut().enumerate() {
        for _ in 0..4 {
            let line = w.wait_line_prefix("result ", Duration::from_secs(30));
            results.push((i, line));
        }
        w.wait_line_prefix("attempted", Duration::from_secs(30));
    }
    let winners: Vec<_> = results
        .iter()
        .filter(|(_, l)| l == "result acquired")
        .collect();
    assert_eq!(winners.len(), 1, "{results:#?}");
    let winner_owner = format!("proc-{}", winners[0].0);
    let busy: Vec<_> = results
        .iter()
        .filter(|(_, l)| l.starts_with("result busy "))
        .collect();
    assert_eq!(busy.len(), 15);
    for (_, line) in busy {
        assert_eq!(line, &format!("result busy {winner_owner}"));
    }
    for w in &mut workers {
        w.send_line("done");
    }
    finish_all(workers, Duration::from_secs(30));
}

/// Issue 2, test 2: 1,000 acquisitions from 4 processes; fencing tokens strictly increase
/// (checked by every holder against a ledger) and are never handed out twice.
#[test]
fn fencing_tokens_across_processes() {
    let server = server::shared();
    let prefix = server::unique_prefix("fence_ledger");
    let mut workers = spawn_workers(
        "fence_ledger",
        4,
        &prefix,
        &server.url(),
        &[("ACQUISITIONS", "250".into())],
    );
    ready_then_go(&mut workers, Duration::from_secs(30));
    let outputs = finish_all(workers, Duration::from_secs(120));
    let mut all = BTreeSet::new();
    for out in &outputs {
        assert_eq!(out.values("violations"), vec!["0"]);
        let fences: Vec<u64> = out.values("fences")[0]
            .split(',')
            .map(|f| f.parse().expect("fence"))
            .collect();
        assert_eq!(fences.len(), 250);
        assert!(
            fences.windows(2).all(|w| w[0] < w[1]),
            "not increasing within a process"
        );
        for f in fences {
            assert!(all.insert(f), "fence {f} handed out twice");
        }
    }
    assert_eq!(all.len(), 1000);
}

/// Issue 3, test 1: 52 callers over 4 processes, job 300 ms: one run, 52 results.
#[test]
fn fanout_herd_across_processes() {
    let server = server::shared();
    let prefix = server::unique_prefix("fanout_herd");
    let mut workers = spawn_workers(
        "fanout_herd",
        4,
        &prefix,
        &server.url(),
        &[("CALLERS", "13".into()), ("JOB_MS", "300".into())],
    );
    ready_then_go(&mut workers, Duration::from_secs(30));
    let outputs = finish_all(workers, Duration::from_secs(60));
    let values: Vec<&str> = outputs.iter().flat_map(|o| o.values("value")).collect();
    assert_eq!(values.len(), 52, "{outputs:#?}");
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");
    assert_eq!(get(server, &format!("{prefix}:runs:herd")), 1);
    assert_eq!(get(server, &format!("{prefix}:overlaps")), 0);
}

/// Issue 3, test 2: 200 rounds of a 0 ms job over 4 processes: never two overlapping runs,
/// no caller fails or times out.
#[test]
fn fanout_rounds_never_overlap() {
    let server = server::shared();
    let prefix = server::unique_prefix("fanout_rounds");
    let mut workers = spawn_workers(
        "fanout_rounds",
        4,
        &prefix,
        &server.url(),
        &[("ROUNDS", "200".into()), ("CALLERS", "3".into())],
    );
    ready_then_go(&mut workers, Duration::from_secs(30));
    let outputs = finish_all(workers, Duration::from_secs(120));
    for out in &outputs {
        assert_eq!(out.values("errors"), vec!["0"], "{out:#?}");
    }
    assert_eq!(get(server, &format!("{prefix}:overlaps")), 0);
    // Every round ran at least once and at most once per process (a process whose
    // callers arrive after a run finished starts a new one, by design).
    for round in 0..200 {
        let runs = get(server, &format!("{prefix}:runs:round-{round}"));
        assert!((1..=4).contains(&runs), "round {round}: {runs} runs");
    }
}

/// Issue 3, test 4: a job's error reaches every waiter in every process, identical.
#[test]
fn fanout_errors_across_processes() {
    let server = server::shared();
    let prefix = server::unique_prefix("fanout_error");
    let mut workers = spawn_workers(
        "fanout_error",
        4,
        &prefix,
        &server.url(),
        &[("CALLERS", "5".into())],
    );
    ready_then_go(&mut workers, Duration::from_secs(30));
    let outputs = finish_all(workers, Duration::from_secs(60));
    let errors: Vec<&str> = outputs.iter().flat_map(|o| o.values("error")).collect();
    assert_eq!(errors.len(), 20, "{outputs:#?}");
    assert!(errors.windows(2).all(|w| w[0] == w[1]), "{errors:?}");
    let parts: Vec<&str> = errors[0].split('|').collect();
    assert_eq!(parts[0], "JobFailed");
    assert!(parts[1].starts_with("boom from proc-"), "{parts:?}");
    assert_eq!(parts[2], "E_BOOM");
}

/// Issue 3, test 6: the leader process is killed mid-job (TTL 1 s, job 3 s); the waiters in
/// the other processes elect a new leader, the job runs once more, and every waiter gets
/// that result before its 10 s deadline.
#[test]
fn leader_killed_mid_job_is_taken_over() {
    let server = server::shared();
    let prefix = server::unique_prefix("takeover");
    let params = [
        ("CALLERS", "3".to_owned()),
        ("TTL_MS", "1000".to_owned()),
        ("JOB_MS", "3000".to_owned()),
    ];
    let mut leader = spawn_workers("fanout_takeover", 1, &prefix, &server.url(), &params);
    ready_then_go(&mut leader, Duration::from_secs(30));
    leader[0].wait_line_prefix("running", Duration::from_secs(30));
    let mut followers: Vec<Worker> = (1..4)
        .map(|i| {
            Worker::spawn(
                ENTRY,
                "fanout_takeover",
                &[
                    ("URL", server.url()),
                    ("PREFIX", prefix.clone()),
                    ("OWNER", format!("proc-{i}")),
                    ("CALLERS", "3".into()),
                    ("TTL_MS", "1000".into()),
                    ("JOB_MS", "3000".into()),
                ],
            )
        })
        .collect();
    ready_then_go(&mut followers, Duration::from_secs(30));
    // All three follower processes are waiting on the run once they are subscribed.
    let channel = format!("{prefix}:{{takeover}}");
    server.wait_subscribers(&channel, 3, Duration::from_secs(20));
    let killed = leader.pop().expect("leader");
    let mut killed = killed;
    killed.kill9();
    let outputs = finish_all(followers, Duration::from_secs(30));
    let mut values = HashMap::new();
    for out in &outputs {
        assert!(out.values("error").is_empty(), "{out:#?}");
        for v in out.values("value") {
            let (value, after) = v.split_once(" after_ms ").expect("value line");
            let after: u64 = after.parse().expect("ms");
            assert!(after < 10_000, "resolved after {after} ms");
            *values.entry(value.to_owned()).or_insert(0) += 1;
        }
    }
    assert_eq!(values.len(), 1, "{values:?}");
    assert_eq!(values.values().sum::<i32>(), 9);
    // The killed run, then exactly one takeover run.
    assert_eq!(get(server, &format!("{prefix}:runs:takeover")), 2);
}
