#!/usr/bin/env python3
"""A chat backend for ringway, speaking the relay protocol (docs/relay-protocol.md).

Python 3 standard library only. Implements the chat contract: join/leave/say over topics
named "room:<name>", errors for anything else. Keeps no state per connection: room
membership lives in the gateway's subscriptions.

    python3 examples/chat_backend.py --listen 127.0.0.1:9000
    python3 examples/chat_backend.py --listen unix:/tmp/chat.sock
"""

import argparse
import asyncio
import json
import os
import struct
import sys
import urllib.parse

MAGIC = b"RWAY"
VERSION = 1
NAME = "chat-backend.py"
MAX_FRAME = 16 * 1024 * 1024 + 64 * 1024
IDLE_DROP_S = 15.0

HELLO, PING, PONG, ERROR, CLOSE = 0x01, 0x02, 0x03, 0x04, 0x05
OPEN, MESSAGE, GONE = 0x10, 0x11, 0x12
ACCEPT, REJECT, SEND, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, BROADCAST = range(0x20, 0x27)
FROM_GATEWAY = {HELLO, PING, PONG, ERROR, CLOSE, OPEN, MESSAGE, GONE}
NAMES = dict(zip(range(0x20, 0x27), ["accept", "reject", "send", "subscribe", "unsubscribe", "publish", "broadcast"]))
TEXT, BINARY = 1, 2


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class ProtocolError(Exception):
    pass


class Reader:
    """A cursor over one frame's body; every read checks the bounds."""

    def __init__(self, body):
        self.body = body
        self.pos = 0

    def take(self, n, field):
        if self.pos + n > len(self.body):
            raise ProtocolError(f"truncated field {field}")
        b = self.body[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self, field):
        return self.take(1, field)[0]

    def u16(self, field):
        return struct.unpack(">H", self.take(2, field))[0]

    def u64(self, field):
        return struct.unpack(">Q", self.take(8, field))[0]

    def string(self, field):
        try:
            return self.take(self.u16(field), field).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"field {field} is not UTF-8") from None

    def opt_string(self, field):
        present = self.u8(field)
        if present not in (0, 1):
            raise ProtocolError(f"bad presence byte {present} in {field}")
        return self.string(field) if present else None

    def message(self):
        kind = self.u8("kind")
        if kind not in (TEXT, BINARY):
            raise ProtocolError(f"unknown message kind {kind}")
        n = struct.unpack(">I", self.take(4, "payload"))[0]
        payload = self.take(n, "payload")
        if kind == TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("text payload is not UTF-8") from None
        return kind, payload

    def end(self):
        if self.pos != len(self.body):
            raise ProtocolError(f"{len(self.body) - self.pos} bytes after the last field")


def check_type(ty):
    if ty in NAMES:
        raise ProtocolError(f"{NAMES[ty]} frame may not be sent by the gateway")
    if ty not in FROM_GATEWAY:
        raise ProtocolError(f"unknown frame type 0x{ty:02x}")


def parse(ty, body):
    """Decode a gateway frame body into (type, fields...)."""
    check_type(ty)
    r = Reader(body)
    if ty == HELLO:
        magic = r.take(4, "magic")
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}")
        version = r.u16("version")
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version}; this end speaks {VERSION}")
        out = (HELLO, r.string("name"))
    elif ty in (PING, PONG):
        out = (ty, r.u64("nonce"))
    elif ty == ERROR:
        out = (ERROR, r.string("reason"))
    elif ty == CLOSE:
        out = (CLOSE, r.u64("conn"), r.u16("code"), r.string("reason"))
    elif ty == OPEN:
        conn = r.u64("conn")
        flags = r.u8("flags")
        if flags & ~0x03:
            raise ProtocolError(f"unknown open flags 0x{flags:02x}")
        path = r.string("path")
        query = r.opt_string("query")
        peer = r.opt_string("peer")
        headers = [(r.string("header name"), r.string("header value")) for _ in range(r.u16("header count"))]
        out = (OPEN, conn, flags, path, query, peer, headers)
    elif ty == MESSAGE:
        conn = r.u64("conn")
        kind, payload = r.message()
        out = (MESSAGE, conn, kind, payload)
    else:  # GONE
        out = (GONE, r.u64("conn"))
    r.end()
    return out


def frame(ty, *parts):
    body = b"".join(parts)
    return struct.pack(">IB", len(body) + 1, ty) + body


def s(text):
    b = text.encode("utf-8")[:0xFFFF]
    return struct.pack(">H", len(b)) + b


