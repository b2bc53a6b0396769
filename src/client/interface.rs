//! `_rintf` interfaces (spec §5.5): objects whose functions stay callable after the call
//! that carried them returned.
//!
//! A plain [`callback`](super::callback) dies with its call. An [`Interface`] passed as an
//! argument instead becomes a local `_rintf_<id>` service that only the receiving peer may
//! call, for as long as it likes: until it calls the object's `_dispose()`, until it
//! disconnects, until we [`Client::unregister_interface`] it, or until we disconnect.
//! Its functions run on an interface actor of their own
//! (`hypha_actors::client::interface`).
//!
//! The other direction: a peer's `_rintf` object (Python `{"_rintf": True, "f": f}`)
//! arrives as a map of functions; take it as a [`RemoteInterface`] parameter (or convert a
//! value with [`Client::remote_interface`]) and keep it: its functions can be called
//! later, until its owner disposes of it.
//!
//! ```no_run
//! use hypha_rpc::client::{Client, Error, Interface};
//!
//! # async fn run(client: Client) -> Result<(), Error> {
//! let counter = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
//! let c = counter.clone();
//! let iface = Interface::builder()
//!     .function("inc", move |by: i64| {
//!         let c = c.clone();
//!         async move { Ok::<_, Error>(c.fetch_add(by, std::sync::atomic::Ordering::SeqCst) + by) }
//!     })
//!     .build()?;
//! let svc = client.get_service("keeper").await?;
//! svc.call("keep", vec![iface.to_value()]).await?; // the peer may call `inc` from now on
//! // ... later: stop it explicitly (or let the peer call `_dispose`).
//! client.unregister_interface(&iface).await?;
//! # Ok(()) }
//! ```

use actix::{Actor, Addr};
use hypha_actors::client::interface::{member_handler, InterfaceActor, UnregisterInterface};
use hypha_actors::client::Error;
use hypha_core::{Function, Handler, Map, Value};
use serde::de::DeserializeOwned;

use super::remote::{IntoArgs, RemoteFunction, RemoteService};
use super::service::{ArgCursor, FromArg, FunctionDef, IntoFunction};
use super::Client;

/// A local object with functions, to pass to a peer as a `_rintf` interface. Cheap to
/// clone; see the module documentation.
#[derive(Clone)]
pub struct Interface {
    map: Map,
    handlers: Vec<Handler>,
    /// Keeps the actor alive while the user holds the object (the forwarders in `map`
    /// hold it too; this makes the ownership explicit).
    _actor: Addr<InterfaceActor>,
}

impl std::fmt::Debug for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.map.keys().map(String::as_str).collect();
        f.debug_struct("Interface").field("members", &keys).finish()
    }
}

impl Interface {
    /// Starts an interface.
    pub fn builder() -> InterfaceBuilder {
        InterfaceBuilder { label: None, functions: Vec::new(), values: Map::new() }
    }

    /// The object as an argument value (`_rintf: true` plus its members). Each call it is
    /// sent with makes a new `_rintf_` service for the receiving peer.
    pub fn to_value(&self) -> Value {
        Value::Map(self.map.clone())
    }
}

impl From<Interface> for Value {
    fn from(i: Interface) -> Self {
        Value::Map(i.map)
    }
}

impl From<&Interface> for Value {
    fn from(i: &Interface) -> Self {
        i.to_value()
    }
}

/// Builds an [`Interface`].
pub struct InterfaceBuilder {
    label: Option<String>,
    functions: Vec<FunctionDef>,
    values: Map,
}

impl InterfaceBuilder {
    /// A label for logs.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Adds a function member.
    pub fn function<Args, F: IntoFunction<Args>>(self, name: impl Into<String>, f: F) -> Self {
        self.function_def(FunctionDef::new(name, f))
    }

    /// Adds a function member with declared parameters and description.
    pub fn function_def(mut self, def: FunctionDef) -> Self {
        self.functions.push(def);
        self
    }

    /// Adds a plain data member (sent along, as upstream sends every key of the object).
    pub fn value(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.values.insert(key.into(), value.into());
        self
    }

