// Edgeport web console. Plain JavaScript, no dependencies, no inline code (the page's
// Content-Security-Policy allows scripts from this origin only).
//
// Session binding: at login the browser makes an ECDSA P-256 key pair with WebCrypto whose
// private key is non-extractable (no script, this one included, can read it out). The
// authority records the public key with the session; every API request is signed with the
// private key over "edgeport-web/1\nUNIX_SECONDS\nMETHOD\nPATH". The session cookie is
// HttpOnly, so a cookie alone, or a key alone, is not enough. The key lives in this page's
// memory only: a reload means logging in again. Single sign-on leaves the page for the
// identity provider, so its key waits in IndexedDB (still non-extractable) until the
// provider sends the browser back to /web/sso/CONNECTOR/callback; it is taken out at once.
'use strict';

const $ = (id) => document.getElementById(id);
let key = null; // CryptoKeyPair of this session
let csrf = '';
let timer = null;
let term = null; // the terminal (term.js)
let socket = null; // its WebSocket
let playing = null; // the recording being played

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');

async function signText(text) {
  return hex(await crypto.subtle.sign({ name: 'ECDSA', hash: 'SHA-256' }, key.privateKey,
    new TextEncoder().encode(text)));
}

async function signedFetch(url, opts = {}, { withCsrf = true, sign = true } = {}) {
  const method = (opts.method || 'GET').toUpperCase();
  const headers = Object.assign({}, opts.headers || {});
  if (sign && key) {
    const at = Math.floor(Date.now() / 1000);
    const path = new URL(url, location.href).pathname;
    const text = `edgeport-web/1\n${at}\n${method}\n${path}`;
    headers['X-Edgeport-Time'] = String(at);
    headers['X-Edgeport-Signature'] = await signText(text);
  }
  if (withCsrf && method !== 'GET' && csrf) headers['X-CSRF-Token'] = csrf;
  return fetch(url, Object.assign({ credentials: 'same-origin' }, opts, { method, headers }));
}

function showLogin(message) {
  if (timer) { clearInterval(timer); timer = null; }
  // An open terminal stays: the gateway ends it with its reason (a lock, say).
  if (!socket) closeTerminal();
  $('history').hidden = true;
  key = null; csrf = '';
  $('fleet').hidden = true; $('logout').hidden = true; $('login').hidden = false;
  $('who').textContent = '';
  $('login-error').textContent = message || '';
}

function ago(secs) {
  if (!secs) return 'never';
  const d = Math.max(0, Math.floor(Date.now() / 1000) - secs);
  if (d < 60) return `${d}s ago`;
  if (d < 3600) return `${Math.floor(d / 60)}m ago`;
  return `${Math.floor(d / 3600)}h ago`;
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function refresh() {
  const filter = $('filter').value.trim();
  const url = '/api/devices' + (filter ? `?label=${encodeURIComponent(filter)}` : '');
  let r;
  try { r = await signedFetch(url); } catch (e) { $('fleet-error').textContent = String(e); return; }
  if (r.status === 401) { showLogin((await r.json()).error); return; }
  const body = await r.json();
  if (!r.ok) { $('fleet-error').textContent = body.error; return; }
  $('fleet-error').textContent = '';
  const rows = body.devices.map((d) => {
    const tr = document.createElement('tr');
    tr.dataset.device = d.id;
    tr.append(cell(d.id), cell(d.online ? 'online' : 'offline', d.online ? 'online' : 'offline'));
    const labels = document.createElement('td');
    for (const [k, v] of Object.entries(d.labels)) {
      const s = document.createElement('span');
      s.className = 'label'; s.textContent = `${k}=${v}`;
      labels.append(s);
    }
    tr.append(labels, cell(d.transport || '-'), cell(d.rtt_ms == null ? '-' : `${d.rtt_ms} ms`),
      cell(d.online ? 'now' : ago(d.last_seen)), cell(d.version || '-'));
    const open = document.createElement('td');
    if (d.online && $('login-as').value) {
      const b = document.createElement('button');
      b.className = 'connect'; b.dataset.device = d.id; b.textContent = 'Terminal';
      b.addEventListener('click', () => openTerminal(d.id, $('login-as').value));
      open.append(b);
    }
    tr.append(open);
    return tr;
  });
  $('devices').replaceChildren(...rows);
  $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// Recordings (asciicast v2) and audit events: the user's own, as `tsh recordings ls` shows.
async function getJson(url) {
  const r = await signedFetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error);
  return body;
}

async function loadHistory() {
  $('history').hidden = false;
  try {
    const recs = await getJson('/api/recordings');
    $('recordings').replaceChildren(...recs.recordings.map((r) => {
      const tr = document.createElement('tr');
      tr.dataset.session = r.session_id;
      const play = document.createElement('button');
      play.className = 'play'; play.textContent = 'Play';
      play.addEventListener('click', () => playRecording(r));
      const td = document.createElement('td'); td.append(play);
      tr.append(cell(new Date(r.started_ms).toLocaleString()), cell(r.device), cell(r.login),
        cell(`${r.bytes} B`), td);
      return tr;
    }));
    const ev = await getJson('/api/audit');
    const q = $('audit-q').value.trim().toLowerCase();
    const rows = ev.events.map((s) => Object.assign({ device: s.device }, s.event)).filter((e) => !q || JSON.stringify(e).toLowerCase().includes(q))
      .reverse().slice(0, 200).map((e) => {
        const tr = document.createElement('tr');
        const details = [['user', e.user], ['login', e.login], ['session', e.session_id]]
          .concat(Object.entries(e.fields || {})).filter(([, v]) => v).map(([k, v]) => `${k}=${v}`).join(' ');
        tr.append(cell(new Date(e.time_ms).toLocaleString()), cell(e.type || e.kind), cell(e.device || ''), cell(details));
        return tr;
      });
    $('audit-events').replaceChildren(...rows);
    $('history-error').textContent = '';
  } catch (e) { $('history-error').textContent = String(e.message || e); }
}

function terminalView(title) {
  closeTerminal();
  $('terminal').hidden = false;
  $('term-title').textContent = title;
  if (!term) {
    term = new window.EdgeportTerm($('term'), (s) => {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(new TextEncoder().encode(s));
    });
    window.addEventListener('resize', () => resizeTerminal(...term.fit()));
  }
  term.clear(); term.draw();
}

function resizeTerminal(cols, rows) {
  term.resize(cols, rows);
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ resize: [cols, rows] }));
}

