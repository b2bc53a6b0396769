//! `hypha-server`: run a Hypha server.
//!
//! Flags follow the Python server's (`python -m hypha.server`); every flag can also come
//! from its environment variable. The token secret comes only from the environment
//! (`HYPHA_JWT_SECRET` or `JWT_SECRET`), so it never shows in a process list. Logging:
//! `RUST_LOG` (tracing filter syntax) or `HYPHA_LOGLEVEL` (`DEBUG`, `INFO`, `WARNING`,
//! `ERROR`); the default shows warnings plus this binary's start and stop lines.
//! SIGTERM or SIGINT shut down gracefully: clients get close code 1001 and reconnect.
//!
//! Startup: `--startup-functions ./file.py:fn ...` runs Python startup functions under the
//! stock client (`--python`/`HYPHA_PYTHON`), `--launch-external "CMD {server_url}
//! {workspace} {token}" --check-services ID ...` starts supervised external services;
//! readiness turns OK once all are up, and a failure exits non-zero with the reason.
//!
//! Local accounts (the login page's) live in `--data-dir` (default `./hypha-data`);
//! `hypha-server user add --email E --password-stdin [--name N] [--admin]` and
//! `hypha-server user list` manage them, also while a server runs on the same directory.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use hypha_rpc::server::{
    AccountStore, ExternalService, HttpRateLimits, NewAccount, RestartPolicy, Server, ServerError,
    StaticMount,
};
use tracing_subscriber::EnvFilter;

