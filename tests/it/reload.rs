//! Hot reload: under continuous load, route files change (once invalidly) with no failed
//! request; the invalid config is rejected and the last valid one keeps serving; pooled upstream
//! connections of unchanged services survive.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::*;

fn routes(extra: &str) -> String {
    format!(
        r#"
[frontend]
name = "web"
path_prefix = "/web"

[[route]]
name = "a"
path = "/a"
proxy = {{ service = "svc" }}
{extra}"#
    )
}

fn respond_route(name: &str, body: &str) -> String {
    format!(
        "\n[[route]]\nname = \"{name}\"\npath = \"/{name}\"\nrespond = {{ body = \"{body}\" }}\n"
    )
}

async fn admin_reload_result(gw: &TestGateway) -> serde_json::Value {
    get(&gw.admin_url("/admin/config")).await.json()["last_reload"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_no_request() {
    let up = Upstream::start(|_req| async { text(200, "a") }).await;
    // The 200 clients start at once, so the gateway opens 200 upstream connections at once:
    // more than the test upstream's accept queue holds when the machine is busy (the whole
    // suite runs in parallel). A dropped SYN is sent again after 1 s, which the default
    // `connect_timeout` of 1 s does not wait for. Connect failures are not what this tests.
    let gw = TestGateway::start(
        &gateway_toml(
            "",
            &format!(
                "[services.svc]\nendpoints = [\"{}\"]\nconnect_timeout = \"10s\"\n",
                up.url()
            ),
        ),
        &[("web.toml", &routes(""))],
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    // The first failure, to say what it was.
    let first = Arc::new(std::sync::Mutex::new(None::<String>));
    let url = gw.url("/web/a");
    let mut load = Vec::new();
    for _ in 0..200 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        let first = first.clone();
        load.push(tokio::spawn(async move {
            let c = client();
            let fail = |what: String| {
                failed.fetch_add(1, Ordering::Relaxed);
                first.lock().unwrap().get_or_insert(what);
            };
            while !stop.load(Ordering::Relaxed) {
                match c.get(url.parse().unwrap()).await {
                    Ok(r) if r.status() == 200 => {
                        let body = read(r).await;
                        if body.text() == "a" {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            fail(format!("200 with body {:?}", body.text()));
                        }
                    }
                    Ok(r) => {
                        let status = r.status();
                        fail(format!("{status}: {}", read(r).await.text()));
                    }
                    Err(e) => fail(format!("client error: {e:?}")),
                }
            }
        }));
    }
    eventually(10, "load is flowing", || {
        let ok = ok.clone();
        async move { ok.load(Ordering::Relaxed) > 200 }
    })
    .await;

    // 1: a new route appears.
    gw.write_route("web.toml", &routes(&respond_route("b", "b1")));
    eventually(10, "route b served", || async {
        get(&gw.url("/web/b")).await.text() == "b1"
    })
    .await;

    // 2: an invalid file is rejected; the previous config keeps serving.
    gw.write_route(
        "web.toml",
        &routes("\n[[route]]\nname = \"bad\"\npath = \"/bad\"\nproxy = { service = \"nope\" }\n"),
    );
    eventually(10, "invalid config rejected", || async {
        admin_reload_result(&gw).await["result"] == "failure"
    })
    .await;
    let status = admin_reload_result(&gw).await;
    let err = status["errors"][0].as_str().unwrap();
    assert!(
        err.contains("web.toml:") && err.contains("unknown service `nope`"),
        "{err}"
    );
    assert_eq!(get(&gw.url("/web/b")).await.text(), "b1");

    // 3: a valid file again.
    gw.write_route("web.toml", &routes(&respond_route("c", "c1")));
    eventually(10, "route c served", || async {
        get(&gw.url("/web/c")).await.text() == "c1"
    })
    .await;
    assert_problem(&get(&gw.url("/web/b")).await, 404, "route_not_found");

    let before_stop = ok.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "reload under load: {ok} requests succeeded, {failed} failed, {} upstream connections",
        up.connections()
    );
    assert!(
        before_stop > 1000,
        "too little load to mean anything: {before_stop}"
    );
    assert_eq!(failed, 0, "first failure: {:?}", first.lock().unwrap());

    let m = get(&gw.admin_url("/metrics")).await.text();
    let line = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
    };
    assert!(line("gatehouse_config_reloads_total{result=\"failure\"}") >= 1.0);
    assert!(line("gatehouse_config_reloads_total{result=\"success\"}") >= 2.0);
    assert!(line("gatehouse_config_generation") >= 3.0);
}

