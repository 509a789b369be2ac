//! The broker's own client publishing directly, as the publish benchmark's peer
//! (bench/publish): `bench_publish URL SUBJECT CONCURRENCY SECONDS` publishes 16-byte
//! messages, each awaited until its confirmation, CONCURRENCY at a time, and prints the
//! confirmations per second. A `nats://` URL publishes to JetStream (SUBJECT), an `amqp://`
//! one to RabbitMQ with publisher confirms (SUBJECT is the queue, through the default
//! exchange, as the gateway's route does).
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
    if url.starts_with("amqp://") {
        rt.block_on(amqp(url, subject, concurrency, seconds));
        return;
    }
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

async fn amqp(url: String, queue: String, concurrency: usize, seconds: u64) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    // The queue (durable, emptied): SECONDS = 0 only declares it (for the gateway's route).
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("queue");
    ch.queue_purge(queue.as_str().into(), Default::default())
        .await
        .expect("purge");
    if seconds == 0 {
        return;
    }
    let acks = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (ch, acks, queue) = (ch.clone(), acks.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let sent = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        b"{\"sku\":\"tea-01\"}",
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await;
                if let Ok(confirm) = sent {
                    if matches!(confirm.await, Ok(lapin::Confirmation::Ack(None))) {
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
    let _ = ch
        .queue_purge(queue.as_str().into(), Default::default())
        .await;
}
