//! The service registry (server spec §0 item 4, §4.5, §5): which services are registered
//! in which workspace, by which client, and who may see them.
//!
//! One [`Registry`] per server, shared through `ServerState`. The workspace manager writes
//! it (`register_service`, `unregister_service`, `cleanup`); the connection layer removes a
//! client's records when its websocket goes away (spec §8), synchronously, so a client that
//! left is never listed afterwards. Every operation holds the lock for one short map
//! operation and never across an `await`.
//!
//! A record is keyed by `{ws}` then `{cid}:{svc}`: registering the same `{ws}/{cid}:{svc}`
//! again replaces the record whatever its visibility, type or app (spec §4.5 step 10).
//! Records keep upstream's dump (§5.5) ready to send: `config` first, then `id`, `name`,
//! `type`, `description`, `docs`, `app_id`, `service_schema`.
//!
//! Visibility (§5.4) is decided by [`ServiceRecord::access`]: public and unlisted services
//! are open to everyone, protected ones to users holding `r` on the service's workspace
//! and to callers whose workspace is in `authorized_workspaces` (who then do not see that
//! list).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use hypha_core::auth::{Permission, UserInfo};
use hypha_core::ids::{ServiceId, WILDCARD};
use hypha_core::msgpack::DecodeLimits;
use hypha_core::schema::{ServiceConfig, Visibility, DEFAULT_SERVICE_TYPE};
use hypha_core::session::BUILTIN_SERVICE_ID;
use hypha_core::value::{Map, Value};
use indexmap::IndexMap;

use super::limits::LoadMeter;
use super::manager::ManagerError;

/// Largest record (its msgpack size) a registration may create.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Most bytes of records one client may hold in all: records live in memory for as long
/// as the client is connected.
pub const MAX_CLIENT_REGISTRY_BYTES: usize = 16 * 1024 * 1024;

/// The config keys the server writes in its own order (spec §5.5); other keys follow as
/// the client sent them.
const KNOWN_CONFIG_KEYS: [&str; 8] = [
    "visibility",
    "require_context",
    "workspace",
    "flags",
    "singleton",
    "created_by",
    "service_embedding",
    "authorized_workspaces",
];

/// How a caller may use a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everything, `authorized_workspaces` included.
    Full,
    /// Allowed through `authorized_workspaces`: that list is hidden from the caller.
    Grantee,
    /// Not allowed (`Permission denied for non-public service in workspace {ws}`).
    Denied,
}

/// One registered service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    /// The workspace it lives in.
    pub workspace: String,
    /// The client that provides it.
    pub client_id: String,
    /// The short service id.
    pub service: String,
    /// `app_id` (`*` when none).
    pub app_id: String,
    /// `name` (the service id when none was given).
    pub name: String,
    /// `type`.
    pub service_type: String,
    /// `config.visibility`.
    pub visibility: Visibility,
    /// `config.authorized_workspaces`.
    pub authorized_workspaces: Option<Vec<String>>,
    /// `config.singleton`.
    pub singleton: bool,
    /// The dump sent to clients (§5.5); read it with [`ServiceRecord::info`].
    dump: Dump,
    /// The msgpack size of the dump (the memory the record accounts for).
    pub size: usize,
}

/// How a record keeps its dump.
///
/// Decoded, a dump costs several times its msgpack size: every small map of a service
/// schema is an `IndexMap` with its own table and entries, every key its own `String`
/// (a stock client's 2 KB `built-in` record took ~8 KB). With thousands of connected
/// clients the records were the largest part of the server's memory per client, and a
/// dump is read only when someone lists or fetches the service, so it is kept encoded
/// and decoded on demand (cloning a record is then a reference-count increment).
#[derive(Debug, Clone, PartialEq)]
enum Dump {
    /// The msgpack encoding of the dump map.
    Encoded(Bytes),
    /// A dump msgpack cannot carry as such (a client put a decoded `_rtype` object, such
    /// as an array or a set, in its config): kept as it came.
    Decoded(Box<Map>),
}

