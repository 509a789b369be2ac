//! Idle HTTP/1 client connections are parked: taken back from hyper without its buffers while
//! they wait for their next request (`src/conn.rs`). Raw sockets, so that every byte and every
//! pause is the test's.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// `header_read_timeout = 400ms`: an idle connection is checked every 100 ms.
async fn gateway(server_extra: &str, up: &Upstream) -> TestGateway {
    TestGateway::start(
        &gateway_toml(
            &format!("header_read_timeout = \"400ms\"\n{server_extra}"),
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", CATCH_ALL_ROUTES)],
    )
    .await
}

async fn metric(gw: &TestGateway, name: &str) -> i64 {
    let m = get(&gw.admin_url("/metrics")).await.text();
    m.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse::<i64>().expect("an integer sample"))
        .sum()
}

async fn parked(gw: &TestGateway) -> i64 {
    metric(gw, "gatehouse_connections_parked ").await
}

async fn wait_parked(gw: &TestGateway, n: i64) {
    eventually(10, &format!("{n} parked connection(s)"), || async {
        parked(gw).await == n
    })
    .await;
}

/// Reads one response: its head (lower-cased) and its body (by Content-Length).
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert_eq!(n, 1, "connection closed in a response head: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8(body).unwrap())
}

async fn roundtrip(s: &mut TcpStream, path: &str) -> (String, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(s).await
}

fn assert_ok(resp: &(String, String), body: &str) {
    assert!(resp.0.starts_with("http/1.1 200"), "{}", resp.0);
    assert!(
        !resp.0.contains("connection: close"),
        "keep-alive lost: {}",
        resp.0
    );
    assert_eq!(resp.1, body);
}

/// Waits until the gateway closes `s`, failing after `secs`.
async fn assert_closed_within(s: &mut TcpStream, secs: u64, what: &str) {
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "{what}: the connection is still open");
}

/// A connection that has served `/one` and is now idle.
async fn after_one_request(gw: &TestGateway) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    assert_ok(&roundtrip(&mut s, "/one").await, "/one");
    s
}

async fn path_upstream() -> Upstream {
    Upstream::start(|req| async move { text(200, req.uri().path().to_owned()) }).await
}

#[tokio::test]
async fn an_idle_connection_is_parked_and_serves_its_next_request() {
    let up = path_upstream().await;
    let gw = gateway("", &up).await;
    let mut s = after_one_request(&gw).await;
    wait_parked(&gw, 1).await;
    // Longer than header_read_timeout: hyper's timer, which also runs on an idle connection it
    // holds, does not run on a parked one; keep_alive_timeout (75 s) applies.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(parked(&gw).await, 1);
    assert_ok(&roundtrip(&mut s, "/two").await, "/two");
    wait_parked(&gw, 1).await;
    assert_ok(&roundtrip(&mut s, "/three").await, "/three");
    // All on one client connection and one upstream connection.
    assert_eq!(metric(&gw, "gatehouse_connections_total{").await, 1);
    assert_eq!(up.connections(), 1);
    drop(s);
    wait_parked(&gw, 0).await;
}

#[tokio::test]
async fn a_new_connection_waits_parked_for_its_first_bytes() {
    let up = path_upstream().await;
    let gw = gateway("", &up).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    wait_parked(&gw, 1).await;
    assert_ok(&roundtrip(&mut s, "/first").await, "/first");
    // Without a first request within header_read_timeout, a connection is closed.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    assert_closed_within(&mut silent, 10, "a silent new connection").await;
}

#[tokio::test]
async fn a_request_head_split_across_a_park_is_served_whole() {
    let up = path_upstream().await;
    let gw = gateway("", &up).await;
    let mut s = after_one_request(&gw).await;
    wait_parked(&gw, 1).await;
    // Wakes the connection with a part of a head; the rest comes after several park periods
    // (but within header_read_timeout of the first part).
    s.write_all(b"GET /two HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    s.write_all(b"st: x\r\n\r\n").await.unwrap();
    assert_ok(&read_response(&mut s).await, "/two");
    // A pipelined pair, one of them split: both answered in order.
    s.write_all(b"GET /three HTTP/1.1\r\nHost: x\r\n\r\nGET /fo")
        .await
        .unwrap();
    assert_ok(&read_response(&mut s).await, "/three");
    tokio::time::sleep(Duration::from_millis(250)).await;
    s.write_all(b"ur HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_ok(&read_response(&mut s).await, "/four");
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn a_head_trickled_across_parks_still_times_out() {
    let up = path_upstream().await;
    let gw = gateway("", &up).await;
    let mut s = after_one_request(&gw).await;
    wait_parked(&gw, 1).await;
    // One byte every 150 ms, never a whole head: each byte would wake a parked connection.
    let trickle = async {
        for b in b"GET /never HTTP/1.1\r\nX-Slow: ".iter().cycle() {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    let closed = tokio::time::timeout(Duration::from_secs(15), trickle).await;
    assert!(
        closed.is_ok(),
        "a request head trickled for 15 s kept its connection"
    );
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn a_parked_connection_closes_after_keep_alive_timeout() {
    let up = path_upstream().await;
    let gw = gateway("keep_alive_timeout = \"300ms\"", &up).await;
    let mut s = after_one_request(&gw).await;
    assert_closed_within(&mut s, 10, "an idle connection past keep_alive_timeout").await;
    wait_parked(&gw, 0).await;
}

#[tokio::test]
async fn a_slow_response_is_not_parked_under_it() {
    let up = Upstream::start(|req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        text(200, req.uri().path().to_owned())
    })
    .await;
    let gw = gateway("", &up).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Several park periods pass while the request is in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(parked(&gw).await, 0, "parked with a request in flight");
    assert_ok(&read_response(&mut s).await, "/slow");
    assert_ok(&roundtrip(&mut s, "/next").await, "/next");
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let up = path_upstream().await;
    let mut gw = gateway("shutdown_grace = \"20s\"", &up).await;
    let mut s = after_one_request(&gw).await;
    wait_parked(&gw, 1).await;
    let server = gw.server.take().unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("a parked connection does not hold up the drain");
    assert!(drained, "the drain reported unfinished connections");
    assert_closed_within(&mut s, 5, "a parked connection after shutdown").await;
}
