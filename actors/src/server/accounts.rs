//! Local user accounts: the identity provider behind the login page (issue 5; server spec
//! §6.5).
//!
//! Upstream logs users in through a hosted Auth0 tenant. We keep accounts ourselves, in an
//! embedded SQLite database (`{data_dir}/accounts.sqlite3`, created on first use; the
//! `bundled` SQLite, so no system library is needed), with argon2id password hashes.
//!
//! * **Passwords** are hashed with argon2id (RFC 9106), a fresh 16-byte random salt per
//!   hash, stored as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`), so the
//!   parameters travel with each hash and can be raised later without breaking old ones.
//!   The defaults, [`HASH_MEMORY_KIB`] = 19 MiB, [`HASH_ITERATIONS`] = 2, one lane, are
//!   OWASP's recommended argon2id minimum; a check costs ~20-50 ms of one core.
//! * **Emails** are the login names: trimmed and lower-cased (as upstream's local auth
//!   does), unique. An unknown email and a wrong password give the same error, and an
//!   unknown email still costs one hash check, so neither the answer nor its timing tells
//!   whether an account exists.
//! * **SQL** is parameterized only (no text is ever spliced into a statement).
//!
//! ## Threads
//!
//! SQLite calls block and argon2 burns CPU, so neither may run on an async worker (a
//! connection actor or the login service would stall every socket it serves). [`Accounts`]
//! (the async face) runs each call on the runtime's blocking pool with `web::block`. We
//! chose that over a `SyncArbiter` actor because the expensive part, hashing, must run in
//! parallel (a single sync actor would serialize every login behind one core), while the
//! database part is microseconds under a mutex. What bounds the cost is a semaphore:
//! at most [`MAX_CONCURRENT_HASHES`] hashes run at once (each holds 19 MiB), others wait up
//! to [`HASH_QUEUE_WAIT`] and then fail with [`AccountError::Busy`], so a flood of login
//! attempts cannot exhaust memory or the blocking pool. [`AccountStore`] (the blocking
//! face) is what the `hypha-server user ...` commands use directly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::Semaphore;

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "accounts.sqlite3";
/// argon2id memory cost in KiB (19 MiB, OWASP's minimum for argon2id).
pub const HASH_MEMORY_KIB: u32 = 19 * 1024;
/// argon2id passes over the memory.
pub const HASH_ITERATIONS: u32 = 2;
/// argon2id lanes.
pub const HASH_LANES: u32 = 1;
/// Shortest password accepted (upstream's local auth: 8).
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted, in bytes (argon2 takes any length; this bounds the work a
/// request can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest email accepted (RFC 5321's path limit).
pub const MAX_EMAIL_CHARS: usize = 254;
/// Longest display name accepted.
pub const MAX_NAME_CHARS: usize = 200;
/// Password hashes running at once (see the module docs).
pub const MAX_CONCURRENT_HASHES: usize = 4;
/// How long a password check waits for a hashing slot before [`AccountError::Busy`].
pub const HASH_QUEUE_WAIT: Duration = Duration::from_secs(10);
/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// How long a statement waits for another process's write lock (the CLI and the server
/// may share the file).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an account operation failed. The texts are what users see (in the page, as remote
/// errors, on the command line); none of them reveals whether another account exists,
/// except [`AccountError::EmailTaken`] on sign-up, which upstream reports too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Sign-up with an email that already has an account.
    #[error("Email already registered")]
    EmailTaken,
    /// Unknown email or wrong password (deliberately one error).
    #[error("Invalid email or password")]
    InvalidCredentials,
    /// The email is not an address.
    #[error("Invalid email address")]
    InvalidEmail,
    /// The password is too short.
    #[error("Password must be at least {MIN_PASSWORD_CHARS} characters")]
    PasswordTooShort,
    /// The password is too long.
    #[error("Password must be at most {MAX_PASSWORD_BYTES} bytes")]
    PasswordTooLong,
    /// The display name is too long or holds control characters.
    #[error("Invalid name: at most {MAX_NAME_CHARS} characters, no control characters")]
    InvalidName,
    /// Too many password checks are in progress.
    #[error("Too many logins in progress, please retry")]
    Busy,
    /// The database cannot be opened (path and reason).
    #[error("cannot open the account database {path}: {reason}")]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A database statement failed.
    #[error("account database error: {0}")]
    Database(String),
    /// Hashing failed (a bug or an exhausted RNG, not bad input).
    #[error("password hashing failed: {0}")]
    Hash(String),
}