impl Dump {
    /// `size` is the dump's encoded length (the buffer is allocated once).
    fn new(info: Map, size: usize) -> Dump {
        let mut out = Vec::with_capacity(size);
        match hypha_core::msgpack::encode_map(&info, &mut out) {
            Ok(()) => Dump::Encoded(Bytes::from(out)),
            Err(_) => Dump::Decoded(Box::new(info)),
        }
    }

    fn to_map(&self) -> Map {
        match self {
            Dump::Decoded(map) => (**map).clone(),
            Dump::Encoded(bytes) => match hypha_core::msgpack::decode(bytes, 0, &DecodeLimits::default()) {
                Ok((Value::Map(map), _)) => map,
                // Unreachable: the bytes are our own encoding of a map.
                other => {
                    tracing::error!(?other, "a stored service record does not decode");
                    Map::new()
                }
            },
        }
    }
}

impl ServiceRecord {
    /// Builds the record of a `register_service` call (spec §4.5 steps 2, 5-7): `service`
    /// is the map the client sent, `id` its validated id, `created_by` what the record
    /// says registered it. Only the known top-level fields are kept; `config` keeps every
    /// key, the server's ones first.
    pub fn from_registration(
        service: &Map,
        id: &ServiceId,
        created_by: Value,
    ) -> Result<ServiceRecord, ManagerError> {
        let raw_config = match service.get("config") {
            None | Some(Value::Nil) => Map::new(),
            Some(Value::Map(m)) => m.clone(),
            Some(other) => {
                return Err(ManagerError::Value(format!("config must be a dict, got {}", other.kind())));
            }
        };
        let typed = ServiceConfig::from_map(&raw_config).map_err(|e| ManagerError::Value(e.to_string()))?;
        let visibility = typed.visibility.unwrap_or_default();
        let text = |key: &str| -> Result<Option<String>, ManagerError> {
            match service.get(key) {
                None | Some(Value::Nil) => Ok(None),
                Some(Value::Str(s)) => Ok(Some(s.clone())),
                Some(other) => Err(ManagerError::Value(format!("{key} must be a str, got {}", other.kind()))),
            }
        };
        let app_id = text("app_id")?.unwrap_or_else(|| WILDCARD.to_owned());
        if app_id.contains('/') {
            return Err(ManagerError::Assertion(format!("App id must not contain '/': {app_id}")));
        }
        let name = text("name")?.unwrap_or_else(|| id.service().to_owned());
        let service_type = text("type")?.unwrap_or_else(|| DEFAULT_SERVICE_TYPE.to_owned());
        let singleton = typed.singleton.unwrap_or(false);

        let mut config = Map::new();
        config.insert("visibility".into(), Value::from(visibility.as_str()));
        let require_context = match raw_config.get("require_context") {
            None | Some(Value::Nil) => Value::Bool(false),
            Some(v) => v.clone(),
        };
        config.insert("require_context".into(), require_context);
        config.insert("workspace".into(), Value::from(id.workspace()));
        config.insert("flags".into(), raw_config.get("flags").cloned().unwrap_or(Value::List(Vec::new())));
        config.insert("singleton".into(), Value::Bool(singleton));
        config.insert("created_by".into(), created_by);
        config.insert("service_embedding".into(), Value::Nil);
        config.insert(
            "authorized_workspaces".into(),
            raw_config.get("authorized_workspaces").cloned().unwrap_or(Value::Nil),
        );
        for (k, v) in &raw_config {
            if !KNOWN_CONFIG_KEYS.contains(&k.as_str()) {
                config.insert(k.clone(), v.clone());
            }
        }

        let mut info = Map::new();
        info.insert("config".into(), Value::Map(config));
        info.insert("id".into(), Value::from(id.without_app()));
        info.insert("name".into(), Value::from(name.as_str()));
        info.insert("type".into(), Value::from(service_type.as_str()));
        info.insert("description".into(), Value::from(text("description")?));
        info.insert("docs".into(), Value::from(text("docs")?));
        info.insert("app_id".into(), Value::from(app_id.as_str()));
        info.insert("service_schema".into(), service.get("service_schema").cloned().unwrap_or(Value::Nil));
        let size = hypha_core::msgpack::encoded_map_len(&info);
        if size > MAX_RECORD_BYTES {
            return Err(ManagerError::Value(format!(
                "Service info too large: {size} bytes (at most {MAX_RECORD_BYTES})"
            )));
        }
        Ok(ServiceRecord {
            workspace: id.workspace().to_owned(),
            client_id: id.client_id().to_owned(),
            service: id.service().to_owned(),
            app_id,
            name,
            service_type,
            visibility,
            authorized_workspaces: typed.authorized_workspaces,
            singleton,
            dump: Dump::new(info, size),
            size,
        })
    }

