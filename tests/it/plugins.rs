//! Lua plugins (`plugins/NAME.lua`) and Rust plugins: every phase and API function, each
//! sandbox escape, erroring plugins, the budgets, reload, the shipped examples, and a Rust
//! layer registered by name.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

/// A gateway whose plugins folder holds `plugins`.
async fn start(gateway: &str, routes: &str, plugins: &[(&str, &str)]) -> TestGateway {
    let dir = write_config(gateway, &[("p.toml", routes)]);
    std::fs::create_dir(dir.path().join("plugins")).unwrap();
    for (name, code) in plugins {
        std::fs::write(dir.path().join("plugins").join(format!("{name}.lua")), code).unwrap();
    }
    let server = gatehouse::Server::start(&dir.path().join("gateway.toml"))
        .await
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    TestGateway {
        addr: server.http_addrs()[0],
        admin: server.admin_addr(),
        server: Some(server),
        dir,
    }
}

fn route(name: &str, path: &str, plugins: &str, extra: &str) -> String {
    format!("\n[[route]]\nname = \"{name}\"\npath = \"{path}\"\nplugins = {plugins}\n{extra}proxy = {{ service = \"echo\" }}\n")
}

async fn gw_echo(extra: &str) -> (Upstream, String) {
    let up = echo_upstream().await;
    let g = gateway_toml(
        "",
        &format!("[services.echo]\nendpoints = [\"{}\"]\n{extra}", up.url()),
    );
    (up, g)
}

const PROBE: &str = r#"
return {
  on_request = function(req, ctx)
    req.headers["x-method"] = req.method
    req.headers["x-path-seen"] = req.path
    req.headers["x-query-seen"] = req.query or ""
    req.headers["x-greeting"] = ctx.config.greeting
    req.headers["x-route"] = ctx.route
    req.headers["x-client-ip"] = ctx.client_ip
    req.headers["x-item"] = ctx.params.item or "none"
    req.headers["x-consumer"] = ctx.consumer or "none"
    req.headers["x-ua"] = req.headers["USER-AGENT"]
    req.headers["x-sha"] = gatehouse.sha256("abc")
    local n = 0
    for _ in pairs(req.headers:all()) do n = n + 1 end
    req.headers["x-header-count"] = tostring(n)
    print("probe saw", req.path)
    req.headers["x-remove-me"] = nil
    ctx.started = "yes"
    ctx.n = 41
    if req.query == "rewrite" then req.query = "rewritten=1" end
    if string.find(req.path, "teapot", 1, true) then
      return { status = 418, body = "short and stout", headers = { ["x-short"] = "1" } }
    end
  end,
  on_response = function(res, ctx)
    res.headers["x-status-seen"] = tostring(res.status)
    res.headers["x-ctx"] = ctx.started .. ":" .. tostring(ctx.n + 1)
    res.headers["x-upstream-ct"] = res.headers["Content-Type"]
    if res.status == 200 and ctx.config.gone then res.status = 410 end
  end,
  on_log = function(ctx)
    gatehouse.log("info", "probe done for " .. ctx.route)
  end,
}
"#;

