//! Many Rust clients at once against our server (in-process): they all connect, register
//! a service and answer calls. The scale figures (10,000 clients, memory per client) are
//! a benchmark (`benches/many_clients.sh`); this is the functional side of it.

use std::time::Duration;

use futures_util::future::join_all;
use hypha_rpc::client::{connect_to_server, Client, ClientConfig, Error, Service, Visibility};
use hypha_rpc::core::Value;
use hypha_rpc::server::Server;

const CLIENTS: usize = 300;

async fn connect_and_register(url: String, i: usize) -> Result<(Client, String), Error> {
    let client = connect_to_server(ClientConfig::new(url).name(format!("many-{i}"))).await?;
    let service = Service::builder(format!("svc-{i}"))
        .visibility(Visibility::Public)
        .function("echo", |x: Value| async move { Ok::<_, Error>(x) })
        .build();
    let info = client.register_service(service).await?;
    Ok((client, info.id))
}

/// 300 clients connect at once and each registers a service, while the manager's inbox
/// holds only 8 frames: a client whose bootstrap call finds it full waits for room
/// instead of being refused ("Server busy"), so all of them register. Then every service
/// answers a call from another client.
#[actix_rt::test]
async fn a_burst_of_clients_all_register_and_answer_even_with_a_small_manager_inbox() {
    let srv = Server::builder()
        .manager_inbox(8, Duration::from_secs(30))
        .build()
        .expect("valid config")
        .start("127.0.0.1", 0)
        .expect("bind");
    let url = srv.url();
    let results = join_all((0..CLIENTS).map(|i| connect_and_register(url.clone(), i))).await;
    let mut clients = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(c) => clients.push(c),
            Err(e) => panic!("client {i} failed: {e}"),
        }
    }
    let state = srv.server().state().clone();
    for (c, _) in &clients {
        assert!(state.registry.builtin(c.workspace(), c.client_id()).is_some());
    }

    let caller = connect_to_server(ClientConfig::new(url.as_str())).await.expect("caller connects");
    for (i, (_, id)) in clients.iter().enumerate() {
        let svc = caller.get_service(id).await.unwrap_or_else(|e| panic!("get_service {id}: {e}"));
        let out = svc.call("echo", vec![Value::from(i as i64)]).await.expect("echo");
        assert_eq!(out, Value::from(i as i64));
    }
    caller.disconnect().await.expect("disconnect");
    join_all(clients.iter().map(|(c, _)| c.disconnect())).await;
    srv.stop().await.expect("stop");
}
