//! The Rust client: connect to a Hypha server, register services, call other clients'
//! services.
//!
//! ```no_run
//! use hypha_rpc::client::{connect_to_server, ClientConfig, Error, Service};
//! use hypha_rpc::core::schema::Visibility;
//!
//! # async fn run() -> Result<(), Error> {
//! let client = connect_to_server(ClientConfig::new("http://127.0.0.1:9527")).await?;
//! let service = Service::builder("hello-world")
//!     .visibility(Visibility::Public)
//!     .function("hello", |name: String| async move { Ok::<_, Error>(format!("Hello {name}")) })
//!     .build();
//! let info = client.register_service(service).await?;
//!
//! let svc = client.get_service(&info.id).await?;
//! let greeting: String = svc.call_typed("hello", ("John",)).await?;
//! assert_eq!(greeting, "Hello John");
//! client.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! The client runs inside an actix `System` (`#[actix_rt::main]`, `#[actix_rt::test]`,
//! or an actix-web server): its websocket is awc, which needs one. [`Client`] itself is
//! `Send` and cheap to clone; the actors behind it (see `hypha_actors::client`) live on
//! the arbiter that called [`connect_to_server`].

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use hypha_actors::client::connection::{
    self, ConnectOptions, ConnectionActor, ConnectionInfo, GetConnectionStats,
};
use hypha_actors::client::session_registry::RegistryOptions;
use hypha_actors::client::{
    AddService, CallManager, Disconnect, GetState, GetStats, LocalServiceInfo, RegisterCodec, RegistryStats,
    RemoveService, SessionRegistry,
};
use hypha_core::schema::ServiceInfo;
use hypha_core::session::BUILTIN_SERVICE_ID;
use hypha_core::{Map, Value};
use tokio::sync::oneshot;

mod events;
mod external;
mod interface;
mod login;
mod remote;
mod service;
mod stream;

pub use events::{EventStream, EventSubscription};
pub use external::{launch_external_services, ExternalProcess, LaunchError};
pub use hypha_actors::client::backoff::BackoffConfig as ReconnectConfig;
pub use hypha_actors::client::data::NdArrayOf;
pub use hypha_actors::client::DEFAULT_EVENT_BUFFER;
pub use hypha_actors::client::{ConnectionState, ConnectionStats, Error};
pub use hypha_core::array::{DType, Element, NdArray};
pub use hypha_core::schema::{Param, ParamType, Visibility};
pub use interface::{Interface, InterfaceBuilder, RemoteInterface};
pub use login::{login, LoginCallback, LoginCallbackFuture, LoginConfig, LoginContext, LoginOutcome};
pub use remote::{IntoArgs, RemoteFunction, RemoteService};
pub use service::{
    callback, callback_def, ArgCursor, Binding, Context, FromArg, FunctionDef, IntoFunction, Service,
    ServiceBuilder,
};
pub use stream::{generator, RemoteGenerator, TypedGenerator};

