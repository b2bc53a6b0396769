//! Startup functions and supervised external services (server spec §7).
//!
//! After the listener is bound and before `/health/readiness` turns OK, the server runs, in
//! order:
//!
//! 1. the Rust startup functions ([`super::ServerBuilder::on_startup`]): each gets a
//!    [`Client`] connected to the `public` workspace with a root-issued token, so what it
//!    registers is `public/{server_id}-startup:{service}` (upstream: `public/{server_id}:…`,
//!    which here is the login service's client) and stays up as long as the server;
//! 2. the Python startup functions (`--startup-functions file.py:fn`): each runs under the
//!    stock Python client in a supervised child process started with an embedded launcher
//!    script, which imports the file, connects with a root-issued token for `public`,
//!    awaits `fn(server)` and reports back on stdout;
//! 3. the external services (`--launch-external "CMD {server_url} {workspace} {token}"`):
//!    each a supervised child with a restart policy, waited for until every id of its
//!    `check_services` resolves in `public`.
//!
//! Any failure aborts the startup: the children started so far are stopped and
//! [`super::Server::launch`]/[`super::Server::run`] return [`super::ServerError::Startup`]
//! with the reason (for Python, the traceback's last line).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hypha_actors::server::external::{
    format_command, CommandFactory, CommandSpec, ProcessState, RestartPolicy, Supervisor, SupervisorConfig,
    SupervisorHandle,
};
use hypha_actors::server::ServerState;
use hypha_core::auth::{self, Permission, UserInfo};

use crate::client::{connect_to_server, Client, ClientConfig};

/// The script that runs one Python startup function (see its docstring).
pub const PYTHON_LAUNCHER: &str = include_str!("startup_launcher.py");

/// The line the launcher prints once the startup function returned.
const READY_MARKER: &str = "HYPHA_STARTUP_READY";
/// The prefix of the launcher's error line (followed by the traceback's last line).
const ERROR_MARKER: &str = "HYPHA_STARTUP_ERROR";

/// The workspace startup functions and external services live in.
pub const STARTUP_WORKSPACE: &str = "public";

/// How long the tokens handed to startup processes live. Every (re)start gets a fresh one;
/// a running client keeps its connection alive with reconnection tokens.
const STARTUP_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What a Rust startup function returns.
pub type StartupResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

type HookFuture = Pin<Box<dyn Future<Output = StartupResult>>>;

/// A Rust startup function, as stored by the builder.
pub(crate) type StartupHook = Arc<dyn Fn(Client) -> HookFuture + Send + Sync>;

/// Wraps a user closure into a [`StartupHook`].
pub(crate) fn hook<F, Fut, E>(f: F) -> StartupHook
where
    F: Fn(Client) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(move |client| {
        let fut = f(client);
        Box::pin(async move { fut.await.map_err(Into::into) })
    })
}

/// One `--launch-external` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalService {
    /// The command, split on whitespace after `{server_url}`, `{workspace}` (`public`) and
    /// `{token}` (a fresh root-issued token for `public` at every start) are filled in.
    pub command: String,
    /// The name its log lines carry (default: the command's first word).
    pub name: Option<String>,
    /// Service ids (in `public`) that must resolve before the server is ready.
    pub check_services: Vec<String>,
    /// How long to wait for them.
    pub timeout: Duration,
    /// What happens when it exits: `None` never restarts it.
    pub restart: Option<RestartPolicy>,
}

impl ExternalService {
    /// A command with a 30 s readiness timeout (upstream's client-side helper waits 5 s, too
    /// short for a Python process that imports its client on a busy machine) and the
    /// default restart policy.
    pub fn new(command: impl Into<String>) -> Self {
        ExternalService {
            command: command.into(),
            name: None,
            check_services: Vec::new(),
            timeout: Duration::from_secs(30),
            restart: Some(RestartPolicy::default()),
        }
    }

    /// Sets the service ids to wait for.
    pub fn check_services<I, S>(mut self, ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.check_services = ids.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the readiness timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the restart policy (`None`: never restart).
    pub fn restart(mut self, policy: Option<RestartPolicy>) -> Self {
        self.restart = policy;
        self
    }

    fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.command.split_whitespace().next().unwrap_or("external-service").to_owned()
        })
    }
}