// The first message of a terminal's WebSocket: signed by this session's key, over a
// single-use nonce the authority issued just now (a replayed message opens nothing).
async function terminalHello(device, login, cols, rows) {
  const r = await signedFetch('/api/terminal-nonce');
  const { nonce } = await r.json();
  const at = Math.floor(Date.now() / 1000);
  const sig = await signText(`edgeport-web/1\n${at}\nGET\n/api/terminal/${device}/${login}/${nonce}`);
  return { at, sig, device, login, nonce, cols, rows };
}

// Plays a recording in the terminal, pauses longer than half a second shortened.
async function playRecording(r) {
  terminalView(`recording of ${r.login}@${r.device}`);
  $('term-status').textContent = 'loading...';
  const resp = await signedFetch(`/api/recordings/${encodeURIComponent(r.session_id)}`);
  if (!resp.ok) { $('term-status').textContent = (await resp.json()).error; return; }
  const lines = (await resp.text()).split('\n').filter((l) => l.trim());
  const head = JSON.parse(lines.shift() || '{}');
  if (head.width && head.height) term.resize(head.width, head.height);
  const mine = (playing = {});
  let last = 0;
  $('term-status').textContent = 'playing';
  for (const l of lines) {
    const [t, kind, data] = JSON.parse(l);
    if (kind !== 'o') continue;
    await new Promise((ok) => setTimeout(ok, Math.min(500, Math.max(0, (t - last) * 1000))));
    last = t;
    if (playing !== mine) return;
    term.write(data);
  }
  $('term-status').textContent = 'end of recording';
}

function showFleet(s) {
  csrf = s.csrf;
  $('login-as').replaceChildren(...(s.logins || []).map((l) => {
    const o = document.createElement('option'); o.textContent = l; return o;
  }));
  $('login').hidden = true; $('fleet').hidden = false; $('logout').hidden = false;
  loadHistory();
  $('who').textContent = s.user;
  refresh();
  timer = setInterval(refresh, 3000);
}

$('login').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('login-error').textContent = '';
  key = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign', 'verify']);
  const pub = await crypto.subtle.exportKey('raw', key.publicKey);
  const r = await fetch('/api/login', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({
      user: $('user').value, password: $('password').value, otp: $('otp').value.trim(),
      browser_key: hex(pub),
    }),
  });
  $('password').value = ''; $('otp').value = '';
  const body = await r.json();
  if (!r.ok) { showLogin(body.error); return; }
  showFleet(body);
});

// Single sign-on. The pending login's key is kept in IndexedDB across the provider's pages.
function keyStore(op, value) {
  return new Promise((ok, fail) => {
    const open = indexedDB.open('edgeport', 1);
    open.onupgradeneeded = () => open.result.createObjectStore('keys');
    open.onerror = () => fail(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction('keys', 'readwrite');
      const store = tx.objectStore('keys');
      const req = op === 'put' ? store.put(value, 'sso') : store.get('sso');
      if (op === 'take') store.delete('sso');
      tx.oncomplete = () => { open.result.close(); ok(req.result); };
      tx.onerror = () => fail(tx.error);
    };
  });
}

