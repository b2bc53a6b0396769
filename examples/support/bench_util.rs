//! Helpers shared by the benchmark examples (`bench_rpc`, `bench_clients`): `/proc`
//! readings and percentiles. Not an example itself (cargo builds `examples/*.rs` and
//! `examples/*/main.rs` only); the examples include it with `#[path]`.

use serde_json::{json, Value as Json};

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...).
pub fn rss_kb(pid: Option<u32>, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

/// User + system CPU seconds of a process.
pub fn cpu_s(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // SC_CLK_TCK is 100 on Linux
}

/// kB as MB with one decimal, `null` when unknown.
pub fn mb(kb: Option<u64>) -> Json {
    kb.map_or(Json::Null, |k| json!(round(k as f64 / 1024.0, 1)))
}

/// `x` rounded to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// The `p`-th percentile (linear interpolation), `None` for no values.
pub fn pct(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let k = (v.len() - 1) as f64 * p / 100.0;
    let f = k as usize;
    let c = (f + 1).min(v.len() - 1);
    Some(v[f] + (v[c] - v[f]) * (k - f as f64))
}

/// Seconds as milliseconds with three decimals, `null` when unknown.
pub fn ms(x: Option<f64>) -> Json {
    x.map_or(Json::Null, |s| json!(round(s * 1000.0, 3)))
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> Json {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Json::Array(
        s.split_whitespace().take(3).filter_map(|x| x.parse::<f64>().ok()).map(|x| json!(x)).collect(),
    )
}
