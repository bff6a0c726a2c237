//! A chat backend for ringway in Rust, on the crate's relay codec (docs/relay-protocol.md).
//!
//! std threads and sockets only: one thread per gateway link. Implements the chat contract:
//! join/leave/say over topics named `room:<name>`, errors for anything else. It keeps no
//! state per connection: room membership lives in the gateway's subscriptions.
//!
//!     cargo run --example chat_backend -- --listen 127.0.0.1:9000
//!     cargo run --example chat_backend -- --listen unix:/tmp/chat.sock

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringway::protocol::message::MessageKind;
use ringway::relay::wire::{encode, Decoder, Record, Side, VERSION};
use ringway::relay::Topic;
use serde_json::{json, Value};

const NAME: &str = "chat-backend.rs";
/// The gateway pings every 5 s when idle; 15 s of silence means it is gone.
const IDLE_DROP: Duration = Duration::from_secs(15);

/// `--echo-other`: messages that are not JSON objects are echoed instead of answered with
/// an error, so `ringway-bench` can measure the relay round trip through this backend.
static ECHO_OTHER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => addr,
        _ => {
            eprintln!("usage: chat_backend --listen HOST:PORT | --listen unix:PATH [--echo-other]");
            std::process::exit(2);
        }
    };
    if args.next().as_deref() == Some("--echo-other") {
        ECHO_OTHER.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let Err(e) = run(&listen) {
        eprintln!("chat_backend: {e}");
        std::process::exit(1);
    }
}

fn run(listen: &str) -> io::Result<()> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        println!("listening on unix:{path}");
        for stream in listener.incoming() {
            let stream = stream?;
            stream.set_read_timeout(Some(IDLE_DROP))?;
            std::thread::spawn(move || serve("unix".into(), stream));
        }
    } else {
        let listener = TcpListener::bind(listen)?;
        println!("listening on {}", listener.local_addr()?);
        for stream in listener.incoming() {
            let stream = stream?;
            stream.set_read_timeout(Some(IDLE_DROP))?;
            stream.set_nodelay(true)?;
            let peer = stream.peer_addr().map_or("?".into(), |a| a.to_string());
            std::thread::spawn(move || serve(peer, stream));
        }
    }
    Ok(())
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Protocol(#[from] ringway::relay::wire::RelayError),
    #[error("{0}")]
    Handshake(String),
    #[error("gateway reported an error: {0}")]
    Remote(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn serve<S: Read + Write>(peer: String, mut stream: S) {
    eprintln!("link from {peer}");
    match link(&mut stream) {
        Ok(()) => eprintln!("link from {peer} closed"),
        Err(e) => {
            eprintln!("link from {peer}: {e}; dropping it");
            if matches!(e, LinkError::Protocol(_) | LinkError::Handshake(_)) {
                let mut out = BytesMut::new();
                encode(
                    &Record::Error {
                        reason: e.to_string(),
                    },
                    &mut out,
                );
                let _ = stream.write_all(&out);
            }
        }
    }
}

/// Serve one link until the gateway closes it (Ok) or breaks the protocol.
fn link<S: Read + Write>(stream: &mut S) -> Result<(), LinkError> {
    let mut dec = Decoder::default().only_from(Side::Gateway);
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut greeted = false;
    loop {
        while let Some(frame) = dec.decode(&mut inbuf)? {
            if !greeted {
                let Record::Hello { name, .. } = frame else {
                    return Err(LinkError::Handshake("first frame is not hello".into()));
                };
                eprintln!("gateway {name:?} speaks version {VERSION}");
                greeted = true;
                encode(
                    &Record::Hello {
                        version: VERSION,
                        name: NAME.into(),
                    },
                    &mut out,
                );
                continue;
            }
            answer(frame, &mut out)?;
        }
        if !out.is_empty() {
            stream.write_all(&out)?;
            out.clear();
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        inbuf.extend_from_slice(&chunk[..n]);
    }
}

/// The frames answering one gateway frame after the hello.
fn answer(frame: Record, out: &mut BytesMut) -> Result<(), LinkError> {
    match frame {
        Record::Ping(nonce) => encode(&Record::Pong(nonce), out),
        Record::Open {
            conn,
            query,
            authorize: true,
            ..
        } => {
            let reply = if has_token(query.as_deref()) {
                Record::Accept { conn }
            } else {
                Record::Reject {
                    conn,
                    status: 401,
                    reason: "token required".into(),
                }
            };
            encode(&reply, out);
        }
        Record::Message {
            conn,
            kind,
            payload,
        } => {
            let json = payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            if !json && ECHO_OTHER.load(std::sync::atomic::Ordering::Relaxed) {
                encode(
                    &Record::Send {
                        conn,
                        kind,
                        payload,
                    },
                    out,
                );
            } else {
                for f in chat(conn, kind, &payload) {
                    encode(&f, out);
                }
            }
        }
        Record::Close { conn, code, .. } => encode(
            &Record::Close {
                conn,
                code,
                reason: String::new(),
            },
            out,
        ),
        Record::Error { reason } => return Err(LinkError::Remote(reason)),
        Record::Hello { .. } => return Err(LinkError::Handshake("second hello".into())),
        // Open without authorize, pong, gone: nothing to do.
        _ => {}
    }
    Ok(())
}

/// Does the query string carry a non-empty `token` parameter?
fn has_token(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.strip_prefix("token=").is_some_and(|v| !v.is_empty()))
    })
}

fn text(conn: u64, v: Value) -> Record {
    Record::Send {
        conn,
        kind: MessageKind::Text,
        payload: Bytes::from(v.to_string()),
    }
}

/// The frames answering one client message: the chat contract.
fn chat(conn: u64, kind: MessageKind, payload: &[u8]) -> Vec<Record> {
    let error = |reason: &str| vec![text(conn, json!({"event": "error", "reason": reason}))];
    if kind != MessageKind::Text {
        return error("expected a text message");
    }
    let Ok(Value::Object(msg)) = serde_json::from_slice::<Value>(payload) else {
        return error("expected a JSON object");
    };
    let action = match msg.get("action").and_then(Value::as_str) {
        Some(a @ ("join" | "leave" | "say")) => a,
        _ => return error("unknown action"),
    };
    let room = match msg.get("room").and_then(Value::as_str) {
        Some(r) if !r.is_empty() => r,
        _ => return error("missing room"),
    };
    let topic = Topic::from(format!("room:{room}"));
    match action {
        "join" => vec![
            Record::Subscribe { conn, topic },
            text(conn, json!({"event": "joined", "room": room})),
        ],
        "leave" => vec![
            Record::Unsubscribe { conn, topic },
            text(conn, json!({"event": "left", "room": room})),
        ],
        _ => {
            let Some(said) = msg.get("text").and_then(Value::as_str) else {
                return error("missing text");
            };
            let v = json!({"event": "said", "room": room, "text": said, "from": conn.to_string()});
            vec![Record::Publish {
                topic,
                kind: MessageKind::Text,
                payload: Bytes::from(v.to_string()),
            }]
        }
    }
}
