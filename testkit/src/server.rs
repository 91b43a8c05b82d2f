//! A real `redis-server` for the tests: on a free loopback port, in its own temp dir, with no
//! persistence, a log file, a readiness check, and a kill on drop.
//!
//! Most tests share one server per test binary ([`shared`]) and keep out of each other's way with
//! a [`unique_prefix`]. A test that stops, restarts or otherwise breaks the server starts its own
//! with [`RedisServer::start`] or [`RedisServer::start_with`].
//!
//! The same type runs a cluster node ([`ServerConfig::cluster`], see [`crate::cluster`]), a
//! Sentinel ([`ServerConfig::sentinel_conf`], see [`crate::sentinel`]) and a TLS-only server
//! ([`ServerConfig::tls`], see [`crate::tls`]).
//!
//! The binaries come from `PATH` unless [`REDIS_SERVER_ENV`] / [`REDIS_CLI_ENV`] name others.
//! `scripts/test` installs them on Debian.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::tls::Tls;

/// Env var naming the `redis-server` binary to run (default: `redis-server` on `PATH`).
pub const REDIS_SERVER_ENV: &str = "HERDLOCK_REDIS_SERVER";

/// Env var naming the `redis-cli` binary [`RedisServer::cmd`] runs (default: `redis-cli` on `PATH`).
pub const REDIS_CLI_ENV: &str = "HERDLOCK_REDIS_CLI";

/// How long a server may take to answer its first command after being spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many fresh ports [`RedisServer::start_with`] tries when another process takes the
/// port between our probe and the server's bind.
const START_ATTEMPTS: u32 = 5;

/// How many log lines a failing test prints.
const LOG_TAIL_LINES: usize = 50;

/// How far a cluster node's bus port is from its client port (Redis's default `cluster-port`).
pub const CLUSTER_BUS_OFFSET: u16 = 10_000;

/// How a server is configured. `ServerConfig::default()` is what [`RedisServer::start`] uses.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// `--requirepass`: clients must `AUTH` with this password. Default: none.
    pub password: Option<String>,
    /// More `redis-server` arguments, appended after the harness's own (which they override),
    /// for example `["--maxmemory", "1mb"]`. Default: none.
    pub extra_args: Vec<String>,
    /// Run as a cluster node: `--cluster-enabled yes` with its own `nodes.conf`, a 1 s
    /// `cluster-node-timeout`, `cluster-announce-ip 127.0.0.1`, on a port whose bus port
    /// (port + 10000) is free too. [`crate::cluster::RedisCluster`] sets it. Default: no.
    pub cluster: bool,
    /// Run as a Sentinel (`redis-server sentinel.conf --sentinel`) with this config, written
    /// to `sentinel.conf` in the server's dir (Sentinel rewrites it as it learns).
    /// [`crate::sentinel::SentinelGroup`] sets it. Default: a plain server.
    pub sentinel_conf: Option<String>,
    /// Listen with TLS only (`--port 0 --tls-port PORT`): [`RedisServer::url`] is `rediss://`,
    /// [`RedisServer::cmd`] runs `redis-cli --tls` with the CA and the client certificate,
    /// and replication (and a cluster's bus) use TLS too. Default: plain TCP.
    pub tls: Option<Tls>,
    /// Listen on exactly this port: one attempt, no fresh port when it is taken (see
    /// [`RedisServer::try_start_with`]). Default: a free port picked by the harness.
    pub port: Option<u16>,
}

