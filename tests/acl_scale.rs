//! Issue 11, test 6 (least privilege at scale): a user restricted to exactly the README's
//! rule for a Redis Cluster (its cluster part) runs the smoke set on a 3-master cluster,
//! and so do a master user restricted to the one-node rule plus `+role` and a Sentinel user
//! restricted to the README's Sentinel rule; one right less is refused at connect with
//! `ErrorKind::Permission` naming it.

use std::time::{Duration, Instant};

use herdlock::{Error, ErrorKind, Herd};

use crate::common::cluster::RedisCluster;
use crate::common::sentinel::SentinelGroup;
use crate::common::server::unique_prefix;
use crate::smoke::{self, channel};

const PASSWORD: &str = "s3cret-pass";

/// The commands of the README rule a Redis Cluster does not use (one-node pub/sub).
const ONE_NODE_ONLY: &[&str] = &["+subscribe", "+unsubscribe", "+publish"];
/// The cluster part of the README rule.
const CLUSTER_ONLY: &[&str] = &[
    "+ssubscribe",
    "+sunsubscribe",
    "+spublish",
    "+eval",
    "+cluster|slots",
    "+cluster|shards",
];

/// The rule README.md documents for `user` (its `ACL SETUSER user reset on >PASSWORD …`
/// line), as the arguments after `reset >PASSWORD`, with `herdlock:*` replaced by
/// `prefix:*`.
fn readme_rule(user: &str, prefix: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = format!("ACL SETUSER {user} reset on >PASSWORD ");
    let line = readme
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("README.md documents `{start}…`"));
    line.split_whitespace()
        .skip(3)
        .filter(|w| *w != "reset" && *w != ">PASSWORD")
        .map(|w| w.replace("herdlock:*", &format!("{prefix}:*")))
        .collect()
}

/// The README rule without `drop`, plus `add`.
fn edit(rule: Vec<String>, drop: &[&str], add: &[&str]) -> Vec<String> {
    let mut rule: Vec<String> = rule
        .into_iter()
        .filter(|r| !drop.contains(&r.as_str()))
        .collect();
    rule.extend(add.iter().map(|r| (*r).to_owned()));
    rule
}

fn cluster_rule(prefix: &str) -> Vec<String> {
    edit(readme_rule("herdlock", prefix), ONE_NODE_ONLY, &[])
}

fn master_rule(prefix: &str) -> Vec<String> {
    edit(readme_rule("herdlock", prefix), CLUSTER_ONLY, &["+role"])
}

fn sentinel_rule() -> Vec<String> {
    readme_rule("herdlock-sentinel", "herdlock")
}

/// Asserts `acl_log` (a server's `ACL LOG`) holds no refusal but the connect check's
/// `ACL DRYRUN` (and redis-rs's ignored `CLIENT SETINFO` on servers that have it).
fn only_dry_runs_refused(what: &str, acl_log: &str) {
    let objects: Vec<&str> = acl_log
        .lines()
        .zip(acl_log.lines().skip(1))
        .filter(|(name, _)| *name == "object")
        .map(|(_, value)| value)
        .collect();
    assert!(
        objects
            .iter()
            .all(|o| *o == "acl|dryrun" || *o == "client|setinfo"),
        "{what} refused: {objects:?}\n{acl_log}"
    );
}

fn strs(rule: &[String]) -> Vec<&str> {
    rule.iter().map(String::as_str).collect()
}

fn builder(prefix: &str, owner: &str) -> herdlock::Builder {
    Herd::builder()
        .prefix(prefix)
        .owner(owner)
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(2))
}

