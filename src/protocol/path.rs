//! Request-path normalisation (RFC 3986 §6.2.2), done once at the handshake so that route
//! matching, policy and the backend all see the same path.
//!
//! [`normalize`] takes the path part of an origin-form request target (after the handshake
//! has split off `?query`; fragments are already refused) and returns its normal form:
//!
//! 1. percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded and the
//!    hex digits of every other escape are upper-cased (§6.2.2.1, §6.2.2.2);
//! 2. runs of `/` are merged into one (not in RFC 3986, but servers and frameworks disagree
//!    on what `//` means, so none of them gets to decide);
//! 3. dot segments are removed (§6.2.2.3, the algorithm of §5.2.4; `..` at the root stays at
//!    the root).
//!
//! What cannot be normalised without guessing how the backend would read it is refused:
//! a percent-encoded `/`, `?`, `#`, `\`, `;` or `%` (each would change the path's structure
//! or be decoded a second time by someone), a NUL or other control character (raw or
//! encoded), a raw `\` (some servers read it as `/`), `;` path parameters (`/admin;x` is
//! `/admin` to some servers), a `%` not followed by two hex digits, and raw non-ASCII bytes
//! (RFC 3986 §2 and RFC 9112 §3.2 allow only ASCII; clients percent-encode them).
//!
//! The result is never longer than the input, and normalising it again changes nothing.

/// Why a request path is refused (400). The `Display` text is the one-line reason sent to
/// the client; it never echoes the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("`%` not followed by two hex digits")]
    BadEscape,
    /// Names the decoded character, e.g. "`/`".
    #[error("percent-encoded {0} not accepted")]
    EncodedDelimiter(&'static str),
    #[error("control character")]
    Control,
    #[error("`\\` not accepted")]
    Backslash,
    #[error("`;` path parameters not accepted")]
    Parameters,
    #[error("raw non-ASCII byte; percent-encode it")]
    NonAscii,
    #[error("must start with `/`")]
    NotAbsolute,
}

