//! The workspaces table, as much of it as the websocket handshake needs (server spec §2.1
//! step 5, §4.4): which workspaces exist and who owns them.
//!
//! Rules implemented here:
//! * `public`, `ws-anonymous` and `ws-user-root` always exist (upstream never deletes them);
//! * a user's personal workspace `ws-user-{id}` is created the first time that user
//!   connects to it; anonymous users' personal workspaces are *transient* (removed when
//!   their last client leaves, as upstream unloads them), everyone else's persist;
//! * any other workspace must already exist, otherwise the handshake fails with
//!   `Workspace {ws} does not exist or is not accessible`.
//!
//! The workspace manager (`create_workspace`, `delete_workspace`, `get_workspace_info`,
//! environment variables, bookmarks, service types) reads and edits the same records.

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use hypha_core::auth::{self, UserInfo};
use hypha_core::value::{Map, Value};

/// Where a workspace is in its life (`status` of the WorkspaceInfo dump, spec §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspaceStatus {
    /// Ready: `{"ready": true, "errors": null}`.
    Ready,
    /// Ready, dumped as upstream dumps anonymous workspaces: `{"ready": true}`.
    ReadyBare,
    /// Being prepared: `{"ready": false, "status": "loading"}` (what `create_workspace`
    /// returns).
    Loading,
    /// Unloaded: `null` (the dump `workspace_unloaded` carries).
    Unloaded,
}

impl WorkspaceStatus {
    /// The `status` value of the dump.
    pub fn to_value(self) -> Value {
        let mut m = Map::new();
        match self {
            WorkspaceStatus::Unloaded => return Value::Nil,
            WorkspaceStatus::Ready => {
                m.insert("ready".into(), Value::Bool(true));
                m.insert("errors".into(), Value::Nil);
            }
            WorkspaceStatus::ReadyBare => {
                m.insert("ready".into(), Value::Bool(true));
            }
            WorkspaceStatus::Loading => {
                m.insert("ready".into(), Value::Bool(false));
                m.insert("status".into(), Value::from("loading"));
            }
        }
        Value::Map(m)
    }
}

/// What the server knows about one workspace: upstream's `WorkspaceInfo`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkspaceRecord {
    /// The workspace id.
    pub id: String,
    /// Display name (usually the id).
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// `false` for workspaces removed with their last client (anonymous users' own ones,
    /// and created ones unless asked otherwise).
    pub persistent: bool,
    /// User ids or emails that get `a` on it when they connect (`Authenticated::admit`)
    /// and may mint tokens for it.
    pub owners: Vec<String>,
    /// Informational (upstream's storage layers use it).
    pub read_only: bool,
    /// `icon`, `covers`, `docs`: kept as given.
    pub icon: Value,
    /// See `icon`.
    pub covers: Value,
    /// See `icon`.
    pub docs: Value,
    /// Registered service types, by id (`register_service_type`).
    pub service_types: Map,
    /// Free-form config; the manager keeps `environs` and `bookmarks` here.
    pub config: Map,
    /// Its status.
    pub status: WorkspaceStatus,
}

impl WorkspaceRecord {
    /// A persistent workspace owned by `owners`, named after its id.
    pub fn new(id: impl Into<String>, owners: Vec<String>) -> Self {
        let id = id.into();
        WorkspaceRecord {
            name: id.clone(),
            id,
            description: None,
            persistent: true,
            owners,
            read_only: false,
            icon: Value::Nil,
            covers: Value::Nil,
            docs: Value::Nil,
            service_types: Map::new(),
            config: Map::new(),
            status: WorkspaceStatus::Ready,
        }
    }

    /// The personal workspace of `user`: anonymous users' are transient, read-only and
    /// owned by the workspace id (as upstream dumps them); everyone else's persist.
    pub fn personal(user: &UserInfo) -> Self {
        let id = user.personal_workspace();
        if user.is_anonymous {
            WorkspaceRecord {
                description: Some("Anonymous workspace".into()),
                persistent: false,
                read_only: true,
                status: WorkspaceStatus::ReadyBare,
                ..WorkspaceRecord::new(id.clone(), vec![id])
            }
        } else {
            WorkspaceRecord {
                description: Some(format!("Workspace for user {}", user.id)),
                ..WorkspaceRecord::new(id, vec![user.id.clone()])
            }
        }
    }

    /// The WorkspaceInfo dump, keys in upstream's order (spec §4.4).
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), Value::from("workspace"));
        m.insert("id".into(), Value::from(self.id.as_str()));
        m.insert("name".into(), Value::from(self.name.as_str()));
        m.insert("description".into(), Value::from(self.description.clone()));
        m.insert("persistent".into(), Value::Bool(self.persistent));
        m.insert("owners".into(), Value::List(self.owners.iter().map(|o| Value::from(o.as_str())).collect()));
        m.insert("read_only".into(), Value::Bool(self.read_only));
        m.insert("icon".into(), self.icon.clone());
        m.insert("covers".into(), self.covers.clone());
        m.insert("docs".into(), self.docs.clone());
        m.insert("service_types".into(), Value::Map(self.service_types.clone()));
        m.insert("config".into(), Value::Map(self.config.clone()));
        m.insert("status".into(), self.status.to_value());
        Value::Map(m)
    }
}

