//! etcd discovery against a real etcd (Debian's etcd-server) started by the test on loopback
//! ports. Instances register with leases; one lease expires; another instance is added.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_etcd() -> Etcd {
    let bin = which("etcd")
        .expect("etcd is required for this test: install Debian's etcd-server (.ci/run does)");
    let dir = tempfile::tempdir().unwrap();
    let (client_port, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = std::process::Command::new(bin)
        .args(["--name", "gh", "--data-dir"])
        .arg(dir.path())
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("gh={peer_url}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start etcd");
    let etcd = Etcd {
        child,
        url,
        _dir: dir,
    };
    let health = format!("{}/health", etcd.url);
    eventually(20, "etcd is up", || {
        let health = health.clone();
        async move {
            match client().get(health.parse().unwrap()).await {
                Ok(r) => read(r).await.text().contains("true"),
                Err(_) => false,
            }
        }
    })
    .await;
    etcd
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

impl Etcd {
    async fn call(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let req = Request::post(format!("{}{path}", self.url))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let r = send(req).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json()
    }

    async fn lease(&self, ttl_secs: u64) -> String {
        let v = self
            .call(
                "/v3/lease/grant",
                serde_json::json!({"TTL": ttl_secs.to_string()}),
            )
            .await;
        v["ID"].as_str().unwrap().to_owned()
    }

    /// Registers an instance the way a service would.
    async fn register(&self, key: &str, url: &str, lease: Option<&str>) {
        let value =
            serde_json::json!({"url": url, "weight": 1, "metadata": {"zone": "test"}}).to_string();
        let mut put = serde_json::json!({"key": B64.encode(key), "value": B64.encode(value)});
        if let Some(l) = lease {
            put["lease"] = serde_json::Value::String(l.to_owned());
        }
        self.call("/v3/kv/put", put).await;
    }

    async fn delete(&self, key: &str) {
        self.call(
            "/v3/kv/deleterange",
            serde_json::json!({"key": B64.encode(key)}),
        )
        .await;
    }
}

fn set(names: &[&str]) -> HashSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const ROUTES: &str = CATCH_ALL_ROUTES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_is_followed_through_leases_and_watches() {
    let etcd = start_etcd().await;
    let ups = [
        named_upstream("a").await,
        named_upstream("b").await,
        named_upstream("c").await,
        named_upstream("d").await,
    ];
    let long = etcd.lease(60).await;
    let short = etcd.lease(2).await;
    etcd.register("/services/svc/a", &ups[0].url(), Some(&long))
        .await;
    etcd.register("/services/svc/b", &ups[1].url(), Some(&long))
        .await;
    etcd.register("/services/svc/c", &ups[2].url(), Some(&short))
        .await;
    let short_granted = Instant::now();
    etcd.register("/services/other/x", "http://127.0.0.1:1", None)
        .await;

    let cfg = gateway_toml(
        "",
        &format!(
            "[services.svc]\ndiscovery = {{ etcd = [\"{}\"], prefix = \"/services/svc/\" }}\n",
            etcd.url
        ),
    );
    let gw = TestGateway::start(&cfg, &[("web.toml", ROUTES)]).await;
    eventually(10, "three registered instances", || async {
        seen(&gw, 9).await == set(&["a", "b", "c"])
    })
    .await;

    // c's lease is not kept alive: etcd deletes its key and the watch removes it.
    eventually(15, "expired instance removed", || async {
        seen(&gw, 6).await == set(&["a", "b"])
    })
    .await;
    eprintln!(
        "lease of 2s granted {:?} ago; instance gone from the gateway",
        short_granted.elapsed()
    );

    let added = Instant::now();
    etcd.register("/services/svc/d", &ups[3].url(), None).await;
    eventually(10, "new instance used", || async {
        seen(&gw, 9).await.contains("d")
    })
    .await;
    eprintln!(
        "new instance served {:?} after it registered",
        added.elapsed()
    );
    assert!(added.elapsed() < Duration::from_secs(5));

    // An instance whose url is not a usable endpoint is skipped; the others keep serving.
    etcd.register("/services/svc/broken", "10.0.0.9:8080", None)
        .await;
    etcd.register("/services/svc/e", &ups[2].url(), None).await;
    eventually(10, "a valid instance next to a broken one", || async {
        seen(&gw, 12).await == set(&["a", "b", "c", "d"])
    })
    .await;
    etcd.delete("/services/svc/e").await;
    eventually(10, "e removed", || async {
        seen(&gw, 9).await == set(&["a", "b", "d"])
    })
    .await;

    etcd.delete("/services/svc/b").await;
    eventually(10, "deleted instance removed", || async {
        seen(&gw, 6).await == set(&["a", "d"])
    })
    .await;

    // etcd going away keeps the last good set.
    drop(etcd);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(seen(&gw, 6).await, set(&["a", "d"]));
    let services = get(&gw.admin_url("/admin/services")).await.json();
    assert_eq!(
        services["services"][0]["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
