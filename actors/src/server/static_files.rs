//! Static files (server spec §1.6): `--static-mounts /path:./dir` directories, and the
//! `/static/...` prefix.
//!
//! Upstream serves each mount with Starlette's `StaticFiles`; what clients see, and what
//! this module does the same way:
//! * `GET|HEAD {path}/{file}` serves the file with a content type from its extension,
//!   `Last-Modified`, `ETag`, conditional and range requests (actix-files' `NamedFile`);
//! * `GET {path}` alone serves `dir/index.html` when there is one;
//! * directories (`{path}/`, `{path}/sub`), missing files, and anything that would leave
//!   the directory (`..` segments, encoded `%2e%2e` or `%2f`, a symlink pointing outside)
//!   are 404 `{"detail":"Not Found"}`; other methods 405 `{"detail":"Method Not Allowed"}`.
//!
//! A request path is percent-decoded, split at `/`, and `.`/empty segments dropped; `..`
//! removes the previous segment and is a 404 when there is none (as upstream normalises
//! `sub/../a.txt` to `a.txt`). The result is joined to the canonical directory and
//! canonicalised again (following symlinks), and must still lie inside it.
//!
//! Upstream's `/static` holds its JS client bundles and web UI assets, which this server
//! does not ship: `/static/...` answers 404 `{"detail":"Not Found"}` as upstream does for a
//! missing file.

use std::path::{Path, PathBuf};

use actix_files::NamedFile;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::config::{ConfigError, StaticMount};

/// Top-level segments a mount may not take: this server's own routes, and upstream's
/// (which refuses mounts that collide with its top-level routes). `public` is refused too:
/// a mount there would hide the login page and the public services.
pub const RESERVED_SEGMENTS: [&str; 12] = [
    "ws",
    "health",
    "metrics",
    "login",
    "static",
    "assets",
    "rpc",
    "oauth",
    "api-docs",
    "api-redoc",
    "openapi.json",
    "public",
];

fn mount_error(mount: &StaticMount, reason: impl Into<String>) -> ConfigError {
    ConfigError::StaticMount {
        mount: format!("{}:{}", mount.path, mount.dir.display()),
        reason: reason.into(),
    }
}

/// Checks every mount: a single top-level segment of URL-safe characters starting with
/// `/`, not a built-in route, not mounted twice, and an existing directory.
pub fn check_mounts(mounts: &[StaticMount]) -> Result<(), ConfigError> {
    let mut seen = Vec::new();
    for mount in mounts {
        let name = segment(mount)?;
        if seen.contains(&name) {
            return Err(mount_error(mount, format!("the route '/{name}' is mounted twice")));
        }
        if !mount.dir.exists() {
            return Err(mount_error(
                mount,
                format!("The directory '{}' does not exist.", mount.dir.display()),
            ));
        }
        if !mount.dir.is_dir() {
            return Err(mount_error(mount, format!("'{}' is not a directory", mount.dir.display())));
        }
        seen.push(name);
    }
    Ok(())
}

/// The mount's single path segment (without slashes), validated.
fn segment(mount: &StaticMount) -> Result<&str, ConfigError> {
    if !mount.path.starts_with('/') {
        return Err(mount_error(mount, "The new route must start with a '/'."));
    }
    let name = mount.path.trim_matches('/');
    if name.is_empty() || name.contains('/') {
        return Err(mount_error(mount, "Only top-level routes are supported."));
    }
    // The segment becomes part of a route pattern: keep to URL-unreserved characters (no
    // `{`, `}` or `%`), and not `.`/`..`.
    if name == "." || name == ".." || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    {
        return Err(mount_error(mount, "the route may only contain letters, digits, '-', '.', '_' and '~'"));
    }
    if RESERVED_SEGMENTS.contains(&name) {
        return Err(mount_error(mount, format!("The route '/{name}' collides with an existing route.")));
    }
    Ok(name)
}

/// `404 {"detail":"Not Found"}`, upstream's answer for any file it will not serve.
pub fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"detail": "Not Found"}))
}

fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed().json(json!({"detail": "Method Not Allowed"}))
}

/// Percent-decodes a URL path; `None` for malformed escapes or non-UTF-8 results.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The file a raw (still percent-encoded) sub-path names inside `root` (canonical), or
/// `None` when it is outside, missing, or not a regular file.
pub fn resolve(root: &Path, raw_tail: &str) -> Option<PathBuf> {
    let decoded = percent_decode(raw_tail)?;
    let mut parts: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            s if s.contains('\\') || s.contains('\0') => return None,
            s => parts.push(s),
        }
    }
    if parts.is_empty() {
        return None;
    }
    let mut path = root.to_path_buf();
    path.extend(&parts);
    // Follows symlinks: a link pointing outside the directory lands outside `root`.
    let real = path.canonicalize().ok()?;
    (real.starts_with(root) && real.is_file()).then_some(real)
}

