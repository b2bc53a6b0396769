//! Supervised external processes (server spec §7): the commands of `--launch-external`, the
//! Python processes that run `--startup-functions`, and the client-side
//! `launch_external_services`.
//!
//! One [`Supervisor`] actor per process. It spawns the command in a process group of its
//! own (so a shell wrapper's children go with it), forwards every stdout/stderr line to the
//! server's `tracing` log under the service's name, and on exit restarts it with
//! exponential backoff unless the [`RestartPolicy`] says it has crashed too often within
//! its window, in which case it gives up and logs why. [`Stop`] sends SIGTERM to the group,
//! waits a grace period, then SIGKILLs the group: no orphans survive the server. On Linux
//! the child also gets `PR_SET_PDEATHSIG`, so it dies even if the server is killed hard.
//!
//! The actor publishes a [`SupervisorStatus`] on a `watch` channel, which is what the
//! startup code waits on (ready marker seen, process gone, gave up) and what tests inspect.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message, ResponseActFuture, SpawnHandle,
};
use actix::{ActorFutureExt, WrapFuture};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// Longest stdout/stderr line forwarded to the log; the rest of a longer line is dropped,
/// so a process that prints without newlines cannot grow the server's memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// The `tracing` target of forwarded output and supervision events: the binary's default
/// log filter shows it at `info`.
pub const LOG_TARGET: &str = "hypha_server::external";

/// What to run, produced afresh for every (re)start so a restart gets e.g. a fresh token.
#[derive(Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and arguments (no shell: `argv[0]` is looked up on `PATH`).
    pub argv: Vec<String>,
    /// Extra environment variables (on top of the server's own environment).
    pub env: Vec<(String, String)>,
    /// Working directory (default: the server's).
    pub current_dir: Option<PathBuf>,
}

impl fmt::Debug for CommandSpec {
    /// The environment may hold tokens: only its keys are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSpec")
            .field("argv", &self.argv)
            .field("env", &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("current_dir", &self.current_dir)
            .finish()
    }
}

/// Builds the [`CommandSpec`] of the next start; an `Err` counts as a failed start.
pub type CommandFactory = Arc<dyn Fn() -> Result<CommandSpec, String> + Send + Sync>;

/// When a process that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// Most restarts within `window`; one more exit and the supervisor gives up.
    pub max_restarts: u32,
    /// The sliding window the restarts are counted in.
    pub window: Duration,
    /// Wait before the first restart; doubled for each further restart in the window.
    pub initial_backoff: Duration,
    /// Longest wait between restarts.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    /// 5 restarts per minute, backoff 0.5 s doubling up to 10 s.
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `n` (1-based) within the window.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// How one supervised process is run.
#[derive(Clone)]
pub struct SupervisorConfig {
    /// The name its log lines carry (`service = ...`).
    pub name: String,
    /// What to run.
    pub command: CommandFactory,
    /// `None`: never restart (upstream's `launch_external_services`, `always_restart=False`).
    pub restart: Option<RestartPolicy>,
    /// How long [`Stop`] waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// A stdout line starting with this marks the process ready (the line is not logged).
    pub ready_marker: Option<String>,
    /// A stdout line starting with this carries the process's own error message.
    pub error_marker: Option<String>,
    /// Restart only a process that had reported ready (its ready marker): one that fails
    /// before is a failed start (a startup function that raises), not a crash to retry.
    pub restart_only_after_ready: bool,
}

impl fmt::Debug for SupervisorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorConfig")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .field("stop_grace", &self.stop_grace)
            .field("ready_marker", &self.ready_marker)
            .field("error_marker", &self.error_marker)
            .field("restart_only_after_ready", &self.restart_only_after_ready)
            .finish_non_exhaustive()
    }
}

impl SupervisorConfig {
    /// A process that is never restarted, stopped with a 5 s grace period.
    pub fn new(name: impl Into<String>, command: CommandFactory) -> Self {
        SupervisorConfig {
            name: name.into(),
            command,
            restart: None,
            stop_grace: Duration::from_secs(5),
            ready_marker: None,
            error_marker: None,
            restart_only_after_ready: false,
        }
    }
}

/// Where the supervised process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// Spawned and not yet exited.
    Running,
    /// Exited; waiting out the backoff before the next start.
    Restarting,
    /// Exited and not restarted (no restart policy).
    Exited,
    /// Exited once too often within the policy's window: not restarted any more.
    GaveUp,
    /// Stopped by [`Stop`] (or the supervisor went away).
    Stopped,
}

