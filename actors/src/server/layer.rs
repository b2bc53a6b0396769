//! The cross-cutting HTTP layer (server spec §1.2): the per-IP / per-token request-rate
//! limit and CORS, in that order, as one actix middleware ([`HttpLayer`]).
//!
//! It wraps every HTTP resource the server mounts (not `/ws`), so an application that
//! mounts the server with `configure` gets it on the server's routes and nowhere else.
//! This is the one place CORS headers come from, apart from the "functions" apps (the
//! login page), whose own five CORS headers upstream sends *instead* of this layer's
//! (upstream's apps middleware sits outside its CORS middleware): those resources are
//! wrapped with [`HttpLayer::rate_limit_only`].
//!
//! **Rate limit** (upstream's `HTTPRateLimitMiddleware`, the outermost layer there too, so
//! a 429 carries no CORS headers and preflights count): token buckets of
//! [`HttpRateLimits`]. A request whose `Authorization` holds a valid HS256 token of this
//! server (or the root token) uses the bucket `auth:{sub}[:{workspace}][:{client_id}]`
//! (query parameters) at the authenticated rates; any other request the bucket of its
//! client IP, the first `X-Forwarded-For` entry or else the peer address. Paths starting
//! with `/health` and websocket upgrades are exempt. Refusal: 429
//! `{"detail": "Rate limit exceeded. Please slow down."}` with `Retry-After` (whole seconds,
//! rounded up).
//!
//! **CORS** (upstream's patched Starlette CORS middleware with credentials allowed): only
//! requests with an `Origin` are touched. `OPTIONS` with `Access-Control-Request-Method` is
//! a preflight, answered here: 200 `OK`, or 400 `Disallowed CORS origin, method, headers`
//! naming what failed. Other requests get `Access-Control-Allow-Credentials: true`,
//! upstream's `Access-Control-Expose-Headers`, and — when the origin is allowed — the
//! origin echoed in `Access-Control-Allow-Origin` plus `Vary: Origin` (with `*` configured
//! every origin is allowed and echoed, since `*` is not valid with credentials).

use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::Method;
use actix_web::{Error, HttpResponse};
use dashmap::DashMap;
use hypha_core::auth;
use serde_json::json;

use super::config::HttpRateLimits;
use super::limits::TokenBucket;
use super::ServerState;

/// Methods a preflight may ask for (upstream allows all).
pub const ALLOW_METHODS: &str = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT";
/// Request headers a preflight may ask for: upstream's list plus the CORS-safelisted ones,
/// sorted as Starlette sends them.
pub const ALLOW_HEADERS: [&str; 14] = [
    "Accept",
    "Accept-Encoding",
    "Accept-Language",
    "Access-Control-Allow-Headers",
    "Access-Control-Request-Headers",
    "Access-Control-Request-Method",
    "Authorization",
    "Content-Encoding",
    "Content-Language",
    "Content-Type",
    "Inference-Header-Content-Length",
    "Origin",
    "Range",
    "X-Requested-With",
];
/// Response headers scripts may read.
pub const EXPOSE_HEADERS: &str =
    "Inference-Header-Content-Length, Accept-Encoding, Range, Origin, Content-Type";
/// How long browsers may cache a preflight answer, in seconds.
pub const PREFLIGHT_MAX_AGE: &str = "600";
/// The 429 body's detail.
pub const RATE_LIMITED: &str = "Rate limit exceeded. Please slow down.";
/// Most buckets kept at once; past it, new keys share one overflow bucket (so a flood of
/// forged `X-Forwarded-For` values cannot grow the table without bound).
pub const MAX_BUCKETS: usize = 100_000;
/// How often buckets that have refilled (and so equal a fresh one) are dropped.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(300);
const OVERFLOW_KEY: &str = "overflow";

/// The token buckets of the HTTP rate limit (one table per server, shared by the workers).
#[derive(Debug)]
pub struct HttpRateLimiter {
    limits: HttpRateLimits,
    buckets: DashMap<String, TokenBucket>,
    last_cleanup: Mutex<Instant>,
}

