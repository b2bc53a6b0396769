//! Proxies of remote objects: services fetched with `get_service` and functions received
//! from peers (callbacks passed to our handlers, functions inside results).

use actix::prelude::SendError;
use actix::Addr;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use hypha_actors::client::codec;
use hypha_actors::client::{Call, Error, SessionRegistry};
use hypha_core::{Function, Map, RemoteMethod, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use tokio::sync::oneshot;

use super::stream::RemoteGenerator;

/// Sends a call through the registry and waits for its outcome.
pub(crate) async fn call_remote(
    registry: &Addr<SessionRegistry>,
    method: Arc<RemoteMethod>,
    args: Vec<Value>,
    kwargs: Option<Map>,
) -> Result<Value, Error> {
    post_call(registry, method, args, kwargs)?.await
}

/// Hands a call to the registry; the returned [`Posted`] resolves to its outcome. Fails
/// with [`Error::Closed`] when the registry is gone.
///
/// The outcome comes back on the call's own channel, so the mailbox's acknowledgement is
/// not needed: `try_send` posts without one (a channel and a wake-up fewer per call), and
/// only when the bounded mailbox is full does the caller wait for room with `send`.
pub(crate) fn post_call(
    registry: &Addr<SessionRegistry>,
    method: Arc<RemoteMethod>,
    args: Vec<Value>,
    kwargs: Option<Map>,
) -> Result<Posted, Error> {
    let (reply, rx) = oneshot::channel();
    match registry.try_send(Call { method, args, kwargs, reply }) {
        Ok(()) => Ok(Posted::Sent(rx)),
        Err(SendError::Full(call)) => {
            let registry = registry.clone();
            Ok(Posted::Queued(
                async move {
                    registry.send(call).await?;
                    rx.await.map_err(|_| Error::Closed)?
                }
                .boxed(),
            ))
        }
        Err(SendError::Closed(_)) => Err(Error::Closed),
    }
}

/// A call handed to the registry (see [`post_call`]), as a future of its outcome.
pub(crate) enum Posted {
    /// In the mailbox: the outcome comes on the call's channel (no future allocated, the
    /// common case, and a generator's every pull).
    Sent(oneshot::Receiver<Result<Value, Error>>),
    /// The mailbox was full: waits for room, then for the outcome.
    Queued(BoxFuture<'static, Result<Value, Error>>),
}

impl Future for Posted {
    type Output = Result<Value, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Posted::Sent(rx) => rx.poll_unpin(cx).map(|r| r.unwrap_or(Err(Error::Closed))),
            Posted::Queued(waiting) => waiting.poll_unpin(cx),
        }
    }
}

/// Positional arguments of a typed call: `()`, or a tuple of up to eight `Serialize`
/// values (`("John",)`, `(1, 2.5)`). A tuple, not a single value, so that a `Vec` is one
/// argument and not spread into many.
pub trait IntoArgs {
    /// The arguments as values.
    fn into_args(self) -> Result<Vec<Value>, Error>;
}

macro_rules! impl_into_args {
    ($($A:ident),*) => {
        impl<$($A: Serialize + 'static,)*> IntoArgs for ($($A,)*) {
            #[allow(non_snake_case)]
            fn into_args(self) -> Result<Vec<Value>, Error> {
                let ($($A,)*) = self;
                Ok(vec![$(codec::to_value($A)?,)*])
            }
        }
    };
}

impl_into_args!();
impl_into_args!(A1);
impl_into_args!(A1, A2);
impl_into_args!(A1, A2, A3);
impl_into_args!(A1, A2, A3, A4);
impl_into_args!(A1, A2, A3, A4, A5);
impl_into_args!(A1, A2, A3, A4, A5, A6);
impl_into_args!(A1, A2, A3, A4, A5, A6, A7);
impl_into_args!(A1, A2, A3, A4, A5, A6, A7, A8);

/// A function owned by a peer, callable from Rust. Cheap to clone and `Send`.
#[derive(Clone)]
pub struct RemoteFunction {
    /// Shared with the calls through it (and with the service it came from).
    method: Arc<RemoteMethod>,
    registry: Addr<SessionRegistry>,
}

impl std::fmt::Debug for RemoteFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteFunction")
            .field("target", &self.method.target)
            .field("method", &self.method.method)
            .finish()
    }
}

