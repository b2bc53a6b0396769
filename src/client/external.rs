//! `launch_external_services`: start a command that registers services with this
//! client's server, and wait until they resolve (the Python client's
//! `hypha_rpc.utils.launch.launch_external_services`).
//!
//! ```no_run
//! # use std::time::Duration;
//! # use hypha_rpc::client::{connect_to_server, launch_external_services, ClientConfig};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let server = connect_to_server(ClientConfig::new("http://127.0.0.1:9527")).await?;
//! let process = launch_external_services(
//!     &server,
//!     "python ./service.py --server-url={server_url} --workspace={workspace} --token={token}",
//!     Some("my-service"),
//!     &["my-service"],
//!     Duration::from_secs(5),
//! )
//! .await?;
//! // ... the service is registered in our workspace ...
//! process.stop().await; // or drop it: the process group is killed
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypha_actors::server::external::{
    format_command, CommandSpec, Supervisor, SupervisorConfig, SupervisorHandle, SupervisorStatus,
};
use hypha_core::Map;

use super::{Client, Error};

/// Why `launch_external_services` failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A call to the server (`generate_token`) failed.
    #[error(transparent)]
    Client(#[from] Error),
    /// The command is empty or has an unknown `{placeholder}`.
    #[error("Invalid command: {0}")]
    InvalidCommand(String),
    /// The process did not register its services in time or exited first (upstream's
    /// text, then why).
    #[error("External services ({name}) failed to start: {reason}")]
    NotReady {
        /// The process's name.
        name: String,
        /// What was missing or how the process ended.
        reason: String,
    },
}

/// A process started by [`launch_external_services`]. Not restarted when it exits (as
/// upstream's `always_restart=False`); dropping the handle kills its process group.
#[derive(Debug)]
pub struct ExternalProcess {
    handle: SupervisorHandle,
}

impl ExternalProcess {
    /// The process's name.
    pub fn name(&self) -> &str {
        &self.handle.name
    }

    /// Its pid while it runs (also its process group id).
    pub fn pid(&self) -> Option<u32> {
        self.handle.status().pid
    }

    /// Where it is: running, exited (with how), stopped.
    pub fn status(&self) -> SupervisorStatus {
        self.handle.status()
    }

    /// SIGTERM to its process group, SIGKILL after 5 s; returns once it is gone.
    pub async fn stop(&self) {
        self.handle.stop().await;
    }

    /// SIGKILL to its process group now (upstream's `proc.kill()`), without waiting.
    pub fn kill(&self) {
        self.handle.kill_now();
    }
}

impl Drop for ExternalProcess {
    fn drop(&mut self) {
        if !self.handle.status().is_finished() {
            self.handle.kill_now();
        }
    }
}

/// Starts `command` and waits (up to `timeout`) until every id in `check_services`
/// resolves as `{workspace}/{id}` through `server`.
///
/// As upstream: a token is generated for the caller's workspace (`generate_token()` with
/// the defaults), `{server_url}` (the server's `local_base_url`), `{workspace}` and
/// `{token}` are filled in, the command is split on whitespace (no shell) and runs with
/// this process's environment; `name` defaults to the command's first word. With no
/// `check_services` it returns as soon as the process started. On timeout, or if the
/// process exits first, it is killed and [`LaunchError::NotReady`] returned. The process's
/// output goes to this process's `tracing` log under its name.
pub async fn launch_external_services(
    server: &Client,
    command: &str,
    name: Option<&str>,
    check_services: &[&str],
    timeout: Duration,
) -> Result<ExternalProcess, LaunchError> {
    let token = server.generate_token(Map::new()).await?;
    let info = server.connection_info();
    let server_url = info
        .raw
        .get("local_base_url")
        .and_then(|v| v.as_str())
        .map_or_else(|| server.config().server_url.clone(), str::to_owned);
    let workspace = server.workspace().to_owned();
    let argv =
        format_command(command, &server_url, &workspace, &token).map_err(LaunchError::InvalidCommand)?;
    let name = name.map_or_else(|| argv[0].clone(), str::to_owned);
    let spec = CommandSpec { argv, env: Vec::new(), current_dir: None };
    let config = SupervisorConfig::new(name.clone(), Arc::new(move || Ok(spec.clone())));
    let process = ExternalProcess { handle: Supervisor::start_supervised(config) };

    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let mut missing = None;
        for id in check_services {
            if server.get_service(&format!("{workspace}/{id}")).await.is_err() {
                missing = Some(*id);
                break;
            }
        }
        let Some(missing) = missing else { return Ok(process) };
        let status = process.status();
        let reason = if status.is_finished() {
            let how = status.last_error.or(status.last_exit).unwrap_or_default();
            Some(format!("the process exited ({how}) before `{missing}` was registered"))
        } else if Instant::now() >= deadline {
            Some(format!("service `{missing}` was not registered within {timeout:?}"))
        } else {
            None
        };
        if let Some(reason) = reason {
            tracing::warn!(service = %name, %reason, "external services failed to start");
            process.stop().await;
            return Err(LaunchError::NotReady { name, reason });
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