/// Which tier a request falls in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketKey {
    /// Per client IP (or `X-Forwarded-For`), at the anonymous rates.
    Anonymous(String),
    /// `auth:{identity}[:{workspace}][:{client_id}]`, at the authenticated rates.
    Authenticated(String),
}

impl HttpRateLimiter {
    /// An empty table.
    pub fn new(limits: HttpRateLimits) -> Self {
        HttpRateLimiter { limits, buckets: DashMap::new(), last_cleanup: Mutex::new(Instant::now()) }
    }

    /// Takes one request from `key`'s bucket, or says how long to wait.
    pub fn check(&self, key: &BucketKey, now: Instant) -> Result<(), Duration> {
        self.cleanup(now);
        let (name, rate, burst) = match key {
            BucketKey::Anonymous(k) => (k, self.limits.anonymous_rate, self.limits.anonymous_burst),
            BucketKey::Authenticated(k) => {
                (k, self.limits.authenticated_rate, self.limits.authenticated_burst)
            }
        };
        if let Some(mut bucket) = self.buckets.get_mut(name.as_str()) {
            return bucket.take_or_wait(now);
        }
        let name = if self.buckets.len() >= MAX_BUCKETS {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= MAX_BUCKETS {
                OVERFLOW_KEY
            } else {
                name.as_str()
            }
        } else {
            name.as_str()
        };
        self.buckets
            .entry(name.to_owned())
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .take_or_wait(now)
    }

    /// Buckets currently kept.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn cleanup(&self, now: Instant) {
        let Ok(mut last) = self.last_cleanup.try_lock() else { return };
        if now.saturating_duration_since(*last) < CLEANUP_INTERVAL {
            return;
        }
        *last = now;
        drop(last);
        self.buckets.retain(|_, b| !b.is_full(now));
    }
}

/// The bucket of a request (see the module docs).
pub fn bucket_key(state: &ServerState, req: &ServiceRequest) -> BucketKey {
    if let Some(identity) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| token_identity(state, v))
    {
        let mut key = format!("auth:{identity}");
        let query = actix_web::web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .map(|q| q.into_inner())
            .unwrap_or_default();
        // The first value of each, as upstream's `parse_qs(...)[0]`.
        for name in ["workspace", "client_id"] {
            if let Some((_, v)) = query.iter().find(|(k, v)| k == name && !v.is_empty()) {
                key.push(':');
                key.push_str(v);
            }
        }
        return BucketKey::Authenticated(key);
    }
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').next().unwrap_or_default().trim().to_owned());
    let ip = match forwarded {
        Some(f) => f,
        None => req.peer_addr().map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string()),
    };
    BucketKey::Anonymous(ip)
}

