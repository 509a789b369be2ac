//! BFF aggregation against real upstream servers: parallel calls, a chain through a call's
//! answer, `for_each` under a concurrency bound, shaping, required and optional failures,
//! the deadline cancelling calls, and values that try to break out of their path segment.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::support::*;

fn json_resp(v: Value) -> Response<TestBody> {
    let mut r = text(200, serde_json::to_vec(&v).unwrap());
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn config(services: &[(&str, &Upstream)]) -> String {
    let mut s = String::new();
    for (name, up) in services {
        s.push_str(&format!(
            "[services.{name}]\nendpoints = [\"{}\"]\n\n",
            up.url()
        ));
    }
    gateway_toml("", &s)
}

fn routes(extra: &str) -> String {
    format!("[frontend]\nname = \"m\"\npath_prefix = \"/m\"\n\n{extra}")
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Answers with the path, query and chosen headers it got, as JSON.
async fn mirror() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        json_resp(json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "request_id": h("x-request-id"),
            "traceparent": h("traceparent"),
            "x_user": h("x-user"),
            "content_type": h("content-type"),
            "body": String::from_utf8_lossy(&body),
        }))
    })
    .await
}

/// Three calls without dependencies are in flight at once: the upstream holds each until all
/// three have arrived (a barrier), so calls made one after another would never complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_dependencies_run_at_once() {
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let b = barrier.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let b = b.clone();
        async move {
            let met = tokio::time::timeout(Duration::from_secs(5), b.wait())
                .await
                .is_ok();
            json_resp(json!({"path": req.uri().path(), "met": met}))
        }
    })
    .await;
    let route = r#"
[[route]]
name = "home"
path = "/home"
[route.aggregate]
[[route.aggregate.call]]
name = "a"
service = "svc"
path = "/a"
[[route.aggregate.call]]
name = "b"
service = "svc"
path = "/b"
[[route.aggregate.call]]
name = "c"
service = "svc"
path = "/c"
"#;
    let gw = TestGateway::start(&config(&[("svc", &up)]), &[("m.toml", &routes(route))]).await;
    let r = get(&gw.url("/m/home")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/json");
    let v = r.json();
    for k in ["a", "b", "c"] {
        assert_eq!(v[k]["met"], true, "{v}");
        assert_eq!(v[k]["path"], format!("/{k}"));
    }
    assert!(r.headers.get("gatehouse-complete").is_none());
}

/// A chain: `orders` waits for `user` and reads its answer; `for_each` makes one call per
/// element, at most `max_concurrency` at a time, collected in input order; shapes apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_for_each_and_shapes() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (f, m, s) = (in_flight.clone(), most.clone(), seen.clone());
    let up = Upstream::start(move |req: Request<Incoming>| {
        let (f, m, s) = (f.clone(), m.clone(), s.clone());
        async move {
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or("").to_owned();
            s.lock().unwrap().push(format!("{path}?{query}"));
            if path == "/v1/users/ada" {
                return json_resp(json!({"id": "u-7", "name": "Ada", "password_hash": "x"}));
            }
            if path == "/v1/orders" {
                return json_resp(json!({"data": {"items": [
                    {"id": 1, "status": "paid", "sku": "s1", "secret": 1},
                    {"id": 2, "status": "open", "sku": "s2", "secret": 2},
                    {"id": 3, "status": "open", "sku": "s3", "secret": 3},
                    {"id": 4, "status": "paid", "sku": "s4", "secret": 4},
                    {"id": 5, "status": "paid", "sku": "s5", "secret": 5}
                ]}}));
            }
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            // Later elements answer sooner: the order of the answers is the input's anyway.
            let n: u64 = path
                .trim_start_matches("/v1/products/s")
                .parse()
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(60 - n * 10)).await;
            f.fetch_sub(1, Ordering::SeqCst);
            json_resp(json!({"sku": path.trim_start_matches("/v1/products/"), "price": n * 100}))
        }
    })
    .await;
    let route = r#"
