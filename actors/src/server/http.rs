//! Health, info and config routes (server spec §1.1, §1.6):
//!
//! | route | what |
//! | --- | --- |
//! | `GET /health/liveness`, `GET /health/readiness` | the probes, with the Python server's bodies |
//! | `GET /assets/config.json` | the caller's identity plus the server's URLs and version |
//! | `GET /{ws}/info` | the WorkspaceInfo dump, for callers with read permission on `ws` |
//!
//! Upstream's probes report its store, Redis, event bus and pub/sub. This server keeps that
//! state in process (as upstream does with its default in-process fakeredis, which also
//! reports `"redis": "connected"`), so while it runs everything is ready; during a graceful
//! shutdown both probes answer 503 `DOWN`, so a load balancer stops sending clients.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpRequest, HttpResponse};
use hypha_core::auth::Permission;
use serde_json::{json, Value as Json};

use super::layer::HttpLayer;
use super::login::LOGIN_SERVICE_ID;
use super::proxy::identify;
use super::ServerState;

/// Mounts the probes and `/assets/config.json`.
pub fn configure(state: Arc<ServerState>, layer: &HttpLayer, cfg: &mut web::ServiceConfig) {
    let data = web::Data::from(state);
    cfg.service(
        web::resource("/health/liveness")
            .wrap(layer.clone())
            .app_data(data.clone())
            .route(web::get().to(|s: web::Data<ServerState>| async move { liveness(&s) })),
    );
    cfg.service(
        web::resource("/health/readiness")
            .wrap(layer.clone())
            .app_data(data.clone())
            .route(web::get().to(|s: web::Data<ServerState>| async move { readiness(&s) })),
    );
    cfg.service(web::resource("/assets/config.json").wrap(layer.clone()).app_data(data).route(
        web::get().to(|req: HttpRequest, s: web::Data<ServerState>| async move { config_json(&s, &req) }),
    ));
}

/// Mounts `/{ws}/info` (after the static mounts, which take precedence as upstream).
pub fn configure_workspace_routes(state: Arc<ServerState>, layer: &HttpLayer, cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/{ws}/info").wrap(layer.clone()).app_data(web::Data::from(state)).route(
        web::get().to(|req: HttpRequest, ws: web::Path<String>, s: web::Data<ServerState>| async move {
            workspace_info(&s, &req, &ws)
        }),
    ));
}

/// `GET /assets/config.json`: `{"user": <caller's UserInfo dump>, "server_id",
/// "hypha_version", "public_base_url", "local_base_url", "auth0_client_id", "auth0_domain",
/// "auth0_audience", "auth0_issuer", "login_service_url"}` (upstream's keys and order).
/// This server has no Auth0 integration: `auth0_client_id` and `auth0_domain` are null,
/// audience and issuer are the ones its own tokens carry. A bad token is a 401.
pub fn config_json(state: &ServerState, req: &HttpRequest) -> HttpResponse {
    let caller = match identify(state, req) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let public = state.public_base_url();
    HttpResponse::Ok().json(json!({
        "user": caller.user.to_json(),
        "server_id": state.config.server_id,
        "hypha_version": state.config.hypha_version,
        "public_base_url": public,
        "local_base_url": state.local_base_url(),
        "auth0_client_id": null,
        "auth0_domain": null,
        "auth0_audience": state.config.jwt.audience,
        "auth0_issuer": state.config.jwt.issuer,
        "login_service_url": format!("{public}/public/services/{LOGIN_SERVICE_ID}"),
    }))
}

