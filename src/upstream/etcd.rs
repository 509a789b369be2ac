//! etcd discovery: reads every key under a prefix, then WATCHES the prefix, so instances that
//! register, change or disappear (a lease that expires deletes its key) are followed at once.
//! It speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/watch`) over the gateway's own HTTP
//! client. Each key holds one instance:
//! `{"url": "http://10.0.0.5:8080", "weight": 1, "metadata": {...}}`.
//! If etcd cannot be reached, the last good set stays and the task retries (rotating through
//! the configured etcd URLs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::table::EndpointTable;
use tokio::task::JoinHandle;

type EtcdClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The value stored under each key.
#[derive(Debug, Deserialize)]
struct Instance {
    url: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, Default)]
struct Header {
    #[serde(default)]
    revision: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Kv {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    kv: Kv,
}

#[derive(Debug, Deserialize, Default)]
struct WatchResult {
    #[serde(default)]
    events: Vec<WatchEvent>,
    #[serde(default)]
    canceled: bool,
}

#[derive(Debug, Deserialize)]
struct WatchMessage {
    #[serde(default)]
    result: Option<WatchResult>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub(crate) fn spawn(
    table: Arc<EndpointTable>,
    urls: Vec<String>,
    prefix: String,
) -> Option<JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    // TCP keepalive, so a watch whose connection silently died is noticed and re-established.
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    let client: EtcdClient = Client::builder(TokioExecutor::new()).build(http);
    Some(handle.spawn(async move {
        let mut attempt = 0usize;
        loop {
            let base = &urls[attempt % urls.len()];
            if let Err(e) = follow(&client, base, &prefix, &table).await {
                tracing::warn!(service = &*table.service, etcd = %base, error = %e, "etcd discovery: keeping the previous endpoints; retrying");
                table.metrics.discovery("error");
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }))
}

/// Reads the prefix, publishes it, then applies watch events until the watch ends.
async fn follow(
    client: &EtcdClient,
    base: &str,
    prefix: &str,
    table: &EndpointTable,
) -> Result<(), String> {
    let key = B64.encode(prefix.as_bytes());
    let end = B64.encode(prefix_end(prefix.as_bytes()));
    let range = post(
        client,
        base,
        "/v3/kv/range",
        &serde_json::json!({"key": key, "range_end": end}),
    )
    .await?;
    let bytes = range
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let parsed: RangeResponse =
        serde_json::from_slice(&bytes).map_err(|e| format!("range answer: {e}"))?;
    let revision: i64 = parsed
        .header
        .revision
        .as_deref()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let mut instances: BTreeMap<String, (String, u32)> = BTreeMap::new();
    for kv in parsed.kvs {
        apply(&mut instances, &table.service, kv, false);
    }
    publish(table, &instances);

    let watch = serde_json::json!({"create_request": {"key": key, "range_end": end, "start_revision": (revision + 1).to_string()}});
    let resp = post(client, base, "/v3/watch", &watch).await?;
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let msg: WatchMessage =
                serde_json::from_slice(&line).map_err(|e| format!("watch message: {e}"))?;
            if let Some(err) = msg.error {
                return Err(format!("watch error: {err}"));
            }
            let Some(result) = msg.result else { continue };
            if result.canceled {
                return Err("watch canceled (compacted?)".into());
            }
            if result.events.is_empty() {
                continue;
            }
            for ev in result.events {
                apply(
                    &mut instances,
                    &table.service,
                    ev.kv,
                    ev.kind.as_deref() == Some("DELETE"),
                );
            }
            publish(table, &instances);
        }
    }
    Err("watch stream ended".into())
}

fn apply(instances: &mut BTreeMap<String, (String, u32)>, service: &str, kv: Kv, delete: bool) {
    if delete {
        instances.remove(&kv.key);
        return;
    }
    let value = kv
        .value
        .as_deref()
        .and_then(|v| B64.decode(v).ok())
        .unwrap_or_default();
    match serde_json::from_slice::<Instance>(&value) {
        Ok(i) => {
            instances.insert(kv.key, (i.url, i.weight.max(1)));
        }
        Err(e) => {
            let key = B64
                .decode(&kv.key)
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .unwrap_or_default();
            tracing::warn!(service, key, error = %e, "etcd discovery: ignoring a key whose value is not an instance");
        }
    }
}

fn publish(table: &EndpointTable, instances: &BTreeMap<String, (String, u32)>) {
    let list: Vec<(String, u32)> = instances.values().cloned().collect();
    match table.publish(list) {
        Ok(true) => {
            let n = instances.len();
            tracing::info!(
                service = &*table.service,
                endpoints = n,
                "etcd discovery: endpoints updated"
            );
            table.metrics.discovery("updated");
        }
        Ok(false) => table.metrics.discovery("unchanged"),
        Err(msg) => {
            tracing::warn!(service = &*table.service, "etcd discovery: {msg}");
            table.metrics.discovery("empty");
        }
    }
}

async fn post(
    client: &EtcdClient,
    base: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let req = Request::post(format!("{}{path}", base.trim_end_matches('/')))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "etcd did not answer within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("etcd answered {}", resp.status()));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/svc/"), b"/svc0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
