//! Service descriptions and function JSON schemas (spec §7.1-7.3, server spec §4.5, §5.5).
//!
//! * [`ServiceConfig`]: the `config` map of a service, typed for the keys peers act on and
//!   with every other key kept in [`ServiceConfig::extra`] (the server stores extra keys).
//!   [`ServiceConfig::from_json`] runs the Python client's `add_service` checks on the raw
//!   map first, so malformed configs fail with upstream's `ValueError` texts rather than
//!   serde's.
//! * [`ServiceInfo`]: what `register_service` sends to the manager and what
//!   `list_services`/`get_service_info` return.
//! * [`FunctionSchema`] and its [`FunctionSchemaBuilder`]: the `__schema__`/`_rschema` of a
//!   function, shaped exactly as the Python client's `schema_function` produces it with
//!   pydantic 2 (keys sorted, titles dropped, required parameters described by their name).
//! * [`service_schema`]: the `service_schema` of a service tree (spec §7.3).
//!
//! These are JSON documents on the wire (the server stores them as JSON), so the types use
//! `serde_json::Value`. Converting to and from [`Value`] goes through a private JSON bridge:
//! JSON has no bytes, sets, arrays or functions, so such values cannot appear in a config or
//! a schema and are refused ([`SchemaError::NotJson`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map as JsonMap, Value as Json};

use crate::value::{Function, Map, Value};

/// Errors of this module. Where the Python client raises a `ValueError`, the text is its
/// text exactly, so that a Rust provider and a Python provider fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// `visibility` is not one of `protected`, `public`, `unlisted`. Upstream asserts with
    /// an empty message; this is the message the server spec recommends. `"private"`, which
    /// some upstream docs mention, lands here: neither stock client nor the server accept it.
    #[error("Invalid visibility: {0}")]
    InvalidVisibility(String),
    /// `authorized_workspaces` with a visibility other than `protected`.
    #[error("authorized_workspaces can only be set when visibility is 'protected', got visibility='{0}'")]
    AuthorizedWorkspacesNeedProtected(String),
    /// `authorized_workspaces` is not a list.
    #[error("authorized_workspaces must be a list of workspace ids")]
    AuthorizedWorkspacesNotList,
    /// An element of `authorized_workspaces` is not a string; holds the Python type repr.
    #[error("Each workspace id in authorized_workspaces must be a string, got {0}")]
    AuthorizedWorkspaceNotString(String),
    /// `trusted_keys` is truthy but not a list.
    #[error("trusted_keys must be a list of hex-encoded public keys")]
    TrustedKeysNotList,
    /// A trusted key is not a 64-character hex string; holds the Python repr of the value.
    #[error("Each trusted key must be a 64-char hex string, got: {0}")]
    BadTrustedKey(String),
    /// Registering an id that exists, without `overwrite` (the Python client's text).
    #[error("Service already exists: {0}, please specify a different id (not {0}) or overwrite=True")]
    ServiceExists(String),
    /// A value that JSON cannot carry (bytes, arrays, functions, non-finite floats...).
    #[error("cannot represent a {0} value in JSON")]
    NotJson(&'static str),
    /// The JSON does not have the expected shape (serde's message).
    #[error("invalid {what}: {message}")]
    Shape {
        /// What was being read (`"service config"`, `"service info"`, ...).
        what: &'static str,
        /// serde's description of the problem.
        message: String,
    },
}

// ----------------------------------------------------------------------------------------
// Value <-> JSON bridge
// ----------------------------------------------------------------------------------------

/// Converts a wire-form [`Value`] to JSON. Integers stay integers, floats must be finite,
/// bytes and every decoded-only variant are refused (JSON cannot carry them).
pub(crate) fn value_to_json(v: &Value) -> Result<Json, SchemaError> {
    Ok(match v {
        Value::Nil => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::UInt(u) => Json::from(*u),
        Value::F32(f) => float_json(f64::from(*f))?,
        Value::F64(f) => float_json(*f)?,
        Value::Str(s) => Json::String(s.clone()),
        Value::List(l) => Json::Array(l.iter().map(value_to_json).collect::<Result<_, _>>()?),
        Value::Map(m) => map_to_json(m)?,
        other => return Err(SchemaError::NotJson(other.kind())),
    })
}

/// [`value_to_json`] of a map, without wrapping it in a [`Value`] first (no clone).
fn map_to_json(m: &Map) -> Result<Json, SchemaError> {
    Ok(Json::Object(
        m.iter().map(|(k, v)| Ok((k.clone(), value_to_json(v)?))).collect::<Result<_, SchemaError>>()?,
    ))
}

fn float_json(f: f64) -> Result<Json, SchemaError> {
    serde_json::Number::from_f64(f).map(Json::Number).ok_or(SchemaError::NotJson("non-finite float"))
}

/// Converts JSON to a wire-form [`Value`] (integers that fit `i64` become `Int`).
pub(crate) fn json_to_value(j: &Json) -> Value {
    match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(a) => Value::List(a.iter().map(json_to_value).collect()),
        Json::Object(o) => Value::Map(o.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect()),
    }
}

/// The `<class '...'>` repr Python prints for the type of a JSON value.
fn py_type_repr(j: &Json) -> String {
    let name = match j {
        Json::Null => "NoneType",
        Json::Bool(_) => "bool",
        Json::Number(n) if n.is_f64() => "float",
        Json::Number(_) => "int",
        Json::String(_) => "str",
        Json::Array(_) => "list",
        Json::Object(_) => "dict",
    };
    format!("<class '{name}'>")
}

