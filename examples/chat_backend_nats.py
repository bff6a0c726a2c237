#!/usr/bin/env python3
"""A chat backend for ringway over NATS (docs/cluster.md, "Backends over NATS").

The same chat contract as examples/chat_backend.py (join/leave/say over topics named
"room:<name>", errors for anything else; `authorize` routes need a non-empty `token` query
parameter), served from a NATS queue group instead of a relay link. Keeps no state per
connection, so any number of instances may share the load and come and go:

    pip install nats-py==2.16.0
    python3 examples/chat_backend_nats.py --nats nats://127.0.0.1:4222 --prefix backends.chat

with an upstream `backends = ["nats://backends.chat"]` on every gateway of the cluster.
Each event arrives on PREFIX.in; every answer goes to `ringway.node.<Ringway-Origin>`, the
node that holds the connection.
"""

import argparse
import asyncio
import base64
import json
import signal
import sys
import urllib.parse

import nats

NAME = "chat_backend_nats.py"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def to_json(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def topic_subject(topic):
    token = base64.urlsafe_b64encode(topic.encode("utf-8")).rstrip(b"=").decode() or "_"
    return "ringway.topic." + token


def header_safe(text):
    """Whether a NATS header carries `text` unchanged (values are trimmed, lines end at CR/LF)."""
    return text == text.strip() and "\r" not in text and "\n" not in text


class Chat:
    def __init__(self, nc):
        self.nc = nc

    async def op(self, origin, conn, op, payload=b"", **headers):
        h = {"Ringway-Op": op, "Ringway-Conn": str(conn)}
        h.update(headers)
        await self.nc.publish(f"ringway.node.{origin}", payload, headers=h)

    async def send_json(self, origin, conn, obj):
        await self.op(origin, conn, "send", to_json(obj), **{"Ringway-Kind": "text"})

    async def publish(self, origin, topic, payload):
        if header_safe(topic):
            h = {"Ringway-Op": "publish", "Ringway-Topic": topic, "Ringway-Kind": "text"}
            await self.nc.publish(f"ringway.node.{origin}", payload, headers=h)
        else:
            # A header cannot carry this name: publish to the topic's own subject instead.
            await self.nc.publish(topic_subject(topic), payload, headers={"Ringway-Kind": "text"})

    async def message(self, origin, conn, kind, data):
        """One client message (the chat contract)."""

        async def error(reason):
            await self.send_json(origin, conn, {"event": "error", "reason": reason})

        if kind != "text":
            return await error("expected a text message")
        try:
            msg = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):  # deep nesting is a RecursionError
            return await error("expected a JSON object")
        if not isinstance(msg, dict):
            return await error("expected a JSON object")
        action = msg.get("action")
        if action not in ("join", "leave", "say"):
            return await error("unknown action")
        room = msg.get("room")
        if not isinstance(room, str) or not room:
            return await error("missing room")
        topic = ("room:" + room).encode("utf-8")
        if action == "join":
            await self.op(origin, conn, "subscribe", topic)
            return await self.send_json(origin, conn, {"event": "joined", "room": room})
        if action == "leave":
            await self.op(origin, conn, "unsubscribe", topic)
            return await self.send_json(origin, conn, {"event": "left", "room": room})
        text = msg.get("text")
        if not isinstance(text, str):
            return await error("missing text")
        said = {"event": "said", "room": room, "text": text, "from": str(conn)}
        await self.publish(origin, "room:" + room, to_json(said))

    async def on_event(self, msg):
        h = msg.headers or {}
        origin, conn, op = h.get("Ringway-Origin"), h.get("Ringway-Conn"), h.get("Ringway-Op")
        if not (origin and origin.isdigit() and conn and conn.isdigit()):
            log(f"event without Ringway-Origin/Ringway-Conn on {msg.subject}; ignored")
            return
        try:
            if op == "open":
                info = json.loads(msg.data)
                if info.get("authorize"):
                    query = info.get("query")
                    params = urllib.parse.parse_qs(query or "")
                    if any(v for v in params.get("token", [])):
                        await self.op(origin, conn, "accept")
                    else:
                        await self.op(origin, conn, "reject", b"token required", **{"Ringway-Code": "401"})
            elif op == "message":
                await self.message(origin, conn, h.get("Ringway-Kind", "text"), msg.data)
            # "close": nothing to forget, room membership lives in the gateway.
        except (ValueError, UnicodeDecodeError) as e:
            log(f"bad {op} event for {conn}: {e}")
        except nats.errors.Error as e:
            log(f"cannot answer {op} for {conn}: {e}")


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL (comma-separated list)")
    ap.add_argument("--prefix", default="backends.chat", help="the upstream's nats://PREFIX")
    ap.add_argument("--queue", default="chat", help="queue group shared by every instance")
    args = ap.parse_args()

    async def on_error(e):
        log(f"NATS: {e}")

    nc = await nats.connect(
        servers=args.nats.split(","),
        name=NAME,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
    )
    chat = Chat(nc)
    subject = f"{args.prefix}.in"
    await nc.subscribe(subject, queue=args.queue, cb=chat.on_event)
    await nc.flush()
    print(f"listening on {subject} (queue {args.queue})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