impl RemoteFunction {
    pub(crate) fn new(method: RemoteMethod, registry: Addr<SessionRegistry>) -> Self {
        Self { method: Arc::new(method), registry }
    }

    /// The descriptor (`_rtarget`, `_rmethod`, `_rschema`, ...).
    pub fn descriptor(&self) -> &RemoteMethod {
        &self.method
    }

    /// The name peers gave it (`_rname`, else the last path segment).
    pub fn name(&self) -> &str {
        self.method.display_name()
    }

    /// Calls it with positional arguments.
    pub async fn call(&self, args: Vec<Value>) -> Result<Value, Error> {
        call_remote(&self.registry, self.method.clone(), args, None).await
    }

    /// Calls it with positional and keyword arguments (Python's `f(*args, **kwargs)`).
    pub async fn call_with_kwargs(&self, args: Vec<Value>, kwargs: Map) -> Result<Value, Error> {
        call_remote(&self.registry, self.method.clone(), args, Some(kwargs)).await
    }

    /// Calls it with typed arguments and converts the result.
    pub async fn call_typed<A: IntoArgs, R: DeserializeOwned + 'static>(&self, args: A) -> Result<R, Error> {
        let value = self.call(args.into_args()?).await?;
        codec::from_value(value)
    }

    /// Calls a function that returns a generator, and returns it as a stream.
    pub async fn call_generator(&self, args: Vec<Value>) -> Result<RemoteGenerator, Error> {
        let value = self.call(args).await?;
        RemoteGenerator::from_value(value, self.registry.clone())
    }
}

/// A service of another client (or of the server), as `get_service` returned it: its
/// description with callable functions. Cheap to clone and `Send`.
#[derive(Clone)]
pub struct RemoteService {
    api: Map,
    /// The functions of `api` by path (sorted), shared with the calls through them:
    /// cloning a descriptor per call cost more than a tenth of a call's client-side work.
    methods: Arc<[(Box<str>, Arc<RemoteMethod>)]>,
    registry: Addr<SessionRegistry>,
}

impl std::fmt::Debug for RemoteService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteService").field("id", &self.id()).finish_non_exhaustive()
    }
}

impl RemoteService {
    pub(crate) fn new(api: Map, registry: Addr<SessionRegistry>) -> Self {
        let mut methods = Vec::new();
        collect_methods(&api, None, &mut methods);
        methods.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Self { api, methods: methods.into(), registry }
    }

    /// The full service id `ws/client:service`.
    pub fn id(&self) -> &str {
        self.text("id").unwrap_or_default()
    }

    /// The display name.
    pub fn name(&self) -> Option<&str> {
        self.text("name")
    }

    /// The description.
    pub fn description(&self) -> Option<&str> {
        self.text("description")
    }

    /// The service's config (visibility, workspace, ...).
    pub fn config(&self) -> Option<&Map> {
        self.api.get("config").and_then(Value::as_map)
    }

    /// The whole description, functions as descriptors.
    pub fn api(&self) -> &Map {
        &self.api
    }

    fn text(&self, key: &str) -> Option<&str> {
        self.api.get(key).and_then(Value::as_str)
    }

    /// The function at `path` (`"hello"`, or `"nested.fn"` for nested members).
    pub fn function(&self, path: &str) -> Result<RemoteFunction, Error> {
        Ok(RemoteFunction { method: self.method(path)?, registry: self.registry.clone() })
    }

    /// The descriptor at `path`, shared.
    fn method(&self, path: &str) -> Result<Arc<RemoteMethod>, Error> {
        match self.methods.binary_search_by(|(p, _)| (**p).cmp(path)) {
            Ok(i) => Ok(self.methods[i].1.clone()),
            Err(_) => Err(self.not_a_function(path)),
        }
    }

    /// Why `path` names no remote function.
    fn not_a_function(&self, path: &str) -> Error {
        match node_at(&self.api, path) {
            Some(Value::Function(f)) => match f.as_ref() {
                // Not reached: `collect_methods` has every remote function `path` can reach.
                Function::Remote(_) => Error::NotFound(format!("{} has no function {path}", self.id())),
                Function::Local(_) => Error::NotFound(format!("{path} is a local function")),
            },
            Some(other) => {
                Error::NotFound(format!("{path} of {} is a {}, not a function", self.id(), other.kind()))
            }
            None => Error::NotFound(format!("{} has no function {path}", self.id())),
        }
    }

