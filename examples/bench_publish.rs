//! The broker's own client publishing to JetStream directly, as the publish benchmark's peer
//! (bench/publish): `bench_publish NATS_URL SUBJECT CONCURRENCY SECONDS` publishes 16-byte
//! messages, each awaited until its ack, CONCURRENCY at a time, and prints the acks per second.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: it may stop on a broken setup

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let subject = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "bench.publish.x".into());
    let concurrency: usize = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(64);
    let seconds: u64 = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let acks = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (js, acks, subject) = (js.clone(), acks.clone(), subject.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let body = bytes::Bytes::from_static(b"{\"sku\":\"tea-01\"}");
                    if let Ok(f) = js.publish(subject.clone(), body).await {
                        if f.await.is_ok() {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let n = acks.load(Ordering::Relaxed);
        println!("{:.0}", n as f64 / seconds as f64);
    });
}
