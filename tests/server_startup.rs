//! Startup functions and supervised external services (issue 5 items 6-7, server spec §7):
//! the getting-started guide's Python startup function and external service script, run by
//! the real binary and by an in-process server; Rust `on_startup`; failures that abort the
//! start; restarts within a limit; no process left behind.
//!
//! The Python pieces run under the stock client: `$HYPHA_PYTHON` (default `.venv/bin/python`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypha_rpc::client::{
    connect_to_server, launch_external_services, ClientConfig, Error, LaunchError, Service, Visibility,
};
use hypha_rpc::server::{ExternalService, ProcessState, RestartPolicy, Server, ServerBuilder, ServerError};
use serde_json::Value as Json;

const SECRET: &str = "test-secret-for-the-startup-tests";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    std::env::var_os("HYPHA_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

fn script(name: &str) -> String {
    root().join("tests/python").join(name).display().to_string()
}

fn builder() -> ServerBuilder {
    Server::builder().jwt_secret(SECRET).server_id("startup-test").workers(1).python(python())
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("hypha-startup-{tag}-{}", hypha_rpc::core::ids::random_id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `pid` is a live process (a zombie counts as gone: PID 1 of a container may not
/// reap the grandchildren it inherits).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.split_whitespace().next() != Some("Z"))
        }
        Err(_) => false,
    }
}

async fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "processes survived: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pids_in(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

async fn get(url: &str) -> (u16, String) {
    let client = awc::Client::builder().timeout(Duration::from_secs(30)).finish();
    match client.get(url).send().await {
        Ok(mut resp) => {
            let body = resp.body().limit(1 << 20).await.unwrap_or_default();
            (resp.status().as_u16(), String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Runs a Python snippet with the stock client; returns what it printed after `RESULT `.
async fn run_python(code: &'static str, args: Vec<String>) -> String {
    let python = python();
    let out = actix_web::web::block(move || {
        Command::new(&python)
            .arg("-c")
            .arg(code)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "python failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_default();
    line.trim().to_owned()
}

const CALL_TEST_SERVICE: &str = r#"
import asyncio, sys
from hypha_rpc import connect_to_server

async def main():
    server = await connect_to_server({"server_url": sys.argv[1]})
    svc = await server.get_service(sys.argv[2])
    print("RESULT", await svc.test(1), flush=True)
    await server.disconnect()

asyncio.run(main())
"#;

// --- the binary -------------------------------------------------------------------------------

/// The `hypha-server` binary on a free port with a scratch data dir; killed on drop.
struct Binary {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Binary {
    fn spawn(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = TempDir::new("bin");
        let child = Command::new(env!("CARGO_BIN_EXE_hypha-server"))
            .args(["--port", &port.to_string(), "--server-id", "startup-bin", "--workers", "1"])
            .args(args)
            .env("HYPHA_DATA_DIR", dir.path("data"))
            .env("HYPHA_PYTHON", python())
            .env("JWT_SECRET", SECRET)
            .env("RUST_LOG", "info")
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hypha-server");
        Binary { child, port, _dir: dir }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until readiness is 200; panics with the log if the process exits first.
    async fn ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if get(&format!("{}/health/readiness", self.base())).await.0 == 200 {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("hypha-server exited ({status}):\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "not ready within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// SIGTERM, then the exit status and the log.
    async fn terminate(&mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        self.exit_within(Duration::from_secs(30)).await
    }

    async fn exit_within(&mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stderr());
            }
            assert!(Instant::now() < deadline, "hypha-server did not exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[actix_rt::test]
async fn the_guides_python_startup_function_serves_test_service_over_rpc_and_http() {
    let spec = format!("{}:hypha_startup", script("example-startup-function.py"));
    let mut srv = Binary::spawn(&["--startup-functions", &spec]);
    srv.ready(Duration::from_secs(60)).await;
    // Ready means registered: no polling for the service.
    let (status, body) = get(&format!("{}/public/services/test-service/test?x=1", srv.base())).await;
    assert_eq!((status, body.as_str()), (200, "100"));
    let seen = run_python(CALL_TEST_SERVICE, vec![srv.base(), "public/test-service".into()]).await;
    assert_eq!(seen, "100");
    let (status, log) = srv.terminate().await;
    assert!(status.success(), "clean exit after SIGTERM:\n{log}");
    assert!(log.contains("supervised process is ready"), "the startup process logs under its name:\n{log}");
}

#[actix_rt::test]
async fn a_failing_python_startup_function_aborts_the_binary_with_its_error() {
    let spec = format!("{}:hypha_startup", script("failing-startup-function.py"));
    let mut srv = Binary::spawn(&["--startup-functions", &spec]);
    let (status, log) = srv.exit_within(Duration::from_secs(60)).await;
    assert!(!status.success(), "non-zero exit:\n{log}");
    let line = log.lines().find(|l| l.starts_with("hypha-server: startup failed")).unwrap_or_else(|| {
        panic!("no startup error line:\n{log}");
    });
    assert!(line.contains("failing-startup-function.py:hypha_startup failed"), "{line}");
    assert!(
        line.ends_with("RuntimeError: this startup function refuses to start"),
        "the traceback's last line: {line}"
    );
    assert!(!log.contains("restarting"), "a failed start is not retried:\n{log}");
}

#[actix_rt::test]
async fn a_missing_module_or_function_aborts_with_a_clear_message() {
    let missing = format!("{}:no_such_function", script("example-startup-function.py"));
    let err =
        builder().python_startup_function(missing).build().unwrap().launch("127.0.0.1", 0).await.unwrap_err();
    assert!(err.to_string().contains("has no function 'no_such_function'"), "{err}");
    let err = builder()
        .python_startup_function("hypha.non_existing_module:non_existing_function")
        .build()
        .unwrap()
        .launch("127.0.0.1", 0)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ModuleNotFoundError: No module named 'hypha"), "{err}");
}

#[actix_rt::test]
async fn a_python_without_hypha_rpc_is_named_with_how_to_install_it() {
    let err = builder()
        .python("/nonexistent/bin/python3")
        .python_startup_function("x.py:f")
        .build()
        .unwrap()
        .launch("127.0.0.1", 0)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ServerError::Startup(_)));
    assert!(text.contains("`/nonexistent/bin/python3` cannot be run"), "{text}");
    assert!(text.contains("pip install hypha-rpc"), "{text}");
}

/// The item-6 promise "the server finds or creates the Python environment it needs": a base
/// interpreter without `hypha_rpc` (a bare venv) makes the server create
/// `{data_dir}/python-env` with the pinned stock client, run the startup function there, and
/// reuse the environment on the next start.
#[actix_rt::test]
async fn a_python_without_hypha_rpc_gets_an_environment_created_with_the_stock_client_and_reused() {
    let dir = TempDir::new("env");
    let bare = dir.path("bare");
    let made = Command::new("python3").args(["-m", "venv", "--without-pip"]).arg(&bare).status().unwrap();
    assert!(made.success(), "python3 -m venv");
    let base = bare.join("bin/python");
    let data = dir.path("data");
    let spec = format!("{}:hypha_startup", script("example-startup-function.py"));
    let launch = || {
        Server::builder()
            .jwt_secret(SECRET)
            .server_id("startup-env-test")
            .workers(1)
            .base_python(&base)
            .data_dir(&data)
            .python_startup_function(spec.clone())
            .build()
            .unwrap()
            .launch("127.0.0.1", 0)
    };
    let srv = launch().await.unwrap();
    let (status, body) = get(&format!("{}/public/services/test-service/test?x=1", srv.url())).await;
    assert_eq!((status, body.as_str()), (200, "100"), "the startup function ran in the created environment");
    srv.stop().await.unwrap();
    let env = data.join("python-env");
    let stamp = env.join("hypha-rs-python-env.stamp");
    assert_eq!(std::fs::read_to_string(&stamp).unwrap(), hypha_rpc::server::PINNED_HYPHA_RPC);
    let ok = Command::new(env.join("bin/python")).args(["-c", "import hypha_rpc"]).status().unwrap();
    assert!(ok.success(), "the environment has the client");
    let untouched =
        Command::new(&base).args(["-c", "import hypha_rpc"]).stderr(Stdio::null()).status().unwrap();
    assert!(!untouched.success(), "nothing installed into the base interpreter");

    let stamped = std::fs::metadata(&stamp).unwrap().modified().unwrap();
    let started = Instant::now();
    let srv = launch().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "reused, not reinstalled: {:?}", started.elapsed());
    assert_eq!(std::fs::metadata(&stamp).unwrap().modified().unwrap(), stamped, "reused, not recreated");
    let (status, body) = get(&format!("{}/public/services/test-service/test?x=2", srv.url())).await;
    assert_eq!((status, body.as_str()), (200, "101"));
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_missing_base_python_says_to_install_python3_and_venv() {
    let err = Server::builder()
        .jwt_secret(SECRET)
        .workers(1)
        .base_python("/nonexistent/bin/python3")
        .python_startup_function("x.py:f")
        .build()
        .unwrap()
        .launch("127.0.0.1", 0)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("need Python 3, but `/nonexistent/bin/python3` cannot be run"), "{text}");
    assert!(text.contains("apt install python3 python3-venv"), "{text}");
    assert!(text.contains("--python (HYPHA_PYTHON)"), "{text}");
}

#[actix_rt::test]
async fn an_external_python_service_is_launched_with_placeholders_resolved_by_id_and_stopped() {
    let dir = TempDir::new("ext");
    let pid_file = dir.path("pids");
    let command = format!(
        "{} {} --server-url={{server_url}} --service-id=external-test-service --workspace={{workspace}} \
         --token={{token}} --pid-file {}",
        python().display(),
        script("external_service.py"),
        pid_file.display()
    );
    let mut srv =
        Binary::spawn(&["--launch-external", &command, "--check-services", "external-test-service"]);
    srv.ready(Duration::from_secs(60)).await;
    let (status, body) =
        get(&format!("{}/public/services/external-test-service/add?a=2&b=3", srv.base())).await;
    assert_eq!((status, body.as_str()), (200, "5"));
    let (_, info) = get(&format!("{}/public/services/external-test-service", srv.base())).await;
    let info: Json = serde_json::from_str(&info).unwrap();
    assert_eq!(info["id"], "public/external-test-service-client:external-test-service");
    let pids = pids_in(&pid_file);
    assert_eq!(pids.len(), 1);
    assert!(alive(pids[0]));
    let (status, log) = srv.terminate().await;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("registered external-test-service in public"),
        "its stdout is in the server log:\n{log}"
    );
    assert!(log.contains("a line on stderr from external-test-service"), "and its stderr:\n{log}");
    wait_gone(&pids).await;
}

#[actix_rt::test]
async fn check_services_must_follow_a_launch_external() {
    let mut srv = Binary::spawn(&["--check-services", "x"]);
    let (status, log) = srv.exit_within(Duration::from_secs(10)).await;
    assert!(!status.success());
    assert!(log.contains("give it after the --launch-external it belongs to"), "{log}");
}

// --- in process -------------------------------------------------------------------------------

fn test_service(add: i64) -> Service {
    Service::builder("test-service")
        .visibility(Visibility::Public)
        .function("test", move |x: i64| async move { Ok::<_, Error>(x + add) })
        .build()
}

#[actix_rt::test]
async fn a_rust_startup_function_registers_a_service_that_is_up_at_readiness() {
    let srv = builder()
        .on_startup(|public| async move {
            assert_eq!(public.workspace(), "public");
            // Slow on purpose: readiness must wait for it.
            tokio::time::sleep(Duration::from_millis(300)).await;
            public.register_service(test_service(99)).await?;
            Ok::<_, Error>(())
        })
        .build()
        .unwrap()
        .start("127.0.0.1", 0)
        .unwrap();
    let base = srv.url();
    let (status, body) = get(&format!("{base}/health/readiness")).await;
    assert_eq!(status, 503, "not ready while startup functions run: {body}");
    assert!(body.contains("startup functions are running"), "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&format!("{base}/health/readiness")).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(&format!("{base}/public/services/test-service/test?x=1")).await;
    assert_eq!((status, body.as_str()), (200, "100"), "registered before readiness turned OK");
    let client = connect_to_server(ClientConfig::new(base.clone())).await.unwrap();
    let svc = client.get_service("public/test-service").await.unwrap();
    assert_eq!(svc.id(), "public/startup-test-startup:test-service");
    assert_eq!(svc.call_typed::<_, i64>("test", (2,)).await.unwrap(), 101);
    client.disconnect().await.unwrap();
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_failing_rust_startup_function_aborts_the_launch() {
    let err = builder()
        .on_startup(|_public| async move { Err::<(), _>("the database is not there") })
        .build()
        .unwrap()
        .launch("127.0.0.1", 0)
        .await
        .unwrap_err();
    assert!(matches!(err, ServerError::Startup(_)));
    assert_eq!(err.to_string(), "startup failed: startup function #1 failed: the database is not there");
}

fn crashing_service(pid_file: &Path, crash_after: f64) -> String {
    format!(
        "{} {} --server-url={{server_url}} --service-id=crashing-service --workspace={{workspace}} \
         --token={{token}} --pid-file {} --crash-after {crash_after}",
        python().display(),
        script("external_service.py"),
        pid_file.display()
    )
}

#[actix_rt::test]
async fn a_crashed_external_service_is_restarted_within_its_limit_then_given_up() {
    let dir = TempDir::new("crash");
    let pid_file = dir.path("pids");
    let policy = RestartPolicy {
        max_restarts: 2,
        window: Duration::from_secs(120),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
    };
    let srv = builder()
        .external_service(
            ExternalService::new(crashing_service(&pid_file, 0.3))
                .check_services(["crashing-service"])
                .timeout(Duration::from_secs(60))
                .restart(Some(policy)),
        )
        .build()
        .unwrap()
        .launch("127.0.0.1", 0)
        .await
        .expect("the service registers before it crashes");
    let mut sup = srv.supervised().pop().unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(90),
        sup.status.wait_for(|s| s.state == ProcessState::GaveUp),
    )
    .await
    .expect("gives up")
    .unwrap()
    .clone();
    assert_eq!(status.starts, 3, "the first start and two restarts");
    assert_eq!(status.last_exit.as_deref(), Some("exit status 3"));
    assert_eq!(status.last_error.as_deref(), Some("crashing-service crashes on purpose"));
    let pids = pids_in(&pid_file);
    assert_eq!(pids.len(), 3, "three distinct processes: {pids:?}");
    wait_gone(&pids).await;
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn every_supervised_process_is_gone_after_the_server_stops() {
    let dir = TempDir::new("stop");
    let pid_file = dir.path("pids");
    let spec = format!("{}:hypha_startup", script("example-startup-function.py"));
    let srv = builder()
        .python_startup_function(spec)
        .external_service(
            ExternalService::new(crashing_service(&pid_file, 3600.0)).check_services(["crashing-service"]),
        )
        .child_stop_grace(Duration::from_secs(2))
        .build()
        .unwrap()
        .launch("127.0.0.1", 0)
        .await
        .unwrap();
    let mut pids: Vec<u32> = srv.supervised().iter().filter_map(|h| h.status().pid).collect();
    assert_eq!(pids.len(), 2, "the startup function's process and the external service");
    pids.extend(pids_in(&pid_file));
    assert!(pids.iter().all(|p| alive(*p)));
    let handles = srv.supervised();
    srv.stop().await.unwrap();
    for h in handles {
        assert_eq!(h.status().state, ProcessState::Stopped);
    }
    wait_gone(&pids).await;
}

// --- the client-side helper -------------------------------------------------------------------

#[actix_rt::test]
async fn launch_external_services_fills_placeholders_waits_and_kills_on_drop() {
    let srv = builder().build().unwrap().start("127.0.0.1", 0).unwrap();
    let client = connect_to_server(ClientConfig::new(srv.url())).await.unwrap();
    let dir = TempDir::new("client");
    let pid_file = dir.path("pids");
    let command = format!(
        "{} {} --server-url={{server_url}} --service-id=helper-service --workspace={{workspace}} \
         --token={{token}} --pid-file {}",
        python().display(),
        script("external_service.py"),
        pid_file.display()
    );
    let process = launch_external_services(
        &client,
        &command,
        Some("helper"),
        &["helper-service"],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(process.name(), "helper");
    let svc = client.get_service(&format!("{}/helper-service", client.workspace())).await.unwrap();
    assert_eq!(svc.call_typed::<_, i64>("add", (40, 2)).await.unwrap(), 42);
    let pid = process.pid().unwrap();
    drop(process);
    wait_gone(&[pid]).await;

    // A service that never appears: killed after the timeout, upstream's error text.
    let err = launch_external_services(&client, &command, None, &["not-this-one"], Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::NotReady { .. }));
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("External services ({}) failed to start", python().display())),
        "{text}"
    );
    assert!(text.contains("`not-this-one` was not registered"), "{text}");
    wait_gone(&pids_in(&pid_file)).await;
    client.disconnect().await.unwrap();
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn launch_external_services_refuses_unknown_placeholders() {
    let srv = builder().build().unwrap().start("127.0.0.1", 0).unwrap();
    let client = connect_to_server(ClientConfig::new(srv.url())).await.unwrap();
    let err =
        launch_external_services(&client, "run {nope}", None, &[], Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(err, LaunchError::InvalidCommand(_)), "{err}");
    client.disconnect().await.unwrap();
    srv.stop().await.unwrap();
}