/// What the supervisor publishes after every change.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorStatus {
    /// Current state.
    pub state: ProcessState,
    /// The running process's id (also its process group id).
    pub pid: Option<u32>,
    /// How many times a process was spawned.
    pub starts: u32,
    /// The ready marker was seen from the current process (always `false` without a marker).
    pub ready: bool,
    /// How the last process ended (`exit status: 1`, `signal: 9`, or a spawn error).
    pub last_exit: Option<String>,
    /// The process's own error: the error marker's text, else its last stderr line.
    pub last_error: Option<String>,
}

impl SupervisorStatus {
    /// True when no process runs and none will be started again.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, ProcessState::Exited | ProcessState::GaveUp | ProcessState::Stopped)
    }
}

/// The supervisor actor (see the module docs).
pub struct Supervisor {
    config: SupervisorConfig,
    status: watch::Sender<SupervisorStatus>,
    generation: u64,
    /// When the restarts within the window happened.
    restarts: VecDeque<Instant>,
    pending_restart: Option<SpawnHandle>,
    /// Set by [`Stop`]: exits are expected, nothing restarts.
    stopping: bool,
    /// Fires `true` when the current process has exited.
    exited: Option<watch::Receiver<bool>>,
    /// The current process printed its error marker.
    error_marked: bool,
    /// The current process reported ready.
    was_ready: bool,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("name", &self.config.name)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

/// A started supervisor: its address and its status feed.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    /// The actor.
    pub addr: Addr<Supervisor>,
    /// Its published status.
    pub status: watch::Receiver<SupervisorStatus>,
    /// The name it logs under.
    pub name: String,
    stop_grace: Duration,
}

impl Supervisor {
    /// Starts the actor in the current arbiter; it spawns the process at once.
    pub fn start_supervised(config: SupervisorConfig) -> SupervisorHandle {
        let (tx, rx) = watch::channel(SupervisorStatus {
            state: ProcessState::Running,
            pid: None,
            starts: 0,
            ready: false,
            last_exit: None,
            last_error: None,
        });
        let name = config.name.clone();
        let stop_grace = config.stop_grace;
        let addr = Supervisor {
            config,
            status: tx,
            generation: 0,
            restarts: VecDeque::new(),
            pending_restart: None,
            stopping: false,
            exited: None,
            error_marked: false,
            was_ready: false,
        }
        .start();
        SupervisorHandle { addr, status: rx, name, stop_grace }
    }

