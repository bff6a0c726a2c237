// Broadcast load for benches/deflate-compare.sh: C subscribers on raw sockets (a hand-written
// RFC 6455 client, so 10,000 of them are cheap: nothing is inflated but one check per
// publish) join one room of the embedded chat, offering permessage-deflate or not; one plain
// publisher (also a member) says a ~4 KiB JSON-like text P times, each time waiting until
// every subscriber has the frame. Reports the compress calls per publish from /metrics
// (ringway_deflate_messages_total{result="compressed"}, per core), the bytes on the wire per
// publish (frame headers + payloads, all subscribers), the server's CPU per publish, and
// checks that a compressed frame inflates to the publisher's plain copy.
// Usage: node fanout.js HOST:PORT ADMIN_HOST:PORT SERVER_PID --deflate 0|1
//        [--connections 10000] [--publishes 20] [--size 4096]
'use strict';

const fs = require('fs');
const http = require('http');
const zlib = require('zlib');
const { run, jsonText, clientFrame, wsConnect } = require('./harness');

const [addr, admin, pidArg, ...rest] = process.argv.slice(2);
const opt = { deflate: 1, connections: 10000, publishes: 20, size: 4096 };
for (let i = 0; i < rest.length; i += 2) opt[rest[i].replace(/^--/, '')] = Number(rest[i + 1]);
const [host, port] = addr.split(':');
const pid = Number(pidArg);
const OFFER = 'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n';

function serverCpuNs() {
  let ns = 0;
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch (_) {
      // a thread that just ended
    }
  }
  return ns;
}

function metrics() {
  return new Promise((resolve, reject) => {
    http
      .get(`http://${admin}/metrics`, (res) => {
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => resolve(body));
      })
      .on('error', reject);
  });
}

/** Per core, the `result="compressed"` sample of ringway_deflate_messages_total. */
async function compressedPerCore() {
  const out = {};
  for (const line of (await metrics()).split('\n')) {
    const m = /^ringway_deflate_messages_total\{core="(\d+)",result="compressed"\} (\d+)/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

/** One connection: handshake, then whole server frames to `onFrame(rsv1, payload, wireBytes)`. */
function connect(deflate, onFrame) {
  return wsConnect(addr, '/', deflate ? OFFER : '', onFrame);
}

run(async () => {
  const join = clientFrame(1, Buffer.from('{"action":"join","room":"bench"}'));
  let joined = 0;
  let got = 0;
  let wire = 0;
  let rsv1 = 0;
  let sample = null;
  const subs = [];
  const extensions = new Set();
  for (let i = 0; i < opt.connections; i += 500) {
    const batch = [];
    for (let j = i; j < Math.min(opt.connections, i + 500); j++) {
      let first = true;
      batch.push(connect(opt.deflate, (z, payload, bytes) => {
        if (first) {
          first = false;
          joined++;
          return;
        }
        got++;
        wire += bytes;
        if (z) {
          rsv1++;
          if (!sample) sample = Buffer.from(payload);
        }
      }).then((c) => {
        extensions.add(c.extension);
        c.sock.write(join);
        subs.push(c.sock);
      }));
    }
    await Promise.all(batch);
  }
  let plain = null;
  const pub = await connect(false, (z, payload) => {
    plain = Buffer.from(payload);
  });
  pub.sock.write(join);
  while (joined < opt.connections || plain === null) await new Promise((r) => setTimeout(r, 10));
  // Quotes as apostrophes, so the text needs no escaping and the said message is ~size bytes.
  const text = jsonText(opt.size - 80, 7).replace(/"/g, "'");
  const say = clientFrame(1, Buffer.from(JSON.stringify({ action: 'say', room: 'bench', text })));
  const before = await compressedPerCore();
  const cpu0 = serverCpuNs();
  const t0 = process.hrtime.bigint();
  for (let p = 1; p <= opt.publishes; p++) {
    plain = null;
    pub.sock.write(say);
    const limit = Date.now() + 30000;
    while (got < p * opt.connections || plain === null) {
      if (Date.now() > limit) throw new Error(`publish ${p}: ${got - (p - 1) * opt.connections} of ${opt.connections} delivered in 30 s`);
      await new Promise((r) => setImmediate(r));
    }
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu1 = serverCpuNs();
  const after = await compressedPerCore();
  const perCore = {};
  let calls = 0;
  for (const core of Object.keys(after)) {
    perCore[core] = (after[core] - (before[core] || 0)) / opt.publishes;
    calls += after[core] - (before[core] || 0);
  }
  if (sample) {
    const inflated = zlib.inflateRawSync(Buffer.concat([sample, Buffer.from([0, 0, 0xff, 0xff])]), {
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
    });
    if (!inflated.equals(plain)) throw new Error('a compressed frame does not inflate to the plain one');
  }
  return {
    deflate: Boolean(opt.deflate),
    extensions: [...extensions],
    subscribers: opt.connections,
    publishes: opt.publishes,
    payload_bytes: plain.length,
    compressed_frames: rsv1,
    compress_calls_per_publish: calls / opt.publishes,
    compress_calls_per_publish_by_core: perCore,
    wire_bytes_per_publish: wire / opt.publishes,
    wire_bytes_per_subscriber: wire / opt.publishes / opt.connections,
    server_cpu_ms_per_publish: (cpu1 - cpu0) / 1e6 / opt.publishes,
    wall_ms_per_publish: (secs * 1000) / opt.publishes,
  };
}, 240000);