/// The identity of a locally verifiable token in an `Authorization` value: `root` for the
/// root token, else the `sub` of a valid, unexpired HS256 token of this server. Signature
/// and expiry only (no revocation list): the real check happens in the route.
fn token_identity(state: &ServerState, authorization: &str) -> Option<String> {
    let token = auth::extract_http_token([("authorization", authorization)])?;
    if auth::is_root_token(&token, state.config.root_token.as_deref()) {
        return Some(auth::ROOT_USER_ID.to_owned());
    }
    let claims = state.config.jwt.verify(&token, auth::unix_seconds(SystemTime::now())).ok()?;
    claims.get("sub").and_then(|s| s.as_str()).filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The 429 answer.
pub fn too_many_requests(retry_after: Duration) -> HttpResponse {
    let secs = retry_after.as_secs_f64().ceil().max(0.0) as u64;
    HttpResponse::TooManyRequests()
        .insert_header((header::RETRY_AFTER, secs.to_string()))
        .json(json!({"detail": RATE_LIMITED}))
}

/// The CORS policy of `--allow-origins`.
#[derive(Debug, Clone)]
pub struct Cors {
    allow_all: bool,
    origins: Vec<String>,
}

impl Cors {
    /// From the configured origins (`*` anywhere allows every origin).
    pub fn new(origins: &[String]) -> Self {
        Cors { allow_all: origins.iter().any(|o| o == "*"), origins: origins.to_vec() }
    }

    /// Whether `origin` may read responses.
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_all || self.origins.iter().any(|o| o == origin)
    }

    /// The answer to a preflight from `origin` (Starlette's checks and wording).
    pub fn preflight(&self, origin: &HeaderValue, headers: &HeaderMap) -> HttpResponse {
        let mut failures = Vec::new();
        let allowed_origin = origin.to_str().is_ok_and(|o| self.allows(o));
        if !allowed_origin {
            failures.push("origin");
        }
        let method = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD).and_then(|m| m.to_str().ok());
        if !method.is_some_and(|m| ALLOW_METHODS.split(", ").any(|a| a == m)) {
            failures.push("method");
        }
        if let Some(requested) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let ok = requested.to_str().is_ok_and(|r| {
                r.split(',').all(|h| ALLOW_HEADERS.iter().any(|a| a.eq_ignore_ascii_case(h.trim())))
            });
            if !ok {
                failures.push("headers");
            }
        }
        let mut resp = if failures.is_empty() { HttpResponse::Ok() } else { HttpResponse::BadRequest() };
        resp.insert_header((header::VARY, "Origin"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS.join(", ")))
            .insert_header((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true"));
        if allowed_origin {
            resp.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()));
        }
        let body = if failures.is_empty() {
            "OK".to_owned()
        } else {
            format!("Disallowed CORS {}", failures.join(", "))
        };
        resp.content_type("text/plain; charset=utf-8").body(body)
    }

    /// Adds the headers of a simple (non-preflight) response to a request from `origin`.
    pub fn decorate(&self, origin: &HeaderValue, headers: &mut HeaderMap) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
        if origin.to_str().is_ok_and(|o| self.allows(o)) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            add_vary_origin(headers);
        }
    }
}

fn add_vary_origin(headers: &mut HeaderMap) {
    let existing = headers.get(header::VARY).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let value = match existing {
        Some(v) if v.split(',').any(|p| p.trim().eq_ignore_ascii_case("origin")) => return,
        Some(v) if !v.trim().is_empty() => format!("{v}, Origin"),
        _ => "Origin".to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(header::VARY, v);
    }
}

/// The middleware (see the module docs). Cheap to clone: one per wrapped resource.
#[derive(Clone)]
pub struct HttpLayer {
    state: Arc<ServerState>,
    cors: Option<Rc<Cors>>,
}

impl HttpLayer {
    /// Rate limit and CORS.
    pub fn new(state: &Arc<ServerState>) -> Self {
        HttpLayer { state: state.clone(), cors: Some(Rc::new(Cors::new(&state.config.allow_origins))) }
    }

    /// Rate limit only, for resources that send CORS headers of their own.
    pub fn rate_limit_only(state: &Arc<ServerState>) -> Self {
        HttpLayer { state: state.clone(), cors: None }
    }
}

impl<S, B> Transform<S, ServiceRequest> for HttpLayer
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = HttpLayerService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(HttpLayerService {
            service: Rc::new(service),
            state: self.state.clone(),
            cors: self.cors.clone(),
        }))
    }
}

/// [`HttpLayer`] around one service.
pub struct HttpLayerService<S> {
    service: Rc<S>,
    state: Arc<ServerState>,
    cors: Option<Rc<Cors>>,
}

