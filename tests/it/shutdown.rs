//! Graceful shutdown: a request in flight when SIGTERM arrives completes; the process exits 0.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        text(200, "finished")
    })
    .await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"20s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n\n[services.svc]\nendpoints = [\"{}\"]\n",
        up.url()
    );
    let routes = "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"slow\"\npath = \"/slow\"\nproxy = { service = \"svc\" }\n";
    let dir = write_config(&cfg, &[("web.toml", routes)]);
    let mut gw = GatewayProcess::spawn(&dir.path().join("gateway.toml"));

    let url = gw.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    let requests = up.requests.clone();
    eventually(10, "the request reached the upstream", || {
        let requests = requests.clone();
        async move { requests.load(Ordering::SeqCst) == 1 }
    })
    .await;
    gw.signal("TERM");
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "finished");

    let status = tokio::task::spawn_blocking(move || {
        let status = gw.child.wait().unwrap();
        (status, gw)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "exit status {status}");
}
