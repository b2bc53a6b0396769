//! A blocking client for synchronous code, like Python's `hypha_rpc.sync`.
//!
//! ```no_run
//! use hypha_rpc::blocking;
//! use hypha_rpc::client::{ClientConfig, Error, Service, Visibility};
//!
//! fn main() -> Result<(), Error> {
//!     let client = blocking::connect_to_server(ClientConfig::new("http://127.0.0.1:9527"))?;
//!     let info = client.register_service(
//!         Service::builder("hello")
//!             .visibility(Visibility::Public)
//!             .function("hello", |name: String| async move { Ok::<_, Error>(format!("Hello {name}")) })
//!             .build(),
//!     )?;
//!     let svc = client.get_service(&info.id)?;
//!     let greeting: String = svc.call_typed("hello", ("John",))?;
//!     assert_eq!(greeting, "Hello John");
//!     client.disconnect()
//! }
//! ```
//!
//! # How it works
//!
//! Modelled on mini-redis's `BlockingClient`: the async [`Client`] runs on a runtime that
//! the blocking client owns, and every method hands a job to that runtime and waits for
//! its answer. Here the runtime is one thread running an actix `System` (the client's
//! websocket is awc, which needs one), started by [`connect_to_server`] and shared by
//! every clone of the client and of the services it returned; it stops when the last of
//! them is dropped. Jobs are closures sent to the thread: the futures are created and
//! polled there, so they need not be `Send`; only the arguments cross threads.
//!
//! Any number of threads may use one client (and its clones) at once: each call is its
//! own task on the runtime thread, so calls from different threads run concurrently.
//!
//! Service functions registered through the blocking client are still async closures;
//! they run on the runtime thread, so they must not block it. Do blocking work in
//! `std::thread::spawn` and await a channel, or keep it on the caller's side.
//!
//! Do not call the blocking methods from inside an async context (a handler running on
//! the runtime thread, or another async runtime's task): they block the thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};

use futures_util::{Stream, StreamExt};
use hypha_actors::client::codec;
use hypha_core::schema::ServiceInfo;
use hypha_core::{Map, Value};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::client::{
    self, Client, ClientConfig, Error, IntoArgs, LoginConfig, LoginOutcome, RemoteService, Service,
};

type Job = Box<dyn FnOnce() + Send>;

/// The runtime thread: an actix `System` that runs jobs until every handle is gone.
struct Runtime {
    /// Jobs for the thread. Unbounded: each sender waits for its own job's answer, so at
    /// most one job per calling thread (plus iterator pumps) is ever queued.
    jobs: Option<mpsc::UnboundedSender<Job>>,
    /// Joined on drop, so that the client's actors have stopped when the last handle is
    /// gone.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Its id: a handle dropped on the thread itself must not join it.
    thread_id: ThreadId,
}

impl Runtime {
    fn start() -> Result<Arc<Runtime>, Error> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("hypha-rpc-blocking".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    while let Some(job) = rx.recv().await {
                        job();
                    }
                });
            })
            .map_err(|e| Error::Config(format!("cannot start the blocking client's thread: {e}")))?;
        let thread_id = thread.thread().id();
        Ok(Arc::new(Runtime { jobs: Some(tx), thread: Mutex::new(Some(thread)), thread_id }))
    }

    /// Runs the future made by `make` on the runtime thread and waits for its output.
    fn run<F, Fut, T>(&self, make: F) -> Result<T, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Error>> + 'static,
        T: Send + 'static,
    {
        if std::thread::current().id() == self.thread_id {
            return Err(Error::Config(
                "a blocking hypha-rpc call was made on the client's own runtime thread (from a handler?); \
                 use the async client there"
                    .into(),
            ));
        }
        let (tx, rx) = std_mpsc::sync_channel(1);
        self.spawn(move || async move {
            let _ = tx.send(make().await);
        })?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Spawns the future made by `make` on the runtime thread.
    fn spawn<F, Fut>(&self, make: F) -> Result<(), Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || {
            actix_rt::spawn(make());
        });
        self.jobs.as_ref().ok_or(Error::Closed)?.send(job).map_err(|_| Error::Closed)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Ends the job loop, which ends the System once its tasks are done.
        self.jobs = None;
        if std::thread::current().id() == self.thread_id {
            return;
        }
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

