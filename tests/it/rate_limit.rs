//! Rate limiting against real sockets: in memory (one gateway), and shared through a real
//! Redis by three gateway processes. Redis is the machine's (127.0.0.1:6379, or
//! `GATEHOUSE_TEST_REDIS`), which `.ci/run` starts when it is not running; the failure test
//! starts a `redis-server` of its own, to stop and restart it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn routes(frontend_extra: &str, extra_routes: &str) -> String {
    format!(
        "[frontend]\nname = \"web\"\n{frontend_extra}\n\n[[route]]\nname = \"all\"\npath = \"/{{*rest}}\"\nproxy = {{ service = \"svc\" }}\n{extra_routes}"
    )
}

fn config(up: &Upstream, server_extra: &str, rest: &str) -> String {
    gateway_toml(
        server_extra,
        &format!("[services.svc]\nendpoints = [\"{}\"]\n\n{rest}", up.url()),
    )
}

async fn call(url: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_local_limit_refuses_with_429_and_the_service_never_sees_it() {
    let up = echo_upstream().await;
    let limits = "[rate_limits.per_ip]\nkey = \"ip\"\nlimits = [{ requests = 3, per = \"1m\" }]\n";
    let free = "\n[[route]]\nname = \"free\"\npath = \"/free\"\nrate_limit = \"none\"\nproxy = { service = \"svc\" }\n";
    let gw = TestGateway::start(
        &config(&up, "", limits),
        &[("web.toml", &routes("rate_limit = \"per_ip\"", free))],
    )
    .await;
    let mut statuses = Vec::new();
    let mut last_ok = None;
    for _ in 0..5 {
        let r = call(&gw.url("/a"), &[]).await;
        statuses.push(r.status.as_u16());
        if r.status == 200 {
            assert_eq!(r.header("ratelimit-policy"), "\"per_ip\";q=3;w=60");
            last_ok = Some(r);
        } else {
            assert_problem(&r, 429, "rate_limited");
            let after: u64 = r.header("retry-after").parse().unwrap();
            assert!((1..=20).contains(&after), "Retry-After {after}");
            assert_eq!(r.header("ratelimit-policy"), "\"per_ip\";q=3;w=60");
            assert!(r.header("ratelimit").starts_with("\"per_ip\";r=0;t="));
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // After the third: none left, full again in 3 × 20 s.
    assert_eq!(last_ok.unwrap().header("ratelimit"), "\"per_ip\";r=0;t=60");
    assert_eq!(
        up.requests(),
        3,
        "the refused requests never reached the service"
    );

    // `rate_limit = "none"` lifts the frontend's limit, and its answers carry no headers.
    for _ in 0..5 {
        let r = call(&gw.url("/free"), &[]).await;
        assert_eq!(r.status, 200);
        assert!(r.headers.get("ratelimit").is_none());
    }
    let m = get(&gw.admin_url("/metrics")).await.text();
    let c = |outcome: &str| {
        metric(
            &m,
            &format!(
                "gatehouse_rate_limit_total{{outcome=\"{outcome}\",policy=\"per_ip\",route=\"web/all\"}}"
            ),
        )
    };
    assert_eq!((c("admitted"), c("limited")), (Some(3.0), Some(2.0)), "{m}");
}

#[tokio::test]
async fn a_header_key_counts_each_value_and_falls_back_to_the_client_ip() {
    let up = echo_upstream().await;
    let limits =
        "[rate_limits.tenant]\nkey = \"header:x-tenant\"\nlimits = [{ requests = 2, per = \"1m\" }]\n";
    let gw = TestGateway::start(
        &config(&up, "", limits),
        &[("web.toml", &routes("rate_limit = \"tenant\"", ""))],
    )
    .await;
    let url = gw.url("/x");
    let codes = |n: usize, h: &'static [(&'static str, &'static str)]| {
        let url = url.clone();
        async move {
            let mut v = Vec::new();
            for _ in 0..n {
                v.push(call(&url, h).await.status.as_u16());
            }
            v
        }
    };
    assert_eq!(codes(3, &[("x-tenant", "a")]).await, [200, 200, 429]);
    assert_eq!(codes(3, &[("x-tenant", "b")]).await, [200, 200, 429]);
    // No header: counted by the client's IP, a budget of its own — never unlimited.
    assert_eq!(codes(3, &[]).await, [200, 200, 429]);
}

#[tokio::test]
async fn forwarded_for_changes_the_ip_key_only_behind_a_trusted_proxy() {
    let up = echo_upstream().await;
    let limits = "[rate_limits.per_ip]\nkey = \"ip\"\nlimits = [{ requests = 1, per = \"1m\" }]\n";
    let fe = routes("rate_limit = \"per_ip\"", "");
    // The test client (127.0.0.1) is not a trusted proxy: its X-Forwarded-For is ignored.
    let gw = TestGateway::start(&config(&up, "", limits), &[("web.toml", &fe)]).await;
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    assert_eq!(call(&gw.url("/a"), &xff("198.51.100.1")).await.status, 200);
    let spoofed = call(&gw.url("/a"), &xff("198.51.100.2")).await;
    assert_problem(&spoofed, 429, "rate_limited");

    // Behind a trusted proxy, the client is the nearest untrusted hop of the header.
    let trusted = TestGateway::start(
        &config(&up, "trusted_proxies = [\"127.0.0.0/8\"]", limits),
        &[("web.toml", &fe)],
    )
    .await;
    assert_eq!(
        call(&trusted.url("/a"), &xff("198.51.100.1")).await.status,
        200
    );
    assert_eq!(
        call(&trusted.url("/a"), &xff("198.51.100.2")).await.status,
        200
    );
    // A client that writes its own header in front of the proxy's entry changes nothing.
    let r = call(&trusted.url("/a"), &xff("203.0.113.50, 198.51.100.1")).await;
    assert_problem(&r, 429, "rate_limited");
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_policy_and_a_changed_one_starts_afresh() {
    let up = echo_upstream().await;
    let limits = |n: u32| {
        format!(
            "[rate_limits.per_ip]\nkey = \"ip\"\nlimits = [{{ requests = {n}, per = \"1h\" }}]\n"
        )
    };
    let fe = routes("rate_limit = \"per_ip\"", "");
    let gw = TestGateway::start(&config(&up, "", &limits(2)), &[("web.toml", &fe)]).await;
    for _ in 0..2 {
        assert_eq!(call(&gw.url("/a"), &[]).await.status, 200);
    }
    assert_eq!(call(&gw.url("/a"), &[]).await.status, 429);

    // A route file changes, the policy does not: the budget is kept.
    gw.write_route("web.toml", &format!("{fe}\n# edited\n"));
    assert_eq!(admin_reload(&gw).await.status, 200);
    assert_eq!(call(&gw.url("/a"), &[]).await.status, 429);

    // The policy changes: a new limiter.
    std::fs::write(
        gw.dir.path().join("gateway.toml"),
        config(&up, "", &limits(3)),
    )
    .unwrap();
    assert_eq!(admin_reload(&gw).await.status, 200);
    assert_eq!(call(&gw.url("/a"), &[]).await.status, 200);
}

#[tokio::test]
async fn the_ip_guard_refuses_before_routing() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(
        &config(&up, "ip_rate_limit = { requests = 2, per = \"1h\" }", ""),
        &[("web.toml", &routes("", ""))],
    )
    .await;
    assert_eq!(call(&gw.url("/a"), &[]).await.status, 200);
    assert_eq!(call(&gw.url("/b"), &[]).await.status, 200);
    // Any path, routed or not: the guard runs first.
    let r = call(&gw.url("/c"), &[]).await;
    assert_problem(&r, 429, "rate_limited");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(up.requests(), 2);
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert_eq!(
        metric(&m, "gatehouse_ip_rate_limited_total "),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn rate_limit_config_mistakes_are_located() {
    let svc = "[services.svc]\nendpoints = [\"http://127.0.0.1:1\"]\n";
    let gw = |rest: &str| gateway_toml("", &format!("{svc}\n{rest}"));

    let e = compile_errors(&gw(""), "web.toml", &routes("rate_limit = \"nobody\"", ""));
    assert!(
        e.contains("web.toml:3:") && e.contains("unknown rate limit `nobody` (defined: none)"),
        "{e}"
    );

    let redis_less = "[rate_limits.shared]\nkey = \"ip\"\nlimits = [{ requests = 1, per = \"1s\" }]\nstore = \"redis\"\n";
    let e = compile_errors(&gw(redis_less), "web.toml", &routes("", ""));
    assert!(
        e.contains("gateway.toml:") && e.contains("store = \"redis\" needs a [redis] table"),
        "{e}"
    );

    let by_claim =
        "[rate_limits.per_user]\nkey = \"claim:sub\"\nlimits = [{ requests = 1, per = \"1s\" }]\n";
    let e = compile_errors(
        &gw(by_claim),
        "web.toml",
        &routes("rate_limit = \"per_user\"", ""),
    );
    assert!(
        e.contains("counted by `claim:sub`, which needs `auth`"),
        "{e}"
    );

    let bad_key = "[rate_limits.x]\nkey = \"user\"\nlimits = [{ requests = 1, per = \"1s\" }]\n";
    let e = compile_errors(&gw(bad_key), "web.toml", &routes("", ""));
    assert!(
        e.contains("gateway.toml:") && e.contains("ip, header:NAME, claim:NAME"),
        "{e}"
    );

    let zero = "[rate_limits.x]\nkey = \"ip\"\nlimits = [{ requests = 0, per = \"1s\" }]\n";
    // Named by the frontend: the policy's own error, and no second "unknown rate limit".
    let e = compile_errors(&gw(zero), "web.toml", &routes("rate_limit = \"x\"", ""));
    assert!(!e.contains("unknown rate limit"), "{e}");
    assert!(
        e.contains("[rate_limits.x] `requests` must be at least 1"),
        "{e}"
    );

    let empty = "[rate_limits.x]\nkey = \"ip\"\nlimits = []\n";
    let e = compile_errors(&gw(empty), "web.toml", &routes("", ""));
    assert!(e.contains("`limits` is empty"), "{e}");

    let e = compile_errors(&gw(""), "web.toml", &routes("rate_limit = []", ""));
    assert!(e.contains("write `rate_limit = \"none\"`"), "{e}");

    let bad_name =
        "[rate_limits.\"a\\\"b\"]\nkey = \"ip\"\nlimits = [{ requests = 1, per = \"1s\" }]\n";
    let e = compile_errors(&gw(bad_name), "web.toml", &routes("", ""));
    assert!(e.contains("a policy name is letters, digits"), "{e}");
}

/// The gateway's own answer for a limited route (here 502: the service is down) carries the
/// rate limit headers too.
#[tokio::test]
async fn the_gateways_errors_on_a_limited_route_carry_the_headers() {
    let dead = closed_port().await;
    let gw = TestGateway::start(
        &gateway_toml(
            "",
            &format!("[services.svc]\nendpoints = [\"http://{dead}\"]\n\n[rate_limits.per_ip]\nkey = \"ip\"\nlimits = [{{ requests = 5, per = \"1m\" }}]\n"),
        ),
        &[("web.toml", &routes("rate_limit = \"per_ip\"", ""))],
    )
    .await;
    let r = call(&gw.url("/a"), &[]).await;
    assert_problem(&r, 502, "upstream_connect_failed");
    assert_eq!(r.header("ratelimit-policy"), "\"per_ip\";q=5;w=60");
    assert_eq!(r.header("ratelimit"), "\"per_ip\";r=4;t=12");
}

// ---- Redis ----

fn redis_url() -> String {
    std::env::var("GATEHOUSE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The shared Redis; a test that needs it fails when it is not there.
async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(c)) => c,
        other => panic!(
            "Redis at {url} is required for this test (.ci/run starts one; set GATEHOUSE_TEST_REDIS to use another): {other:?}"
        ),
    }
}

fn process_config(up: &Upstream, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n[routes]\nwatch = false\n[log]\nformat = \"json\"\naccess_log = false\n\n[services.svc]\nendpoints = [\"{}\"]\n\n{rest}",
        up.url()
    )
}

/// Three gateway processes share one policy (10 requests per 2 s) through Redis: under
/// concurrent load through all three, what they admit together is the one budget (±1), not
/// three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_one_budget_through_redis() {
    let url = redis_url();
    let _conn = redis_conn(&url).await;
    let up = echo_upstream().await;
    // A policy name of this run's own, so no other run's keys count.
    let policy = format!("fleet_{}", fastrand::u64(..));
    let rest = format!(
        "[redis]\nurl = \"{url}\"\ntimeout = \"500ms\"\n\n[rate_limits.{policy}]\nkey = \"global\"\nlimits = [{{ requests = 10, per = \"2s\" }}]\nstore = \"redis\"\non_store_failure = \"deny\"\n"
    );
    let dir = write_config(
        &process_config(&up, &rest),
        &[(
            "web.toml",
            &routes(&format!("rate_limit = \"{policy}\""), ""),
        )],
    );
    let gws: Vec<GatewayProcess> = (0..3)
        .map(|_| GatewayProcess::spawn(&dir.path().join("gateway.toml")))
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for g in &gws {
        for _ in 0..30 {
            let u = g.url("/a");
            tasks.push(tokio::spawn(
                async move { call(&u, &[]).await.status.as_u16() },
            ));
        }
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let admitted = codes.iter().filter(|&&c| c == 200).count();
    let limited = codes.iter().filter(|&&c| c == 429).count();
    assert_eq!(admitted + limited, 90, "only 200 and 429: {codes:?}");
    // The burst of 10, plus one more per 200 ms the load lasted, ± 1.
    let refilled = (elapsed.as_millis() / 200) as usize;
    assert!(
        (10..=10 + refilled + 1).contains(&admitted),
        "{admitted} admitted in {elapsed:?} by three gateways sharing 10 per 2 s"
    );
    assert_eq!(up.requests(), admitted);
}

/// Starts `redis-server` on a free port: (process, url).
async fn own_redis(port: u16) -> std::process::Child {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("redis-server is required for this test (.ci/run installs it): {e}")
        });
    let url = format!("redis://127.0.0.1:{port}");
    eventually(10, "redis-server accepts connections", || {
        let url = url.clone();
        async move {
            let c = redis::Client::open(url.as_str()).unwrap();
            c.get_multiplexed_async_connection().await.is_ok()
        }
    })
    .await;
    child
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Redis stops answering (stopped: every call times out) and then goes away (killed:
/// connections refused): each `on_store_failure` does what it says, no request waits longer
/// than the timeout, and once Redis is back shared limiting resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failures_follow_on_store_failure_and_recover() {
    let port = closed_port().await.port();
    let mut redis = own_redis(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let up = echo_upstream().await;
    let mut rest =
        format!("[redis]\nurl = \"{url}\"\ntimeout = \"50ms\"\nmax_backoff = \"200ms\"\n");
    let mut extra = String::new();
    for mode in ["allow", "deny", "local"] {
        rest.push_str(&format!(
            "\n[rate_limits.{mode}]\nkey = \"ip\"\nlimits = [{{ requests = 2, per = \"1h\" }}]\nstore = \"redis\"\non_store_failure = \"{mode}\"\n"
        ));
        extra.push_str(&format!(
            "\n[[route]]\nname = \"{mode}\"\npath = \"/{mode}\"\nrate_limit = \"{mode}\"\nproxy = {{ service = \"svc\" }}\n"
        ));
    }
    let gw = TestGateway::start(
        &config(&up, "", &rest),
        &[("web.toml", &routes("", &extra))],
    )
    .await;
    let codes = |path: &'static str, n: usize| {
        let u = gw.url(path);
        async move {
            let mut v = Vec::new();
            let mut slowest = Duration::ZERO;
            for _ in 0..n {
                let t = Instant::now();
                v.push(call(&u, &[]).await.status.as_u16());
                slowest = slowest.max(t.elapsed());
            }
            (v, slowest)
        }
    };
    // Redis up: the shared budget, and its state is in Redis.
    for path in ["/allow", "/deny", "/local"] {
        assert_eq!(codes(path, 3).await.0, [200, 200, 429], "{path}");
    }
    let mut conn = redis_conn(&url).await;
    let held: Vec<String> = redis::cmd("KEYS")
        .arg("gatehouse:rl:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        held.contains(&"gatehouse:rl:deny:ip:127.0.0.1".to_owned()),
        "{held:?}"
    );

    // Stopped: calls time out.
    signal(&redis, "STOP");
    let (allow, slow_a) = codes("/allow", 5).await;
    assert_eq!(allow, [200; 5], "allow admits while the store is out");
    let (deny, slow_d) = codes("/deny", 5).await;
    assert_eq!(deny, [503; 5], "deny refuses while the store is out");
    let denied = call(&gw.url("/deny"), &[]).await;
    assert_problem(&denied, 503, "rate_limit_unavailable");
    let (local, slow_l) = codes("/local", 4).await;
    assert_eq!(local, [200, 200, 429, 429], "local counts in memory");
    // Generous: the timeout is 50 ms; a request left waiting on the store would take seconds.
    for s in [slow_a, slow_d, slow_l] {
        assert!(
            s < Duration::from_secs(2),
            "a request took {s:?} with Redis stopped"
        );
    }

    // Killed: connections are refused; the same behaviour.
    signal(&redis, "CONT");
    let _ = redis.kill();
    let _ = redis.wait();
    assert_eq!(codes("/deny", 3).await.0, [503; 3]);
    assert_eq!(codes("/allow", 3).await.0, [200; 3]);

    // Back (empty, as a restarted Redis without persistence is): shared limiting resumes
    // without a gateway restart.
    let mut redis = own_redis(port).await;
    eventually(15, "the deny route is admitted again through Redis", || {
        let u = gw.url("/deny");
        async move { call(&u, &[]).await.status == 200 }
    })
    .await;
    let mut conn = redis_conn(&url).await;
    let held: Vec<String> = redis::cmd("KEYS")
        .arg("gatehouse:rl:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        held.contains(&"gatehouse:rl:deny:ip:127.0.0.1".to_owned()),
        "{held:?}"
    );
    assert_eq!(codes("/deny", 2).await.0, [200, 429]);

    let m = get(&gw.admin_url("/metrics")).await.text();
    // The store is one per [redis]: the first call after the stop (on /allow) timed out and
    // marked it down; the calls after it (on /deny too) did not wait.
    for (policy, reason) in [("allow", "timeout"), ("deny", "down")] {
        let v = metric(
            &m,
            &format!("gatehouse_rate_limit_store_failures_total{{policy=\"{policy}\",reason=\"{reason}\"}}"),
        );
        assert!(v.is_some_and(|v| v >= 1.0), "{policy}/{reason}: {m}");
    }
    assert!(m.contains("gatehouse_rate_limit_store_seconds_bucket{policy=\"deny\""));
    let _ = redis.kill();
    let _ = redis.wait();
}

/// Budgets per JWT subject and per API-key consumer: the identity authentication recorded.
#[tokio::test]
async fn claims_and_consumers_each_have_their_own_budget() {
    let up = echo_upstream().await;
    let rest = format!(
        "[auth.jwt.main]\nalgorithms = [\"HS256\"]\nsecret = \"rate-limit-test-secret\"\n\n[auth.api_keys.partners]\nkeys = [{{ consumer = \"acme\", sha256 = \"{}\" }}, {{ consumer = \"globex\", sha256 = \"{}\" }}]\n\n[rate_limits.per_user]\nkey = \"claim:sub\"\nlimits = [{{ requests = 2, per = \"1h\" }}]\n\n[rate_limits.per_consumer]\nkey = \"consumer\"\nlimits = [{{ requests = 1, per = \"1h\" }}]\n",
        sha256_hex("key-acme"),
        sha256_hex("key-globex")
    );
    let extra = "\n[[route]]\nname = \"partner\"\npath = \"/partner\"\nauth = \"partners\"\nrate_limit = \"per_consumer\"\nproxy = { service = \"svc\" }\n";
    let gw = TestGateway::start(
        &config(&up, "", &rest),
        &[(
            "web.toml",
            &routes("auth = \"main\"\nrate_limit = \"per_user\"", extra),
        )],
    )
    .await;
    let bearer = |sub: &str| format!("Bearer {}", hs256_token(b"rate-limit-test-secret", sub));
    let (ada, bob) = (bearer("ada"), bearer("bob"));
    let as_user = |t: &str| [("authorization", t.to_owned())];
    let status = |url: String, h: Vec<(&'static str, String)>| async move {
        let mut b = Request::get(url);
        for (k, v) in h {
            b = b.header(k, v);
        }
        send(b.body(Full::new(Bytes::new())).unwrap())
            .await
            .status
            .as_u16()
    };
    let url = gw.url("/a");
    let mut seen = Vec::new();
    for t in [&ada, &ada, &ada, &bob, &bob, &bob] {
        seen.push(status(url.clone(), as_user(t).to_vec()).await);
    }
    assert_eq!(seen, [200, 200, 429, 200, 200, 429]);
    // A new token of the same subject is the same budget.
    assert_eq!(
        status(url.clone(), as_user(&bearer("ada")).to_vec()).await,
        429
    );
    // Unauthenticated: 401 before the rate limit counts anything.
    assert_eq!(status(url.clone(), vec![]).await, 401);

    let partner = gw.url("/partner");
    let key = |k: &str| vec![("x-api-key", k.to_owned())];
    assert_eq!(status(partner.clone(), key("key-acme")).await, 200);
    assert_eq!(status(partner.clone(), key("key-acme")).await, 429);
    assert_eq!(status(partner.clone(), key("key-globex")).await, 200);
}
