//! Calls `hello(name)` of a service and prints the result.
//!
//! ```sh
//! cargo run --release --example hello_client -- --server-url http://127.0.0.1:9527 \
//!     --service-id ws-user-.../abc:hello-world --name John
//! ```

use clap::Parser;
use hypha_rpc::client::{connect_to_server, ClientConfig, Error};

#[derive(Parser)]
struct Args {
    /// The server, e.g. http://127.0.0.1:9527.
    #[arg(long)]
    server_url: String,
    /// The full service id printed by hello_service.
    #[arg(long)]
    service_id: String,
    /// Who to greet.
    #[arg(long, default_value = "John")]
    name: String,
}

#[actix_rt::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let client = connect_to_server(ClientConfig::new(args.server_url)).await?;
    let svc = client.get_service(&args.service_id).await?;
    let greeting: String = svc.call_typed("hello", (args.name,)).await?;
    println!("{greeting}");
    client.disconnect().await
}