/// Every routed frame allocates and frees a few small blocks, and large messages move
/// through big buffers: mimalloc does both for about two thirds of glibc's cost here
/// (README, Performance). Off with `--no-default-features`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(name = "hypha-server", version, about = "Hypha RPC server (wire-compatible with hypha 0.21)")]
struct Args {
    /// What to do (default: run the server).
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory for the server's files (the account database `accounts.sqlite3`),
    /// created on first run.
    #[arg(long, env = "HYPHA_DATA_DIR", default_value = "./hypha-data", global = true)]
    data_dir: PathBuf,
    /// Closes sign-up on the login page: only `hypha-server user add` creates accounts.
    #[arg(long, env = "HYPHA_NO_SIGNUP")]
    no_signup: bool,
    /// Address to bind.
    #[arg(long, env = "HYPHA_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 picks a free one).
    #[arg(long, env = "HYPHA_PORT", default_value_t = 9527)]
    port: u16,
    /// URL clients are told to use (default: http://127.0.0.1:PORT).
    #[arg(long, env = "HYPHA_PUBLIC_BASE_URL")]
    public_base_url: Option<String>,
    /// This replica's id (default: a random readable id); the manager is `manager-ID`.
    #[arg(long, env = "HYPHA_SERVER_ID")]
    server_id: Option<String>,
    /// A verbatim admin credential (at least 32 characters).
    #[arg(long, env = "HYPHA_ROOT_TOKEN", hide_env_values = true)]
    root_token: Option<String>,
    /// Seconds a new websocket may wait before its authentication frame.
    #[arg(long, env = "HYPHA_WS_AUTH_TIMEOUT", value_parser = seconds)]
    ws_auth_timeout: Option<Duration>,
    /// Seconds an authenticated websocket may stay silent.
    #[arg(long, env = "HYPHA_WS_IDLE_TIMEOUT", value_parser = seconds)]
    ws_idle_timeout: Option<Duration>,
    /// Binary frames per second per connection.
    #[arg(long, env = "HYPHA_WS_MSG_RATE_LIMIT")]
    ws_msg_rate_limit: Option<f64>,
    /// Burst of binary frames per connection.
    #[arg(long, env = "HYPHA_WS_MSG_BURST_LIMIT")]
    ws_msg_burst_limit: Option<u32>,
    /// Largest inbound websocket frame, in bytes (at least 1 MiB).
    #[arg(long, env = "HYPHA_WS_MAX_FRAME_SIZE")]
    ws_max_frame_size: Option<usize>,
    /// Most websocket handshakes in their auth/setup phase at once; others wait.
    #[arg(long, env = "HYPHA_MAX_CONCURRENT_CONNECTIONS")]
    max_concurrent_connections: Option<usize>,
    /// Most services one client may register (besides its built-in service).
    #[arg(long, env = "HYPHA_MAX_SERVICES_PER_CLIENT")]
    max_services_per_client: Option<usize>,
    /// Lifetime of reconnection tokens, in seconds.
    #[arg(long, env = "RECONNECTION_TOKEN_LIFE_TIME", value_parser = seconds)]
    reconnection_token_life_time: Option<Duration>,
    /// Seconds a graceful shutdown waits for open connections.
    #[arg(long, env = "HYPHA_SHUTDOWN_TIMEOUT", value_parser = seconds)]
    shutdown_timeout: Option<Duration>,
    /// CORS origins, comma separated (`*`: any origin).
    #[arg(long, env = "ALLOW_ORIGINS", default_value = "*")]
    allow_origins: String,
    /// Directories served as static files, each `/mountpath:./localdir` (space separated
    /// after one flag, or the flag repeated).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, value_name = "MOUNT")]
    static_mounts: Vec<String>,
    /// Requests per second per client IP for callers without a valid token.
    #[arg(long, env = "HYPHA_HTTP_RATE_LIMIT")]
    http_rate_limit: Option<f64>,
    /// Burst of requests per client IP.
    #[arg(long, env = "HYPHA_HTTP_BURST_LIMIT")]
    http_burst_limit: Option<u32>,
    /// Requests per second per token identity.
    #[arg(long, env = "HYPHA_HTTP_AUTHENTICATED_RATE_LIMIT")]
    http_authenticated_rate_limit: Option<f64>,
    /// Burst of requests per token identity.
    #[arg(long, env = "HYPHA_HTTP_AUTHENTICATED_BURST_LIMIT")]
    http_authenticated_burst_limit: Option<u32>,
    /// Turns the HTTP request-rate limit off (e.g. behind a proxy that limits).
    #[arg(long, env = "HYPHA_DISABLE_HTTP_RATE_LIMIT")]
    disable_http_rate_limit: bool,
    /// Microseconds a worker may keep polling its sockets after a websocket frame before
    /// it sleeps (default 50; 0: never). The window adapts to the traffic: it saves a
    /// wake-up per frame when replies come back quickly, and closes when frames are sparse.
    #[arg(long, env = "HYPHA_BUSY_POLL_US")]
    busy_poll_us: Option<u64>,
    /// HTTP worker threads (default: one per physical core).
    #[arg(long, env = "HYPHA_WORKERS")]
    workers: Option<usize>,
    /// Python startup functions, each `./file.py:function` or `module:function` (space
    /// separated after one flag, or the flag repeated). Each runs under the stock Python
    /// client, connected to this server's `public` workspace, before readiness turns OK;
    /// one that fails aborts the start.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, value_name = "FILE_OR_MODULE:FUNCTION")]
    startup_functions: Vec<String>,
    /// The Python interpreter for startup functions (must be able to `import hypha_rpc`;
    /// default: see --base-python).
    #[arg(long, env = "HYPHA_PYTHON")]
    python: Option<PathBuf>,
    /// The Python the server starts from when --python is not given: used if it has
    /// hypha_rpc, else the server creates `{data-dir}/python-env` (or one in the user's
    /// cache) from it with the pinned stock client (default: `python3` on PATH).
    #[arg(long, env = "HYPHA_BASE_PYTHON")]
    base_python: Option<PathBuf>,
    /// Seconds one Python startup function may take.
    #[arg(long, env = "HYPHA_STARTUP_TIMEOUT", value_parser = seconds, default_value = "120")]
    startup_timeout: Duration,
    /// A command to run as a supervised external service after the startup functions
    /// (repeatable). `{server_url}`, `{workspace}` (`public`) and `{token}` (a root-issued
    /// token for `public`, fresh at every start) are filled in; the command is split on
    /// whitespace, no shell. Restarted with backoff when it exits, stopped with the server.
    #[arg(long, action = clap::ArgAction::Append, value_name = "COMMAND")]
    launch_external: Vec<String>,
    /// Service ids (in `public`) the preceding --launch-external registers; the server
    /// waits until they resolve before it is ready.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, value_name = "ID")]
    check_services: Vec<String>,
    /// Seconds to wait for an external service's --check-services.
    #[arg(long, env = "HYPHA_EXTERNAL_TIMEOUT", value_parser = seconds, default_value = "30")]
    external_timeout: Duration,
    /// Restarts of an external service (or a Python startup process) allowed within
    /// --restart-window before the server gives up on it.
    #[arg(long, env = "HYPHA_EXTERNAL_MAX_RESTARTS", default_value_t = 5)]
    external_max_restarts: u32,
    /// The window, in seconds, --external-max-restarts counts restarts in.
    #[arg(long, env = "HYPHA_EXTERNAL_RESTART_WINDOW", value_parser = seconds, default_value = "60")]
    restart_window: Duration,
    /// Seconds a supervised child gets between SIGTERM and SIGKILL when the server stops.
    #[arg(long, env = "HYPHA_CHILD_STOP_GRACE", value_parser = seconds, default_value = "5")]
    child_stop_grace: Duration,
    /// Which --launch-external each --check-services belongs to (filled from the argument
    /// positions after parsing).
    #[arg(skip)]
    check_groups: Vec<Vec<String>>,
}

