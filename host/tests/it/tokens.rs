//! Scoped API tokens on one host: what a token may do is what its scopes
//! say, it is shown once and kept as a hash, it expires and is revoked, it
//! outlives a restart, and the CLI makes, lists and revokes them.
#![allow(clippy::unwrap_used)]

use http::{Method, StatusCode};

use crate::common::{self, TestHost, component, send, test_config, with_token};

/// Makes a token with the admin token; answers it.
async fn make(host: &TestHost, request: serde_json::Value) -> String {
    common::make_token(&host.url, &host.token, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_does_what_its_scopes_say_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let host = TestHost::start(test_config(&data)).await;
    let shop = make(
        &host,
        serde_json::json!({ "name": "shop-ci", "scopes": ["functions:deploy:shop-*"] }),
    )
    .await;
    assert!(shop.starts_with("lch_"), "{shop}");
    let url = host.url.clone();
    let call = |method: Method, path: &str, body: Vec<u8>| {
        let (url, shop) = (url.clone(), shop.clone());
        let path = path.to_string();
        async move { with_token(&url, &shop, method, &path, body).await }
    };

    // Its own functions: deployed, read, their policy written.
    let deployed = call(Method::PUT, "/v1/functions/shop-cart", component("hello")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    let read = call(Method::GET, "/v1/functions/shop-cart", Vec::new()).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    let policy = call(
        Method::PUT,
        "/v1/functions/shop-cart/policy",
        b"[limits]\ntimeout = \"5s\"\n".to_vec(),
    )
    .await;
    assert_eq!(policy.status, StatusCode::OK, "{}", policy.text());

    // Anything else: 403, naming the scope it lacks.
    for (method, path, scope) in [
        (Method::PUT, "/v1/functions/blog", "functions:deploy:blog"),
        (
            Method::DELETE,
            "/v1/functions/shop-cart",
            "functions:delete:shop-cart",
        ),
        (Method::POST, "/v1/tokens", "tokens:admin"),
        (Method::GET, "/v1/functions", "functions:read"),
        (Method::GET, "/v1/status", "status:read"),
        (Method::PUT, "/v1/secrets/pg", "secrets:pg"),
    ] {
        let refused = call(method.clone(), path, component("hello")).await;
        refused.assert_error(StatusCode::FORBIDDEN, "missing_scope");
        assert!(
            refused.text().contains(scope),
            "{method} {path}: {}",
            refused.text()
        );
    }
    // The refused changes are in the audit log, with the token's name.
    let log = host
        .admin(Method::GET, "/v1/audit", Vec::new())
        .await
        .json();
    let refused = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["route"] == "PUT /v1/functions/blog")
        .cloned()
        .unwrap_or_default();
    assert_eq!(refused["token"], "shop-ci", "{log}");
    assert_eq!(refused["result"], 403, "{log}");
    assert_eq!(refused["code"], "missing_scope", "{log}");

    // A name in [http] needs a hosts: scope for it.
    let claim = |hosts: &str| format!("[http]\nhosts = [{hosts}]\n").into_bytes();
    let refused = call(
        Method::PUT,
        "/v1/functions/shop-cart/policy",
        claim("\"shop.test\""),
    )
    .await;
    refused.assert_error(StatusCode::FORBIDDEN, "missing_scope");
    assert!(
        refused.text().contains("hosts:shop.test"),
        "{}",
        refused.text()
    );
    let named = make(
        &host,
        serde_json::json!({
            "name": "shop-web",
            "scopes": ["functions:deploy:shop-*", "hosts:*.shop.test"]
        }),
    )
    .await;
    let put = |hosts: &'static str| {
        let (url, named) = (host.url.clone(), named.clone());
        async move {
            with_token(
                &url,
                &named,
                Method::PUT,
                "/v1/functions/shop-cart/policy",
                claim(hosts),
            )
            .await
        }
    };
    let granted = put("\"eu.shop.test\"").await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.text());
    put("\"eu.shop.test\", \"blog.test\"")
        .await
        .assert_error(StatusCode::FORBIDDEN, "missing_scope");

    // Nothing happened: blog was not deployed, shop-cart is still there.
    let blog = host
        .admin(Method::GET, "/v1/functions/blog", Vec::new())
        .await;
    assert_eq!(blog.status, StatusCode::NOT_FOUND);
    let cart = send(
        Method::GET,
        &format!("{}/fn/shop-cart/", host.url),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(cart.status, StatusCode::OK, "{}", cart.text());

    // The listing shows names, scopes and use; never the token.
    let listed = host.admin(Method::GET, "/v1/tokens", Vec::new()).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert!(!listed.text().contains(&shop[4..]), "{}", listed.text());
    let row = &listed.json()["tokens"][0];
    assert_eq!(row["name"], "shop-ci");
    assert_eq!(row["scopes"][0], "functions:deploy:shop-*");
    assert!(row["last_used_unix_ms"].is_u64(), "{row}");
    assert!(row["expires_unix_ms"].is_null(), "{row}");
    // Nor does anything on disk.
    for file in common::files_under(&data) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(shop.len()).any(|w| w == shop.as_bytes()),
            "{} holds the token",
            file.display()
        );
    }

    // A wrong token is 403; a revoked one 401, and stays so after a restart.
    let wrong = with_token(
        &host.url,
        "lch_wrong",
        Method::GET,
        "/v1/functions",
        Vec::new(),
    )
    .await;
    wrong.assert_error(StatusCode::FORBIDDEN, "forbidden");
    let revoked = host
        .admin(Method::DELETE, "/v1/tokens/shop-ci", Vec::new())
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    call(Method::GET, "/v1/functions/shop-cart", Vec::new())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "token_revoked");
    host.admin(Method::DELETE, "/v1/tokens/shop-ci", Vec::new())
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // One that expires: good until then, 401 after.
    let brief = make(
        &host,
        serde_json::json!({ "name": "brief", "scopes": ["status:read"], "expires_in": "2s" }),
    )
    .await;
    let status = with_token(&host.url, &brief, Method::GET, "/v1/status", Vec::new()).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.text());
    common::eventually("the token expires", || async {
        with_token(&host.url, &brief, Method::GET, "/v1/status", Vec::new())
            .await
            .status
            == StatusCode::UNAUTHORIZED
    })
    .await;
    with_token(&host.url, &brief, Method::GET, "/v1/status", Vec::new())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "token_expired");

    // A token with tokens:admin makes others; the admin token stays root.
    let admin = make(
        &host,
        serde_json::json!({ "name": "ops", "scopes": ["tokens:admin", "functions:read"] }),
    )
    .await;
    let made = with_token(
        &host.url,
        &admin,
        Method::POST,
        "/v1/tokens",
        br#"{"name":"reader","scopes":["functions:read"]}"#.to_vec(),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());

    let token = host.token.clone();
    host.stop().await;
    let host = TestHost::start(test_config(&data)).await;
    assert_eq!(host.token, token);
    with_token(
        &host.url,
        &shop,
        Method::GET,
        "/v1/functions/shop-cart",
        Vec::new(),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "token_revoked");
    let reader = made.json()["token"].as_str().unwrap().to_string();
    let listed = with_token(&host.url, &reader, Method::GET, "/v1/functions", Vec::new()).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_requests_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(dir.path())).await;
    for (body, status, code, says) in [
        ("not json", 400, "invalid_token", "the body must be"),
        (r#"{"name":"x"}"#, 400, "invalid_token", "scopes"),
        (
            r#"{"name":"x","scopes":[]}"#,
            400,
            "invalid_token",
            "at least one scope",
        ),
        (
            r#"{"name":"x","scopes":["functions:write"]}"#,
            400,
            "invalid_token",
            "is not a scope",
        ),
        (
            r#"{"name":"x","scopes":["functions:deploy:shop/*"]}"#,
            400,
            "invalid_token",
            "not a name pattern",
        ),
        (
            r#"{"name":"no spaces","scopes":["status:read"]}"#,
            400,
            "invalid_name",
            "not a token name",
        ),
        (
            r#"{"name":"x","scopes":["status:read"],"expires_in":"soon"}"#,
            400,
            "invalid_token",
            "soon",
        ),
        (
            r#"{"name":"x","scopes":["status:read"],"expires_in":0}"#,
            400,
            "invalid_token",
            "more than nothing",
        ),
        (
            r#"{"name":"x","scopes":["status:read"],"admin":true}"#,
            400,
            "invalid_token",
            "admin",
        ),
    ] {
        let refused = host
            .admin(Method::POST, "/v1/tokens", body.as_bytes().to_vec())
            .await;
        refused.assert_error(StatusCode::from_u16(status).unwrap(), code);
        assert!(refused.text().contains(says), "{body}: {}", refused.text());
    }
    let first = host
        .admin(
            Method::POST,
            "/v1/tokens",
            br#"{"name":"x","scopes":["status:read"]}"#.to_vec(),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    host.admin(
        Method::POST,
        "/v1/tokens",
        br#"{"name":"x","scopes":["functions:read"]}"#.to_vec(),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "token_exists");
    host.admin(Method::DELETE, "/v1/tokens/no%20such", Vec::new())
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_name");
    // Nothing refused was kept: one token.
    let listed = host.admin(Method::GET, "/v1/tokens", Vec::new()).await;
    assert_eq!(listed.json()["tokens"].as_array().unwrap().len(), 1);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_lists_and_revokes_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(dir.path())).await;
    let lichen = |args: &[&str], token: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lichen"))
            .args(args)
            .args(["--url", &host.url])
            .env("LICHEN_ADMIN_TOKEN", token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = lichen(
        &[
            "token",
            "create",
            "shop-ci",
            "--scope",
            "functions:deploy:shop-*",
            "--scope",
            "functions:read",
            "--expires-in",
            "90d",
        ],
        &host.token,
    );
    assert!(ok, "{err}");
    let token = out.lines().next().unwrap().to_string();
    assert!(token.starts_with("lch_"), "{out}");
    // The new token works through the CLI too, within its scopes.
    let (ok, out, err) = lichen(&["ls"], &token);
    assert!(ok, "{err}");
    assert!(out.contains("NAME"), "{out}");
    let (ok, _, err) = lichen(&["token", "ls"], &token);
    assert!(!ok && err.contains("tokens:admin"), "{err}");
    let (ok, out, err) = lichen(&["token", "ls"], &host.token);
    assert!(ok, "{err}");
    assert!(
        out.contains("shop-ci") && out.contains("functions:deploy:shop-*"),
        "{out}"
    );
    assert!(!out.contains(&token[4..]), "{out}");
    let (ok, out, err) = lichen(&["token", "revoke", "shop-ci"], &host.token);
    assert!(ok && out.contains("revoked token shop-ci"), "{out} {err}");
    let (ok, _, err) = lichen(&["ls"], &token);
    assert!(!ok && err.contains("revoked"), "{err}");
    host.stop().await;
}

/// `tokens:admin` makes tokens only of scopes it holds itself, with
/// patterns as narrow or narrower: no token it makes can do more than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_admin_gives_only_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(&dir.path().join("data"))).await;
    let delegator = make(
        &host,
        serde_json::json!({
            "name": "shop-lead",
            "scopes": ["tokens:admin", "functions:deploy:shop-*", "secrets:shop_*"]
        }),
    )
    .await;
    let ask = |token: String, name: &'static str, scopes: serde_json::Value| {
        let url = host.url.clone();
        async move {
            let body = serde_json::json!({ "name": name, "scopes": scopes });
            with_token(
                &url,
                &token,
                Method::POST,
                "/v1/tokens",
                serde_json::to_vec(&body).unwrap(),
            )
            .await
        }
    };
    for (name, scopes) in [
        ("cart-ci", serde_json::json!(["functions:deploy:shop-cart"])),
        ("shop-ci", serde_json::json!(["functions:deploy:shop-*"])),
        ("pg-setter", serde_json::json!(["secrets:shop_pg"])),
        (
            "sub-lead",
            serde_json::json!(["tokens:admin", "functions:deploy:shop-cart"]),
        ),
    ] {
        let made = ask(delegator.clone(), name, scopes).await;
        assert_eq!(made.status, StatusCode::CREATED, "{name}: {}", made.text());
    }
    let sub_lead = ask(
        delegator.clone(),
        "sub-lead-2",
        serde_json::json!(["tokens:admin", "functions:deploy:shop-cart"]),
    )
    .await
    .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, scopes, wider) in [
        (
            "all",
            serde_json::json!(["functions:deploy:*"]),
            "functions:deploy:*",
        ),
        (
            "sho",
            serde_json::json!(["functions:deploy:sho*"]),
            "functions:deploy:sho*",
        ),
        ("status", serde_json::json!(["status:read"]), "status:read"),
        (
            "reader",
            serde_json::json!(["functions:read"]),
            "functions:read",
        ),
        (
            "deleter",
            serde_json::json!(["functions:deploy:shop-*", "functions:delete:shop-*"]),
            "functions:delete:shop-*",
        ),
        ("files", serde_json::json!(["files:*"]), "files:*"),
    ] {
        let refused = ask(delegator.clone(), name, scopes).await;
        refused.assert_error(StatusCode::FORBIDDEN, "missing_scope");
        assert!(refused.text().contains(wider), "{name}: {}", refused.text());
    }
    // What it made can give no more than it holds either.
    ask(
        sub_lead,
        "wider",
        serde_json::json!(["functions:deploy:shop-*"]),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "missing_scope");
    let listed = host
        .admin(Method::GET, "/v1/tokens", Vec::new())
        .await
        .json();
    assert!(
        !listed.to_string().contains("\"all\""),
        "a refused token was made: {listed}"
    );
    // The refusals are in the audit log under the maker's name.
    let log = host
        .admin(Method::GET, "/v1/audit", Vec::new())
        .await
        .json();
    let refused = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["token"] == "shop-lead" && e["result"] == 403)
        .count();
    assert_eq!(refused, 6, "{log}");
    host.stop().await;
}
