//! Generators: a Rust `Stream` returned by a service is a remote generator for the
//! caller, and a remote generator is consumed in Rust as a `Stream`.
//!
//! The example registers a service whose `squares(n)` streams `0, 1, 4, ...` and whose
//! `ticks()` never ends, then consumes both through the server as a client would:
//! `squares` until it is exhausted, `ticks` for three items before closing it early. A
//! Python caller would write `async for x in await svc.squares(5)` for the same stream.
//!
//! Items are pulled one call at a time: the producer's stream is polled only when the
//! consumer asks for the next item, and it is dropped when it ends, when the consumer
//! closes it (or drops it), or when the consumer disconnects.
//!
//! ```sh
//! cargo run --example generator_stream -- --server-url http://127.0.0.1:9527
//! ```

use std::time::Duration;

use clap::Parser;
use futures_util::{stream, StreamExt, TryStreamExt};
use hypha_rpc::client::{connect_to_server, generator, ClientConfig, Error, Service};

#[derive(Parser)]
struct Args {
    /// The server, e.g. http://127.0.0.1:9527.
    #[arg(long)]
    server_url: String,
}

/// Runs when the `ticks` stream is dropped: the Rust analogue of a generator's `finally`.
struct Goodbye;

impl Drop for Goodbye {
    fn drop(&mut self) {
        println!("(producer) ticks stream closed");
    }
}

#[actix_rt::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let client = connect_to_server(ClientConfig::new(args.server_url)).await?;

    // 1. The producer: functions that return `generator(stream)`. Any
    //    `Stream<Item = Result<T, E>>` works, with `T: Serialize` and `E: Display`; an
    //    `Err` item is raised in the consumer's loop and ends the stream.
    let service = Service::builder("streams")
        .function("squares", |n: i64| async move {
            generator(stream::iter((0..n).map(|i| Ok::<_, Error>(i * i))))
        })
        .function("ticks", || async move {
            let goodbye = Goodbye;
            let ticks = stream::unfold(0_u64, |i| async move {
                actix_rt::time::sleep(Duration::from_millis(100)).await;
                Some((Ok::<_, Error>(i), i + 1))
            })
            // Keep `goodbye` inside the stream so it is dropped with it.
            .map(move |item| {
                let _keep = &goodbye;
                item
            });
            generator(ticks)
        })
        .build();
    let info = client.register_service(service).await?;
    println!("registered {}", info.id);

    // 2. The consumer: `call_generator` returns a `RemoteGenerator`, a `Stream` of values;
    //    `typed::<T>()` converts each item.
    let streams = client.get_service(&info.id).await?;
    let squares: Vec<i64> =
        streams.call_generator("squares", vec![5.into()]).await?.typed::<i64>().try_collect().await?;
    println!("squares: {squares:?}");

    // 3. Stopping early: take three items, then close. (Dropping the generator closes it
    //    too, without waiting for the producer's acknowledgement.)
    let mut ticks = streams.call_generator("ticks", vec![]).await?.typed::<u64>();
    for _ in 0..3 {
        if let Some(tick) = ticks.next().await {
            println!("tick {}", tick?);
        }
    }
    ticks.close().await;
    // Give the producer's close a moment to be logged before we disconnect.
    actix_rt::time::sleep(Duration::from_millis(200)).await;

    client.disconnect().await
}
