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

const { run, clientFrame, wsConnect } = require('./harness');

const opt = { subs: '', pub: '', connections: 10000, publishes: 20, rate: 10, duration: 5 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const k = argv[i].replace(/^--/, '');
  opt[k] = typeof opt[k] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
}

/** One connection to `addr`'s chat: handshake, then each whole server frame's payload to `onFrame`. */
function connect(addr, onFrame) {
  return wsConnect(addr, '/chat', '', (_rsv1, payload) => onFrame(payload)).then((r) => r.sock);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function pct(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : null;
}

run(async () => {
  const subs = opt.subs.split(',');
  const join = clientFrame(1, Buffer.from('{"action":"join","room":"bench"}'));
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
    pub.write(clientFrame(1, Buffer.from(`{"action":"say","room":"bench","text":"${n}"}`)));
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
