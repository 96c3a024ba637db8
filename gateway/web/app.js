// Edgeport web console. Plain JavaScript, no dependencies, no inline code (the page's
// Content-Security-Policy allows scripts from this origin only).
//
// Session binding: at login the browser makes an ECDSA P-256 key pair with WebCrypto whose
// private key is non-extractable (no script, this one included, can read it out). The
// authority records the public key with the session; every API request is signed with the
// private key over "edgeport-web/1\nUNIX_SECONDS\nMETHOD\nPATH". The session cookie is
// HttpOnly, so a cookie alone, or a key alone, is not enough. The key lives in this page's
// memory only: a reload means logging in again.
'use strict';

const $ = (id) => document.getElementById(id);
let key = null; // CryptoKeyPair of this session
let csrf = '';
let timer = null;

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');

async function signedFetch(url, opts = {}, { withCsrf = true, sign = true } = {}) {
  const method = (opts.method || 'GET').toUpperCase();
  const headers = Object.assign({}, opts.headers || {});
  if (sign && key) {
    const at = Math.floor(Date.now() / 1000);
    const path = new URL(url, location.href).pathname;
    const text = `edgeport-web/1\n${at}\n${method}\n${path}`;
    const sig = await crypto.subtle.sign({ name: 'ECDSA', hash: 'SHA-256' }, key.privateKey,
      new TextEncoder().encode(text));
    headers['X-Edgeport-Time'] = String(at);
    headers['X-Edgeport-Signature'] = hex(sig);
  }
  if (withCsrf && method !== 'GET' && csrf) headers['X-CSRF-Token'] = csrf;
  return fetch(url, Object.assign({ credentials: 'same-origin' }, opts, { method, headers }));
}

function showLogin(message) {
  if (timer) { clearInterval(timer); timer = null; }
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
    return tr;
  });
  $('devices').replaceChildren(...rows);
  $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function showFleet(s) {
  csrf = s.csrf;
  $('login').hidden = true; $('fleet').hidden = false; $('logout').hidden = false;
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

$('logout').addEventListener('click', async () => {
  const r = await signedFetch('/api/logout', { method: 'POST' });
  showLogin(r.ok ? 'logged out' : (await r.json()).error);
});

$('filter').addEventListener('input', () => refresh());

// For tests and tools in this page: signed requests with this session's key.
window.edgeport = { signedFetch };