impl From<rusqlite::Error> for AccountError {
    fn from(e: rusqlite::Error) -> Self {
        AccountError::Database(e.to_string())
    }
}

/// A stored account (never its password hash).
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// The user id (`sub` of its tokens): a readable random id like upstream's user ids.
    pub id: String,
    /// The login email, lower-cased.
    pub email: String,
    /// The display name (the email's local part unless given).
    pub name: String,
    /// Roles put into its tokens (`admin` for administrators).
    pub roles: Vec<String>,
    /// Unix seconds.
    pub created_at: f64,
}

impl Account {
    /// `ws-user-{id}`, the account's own workspace.
    pub fn workspace(&self) -> String {
        hypha_core::auth::personal_workspace(&self.id)
    }

    /// Whether the account has the `admin` role.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == hypha_core::auth::ADMIN_ROLE)
    }
}

/// What [`AccountStore::create`] needs.
#[derive(Clone, PartialEq)]
pub struct NewAccount {
    /// The login email (normalized on creation).
    pub email: String,
    /// The password in clear (hashed on creation, never stored).
    pub password: String,
    /// The display name.
    pub name: Option<String>,
    /// Gives the account the `admin` role.
    pub admin: bool,
}

impl std::fmt::Debug for NewAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewAccount")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("name", &self.name)
            .field("admin", &self.admin)
            .finish()
    }
}

