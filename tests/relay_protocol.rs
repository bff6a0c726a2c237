//! The two example chat backends (examples/chat_backend.py, examples/chat_backend.rs) driven
//! the way the gateway drives a backend, through the crate's relay codec: the Rust codec
//! against the Python one, and against itself. Both must answer every frame exactly as
//! docs/relay-protocol.md's chat contract says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringway::protocol::message::MessageKind;
use ringway::relay::wire::{encode, Decoder, Record, RelayError, Side, VERSION};
use serde_json::{json, Value};

/// A backend process, killed when dropped.
struct Backend {
    child: Child,
    /// What it printed: `listening on ADDR`.
    addr: String,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/examples/chat_backend, next to this test's target/<profile>/deps/;
/// built here because `cargo test --test relay_protocol` alone does not build examples.
fn rust_backend_path() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args(["build", "--quiet", "--example", "chat_backend"]);
        // The profile this test was built with (target/<dir>/): `debug` is cargo's `dev`.
        let profile = match profile_dir.file_name().and_then(|p| p.to_str()) {
            Some("debug") | None => "dev",
            Some(dir) => dir,
        };
        cmd.args(["--profile", profile]);
        let status = cmd
            .status()
            .expect("run cargo build --example chat_backend");
        assert!(
            status.success(),
            "cargo build --example chat_backend failed"
        );
    });
    let path = profile_dir.join("examples").join("chat_backend");
    assert!(path.exists(), "{} missing", path.display());
    path
}

#[derive(Clone, Copy, Debug)]
enum Which {
    Python,
    Rust,
}

