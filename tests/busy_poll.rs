//! Busy polling (`hypha_actors::busy_poll`) follows the settings of both sides: the
//! server's `busy_poll` polls its workers after frames, the client's polls the
//! connection's thread, and zero on both means no polling at all. One test in a binary of
//! its own, since it reads the process-wide poll counter.

use std::time::Duration;

use hypha_actors::busy_poll::total_polls;
use hypha_rpc::client::{connect_to_server, ClientConfig, Error, Service, Visibility};
use hypha_rpc::server::Server;

/// Polls counted while a provider and a consumer (both with `client` as their
/// `busy_poll`) make 200 sequential calls through a server with `server` as its.
async fn polls_during_calls(server: Duration, client: Duration) -> u64 {
    let running = Server::builder()
        .workers(1)
        .busy_poll(server)
        .build()
        .expect("config")
        .start("127.0.0.1", 0)
        .expect("bind");
    let url = running.url();
    let before = total_polls();
    let config = |name: &str| ClientConfig::new(url.clone()).name(name).busy_poll(client);
    let provider = connect_to_server(config("provider")).await.expect("provider connects");
    let service = Service::builder("echo")
        .visibility(Visibility::Public)
        .function("echo", |x: i64| async move { Ok::<_, Error>(x) })
        .build();
    let info = provider.register_service(service).await.expect("register");
    let consumer = connect_to_server(config("consumer")).await.expect("consumer connects");
    let echo = consumer.get_service(&info.id).await.expect("get_service");
    for i in 0..200i64 {
        let back: i64 = echo.call_typed("echo", (i,)).await.expect("echo");
        assert_eq!(back, i);
    }
    consumer.disconnect().await.expect("consumer disconnects");
    provider.disconnect().await.expect("provider disconnects");
    let polls = total_polls() - before;
    running.stop().await.expect("the server stops");
    polls
}

#[actix_rt::test]
async fn busy_poll_follows_the_settings_of_both_sides() {
    let off = Duration::ZERO;
    // Far longer than a round trip even in a debug build, so that every window is a
    // near miss and polling surely happens (the default, 50 µs, adapts to the timing).
    let on = Duration::from_millis(20);
    assert_eq!(polls_during_calls(off, off).await, 0, "zero on both sides: nothing polls");
    assert!(polls_during_calls(on, off).await > 0, "the server's workers poll after frames");
    assert!(polls_during_calls(off, on).await > 0, "the clients' thread polls after frames");
}
