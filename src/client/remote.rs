//! Proxies of remote objects: services fetched with `get_service` and functions received
//! from peers (callbacks passed to our handlers, functions inside results).

use actix::prelude::SendError;
use actix::Addr;
use hypha_actors::client::codec;
use hypha_actors::client::{Call, Error, SessionRegistry};
use hypha_core::{Function, Map, RemoteMethod, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use super::stream::RemoteGenerator;

/// Sends a call through the registry and waits for its outcome.
///
/// The outcome comes back on the call's own channel, so the mailbox's acknowledgement is
/// not needed: `try_send` posts without one (a channel and a wake-up fewer per call), and
/// only when the bounded mailbox is full does the caller wait for room with `send`.
pub(crate) async fn call_remote(
    registry: &Addr<SessionRegistry>,
    method: RemoteMethod,
    args: Vec<Value>,
    kwargs: Option<Map>,
) -> Result<Value, Error> {
    let (reply, rx) = oneshot::channel();
    match registry.try_send(Call { method, args, kwargs, reply }) {
        Ok(()) => {}
        Err(SendError::Full(call)) => registry.send(call).await?,
        Err(SendError::Closed(_)) => return Err(Error::Closed),
    }
    rx.await.map_err(|_| Error::Closed)?
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
    method: RemoteMethod,
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
        Self { method, registry }
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
    registry: Addr<SessionRegistry>,
}

impl std::fmt::Debug for RemoteService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteService").field("id", &self.id()).finish_non_exhaustive()
    }
}

impl RemoteService {
    pub(crate) fn new(api: Map, registry: Addr<SessionRegistry>) -> Self {
        Self { api, registry }
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
        Ok(RemoteFunction::new(self.method(path)?.clone(), self.registry.clone()))
    }

    /// The descriptor at `path`, borrowed: the `call*` methods clone it once, into the call.
    fn method(&self, path: &str) -> Result<&RemoteMethod, Error> {
        let mut node: Option<&Value> = None;
        for (i, key) in path.split('.').enumerate() {
            let map = if i == 0 { Some(&self.api) } else { node.and_then(Value::as_map) };
            node = map.and_then(|m| m.get(key));
        }
        match node {
            Some(Value::Function(f)) => match f.as_ref() {
                Function::Remote(m) => Ok(m),
                Function::Local(_) => Err(Error::NotFound(format!("{path} is a local function"))),
            },
            Some(other) => {
                Err(Error::NotFound(format!("{path} of {} is a {}, not a function", self.id(), other.kind())))
            }
            None => Err(Error::NotFound(format!("{} has no function {path}", self.id()))),
        }
    }

    /// Calls function `name` with positional arguments.
    pub async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, Error> {
        call_remote(&self.registry, self.method(name)?.clone(), args, None).await
    }

    /// Calls function `name` with positional and keyword arguments.
    pub async fn call_with_kwargs(&self, name: &str, args: Vec<Value>, kwargs: Map) -> Result<Value, Error> {
        call_remote(&self.registry, self.method(name)?.clone(), args, Some(kwargs)).await
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
