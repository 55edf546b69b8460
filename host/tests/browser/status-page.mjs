// The status page in a real browser: Debian's Chromium, headless, driven by
// Playwright, against real `lichen serve` hosts that host/tests/it/status_page.rs
// started. Each step says what it checks; the first failure ends the run
// with a non-zero exit and the page's text at that moment.
//
// Environment: LICHEN_URL (the host whose page is opened), LICHEN_TOKEN (its
// admin token), LICHEN_POLICIES (its policy directory), LICHEN_FUNCTIONS
// (comma-separated names deployed on it), LICHEN_PEER (the node id of its
// peer), LICHEN_PEER_PID (the peer's process, killed near the end),
// LICHEN_SCREENSHOT (where to save the screenshot), CHROMIUM (the browser,
// /usr/bin/chromium by default).
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env('LICHEN_URL');
const token = env('LICHEN_TOKEN');
const policies = env('LICHEN_POLICIES');
const functions = env('LICHEN_FUNCTIONS').split(',');
const peer = env('LICHEN_PEER');
const peerPid = Number(env('LICHEN_PEER_PID'));
const screenshot = env('LICHEN_SCREENSHOT');

// How long the page may take to show a change: a refresh is every 2 s; the
// rest is margin for a loaded machine (the test waits, it does not time).
const SHOWN_WITHIN_MS = 60_000;

function step(what) {
  console.log(`status page: ${what}`);
}