/// How to connect. The keys of the Python client's `connect_to_server` config that make
/// sense in Rust; every timeout is a `Duration`.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http(s)://host:port` (the websocket is `/ws` below it) or a `ws(s)://` URL.
    pub server_url: String,
    /// The workspace to join; `None`: the token's, or a personal one for anonymous users.
    pub workspace: Option<String>,
    /// A token from `login()` or `generate_token`; `None` connects anonymously.
    pub token: Option<String>,
    /// Our client id; `None` generates a random 22-character one (as Python does).
    pub client_id: Option<String>,
    /// A display name for this client (kept locally, as Python's `name`).
    pub name: Option<String>,
    /// How long a call may go without a result or heartbeat, and how long the handshake
    /// may take (Python's `method_timeout`, 30 s).
    pub method_timeout: Duration,
    /// Application ping period; `None` disables it (Python: 20 s).
    pub ping_interval: Option<Duration>,
    /// Largest frame accepted from the server.
    pub max_frame_size: usize,
    /// Reconnection after an unexpected close: exponential backoff with jitter, flap
    /// control and an attempt limit, upstream's defaults ([`ReconnectConfig::disabled`]
    /// makes a lost connection final). The client keeps its workspace and id (the
    /// server's reconnection token) and registers its services again.
    pub reconnect: ReconnectConfig,
    /// How long a session (the state behind a callback or a generator handed to a peer)
    /// may stay idle before it is collected; any use keeps it alive. Upstream: 600 s.
    pub session_ttl: Duration,
    /// Extra HTTP headers of the websocket upgrade request (upstream's
    /// `additional_headers`), e.g. for an authenticating proxy in front of the server.
    pub additional_headers: Vec<(String, String)>,
    /// How long the connection's thread may keep polling its sockets after a frame from
    /// the server before it sleeps (50 µs; zero: never). Back-to-back calls then find
    /// their replies without a scheduler wake-up; the window adapts to the traffic and
    /// closes when frames are far apart, and a polling thread yields its CPU to any
    /// other that is ready (see `hypha_actors::busy_poll`).
    pub busy_poll: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            server_url: "http://127.0.0.1:9527".into(),
            workspace: None,
            token: None,
            client_id: None,
            name: None,
            method_timeout: Duration::from_secs(30),
            ping_interval: Some(Duration::from_secs(20)),
            max_frame_size: 64 << 20,
            reconnect: ReconnectConfig::default(),
            session_ttl: Duration::from_secs(600),
            additional_headers: Vec::new(),
            busy_poll: hypha_actors::busy_poll::DEFAULT_MAX,
        }
    }
}

impl ClientConfig {
    /// The defaults, for `server_url`.
    pub fn new(server_url: impl Into<String>) -> Self {
        Self { server_url: server_url.into(), ..Self::default() }
    }

    /// Sets the workspace.
    pub fn workspace(mut self, ws: impl Into<String>) -> Self {
        self.workspace = Some(ws.into());
        self
    }

    /// Sets the token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the client id.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Sets the display name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the method timeout.
    pub fn method_timeout(mut self, t: Duration) -> Self {
        self.method_timeout = t;
        self
    }

    /// Sets the reconnection policy.
    pub fn reconnect(mut self, reconnect: ReconnectConfig) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Sets the idle lifetime of sessions.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Sets how long the connection's thread may poll after a frame (zero: never).
    pub fn busy_poll(mut self, max: Duration) -> Self {
        self.busy_poll = max;
        self
    }

    /// Adds a header to the websocket upgrade request.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.additional_headers.push((name.into(), value.into()));
        self
    }
}

/// How member names of a fetched service are rewritten (upstream's `case_conversion`):
/// the server renames the keys, so a service written in one language's style can be
/// called in another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseConversion {
    /// `HelloWorld`, `hello_world` -> `helloWorld`.
    Camel,
    /// `HelloWorld`, `helloWorld` -> `hello_world`.
    Snake,
}

impl CaseConversion {
    fn as_str(self) -> &'static str {
        match self {
            CaseConversion::Camel => "camel",
            CaseConversion::Snake => "snake",
        }
    }
}

/// Options of [`Client::get_service_with`] (the `config` of upstream's `get_service`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GetServiceConfig {
    /// Rename the service's members; `None` keeps them as registered.
    pub case_conversion: Option<CaseConversion>,
}

impl GetServiceConfig {
    /// Sets the case conversion.
    pub fn case_conversion(mut self, c: CaseConversion) -> Self {
        self.case_conversion = Some(c);
        self
    }
}

