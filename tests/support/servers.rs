//! The servers of the client tests (tests/client*.rs): ours in-process on an ephemeral
//! port, and the stock Python server `hypha` 0.21.137 (`$HYPHA_SERVER_PYTHON -m
//! hypha.server`), plus where the stock Python client lives (`$HYPHA_PYTHON`). A missing
//! interpreter or server package is a failure, not a skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypha_rpc::client::ReconnectConfig;
use hypha_rpc::server::{RunningServer, Server};

/// The JWT secret of both servers in the client tests.
pub const CLIENT_SECRET: &str = "test-secret-for-the-client-tests";

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn python_client() -> PathBuf {
    std::env::var_os("HYPHA_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

pub fn python_server_interpreter() -> PathBuf {
    std::env::var_os("HYPHA_SERVER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-server/bin/python"))
}

pub fn our_server() -> RunningServer {
    Server::builder()
        .jwt_secret(CLIENT_SECRET)
        .server_id("client-test")
        .workers(1)
        .build()
        .expect("valid config")
        .start("127.0.0.1", 0)
        .expect("bind")
}

/// Our server on `port` (0: ephemeral), always with the same id and the message rate
/// limit lifted, so that a server restarted with the same `secret` accepts the previous
/// one's reconnection tokens.
pub fn our_server_on(port: u16, secret: &str) -> RunningServer {
    Server::builder()
        .jwt_secret(secret)
        .server_id("lifecycle-test")
        .workers(1)
        .message_rate_limit(100_000.0)
        .message_burst_limit(100_000)
        .build()
        .expect("valid config")
        .start("127.0.0.1", port)
        .expect("bind")
}

/// [`our_server_on`] again on `port`, right after the previous server released it
/// (retrying briefly).
pub fn our_server_again(port: u16, secret: &str) -> RunningServer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = std::panic::catch_unwind(|| our_server_on(port, secret));
        match started {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => std::panic::resume_unwind(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reconnection fast enough for tests: 100 ms doubling up to 500 ms.
pub fn fast_reconnect() -> ReconnectConfig {
    ReconnectConfig {
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        min_delay: Duration::from_millis(50),
        flap_min_delay: Duration::from_millis(100),
        ..ReconnectConfig::default()
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// The stock Python server on a free port, killed on drop; [`PythonServer::restart`]
/// starts it again on the same port. Its scratch files (upstream keeps a SQLite event
/// log in the temp dir and leaves it behind) and its log go to a directory of its own,
/// removed on drop; the log's tail is shown if it fails to start. Its per-socket message
/// rate limit is lifted: a 64 MB payload is hundreds of chunks.
pub struct PythonServer {
    child: Child,
    port: u16,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    dir: PathBuf,
}

impl PythonServer {
    /// Starts it and waits (up to 90 s) until it is ready.
    pub fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("hypha-py-server-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let child = Self::spawn(port, &dir);
        let mut server = PythonServer { child, port, url: format!("http://127.0.0.1:{port}"), dir };
        server.wait_ready();
        server
    }

    fn spawn(port: u16, dir: &Path) -> Child {
        let python = python_server_interpreter();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .expect("server log");
        Command::new(&python)
            .args(["-m", "hypha.server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .env("JWT_SECRET", CLIENT_SECRET)
            .env("HYPHA_WS_MSG_RATE_LIMIT", "1000000")
            .env("HYPHA_WS_MSG_BURST_LIMIT", "1000000")
            .env("TMPDIR", dir)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the Python server with {}: {e}", python.display()))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !ready(self.port) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the Python server exited during start-up: {status}\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "the Python server was not ready within 90 s\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it and starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.port, &self.dir);
        self.wait_ready();
    }

    /// The last 30 lines of its log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET /health/readiness` answers 200.
pub fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req =
        format!("GET /health/readiness HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// Starts `tests/python/<script> serve <args...>` under the stock Python client and waits
/// for the `service_id=<id>` line it prints once its service is registered. stdin is
/// piped and left in the child: the peers serve until it closes.
pub async fn serve_python_peer(script: &str, args: &[String], stderr: Stdio) -> (Child, String) {
    let mut child = Command::new(python_client())
        .arg(root().join("tests/python").join(script))
        .arg("serve")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start the stock Python client");
    let stdout = child.stdout.take().expect("stdout");
    let service_id = actix_rt::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("service_id=").map(str::to_owned))
    })
    .await
    .expect("join")
    .unwrap_or_else(|| panic!("the Python peer {script} printed no service id"));
    (child, service_id)
}