/// A `redis-server` process the test owns.
///
/// Dropping it kills the server (SIGKILL), waits for it and removes its temp dir. If the
/// thread is panicking, the tail of the server log is printed to stderr first.
///
/// A watchdog (see [`Watchdog`]) kills the server if the test process dies without running
/// `Drop`: a crash, a `kill -9`, or, for [`shared`], the normal end of the test binary.
#[derive(Debug)]
pub struct RedisServer {
    /// The loopback port; it never changes, [`RedisServer::restart`] reuses it.
    port: u16,
    /// `--requirepass`, also used by [`RedisServer::cmd`] and [`RedisServer::url`].
    password: Option<String>,
    /// Extra `redis-server` arguments from [`ServerConfig`].
    extra_args: Vec<String>,
    /// [`ServerConfig::cluster`].
    cluster: bool,
    /// `sentinel.conf` in `dir` when this is a Sentinel ([`ServerConfig::sentinel_conf`]).
    sentinel_conf: Option<PathBuf>,
    /// [`ServerConfig::tls`].
    tls: Option<Tls>,
    /// The server's working dir, holding `redis.log` and `redis.stderr`; removed on drop.
    dir: PathBuf,
    /// The running server; `None` after [`RedisServer::stop`] or a failed start.
    process: Option<Child>,
    /// While stopped: sockets bound (not listening) to the port and, for a cluster node, its
    /// bus port (see [`reserve_port`]).
    reserved: Vec<socket2::Socket>,
    /// Kills the server if this process dies without dropping `self`.
    watchdog: Watchdog,
}

impl RedisServer {
    /// Starts a private server with the default [`ServerConfig`] and waits until it answers.
    ///
    /// # Panics
    ///
    /// If the server cannot be started or does not answer within 10 s; the message says why
    /// and the log tail is printed.
    pub fn start() -> RedisServer {
        RedisServer::start_with(ServerConfig::default())
    }

    /// Starts a private server with `config` and waits until it answers.
    ///
    /// If another process takes the port before the server binds it, starts again on a
    /// fresh port (up to 5 times).
    ///
    /// # Panics
    ///
    /// If the server cannot be started or does not answer within 10 s, or if the fixed
    /// [`ServerConfig::port`] is taken.
    pub fn start_with(config: ServerConfig) -> RedisServer {
        match RedisServer::try_start_with(config) {
            Ok(server) => server,
            Err(PortsTaken(clashes)) => panic!("redis-server could not bind a free port; ports taken before it could bind them: {clashes:?}"),
        }
    }

    /// Like [`RedisServer::start_with`], but when the port is taken before the server binds
    /// it (every attempt, or the one attempt on a fixed [`ServerConfig::port`]), returns the
    /// ports tried instead of panicking: a group of servers that know each other's ports
    /// (Sentinels) then starts again on fresh ones.
    ///
    /// # Panics
    ///
    /// If the server fails to start for any other reason.
    pub fn try_start_with(config: ServerConfig) -> Result<RedisServer, PortsTaken> {
        match RedisServer::launch_with(config) {
            Ok(server) => Ok(server),
            Err(StartError::PortsTaken(ports)) => Err(ports),
            Err(StartError::Failed(why)) => panic!("redis-server failed to start: {why}"),
        }
    }

    /// Starts a private server with the default [`ServerConfig`], like
    /// [`RedisServer::start`], but returns why it could not (no `redis-server` binary, a
    /// server that exits or does not answer, every port taken) instead of panicking: for
    /// tools (the load generator, the benches) that go on without Redis or report the error
    /// their own way.
    ///
    /// # Errors
    ///
    /// [`StartError`], saying why, with the server log's tail when there is one.
    pub fn try_start() -> Result<RedisServer, StartError> {
        RedisServer::launch_with(ServerConfig::default())
    }

    fn launch_with(config: ServerConfig) -> Result<RedisServer, StartError> {
        let dir = make_temp_dir("herdlock-redis");
        let watchdog = Watchdog::spawn(&dir);
        let sentinel_conf = config.sentinel_conf.map(|text| {
            let path = dir.join("sentinel.conf");
            fs::write(&path, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            path
        });
        // Built before the first launch so that a panic below still runs `Drop`, which prints
        // the log and removes the dir.
        let mut server = RedisServer {
            port: 0,
            password: config.password,
            extra_args: config.extra_args,
            cluster: config.cluster,
            sentinel_conf,
            tls: config.tls,
            dir,
            process: None,
            reserved: Vec::new(),
            watchdog,
        };
        let attempts = if config.port.is_some() {
            1
        } else {
            START_ATTEMPTS
        };
        let mut clashes = Vec::new();
        for _ in 0..attempts {
            server.port = match config.port {
                Some(port) => port,
                None if server.cluster => free_port_with_bus(),
                None => free_port(),
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(LaunchError::PortInUse) => clashes.push(server.port),
                Err(LaunchError::Failed(why)) => return Err(StartError::Failed(why)),
            }
        }
        Err(StartError::PortsTaken(PortsTaken(clashes)))
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to connect with: `redis://127.0.0.1:PORT/`, or `redis://:PASSWORD@127.0.0.1:PORT/`
    /// when the server has a password; `rediss://` instead of `redis://` for a TLS server
    /// (a client must trust [`TlsCerts::ca_cert`](crate::tls::TlsCerts::ca_cert)).
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => self.url_with_password(password),
            None => format!("{}://127.0.0.1:{}/", self.scheme(), self.port),
        }
    }

