//! Test support: real upstream servers on 127.0.0.1:0, temporary config folders, a gateway
//! started in-process on port 0, and a small HTTP client.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

pub fn full_body(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn text(status: u16, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(full_body(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// A real HTTP server (HTTP/1.1 and h2c) that counts connections and requests.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    pub fn serve<F, Fut>(listener: tokio::net::TcpListener, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let (c, r) = (connections.clone(), requests.clone());
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let conn_handles = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let r = r.clone();
                let h = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let fut = handler(req);
                        async move { Ok::<_, std::convert::Infallible>(fut.await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
                conn_handles.lock().unwrap().push(h.abort_handle());
            }
        });
        Upstream {
            addr,
            connections,
            requests,
            task,
            conns,
        }
    }

    /// Stops listening and drops every open connection, like a crashed process.
    pub fn kill(&self) {
        self.task.abort();
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An upstream that answers with its own name.
pub async fn named_upstream(name: &'static str) -> Upstream {
    Upstream::start(move |_req| async move { text(200, name) }).await
}

/// An upstream that answers with JSON describing the request it received.
pub async fn echo_upstream() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = serde_json::json!({
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "query": req.uri().query(),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        let mut r = text(200, serde_json::to_vec(&body).unwrap());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await
}

/// A port with nothing listening on it.
pub async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// gateway.toml for tests: listeners on port 0, access log off, plus the given text.
/// One frontend `web` with one route that sends every path to the service `svc`.
pub const CATCH_ALL_ROUTES: &str = "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"all\"\npath = \"/{*rest}\"\nproxy = { service = \"svc\" }\n";

/// `POST /admin/reload`.
pub async fn admin_reload(gw: &TestGateway) -> Resp {
    send(
        Request::post(gw.admin_url("/admin/reload"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

pub fn gateway_toml(server_extra: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess_log = false\n\n{rest}\n"
    )
}

/// A gateway started in-process from files in a temporary folder.
pub struct TestGateway {
    pub server: Option<gatehouse::Server>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl TestGateway {
    pub async fn start(gateway: &str, routes: &[(&str, &str)]) -> TestGateway {
        let dir = write_config(gateway, routes);
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn route_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("routes").join(name)
    }

    /// Replaces a route file the way editors do: write a new file, then rename it over the old.
    pub fn write_route(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join("routes").join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.route_file(name)).unwrap();
    }

    pub fn live(&self) -> &Arc<gatehouse::gateway::Live> {
        self.server.as_ref().unwrap().live()
    }
}

pub fn write_config(gateway: &str, routes: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), gateway).unwrap();
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    for (name, text) in routes {
        std::fs::write(dir.path().join("routes").join(name), text).unwrap();
    }
    dir
}

/// A response read to the end.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A GET whose response comes back with its body not yet read, to follow it as it streams.
pub async fn open(url: &str) -> http::Response<hyper::body::Incoming> {
    let req = Request::get(url).body(Full::default()).unwrap();
    client().request(req).await.expect("request failed")
}

pub async fn send(req: Request<Full<Bytes>>) -> Resp {
    let resp = client().request(req).await.expect("request failed");
    read(resp).await
}

pub async fn read<B>(resp: Response<B>) -> Resp
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Resp {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

/// Asserts a gateway error response: status, problem+json, code, request id.
pub fn assert_problem(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), "application/problem+json");
    let v = r.json();
    assert_eq!(v["status"], status);
    assert_eq!(v["code"], code);
    assert_eq!(v["request_id"], r.header("x-request-id"));
    assert!(v["title"].is_string() && v["type"].is_string());
}

/// Polls `check` every 50 ms until it returns true, failing after `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The gateway binary as a child process, with the addresses it logged.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Every line it wrote to stderr (JSON log events), as they arrive.
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts `gatehouse run`; the config must set `[log] format = "json"`.
    pub fn spawn(config: &std::path::Path) -> GatewayProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn gatehouse");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("gateway process did not report its addresses");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let a = v["addr"].as_str().and_then(|a| a.parse().ok());
            match v["message"].as_str() {
                Some("listening") => addr = a,
                Some("admin listening") => admin = a,
                _ => {}
            }
        }
        // Keep draining stderr so the child never blocks on a full pipe.
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            while let Ok(line) = rx.recv() {
                sink.lock().unwrap().push(line);
            }
        });
        GatewayProcess {
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            log,
        }
    }

    /// The JSON log events written so far that satisfy `pred`.
    pub fn events(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| pred(v))
            .collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{field} not in /proc status"))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The distinct bodies of `n` successful GETs of `/x` (which instance answered).
pub async fn seen(gw: &TestGateway, n: usize) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    for _ in 0..n {
        let r = get(&gw.url("/x")).await;
        if r.status == 200 {
            out.insert(r.text());
        }
    }
    out
}

/// Every located error `load_and_compile` reports for this gateway.toml and one route file
/// (`file` in routes/), one a line; panics when the config compiles.
pub fn compile_errors(gateway: &str, file: &str, routes: &str) -> String {
    let dir = write_config(gateway, &[(file, routes)]);
    let metrics = gatehouse::observe::metrics::Metrics::new();
    match gatehouse::gateway::load_and_compile(&dir.path().join("gateway.toml"), None, &metrics, 1)
    {
        Err(e) => {
            e.0.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        }
        Ok(_) => panic!("a config that should be refused compiled:\n{gateway}\n{routes}"),
    }
}

/// An API key's SHA-256, hex, as `[auth.api_keys]` holds it.
pub fn sha256_hex(key: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// An HS256 JWT for `sub`, valid for ten minutes, signed with `secret`.
pub fn hs256_token(secret: &[u8], sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}
