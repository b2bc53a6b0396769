//! Arrays across the wire: a service that takes and returns `ndarray` arrays, called with
//! a 2-D float64 matrix, a 64 MB float32 vector (chunked through the server and
//! reassembled), complex numbers, and a float16 array that Rust keeps as raw bytes.
//!
//! ```sh
//! cargo run --release --example ndarray_transfer -- --server-url http://127.0.0.1:9527
//! ```
//!
//! On the Python side the same service is called with numpy arrays:
//! `await svc.scale(np.eye(3), 2.0)` returns a numpy array.

use std::time::Instant;

use clap::Parser;
use hypha_rpc::client::{
    connect_to_server, ClientConfig, DType, Error, NdArray, NdArrayOf, Service, Visibility,
};
use ndarray::{Array1, Array2, Ix1, Ix2};
use num_complex::Complex;

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

    // `NdArrayOf<T, D>` is a typed array parameter or result: numpy's ndarray on the wire
    // (`_rtype: "ndarray"`, C order, little-endian). `D` may be a fixed dimension (Ix2)
    // or dynamic (the default, IxDyn). A dtype or dimension mismatch is a clear error for
    // the caller, not a panic.
    let service = Service::builder("arrays")
        .visibility(Visibility::Public)
        .function("scale", |m: NdArrayOf<f64, Ix2>, k: f64| async move { Ok::<_, Error>(NdArrayOf(m.0 * k)) })
        .function("echo", |v: NdArrayOf<f32, Ix1>| async move { Ok::<_, Error>(v) })
        .function("conj", |z: NdArrayOf<Complex<f64>>| async move {
            Ok::<_, Error>(NdArrayOf(z.0.mapv(|c| c.conj())))
        })
        // `NdArray` is the untyped form: any dtype numpy has, bytes kept as they came.
        .function("describe", |a: NdArray| async move {
            Ok::<_, Error>(format!("{} {:?} ({} bytes)", a.dtype, a.shape, a.data.len()))
        })
        .build();
    let info = client.register_service(service).await?;
    let svc = client.get_service(&info.id).await?;

    let eye = Array2::<f64>::eye(3);
    let scaled: NdArrayOf<f64, Ix2> = svc.call_typed("scale", (NdArrayOf(eye), 2.0)).await?;
    println!("scale(eye(3), 2) =\n{}", scaled.0);

    let z = Array1::from(vec![Complex::new(1.0, 2.0), Complex::new(-3.0, 0.5)]).into_dyn();
    let conj: NdArrayOf<Complex<f64>> = svc.call_typed("conj", (NdArrayOf(z),)).await?;
    println!("conj = {}", conj.0);

    // 64 MB: the request and the reply are each split into 256 KiB chunks that the server
    // forwards one by one; the receiver reassembles them. Handing the array over by value
    // lets the client send its buffer without copying it.
    let big = Array1::from_iter((0..16 * 1024 * 1024).map(|i| i as f32));
    let t = Instant::now();
    let back: NdArrayOf<f32, Ix1> = svc.call_typed("echo", (NdArrayOf(big.clone()),)).await?;
    let secs = t.elapsed().as_secs_f64();
    assert!(back.0 == big);
    println!("64 MB float32 echo: {secs:.3} s ({:.0} MB/s)", 64.0 * 1.048_576 / secs);

    // float16 has no Rust element type: build the bytes yourself (1.0 and 2.0 in IEEE
    // half precision) and send them as an untyped NdArray.
    let half = NdArray { dtype: DType::Float16, shape: vec![2], data: vec![0x00, 0x3c, 0x00, 0x40].into() };
    let text: String = svc.call_typed("describe", (half,)).await?;
    println!("describe(float16) = {text}");

    client.disconnect().await
}