/// Trims and lower-cases an email and checks it looks like an address: one `@` with text
/// on both sides, no whitespace or control characters, at most [`MAX_EMAIL_CHARS`].
pub fn normalize_email(email: &str) -> Result<String, AccountError> {
    let e = email.trim().to_lowercase();
    let ok = e.chars().count() <= MAX_EMAIL_CHARS
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(e.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if ok {
        Ok(e)
    } else {
        Err(AccountError::InvalidEmail)
    }
}

fn check_password(password: &str) -> Result<(), AccountError> {
    if password.len() > MAX_PASSWORD_BYTES {
        Err(AccountError::PasswordTooLong)
    } else if password.chars().count() < MIN_PASSWORD_CHARS {
        Err(AccountError::PasswordTooShort)
    } else {
        Ok(())
    }
}

fn check_name(name: &str) -> Result<String, AccountError> {
    let n = name.trim();
    if n.chars().count() > MAX_NAME_CHARS || n.chars().any(char::is_control) {
        Err(AccountError::InvalidName)
    } else {
        Ok(n.to_owned())
    }
}

fn now() -> f64 {
    hypha_core::auth::unix_seconds(SystemTime::now())
}

/// The hasher with this module's parameters.
fn hasher() -> Result<Argon2<'static>, AccountError> {
    let params = Params::new(HASH_MEMORY_KIB, HASH_ITERATIONS, HASH_LANES, None)
        .map_err(|e| AccountError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// A PHC argon2id hash of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    let hash = hasher()?.hash_password(password.as_bytes()).map_err(|e| AccountError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `hash` (its own parameters are used).
pub fn password_matches(password: &str, hash: &str) -> bool {
    Argon2::default().verify_password(password.as_bytes(), hash).is_ok()
}

/// The blocking account store: one SQLite connection behind a mutex. Every method blocks
/// (use [`Accounts`] from async code).
#[derive(Debug)]
pub struct AccountStore {
    conn: Mutex<Connection>,
    /// Where it lives (`None`: in memory).
    path: Option<PathBuf>,
    /// A hash of a random password, checked when an email is unknown so that answer takes
    /// as long as a wrong password.
    decoy: OnceLock<String>,
}

impl AccountStore {
    /// Opens (creating on first use) `{dir}/accounts.sqlite3`; `dir` is created too, and
    /// on Unix made private to the server's user (0700, the file 0600) when we create it.
    pub fn open(dir: &Path) -> Result<Self, AccountError> {
        let open_err = |path: &Path, reason: String| AccountError::Open { path: path.to_owned(), reason };
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| open_err(dir, e.to_string()))?;
        let path = dir.join(DATABASE_FILE);
        let new_file = !path.exists();
        let conn = Connection::open(&path).map_err(|e| open_err(&path, e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if created {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
            if new_file {
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
        }
        let _ = (created, new_file);
        Self::init(conn, Some(path.clone())).map_err(|e| open_err(&path, e.to_string()))
    }

    /// A store that lives in memory and dies with the process (tests, embedders that keep
    /// no state).
    pub fn in_memory() -> Result<Self, AccountError> {
        let conn = Connection::open_in_memory()
            .map_err(|e| AccountError::Open { path: PathBuf::from(":memory:"), reason: e.to_string() })?;
        Self::init(conn, None)
    }

    fn init(conn: Connection, path: Option<PathBuf>) -> Result<Self, AccountError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        if path.is_some() {
            // WAL lets `hypha-server user add` write while the server reads.
            conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(AccountError::Database(format!(
                "the database has schema version {version}, newer than this server's {SCHEMA_VERSION}"
            )));
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS users (
                id TEXT PRIMARY KEY NOT NULL,
                email TEXT NOT NULL UNIQUE,
                name TEXT NOT NULL,
                password_hash TEXT NOT NULL,
                roles TEXT NOT NULL DEFAULT '[]',
                created_at REAL NOT NULL
            );
            PRAGMA user_version = 1;",
        )?;
        Ok(AccountStore { conn: Mutex::new(conn), path, decoy: OnceLock::new() })
    }

    /// The database file (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn with<R>(&self, f: impl FnOnce(&Connection) -> Result<R, AccountError>) -> Result<R, AccountError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn)
    }

    /// Validates `new`, hashes its password and stores it under a new readable id.
    pub fn create(&self, new: &NewAccount) -> Result<Account, AccountError> {
        let email = normalize_email(&new.email)?;
        check_password(&new.password)?;
        let name = match new.name.as_deref().map(check_name).transpose()? {
            Some(n) if !n.is_empty() => n,
            _ => email.split('@').next().unwrap_or_default().to_owned(),
        };
        if self.get_by_email(&email)?.is_some() {
            return Err(AccountError::EmailTaken);
        }
        let hash = hash_password(&new.password)?;
        let roles: Vec<String> =
            if new.admin { vec![hypha_core::auth::ADMIN_ROLE.to_owned()] } else { Vec::new() };
        let roles_json = serde_json::to_string(&roles).map_err(|e| AccountError::Database(e.to_string()))?;
        let created_at = now();
        self.with(|c| {
            // A readable id can collide (1 in ~10^11): draw again, a few times.
            for _ in 0..5 {
                let id = hypha_core::auth::readable_id();
                let inserted = c.execute(
                    "INSERT INTO users (id, email, name, password_hash, roles, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    params![id, email, name, hash, roles_json, created_at],
                )?;
                if inserted == 1 {
                    return Ok(Account {
                        id,
                        email: email.clone(),
                        name: name.clone(),
                        roles: roles.clone(),
                        created_at,
                    });
                }
                let taken: bool =
                    c.query_row("SELECT EXISTS(SELECT 1 FROM users WHERE email = ?1)", [&email], |r| {
                        r.get(0)
                    })?;
                if taken {
                    return Err(AccountError::EmailTaken);
                }
            }
            Err(AccountError::Database("could not draw a free user id".into()))
        })
    }

    /// The account of `email` if `password` is its password; one error for an unknown
    /// email and a wrong password, and about the same time for both.
    pub fn verify_password(&self, email: &str, password: &str) -> Result<Account, AccountError> {
        let Ok(email) = normalize_email(email) else {
            return Err(AccountError::InvalidCredentials);
        };
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AccountError::InvalidCredentials);
        }
        let found = self.with(|c| {
            c.query_row(
                "SELECT id, email, name, roles, created_at, password_hash FROM users WHERE email = ?1",
                [&email],
                |r| Ok((row_account(r)?, r.get::<_, String>(5)?)),
            )
            .optional()
            .map_err(AccountError::from)
        })?;
        match found {
            Some((account, hash)) if password_matches(password, &hash) => Ok(account),
            Some(_) => Err(AccountError::InvalidCredentials),
            None => {
                let decoy = match self.decoy.get() {
                    Some(d) => d.clone(),
                    None => {
                        let d = hash_password(&hypha_core::ids::random_id())?;
                        self.decoy.get_or_init(|| d).clone()
                    }
                };
                let _ = password_matches(password, &decoy);
                Err(AccountError::InvalidCredentials)
            }
        }
    }

    /// The account with id `id`.
    pub fn get_by_id(&self, id: &str) -> Result<Option<Account>, AccountError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, email, name, roles, created_at FROM users WHERE id = ?1",
                [id],
                row_account,
            )
            .optional()
            .map_err(AccountError::from)
        })
    }

    /// The account with `email` (normalized first).
    pub fn get_by_email(&self, email: &str) -> Result<Option<Account>, AccountError> {
        let Ok(email) = normalize_email(email) else { return Ok(None) };
        self.with(|c| {
            c.query_row(
                "SELECT id, email, name, roles, created_at FROM users WHERE email = ?1",
                [&email],
                row_account,
            )
            .optional()
            .map_err(AccountError::from)
        })
    }

    /// Every account, oldest first.
    pub fn list(&self) -> Result<Vec<Account>, AccountError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT id, email, name, roles, created_at FROM users ORDER BY created_at, id")?;
            let rows = stmt.query_map([], row_account)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(AccountError::from)
        })
    }

    /// How many accounts exist.
    pub fn count(&self) -> Result<u64, AccountError> {
        let n: i64 = self.with(|c| {
            c.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0)).map_err(AccountError::from)
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

fn row_account(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    let roles: String = r.get(3)?;
    Ok(Account {
        id: r.get(0)?,
        email: r.get(1)?,
        name: r.get(2)?,
        roles: serde_json::from_str(&roles).unwrap_or_default(),
        created_at: r.get(4)?,
    })
}

/// The async face of an [`AccountStore`] (see the module docs for the threading). Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Accounts {
    store: Arc<AccountStore>,
    hashing: Arc<Semaphore>,
}