#[tokio::test]
async fn every_phase_and_api_function() {
    let (_up, g) = gw_echo("").await;
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}{}",
        route(
            "probe",
            "/p/{item}",
            "[\"probe\"]",
            "plugin_config.probe = { greeting = \"hello\" }\n"
        ),
        route(
            "gone",
            "/gone",
            "[\"probe\"]",
            "plugin_config.probe = { greeting = \"bye\", gone = true }\n"
        ),
    );
    let gw = start(&g, &routes, &[("probe", PROBE)]).await;
    let r = send(
        Request::get(gw.url("/p/tea?rewrite"))
            .header("user-agent", "curl/8")
            .header("x-remove-me", "1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    let h = &seen["headers"];
    assert_eq!(h["x-method"], "GET");
    assert_eq!(h["x-path-seen"], "/p/tea");
    assert_eq!(h["x-query-seen"], "rewrite");
    assert_eq!(
        seen["query"], "rewritten=1",
        "req.query set reaches the service"
    );
    assert_eq!(h["x-greeting"], "hello");
    assert_eq!(h["x-route"], "f/probe");
    assert_eq!(h["x-client-ip"], "127.0.0.1");
    assert_eq!(h["x-item"], "tea");
    assert_eq!(h["x-consumer"], "none");
    assert_eq!(h["x-ua"], "curl/8", "headers are read case-insensitively");
    assert_eq!(
        h["x-sha"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(
        h["x-header-count"]
            .as_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 3,
        "{h}"
    );
    assert!(h.get("x-remove-me").is_none(), "assigning nil removes");
    assert_eq!(r.header("x-status-seen"), "200");
    assert_eq!(
        r.header("x-ctx"),
        "yes:42",
        "ctx values carry to on_response"
    );
    assert_eq!(r.header("x-upstream-ct"), "application/json");
    // Short-circuit: the plugin answers, the backend is not called.
    let before = _up.requests();
    let r = get(&gw.url("/p/teapot")).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "short and stout");
    assert_eq!(r.header("x-short"), "1");
    assert_eq!(_up.requests(), before);
    // on_response may change the status.
    assert_eq!(get(&gw.url("/gone")).await.status, 410);
    let m = get(&gw.admin_url("/metrics")).await.text();
    for line in [
        "gatehouse_plugin_calls_total{phase=\"request\",plugin=\"probe\"} 3",
        "gatehouse_plugin_calls_total{phase=\"log\",plugin=\"probe\"} 3",
        "gatehouse_plugin_calls_total{phase=\"response\",plugin=\"probe\"} 2",
    ] {
        assert!(m.contains(line), "{line}\n{m}");
    }
    assert!(m.contains("gatehouse_plugin_seconds_total{plugin=\"probe\"}"));
}

/// A request's own ctx values never reach the next request.
#[tokio::test]
async fn ctx_values_are_per_request() {
    let (_up, g) = gw_echo("").await;
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}",
        route("c", "/c", "[\"ctx\"]", "")
    );
    let code = r#"return {
  on_request = function(req, ctx)
    req.headers["x-seen"] = tostring(ctx.seen)
    ctx.seen = "yes"
  end,
  on_response = function(res, ctx) res.headers["x-own"] = ctx.seen end,
}"#;
    let gw = start(&g, &routes, &[("ctx", code)]).await;
    for _ in 0..3 {
        let r = get(&gw.url("/c")).await;
        assert_eq!(r.json()["headers"]["x-seen"], "nil");
        assert_eq!(r.header("x-own"), "yes");
    }
}

#[tokio::test]
async fn a_rewritten_path_is_what_the_service_gets() {
    let (_up, g) = gw_echo("").await;
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}",
        route("old", "/old/{*rest}", "[\"move\"]", "")
    );
    let code =
        r#"return { on_request = function(req, ctx) req.path = "/new/" .. ctx.params.rest end }"#;
    let gw = start(&g, &routes, &[("move", code)]).await;
    let r = get(&gw.url("/old/a/b?x=1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/new/a/b");
    assert_eq!(r.json()["query"], "x=1");
}

