//! tokio-tungstenite echo server: a peer for benches/compare.sh. One current_thread tokio
//! runtime (one core, like `ringway --workers 1`); every text/binary message is sent back.
//! Usage: tungstenite-echo --listen 127.0.0.1:0 (prints `serving ws://ADDR/` on stderr).

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const MAX_MESSAGE: usize = 1 << 20;

fn listen_arg() -> String {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--listen") {
        Some(i) => args.get(i + 1).cloned().expect("--listen needs ADDR:PORT"),
        None => "127.0.0.1:8080".to_string(),
    }
}

async fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig {
        max_message_size: Some(MAX_MESSAGE),
        max_frame_size: Some(MAX_MESSAGE),
        ..WebSocketConfig::default()
    };
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            break;
        }
        // Pings are answered and closes echoed by tungstenite itself.
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind(listen_arg()).await.expect("bind");
        eprintln!("serving ws://{}/", listener.local_addr().unwrap());
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        }
    });
}
