//! DNS discovery against a real authoritative DNS server (hickory-server, in-process, on a
//! loopback UDP port) whose records the test changes.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use hickory_server::authority::{AuthorityObject, Catalog, ZoneType};
use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryAuthority;
use hickory_server::ServerFuture;

use crate::support::*;

struct Dns {
    addr: SocketAddr,
    zone: Arc<InMemoryAuthority>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    async fn start() -> Dns {
        let origin = Name::from_str("test.").unwrap();
        let zone = Arc::new(InMemoryAuthority::empty(
            origin.clone(),
            ZoneType::Primary,
            false,
        ));
        let soa = SOA::new(
            Name::from_str("ns.test.").unwrap(),
            Name::from_str("admin.test.").unwrap(),
            1,
            60,
            60,
            60,
            1,
        );
        zone.upsert(Record::from_rdata(origin.clone(), 1, RData::SOA(soa)), 1)
            .await;
        let mut catalog = Catalog::new();
        let obj: Arc<dyn AuthorityObject> = zone.clone();
        catalog.upsert(LowerName::from(&origin), vec![obj]);
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut server = ServerFuture::new(catalog);
        server.register_socket(socket);
        let task = tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        Dns { addr, zone, task }
    }

    /// Replaces the records of `name` and `rtype` with `rdatas` (TTL 1 s).
    async fn set(&self, name: &str, rtype: RecordType, rdatas: Vec<RData>) {
        let name = Name::from_str(name).unwrap();
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::from(&name), rtype));
        for r in rdatas {
            self.zone
                .upsert(Record::from_rdata(name.clone(), 1, r), 2)
                .await;
        }
    }
}

fn a(ip: &str) -> RData {
    RData::A(A(Ipv4Addr::from_str(ip).unwrap()))
}

/// Upstreams answering their own name, on one port of several loopback addresses.
async fn upstreams_on(ips: &[&str]) -> (u16, Vec<Upstream>) {
    let first = tokio::net::TcpListener::bind((IpAddr::from_str(ips[0]).unwrap(), 0))
        .await
        .unwrap();
    let port = first.local_addr().unwrap().port();
    let mut ups = vec![Upstream::serve(first, |_req| async {
        text(200, "127.0.0.2")
    })];
    for ip in &ips[1..] {
        let l = tokio::net::TcpListener::bind((IpAddr::from_str(ip).unwrap(), port))
            .await
            .unwrap();
        let name: &'static str = Box::leak(ip.to_string().into_boxed_str());
        ups.push(Upstream::serve(
            l,
            move |_req| async move { text(200, name) },
        ));
    }
    (port, ups)
}

const ROUTES: &str = CATCH_ALL_ROUTES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_additions_and_removals_and_survives_the_server_going_away() {
    let dns = Dns::start().await;
    let (port, _ups) = upstreams_on(&["127.0.0.2", "127.0.0.3"]).await;
    dns.set("svc.test.", RecordType::A, vec![a("127.0.0.2")])
        .await;
    let cfg = gateway_toml(
        "",
        &format!(
            "[dns]\nservers = [\"{}\"]\nmin_refresh = \"100ms\"\nmax_refresh = \"2s\"\n\n[services.svc]\ndiscovery = {{ dns = \"svc.test\", port = {port} }}\n",
            dns.addr
        ),
    );
    let gw = TestGateway::start(&cfg, &[("web.toml", ROUTES)]).await;
    eventually(10, "first endpoint resolved", || async {
        seen(&gw, 3).await == HashSet::from(["127.0.0.2".to_string()])
    })
    .await;

    dns.set(
        "svc.test.",
        RecordType::A,
        vec![a("127.0.0.2"), a("127.0.0.3")],
    )
    .await;
    eventually(10, "addition followed", || async {
        seen(&gw, 6).await.len() == 2
    })
    .await;

    dns.set("svc.test.", RecordType::A, vec![a("127.0.0.3")])
        .await;
    eventually(10, "removal followed", || async {
        seen(&gw, 6).await == HashSet::from(["127.0.0.3".to_string()])
    })
    .await;

    // An empty answer keeps the last good set.
    dns.set("svc.test.", RecordType::A, vec![]).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(seen(&gw, 4).await, HashSet::from(["127.0.0.3".to_string()]));

    // So does a DNS server that is gone.
    dns.task.abort();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(seen(&gw, 4).await, HashSet::from(["127.0.0.3".to_string()]));
    // A reload that rebuilds the service (its config changed, its discovery did not) starts
    // from the endpoints the previous build knew: with DNS still down, it keeps serving.
    let changed = cfg.replace(
        "[services.svc]\n",
        "[services.svc]\nload_balancing = \"random\"\n",
    );
    assert_ne!(changed, cfg);
    std::fs::write(gw.dir.path().join("gateway.toml"), changed).unwrap();
    let r = crate::support::admin_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = get(&gw.admin_url("/admin/services")).await.json();
    assert_eq!(v["services"][0]["load_balancing"], "random");
    assert_eq!(seen(&gw, 4).await, HashSet::from(["127.0.0.3".to_string()]));

    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("gatehouse_discovery_updates_total{result=\"updated\",service=\"svc\"}"),
        "{m}"
    );
    assert!(
        m.contains("gatehouse_discovery_updates_total{result=\"empty\",service=\"svc\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_discovery_uses_targets_ports_and_priorities() {
    let dns = Dns::start().await;
    let (u1, u2, backup) = (
        named_upstream("one").await,
        named_upstream("two").await,
        named_upstream("backup").await,
    );
    dns.set("host.test.", RecordType::A, vec![a("127.0.0.1")])
        .await;
    let srv = |prio, port| {
        RData::SRV(SRV::new(
            prio,
            10,
            port,
            Name::from_str("host.test.").unwrap(),
        ))
    };
    dns.set(
        "_http._tcp.svc.test.",
        RecordType::SRV,
        vec![
            srv(10, u1.addr.port()),
            srv(10, u2.addr.port()),
            // A target of the best priority that does not resolve is skipped.
            RData::SRV(SRV::new(
                10,
                10,
                1,
                Name::from_str("missing.test.").unwrap(),
            )),
            srv(20, backup.addr.port()),
        ],
    )
    .await;
    let cfg = gateway_toml(
        "",
        &format!(
            "[dns]\nservers = [\"{}\"]\nmin_refresh = \"100ms\"\nmax_refresh = \"1s\"\n\n[services.svc]\ndiscovery = {{ dns_srv = \"_http._tcp.svc.test\" }}\n",
            dns.addr
        ),
    );
    let gw = TestGateway::start(&cfg, &[("web.toml", ROUTES)]).await;
    eventually(10, "both SRV targets of the best priority", || async {
        seen(&gw, 8).await == HashSet::from(["one".to_string(), "two".to_string()])
    })
    .await;
    // When the best priority goes, the next one serves.
    dns.set(
        "_http._tcp.svc.test.",
        RecordType::SRV,
        vec![srv(20, backup.addr.port())],
    )
    .await;
    eventually(10, "fallback priority", || async {
        seen(&gw, 4).await == HashSet::from(["backup".to_string()])
    })
    .await;
}
