//! Golden packages from the real Python client (hypha-rpc 0.21.47).
//!
//! `tests/golden/generate.py` recorded these frames between two stock Python RPC engines;
//! `tests/golden/fixtures/manifest.json` says what each one must decode to, in a small
//! tagged JSON format (see `tests/golden/README.md`). This test:
//!
//! 1. decodes every fixture with hypha-core (package + `_rtype` codec) and checks the
//!    result against the manifest, value by value;
//! 2. re-encodes every decoded package with hypha-core and asks the stock Python decoder
//!    (`tests/golden/check.py`) whether it reads back to objects equal to the originals.
//!
//! Step 2 needs the project's Python venv (`scripts/setup-python.sh`, run by
//! `scripts/test.sh`); without it the test fails: a missing peer is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use hypha_core::codec::{
    self, CodecError, CodecRegistry, DecodeContext, EncodeContext, ObjectSink, StoredFunction,
};
use hypha_core::msgpack::DecodeLimits;
use hypha_core::package::{decode_package, encode_package};
use hypha_core::{
    DType, Function, Generator, LocalFunction, LocalGenerator, Map, PromiseMode, RemoteMethod, Value,
};
use serde_json::Value as Json;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn manifest() -> Json {
    let text = std::fs::read_to_string(golden_dir().join("fixtures/manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// The Rust side of the `cell` codec the fixtures use (`{value, label}`).
#[derive(Debug, Clone, PartialEq)]
struct Cell {
    value: Value,
    label: String,
}

fn registry() -> CodecRegistry {
    let mut reg = CodecRegistry::new();
    reg.register(
        "cell",
        |c: &Cell| {
            Ok::<_, String>(Value::Map(
                hypha_core::map! { "value" => c.value.clone(), "label" => c.label.clone() },
            ))
        },
        Some(|mut m: Map| {
            let value = m.shift_remove("value").unwrap_or_default();
            match m.shift_remove("label") {
                Some(Value::Str(label)) => Ok(Cell { value, label }),
                other => Err(format!("cell.label must be a str, got {other:?}")),
            }
        }),
    );
    reg
}

/// Re-encoding decoded fixtures only forwards remote descriptors; a local object showing
/// up here would be a codec bug.
struct NoLocalObjects;

impl ObjectSink for NoLocalObjects {
    fn store_function(&mut self, _: Option<&str>, _: &LocalFunction) -> Result<StoredFunction, CodecError> {
        panic!("decoded fixtures hold no local functions")
    }
    fn store_generator(
        &mut self,
        _: Option<&str>,
        _: &LocalGenerator,
    ) -> Result<(String, String), CodecError> {
        panic!("decoded fixtures hold no local generators")
    }
    fn register_interface(
        &mut self,
        _: Option<&str>,
        _: Vec<(String, LocalFunction)>,
    ) -> Result<String, CodecError> {
        panic!("decoded fixtures hold no _rintf objects")
    }
    fn store_forwarder(&mut self, _: Option<&str>, m: &RemoteMethod) -> Result<String, CodecError> {
        panic!("descriptor {m:?} should have been forwarded as is")
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// Checks `actual` against the tagged JSON `expected`; returns the mismatches found.
struct Matcher<'a> {
    file_bytes: &'a [u8],
    errors: Vec<String>,
}

impl Matcher<'_> {
    fn fail(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.errors.push(format!("{path}: {msg}"));
    }

    fn check(&mut self, path: &str, expected: &Json, actual: &Value) {
        match expected {
            Json::Null => self.expect(path, matches!(actual, Value::Nil), "nil", actual),
            Json::Bool(b) => self.expect(path, actual == &Value::Bool(*b), &format!("{b}"), actual),
            Json::Number(n) => {
                if let Some(i) = n.as_i64() {
                    self.expect(path, actual == &Value::Int(i), &format!("int {i}"), actual)
                } else if let Some(u) = n.as_u64() {
                    self.expect(path, actual == &Value::from(u), &format!("int {u}"), actual)
                } else {
                    let f = n.as_f64().expect("number");
                    self.expect(
                        path,
                        matches!(actual, Value::F64(x) if x.to_bits() == f.to_bits()),
                        &format!("float {f}"),
                        actual,
                    )
                }
            }
            Json::String(s) => self.expect(path, actual.as_str() == Some(s), &format!("str {s:?}"), actual),
            Json::Array(items) => match actual {
                Value::List(got) if got.len() == items.len() => {
                    for (i, (e, a)) in items.iter().zip(got).enumerate() {
                        self.check(&format!("{path}[{i}]"), e, a);
                    }
                }
                _ => self.fail(path, format!("expected list of {}, got {actual:?}", items.len())),
            },
            Json::Object(obj) => {
                let tag =
                    (obj.len() == 1).then(|| obj.iter().next()).flatten().filter(|(k, _)| k.starts_with('$'));
                match tag {
                    Some((k, v)) => self.check_tag(path, k, v, actual),
                    None => self.check_map(path, obj, actual),
                }
            }
        }
    }

    fn expect(&mut self, path: &str, ok: bool, what: &str, actual: &Value) {
        if !ok {
            self.fail(path, format!("expected {what}, got {actual:?}"));
        }
    }

    fn check_map(&mut self, path: &str, obj: &serde_json::Map<String, Json>, actual: &Value) {
        let Value::Map(got) = actual else {
            return self.fail(path, format!("expected map, got {}", actual.kind()));
        };
        let mut want: Vec<&String> = obj.keys().collect();
        let mut have: Vec<&String> = got.keys().collect();
        want.sort();
        have.sort();
        if want != have {
            return self.fail(path, format!("keys {want:?} != {have:?}"));
        }
        for (k, e) in obj {
            self.check(&format!("{path}.{k}"), e, &got[k.as_str()]);
        }
    }

    fn bytes_of(&self, tag: &str, v: &Json) -> Vec<u8> {
        match tag {
            "$bytes_at" => {
                let off = v["offset"].as_u64().expect("offset") as usize;
                let len = v["len"].as_u64().expect("len") as usize;
                self.file_bytes[off..off + len].to_vec()
            }
            _ => hex(v.as_str().expect("hex string")),
        }
    }

    fn check_tag(&mut self, path: &str, tag: &str, v: &Json, actual: &Value) {
        match tag {
            "$int" => {
                let s = v.as_str().expect("$int string");
                let ok = match actual {
                    Value::Int(i) => i.to_string() == s,
                    Value::UInt(u) => u.to_string() == s,
                    _ => false,
                };
                self.expect(path, ok, &format!("int {s}"), actual)
            }
            "$float" => {
                let ok = match (v.as_str().expect("$float"), actual) {
                    ("nan", Value::F64(x)) => x.is_nan(),
                    ("inf", Value::F64(x)) => *x == f64::INFINITY,
                    ("-inf", Value::F64(x)) => *x == f64::NEG_INFINITY,
                    _ => false,
                };
                self.expect(path, ok, &format!("float {v}"), actual)
            }
            "$bytes" | "$bytes_at" => {
                let want = self.bytes_of(tag, v);
                self.expect(
                    path,
                    actual.as_bytes().map(|b| &b[..]) == Some(&want[..]),
                    &format!("{} bytes", want.len()),
                    actual,
                )
            }
            "$map" => match v {
                Json::Object(o) => self.check_map(path, o, actual),
                _ => self.fail(path, "bad $map"),
            },
            "$memoryview" => {
                let want = hex(v.as_str().expect("hex"));
                self.expect(
                    path,
                    matches!(actual, Value::MemoryView(b) if b[..] == want[..]),
                    "memoryview",
                    actual,
                )
            }
            "$ndarray" => {
                let Value::NdArray(a) = actual else {
                    return self.fail(path, format!("expected ndarray, got {}", actual.kind()));
                };
                let shape: Vec<usize> = v["shape"]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_u64().expect("dim") as usize)
                    .collect();
                let dtype = DType::parse(v["dtype"].as_str().expect("dtype"));
                let data = if let Some(h) = v.get("hex") {
                    hex(h.as_str().expect("hex"))
                } else {
                    self.bytes_of("$bytes_at", &v["bytes_at"])
                };
                if a.dtype != dtype || a.shape != shape || a.data[..] != data[..] {
                    self.fail(
                        path,
                        format!(
                            "ndarray {}/{:?}/{}B != expected {dtype}/{shape:?}/{}B",
                            a.dtype,
                            a.shape,
                            a.data.len(),
                            data.len()
                        ),
                    );
                }
            }
            "$typedarray" => {
                let Value::TypedArray(a) = actual else { return self.fail(path, "expected typedarray") };
                let want = hex(v["hex"].as_str().expect("hex"));
                if a.dtype != DType::parse(v["dtype"].as_str().expect("dtype")) || a.data[..] != want[..] {
                    self.fail(path, "typedarray differs");
                }
            }
            "$set" => match actual {
                Value::Set(items) => self.check_unordered(path, v.as_array().expect("$set list"), items),
                _ => self.fail(path, format!("expected set, got {}", actual.kind())),
            },
            "$orderedmap" => match actual {
                Value::OrderedMap(pairs) => {
                    let want = v.as_array().expect("pairs");
                    if want.len() != pairs.len() {
                        return self.fail(path, "orderedmap length");
                    }
                    for (i, (w, (k, val))) in want.iter().zip(pairs).enumerate() {
                        self.check(&format!("{path}<k{i}>"), &w[0], k);
                        self.check(&format!("{path}<v{i}>"), &w[1], val);
                    }
                }
                _ => self.fail(path, "expected orderedmap"),
            },
            "$error" => match actual {
                Value::Error(e) => {
                    if Some(e.message.as_str()) != v["message"].as_str()
                        || e.trace.as_deref() != v["trace"].as_str()
                    {
                        self.fail(path, format!("error {e:?} != {v}"));
                    }
                }
                _ => self.fail(path, format!("expected error, got {}", actual.kind())),
            },
            "$method" => match actual {
                Value::Function(f) => match &**f {
                    Function::Remote(m) => self.check_method(path, v, m),
                    Function::Local(_) => self.fail(path, "decoded a local function"),
                },
                _ => self.fail(path, format!("expected method, got {}", actual.kind())),
            },
            "$generator" => match actual {
                Value::Generator(g) => match &**g {
                    Generator::Remote(g) => {
                        let d = &v["descriptor"];
                        let ok = d["_rtarget"].as_str() == Some(&g.target)
                            && d["_rmethod"].as_str() == Some(&g.method)
                            && d["_rclose_method"].as_str() == Some(&g.close_method)
                            && v["remote_parent"].as_str() == g.remote_parent.as_deref()
                            && d.get("_rserver").and_then(Json::as_str) == g.server.as_deref();
                        if !ok {
                            self.fail(path, format!("generator {g:?} != {v}"));
                        }
                    }
                    Generator::Local(_) => self.fail(path, "decoded a local generator"),
                },
                _ => self.fail(path, format!("expected generator, got {}", actual.kind())),
            },
            "$custom" => match actual {
                Value::Custom(c) => match c.downcast_ref::<Cell>() {
                    Some(cell) if c.codec == v["codec"] => {
                        let fields = &v["fields"];
                        self.check(&format!("{path}.value"), &fields["value"], &cell.value);
                        self.check(
                            &format!("{path}.label"),
                            &fields["label"],
                            &Value::Str(cell.label.clone()),
                        );
                    }
                    _ => self.fail(path, format!("custom value of codec {} is not a Cell", c.codec)),
                },
                _ => self.fail(path, format!("expected custom, got {}", actual.kind())),
            },
            other => self.fail(path, format!("unknown tag {other}")),
        }
    }

    fn check_unordered(&mut self, path: &str, want: &[Json], got: &[Value]) {
        if want.len() != got.len() {
            return self.fail(path, format!("set of {} != {}", got.len(), want.len()));
        }
        for (i, w) in want.iter().enumerate() {
            let found = got.iter().any(|g| {
                let mut m = Matcher { file_bytes: self.file_bytes, errors: Vec::new() };
                m.check("", w, g);
                m.errors.is_empty()
            });
            if !found {
                self.fail(&format!("{path}{{{i}}}"), format!("{w} not in set"));
            }
        }
    }

    fn check_method(&mut self, path: &str, v: &Json, m: &RemoteMethod) {
        let d = v["descriptor"].as_object().expect("descriptor");
        let s = |k: &str| d.get(k).and_then(Json::as_str);
        let promise = match d.get("_rpromise") {
            Some(Json::String(s)) if s == "*" => PromiseMode::Compact,
            Some(Json::Bool(true)) => PromiseMode::Explicit,
            _ => PromiseMode::None,
        };
        let mut diffs = Vec::new();
        if s("_rtarget") != Some(&m.target) {
            diffs.push(format!("target {:?} != {:?}", m.target, s("_rtarget")));
        }
        if s("_rmethod") != Some(&m.method) {
            diffs.push(format!("method {:?} != {:?}", m.method, s("_rmethod")));
        }
        if s("_rserver") != m.server.as_deref() {
            diffs.push(format!("server {:?} != {:?}", m.server, s("_rserver")));
        }
        if s("_rname") != m.name.as_deref() {
            diffs.push(format!("name {:?} != {:?}", m.name, s("_rname")));
        }
        if s("_rdoc") != m.doc.as_deref() {
            diffs.push(format!("doc {:?} != {:?}", m.doc, s("_rdoc")));
        }
        if d.get("_rasync").and_then(Json::as_bool) != m.is_async {
            diffs.push(format!("async {:?}", m.is_async));
        }
        if promise != m.promise {
            diffs.push(format!("promise {:?} != {promise:?}", m.promise));
        }
        if v["remote_parent"].as_str() != m.remote_parent.as_deref() {
            diffs.push(format!("remote_parent {:?} != {}", m.remote_parent, v["remote_parent"]));
        }
        match (d.get("_rschema"), &m.schema) {
            (None, None) => {}
            (Some(want), Some(got)) => self.check(&format!("{path}._rschema"), want, got),
            (w, g) => diffs.push(format!("schema {g:?} != {w:?}")),
        }
        if !diffs.is_empty() {
            self.fail(path, diffs.join("; "));
        }
    }
}

fn decode_context<'a>(fixture: &'a Json, reg: &'a CodecRegistry) -> DecodeContext<'a> {
    let d = &fixture["decode"];
    DecodeContext {
        remote_workspace: d["remote_workspace"].as_str(),
        remote_parent: d["remote_parent"].as_str(),
        ..DecodeContext::new(reg)
    }
}

/// Decodes one fixture's extra segment value by value (as the receiving RPC does).
fn decode_extra(extra: Map, cx: &DecodeContext) -> Map {
    extra
        .into_iter()
        .map(|(k, v)| (k.clone(), codec::decode(v, cx).unwrap_or_else(|e| panic!("decode {k}: {e}"))))
        .collect()
}

#[test]
fn golden_packages_decode_to_the_manifest_and_back_through_python() {
    let manifest = manifest();
    let reg = registry();
    let limits = DecodeLimits::default();
    let out_dir = std::env::temp_dir().join(format!("hypha-golden-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("temp dir");
    let mut failures = Vec::new();
    let fixtures = manifest["fixtures"].as_array().expect("fixtures");
    let server_url = manifest["server_base_url"].as_str();
    assert!(fixtures.len() >= 60, "expected the full fixture set, got {}", fixtures.len());

    for fx in fixtures {
        let name = fx["name"].as_str().expect("name");
        let raw = std::fs::read(golden_dir().join("fixtures").join(fx["file"].as_str().expect("file")))
            .expect("fixture file");
        let frame = Bytes::from(raw.clone());
        let package = decode_package(&frame, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut m = Matcher { file_bytes: &raw, errors: Vec::new() };

        // The main segment is plain data: compare it as decoded wire values.
        m.check("main", &fx["main"], &Value::Map(package.main.clone()));

        let cx = decode_context(fx, &reg);
        let extra = package.extra.clone().map(|e| decode_extra(e, &cx));
        match (&fx["extra"], &extra) {
            (Json::Null, None) => {}
            (want, Some(got)) => m.check("extra", want, &Value::Map(got.clone())),
            (want, None) => m.fail("extra", format!("missing; expected {want}")),
        }
        if !m.errors.is_empty() {
            failures.push(format!("{name}:\n  {}", m.errors.join("\n  ")));
        }

        // Re-encode with hypha-core for the Python check.
        let mut sink = NoLocalObjects;
        let reencoded_extra = extra.map(|e| {
            // Our own server URL equals the fixtures' `_rserver`, so every received
            // descriptor is forwarded as is (spec §5.3) rather than wrapped.
            let mut ecx = EncodeContext::new("ws-golden/rust", &reg, &mut sink);
            ecx.server = server_url;
            e.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        codec::encode(v, &mut ecx).unwrap_or_else(|err| panic!("{name}: encode {k}: {err}")),
                    )
                })
                .collect::<Map>()
        });
        let bytes = encode_package(&package.main, reencoded_extra.as_ref()).expect("encode package");
        std::fs::write(out_dir.join(format!("{name}.bin")), bytes).expect("write re-encoded");
    }
    assert!(failures.is_empty(), "{} fixtures differ:\n{}", failures.len(), failures.join("\n"));

    let python = std::env::var("HYPHA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let out = Command::new(&python)
        .arg(golden_dir().join("check.py"))
        .arg(&out_dir)
        .arg("--require-all")
        .arg("-q")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the stock Python decoder {}: {e} (run scripts/setup-python.sh)",
                python.display()
            )
        });
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        out.status.success(),
        "the stock Python decoder disagrees with our re-encoding:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixture_args(name: &str) -> Vec<Value> {
    let raw = std::fs::read(golden_dir().join("fixtures").join(format!("{name}.bin"))).expect("fixture");
    let package = decode_package(&Bytes::from(raw), &DecodeLimits::default()).expect("package");
    match package.extra.and_then(|mut e| e.shift_remove("args")) {
        Some(Value::List(args)) => args,
        other => panic!("{name}: no args: {other:?}"),
    }
}