fn expect_permission(result: Result<Herd, Error>, what: &str, needles: &[&str]) {
    match result {
        Ok(_) => panic!("{what}: connect succeeded, expected Permission"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Permission, "{what}: {e}");
            let text = format!("{e} / {e:?}");
            for needle in needles {
                assert!(text.contains(needle), "{what}: no {needle:?} in {text}");
            }
            eprintln!("{what}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------

/// Issue 11, test 6 on a cluster: a user restricted to exactly the README rule's cluster
/// part (created on every node) runs the smoke set through `connect_cluster`; the same rule
/// without `SPUBLISH`, without `SSUBSCRIBE` or without channels is refused at connect with
/// `Permission` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_least_privilege_user_runs_the_smoke_set() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster");
    eprintln!("cluster started in {:?}", cluster.started_in());
    let prefix = unique_prefix("acl-cluster");
    let urls = cluster.acl_user("app", PASSWORD, &strs(&cluster_rule(&prefix)));
    let a = builder(&prefix, "a")
        .connect_cluster(&urls)
        .await
        .expect("a connects as the least-privileged user");
    let b = builder(&prefix, "b")
        .connect_cluster(&urls)
        .await
        .expect("b connects as the least-privileged user");
    let subscribed = |key: &str| {
        cluster
            .shard_subscribers(&channel(&prefix, key))
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>()
            >= 1
    };
    smoke::fanout(&a, &b).await;
    smoke::lock(&a, &b, subscribed).await;
    smoke::multi(&a, &b, subscribed).await;
    smoke::semaphore(&a, &b, false, subscribed).await;
    drop((a, b));
    for node in cluster.live() {
        only_dry_runs_refused(
            &format!("node {node}"),
            &cluster.node(node).cmd(&["ACL", "LOG"]),
        );
    }

    let channels = format!("&{prefix}:*");
    let cases: [(&str, Vec<String>, &[&str]); 3] = [
        (
            "nospublish",
            edit(cluster_rule(&prefix), &["+spublish"], &[]),
            &["`spublish` (command not allowed)", "+spublish"],
        ),
        (
            "nossubscribe",
            edit(cluster_rule(&prefix), &["+ssubscribe"], &[]),
            &["`ssubscribe` (command not allowed)", "+ssubscribe"],
        ),
        (
            "nochannels",
            edit(cluster_rule(&prefix), &[&channels], &[]),
            &["(no access to channels", &channels],
        ),
    ];
    for (name, rule, needles) in cases {
        let urls = cluster.acl_user(name, PASSWORD, &strs(&rule));
        let refused = builder(&prefix, name).connect_cluster(&urls).await;
        let mut needles = needles.to_vec();
        needles.push(name);
        expect_permission(refused, name, &needles);
    }
    eprintln!("cluster acl test took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------------------

/// Issue 11, test 6 through Sentinel: a master user restricted to the one-node rule plus
/// `+role` and Sentinels' user restricted to the README's Sentinel rule run a lock and a
/// fan-out; the master rule without `+subscribe` or without `+role`, and the Sentinel rule
/// without `+sentinel|get-master-addr-by-name`, are refused at connect with `Permission`
/// naming the right. The restricted users also carry both herds through a failover (the
/// master killed with `kill -9`, the replica promoted): the smoke set passes again on the
/// new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_least_privilege_users_run_the_smoke_set() {
    let started = Instant::now();
    let mut group = tokio::task::spawn_blocking(SentinelGroup::start)
        .await
        .expect("sentinel group");
    eprintln!("sentinel group started in {:?}", group.started_in());
    let prefix = unique_prefix("acl-sentinel");
    let sentinel_rule = sentinel_rule();
    let sentinel_urls: Vec<String> = (0..group.sentinel_urls().len())
        .map(|i| {
            group
                .sentinel(i)
                .acl_user("watcher", PASSWORD, &strs(&sentinel_rule))
        })
        .collect();
    // ACL users are per server and not replicated: create it on the replica too, as a
    // failover would need.
    let master_rule = master_rule(&prefix);
    for node in [group.master(), group.replica()] {
        node.acl_user("app", PASSWORD, &strs(&master_rule));
    }
    let master_name = group.master_name().to_owned();
    let connect = |owner: &'static str, user: &'static str| {
        builder(&prefix, owner)
            .master_auth(Some(user), PASSWORD)
            .connect_sentinel(&master_name, &sentinel_urls)
    };
    let a = connect("a", "app").await.expect("a connects");
    let b = connect("b", "app").await.expect("b connects");
    let subscribed = |key: &str| group.master().subscribers(&channel(&prefix, key)) >= 1;
    smoke::fanout(&a, &b).await;
    smoke::lock(&a, &b, subscribed).await;
    // A failover with the restricted users: both herds follow `+switch-master` (subscribed
    // on a Sentinel as `watcher`), check the new master's role as `app`, and run the smoke
    // set again there.
    let failover = tokio::task::block_in_place(|| group.kill_master_and_wait_failover());
    eprintln!(
        "acl sentinel failover: promoted after {:?}",
        failover.promoted_after
    );
    let recovered = Instant::now();
    let subscribed = |key: &str| group.master().subscribers(&channel(&prefix, key)) >= 1;
    smoke::fanout(&a, &b).await;
    smoke::lock(&a, &b, subscribed).await;
    eprintln!(
        "acl sentinel: smoke set on the new master took {:?}",
        recovered.elapsed()
    );
    drop((a, b));
    only_dry_runs_refused("the master", &group.master().cmd(&["ACL", "LOG"]));
    for i in 0..sentinel_urls.len() {
        only_dry_runs_refused("a sentinel", &group.sentinel(i).cmd(&["ACL", "LOG"]));
    }

    for (name, drop_rule, needles) in [
        (
            "nosubscribe",
            "+subscribe",
            &["`subscribe` (command not allowed)", "+subscribe"][..],
        ),
        (
            "norole",
            "+role",
            &["may not run `role` on the master", "`+role`"][..],
        ),
    ] {
        let rule = edit(master_rule.clone(), &[drop_rule], &[]);
        group.master().acl_user(name, PASSWORD, &strs(&rule));
        let refused = connect("c", name).await;
        expect_permission(refused, name, needles);
    }
    // The Sentinels' user without the lookup.
    let rule = edit(sentinel_rule, &["+sentinel|get-master-addr-by-name"], &[]);
    let nolookup: Vec<String> = (0..sentinel_urls.len())
        .map(|i| {
            group
                .sentinel(i)
                .acl_user("nolookup", PASSWORD, &strs(&rule))
        })
        .collect();
    let refused = builder(&prefix, "c")
        .master_auth(Some("app"), PASSWORD)
        .connect_sentinel(group.master_name(), &nolookup)
        .await;
    expect_permission(
        refused,
        "nolookup",
        &["may not run `sentinel|get-master-addr-by-name` on a sentinel"],
    );
    eprintln!("sentinel acl test took {:?}", started.elapsed());
}
