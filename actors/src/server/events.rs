//! Workspace events on the manager's side: the event log behind `log`, `log_event`,
//! `get_events` and `get_event_stats` (server spec §4.3), and the rule that decides which
//! event types a client may `subscribe` to.
//!
//! Upstream persists logged events in SQL; this server keeps them in memory, bounded in
//! count ([`MAX_LOGGED_EVENTS`]) and in bytes ([`MAX_LOGGED_BYTES`], oldest evicted
//! first), with one event's data capped at [`MAX_EVENT_DATA_BYTES`]. They do not survive a
//! restart, which is what upstream's default (temporary SQLite) does too.

use std::collections::VecDeque;
use std::sync::Mutex;

use hypha_core::message::WORKSPACE_EVENTS;
use hypha_core::msgpack;
use hypha_core::value::{Map, Value};

/// Most events kept.
pub const MAX_LOGGED_EVENTS: usize = 10_000;
/// Most bytes (msgpack size of the data) kept across all events.
pub const MAX_LOGGED_BYTES: usize = 32 * 1024 * 1024;
/// Largest `data` one event may carry.
pub const MAX_EVENT_DATA_BYTES: usize = 256 * 1024;

/// Why an event was not logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The event type has a space (upstream's assertion text).
    #[error("Event type must not contain spaces")]
    SpaceInType,
    /// The data is larger than [`MAX_EVENT_DATA_BYTES`].
    #[error("Event data too large: {0} bytes (at most {MAX_EVENT_DATA_BYTES})")]
    TooLarge(usize),
    /// A subscription to another workspace's events (upstream's `ValueError` text).
    #[error(
        "Subscription to event '{event}' is forbidden. Event workspace '{other}' does not match your workspace '{own}'. Clients can only subscribe to events within their own workspace or system events."
    )]
    ForeignSubscription {
        /// The event type asked for.
        event: String,
        /// The workspace it names.
        other: String,
        /// The subscriber's workspace.
        own: String,
    },
}

/// One logged event.
#[derive(Debug, Clone, PartialEq)]
struct Logged {
    id: u64,
    event_type: String,
    workspace: String,
    user_id: String,
    /// Unix seconds.
    timestamp: f64,
    data: Value,
    size: usize,
}

#[derive(Debug, Default)]
struct Log {
    events: VecDeque<Logged>,
    bytes: usize,
    next_id: u64,
}

/// The in-memory event log (see the module docs).
#[derive(Debug, Default)]
pub struct EventLog {
    inner: Mutex<Log>,
}

/// A `get_events`/`get_event_stats` filter: events of `workspace` logged by `user_id`,
/// optionally of one type and within `[start, end]` (unix seconds).
#[derive(Debug, Clone, Copy)]
pub struct EventQuery<'a> {
    /// The workspace.
    pub workspace: &'a str,
    /// The user who logged them.
    pub user_id: &'a str,
    /// Only this type.
    pub event_type: Option<&'a str>,
    /// Not before.
    pub start: Option<f64>,
    /// Not after.
    pub end: Option<f64>,
}

