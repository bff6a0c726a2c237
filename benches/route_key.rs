//! Picking a message's upstream by its JSON routing key (route `actions`), per client text
//! message on the edge's hot path. Side by side on the very same messages:
//! - `simd_json/select`: our [`RouteTable::select`]: copy into a scratch buffer, simd-json
//!   tape parse (buffers reused per thread), scan top-level keys for the routing key with
//!   duplicate detection, look the value up.
//! - `serde_json/visitor`: the fair serde_json equivalent: `from_slice` with a visitor over
//!   the top-level map that compares each (unescaped) key, captures the key's string value,
//!   detects duplicates, and skips every other value with `IgnoredAny`; then checks for
//!   trailing bytes and looks the value up. Same outcome as ours on every input here.
//! - `serde_json/value`: `from_slice::<serde_json::Value>` then `get`: what one would write
//!   first. It builds a whole map and cannot see duplicates (its map keeps one), so it is
//!   a reference line, not an equivalent.
//!
//! Messages: ~100 B and ~1 KiB JSON objects, routing key first or last.

use std::borrow::Cow;
use std::fmt;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringway::config::Config;
use ringway::protocol::message::MessageKind;
use ringway::relay::UpstreamId;
use ringway::route::{Route, RouteKey, RouteTable};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

const CONFIG: &str = r#"
    [[upstreams]]
    name = "chat"
    backends = ["echo"]
    [[upstreams]]
    name = "game"
    backends = ["echo"]
    [[upstreams]]
    name = "billing"
    backends = ["echo"]
    [[routes]]
    path = "/chat"
    upstream = "chat"
    actions = { move = "game", pay = "billing", say = "chat" }
"#;

fn messages() -> Vec<(&'static str, String)> {
    let small_body = r#""room":"lobby","text":"hello there, how are you today?","seq":12345"#;
    let mut items = String::new();
    for i in 0..12 {
        if i > 0 {
            items.push(',');
        }
        items.push_str(&format!(
            r#"{{"id":{i},"name":"item number {i}","price":{}.5,"tags":["a","b"],"ok":true}}"#,
            i * 7
        ));
    }
    let big_body = format!(
        r#""room":"lobby","meta":{{"client":"web","ver":"1.2.3","ts":1732540000123}},"items":[{items}],"text":"please \"route\" me\nsomewhere nice""#
    );
    vec![
        (
            "100B/key_first",
            format!(r#"{{"action":"pay",{small_body}}}"#),
        ),
        (
            "100B/key_last",
            format!(r#"{{{small_body},"action":"pay"}}"#),
        ),
        (
            "1KiB/key_first",
            format!(r#"{{"action":"pay",{big_body}}}"#),
        ),
        ("1KiB/key_last", format!(r#"{{{big_body},"action":"pay"}}"#)),
    ]
}

/// A string borrowed from the input when it has no escapes, else unescaped into a copy.
struct Str<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Any value; keeps it only when it is a string.
struct MaybeStr<'de>(Option<Cow<'de, str>>);

impl<'de> de::Deserialize<'de> for MaybeStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_unit<E>(self) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<MaybeStr<'de>, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<MaybeStr<'de>, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

enum Found<'de> {
    Value(Option<Cow<'de, str>>),
    Duplicate,
}

struct TopLevelKey<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for TopLevelKey<'_> {
    type Value = Found<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevelKey<'_> {
    type Value = Found<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Found<'de>, A::Error> {
        // Reads the whole object even after a duplicate: like ours, invalid JSON with a
        // duplicate key goes to the default rather than being refused.
        let mut seen = 0;
        let mut found = None;
        while let Some(Str(k)) = m.next_key::<Str>()? {
            if k == self.0 {
                seen += 1;
                found = m.next_value::<MaybeStr>()?.0;
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(if seen > 1 {
            Found::Duplicate
        } else {
            Found::Value(found)
        })
    }
}

/// The serde_json equivalent of `RouteTable::select` for a text message: `Err(())` for a
/// duplicate key, else the upstream.
fn serde_visitor_select(route: &Route, rk: &RouteKey, payload: &[u8]) -> Result<UpstreamId, ()> {
    if payload
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        != Some(&b'{')
    {
        return Ok(route.upstream);
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    match TopLevelKey(&rk.key).deserialize(&mut de) {
        Ok(_) if de.end().is_err() => Ok(route.upstream),
        Ok(Found::Duplicate) => Err(()),
        Ok(Found::Value(Some(v))) => Ok(rk.lookup(&v).unwrap_or(route.upstream)),
        Ok(Found::Value(None)) | Err(_) => Ok(route.upstream),
    }
}

fn serde_value_select(route: &Route, rk: &RouteKey, payload: &[u8]) -> UpstreamId {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(v) => v
            .get(&*rk.key)
            .and_then(|v| v.as_str())
            .and_then(|v| rk.lookup(v))
            .unwrap_or(route.upstream),
        Err(_) => route.upstream,
    }
}

fn bench(c: &mut Criterion) {
    let config: Config = toml::from_str(CONFIG).unwrap();
    let table = RouteTable::from_config(&config).unwrap();
    let (_, route) = table.match_path("/chat").unwrap();
    let rk = route.route_key.as_ref().unwrap();
    let billing = rk.lookup("pay").unwrap();

    // The visitor is an equivalent: it refuses the same duplicates ours does.
    for dup in [
        &br#"{"action":"pay","x":1,"action":"move"}"#[..],
        br#"{"\u0061ction":"pay","a\u0063tion":"move"}"#,
    ] {
        assert!(table
            .select(route, MessageKind::Text, dup, &mut Vec::new())
            .is_err());
        assert_eq!(serde_visitor_select(route, rk, dup), Err(()));
    }

    let mut group = c.benchmark_group("route_key");
    for (name, msg) in messages() {
        let payload = msg.as_bytes();
        // Every contender must route every message the same way.
        let mut scratch = Vec::new();
        assert_eq!(
            table.select(route, MessageKind::Text, payload, &mut scratch),
            Ok(billing)
        );
        assert_eq!(serde_visitor_select(route, rk, payload), Ok(billing));
        assert_eq!(serde_value_select(route, rk, payload), billing);
        eprintln!("{name}: {} bytes", payload.len());

        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("simd_json/select", name),
            payload,
            |b, p| b.iter(|| table.select(route, MessageKind::Text, black_box(p), &mut scratch)),
        );
        group.bench_with_input(
            BenchmarkId::new("serde_json/visitor", name),
            payload,
            |b, p| b.iter(|| serde_visitor_select(route, rk, black_box(p))),
        );
        group.bench_with_input(
            BenchmarkId::new("serde_json/value", name),
            payload,
            |b, p| b.iter(|| serde_value_select(route, rk, black_box(p))),
        );
    }
    // The cost a route with actions adds to text that is not a JSON object.
    let plain = b"hello there, how are you today? this is not json at all, just chat text";
    group.throughput(Throughput::Bytes(plain.len() as u64));
    group.bench_function("simd_json/select/not_json_text", |b| {
        b.iter(|| table.select(route, MessageKind::Text, black_box(plain), &mut Vec::new()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