/// Subcommands besides running the server.
#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the local user accounts in --data-dir.
    #[command(subcommand)]
    User(UserCommand),
}

/// `hypha-server user ...`.
#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create an account; the password is read from standard input (never from the
    /// command line, where other users could see it).
    Add {
        /// Login email.
        #[arg(long)]
        email: String,
        /// Read the password from standard input (required).
        #[arg(long)]
        password_stdin: bool,
        /// Display name (default: the email's local part).
        #[arg(long)]
        name: Option<String>,
        /// Give the account the `admin` role (admin of every workspace).
        #[arg(long)]
        admin: bool,
    },
    /// List the accounts (id, email, name, roles).
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `user` subcommand against the store in `data_dir`.
fn user_command(data_dir: &std::path::Path, cmd: UserCommand) -> Result<(), Box<dyn std::error::Error>> {
    let store = AccountStore::open(data_dir)?;
    match cmd {
        UserCommand::Add { email, password_stdin, name, admin } => {
            if !password_stdin {
                return Err("give the password on standard input with --password-stdin \
                            (it is never taken from the command line)"
                    .into());
            }
            let mut password = String::new();
            std::io::stdin().read_to_string(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            let account = store.create(&NewAccount { email, password, name, admin })?;
            println!(
                "created user {} <{}>{} (workspace {})",
                account.id,
                account.email,
                if account.is_admin() { " with role admin" } else { "" },
                account.workspace()
            );
        }
        UserCommand::List { json } => {
            let accounts = store.list()?;
            if json {
                let rows: Vec<serde_json::Value> = accounts
                    .iter()
                    .map(|a| {
                        serde_json::json!({"id": a.id, "email": a.email, "name": a.name,
                                           "roles": a.roles, "created_at": a.created_at})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!("id\temail\tname\troles");
                for a in accounts {
                    println!("{}\t{}\t{}\t{}", a.id, a.email, a.name, a.roles.join(","));
                }
            }
        }
    }
    Ok(())
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|e| format!("not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("not a valid duration: {e}"))
}

/// `RUST_LOG` if set, else `HYPHA_LOGLEVEL` (Python level names), else warnings plus our
/// own start/stop lines.
fn log_filter() -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        return filter;
    }
    let level = std::env::var("HYPHA_LOGLEVEL").ok().map(|l| match l.to_ascii_uppercase().as_str() {
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARNING" | "WARN" => "warn",
        "ERROR" | "CRITICAL" => "error",
        "TRACE" => "trace",
        _ => "warn",
    });
    match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::new("warn,hypha_server=info,hypha_rpc=info"),
    }
}

fn build(args: Args) -> Result<Server, Box<dyn std::error::Error>> {
    let mut b = Server::builder().data_dir(args.data_dir).allow_signup(!args.no_signup);
    if let Some(secret) = std::env::var("HYPHA_JWT_SECRET").ok().or_else(|| std::env::var("JWT_SECRET").ok())
    {
        if !secret.is_empty() {
            b = b.jwt_secret(secret);
        }
    }
    if let Some(v) = args.public_base_url {
        b = b.public_base_url(v);
    }
    if let Some(v) = args.server_id {
        b = b.server_id(v);
    }
    if let Some(v) = args.root_token {
        b = b.root_token(v);
    }
    if let Some(v) = args.ws_auth_timeout {
        b = b.auth_timeout(v);
    }
    if let Some(v) = args.ws_idle_timeout {
        b = b.idle_timeout(v);
    }
    if let Some(v) = args.ws_msg_rate_limit {
        b = b.message_rate_limit(v);
    }
    if let Some(v) = args.ws_msg_burst_limit {
        b = b.message_burst_limit(v);
    }
    if let Some(v) = args.ws_max_frame_size {
        b = b.max_frame_size(v);
    }
    if let Some(v) = args.max_concurrent_connections {
        b = b.max_concurrent_handshakes(v);
    }
    if let Some(v) = args.max_services_per_client {
        b = b.max_services_per_client(v);
    }
    if let Some(v) = args.reconnection_token_life_time {
        b = b.reconnection_token_life_time(v);
    }
    if let Some(v) = args.shutdown_timeout {
        b = b.shutdown_timeout(v);
    }
    if let Some(v) = args.busy_poll_us {
        b = b.busy_poll(Duration::from_micros(v));
    }
    if let Some(v) = args.workers {
        b = b.workers(v);
    }
    b = b.allow_origins(hypha_rpc::server::parse_origins(&args.allow_origins));
    for spec in &args.static_mounts {
        let mount = StaticMount::parse(spec)?;
        b = b.static_mount(mount.path, mount.dir);
    }
    let limits = if args.disable_http_rate_limit {
        None
    } else {
        let d = HttpRateLimits::default();
        Some(HttpRateLimits {
            anonymous_rate: args.http_rate_limit.unwrap_or(d.anonymous_rate),
            anonymous_burst: args.http_burst_limit.unwrap_or(d.anonymous_burst),
            authenticated_rate: args.http_authenticated_rate_limit.unwrap_or(d.authenticated_rate),
            authenticated_burst: args.http_authenticated_burst_limit.unwrap_or(d.authenticated_burst),
        })
    };
    b = b.http_rate_limits(limits);
    let restart = RestartPolicy {
        max_restarts: args.external_max_restarts,
        window: args.restart_window,
        ..RestartPolicy::default()
    };
    for spec in &args.startup_functions {
        b = b.python_startup_function(spec.clone());
    }
    if let Some(python) = args.python {
        b = b.python(python);
    }
    if let Some(base) = args.base_python {
        b = b.base_python(base);
    }
    b = b
        .python_startup_timeout(args.startup_timeout)
        .python_restart_policy(Some(restart))
        .child_stop_grace(args.child_stop_grace);
    for (command, checks) in args.launch_external.iter().zip(&args.check_groups) {
        b = b.external_service(
            ExternalService::new(command.clone())
                .check_services(checks.clone())
                .timeout(args.external_timeout)
                .restart(Some(restart)),
        );
    }
    Ok(b.build()?)
}

/// Parses the arguments and assigns every `--check-services` value to the
/// `--launch-external` before it on the command line (an error if there is none).
fn parse_args() -> Args {
    let matches = Args::command().get_matches();
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let launches: Vec<usize> =
        matches.indices_of("launch_external").map(Iterator::collect).unwrap_or_default();
    let checks: Vec<usize> = matches.indices_of("check_services").map(Iterator::collect).unwrap_or_default();
    args.check_groups = vec![Vec::new(); launches.len()];
    for (value, index) in args.check_services.iter().zip(checks) {
        match launches.iter().rposition(|l| *l < index) {
            Some(owner) => args.check_groups[owner].push(value.clone()),
            None => Args::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("--check-services {value}: give it after the --launch-external it belongs to"),
                )
                .exit(),
        }
    }
    args
}

fn main() -> ExitCode {
    let mut args = parse_args();
    tracing_subscriber::fmt().with_env_filter(log_filter()).with_writer(std::io::stderr).init();
    if let Some(Command::User(cmd)) = args.command.take() {
        return match user_command(&args.data_dir, cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (host, port) = (args.host.clone(), args.port);
    let server = match build(args) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = actix_rt::System::new().block_on(server.run(&host, port));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e @ ServerError::Startup(_)) => {
            // Said on stderr even when the log filter hides errors: the start was refused.
            eprintln!("hypha-server: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}