// Polls `read` until `check` accepts its value; fails with the last value.
async function eventually(what, read, check) {
  const deadline = Date.now() + SHOWN_WITHIN_MS;
  let last;
  for (;;) {
    last = await read();
    if (check(last)) return last;
    if (Date.now() > deadline) {
      throw new Error(`${what}: not shown within ${SHOWN_WITHIN_MS} ms; last seen ${JSON.stringify(last)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--no-first-run',
    '--disable-sync',
    '--disable-quic',
  ],
});
const context = await browser.newContext({ viewport: { width: 1500, height: 1100 } });
const page = await context.newPage();
// Anything the page logs as an error (but the wrong token's refusal), a
// script that throws, or a request the CSP blocks is a failure.
const problems = [];
page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
page.on('console', (message) => {
  if (message.type() === 'error' && !/status of 40[13]/.test(message.text())) {
    problems.push(`console: ${message.text()}`);
  }
});

const cell = (fn, col) => page.locator(`#functions tr[data-function="${fn}"] td[data-col="${col}"]`);
const text = (locator) => locator.textContent({ timeout: SHOWN_WITHIN_MS });

try {
  step('the page asks for the token and shows nothing else');
  await page.goto(`${url}/ui`);
  await page.locator('#prompt').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#dashboard').isVisible(), false);
  assert.equal(await page.locator('#functions tbody tr').count(), 0);

  step('a wrong token is refused and not kept');
  await page.fill('#token', 'not-the-token');
  await page.click('#token-form button[type=submit]');
  await eventually('the refusal', () => page.locator('#prompt-error').textContent(), (t) => /refused/.test(t));
  assert.equal(await page.locator('#dashboard').isVisible(), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);

  step('with the token, the table lists the deployed functions');
  await page.fill('#token', token);
  await page.click('#token-form button[type=submit]');
  await page.locator('#dashboard').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#prompt').isVisible(), false);
  const listed = await eventually(
    'every deployed function',
    () => page.locator('#functions tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.function)),
    (names) => functions.every((f) => names.includes(f)),
  );
  assert.deepEqual([...listed].sort(), [...functions].sort());
  assert.equal(await text(cell('hello', 'requests')), '0');

  step('50 calls to hello show as 50 requests at a rate above zero, without reloading');
  for (let i = 0; i < 50; i += 1) {
    const response = await fetch(`${url}/fn/hello`);
    assert.equal(response.status, 200, `call ${i} to hello`);
    await response.arrayBuffer();
  }
  await eventually('hello\'s 50 requests', () => text(cell('hello', 'requests')), (t) => t === '50');
  const rate = Number(await text(cell('hello', 'rate')));
  assert.ok(rate > 0, `hello's rate is ${rate}`);
  assert.notEqual(await text(cell('hello', 'p50')), '–');

  step('a trap shows in the trap column');
  assert.equal(await text(cell('trap', 'traps')), '0');
  const trapped = await fetch(`${url}/fn/trap/panic`);
  assert.equal(trapped.status, 500);
  await eventually('the trap', () => text(cell('trap', 'traps')), (t) => t === '1');

  step('the detail shows the policy in force, then a broken policy\'s error');
  await page.locator('#functions tr[data-function="hello"] td[data-col="name"] button').click();
  await page.locator('#detail').waitFor({ state: 'visible' });
  await eventually('hello\'s policy', () => page.locator('#policy').textContent(), (t) => /GREETING = "from the status page test"/.test(t));
  assert.equal(await page.locator('#policy-error').isVisible(), false);
  await eventually('hello\'s invocations', () => page.locator('#invocations tbody tr').count(), (n) => n === 50);
  await writeFile(path.join(policies, 'hello.toml'), '[limits]\nmemory = "a lot"\n');
  const error = await eventually('the policy error', () => page.locator('#policy-error').textContent(), (t) => /memory/.test(t));
  assert.match(error, /last good policy stays in force/);
  assert.equal(await page.locator('#policy-error').evaluate((e) => getComputedStyle(e).color), 'rgb(179, 38, 30)');
  // The last good policy is still what runs.
  assert.match(await page.locator('#policy').textContent(), /GREETING/);

  step('a cron trigger shows its schedule, its next tick and a run here');
  const trigger = (col) => page.locator(`#triggers-table tr[data-function="ticker"] td[data-col="${col}"]`);
  await page.locator('#triggers').waitFor({ state: 'visible' });
  assert.match(await text(trigger('schedule')), /^\* \* \* \* \* \* \(UTC\)$/);
  assert.match(await text(trigger('next')), /^\d{4}-\d\d-\d\dT/);
  await eventually('a tick run here', () => text(trigger('status')), (t) => t === '200');
  assert.match(await text(trigger('last')), /^\d{4}-\d\d-\d\dT.* on edge-a$/);
  // Only the function with a trigger has a row.
  assert.equal(await page.locator('#triggers-table tbody tr').count(), 1);

  step('the cluster lists the peer, alive');
  const peerRow = page.locator(`#peers tr[data-peer="${peer}"]`);
  await eventually('the peer', () => peerRow.count(), (n) => n === 1);
  assert.equal(await text(peerRow.locator('td[data-col="alive"]')), 'alive');
  assert.match(await text(peerRow.locator('td[data-col="api"]')), /^http:\/\/127\.0\.0\.1:\d+$/);
  // Its clock, as gossip measured it: the same machine's, so near zero.
  const offset = await eventually('the clock offset', () => text(peerRow.locator('td[data-col="clock"]')), (t) => /ms$/.test(t));
  assert.ok(Math.abs(parseInt(offset, 10)) < 10000, offset);

  step(`screenshot to ${screenshot}`);
  await page.screenshot({ path: screenshot, fullPage: true });

  step('a peer that dies shows as dead');
  process.kill(peerPid, 'SIGKILL');
  await eventually('the dead peer', () => text(peerRow.locator('td[data-col="alive"]')), (t) => t === 'dead');

  step('a reload keeps the token for this tab; forgetting it brings the prompt back');
  await page.reload();
  await page.locator('#dashboard').waitFor({ state: 'visible' });
  await page.click('#sign-out');
  await page.locator('#prompt').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#dashboard').isVisible(), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);

  assert.deepEqual(problems, [], 'the page logged errors');
  step('all checks passed');
} catch (error) {
  console.error(`status page: FAILED: ${error.stack || error}`);
  console.error(`problems the page logged: ${JSON.stringify(problems)}`);
  console.error(`page text:\n${await page.locator('body').innerText().catch(() => '(none)')}`);
  await page.screenshot({ path: `${screenshot}.failed.png`, fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