def u64(n):
    return struct.pack(">Q", n)


def payload(kind, data):
    return struct.pack(">BI", kind, len(data)) + data


def to_json(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def send_json(conn, obj):
    return frame(SEND, u64(conn), payload(TEXT, to_json(obj)))


def chat(conn, kind, data):
    """The frames answering one client message (the chat contract)."""

    def error(reason):
        return [send_json(conn, {"event": "error", "reason": reason})]

    if kind != TEXT:
        return error("expected a text message")
    try:
        msg = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # deep nesting is a RecursionError
        return error("expected a JSON object")
    if not isinstance(msg, dict):
        return error("expected a JSON object")
    action = msg.get("action")
    if action not in ("join", "leave", "say"):
        return error("unknown action")
    room = msg.get("room")
    if not isinstance(room, str) or not room:
        return error("missing room")
    topic = s("room:" + room)
    if action == "join":
        return [frame(SUBSCRIBE, u64(conn), topic), send_json(conn, {"event": "joined", "room": room})]
    if action == "leave":
        return [frame(UNSUBSCRIBE, u64(conn), topic), send_json(conn, {"event": "left", "room": room})]
    text = msg.get("text")
    if not isinstance(text, str):
        return error("missing text")
    said = {"event": "said", "room": room, "text": text, "from": str(conn)}
    return [frame(PUBLISH, topic, payload(TEXT, to_json(said)))]


def authorized(query):
    if query is None:
        return False
    params = urllib.parse.parse_qs(query)
    return any(v for v in params.get("token", []))


def answer(f):
    """The frames answering one gateway frame after the hello."""
    ty = f[0]
    if ty == PING:
        return [frame(PONG, u64(f[1]))]
    if ty == OPEN:
        _, conn, flags, _path, query, _peer, _headers = f
        if flags & 0x01:
            if authorized(query):
                return [frame(ACCEPT, u64(conn))]
            return [frame(REJECT, u64(conn), struct.pack(">H", 401), s("token required"))]
        return []
    if ty == MESSAGE:
        return chat(f[1], f[2], f[3])
    if ty == CLOSE:
        return [frame(CLOSE, u64(f[1]), struct.pack(">H", f[2]), s(""))]
    if ty == ERROR:
        raise ProtocolError(f"gateway reported an error: {f[1]}")
    if ty == HELLO:
        raise ProtocolError("second hello")
    return []  # pong, gone


async def read_frame(reader):
    head = await asyncio.wait_for(reader.readexactly(5), IDLE_DROP_S)
    length, ty = struct.unpack(">IB", head)
    if length == 0:
        raise ProtocolError("frame length 0")
    # Checked before reading the body: a hostile length costs nothing.
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
    check_type(ty)
    body = await asyncio.wait_for(reader.readexactly(length - 1), IDLE_DROP_S)
    return parse(ty, body)


async def serve_link(reader, writer):
    peer = writer.get_extra_info("peername") or "unix"
    log(f"link from {peer}")
    try:
        first = await read_frame(reader)
        if first[0] != HELLO:
            raise ProtocolError("first frame is not hello")
        log(f"gateway {first[1]!r} speaks version {VERSION}")
        writer.write(frame(HELLO, MAGIC, struct.pack(">H", VERSION), s(NAME)))
        while True:
            f = await read_frame(reader)
            out = answer(f)
            if out:
                writer.writelines(out)
                await writer.drain()
    except ProtocolError as e:
        log(f"link from {peer}: protocol error: {e}; dropping it")
        try:
            writer.write(frame(ERROR, s(str(e))))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
    except asyncio.IncompleteReadError:
        log(f"link from {peer} closed")
    except asyncio.TimeoutError:
        log(f"link from {peer} silent for {IDLE_DROP_S:.0f} s; dropping it")
    except (ConnectionError, OSError) as e:
        log(f"link from {peer}: {e}")
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT or unix:PATH")
    args = ap.parse_args()
    if args.listen.startswith("unix:"):
        path = args.listen[len("unix:") :]
        if os.path.exists(path):
            os.unlink(path)
        server = await asyncio.start_unix_server(serve_link, path)
        where = f"unix:{path}"
    else:
        host, _, port = args.listen.rpartition(":")
        server = await asyncio.start_server(serve_link, host.strip("[]"), int(port))
        addr = server.sockets[0].getsockname()
        where = f"{addr[0]}:{addr[1]}"
    print(f"listening on {where}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