[[route]]
name = "home"
path = "/home/{who}"
[route.aggregate]
max_concurrency = 2
[[route.aggregate.call]]
name = "user"
service = "svc"
path = "/v1/users/{who}"
shape = { deny = ["password_hash"], flatten = true }
[[route.aggregate.call]]
name = "orders"
service = "svc"
path = "/v1/orders"
query = { user = "{calls.user.body.id}", limit = "{query.limit:-5}" }
depends_on = ["user"]
shape = { target = "data.items", allow = ["id", "status"], rename = { status = "state" } }
[[route.aggregate.call]]
name = "products"
service = "svc"
path = "/v1/products/{item}"
for_each = "calls.orders_raw.body.data.items[*].sku"
depends_on = ["orders_raw"]
[[route.aggregate.call]]
name = "orders_raw"
service = "svc"
path = "/v1/orders"
shape = { target = "nothing" }
"#;
    let gw = TestGateway::start(&config(&[("svc", &up)]), &[("m.toml", &routes(route))]).await;
    let r = get(&gw.url("/m/home/ada?limit=3")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    // `user` flattened into the root, without its denied field.
    assert_eq!(v["name"], "Ada");
    assert_eq!(v["id"], "u-7");
    assert!(
        v.get("password_hash").is_none() && v.get("user").is_none(),
        "{v}"
    );
    // `orders`: the subtree, only the allowed fields, `status` renamed.
    assert_eq!(v["orders"][0], json!({"id": 1, "state": "paid"}));
    assert_eq!(v["orders"].as_array().unwrap().len(), 5);
    // `products`: one call per element, in input order, two at a time at most.
    let skus: Vec<&str> = v["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sku"].as_str().unwrap())
        .collect();
    assert_eq!(skus, ["s1", "s2", "s3", "s4", "s5"]);
    assert_eq!(most.load(Ordering::SeqCst), 2, "max_concurrency = 2");
    // The chain read the user's id, the client's query, and the default.
    let got = seen.lock().unwrap().clone();
    assert!(
        got.contains(&"/v1/orders?limit=3&user=u-7".to_owned()),
        "{got:?}"
    );
    let s = seen;
    // Without `limit`, its default.
    let r = get(&gw.url("/m/home/ada")).await;
    assert_eq!(r.status, 200);
    assert!(s
        .lock()
        .unwrap()
        .contains(&"/v1/orders?limit=5&user=u-7".to_owned()));
}

/// Values from the client or a backend never change the target: each stays one encoded path
/// segment or query value; a value that cannot (`..`, a line break in a header) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_values_stay_one_encoded_segment() {
    let up = mirror().await;
    let route = r#"
[[route]]
name = "item"
path = "/item/{id}"
[route.aggregate]
[[route.aggregate.call]]
name = "by_query"
service = "svc"
path = "/v1/items/{query.q}/x"
query = { q = "{query.q}" }
headers = { x-user = "{headers.x-who:-anon}" }
[[route.aggregate.call]]
name = "by_param"
service = "svc"
path = "/v1/things/{id}"
"#;
    let gw = TestGateway::start(&config(&[("svc", &up)]), &[("m.toml", &routes(route))]).await;
    let client_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get_with(
        &gw.url("/m/item/a%2Fb?q=..%2F..%2Fadmin%3Fx%3D1%23f%252F%20"),
        &[("x-who", "ada"), ("traceparent", client_trace)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["by_query"]["path"],
        "/v1/items/..%2F..%2Fadmin%3Fx%3D1%23f%252F%20/x"
    );
    assert_eq!(
        v["by_query"]["query"],
        "q=..%2F..%2Fadmin%3Fx%3D1%23f%252F%20"
    );
    assert_eq!(v["by_query"]["x_user"], "ada");
    assert_eq!(v["by_param"]["path"], "/v1/things/a%2Fb");
    // Every call carries the request id and a trace context.
    assert_eq!(v["by_query"]["request_id"], r.header("x-request-id"));
    // Each call continues the client's trace, as a span of its own.
    for call in ["by_query", "by_param"] {
        let tp = v[call]["traceparent"].as_str().unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(!tp.contains("00f067aa0ba902b7"), "a new span id: {tp}");
    }

    // A whole `..` is not a segment: the client's fault, 400, nothing sent.
    let before = up.requests();
    let r = get(&gw.url("/m/item/1?q=..")).await;
    assert_problem(&r, 400, "missing_parameter");
    assert_eq!(r.json()["call"], "by_query");
    // A missing value is an error, not an empty string.
    let r = get(&gw.url("/m/item/1")).await;
    assert_problem(&r, 400, "missing_parameter");
    assert!(
        r.json()["detail"].as_str().unwrap().contains("query.q"),
        "{}",
        r.text()
    );
    // The refused call was never sent (counted by its failure, not as an answer).
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(
            r#"gatehouse_aggregate_calls_total{call="by_query",outcome="200",route="m/item"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"gatehouse_aggregate_calls_total{call="by_query",outcome="missing_parameter",route="m/item"} 2"#),
        "{m}"
    );
    let _ = before;
}