/// Python's `repr()` of a JSON value, for error messages that embed it.
fn py_repr(j: &Json) -> String {
    match j {
        Json::Null => "None".into(),
        Json::Bool(true) => "True".into(),
        Json::Bool(false) => "False".into(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => {
            // Python picks double quotes only when the text has a ' and no ".
            let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            let mut out = String::from(q);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    '\r' => out.push_str("\\r"),
                    c if c == q => {
                        out.push('\\');
                        out.push(c)
                    }
                    c => out.push(c),
                }
            }
            out.push(q);
            out
        }
        Json::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Json::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", py_repr(&Json::String(k.clone())), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Python truthiness of a JSON value (`[]`, `{}`, `""`, `0`, `false`, `null` are falsy).
fn truthy(j: &Json) -> bool {
    match j {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

// ----------------------------------------------------------------------------------------
// ServiceConfig
// ----------------------------------------------------------------------------------------

/// Who may see and call a service (spec §7.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Visibility {
    /// Listed and callable by everyone.
    Public,
    /// The default: only the own workspace, `authorized_workspaces`, and the manager.
    #[default]
    Protected,
    /// Callable by anyone who knows the id, never listed outside the own workspace.
    Unlisted,
}

impl Visibility {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Protected => "protected",
            Visibility::Unlisted => "unlisted",
        }
    }

    /// Parses a wire name. Case-sensitive and strict, as upstream: `"PUBLIC"` and
    /// `"private"` are errors, not aliases.
    pub fn parse(s: &str) -> Result<Self, SchemaError> {
        match s {
            "public" => Ok(Visibility::Public),
            "protected" => Ok(Visibility::Protected),
            "unlisted" => Ok(Visibility::Unlisted),
            other => Err(SchemaError::InvalidVisibility(other.to_owned())),
        }
    }
}

impl std::fmt::Display for Visibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Visibility {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Visibility {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Visibility::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `config.require_context`: every function, or only the listed ones (spec §7.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequireContext {
    /// `true`/`false`: all functions or none.
    All(bool),
    /// A list of function paths below the service id (`"nested.fn"`).
    Only(Vec<String>),
}

impl RequireContext {
    /// Whether the function at `path` (below the service id, dot-separated) receives the
    /// context. Python rules: a list matches the whole path; JS matches only the first
    /// segment, so `["nested"]` covers `nested.fn` in JS but not in Python.
    pub fn applies_to(&self, path: &str) -> bool {
        match self {
            RequireContext::All(b) => *b,
            RequireContext::Only(list) => list.iter().any(|p| p == path),
        }
    }

    /// Python truthiness: what `_extract_service_info` uses to strip `context` from every
    /// schema (a non-empty list counts as `true` there).
    pub fn is_truthy(&self) -> bool {
        match self {
            RequireContext::All(b) => *b,
            RequireContext::Only(list) => !list.is_empty(),
        }
    }
}

/// A service's `config` (spec §7.2 table). Absent keys are `None` and are not serialized;
/// unknown keys are kept in `extra`, after the known ones.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// Visibility; `None` means the default, `protected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
    /// Which functions get the caller's context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_context: Option<RequireContext>,
    /// Owner workspace: set by the client, overwritten by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Other workspaces allowed to use a `protected` service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_workspaces: Option<Vec<String>>,
    /// Free-form flags; `"single-instance"` makes the service a singleton.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    /// At most one service with this name per workspace (server-enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub singleton: Option<bool>,
    /// An embedding vector for search, stored by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_embedding: Option<Json>,
    /// Set by the server only: `{"id": uid}` or the full user info for the built-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<Json>,
    /// Python-local: run sync handlers in a thread pool. Sent, unused by peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_in_executor: Option<bool>,
    /// Caller public keys (64 hex chars) allowed to call; requires encrypted calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_keys: Option<Vec<String>>,
    /// `3` on the built-in service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<i64>,
    /// Marks `_rintf` services, which are never sent to the server.
    #[serde(rename = "_local_only", default, skip_serializing_if = "Option::is_none")]
    pub local_only: Option<bool>,
    /// The only caller (absolute client id) allowed to call an `_rintf` service.
    #[serde(rename = "_rintf_allowed_caller", default, skip_serializing_if = "Option::is_none")]
    pub rintf_allowed_caller: Option<String>,
    /// Every other key, kept as sent (the server stores them, e.g. the manager's
    /// `server_id`, `hypha_version`, `public_base_url`...).
    #[serde(flatten)]
    pub extra: JsonMap<String, Json>,
}

impl ServiceConfig {
    /// Reads a config from JSON, applying the Python client's `add_service` checks first
    /// (in its order) so that bad input fails with upstream's texts. Trusted keys must also
    /// be hex (Python only checks the length; see [`ServiceConfig::validate`]). A falsy
    /// `require_context`, `run_in_executor` or `trusted_keys` of another type (`false`, `0`,
    /// `""`) reads as unset, as Python tests them by truthiness; a truthy value of the wrong
    /// type is refused ([`SchemaError::Shape`]) rather than guessed at.
    pub fn from_json(json: &Json) -> Result<Self, SchemaError> {
        let obj = json.as_object().ok_or_else(|| SchemaError::Shape {
            what: "service config",
            message: format!("expected a map, got {}", py_type_repr(json)),
        })?;
        let visibility = match obj.get("visibility") {
            None => Visibility::Protected,
            Some(Json::String(s)) => Visibility::parse(s)?,
            Some(other) => return Err(SchemaError::InvalidVisibility(py_repr(other))),
        };
        match obj.get("authorized_workspaces") {
            None | Some(Json::Null) => {}
            Some(aw) => {
                if visibility != Visibility::Protected {
                    return Err(SchemaError::AuthorizedWorkspacesNeedProtected(visibility.as_str().into()));
                }
                let list = aw.as_array().ok_or(SchemaError::AuthorizedWorkspacesNotList)?;
                if let Some(bad) = list.iter().find(|w| !w.is_string()) {
                    return Err(SchemaError::AuthorizedWorkspaceNotString(py_type_repr(bad)));
                }
            }
        }
        if let Some(tk) = obj.get("trusted_keys").filter(|tk| truthy(tk)) {
            let list = tk.as_array().ok_or(SchemaError::TrustedKeysNotList)?;
            for key in list {
                if !key.as_str().is_some_and(is_key_hex) {
                    return Err(SchemaError::BadTrustedKey(py_repr(key)));
                }
            }
        }
        let mut obj = obj.clone();
        // Python reads these three keys by truthiness (`if config.get(key):`), so a falsy
        // value of any type (`false`, `0`, `""`, `{}`) means "not set" there. Lists are kept
        // as they are: `[]` is a valid, empty list of the declared type.
        for key in ["require_context", "run_in_executor", "trusted_keys"] {
            if let Some(v) = obj.get_mut(key).filter(|v| !truthy(v) && !v.is_array()) {
                *v = Json::Null;
            }
        }
        serde_json::from_value(Json::Object(obj))
            .map_err(|e| SchemaError::Shape { what: "service config", message: e.to_string() })
    }

