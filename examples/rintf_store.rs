//! `_rintf` interfaces: hand a peer an object whose functions it may keep and call after
//! the call that carried it has returned.
//!
//! A plain callback (see `callbacks`) dies with its call. An [`Interface`] instead becomes
//! a small service that only the receiving peer can call, until that peer calls the
//! object's `_dispose()`, disconnects, or we unregister it. This is how a client hands out
//! an event sink, a progress reporter, or a handle to some state.
//!
//! The example registers a `registry` service that stores listeners (`add_listener(obj)`)
//! and notifies them later (`publish(message)`), then, as a client, passes it a listener
//! object, publishes twice, and finally disposes of the listener from the service side.
//! It also shows the receiving side in Rust: a `RemoteInterface` parameter is a peer's
//! object whose functions can be called at any later time.
//!
//! ```sh
//! cargo run --example rintf_store -- --server-url http://127.0.0.1:9527
//! ```

use std::sync::{Arc, Mutex};

use clap::Parser;
use hypha_rpc::client::{connect_to_server, ClientConfig, Error, Interface, RemoteInterface, Service};
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

    // 1. The service side: it keeps the objects it is given. `RemoteInterface` is a
    //    peer's object; cloning it and storing it is all it takes to call it later.
    let listeners: Arc<Mutex<Vec<RemoteInterface>>> = Arc::default();
    let (stored, notified, dropped) = (listeners.clone(), listeners.clone(), listeners.clone());
    let service = Service::builder("registry")
        .function("add_listener", move |obj: RemoteInterface| {
            let stored = stored.clone();
            async move {
                println!("(service) stored listener {:?}", obj.service_id());
                stored.lock().map_err(|_| Error::Handler("poisoned".into()))?.push(obj);
                Ok::<_, Error>(())
            }
        })
        .function("publish", move |message: String| {
            let notified = notified.clone();
            async move {
                let all = notified.lock().map_err(|_| Error::Handler("poisoned".into()))?.clone();
                for listener in &all {
                    listener.call("on_message", vec![Value::from(message.as_str())]).await?;
                }
                Ok::<_, Error>(all.len())
            }
        })
        .function("remove_all", move || {
            let dropped = dropped.clone();
            async move {
                let all =
                    std::mem::take(&mut *dropped.lock().map_err(|_| Error::Handler("poisoned".into()))?);
                for listener in &all {
                    // Tells the owner it may free the object: its service goes away.
                    listener.dispose().await?;
                }
                Ok::<_, Error>(all.len())
            }
        })
        .build();
    let info = client.register_service(service).await?;
    println!("registered {}", info.id);

    // 2. The client side: an object with one function. `Interface::builder()` works like
    //    `Service::builder()`; `.to_value()` makes the argument (a map marked `_rintf`).
    let listener = Interface::builder()
        .function("on_message", |message: String| async move {
            println!("(listener) got {message:?}");
            Ok::<_, Error>(())
        })
        .build()?;
    let registry = client.get_service(&info.id).await?;
    registry.call("add_listener", vec![listener.to_value()]).await?;

    // The `add_listener` call has returned, yet the service can still reach the listener.
    let n = registry.call("publish", vec![Value::from("first")]).await?;
    println!("publish reached {n:?} listener(s)");
    registry.call("publish", vec![Value::from("second")]).await?;
    println!("local services while the listener is stored: {}", client.stats().await?.local_services);

    // 3. The holder disposes of it: our `_rintf_` service is removed.
    registry.call("remove_all", vec![]).await?;
    println!("local services after dispose: {}", client.stats().await?.local_services);

    client.disconnect().await
}