/// Connects, registers the built-in service and subscribes to `client_disconnected`
/// (spec §1.8), and returns the client. Must run inside an actix `System`.
pub async fn connect_to_server(config: ClientConfig) -> Result<Client, Error> {
    if actix_rt::System::try_current().is_none() {
        return Err(Error::Config(
            "connect_to_server must run inside an actix System (#[actix_rt::main] or #[actix_rt::test])"
                .into(),
        ));
    }
    let client_id = config.client_id.clone().unwrap_or_else(hypha_core::ids::random_id);
    let mut options = ConnectOptions::new(config.server_url.clone(), client_id);
    options.workspace = config.workspace.clone();
    options.token = config.token.clone();
    options.handshake_timeout = config.method_timeout;
    options.ping_interval = config.ping_interval;
    options.max_frame_size = config.max_frame_size;
    options.reconnect = config.reconnect.clone();
    options.additional_headers = config.additional_headers.clone();
    options.busy_poll = config.busy_poll;
    let (socket, info) = connection::open(&options, None).await?;
    let events = hypha_actors::client::EventHub::default();
    let registry_options = RegistryOptions {
        method_timeout: config.method_timeout,
        session_ttl: config.session_ttl,
        events: events.clone(),
        ..RegistryOptions::default()
    };
    let registry = SessionRegistry::new(registry_options, &info).start();
    let connection = ConnectionActor::new(options, registry.clone(), socket, info.clone()).start();
    let client = Client { inner: Arc::new(Inner { config, info, registry, connection, events }) };
    // Bootstrap: the built-in service first (the server refuses others before it).
    let builtin = client.inner.registry.send(LocalServiceInfo { id: BUILTIN_SERVICE_ID.into() }).await??;
    client.call("register_service", vec![builtin.to_value()]).await?;
    client.call("subscribe", vec![Value::List(vec![Value::from("client_disconnected")])]).await?;
    Ok(client)
}

struct Inner {
    config: ClientConfig,
    info: ConnectionInfo,
    registry: Addr<SessionRegistry>,
    connection: Addr<ConnectionActor>,
    /// The event subscribers (the registry delivers into it).
    events: hypha_actors::client::EventHub,
}

impl Drop for Inner {
    /// The last handle is gone: nobody can use the connection any more, so end it as
    /// [`Client::disconnect`] does, without waiting: the registry rejects what is pending
    /// and stops its service actors, the connection actor closes the socket and stops.
    /// The connection actor must be told itself: its ping timer would otherwise keep it,
    /// and the socket, alive for good (a client dropped after a failed bootstrap call,
    /// e.g. a busy server, left its websocket open).
    fn drop(&mut self) {
        self.registry.do_send(Disconnect);
        self.connection.do_send(connection::Close);
    }
}

