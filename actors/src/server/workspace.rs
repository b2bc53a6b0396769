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
//! The workspace manager (`create_workspace`, `delete_workspace`, info records, events)
//! builds on this table later.

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use hypha_core::auth::{self, UserInfo};

/// What the server knows about one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    /// The workspace id.
    pub id: String,
    /// User ids or emails that get `a` on it when they connect (`Authenticated::admit`).
    pub owners: Vec<String>,
    /// `false` for anonymous users' throw-away workspaces, removed with their last client.
    pub persistent: bool,
}

impl WorkspaceRecord {
    /// A persistent workspace owned by `owners`.
    pub fn new(id: impl Into<String>, owners: Vec<String>) -> Self {
        WorkspaceRecord { id: id.into(), owners, persistent: true }
    }

    /// The personal workspace of `user` (transient for anonymous users).
    pub fn personal(user: &UserInfo) -> Self {
        WorkspaceRecord {
            id: user.personal_workspace(),
            owners: vec![user.id.clone()],
            persistent: !user.is_anonymous,
        }
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
        for id in
            [auth::PUBLIC_WORKSPACE, auth::ANONYMOUS_WORKSPACE, &auth::personal_workspace(auth::ROOT_USER_ID)]
        {
            table.insert(id.to_owned(), WorkspaceRecord::new(id, vec![auth::ROOT_USER_ID.to_owned()]));
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
        assert_eq!(rec, WorkspaceRecord::new("ws-user-alice", vec!["alice".into()]));
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
        assert!(!rec.persistent);
        assert!(w.contains(&anon.personal_workspace()));
        assert!(w.remove_transient(&anon.personal_workspace()));
        assert!(!w.contains(&anon.personal_workspace()));
    }
}