impl Accounts {
    /// Wraps a store.
    pub fn new(store: AccountStore) -> Self {
        Accounts { store: Arc::new(store), hashing: Arc::new(Semaphore::new(MAX_CONCURRENT_HASHES)) }
    }

    /// The blocking store.
    pub fn store(&self) -> &Arc<AccountStore> {
        &self.store
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&AccountStore) -> Result<R, AccountError> + Send + 'static,
    ) -> Result<R, AccountError> {
        let store = self.store.clone();
        actix_web::web::block(move || f(&store))
            .await
            .map_err(|e| AccountError::Database(format!("blocking task failed: {e}")))?
    }

    /// A hashing slot, or [`AccountError::Busy`] after [`HASH_QUEUE_WAIT`].
    async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, AccountError> {
        match tokio::time::timeout(HASH_QUEUE_WAIT, self.hashing.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(AccountError::Busy),
        }
    }

    /// [`AccountStore::create`] off the async workers.
    pub async fn create(&self, new: NewAccount) -> Result<Account, AccountError> {
        // Cheap checks first, so bad input never waits for a hashing slot.
        normalize_email(&new.email)?;
        check_password(&new.password)?;
        if let Some(n) = &new.name {
            check_name(n)?;
        }
        let _permit = self.slot().await?;
        self.blocking(move |s| s.create(&new)).await
    }

    /// [`AccountStore::verify_password`] off the async workers.
    pub async fn verify_password(&self, email: String, password: String) -> Result<Account, AccountError> {
        let _permit = self.slot().await?;
        self.blocking(move |s| s.verify_password(&email, &password)).await
    }

    /// [`AccountStore::get_by_id`] off the async workers.
    pub async fn get_by_id(&self, id: String) -> Result<Option<Account>, AccountError> {
        self.blocking(move |s| s.get_by_id(&id)).await
    }

    /// [`AccountStore::get_by_email`] off the async workers.
    pub async fn get_by_email(&self, email: String) -> Result<Option<Account>, AccountError> {
        self.blocking(move |s| s.get_by_email(&email)).await
    }

    /// [`AccountStore::list`] off the async workers.
    pub async fn list(&self) -> Result<Vec<Account>, AccountError> {
        self.blocking(|s| s.list()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(email: &str, password: &str) -> NewAccount {
        NewAccount { email: email.into(), password: password.into(), name: None, admin: false }
    }

    #[test]
    fn accounts_are_created_found_and_checked() {
        let s = AccountStore::in_memory().unwrap();
        let a = s.create(&new("  Alice@Example.COM ", "correct horse")).unwrap();
        assert_eq!((a.email.as_str(), a.name.as_str()), ("alice@example.com", "alice"));
        assert_eq!(a.id.split('-').count(), 3, "readable id: {}", a.id);
        assert_eq!(a.workspace(), format!("ws-user-{}", a.id));
        assert!(a.roles.is_empty() && !a.is_admin());
        assert_eq!(s.verify_password("ALICE@example.com", "correct horse").unwrap(), a);
        assert_eq!(
            s.verify_password("alice@example.com", "wrong horse"),
            Err(AccountError::InvalidCredentials)
        );
        assert_eq!(
            s.verify_password("bob@example.com", "correct horse"),
            Err(AccountError::InvalidCredentials)
        );
        assert_eq!(s.verify_password("not an email", "correct horse"), Err(AccountError::InvalidCredentials));
        assert_eq!(s.create(&new("alice@example.com", "another one")), Err(AccountError::EmailTaken));
        assert_eq!(s.get_by_id(&a.id).unwrap(), Some(a.clone()));
        assert_eq!(s.get_by_email("alice@EXAMPLE.com").unwrap(), Some(a.clone()));
        assert_eq!(s.get_by_id("nobody").unwrap(), None);
        let admin = s
            .create(&NewAccount {
                name: Some("Root Admin".into()),
                admin: true,
                ..new("root@x.org", "12345678")
            })
            .unwrap();
        assert!(admin.is_admin() && admin.name == "Root Admin");
        assert_eq!(
            s.list().unwrap().iter().map(|a| a.email.as_str()).collect::<Vec<_>>(),
            ["alice@example.com", "root@x.org"]
        );
        assert_eq!(s.count().unwrap(), 2);
    }

    #[test]
    fn bad_input_is_refused_with_clear_errors() {
        let s = AccountStore::in_memory().unwrap();
        for bad in ["", "no-at", "@x", "x@", "a b@c", "a@b@c", "a\n@b"] {
            assert_eq!(s.create(&new(bad, "long enough")), Err(AccountError::InvalidEmail), "{bad:?}");
        }
        assert_eq!(s.create(&new("a@b", "short")), Err(AccountError::PasswordTooShort));
        assert_eq!(
            s.create(&new("a@b", &"x".repeat(MAX_PASSWORD_BYTES + 1))),
            Err(AccountError::PasswordTooLong)
        );
        let named = NewAccount { name: Some("bell\u{7}".into()), ..new("a@b", "long enough") };
        assert_eq!(s.create(&named), Err(AccountError::InvalidName));
        assert_eq!(s.count().unwrap(), 0);
    }

    #[test]
    fn sql_special_characters_are_plain_data() {
        let s = AccountStore::in_memory().unwrap();
        let name = "Robert'); DROP TABLE users;--";
        let email = "o'brien+%_\"x;--@example.com";
        let password = "' OR '1'='1' --";
        let a = s.create(&NewAccount { name: Some(name.into()), ..new(email, password) }).unwrap();
        assert_eq!((a.name.as_str(), a.email.as_str()), (name, email));
        assert_eq!(s.verify_password(email, password).unwrap().id, a.id);
        assert_eq!(s.verify_password("%@example.com", password), Err(AccountError::InvalidCredentials));
        assert_eq!(s.get_by_email("o'brien+%_\"x;--@example.com").unwrap().map(|a| a.id), Some(a.id));
        assert_eq!(s.get_by_email("%").unwrap(), None);
        assert_eq!(s.count().unwrap(), 1, "the table survived");
    }

    #[test]
    fn hashes_are_salted_argon2id_phc_strings() {
        let h1 = hash_password("same password").unwrap();
        let h2 = hash_password("same password").unwrap();
        assert!(h1.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h1}");
        assert_ne!(h1, h2, "a fresh salt per hash");
        assert!(password_matches("same password", &h1) && password_matches("same password", &h2));
        assert!(!password_matches("other password", &h1));
        assert!(!password_matches("same password", "not a hash"));
    }

    #[test]
    fn the_file_is_created_on_first_use_and_reopened() {
        let dir = std::env::temp_dir().join(format!("hypha-accounts-test-{}", hypha_core::ids::random_id()));
        let id = {
            let s = AccountStore::open(&dir.join("nested")).unwrap();
            assert!(s.path().is_some_and(|p| p.ends_with(DATABASE_FILE)));
            s.create(&new("keep@me.org", "persisted!")).unwrap().id
        };
        let s = AccountStore::open(&dir.join("nested")).unwrap();
        assert_eq!(s.verify_password("keep@me.org", "persisted!").unwrap().id, id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                std::fs::metadata(dir.join("nested").join(DATABASE_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the database is private: {mode:o}");
        }
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[actix_rt::test]
    async fn the_async_face_runs_off_the_workers() {
        let a = Accounts::new(AccountStore::in_memory().unwrap());
        let acc = a.create(new("x@y.z", "password1")).await.unwrap();
        assert_eq!(a.verify_password("x@y.z".into(), "password1".into()).await.unwrap(), acc);
        assert_eq!(a.create(new("bad", "password1")).await, Err(AccountError::InvalidEmail));
        assert_eq!(a.get_by_id(acc.id.clone()).await.unwrap(), Some(acc.clone()));
        assert_eq!(a.get_by_email("X@Y.Z".into()).await.unwrap(), Some(acc.clone()));
        assert_eq!(a.list().await.unwrap(), vec![acc]);
    }
}