/// A required call that fails fails the request, naming it; an optional one is listed in
/// `errors`, with `Gatehouse-Complete: false`. The deadline cancels calls still running: the
/// upstream sees its request dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_the_deadline() {
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let d = d.clone();
        async move {
            match req.uri().path() {
                "/ok" => json_resp(json!({"fine": true})),
                "/fail" => text(500, "boom"),
                "/html" => text(200, "<html>"),
                "/big" => json_resp(json!({"blob": "x".repeat(100)})),
                "/more" => json_resp(json!({"also": 1})),
                "/list" => json_resp(json!({"items": [1, 2, 3]})),
                "/bad-request" => text(400, "{}"),
                _ => {
                    // Hangs; records being dropped (the gateway closed the request).
                    struct Flag(Arc<AtomicBool>);
                    impl Drop for Flag {
                        fn drop(&mut self) {
                            self.0.store(true, Ordering::SeqCst);
                        }
                    }
                    let _flag = Flag(d);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    text(200, "late")
                }
            }
        }
    })
    .await;
    let call = |name: &str, path: &str, required: bool| {
        format!("[[route.aggregate.call]]\nname = \"{name}\"\nservice = \"svc\"\npath = \"{path}\"\nrequired = {required}\n")
    };
    let route = format!(
        "[[route]]\nname = \"partial\"\npath = \"/partial\"\n[route.aggregate]\ntimeout = \"300ms\"\n{}{}{}\n[[route]]\nname = \"broken\"\npath = \"/broken\"\n[route.aggregate]\n{}{}\n[[route]]\nname = \"slow\"\npath = \"/slow\"\n[route.aggregate]\ntimeout = \"200ms\"\n{}",
        call("ok", "/ok", true),
        call("flaky", "/fail", false),
        call("stuck", "/hang", false) + &call("after_flaky", "/ok", false) + "depends_on = [\"flaky\"]\n",
        call("ok", "/ok", true),
        call("html", "/html", true),
        call("stuck", "/hang", true),
    ) + &format!(
        "\n[[route]]\nname = \"root\"\npath = \"/root\"\n[route.aggregate]\nmerge = \"root\"\nmax_call_body = \"64B\"\n{}{}{}",
        call("ok", "/ok", true),
        call("more", "/more", true),
        call("big", "/big", false),
    ) + &format!(
        "\n[[route]]\nname = \"capped\"\npath = \"/capped\"\n[route.aggregate]\nmax_calls = 3\n{}{}for_each = \"calls.list.body.items[*]\"\ndepends_on = [\"list\"]\n",
        call("list", "/list", true),
        call("each", "/ok", true),
    ) + &format!(
        // A required call listed before the optional dependency that fails at once, and a
        // service answering 400 (its fault, not the client's).
        "\n[[route]]\nname = \"order\"\npath = \"/order\"\n[route.aggregate]\n{}depends_on = [\"early\"]\n{}\n[[route]]\nname = \"refused\"\npath = \"/refused\"\n[route.aggregate]\n{}",
        call("late", "/ok", true),
        call("early", "/x/{query.nope}", false),
        call("asks", "/bad-request", true),
    );
    let gw = TestGateway::start(&config(&[("svc", &up)]), &[("m.toml", &routes(&route))]).await;

    let r = get(&gw.url("/m/partial")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("gatehouse-complete"), "false");
    assert_eq!(r.header("cache-control"), "no-store");
    let v = r.json();
    assert_eq!(v["ok"]["fine"], true);
    assert_eq!(
        v["errors"],
        json!([
            {"call": "flaky", "status": 500, "code": "upstream_status"},
            {"call": "stuck", "status": 504, "code": "timeout"},
            {"call": "after_flaky", "status": 424, "code": "dependency_failed", "detail": "flaky failed"}
        ])
    );
    eventually(
        5,
        "the cancelled call's request is dropped upstream",
        || async { dropped.load(Ordering::SeqCst) },
    )
    .await;

    let r = get(&gw.url("/m/broken")).await;
    assert_problem(&r, 502, "aggregate_call_failed");
    assert_eq!(
        (r.json()["call"].clone(), r.json()["call_code"].clone()),
        (json!("html"), json!("invalid_json"))
    );

    // The required call whose optional dependency failed fails too: never silently absent.
    let r = get(&gw.url("/m/order")).await;
    assert_problem(&r, 502, "aggregate_call_failed");
    assert_eq!(r.json()["call"], "late");
    assert_eq!(r.json()["call_code"], "dependency_failed");
    // A service's 400 is a failed call (502), not the client's 400.
    let r = get(&gw.url("/m/refused")).await;
    assert_problem(&r, 502, "aggregate_call_failed");
    assert_eq!(r.json()["call_status"], 400);

    // More calls than `max_calls`: the one beyond fails (required: the request fails).
    let r = get(&gw.url("/m/capped")).await;
    assert_problem(&r, 502, "aggregate_call_failed");
    assert_eq!(r.json()["call_code"], "too_many_calls");

    // Merged at the root; a body over `max_call_body` is that call's error.
    let r = get(&gw.url("/m/root")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"fine": true, "also": 1, "errors": [{"call": "big", "status": 502, "code": "call_body_too_large"}]})
    );

    let r = get(&gw.url("/m/slow")).await;
    assert_problem(&r, 504, "aggregate_call_timeout");
    assert_eq!(r.json()["call"], "stuck");

    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(
            r#"gatehouse_aggregate_calls_total{call="flaky",outcome="500",route="m/partial"} 1"#
        ),
        "{m}"
    );
    assert!(m.contains(
        r#"gatehouse_aggregate_call_duration_seconds_count{call="ok",route="m/partial"} 1"#
    ));
}