/// RFC 3986 §2.3 `unreserved`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A decoded escape that must stay out of a path, named for the reason.
fn encoded_delimiter(b: u8) -> Option<&'static str> {
    Some(match b {
        b'/' => "`/`",
        b'?' => "`?`",
        b'#' => "`#`",
        b'\\' => "`\\`",
        b';' => "`;`",
        b'%' => "`%`",
        _ => return None,
    })
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// The normal form of `path` (see the module docs), or why it has none.
pub fn normalize(path: &str) -> Result<String, PathError> {
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Steps 1 and 2 in one pass over bytes (never slicing the `str`), into ASCII only.
    let mut merged: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        i += 1;
        match b {
            0x80..=0xff => return Err(PathError::NonAscii),
            0x00..=0x1f | 0x7f => return Err(PathError::Control),
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Parameters),
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    raw.get(i).copied().and_then(hex_value),
                    raw.get(i + 1).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::BadEscape);
                };
                i += 2;
                let v = hi << 4 | lo;
                if is_unreserved(v) {
                    merged.push(v);
                } else if let Some(name) = encoded_delimiter(v) {
                    return Err(PathError::EncodedDelimiter(name));
                } else if v < 0x20 || v == 0x7f {
                    return Err(PathError::Control);
                } else {
                    merged.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[usize::from(hi)],
                        HEX_UPPER[usize::from(lo)],
                    ]);
                }
            }
            b'/' if merged.last() == Some(&b'/') => {}
            _ => merged.push(b),
        }
    }
    // Step 3 over segments. `merged` starts with `/` and has no empty segment except a last
    // one (trailing `/`), so the kept segments join without `//`.
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for seg in merged[1..].split(|&c| c == b'/') {
        trailing_slash = false;
        match seg {
            b"." => trailing_slash = true,
            b".." => {
                kept.pop();
                trailing_slash = true;
            }
            _ => kept.push(seg),
        }
    }
    let mut out = String::with_capacity(merged.len());
    for seg in &kept {
        out.push('/');
        // Every byte pushed above is ASCII.
        out.extend(seg.iter().map(|&c| char::from(c)));
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normal_forms() {
        for (raw, want) in [
            ("/", "/"),
            ("/chat", "/chat"),
            ("/chat/", "/chat/"),
            ("//", "/"),
            ("///chat///room//", "/chat/room/"),
            ("/%61dmin", "/admin"),
            ("/%41%7a%30%2D%2e%5F%7E", "/Az0-._~"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/.", "/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a/.", "/a/"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E./admin", "/admin"),
            ("/api//../admin", "/admin"),
            ("/chat//room/./x", "/chat/room/x"),
            ("/a/.b/..c/...", "/a/.b/..c/..."),
            ("/admin/.", "/admin/"),
            ("/a/..//b", "/b"),
            ("/x*|^{}\"<>`", "/x*|^{}\"<>`"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn what_cannot_be_normalised_safely_is_refused() {
        use PathError::*;
        for (raw, want) in [
            ("/admin%2f", EncodedDelimiter("`/`")),
            ("/admin%2F..", EncodedDelimiter("`/`")),
            ("/admin%3Fx=1", EncodedDelimiter("`?`")),
            ("/a%23b", EncodedDelimiter("`#`")),
            ("/a%5cb", EncodedDelimiter("`\\`")),
            ("/a%3bx", EncodedDelimiter("`;`")),
            ("/%252e%252e/admin", EncodedDelimiter("`%`")),
            ("/a%00", Control),
            ("/a%0d%0a", Control),
            ("/a%7f", Control),
            ("/a\u{7f}", Control),
            ("/a\tb", Control),
            ("/a\\b", Backslash),
            ("/admin;x", Parameters),
            ("/admin/;", Parameters),
            ("/a%", BadEscape),
            ("/a%4", BadEscape),
            ("/a%g0", BadEscape),
            ("/a%0g", BadEscape),
            ("/a%%41", BadEscape),
            ("/a%\u{e9}", BadEscape),
            ("/caf\u{e9}", NonAscii),
            ("/\u{1F600}", NonAscii),
            ("", NotAbsolute),
            ("admin", NotAbsolute),
        ] {
            assert_eq!(normalize(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn reasons_are_one_line_and_never_echo_the_path() {
        for e in [
            normalize("/a%2fSECRET"),
            normalize("/SECRET;x"),
            normalize("/SECRET\u{e9}"),
        ] {
            let text = e.unwrap_err().to_string();
            assert!(!text.contains("SECRET") && !text.contains('\n'), "{text}");
        }
    }

    proptest! {
        // Any path, accepted or not, never panics; an accepted one is ASCII, starts with
        // `/`, is no longer than the input, has no `//` or dot segments, and is a fixed point.
        #[test]
        fn normalisation_is_total_and_idempotent(
            tail in proptest::collection::vec(
                prop_oneof![
                    Just("/".to_string()), Just(".".to_string()), Just("..".to_string()),
                    Just("%2e".to_string()), Just("%2F".to_string()), Just("%".to_string()),
                    Just("%41".to_string()), Just("%c3".to_string()), Just(";".to_string()),
                    Just("\u{e9}".to_string()), "[a-z]{1,3}", any::<char>().prop_map(String::from),
                ],
                0..12,
            )
        ) {
            let raw = format!("/{}", tail.concat());
            if let Ok(n) = normalize(&raw) {
                prop_assert!(n.is_ascii() && n.starts_with('/') && n.len() <= raw.len(), "{raw:?} -> {n:?}");
                prop_assert!(!n.contains("//"), "{raw:?} -> {n:?}");
                prop_assert!(!n.split('/').any(|s| s == "." || s == ".."), "{raw:?} -> {n:?}");
                prop_assert_eq!(normalize(&n), Ok(n.clone()));
            }
        }
    }
}
