//! The server's HTTP surface end to end (server spec §1.2, §1.3, §1.6): static mounts,
//! `/assets/config.json`, `/{ws}/info`, CORS and the request-rate limit, against a real
//! server on an ephemeral port with an awc client. Expected bodies and headers are the
//! ones the Python server 0.21.137 sends. The last tests run the real `hypha-server` binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use awc::http::header;
use hypha_rpc::core::auth::{self, JwtConfig, Permission, UserInfo};
use hypha_rpc::server::{HttpRateLimits, RunningServer, Server, ServerBuilder};
use serde_json::{json, Value as Json};

const SECRET: &str = "test-secret-for-the-http-tests";
const ROOT_TOKEN: &str = "Zq8vN3xT1mK7pR2wY5bH9cJ4fL6gD0sAeQ4uV7nM2kX9jW1zP5yG8hF3dS6cB0vL7qR2";

fn builder() -> ServerBuilder {
    Server::builder().jwt_secret(SECRET).server_id("http-test").workers(1)
}

fn start(b: ServerBuilder) -> RunningServer {
    b.build().expect("valid config").start("127.0.0.1", 0).expect("bind")
}

/// A directory tree for static mounts, removed on drop:
/// `hello.txt`, `data.json`, `app.js`, `style.css`, `index.html`, `sub/a.txt`, and a
/// `secret.txt` *beside* the served directory (the traversal target).
struct Tree {
    base: PathBuf,
}

impl Tree {
    fn new(with_index: bool) -> Tree {
        let base =
            std::env::temp_dir().join(format!("hypha-http-test-{}", hypha_rpc::core::ids::random_id()));
        let dir = base.join("site");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("hello.txt"), "hello\n").unwrap();
        std::fs::write(dir.join("data.json"), r#"{"a":1}"#).unwrap();
        std::fs::write(dir.join("app.js"), "console.log(1)").unwrap();
        std::fs::write(dir.join("style.css"), "body{}").unwrap();
        std::fs::write(dir.join("sub/a.txt"), "a").unwrap();
        if with_index {
            std::fs::write(dir.join("index.html"), "<html>index</html>").unwrap();
        }
        std::fs::write(base.join("secret.txt"), "secret").unwrap();
        Tree { base }
    }

