//! Local services and callbacks: ordinary async Rust functions exposed to peers.
//!
//! A function is any `Fn(A1, .., An) -> impl Future<Output = Result<R, E>>` (up to eight
//! parameters) whose parameters implement [`FromArg`] and whose result `R` is
//! `Serialize` and error `E` is `Display`. A parameter is one of:
//!
//! * any `serde::de::DeserializeOwned` type (including [`Value`], taken as is): one
//!   positional argument;
//! * [`RemoteFunction`]: a function the caller passed (a callback), callable from Rust;
//! * [`Context`]: the caller's context (`from`, `ws`, `user`, ...); it takes no
//!   positional argument, and the service is made to `require_context` for the function.
//!
//! Keyword arguments (a Python caller's `f(a=1)`, a JS caller's `_rkwargs` map) are bound
//! to the parameter names declared with [`FunctionDef::param`]; without declarations the
//! parameters are called `arg0`, `arg1`, ..., and a one-parameter function called with
//! keywords only receives the keyword map itself (so a struct parameter takes Python's
//! `f(a=1, b=2)`). The declared parameters also make the function's JSON schema, in the
//! shape upstream's `schema_function` produces.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use actix::Addr;
use hypha_actors::client::codec;
use hypha_actors::client::{DynFunction, Error, Invocation, LocalHandler, SessionRegistry};
use hypha_core::schema::{FunctionSchema, Param, ParamType, Visibility};
use hypha_core::{Function, Map, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::remote::RemoteFunction;

// ---------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------

/// The arguments of one call, consumed parameter by parameter.
pub struct ArgCursor {
    function: Arc<str>,
    args: std::vec::IntoIter<Value>,
    taken: usize,
    context: Option<Map>,
    registry: Addr<SessionRegistry>,
}

impl ArgCursor {
    /// The next positional argument (`Nil` when the caller sent fewer).
    pub fn next_positional(&mut self) -> Value {
        self.taken += 1;
        self.args.next().unwrap_or_default()
    }

    /// The caller's context, if the endpoint delivered it.
    pub fn context(&self) -> Option<&Map> {
        self.context.as_ref()
    }

    /// The registry, to make received functions callable.
    pub fn registry(&self) -> &Addr<SessionRegistry> {
        &self.registry
    }

    pub(crate) fn error(&self, message: impl Display) -> Error {
        Error::Arguments(format!("{}(): argument {}: {message}", self.function, self.taken))
    }
}

/// A type a function parameter can have. See the module documentation.
pub trait FromArg: Sized + 'static {
    /// Whether the parameter consumes a positional argument.
    const POSITIONAL: bool = true;
    /// Whether the parameter is the caller's context.
    const CONTEXT: bool = false;
    /// Takes the parameter's value out of the call.
    fn from_arg(cursor: &mut ArgCursor) -> Result<Self, Error>;
}

impl<T: DeserializeOwned + 'static> FromArg for T {
    fn from_arg(cursor: &mut ArgCursor) -> Result<Self, Error> {
        let v = cursor.next_positional();
        codec::from_value(v).map_err(|e| cursor.error(e))
    }
}

impl FromArg for RemoteFunction {
    fn from_arg(cursor: &mut ArgCursor) -> Result<Self, Error> {
        match cursor.next_positional() {
            Value::Function(f) => match *f {
                Function::Remote(method) => Ok(RemoteFunction::new(method, cursor.registry().clone())),
                Function::Local(_) => Err(cursor.error("expected a remote function, got a local one")),
            },
            other => Err(cursor.error(format!("expected a function, got {}", other.kind()))),
        }
    }
}

/// The caller's context (spec §2.5): `from`, `to`, `ws`, `user`, `connection_type`, ...
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Context(pub Map);

impl Context {
    fn text(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    /// The caller's absolute id `ws/client`.
    pub fn from(&self) -> Option<&str> {
        self.text("from")
    }

    /// The caller's workspace.
    pub fn ws(&self) -> Option<&str> {
        self.text("ws")
    }

    /// Our absolute id as the caller addressed us.
    pub fn to(&self) -> Option<&str> {
        self.text("to")
    }

    /// The caller's user info, as the server stamped it.
    pub fn user(&self) -> Option<&Map> {
        self.0.get("user").and_then(Value::as_map)
    }
}

impl FromArg for Context {
    const POSITIONAL: bool = false;
    const CONTEXT: bool = true;

    fn from_arg(cursor: &mut ArgCursor) -> Result<Self, Error> {
        Ok(Context(cursor.context().cloned().unwrap_or_default()))
    }
}

// ---------------------------------------------------------------------------------------
// Functions
// ---------------------------------------------------------------------------------------

/// What erasing a typed function needs to know: its name (for messages) and the
/// parameter names kwargs bind to.
pub struct Binding {
    name: Arc<str>,
    params: Arc<[String]>,
    /// Declared defaults, as values, by parameter.
    defaults: Arc<[Option<Value>]>,
    /// Whether the names were declared (or made up as `arg0`, ...).
    declared: bool,
}

/// An async Rust function that can be exposed to peers. Implemented for closures and fns
/// of up to eight [`FromArg`] parameters; you do not implement it yourself.
pub trait IntoFunction<Args>: Send + Sync + 'static {
    /// The number of positional parameters.
    fn arity() -> usize;
    /// Whether a parameter is the caller's [`Context`].
    fn wants_context() -> bool;
    /// Erases the function.
    fn into_dyn(self, binding: Binding) -> DynFunction;
}