/// actix answers a method a resource has no route for with an empty 405; upstream (the
/// framework) with `{"detail":"Method Not Allowed"}`. Keeps the `Allow` header.
fn json_method_not_allowed<B>(resp: ServiceResponse<B>) -> ServiceResponse<EitherBody<B>> {
    if resp.status() != actix_web::http::StatusCode::METHOD_NOT_ALLOWED
        || resp.headers().contains_key(header::CONTENT_TYPE)
    {
        return resp.map_into_left_body();
    }
    let allow = resp.headers().get(header::ALLOW).cloned();
    let (req, _) = resp.into_parts();
    let mut json = HttpResponse::MethodNotAllowed();
    if let Some(allow) = allow {
        json.insert_header((header::ALLOW, allow));
    }
    ServiceResponse::new(req, json.json(json!({"detail": "Method Not Allowed"}))).map_into_right_body()
}

fn exempt(req: &ServiceRequest) -> bool {
    req.path().starts_with("/health")
        || req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

impl<S, B> Service<ServiceRequest> for HttpLayerService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        if let Some(limiter) = self.state.http_limiter() {
            if !exempt(&req) {
                let key = bucket_key(&self.state, &req);
                if let Err(wait) = limiter.check(&key, Instant::now()) {
                    tracing::debug!(?key, "HTTP rate limit exceeded");
                    let resp = req.into_response(too_many_requests(wait)).map_into_right_body();
                    return Box::pin(ready(Ok(resp)));
                }
            }
        }
        let origin = req.headers().get(header::ORIGIN).cloned();
        let cors = match (self.cors.clone(), origin) {
            (Some(cors), Some(origin)) => {
                if req.method() == Method::OPTIONS
                    && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
                {
                    let resp = cors.preflight(&origin, req.headers());
                    return Box::pin(ready(Ok(req.into_response(resp).map_into_right_body())));
                }
                Some((cors, origin))
            }
            _ => None,
        };
        let fut = self.service.call(req);
        Box::pin(async move {
            let mut resp = json_method_not_allowed(fut.await?);
            if let Some((cors, origin)) = cors {
                cors.decorate(&origin, resp.headers_mut());
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_and_report_retry_after() {
        let limiter = HttpRateLimiter::new(HttpRateLimits {
            anonymous_rate: 2.0,
            anonymous_burst: 3,
            authenticated_rate: 10.0,
            authenticated_burst: 5,
        });
        let t0 = Instant::now();
        let ip = BucketKey::Anonymous("1.2.3.4".into());
        for _ in 0..3 {
            limiter.check(&ip, t0).unwrap();
        }
        let wait = limiter.check(&ip, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another key has its own bucket, the authenticated tier its own rates.
        limiter.check(&BucketKey::Anonymous("5.6.7.8".into()), t0).unwrap();
        let user = BucketKey::Authenticated("auth:alice".into());
        for _ in 0..5 {
            limiter.check(&user, t0).unwrap();
        }
        assert!(limiter.check(&user, t0).is_err());
        limiter.check(&ip, t0 + Duration::from_millis(500)).unwrap();
        // After the cleanup interval, refilled buckets are dropped.
        let later = t0 + CLEANUP_INTERVAL + Duration::from_secs(1);
        limiter.check(&ip, later).unwrap();
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn preflight_names_what_is_disallowed() {
        let cors = Cors::new(&["https://a.example".to_owned()]);
        let mut h = HeaderMap::new();
        h.insert(header::ACCESS_CONTROL_REQUEST_METHOD, HeaderValue::from_static("FOO"));
        h.insert(header::ACCESS_CONTROL_REQUEST_HEADERS, HeaderValue::from_static("content-type, x-foo"));
        let r = cors.preflight(&HeaderValue::from_static("https://b.example"), &h);
        assert_eq!(r.status(), 400);
        assert!(r.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        let body = actix_web::body::MessageBody::try_into_bytes(r.into_body()).unwrap_or_default();
        assert_eq!(&body[..], b"Disallowed CORS origin, method, headers");
    }

    #[test]
    fn vary_is_appended_once() {
        let mut h = HeaderMap::new();
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        add_vary_origin(&mut h);
        add_vary_origin(&mut h);
        assert_eq!(h.get(header::VARY).unwrap(), "Accept-Encoding, Origin");
    }
}