impl EventQuery<'_> {
    fn matches(&self, e: &Logged) -> bool {
        e.workspace == self.workspace
            && e.user_id == self.user_id
            && self.event_type.is_none_or(|t| t == e.event_type)
            && self.start.is_none_or(|s| e.timestamp >= s)
            && self.end.is_none_or(|s| e.timestamp <= s)
    }
}

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs an event at `now` (unix seconds); returns its id (1, 2, ...).
    pub fn log(
        &self,
        event_type: &str,
        workspace: &str,
        user_id: &str,
        data: Value,
        now: f64,
    ) -> Result<u64, EventError> {
        if event_type.contains(' ') {
            return Err(EventError::SpaceInType);
        }
        let size = msgpack::encoded_len(&data) + event_type.len() + workspace.len() + user_id.len();
        if size > MAX_EVENT_DATA_BYTES {
            return Err(EventError::TooLarge(size));
        }
        let mut log = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        log.next_id += 1;
        let id = log.next_id;
        log.bytes += size;
        log.events.push_back(Logged {
            id,
            event_type: event_type.to_owned(),
            workspace: workspace.to_owned(),
            user_id: user_id.to_owned(),
            timestamp: now,
            data,
            size,
        });
        while log.events.len() > MAX_LOGGED_EVENTS || log.bytes > MAX_LOGGED_BYTES {
            match log.events.pop_front() {
                Some(old) => log.bytes -= old.size,
                None => break,
            }
        }
        Ok(id)
    }

    /// The events matching `q`, oldest first, as `{id, event_type, workspace, user_id,
    /// timestamp (naive ISO), data}` maps.
    pub fn events(&self, q: &EventQuery<'_>) -> Vec<Value> {
        let log = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        log.events
            .iter()
            .filter(|e| q.matches(e))
            .map(|e| {
                let mut m = Map::new();
                m.insert("id".into(), Value::from(e.id));
                m.insert("event_type".into(), Value::from(e.event_type.as_str()));
                m.insert("workspace".into(), Value::from(e.workspace.as_str()));
                m.insert("user_id".into(), Value::from(e.user_id.as_str()));
                m.insert("timestamp".into(), Value::from(iso_timestamp(e.timestamp)));
                m.insert("data".into(), e.data.clone());
                Value::Map(m)
            })
            .collect()
    }

    /// `[{event_type, count}]` of the events matching `q`, in order of first appearance.
    pub fn stats(&self, q: &EventQuery<'_>) -> Vec<Value> {
        let log = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts: indexmap::IndexMap<&str, u64> = indexmap::IndexMap::new();
        for e in log.events.iter().filter(|e| q.matches(e)) {
            *counts.entry(e.event_type.as_str()).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(t, n)| {
                let mut m = Map::new();
                m.insert("event_type".into(), Value::from(t));
                m.insert("count".into(), Value::from(n));
                Value::Map(m)
            })
            .collect()
    }
}

/// Checks that a client of workspace `own` may subscribe to `event` (server spec §4.3):
/// system events always; otherwise an event naming a workspace (`{ws}/...`, `ws-...`,
/// `ws-...:...`) must name `own`.
pub fn check_subscription(event: &str, own: &str) -> Result<(), EventError> {
    if WORKSPACE_EVENTS.contains(&event) {
        return Ok(());
    }
    let foreign = |other: &str| EventError::ForeignSubscription {
        event: event.to_owned(),
        other: other.to_owned(),
        own: own.to_owned(),
    };
    if let Some((ws, _)) = event.split_once('/') {
        if ws != own {
            return Err(foreign(ws));
        }
        return Ok(());
    }
    if event.starts_with("ws-") && event != own {
        let named = event.split_once(':').map_or(event, |(ws, _)| ws);
        if named != own {
            return Err(foreign(named));
        }
    }
    Ok(())
}

/// Days since 1970-01-01 -> (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) -> days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as a naive UTC ISO timestamp with microseconds, as Python's
/// `datetime.isoformat()` prints it (`2026-11-21T06:00:11.983436`; no fraction when zero).
pub fn iso_timestamp(unix: f64) -> String {
    iso_from_micros((unix * 1e6).round() as i64)
}

/// [`iso_timestamp`] from exact microseconds since the epoch (no float rounding).
pub fn iso_from_micros(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let base = format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}", sod / 3600, sod % 3600 / 60, sod % 60);
    if frac == 0 {
        base
    } else {
        format!("{base}.{frac:06}")
    }
}