/// A connected client: the workspace manager's functions plus local service management.
/// Cheap to clone and `Send`; dropping the last clone disconnects.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("workspace", &self.workspace())
            .field("client_id", &self.client_id())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The configuration it was connected with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The workspace the server put us in.
    pub fn workspace(&self) -> &str {
        &self.inner.info.workspace
    }

    /// Our client id.
    pub fn client_id(&self) -> &str {
        &self.inner.info.client_id
    }

    /// The server's `connection_info`.
    pub fn connection_info(&self) -> &ConnectionInfo {
        &self.inner.info
    }

    /// Calls a workspace-manager function (`echo`, `list_clients`, `get_workspace_info`,
    /// ...) with positional arguments.
    pub async fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, Error> {
        self.call_with_kwargs(method, args, None).await
    }

    /// Calls a workspace-manager function with keyword arguments too.
    pub async fn call_with_kwargs(
        &self,
        method: &str,
        args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<Value, Error> {
        let (reply, rx) = oneshot::channel();
        self.inner.registry.send(CallManager { method: method.to_owned(), args, kwargs, reply }).await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// The manager's `echo`: returns what it was given (a round trip through the server).
    pub async fn echo(&self, value: Value) -> Result<Value, Error> {
        self.call("echo", vec![value]).await
    }

    /// Registers a local service (spec §7.2): stores it, then tells the manager. Returns
    /// the service info with the full id `ws/client:id`. With the service's `overwrite`
    /// unset, an id that is already registered here fails with "Service already exists".
    pub async fn register_service(&self, service: Service) -> Result<ServiceInfo, Error> {
        let info =
            self.inner.registry.send(AddService { api: service.api, overwrite: service.overwrite }).await??;
        if let Err(e) = self.call("register_service", vec![info.to_value()]).await {
            let short = short_service_id(&info.id).to_owned();
            let _ = self.inner.registry.send(RemoveService { id: short }).await;
            return Err(e);
        }
        Ok(info)
    }

    /// Unregisters a local service (spec §7.8); `id` may be short or full. Later calls to
    /// its functions get "Method expired or not found".
    pub async fn unregister_service(&self, id: &str) -> Result<(), Error> {
        let removed = self.inner.registry.send(RemoveService { id: id.to_owned() }).await??;
        if removed.notify_server {
            self.call("unregister_service", vec![Value::from(removed.id)]).await?;
        }
        Ok(())
    }

    /// Fetches a service through the manager (`ws/client:svc`, `client:svc`, `svc`, with
    /// an optional `@app`), as a proxy whose functions call the provider directly.
    pub async fn get_service(&self, id: &str) -> Result<RemoteService, Error> {
        self.get_service_with(id, GetServiceConfig::default()).await
    }

    /// [`Client::get_service`] with options, e.g. member names converted to camelCase.
    pub async fn get_service_with(&self, id: &str, config: GetServiceConfig) -> Result<RemoteService, Error> {
        let mut options = Map::new();
        if let Some(c) = config.case_conversion {
            options.insert("case_conversion".into(), Value::from(c.as_str()));
        }
        let mut kwargs = Map::new();
        kwargs.insert("config".into(), Value::Map(options));
        let value = self.call_with_kwargs("get_service", vec![Value::from(id)], Some(kwargs)).await?;
        match value {
            Value::Map(api) => Ok(RemoteService::new(api, self.inner.registry.clone())),
            other => Err(Error::Convert(format!("get_service returned a {}, not a service", other.kind()))),
        }
    }

    /// Registers the public service `probes` (type `probes`, replacing an earlier one) whose
    /// functions answer the server's HTTP probe routes: `GET /{workspace}/services/probes/
    /// {name}` calls `name` (e.g. `readiness`, `liveness`) and returns its result as JSON,
    /// as upstream's `register_probes` does for Kubernetes-style health checks.
    pub async fn register_probes(&self, probes: Vec<FunctionDef>) -> Result<ServiceInfo, Error> {
        let base = self.inner.info.public_base_url.as_deref().unwrap_or(&self.inner.config.server_url);
        let mut service = Service::builder("probes")
            .name("Probes")
            .service_type("probes")
            .visibility(Visibility::Public)
            .description(format!(
                "Probes Service, visit {}/{}/services/probes for the available probes.",
                base.trim_end_matches('/'),
                self.workspace()
            ))
            .overwrite(true);
        for probe in probes {
            service = service.function_def(probe);
        }
        self.register_service(service.build()).await
    }

    /// Lists the services visible to us (the manager's `list_services`); `query` as
    /// upstream takes it (`None`: this workspace's services).
    pub async fn list_services(&self, query: Option<Value>) -> Result<Vec<Map>, Error> {
        let args = query.into_iter().collect();
        match self.call("list_services", args).await? {
            Value::List(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::Map(m) => Ok(m),
                    other => Err(Error::Convert(format!("list_services item is a {}", other.kind()))),
                })
                .collect(),
            other => Err(Error::Convert(format!("list_services returned a {}", other.kind()))),
        }
    }

    /// Generates a token for this workspace (the manager's `generate_token`); `config`
    /// as upstream takes it (`expires_in`, `permission`, `workspace`, ...).
    pub async fn generate_token(&self, config: Map) -> Result<String, Error> {
        match self.call("generate_token", vec![Value::Map(config)]).await? {
            Value::Str(token) => Ok(token),
            other => Err(Error::Convert(format!("generate_token returned a {}", other.kind()))),
        }
    }

    /// The session registry (the generator, interface and event modules).
    pub(crate) fn registry(&self) -> &Addr<SessionRegistry> {
        &self.inner.registry
    }

    /// A received value holding a function (a callback, a function in a result) as a
    /// callable [`RemoteFunction`].
    pub fn remote_function(&self, value: Value) -> Result<RemoteFunction, Error> {
        match value {
            Value::Function(f) => match *f {
                hypha_core::Function::Remote(m) => Ok(RemoteFunction::new(m, self.inner.registry.clone())),
                hypha_core::Function::Local(_) => Err(Error::Convert("the value is a local function".into())),
            },
            other => Err(Error::Convert(format!("expected a function, got {}", other.kind()))),
        }
    }

    /// A received value holding a remote generator as a [`RemoteGenerator`] stream.
    pub fn remote_generator(&self, value: Value) -> Result<RemoteGenerator, Error> {
        RemoteGenerator::from_value(value, self.inner.registry.clone())
    }

    /// The connection state now and its changes (connected, reconnecting, lost, closed).
    pub async fn state(&self) -> Result<tokio::sync::watch::Receiver<ConnectionState>, Error> {
        Ok(self.inner.registry.send(GetState).await?)
    }

    /// Waits until the client is connected (after a reconnection: with its services
    /// registered again), or fails with the reason it never will be, or after `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let mut state = self.state().await?;
        let wait =
            state.wait_for(|s| !matches!(s, ConnectionState::Reconnecting(_) | ConnectionState::Connecting));
        let outcome = match actix_rt::time::timeout(timeout, wait).await {
            Err(_) => return Err(Error::Protocol(format!("not reconnected within {timeout:?}"))),
            Ok(Err(_)) => return Err(Error::Closed),
            Ok(Ok(s)) => s.clone(),
        };
        match outcome {
            ConnectionState::Connected(_) => Ok(()),
            ConnectionState::Lost(reason) => {
                Err(Error::Call(hypha_core::session::CallError::ConnectionLost(reason)))
            }
            _ => Err(Error::Closed),
        }
    }

    /// What the connection actor is doing (generation, live reader/writer tasks,
    /// reconnection attempts); `None` once it has stopped.
    pub async fn connection_stats(&self) -> Option<ConnectionStats> {
        self.inner.connection.send(GetConnectionStats).await.ok()
    }

    /// Registers a codec for the Rust type `T` under `name` (spec §5.7), the counterpart
    /// of Python's `register_codec({"name", "type", "encoder", "decoder"})`.
    ///
    /// A `T` sent as [`custom(name, value)`](custom) is encoded by `encoder`; if that
    /// returns a map without `_rtype`, `_rtype = name` is added (so a Python peer with a
    /// codec of the same name decodes it with its decoder), and functions inside it are
    /// encoded as callables. A received `_rtype: name` map (members decoded, `_rtype`
    /// included) goes to `decoder`, and arrives as a [`Value::Custom`] holding a `T`
    /// (read it with [`custom_ref`]). As upstream does, registering a name or a type
    /// again replaces the earlier codec.
    pub async fn register_codec<T, E, Enc, Dec>(
        &self,
        name: &str,
        encoder: Enc,
        decoder: Dec,
    ) -> Result<(), Error>
    where
        T: std::any::Any + Send + Sync,
        E: std::fmt::Display + 'static,
        Enc: Fn(&T) -> Result<Value, E> + Send + Sync + 'static,
        Dec: Fn(Map) -> Result<T, E> + Send + Sync + 'static,
    {
        let name = name.to_owned();
        let apply =
            move |codecs: &mut hypha_core::CodecRegistry| codecs.register(name, encoder, Some(decoder));
        Ok(self.inner.registry.send(RegisterCodec(Box::new(apply))).await?)
    }

    /// Removes the codec `name`: values of its type can no longer be sent, and received
    /// `_rtype: name` maps stay maps.
    pub async fn unregister_codec(&self, name: &str) -> Result<(), Error> {
        let name = name.to_owned();
        let apply = move |codecs: &mut hypha_core::CodecRegistry| {
            codecs.unregister(&name);
        };
        Ok(self.inner.registry.send(RegisterCodec(Box::new(apply))).await?)
    }

    /// Fault injection for tests: closes the socket with close `code` as a network failure
    /// or a server would, and returns once the client has noticed (it then reconnects, as
    /// after any unexpected close). Returns whether there was a live socket to close.
    #[doc(hidden)]
    pub async fn drop_connection(&self, code: u16) -> Result<bool, Error> {
        let mut state = self.state().await?;
        let before = match &*state.borrow_and_update() {
            ConnectionState::Connected(g) => *g,
            _ => return Ok(false),
        };
        if !self.inner.connection.send(connection::DropSocket(code)).await.unwrap_or(false) {
            return Ok(false);
        }
        let noticed = state.wait_for(|s| !matches!(s, ConnectionState::Connected(g) if *g == before));
        let outcome = match actix_rt::time::timeout(self.inner.config.method_timeout, noticed).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Protocol(format!("the socket did not close after dropping it with {code}"))),
        };
        outcome
    }

    /// What the session registry holds (pending calls, sessions, services).
    pub async fn stats(&self) -> Result<RegistryStats, Error> {
        Ok(self.inner.registry.send(GetStats).await?)
    }

    /// Disconnects (spec §1.7): pending calls fail with "RPC connection closed", every
    /// service actor stops, the socket closes with 1000. Returns once the connection
    /// actor has stopped; later calls fail with "Connection is closed".
    pub async fn disconnect(&self) -> Result<(), Error> {
        let connection = match self.inner.registry.send(Disconnect).await {
            Ok(c) => c.unwrap_or_else(|| self.inner.connection.clone()),
            Err(_) => self.inner.connection.clone(),
        };
        if let Ok(closing) = connection.send(connection::Close).await {
            let _ = closing.0.await;
        }
        Ok(())
    }
}