/// Connects (see [`client::connect_to_server`]) on a runtime thread of its own and
/// returns a blocking client. Works from plain `fn main` and any thread.
pub fn connect_to_server(config: ClientConfig) -> Result<BlockingClient, Error> {
    let runtime = Runtime::start()?;
    let client = runtime.run(move || client::connect_to_server(config))?;
    Ok(BlockingClient { client: Some(client), runtime })
}

/// A connected client whose methods block. Cheap to clone; usable from many threads at
/// once. Dropping the last clone (and the last service obtained from it) disconnects and
/// stops the runtime thread.
pub struct BlockingClient {
    /// `Some` until drop: the async client must go before the runtime (its `Drop` sends
    /// the disconnect to actors that live on the runtime thread).
    client: Option<Client>,
    runtime: Arc<Runtime>,
}

impl Clone for BlockingClient {
    fn clone(&self) -> Self {
        Self { client: self.client.clone(), runtime: self.runtime.clone() }
    }
}

impl Drop for BlockingClient {
    /// The last handle of all (no clone, no service, no iterator left) disconnects
    /// cleanly before the runtime thread stops, so the server sees a normal close.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if Arc::strong_count(&self.runtime) == 1 {
                let _ = self.runtime.run(move || async move { client.disconnect().await });
            }
        }
    }
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("workspace", &self.workspace())
            .field("client_id", &self.client_id())
            .finish_non_exhaustive()
    }
}

impl BlockingClient {
    fn client(&self) -> Client {
        // Only `drop` clears it.
        self.client.clone().unwrap_or_else(|| unreachable!("client taken before drop"))
    }

    fn with<F, Fut, T>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Error>> + 'static,
        T: Send + 'static,
    {
        let client = self.client();
        self.runtime.run(move || f(client))
    }

    /// The async client behind this one (use it from async code on any actix System;
    /// its actors stay on the blocking client's runtime thread).
    pub fn async_client(&self) -> Client {
        self.client()
    }

    /// The workspace the server put us in.
    pub fn workspace(&self) -> &str {
        self.client.as_ref().map_or("", Client::workspace)
    }

    /// Our client id.
    pub fn client_id(&self) -> &str {
        self.client.as_ref().map_or("", Client::client_id)
    }

    /// Calls a workspace-manager function ([`Client::call`]).
    pub fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, Error> {
        let method = method.to_owned();
        self.with(move |c| async move { c.call(&method, args).await })
    }

    /// The manager's `echo`.
    pub fn echo(&self, value: Value) -> Result<Value, Error> {
        self.with(move |c| async move { c.echo(value).await })
    }

    /// Registers a local service ([`Client::register_service`]). Its functions run on
    /// the runtime thread.
    pub fn register_service(&self, service: Service) -> Result<ServiceInfo, Error> {
        self.with(move |c| async move { c.register_service(service).await })
    }

    /// Unregisters a local service.
    pub fn unregister_service(&self, id: &str) -> Result<(), Error> {
        let id = id.to_owned();
        self.with(move |c| async move { c.unregister_service(&id).await })
    }

    /// Fetches a remote service.
    pub fn get_service(&self, id: &str) -> Result<BlockingRemoteService, Error> {
        let id = id.to_owned();
        let service = self.with(move |c| async move { c.get_service(&id).await })?;
        Ok(BlockingRemoteService { service, runtime: self.runtime.clone() })
    }

    /// Lists services ([`Client::list_services`]).
    pub fn list_services(&self, query: Option<Value>) -> Result<Vec<Map>, Error> {
        self.with(move |c| async move { c.list_services(query).await })
    }

    /// Generates a token ([`Client::generate_token`]).
    pub fn generate_token(&self, config: Map) -> Result<String, Error> {
        self.with(move |c| async move { c.generate_token(config).await })
    }

    /// Registers a codec ([`Client::register_codec`]).
    pub fn register_codec<T, E, Enc, Dec>(&self, name: &str, encoder: Enc, decoder: Dec) -> Result<(), Error>
    where
        T: std::any::Any + Send + Sync,
        E: std::fmt::Display + 'static,
        Enc: Fn(&T) -> Result<Value, E> + Send + Sync + 'static,
        Dec: Fn(Map) -> Result<T, E> + Send + Sync + 'static,
    {
        let name = name.to_owned();
        self.with(move |c| async move { c.register_codec(&name, encoder, decoder).await })
    }