/// Everything the server runs at startup.
#[derive(Clone)]
pub(crate) struct StartupConfig {
    pub hooks: Vec<StartupHook>,
    pub python_functions: Vec<String>,
    pub python: Option<PathBuf>,
    pub base_python: Option<PathBuf>,
    pub external: Vec<ExternalService>,
    pub python_timeout: Duration,
    pub stop_grace: Duration,
    pub python_restart: Option<RestartPolicy>,
}

impl Default for StartupConfig {
    fn default() -> Self {
        StartupConfig {
            hooks: Vec::new(),
            python_functions: Vec::new(),
            python: None,
            base_python: None,
            external: Vec::new(),
            python_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(5),
            python_restart: Some(RestartPolicy::default()),
        }
    }
}

impl fmt::Debug for StartupConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartupConfig")
            .field("hooks", &self.hooks.len())
            .field("python_functions", &self.python_functions)
            .field("python", &self.python)
            .field("external", &self.external)
            .field("python_timeout", &self.python_timeout)
            .field("stop_grace", &self.stop_grace)
            .field("python_restart", &self.python_restart)
            .finish()
    }
}

impl StartupConfig {
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty() && self.python_functions.is_empty() && self.external.is_empty()
    }
}

/// What the startup leaves running: the startup client and the supervised children. Owned
/// by the running server, released by its stop.
#[derive(Default)]
pub(crate) struct StartupResources {
    client: Mutex<Option<Client>>,
    supervisors: Mutex<Vec<SupervisorHandle>>,
}

impl fmt::Debug for StartupResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.supervisors.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("StartupResources").field("supervisors", &n).finish_non_exhaustive()
    }
}

impl StartupResources {
    fn add(&self, handle: SupervisorHandle) {
        if let Ok(mut s) = self.supervisors.lock() {
            s.push(handle);
        }
    }