macro_rules! impl_into_function {
    ($($A:ident),*) => {
        impl<F, Fut, R, E, $($A,)*> IntoFunction<($($A,)*)> for F
        where
            F: Fn($($A),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Result<R, E>> + 'static,
            R: Serialize + 'static,
            E: Display + 'static,
            $($A: FromArg,)*
        {
            fn arity() -> usize {
                0 $(+ usize::from($A::POSITIONAL))*
            }

            fn wants_context() -> bool {
                false $(|| $A::CONTEXT)*
            }

            #[allow(non_snake_case, unused_mut, unused_variables)]
            fn into_dyn(self, binding: Binding) -> DynFunction {
                let f = Arc::new(self);
                let arity = Self::arity();
                Arc::new(move |inv: Invocation| {
                    let f = f.clone();
                    let prepared = prepare(&binding, arity, inv).and_then(|mut cursor| {
                        let values = ($($A::from_arg(&mut cursor)?,)*);
                        match cursor.args.len() {
                            0 => Ok(values),
                            extra => Err(Error::Arguments(format!(
                                "{}() takes {} positional arguments but {} were given",
                                binding.name, arity, arity + extra
                            ))),
                        }
                    });
                    Box::pin(async move {
                        let ($($A,)*) = prepared?;
                        let result = f($($A),*).await.map_err(|e| Error::Handler(e.to_string()))?;
                        codec::to_value(result)
                    })
                })
            }
        }
    };
}

impl_into_function!();
impl_into_function!(A1);
impl_into_function!(A1, A2);
impl_into_function!(A1, A2, A3);
impl_into_function!(A1, A2, A3, A4);
impl_into_function!(A1, A2, A3, A4, A5);
impl_into_function!(A1, A2, A3, A4, A5, A6);
impl_into_function!(A1, A2, A3, A4, A5, A6, A7);
impl_into_function!(A1, A2, A3, A4, A5, A6, A7, A8);

/// Binds kwargs and makes the cursor.
fn prepare(binding: &Binding, arity: usize, inv: Invocation) -> Result<ArgCursor, Error> {
    let Invocation { args, kwargs, context, registry } = inv;
    let kwargs = kwargs.filter(|k| !k.is_empty());
    let args = match kwargs {
        // Undeclared names: a one-parameter function called with keywords only takes the
        // single keyword's value (`hello(name="x")`), or the whole map (a struct).
        Some(mut k) if !binding.declared && arity == 1 && args.is_empty() => match k.len() {
            1 => vec![k.swap_remove_index(0).map(|(_, v)| v).unwrap_or_default()],
            _ => vec![Value::Map(k)],
        },
        kwargs => codec::bind_arguments(&binding.name, &binding.params, &binding.defaults, args, kwargs)?,
    };
    Ok(ArgCursor { function: binding.name.clone(), args: args.into_iter(), taken: 0, context, registry })
}

type Maker = Box<dyn FnOnce(Binding) -> DynFunction + Send>;

/// A function with its metadata: name, description and declared parameters.
pub struct FunctionDef {
    name: String,
    description: Option<String>,
    params: Vec<Param>,
    arity: usize,
    wants_context: bool,
    make: Maker,
}

impl FunctionDef {
    /// A function called `name`.
    pub fn new<Args, F: IntoFunction<Args>>(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            description: None,
            params: Vec::new(),
            arity: F::arity(),
            wants_context: F::wants_context(),
            make: Box::new(move |b| f.into_dyn(b)),
        }
    }

    /// The description (Python: the docstring), shown in the schema.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Declares the next positional parameter: its keyword name, type and default, for
    /// kwargs binding and the schema. Declare them in order; a [`Context`] parameter is
    /// not declared.
    pub fn param(mut self, param: Param) -> Self {
        self.params.push(param);
        self
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema in `schema_function`'s shape: `{name, description, parameters}`.
    pub fn schema(&self) -> FunctionSchema {
        let mut b = FunctionSchema::builder(self.name.clone());
        if let Some(d) = &self.description {
            b = b.description(d.clone());
        }
        for p in self.declared_params() {
            b = b.param(p);
        }
        b.build()
    }

    fn declared_params(&self) -> Vec<Param> {
        if self.params.is_empty() {
            (0..self.arity).map(|i| Param::new(format!("arg{i}"), ParamType::Any)).collect()
        } else {
            self.params.clone()
        }
    }

    /// The function as a value: a local function whose handler runs on `service`'s
    /// actor, or (without a service) a session callback.
    fn into_value(self, service: Option<String>) -> Value {
        let erased = self.erase();
        LocalHandler { service, func: erased.func }.into_value(
            Some(erased.name),
            erased.description,
            Some(erased.schema),
        )
    }

    /// The function with its types erased, and its metadata.
    pub(crate) fn erase(self) -> ErasedFunction {
        let schema = self.schema().to_value();
        let declared = !self.params.is_empty();
        let params = self.declared_params();
        let defaults = params
            .iter()
            .map(|p| p.default.as_ref().and_then(|j| hypha_core::serde_value::to_value(j).ok()))
            .collect();
        let params = params.into_iter().map(|p| p.name).collect();
        let func = (self.make)(Binding { name: self.name.as_str().into(), params, defaults, declared });
        ErasedFunction { name: self.name, description: self.description, schema, func }
    }
}

/// A [`FunctionDef`] with its types erased.
pub(crate) struct ErasedFunction {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) schema: Value,
    pub(crate) func: DynFunction,
}