/// Each tries to leave the sandbox or to take the worker down; each is a 500 `plugin_error`
/// naming it, and the gateway goes on serving.
#[tokio::test]
async fn sandbox_escapes_and_runaways_are_plugin_errors() {
    let escapes: &[(&str, &str)] = &[
        ("io", "io.open('/etc/passwd')"),
        ("os", "os.execute('true')"),
        ("require", "require('socket')"),
        ("load", "load('return 1')()"),
        ("dofile", "dofile('/etc/passwd')"),
        ("dump", "string.dump(function() end)"),
        ("debug", "debug.getinfo(1)"),
        ("global", "leak = 1"),
        ("rawset", "rawset(ctx, 'leak', 1)"),
        ("meta", "setmetatable(ctx, {})"),
        ("assign", "req.method = 'DELETE'"),
        (
            "gc",
            "setmetatable({}, {__gc = function() while true do end end})",
        ),
        ("repempty", "string.rep('', math.maxinteger)"),
        ("move", "table.move({}, 1, 1 << 62, 1, {})"),
        (
            "pattern",
            "string.find(string.rep('a', 40), string.rep('a*', 40) .. 'b')",
        ),
        ("lib", "string.find = nil"),
        ("config", "ctx.config.x = 1"),
        ("strmeta", "getmetatable('').__index = {}"),
        ("dotdot", "req.path = '/a/../admin'"),
        ("loop", "while true do end"),
        (
            "alloc",
            "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end",
        ),
        ("rep", "local s = string.rep('x', 1 << 40)"),
        ("error", "error('broken on purpose')"),
        ("header", "req.headers['bad header'] = 'x'"),
        ("value", "req.headers['x-ok'] = 'a\\nb'"),
    ];
    let (_up, g) = gw_echo("\n[plugins]\nmemory_limit = \"8MiB\"\ntime_budget = \"50ms\"\n").await;
    let mut routes = "[frontend]\nname = \"f\"\n".to_owned();
    let mut files = Vec::new();
    for (name, body) in escapes {
        routes.push_str(&route(
            name,
            &format!("/{name}"),
            &format!("[\"{name}\"]"),
            "",
        ));
        files.push((
            name.to_string(),
            format!("return {{ on_request = function(req, ctx) {body} end }}"),
        ));
    }
    routes.push_str(&route(
        "skipped",
        "/skipped",
        "[\"error\"]",
        "plugin_config.error = { on_error = \"skip\" }\n",
    ));
    routes.push_str(
        "\n[[route]]\nname = \"plain\"\npath = \"/plain\"\nproxy = { service = \"echo\" }\n",
    );
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let gw = start(&g, &routes, &files).await;
    for (name, _) in escapes {
        let r = get(&gw.url(&format!("/{name}"))).await;
        assert_problem(&r, 500, "plugin_error");
        assert_eq!(r.json()["plugin"], *name, "{}", r.text());
        // The worker is fine: the next request is served.
        assert_eq!(get(&gw.url("/plain")).await.status, 200, "after {name}");
    }
    // `on_error = "skip"`: as if the plugin were not there.
    assert_eq!(get(&gw.url("/skipped")).await.status, 200);
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("gatehouse_plugin_errors_total{plugin=\"loop\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("gatehouse_plugin_errors_total{plugin=\"error\"} 2"),
        "{m}"
    );
}

#[test]
fn plugin_mistakes_are_located() {
    let g = gateway_toml(
        "",
        "[services.echo]\nendpoints = [\"http://127.0.0.1:1\"]\n",
    );
    let check = |routes: &str, plugins: &[(&str, &str)]| {
        let dir = write_config(&g, &[("p.toml", routes)]);
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        for (name, code) in plugins {
            std::fs::write(dir.path().join("plugins").join(format!("{name}.lua")), code).unwrap();
        }
        let metrics = gatehouse::observe::metrics::Metrics::new();
        match gatehouse::gateway::load_and_compile(
            &dir.path().join("gateway.toml"),
            None,
            &metrics,
            1,
        ) {
            Ok(_) => String::new(),
            Err(e) => {
                e.0.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
    };
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}",
        route("a", "/a", "[\"x\"]", "")
    );
    let e = check(
        &routes,
        &[(
            "x",
            "return {\n  on_request = function(req)\n    local = 1\n  end,\n}\n",
        )],
    );
    assert!(
        e.contains("x.lua:3:1: plugin:"),
        "a syntax error at its line: {e}"
    );
    let e = check(&routes, &[("x", "return { on_reqest = function() end }")]);
    assert!(e.contains("unknown key `on_reqest`"), "{e}");
    let e = check(&routes, &[("x", "return 42")]);
    assert!(e.contains("must return a table of phase functions"), "{e}");
    let e = check(&routes, &[("x", "return { on_request = 1 }")]);
    assert!(e.contains("`on_request` must be a function"), "{e}");
    let e = check(&routes, &[("y", "return { on_request = function() end }")]);
    assert!(
        e.contains("p.toml:7:")
            && e.contains("unknown plugin `x`")
            && e.contains("plugins there: y"),
        "{e}"
    );
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}",
        route(
            "a",
            "/a",
            "[\"x\"]",
            "plugin_config.x = { on_error = \"maybe\" }\nplugin_config.z = {}\n"
        )
    );
    let e = check(&routes, &[("x", "return { on_request = function() end }")]);
    assert!(e.contains("on_error must be \"fail\" or \"skip\""), "{e}");
    assert!(e.contains("`z` is not one of this route's plugins"), "{e}");
}