    /// The supervised children, in start order.
    pub fn supervisors(&self) -> Vec<SupervisorHandle> {
        self.supervisors.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops every child (SIGTERM, then SIGKILL after the grace period; in parallel) and
    /// disconnects the startup client.
    pub async fn stop(&self) {
        let handles: Vec<SupervisorHandle> =
            self.supervisors.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        futures_util::future::join_all(handles.iter().map(|h| h.stop())).await;
        let client = self.client.lock().ok().and_then(|mut c| c.take());
        if let Some(client) = client {
            let _ = client.disconnect().await;
        }
    }
}

/// A token for the `public` workspace issued by the server (user `root`, admin of
/// `public` only, bound to `public`).
pub(crate) fn public_root_token(state: &ServerState) -> Result<String, String> {
    let mut user = UserInfo::new(auth::ROOT_USER_ID);
    user.scope.workspaces.insert(STARTUP_WORKSPACE.to_owned(), Permission::Admin);
    user.scope.current_workspace = Some(STARTUP_WORKSPACE.to_owned());
    let now = auth::unix_seconds(SystemTime::now());
    state
        .config
        .jwt
        .encode(&user, STARTUP_TOKEN_LIFETIME.as_secs_f64(), now)
        .map_err(|e| format!("cannot issue a startup token: {e}"))
}

/// Runs the whole startup (see the module docs). On error the caller stops `resources`.
pub(crate) async fn run(
    state: Arc<ServerState>,
    config: Arc<StartupConfig>,
    resources: Arc<StartupResources>,
) -> Result<(), String> {
    let url = state.local_base_url();
    let needs_client =
        !config.hooks.is_empty() || config.external.iter().any(|e| !e.check_services.is_empty());
    let client = if needs_client {
        let token = public_root_token(&state)?;
        let cfg = ClientConfig::new(url.clone())
            .workspace(STARTUP_WORKSPACE)
            .token(token)
            .client_id(format!("{}-startup", state.config.server_id))
            .name("startup");
        let client = connect_to_server(cfg)
            .await
            .map_err(|e| format!("startup functions cannot connect to this server: {e}"))?;
        if let Ok(mut slot) = resources.client.lock() {
            *slot = Some(client.clone());
        }
        Some(client)
    } else {
        None
    };
    if let Some(client) = &client {
        for (i, hook) in config.hooks.iter().enumerate() {
            tracing::info!(index = i + 1, "running startup function");
            hook(client.clone()).await.map_err(|e| format!("startup function #{} failed: {e}", i + 1))?;
        }
    }
    if !config.python_functions.is_empty() {
        let python = find_python(&config, state.config.data_dir.as_deref()).await?;
        for (i, spec) in config.python_functions.iter().enumerate() {
            let handle = start_python_function(&state, &config, &python, spec, i + 1);
            resources.add(handle.clone());
            wait_python_function(handle, spec, config.python_timeout).await?;
            tracing::info!(function = %spec, "startup function done");
        }
    }
    for ext in &config.external {
        let handle = start_external(&state, &config, ext)?;
        resources.add(handle.clone());
        wait_external(&handle, ext, client.as_ref()).await?;
    }
    Ok(())
}

/// The stock Python client the server installs into its own Python environment when no
/// interpreter with `hypha_rpc` is at hand (the version the interop tests pin).
pub const PINNED_HYPHA_RPC: &str = "hypha-rpc==0.21.47";

/// The file in the environment that records which client was installed: its content must
/// equal [`PINNED_HYPHA_RPC`] for the environment to be reused.
const ENV_STAMP: &str = "hypha-rs-python-env.stamp";

/// How long a probe (`python -c "import hypha_rpc"`) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `python -m venv` may take.
const VENV_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `pip install` of the client may take (downloads included).
const PIP_TIMEOUT: Duration = Duration::from_secs(600);

/// What probing an interpreter for `hypha_rpc` found.
enum Probe {
    /// It imports; the client's version.
    Found(String),
    /// It runs but cannot import the client; the error's last line.
    Missing(String),
    /// It cannot be started (not installed, not executable).
    CannotRun(std::io::Error),
    /// It did not answer within [`PROBE_TIMEOUT`].
    Timeout,
}

async fn probe(python: &Path) -> Probe {
    let out = tokio::process::Command::new(python)
        .args(["-c", "import hypha_rpc; print(hypha_rpc.__version__)"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(PROBE_TIMEOUT, out).await {
        Err(_) => Probe::Timeout,
        Ok(Err(e)) => Probe::CannotRun(e),
        Ok(Ok(o)) if o.status.success() => Probe::Found(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Ok(Ok(o)) => Probe::Missing(last_line(&o)),
    }
}

/// The last non-empty stderr line of a finished command (else its exit status): the line
/// that names what went wrong in a Python traceback or a pip failure.
fn last_line(output: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&output.stderr);
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).map(str::trim);
    last.map_or_else(|| output.status.to_string(), str::to_owned)
}

/// The Python interpreter for startup functions.
///
/// An explicit `--python`/`HYPHA_PYTHON` is used as is and must import `hypha_rpc` (the
/// operator chose it; the server does not install into it). Otherwise the base interpreter
/// (`--base-python`/`HYPHA_BASE_PYTHON`, default `python3` on `PATH`) is used if it has the
/// client, and else the server's own environment, created on first need under
/// `{data_dir}/python-env` (or a per-user cache directory when accounts are in memory) with
/// the pinned stock client, and reused while its stamp names the same pin.
pub(crate) async fn find_python(config: &StartupConfig, data_dir: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(python) = &config.python {
        return explicit_python(python).await;
    }
    let base = config.base_python.clone().unwrap_or_else(|| PathBuf::from("python3"));
    match probe(&base).await {
        Probe::Found(version) => {
            tracing::info!(python = %base.display(), hypha_rpc = %version, "Python for startup functions");
            Ok(base)
        }
        Probe::Timeout => Err(format!(
            "startup functions need Python: `{}` did not answer within {} s",
            base.display(),
            PROBE_TIMEOUT.as_secs()
        )),
        Probe::CannotRun(e) => Err(format!(
            "startup functions need Python 3, but `{}` cannot be run ({e}); install Python 3 with its \
             venv module (Debian/Ubuntu: `apt install python3 python3-venv`), or point --python \
             (HYPHA_PYTHON) at an interpreter that has `{PINNED_HYPHA_RPC}`",
            base.display()
        )),
        Probe::Missing(_) => ensure_env(&base, &python_env_dir(data_dir)).await,
    }
}

async fn explicit_python(python: &Path) -> Result<PathBuf, String> {
    let install = format!(
        "install the stock client with `{} -m pip install {PINNED_HYPHA_RPC}`, or point --python \
         (HYPHA_PYTHON) at an interpreter that has it",
        python.display()
    );
    match probe(python).await {
        Probe::Found(version) => {
            tracing::info!(python = %python.display(), hypha_rpc = %version, "Python for startup functions");
            Ok(python.to_owned())
        }
        Probe::Timeout => Err(format!(
            "startup functions need Python: `{}` did not answer within {} s",
            python.display(),
            PROBE_TIMEOUT.as_secs()
        )),
        Probe::CannotRun(e) => Err(format!(
            "startup functions need a Python interpreter with the hypha-rpc client, but `{}` cannot \
             be run ({e}); install Python 3 and {install}",
            python.display()
        )),
        Probe::Missing(last) => Err(format!(
            "startup functions need the Python client hypha-rpc, but `{}` cannot import it ({last}); {install}",
            python.display()
        )),
    }
}

/// Where the server keeps its own Python environment: next to the accounts when there is a
/// data directory, else in the user's cache (so in-memory servers still create it once).
fn python_env_dir(data_dir: Option<&Path>) -> PathBuf {
    if let Some(dir) = data_dir {
        return dir.join("python-env");
    }
    let cache =
        std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache"))
        });
    match cache {
        Some(cache) => cache.join("hypha-rs").join("python-env"),
        None => std::env::temp_dir().join("hypha-rs-python-env"),
    }
}