    /// Reads a config from a [`Value`] (via JSON; see the module docs).
    pub fn from_value(value: &Value) -> Result<Self, SchemaError> {
        Self::from_json(&value_to_json(value)?)
    }

    /// Reads a config from the `config` map of a local service, as `add_service` does (via
    /// JSON, without copying the map into a [`Value`] first).
    pub fn from_map(map: &Map) -> Result<Self, SchemaError> {
        Self::from_json(&map_to_json(map)?)
    }

    /// The config as JSON.
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }

    /// The config as a wire-form [`Value`] map.
    pub fn to_value(&self) -> Value {
        json_to_value(&self.to_json())
    }

    /// Re-checks the typed config with the `add_service` rules (for configs built in Rust).
    ///
    /// Deliberately stricter than Python on one point: trusted keys must be hex, not only
    /// 64 characters long (a non-hex key can never match a public key anyway).
    pub fn validate(&self) -> Result<(), SchemaError> {
        let visibility = self.visibility();
        if self.authorized_workspaces.is_some() && visibility != Visibility::Protected {
            return Err(SchemaError::AuthorizedWorkspacesNeedProtected(visibility.as_str().into()));
        }
        for key in self.trusted_keys.iter().flatten() {
            if !is_key_hex(key) {
                return Err(SchemaError::BadTrustedKey(py_repr(&Json::String(key.clone()))));
            }
        }
        Ok(())
    }

    /// The effective visibility (`protected` when unset).
    pub fn visibility(&self) -> Visibility {
        self.visibility.unwrap_or_default()
    }

    /// Whether the function at `path` gets the context (false when unset).
    pub fn requires_context(&self, path: &str) -> bool {
        self.require_context.as_ref().is_some_and(|rc| rc.applies_to(path))
    }

    /// Whether `context` is stripped from the service's schemas (Python truthiness).
    pub fn skip_context_in_schema(&self) -> bool {
        self.require_context.as_ref().is_some_and(RequireContext::is_truthy)
    }

    /// The trusted keys when they restrict anything (`None` for absent or empty).
    pub fn trusted_keys(&self) -> Option<&[String]> {
        self.trusted_keys.as_deref().filter(|k| !k.is_empty())
    }

    /// Whether the Python-local `run_in_executor` hint is set (false when unset).
    pub fn runs_in_executor(&self) -> bool {
        self.run_in_executor == Some(true)
    }

    /// Whether the service is local-only (`_local_only: true`, the `_rintf` services): it is
    /// never sent to the server, so re-registration on reconnect skips it.
    pub fn is_local_only(&self) -> bool {
        self.local_only == Some(true)
    }
}

fn is_key_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// ----------------------------------------------------------------------------------------
// ServiceInfo
// ----------------------------------------------------------------------------------------

/// The top-level keys of a service map that are metadata, not members: they are left out
/// of `service_schema`.
pub const RESERVED_SERVICE_KEYS: [&str; 8] =
    ["id", "config", "name", "description", "type", "docs", "app_id", "service_schema"];

/// The `type` of a service that does not set one (client and server agree on it).
pub const DEFAULT_SERVICE_TYPE: &str = "generic";

fn default_type() -> String {
    DEFAULT_SERVICE_TYPE.into()
}

fn default_app_id() -> String {
    "*".into()
}

/// A service description as `register_service` sends it and the manager returns it
/// (spec §7.2, server spec §5.5). Serializes in upstream's key order: `config, id, name,
/// description, type, docs, app_id, service_schema`, with `description`/`docs` as `null`
/// when absent (as the Python client sends them). Unknown top-level keys (e.g. the
/// `"_rtype": "pydantic-model"` of `get_service_info` results) are ignored on read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The service's config.
    #[serde(default)]
    pub config: ServiceConfig,
    /// The absolute id `"ws/cid:svc"` (the server accepts `"cid:svc"` and prefixes it).
    pub id: String,
    /// Display name; the client defaults it to the service id, the server to the service
    /// part of `id` (empty here when the peer left it out).
    #[serde(default)]
    pub name: String,
    /// Free text, at most 1024 characters on the server.
    #[serde(default)]
    pub description: Option<String>,
    /// `"generic"` by default; `"built-in"` for the built-in service.
    #[serde(rename = "type", default = "default_type")]
    pub service_type: String,
    /// Documentation text.
    #[serde(default)]
    pub docs: Option<String>,
    /// The app the client belongs to, `"*"` for none.
    #[serde(default = "default_app_id")]
    pub app_id: String,
    /// See [`service_schema`].
    #[serde(default = "empty_object")]
    pub service_schema: Json,
}

fn empty_object() -> Json {
    Json::Object(JsonMap::new())
}

impl ServiceInfo {
    /// Reads a service info from JSON, validating the config as [`ServiceConfig::from_json`].
    pub fn from_json(json: &Json) -> Result<Self, SchemaError> {
        let config = json.get("config").map(ServiceConfig::from_json).transpose()?;
        // The config is the one `ServiceConfig::from_json` read (falsy keys normalised), not
        // serde's plain reading of the same JSON, so serde reads the rest without it.
        let mut rest = json.clone();
        if let Some(obj) = rest.as_object_mut() {
            obj.remove("config");
        }
        let mut info: Self = serde_json::from_value(rest)
            .map_err(|e| SchemaError::Shape { what: "service info", message: e.to_string() })?;
        info.config = config.unwrap_or_default();
        Ok(info)
    }

    /// Reads a service info from a decoded [`Value`] (for instance a `register_service`
    /// argument). Fails on values JSON cannot carry.
    pub fn from_value(value: &Value) -> Result<Self, SchemaError> {
        Self::from_json(&value_to_json(value)?)
    }