#[tokio::test]
async fn plugins_reload_with_the_config_and_a_broken_one_keeps_the_old() {
    let (_up, g) = gw_echo("").await;
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}",
        route("a", "/a", "[\"tag\"]", "")
    );
    let v1 = r#"return { on_response = function(res) res.headers["x-tag"] = "v1" end }"#;
    let gw = start(&g, &routes, &[("tag", v1)]).await;
    assert_eq!(get(&gw.url("/a")).await.header("x-tag"), "v1");
    let file = gw.dir.path().join("plugins/tag.lua");
    std::fs::write(&file, v1.replace("v1", "v2")).unwrap();
    assert_eq!(admin_reload(&gw).await.status, 200);
    assert_eq!(get(&gw.url("/a")).await.header("x-tag"), "v2");
    // The folder is watched: an edit reloads by itself.
    std::fs::write(&file, v1.replace("v1", "v3")).unwrap();
    eventually(10, "the watched plugin reloaded", || async {
        get(&gw.url("/a")).await.header("x-tag") == "v3"
    })
    .await;
    // A syntax error: the reload fails, located, and v2 keeps serving.
    std::fs::write(
        &file,
        "return { on_response = function(res) res.headers[ end }",
    )
    .unwrap();
    let r = admin_reload(&gw).await;
    assert_ne!(r.status, 200);
    assert!(r.text().contains("tag.lua:1:"), "{}", r.text());
    assert_eq!(get(&gw.url("/a")).await.header("x-tag"), "v3");
}