    fn spawn_process(&mut self, ctx: &mut Context<Self>) {
        self.pending_restart = None;
        if self.stopping {
            return;
        }
        self.generation += 1;
        self.error_marked = false;
        self.was_ready = false;
        let generation = self.generation;
        let name = self.config.name.clone();
        let spawned = (self.config.command)().and_then(|spec| spawn_child(&spec).map_err(|e| e.to_string()));
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                tracing::error!(target: LOG_TARGET, service = %name, error = %e, "cannot start supervised process");
                self.status.send_modify(|s| {
                    s.starts += 1;
                    s.pid = None;
                    s.ready = false;
                    s.last_exit = Some(format!("failed to start: {e}"));
                    s.last_error = Some(e.clone());
                });
                self.after_exit(ctx);
                return;
            }
        };
        let pid = child.id();
        tracing::info!(target: LOG_TARGET, service = %name, pid, "supervised process started");
        self.status.send_modify(|s| {
            s.state = ProcessState::Running;
            s.starts += 1;
            s.pid = pid;
            s.ready = false;
            s.last_error = None;
        });
        let me = ctx.address();
        if let Some(out) = child.stdout.take() {
            let markers =
                Markers { ready: self.config.ready_marker.clone(), error: self.config.error_marker.clone() };
            actix_rt::spawn(forward_lines(
                out,
                name.clone(),
                Stream::Stdout,
                me.clone(),
                generation,
                markers,
            ));
        }
        if let Some(err) = child.stderr.take() {
            actix_rt::spawn(forward_lines(
                err,
                name.clone(),
                Stream::Stderr,
                me.clone(),
                generation,
                Markers::none(),
            ));
        }
        let (exited_tx, exited_rx) = watch::channel(false);
        self.exited = Some(exited_rx);
        actix_rt::spawn(async move {
            let status = child.wait().await;
            let how = match status {
                Ok(s) => describe_exit(s),
                Err(e) => format!("wait failed: {e}"),
            };
            // Leftovers of the group (children of a wrapper) go with the leader.
            if let Some(pid) = pid {
                signal_group(pid, Signal::Kill);
            }
            let _ = exited_tx.send(true);
            me.do_send(ChildExited { generation, how });
        });
    }

    /// Decides what follows an exit (or a failed start).
    fn after_exit(&mut self, ctx: &mut Context<Self>) {
        let name = self.config.name.clone();
        if self.stopping {
            self.status.send_modify(|s| s.state = ProcessState::Stopped);
            return;
        }
        let policy = match self.config.restart {
            Some(p) if self.was_ready || !self.config.restart_only_after_ready => p,
            _ => {
                self.status.send_modify(|s| s.state = ProcessState::Exited);
                return;
            }
        };
        let now = Instant::now();
        while self.restarts.front().is_some_and(|t| now.duration_since(*t) > policy.window) {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= policy.max_restarts {
            tracing::error!(
                target: LOG_TARGET,
                service = %name,
                restarts = self.restarts.len(),
                window = ?policy.window,
                "supervised process keeps exiting: giving up after {} restarts within {:?}",
                self.restarts.len(),
                policy.window
            );
            self.status.send_modify(|s| s.state = ProcessState::GaveUp);
            return;
        }
        self.restarts.push_back(now);
        let n = self.restarts.len() as u32;
        let wait = policy.backoff(n);
        tracing::warn!(
            target: LOG_TARGET,
            service = %name,
            restart = n,
            max_restarts = policy.max_restarts,
            backoff = ?wait,
            "restarting supervised process"
        );
        self.status.send_modify(|s| s.state = ProcessState::Restarting);
        self.pending_restart = Some(ctx.run_later(wait, |act, ctx| act.spawn_process(ctx)));
    }

    fn current_pid(&self) -> Option<u32> {
        self.status.borrow().pid
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.spawn_process(ctx);
    }

    /// Last resort when the actor goes away without [`Stop`] (its arbiter stopped): kill
    /// the group at once rather than leave an orphan.
    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(pid) = self.current_pid() {
            if !self.exited.as_ref().is_some_and(|e| *e.borrow()) {
                signal_group(pid, Signal::Kill);
            }
        }
        self.status.send_modify(|s| {
            s.state = ProcessState::Stopped;
            s.pid = None;
        });
    }
}

/// The process of generation `generation` has exited.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct ChildExited {
    generation: u64,
    how: String,
}

impl Handler<ChildExited> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        let level_warn = !self.stopping;
        if level_warn {
            let last = self.status.borrow().last_error.clone().unwrap_or_default();
            tracing::warn!(target: LOG_TARGET, service = %self.config.name, how = %msg.how, last_error = %last,
                "supervised process exited");
        } else {
            tracing::info!(target: LOG_TARGET, service = %self.config.name, how = %msg.how, "supervised process stopped");
        }
        self.status.send_modify(|s| {
            s.pid = None;
            s.ready = false;
            s.last_exit = Some(msg.how.clone());
        });
        self.after_exit(ctx);
    }
}

/// A marker line (ready or error) from the process of `generation`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Marker {
    generation: u64,
    kind: MarkerKind,
}

#[derive(Debug)]
enum MarkerKind {
    Ready,
    Error(String),
    StderrLine(String),
}

impl Handler<Marker> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Marker, _ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        match msg.kind {
            MarkerKind::Ready => {
                tracing::info!(target: LOG_TARGET, service = %self.config.name, "supervised process is ready");
                self.was_ready = true;
                self.status.send_modify(|s| s.ready = true);
            }
            MarkerKind::Error(text) => {
                self.error_marked = true;
                self.status.send_modify(|s| s.last_error = Some(text));
            }
            // The error marker's text wins over later stderr noise.
            MarkerKind::StderrLine(line) if !self.error_marked => {
                self.status.send_modify(|s| s.last_error = Some(line));
            }
            MarkerKind::StderrLine(_) => {}
        }
    }
}

/// Stops the process: SIGTERM to its group, SIGKILL after the grace period, then the
/// actor stops. Resolves once the process is gone.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop {
    /// Wait between SIGTERM and SIGKILL.
    pub grace: Duration,
}

