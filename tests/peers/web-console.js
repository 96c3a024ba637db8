#!/usr/bin/env node
// web-console.js — a headless Chromium (playwright-core) that the web console tests steer
// one command at a time: each line on stdin is a JSON command, each answer one JSON line on
// stdout. Ops: open {url}, fill {sel, value}, click {sel}, waitText {sel, text, timeoutMs},
// text {sel}, shot {path, sel?, fullPage?}, type {sel, text, enter?} (keystrokes into the
// focused element), press {sel, key}, cookies, setCookies {cookies}, eval {js} (an expression, awaited
// in the page), url (the page's address, also mid-navigation), idpLogin {username, until, timeoutMs} (logs in at oidc.sh's provider or
// github.sh's stand-in on the page now shown, consents, and waits until the page's URL starts with `until`; answers
// {url}), quit. Errors answer {"error": "..."}.
// Usage: NODE_PATH=/var/cache/edgeport-peers/node/node_modules node web-console.js
// Env: CHROMIUM (default /usr/bin/chromium). Only loopback addresses may be contacted.
'use strict';
const readline = require('readline');
const { chromium } = require('playwright-core');

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.*'],
  });
  // The gateway's own certificate is from the cluster's CA, which this browser does not know.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, serviceWorkers: 'block',
    viewport: { width: 1100, height: 560 } });
  await context.route('**/*', (route) => {
    const h = new URL(route.request().url()).hostname;
    if (/^(127\.\d+\.\d+\.\d+|localhost)$/.test(h)) return route.continue();
    return route.abort('blockedbyclient');
  });
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    if (!line.trim()) continue;
    let out;
    try {
      const c = JSON.parse(line);
      switch (c.op) {
        case 'open': { const r = await page.goto(c.url, { waitUntil: 'load' });
          out = { status: r.status(), headers: r.headers() }; break; }
        case 'fill': await page.fill(c.sel, c.value); out = {}; break;
        case 'click': await page.click(c.sel); out = {}; break;
        case 'waitText': {
          const deadline = Date.now() + (c.timeoutMs || 30000);
          let text = '';
          while (Date.now() < deadline) {
            text = await page.textContent(c.sel).catch(() => '') || '';
            if (text.includes(c.text)) break;
            await page.waitForTimeout(200);
          }
          out = { text, found: text.includes(c.text) }; break;
        }
        case 'text': out = { text: await page.textContent(c.sel) }; break;
        case 'shot':
          if (c.sel) await page.locator(c.sel).screenshot({ path: c.path });
          else await page.screenshot({ path: c.path, fullPage: !!c.fullPage });
          out = {}; break;
        case 'type': await page.focus(c.sel); await page.keyboard.type(c.text);
          if (c.enter) await page.keyboard.press('Enter');
          out = {}; break;
        case 'press': await page.focus(c.sel); await page.keyboard.press(c.key); out = {}; break;
        case 'cookies': out = { cookies: await context.cookies() }; break;
        case 'setCookies': await context.addCookies(c.cookies); out = {}; break;
        case 'eval': out = { value: await page.evaluate(c.js) }; break;
        case 'url': out = { url: page.url() }; break;
        case 'idpLogin': {
          const deadline = Date.now() + (c.timeoutMs || 30000);
          const q = async (sel) => { try { return await page.$(sel); } catch { return null; } };
          const submit = async (el) => Promise.all([
            page.waitForNavigation({ waitUntil: 'load' }).catch(() => {}), el.click().catch(() => {})]);
          let loggedIn = false;
          while (Date.now() < deadline && !page.url().startsWith(c.until)) {
            const login = await q('input[name="login"]');
            if (login && !loggedIn) {
              try { await login.fill(c.username); await page.fill('input[name="password"]', 'pw'); } catch { continue; }
              loggedIn = true;
              const b = await q('button[type="submit"]');
              if (b) await submit(b);
              continue;
            }
            // github.sh's authorize page: one e-mail field, the login is its local part.
            const email = await q('form input[name="email"]');
            if (email && !loggedIn) {
              try { await email.fill(`${c.username}@example.com`); } catch { continue; }
              loggedIn = true;
              const b = await q('form button[type="submit"]');
              if (b) await submit(b);
              continue;
            }
            const consent = await q('form[action*="/interaction/"] button[type="submit"]');
            if (consent && loggedIn) { await submit(consent); continue; }
            await page.waitForTimeout(200);
          }
          out = { url: page.url() }; break;
        }
        case 'quit': await browser.close(); process.stdout.write('{}\n'); return;
        default: out = { error: `unknown op ${c.op}` };
      }
    } catch (e) {
      out = { error: String(e && e.message || e) };
    }
    process.stdout.write(JSON.stringify(out) + '\n');
  }
  await browser.close();
}

main().catch((e) => { console.error(e && e.stack || e); process.exit(1); });