    /// The dump sent to clients (§5.5), decoded: records keep it msgpack-encoded, which
    /// costs a fraction of the memory of a decoded map.
    pub fn info(&self) -> Map {
        self.dump.to_map()
    }

    /// `{ws}/{cid}:{svc}`.
    pub fn full_id(&self) -> String {
        format!("{}/{}:{}", self.workspace, self.client_id, self.service)
    }

    /// `{ws}/{cid}`: where the provider is reached.
    pub fn provider(&self) -> String {
        format!("{}/{}", self.workspace, self.client_id)
    }

    /// Whether this is a client's `built-in` service (its "client record").
    pub fn is_builtin(&self) -> bool {
        self.service == BUILTIN_SERVICE_ID
    }

    /// `config.created_by` (the full user dump for a `built-in`).
    pub fn created_by(&self) -> Value {
        match self.info().swap_remove("config") {
            Some(Value::Map(mut config)) => config.swap_remove("created_by").unwrap_or(Value::Nil),
            _ => Value::Nil,
        }
    }

    /// How `user`, calling from workspace `ctx_ws`, may use this service (spec §5.4).
    pub fn access(&self, user: &UserInfo, ctx_ws: &str) -> Access {
        if self.visibility != Visibility::Protected || user.check(&self.workspace, Permission::Read) {
            return Access::Full;
        }
        if self.authorized_workspaces.as_ref().is_some_and(|a| a.iter().any(|w| w == ctx_ws)) {
            Access::Grantee
        } else {
            Access::Denied
        }
    }

    /// The dump as `access` may see it: a grantee does not see `authorized_workspaces`.
    pub fn view(&self, access: Access) -> Value {
        let mut info = self.info();
        if access == Access::Grantee {
            if let Some(Value::Map(c)) = info.get_mut("config") {
                c.shift_remove("authorized_workspaces");
            }
        }
        Value::Map(info)
    }

    /// The whole dump.
    pub fn to_value(&self) -> Value {
        Value::Map(self.info())
    }
}

/// A lookup pattern: `client` and `service` may be `*`; `app` `None` or `*` means any.
#[derive(Debug, Clone, Copy)]
pub struct Pattern<'a> {
    /// The workspace (never `*` here).
    pub workspace: &'a str,
    /// Client id or `*`.
    pub client: &'a str,
    /// Service id or `*`.
    pub service: &'a str,
    /// App id; `None` or `*` matches any.
    pub app: Option<&'a str>,
}

impl Pattern<'_> {
    /// Whether `r` matches.
    pub fn matches(&self, r: &ServiceRecord) -> bool {
        r.workspace == self.workspace
            && (self.client == WILDCARD || r.client_id == self.client)
            && (self.service == WILDCARD || r.service == self.service)
            && self.app.is_none_or(|a| a == WILDCARD || r.app_id == a)
    }
}

type Workspace = IndexMap<String, ServiceRecord>;

fn key(cid: &str, svc: &str) -> String {
    format!("{cid}:{svc}")
}

/// The suffix of the client ids whose load is measured (upstream's "`__rlb`" clients, spec
/// §5.3 `min_load`); every other client has load 0.
pub const LOAD_BALANCED_SUFFIX: &str = "__rlb";

