//! What an operator reads: the access log (one line per finished connection, text or JSON,
//! never a query or a token) and the metrics by route, upstream and close code, checked
//! after real traffic from an independent client (tokio-tungstenite).

mod common;

use std::time::{Duration, Instant};

use common::{http_exchange, metric_sum, Gateway, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(gw: &Gateway, path: &str) -> Ws {
    let url = format!("ws://{}{path}", gw.addr);
    timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect")
        .0
}

/// Send `n` text messages and read the `n` echoes.
async fn echo(ws: &mut Ws, n: usize) {
    for i in 0..n {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        let got = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, Message::text(format!("m{i}")));
    }
}

/// Close with `code` from the client and read until the server's answer ends it.
async fn close_from_client(mut ws: Ws, code: u16) {
    ws.close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    while let Ok(Some(Ok(_))) = timeout(WAIT, ws.next()).await {}
}

/// The access-log lines of a `--log-format json` gateway, as JSON objects, once there are
/// `count` of them.
async fn access_lines(gw: &Gateway, count: usize) -> Vec<serde_json::Value> {
    let log = gw.log_with("\"target\":\"ringway::access\"", count).await;
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "ringway::access")
        .collect()
}

/// Polls `metric` (summed over samples whose labels contain `labels`) until it is `want`:
/// cores publish their per-route totals once per loop turn.
async fn expect_metric(gw: &Gateway, metric: &str, labels: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = gw.metric(metric, labels).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{metric}{{{labels}}} is {got}, want {want}; /metrics:\n{}",
            gw.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_connection_and_never_a_query_or_token() {
    let gw = Gateway::start(&["--log-format", "json"]);
    // 1. A WebSocket session: two messages each way, closed by the client.
    let mut ws = connect(&gw, "/chat?token=hunter2-secret").await;
    echo(&mut ws, 2).await;
    close_from_client(ws, 1000).await;
    // 2. A plain HTTP request that is not an upgrade: refused 426.
    let (resp, _) = http_exchange(
        gw.addr,
        b"GET /chat?token=hunter2-secret HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer hunter2-secret\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 426);
    // 3. The demo page.
    let (resp, _) = http_exchange(gw.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(resp.status, 200);

    let lines = access_lines(&gw, 3).await;
    assert_eq!(lines.len(), 3, "one line per connection: {lines:#?}");
    let by_message = |m: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == m)
            .unwrap_or_else(|| panic!("no {m:?} line in {lines:#?}"))["fields"]
            .clone()
    };
    let closed = by_message("connection closed");
    assert_eq!(closed["path"], "/chat", "the path, without its query");
    assert_eq!(closed["route"], "/*");
    assert_eq!(closed["upstream"], "default");
    assert_eq!(closed["messages_in"], 2);
    assert_eq!(closed["messages_out"], 2);
    assert_eq!(closed["close_code"], 1000);
    assert_eq!(closed["closed_by"], "client");
    assert!(closed["bytes_in"].as_u64().unwrap() > 2 * 8, "{closed}");
    assert!(closed["bytes_out"].as_u64().unwrap() > 2 * 4, "{closed}");
    assert!(closed["duration_ms"].is_u64(), "{closed}");
    assert!(closed["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let refused = by_message("handshake refused");
    assert!(
        refused["refused"].as_str().unwrap().starts_with("426 "),
        "{refused}"
    );
    by_message("demo page served");
    for l in &lines {
        assert!(l["timestamp"].is_string(), "each line has its time: {l}");
        assert_eq!(l["level"], "INFO");
    }
    assert!(
        !gw.log().contains("hunter2"),
        "a query or token reached the log:\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_access_log_reads_as_key_value_pairs_and_can_be_turned_off() {
    let gw = Gateway::start(&[]);
    let mut ws = connect(&gw, "/x").await;
    echo(&mut ws, 1).await;
    close_from_client(ws, 1001).await;
    let log = gw.log_with("ringway::access", 1).await;
    let line = log
        .lines()
        .find(|l| l.contains("ringway::access"))
        .unwrap_or_else(|| panic!("no access line in\n{log}"));
    for field in [
        "INFO",
        "connection closed",
        "path=\"/x\"",
        "messages_in=1",
        "messages_out=1",
        "close_code=1001",
        "closed_by=\"client\"",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }

    let gw = Gateway::with_config("access_log = false\n", &[]);
    let mut ws = connect(&gw, "/x").await;
    echo(&mut ws, 1).await;
    close_from_client(ws, 1000).await;
    expect_metric(&gw, "ringway_closes_total", "code=\"1000\"", 1).await;
    // The count is made where the line would be written: none will come after it.
    assert!(
        !gw.log().contains("ringway::access"),
        "access_log = false: {}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_messages_and_bytes_by_route_and_closes_by_code_and_side() {
    let gw = Gateway::with_config(
        "[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b/*\"\n",
        &["--max-message", "1024"],
    );
    let mut a = connect(&gw, "/a").await;
    echo(&mut a, 3).await;
    expect_metric(&gw, "ringway_route_connections_open", "route=\"/a\"", 1).await;
    expect_metric(&gw, "ringway_route_connections_total", "route=\"/a\"", 1).await;
    expect_metric(
        &gw,
        "ringway_route_messages_total",
        "route=\"/a\",direction=\"in\"",
        3,
    )
    .await;
    expect_metric(
        &gw,
        "ringway_route_messages_total",
        "route=\"/a\",direction=\"out\"",
        3,
    )
    .await;
    expect_metric(
        &gw,
        "ringway_upstream_messages_total",
        "route=\"/a\",upstream=\"default\"",
        3,
    )
    .await;
    // Frames each way, 3 x "mN": a masked client frame is 8 bytes, a server frame 4 (and
    // the 101 leaves after the route is known).
    assert!(
        metric_sum(
            &gw,
            "ringway_route_bytes_total",
            "route=\"/a\",direction=\"in\""
        )
        .await
            >= 24
    );
    assert!(
        metric_sum(
            &gw,
            "ringway_route_bytes_total",
            "route=\"/a\",direction=\"out\""
        )
        .await
            >= 12
    );
    close_from_client(a, 1000).await;
    expect_metric(&gw, "ringway_route_connections_open", "route=\"/a\"", 0).await;
    expect_metric(
        &gw,
        "ringway_closes_total",
        "code=\"1000\",side=\"client\"",
        1,
    )
    .await;

    // A message over --max-message on the other route: the server closes 1009.
    let mut b = connect(&gw, "/b/room").await;
    b.send(Message::text("x".repeat(2000))).await.unwrap();
    let mut code = None;
    while let Ok(Some(Ok(m))) = timeout(WAIT, b.next()).await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
        }
    }
    assert_eq!(code, Some(1009));
    expect_metric(
        &gw,
        "ringway_closes_total",
        "code=\"1009\",side=\"server\"",
        1,
    )
    .await;
    expect_metric(&gw, "ringway_route_connections_total", "route=\"/b/*\"", 1).await;
    expect_metric(
        &gw,
        "ringway_route_messages_total",
        "route=\"/b/*\",direction=\"in\"",
        0,
    )
    .await;
    // Handshake latency: both 101s are in the histogram.
    expect_metric(&gw, "ringway_handshake_duration_seconds_count", "", 2).await;
}