async fn serve_file(req: &HttpRequest, path: PathBuf) -> HttpResponse {
    let is_js = matches!(path.extension().and_then(|e| e.to_str()), Some("js" | "mjs"));
    match NamedFile::open_async(&path).await {
        Ok(file) => {
            let mut resp = file.disable_content_disposition().into_response(req);
            if is_js {
                // Upstream (Python's mimetypes) answers `text/javascript; charset=utf-8`.
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
            }
            resp
        }
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "static file could not be opened");
            not_found()
        }
    }
}

/// Mounts each directory at its path (before the workspace routes, which it shadows as
/// upstream's mounts do) and `/static/...`.
pub fn configure(mounts: &[StaticMount], wrap: &super::layer::HttpLayer, cfg: &mut web::ServiceConfig) {
    for mount in mounts {
        let name = mount.path.trim_matches('/').to_owned();
        // Checked by `ServerConfig::validate`; a directory removed since then is skipped.
        let Ok(root) = mount.dir.canonicalize() else {
            tracing::warn!(dir = %mount.dir.display(), "static mount directory disappeared; not mounted");
            continue;
        };
        let root = web::Data::new(root);
        cfg.service(
            web::resource(format!("/{name}"))
                .wrap(wrap.clone())
                .app_data(root.clone())
                .route(web::get().to(index))
                .route(web::head().to(index))
                .default_service(web::to(|| async { method_not_allowed() })),
        );
        cfg.service(
            web::resource(format!("/{name}/{{tail:.*}}"))
                .wrap(wrap.clone())
                .app_data(root)
                .route(web::get().to(file))
                .route(web::head().to(file))
                .default_service(web::to(|| async { method_not_allowed() })),
        );
    }
    cfg.service(
        web::resource("/static/{tail:.*}")
            .wrap(wrap.clone())
            .route(web::get().to(|| async { not_found() }))
            .route(web::head().to(|| async { not_found() }))
            .default_service(web::to(|| async { method_not_allowed() })),
    );
}

async fn index(req: HttpRequest, root: web::Data<PathBuf>) -> HttpResponse {
    match resolve(&root, "index.html") {
        Some(path) => serve_file(&req, path).await,
        None => not_found(),
    }
}

async fn file(req: HttpRequest, root: web::Data<PathBuf>) -> HttpResponse {
    // The matched tail keeps `%2F` and `%25` encoded (actix decodes the rest), so
    // separators and dots are decoded exactly once, here.
    let tail = req.match_info().get("tail").unwrap_or_default().to_owned();
    match resolve(&root, &tail) {
        Some(path) => serve_file(&req, path).await,
        None => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("hypha-static-unit-{}", hypha_core::ids::random_id()));
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("a.txt"), "a").unwrap();
        std::fs::write(d.join("sub/b.txt"), "b").unwrap();
        d.canonicalize().unwrap()
    }

    #[test]
    fn resolves_inside_only() {
        let root = dir();
        assert_eq!(resolve(&root, "a.txt"), Some(root.join("a.txt")));
        assert_eq!(resolve(&root, "sub/b.txt"), Some(root.join("sub/b.txt")));
        assert_eq!(resolve(&root, "sub/../a.txt"), Some(root.join("a.txt")));
        assert_eq!(resolve(&root, "sub/%2e%2e/a.txt"), Some(root.join("a.txt")));
        assert_eq!(resolve(&root, "//a.txt"), Some(root.join("a.txt")));
        for bad in [
            "",
            "sub",
            "sub/",
            "missing",
            "../a.txt",
            "%2e%2e/a.txt",
            "..%2fa.txt",
            "%2",
            "%zz",
            "a%00",
            "sub\\b.txt",
        ] {
            assert_eq!(resolve(&root, bad), None, "{bad}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn mounts_are_checked() {
        let root = dir();
        let ok = StaticMount::new("/files", &root);
        check_mounts(std::slice::from_ref(&ok)).unwrap();
        let err = |m: StaticMount| check_mounts(&[m]).unwrap_err().to_string();
        assert!(err(StaticMount::new("files", &root)).contains("must start with a '/'"));
        assert!(err(StaticMount::new("/a/b", &root)).contains("Only top-level routes"));
        assert!(err(StaticMount::new("/", &root)).contains("Only top-level routes"));
        assert!(err(StaticMount::new("/ws", &root)).contains("collides with an existing route"));
        assert!(err(StaticMount::new("/{x}", &root)).contains("may only contain"));
        assert!(err(StaticMount::new("/x", root.join("missing"))).contains("does not exist"));
        assert!(err(StaticMount::new("/x", root.join("a.txt"))).contains("not a directory"));
        assert!(check_mounts(&[ok.clone(), ok]).unwrap_err().to_string().contains("mounted twice"));
        assert_eq!(StaticMount::parse("/p:./d").unwrap(), StaticMount::new("/p", "./d"));
        assert!(StaticMount::parse("/p").is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
