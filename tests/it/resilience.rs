//! Resilience on real sockets: retries (only where safe, within a budget, to another endpoint),
//! circuit breaking, bulkheads, global limits, fallbacks and grpc-timeout.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

const ROUTES: &str = CATCH_ALL_ROUTES;

/// An upstream that answers 503 to the first `fail` requests, then 200.
async fn flaky(fail: usize) -> Upstream {
    let seen = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |_req| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < fail {
                text(503, "not yet")
            } else {
                text(200, "ok")
            }
        }
    })
    .await
}

fn svc(urls: &[String], extra: &str) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[services.svc]\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}

const RETRY: &str =
    "[services.svc.retry]\nattempts = 3\nbackoff = \"1ms\"\nmax_backoff = \"5ms\"\n";

fn post(url: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(b"{\"order\":1}")))
        .unwrap()
}

#[tokio::test]
async fn get_succeeds_through_retries() {
    let up = flaky(2).await;
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], RETRY)),
        &[("web.toml", ROUTES)],
    )
    .await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.requests(), 3);
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("gatehouse_upstream_resilience_total{event=\"retry\",service=\"svc\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn post_is_attempted_once_unless_it_carries_an_idempotency_key() {
    let up = flaky(1).await;
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], RETRY)),
        &[("web.toml", ROUTES)],
    )
    .await;
    let r = send(post(&gw.url("/orders"), None)).await;
    assert_eq!(r.status, 503, "the upstream's answer is passed on");
    assert_eq!(
        up.requests(),
        1,
        "a POST without Idempotency-Key is sent exactly once"
    );

    let up = flaky(1).await;
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], RETRY)),
        &[("web.toml", ROUTES)],
    )
    .await;
    let r = send(post(&gw.url("/orders"), Some("order-1"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.requests(),
        2,
        "with Idempotency-Key the POST was retried, body included"
    );

    // A route may declare itself idempotent.
    let up = flaky(1).await;
    let routes = ROUTES.replace("proxy = {", "idempotent = true\nproxy = {");
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], RETRY)),
        &[("web.toml", &routes)],
    )
    .await;
    assert_eq!(send(post(&gw.url("/orders"), None)).await.status, 200);
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint_and_timeouts_are_retried() {
    let bad = Upstream::start(|_req| async { text(502, "bad") }).await;
    let good = named_upstream("good").await;
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[bad.url(), good.url()], RETRY)),
        &[("web.toml", ROUTES)],
    )
    .await;
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/x")).await.text(), "good");
    }
    assert!(bad.requests() <= 10);

    // A slow first attempt hits the per-attempt timeout; the retry succeeds.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let slow_once = Upstream::start(move |_req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            text(200, "second try")
        }
    })
    .await;
    let gw = TestGateway::start(
        &gateway_toml(
            "",
            &svc(&[slow_once.url()], &format!("timeout = \"200ms\"\n{RETRY}")),
        ),
        &[("web.toml", ROUTES)],
    )
    .await;
    assert_eq!(get(&gw.url("/x")).await.text(), "second try");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_under_sustained_failure() {
    let up = Upstream::start(|_req| async { text(503, "down") }).await;
    let extra = "[services.svc.retry]\nattempts = 3\nbackoff = \"1ms\"\nmax_backoff = \"1ms\"\nbudget_percent = 20\nmin_retries_per_second = 1\n";
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], extra)),
        &[("web.toml", ROUTES)],
    )
    .await;
    let requests = 200;
    for _ in 0..requests {
        assert_eq!(get(&gw.url("/x")).await.status, 503);
    }
    let attempts = up.requests();
    eprintln!(
        "{requests} requests caused {attempts} upstream attempts (without a budget: {})",
        requests * 3
    );
    // 20% of 200 plus the small per-second minimum over the test's few seconds.
    assert!(
        attempts <= requests + requests / 5 + 25,
        "{attempts} attempts"
    );
    assert!(attempts > requests, "some retries were made");
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("event=\"retry_budget_exhausted\",service=\"svc\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn the_circuit_opens_answers_fast_without_the_upstream_and_closes_on_recovery() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let up = Upstream::start(move |_req| {
        let ok = h.load(Ordering::SeqCst);
        async move {
            if ok {
                text(200, "back")
            } else {
                text(500, "boom")
            }
        }
    })
    .await;
    let extra = "[services.svc.circuit_breaker]\nconsecutive_failures = 5\nopen_for = \"1s\"\n";
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], extra)),
        &[("web.toml", ROUTES)],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/x")).await.status, 500);
    }
    for _ in 0..20 {
        let r = get(&gw.url("/x")).await;
        assert_problem(&r, 503, "circuit_open");
        assert_eq!(r.header("retry-after"), "1");
    }
    assert_eq!(
        up.requests(),
        5,
        "an open circuit does not call the upstream"
    );
    let v = get(&gw.admin_url("/admin/services")).await.json();
    assert_eq!(v["services"][0]["circuit"]["state"], "open");
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("gatehouse_circuit_state{service=\"svc\"} 1"),
        "{m}"
    );

    healthy.store(true, Ordering::SeqCst);
    eventually(10, "half-open probe closes the circuit", || async {
        get(&gw.url("/x")).await.status == 200
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/x")).await.text(), "back");
    }
    let v = get(&gw.admin_url("/admin/services")).await.json();
    assert_eq!(v["services"][0]["circuit"]["state"], "closed");
}