    fn dir(&self) -> PathBuf {
        self.base.join("site")
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

struct Resp {
    status: u16,
    headers: header::HeaderMap,
    body: bytes::Bytes,
}

impl Resp {
    fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Resp {
    let client = awc::Client::builder().disable_redirects().finish();
    let mut req = client.request(awc::http::Method::from_bytes(method.as_bytes()).unwrap(), url);
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let body = resp.body().limit(1 << 20).await.unwrap();
    Resp { status: resp.status().as_u16(), headers: resp.headers().clone(), body }
}

async fn get(srv: &RunningServer, path: &str) -> Resp {
    request("GET", &format!("{}{path}", srv.url()), &[]).await
}

async fn get_with(srv: &RunningServer, path: &str, headers: &[(&str, &str)]) -> Resp {
    request("GET", &format!("{}{path}", srv.url()), headers).await
}

fn assert_not_found(r: &Resp, what: &str) {
    assert_eq!(r.status, 404, "{what}: {:?}", r.body);
    assert_eq!(r.json(), json!({"detail": "Not Found"}), "{what}");
}

fn token(user_id: &str, perms: &[(&str, Permission)], wid: Option<&str>) -> String {
    let mut user = UserInfo::new(user_id);
    for (ws, p) in perms {
        user.scope.workspaces.insert((*ws).to_owned(), *p);
    }
    user.scope.current_workspace = wid.map(str::to_owned);
    JwtConfig::new(SECRET).encode(&user, 3600.0, auth::unix_seconds(SystemTime::now())).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// --- static mounts ------------------------------------------------------------------------

#[actix_rt::test]
async fn static_mount_serves_files_with_their_content_types() {
    let tree = Tree::new(true);
    let srv = start(builder().static_mount("/site", tree.dir()));
    for (path, ct, body) in [
        ("/site/hello.txt", "text/plain; charset=utf-8", "hello\n"),
        ("/site/data.json", "application/json", r#"{"a":1}"#),
        ("/site/app.js", "text/javascript; charset=utf-8", "console.log(1)"),
        ("/site/style.css", "text/css; charset=utf-8", "body{}"),
        ("/site/sub/a.txt", "text/plain; charset=utf-8", "a"),
        ("/site/index.html", "text/html; charset=utf-8", "<html>index</html>"),
        // The mount alone serves index.html.
        ("/site", "text/html; charset=utf-8", "<html>index</html>"),
        // `..` that stays inside the directory is normalised, as upstream does.
        ("/site/sub/%2e%2e/hello.txt", "text/plain; charset=utf-8", "hello\n"),
    ] {
        let r = get(&srv, path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(ct), "{path}");
        assert_eq!(r.text(), body, "{path}");
        assert!(r.header("last-modified").is_some() && r.header("etag").is_some(), "{path}");
        assert!(r.header("content-disposition").is_none(), "{path}");
    }
    // HEAD: the headers without the body.
    let r = request("HEAD", &format!("{}/site/hello.txt", srv.url()), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    // Conditional requests: the ETag revalidates.
    let etag = get(&srv, "/site/hello.txt").await.header("etag").unwrap().to_owned();
    let r = get_with(&srv, "/site/hello.txt", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, 304);
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn static_mount_answers_404_for_directories_and_missing_files() {
    let tree = Tree::new(true);
    let srv = start(builder().static_mount("/site", tree.dir()));
    for path in ["/site/", "/site/sub", "/site/sub/", "/site/missing.txt", "/site/sub/missing/deeper"] {
        assert_not_found(&get(&srv, path).await, path);
    }
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn static_mount_without_index_html_answers_404_at_its_root() {
    let tree = Tree::new(false);
    let srv = start(builder().static_mount("/site", tree.dir()));
    assert_not_found(&get(&srv, "/site").await, "/site");
    assert_eq!(get(&srv, "/site/hello.txt").await.status, 200);
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn static_mount_refuses_path_traversal() {
    let tree = Tree::new(true);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(tree.base.join("secret.txt"), tree.dir().join("link.txt")).unwrap();
        std::os::unix::fs::symlink(&tree.base, tree.dir().join("up")).unwrap();
        std::os::unix::fs::symlink(tree.dir().join("hello.txt"), tree.dir().join("inside.txt")).unwrap();
    }
    let srv = start(builder().static_mount("/site", tree.dir()));
    let secret = tree.base.join("secret.txt");
    let absolute = format!("/site/{}", secret.display());
    let encoded_absolute = format!("/site/{}", secret.display().to_string().replace('/', "%2F"));
    for path in [
        "/site/../secret.txt",
        "/site/sub/../../secret.txt",
        "/site/%2e%2e/secret.txt",
        "/site/%2E%2E/secret.txt",
        "/site/%2e%2e%2fsecret.txt",
        "/site/sub%2f..%2f..%2fsecret.txt",
        "/site/..%5csecret.txt",
        "/site/%00",
        "/site/hello.txt%00",
        "/site/%zz",
        absolute.as_str(),
        encoded_absolute.as_str(),
        "/site//etc/passwd",
        "/site/%2Fetc%2Fpasswd",
    ] {
        let r = request("GET", &format!("{}{path}", srv.url()), &[]).await;
        assert_not_found(&r, path);
        assert!(!r.text().contains("secret"), "{path}");
    }
    #[cfg(unix)]
    {
        // A symlink pointing outside the directory is not followed out of it.
        assert_not_found(&get(&srv, "/site/link.txt").await, "symlink to a file outside");
        assert_not_found(&get(&srv, "/site/up/secret.txt").await, "symlink to a directory outside");
        // One that stays inside is served.
        assert_eq!(get(&srv, "/site/inside.txt").await.text(), "hello\n");
    }
    // The server still serves afterwards.
    assert_eq!(get(&srv, "/site/hello.txt").await.status, 200);
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn static_mount_refuses_other_methods_with_405() {
    let tree = Tree::new(true);
    let srv = start(builder().static_mount("/site", tree.dir()));
    for path in ["/site/hello.txt", "/site"] {
        let r = request("POST", &format!("{}{path}", srv.url()), &[]).await;
        assert_eq!(r.status, 405, "{path}");
        assert_eq!(r.json(), json!({"detail": "Method Not Allowed"}));
    }
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn static_mounts_shadow_workspace_routes_like_upstream() {
    // Upstream mounts before its workspace routes: `/{mount}/info` is a file lookup.
    let tree = Tree::new(true);
    let srv = start(builder().static_mount("/site", tree.dir()));
    assert_not_found(&get(&srv, "/site/info").await, "/site/info");
    srv.stop().await.unwrap();
}

#[test]
fn bad_static_mounts_are_refused_at_build_time() {
    let tree = Tree::new(true);
    let err = |path: &str, dir: &Path| builder().static_mount(path, dir).build().unwrap_err().to_string();
    let missing = tree.base.join("nope");
    assert!(err("/x", &missing).contains("does not exist"), "{}", err("/x", &missing));
    assert!(err("/x", &tree.base.join("secret.txt")).contains("not a directory"));
    assert!(err("x", &tree.dir()).contains("must start with a '/'"));
    assert!(err("/a/b", &tree.dir()).contains("Only top-level routes are supported."));
    for clash in ["/ws", "/health", "/assets", "/static", "/login", "/public"] {
        let e = err(clash, &tree.dir());
        assert!(e.contains("collides with an existing route"), "{clash}: {e}");
    }
    assert!(err("/{ws}", &tree.dir()).contains("may only contain"));
    let e = builder().static_mount("/x", tree.dir()).static_mount("/x/", tree.dir()).build().unwrap_err();
    assert!(e.to_string().contains("mounted twice"), "{e}");
}

#[actix_rt::test]
async fn static_prefix_and_unknown_paths_answer_json_404() {
    let srv = start(builder());
    assert_not_found(&get(&srv, "/static/nonexistent.js").await, "/static/nonexistent.js");
    assert_not_found(&get(&srv, "/static/hypha-rpc-websocket.js").await, "bundles are not shipped");
    assert_not_found(&get(&srv, "/no/such/route").await, "unknown route");
    srv.stop().await.unwrap();
}

// --- /assets/config.json ----------------------------------------------------------------------

#[actix_rt::test]
async fn config_json_describes_the_anonymous_http_user_and_the_server() {
    let srv = start(builder());
    let r = get(&srv, "/assets/config.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let base = srv.url();
    let expected = json!({
        "user": {"id":"anonymouz-http","roles":["anonymous"],"is_anonymous":true,
            "scope":{"current_workspace":"ws-anonymous","workspaces":{"ws-anonymous":"r"},"client_id":null,"extra_scopes":null},
            "email":null,"parent":null,"expires_at":null,"current_workspace":null},
        "server_id": "http-test",
        "hypha_version": hypha_rpc::server::HYPHA_VERSION,
        "public_base_url": base,
        "local_base_url": base,
        "auth0_client_id": null,
        "auth0_domain": null,
        "auth0_audience": "https://amun-ai.eu.auth0.com/api/v2/",
        "auth0_issuer": "https://amun.ai/",
        "login_service_url": format!("{base}/public/services/hypha-login"),
    });
    assert_eq!(r.json(), expected);
    // Upstream's key order.
    let keys: Vec<String> = r.json().as_object().unwrap().keys().cloned().collect();
    let want: Vec<String> = expected.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, want);
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn config_json_shows_the_token_user_and_refuses_bad_tokens() {
    let srv = start(builder().root_token(ROOT_TOKEN).public_base_url("https://hypha.example/"));
    let alice = token("alice", &[("ws-user-alice", Permission::Admin)], None);
    let r = get_with(&srv, "/assets/config.json", &[("authorization", &bearer(&alice))]).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["user"]["id"], "alice");
    assert_eq!(
        body["user"]["scope"],
        json!({"current_workspace":"ws-user-alice","workspaces":{"ws-user-alice":"a"},"client_id":null,"extra_scopes":[]})
    );
    assert_eq!(body["user"]["current_workspace"], Json::Null);
    assert_eq!(body["public_base_url"], "https://hypha.example");
    assert_eq!(body["login_service_url"], "https://hypha.example/public/services/hypha-login");
    assert_eq!(body["local_base_url"], srv.url());
    // The cookie works too.
    let r = get_with(&srv, "/assets/config.json", &[("cookie", &format!("access_token={alice}"))]).await;
    assert_eq!(r.json()["user"]["id"], "alice");
    // The root token is an admin with every workspace.
    let r = get_with(&srv, "/assets/config.json", &[("authorization", &bearer(ROOT_TOKEN))]).await;
    let user = &r.json()["user"];
    assert_eq!((user["id"].as_str(), user["roles"].clone()), (Some("root"), json!(["admin"])));
    assert_eq!(user["scope"]["workspaces"], json!({"*": "a"}));
    // A token that is not a JWT: 401 with upstream's reason, no anonymous fallback.
    let r = get_with(&srv, "/assets/config.json", &[("authorization", "Bearer not-a-token")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), json!({"detail": "Error decoding token headers."}));
    // Expired.
    let expired = JwtConfig::new(SECRET).encode(&UserInfo::new("old"), 1.0, 1_000_000.0).unwrap();
    let r = get_with(&srv, "/assets/config.json", &[("authorization", &bearer(&expired))]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), json!({"detail": "The token has expired. Please fetch a new one"}));
    srv.stop().await.unwrap();
}

// --- /{ws}/info -------------------------------------------------------------------------------

#[actix_rt::test]
async fn workspace_info_follows_upstreams_permission_rules() {
    let srv = start(builder().root_token(ROOT_TOKEN));
    // Anonymous: its own shared workspace only.
    let r = get(&srv, "/ws-anonymous/info").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"type":"workspace","id":"ws-anonymous","name":"Anonymous Workspace",
            "description":"Shared workspace for anonymous users","persistent":true,"owners":["root"],
            "read_only":true,"icon":null,"covers":null,"docs":null,"service_types":{},"config":{},
            "status":{"ready":true,"errors":null}})
    );
    for (ws, status) in [("public", 403), ("nonexistent-ws", 403), ("ws-user-root", 403)] {
        let r = get(&srv, &format!("/{ws}/info")).await;
        assert_eq!(r.status, status, "{ws}");
        assert_eq!(
            r.json(),
            json!({"success": false, "detail": format!("anonymouz-http has no permission to access {ws}")})
        );
    }
    // A token with `a` on its workspace reads it; the permission check comes before the
    // existence check, so an unknown workspace is a 403 for it too.
    let alice = token("alice", &[("ws-user-root", Permission::Read)], None);
    let auth = [("authorization", bearer(&alice))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = get_with(&srv, "/ws-user-root/info", &auth).await;
    assert_eq!((r.status, r.json()["id"].clone()), (200, json!("ws-user-root")));
    let r = get_with(&srv, "/nonexistent-ws/info", &auth).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["detail"], "alice has no permission to access nonexistent-ws");
    // The personal workspace of a user who never connected does not exist yet: 404.
    let r = get_with(
        &srv,
        "/ws-user-alice/info",
        &[("authorization", &bearer(&token("alice", &[("ws-user-alice", Permission::Admin)], None)))],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json(), json!({"success": false, "detail": "Workspace 'ws-user-alice' not found"}));
    // Admins (wildcard scope) see any workspace, and get a 404 for unknown ones.
    let root = [("authorization", bearer(ROOT_TOKEN))];
    let root: Vec<(&str, &str)> = root.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(get_with(&srv, "/public/info", &root).await.json()["id"], "public");
    let r = get_with(&srv, "/nonexistent-ws/info", &root).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json(), json!({"success": false, "detail": "Workspace 'nonexistent-ws' not found"}));
    // Bad tokens are 401 here too.
    assert_eq!(get_with(&srv, "/ws-anonymous/info", &[("authorization", "Bearer x")]).await.status, 401);
    srv.stop().await.unwrap();
}

// --- CORS -------------------------------------------------------------------------------------

const EXPOSE: &str = "Inference-Header-Content-Length, Accept-Encoding, Range, Origin, Content-Type";

#[actix_rt::test]
async fn cors_echoes_the_origin_with_credentials_once_per_response() {
    let srv = start(builder());
    for path in
        ["/assets/config.json", "/health/liveness", "/public/services/", "/ws-anonymous/info", "/login"]
    {
        let r = get_with(&srv, path, &[("origin", "http://localhost:3000")]).await;
        assert_eq!(r.header("access-control-allow-origin"), Some("http://localhost:3000"), "{path}");
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"), "{path}");
        assert_eq!(r.header("access-control-expose-headers"), Some(EXPOSE), "{path}");
        assert_eq!(r.header("vary"), Some("Origin"), "{path}");
        assert_eq!(r.headers.get_all("access-control-allow-origin").count(), 1, "{path}: one CORS layer");
        // Without an Origin, no CORS headers at all (upstream's middleware only acts on one).
        let r = get(&srv, path).await;
        assert!(r.header("access-control-allow-origin").is_none(), "{path}");
        assert!(r.header("access-control-allow-credentials").is_none(), "{path}");
    }
    // The login page is a "functions" app: its own five headers, not the layer's.
    let r = get_with(&srv, "/public/apps/hypha-login/", &[("origin", "http://a.example")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("http://a.example"));
    assert_eq!(r.header("access-control-expose-headers"), Some("Content-Disposition"));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,POST,PUT,DELETE,OPTIONS"));
    let r = get(&srv, "/public/apps/hypha-login/").await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn cors_preflights_are_answered_before_routing() {
    let srv = start(builder());
    let url = format!("{}/public/services/some-service/fn", srv.url());
    let r = request(
        "OPTIONS",
        &url,
        &[
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type, authorization"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "OK");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("access-control-allow-origin"), Some("http://localhost:3000"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT")
    );
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("Accept, Accept-Encoding, Accept-Language, Access-Control-Allow-Headers, Access-Control-Request-Headers, Access-Control-Request-Method, Authorization, Content-Encoding, Content-Language, Content-Type, Inference-Header-Content-Length, Origin, Range, X-Requested-With")
    );
    // A header outside the list, or an unknown method: 400 naming it (Starlette's text).
    let r = request(
        "OPTIONS",
        &url,
        &[
            ("origin", "http://x"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "x-foo"),
        ],
    )
    .await;
    assert_eq!((r.status, r.text()), (400, "Disallowed CORS headers"));
    let r =
        request("OPTIONS", &url, &[("origin", "http://x"), ("access-control-request-method", "FOO")]).await;
    assert_eq!((r.status, r.text()), (400, "Disallowed CORS method"));
    // Without Access-Control-Request-Method (or without Origin) it is a plain OPTIONS: 405.
    for headers in [&[("origin", "http://x")][..], &[("access-control-request-method", "GET")][..]] {
        let r = request("OPTIONS", &format!("{}/assets/config.json", srv.url()), headers).await;
        assert_eq!(r.status, 405);
        assert_eq!(r.json(), json!({"detail": "Method Not Allowed"}));
    }
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn cors_with_an_origin_list_echoes_only_listed_origins() {
    let srv = start(builder().allow_origins(["https://app.example", "http://localhost:3000"]));
    let r = get_with(&srv, "/assets/config.json", &[("origin", "https://app.example")]).await;
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
    let r = get_with(&srv, "/assets/config.json", &[("origin", "https://evil.example")]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let r = request(
        "OPTIONS",
        &format!("{}/assets/config.json", srv.url()),
        &[("origin", "https://evil.example"), ("access-control-request-method", "GET")],
    )
    .await;
    assert_eq!((r.status, r.text()), (400, "Disallowed CORS origin"));
    assert!(r.header("access-control-allow-origin").is_none());
    srv.stop().await.unwrap();
}

#[test]
fn invalid_origins_are_refused_at_build_time() {
    let e = builder().allow_origins(["bad\norigin"]).build().unwrap_err();
    assert!(e.to_string().contains("invalid CORS origin"), "{e}");
}

// --- rate limit -------------------------------------------------------------------------------

fn small_limits() -> Option<HttpRateLimits> {
    Some(HttpRateLimits {
        anonymous_rate: 0.5,
        anonymous_burst: 3,
        authenticated_rate: 0.5,
        authenticated_burst: 5,
    })
}

#[actix_rt::test]
async fn http_rate_limit_answers_429_with_retry_after() {
    let srv = start(builder().http_rate_limits(small_limits()).root_token(ROOT_TOKEN));
    for _ in 0..3 {
        assert_eq!(get(&srv, "/assets/config.json").await.status, 200);
    }
    let r = get_with(&srv, "/assets/config.json", &[("origin", "http://a.example")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json(), json!({"detail": "Rate limit exceeded. Please slow down."}));
    // 0.5 tokens per second, bucket empty: 2 s until the next one.
    assert_eq!(r.header("retry-after"), Some("2"));
    // Upstream limits outside its CORS layer: a 429 carries no CORS headers.
    assert!(r.header("access-control-allow-origin").is_none());
    // Every route of the server shares the caller's bucket, preflights included.
    assert_eq!(get(&srv, "/ws-anonymous/info").await.status, 429);
    let r = request(
        "OPTIONS",
        &format!("{}/assets/config.json", srv.url()),
        &[("origin", "http://a.example"), ("access-control-request-method", "GET")],
    )
    .await;
    assert_eq!(r.status, 429);
    // Exempt: the health probes and websocket upgrades.
    assert_eq!(get(&srv, "/health/liveness").await.status, 200);
    assert_eq!(get(&srv, "/health/readiness").await.status, 200);
    let (resp, _ws) = awc::Client::new().ws(srv.ws_url()).connect().await.expect("websocket upgrade");
    assert_eq!(resp.status(), 101);
    // Another client IP (first X-Forwarded-For entry) has its own bucket.
    let r = get_with(&srv, "/assets/config.json", &[("x-forwarded-for", "203.0.113.9, 10.0.0.1")]).await;
    assert_eq!(r.status, 200);
    // A valid token uses the authenticated tier, keyed by its user.
    let alice = token("alice", &[("ws-user-alice", Permission::Admin)], None);
    for _ in 0..5 {
        let r = get_with(&srv, "/assets/config.json", &[("authorization", &bearer(&alice))]).await;
        assert_eq!(r.status, 200);
    }
    let r = get_with(&srv, "/assets/config.json", &[("authorization", &bearer(&alice))]).await;
    assert_eq!(r.status, 429);
    // ... by user *and* the workspace / client_id query parameters.
    let r = get_with(&srv, "/assets/config.json?client_id=c2", &[("authorization", &bearer(&alice))]).await;
    assert_eq!(r.status, 200);
    // The root token has a bucket of its own.
    let r = get_with(&srv, "/assets/config.json", &[("authorization", &bearer(ROOT_TOKEN))]).await;
    assert_eq!(r.status, 200);
    // An invalid token does not elevate: it falls back to the (empty) IP bucket.
    let r = get_with(&srv, "/assets/config.json", &[("authorization", "Bearer forged")]).await;
    assert_eq!(r.status, 429);
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn http_rate_limit_can_be_turned_off() {
    let srv = start(builder().http_rate_limits(None));
    for _ in 0..50 {
        assert_eq!(get(&srv, "/assets/config.json").await.status, 200);
    }
    srv.stop().await.unwrap();
}

#[actix_rt::test]
async fn default_http_rate_limit_is_upstreams_and_allows_a_burst() {
    let srv = start(builder());
    assert_eq!(srv.server().config().http_rate_limits, Some(HttpRateLimits::default()));
    let d = HttpRateLimits::default();
    assert_eq!((d.anonymous_rate, d.anonymous_burst), (100.0, 500));
    assert_eq!((d.authenticated_rate, d.authenticated_burst), (1000.0, 5000));
    for _ in 0..200 {
        assert_eq!(get(&srv, "/ws-anonymous/info").await.status, 200);
    }
    srv.stop().await.unwrap();
}

#[test]
fn bad_rate_limits_are_refused() {
    let limits = |rate: f64, burst: u32| {
        Some(HttpRateLimits { anonymous_rate: rate, anonymous_burst: burst, ..HttpRateLimits::default() })
    };
    assert!(builder().http_rate_limits(limits(0.0, 10)).build().is_err());
    assert!(builder().http_rate_limits(limits(f64::NAN, 10)).build().is_err());
    assert!(builder().http_rate_limits(limits(1.0, 0)).build().is_err());
}

// --- the binary -------------------------------------------------------------------------------

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[actix_rt::test]
async fn the_binary_serves_static_mounts_and_cors_flags() {
    let one = Tree::new(true);
    let two = Tree::new(false);
    let port = free_port();
    let mounts = [format!("/one:{}", one.dir().display()), format!("/two:{}", two.dir().display())];
    let child = Command::new(env!("CARGO_BIN_EXE_hypha-server"))
        .args(["--port", &port.to_string(), "--workers", "1", "--allow-origins", "https://app.example"])
        .env("HYPHA_DATA_DIR", one.base.join("data"))
        // Space-separated after one flag, as upstream's `nargs="*"`.
        .arg("--static-mounts")
        .args(&mounts)
        .env("JWT_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .env_remove("ALLOW_ORIGINS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hypha-server");
    let _child = KillOnDrop(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(resp) = awc::Client::new().get(format!("{base}/health/liveness")).send().await {
            assert_eq!(resp.status(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = request("GET", &format!("{base}/one"), &[]).await;
    assert_eq!((r.status, r.text()), (200, "<html>index</html>"));
    let r = request("GET", &format!("{base}/two/sub/a.txt"), &[("origin", "https://app.example")]).await;
    assert_eq!((r.status, r.text()), (200, "a"));
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
    let r = request("GET", &format!("{base}/two/hello.txt"), &[("origin", "https://other.example")]).await;
    assert!(r.header("access-control-allow-origin").is_none());
    assert_not_found(&request("GET", &format!("{base}/one/%2e%2e/secret.txt"), &[]).await, "traversal");
}

#[test]
fn the_binary_refuses_a_bad_static_mount_with_a_clear_error() {
    let tree = Tree::new(true);
    for (mount, expected) in [
        (format!("/x:{}", tree.base.join("missing").display()), "does not exist"),
        (format!("/ws:{}", tree.dir().display()), "collides with an existing route"),
        ("no-colon".to_owned(), "expected <mountpath>:<localdir>"),
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_hypha-server"))
            .args(["--port", "0", "--static-mounts", &mount])
            .env("HYPHA_DATA_DIR", tree.base.join("data"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hypha-server");
        let mut child = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{mount}: the server started instead of refusing");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{mount}");
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(stderr.contains(expected), "{mount}: {stderr}");
    }
}