    /// Builds what a client sends to `register_service` for a local service map (the
    /// Python client's `_extract_service_info`, spec §7.2): `config.workspace` defaults to
    /// `workspace`, `id` becomes `"<config.workspace>/<client_id>:<id>"`, `name` defaults to
    /// the id, `type` to `generic`, and `service_schema` is [`service_schema`] of the map.
    pub fn from_service(
        service: &Map,
        workspace: &str,
        client_id: &str,
        app_id: &str,
    ) -> Result<Self, SchemaError> {
        let text = |key: &'static str| -> Result<Option<String>, SchemaError> {
            match service.get(key) {
                None | Some(Value::Nil) => Ok(None),
                Some(Value::Str(s)) => Ok(Some(s.clone())),
                Some(other) => Err(SchemaError::Shape {
                    what: "service",
                    message: format!("{key} must be a str, got {}", other.kind()),
                }),
            }
        };
        let id =
            text("id")?.ok_or_else(|| SchemaError::Shape { what: "service", message: "no id".into() })?;
        let mut config = match service.get("config") {
            None | Some(Value::Nil) => ServiceConfig::default(),
            Some(c) => ServiceConfig::from_value(c)?,
        };
        let ws = config.workspace.get_or_insert_with(|| workspace.to_owned()).clone();
        let skip_context = config.skip_context_in_schema();
        Ok(Self {
            id: format!("{ws}/{client_id}:{id}"),
            name: text("name")?.unwrap_or_else(|| id.clone()),
            description: text("description")?,
            service_type: text("type")?.unwrap_or_else(default_type),
            docs: text("docs")?,
            app_id: app_id.to_owned(),
            service_schema: service_schema(&Value::Map(service.clone()), skip_context),
            config,
        })
    }

    /// The service info as JSON.
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }

    /// The service info as a wire-form [`Value`] map, ready to be a call argument.
    pub fn to_value(&self) -> Value {
        json_to_value(&self.to_json())
    }
}

// ----------------------------------------------------------------------------------------
// Function schemas
// ----------------------------------------------------------------------------------------

/// A function's schema (`__schema__` in Python, `_rschema` on the wire, spec §7.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSchema {
    /// The function name (in a `service_schema`, the key it is registered under).
    pub name: String,
    /// The docstring; `null` when the function has none (Python sends `null` then).
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON Schema object describing the keyword parameters.
    #[serde(default = "empty_object")]
    pub parameters: Json,
}

impl FunctionSchema {
    /// Starts a builder for a function called `name`.
    pub fn builder(name: impl Into<String>) -> FunctionSchemaBuilder {
        FunctionSchemaBuilder { name: name.into(), description: None, params: Vec::new() }
    }

    /// The schema as JSON (`{"name", "description", "parameters"}`).
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }

    /// The schema as a wire-form [`Value`], e.g. for [`crate::LocalFunction::schema`].
    pub fn to_value(&self) -> Value {
        json_to_value(&self.to_json())
    }

    /// Reads a schema received as `_rschema`.
    pub fn from_value(value: &Value) -> Result<Self, SchemaError> {
        serde_json::from_value(value_to_json(value)?)
            .map_err(|e| SchemaError::Shape { what: "function schema", message: e.to_string() })
    }
}

/// A parameter type, rendered as pydantic 2 renders the matching Python annotation.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamType {
    /// `int` -> `{"type": "integer"}`.
    Integer,
    /// `float` -> `{"type": "number"}`.
    Number,
    /// `bool` -> `{"type": "boolean"}`.
    Boolean,
    /// `str` -> `{"type": "string"}`.
    String,
    /// `list` (`items: {}`) or `List[T]` (`items: <T>`).
    Array(Option<Box<ParamType>>),
    /// `dict` (`additionalProperties: true`) or `Dict[str, T]` (`additionalProperties: <T>`).
    Object(Option<Box<ParamType>>),
    /// No annotation or `Any`: no `type` key at all.
    Any,
    /// `Optional[T]`: `{"anyOf": [<T>, {"type": "null"}]}`.
    Optional(Box<ParamType>),
    /// A hand-written JSON Schema fragment, used as given.
    Raw(Json),
}

impl ParamType {
    /// The schema keys for this type, sorted as pydantic sorts them.
    fn entries(&self, out: &mut BTreeMap<String, Json>) {
        let ty = |out: &mut BTreeMap<String, Json>, t: &str| {
            out.insert("type".into(), Json::String(t.into()));
        };
        match self {
            ParamType::Integer => ty(out, "integer"),
            ParamType::Number => ty(out, "number"),
            ParamType::Boolean => ty(out, "boolean"),
            ParamType::String => ty(out, "string"),
            ParamType::Array(items) => {
                let items = items.as_ref().map_or_else(empty_object, |t| t.to_json());
                out.insert("items".into(), items);
                ty(out, "array");
            }
            ParamType::Object(values) => {
                let ap = values.as_ref().map_or(Json::Bool(true), |t| t.to_json());
                out.insert("additionalProperties".into(), ap);
                ty(out, "object");
            }
            ParamType::Any => {}
            ParamType::Optional(inner) => {
                out.insert("anyOf".into(), json!([inner.to_json(), {"type": "null"}]));
            }
            ParamType::Raw(j) => {
                if let Json::Object(o) = j {
                    out.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
    }

    /// The standalone schema of this type.
    pub fn to_json(&self) -> Json {
        let mut m = BTreeMap::new();
        self.entries(&mut m);
        Json::Object(m.into_iter().collect())
    }
}

/// One declared parameter of a Rust function.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The keyword name.
    pub name: String,
    /// The type.
    pub ty: ParamType,
    /// The default; `None` makes the parameter required. `Some(Json::Null)` is a default
    /// of `null` (Python's `= None`).
    pub default: Option<Json>,
    /// Description. Pydantic describes a required parameter that has none by its own name,
    /// and the builder does the same, so schemas match Python's byte for byte.
    pub description: Option<String>,
}

impl Param {
    /// A required parameter without description.
    pub fn new(name: impl Into<String>, ty: ParamType) -> Self {
        Self { name: name.into(), ty, default: None, description: None }
    }

    /// Gives the parameter a default, making it optional.
    pub fn default(mut self, value: impl Into<Json>) -> Self {
        self.default = Some(value.into());
        self
    }

    /// Sets the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }
}

/// Builds a [`FunctionSchema`] from declared parameters. A parameter named `context` is
/// left out: it is injected by the callee (spec §7.5), never sent by callers.
#[derive(Debug, Clone)]
pub struct FunctionSchemaBuilder {
    name: String,
    description: Option<String>,
    params: Vec<Param>,
}

impl FunctionSchemaBuilder {
    /// Sets the function description (Python: the cleaned docstring).
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Adds a parameter, in call order.
    pub fn param(mut self, param: Param) -> Self {
        self.params.push(param);
        self
    }

    /// The schema: `parameters` is `{"properties": {...}, "required": [...], "type":
    /// "object"}` with `required` omitted when empty, as pydantic emits it.
    pub fn build(self) -> FunctionSchema {
        let mut properties = JsonMap::new();
        let mut required = Vec::new();
        for p in self.params.into_iter().filter(|p| p.name != "context") {
            let mut entry = BTreeMap::new();
            p.ty.entries(&mut entry);
            let description = match (&p.default, p.description) {
                (_, Some(d)) => Some(d),
                (None, None) => Some(p.name.clone()),
                (Some(_), None) => None,
            };
            if let Some(d) = description {
                entry.insert("description".into(), Json::String(d));
            }
            match p.default {
                Some(d) => {
                    entry.insert("default".into(), d);
                }
                None => required.push(Json::String(p.name.clone())),
            }
            properties.insert(p.name, Json::Object(entry.into_iter().collect()));
        }
        let mut parameters = JsonMap::new();
        parameters.insert("properties".into(), Json::Object(properties));
        if !required.is_empty() {
            parameters.insert("required".into(), Json::Array(required));
        }
        parameters.insert("type".into(), Json::String("object".into()));
        FunctionSchema {
            name: self.name,
            description: self.description,
            parameters: Json::Object(parameters),
        }
    }
}

// ----------------------------------------------------------------------------------------
// service_schema
// ----------------------------------------------------------------------------------------

/// The `service_schema` of a service (spec §7.3): the service map without
/// [`RESERVED_SERVICE_KEYS`], converted recursively.
///
/// * function -> `{"type": "function", "function": <schema>}` with `name` set to its key.
///   The schema is the function's own (`LocalFunction::schema`, or a remote descriptor's
///   `_rschema`). Without one, Rust cannot introspect a closure, so it takes JS's fallback
///   `{"name": <key>}`. A schema that is not JSON gives Python's failure fallback
///   `{"type": "function"}`. With `skip_context` (pass
///   [`ServiceConfig::skip_context_in_schema`]) `context` is removed from `properties` and
///   `required`.
/// * map -> map, list -> list, str -> `string`, numbers -> `number`, null -> `null`.
/// * **bools -> `number`**: Python's rule (a Python bool is an int), chosen because the
///   Python client is the reference peer; JS would say `boolean`.
/// * anything else (bytes, arrays, sets, generators, ...) -> `{}`.
///
/// Keys starting with `_` are not filtered here: `add_service` drops them before.
pub fn service_schema(service_tree: &Value, skip_context: bool) -> Json {
    match service_tree {
        Value::Map(m) => Json::Object(
            m.iter()
                .filter(|(k, _)| !RESERVED_SERVICE_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), member_schema(v, Some(k), skip_context)))
                .collect(),
        ),
        other => member_schema(other, None, skip_context),
    }
}

