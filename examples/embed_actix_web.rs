//! Mounts the Hypha server beside an application's own routes in one actix-web `App`.
//!
//! The application keeps its routes (`/api/status` here); Hypha adds its own (`/ws` for
//! the RPC websocket, `/health/*`, `/{workspace}/services/...` for the HTTP proxy). The
//! example starts the combined app on a free loopback port, sends one request to each
//! side, prints the answers and stops.
//!
//! ```sh
//! cargo run --example embed_actix_web
//! ```

use actix_web::{web, App, HttpResponse, HttpServer};
use hypha_rpc::server::{disable_nagle, Server};

async fn app_status() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"app": "instrument-control", "ok": true}))
}

#[actix_rt::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One Hypha server; `configure` can be called from every worker's `App`.
    let hypha = Server::builder().server_id("embedded").build()?;

    let app_hypha = hypha.clone();
    let http = HttpServer::new(move || {
        let hypha = app_hypha.clone();
        App::new().route("/api/status", web::get().to(app_status)).configure(move |cfg| hypha.configure(cfg))
    })
    // Small RPC frames must not wait for delayed ACKs (see `disable_nagle`).
    .on_connect(|conn, _| {
        disable_nagle(conn);
    })
    .disable_signals()
    .workers(1)
    .bind(("127.0.0.1", 0))?;
    let addr = http.addrs()[0];
    // Clients are told where to reconnect and where the HTTP proxy is.
    hypha.set_local_base_url(&format!("http://{addr}"));
    let running = http.run();
    let handle = running.handle();
    let server_task = actix_rt::spawn(running);

    let client = awc::Client::default();
    let mut app_answer = client.get(format!("http://{addr}/api/status")).send().await?;
    println!(
        "GET /api/status       -> {} {}",
        app_answer.status(),
        String::from_utf8_lossy(&app_answer.body().await?)
    );
    let mut hypha_answer = client.get(format!("http://{addr}/health/liveness")).send().await?;
    println!(
        "GET /health/liveness  -> {} {}",
        hypha_answer.status(),
        String::from_utf8_lossy(&hypha_answer.body().await?)
    );
    println!("Hypha RPC clients connect to http://{addr} (websocket ws://{addr}/ws)");

    hypha.shutdown();
    handle.stop(true).await;
    server_task.await??;
    Ok(())
}
