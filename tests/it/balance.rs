//! Load balancing and endpoint health over real upstreams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

const ROUTES: &str = CATCH_ALL_ROUTES;

fn service(urls: &[String], extra: &str) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[services.svc]\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}

async fn three() -> Vec<Upstream> {
    vec![
        named_upstream("a").await,
        named_upstream("b").await,
        named_upstream("c").await,
    ]
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let ups = three().await;
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(
        &gateway_toml("", &service(&urls, "")),
        &[("web.toml", ROUTES)],
    )
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *counts.entry(get(&gw.url("/x")).await.text()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 100), "{counts:?}");
}

#[tokio::test]
async fn consistent_hash_keeps_a_user_on_one_instance() {
    let ups = three().await;
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let extra = "load_balancing = \"consistent_hash\"\nhash_key = \"header:x-user-id\"";
    let gw = TestGateway::start(
        &gateway_toml("", &service(&urls, extra)),
        &[("web.toml", ROUTES)],
    )
    .await;
    let mut used = HashMap::new();
    for user in 0..40 {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let req = Request::get(gw.url("/x"))
                .header("x-user-id", format!("user-{user}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            seen.push(send(req).await.text());
        }
        assert!(
            seen.iter().all(|s| *s == seen[0]),
            "user-{user} moved: {seen:?}"
        );
        *used.entry(seen[0].clone()).or_insert(0) += 1;
    }
    assert!(used.len() >= 2, "every user on one instance: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_a_slow_instance() {
    let slow = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        text(200, "slow")
    })
    .await;
    let (f1, f2) = (named_upstream("fast1").await, named_upstream("fast2").await);
    let urls = vec![slow.url(), f1.url(), f2.url()];
    let gw = TestGateway::start(
        &gateway_toml("", &service(&urls, "load_balancing = \"least_request\"")),
        &[("web.toml", ROUTES)],
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let url = gw.url("/x");
        tasks.push(tokio::spawn(async move {
            let mut slow = 0;
            for _ in 0..25 {
                if get(&url).await.text() == "slow" {
                    slow += 1;
                }
            }
            slow
        }));
    }
    let mut slow_count = 0;
    for t in tasks {
        slow_count += t.await.unwrap();
    }
    // Round robin would send a third (100 of 300) to the slow instance.
    eprintln!("least_request: {slow_count} of 300 requests went to the slow instance");
    assert!(
        slow_count < 45,
        "{slow_count} of 300 went to the slow instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_ejected_and_used_again_when_back() {
    let ups = three().await;
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let extra = "[services.svc.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\n\n[services.svc.outlier_detection]\nconsecutive_failures = 2\nbase_ejection_time = \"1s\"\n";
    let gw = TestGateway::start(
        &gateway_toml("", &service(&urls, extra)),
        &[("web.toml", ROUTES)],
    )
    .await;

    // A retry-free client sends requests one after another the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let served_by_b = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, failed, b, url) = (
            stop.clone(),
            failed.clone(),
            served_by_b.clone(),
            gw.url("/x"),
        );
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.get(url.parse().unwrap()).await {
                    Ok(r) if r.status() == 200 => {
                        if read(r).await.text() == "b" {
                            b.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    eventually(10, "b serves", || {
        let b = served_by_b.clone();
        async move { b.load(Ordering::Relaxed) > 20 }
    })
    .await;

    let b_addr = ups[1].addr;
    ups[1].kill();
    eventually(10, "b reported unavailable", || async {
        let v = get(&gw.admin_url("/admin/services")).await.json();
        let eps = v["services"][0]["endpoints"].as_array().unwrap().clone();
        eps.iter()
            .any(|e| e["url"] == format!("http://{b_addr}") && e["available"] == false)
    })
    .await;
    let b_before = served_by_b.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failures = failed.load(Ordering::Relaxed);
    eprintln!("requests failed while b died: {failures}");
    assert!(
        failures <= 5,
        "{failures} requests failed before b was ejected"
    );
    assert_eq!(served_by_b.load(Ordering::Relaxed), b_before);
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("gatehouse_upstream_endpoints{service=\"svc\",state=\"available\"} 2"),
        "{m}"
    );

    // b comes back on the same address: checks pass and traffic returns.
    let listener = tokio::net::TcpListener::bind(b_addr).await.unwrap();
    let _b2 = Upstream::serve(listener, |_req| async { text(200, "b") });
    eventually(15, "b serves again", || {
        let b = served_by_b.clone();
        async move { b.load(Ordering::Relaxed) > b_before + 5 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(failed.load(Ordering::Relaxed) <= 5);
}

#[tokio::test]
async fn no_available_endpoint_is_503_and_not_ready() {
    let dead = closed_port().await;
    let extra = "required = true\n[services.svc.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_threshold = 1\n";
    let gw = TestGateway::start(
        &gateway_toml("", &service(&[format!("http://{dead}")], extra)),
        &[("web.toml", ROUTES)],
    )
    .await;
    eventually(10, "readyz reports the required service", || async {
        let r = get(&gw.admin_url("/readyz")).await;
        r.status == 503 && r.text().contains("svc")
    })
    .await;
    assert_problem(&get(&gw.url("/x")).await, 503, "no_healthy_endpoint");
}

#[tokio::test]
async fn use_all_sends_to_unhealthy_endpoints_when_none_is_healthy() {
    let up = named_upstream("a").await;
    // The health path answers 404, so the endpoint is marked unhealthy, though it serves.
    let extra = "all_unhealthy = \"use_all\"\n[services.svc.health_check]\npath = \"/nothing\"\nexpected_statuses = [204]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_threshold = 1\n";
    let gw = TestGateway::start(
        &gateway_toml("", &service(&[up.url()], extra)),
        &[("web.toml", ROUTES)],
    )
    .await;
    eventually(10, "endpoint marked unhealthy", || async {
        get(&gw.admin_url("/admin/services")).await.json()["services"][0]["endpoints"][0]["healthy"]
            == false
    })
    .await;
    assert_eq!(get(&gw.url("/x")).await.text(), "a");
}