    /// The interface: starts its actor on the current arbiter.
    ///
    /// Fails without functions (upstream only treats a map with a callable under a
    /// non-`_` key as an interface), for a function name starting with `_` (such
    /// members are not exported by the `_rintf` rule), and outside an actix arbiter.
    pub fn build(self) -> Result<Interface, Error> {
        if self.functions.is_empty() {
            return Err(Error::Config("an interface needs at least one function".into()));
        }
        if let Some(f) = self.functions.iter().find(|f| f.name().starts_with('_')) {
            return Err(Error::Config(format!(
                "interface function {:?} starts with `_`: such members are not exported",
                f.name()
            )));
        }
        if actix_rt::Arbiter::try_current().is_none() {
            return Err(Error::Config(
                "an interface must be built on a thread that runs an actix arbiter".into(),
            ));
        }
        let label = self.label.unwrap_or_else(|| {
            let names: Vec<&str> = self.functions.iter().map(FunctionDef::name).collect();
            names.join(",")
        });
        let actor = InterfaceActor::new(label).start();
        let mut map = Map::new();
        map.insert("_rintf".into(), Value::Bool(true));
        let mut handlers = Vec::with_capacity(self.functions.len());
        for def in self.functions {
            let erased = def.erase();
            let value = member_handler(&actor, erased.func).into_value(
                Some(erased.name.clone()),
                erased.description,
                Some(erased.schema),
            );
            if let Value::Function(f) = &value {
                if let Function::Local(lf) = f.as_ref() {
                    handlers.push(lf.handler.clone());
                }
            }
            map.insert(erased.name, value);
        }
        map.extend(self.values);
        Ok(Interface { map, handlers, _actor: actor })
    }
}

/// A peer's `_rintf` object (or any map of its functions), kept and called from Rust.
/// Cheap to clone and `Send`.
#[derive(Clone, Debug)]
pub struct RemoteInterface {
    inner: RemoteService,
}

impl RemoteInterface {
    pub(crate) fn from_value(
        value: Value,
        registry: actix::Addr<hypha_actors::client::SessionRegistry>,
    ) -> Result<Self, Error> {
        match value {
            Value::Map(map) => Ok(Self { inner: RemoteService::new(map, registry) }),
            other => {
                Err(Error::Convert(format!("expected an interface object (a map), got {}", other.kind())))
            }
        }
    }

    /// `_rintf_service_id`: the id of the service the peer made for it, if it is one.
    pub fn service_id(&self) -> Option<&str> {
        self.inner.api().get("_rintf_service_id").and_then(Value::as_str)
    }

    /// The members as received.
    pub fn api(&self) -> &Map {
        self.inner.api()
    }

    /// The function `name` (`"f"` or `"nested.f"`).
    pub fn function(&self, name: &str) -> Result<RemoteFunction, Error> {
        self.inner.function(name)
    }

    /// Calls function `name` with positional arguments.
    pub async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, Error> {
        self.inner.call(name, args).await
    }

    /// Calls function `name` with typed arguments and converts the result.
    pub async fn call_typed<A: IntoArgs, R: DeserializeOwned + 'static>(
        &self,
        name: &str,
        args: A,
    ) -> Result<R, Error> {
        self.inner.call_typed(name, args).await
    }

    /// Tells the owner we are done with it (its `_dispose()`): the owner removes the
    /// service, and later calls fail.
    pub async fn dispose(&self) -> Result<(), Error> {
        self.inner.call("_dispose", Vec::new()).await.map(drop)
    }
}

impl FromArg for RemoteInterface {
    fn from_arg(cursor: &mut ArgCursor) -> Result<Self, Error> {
        let value = cursor.next_positional();
        let registry = cursor.registry().clone();
        RemoteInterface::from_value(value, registry).map_err(|e| cursor.error(e))
    }
}

impl Client {
    /// Removes every `_rintf_` service made from `iface` (each call it was sent with made
    /// one), as upstream's `unregister_service(obj["_rintf_service_id"])`: the peers'
    /// later calls fail. The server is not told (these services are local only).
    /// Returns the removed service ids.
    pub async fn unregister_interface(&self, iface: &Interface) -> Result<Vec<String>, Error> {
        Ok(self.registry().send(UnregisterInterface { handlers: iface.handlers.clone() }).await?)
    }

    /// A received value (a peer's `_rintf` object, a map of its functions) as a
    /// [`RemoteInterface`].
    pub fn remote_interface(&self, value: Value) -> Result<RemoteInterface, Error> {
        RemoteInterface::from_value(value, self.registry().clone())
    }
}