    /// Iterates a stream made on the runtime thread, blocking for each item: the
    /// building block for consuming remote generators from synchronous code. `make`
    /// runs on the runtime thread and gets the async client, e.g.
    /// `client.iter(|c| async move { c.get_service(id).await?.call_stream(..).await })`
    /// once the async API returns generators as streams.
    ///
    /// Items are pulled one at a time (a bounded channel of one), so a slow consumer
    /// holds the producer back; dropping the iterator drops the stream, which closes a
    /// remote generator.
    pub fn iter<F, Fut, S, T>(&self, make: F) -> Result<BlockingIter<T>, Error>
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<S, Error>> + 'static,
        S: Stream<Item = Result<T, Error>> + 'static,
        T: Send + 'static,
    {
        let client = self.client();
        iterate(&self.runtime, move || make(client))
    }

    /// Disconnects ([`Client::disconnect`]). The runtime thread ends when the last
    /// handle is dropped.
    pub fn disconnect(&self) -> Result<(), Error> {
        self.with(move |c| async move { c.disconnect().await })
    }
}

/// Logs in as [`client::login`] does, on a thread of its own, and blocks until the
/// login service answers (a token, the profile, or its timeout error). The callback runs
/// on that thread.
pub fn login(config: LoginConfig) -> Result<LoginOutcome, Error> {
    std::thread::Builder::new()
        .name("hypha-rpc-login".into())
        .spawn(move || actix_rt::System::new().block_on(client::login(config)))
        .map_err(|e| Error::Config(format!("cannot start the login thread: {e}")))?
        .join()
        .map_err(|_| Error::Protocol("the login thread panicked".into()))?
}

/// A remote service whose calls block. Cheap to clone, usable from many threads.
#[derive(Clone)]
pub struct BlockingRemoteService {
    service: RemoteService,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for BlockingRemoteService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingRemoteService").field("id", &self.id()).finish_non_exhaustive()
    }
}

impl BlockingRemoteService {
    /// The full service id.
    pub fn id(&self) -> &str {
        self.service.id()
    }

    /// The async proxy behind this one.
    pub fn async_service(&self) -> RemoteService {
        self.service.clone()
    }

    /// Calls function `name` with positional arguments.
    pub fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, Error> {
        let function = self.service.function(name)?;
        self.runtime.run(move || async move { function.call(args).await })
    }

    /// Calls function `name` with positional and keyword arguments.
    pub fn call_with_kwargs(&self, name: &str, args: Vec<Value>, kwargs: Map) -> Result<Value, Error> {
        let function = self.service.function(name)?;
        self.runtime.run(move || async move { function.call_with_kwargs(args, kwargs).await })
    }

    /// Calls generator function `name` and iterates its items, one blocking `next()` at a
    /// time; dropping the iterator closes the remote generator.
    pub fn call_generator(&self, name: &str, args: Vec<Value>) -> Result<BlockingIter<Value>, Error> {
        let function = self.service.function(name)?;
        iterate(&self.runtime, move || async move { function.call_generator(args).await })
    }

    /// Calls function `name` with typed arguments and converts the result; the
    /// conversions run on the calling thread.
    pub fn call_typed<A: IntoArgs, R: DeserializeOwned + 'static>(
        &self,
        name: &str,
        args: A,
    ) -> Result<R, Error> {
        let value = self.call(name, args.into_args()?)?;
        codec::from_value(value)
    }
}

/// Pumps the stream made by `make` on the runtime thread into a [`BlockingIter`]. Items
/// are pulled one at a time (a bounded channel of one), so a slow consumer holds the
/// producer back; dropping the iterator drops the stream, which closes a remote generator.
fn iterate<F, Fut, S, T>(runtime: &Arc<Runtime>, make: F) -> Result<BlockingIter<T>, Error>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, Error>> + 'static,
    S: Stream<Item = Result<T, Error>> + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    runtime.spawn(move || async move {
        let stream = match make().await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut stream: Pin<Box<S>> = Box::pin(stream);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(item) => {
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                () = tx.closed() => return,
            }
        }
    })?;
    Ok(BlockingIter { rx, _runtime: runtime.clone() })
}

/// Items of a stream, one blocking `next()` at a time (see [`BlockingClient::iter`]).
pub struct BlockingIter<T> {
    rx: mpsc::Receiver<Result<T, Error>>,
    /// Keeps the runtime thread alive while items may still come.
    _runtime: Arc<Runtime>,
}

impl<T> Iterator for BlockingIter<T> {
    type Item = Result<T, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.blocking_recv()
    }
}