impl Handler<Stop> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if let Some(h) = self.pending_restart.take() {
            ctx.cancel_future(h);
        }
        let pid = self.current_pid();
        let exited = self.exited.clone();
        let name = self.config.name.clone();
        let fut = async move {
            let (Some(pid), Some(mut exited)) = (pid, exited) else { return };
            if *exited.borrow() {
                return;
            }
            signal_group(pid, Signal::Term);
            let gone = tokio::time::timeout(msg.grace, exited.wait_for(|e| *e)).await.is_ok();
            if !gone {
                tracing::warn!(target: LOG_TARGET, service = %name, pid, grace = ?msg.grace,
                    "supervised process ignored SIGTERM: killing its process group");
                signal_group(pid, Signal::Kill);
                let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e)).await;
            }
        };
        Box::pin(fut.into_actor(self).map(|_, act, ctx| {
            act.status.send_modify(|s| {
                s.state = ProcessState::Stopped;
                s.pid = None;
            });
            ctx.stop();
        }))
    }
}

impl SupervisorHandle {
    /// The current status.
    pub fn status(&self) -> SupervisorStatus {
        self.status.borrow().clone()
    }

    /// Stops the process with the configured grace period and waits until it is gone.
    pub async fn stop(&self) {
        let _ = self.addr.send(Stop { grace: self.stop_grace }).await;
    }

    /// Sends SIGKILL to the process group now, without waiting (what a dropped handle of
    /// `launch_external_services` does).
    pub fn kill_now(&self) {
        self.addr.do_send(Stop { grace: Duration::ZERO });
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone)]
struct Markers {
    ready: Option<String>,
    error: Option<String>,
}

impl Markers {
    fn none() -> Self {
        Markers { ready: None, error: None }
    }
}

/// Reads `reader` line by line (each cut at [`MAX_LINE_BYTES`]) and logs every line under
/// the service's name; marker lines go to the supervisor instead.
async fn forward_lines<R: AsyncRead + Unpin>(
    reader: R,
    name: String,
    stream: Stream,
    supervisor: Addr<Supervisor>,
    generation: u64,
    markers: Markers,
) {
    let mut reader = BufReader::new(reader);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let (done, used) = {
            let buf = match reader.fill_buf().await {
                Ok(b) => b,
                Err(_) => break,
            };
            if buf.is_empty() {
                (true, 0)
            } else {
                let (chunk, found) = match buf.iter().position(|b| *b == b'\n') {
                    Some(i) => (&buf[..i], Some(i + 1)),
                    None => (buf, None),
                };
                let room = MAX_LINE_BYTES.saturating_sub(line.len());
                line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                match found {
                    Some(used) => {
                        let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
                        emit_line(&name, stream, &supervisor, generation, &markers, text);
                        line.clear();
                        (false, used)
                    }
                    None => (false, buf.len()),
                }
            }
        };
        if done {
            break;
        }
        reader.consume(used);
    }
    if !line.is_empty() {
        let text = String::from_utf8_lossy(&line).into_owned();
        emit_line(&name, stream, &supervisor, generation, &markers, text);
    }
}

fn emit_line(
    name: &str,
    stream: Stream,
    supervisor: &Addr<Supervisor>,
    generation: u64,
    markers: &Markers,
    text: String,
) {
    if markers.ready.as_deref().is_some_and(|m| text.starts_with(m)) {
        supervisor.do_send(Marker { generation, kind: MarkerKind::Ready });
        return;
    }
    if let Some(m) = markers.error.as_deref() {
        if let Some(rest) = text.strip_prefix(m) {
            let msg = rest.trim().to_owned();
            tracing::error!(target: LOG_TARGET, service = %name, "{msg}");
            supervisor.do_send(Marker { generation, kind: MarkerKind::Error(msg) });
            return;
        }
    }
    if matches!(stream, Stream::Stderr) && !text.trim().is_empty() {
        supervisor.do_send(Marker { generation, kind: MarkerKind::StderrLine(text.trim().to_owned()) });
    }
    tracing::info!(target: LOG_TARGET, service = %name, stream = stream.as_str(), "{text}");
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

/// Spawns `spec` in a new process group, stdin closed, stdout/stderr piped.
fn spawn_child(spec: &CommandSpec) -> std::io::Result<tokio::process::Child> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = &spec.current_dir {
        cmd.current_dir(dir);
    }
    #[cfg(unix)]
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the closure runs in the forked child before exec and only calls
        // `prctl`, which is async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| std::io::Error::new(e.kind(), format!("{program}: {e}")))
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Term,
    Kill,
}

