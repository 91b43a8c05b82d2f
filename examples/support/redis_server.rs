//! A throwaway `redis-server` on a free loopback port, shared by `examples/loadgen.rs` and
//! `benches/herdlock.rs` (included by `#[path]`; this directory has no `main.rs`, so cargo
//! does not build it as an example).
//!
//! The server runs without persistence (`--save "" --appendonly no`) in its own temporary
//! directory, and is killed (and the directory removed) when the handle is dropped: on a
//! normal exit, on an error return and while unwinding from a panic.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a fresh server may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts, in case another process takes the probed port before the server binds it.
const START_ATTEMPTS: usize = 3;

/// A running `redis-server`; killed on drop.
#[derive(Debug)]
pub(crate) struct RedisServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl RedisServer {
    /// Starts `redis-server` (or `$REDIS_SERVER_BIN`) on `127.0.0.1:<free port>` and waits
    /// until it answers `PING`.
    pub(crate) fn start() -> io::Result<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// Like [`RedisServer::start`], with `extra` arguments for `redis-server`.
    pub(crate) fn start_with(extra: &[String]) -> io::Result<RedisServer> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match RedisServer::try_start(extra) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    /// `redis://127.0.0.1:<port>/`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on.
    #[allow(dead_code)] // used by loadgen's cluster, not by the benches
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    fn try_start(extra: &[String]) -> io::Result<RedisServer> {
        let port = free_port()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "herdlock-redis-{}-{port}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
        let spawned = Command::new(&bin)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(
                extra
                    .iter()
                    .map(|a| a.replace("{dir}", &dir.to_string_lossy())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(io::Error::new(e.kind(), format!("cannot run `{bin}`: {e}")));
            }
        };
        // From here on, Drop kills the child and removes the directory.
        let mut server = RedisServer { child, dir, port };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "redis-server exited early ({status}); log: {}",
                    self.log_tail()
                )));
            }
            if ping(self.port).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "redis-server did not answer PING within {START_TIMEOUT:?}; log: {}",
                        self.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port that was free a moment ago: bind `127.0.0.1:0`, read the port, let it go.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// One `PING` over plain RESP, without a client library.
fn ping(port: u16) -> io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut line = String::new();
    BufReader::new((&stream).take(64)).read_line(&mut line)?;
    if line.starts_with("+PONG") {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected PING reply {line:?}")))
    }
}

/// How long a fresh cluster may take to say `cluster_state:ok` on every node.
#[allow(dead_code)]
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A throwaway Redis Cluster of 3 masters and 3 replicas on free loopback ports, formed
/// with `redis-cli --cluster create`; every node is killed on drop.
#[allow(dead_code)] // used by loadgen, not by the benches
#[derive(Debug)]
pub(crate) struct RedisCluster {
    nodes: Vec<RedisServer>,
}

#[allow(dead_code)]
impl RedisCluster {
    /// Starts 6 nodes (`--cluster-enabled yes`, each with its own config file in its own
    /// directory, a 1 s node timeout), joins them with `redis-cli --cluster create …
    /// --cluster-replicas 1`, and waits until every node says `cluster_state:ok`.
    pub(crate) fn start() -> io::Result<RedisCluster> {
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "{dir}/nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-announce-ip",
            "127.0.0.1",
            "--repl-diskless-sync-delay",
            "0",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let nodes = (0..6)
            .map(|_| RedisServer::start_with(&args))
            .collect::<io::Result<Vec<_>>>()?;
        let cluster = RedisCluster { nodes };
        let mut create = Command::new(cli_bin());
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !stdout.contains("All 16384 slots covered") {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed ({}): {stdout}",
                output.status
            )));
        }
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        for node in &cluster.nodes {
            loop {
                let info = cli(node.port, &["CLUSTER", "INFO"])?;
                let replication = cli(node.port, &["INFO", "replication"])?;
                let ready = info.lines().any(|l| l.trim_end() == "cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"));
                if ready {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("cluster node {} not ready: {info}", node.port),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// Every node's `redis://127.0.0.1:<port>/`.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The URLs of the nodes that are masters now (`INFO replication` says `role:master`).
    pub(crate) fn master_urls(&self) -> io::Result<Vec<String>> {
        let mut masters = Vec::new();
        for node in &self.nodes {
            if cli(node.port, &["INFO", "replication"])?.contains("role:master") {
                masters.push(node.url());
            }
        }
        Ok(masters)
    }
}

#[allow(dead_code)]
fn cli_bin() -> String {
    std::env::var("REDIS_CLI_BIN").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// One command through `redis-cli -p <port>`; its stdout.
#[allow(dead_code)]
fn cli(port: u16, args: &[&str]) -> io::Result<String> {
    let output = Command::new(cli_bin())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
