//! The blocking client: plain `fn main`, no async, no runtime in sight.
//!
//! ```sh
//! cargo run --release --example blocking_client -- --server-url http://127.0.0.1:9527
//! ```
//!
//! It registers a service, fetches it back through the server, calls it from the main
//! thread and from four worker threads at once, and disconnects. `hypha_rpc::blocking`
//! runs the async client on a thread of its own; every method here just waits for it.

use clap::Parser;
use hypha_rpc::blocking;
use hypha_rpc::client::{ClientConfig, Error, Service, Visibility};

#[derive(Parser)]
struct Args {
    /// The server, e.g. http://127.0.0.1:9527.
    #[arg(long)]
    server_url: String,
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    // Connecting starts the client's runtime thread; it ends when the client is dropped.
    let client = blocking::connect_to_server(ClientConfig::new(args.server_url))?;
    println!("connected to workspace {} as {}", client.workspace(), client.client_id());

    // Service functions are still async closures: they run on the runtime thread.
    let service = Service::builder("blocking-hello")
        .visibility(Visibility::Public)
        .function("hello", |name: String| async move { Ok::<_, Error>(format!("Hello {name}")) })
        .function("add", |a: i64, b: i64| async move { Ok::<_, Error>(a + b) })
        .build();
    let info = client.register_service(service)?;
    println!("service_id={}", info.id);

    // A proxy whose calls block until the answer is back.
    let svc = client.get_service(&info.id)?;
    let greeting: String = svc.call_typed("hello", ("John",))?;
    println!("{greeting}");

    // The proxy is cheap to clone and can be used from several threads at once.
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let svc = svc.clone();
            std::thread::spawn(move || svc.call_typed::<_, i64>("add", (t, 100)))
        })
        .collect();
    for (t, w) in workers.into_iter().enumerate() {
        let sum = w.join().expect("worker thread")?;
        println!("thread {t}: add({t}, 100) = {sum}");
    }

    client.disconnect()
}
