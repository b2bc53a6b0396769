//! Health probes (server spec §1.1, §1.6): `GET /health/liveness` and
//! `GET /health/readiness`, with the Python server's bodies.
//!
//! Upstream's probes report its store, Redis, event bus and pub/sub. This server keeps that
//! state in process (as upstream does with its default in-process fakeredis, which also
//! reports `"redis": "connected"`), so while it runs everything is ready; during a graceful
//! shutdown both probes answer 503 `DOWN`, so a load balancer stops sending clients.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::ServerState;

/// Mounts the probes.
pub fn configure(state: Arc<ServerState>, cfg: &mut web::ServiceConfig) {
    let live = state.clone();
    cfg.route("/health/liveness", web::get().to(move || std::future::ready(liveness(&live))));
    cfg.route("/health/readiness", web::get().to(move || std::future::ready(readiness(&state))));
}

fn down(detail: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({"status": "DOWN", "detail": detail}))
}

/// `200 {"status":"OK","detail":{"store":"ready","redis":"connected","event_bus":"ready","pubsub":"healthy"}}`.
pub fn readiness(state: &ServerState) -> HttpResponse {
    if state.is_shutting_down() {
        return down(super::SHUTDOWN_REASON);
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