/// A value of a type with a registered codec (see [`Client::register_codec`]), ready to
/// be an argument or a result. `codec` names the codec; the encoder is found by `T`.
pub fn custom<T: std::any::Any + Send + Sync>(codec: &str, value: T) -> Value {
    Value::Custom(hypha_core::value::CustomValue::new(codec, value))
}

/// The `T` inside a [`Value::Custom`] that a codec's decoder produced (`None` for any
/// other value, or another type).
pub fn custom_ref<T: std::any::Any>(value: &Value) -> Option<&T> {
    match value {
        Value::Custom(cv) => cv.downcast_ref::<T>(),
        _ => None,
    }
}

/// `ws/client:svc@app` -> `svc`.
fn short_service_id(id: &str) -> &str {
    let id = id.rsplit_once(':').map_or(id, |(_, s)| s);
    id.split_once('@').map_or(id, |(s, _)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handles cross threads (a blocking wrapper, a worker pool): they must stay
    /// `Send + Sync`; the actors behind them stay on their arbiter.
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Client>();
        check::<RemoteService>();
        check::<RemoteFunction>();
        check::<ClientConfig>();
        check::<Interface>();
        check::<RemoteInterface>();
        check::<EventSubscription>();
        fn check_send<T: Send>() {}
        check_send::<RemoteGenerator>();
        check_send::<TypedGenerator<i64>>();
        check_send::<EventStream>();
    }

    #[test]
    fn short_service_ids() {
        assert_eq!(short_service_id("ws/c:svc@app"), "svc");
        assert_eq!(short_service_id("svc"), "svc");
    }
}