fn env_python(dir: &Path) -> PathBuf {
    if cfg!(windows) {
        dir.join("Scripts").join("python.exe")
    } else {
        dir.join("bin").join("python")
    }
}

/// Runs one step of creating the environment; on failure, the step's last error line.
async fn run_step(program: &Path, args: &[&std::ffi::OsStr], limit: Duration) -> Result<(), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, out).await {
        Err(_) => Err(format!("no result within {} s", limit.as_secs())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(o)) if o.status.success() => Ok(()),
        Ok(Ok(o)) => Err(last_line(&o)),
    }
}

/// Reuses or creates the server's Python environment in `dir` from `base`.
async fn ensure_env(base: &Path, dir: &Path) -> Result<PathBuf, String> {
    let python = env_python(dir);
    let stamp = dir.join(ENV_STAMP);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == PINNED_HYPHA_RPC) {
        if let Probe::Found(version) = probe(&python).await {
            tracing::info!(python = %python.display(), hypha_rpc = %version,
                "Python for startup functions (the server's own environment)");
            return Ok(python);
        }
    }
    let by_hand = format!(
        "to do it by hand: `{} -m venv {} && {} -m pip install {PINNED_HYPHA_RPC}`, or point --python \
         (HYPHA_PYTHON) at an interpreter that has the client",
        base.display(),
        dir.display(),
        python.display()
    );
    tracing::info!(base = %base.display(), dir = %dir.display(), client = PINNED_HYPHA_RPC,
        "the Python for startup functions lacks hypha_rpc: creating an environment with the stock client");
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            format!("cannot create the Python environment's directory {}: {e}; {by_hand}", parent.display())
        })?;
    }
    let venv_args = ["-m".as_ref(), "venv".as_ref(), "--clear".as_ref(), dir.as_os_str()];
    run_step(base, &venv_args, VENV_TIMEOUT).await.map_err(|e| {
        format!(
            "startup functions need a Python environment with hypha-rpc, but `{} -m venv {}` failed ({e}); \
             the venv module may be missing (Debian/Ubuntu: `apt install python3-venv`); {by_hand}",
            base.display(),
            dir.display()
        )
    })?;
    tracing::info!(dir = %dir.display(), client = PINNED_HYPHA_RPC, "installing the stock Python client");
    let pip_args = ["-m", "pip", "install", "--disable-pip-version-check", "-q", PINNED_HYPHA_RPC];
    let pip_args: Vec<&std::ffi::OsStr> = pip_args.iter().map(|a| a.as_ref()).collect();
    run_step(&python, &pip_args, PIP_TIMEOUT).await.map_err(|e| {
        format!(
            "startup functions need the Python client, but `pip install {PINNED_HYPHA_RPC}` into {} failed \
             ({e}); check the network access to PyPI (or pip's proxy/index settings); {by_hand}",
            dir.display()
        )
    })?;
    match probe(&python).await {
        Probe::Found(version) => {
            std::fs::write(&stamp, PINNED_HYPHA_RPC)
                .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
            tracing::info!(python = %python.display(), hypha_rpc = %version,
                "Python environment for startup functions ready");
            Ok(python)
        }
        _ => Err(format!(
            "the Python environment in {} was created but cannot import hypha_rpc; {by_hand}",
            dir.display()
        )),
    }
}

