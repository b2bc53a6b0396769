//! The black-box acceptance scenarios of `tests/interop/` (stock `hypha-rpc` clients,
//! Python and JS) against the real `hypha-server` binary.
//!
//! Each run goes through `tests/interop/run_scenarios.py --server-cmd ...`: the runner
//! starts the binary on a free loopback port with a random 64-character root token, waits
//! for `/health/liveness`, runs the scenarios and stops the server. The interpreter is
//! `HYPHA_PYTHON` (the venv `scripts/setup-python.sh` makes, which `scripts/test.sh`
//! exports), falling back to `.venv/bin/python`; a missing interpreter or Node is a test
//! failure, never a skip.
//!
//! `hello_world` runs first and alone, so that a broken basic path is reported as such;
//! the other scenarios then run in one server, one after the other (the scenarios time
//! some answers, so they do not run in parallel).
//!
//! Every scenario of `tests/interop/` is listed: a new scenario must be added here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The scenarios that must pass, after `hello_world` (the `js_` ones use the stock JS
/// client, which `scripts/test.sh` installs with `npm ci` in `tests/js`).
const SCENARIOS: &[&str] = &[
    "callbacks",
    "generators",
    "kwargs",
    "numpy_dtypes",
    "rintf",
    "require_context",
    "large_payloads",
    "visibility",
    "events",
    "disconnect_cleanup",
    "reconnection",
    "heartbeat",
    "tokens_workspaces",
    "manager_modes",
    "rpc_conformance",
    "http_proxy",
    "login",
    "js_hello_world",
    "js_callback",
    "js_generator",
    "js_py_interop",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    std::env::var_os("HYPHA_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `run_scenarios.py` for `only` against a fresh server; returns (success, output).
fn run_scenarios(only: &[&str], skip_js: bool) -> (bool, String) {
    let server = env!("CARGO_BIN_EXE_hypha-server");
    let server_cmd =
        format!("{} --host 127.0.0.1 --port {{port}} --root-token {{root_token}}", shell_quote(server));
    let python = python();
    let mut cmd = Command::new(&python);
    cmd.arg(root().join("tests/interop/run_scenarios.py"))
        .arg("--server-cmd")
        .arg(&server_cmd)
        .arg("--python")
        .arg(&python)
        .arg("--only")
        .arg(only.join(","));
    if skip_js {
        cmd.arg("--skip-js");
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run the scenario runner with {}: {e} (run scripts/setup-python.sh)", python.display())
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn stock_clients_pass_the_interop_scenarios() {
    let (ok, out) = run_scenarios(&["hello_world"], true);
    println!("{out}");
    assert!(ok, "hello_world failed against hypha-server:\n{out}");
    assert!(out.contains("scenarios: 1 passed, 0 failed"), "unexpected runner output:\n{out}");

    let (ok, out) = run_scenarios(SCENARIOS, false);
    println!("{out}");
    assert!(ok, "interop scenarios failed against hypha-server:\n{out}");
    let expected = format!("scenarios: {} passed, 0 failed", SCENARIOS.len());
    assert!(out.contains(&expected), "not every scenario ran:\n{out}");
}