    /// The server's URL with `password` in it, right or wrong: `redis://:PASSWORD@127.0.0.1:PORT/`
    /// (`rediss://` for a TLS server). The password is percent-encoded.
    pub fn url_with_password(&self, password: &str) -> String {
        format!(
            "{}://:{}@127.0.0.1:{}/",
            self.scheme(),
            percent_encode(password),
            self.port
        )
    }

    /// The server's URL for the ACL user `user` with `password`:
    /// `redis://USER:PASSWORD@127.0.0.1:PORT/` (`rediss://` for a TLS server), both
    /// percent-encoded.
    pub fn url_for_user(&self, user: &str, password: &str) -> String {
        format!(
            "{}://{}:{}@127.0.0.1:{}/",
            self.scheme(),
            percent_encode(user),
            percent_encode(password),
            self.port
        )
    }

    /// `rediss` for a TLS server, else `redis`.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// The server's TLS settings, if it listens with TLS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// Whether this is a Sentinel.
    pub fn is_sentinel(&self) -> bool {
        self.sentinel_conf.is_some()
    }

    /// Creates (or replaces) the ACL user `user` with `password` and exactly `rules` (after a
    /// `reset`, so nothing else: add `on` and the rights to grant), and returns its URL. For
    /// permission tests; the user lives until the server stops.
    ///
    /// # Panics
    ///
    /// If the server rejects a rule.
    pub fn acl_user(&self, user: &str, password: &str, rules: &[&str]) -> String {
        let pass = format!(">{password}");
        let mut args = vec!["ACL", "SETUSER", user, "reset", pass.as_str()];
        args.extend_from_slice(rules);
        let reply = self.cmd(&args);
        assert_eq!(reply, "OK", "ACL SETUSER {user} {rules:?}: {reply}");
        self.url_for_user(user, password)
    }