/// A Rust closure as an argument of a remote call: the peer receives a session-scoped
/// callback that lives until the call ends (spec §9.4).
pub fn callback<Args, F: IntoFunction<Args>>(f: F) -> Value {
    FunctionDef::new("callback", f).into_value(None)
}

/// [`callback`] with a name and declared parameters.
pub fn callback_def(def: FunctionDef) -> Value {
    def.into_value(None)
}

// ---------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------

/// A service to register: built by [`Service::builder`].
#[derive(Clone, Debug)]
pub struct Service {
    pub(crate) api: Map,
    pub(crate) overwrite: bool,
}

impl Service {
    /// Starts a service with id `id` (short: the client prefixes `ws/client:`).
    pub fn builder(id: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            id: id.into(),
            name: None,
            description: None,
            docs: None,
            service_type: None,
            config: Map::new(),
            require_context: None,
            members: Map::new(),
            context_functions: Vec::new(),
            overwrite: false,
        }
    }

    /// The short service id.
    pub fn id(&self) -> &str {
        self.api.get("id").and_then(Value::as_str).unwrap_or_default()
    }

    /// The service map as it will be stored locally.
    pub fn api(&self) -> &Map {
        &self.api
    }
}

/// Builds a [`Service`]. See [`Service::builder`].
pub struct ServiceBuilder {
    id: String,
    name: Option<String>,
    description: Option<String>,
    docs: Option<String>,
    service_type: Option<String>,
    config: Map,
    require_context: Option<bool>,
    members: Map,
    context_functions: Vec<String>,
    overwrite: bool,
}

impl ServiceBuilder {
    /// Display name (defaults to the id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Free text, at most 1024 characters (the server's limit).
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Documentation text.
    pub fn docs(mut self, text: impl Into<String>) -> Self {
        self.docs = Some(text.into());
        self
    }

    /// The service type (default `generic`).
    pub fn service_type(mut self, t: impl Into<String>) -> Self {
        self.service_type = Some(t.into());
        self
    }

    /// Who may see and call it (default `protected`: own workspace only).
    pub fn visibility(mut self, v: Visibility) -> Self {
        self.config.insert("visibility".into(), Value::from(v.as_str()));
        self
    }

    /// Pass the caller's context to every function (`true`), or to none (`false`).
    /// Unset, exactly the functions that take a [`Context`] get it.
    pub fn require_context(mut self, on: bool) -> Self {
        self.require_context = Some(on);
        self
    }

    /// Any other config key (`authorized_workspaces`, `flags`, ...).
    pub fn config(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// Replace a registered service with the same id instead of failing.
    pub fn overwrite(mut self, on: bool) -> Self {
        self.overwrite = on;
        self
    }

    /// Adds a function member.
    pub fn function<Args, F: IntoFunction<Args>>(self, name: impl Into<String>, f: F) -> Self {
        self.function_def(FunctionDef::new(name, f))
    }

    /// Adds a function member with declared parameters and description.
    pub fn function_def(mut self, def: FunctionDef) -> Self {
        if def.wants_context {
            self.context_functions.push(def.name.clone());
        }
        let name = def.name.clone();
        let value = def.into_value(Some(self.id.clone()));
        self.members.insert(name, value);
        self
    }

    /// Adds a plain data member (peers see it in the service description).
    pub fn value(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.members.insert(key.into(), value.into());
        self
    }

    /// The service.
    pub fn build(mut self) -> Service {
        match self.require_context {
            Some(on) => {
                self.config.insert("require_context".into(), Value::Bool(on));
            }
            None if !self.context_functions.is_empty() => {
                let names = self.context_functions.iter().map(|n| Value::from(n.as_str())).collect();
                self.config.insert("require_context".into(), Value::List(names));
            }
            None => {}
        }
        let mut api = Map::new();
        api.insert("id".into(), Value::from(self.id.as_str()));
        api.insert("name".into(), Value::from(self.name.unwrap_or_else(|| self.id.clone())));
        if let Some(d) = self.description {
            api.insert("description".into(), Value::from(d));
        }
        if let Some(d) = self.docs {
            api.insert("docs".into(), Value::from(d));
        }
        if let Some(t) = self.service_type {
            api.insert("type".into(), Value::from(t));
        }
        api.insert("config".into(), Value::Map(self.config));
        api.extend(self.members);
        Service { api, overwrite: self.overwrite }
    }
}
