//! Local accounts and the login flow end to end (issue 5; server spec §1.3, §1.5, §6.5),
//! against a real server on an ephemeral port, over HTTP with awc, as the getting-started
//! guide's curl commands do it: `start` -> the page's sign-up and log-in endpoints ->
//! `report` -> a waiting `check` -> the token as `Authorization: Bearer` on a protected
//! `require_context` service in the user's workspace through the HTTP proxy. Also the
//! stock Python client's `login()`, the `hypha-server user ...` commands, and bad input:
//! wrong passwords, expired login keys, tampered tokens, unknown keys, duplicate sign-ups,
//! SQL-special characters.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use hypha_rpc::client::{connect_to_server, ClientConfig, Context, Service, Visibility};
use hypha_rpc::core::auth::{self, JwtConfig};
use hypha_rpc::core::{map, Value};
use hypha_rpc::server::{AccountStore, NewAccount, RunningServer, Server, ServerBuilder};
use serde_json::{json, Value as Json};

const SECRET: &str = "test-secret-for-the-account-tests";
const PASSWORD: &str = "correct horse battery";

fn builder() -> ServerBuilder {
    Server::builder().jwt_secret(SECRET).server_id("accounts-test").workers(1)
}

fn start(b: ServerBuilder) -> RunningServer {
    b.build().expect("valid config").start("127.0.0.1", 0).expect("bind")
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("hypha-accounts-{}", hypha_rpc::core::ids::random_id()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Resp {
    status: u16,
    body: bytes::Bytes,
}

impl Resp {
    fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    /// The error detail of a failed proxied call.
    fn detail(&self) -> String {
        self.json()["detail"].as_str().unwrap_or_default().to_owned()
    }
}

async fn send(method: &str, url: &str, token: Option<&str>, body: Option<Json>) -> Resp {
    let client = awc::Client::builder().disable_redirects().timeout(Duration::from_secs(60)).finish();
    let mut req = client.request(awc::http::Method::from_bytes(method.as_bytes()).unwrap(), url);
    if let Some(t) = token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut resp = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let body = resp.body().limit(1 << 20).await.unwrap();
    Resp { status: resp.status().as_u16(), body }
}

/// `POST /public/services/hypha-login/{function}` with a JSON body.
async fn login_fn(srv: &str, function: &str, body: Json) -> Resp {
    send("POST", &format!("{srv}/public/services/hypha-login/{function}"), None, Some(body)).await
}

async fn signup(srv: &str, name: &str, email: &str, password: &str) -> Resp {
    login_fn(srv, "signup", json!({"name": name, "email": email, "password": password})).await
}

/// Logs in and returns the token.
async fn log_in(srv: &str, email: &str, password: &str) -> Json {
    let r = login_fn(srv, "login", json!({"email": email, "password": password})).await;
    assert_eq!(r.status, 200, "login: {}", r.text());
    r.json()
}

fn claims(token: &str) -> serde_json::Map<String, Json> {
    JwtConfig::new(SECRET).verify(token, auth::unix_seconds(SystemTime::now())).expect("a valid token")
}

fn query(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={}", percent(v))).collect::<Vec<_>>().join("&")
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What the page sends to `report` after a login.
async fn report(srv: &str, key: &str, login: &Json) -> Resp {
    let q = query(&[
        ("key", key),
        ("token", login["token"].as_str().unwrap()),
        ("workspace", ""),
        ("expires_in", ""),
        ("email", login["email"].as_str().unwrap()),
        ("email_verified", ""),
        ("name", login["name"].as_str().unwrap()),
        ("nickname", login["name"].as_str().unwrap()),
        ("user_id", login["user_id"].as_str().unwrap()),
        ("picture", ""),
    ]);
    send("GET", &format!("{srv}/public/services/hypha-login/report?{q}"), None, None).await
}

/// A protected `require_context` service in the user's own workspace that tells who
/// called and refuses everyone but `owner_email` (the guide's authorization example).
fn guarded_service(owner_email: String) -> Service {
    Service::builder("guarded")
        .name("Guarded")
        .visibility(Visibility::Protected)
        .require_context(true)
        .function("whoami", move |ctx: Context| {
            let owner = owner_email.clone();
            async move {
                let user = ctx.user().cloned().unwrap_or_default();
                let email = user.get("email").and_then(Value::as_str).unwrap_or_default().to_owned();
                if email != owner {
                    return Err(format!("PermissionError: {email:?} may not call this"));
                }
                let id = user.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                Ok::<_, String>(json!({"id": id, "email": email}).to_string())
            }
        })
        .build()
}

#[actix_rt::test]
async fn the_curl_flow_logs_a_user_in_and_authorizes_a_protected_service() {
    let srv = start(builder());
    let url = srv.url();

    // 1. start -> login_url (and the key in it)
    let r = login_fn(&url, "start", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let started = r.json();
    let key = started["key"].as_str().unwrap().to_owned();
    let login_url = started["login_url"].as_str().unwrap().to_owned();
    assert_eq!(login_url, format!("{url}/public/apps/hypha-login/?key={key}"));
    assert_eq!(started["check_url"], json!(format!("{url}/public/services/hypha-login/check")));

    // 2. the page is served for that key
    let page = send("GET", &login_url, None, None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("<title>Hypha Account</title>") && page.text().contains("SIGNUP_OPEN = true")
    );

    // 3. a waiting check, while the "browser" signs up, logs in and reports
    let check = {
        let url = url.clone();
        let key = key.clone();
        actix_rt::spawn(async move {
            let started = Instant::now();
            let r = login_fn(&url, "check", json!({"key": key, "timeout": 20})).await;
            (r.status, r.json(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let made = signup(&url, "Alice Liddell", "Alice@Example.com", PASSWORD).await;
    assert_eq!(made.status, 200, "{}", made.text());
    let made = made.json();
    assert_eq!(made["success"], json!(true));
    assert_eq!(made["email"], json!("alice@example.com"));
    let user_id = made["user_id"].as_str().unwrap().to_owned();
    assert_eq!(made["workspace"], json!(format!("ws-user-{user_id}")));
    assert!(made.get("token").is_none(), "sign-up itself issues no token");
    let login = log_in(&url, "alice@example.com", PASSWORD).await;
    assert_eq!(login["user_id"], json!(user_id));
    assert_eq!(report(&url, &key, &login).await.text(), "null");
    let (status, checked, waited) = check.await.unwrap();
    assert_eq!(status, 200);
    assert!(waited >= Duration::from_millis(600), "check waited for the report ({waited:?})");
    let token = checked.as_str().expect("check returns the token").to_owned();
    assert_eq!(token, login["token"].as_str().unwrap());

    // The token: the account's id and email, admin of its own workspace, no `wid`.
    let c = claims(&token);
    assert_eq!(c["sub"], json!(user_id));
    assert_eq!(c["https://amun.ai/email"], json!("alice@example.com"));
    assert_eq!(c["scope"], json!(format!("ws:ws-user-{user_id}#a")));
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 24 * 3600);
    let me = send("GET", &format!("{url}/assets/config.json"), Some(&token), None).await.json();
    assert_eq!(me["user"]["id"], json!(user_id));
    assert_eq!(me["user"]["email"], json!("alice@example.com"));
    assert_eq!(me["user"]["is_anonymous"], json!(false));
    assert_eq!(me["user"]["scope"]["current_workspace"], json!(format!("ws-user-{user_id}")));

    // 4. the user's own workspace: a client with the token lands there and registers a
    // protected service that checks `context.user`.
    let provider =
        connect_to_server(ClientConfig::new(&url).token(&token).method_timeout(Duration::from_secs(20)))
            .await
            .expect("connect with the login token");
    assert_eq!(provider.workspace(), format!("ws-user-{user_id}"));
    provider.register_service(guarded_service("alice@example.com".into())).await.expect("register");
    let call = format!("{url}/ws-user-{user_id}/services/guarded/whoami");
    let r = send("GET", &call, Some(&token), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let who: Json = serde_json::from_str(r.json().as_str().unwrap()).unwrap();
    assert_eq!(who, json!({"id": user_id, "email": "alice@example.com"}));

    // Anonymous callers do not even see the protected service.
    let r = send("GET", &call, None, None).await;
    assert!(matches!(r.status, 403 | 404), "anonymous: {} {}", r.status, r.text());

    // Another logged-in user cannot reach alice's protected service.
    signup(&url, "Bob", "bob@example.com", PASSWORD).await;
    let bob = log_in(&url, "bob@example.com", PASSWORD).await;
    let r = send("GET", &call, bob["token"].as_str(), None).await;
    assert!(matches!(r.status, 403 | 404), "bob: {} {}", r.status, r.text());

    // 5. a token alice generates for her workspace (as the page's "Generate token" does)
    let r = send(
        "POST",
        &format!("{url}/public/services/ws/generate_token"),
        Some(&token),
        Some(json!({"config": {"workspace": format!("ws-user-{user_id}"), "expires_in": 600, "permission": "read_write"}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let child = r.json().as_str().unwrap().to_owned();
    let c = claims(&child);
    assert_eq!(c["https://amun.ai/parent"], json!(user_id));
    assert_eq!(c["https://amun.ai/email"], json!("alice@example.com"));
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
    let r = send("GET", &call, Some(&child), None).await;
    assert_eq!(r.status, 200, "the generated token calls the service: {}", r.text());
    let who: Json = serde_json::from_str(r.json().as_str().unwrap()).unwrap();
    assert_eq!(who["email"], json!("alice@example.com"), "the child token carries the email");
    // Bob cannot mint tokens for alice's workspace.
    let r = send(
        "POST",
        &format!("{url}/public/services/ws/generate_token"),
        bob["token"].as_str(),
        Some(json!({"config": {"workspace": format!("ws-user-{user_id}")}})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());

    // 6. a workspace the user creates is hers: she mints tokens for it, bob cannot, and a
    // client with her token for it joins it.
    let ws = format!("alice-project-{}", &user_id[user_id.len() - 4..]);
    provider
        .call("create_workspace", vec![Value::Map(map! {"name" => ws.clone(), "description" => "alice's"})])
        .await
        .expect("create_workspace");
    let gen = |t: Option<String>, ws: String| {
        let url = url.clone();
        async move {
            send(
                "POST",
                &format!("{url}/public/services/ws/generate_token"),
                t.as_deref(),
                Some(json!({"config": {"workspace": ws}})),
            )
            .await
        }
    };
    let r = gen(Some(token.clone()), ws.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ws_token = r.json().as_str().unwrap().to_owned();
    assert_eq!(claims(&ws_token)["scope"], json!(format!("ws:{ws}#rw wid:{ws}")));
    let member = connect_to_server(ClientConfig::new(&url).token(&ws_token)).await.expect("join");
    assert_eq!(member.workspace(), ws);
    member.disconnect().await.expect("disconnect");
    let r = gen(bob["token"].as_str().map(str::to_owned), ws.clone()).await;
    assert_eq!(r.status, 403, "{}", r.text());

    provider.disconnect().await.expect("disconnect");
    srv.stop().await.expect("stop");
}

#[actix_rt::test]
async fn login_over_rpc_and_check_with_profile() {
    let srv = start(builder());
    let url = srv.url();
    let client =
        connect_to_server(ClientConfig::new(&url).method_timeout(Duration::from_secs(20))).await.unwrap();
    let svc = client.get_service("public/hypha-login").await.expect("the login service");
    for f in ["start", "check", "report", "index", "profile", "logout", "signup", "login"] {
        assert!(svc.api().contains_key(f), "hypha-login has {f}");
    }
    let made = svc
        .call_with_kwargs("signup", vec![], map! {"email" => "rpc@example.org", "password" => "rpc password"})
        .await
        .expect("signup over RPC");
    let made = made.as_map().unwrap().clone();
    assert_eq!(made.get("name"), Some(&Value::from("rpc")), "the name defaults to the email's local part");
    let started = svc.call("start", vec![]).await.unwrap();
    let key = started.as_map().unwrap().get("key").and_then(Value::as_str).unwrap().to_owned();
    let login = svc
        .call_with_kwargs(
            "login",
            vec![],
            map! {"email" => "RPC@example.org", "password" => "rpc password", "expires_in" => 120},
        )
        .await
        .expect("login over RPC");
    let login = login.as_map().unwrap().clone();
    let token = login.get("token").and_then(Value::as_str).unwrap().to_owned();
    let c = claims(&token);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 120);
    svc.call_with_kwargs(
        "report",
        vec![Value::from(key.clone()), Value::from(token.clone())],
        map! {"email" => "rpc@example.org", "name" => "rpc"},
    )
    .await
    .expect("report");
    let record = svc
        .call_with_kwargs("check", vec![Value::from(key.clone())], map! {"timeout" => 5, "profile" => true})
        .await
        .expect("check");
    let record = record.as_map().unwrap();
    assert_eq!(record.get("token").and_then(Value::as_str), Some(token.as_str()));
    assert_eq!(record.get("email").and_then(Value::as_str), Some("rpc@example.org"));
    let err = svc.call("check", vec![Value::from(key)]).await.expect_err("consumed");
    assert!(err.to_string().contains("Invalid key, key does not exist"), "{err}");
    client.disconnect().await.unwrap();
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn bad_credentials_keys_and_tokens_get_clear_errors_and_leak_nothing() {
    let srv = start(builder().max_login_time(Duration::from_millis(1500)));
    let url = srv.url();
    assert_eq!(signup(&url, "Carol", "carol@example.com", PASSWORD).await.status, 200);

    // Wrong password and unknown email: one error, 403, no token in the body.
    for (email, password) in [("carol@example.com", "wrong password"), ("nobody@example.com", PASSWORD)] {
        let r = login_fn(&url, "login", json!({"email": email, "password": password})).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.detail(), "RemoteException: PermissionError: Invalid email or password");
        assert!(!r.text().contains("eyJ") && !r.text().contains("argon2"), "nothing leaks: {}", r.text());
    }

    // Sign-up of an existing user (any case): refused, the account unchanged.
    let r = signup(&url, "Mallory", "CAROL@example.com", "another password").await;
    assert_eq!((r.status, r.detail()), (400, "RemoteException: ValueError: Email already registered".into()));
    log_in(&url, "carol@example.com", PASSWORD).await;
    let r =
        login_fn(&url, "login", json!({"email": "carol@example.com", "password": "another password"})).await;
    assert_eq!(r.status, 403);

    // Bad sign-up input.
    for (email, password, expected) in [
        ("not-an-email", PASSWORD, "ValueError: Invalid email address"),
        ("dave@example.com", "short", "ValueError: Password must be at least 8 characters"),
    ] {
        let r = signup(&url, "Dave", email, password).await;
        assert_eq!((r.status, r.detail()), (400, format!("RemoteException: {expected}")));
    }
    let r = login_fn(&url, "signup", json!({"email": "x@y.z"})).await;
    assert_eq!(r.status, 400, "missing password: {}", r.text());
    assert!(r.detail().contains("TypeError"), "{}", r.detail());

    let carol = log_in(&url, "carol@example.com", PASSWORD).await;
    let token = carol["token"].as_str().unwrap().to_owned();

    // Report for an unknown key.
    let r = report(&url, "no-such-key", &carol).await;
    assert_eq!(
        (r.status, r.detail()),
        (400, "RemoteException: AssertionError: Invalid key, key does not exist or expired".into())
    );

    // A tampered token: refused by report and by every HTTP route.
    let key = login_fn(&url, "start", json!({})).await.json()["key"].as_str().unwrap().to_owned();
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let forged_claims = {
        let mut c = claims(&token);
        c.insert("https://amun.ai/roles".into(), json!(["admin"]));
        c
    };
    parts[1] = base64url(&serde_json::to_vec(&forged_claims).unwrap());
    let tampered = parts.join(".");
    let mut forged = carol.clone();
    forged["token"] = json!(tampered);
    let r = report(&url, &key, &forged).await;
    assert_eq!(r.status, 400);
    assert!(
        r.detail().starts_with(
            "RemoteException: ValueError: Invalid token provided to report_login: 401: Signature verification failed."
        ),
        "{}",
        r.detail()
    );
    let r = send("GET", &format!("{url}/assets/config.json"), Some(&tampered), None).await;
    assert_eq!((r.status, r.json()), (401, json!({"detail": "Signature verification failed."})));
    let r = send("GET", &format!("{url}/public/services/hypha-login/start"), Some(&tampered), None).await;
    assert_eq!(r.status, 401, "no anonymous fallback for a bad token");
    // The key is still usable after the refused report.
    assert_eq!(login_fn(&url, "check", json!({"key": key, "timeout": 0})).await.text(), "null");

    // An expired login key: check and report both refuse it.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let r = login_fn(&url, "check", json!({"key": key, "timeout": 0})).await;
    assert_eq!(
        (r.status, r.detail()),
        (400, "RemoteException: AssertionError: Invalid key, key does not exist".into())
    );
    let r = report(&url, &key, &carol).await;
    assert_eq!(
        (r.status, r.detail()),
        (400, "RemoteException: AssertionError: Invalid key, key does not exist or expired".into())
    );
    // A check waiting on a key that expires fails instead of hanging.
    let key = login_fn(&url, "start", json!({})).await.json()["key"].as_str().unwrap().to_owned();
    let r = login_fn(&url, "check", json!({"key": key, "timeout": 30})).await;
    assert_eq!(r.status, 400, "{}", r.text());

    srv.stop().await.unwrap();
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[actix_rt::test]
async fn sql_special_characters_in_names_and_emails_are_plain_data() {
    let srv = start(builder());
    let url = srv.url();
    let name = "Robert'); DROP TABLE users;-- \"%_\\";
    let email = "o'brien+%_\"x;--@example.com";
    let password = "' OR '1'='1' --";
    let r = signup(&url, name, email, password).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], json!(name));
    let login = log_in(&url, email, password).await;
    assert_eq!((login["email"].as_str(), login["name"].as_str()), (Some(email), Some(name)));
    // Wildcards and injection in the login name match nothing.
    for probe in ["%@example.com", "' OR 1=1 --@x", "o'brien+%_\"x;--@example.co_"] {
        let r = login_fn(&url, "login", json!({"email": probe, "password": password})).await;
        assert_eq!(r.status, 403, "{probe}: {}", r.text());
    }
    // The table is intact: another account still works.
    assert_eq!(signup(&url, "Eve", "eve@example.com", PASSWORD).await.status, 200);
    log_in(&url, "eve@example.com", PASSWORD).await;
    let accounts = srv.server().state().accounts.list().await.unwrap();
    assert_eq!(accounts.len(), 2);
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn no_signup_closes_the_page_but_admin_made_accounts_log_in_from_the_data_dir() {
    let dir = TempDir::new();
    // An administrator made this account beforehand (what `hypha-server user add` does).
    let admin = AccountStore::open(&dir.0)
        .unwrap()
        .create(&NewAccount {
            email: "admin@example.com".into(),
            password: PASSWORD.into(),
            name: Some("Admin".into()),
            admin: true,
        })
        .unwrap();
    let srv = start(builder().data_dir(&dir.0).allow_signup(false));
    let url = srv.url();
    let page = send("GET", &format!("{url}/public/apps/hypha-login/"), None, None).await;
    assert!(page.text().contains("SIGNUP_OPEN = false;"));
    let r = signup(&url, "X", "x@example.com", PASSWORD).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.detail(),
        "RemoteException: PermissionError: Sign-up is disabled on this server; ask an administrator to create your account"
    );
    let login = log_in(&url, "admin@example.com", PASSWORD).await;
    assert_eq!(login["user_id"], json!(admin.id));
    let me = send("GET", &format!("{url}/assets/config.json"), login["token"].as_str(), None).await.json();
    assert_eq!(me["user"]["roles"], json!(["admin"]));
    assert_eq!(me["user"]["scope"]["workspaces"]["*"], json!("a"), "admins hold every workspace");
    srv.stop().await.unwrap();
    assert!(dir.0.join("accounts.sqlite3").exists());
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hypha-server"));
    c.env_remove("RUST_LOG").env_remove("HYPHA_DATA_DIR").env_remove("HYPHA_NO_SIGNUP");
    c
}

fn user_add(dir: &TempDir, args: &[&str], password: &str) -> std::process::Output {
    let mut child = bin()
        .arg("--data-dir")
        .arg(&dir.0)
        .args(["user", "add"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hypha-server user add");
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[actix_rt::test]
async fn the_user_commands_manage_accounts_the_server_logs_in() {
    let dir = TempDir::new();
    let out = user_add(
        &dir,
        &["--email", "Ops@Example.com", "--password-stdin", "--name", "Ops", "--admin"],
        "ops password\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.starts_with("created user ") && stdout.contains("<ops@example.com> with role admin"),
        "{stdout}"
    );
    let out = user_add(&dir, &["--email", "dev@example.com", "--password-stdin"], "dev password");
    assert!(out.status.success());

    // Duplicates, short passwords and a missing --password-stdin fail clearly.
    let out = user_add(&dir, &["--email", "OPS@example.com", "--password-stdin"], "whatever123");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Email already registered"));
    let out = user_add(&dir, &["--email", "short@example.com", "--password-stdin"], "short\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Password must be at least 8 characters"));
    let out = user_add(&dir, &["--email", "p@example.com"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin"));

    let out = bin().arg("--data-dir").arg(&dir.0).args(["user", "list"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "id\temail\tname\troles");
    assert!(
        lines[1].contains("\tops@example.com\tOps\tadmin") && lines[2].contains("\tdev@example.com\tdev\t"),
        "{table}"
    );
    assert_eq!(lines.len(), 3);
    assert!(!table.contains("argon2"), "no hashes in the listing");
    let out = bin().arg("--data-dir").arg(&dir.0).args(["user", "list", "--json"]).output().unwrap();
    let listed: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["roles"], json!(["admin"]));

    // The server on that directory, with sign-up closed, logs the account in.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = bin()
        .arg("--data-dir")
        .arg(&dir.0)
        .args(["--port", &port.to_string(), "--workers", "1", "--no-signup"])
        .env("JWT_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while awc::Client::new().get(format!("{base}/health/liveness")).send().await.is_err() {
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let login = log_in(&base, "ops@example.com", "ops password").await;
    assert_eq!(claims(login["token"].as_str().unwrap())["https://amun.ai/roles"], json!(["admin"]));
    assert_eq!(signup(&base, "X", "x@example.com", PASSWORD).await.status, 403);
    let _ = child.kill();
    let _ = child.wait();
}

fn python() -> PathBuf {
    std::env::var_os("HYPHA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

#[actix_rt::test]
async fn the_stock_python_login_gets_a_token_through_the_page_endpoints() {
    let srv = start(builder());
    let url = srv.url();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/login_flow.py");
    let python = python();
    let url2 = url.clone();
    let out = actix_web::web::block(move || {
        Command::new(&python)
            .arg(&script)
            .args([&url2, "py.user@example.com", "python password"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "login_flow.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Json = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    let user_id = seen["user_id"].as_str().unwrap();
    let token = seen["token"].as_str().unwrap();
    assert_eq!(claims(token)["sub"], json!(user_id));
    assert_eq!(claims(token)["https://amun.ai/email"], json!("py.user@example.com"));
    assert_eq!(seen["workspace"], json!(format!("ws-user-{user_id}")), "the token's own workspace");
    assert_eq!(seen["profile"]["email"], json!("py.user@example.com"));
    assert_eq!(seen["profile"]["user_id"], json!(user_id));
    assert_eq!(seen["profile"]["name"], json!("Py User"));
    assert!(seen["login_url"].as_str().unwrap().starts_with(&format!("{url}/public/apps/hypha-login/?key=")));
    srv.stop().await.unwrap();
}

// --- a real browser -------------------------------------------------------------------------

/// A headless Chromium driven over the W3C WebDriver protocol (Debian's `chromium` and
/// `chromium-driver`; `scripts/test.sh` installs them). `HYPHA_CHROMEDRIVER` and
/// `HYPHA_CHROMIUM` override the binaries.
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    _profile: TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Browser {
        let driver_bin = std::env::var("HYPHA_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium = std::env::var("HYPHA_CHROMIUM").unwrap_or_else(|_| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .unwrap_or("chromium")
                .to_owned()
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {driver_bin} ({e}): install Debian's chromium and chromium-driver \
                     (scripts/test.sh does it as root) or set HYPHA_CHROMEDRIVER"
                )
            });
        let base = format!("http://127.0.0.1:{port}");
        let profile = TempDir::new();
        let mut browser = Browser { driver, base, session: String::new(), _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(20);
        while awc::Client::new().get(format!("{}/status", browser.base)).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--user-data-dir={}", browser._profile.0.display())],
            },
        }}});
        let r = browser.cmd("POST", "/session", Some(caps)).await;
        browser.session =
            r["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {r}")).to_owned();
        browser
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Json>) -> Json {
        let url = if path == "/session" {
            format!("{}/session", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let r = send(method, &url, None, body).await;
        let v = r.json();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    /// Ends the session (closing Chromium) before the driver is stopped.
    async fn quit(mut self) {
        self.cmd("DELETE", "", None).await;
        self.session.clear();
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url}))).await;
    }

    async fn js(&self, script: &str) -> Json {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []}))).await
    }

    async fn element(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css}))).await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_owned()
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({}))).await;
    }

    async fn fill(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({}))).await;
        self.cmd("POST", &format!("/element/{e}/value"), Some(json!({"text": text}))).await;
    }

    /// Polls `script` until it returns a truthy value (or panics after 20 s).
    async fn wait_for(&self, what: &str, script: &str) -> Json {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.js(script).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            let status = self.js("return document.getElementById('status') && document.getElementById('status').textContent").await;
            assert!(Instant::now() < deadline, "timed out waiting for {what}; status: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::process::Command::new("curl")
                .args(["-s", "-X", "DELETE", &format!("{}/session/{}", self.base, self.session)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn spawn_check(url: &str, key: &str) -> actix_rt::task::JoinHandle<Resp> {
    let (url, key) = (url.to_owned(), key.to_owned());
    actix_rt::spawn(async move { login_fn(&url, "check", json!({"key": key, "timeout": 60})).await })
}

#[actix_rt::test]
async fn a_headless_chromium_signs_up_and_logs_in_on_the_served_page() {
    let srv = start(builder());
    let url = srv.url();
    let browser = Browser::start().await;

    // Sign-up for a key from start; the waiting check gets the token.
    let started = login_fn(&url, "start", json!({})).await.json();
    let check = spawn_check(&url, started["key"].as_str().unwrap());
    browser.goto(started["login_url"].as_str().unwrap()).await;
    let title = browser.cmd("GET", "/title", None).await;
    assert!(title.as_str().unwrap().contains("Hypha Account"), "{title}");
    browser.click("#tab-signup").await;
    browser.fill("#signup-name", "Browser User").await;
    browser.fill("#signup-email", "browser@example.com").await;
    browser.fill("#signup-password", PASSWORD).await;
    browser.click("#signup-submit").await;
    let r = check.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.json().as_str().unwrap().to_owned();
    let c = claims(&token);
    assert_eq!(c["https://amun.ai/email"], json!("browser@example.com"));
    let user_id = c["sub"].as_str().unwrap().to_owned();
    browser
        .wait_for("the logged-in status", "return document.getElementById('status').textContent.includes('Logged in as browser@example.com')")
        .await;
    let cookie = browser.js("return document.cookie").await;
    assert!(cookie.as_str().unwrap().contains(&format!("access_token={token}")), "cookie: {cookie}");
    assert_eq!(browser.js("return document.getElementById('profile-id').textContent").await, json!(user_id));

    // Token generation on the page.
    browser.fill("#gen-expires", "120").await;
    browser.click("#generate-submit").await;
    let generated = browser
        .wait_for("a generated token", "return document.getElementById('generated-token').value")
        .await;
    let g = claims(generated.as_str().unwrap());
    assert_eq!(g["https://amun.ai/parent"], json!(user_id));
    assert_eq!(g["scope"], json!(format!("ws:ws-user-{user_id}#rw wid:ws-user-{user_id}")));
    assert_eq!(g["exp"].as_i64().unwrap() - g["iat"].as_i64().unwrap(), 120);

    // The token from check calls a protected service in the user's workspace.
    let provider = connect_to_server(ClientConfig::new(&url).token(&token)).await.expect("connect");
    provider.register_service(guarded_service("browser@example.com".into())).await.expect("register");
    let call = format!("{url}/ws-user-{user_id}/services/guarded/whoami");
    let r = send("GET", &call, Some(&token), None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A second login for another key, with redirect: log out, a wrong password, then the
    // right one; the browser ends at the redirect, which sees the cookie.
    let started = login_fn(&url, "start", json!({})).await.json();
    let check = spawn_check(&url, started["key"].as_str().unwrap());
    let redirect = format!("{url}/assets/config.json");
    browser
        .goto(&format!("{}&redirect={}", started["login_url"].as_str().unwrap(), percent(&redirect)))
        .await;
    browser
        .wait_for(
            "continue as the cookie's user",
            "return !document.getElementById('continue').classList.contains('hidden')",
        )
        .await;
    browser.click("#logout").await;
    assert_eq!(browser.js("return document.cookie.includes('access_token=')").await, json!(false));
    browser.fill("#login-email", "browser@example.com").await;
    browser.fill("#login-password", "not the password").await;
    browser.click("#login-submit").await;
    browser
        .wait_for("the login error", "return document.getElementById('status').textContent.includes('Login failed: Invalid email or password')")
        .await;
    browser.fill("#login-password", PASSWORD).await;
    browser.click("#login-submit").await;
    let r = check.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(claims(r.json().as_str().unwrap())["sub"], json!(user_id));
    browser.wait_for("the redirect", &format!("return window.location.href === {}", json!(redirect))).await;
    let seen = browser.wait_for("the config", "return document.body.innerText").await;
    let seen: Json = serde_json::from_str(seen.as_str().unwrap()).expect("config.json in the browser");
    assert_eq!(seen["user"]["id"], json!(user_id), "the cookie identifies the user on HTTP routes");

    browser.quit().await;
    provider.disconnect().await.unwrap();
    srv.stop().await.unwrap();
}

/// Reads up to the next `PREFIX rest` line of the Python side's protocol (30 s at most),
/// skipping the client's own log lines (the stock client logs to stdout).
async fn expect_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut skipped = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline, lines.next_line()).await;
        let line = next
            .unwrap_or_else(|_| panic!("no {prefix} line within 30 s; saw {skipped:?}"))
            .expect("read the script's stdout")
            .unwrap_or_else(|| panic!("the script ended before {prefix}; saw {skipped:?}"));
        match line.strip_prefix(&format!("{prefix} ")) {
            Some(rest) => return rest.to_owned(),
            None => skipped.push(line),
        }
    }
}

/// The stock Python `hypha_rpc.login()` with the browser part played by a real Chromium on
/// the served page: the URL from `login_callback` is opened, the user signs up there, and
/// the token `login()` returns calls a protected `require_context` service as that user.
#[actix_rt::test]
async fn the_stock_python_login_completes_in_a_headless_chromium_and_calls_a_protected_service() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let srv = start(builder());
    let url = srv.url();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/browser_login.py");
    let python = python();
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdin = child.stdin.take().unwrap();
    let browser = Browser::start().await;

    let login_url = expect_line(&mut lines, "LOGIN_URL").await;
    assert!(login_url.starts_with(&format!("{url}/public/apps/hypha-login/?key=")), "{login_url}");
    browser.goto(&login_url).await;
    let title = browser.cmd("GET", "/title", None).await;
    assert!(title.as_str().unwrap().contains("Hypha Account"), "{title}");
    browser.click("#tab-signup").await;
    browser.fill("#signup-name", "Py Browser User").await;
    browser.fill("#signup-email", "py.browser@example.com").await;
    browser.fill("#signup-password", PASSWORD).await;
    browser.click("#signup-submit").await;

    let token = expect_line(&mut lines, "TOKEN").await;
    let c = claims(&token);
    assert_eq!(c["https://amun.ai/email"], json!("py.browser@example.com"));
    let user_id = c["sub"].as_str().unwrap().to_owned();
    browser
        .wait_for("the logged-in status", "return document.getElementById('status').textContent.includes('Logged in as py.browser@example.com')")
        .await;

    let provider = connect_to_server(ClientConfig::new(&url).token(&token)).await.expect("connect");
    provider.register_service(guarded_service("py.browser@example.com".into())).await.expect("register");
    stdin.write_all(format!("ws-user-{user_id}/guarded\n").as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();
    let result: Json = serde_json::from_str(&expect_line(&mut lines, "RESULT").await).expect("whoami JSON");
    assert_eq!(result, json!({"id": user_id, "email": "py.browser@example.com"}));
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "browser_login.py exit: {status}");

    browser.quit().await;
    provider.disconnect().await.unwrap();
    srv.stop().await.unwrap();
}
