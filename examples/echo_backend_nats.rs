//! An echo backend over NATS (docs/cluster.md, "Backends over NATS"), for measuring the NATS
//! backend path against a relay link (benches/nats-backend.sh) and as a minimal Rust example
//! of the contract: it joins the queue group on `PREFIX.in` and answers every `message`
//! event with a `send` of the same bytes and kind to the node that holds the connection.
//! `open` and `close` need no answer (routes without `authorize`).
//!
//!     cargo run --release --example echo_backend_nats -- nats://127.0.0.1:4222 bench.echo
//!
//! Ends by itself after `--for SECS` (default: never), so a bench cannot leave it behind.

use std::time::Duration;

use futures_util::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(url), Some(prefix)) = (args.first(), args.get(1)) else {
        eprintln!("usage: echo_backend_nats NATS_URL SUBJECT_PREFIX [--for SECS]");
        std::process::exit(2);
    };
    let life = args
        .iter()
        .position(|a| a == "--for")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let client = match async_nats::connect(url.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("echo_backend_nats: cannot connect to {url}: {e}");
            std::process::exit(1);
        }
    };
    let mut events = client
        .queue_subscribe(format!("{prefix}.in"), "echo".to_string())
        .await
        .expect("subscribing to the events");
    client.flush().await.expect("flushing the subscription");
    eprintln!("echo_backend_nats: serving {prefix}.in on {url}");
    let serve = async {
        while let Some(m) = events.next().await {
            let Some(h) = m.headers.as_ref() else {
                continue;
            };
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_string());
            if get("Ringway-Op").as_deref() != Some("message") {
                continue;
            }
            let (Some(origin), Some(conn)) = (get("Ringway-Origin"), get("Ringway-Conn")) else {
                continue;
            };
            let mut answer = async_nats::HeaderMap::new();
            answer.insert("Ringway-Op", "send");
            answer.insert("Ringway-Conn", conn.as_str());
            answer.insert(
                "Ringway-Kind",
                get("Ringway-Kind").as_deref().unwrap_or("text"),
            );
            let subject = format!("ringway.node.{origin}");
            if let Err(e) = client
                .publish_with_headers(subject, answer, m.payload.clone())
                .await
            {
                eprintln!("echo_backend_nats: publish failed: {e}");
            }
        }
    };
    match life {
        Some(d) => {
            let _ = tokio::time::timeout(d, serve).await;
        }
        None => serve.await,
    }
    let _ = client.flush().await;
}