#[tokio::test]
async fn the_shipped_examples_work() {
    let (_up, g) = gw_echo(
        "\n[auth.jwt.main]\nalgorithms = [\"HS256\"]\nsecret = \"s3cret-s3cret-s3cret-s3cret-s3cret!\"\n",
    )
    .await;
    let shipped = |n: &str| {
        std::fs::read_to_string(format!("{}/plugins/{n}.lua", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let names = ["add-tenant", "deny-bots", "sign-body", "response-headers"];
    let codes: Vec<String> = names.iter().map(|n| shipped(n)).collect();
    let files: Vec<(&str, &str)> = names
        .iter()
        .zip(&codes)
        .map(|(n, c)| (*n, c.as_str()))
        .collect();
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}{}{}{}",
        route("tenant", "/tenant", "[\"add-tenant\"]", "auth = \"main\"\nplugin_config.add-tenant = { claim = \"sub\", header = \"x-tenant\" }\n"),
        route("bots", "/bots", "[\"deny-bots\"]", "plugin_config.deny-bots = { cidrs = [\"10.0.0.0/8\"], user_agents = [\"EvilBot\"] }\n"),
        route("local", "/local", "[\"deny-bots\"]", "plugin_config.deny-bots = { cidrs = [\"127.0.0.0/8\"] }\n"),
        route("signed", "/signed", "[\"sign-body\", \"response-headers\"]", "plugin_config.sign-body = { secret = \"k1\", header = \"x-signature\" }\nplugin_config.response-headers = { set = { x-frame-options = \"DENY\" }, remove = [\"content-type\"] }\n"),
    );
    let gw = start(&g, &routes, &files).await;
    // add-tenant: the claim as a header; a client's own x-tenant is not trusted.
    let token = hs256_token(b"s3cret-s3cret-s3cret-s3cret-s3cret!", "acme-1");
    let r = send(
        Request::get(gw.url("/tenant"))
            .header("authorization", format!("Bearer {token}"))
            .header("x-tenant", "forged")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-tenant"], "acme-1");
    // deny-bots: by User-Agent, and by CIDR.
    let r = send(
        Request::get(gw.url("/bots"))
            .header("user-agent", "Mozilla/5.0 (evilbot 2.0)")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_problem(&r, 403, "denied");
    assert_eq!(get(&gw.url("/bots")).await.status, 200);
    assert_problem(&get(&gw.url("/local")).await, 403, "denied");
    // sign-body: the service gets the HMAC of method, path and body.
    let r = send(
        Request::post(gw.url("/signed"))
            .body(Full::new(Bytes::from_static(b"{\"amount\":5}")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k1");
    let want: String = ring::hmac::sign(&key, b"POST\n/signed\n{\"amount\":5}")
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(r.json()["headers"]["x-signature"], want.as_str());
    // response-headers: set and removed.
    assert_eq!(r.header("x-frame-options"), "DENY");
    assert_eq!(r.header("content-type"), "");
}

/// A Rust layer registered by name (as a custom build would, see examples/rust_plugin.rs),
/// named by a route like a Lua plugin and set up by its plugin_config.
#[tokio::test]
async fn a_registered_rust_layer_is_named_like_a_lua_plugin() {
    gatehouse::plugin::register("stamp", |cfg: &toml::Table| {
        let v = cfg
            .get("value")
            .and_then(|v| v.as_str())
            .ok_or("plugin_config.stamp.value is required")?;
        Ok(Stamp(Arc::from(v)))
    });
    let (_up, g) = gw_echo("").await;
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}",
        route(
            "r",
            "/r",
            "[\"stamp\"]",
            "plugin_config.stamp = { value = \"from-rust\" }\n"
        )
    );
    let gw = start(&g, &routes, &[]).await;
    let r = get(&gw.url("/r")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-stamp"), "from-rust");
    assert_eq!(r.json()["headers"]["x-stamp-in"], "from-rust");
}

#[derive(Clone)]
struct Stamp(Arc<str>);

impl<S> tower::Layer<S> for Stamp {
    type Service = StampService<S>;
    fn layer(&self, inner: S) -> StampService<S> {
        StampService(self.0.clone(), inner)
    }
}

#[derive(Clone)]
struct StampService<S>(Arc<str>, S);

impl<S> tower::Service<http::Request<gatehouse::plugin::RequestBody>> for StampService<S>
where
    S: tower::Service<
            http::Request<gatehouse::plugin::RequestBody>,
            Response = http::Response<gatehouse::plugin::ResponseBody>,
            Error = gatehouse::plugin::BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<gatehouse::plugin::ResponseBody>;
    type Error = gatehouse::plugin::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.1.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<gatehouse::plugin::RequestBody>) -> Self::Future {
        let v = http::HeaderValue::from_str(&self.0).unwrap();
        req.headers_mut().insert("x-stamp-in", v.clone());
        let fut = self.1.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            resp.headers_mut().insert("x-stamp", v);
            Ok(resp)
        })
    }
}

/// examples/rust_plugin.rs, built by `cargo test` beside the tests: a binary of its own with a
/// registered `server-timing` layer, run on a config that names it.
#[tokio::test]
async fn the_rust_plugin_example_runs() {
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/rust_plugin");
    assert!(
        exe.exists(),
        "{} is built by `cargo test` (a filtered `cargo test --test it` does not build examples: `cargo build --examples` first)",
        exe.display()
    );
    let (_up, g) = gw_echo("").await;
    let routes = format!(
        "[frontend]\nname = \"f\"\n{}",
        route(
            "t",
            "/t",
            "[\"server-timing\"]",
            "plugin_config.server-timing = { metric = \"edge\" }\n"
        )
    );
    let dir = write_config(&g, &[("p.toml", &routes)]);
    let mut child = std::process::Command::new(&exe)
        .arg(dir.path().join("gateway.toml"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .split(['[', ']'])
        .nth(1)
        .unwrap_or_else(|| panic!("the example's first line: {line}"))
        .to_owned();
    let r = get(&format!("http://{addr}/t")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("server-timing").starts_with("edge;dur="),
        "{:?}",
        r.header("server-timing")
    );
}

#[test]
fn plugins_limits_are_checked_where_they_are_written() {
    let g = gateway_toml(
        "",
        "[services.echo]\nendpoints = [\"http://127.0.0.1:1\"]\n\n[plugins]\nmemory_limit = \"0B\"\ntime_budget = \"0s\"\n",
    );
    let e = compile_errors(&g, "p.toml", "[frontend]\nname = \"f\"\n");
    assert!(
        e.contains("gateway.toml:") && e.contains("greater than zero"),
        "{e}"
    );
}
