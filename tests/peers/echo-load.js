// Load client for benches/deflate-compare.sh: C connections (Node `ws`), each with at most one
// message in flight, sending 4 KiB JSON-like text (64 variants) at a fixed total rate, with
// permessage-deflate offered and used for every message (threshold 0) or not offered. Over the
// measured window it reads the server's CPU time (all its threads' schedstat, ns) and
// counts echoes (each checked byte for byte).
// Usage: node echo-load.js URL SERVER_PID --deflate 0|1 [--connections 50] [--rate 4000]
//        [--size 4096] [--warmup 2] [--duration 8]   (seconds)
'use strict';

const fs = require('fs');
const WebSocket = require('ws');
const { run, onCleanup, jsonText } = require('./harness');

const [url, pidArg, ...rest] = process.argv.slice(2);
const opt = { deflate: 1, connections: 50, rate: 4000, size: 4096, warmup: 2, duration: 8 };
for (let i = 0; i < rest.length; i += 2) opt[rest[i].replace(/^--/, '')] = Number(rest[i + 1]);
const pid = Number(pidArg);

/** CPU time of every thread of `pid`, in ns (first field of each task's schedstat). */
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

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

run(async () => {
  const payloads = [];
  for (let i = 0; i < 64; i++) payloads.push(Buffer.from(jsonText(opt.size, i * 1000)));
  const conns = await Promise.all(
    Array.from({ length: opt.connections }, () => new Promise((resolve, reject) => {
      const ws = new WebSocket(url, {
        perMessageDeflate: opt.deflate ? { threshold: 0 } : false,
        handshakeTimeout: 10000,
      });
      onCleanup(() => ws.terminate());
      ws.once('open', () => resolve(ws));
      ws.once('error', reject);
    })),
  );
  const extension = conns[0].extensions || '';
  if (Boolean(opt.deflate) !== extension.startsWith('permessage-deflate')) {
    throw new Error(`deflate=${opt.deflate} but the server answered '${extension}'`);
  }
  let stopping = false;
  let echoed = 0;
  let sent = 0;
  const idle = [];
  for (const ws of conns) {
    ws.inflight = null;
    ws.on('message', (data) => {
      if (!data.equals(ws.inflight)) throw new Error('echo differs');
      ws.inflight = null;
      echoed++;
      idle.push(ws);
      pump();
    });
    ws.on('close', (code) => {
      if (!stopping) throw new Error(`closed ${code}`);
    });
    idle.push(ws);
  }
  // Fixed rate: every 5 ms, the messages due since the start go to idle connections.
  // (and as each echo frees its connection).
  const t0 = process.hrtime.bigint();
  function pump() {
    if (stopping) return;
    const due = Math.floor((Number(process.hrtime.bigint() - t0) / 1e9) * opt.rate);
    while (sent < due && idle.length) {
      const ws = idle.pop();
      ws.inflight = payloads[sent % payloads.length];
      ws.send(ws.inflight, { binary: false });
      sent++;
    }
  }
  const tick = setInterval(pump, 5);
  onCleanup(() => clearInterval(tick));
  await sleep(opt.warmup * 1000);
  const [c0, m0, w0] = [serverCpuNs(), echoed, process.hrtime.bigint()];
  await sleep(opt.duration * 1000);
  const [c1, m1, w1] = [serverCpuNs(), echoed, process.hrtime.bigint()];
  stopping = true;
  clearInterval(tick);
  const secs = Number(w1 - w0) / 1e9;
  const msgs = m1 - m0;
  return {
    deflate: Boolean(opt.deflate),
    extension,
    connections: opt.connections,
    size: opt.size,
    target_rate: opt.rate,
    msgs_per_sec: msgs / secs,
    messages: msgs,
    server_cpu_us_per_msg: (c1 - c0) / 1e3 / msgs,
    server_cpu_share: (c1 - c0) / 1e9 / secs,
    behind: sent - Math.floor((Number(w1 - t0) / 1e9) * opt.rate),
  };
}, (opt.warmup + opt.duration + 30) * 1000);