    /// The server's password, if it has one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The server's working dir (kept across [`RedisServer::restart`], removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's process id, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Runs `redis-cli -h 127.0.0.1 -p PORT [-a PASSWORD] ARGS...` and returns its stdout,
    /// without the final newline.
    ///
    /// Meant for fault injection and inspection: `CLIENT KILL TYPE pubsub`, `CLIENT PAUSE 500`,
    /// `DEBUG SLEEP 1` (enabled for local clients on Redis 7+), `INFO commandstats`, `KEYS p*`.
    /// An array reply comes back one element per line. An error reply (`ERR ...`, `WRONGTYPE ...`)
    /// comes back as text, because `redis-cli` exits with success on those: assert on it.
    /// This blocks until the reply arrives; to run a command in the background (say
    /// `DEBUG SLEEP` while the test goes on), use [`RedisServer::spawn_cmd`].
    ///
    /// # Panics
    ///
    /// If `redis-cli` cannot be run or fails (for example, the server is stopped).
    pub fn cmd(&self, args: &[&str]) -> String {
        let output = self
            .cli_command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (install redis-tools, or set {REDIS_CLI_ENV}): {e}",
                    cli_binary()
                )
            });
        assert!(
            output.status.success(),
            "redis-cli {args:?} against port {} failed with {}: {}{}",
            self.port,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        let mut stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        stdout
    }

    /// Runs `commands` in order on one connection (`redis-cli` reading them from its stdin)
    /// and returns the replies like [`RedisServer::cmd`], one after the other. For what needs
    /// one connection: `WAIT` counts the replicas that have *this connection's* writes, so
    /// `WAIT` sent by a second [`RedisServer::cmd`] returns at once, whatever the replicas
    /// have.
    ///
    /// # Panics
    ///
    /// Like [`RedisServer::cmd`].
    pub fn cmds(&self, commands: &[&[&str]]) -> String {
        let mut script = String::new();
        for command in commands {
            let quoted: Vec<String> = command
                .iter()
                .map(|arg| {
                    let escaped = arg
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n")
                        .replace('\r', "\\r");
                    format!("\"{escaped}\"")
                })
                .collect();
            script.push_str(&quoted.join(" "));
            script.push('\n');
        }
        let mut child = self
            .cli_command(&[])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (install redis-tools, or set {REDIS_CLI_ENV}): {e}",
                    cli_binary()
                )
            });
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .expect("redis-cli reads its stdin");
        }
        let output = child.wait_with_output().expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli {commands:?} against port {} failed with {}: {}{}",
            self.port,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        let mut stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        stdout
    }

    /// Starts `redis-cli ... ARGS...` like [`RedisServer::cmd`] without waiting for it: for
    /// commands that block the server, such as `DEBUG SLEEP 2`. Its stdout and stderr are
    /// piped; `wait_with_output` on the returned child collects them.
    ///
    /// # Panics
    ///
    /// If `redis-cli` cannot be run.
    pub fn spawn_cmd(&self, args: &[&str]) -> Child {
        self.cli_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (install redis-tools, or set {REDIS_CLI_ENV}): {e}",
                    cli_binary()
                )
            })
    }

    /// Calls the server has counted (`INFO commandstats`) for the commands whose names
    /// are listed (lower case, as Redis prints them), or for every command when `commands`
    /// is empty.
    ///
    /// # Panics
    ///
    /// Like [`RedisServer::cmd`].
    pub fn command_calls(&self, commands: &[&str]) -> u64 {
        self.cmd(&["INFO", "commandstats"])
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                if !commands.is_empty() && !commands.contains(&name) {
                    return None;
                }
                stats
                    .split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// How many connections the server has accepted so far (`INFO stats`,
    /// `total_connections_received`), not counting the `redis-cli` connection that asks.
    ///
    /// # Panics
    ///
    /// Like [`RedisServer::cmd`].
    pub fn connections_received(&self) -> u64 {
        let total = self
            .cmd(&["INFO", "stats"])
            .lines()
            .find_map(|line| line.trim_end().strip_prefix("total_connections_received:"))
            .and_then(|n| n.parse::<u64>().ok())
            .expect("INFO stats has total_connections_received");
        total - 1
    }

    /// How many clients are subscribed to `channel` (`PUBSUB NUMSUB`).
    ///
    /// # Panics
    ///
    /// Like [`RedisServer::cmd`].
    pub fn subscribers(&self, channel: &str) -> u32 {
        self.cmd(&["PUBSUB", "NUMSUB", channel])
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Polls (bounded) until at least `n` clients are subscribed to `channel`: how a test
    /// knows a waiter has reached its wait.
    ///
    /// # Panics
    ///
    /// If that does not happen within `timeout`.
    pub fn wait_subscribers(&self, channel: &str, n: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.subscribers(channel) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} subscribers on {channel} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every key herdlock may have made under `prefix`, sorted: those matching `PREFIX:*` and
    /// `PREFIX` itself (glob characters in `prefix` are escaped). Use it to check that a test
    /// left nothing behind.
    ///
    /// # Panics
    ///
    /// Like [`RedisServer::cmd`].
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        let escaped = glob_escape(prefix);
        let mut keys: Vec<String> = [format!("{escaped}:*"), escaped]
            .iter()
            .flat_map(|pattern| {
                self.cmd(&["KEYS", pattern])
                    .lines()
                    .filter(|line| !line.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Kills the server with SIGKILL and waits for it to die, keeping its port and dir for
    /// [`RedisServer::restart`]. Connections see a reset; all data is lost (there is no
    /// persistence). Does nothing if the server is already stopped.
    ///
    /// Until the restart (or the drop), the port (and a cluster node's bus port) stays
    /// reserved: connecting to it is refused, as to any dead server, but no server that
    /// another test starts on a free port can get it. Without this, a client, Sentinel or
    /// cluster node still dialling the dead server's address could reach another test's
    /// server, and a restart could find its port taken.
    pub fn stop(&mut self) {
        let Some(mut child) = self.process.take() else {
            return;
        };
        // Once SIGKILL is sent the server is doomed, but its pid stays ours until `wait`
        // reaps it: tell the watchdog to forget the pid in between, so it can never kill a
        // recycled pid.
        let _ = child.kill();
        self.watchdog.forget();
        let _ = child.wait();
        self.reserved = self
            .ports()
            .into_iter()
            .filter_map(|port| reserve_port(port).ok())
            .collect();
    }

    /// The ports the server listens on: its port, and a cluster node's bus port.
    fn ports(&self) -> Vec<u16> {
        let mut ports = vec![self.port];
        if self.cluster {
            ports.extend(self.port.checked_add(CLUSTER_BUS_OFFSET));
        }
        ports
    }

    /// Starts the server again on the same port and dir (stopping it first if it runs) and
    /// waits until it answers. The new server is empty.
    ///
    /// # Panics
    ///
    /// If the server does not come back within 10 s, for example because another process
    /// took the port meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return,
                // Something (perhaps an outgoing connection's ephemeral port) holds the port
                // for now; it must be ours again, so retry until the deadline.
                Err(LaunchError::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(LaunchError::PortInUse) => panic!(
                    "redis-server could not restart: port {} stayed in use for {READY_TIMEOUT:?}",
                    self.port
                ),
                Err(LaunchError::Failed(why)) => panic!("redis-server failed to restart: {why}"),
            }
        }
    }

    /// The last `lines` lines of the server log, then anything the server wrote to stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        let mut tail = all[all.len().saturating_sub(lines)..].join("\n");
        let stderr = fs::read_to_string(self.dir.join("redis.stderr")).unwrap_or_default();
        if !stderr.trim().is_empty() {
            tail.push_str("\n--- redis-server stderr ---\n");
            tail.push_str(&stderr);
        }
        tail
    }

    /// A `redis-cli` command line for this server, stdio not yet set: host, port, password,
    /// and for a TLS server `--tls` with the CA and the client certificate, then `args`
    /// (which may start with more `redis-cli` options, such as `-c`).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(cli_binary());
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(password) = &self.password {
            command.args(["--no-auth-warning", "-a", password]);
        }
        if let Some(tls) = &self.tls {
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(tls.certs.ca_cert())
                .arg("--cert")
                .arg(tls.certs.client_cert())
                .arg("--key")
                .arg(tls.certs.client_key());
        }
        command.args(args);
        command
    }

    /// The `redis-server` command line for this server, before [`ServerConfig::extra_args`]
    /// and stdio.
    fn server_command(&self, binary: &str, log_path: &Path) -> Command {
        let mut command = Command::new(binary);
        if let Some(conf) = &self.sentinel_conf {
            command.arg(conf).arg("--sentinel");
        }
        let port = self.port.to_string();
        match &self.tls {
            None => {
                command.args(["--port", &port]);
            }
            Some(tls) => {
                command
                    .args(["--port", "0", "--tls-port", &port])
                    .arg("--tls-cert-file")
                    .arg(tls.certs.server_cert())
                    .arg("--tls-key-file")
                    .arg(tls.certs.server_key())
                    .arg("--tls-ca-cert-file")
                    .arg(tls.certs.ca_cert())
                    .args(["--tls-auth-clients", tls.auth_clients.as_arg()])
                    .args(["--tls-replication", "yes"]);
                if self.cluster {
                    command.args(["--tls-cluster", "yes"]);
                }
            }
        }
        if self.cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-announce-ip",
                "127.0.0.1",
                // A replica may always take over, however long since it last heard its master.
                "--cluster-replica-validity-factor",
                "0",
            ]);
        }
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // Redis 7.0 waits 5 s before a replica's first sync by default.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(log_path);
        if debug_command_is_configurable() {
            // Redis 7 refuses `DEBUG` unless told otherwise; fault tests use `DEBUG SLEEP`.
            command.args(["--enable-debug-command", "local"]);
        }
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        command
    }

    /// Spawns `redis-server` on `self.port` and waits until it answers, or fails.
    fn launch(&mut self) -> Result<(), LaunchError> {
        let log_path = self.dir.join("redis.log");
        // Only what this launch logs counts when looking for a bind failure.
        let log_start = fs::metadata(&log_path).map_or(0, |meta| meta.len());
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.stderr"))
            .map_err(|e| LaunchError::Failed(format!("cannot create redis.stderr: {e}")))?;

        // A restart takes back the ports `stop` kept.
        self.reserved.clear();
        let binary = server_binary();
        let mut command = self.server_command(&binary, &log_path);
        command.args(&self.extra_args);
        // No pipes: a server holding a pipe open would keep a worker's parent from seeing EOF.
        command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = command.spawn().map_err(|e| {
            LaunchError::Failed(format!(
                "cannot run {binary} (install redis-server, as scripts/test does, or set {REDIS_SERVER_ENV}): {e}"
            ))
        })?;
        self.watchdog.watch(child.id());

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.watchdog.forget();
                    let log = read_from(&log_path, log_start);
                    if log.contains("Address already in use") {
                        return Err(LaunchError::PortInUse);
                    }
                    return Err(LaunchError::Failed(format!(
                        "redis-server exited with {status} on port {}; log:\n{}",
                        self.port,
                        self.log_tail(LOG_TAIL_LINES)
                    )));
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = child.kill();
                    self.watchdog.forget();
                    let _ = child.wait();
                    return Err(LaunchError::Failed(format!(
                        "cannot check on redis-server: {e}"
                    )));
                }
            }
            let answer = if self.tls.is_some() {
                self.ping_with_cli(child.id())
            } else {
                ping(self.port, self.password.as_deref(), child.id())
            };
            let last_error = match answer {
                Ok(()) => {
                    self.process = Some(child);
                    return Ok(());
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let _ = child.kill();
                self.watchdog.forget();
                let _ = child.wait();
                return Err(LaunchError::Failed(format!(
                    "redis-server on port {} did not answer within {READY_TIMEOUT:?} (last error: {last_error}); log:\n{}",
                    self.port,
                    self.log_tail(LOG_TAIL_LINES)
                )));
            }
            // Bounded readiness polling: the server is usually up within a few milliseconds.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl RedisServer {
    /// [`ping`] through `redis-cli` (which speaks TLS): `INFO server` with our pid in it.
    fn ping_with_cli(&self, expected_pid: u32) -> Result<(), String> {
        let output = self
            .cli_command(&["INFO", "server"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", cli_binary()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let pid_line = format!("process_id:{expected_pid}");
        if stdout.lines().any(|line| line.trim_end() == pid_line) {
            Ok(())
        } else {
            Err(format!(
                "redis-cli INFO server: {}{}",
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server on port {} (dir {}): last {LOG_TAIL_LINES} log lines ---\n{}\n--- end of redis-server log ---",
                self.port,
                self.dir.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.stop();
        self.watchdog.dismiss();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The server shared by every test in this test binary, started on first use.
///
/// Keep tests apart with [`unique_prefix`], never `FLUSHDB`, and never break this server:
/// tests that stop, restart, pause or kill clients of a server start their own. The server is
/// killed and its dir removed when the test binary exits (statics are never dropped; the
/// [`Watchdog`] does it).
///
/// # Panics
///
/// If the server cannot be started, or when called in a worker process: a worker must use
/// the parent's server, whose URL the parent passes as a worker param.
pub fn shared() -> &'static RedisServer {
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    assert!(
        crate::procs::worker_role().is_none(),
        "a worker process must not start its own shared server: pass the parent's `url()` as a worker param"
    );
    SHARED.get_or_init(RedisServer::start)
}

/// A key prefix no other test (nor another run of this test, nor another test process) uses:
/// `hlt-NAME-PID-N`, with `NAME` cut to 80 characters and anything but ASCII letters, digits,
/// `_`, `-` and `.` replaced by `_`. It contains no `{`, `}` or `:` and is short enough for
/// herdlock's prefix limit. Pass it to the herd under test and to workers, and check
/// [`RedisServer::keys_under`] at the end.
pub fn unique_prefix(test_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name: String = test_name
        .chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("hlt-{name}-{}-{n}", std::process::id())
}

/// The ports a server could not bind because another process took them first.
#[derive(Debug)]
pub struct PortsTaken(pub Vec<u16>);

/// Why [`RedisServer::try_start`] could not start a server.
#[derive(Debug)]
pub enum StartError {
    /// Another process took every port tried before the server could bind it.
    PortsTaken(PortsTaken),
    /// Anything else (no binary, the server exited or did not answer), with the reason and
    /// the log's tail.
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::PortsTaken(PortsTaken(ports)) => write!(
                f,
                "redis-server could not bind a free port; ports taken before it could bind them: {ports:?}"
            ),
            StartError::Failed(why) => write!(f, "redis-server failed to start: {why}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Why a launch failed.
enum LaunchError {
    /// The port was taken before the server could bind it; another port may work.
    PortInUse,
    /// Anything else, with the reason and the log.
    Failed(String),
}

/// A `sh` process that kills the server if the test process dies without dropping the
/// [`RedisServer`], then removes the server's dir.
///
/// The test process holds the only write end of the watchdog's stdin pipe (Rust opens pipes
/// close-on-exec, so no other child inherits it). However the test process ends (normal exit
/// with statics never dropped, a panic that aborts, SIGKILL), the kernel closes that end, the
/// watchdog's `read` sees EOF, and it kills the last pid it was told to watch. This needs no
/// `libc`/`prctl(PR_SET_PDEATHSIG)`, no polling of the parent pid (which would see a zombie
/// parent as alive), and it survives `restart` because the harness sends each new pid.
///
/// Protocol, one line each: a pid (watch this one instead), `none` (watch nothing), `exit`
/// (the `RedisServer` was dropped and cleaned up: quit without doing anything).
#[derive(Debug)]
pub struct Watchdog {
    /// The `sh` process.
    child: Child,
    /// The write end of its stdin; `None` once dismissed.
    stdin: Option<ChildStdin>,
}

/// The watchdog's script; `$1` is the server's dir.
const WATCHDOG_SCRIPT: &str = r#"
pid=
while IFS= read -r line; do
  case "$line" in
    exit) exit 0 ;;
    none) pid= ;;
    *) pid=$line ;;
  esac
done
if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null; fi
rm -rf -- "$1"
"#;

impl Watchdog {
    /// Starts a watchdog for `dir`, watching no process yet.
    pub fn spawn(dir: &Path) -> Watchdog {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("herdlock-redis-watchdog")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("`sh` runs: the redis watchdog needs a POSIX shell");
        let stdin = child.stdin.take();
        Watchdog { child, stdin }
    }

    /// Watch `pid` from now on.
    pub fn watch(&mut self, pid: u32) {
        self.send(&pid.to_string());
    }

    /// Watch nothing: the server is dead (or about to be, and reaped by us).
    pub fn forget(&mut self) {
        self.send("none");
    }

    /// The owner cleaned up: let the watchdog quit, and reap it.
    pub fn dismiss(&mut self) {
        self.send("exit");
        self.stdin = None;
        let _ = self.child.wait();
    }

    fn send(&mut self, line: &str) {
        if let Some(stdin) = &mut self.stdin {
            // Failing to reach the watchdog only loses the crash safety net; the test goes on.
            if let Err(e) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
                eprintln!("herdlock test harness: redis watchdog unreachable: {e}");
            }
        }
    }
}

/// The `redis-server` binary: `$HERDLOCK_REDIS_SERVER`, else `redis-server` on `PATH`.
pub fn server_binary() -> String {
    std::env::var(REDIS_SERVER_ENV).unwrap_or_else(|_| "redis-server".to_owned())
}

/// The `redis-cli` binary: `$HERDLOCK_REDIS_CLI`, else `redis-cli` on `PATH`.
pub fn cli_binary() -> String {
    std::env::var(REDIS_CLI_ENV).unwrap_or_else(|_| "redis-cli".to_owned())
}

/// Whether the server knows `--enable-debug-command` (Redis 7 and later), asked once.
fn debug_command_is_configurable() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| {
        let Ok(output) = Command::new(server_binary()).arg("--version").output() else {
            // The spawn that follows fails too, and says why.
            return false;
        };
        // "Redis server v=7.0.15 sha=..."
        let version = String::from_utf8_lossy(&output.stdout);
        version
            .split_whitespace()
            .find_map(|word| word.strip_prefix("v="))
            .and_then(|v| v.split('.').next())
            .and_then(|major| major.parse::<u32>().ok())
            .is_some_and(|major| major >= 7)
    })
}

/// A loopback port nobody listens on right now. The server may still lose it to another
/// process before binding it; `start_with` then tries another.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("binding 127.0.0.1:0 works: the tests need loopback networking");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// Binds a socket to `port` on loopback without listening: connections to the port are
/// refused, and the kernel never hands the port to a bind on port 0 (how [`free_port`] picks
/// ports) while the socket lives. `SO_REUSEADDR` lets the bind succeed while connections of
/// the dead server linger in `TIME_WAIT`, and lets our own restart bind the port once the
/// socket is dropped.
fn reserve_port(port: u16) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    Ok(socket)
}

/// A loopback port nobody listens on right now whose cluster bus port (port + 10000) is free
/// too. Like [`free_port`], the server may still lose either to another process.
pub fn free_port_with_bus() -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        let Some(bus) = port.checked_add(CLUSTER_BUS_OFFSET) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port whose port + {CLUSTER_BUS_OFFSET} is free too");
}