fn start_python_function(
    state: &Arc<ServerState>,
    config: &StartupConfig,
    python: &std::path::Path,
    spec: &str,
    index: usize,
) -> SupervisorHandle {
    let state2 = state.clone();
    let python = python.display().to_string();
    let spec_owned = spec.to_owned();
    let client_id = format!("{}-startup-{index}", state.config.server_id);
    let factory: CommandFactory = Arc::new(move || {
        let token = public_root_token(&state2)?;
        Ok(CommandSpec {
            argv: vec![python.clone(), "-c".into(), PYTHON_LAUNCHER.into(), spec_owned.clone()],
            env: vec![
                ("HYPHA_STARTUP_SERVER_URL".into(), state2.local_base_url()),
                ("HYPHA_STARTUP_WORKSPACE".into(), STARTUP_WORKSPACE.into()),
                ("HYPHA_STARTUP_CLIENT_ID".into(), client_id.clone()),
                ("HYPHA_STARTUP_TOKEN".into(), token),
                ("PYTHONUNBUFFERED".into(), "1".into()),
            ],
            current_dir: None,
        })
    });
    let mut sc = SupervisorConfig::new(spec, factory);
    sc.restart = config.python_restart;
    sc.stop_grace = config.stop_grace;
    sc.ready_marker = Some(READY_MARKER.into());
    sc.error_marker = Some(ERROR_MARKER.into());
    sc.restart_only_after_ready = true;
    Supervisor::start_supervised(sc)
}

async fn wait_python_function(
    mut handle: SupervisorHandle,
    spec: &str,
    timeout: Duration,
) -> Result<(), String> {
    let waited = tokio::time::timeout(
        timeout,
        handle.status.wait_for(|s| s.ready || (s.starts > 0 && s.state != ProcessState::Running)),
    )
    .await;
    let status = match waited {
        Err(_) => return Err(format!("startup function {spec} did not finish within {timeout:?}")),
        Ok(Err(_)) => return Err(format!("startup function {spec}: its supervisor stopped")),
        Ok(Ok(s)) => s.clone(),
    };
    if status.ready {
        return Ok(());
    }
    let why = status.last_error.or(status.last_exit).unwrap_or_else(|| "it exited".into());
    Err(format!("startup function {spec} failed: {why}"))
}

fn start_external(
    state: &Arc<ServerState>,
    config: &StartupConfig,
    ext: &ExternalService,
) -> Result<SupervisorHandle, String> {
    let name = ext.display_name();
    // Refuse a bad template before anything runs (a token is not needed to check it).
    format_command(&ext.command, "u", "w", "t").map_err(|e| format!("External services ({name}): {e}"))?;
    let state2 = state.clone();
    let template = ext.command.clone();
    let factory: CommandFactory = Arc::new(move || {
        let token = public_root_token(&state2)?;
        let argv = format_command(&template, &state2.local_base_url(), STARTUP_WORKSPACE, &token)?;
        Ok(CommandSpec { argv, env: Vec::new(), current_dir: None })
    });
    let mut sc = SupervisorConfig::new(name, factory);
    sc.restart = ext.restart;
    sc.stop_grace = config.stop_grace;
    Ok(Supervisor::start_supervised(sc))
}

/// Waits until every id of `check_services` resolves as `public/{id}` (polling with
/// backoff), failing early when the process gives up or exits for good.
async fn wait_external(
    handle: &SupervisorHandle,
    ext: &ExternalService,
    client: Option<&Client>,
) -> Result<(), String> {
    let name = handle.name.clone();
    let fail = |why: String| format!("External services ({name}) failed to start: {why}");
    let (Some(client), false) = (client, ext.check_services.is_empty()) else {
        return Ok(());
    };
    let deadline = Instant::now() + ext.timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let mut missing = None;
        for id in &ext.check_services {
            if client.get_service(&format!("{STARTUP_WORKSPACE}/{id}")).await.is_err() {
                missing = Some(id.clone());
                break;
            }
        }
        let Some(missing) = missing else {
            tracing::info!(service = %name, "external services are ready");
            return Ok(());
        };
        let status = handle.status();
        if status.is_finished() {
            let why = status.last_error.or(status.last_exit).unwrap_or_default();
            return Err(fail(format!("the process exited ({why}) before `{missing}` was registered")));
        }
        if Instant::now() >= deadline {
            return Err(fail(format!("service `{missing}` was not registered within {:?}", ext.timeout)));
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
