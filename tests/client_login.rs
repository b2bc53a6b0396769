//! `hypha_rpc::client::login` against both servers (issue 5 item 3): the login service's
//! `start`, the callback with the login URL, and the waiting `check` that returns the
//! token once the page (here: a second client doing what the page does) has reported it.

use std::time::Duration;

use hypha_rpc::client::{connect_to_server, login, Client, ClientConfig, Error, LoginConfig, LoginOutcome};
use hypha_rpc::core::{Map, Value};

mod support;

use support::servers::{our_server, PythonServer};

/// What the login page does once the user is in: `report(key, token)` to the login
/// service. The token is a real one of this server (a fresh anonymous user's), so the
/// service accepts it; the reporter answers after `delay`, while `check` is waiting. The
/// reporter stays connected: an anonymous user's workspace goes with its last client.
async fn report_later(url: String, key: String, delay: Duration) -> Result<(String, Client), Error> {
    let page = connect_to_server(ClientConfig::new(url)).await?;
    let token = page.generate_token(Map::new()).await?;
    actix_rt::time::sleep(delay).await;
    let svc = page.get_service("public/hypha-login").await?;
    svc.call("report", vec![Value::from(key), Value::from(token.clone())]).await?;
    Ok((token, page))
}

async fn login_returns_the_reported_token(url: String) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reporter_url = url.clone();
    let config = LoginConfig::new(url.clone())
        // Shorter than the wait below: only the service's heartbeats keep `check` alive.
        .login_timeout(Duration::from_secs(8))
        .login_callback(move |ctx| async move {
            assert!(ctx.login_url.contains("/public/apps/hypha-login/?key="), "{}", ctx.login_url);
            assert!(ctx.login_url.ends_with(&ctx.key));
            actix_rt::spawn(async move {
                let _ = tx.send(report_later(reporter_url, ctx.key, Duration::from_secs(2)).await);
            });
            Ok(())
        });
    let outcome = login(config).await.expect("login");
    let (reported, page) = rx.await.expect("the reporter ran").expect("report");
    assert_eq!(outcome, LoginOutcome::Token(reported.clone()));

    // The token works: a connection with it lands in the reporting user's workspace.
    let c = connect_to_server(ClientConfig::new(url).token(reported)).await.expect("connect with the token");
    assert_eq!(c.workspace(), page.workspace());
    let _ = c.disconnect().await;
    let _ = page.disconnect().await;
}

async fn login_with_profile_returns_the_record(url: String) {
    let reporter_url = url.clone();
    let config = LoginConfig::new(url).profile(true).login_callback(move |ctx| async move {
        actix_rt::spawn(async move {
            if let Ok((_, page)) = report_later(reporter_url, ctx.key, Duration::from_millis(300)).await {
                actix_rt::time::sleep(Duration::from_secs(1)).await;
                let _ = page.disconnect().await;
            }
        });
        Ok(())
    });
    let LoginOutcome::Profile(record) = login(config).await.expect("login") else {
        panic!("profile=true returns the record")
    };
    assert!(record.get("token").and_then(Value::as_str).is_some_and(|t| t.starts_with("ey")), "{record:?}");
    for key in ["workspace", "expires_in", "email", "user_id"] {
        assert!(record.contains_key(key), "{key} missing from {record:?}");
    }
}

async fn nobody_logging_in_times_out_with_upstreams_error(url: String) {
    let config =
        LoginConfig::new(url).login_timeout(Duration::from_secs(1)).login_callback(|_| async { Ok(()) });
    let err = login(config).await.expect_err("nobody reported");
    assert!(format!("{err}").contains("Login timeout, waited for 1 seconds"), "{err}");
}

#[actix_rt::test]
async fn ours_login_returns_the_reported_token() {
    let srv = our_server();
    login_returns_the_reported_token(srv.url()).await;
    login_with_profile_returns_the_record(srv.url()).await;
    nobody_logging_in_times_out_with_upstreams_error(srv.url()).await;
}

#[actix_rt::test]
async fn python_server_login_returns_the_reported_token() {
    let srv = PythonServer::start();
    login_returns_the_reported_token(srv.url.clone()).await;
    login_with_profile_returns_the_record(srv.url.clone()).await;
    nobody_logging_in_times_out_with_upstreams_error(srv.url.clone()).await;
}

/// The blocking wrapper's `login()` from a plain thread, with a plain-thread reporter.
#[test]
fn blocking_login_returns_the_reported_token() {
    let srv = PythonServer::start();
    let url = srv.url.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let config = LoginConfig::new(url.clone()).login_callback(move |ctx| {
        std::thread::spawn(move || {
            let page = hypha_rpc::blocking::connect_to_server(ClientConfig::new(url)).expect("connect");
            let token = page.generate_token(Map::new()).expect("token");
            let svc = page.get_service("public/hypha-login").expect("login service");
            svc.call("report", vec![Value::from(ctx.key), Value::from(token.clone())]).expect("report");
            let _ = tx.send((token, page));
        });
        async { Ok(()) }
    });
    let outcome = hypha_rpc::blocking::login(config).expect("login");
    let (token, page) = rx.recv().expect("the reporter ran");
    assert_eq!(outcome.token(), Some(token.as_str()));
    let _ = page.disconnect();
}