/// Creates a fresh dir named `NAME-PID-N` under the system temp dir.
pub fn make_temp_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    for _ in 0..1000 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{name}-{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            // Left over from an earlier process with our pid: pick the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("cannot create a temp dir {}: {e}", dir.display()),
        }
    }
    panic!("cannot find a free temp dir name under {}", base.display());
}

/// The text of `path` from byte `offset` on, or "" if it cannot be read.
fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

/// Checks that our server (`expected_pid`, not some other process that took the port)
/// answers on `port`: `AUTH` if needed, `INFO server` with our pid in it, and `PING`.
fn ping(port: u16, password: Option<&str>, expected_pid: u32) -> Result<(), String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&address, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    let timeout = Some(Duration::from_secs(2));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| format!("set timeouts: {e}"))?;
    let mut request = Vec::new();
    if let Some(password) = password {
        request.extend(resp_command(&["AUTH", password]));
    }
    request.extend(resp_command(&["INFO", "server"]));
    request.extend(resp_command(&["PING"]));
    (&stream)
        .write_all(&request)
        .map_err(|e| format!("send: {e}"))?;

    let mut reader = BufReader::new(&stream);
    if password.is_some() {
        read_reply(&mut reader)?;
    }
    let info = read_reply(&mut reader)?;
    let pid_line = format!("process_id:{expected_pid}");
    if !info.lines().any(|line| line.trim_end() == pid_line) {
        return Err(format!(
            "port {port} is answered by another redis-server, not pid {expected_pid}"
        ));
    }
    match read_reply(&mut reader)?.as_str() {
        "PONG" => Ok(()),
        other => Err(format!("PING answered {other:?}")),
    }
}

/// A command as a RESP array of bulk strings.
fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend(format!("${}\r\n", arg.len()).into_bytes());
        out.extend(arg.as_bytes());
        out.extend(b"\r\n");
    }
    out
}

/// Reads one simple-string, integer or bulk-string reply; an error reply is `Err`.
fn read_reply(reader: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Err(format!("error reply: {rest}")),
        "$" => {
            let len: usize = rest
                .parse()
                .map_err(|_| format!("bad bulk length {rest:?}"))?;
            let mut bytes = vec![0; len + 2];
            reader
                .read_exact(&mut bytes)
                .map_err(|e| format!("read: {e}"))?;
            bytes.truncate(len);
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

/// Escapes the glob characters of a Redis `KEYS` pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for the userinfo of a URL.
fn percent_encode(text: &str) -> String {
    use std::fmt::Write as _;

    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            write!(out, "%{byte:02X}").expect("writing to a String cannot fail");
        }
    }
    out
}
