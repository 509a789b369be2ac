//! `[server] workers`: several worker threads accept from the same listener, and each keeps its
//! own pool of upstream connections.

use crate::support::*;

const ROUTES: &str = CATCH_ALL_ROUTES;

/// `gatehouse_connections_total` per worker, from /metrics.
async fn accepted_per_worker(gw: &TestGateway) -> Vec<(String, u64)> {
    let m = get(&gw.admin_url("/metrics")).await.text();
    m.lines()
        .filter_map(|l| l.strip_prefix("gatehouse_connections_total{worker=\""))
        .map(|rest| {
            let (worker, value) = rest.split_once("\"} ").expect("a labelled sample");
            (worker.to_owned(), value.parse().expect("a count"))
        })
        .collect()
}

#[tokio::test]
async fn every_worker_serves_and_each_reuses_its_own_upstream_connections() {
    let up = Upstream::start(|_req| async { text(200, "ok") }).await;
    let gw = TestGateway::start(
        &gateway_toml(
            "workers = 3",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", ROUTES)],
    )
    .await;

    // Every worker has its counter from the start, before any traffic.
    let before = accepted_per_worker(&gw).await;
    let names: Vec<&str> = before.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(names, ["1", "2", "3"], "{before:?}");

    // 40 requests one after the other, each on a new client connection.
    for i in 0..40 {
        let r = get(&gw.url(&format!("/r{i}"))).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.requests(), 40);

    let after = accepted_per_worker(&gw).await;
    let total: u64 =
        after.iter().map(|(_, n)| n).sum::<u64>() - before.iter().map(|(_, n)| n).sum::<u64>();
    // The metrics scrape itself goes to the admin listener, not to a worker.
    assert_eq!(total, 40, "{after:?}");
    // Requests never overlap, so a worker that served several reused its one pooled
    // connection: one upstream connection per worker that served anything.
    let serving = after.iter().filter(|(_, n)| *n > 0).count();
    assert!(serving >= 1);
    assert_eq!(
        up.connections(),
        serving,
        "upstream connections vs workers that served: {after:?}"
    );
}

#[tokio::test]
async fn concurrent_clients_are_all_served_by_several_workers() {
    let up = Upstream::start(|_req| async { text(200, "ok") }).await;
    let gw = TestGateway::start(
        &gateway_toml(
            "workers = 2",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", ROUTES)],
    )
    .await;
    let url = gw.url("/x");
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                // One keep-alive connection per client, 10 requests on it.
                let c = client();
                for _ in 0..10 {
                    let resp = c
                        .request(
                            http::Request::get(&url)
                                .body(http_body_util::Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                        .await
                        .expect("request failed");
                    assert_eq!(read(resp).await.status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a client failed");
    }
    assert_eq!(up.requests(), 500);
    let total: u64 = accepted_per_worker(&gw).await.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 50);
}
