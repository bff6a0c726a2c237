//! The demo chat page (`demo_page`): what a plain `GET /` on a WebSocket port gets instead of
//! a 426, so a person can see the gateway work from a browser. One static page, HTML, CSS
//! and JS in the binary, no external assets; it connects back to the host it came from and
//! speaks the embedded upstream's chat contract (docs/relay-protocol.md).

use bytes::Bytes;

/// The page itself (src/session/demo_page.html).
pub const PAGE: &str = include_str!("demo_page.html");

/// Whether a refused upgrade's request target asks for the page: `/`, with or without a query.
pub fn is_page_target(target: &str) -> bool {
    target == "/" || target.starts_with("/?")
}

/// The whole response: a header block, then the page (static: nothing is copied per request).
/// The connection closes after it; the browser opens its WebSocket on a new one.
pub fn response() -> [Bytes; 2] {
    let head = format!(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Cache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
         style-src 'unsafe-inline'; img-src data:; connect-src ws: wss:\r\n\
         Connection: close\r\n\r\n",
        PAGE.len()
    );
    [Bytes::from(head), Bytes::from_static(PAGE.as_bytes())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_is_one_complete_http_message_holding_the_page() {
        let [head, body] = response();
        let head = std::str::from_utf8(&head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        let page = std::str::from_utf8(&body).unwrap();
        for hook in ["room", "join", "text", "send", "log"] {
            assert!(page.contains(&format!("data-testid=\"{hook}\"")), "{hook}");
        }
        // Self-contained: no asset is fetched from anywhere.
        for external in ["src=\"http", "href=\"http", "@import", "url("] {
            assert!(!page.contains(external), "{external}");
        }
    }

    #[test]
    fn only_the_root_is_the_page() {
        assert!(is_page_target("/"));
        assert!(is_page_target("/?room=a"));
        for other in ["/chat", "//", "/index.html", "", "*"] {
            assert!(!is_page_target(other), "{other}");
        }
    }
}