async function ssoStart(connector) {
  $('login-error').textContent = '';
  const k = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign', 'verify']);
  await keyStore('put', k);
  const pub = await crypto.subtle.exportKey('raw', k.publicKey);
  const r = await fetch('/api/sso/start', {
    method: 'POST', credentials: 'same-origin', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ connector, browser_key: hex(pub) }),
  });
  const body = await r.json();
  if (!r.ok) { showLogin(body.error); return; }
  location.assign(body.auth_url);
}

const SSO_ERRORS = {
  access_denied: 'single sign-on refused: the login was cancelled or denied at the identity provider',
  login_required: 'single sign-on refused: the identity provider needs you to log in',
  consent_required: 'single sign-on refused: the identity provider needs your consent',
  interaction_required: 'single sign-on refused: the identity provider needs you to act there',
  temporarily_unavailable: 'single sign-on refused: the identity provider is unavailable; try again later',
  server_error: 'single sign-on refused: the identity provider failed; try again later',
  other: 'single sign-on refused by the identity provider',
};

// Back from the provider: finish with the code and state, signed by the start's key.
async function ssoFinish() {
  const q = new URLSearchParams(location.search);
  history.replaceState(null, '', '/');
  const k = await keyStore('take').catch(() => undefined);
  // The provider's error code picks one of our own messages: its description (or a crafted
  // link's) is never shown as if it came from this console.
  if (q.get('error')) { showLogin(SSO_ERRORS[q.get('error')] || SSO_ERRORS.other); return; }
  if (!k) { showLogin('this single sign-on login was not started in this browser'); return; }
  key = k;
  const state = q.get('state') || '';
  const at = Math.floor(Date.now() / 1000);
  const sig = await signText(`edgeport-web/1\n${at}\nPOST\n/web/sso/finish/${state}`);
  const r = await fetch('/api/sso/finish', {
    method: 'POST', credentials: 'same-origin', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ state, code: q.get('code') || '', at, sig }),
  });
  const body = await r.json();
  if (!r.ok) { showLogin(body.error); return; }
  showFleet(body);
}

async function ssoButtons() {
  const r = await fetch('/api/sso/connectors').catch(() => null);
  if (!r || !r.ok) return;
  const { connectors } = await r.json();
  $('sso').replaceChildren(...connectors.map((c) => {
    const b = document.createElement('button');
    b.type = 'button'; b.className = 'sso'; b.dataset.connector = c.name;
    b.textContent = `Sign in with ${c.kind === 'github' ? 'GitHub' : c.name === 'oidc' ? 'single sign-on' : c.name}`;
    b.addEventListener('click', () => ssoStart(c.name));
    return b;
  }));
}

if (/^\/web\/sso\/[\w-]+\/callback$/.test(location.pathname)) ssoFinish();
ssoButtons();

$('logout').addEventListener('click', async () => {
  closeTerminal();
  const r = await signedFetch('/api/logout', { method: 'POST' });
  showLogin(r.ok ? 'logged out' : (await r.json()).error);
});

// Typing asks once the keys settle, not once per key (each ask costs the authority a
// device page or an audit search).
const settled = (f, ms = 300) => { let t; return () => { clearTimeout(t); t = setTimeout(f, ms); }; };

$('filter').addEventListener('input', settled(refresh));

// The terminal: a WebSocket whose first message is signed by this session's key over
// "GET /api/terminal/DEVICE/LOGIN" (a WebSocket carries no custom headers); then keyboard
// input goes up as binary, output comes down as binary, and the gateway's words as JSON.

function closeTerminal() {
  if (socket) { socket.close(); socket = null; }
  playing = null;
  $('terminal').hidden = true;
}

async function openTerminal(device, login) {
  terminalView(`${login}@${device}`);
  $('term-status').textContent = 'connecting...';
  const [cols, rows] = term.fit();
  const hello = await terminalHello(device, login, cols, rows);
  const ws = new WebSocket(`wss://${location.host}/api/terminal`);
  socket = ws;
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => ws.send(JSON.stringify(hello));
  ws.onmessage = (ev) => {
    if (typeof ev.data !== 'string') { term.write(new Uint8Array(ev.data)); return; }
    const m = JSON.parse(ev.data);
    if (m.ready) {
      $('term-status').textContent = `session ${m.ready.session_id} (recorded)`;
      $('term').focus();
    }
    if (m.closed) {
      term.write(`\r\n\r\n[edgeport] ${m.closed}\r\n`);
      $('term-status').textContent = m.closed;
    }
  };
  ws.onclose = () => { if (socket === ws) socket = null; loadHistory(); };
}

$('term-close').addEventListener('click', closeTerminal);
$('rec-refresh').addEventListener('click', loadHistory);
$('audit-q').addEventListener('input', settled(loadHistory));

// For tests and tools in this page: signed requests with this session's key.
window.edgeport = { signedFetch, terminalHello, resizeTerminal };