/// The table: workspace id -> record.
#[derive(Debug)]
pub struct Workspaces {
    table: DashMap<String, WorkspaceRecord>,
}

impl Default for Workspaces {
    fn default() -> Self {
        Self::new()
    }
}

impl Workspaces {
    /// A table with the built-in workspaces (`public`, `ws-anonymous`, `ws-user-root`),
    /// all owned by `root`.
    pub fn new() -> Self {
        let table = DashMap::new();
        let root = || vec![auth::ROOT_USER_ID.to_owned()];
        let public = WorkspaceRecord {
            description: Some("Public workspace".into()),
            read_only: true,
            ..WorkspaceRecord::new(auth::PUBLIC_WORKSPACE, root())
        };
        let anonymous = WorkspaceRecord {
            name: "Anonymous Workspace".into(),
            description: Some("Shared workspace for anonymous users".into()),
            read_only: true,
            ..WorkspaceRecord::new(auth::ANONYMOUS_WORKSPACE, root())
        };
        let root_ws = WorkspaceRecord {
            description: Some(format!("Workspace for user {}", auth::ROOT_USER_ID)),
            ..WorkspaceRecord::new(auth::personal_workspace(auth::ROOT_USER_ID), root())
        };
        for record in [public, anonymous, root_ws] {
            table.insert(record.id.clone(), record);
        }
        Workspaces { table }
    }

    /// The record of `id`, if it exists.
    pub fn get(&self, id: &str) -> Option<WorkspaceRecord> {
        self.table.get(id).map(|r| r.clone())
    }

    /// Whether `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.table.contains_key(id)
    }

    /// Inserts `record` unless its workspace exists; returns the record now in the table.
    pub fn get_or_create(&self, record: WorkspaceRecord) -> WorkspaceRecord {
        match self.table.entry(record.id.clone()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => e.insert(record).clone(),
        }
    }

    /// Inserts `record`, replacing any workspace of the same id.
    pub fn put(&self, record: WorkspaceRecord) {
        self.table.insert(record.id.clone(), record);
    }

    /// Applies `f` to the record of `id`; `None` if there is no such workspace.
    pub fn update<R>(&self, id: &str, f: impl FnOnce(&mut WorkspaceRecord) -> R) -> Option<R> {
        self.table.get_mut(id).map(|mut r| f(&mut r))
    }

    /// Removes `id` (whatever its kind); returns the record it had.
    pub fn remove(&self, id: &str) -> Option<WorkspaceRecord> {
        self.table.remove(id).map(|(_, r)| r)
    }

    /// Every workspace, sorted by id (a stable order for listings).
    pub fn list(&self) -> Vec<WorkspaceRecord> {
        let mut all: Vec<WorkspaceRecord> = self.table.iter().map(|r| r.value().clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Removes `id` if it is transient (an anonymous user's workspace whose last client
    /// left). Returns whether it was removed.
    pub fn remove_transient(&self, id: &str) -> bool {
        self.table.remove_if(id, |_, r| !r.persistent).is_some()
    }

    /// Number of workspaces.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty (never, with the built-ins).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_exist_and_personal_ones_are_created_once() {
        let w = Workspaces::new();
        assert!(w.contains("public") && w.contains("ws-anonymous") && w.contains("ws-user-root"));
        assert_eq!(w.get("public").unwrap().owners, ["root"]);
        assert!(w.get("nonexistent").is_none());

        let alice = UserInfo::new("alice");
        let rec = w.get_or_create(WorkspaceRecord::personal(&alice));
        assert_eq!(
            (rec.id.as_str(), rec.owners.as_slice(), rec.persistent),
            ("ws-user-alice", &["alice".to_owned()][..], true)
        );
        assert_eq!(rec.description.as_deref(), Some("Workspace for user alice"));
        // A second create keeps the first record.
        let other = WorkspaceRecord::new("ws-user-alice", vec!["mallory".into()]);
        assert_eq!(w.get_or_create(other).owners, ["alice"]);
        // Persistent: not removed when its clients leave.
        assert!(!w.remove_transient("ws-user-alice"));
        assert!(!w.remove_transient("public"));
        assert_eq!(w.len(), 4);
    }

    #[test]
    fn anonymous_workspaces_are_transient() {
        let w = Workspaces::new();
        let anon = auth::anonymous_user(0.0);
        let rec = w.get_or_create(WorkspaceRecord::personal(&anon));
        assert!(!rec.persistent && rec.read_only);
        assert_eq!(rec.owners, [anon.personal_workspace()]);
        let dump = rec.to_value();
        let dump = dump.as_map().unwrap();
        let keys: Vec<&str> = dump.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "type",
                "id",
                "name",
                "description",
                "persistent",
                "owners",
                "read_only",
                "icon",
                "covers",
                "docs",
                "service_types",
                "config",
                "status"
            ]
        );
        assert_eq!(dump["status"], WorkspaceStatus::ReadyBare.to_value());
        assert!(w.contains(&anon.personal_workspace()));
        assert!(w.remove_transient(&anon.personal_workspace()));
        assert!(!w.contains(&anon.personal_workspace()));
    }
}