/// The Python client's own chunk calls (create, set 1, set 0 — out of order on purpose —
/// process) drive our reassembler, and the result is exactly the package Python split.
#[test]
fn golden_chunk_calls_reassemble_to_the_python_package() {
    use hypha_core::chunk::{chunk_data_from_value, chunk_index_from_value, Reassembler};
    let now = std::time::Instant::now();
    let mut cache = Reassembler::default();
    let create = fixture_args("chunk_create_call");
    let key = create[0].as_str().expect("key").to_owned();
    cache.create(now, &key, false).expect("create");
    for name in ["chunk_set1_call", "chunk_set0_call"] {
        let args = fixture_args(name);
        assert_eq!(args[0].as_str(), Some(key.as_str()));
        let index = chunk_index_from_value(&args[1]).expect("index");
        let data = chunk_data_from_value(&args[2]).expect("bin chunk");
        cache.set(now, &key, index, data).expect("set");
    }
    let process = fixture_args("chunk_process_call");
    assert_eq!(process[0].as_str(), Some(key.as_str()));
    let package = cache.process(&key).expect("process");
    let want = std::fs::read(golden_dir().join("fixtures/chunk_reassembled.bin")).expect("reassembled");
    assert_eq!(package.len(), want.len());
    assert!(package[..] == want[..], "reassembled bytes differ from the package Python split");
    let decoded = decode_package(&package, &DecodeLimits::default()).expect("decode reassembled");
    assert_eq!(decoded.main.get("method").and_then(Value::as_str), Some("services.golden.byte_len"));
    assert!(cache.is_empty());
}

/// The Python checker must be able to fail: its self-test alters every fixture in many
/// ways and expects each alteration to be caught.
#[test]
fn golden_python_checker_detects_alterations() {
    let python = std::env::var("HYPHA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let out = Command::new(&python)
        .arg(golden_dir().join("check.py"))
        .args(["--selftest", "-q"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (run scripts/setup-python.sh)", python.display()));
    assert!(out.status.success(), "check.py --selftest failed:\n{}", String::from_utf8_lossy(&out.stdout));
}
