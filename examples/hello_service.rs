//! Registers the public service `hello-world` with one function, `hello(name)`, prints
//! its full id as `service_id=<id>` and serves until killed.
//!
//! ```sh
//! cargo run --release --example hello_service -- --server-url http://127.0.0.1:9527
//! ```

use clap::Parser;
use hypha_rpc::client::{
    connect_to_server, ClientConfig, Error, FunctionDef, Param, ParamType, Service, Visibility,
};

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
    // Declaring the parameter gives it a keyword name (`hello(name="John")` from Python)
    // and puts it into the function's JSON schema.
    let hello =
        FunctionDef::new("hello", |name: String| async move { Ok::<_, Error>(format!("Hello {name}")) })
            .description("Greets someone by name.")
            .param(Param::new("name", ParamType::String));
    let service = Service::builder("hello-world")
        .name("Hello World")
        .description("A service that says hello")
        .visibility(Visibility::Public)
        .function_def(hello)
        .build();
    let info = client.register_service(service).await?;
    println!("service_id={}", info.id);
    // Serve until killed (SIGTERM/SIGINT end the process).
    std::future::pending::<()>().await;
    Ok(())
}