/// Parses `YYYY-MM-DD[THH:MM[:SS[.ffffff]]]` (naive, read as UTC; a trailing `Z` or
/// `+00:00` is accepted) into unix seconds.
pub fn parse_iso(text: &str) -> Option<f64> {
    let text = text.trim().trim_end_matches('Z').trim_end_matches("+00:00");
    let (date, time) = text.split_once(['T', ' ']).unwrap_or((text, ""));
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    if dp.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = 0.0;
    if !time.is_empty() {
        let mut tp = time.split(':');
        let h: f64 = tp.next()?.parse().ok()?;
        let mi: f64 = tp.next()?.parse().ok()?;
        let s: f64 = tp.next().map_or(Some(0.0), |s| s.parse().ok())?;
        if tp.next().is_some() || !(0.0..24.0).contains(&h) || !(0.0..60.0).contains(&mi) {
            return None;
        }
        secs = h * 3600.0 + mi * 60.0 + s;
    }
    Some(days_from_civil(y, m, d) as f64 * 86_400.0 + secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_and_parse_like_python() {
        // 2026-11-21T06:00:11.983436 is 1795240811.983436.
        assert_eq!(iso_timestamp(1_795_240_811.983_436), "2026-11-21T06:00:11.983436");
        assert_eq!(iso_timestamp(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso_timestamp(951_782_400.0), "2000-02-29T00:00:00");
        let t = parse_iso("2026-11-21T06:00:11.983436").unwrap();
        assert!((t - 1_795_240_811.983_436).abs() < 1e-6);
        assert_eq!(parse_iso("2000-02-29"), Some(951_782_400.0));
        assert_eq!(parse_iso("2000-13-01"), None);
        assert_eq!(parse_iso("yesterday"), None);
    }

    #[test]
    fn the_log_filters_by_workspace_user_type_and_time() {
        let log = EventLog::new();
        assert_eq!(log.log("log", "W", "u", Value::from("hello"), 100.0), Ok(1));
        assert_eq!(log.log("my-event", "W", "u", Value::from(1), 200.0), Ok(2));
        log.log("log", "W", "other", Value::Nil, 150.0).unwrap();
        log.log("log", "V", "u", Value::Nil, 150.0).unwrap();
        assert_eq!(log.log("bad event", "W", "u", Value::Nil, 1.0), Err(EventError::SpaceInType));
        let q = EventQuery { workspace: "W", user_id: "u", event_type: None, start: None, end: None };
        let all = log.events(&q);
        assert_eq!(all.len(), 2);
        let first = all[0].as_map().unwrap();
        assert_eq!(first["timestamp"], Value::from("1970-01-01T00:01:40"));
        assert_eq!(first["data"], Value::from("hello"));
        assert_eq!(log.events(&EventQuery { start: Some(150.0), ..q }).len(), 1);
        assert_eq!(log.events(&EventQuery { event_type: Some("log"), ..q }).len(), 1);
        let stats = log.stats(&q);
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0].as_map().unwrap()["count"], Value::from(1));
        let big = Value::Bytes(bytes::Bytes::from(vec![0u8; MAX_EVENT_DATA_BYTES]));
        assert!(matches!(log.log("x", "W", "u", big, 1.0), Err(EventError::TooLarge(_))));
    }

    #[test]
    fn subscriptions_stay_in_the_own_workspace() {
        for ok in
            ["service_added", "client_disconnected", "my-event", "W/custom", "ws-me", "ws-me/x", "ws-me:x"]
        {
            assert_eq!(
                check_subscription(ok, if ok.starts_with("ws-") { "ws-me" } else { "W" }),
                Ok(()),
                "{ok}"
            );
        }
        let e = check_subscription("ws-other-x/service_added", "W").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Subscription to event 'ws-other-x/service_added' is forbidden. Event workspace 'ws-other-x' does not match your workspace 'W'. Clients can only subscribe to events within their own workspace or system events."
        );
        assert!(check_subscription("workspace:another/event", "W").is_err());
        assert!(check_subscription("other/workspace/event", "W").is_err());
        assert!(check_subscription("ws-other:evt", "ws-me").is_err());
        assert!(check_subscription("ws-other", "ws-me").is_err());
    }
}
