//! Protocol-core throughput: what one package costs to build and to read.
//!
//! * a small call package (`add(1, b=5)` with a compact promise), encode and decode, ns/op;
//! * a 64 MiB float32 ndarray package, encode and decode, GB/s;
//! * for scale, on the same machine in the same run: a 64 MiB `memcpy` (into warm memory,
//!   and into a fresh allocation, which is what building a frame costs at least) and
//!   64 MiB through a TCP socket on 127.0.0.1 (the floor any websocket transport sits on).
//!
//! Run: `cargo bench --bench codec`. The README's performance section quotes it.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hypha_rpc::core::codec::{self, CodecRegistry, DecodeContext, EncodeContext};
use hypha_rpc::core::msgpack::DecodeLimits;
use hypha_rpc::core::package::{decode_package, encode_package};
use hypha_rpc::core::session::{SessionConfig, SessionTable};
use hypha_rpc::core::{map, Map, NdArray, Value};

const BIG: usize = 64 << 20;

/// Encodes `args` as a call from `ws/cons` to `ws/prov` and packs the package, as a
/// client does for every call.
fn build_call(
    args: Vec<Value>,
    kwargs: Option<Map>,
    reg: &CodecRegistry,
    table: &mut SessionTable,
) -> Vec<u8> {
    let (args, with_kwargs) = codec::encode_args(args, kwargs);
    let mut cx = EncodeContext::new("ws/cons", reg, table);
    cx.session = Some("S1");
    let args: Vec<Value> = args.iter().map(|a| codec::encode(a, &mut cx).expect("encode")).collect();
    let main = map! {
        "type" => "method", "from" => "ws/cons", "to" => "ws/prov",
        "method" => "services.demo.add", "session" => "S1",
    };
    let mut extra = map! { "args" => args, "promise" => "*", "t" => 15.0 };
    if with_kwargs {
        extra.insert("with_kwargs".into(), Value::Bool(true));
    }
    encode_package(&main, Some(&extra)).expect("pack")
}

/// Decodes a package and its arguments, as a callee does for every call.
fn read_call(frame: &Bytes, reg: &CodecRegistry) -> Value {
    let mut pkg = decode_package(frame, &DecodeLimits::default()).expect("package");
    let args = pkg.extra.as_mut().and_then(|e| e.shift_remove("args")).unwrap_or_default();
    let cx =
        DecodeContext { remote_workspace: Some("ws"), remote_parent: Some("S1"), ..DecodeContext::new(reg) };
    codec::decode(args, &cx).expect("decode")
}

fn small_call(c: &mut Criterion) {
    let reg = CodecRegistry::new();
    let mut table = SessionTable::new(SessionConfig::default(), "cons", Instant::now());
    let mut g = c.benchmark_group("small_call");
    g.bench_function("encode", |b| {
        b.iter(|| build_call(black_box(vec![Value::from(1)]), Some(map! { "b" => 5 }), &reg, &mut table))
    });
    let frame = Bytes::from(build_call(vec![Value::from(1)], Some(map! { "b" => 5 }), &reg, &mut table));
    g.bench_function("decode", |b| b.iter(|| read_call(black_box(&frame), &reg)));
    g.finish();
}

fn big_array(c: &mut Criterion) {
    let reg = CodecRegistry::new();
    let mut table = SessionTable::new(SessionConfig::default(), "cons", Instant::now());
    let elems = BIG / 4;
    let mut g = c.benchmark_group("ndarray_f32_64MiB");
    g.throughput(Throughput::Bytes(BIG as u64)).sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function("encode", |b| {
        b.iter_batched(
            || {
                ndarray::Array1::<f32>::from_elem(elems, 1.5)
                    .into_shape_with_order((4096, elems / 4096))
                    .unwrap()
            },
            // The array's buffer moves into the package without a copy; packing copies
            // it once into the frame.
            |a| build_call(vec![Value::from(NdArray::from_array(a))], None, &reg, &mut table),
            criterion::BatchSize::LargeInput,
        )
    });
    let a =
        ndarray::Array1::<f32>::from_elem(elems, 1.5).into_shape_with_order((4096, elems / 4096)).unwrap();
    let frame = Bytes::from(build_call(vec![Value::from(NdArray::from_array(a))], None, &reg, &mut table));
    // Package + `_rtype` decode alone: the array's bytes stay a slice of the frame.
    g.bench_function("decode_zero_copy", |b| b.iter(|| read_call(black_box(&frame), &reg)));
    // The same plus an `f32` view: borrowed when the payload happens to be 4-byte aligned
    // in the frame, else copied once into fresh memory (msgpack does not align `bin`).
    g.bench_function("decode_to_f32_view", |b| {
        b.iter(|| {
            let args = read_call(&frame, &reg);
            let Some(Value::NdArray(arr)) = args.as_list().and_then(|l| l.first()) else { panic!("ndarray") };
            // A view: borrowed from the frame when aligned, copied once otherwise.
            let view = arr.view::<f32>().expect("f32 view");
            black_box(view[[0, 0]])
        })
    });
    g.finish();
}

fn machine_floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("machine_64MiB");
    g.throughput(Throughput::Bytes(BIG as u64)).sample_size(10).measurement_time(Duration::from_secs(8));
    let src = vec![7u8; BIG];
    let mut dst = vec![0u8; BIG];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(dst[BIG - 1])
        })
    });
    // A copy into freshly allocated memory: the floor for anything that must produce a
    // new frame (page faults included), which is what packing a package does.
    g.bench_function("memcpy_into_fresh_vec", |b| {
        b.iter(|| {
            let mut v = Vec::with_capacity(BIG);
            v.extend_from_slice(black_box(&src));
            v
        })
    });

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    if total.is_multiple_of(BIG) {
                        // One byte back per 64 MiB so the sender times delivery, not buffering.
                        s.write_all(&[1]).expect("ack");
                    }
                }
            }
        }
    });
    let mut tx = TcpStream::connect(addr).expect("connect");
    tx.set_nodelay(true).expect("nodelay");
    g.bench_function("tcp_loopback", |b| {
        b.iter(|| {
            tx.write_all(&src).expect("send");
            let mut ack = [0u8; 1];
            tx.read_exact(&mut ack).expect("ack");
        })
    });
    drop(tx);
    sink.join().expect("sink thread");
    g.finish();
}

criterion_group!(benches, small_call, big_array, machine_floor);
criterion_main!(benches);