fn spawn(which: Which, listen: &str) -> Backend {
    let mut cmd = match which {
        Which::Python => {
            let mut c = Command::new("python3");
            c.arg(repo().join("examples/chat_backend.py"));
            c
        }
        Which::Rust => Command::new(rust_backend_path()),
    };
    let mut child = cmd
        .args(["--listen", listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn backend");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{which:?} printed {line:?}"))
        .to_string();
    Backend { child, addr }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// The gateway's end of one link.
struct Link {
    stream: Box<dyn Stream>,
    dec: Decoder,
    buf: BytesMut,
}

impl Link {
    fn connect(addr: &str) -> Link {
        let timeout = Some(Duration::from_secs(10));
        let stream: Box<dyn Stream> = if let Some(path) = addr.strip_prefix("unix:") {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(timeout).unwrap();
            Box::new(s)
        } else {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            Box::new(s)
        };
        Link {
            stream,
            dec: Decoder::default().only_from(Side::Backend),
            buf: BytesMut::new(),
        }
    }

    /// Connect and exchange hellos.
    fn open(addr: &str) -> Link {
        let mut link = Link::connect(addr);
        link.send(&Record::Hello {
            version: VERSION,
            name: "test-gateway".into(),
        });
        match link.recv() {
            Record::Hello { version, name } => {
                assert_eq!(version, VERSION);
                assert!(name.starts_with("chat-backend"), "{name}");
            }
            other => panic!("expected hello, got {other:?}"),
        }
        link
    }

    fn send(&mut self, frame: &Record) {
        let mut out = BytesMut::new();
        encode(frame, &mut out);
        self.send_raw(&out);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next frame, or None at end of stream.
    fn try_recv(&mut self) -> Option<Result<Record, RelayError>> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(f)) => return Some(Ok(f)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            let n = self
                .stream
                .read(&mut chunk)
                .expect("backend answers in time");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn recv(&mut self) -> Record {
        self.try_recv().expect("a frame, not EOF").unwrap()
    }

    fn text(&mut self, conn: u64, s: &str) {
        self.send(&Record::Message {
            conn,
            kind: MessageKind::Text,
            payload: Bytes::copy_from_slice(s.as_bytes()),
        });
    }

    /// Expect a text `send` to `conn` holding `want`.
    fn expect_send(&mut self, conn: u64, want: Value) {
        match self.recv() {
            Record::Send {
                conn: c,
                kind: MessageKind::Text,
                payload,
            } if c == conn => assert_eq!(json(&payload), want),
            other => panic!("expected send to {conn} of {want}, got {other:?}"),
        }
    }

    fn expect_error(&mut self, conn: u64, reason: &str) {
        self.expect_send(conn, json!({"event": "error", "reason": reason}));
    }

    fn expect(&mut self, want: Record) {
        assert_eq!(self.recv(), want);
    }

    /// Ping and expect the pong as the very next frame: nothing else was pending.
    fn sync(&mut self, nonce: u64) {
        self.send(&Record::Ping(nonce));
        self.expect(Record::Pong(nonce));
    }
}

fn json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or_else(|e| panic!("{e}: {payload:?}"))
}

fn open(conn: u64, query: Option<&str>, authorize: bool) -> Record {
    Record::Open {
        conn,
        path: "/chat".into(),
        query: query.map(Into::into),
        headers: vec![("origin".into(), "https://example.com".into())],
        peer: Some("127.0.0.1:40000".into()),
        authorize,
        replay: false,
    }
}

/// Beyond 2^53: a JSON number would lose it, the decimal string must not.
const A: u64 = 0x0100_0000_0002_0003;
const B: u64 = 2;

fn chat_session(backend: &Backend) {
    let mut link = Link::open(&backend.addr);
    link.send(&open(A, None, false));
    link.send(&open(B, None, false));

    for conn in [A, B] {
        link.text(conn, r#"{"action":"join","room":"lobby"}"#);
        link.expect(Record::Subscribe {
            conn,
            topic: "room:lobby".into(),
        });
        link.expect_send(conn, json!({"event": "joined", "room": "lobby"}));
    }

    link.text(A, r#"{"action":"say","room":"lobby","text":"hé, \"you\""}"#);
    match link.recv() {
        Record::Publish {
            topic,
            kind: MessageKind::Text,
            payload,
        } => {
            assert_eq!(&*topic, "room:lobby");
            assert_eq!(
                json(&payload),
                json!({"event": "said", "room": "lobby", "text": "hé, \"you\"", "from": "72057594038059011"})
            );
        }
        other => panic!("expected publish, got {other:?}"),
    }

    link.text(B, r#"{"action":"leave","room":"lobby","extra":1}"#);
    link.expect(Record::Unsubscribe {
        conn: B,
        topic: "room:lobby".into(),
    });
    link.expect_send(B, json!({"event": "left", "room": "lobby"}));

    // Every error case of the contract, in the document's order.
    link.send(&Record::Message {
        conn: B,
        kind: MessageKind::Binary,
        payload: Bytes::from_static(b"{\"action\":\"join\",\"room\":\"x\"}"),
    });
    link.expect_error(B, "expected a text message");
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    for bad in ["not json", "[1,2]", "\"join\"", "", "{\"action\":", &deep] {
        link.text(B, bad);
        link.expect_error(B, "expected a JSON object");
    }
    for bad in [
        r#"{"room":"x"}"#,
        r#"{"action":"dance"}"#,
        r#"{"action":7}"#,
    ] {
        link.text(B, bad);
        link.expect_error(B, "unknown action");
    }
    for bad in [
        r#"{"action":"join"}"#,
        r#"{"action":"say","room":"","text":"t"}"#,
        r#"{"action":"leave","room":5}"#,
    ] {
        link.text(B, bad);
        link.expect_error(B, "missing room");
    }
    for bad in [
        r#"{"action":"say","room":"x"}"#,
        r#"{"action":"say","room":"x","text":5}"#,
    ] {
        link.text(B, bad);
        link.expect_error(B, "missing text");
    }

    // Authorization by query token.
    link.send(&open(3, Some("room=a&token=abc"), true));
    link.expect(Record::Accept { conn: 3 });
    for (conn, query) in [(4, None), (5, Some("token=")), (6, Some("room=a"))] {
        link.send(&open(conn, query, true));
        link.expect(Record::Reject {
            conn,
            status: 401,
            reason: "token required".into(),
        });
    }
    // A replayed open needs no answer.
    let mut replayed = open(7, None, false);
    if let Record::Open { replay, .. } = &mut replayed {
        *replay = true;
    }
    link.send(&replayed);
    link.sync(1);

    // The gateway's close is answered with the same code; gone needs no answer.
    link.send(&Record::Close {
        conn: A,
        code: 1001,
        reason: "going away".into(),
    });
    link.expect(Record::Close {
        conn: A,
        code: 1001,
        reason: String::new(),
    });
    link.send(&Record::Gone { conn: A });
    link.send(&Record::Pong(99));
    link.sync(u64::MAX);

    // A second link at the same time is served independently.
    let mut second = Link::open(&backend.addr);
    second.send(&open(A, None, false));
    second.text(A, r#"{"action":"join","room":"two"}"#);
    second.expect(Record::Subscribe {
        conn: A,
        topic: "room:two".into(),
    });
    link.sync(2);
    second.expect_send(A, json!({"event": "joined", "room": "two"}));
}

/// Garbage from the gateway costs the backend that link only.
fn garbage_drops_only_that_link(backend: &Backend) {
    let mut good = Link::open(&backend.addr);

    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Unknown frame type after the hello.
        (vec![0, 0, 0, 1, 0x7f], "type"),
        // A backend-only frame sent by the gateway.
        (vec![0, 0, 0, 9, 0x20, 0, 0, 0, 0, 0, 0, 0, 1], "accept"),
        // A length beyond the limit: must not be read or allocated.
        (vec![0xff, 0xff, 0xff, 0xff, 0x11], "limit"),
        // Text that is not UTF-8.
        (
            vec![
                0, 0, 0, 16, 0x11, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 2, 0xc3, 0x28,
            ],
            "UTF-8",
        ),
    ];
    for (bytes, mentions) in cases {
        let mut bad = Link::open(&backend.addr);
        bad.send_raw(&bytes);
        match bad.try_recv() {
            Some(Ok(Record::Error { reason })) => {
                assert!(reason.contains(mentions), "{reason:?} for {bytes:02x?}")
            }
            other => panic!("expected an error frame for {bytes:02x?}, got {other:?}"),
        }
        assert!(bad.try_recv().is_none(), "link closed after the error");
    }

    // Wrong version in the hello: error, then the link is closed.
    let mut old = Link::connect(&backend.addr);
    let mut hello = BytesMut::new();
    encode(
        &Record::Hello {
            version: VERSION,
            name: "gw".into(),
        },
        &mut hello,
    );
    hello[10] = 2; // the version's low byte: 4 length + 1 type + 4 magic + 1
    old.send_raw(&hello);
    match old.try_recv() {
        Some(Ok(Record::Error { reason })) => assert!(reason.contains("version"), "{reason}"),
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert!(old.try_recv().is_none());

    // A first frame that is not hello.
    let mut rude = Link::connect(&backend.addr);
    rude.send(&Record::Ping(1));
    assert!(matches!(rude.try_recv(), Some(Ok(Record::Error { .. }))));
    assert!(rude.try_recv().is_none());

    // The first link still works.
    good.sync(3);
    good.send(&open(9, None, false));
    good.text(9, "{}");
    good.expect_error(9, "unknown action");
}

fn unix_path(tag: &str) -> String {
    std::env::temp_dir()
        .join(format!("ringway-chat-{tag}-{}.sock", std::process::id()))
        .display()
        .to_string()
}

#[test]
fn python_backend_follows_the_chat_contract() {
    let b = spawn(Which::Python, "127.0.0.1:0");
    chat_session(&b);
    garbage_drops_only_that_link(&b);
}

#[test]
fn rust_backend_follows_the_chat_contract() {
    let b = spawn(Which::Rust, "127.0.0.1:0");
    chat_session(&b);
    garbage_drops_only_that_link(&b);
}

#[test]
fn both_backends_serve_unix_sockets() {
    for (which, tag) in [(Which::Python, "py"), (Which::Rust, "rs")] {
        let path = unix_path(tag);
        let b = spawn(which, &format!("unix:{path}"));
        assert_eq!(b.addr, format!("unix:{path}"));
        chat_session(&b);
        drop(b);
        let _ = std::fs::remove_file(&path);
    }
}
