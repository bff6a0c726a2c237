// Cross-node fan-out load for benches/cluster.sh: C subscribers on raw sockets (a small
// RFC 6455 client, as fanout.js) spread round-robin over the gateways in --subs join one room
// of the embedded chat; one publisher on --pub says into it. Two phases:
//  1. closed loop: P says, each waiting until every subscriber has it: publishes/s and
//     deliveries/s at saturation;
//  2. open loop at --rate says/s for --duration s: deliveries/s and the latency from each
//     say to each subscriber's receipt (p50, p99, max); each say's send time is kept here,
//     its number travels in the text.
// Every delivery is counted; missing or duplicate ones are reported.
// Usage: node cluster-fanout.js --subs H:P[,H:P] --pub H:P [--connections 10000]
//        [--publishes 20] [--rate 10] [--duration 5]
'use strict';

const net = require('net');
const crypto = require('crypto');
const { run, onCleanup } = require('./harness');

const opt = { subs: '', pub: '', connections: 10000, publishes: 20, rate: 10, duration: 5 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const k = argv[i].replace(/^--/, '');
  opt[k] = typeof opt[k] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
}

function clientFrame(payload) {
  const mask = crypto.randomBytes(4);
  const n = payload.length;
  if (n >= 126) throw new Error('frame too large for this client');
  const body = Buffer.alloc(n);
  for (let i = 0; i < n; i++) body[i] = payload[i] ^ mask[i & 3];
  return Buffer.concat([Buffer.from([0x81, 0x80 | n]), mask, body]);
}

/** One connection to `addr`: handshake, then each whole server frame's payload to `onFrame`. */
function connect(addr, onFrame) {
  const [host, port] = addr.split(':');
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host, port: Number(port) });
    onCleanup(() => sock.destroy());
    sock.setNoDelay(true);
    let buf = Buffer.alloc(0);
    let open = false;
    sock.on('error', reject);
    sock.on('connect', () => {
      sock.write(`GET /chat HTTP/1.1\r\nHost: ${addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n');
    });
    sock.on('data', (d) => {
      buf = buf.length ? Buffer.concat([buf, d]) : d;
      if (!open) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        const head = buf.subarray(0, end).toString('latin1');
        buf = buf.subarray(end + 4);
        if (!head.startsWith('HTTP/1.1 101')) return reject(new Error(head.split('\r\n')[0]));
        open = true;
        resolve(sock);
      }
      for (;;) {
        if (buf.length < 2) return;
        let len = buf[1] & 0x7f;
        let at = 2;
        if (len === 126) {
          if (buf.length < 4) return;
          len = buf.readUInt16BE(2);
          at = 4;
        } else if (len === 127) {
          if (buf.length < 10) return;
          len = Number(buf.readBigUInt64BE(2));
          at = 10;
        }
        if (buf.length < at + len) return;
        onFrame(buf.subarray(at, at + len));
        buf = buf.subarray(at + len);
      }
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function pct(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : null;
}

run(async () => {
  const subs = opt.subs.split(',');
  const join = clientFrame(Buffer.from('{"action":"join","room":"bench"}'));
  const sentAt = new Map(); // say number -> hrtime ns
  const seen = new Map(); // say number -> deliveries
  const lat = [];
  let joined = 0;
  let got = 0;
  const onSaid = (payload) => {
    const m = /"text":"(\d+)"/.exec(payload.toString('latin1'));
    if (!m) {
      joined++;
      return;
    }
    const n = Number(m[1]);
    got++;
    seen.set(n, (seen.get(n) || 0) + 1);
    const t = sentAt.get(n);
    if (t !== undefined && n >= 1e6) lat.push(Number(process.hrtime.bigint() - t) / 1e3);
  };
  for (let i = 0; i < opt.connections; i += 500) {
    const batch = [];
    for (let j = i; j < Math.min(opt.connections, i + 500); j++) {
      batch.push(connect(subs[j % subs.length], onSaid).then((s) => s.write(join)));
    }
    await Promise.all(batch);
  }
  const pub = await connect(opt.pub, () => {});
  while (joined < opt.connections) await sleep(10);
  await sleep(1500); // interest travels core -> relay -> NATS asynchronously
  const say = (n) => {
    sentAt.set(n, process.hrtime.bigint());
    pub.write(clientFrame(Buffer.from(`{"action":"say","room":"bench","text":"${n}"}`)));
  };
  // 1. closed loop
  const t0 = process.hrtime.bigint();
  for (let p = 1; p <= opt.publishes; p++) {
    say(p);
    const limit = Date.now() + 30000;
    while ((seen.get(p) || 0) < opt.connections) {
      if (Date.now() > limit) throw new Error(`say ${p}: ${seen.get(p) || 0} of ${opt.connections} in 30 s`);
      await new Promise((r) => setImmediate(r));
    }
  }
  const closedSecs = Number(process.hrtime.bigint() - t0) / 1e9;
  // 2. open loop at a fixed rate; numbers from 1e6 on
  const total = Math.round(opt.rate * opt.duration);
  const gotBefore = got;
  const t1 = Date.now();
  for (let k = 0; k < total; k++) {
    const due = t1 + (k * 1000) / opt.rate;
    while (Date.now() < due) await sleep(Math.max(0, Math.min(5, due - Date.now())));
    say(1e6 + k);
  }
  const limit = Date.now() + 10000;
  while (got - gotBefore < total * opt.connections && Date.now() < limit) await sleep(20);
  const openSecs = (Date.now() - t1) / 1000;
  await sleep(500);
  let missing = 0;
  let dup = 0;
  for (let k = 0; k < total; k++) {
    const c = seen.get(1e6 + k) || 0;
    if (c < opt.connections) missing += opt.connections - c;
    if (c > opt.connections) dup += c - opt.connections;
  }
  lat.sort((a, b) => a - b);
  return {
    subscribers: opt.connections,
    nodes: subs.length,
    closed_loop: {
      publishes: opt.publishes,
      publishes_per_s: opt.publishes / closedSecs,
      deliveries_per_s: (opt.publishes * opt.connections) / closedSecs,
    },
    fixed_rate: {
      rate: opt.rate,
      publishes: total,
      deliveries_per_s: (got - gotBefore) / openSecs,
      missing,
      duplicates: dup,
      p50_us: pct(lat, 0.5),
      p99_us: pct(lat, 0.99),
      max_us: lat.length ? lat[lat.length - 1] : null,
    },
  };
}, 180000);
