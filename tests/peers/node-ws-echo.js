// Node `ws` (an independent RFC 7692 implementation) against the gateway's echo: offers
// permessage-deflate, compresses every message it sends (threshold 0), echoes text and
// binary of every size in harness.SIZES plus multi-byte UTF-8 text, and checks each echo
// is byte-identical. Usage: node node-ws-echo.js ws://127.0.0.1:PORT/ [deadline-ms]
'use strict';

const WebSocket = require('ws');
const { run, onCleanup, randomBytes, jsonText, SIZES } = require('./harness');

const url = process.argv[2];
const deadline = Number(process.argv[3] || 60000);

function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {
      perMessageDeflate: { threshold: 0, clientMaxWindowBits: true },
      maxPayload: 4 << 20,
      handshakeTimeout: 10000,
    });
    onCleanup(() => ws.terminate());
    let offered = null;
    ws.once('upgrade', (res) => {
      offered = res.headers['sec-websocket-extensions'] || null;
    });
    ws.once('open', () => resolve({ ws, answered: offered }));
    ws.once('error', reject);
  });
}

function echo(ws, payload, binary) {
  return new Promise((resolve, reject) => {
    const onMessage = (data, isBinary) => {
      ws.off('close', onClose);
      resolve({ data: Buffer.isBuffer(data) ? data : Buffer.concat(data), isBinary });
    };
    const onClose = (code, reason) => reject(new Error(`closed ${code} ${reason}`));
    ws.once('message', onMessage);
    ws.once('close', onClose);
    ws.send(payload, { binary, compress: true }, (err) => err && reject(err));
  });
}

run(async () => {
  const { ws, answered } = await open(url);
  const cases = [];
  for (const n of SIZES) {
    cases.push({ name: `text ${n}`, payload: Buffer.from(jsonText(n, n)), binary: false });
    cases.push({ name: `binary ${n}`, payload: randomBytes(n, n + 1), binary: true });
  }
  const utf8 = Buffer.from('ünïcødé €𝄞 '.repeat(400));
  cases.push({ name: `utf-8 text ${utf8.length}`, payload: utf8, binary: false });
  let bytes = 0;
  let big = 0;
  let bytesBig = 0;
  for (const c of cases) {
    const got = await echo(ws, c.binary ? c.payload : c.payload.toString('utf8'), c.binary);
    if (got.isBinary !== c.binary) throw new Error(`${c.name}: echoed as binary=${got.isBinary}`);
    if (!got.data.equals(c.payload)) {
      throw new Error(`${c.name}: echo differs (${got.data.length} bytes back)`);
    }
    bytes += c.payload.length;
    if (c.payload.length >= 256) {
      big++;
      bytesBig += c.payload.length;
    }
  }
  const negotiated = ws.extensions;
  ws.close(1000);
  return { extension: answered, negotiated, messages: cases.length, big, bytes, bytes_big: bytesBig };
}, deadline);