#[tokio::test]
async fn aggregate_config_mistakes_are_located() {
    let gw = gateway_toml("", "[services.svc]\nendpoints = [\"http://127.0.0.1:1\"]\n");
    let route = |calls: &str| {
        routes(&format!(
            "[[route]]\nname = \"home\"\npath = \"/home\"\n[route.aggregate]\n{calls}"
        ))
    };
    let call = |name: &str, extra: &str| {
        format!("[[route.aggregate.call]]\nname = \"{name}\"\nservice = \"svc\"\npath = \"/x\"\n{extra}\n")
    };
    let cases = [
        (
            call("a", "depends_on = [\"b\"]") + &call("b", "depends_on = [\"a\"]"),
            "calls depend on each other in a cycle: a → b → a",
        ),
        (
            call("a", "depends_on = [\"nope\"]"),
            "`depends_on` names `nope`, which is not a call",
        ),
        (
            "[[route.aggregate.call]]\nname = \"a\"\nservice = \"ghost\"\npath = \"/x\"\n"
                .to_owned(),
            "unknown service `ghost`",
        ),
        (
            call("a", "query = { x = \"{calls.b.body.id}\" }") + &call("b", ""),
            "so `depends_on` must list `b`",
        ),
        (
            call("a", "headers = { x = \"{nope.x}\" }"),
            "is not a path parameter of the route",
        ),
        (
            call("a", "for_each = \"calls.a.body\""),
            "must be `calls.CALL.body.PATH` with one `[*]`",
        ),
        (call("a", "") + &call("a", ""), "call `a` is defined twice"),
        (
            call("a", "query = { x = \"{calls.a.body.id}\" }"),
            "reads its own answer",
        ),
        (
            "max_calls = 1\n".to_owned() + &call("a", "") + &call("b", ""),
            "`max_calls` = 1 is fewer than the 2 calls listed",
        ),
        (
            "[[route.aggregate.call]]\nname = \"a\"\nservice = \"svc\"\npath = \"/x?y=1\"\n"
                .to_owned(),
            "may hold no `?`",
        ),
    ];
    for (calls, says) in cases {
        let e = compile_errors(&gw, "m.toml", &route(&calls));
        assert!(e.contains("m.toml:") && e.contains(says), "{says}:\n{e}");
    }
}