/// `GET /{ws}/info`: read permission first (so an unknown workspace is a 403 for callers
/// without a wildcard scope, as upstream), then existence (404), then the dump.
pub fn workspace_info(state: &ServerState, req: &HttpRequest, ws: &str) -> HttpResponse {
    let caller = match identify(state, req) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if !caller.user.check(ws, Permission::Read) {
        return HttpResponse::Forbidden().json(json!({
            "success": false,
            "detail": format!("{} has no permission to access {ws}", caller.user.id),
        }));
    }
    match state.workspaces.get(ws) {
        Some(record) => {
            let dump =
                hypha_core::serde_value::from_value_ref::<Json>(&record.to_value()).unwrap_or(Json::Null);
            HttpResponse::Ok().json(dump)
        }
        None => HttpResponse::NotFound()
            .json(json!({"success": false, "detail": format!("Workspace '{ws}' not found")})),
    }
}

fn down(detail: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({"status": "DOWN", "detail": detail}))
}

/// `200 {"status":"OK","detail":{"store":"ready","redis":"connected","event_bus":"ready","pubsub":"healthy"}}`;
/// 503 `DOWN` while startup functions run (upstream's port is not even open then) and
/// during a shutdown.
pub fn readiness(state: &ServerState) -> HttpResponse {
    if state.is_shutting_down() {
        return down(super::SHUTDOWN_REASON);
    }
    if state.is_starting() {
        return down(super::STARTING_REASON);
    }
    HttpResponse::Ok().json(json!({
        "status": "OK",
        "detail": {"store": "ready", "redis": "connected", "event_bus": "ready", "pubsub": "healthy"},
    }))
}

/// `200 {"status":"OK","detail":{"store":"ready","event_bus_failures":0,"circuit_breaker":"closed",
/// "pubsub":"healthy","last_successful_connection":"<naive ISO time>"}}`; the time is when
/// the in-process store came up (server start), in UTC.
pub fn liveness(state: &ServerState) -> HttpResponse {
    if state.is_shutting_down() {
        return down(super::SHUTDOWN_REASON);
    }
    HttpResponse::Ok().json(json!({
        "status": "OK",
        "detail": {
            "store": "ready",
            "event_bus_failures": 0,
            "circuit_breaker": "closed",
            "pubsub": "healthy",
            "last_successful_connection": naive_iso(state.started_at()),
        },
    }))
}

/// A naive UTC ISO timestamp as Python's `datetime.isoformat()` prints it (the shape of
/// upstream's `last_successful_connection`).
pub fn naive_iso(t: SystemTime) -> String {
    let micros = t.duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or_default();
    super::events::iso_from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn iso_times() {
        // Python's isoformat() leaves out a zero fraction.
        assert_eq!(naive_iso(UNIX_EPOCH), "1970-01-01T00:00:00");
        // 2026-11-21T05:58:50.805893 (a timestamp from the spec's liveness sample).
        let t = UNIX_EPOCH + Duration::from_micros(1_795_240_730_805_893);
        assert_eq!(naive_iso(t), "2026-11-21T05:58:50.805893");
        // Leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(naive_iso(t), "2000-02-29T00:00:00");
    }

    #[actix_rt::test]
    async fn probes_answer_ok_then_down_on_shutdown() {
        use actix_web::body::MessageBody;
        let state = ServerState::new(crate::server::ServerConfig::default()).unwrap();
        let body = |r: HttpResponse| {
            let b = r.into_body().try_into_bytes().unwrap_or_default();
            serde_json::from_slice::<serde_json::Value>(&b).unwrap()
        };
        let r = readiness(&state);
        assert_eq!(r.status(), 200);
        assert_eq!(
            body(r),
            json!({"status":"OK","detail":{"store":"ready","redis":"connected","event_bus":"ready","pubsub":"healthy"}})
        );
        let r = liveness(&state);
        assert_eq!(r.status(), 200);
        let b = body(r);
        let keys: Vec<_> = b["detail"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            ["store", "event_bus_failures", "circuit_breaker", "pubsub", "last_successful_connection"]
        );
        state.shutdown();
        assert_eq!(readiness(&state).status(), 503);
        assert_eq!(body(liveness(&state))["status"], "DOWN");
    }
}
