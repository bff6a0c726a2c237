//! The demo page in place of a 426 (`demo_page`).

use super::*;

#[test]
fn a_plain_get_of_the_root_gets_the_demo_page_where_it_is_served() {
    let request = b"GET /?room=x HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n\r\n";
    let mut sim = Sim::new(PLAIN, true);
    assert!(
        sim.config.serves_demo_page(),
        "the default: embedded upstream, no routes"
    );
    sim.feed(request);
    let queued: Vec<Vec<u8>> = sim.s.queued().iter().map(|b| b.to_vec()).collect();
    assert!(queued[0].starts_with(b"HTTP/1.1 200 OK\r\n"), "{queued:?}");
    assert!(String::from_utf8_lossy(&queued.concat()).contains("data-testid=\"log\""));
    assert_eq!(sim.s.state(), State::Draining, "closed after the page");
    assert!(sim.counted().is_empty(), "not a refused handshake");
    assert_eq!(sim.s.note(), Some(DEMO_PAGE_NOTE));

    // Turned off, or not at the root: the 426 of any non-upgrade request.
    let off = format!("{PLAIN}\ndemo_page = false\n");
    for (toml_text, request) in [
        (off.as_str(), &request[..]),
        (PLAIN, b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n"),
        // An upgrade attempt (another protocol, or a WebSocket one missing a header) at the
        // root is told what we speak, not given a page.
        (
            PLAIN,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        ),
        (
            PLAIN,
            b"GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
    ] {
        let mut sim = Sim::new(toml_text, true);
        sim.feed(request);
        assert_eq!(sim.wire(), [Wire::Http(426)]);
        assert_eq!(sim.counted(), [Count::HandshakeRejected]);
        assert!(
            sim.s.note().is_some_and(|n| n.starts_with("426 ")),
            "{:?}",
            sim.s.note()
        );
    }
}