    /// Calls function `name` with positional arguments.
    pub async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, Error> {
        call_remote(&self.registry, self.method(name)?, args, None).await
    }

    /// Calls function `name` with positional and keyword arguments.
    pub async fn call_with_kwargs(&self, name: &str, args: Vec<Value>, kwargs: Map) -> Result<Value, Error> {
        call_remote(&self.registry, self.method(name)?, args, Some(kwargs)).await
    }

    /// Calls function `name`, which returns a generator, and returns it as a stream.
    pub async fn call_generator(&self, name: &str, args: Vec<Value>) -> Result<RemoteGenerator, Error> {
        self.function(name)?.call_generator(args).await
    }

    /// Calls function `name` with typed arguments and converts the result:
    /// `svc.call_typed::<_, String>("hello", ("John",))`.
    pub async fn call_typed<A: IntoArgs, R: DeserializeOwned + 'static>(
        &self,
        name: &str,
        args: A,
    ) -> Result<R, Error> {
        self.function(name)?.call_typed(args).await
    }
}

/// The value at `path`: the keys split at `.`, each looked up in the map the previous one
/// named.
fn node_at<'a>(api: &'a Map, path: &str) -> Option<&'a Value> {
    let mut node: Option<&Value> = None;
    for (i, key) in path.split('.').enumerate() {
        let map = if i == 0 { Some(api) } else { node.and_then(Value::as_map) };
        node = map.and_then(|m| m.get(key));
    }
    node
}

/// The remote functions of `map` (and of the maps in it) with the paths
/// `RemoteService::function` reads them by: keys joined by `.`; a key with a `.` of its
/// own cannot be reached that way, and neither can what is under it.
fn collect_methods(map: &Map, prefix: Option<&str>, out: &mut Vec<(Box<str>, Arc<RemoteMethod>)>) {
    for (key, value) in map {
        if key.contains('.') {
            continue;
        }
        let path = match prefix {
            None => key.clone(),
            Some(p) => format!("{p}.{key}"),
        };
        match value {
            Value::Function(f) => {
                if let Function::Remote(m) = f.as_ref() {
                    out.push((path.into(), Arc::new(m.clone())));
                }
            }
            Value::Map(inner) => collect_methods(inner, Some(&path), out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_core::{Handler, LocalFunction};

    /// The table of a service's functions holds exactly what the path walk finds.
    #[test]
    fn method_table_agrees_with_the_path_walk() {
        let remote = |m: &str| {
            Value::Function(Box::new(Function::Remote(RemoteMethod {
                method: m.into(),
                ..Default::default()
            })))
        };
        let local = Value::Function(Box::new(Function::Local(LocalFunction::new(Handler::new(0u8)))));
        let mut inner = Map::new();
        inner.insert("g".into(), remote("g"));
        inner.insert("x".into(), remote("x-inner"));
        inner.insert("h.i".into(), remote("dotted"));
        let mut empty_key = Map::new();
        empty_key.insert("x".into(), remote("x-under-empty"));
        let mut api = Map::new();
        api.insert("f".into(), remote("f"));
        api.insert("x".into(), remote("x"));
        api.insert("nested".into(), Value::Map(inner));
        api.insert("".into(), Value::Map(empty_key));
        api.insert("a.b".into(), remote("dotted"));
        api.insert("local".into(), local);
        api.insert("name".into(), Value::from("svc"));
        let mut table = Vec::new();
        collect_methods(&api, None, &mut table);
        let paths = [
            "f",
            "x",
            "nested",
            "nested.g",
            "nested.x",
            "nested.h.i",
            "nested.h",
            ".x",
            "",
            "a.b",
            "a",
            "local",
            "name",
            "f.g",
            "missing",
            "nested.g.h",
        ];
        for path in paths {
            let walked = match node_at(&api, path) {
                Some(Value::Function(f)) => match f.as_ref() {
                    Function::Remote(m) => Some(m.method.clone()),
                    Function::Local(_) => None,
                },
                _ => None,
            };
            let found = table.iter().find(|(p, _)| &**p == path).map(|(_, m)| m.method.clone());
            assert_eq!(found, walked, "{path}");
        }
        assert_eq!(table.len(), 5, "f, x, nested.g, nested.x, .x");
    }
}