/// JWT claims in a path, and a POST whose JSON body is built from a claim, the query and an
/// earlier call's answer (keeping its JSON type).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_a_json_body_template() {
    let up = mirror().await;
    let gw_toml = config(&[("svc", &up)])
        + "\n[auth.jwt.main]\nalgorithms = [\"HS256\"]\nsecret = \"aggregate-test-secret\"\n";
    let route = r#"
[[route]]
name = "me"
path = "/me"
auth = "main"
[route.aggregate]
[[route.aggregate.call]]
name = "profile"
service = "svc"
path = "/v1/users/{claims.sub}"
[[route.aggregate.call]]
name = "audit"
service = "svc"
method = "POST"
path = "/v1/audit"
body = '{"user": "{claims.sub}", "n": "n={query.n:-0}", "seen": "{calls.profile.body.query:-none}", "profile": "{calls.profile.body}"}'
depends_on = ["profile"]

[[route]]
name = "relay"
path = "/relay"
methods = ["POST"]
auth = "main"
[route.aggregate]
[[route.aggregate.call]]
name = "relay"
service = "svc"
method = "PUT"
path = "/v1/upload"
body = "{body}"
"#;
    let gw = TestGateway::start(&gw_toml, &[("m.toml", &routes(route))]).await;
    let token = format!("Bearer {}", hs256_token(b"aggregate-test-secret", "../x?y"));
    let r = get_with(&gw.url("/m/me?n=3"), &[("authorization", &token)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["profile"]["path"], "/v1/users/..%2Fx%3Fy");
    assert_eq!(v["audit"]["method"], "POST");
    // No client trace: the gateway starts one for the whole composition, each call a span of it.
    let trace = |c: &str| v[c]["traceparent"].as_str().unwrap()[3..35].to_owned();
    assert_eq!(trace("profile"), trace("audit"));
    assert_eq!(v["audit"]["content_type"], "application/json");
    let sent: Value = serde_json::from_str(v["audit"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["user"], "../x?y");
    assert_eq!(sent["n"], "n=3");
    assert_eq!(sent["seen"], "none");
    assert_eq!(sent["profile"]["path"], "/v1/users/..%2Fx%3Fy");
    // `{body}`: the client's body, with its content type, as it came.
    let r = send(
        Request::post(gw.url("/m/relay"))
            .header("authorization", &token)
            .header("content-type", "text/csv")
            .body(Full::new(Bytes::from("a,b\n1,2\n")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["relay"]["method"], "PUT");
    assert_eq!(v["relay"]["content_type"], "text/csv");
    assert_eq!(v["relay"]["body"], "a,b\n1,2\n");
    // Without a token, auth answers before any call is made.
    let before = up.requests();
    assert_problem(&get(&gw.url("/m/me")).await, 401, "unauthorized");
    assert_eq!(up.requests(), before);
}
