//! Callbacks: pass a Rust closure to a remote function, which calls it back while the
//! call runs.
//!
//! The example plays both sides through the server: it registers a service whose
//! `count_down(n, on_tick)` calls `on_tick(i)` for every step, then fetches that service
//! like any other client would and calls it with a closure. The closure lives only for
//! the duration of the call (a *session-scoped* callback, spec §9.4): once `count_down`
//! returns, the peer can no longer call it. For functions a peer may keep and call later,
//! see the `rintf_store` example.
//!
//! ```sh
//! cargo run --example callbacks -- --server-url http://127.0.0.1:9527
//! ```

use std::sync::{Arc, Mutex};

use clap::Parser;
use hypha_rpc::client::{callback, connect_to_server, ClientConfig, Error, RemoteFunction, Service};
use hypha_rpc::core::Value;

#[derive(Parser)]
struct Args {
    /// The server, e.g. http://127.0.0.1:9527.
    #[arg(long)]
    server_url: String,
}

#[actix_rt::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let client = connect_to_server(ClientConfig::new(args.server_url)).await?;

    // 1. The provider side: a function taking a number and a function. A parameter of type
    //    `RemoteFunction` receives whatever callable the caller passed (a Rust closure, a
    //    Python lambda, a JS function), and calling it sends a message back to the caller.
    let service = Service::builder("ticker")
        .function("count_down", |n: i64, on_tick: RemoteFunction| async move {
            for i in (1..=n).rev() {
                // Each call waits for the caller's closure to return.
                let _: Value = on_tick.call(vec![Value::from(i)]).await?;
            }
            Ok::<_, Error>("lift-off")
        })
        .build();
    let info = client.register_service(service).await?;
    println!("registered {}", info.id);

    // 2. The caller side: fetch the service (here: our own, through the server) and pass
    //    a closure. `callback` turns any async closure with serde arguments into a value
    //    that can be sent as an argument.
    let ticker = client.get_service(&info.id).await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let on_tick = callback(move |i: i64| {
        let record = record.clone();
        async move {
            println!("tick {i}");
            record.lock().map_err(|_| Error::Handler("poisoned".into()))?.push(i);
            Ok::<_, Error>(())
        }
    });
    let result = ticker.call("count_down", vec![Value::from(3), on_tick]).await?;
    println!("count_down returned {result:?}, ticks seen: {:?}", seen.lock().map(|s| s.clone()));

    client.disconnect().await
}
