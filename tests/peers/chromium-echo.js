// A real headless Chromium against the gateway's echo: a page served from 127.0.0.1 opens a
// WebSocket (Chromium always offers `permessage-deflate; client_max_window_bits`), echoes
// text and binary of every size in harness.SIZES plus multi-byte UTF-8 text, and checks each
// echo is byte-identical. Usage: node chromium-echo.js ws://127.0.0.1:PORT/ [deadline-ms]
// A wss:// URL is opened with the browser's own TLS stack; the test's certificate comes from
// a CA made in the test, so the browser is told to skip only the trust decision
// (--ignore-certificate-errors): the handshake, ALPN and records are Chromium's.
'use strict';

const { run, servePage, launchChromium, SIZES } = require('./harness');

const url = process.argv[2];
const deadline = Number(process.argv[3] || 90000);

// The page's code: the same deterministic payloads as harness.js (xorshift32 bytes,
// JSON-like text), generated in the browser so nothing large crosses the CDP pipe.
const page = `<!doctype html><meta charset="utf-8"><title>ringway deflate echo</title>
<script>
function randomBytes(n, seed) {
  const out = new Uint8Array(n); let x = (seed >>> 0) || 1;
  for (let i = 0; i < n; i++) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; out[i] = x & 0xff; }
  return out;
}
function jsonText(n, seed) {
  let s = ''; let i = seed;
  while (s.length < n) { s += '{"id":' + i + ',"user":"name' + (i % 97) + '","online":' + (i % 3 === 0) + ',"score":' + ((i * 7919) % 10007) + '},'; i++; }
  return s.slice(0, n);
}
function same(a, b) {
  if (typeof a === 'string') return a === b;
  if (!(b instanceof ArrayBuffer) || a.length !== b.byteLength) return false;
  const v = new Uint8Array(b);
  for (let i = 0; i < a.length; i++) if (a[i] !== v[i]) return false;
  return true;
}
async function runEcho(url, sizes) {
  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error('websocket error before open')); });
  const cases = [];
  for (const n of sizes) {
    cases.push(['text ' + n, jsonText(n, n)]);
    cases.push(['binary ' + n, randomBytes(n, n + 1)]);
  }
  const utf8 = 'ünïcødé €𝄞 '.repeat(400);
  cases.push(['utf-8 text', utf8]);
  let bytes = 0, big = 0, bytesBig = 0;
  for (const [name, payload] of cases) {
    const got = await new Promise((ok, fail) => {
      ws.onmessage = (e) => ok(e.data);
      ws.onclose = (e) => fail(new Error(name + ': closed ' + e.code + ' ' + e.reason));
      ws.send(payload);
    });
    if (!same(payload, got)) throw new Error(name + ': echo differs');
    const len = typeof payload === 'string' ? new TextEncoder().encode(payload).length : payload.length;
    bytes += len;
    if (len >= 256) { big++; bytesBig += len; }
  }
  const negotiated = ws.extensions;
  ws.close(1000);
  return { negotiated, messages: cases.length, big, bytes, bytes_big: bytesBig };
}
</script>`;

run(async () => {
  const origin = await servePage({ '/': page });
  const browser = await launchChromium(url.startsWith('wss:') ? ['--ignore-certificate-errors'] : []);
  const tab = await browser.newPage();
  await tab.goto(origin + '/');
  const result = await tab.evaluate(([u, s]) => runEcho(u, s), [url, SIZES]);
  return { ...result, browser: browser.version(), origin, url };
}, deadline);