fn member_schema(v: &Value, key: Option<&str>, skip_context: bool) -> Json {
    match v {
        Value::Function(f) => function_entry(f, key, skip_context),
        Value::Map(m) => Json::Object(
            m.iter().map(|(k, v)| (k.clone(), member_schema(v, Some(k), skip_context))).collect(),
        ),
        Value::List(l) => Json::Array(l.iter().map(|v| member_schema(v, None, skip_context)).collect()),
        Value::Str(_) => json!({"type": "string"}),
        Value::Bool(_) | Value::Int(_) | Value::UInt(_) | Value::F32(_) | Value::F64(_) => {
            json!({"type": "number"})
        }
        Value::Nil => json!({"type": "null"}),
        _ => json!({}),
    }
}

fn function_entry(f: &Function, key: Option<&str>, skip_context: bool) -> Json {
    let (schema, own_name) = match f {
        Function::Local(lf) => (lf.schema.as_deref(), lf.name.as_deref()),
        Function::Remote(rm) => (rm.schema.as_deref(), rm.name.as_deref()),
    };
    let name = key.or(own_name);
    let schema = match schema {
        Some(s @ Value::Map(_)) => match value_to_json(s) {
            Ok(Json::Object(mut obj)) => {
                if let Some(n) = name {
                    obj.insert("name".into(), Json::String(n.into()));
                }
                if skip_context {
                    strip_context(&mut obj);
                }
                Json::Object(obj)
            }
            _ => return json!({"type": "function"}),
        },
        _ => match name {
            Some(n) => json!({"name": n}),
            None => return json!({"type": "function"}),
        },
    };
    json!({"type": "function", "function": schema})
}

fn strip_context(schema: &mut JsonMap<String, Json>) {
    let Some(Json::Object(params)) = schema.get_mut("parameters") else { return };
    if let Some(Json::Object(props)) = params.get_mut("properties") {
        props.shift_remove("context");
    }
    if let Some(Json::Array(req)) = params.get_mut("required") {
        req.retain(|r| r.as_str() != Some("context"));
    }
}

/// Convenience: the schema of a service map as a wire-form [`Value`].
pub fn service_schema_value(service_tree: &Value, skip_context: bool) -> Value {
    json_to_value(&service_schema(service_tree, skip_context))
}