/// Sends `signal` to the process group `pgid` (our children lead their own group, so the
/// group id is the child's pid). A group that no longer exists is not an error.
#[cfg(unix)]
fn signal_group(pgid: u32, signal: Signal) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid <= 1 {
        return;
    }
    let sig = match signal {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: `killpg` takes plain integers and has no memory-safety preconditions.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

#[cfg(not(unix))]
fn signal_group(_pgid: u32, _signal: Signal) {}

/// Splits a command line on whitespace (no shell quoting, as upstream's
/// `launch_external_services`), after replacing `{server_url}`, `{workspace}` and `{token}`.
/// Any other `{name}` is an error (upstream's `str.format` raises `KeyError` too); `{{` and
/// `}}` stand for literal braces.
pub fn format_command(
    template: &str,
    server_url: &str,
    workspace: &str,
    token: &str,
) -> Result<Vec<String>, String> {
    let mut out = String::with_capacity(template.len() + token.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
        } else if tail.starts_with('}') {
            return Err(format!("Single '}}' encountered in command: {template}"));
        } else {
            let end =
                tail.find('}').ok_or_else(|| format!("Single '{{' encountered in command: {template}"))?;
            match &tail[1..end] {
                "server_url" => out.push_str(server_url),
                "workspace" => out.push_str(workspace),
                "token" => out.push_str(token),
                other => return Err(format!("unknown placeholder {{{other}}} in command: {template}")),
            }
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    let argv: Vec<String> = out.split_whitespace().map(str::to_owned).collect();
    if argv.is_empty() {
        return Err(format!("Invalid command: {template:?}"));
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_the_command_split() {
        let argv = format_command(
            "python ./s.py --server-url={server_url}  --workspace={workspace} --token={token} {{x}}",
            "http://127.0.0.1:1",
            "public",
            "T",
        )
        .unwrap();
        assert_eq!(
            argv,
            ["python", "./s.py", "--server-url=http://127.0.0.1:1", "--workspace=public", "--token=T", "{x}"]
        );
        assert!(format_command("run {nope}", "u", "w", "t").unwrap_err().contains("{nope}"));
        assert!(format_command("run {token", "u", "w", "t").is_err());
        assert!(format_command("   ", "u", "w", "t").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            max_restarts: 9,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(350));
        assert_eq!(p.backoff(40), Duration::from_millis(350));
    }

    fn sh(script: &str) -> CommandFactory {
        let argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        Arc::new(move || Ok(CommandSpec { argv: argv.clone(), env: Vec::new(), current_dir: None }))
    }

    #[actix_rt::test]
    async fn a_crashing_process_is_restarted_then_given_up() {
        let mut config = SupervisorConfig::new("crasher", sh("echo started; exit 3"));
        config.restart = Some(RestartPolicy {
            max_restarts: 2,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        });
        let mut h = Supervisor::start_supervised(config);
        let s = tokio::time::timeout(
            Duration::from_secs(10),
            h.status.wait_for(|s| s.state == ProcessState::GaveUp),
        )
        .await
        .expect("gives up")
        .unwrap()
        .clone();
        assert_eq!(s.starts, 3, "first start plus two restarts");
        assert_eq!(s.last_exit.as_deref(), Some("exit status 3"));
    }

    #[actix_rt::test]
    async fn stop_terms_then_kills_the_whole_group() {
        // The shell ignores SIGTERM and has a child: both must be gone after the grace.
        let mut config = SupervisorConfig::new("stubborn", sh("trap '' TERM; sleep 30 & echo ready; wait"));
        config.ready_marker = Some("ready".into());
        config.stop_grace = Duration::from_millis(200);
        let mut h = Supervisor::start_supervised(config);
        tokio::time::timeout(Duration::from_secs(10), h.status.wait_for(|s| s.ready)).await.unwrap().unwrap();
        let pid = h.status().pid.unwrap();
        h.stop().await;
        assert_eq!(h.status().state, ProcessState::Stopped);
        // Members of the group that are not zombies (PID 1 of a container may not reap).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let members = live_group_members(pid);
            if members.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "group members survived the stop: {members:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pids in process group `pgid` that are not zombies, from /proc.
    fn live_group_members(pgid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces, so split after ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
                out.push(pid);
            }
        }
        out
    }
}