#[tokio::test]
async fn pooled_connections_survive_a_reload_of_an_unchanged_service() {
    let up = Upstream::start(|_req| async { text(200, "a") }).await;
    // One worker: each worker has its own pool, and this counts the connections of one pool.
    let gw = TestGateway::start(
        &gateway_toml(
            "workers = 1",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", &routes(""))],
    )
    .await;
    assert_eq!(get(&gw.url("/web/a")).await.text(), "a");
    assert_eq!(up.connections(), 1);

    gw.write_route("web.toml", &routes(&respond_route("z", "z")));
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(&gw.url("/web/z")).await.text(), "z");
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/web/a")).await.text(), "a");
    }
    assert_eq!(
        up.connections(),
        1,
        "the pooled connection was reused after the reload"
    );
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn a_reload_that_changes_a_routes_layers_keeps_its_service_and_pool() {
    let up = Upstream::start(|_req| async { text(200, "a") }).await;
    let gw = TestGateway::start(
        &gateway_toml(
            "workers = 1",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", &routes(""))],
    )
    .await;
    assert_eq!(get(&gw.url("/web/a")).await.text(), "a");
    assert_eq!(up.connections(), 1);

    // Only route `a`'s own layers change (its deadline, a fallback): the service is the same
    // resource, with its pooled connection.
    gw.write_route(
        "web.toml",
        &routes("timeout = \"7s\"\nfallback = { status = 200, body = \"later\" }\n"),
    );
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cfg = get(&gw.admin_url("/admin/config")).await.json();
    assert_eq!(cfg["last_reload"]["result"], "success", "{cfg}");
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/web/a")).await.text(), "a");
    }
    assert_eq!(
        up.connections(),
        1,
        "the pooled connection outlived the reload"
    );
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn admin_reload_reports_errors_and_restart_only_settings() {
    let up = Upstream::start(|_req| async { text(200, "a") }).await;
    let gw = TestGateway::start(
        &gateway_toml(
            "",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", &routes(""))],
    )
    .await;
    std::fs::write(
        gw.route_file("broken.toml"),
        "[frontend]\nname = \"x\"\nbogus = 1\n",
    )
    .unwrap();
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 422);
    let v = r.json();
    assert_eq!(v["result"], "failure");
    let e = v["errors"][0].as_str().unwrap();
    assert!(e.contains("broken.toml:3:1:") && e.contains("bogus"), "{e}");
    std::fs::remove_file(gw.route_file("broken.toml")).unwrap();

    // Changing the listen address, the keep-alive timeout or the workers needs a restart: the
    // reload succeeds and says so.
    let cfg = gateway_toml(
        "keep_alive_timeout = \"20s\"\nworkers = 3",
        &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
    )
    .replace(
        "listen = \"127.0.0.1:0\"\nkeep_alive",
        "listen = \"127.0.0.1:1\"\nkeep_alive",
    );
    std::fs::write(gw.dir.path().join("gateway.toml"), cfg).unwrap();
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["restart_required"],
        serde_json::json!([
            "server.listen",
            "server.keep_alive_timeout",
            "server.workers"
        ])
    );
    assert_eq!(get(&gw.url("/web/a")).await.text(), "a");

    // The effective config is shown, secrets redacted.
    let v = get(&gw.admin_url("/admin/config")).await.json();
    assert!(v["gateway"]["services"]["svc"]["endpoints"][0]
        .as_str()
        .unwrap()
        .starts_with("http://"));
    assert!(v["generation"].as_u64().unwrap() >= 2);
}