/// The members of a service map: every key except [`RESERVED_SERVICE_KEYS`].
pub fn service_members(service: &Map) -> impl Iterator<Item = (&String, &Value)> {
    service.iter().filter(|(k, _)| !RESERVED_SERVICE_KEYS.contains(&k.as_str()))
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // 3.14 is the default in the Python reference schema
mod tests {
    use super::*;
    use crate::value::{Handler, LocalFunction};

    fn compact(j: &Json) -> String {
        serde_json::to_string(j).unwrap()
    }

    /// Parses a literal printed by Python's `json.dumps` and re-serializes it compactly, so
    /// the comparison is on key order and values, not whitespace.
    fn py(text: &str) -> String {
        compact(&serde_json::from_str::<Json>(text).unwrap())
    }

    // Expected literals below were printed by hypha-rpc 0.21.47 `schema_function` with
    // pydantic 2.11.3 (`json.dumps(f.__schema__)`).

    #[test]
    fn builder_matches_python_add_numbers() {
        let s = FunctionSchema::builder("add_numbers")
            .description("Adds two numbers, an integer and a float.")
            .param(Param::new("a", ParamType::Integer))
            .param(Param::new("b", ParamType::Number).default(3.14))
            .build();
        assert_eq!(
            compact(&s.to_json()),
            py(
                r#"{"name": "add_numbers", "description": "Adds two numbers, an integer and a float.", "parameters": {"properties": {"a": {"description": "a", "type": "integer"}, "b": {"default": 3.14, "type": "number"}}, "required": ["a"], "type": "object"}}"#
            )
        );
    }

    #[test]
    fn builder_matches_python_fields_and_context() {
        let s = FunctionSchema::builder("f2")
            .description("Do things.\n\nMore text here.")
            .param(Param::new("name", ParamType::String).description("The name"))
            .param(Param::new("count", ParamType::Integer).default(2).description("How many"))
            .param(Param::new("flag", ParamType::Boolean).default(false))
            .param(Param::new("meta", ParamType::Object(None)).default(Json::Null))
            .param(Param::new("x", ParamType::Number).default(1.0))
            .param(Param::new("context", ParamType::Any).default(Json::Null))
            .build();
        assert_eq!(
            compact(&s.to_json()),
            py(
                r#"{"name": "f2", "description": "Do things.\n\nMore text here.", "parameters": {"properties": {"name": {"description": "The name", "type": "string"}, "count": {"default": 2, "description": "How many", "type": "integer"}, "flag": {"default": false, "type": "boolean"}, "meta": {"additionalProperties": true, "default": null, "type": "object"}, "x": {"default": 1.0, "type": "number"}}, "required": ["name"], "type": "object"}}"#
            )
        );
    }

    #[test]
    fn builder_matches_python_all_optional() {
        let s = FunctionSchema::builder("allopt")
            .description("All optional.")
            .param(Param::new("s", ParamType::String).default("hi"))
            .param(Param::new("n", ParamType::Optional(Box::new(ParamType::Integer))).default(Json::Null))
            .param(Param::new("l", ParamType::Array(None)).default(Json::Null))
            .param(Param::new("d", ParamType::Object(None)).default(Json::Null).description("a dict"))
            .build();
        assert_eq!(
            compact(&s.to_json()),
            py(
                r#"{"name": "allopt", "description": "All optional.", "parameters": {"properties": {"s": {"default": "hi", "type": "string"}, "n": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null}, "l": {"default": null, "items": {}, "type": "array"}, "d": {"additionalProperties": true, "default": null, "description": "a dict", "type": "object"}}, "type": "object"}}"#
            )
        );
    }

    #[test]
    fn builder_matches_python_container_types() {
        let s = FunctionSchema::builder("req")
            .description("Req.")
            .param(Param::new("x", ParamType::Array(None)))
            .param(Param::new("y", ParamType::Object(None)))
            .param(Param::new("z", ParamType::Array(Some(Box::new(ParamType::Integer)))))
            .param(Param::new("w", ParamType::Object(None)))
            .param(Param::new("v", ParamType::Any))
            .param(Param::new("b", ParamType::Boolean))
            .param(Param::new("o", ParamType::Optional(Box::new(ParamType::String))))
            .param(Param::new("c", ParamType::Object(Some(Box::new(ParamType::Integer)))).default(Json::Null))
            .build();
        assert_eq!(
            compact(&s.to_json()),
            py(
                r#"{"name": "req", "description": "Req.", "parameters": {"properties": {"x": {"description": "x", "items": {}, "type": "array"}, "y": {"additionalProperties": true, "description": "y", "type": "object"}, "z": {"description": "z", "items": {"type": "integer"}, "type": "array"}, "w": {"additionalProperties": true, "description": "w", "type": "object"}, "v": {"description": "v"}, "b": {"description": "b", "type": "boolean"}, "o": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "o"}, "c": {"additionalProperties": {"type": "integer"}, "default": null, "type": "object"}}, "required": ["x", "y", "z", "w", "v", "b", "o"], "type": "object"}}"#
            )
        );
    }

    #[test]
    fn builder_no_doc_no_params() {
        let s = FunctionSchema::builder("nodoc").param(Param::new("a", ParamType::Integer)).build();
        assert_eq!(
            compact(&s.to_json()),
            py(
                r#"{"name": "nodoc", "description": null, "parameters": {"properties": {"a": {"description": "a", "type": "integer"}}, "required": ["a"], "type": "object"}}"#
            )
        );
        let s = FunctionSchema::builder("noparams").description("Nothing.").build();
        assert_eq!(
            compact(&s.to_json()),
            py(
                r#"{"name": "noparams", "description": "Nothing.", "parameters": {"properties": {}, "type": "object"}}"#
            )
        );
        // Round trip through Value (as `_rschema`).
        assert_eq!(FunctionSchema::from_value(&s.to_value()).unwrap(), s);
    }

    fn local_fn(schema: Option<&FunctionSchema>, name: Option<&str>) -> Value {
        let mut lf = LocalFunction::new(Handler::new(()));
        lf.schema = schema.map(|s| std::sync::Arc::new(s.to_value()));
        lf.name = name.map(str::to_owned);
        Value::from(Function::Local(lf))
    }

    #[test]
    fn service_schema_conversion_rules() {
        let add = FunctionSchema::builder("add_numbers")
            .description("Adds two numbers, an integer and a float.")
            .param(Param::new("a", ParamType::Integer))
            .param(Param::new("b", ParamType::Number).default(3.14))
            .build();
        let mut nested = Map::new();
        nested.insert("x".into(), Value::Int(1));
        nested.insert("t".into(), Value::Bool(true));
        nested.insert("s".into(), Value::from("s"));
        nested.insert("z".into(), Value::Nil);
        nested.insert("l".into(), Value::List(vec![Value::F64(1.5), Value::from("a"), local_fn(None, None)]));
        let mut tree = Map::new();
        tree.insert("id".into(), Value::from("demo"));
        tree.insert("name".into(), Value::from("Demo"));
        tree.insert("config".into(), Value::Map(Map::new()));
        tree.insert("f".into(), local_fn(Some(&add), None));
        tree.insert("n".into(), Value::Map(nested));
        tree.insert("plain".into(), local_fn(None, Some("other")));
        tree.insert("o".into(), Value::Bytes(bytes::Bytes::from_static(b"x")));
        let got = service_schema(&Value::Map(tree), false);
        // `f` and `n` are what the Python client produced for the same tree; `plain` (no
        // schema) takes the JS fallback; bytes give `{}` as any other object.
        let expected = py(
            r#"{"f": {"type": "function", "function": {"name": "f", "description": "Adds two numbers, an integer and a float.", "parameters": {"properties": {"a": {"description": "a", "type": "integer"}, "b": {"default": 3.14, "type": "number"}}, "required": ["a"], "type": "object"}}},
            "n": {"x": {"type": "number"}, "t": {"type": "number"}, "s": {"type": "string"}, "z": {"type": "null"}, "l": [{"type": "number"}, {"type": "string"}, {"type": "function"}]},
            "plain": {"type": "function", "function": {"name": "plain"}}, "o": {}}"#,
        );
        assert_eq!(compact(&got), expected);
    }

    #[test]
    fn service_schema_skips_context() {
        let mut schema = FunctionSchema::builder("ping").param(Param::new("msg", ParamType::String)).build();
        // A hand-written schema that lists `context`, as Python's `schema_function` does.
        if let Json::Object(p) = &mut schema.parameters {
            p["properties"]["context"] = json!({"default": null});
            p["required"].as_array_mut().unwrap().push(json!("context"));
        }
        let mut tree = Map::new();
        tree.insert("ping".into(), local_fn(Some(&schema), None));
        let kept = service_schema(&Value::Map(tree.clone()), false);
        assert!(kept["ping"]["function"]["parameters"]["properties"].get("context").is_some());
        let got = service_schema(&Value::Map(tree), true);
        assert_eq!(
            compact(&got),
            py(
                r#"{"ping": {"type": "function", "function": {"name": "ping", "description": null, "parameters": {"properties": {"msg": {"description": "msg", "type": "string"}}, "required": ["msg"], "type": "object"}}}}"#
            )
        );
    }

    /// The `register_service` argument of the `hello` trace (hello.txt, 501.0 ms).
    const HELLO_INFO: &str = r#"{"config": {"visibility": "public", "workspace": "ws-user-anonymouz-nebula-glitter-85750293"},
        "id": "ws-user-anonymouz-nebula-glitter-85750293/9gpn8x3RZqbkKtsfjP6GEy:hello-world",
        "name": "Hello World", "description": "hello-world example", "type": "generic", "docs": null, "app_id": "*",
        "service_schema": {"hello": {"type": "function", "function": {"name": "hello", "description": "Say hello.",
            "parameters": {"type": "object", "properties": {"name": {"type": "string", "description": ""}}, "required": ["name"]}}}}}"#;

    #[test]
    fn service_info_round_trips_trace() {
        let json: Json = serde_json::from_str(HELLO_INFO).unwrap();
        let info = ServiceInfo::from_json(&json).unwrap();
        assert_eq!(info.config.visibility(), Visibility::Public);
        assert_eq!(info.service_type, "generic");
        assert_eq!(info.docs, None);
        assert_eq!(compact(&info.to_json()), compact(&json), "same keys, same order");
        let v = info.to_value();
        assert_eq!(ServiceInfo::from_value(&v).unwrap(), info);
    }

    #[test]
    fn service_info_from_local_service() {
        let hello = FunctionSchema {
            name: "hello".into(),
            description: Some("Say hello.".into()),
            parameters: json!({"type": "object", "properties": {"name": {"type": "string", "description": ""}}, "required": ["name"]}),
        };
        let mut config = Map::new();
        config.insert("visibility".into(), Value::from("public"));
        let mut svc = Map::new();
        svc.insert("id".into(), Value::from("hello-world"));
        svc.insert("config".into(), Value::Map(config));
        svc.insert("name".into(), Value::from("Hello World"));
        svc.insert("description".into(), Value::from("hello-world example"));
        svc.insert("hello".into(), local_fn(Some(&hello), None));
        let info = ServiceInfo::from_service(
            &svc,
            "ws-user-anonymouz-nebula-glitter-85750293",
            "9gpn8x3RZqbkKtsfjP6GEy",
            "*",
        )
        .unwrap();
        // Byte-for-byte what the Python client sent in the trace.
        assert_eq!(compact(&info.to_json()), py(HELLO_INFO));
        svc.shift_remove("id");
        assert!(ServiceInfo::from_service(&svc, "w", "c", "*").is_err());
    }

    #[test]
    fn service_info_server_record() {
        // server spec §5.5: a built-in record with server-added config keys.
        let json: Json = serde_json::from_str(r#"{"config": {"visibility": "public", "require_context": true, "workspace": "W",
            "flags": [], "singleton": false, "created_by": {"id": "u", "roles": ["anonymous"]},
            "service_embedding": null, "authorized_workspaces": null, "api_version": 3, "extra_key": 1},
            "id": "W/mgr-probe:built-in", "name": "Builtin services for W/mgr-probe", "type": "built-in",
            "description": null, "docs": null, "app_id": "*", "service_schema": {}, "_rtype": "pydantic-model"}"#)
        .unwrap();
        let info = ServiceInfo::from_json(&json).unwrap();
        let c = &info.config;
        assert_eq!(c.require_context, Some(RequireContext::All(true)));
        assert_eq!(c.flags, Some(vec![]));
        assert_eq!(c.singleton, Some(false));
        assert_eq!(c.api_version, Some(3));
        assert_eq!(c.created_by.as_ref().unwrap()["id"], "u");
        assert_eq!(c.authorized_workspaces, None);
        assert_eq!(c.extra.get("extra_key"), Some(&json!(1)));
        assert_eq!(info.service_type, "built-in");
        let back = info.to_json();
        assert_eq!(back["config"]["extra_key"], 1);
        assert!(back.get("_rtype").is_none());
    }

    #[test]
    fn service_info_from_value_refuses_bytes() {
        let json: Json = serde_json::from_str(HELLO_INFO).unwrap();
        let mut v = json_to_value(&json);
        v.as_map_mut().unwrap().insert("docs".into(), Value::Bytes(bytes::Bytes::from_static(b"d")));
        assert_eq!(ServiceInfo::from_value(&v), Err(SchemaError::NotJson("bytes")));
        assert_eq!(value_to_json(&Value::F64(f64::NAN)), Err(SchemaError::NotJson("non-finite float")));
        assert_eq!(json_to_value(&json!(u64::MAX)), Value::UInt(u64::MAX));
        assert_eq!(json_to_value(&json!(2.5)), Value::F64(2.5));
    }

    fn cfg(text: &str) -> Result<ServiceConfig, SchemaError> {
        ServiceConfig::from_json(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn config_validation_texts() {
        let e = |t: &str| cfg(t).unwrap_err().to_string();
        assert_eq!(e(r#"{"visibility": "private"}"#), "Invalid visibility: private");
        assert_eq!(e(r#"{"visibility": "PUBLIC"}"#), "Invalid visibility: PUBLIC");
        assert_eq!(e(r#"{"visibility": null}"#), "Invalid visibility: None");
        assert_eq!(
            e(r#"{"visibility": "public", "authorized_workspaces": ["b"]}"#),
            "authorized_workspaces can only be set when visibility is 'protected', got visibility='public'"
        );
        assert_eq!(
            e(r#"{"authorized_workspaces": "b"}"#),
            "authorized_workspaces must be a list of workspace ids"
        );
        assert_eq!(
            e(r#"{"authorized_workspaces": ["b", 3]}"#),
            "Each workspace id in authorized_workspaces must be a string, got <class 'int'>"
        );
        assert_eq!(e(r#"{"trusted_keys": "abc"}"#), "trusted_keys must be a list of hex-encoded public keys");
        assert_eq!(
            e(r#"{"trusted_keys": ["abc"]}"#),
            "Each trusted key must be a 64-char hex string, got: 'abc'"
        );
        assert_eq!(e(r#"{"trusted_keys": [5]}"#), "Each trusted key must be a 64-char hex string, got: 5");
        assert_eq!(
            SchemaError::ServiceExists("demo".into()).to_string(),
            "Service already exists: demo, please specify a different id (not demo) or overwrite=True"
        );
    }

    #[test]
    fn config_accepts_valid_forms() {
        let key = "ab".repeat(32);
        let c = cfg(&format!(
            r#"{{"authorized_workspaces": [], "trusted_keys": ["{key}"], "require_context": ["add", "nested.fn"], "run_in_executor": true, "_rintf_allowed_caller": "ws/c", "_local_only": true}}"#
        ))
        .unwrap();
        assert_eq!(c.visibility(), Visibility::Protected);
        assert_eq!(c.authorized_workspaces, Some(vec![]));
        assert_eq!(c.trusted_keys(), Some(&[key.clone()][..]));
        assert!(
            c.requires_context("nested.fn") && c.requires_context("add") && !c.requires_context("nested")
        );
        assert!(c.skip_context_in_schema());
        assert_eq!(c.local_only, Some(true));
        assert_eq!(c.rintf_allowed_caller.as_deref(), Some("ws/c"));
        assert!(c.validate().is_ok());
        // Empty/null trusted keys mean no restriction.
        assert_eq!(cfg(r#"{"trusted_keys": []}"#).unwrap().trusted_keys(), None);
        assert_eq!(cfg(r#"{"trusted_keys": null}"#).unwrap().trusted_keys(), None);
        assert!(!cfg(r#"{"require_context": []}"#).unwrap().skip_context_in_schema());
        // Serialization keeps `_`-prefixed names and puts extras last.
        let j = cfg(r#"{"zzz": 1, "visibility": "unlisted", "_local_only": true}"#).unwrap().to_json();
        assert_eq!(compact(&j), r#"{"visibility":"unlisted","_local_only":true,"zzz":1}"#);
    }

    #[test]
    fn falsy_keys_read_as_unset() {
        for v in ["false", "0", "\"\"", "{}", "null"] {
            let c =
                cfg(&format!(r#"{{"require_context": {v}, "run_in_executor": {v}, "trusted_keys": {v}}}"#))
                    .unwrap();
            assert_eq!(
                (c.require_context.clone(), c.run_in_executor, c.trusted_keys.clone()),
                (None, None, None)
            );
            assert!(!c.requires_context("f") && !c.runs_in_executor() && c.trusted_keys().is_none());
        }
        // Truthy values of the wrong type stay errors; the list form of an empty value stays.
        assert!(matches!(cfg(r#"{"require_context": 1}"#), Err(SchemaError::Shape { .. })));
        assert!(matches!(cfg(r#"{"run_in_executor": "yes"}"#), Err(SchemaError::Shape { .. })));
        assert_eq!(
            cfg(r#"{"require_context": []}"#).unwrap().require_context,
            Some(RequireContext::Only(vec![]))
        );
        // ServiceInfo reads its config the same way.
        let info =
            ServiceInfo::from_json(&json!({"id": "w/c:s", "config": {"trusted_keys": false}})).unwrap();
        assert_eq!(info.config.trusted_keys, None);
        assert_eq!(info.id, "w/c:s");
        assert!(ServiceInfo::from_json(&json!({"id": "w/c:s", "config": {"trusted_keys": "k"}})).is_err());
    }

    #[test]
    fn from_map_and_accessors() {
        let mut m = Map::new();
        m.insert("visibility".into(), Value::from("unlisted"));
        m.insert("_local_only".into(), Value::Bool(true));
        m.insert("run_in_executor".into(), Value::Bool(true));
        let c = ServiceConfig::from_map(&m).unwrap();
        assert_eq!(c, ServiceConfig::from_value(&Value::Map(m.clone())).unwrap());
        assert!(c.is_local_only() && c.runs_in_executor());
        assert_eq!(c.visibility().to_string(), "unlisted");
        assert!(!ServiceConfig::default().is_local_only());
        m.insert("blob".into(), Value::Bytes(bytes::Bytes::from_static(b"x")));
        assert_eq!(ServiceConfig::from_map(&m), Err(SchemaError::NotJson("bytes")));
    }

    #[test]
    fn typed_validate() {
        let mut c = ServiceConfig { visibility: Some(Visibility::Unlisted), ..Default::default() };
        assert!(c.validate().is_ok());
        c.authorized_workspaces = Some(vec!["b".into()]);
        assert_eq!(c.validate(), Err(SchemaError::AuthorizedWorkspacesNeedProtected("unlisted".into())));
        c.visibility = None;
        assert!(c.validate().is_ok());
        c.trusted_keys = Some(vec!["zz".repeat(32)]);
        assert!(matches!(c.validate(), Err(SchemaError::BadTrustedKey(_))));
    }

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr(&json!("it's")), r#""it's""#);
        assert_eq!(py_repr(&json!(["a", null, true])), "['a', None, True]");
        assert_eq!(py_type_repr(&json!(1.5)), "<class 'float'>");
    }
}