#[tokio::test]
async fn client_errors_never_open_the_circuit() {
    let up = Upstream::start(|_req| async { text(404, "no such thing") }).await;
    let extra = "[services.svc.circuit_breaker]\nconsecutive_failures = 2\nmin_requests = 2\n";
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], extra)),
        &[("web.toml", ROUTES)],
    )
    .await;
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/x")).await.status, 404);
    }
    assert_eq!(up.requests(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_service_behind_a_bulkhead_does_not_delay_a_healthy_one() {
    let slow = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        text(200, "slow")
    })
    .await;
    let fast = named_upstream("fast").await;
    let services = format!(
        "[services.slow]\nendpoints = [\"{}\"]\nmax_concurrent_requests = 10\n\n[services.fast]\nendpoints = [\"{}\"]\n",
        slow.url(),
        fast.url()
    );
    let routes = "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"slow\"\npath = \"/slow\"\nproxy = { service = \"slow\" }\n\n[[route]]\nname = \"fast\"\npath = \"/fast\"\nproxy = { service = \"fast\" }\n";
    let gw = TestGateway::start(&gateway_toml("", &services), &[("web.toml", routes)]).await;
    let slow_done = Arc::new(AtomicUsize::new(0));
    let mut slow_reqs = Vec::new();
    for _ in 0..30 {
        let (url, done) = (gw.url("/slow"), slow_done.clone());
        slow_reqs.push(tokio::spawn(async move {
            let r = get(&url).await;
            done.fetch_add(1, Ordering::SeqCst);
            r
        }));
    }
    eventually(10, "slow service saturated", || async {
        slow.requests() == 10
    })
    .await;
    // While the slow service holds its 10 slots, the fast one answers at once.
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/fast")).await.text(), "fast");
    }
    let overloaded_before_slow_finished = slow_done.load(Ordering::SeqCst);
    let mut ok = 0;
    let mut overloaded = 0;
    for t in slow_reqs {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_problem(&r, 503, "overloaded");
                overloaded += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, overloaded), (10, 20));
    // Only the refused ones had finished while the fast requests ran.
    assert!(overloaded_before_slow_finished <= 20);
    assert_eq!(slow.requests(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_limits_its_own_concurrency() {
    let slow = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        text(200, "slow")
    })
    .await;
    let gw = TestGateway::start(
        &gateway_toml("max_concurrent_requests = 2", &svc(&[slow.url()], "")),
        &[("web.toml", ROUTES)],
    )
    .await;
    let reqs: Vec<_> = (0..6)
        .map(|_| tokio::spawn(get_owned(gw.url("/x"))))
        .collect();
    let mut statuses = Vec::new();
    for r in reqs {
        statuses.push(r.await.unwrap().status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 503, 503, 503, 503]);
}

async fn get_owned(url: String) -> Resp {
    get(&url).await
}

#[tokio::test]
async fn a_route_fallback_answers_when_the_backend_fails() {
    let dead = closed_port().await;
    let routes = format!(
        "{ROUTES}fallback = {{ status = 200, body = '{{\"items\":[]}}', content_type = \"application/json\" }}\n"
    );
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[format!("http://{dead}")], "")),
        &[("web.toml", &routes)],
    )
    .await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "{\"items\":[]}");
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("x-gatehouse-fallback"), "upstream_connect_failed");

    // A timeout is answered by the fallback too.
    let slow = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        text(200, "late")
    })
    .await;
    let routes = format!("{ROUTES}timeout = \"200ms\"\nfallback = {{ body = \"cached-ish\" }}\n");
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[slow.url()], "")),
        &[("web.toml", &routes)],
    )
    .await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.text(), "cached-ish");
    assert_eq!(r.header("x-gatehouse-fallback"), "upstream_timeout");
}

#[tokio::test]
async fn grpc_requests_carry_the_remaining_deadline() {
    let up = echo_upstream().await;
    let routes = ROUTES.replace("proxy = {", "timeout = \"5s\"\nproxy = {");
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], "")),
        &[("web.toml", &routes)],
    )
    .await;
    let req = Request::post(gw.url("/pkg.Svc/Method"))
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let v = send(req).await.json();
    let t = v["headers"]["grpc-timeout"].as_str().unwrap();
    let ms: u64 = t.strip_suffix('m').unwrap().parse().unwrap();
    assert!(ms > 0 && ms <= 5000, "{t}");
    // A shorter deadline from the client is kept.
    let req = Request::post(gw.url("/pkg.Svc/Method"))
        .header("content-type", "application/grpc+proto")
        .header("grpc-timeout", "2S")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(req).await.json()["headers"]["grpc-timeout"], "2000m");
}

#[tokio::test]
async fn attempts_cut_by_the_route_deadline_count_as_failures_and_free_their_probe() {
    // The upstream never answers; the service has no per-attempt timeout, only the route's
    // total deadline cuts the attempts.
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        text(200, "never")
    })
    .await;
    let extra = "[services.svc.circuit_breaker]\nconsecutive_failures = 1\nopen_for = \"200ms\"\nmax_open_for = \"400ms\"\n";
    let routes = ROUTES.replace("proxy = {", "timeout = \"300ms\"\nproxy = {");
    let gw = TestGateway::start(
        &gateway_toml("", &svc(&[up.url()], extra)),
        &[("web.toml", &routes)],
    )
    .await;
    assert_problem(&get(&gw.url("/x")).await, 504, "upstream_timeout");
    assert_problem(&get(&gw.url("/x")).await, 503, "circuit_open");
    assert_eq!(up.requests(), 1);
    // Each half-open probe that the deadline cuts reopens the circuit; the next probe is let
    // through later (the circuit is never stuck half-open with no probe allowed).
    for expected in [2, 3] {
        eventually(10, "a probe reaches the upstream", || async {
            let _ = get(&gw.url("/x")).await;
            up.requests() == expected
        })
        .await;
    }
}
