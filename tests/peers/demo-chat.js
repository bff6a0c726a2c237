// The demo page a plain `ringway` serves at GET / (src/session/demo_page.html), in a real
// browser: two headless Chromium pages (separate contexts, so two independent visitors)
// load it from the gateway itself, join one room, each sends a line, and both lines must
// appear in both pages' logs. Then a screenshot of the first page.
// Usage: node demo-chat.js http(s)://127.0.0.1:PORT/ [deadline-ms] [screenshot.png]
'use strict';

const { run, launchChromium } = require('./harness');

const url = process.argv[2];
const deadline = Number(process.argv[3] || 60000);
const screenshot = process.argv[4] || null;

const LOG = '[data-testid=log]';

/** Waits until the page's log shows `text` in some line. */
function logShows(page, text) {
  return page.waitForFunction(
    ([sel, t]) => Array.from(document.querySelector(sel).children).some((li) => li.textContent.includes(t)),
    [LOG, text],
    { timeout: 15000 },
  );
}

run(async () => {
  // Over https://, the test's certificate comes from a CA made in the test: the browser
  // skips only the trust decision; the page must then connect back over wss://.
  const browser = await launchChromium(url.startsWith('https:') ? ['--ignore-certificate-errors'] : []);
  const room = 'demo-' + process.pid;
  const pages = [];
  const consoleErrors = [];
  for (let i = 0; i < 2; i++) {
    const page = await (await browser.newContext()).newPage();
    page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
    page.on('pageerror', (e) => consoleErrors.push(String(e)));
    const response = await page.goto(url);
    if (response.status() !== 200) throw new Error('GET ' + url + ': ' + response.status());
    pages.push(page);
  }
  for (const page of pages) {
    // The join button is enabled once the page's WebSocket is open.
    await page.waitForSelector('[data-testid=join]:not([disabled])', { timeout: 15000 });
    await page.fill('[data-testid=room]', room);
    await page.click('[data-testid=join]');
    await logShows(page, 'joined ' + room);
  }
  const lines = ['hello from the first page', 'and from the second: ünïcødé €'];
  for (let i = 0; i < 2; i++) {
    await pages[i].fill('[data-testid=text]', lines[i]);
    await pages[i].click('[data-testid=send]');
  }
  for (const page of pages) {
    for (const line of lines) await logShows(page, line);
  }
  if (screenshot) await pages[0].screenshot({ path: screenshot, fullPage: true });
  const logs = [];
  for (const page of pages) {
    logs.push(await page.$eval(LOG, (e) => Array.from(e.children).map((li) => li.textContent)));
  }
  if (consoleErrors.length) throw new Error('console errors: ' + consoleErrors.join(' | '));
  const status = await pages[0].$eval('[data-testid=status]', (e) => e.textContent);
  return { room, lines, logs, status, title: await pages[0].title(), screenshot };
}, deadline);