/// The registry. See the module docs.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<HashMap<String, Workspace>>,
    /// The load meters of the connected load-balanced clients, by `{ws}/{cid}`.
    loads: Mutex<HashMap<String, LoadMeter>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Workspace>> {
        // A panic while holding the lock leaves whole maps behind (each operation is one
        // map operation); carrying on with them is safe.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `record`, replacing the record of the same `{ws}/{cid}:{svc}` (which is
    /// returned). A replaced record keeps its place in listings.
    pub fn upsert(&self, record: ServiceRecord) -> Option<ServiceRecord> {
        let mut all = self.lock();
        let ws = all.entry(record.workspace.clone()).or_default();
        ws.insert(key(&record.client_id, &record.service), record)
    }

    /// Removes `{ws}/{cid}:{svc}`.
    pub fn remove(&self, ws: &str, cid: &str, svc: &str) -> Option<ServiceRecord> {
        let mut all = self.lock();
        let removed = all.get_mut(ws).and_then(|w| w.shift_remove(&key(cid, svc)));
        if all.get(ws).is_some_and(IndexMap::is_empty) {
            all.remove(ws);
        }
        removed
    }

    fn loads(&self) -> MutexGuard<'_, HashMap<String, LoadMeter>> {
        self.loads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a frame sent by `{ws}/{cid}` at `now` towards its load, if it is a
    /// load-balanced client (its id ends with [`LOAD_BALANCED_SUFFIX`]).
    pub fn record_frame(&self, ws: &str, cid: &str, now: std::time::Instant) {
        if cid.ends_with(LOAD_BALANCED_SUFFIX) {
            self.loads().entry(format!("{ws}/{cid}")).or_insert_with(|| LoadMeter::new(now)).record(now);
        }
    }

    /// The load of `{ws}/{cid}`: frames per minute for a load-balanced client, else 0.
    pub fn load(&self, ws: &str, cid: &str, now: std::time::Instant) -> f64 {
        if !cid.ends_with(LOAD_BALANCED_SUFFIX) {
            return 0.0;
        }
        self.loads().get(&format!("{ws}/{cid}")).map_or(0.0, |m| m.per_minute(now))
    }

    /// Removes every record of client `{ws}/{cid}` (spec §8 step 3); returns them.
    pub fn remove_client(&self, ws: &str, cid: &str) -> Vec<ServiceRecord> {
        if cid.ends_with(LOAD_BALANCED_SUFFIX) {
            self.loads().remove(&format!("{ws}/{cid}"));
        }
        let mut all = self.lock();
        let Some(w) = all.get_mut(ws) else { return Vec::new() };
        let mut removed = Vec::new();
        w.retain(|_, r| {
            if r.client_id == cid {
                removed.push(r.clone());
                false
            } else {
                true
            }
        });
        if w.is_empty() {
            all.remove(ws);
        }
        removed
    }

    /// Removes every record of workspace `ws`; returns how many there were.
    pub fn remove_workspace(&self, ws: &str) -> usize {
        self.lock().remove(ws).map_or(0, |w| w.len())
    }

    /// The `built-in` record of `{ws}/{cid}`: present iff the client is "registered".
    pub fn builtin(&self, ws: &str, cid: &str) -> Option<ServiceRecord> {
        self.lock().get(ws).and_then(|w| w.get(&key(cid, BUILTIN_SERVICE_ID)).cloned())
    }

    /// The record `{ws}/{cid}:{svc}`.
    pub fn get(&self, ws: &str, cid: &str, svc: &str) -> Option<ServiceRecord> {
        self.lock().get(ws).and_then(|w| w.get(&key(cid, svc)).cloned())
    }

    /// How many services other than `built-in` `{ws}/{cid}` has.
    pub fn client_service_count(&self, ws: &str, cid: &str) -> usize {
        self.lock()
            .get(ws)
            .map_or(0, |w| w.values().filter(|r| r.client_id == cid && !r.is_builtin()).count())
    }

    /// The total size of the records of `{ws}/{cid}`.
    pub fn client_bytes(&self, ws: &str, cid: &str) -> usize {
        self.lock().get(ws).map_or(0, |w| w.values().filter(|r| r.client_id == cid).map(|r| r.size).sum())
    }

    /// The records matching `p`, in registration order.
    pub fn find(&self, p: &Pattern<'_>) -> Vec<ServiceRecord> {
        self.lock()
            .get(p.workspace)
            .map_or_else(Vec::new, |w| w.values().filter(|r| p.matches(r)).cloned().collect())
    }

    /// Every record of `ws`, in registration order.
    pub fn in_workspace(&self, ws: &str) -> Vec<ServiceRecord> {
        self.lock().get(ws).map_or_else(Vec::new, |w| w.values().cloned().collect())
    }

    /// Every record, workspaces sorted by id.
    pub fn all(&self) -> Vec<ServiceRecord> {
        let all = self.lock();
        let mut names: Vec<&String> = all.keys().collect();
        names.sort();
        names.into_iter().flat_map(|n| all[n].values().cloned()).collect()
    }

    /// The `built-in` records of `ws`: its registered clients.
    pub fn clients(&self, ws: &str) -> Vec<ServiceRecord> {
        self.lock()
            .get(ws)
            .map_or_else(Vec::new, |w| w.values().filter(|r| r.is_builtin()).cloned().collect())
    }

    /// Number of records, all workspaces.
    pub fn len(&self) -> usize {
        self.lock().values().map(IndexMap::len).sum()
    }

    /// Whether there are no records at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_core::map;

    fn service(id: &str, config: Map) -> Map {
        map! {"id" => id, "name" => "N", "extra" => 1, "config" => config,
        "service_schema" => map! {"f" => map! {"type" => "function"}}}
    }

    fn rec(ws: &str, cid: &str, svc: &str, config: Map) -> ServiceRecord {
        let id = ServiceId::for_registration(&format!("{cid}:{svc}"), ws).unwrap();
        ServiceRecord::from_registration(&service(&id.to_string(), config), &id, map! {"id" => "u"}.into())
            .unwrap()
    }

    fn keys(m: &Map) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    #[test]
    fn records_have_upstreams_shape() {
        let r = rec("W", "c", "s", map! {"visibility" => "public", "extra_key" => 1, "workspace" => "evil"});
        let info = r.info();
        assert_eq!(
            keys(&info),
            ["config", "id", "name", "type", "description", "docs", "app_id", "service_schema"]
        );
        let config = info["config"].as_map().unwrap();
        assert_eq!(
            keys(config),
            [
                "visibility",
                "require_context",
                "workspace",
                "flags",
                "singleton",
                "created_by",
                "service_embedding",
                "authorized_workspaces",
                "extra_key"
            ]
        );
        assert_eq!(config["workspace"], Value::from("W"));
        assert_eq!(config["require_context"], Value::Bool(false));
        assert_eq!(info["id"], Value::from("W/c:s"));
        assert_eq!(info["type"], Value::from("generic"));
        assert_eq!(info["app_id"], Value::from("*"));
        assert!(r.size > 100);
        assert!(matches!(&r.dump, Dump::Encoded(b) if b.len() == r.size), "kept encoded");
        assert_eq!(r.created_by(), Value::from(map! {"id" => "u"}));
        let huge = map! {"id" => "W/c:s", "docs" => "x".repeat(MAX_RECORD_BYTES)};
        let err = ServiceRecord::from_registration(&huge, &ServiceId::parse("W/c:s").unwrap(), Value::Nil);
        assert!(err.unwrap_err().to_string().contains("Service info too large"));
        // Default visibility is protected; bad ones are refused with the recommended text.
        assert_eq!(rec("W", "c", "s", Map::new()).visibility, Visibility::Protected);
        let id = ServiceId::parse("W/c:s").unwrap();
        let err = ServiceRecord::from_registration(
            &service("W/c:s", map! {"visibility" => "private"}),
            &id,
            Value::Nil,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "ValueError: Invalid visibility: private");
        let err = ServiceRecord::from_registration(
            &service(
                "W/c:s",
                map! {"visibility" => "public", "authorized_workspaces" => vec![Value::from("B")]},
            ),
            &id,
            Value::Nil,
        )
        .unwrap_err();
        assert!(err.to_string().contains("authorized_workspaces can only be set"), "{err}");
    }

    #[test]
    fn records_holding_decoded_values_are_kept_as_they_came() {
        // A client may put a `_rtype` object (here a set) in its schema: msgpack cannot
        // carry it as such, so that record stays decoded and still reads back whole.
        let set = Value::Set(vec![Value::from(1), Value::from(2)]);
        let id = ServiceId::for_registration("c:s", "W").unwrap();
        let svc = map! {"id" => id.to_string(), "service_schema" => map! {"tags" => set.clone()}};
        let r = ServiceRecord::from_registration(&svc, &id, map! {"id" => "u"}.into()).unwrap();
        assert!(matches!(r.dump, Dump::Decoded(_)));
        assert_eq!(r.info()["service_schema"].as_map().unwrap()["tags"], set);
        assert_eq!(r.created_by(), Value::from(map! {"id" => "u"}));
    }

    #[test]
    fn access_follows_the_visibility_matrix() {
        let mut same = UserInfo::new("same");
        same.scope.workspaces.insert("A".into(), Permission::ReadWrite);
        let other = UserInfo::new("other");
        let auth = rec("A", "p", "auth", map! {"authorized_workspaces" => vec![Value::from("B")]});
        assert_eq!(auth.access(&same, "A"), Access::Full);
        assert_eq!(auth.access(&other, "B"), Access::Grantee);
        assert_eq!(auth.access(&other, "C"), Access::Denied);
        let view = auth.view(Access::Grantee);
        assert!(!view.as_map().unwrap()["config"].as_map().unwrap().contains_key("authorized_workspaces"));
        let public = rec("A", "p", "pub", map! {"visibility" => "public"});
        let unlisted = rec("A", "p", "unl", map! {"visibility" => "unlisted"});
        assert_eq!(public.access(&other, "C"), Access::Full);
        assert_eq!(unlisted.access(&other, "C"), Access::Full);
        assert_eq!(rec("A", "p", "prot", Map::new()).access(&other, "C"), Access::Denied);
    }

    #[test]
    fn upsert_replaces_and_clients_are_removed_whole() {
        let reg = Registry::new();
        assert!(reg.upsert(rec("W", "c", "built-in", Map::new())).is_none());
        assert!(reg.upsert(rec("W", "c", "a", Map::new())).is_none());
        assert!(reg.upsert(rec("W", "d", "a", Map::new())).is_none());
        let old = reg.upsert(rec("W", "c", "a", map! {"visibility" => "public"})).unwrap();
        assert_eq!(old.visibility, Visibility::Protected);
        assert_eq!(reg.len(), 3);
        // The replaced record kept its place.
        let ids: Vec<String> = reg.in_workspace("W").iter().map(ServiceRecord::full_id).collect();
        assert_eq!(ids, ["W/c:built-in", "W/c:a", "W/d:a"]);
        assert!(reg.builtin("W", "c").is_some() && reg.builtin("W", "d").is_none());
        assert_eq!(reg.client_service_count("W", "c"), 1);
        let both: usize = reg.in_workspace("W").iter().filter(|r| r.client_id == "c").map(|r| r.size).sum();
        assert_eq!(reg.client_bytes("W", "c"), both);
        let any_a = Pattern { workspace: "W", client: "*", service: "a", app: None };
        assert_eq!(reg.find(&any_a).len(), 2);
        let other_app = Pattern { app: Some("x"), ..any_a };
        assert!(reg.find(&other_app).is_empty());
        assert_eq!(reg.remove_client("W", "c").len(), 2);
        assert_eq!(reg.clients("W").len(), 0);
        assert!(reg.remove("W", "d", "a").is_some());
        assert!(reg.is_empty());
    }
}
