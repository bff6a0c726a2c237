// Small harness for tests that drive independent WebSocket peers against a running gateway:
// a hard deadline that kills everything, a page served over HTTP from 127.0.0.1, and the
// Debian `chromium` launched headless through playwright-core (no browser download).
//
// Used by tests/deflate_peers.rs (through node-ws-echo.js and chromium-echo.js); meant to be
// reused by other browser tests (a demo-page test). Each script prints one JSON line on
// stdout: {"ok": true, ...} on success, {"ok": false, "error": "..."} on failure (exit 1),
// and exits 124 when the deadline passes. A browser test is, in full:
//
//   const { run, servePage, launchChromium } = require('./harness');
//   run(async () => {
//     const origin = await servePage({ '/': '<!doctype html><script>...</script>' });
//     const page = await (await launchChromium()).newPage();
//     await page.goto(origin + '/');
//     return { title: await page.title() };   // merged into the {"ok": true} line
//   }, 60000);
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const net = require('net');

const cleanups = [];

/** Registers `fn` to run (once, best effort) when the script ends or the deadline fires. */
function onCleanup(fn) {
  cleanups.push(fn);
}

async function cleanup() {
  while (cleanups.length) {
    const fn = cleanups.pop();
    try {
      await fn();
    } catch (_) {
      // best effort: the process is ending anyway
    }
  }
}

/** Prints the one result line. */
function report(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

/**
 * Runs `main()` under a deadline of `ms` milliseconds. On time-out every registered
 * cleanup gets 2 s, then any launched browser is SIGKILLed and the process exits 124.
 */
async function run(main, ms) {
  const timer = setTimeout(() => {
    report({ ok: false, error: `deadline of ${ms} ms passed` });
    const hard = setTimeout(() => {
      killBrowsers();
      process.exit(124);
    }, 2000);
    hard.unref();
    cleanup().finally(() => {
      killBrowsers();
      process.exit(124);
    });
  }, ms);
  try {
    const result = await main();
    clearTimeout(timer);
    await cleanup();
    report({ ok: true, ...result });
    process.exit(0);
  } catch (e) {
    clearTimeout(timer);
    report({ ok: false, error: String((e && e.stack) || e) });
    await cleanup();
    killBrowsers();
    process.exit(1);
  }
}

/**
 * Serves `routes` ({"/path": {type, body}} or {"/path": "html string"}) on 127.0.0.1 at a
 * free port; resolves to its origin ("http://127.0.0.1:PORT"). Closed at cleanup.
 */
async function servePage(routes) {
  const server = http.createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    let r = routes[path];
    if (r === undefined) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
      return;
    }
    if (typeof r === 'string') r = { type: 'text/html; charset=utf-8', body: r };
    res.writeHead(200, { 'content-type': r.type, 'cache-control': 'no-store' });
    res.end(r.body);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  onCleanup(() => new Promise((resolve) => server.close(resolve)));
  // Run first (cleanups run last-in first-out): close() waits for kept-alive connections.
  onCleanup(() => server.closeAllConnections());
  return `http://127.0.0.1:${server.address().port}`;
}

/**
 * SIGKILLs this process's own child processes (the browser Playwright spawned; its helper
 * processes exit with it), found in /proc/self/task/TID/children: nothing else is touched.
 */
function killBrowsers() {
  let tasks = [];
  try {
    tasks = fs.readdirSync('/proc/self/task');
  } catch (_) {
    return;
  }
  for (const tid of tasks) {
    let children = '';
    try {
      children = fs.readFileSync(`/proc/self/task/${tid}/children`, 'utf8');
    } catch (_) {
      continue;
    }
    for (const pid of children.split(' ').filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch (_) {
        // already gone
      }
    }
  }
}

/**
 * Launches headless Chromium (`$CHROMIUM` or /usr/bin/chromium). playwright-core passes
 * `--no-sandbox` unless asked for the sandbox (`chromiumSandbox`), which matters here: the
 * tests run as root, and Chromium refuses its sandbox as root.
 */
async function launchChromium(extraArgs = []) {
  const { chromium } = require('playwright-core');
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    chromiumSandbox: false,
    timeout: 30000,
    // The machine's network is closed: no background, update or sync traffic to be refused.
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      ...extraArgs,
    ],
  });
  onCleanup(() => browser.close());
  return browser;
}

/** Deterministic pseudo-random bytes (xorshift32), so a failing case is reproducible. */
function randomBytes(n, seed) {
  const out = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/** JSON-like text of exactly `n` bytes (ASCII), compressible like chat or ticker payloads. */
function jsonText(n, seed) {
  let s = '';
  let i = seed;
  while (s.length < n) {
    s += `{"id":${i},"user":"name${i % 97}","online":${i % 3 === 0},"score":${(i * 7919) % 10007}},`;
    i++;
  }
  return s.slice(0, n);
}

/** A masked client frame (RFC 6455 §5.2). */
function clientFrame(opcode, payload) {
  const mask = crypto.randomBytes(4);
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x80 | opcode, 0x80 | n])
    : n < 65536 ? Buffer.from([0x80 | opcode, 0x80 | 126, n >> 8, n & 0xff])
      : null;
  if (!head) throw new Error('frame too large for this client');
  const body = Buffer.alloc(n);
  for (let i = 0; i < n; i++) body[i] = payload[i] ^ mask[i & 3];
  return Buffer.concat([head, mask, body]);
}

/**
 * One raw WebSocket connection to `addr` ("host:port") for `path`, with `extraHeaders`
 * (CRLF-terminated lines) in the upgrade: resolves to `{ sock, extension }` after the 101,
 * then hands every whole server frame to `onFrame(rsv1, payload, wireBytes)`.
 */
function wsConnect(addr, path, extraHeaders, onFrame) {
  const [host, port] = addr.split(':');
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host, port: Number(port) });
    onCleanup(() => sock.destroy());
    sock.setNoDelay(true);
    let buf = Buffer.alloc(0);
    let open = false;
    sock.on('error', reject);
    sock.on('connect', () => {
      sock.write(`GET ${path} HTTP/1.1\r\nHost: ${addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n` +
        `${extraHeaders}\r\n`);
    });
    sock.on('data', (d) => {
      buf = buf.length ? Buffer.concat([buf, d]) : d;
      if (!open) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        const head = buf.subarray(0, end).toString('latin1');
        buf = buf.subarray(end + 4);
        if (!head.startsWith('HTTP/1.1 101')) return reject(new Error(head.split('\r\n')[0]));
        const ext = /\r\nsec-websocket-extensions: *([^\r]*)/i.exec(head);
        open = true;
        resolve({ sock, extension: ext ? ext[1] : '' });
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
        onFrame((buf[0] & 0x40) !== 0, buf.subarray(at, at + len), at + len);
        buf = buf.subarray(at + len);
      }
    });
  });
}

/** The message sizes every peer echoes: 0 B to 1 MiB, around compression_min_bytes (256). */
const SIZES = [0, 1, 100, 255, 256, 257, 1000, 4096, 65536, 300000, 1 << 20];

module.exports = {
  run, onCleanup, servePage, launchChromium, randomBytes, jsonText, SIZES, clientFrame, wsConnect,
};
