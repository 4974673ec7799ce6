// QuteMail webmail and admin console: a single-page app on the REST API (docs: web contract).
// Plain ES module, no build step. The page runs under a strict CSP (no inline script or style,
// no eval), so every element is built with the DOM API and styled by classes from app.css.
// Message content is only ever inserted as text (textContent), never parsed as HTML.

'use strict';

// ---------------------------------------------------------------------------------------------
// DOM helpers
// ---------------------------------------------------------------------------------------------

const SVG_NS = 'http://www.w3.org/2000/svg';
// Properties set as DOM properties rather than attributes (their attribute is only the default).
const DOM_PROPS = new Set(['value', 'checked', 'selected', 'indeterminate']);

/** Builds an element: h('button', {class: 'x', onclick: f}, 'text', child, [more]). */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  append(el, children);
  return el;
}

function applyProps(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.setAttribute('class', value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (DOM_PROPS.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An SVG element (icons and charts). */
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

// Material-style 24×24 icon paths.
const ICONS = {
  menu: 'M3 18h18v-2H3v2zm0-5h18v-2H3v2zm0-7v2h18V6H3z',
  search:
    'M15.5 14h-.79l-.28-.27A6.47 6.47 0 0 0 16 9.5 6.5 6.5 0 1 0 9.5 16c1.61 0 3.09-.59 4.23-1.57l.27.28v.79l5 4.99L20.49 19l-4.99-5zm-6 0C7.01 14 5 11.99 5 9.5S7.01 5 9.5 5 14 7.01 14 9.5 11.99 14 9.5 14z',
  inbox:
    'M19 3H5c-1.1 0-2 .9-2 2v14c0 1.1.9 2 2 2h14c1.1 0 2-.9 2-2V5c0-1.1-.9-2-2-2zm0 12h-4c0 1.66-1.35 3-3 3s-3-1.34-3-3H5V5h14v10z',
  send: 'M2.01 21 23 12 2.01 3 2 10l15 2-15 2z',
  draft:
    'M14 2H6c-1.1 0-2 .9-2 2v16c0 1.1.9 2 2 2h12c1.1 0 2-.9 2-2V8l-6-6zm2 16H8v-2h8v2zm0-4H8v-2h8v2zm-3-5V3.5L18.5 9H13z',
  trash: 'M6 19c0 1.1.9 2 2 2h8c1.1 0 2-.9 2-2V7H6v12zM19 4h-3.5l-1-1h-5l-1 1H5v2h14V4z',
  archive:
    'M20.54 5.23 19.15 3.55C18.88 3.21 18.47 3 18 3H6c-.47 0-.88.21-1.16.55L3.46 5.23C3.17 5.57 3 6.02 3 6.5V19c0 1.1.9 2 2 2h14c1.1 0 2-.9 2-2V6.5c0-.48-.17-.93-.46-1.27zM12 17.5 6.5 12H10v-2h4v2h3.5L12 17.5zM5.12 5l.81-1h12l.94 1H5.12z',
  folder: 'M10 4H4c-1.1 0-2 .9-2 2v12c0 1.1.9 2 2 2h16c1.1 0 2-.9 2-2V8c0-1.1-.9-2-2-2h-8l-2-2z',
  spam:
    'M15.73 3H8.27L3 8.27v7.46L8.27 21h7.46L21 15.73V8.27L15.73 3zM12 17.3a1.3 1.3 0 1 1 0-2.6 1.3 1.3 0 0 1 0 2.6zm1-4.3h-2V7h2v6z',
  compose:
    'M3 17.25V21h3.75L17.81 9.94l-3.75-3.75L3 17.25zM20.71 7.04a1 1 0 0 0 0-1.41l-2.34-2.34a1 1 0 0 0-1.41 0l-1.83 1.83 3.75 3.75 1.83-1.83z',
  reply: 'M10 9V5l-7 7 7 7v-4.1c5 0 8.5 1.6 11 5.1-1-5-4-10-11-11z',
  forward: 'M14 9V5l7 7-7 7v-4.1c-5 0-8.5 1.6-11 5.1 1-5 4-10 11-11z',
  back: 'M20 11H7.83l5.59-5.59L12 4l-8 8 8 8 1.41-1.41L7.83 13H20v-2z',
  refresh:
    'M17.65 6.35A7.96 7.96 0 0 0 12 4a8 8 0 1 0 7.73 10h-2.08A6 6 0 1 1 12 6c1.66 0 3.14.69 4.22 1.78L13 11h7V4l-2.35 2.35z',
  unread:
    'M20 4H4c-1.1 0-2 .9-2 2v12c0 1.1.9 2 2 2h16c1.1 0 2-.9 2-2V6c0-1.1-.9-2-2-2zm0 4-8 5-8-5V6l8 5 8-5v2z',
  read: 'M22 8c0-.72-.37-1.35-.94-1.7L12 1 2.95 6.3C2.38 6.65 2 7.28 2 8v10c0 1.1.9 2 2 2h16c1.1 0 2-.9 2-2V8zM12 13 3.74 7.84 12 3l8.26 4.84L12 13z',
  shield:
    'M12 1 3 5v6c0 5.55 3.84 10.74 9 12 5.16-1.26 9-6.45 9-12V5l-9-4zm-2 16-4-4 1.41-1.41L10 14.17l6.59-6.59L18 9l-8 8z',
  warning: 'M1 21h22L12 2 1 21zm12-3h-2v-2h2v2zm0-4h-2v-4h2v4z',
  attach:
    'M16.5 6v11.5a4 4 0 0 1-8 0V5a2.5 2.5 0 0 1 5 0v10.5a1 1 0 0 1-2 0V6H10v9.5a2.5 2.5 0 0 0 5 0V5a4 4 0 0 0-8 0v12.5a5.5 5.5 0 0 0 11 0V6h-1.5z',
  close:
    'M19 6.41 17.59 5 12 10.59 6.41 5 5 6.41 10.59 12 5 17.59 6.41 19 12 13.41 17.59 19 19 17.59 13.41 12z',
  settings:
    'M19.14 12.94c.04-.3.06-.61.06-.94s-.02-.64-.07-.94l2.03-1.58a.49.49 0 0 0 .12-.61l-1.92-3.32a.49.49 0 0 0-.59-.22l-2.39.96c-.5-.38-1.03-.7-1.62-.94l-.36-2.54a.48.48 0 0 0-.48-.41h-3.84a.47.47 0 0 0-.47.41l-.36 2.54c-.59.24-1.13.57-1.62.94l-2.39-.96a.48.48 0 0 0-.59.22L2.74 8.87a.47.47 0 0 0 .12.61l2.03 1.58c-.05.3-.09.63-.09.94s.02.64.07.94l-2.03 1.58a.49.49 0 0 0-.12.61l1.92 3.32c.12.22.37.29.59.22l2.39-.96c.5.38 1.03.7 1.62.94l.36 2.54c.05.24.24.41.48.41h3.84c.24 0 .44-.17.47-.41l.36-2.54c.59-.24 1.13-.56 1.62-.94l2.39.96c.22.08.47 0 .59-.22l1.92-3.32a.48.48 0 0 0-.12-.61l-2.01-1.58zM12 15.6a3.6 3.6 0 1 1 0-7.2 3.6 3.6 0 0 1 0 7.2z',
  admin: 'M3.5 18.49l6-6.01 4 4L22 6.92l-1.41-1.41-7.09 7.97-4-4L2 16.99z',
  logout:
    'M17 7l-1.41 1.41L18.17 11H8v2h10.17l-2.58 2.58L17 17l5-5zM4 5h8V3H4c-1.1 0-2 .9-2 2v14c0 1.1.9 2 2 2h8v-2H4V5z',
  keyboard:
    'M20 5H4c-1.1 0-2 .9-2 2v10c0 1.1.9 2 2 2h16c1.1 0 2-.9 2-2V7c0-1.1-.9-2-2-2zm-9 3h2v2h-2V8zm0 3h2v2h-2v-2zM8 8h2v2H8V8zm0 3h2v2H8v-2zm-1 2H5v-2h2v2zm0-3H5V8h2v2zm9 7H8v-2h8v2zm0-4h-2v-2h2v2zm0-3h-2V8h2v2zm3 3h-2v-2h2v2zm0-3h-2V8h2v2z',
  bold: 'M15.6 10.79c.97-.67 1.65-1.77 1.65-2.79 0-2.26-1.75-4-4-4H7v14h7.04c2.09 0 3.71-1.7 3.71-3.79 0-1.52-.86-2.82-2.15-3.42zM10 6.5h3a1.5 1.5 0 0 1 0 3h-3v-3zm3.5 9H10v-3h3.5a1.5 1.5 0 0 1 0 3z',
  italic: 'M10 4v3h2.21l-3.42 8H6v3h8v-3h-2.21l3.42-8H18V4z',
  underline: 'M12 17a6 6 0 0 0 6-6V3h-2.5v8a3.5 3.5 0 0 1-7 0V3H6v8a6 6 0 0 0 6 6zm-7 2v2h14v-2H5z',
  bullets:
    'M4 10.5a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm0-6a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm0 12a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zM7 19h14v-2H7v2zm0-6h14v-2H7v2zm0-8v2h14V5H7z',
  numbers:
    'M2 17h2v.5H3v1h1v.5H2v1h3v-4H2v1zm1-9h1V4H2v1h1v3zm-1 3h1.8L2 13.1v.9h3v-1H3.2L5 10.9V10H2v1zm5-6v2h14V5H7zm0 14h14v-2H7v2zm0-6h14v-2H7v2z',
  download: 'M19 9h-4V3H9v6H5l7 7 7-7zM5 18v2h14v-2H5z',
  expand: 'M16.59 8.59 12 13.17 7.41 8.59 6 10l6 6 6-6z',
  prev: 'M15.41 7.41 14 6l-6 6 6 6 1.41-1.41L10.83 12z',
  next: 'M10 6 8.59 7.41 13.17 12l-4.58 4.59L10 18l6-6z',
  star: 'M12 17.27 18.18 21l-1.64-7.03L22 9.24l-7.19-.61L12 2 9.19 8.63 2 9.24l5.46 4.73L5.82 21z',
  starOutline:
    'M22 9.24l-7.19-.62L12 2 9.19 8.63 2 9.24l5.46 4.73L5.82 21 12 17.27 18.18 21l-1.63-7.03L22 9.24zM12 15.4l-3.76 2.27 1-4.28-3.32-2.88 4.38-.38L12 6.1l1.71 4.04 4.38.38-3.32 2.88 1 4.28L12 15.4z',
  key: 'M12.65 10A5.99 5.99 0 0 0 7 6a6 6 0 1 0 5.65 8H17v4h4v-4h2v-4H12.65zM7 14a2 2 0 1 1 0-4 2 2 0 0 1 0 4z',
};

function icon(name, cls = 'icon') {
  return s('svg', { class: cls, viewBox: '0 0 24 24', 'aria-hidden': 'true', focusable: 'false' },
    s('path', { d: ICONS[name] || ICONS.folder }));
}

/** A button with an icon and an accessible name (a tooltip on hover). */
function iconButton(name, label, onclick, extra = {}) {
  return h('button', { type: 'button', class: 'icon-btn', 'aria-label': label, title: label, onclick, ...extra },
    icon(name));
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

const MODE_NAMES = {
  hybrid: 'Hybrid (QKD + ML-KEM)',
  qaes: 'Quantum-Aided AES',
  otp: 'One-Time Pad',
  pqc: 'Post-quantum (ML-KEM)',
  normal: 'Normal (TLS)',
};
const modeName = (id) => MODE_NAMES[id] || id || 'unknown';

function formatBytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '—';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10240 ? 1 : 0)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(1)} GB`;
}

function toDate(value) {
  if (value === null || value === undefined || value === '') return null;
  const d = typeof value === 'number' ? new Date(value > 1e12 ? value : value * 1000) : new Date(value);
  return Number.isNaN(d.getTime()) ? null : d;
}

/** Gmail-like short date: the time today, "Nov 3" this year, else "3/11/2025". */
function shortDate(value) {
  const d = toDate(value);
  if (!d) return '';
  const now = new Date();
  if (d.toDateString() === now.toDateString()) {
    return d.toLocaleTimeString(undefined, { hour: 'numeric', minute: '2-digit' });
  }
  if (d.getFullYear() === now.getFullYear()) {
    return d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
  }
  return d.toLocaleDateString();
}

function longDate(value) {
  const d = toDate(value);
  return d ? d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' }) : '';
}

const formatRate = (bps) =>
  typeof bps === 'number' ? (bps >= 1000 ? `${(bps / 1000).toFixed(1)} kbit/s` : `${bps.toFixed(0)} bit/s`) : '—';
const formatQber = (q) => (typeof q === 'number' ? `${(q * 100).toFixed(2)} %` : '—');

function addrText(a) {
  if (!a) return '';
  return a.name ? `${a.name} <${a.address}>` : a.address;
}
const addrName = (a) => (a ? a.name || a.address : '');

/** The addresses typed into a To/Cc/Bcc field (comma, semicolon or newline separated). */
function parseAddresses(text) {
  return text
    .split(/[,;\n]/)
    .map((part) => {
      const m = part.match(/<([^>]+)>/);
      return (m ? m[1] : part).trim();
    })
    .filter(Boolean);
}
const looksLikeAddress = (a) => /^[^\s@<>]+@[^\s@<>]+\.[^\s@<>]+$/.test(a);

// ---------------------------------------------------------------------------------------------
// API client: access token in memory, refresh token in sessionStorage, one refresh on 401.
// ---------------------------------------------------------------------------------------------

const REFRESH_KEY = 'qutemail.refresh_token';

class ApiError extends Error {
  constructor(status, code, message, details = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

const session = { access: null, account: null, refreshing: null, timer: null };

function setSession(tokens) {
  session.access = tokens.access_token;
  session.account = tokens.account || session.account;
  try {
    sessionStorage.setItem(REFRESH_KEY, tokens.refresh_token);
  } catch {
    // Private mode without storage: the session lasts as long as the page.
  }
  clearTimeout(session.timer);
  // Refresh a minute before the access token expires, so a user in the middle of writing is not
  // interrupted by a 401 round trip.
  const ttl = Math.max(30, (tokens.expires_in || 900) - 60);
  session.timer = setTimeout(() => refreshSession().catch(() => {}), ttl * 1000);
}

function clearSession() {
  session.access = null;
  session.account = null;
  clearTimeout(session.timer);
  try {
    sessionStorage.removeItem(REFRESH_KEY);
  } catch {
    // Nothing stored.
  }
}

/** Exchanges the stored refresh token for new tokens, once at a time; resolves to success. */
function refreshSession() {
  if (session.refreshing) return session.refreshing;
  let token = null;
  try {
    token = sessionStorage.getItem(REFRESH_KEY);
  } catch {
    token = null;
  }
  if (!token) return Promise.resolve(false);
  session.refreshing = (async () => {
    try {
      const tokens = await api('POST', '/api/auth/refresh/', { json: { refresh_token: token }, auth: false });
      setSession(tokens);
      return true;
    } catch {
      clearSession();
      return false;
    } finally {
      session.refreshing = null;
    }
  })();
  return session.refreshing;
}

async function api(method, path, { json, body, auth = true, retry = true, raw = false, quiet = false } = {}) {
  const headers = new Headers();
  let payload = body;
  if (json !== undefined) {
    headers.set('Content-Type', 'application/json');
    payload = JSON.stringify(json);
  }
  headers.set('Accept', raw ? '*/*' : 'application/json');
  if (auth && session.access) headers.set('Authorization', `Bearer ${session.access}`);
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: payload, cache: 'no-store', credentials: 'same-origin' });
  } catch {
    throw new ApiError(0, 'network', 'The appliance cannot be reached. Check your connection and try again.');
  }
  if (resp.status === 401 && auth) {
    if (retry && (await refreshSession())) return api(method, path, { json, body, auth, retry: false, raw, quiet });
    if (!quiet) sessionEnded();
    throw new ApiError(401, 'unauthorized', 'Your session has ended. Please sign in again.');
  }
  if (!resp.ok) {
    let err = {};
    try {
      err = (await resp.json()).error || {};
    } catch {
      err = {};
    }
    throw new ApiError(
      resp.status,
      err.code || `http_${resp.status}`,
      err.message || `The appliance answered ${resp.status} ${resp.statusText}.`,
      err.details || null,
      resp.headers.get('Retry-After'),
    );
  }
  if (raw) return resp;
  const type = resp.headers.get('Content-Type') || '';
  if (resp.status === 204 || !type.includes('json')) return null;
  return resp.json();
}

let endingSession = false;
function sessionEnded() {
  if (endingSession) return;
  endingSession = true;
  clearSession();
  toast('Your session has ended. Please sign in again.', 'error');
  navigate('#/login');
  setTimeout(() => {
    endingSession = false;
  }, 500);
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// Toasts, dialogs
// ---------------------------------------------------------------------------------------------

function toast(message, kind = 'info', action = null) {
  const box = $('#toasts');
  if (!box) return;
  const item = h('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : null },
    h('span', {}, message),
    action && h('button', { type: 'button', class: 'link-btn', onclick: () => { action.run(); item.remove(); } },
      action.label),
    h('button', { type: 'button', class: 'icon-btn small', 'aria-label': 'Dismiss', onclick: () => item.remove() },
      icon('close')));
  box.append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 10000 : 6000);
}

function errorText(err) {
  if (err instanceof ApiError) {
    if (err.code === 'rate_limited' && err.retryAfter) {
      return `${err.message} Try again in ${err.retryAfter} seconds.`;
    }
    return err.message;
  }
  return err && err.message ? err.message : String(err);
}

function formError(form, err) {
  const box = $('.form-error', form);
  if (!box) return toast(errorText(err), 'error');
  box.textContent = typeof err === 'string' ? err : errorText(err);
  box.hidden = false;
}

function clearFormError(form) {
  const box = $('.form-error', form);
  if (box) {
    box.textContent = '';
    box.hidden = true;
  }
}

function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  const hintEl = hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null;
  if (hintEl) input.setAttribute('aria-describedby', hintEl.id);
  return h('div', { class: 'field' }, h('label', { for: id }, label), input, hintEl);
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

const PUBLIC_ROUTES = new Set(['login', 'signup', 'reset']);
let currentView = null; // { dispose() } of the view on screen

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = raw.split('?');
  const parts = path.split('/').filter((p) => p !== '').map((p) => {
    try {
      return decodeURIComponent(p);
    } catch {
      return p;
    }
  });
  return { name: parts[0] || 'inbox', args: parts.slice(1), params: new URLSearchParams(query) };
}

function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function route() {
  const r = parseHash();
  if (currentView && currentView.dispose) currentView.dispose();
  currentView = null;
  closeDrawer();
  $$('dialog[open]').forEach((d) => d.close());
  document.body.classList.toggle('compose-open', r.name === 'compose');
  if (PUBLIC_ROUTES.has(r.name)) {
    if (r.name !== 'reset' && session.access) return navigate('#/inbox');
    shell.mounted = false;
    return renderPublic(r);
  }
  if (!session.access) {
    if (!(await refreshSession())) {
      shell.mounted = false;
      return renderPublic({ name: 'login', args: [], params: new URLSearchParams() });
    }
  }
  mountShell();
  renderFolders();
  switch (r.name) {
    case 'inbox':
      return showList({ kind: 'folder', folder: 'INBOX' }, r.params);
    case 'folder':
      return showList({ kind: 'folder', folder: r.args[0] || 'INBOX' }, r.params);
    case 'search':
      return showList({ kind: 'search', q: r.args[0] || '' }, r.params);
    case 'message':
      return showMessage(r.args[0]);
    case 'compose':
      return showCompose(r.params);
    case 'settings':
      return showSettings();
    case 'admin':
      return showAdmin();
    default:
      return navigate('#/inbox');
  }
}

// ---------------------------------------------------------------------------------------------
// Public screens: sign in, sign up, password reset
// ---------------------------------------------------------------------------------------------

function authCard(title, subtitle, ...content) {
  const app = $('#app');
  app.replaceChildren(
    h('main', { class: 'auth-page', id: 'main' },
      h('div', { class: 'auth-card' },
        h('div', { class: 'brand brand-large' }, h('img', { src: '/assets/icon.svg', alt: '', class: 'logo' }),
          h('span', {}, 'QuteMail')),
        h('h1', {}, title),
        subtitle && h('p', { class: 'muted' }, subtitle),
        ...content)),
  );
  document.title = `${title} – QuteMail`;
  const first = $('input', app);
  if (first) first.focus();
}

function renderPublic(r) {
  if (r.name === 'signup') return renderSignup();
  if (r.name === 'reset') return renderReset(r.params);
  return renderLogin();
}

function renderLogin() {
  const address = h('input', { type: 'text', name: 'address', autocomplete: 'username', required: true,
    autocapitalize: 'off', spellcheck: 'false' });
  const password = h('input', { type: 'password', name: 'password', autocomplete: 'current-password',
    required: true });
  const form = h('form', { class: 'auth-form', id: 'login-form', novalidate: true },
    field('Email address or username', address),
    field('Password', password),
    h('p', { class: 'form-error', role: 'alert', hidden: true }),
    h('button', { type: 'submit', class: 'btn primary wide' }, 'Sign in'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearFormError(form);
    if (!address.value.trim() || !password.value) return formError(form, 'Enter your address and password.');
    const button = $('button[type=submit]', form);
    button.disabled = true;
    try {
      const tokens = await api('POST', '/api/auth/login/', {
        json: { address: address.value.trim(), password: password.value }, auth: false });
      setSession(tokens);
      navigate('#/inbox');
    } catch (err) {
      formError(form, err.code === 'invalid_credentials' ? 'Wrong address or password.' : err);
      password.select();
    } finally {
      button.disabled = false;
    }
  });
  authCard('Sign in', 'to continue to your quantum-secured mail', form,
    h('div', { class: 'auth-links' },
      h('a', { href: '#/signup', id: 'to-signup' }, 'Create account'),
      h('a', { href: '#/reset', id: 'to-reset' }, 'Forgot password?')));
}

function renderSignup() {
  const display = h('input', { type: 'text', name: 'display_name', autocomplete: 'name', required: true });
  const username = h('input', { type: 'text', name: 'username', autocomplete: 'username', required: true,
    autocapitalize: 'off', spellcheck: 'false', pattern: '[a-z0-9._-]+' });
  const password = h('input', { type: 'password', name: 'password', autocomplete: 'new-password',
    required: true, minlength: 10 });
  const recovery = h('input', { type: 'email', name: 'recovery_address', autocomplete: 'email' });
  const form = h('form', { class: 'auth-form', id: 'signup-form', novalidate: true },
    field('Your name', display),
    field('Username', username, 'Lower-case letters, digits, dots, dashes. Your address will be username@this site.'),
    field('Password', password, 'At least 10 characters.'),
    field('Recovery address (optional)', recovery, 'Where a password reset link is sent if you forget your password.'),
    h('p', { class: 'form-error', role: 'alert', hidden: true }),
    h('button', { type: 'submit', class: 'btn primary wide' }, 'Create account'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearFormError(form);
    const user = username.value.trim().toLowerCase();
    if (!display.value.trim() || !user) return formError(form, 'Enter your name and a username.');
    if (password.value.length < 10) return formError(form, 'The password needs at least 10 characters.');
    if (recovery.value.trim() && !looksLikeAddress(recovery.value.trim())) {
      return formError(form, 'The recovery address is not an email address.');
    }
    const button = $('button[type=submit]', form);
    button.disabled = true;
    try {
      const body = { username: user, password: password.value, display_name: display.value.trim() };
      if (recovery.value.trim()) body.recovery_address = recovery.value.trim();
      const tokens = await api('POST', '/api/auth/signup/', { json: body, auth: false });
      setSession(tokens);
      toast(`Welcome, ${tokens.account ? tokens.account.address : user}! Your mailbox is ready.`, 'success');
      navigate('#/inbox');
    } catch (err) {
      const msg = err.code === 'conflict' ? 'That username is taken. Try another one.' : err;
      formError(form, msg);
    } finally {
      button.disabled = false;
    }
  });
  authCard('Create your account', 'Mail between sites is protected with quantum keys.', form,
    h('div', { class: 'auth-links' }, h('a', { href: '#/login' }, 'Already have an account? Sign in')));
}

function renderReset(params) {
  const address = h('input', { type: 'text', name: 'address', autocomplete: 'username', required: true });
  const request = h('form', { class: 'auth-form', id: 'reset-request-form', novalidate: true },
    h('h2', {}, '1. Get a reset token'),
    field('Your email address', address, 'We mail a single-use token, valid for 30 minutes, to your recovery address.'),
    h('p', { class: 'form-error', role: 'alert', hidden: true }),
    h('p', { class: 'form-ok', role: 'status', hidden: true }),
    h('button', { type: 'submit', class: 'btn wide' }, 'Send reset token'));
  request.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearFormError(request);
    if (!address.value.trim()) return formError(request, 'Enter your address.');
    try {
      await api('POST', '/api/auth/reset/request/', { json: { address: address.value.trim() }, auth: false });
      const ok = $('.form-ok', request);
      ok.textContent = 'If that address has an account, a reset token is on its way to its recovery address.';
      ok.hidden = false;
      $('#reset-token').focus();
    } catch (err) {
      formError(request, err);
    }
  });
  const token = h('input', { type: 'text', name: 'token', id: 'reset-token', required: true,
    autocomplete: 'one-time-code', spellcheck: 'false', value: params.get('token') || '' });
  const pw1 = h('input', { type: 'password', name: 'new_password', autocomplete: 'new-password', required: true });
  const pw2 = h('input', { type: 'password', name: 'confirm_password', autocomplete: 'new-password', required: true });
  const confirm = h('form', { class: 'auth-form', id: 'reset-confirm-form', novalidate: true },
    h('h2', {}, '2. Choose a new password'),
    field('Reset token', token),
    field('New password', pw1, 'At least 10 characters.'),
    field('Repeat the new password', pw2),
    h('p', { class: 'form-error', role: 'alert', hidden: true }),
    h('p', { class: 'form-ok', role: 'status', hidden: true }),
    h('button', { type: 'submit', class: 'btn primary wide' }, 'Set new password'));
  confirm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearFormError(confirm);
    if (!token.value.trim()) return formError(confirm, 'Enter the reset token from the mail.');
    if (pw1.value.length < 10) return formError(confirm, 'The new password needs at least 10 characters.');
    if (pw1.value !== pw2.value) return formError(confirm, 'The two passwords differ.');
    try {
      await api('POST', '/api/auth/reset/confirm/', {
        json: { token: token.value.trim(), new_password: pw1.value }, auth: false });
      clearSession();
      toast('Your password was changed. Sign in with the new one.', 'success');
      navigate('#/login');
    } catch (err) {
      formError(confirm, err.code === 'invalid_token'
        ? 'This reset token is unknown, expired or already used. Request a new one.' : err);
    }
  });
  authCard('Reset your password', null, params.get('token') ? null : request, confirm,
    h('div', { class: 'auth-links' }, h('a', { href: '#/login' }, 'Back to sign in')));
  if (params.get('token')) pw1.focus();
}

// ---------------------------------------------------------------------------------------------
// The mail shell: top bar, folder list, main area
// ---------------------------------------------------------------------------------------------

const shell = { mounted: false, folders: [], main: null, poll: null };
const modesCache = { data: null };

function mountShell() {
  if (shell.mounted && $('#shell')) return;
  const account = session.account || {};
  const search = h('input', { type: 'search', id: 'search-input', name: 'q', placeholder: 'Search mail',
    'aria-label': 'Search mail', autocomplete: 'off' });
  const searchForm = h('form', { class: 'search', role: 'search', onsubmit: (ev) => {
    ev.preventDefault();
    const q = search.value.trim();
    navigate(q ? `#/search/${enc(q)}` : '#/inbox');
  } }, h('button', { type: 'submit', class: 'icon-btn', 'aria-label': 'Search' }, icon('search')), search);
  const accountMenu = h('div', { class: 'account-menu' },
    h('button', { type: 'button', class: 'avatar', id: 'account-button', 'aria-haspopup': 'true',
      'aria-expanded': 'false', 'aria-label': `Account: ${account.address || ''}`, onclick: toggleAccountMenu },
      (account.display_name || account.address || '?').slice(0, 1).toUpperCase()),
    h('div', { class: 'menu', id: 'account-popup', role: 'menu', hidden: true },
      h('p', { class: 'menu-head' }, h('strong', {}, account.display_name || ''), h('br'), account.address || ''),
      h('a', { href: '#/settings', role: 'menuitem' }, icon('settings'), 'Settings'),
      account.is_admin && h('a', { href: '#/admin', role: 'menuitem', id: 'menu-admin' }, icon('admin'), 'Admin console'),
      h('button', { type: 'button', role: 'menuitem', onclick: showShortcuts }, icon('keyboard'), 'Keyboard shortcuts'),
      h('button', { type: 'button', role: 'menuitem', id: 'logout', onclick: logout }, icon('logout'), 'Sign out')));
  const header = h('header', { class: 'topbar' },
    iconButton('menu', 'Main menu', toggleDrawer, { id: 'menu-button', 'aria-controls': 'nav', 'aria-expanded': 'false' }),
    h('a', { class: 'brand', href: '#/inbox', 'aria-label': 'QuteMail inbox' },
      h('img', { src: '/assets/icon.svg', alt: '', class: 'logo' }), h('span', {}, 'QuteMail')),
    searchForm,
    account.is_admin && h('a', { class: 'icon-btn admin-link', href: '#/admin', 'aria-label': 'Admin console',
      title: 'Admin console' }, icon('admin')),
    accountMenu);
  const nav = h('nav', { class: 'nav', id: 'nav', 'aria-label': 'Folders' },
    h('a', { class: 'compose-btn', href: '#/compose', id: 'compose-button' }, icon('compose'), h('span', {}, 'Compose')),
    h('ul', { class: 'folders', id: 'folder-list' }),
    account.is_admin && h('a', { class: 'nav-item admin-nav', href: '#/admin' }, icon('admin'),
      h('span', { class: 'label' }, 'Admin console')));
  shell.main = h('main', { class: 'main', id: 'main', tabindex: '-1' });
  $('#app').replaceChildren(
    h('button', { type: 'button', class: 'skip-link', onclick: () => shell.main.focus() }, 'Skip to main content'),
    h('div', { class: 'shell', id: 'shell' }, header,
      h('div', { class: 'body' }, nav, h('div', { class: 'scrim', onclick: closeDrawer }), shell.main),
      // On a phone the folder column is a drawer; Compose stays at hand as a floating button.
      h('a', { class: 'fab', href: '#/compose', id: 'compose-fab', 'aria-label': 'Compose' }, icon('compose'), h('span', {}, 'Compose'))));
  shell.mounted = true;
  loadFolders();
  loadModes(); // the certificate explains each mode with the server's own words
  clearInterval(shell.poll);
  // New mail shows up without a reload: folder counts every 20 s, the open list with them.
  shell.poll = setInterval(() => {
    if (!session.access || document.hidden) return;
    loadFolders();
    if (listState.view && listState.page === 1 && !listState.selected.size) reloadList(true);
  }, 20000);
}

function toggleAccountMenu(ev) {
  const popup = $('#account-popup');
  const button = ev.currentTarget;
  const open = popup.hidden;
  const close = (e) => {
    if (e && (button.contains(e.target) || (popup.contains(e.target) && e.type === 'keydown'))) return;
    popup.hidden = true;
    button.setAttribute('aria-expanded', 'false');
    document.removeEventListener('click', close, true);
    popup.removeEventListener('keydown', onKey);
  };
  const onKey = (e) => {
    if (e.key === 'Escape') {
      close();
      button.focus();
    }
  };
  if (!open) return close();
  popup.hidden = false;
  button.setAttribute('aria-expanded', 'true');
  const first = $('[role=menuitem]', popup);
  if (first) first.focus();
  // Any click (inside: after the item's own handler ran) closes the menu.
  document.addEventListener('click', close, true);
  popup.addEventListener('keydown', onKey);
}

function toggleDrawer() {
  const open = !document.body.classList.contains('drawer-open');
  document.body.classList.toggle('drawer-open', open);
  const b = $('#menu-button');
  if (b) b.setAttribute('aria-expanded', String(open));
}

function closeDrawer() {
  document.body.classList.remove('drawer-open');
  const b = $('#menu-button');
  if (b) b.setAttribute('aria-expanded', 'false');
}

async function logout() {
  try {
    await api('POST', '/api/auth/logout/', { retry: false, quiet: true });
  } catch {
    // Signing out locally is what matters; the server drops the session when the token expires.
  }
  clearSession();
  clearInterval(shell.poll);
  shell.mounted = false;
  navigate('#/login');
}

const ROLE_ORDER = { inbox: 0, sent: 2, drafts: 3, archive: 4, junk: 8, trash: 9 };
const ROLE_ICON = { inbox: 'inbox', sent: 'send', drafts: 'draft', trash: 'trash', junk: 'spam' };
const ROLE_LABEL = { inbox: 'Inbox', sent: 'Sent', drafts: 'Drafts', trash: 'Trash', junk: 'Spam' };

function folderLabel(f) {
  if (f.role && ROLE_LABEL[f.role]) return ROLE_LABEL[f.role];
  if (f.name.toUpperCase() === 'INBOX') return 'Inbox';
  return f.name;
}

function folderByRole(role) {
  return shell.folders.find((f) => f.role === role);
}

async function loadFolders() {
  try {
    const data = await api('GET', '/api/mail/folders/');
    shell.folders = (data.folders || []).slice().sort((a, b) => {
      const ra = ROLE_ORDER[a.role] ?? (a.name === 'Archive' ? 4 : 5);
      const rb = ROLE_ORDER[b.role] ?? (b.name === 'Archive' ? 4 : 5);
      return ra - rb || a.name.localeCompare(b.name);
    });
    renderFolders();
  } catch (err) {
    if (err.status !== 401) toast(`Folders could not be loaded: ${errorText(err)}`, 'error');
  }
}

function renderFolders() {
  const list = $('#folder-list');
  if (!list) return;
  const active = listState.view && listState.view.kind === 'folder' ? listState.view.folder : null;
  const onList = ['inbox', 'folder', 'message'].includes(parseHash().name);
  list.replaceChildren(...shell.folders.map((f) => {
    const isActive = onList && active === f.name;
    const showCount = f.unread > 0 && f.role !== 'sent' && f.role !== 'trash';
    const count = f.role === 'drafts' ? f.total : f.unread;
    return h('li', {},
      h('a', { class: `nav-item${isActive ? ' active' : ''}${f.unread > 0 ? ' has-unread' : ''}`,
        href: f.name.toUpperCase() === 'INBOX' ? '#/inbox' : `#/folder/${enc(f.name)}`,
        'aria-current': isActive ? 'page' : null, 'data-folder': f.name,
        'aria-label': `${folderLabel(f)}${showCount ? `, ${f.unread} unread` : ''}` },
        icon(ROLE_ICON[f.role] || (f.name === 'Archive' ? 'archive' : 'folder')),
        h('span', { class: 'label' }, folderLabel(f)),
        (showCount || (f.role === 'drafts' && count > 0)) && h('span', { class: 'count', 'aria-hidden': 'true' }, String(count))));
  }));
  const inbox = shell.folders.find((f) => f.role === 'inbox' || f.name.toUpperCase() === 'INBOX');
  const unread = inbox ? inbox.unread : 0;
  if (!/^#\/(admin|settings|compose)/.test(location.hash)) {
    document.title = unread > 0 ? `Inbox (${unread}) – QuteMail` : 'Inbox – QuteMail';
  }
}

function setMain(...children) {
  shell.main.replaceChildren(...children);
  shell.main.scrollTop = 0;
}

// ---------------------------------------------------------------------------------------------
// Message list
// ---------------------------------------------------------------------------------------------

const PER_PAGE = 50;
const listState = {
  view: null, // {kind: 'folder', folder} | {kind: 'search', q}
  page: 1,
  messages: [],
  total: 0,
  cursor: 0,
  selected: new Set(),
  hash: '#/inbox',
};

function sameView(a, b) {
  return a && b && a.kind === b.kind && a.folder === b.folder && a.q === b.q;
}

async function showList(view, params) {
  const page = Math.max(1, parseInt(params.get('page') || '1', 10) || 1);
  const fresh = !sameView(listState.view, view) || listState.page !== page;
  listState.view = view;
  listState.page = page;
  listState.hash = location.hash || '#/inbox';
  if (fresh) {
    listState.cursor = 0;
    listState.selected.clear();
    listState.messages = [];
  }
  const search = $('#search-input');
  if (search) search.value = view.kind === 'search' ? view.q : '';
  renderFolders();
  renderList(!fresh ? null : 'loading');
  await reloadList(false);
}

async function reloadList(quiet) {
  const view = listState.view;
  if (!view) return;
  const page = listState.page;
  const url = view.kind === 'search'
    ? `/api/mail/search/?q=${enc(view.q)}&page=${page}&per_page=${PER_PAGE}`
    : `/api/mail/folders/${enc(view.folder)}/messages/?page=${page}&per_page=${PER_PAGE}`;
  try {
    const data = await api('GET', url);
    if (!sameView(listState.view, view) || listState.page !== page) return; // navigated away meanwhile
    const cursorId = listState.messages[listState.cursor] && listState.messages[listState.cursor].id;
    listState.messages = data.messages || [];
    listState.total = data.total ?? listState.messages.length;
    const keep = listState.messages.findIndex((m) => m.id === cursorId);
    listState.cursor = keep >= 0 ? keep : Math.min(listState.cursor, Math.max(0, listState.messages.length - 1));
    for (const id of Array.from(listState.selected)) {
      if (!listState.messages.some((m) => m.id === id)) listState.selected.delete(id);
    }
    if (isListRoute()) renderList(null);
  } catch (err) {
    if (!quiet && isListRoute()) renderList(err);
  }
}

function isListRoute() {
  const name = parseHash().name;
  return name === 'inbox' || name === 'folder' || name === 'search';
}

function viewTitle(view) {
  if (view.kind === 'search') return `Search results for “${view.q}”`;
  const f = shell.folders.find((x) => x.name === view.folder);
  return f ? folderLabel(f) : view.folder === 'INBOX' ? 'Inbox' : view.folder;
}

function currentFolderRole() {
  const v = listState.view;
  if (!v || v.kind !== 'folder') return null;
  const f = shell.folders.find((x) => x.name === v.folder);
  return f ? f.role : v.folder.toUpperCase() === 'INBOX' ? 'inbox' : null;
}

function selectedOrCursor() {
  if (listState.selected.size) return listState.messages.filter((m) => listState.selected.has(m.id));
  const m = listState.messages[listState.cursor];
  return m ? [m] : [];
}

function renderList(status) {
  const { messages, total, page } = listState;
  const view = listState.view;
  const first = total === 0 ? 0 : (page - 1) * PER_PAGE + 1;
  const last = Math.min(total, (page - 1) * PER_PAGE + messages.length);
  const allChecked = messages.length > 0 && messages.every((m) => listState.selected.has(m.id));
  const pageHash = (p) => {
    const base = listState.hash.split('?')[0] || '#/inbox';
    return p > 1 ? `${base}?page=${p}` : base;
  };
  const selectAll = h('input', { type: 'checkbox', 'aria-label': 'Select all messages on this page',
    checked: allChecked, onchange: (ev) => {
      listState.selected.clear();
      if (ev.target.checked) messages.forEach((m) => listState.selected.add(m.id));
      renderList(null);
    } });
  const toolbar = h('div', { class: 'toolbar', role: 'toolbar', 'aria-label': 'Message actions' },
    h('label', { class: 'check' }, selectAll),
    iconButton('refresh', 'Refresh', () => {
      loadFolders();
      reloadList(false);
    }),
    archiveFolder() && currentFolderName() !== archiveFolder() &&
      iconButton('archive', 'Archive (e)', () => archiveMessages(selectedOrCursor())),
    iconButton('trash', 'Delete (#)', () => deleteMessages(selectedOrCursor())),
    iconButton('read', 'Mark as read (Shift+I)', () => markMessages(selectedOrCursor(), true), { class: 'icon-btn mark-btn' }),
    iconButton('unread', 'Mark as unread (Shift+U)', () => markMessages(selectedOrCursor(), false), { class: 'icon-btn mark-btn' }),
    moveSelect(() => selectedOrCursor()),
    h('span', { class: 'spacer' }),
    h('span', { class: 'range', 'aria-live': 'polite' }, total ? `${first}–${last} of ${total}` : ''),
    iconButton('prev', 'Newer page', () => navigate(pageHash(page - 1)), { disabled: page <= 1 }),
    iconButton('next', 'Older page', () => navigate(pageHash(page + 1)), { disabled: last >= total }));

  let content;
  if (status === 'loading') {
    content = h('p', { class: 'empty', role: 'status' }, 'Loading…');
  } else if (status instanceof Error) {
    content = h('div', { class: 'empty error-state', role: 'alert' }, `The messages could not be loaded: ${errorText(status)}`,
      h('button', { type: 'button', class: 'btn', onclick: () => reloadList(false) }, 'Try again'));
  } else if (!messages.length) {
    content = h('div', { class: 'empty' },
      view.kind === 'search' ? `No messages match “${view.q}”.` : `No conversations in ${viewTitle(view)}.`,
      currentFolderRole() === 'inbox' && h('p', { class: 'muted' }, 'Press ',
        h('kbd', {}, 'c'), ' or the Compose button to write your first quantum-secured message.'));
  } else {
    content = h('ul', { class: 'message-list', id: 'message-list', 'aria-label': viewTitle(view) },
      messages.map((m, i) => messageRow(m, i)));
  }
  setMain(h('section', { class: 'list-view', 'aria-labelledby': 'list-title' },
    h('h1', { class: 'visually-hidden', id: 'list-title' }, viewTitle(view)),
    toolbar, content));
}

function protectionBadge(p, { compact = false } = {}) {
  if (!p) return null;
  if (p.verified === false) {
    return h('span', { class: 'badge badge-bad', title: 'This message failed verification' },
      icon('warning', 'icon small'), compact ? 'Not verified' : 'Verification failed');
  }
  if (p.quantum_secured) {
    return h('span', { class: 'badge badge-quantum', title: `Quantum Secured: ${modeName(p.mode)}` },
      icon('shield', 'icon small'), 'Quantum Secured');
  }
  if (p.mode === 'pqc') {
    return h('span', { class: 'badge badge-pqc', title: 'Protected with post-quantum cryptography (ML-KEM)' },
      icon('shield', 'icon small'), 'Post-quantum');
  }
  return null;
}

function messageRow(m, index) {
  const isSent = currentFolderRole() === 'sent' || currentFolderRole() === 'drafts';
  const who = isSent ? `To: ${(m.to || []).map(addrName).join(', ')}` : addrName(m.from);
  const checked = listState.selected.has(m.id);
  const open = () => {
    listState.cursor = index;
    openMessage(m);
  };
  const row = h('li', { class: `row${m.seen ? '' : ' unread'}${index === listState.cursor ? ' cursor' : ''}${checked ? ' selected' : ''}`,
    'data-id': m.id, 'aria-current': index === listState.cursor ? 'true' : null },
    h('label', { class: 'check' }, h('input', { type: 'checkbox', checked, 'aria-label': `Select message: ${m.subject || '(no subject)'}`,
      onchange: (ev) => {
        if (ev.target.checked) listState.selected.add(m.id);
        else listState.selected.delete(m.id);
        row.classList.toggle('selected', ev.target.checked);
      } })),
    starButton(m),
    h('button', { type: 'button', class: 'row-open', onclick: open,
      'aria-label': `${m.seen ? '' : 'Unread, '}from ${addrName(m.from)}, ${m.subject || '(no subject)'}, ${shortDate(m.date)}${m.protection && m.protection.quantum_secured ? ', Quantum Secured' : ''}${m.protection && m.protection.verified === false ? ', verification failed' : ''}` },
      h('span', { class: 'from' }, who || '(unknown sender)'),
      h('span', { class: 'summary' },
        h('span', { class: 'subject' }, m.subject || '(no subject)'),
        m.snippet && h('span', { class: 'snippet' }, h('span', { class: 'dash', 'aria-hidden': 'true' }, ' – '), m.snippet)),
      h('span', { class: 'meta' },
        protectionBadge(m.protection, { compact: true }),
        m.has_attachments && h('span', { class: 'attach-mark', title: 'Has attachments' }, icon('attach', 'icon small')),
        h('time', { class: 'date', datetime: m.date || '' }, shortDate(m.date)))),
    h('span', { class: 'row-actions' },
      archiveFolder() && iconButton('archive', 'Archive', () => archiveMessages([m])),
      iconButton('trash', 'Delete', () => deleteMessages([m])),
      iconButton(m.seen ? 'unread' : 'read', m.seen ? 'Mark as unread' : 'Mark as read', () => markMessages([m], !m.seen))));
  return row;
}

/** Gmail's star: the message's `flagged` flag. */
function starButton(m) {
  const button = h('button', { type: 'button', class: `icon-btn small star${m.flagged ? ' on' : ''}`,
    'aria-pressed': String(!!m.flagged), 'aria-label': 'Starred', title: m.flagged ? 'Starred' : 'Not starred',
    onclick: () => toggleStar(m, button) }, icon(m.flagged ? 'star' : 'starOutline'));
  return button;
}

async function toggleStar(m, button) {
  const flagged = !m.flagged;
  const [result] = await patchMessages([m], { flagged });
  if (result.status !== 'fulfilled') return;
  m.flagged = flagged;
  const inList = listState.messages.find((x) => x.id === m.id);
  if (inList) inList.flagged = flagged;
  const fresh = starButton(m);
  if (button && button.isConnected) button.replaceWith(fresh);
  else if (isListRoute()) renderList(null);
}

function openMessage(m) {
  if (currentFolderRole() === 'drafts') return navigate(`#/compose?draft=${enc(m.id)}`);
  navigate(`#/message/${enc(m.id)}`);
}

function moveSelect(getMessages) {
  const select = h('select', { class: 'move-select', 'aria-label': 'Move to folder',
    onchange: async (ev) => {
      const folder = ev.target.value;
      ev.target.value = '';
      if (folder) await moveMessages(getMessages(), folder);
    } },
  h('option', { value: '' }, 'Move to…'),
  shell.folders.filter((f) => f.role !== 'drafts' && f.role !== 'sent').map((f) => h('option', { value: f.name }, folderLabel(f))));
  return select;
}

async function patchMessages(messages, body) {
  const results = await Promise.allSettled(messages.map((m) => api('PATCH', `/api/mail/${enc(m.id)}/`, { json: body })));
  const failed = results.filter((r) => r.status === 'rejected');
  if (failed.length) toast(`${failed.length} message(s) could not be changed: ${errorText(failed[0].reason)}`, 'error');
  return results;
}

async function markMessages(messages, seen) {
  if (!messages.length) return toast('Select a message first.');
  await patchMessages(messages, { seen });
  messages.forEach((m) => {
    m.seen = seen;
  });
  loadFolders();
  if (isListRoute()) renderList(null);
  toast(seen ? 'Marked as read.' : 'Marked as unread.');
}

async function moveMessages(messages, folder, verb = `Moved to ${folder}.`) {
  if (!messages.length) return toast('Select a message first.');
  await patchMessages(messages, { folder });
  afterRemoval(messages);
  toast(verb);
}

/** The folder "archive" moves to: one named Archive, when the account has it. */
function archiveFolder() {
  const f = shell.folders.find((x) => x.name.toLowerCase() === 'archive');
  return f ? f.name : null;
}

function currentFolderName() {
  return listState.view && listState.view.kind === 'folder' ? listState.view.folder : null;
}

function archiveMessages(messages) {
  const folder = archiveFolder();
  if (!folder) return toast('This account has no Archive folder.');
  return moveMessages(messages, folder, 'Archived.');
}

async function deleteMessages(messages) {
  if (!messages.length) return toast('Select a message first.');
  const results = await Promise.allSettled(messages.map((m) => api('DELETE', `/api/mail/${enc(m.id)}/`)));
  const failed = results.filter((r) => r.status === 'rejected');
  if (failed.length) toast(`${failed.length} message(s) could not be deleted: ${errorText(failed[0].reason)}`, 'error');
  afterRemoval(messages.filter((_, i) => results[i].status === 'fulfilled'));
  if (!failed.length) toast(currentFolderRole() === 'trash' ? 'Deleted forever.' : 'Moved to Trash.');
}

function afterRemoval(messages) {
  const ids = new Set(messages.map((m) => m.id));
  listState.messages = listState.messages.filter((m) => !ids.has(m.id));
  listState.total = Math.max(0, listState.total - ids.size);
  ids.forEach((id) => listState.selected.delete(id));
  listState.cursor = Math.min(listState.cursor, Math.max(0, listState.messages.length - 1));
  loadFolders();
  if (isListRoute()) renderList(null);
  else navigate(listState.hash || '#/inbox');
}

function moveCursor(delta) {
  if (!listState.messages.length) return;
  listState.cursor = Math.max(0, Math.min(listState.messages.length - 1, listState.cursor + delta));
  $$('#message-list .row').forEach((row, i) => {
    row.classList.toggle('cursor', i === listState.cursor);
    if (i === listState.cursor) {
      row.setAttribute('aria-current', 'true');
      row.scrollIntoView({ block: 'nearest' });
      $('.row-open', row).focus({ preventScroll: true });
    } else {
      row.removeAttribute('aria-current');
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Reading pane
// ---------------------------------------------------------------------------------------------

let openMessageData = null;

async function showMessage(id) {
  openMessageData = null;
  setMain(h('p', { class: 'empty', role: 'status' }, 'Decrypting…'));
  let msg;
  try {
    msg = await api('GET', `/api/mail/${enc(id)}/decrypt/`);
  } catch (err) {
    return setMain(h('div', { class: 'empty error-state', role: 'alert' },
      err.status === 404 ? 'This message does not exist or is not yours.' : `The message could not be opened: ${errorText(err)}`,
      h('a', { class: 'btn', href: listState.hash || '#/inbox' }, 'Back to the list')));
  }
  if (parseHash().name !== 'message') return;
  openMessageData = msg;
  const inList = listState.messages.find((m) => m.id === id);
  if (inList && !inList.seen) {
    inList.seen = true;
    loadFolders();
  }
  const idx = listState.messages.findIndex((m) => m.id === id);
  if (idx >= 0) listState.cursor = idx;
  renderMessage(msg);
}

function certificateProblems(msg) {
  const problems = [];
  if (msg.warning) problems.push(msg.warning);
  const p = msg.protection || {};
  if (p.verified === false && !msg.warning) problems.push('This message failed its integrity check. Its content may have been changed after it was sealed.');
  const c = msg.certificate;
  if (c && c.signature === 'invalid') problems.push('The certificate’s signature is invalid: the appliance that sealed this message cannot be confirmed.');
  return problems;
}

function renderMessage(msg) {
  const problems = certificateProblems(msg);
  const cert = msg.certificate;
  const certId = 'certificate-panel';
  const badge = protectionBadge(msg.protection);
  const badgeButton = (cert || badge || msg.protection)
    ? h('button', { type: 'button', class: 'badge-toggle', id: 'badge-toggle', 'aria-expanded': 'false',
      'aria-controls': certId, onclick: (ev) => {
        const panel = $(`#${certId}`);
        const open = panel.hidden;
        panel.hidden = !open;
        ev.currentTarget.setAttribute('aria-expanded', String(open));
      } }, badge || h('span', { class: 'badge badge-plain' }, 'Not quantum secured'),
      h('span', { class: 'visually-hidden' }, 'Show the certificate'), icon('expand', 'icon small chevron'))
    : null;
  const others = (msg.to || []).map(addrText).join(', ');
  const ccs = (msg.cc || []).map(addrText).join(', ');
  const atts = msg.attachments || [];
  const body = h('div', { class: 'body-text', id: 'message-body' });
  body.textContent = msg.text || '';
  const idx = listState.messages.findIndex((m) => m.id === msg.id);
  setMain(h('article', { class: 'reader', 'aria-labelledby': 'message-subject' },
    h('div', { class: 'toolbar', role: 'toolbar', 'aria-label': 'Message actions' },
      iconButton('back', 'Back to the list (u)', () => navigate(listState.hash || '#/inbox'), { id: 'back-button' }),
      archiveFolder() && iconButton('archive', 'Archive (e)', () => archiveMessages([msg])),
      iconButton('trash', 'Delete (#)', () => deleteMessages([msg]), { id: 'delete-button' }),
      iconButton('unread', 'Mark as unread (Shift+U)', async () => {
        await patchMessages([msg], { seen: false });
        const inList = listState.messages.find((m) => m.id === msg.id);
        if (inList) inList.seen = false;
        loadFolders();
        navigate(listState.hash || '#/inbox');
      }),
      moveSelect(() => [msg]),
      h('span', { class: 'spacer' }),
      idx >= 0 && h('span', { class: 'range' }, `${idx + (listState.page - 1) * PER_PAGE + 1} of ${listState.total}`),
      iconButton('prev', 'Newer (k)', () => stepMessage(-1), { disabled: idx <= 0 }),
      iconButton('next', 'Older (j)', () => stepMessage(1), { disabled: idx < 0 || idx >= listState.messages.length - 1 })),
    h('header', { class: 'reader-head' },
      h('h1', { id: 'message-subject' }, msg.subject || '(no subject)'),
      badgeButton, h('span', { class: 'spacer' }), starButton(msg)),
    problems.length > 0 && h('div', { class: 'alert alert-danger', role: 'alert', id: 'verification-warning' },
      icon('warning'), h('div', {},
        h('strong', {}, 'Warning: this message did not pass verification.'),
        problems.map((p) => h('p', {}, p)),
        h('p', {}, 'Do not trust its content or attachments until you have confirmed it with the sender.'))),
    cert ? certificatePanel(cert, msg, certId, problems.length > 0) : badgeButton && h('div', { class: 'certificate', id: certId, hidden: true },
      h('p', { id: 'no-certificate' }, msg.protection && msg.protection.mode === 'normal'
        ? 'Sent in Normal mode: protected by TLS in transit and encrypted at rest on the appliance, without a quantum key.'
        : `Protected with ${modeName(msg.protection && msg.protection.mode)}; no certificate is attached to this message.`)),
    h('div', { class: 'sender' },
      h('div', { class: 'avatar', 'aria-hidden': 'true' }, addrName(msg.from).slice(0, 1).toUpperCase()),
      h('div', { class: 'who' },
        h('p', {}, h('strong', {}, (msg.from && msg.from.name) || (msg.from && msg.from.address) || ''),
          msg.from && msg.from.name && h('span', { class: 'muted' }, ` <${msg.from.address}>`)),
        h('p', { class: 'muted' }, `to ${others || '(no recipients)'}`),
        ccs && h('p', { class: 'muted' }, `cc ${ccs}`)),
      h('time', { class: 'muted', datetime: msg.date || '' }, longDate(msg.date))),
    body,
    atts.length > 0 && h('section', { class: 'attachments', 'aria-label': 'Attachments' },
      h('h2', {}, `${atts.length} attachment${atts.length === 1 ? '' : 's'}`),
      h('ul', {}, atts.map((a) => h('li', { class: 'attachment' },
        icon('attach'),
        h('span', { class: 'name' }, a.filename || `attachment-${a.index}`),
        h('span', { class: 'muted' }, formatBytes(a.size)),
        h('button', { type: 'button', class: 'btn small download', 'data-index': String(a.index),
          'aria-label': `Download ${a.filename || 'attachment'}`, onclick: () => downloadAttachment(msg, a) },
        icon('download', 'icon small'), 'Download'))))),
    h('div', { class: 'reply-bar' },
      h('button', { type: 'button', class: 'btn', id: 'reply-button', onclick: () => navigate(`#/compose?reply=${enc(msg.id)}`) },
        icon('reply', 'icon small'), 'Reply'),
      (msg.to || []).length + (msg.cc || []).length > 1 && h('button', { type: 'button', class: 'btn',
        onclick: () => navigate(`#/compose?replyall=${enc(msg.id)}`) }, icon('reply', 'icon small'), 'Reply all'),
      h('button', { type: 'button', class: 'btn', id: 'forward-button', onclick: () => navigate(`#/compose?forward=${enc(msg.id)}`) },
        icon('forward', 'icon small'), 'Forward'),
      h('button', { type: 'button', class: 'btn subtle', onclick: () => downloadRaw(msg) }, 'Show original'))));
  document.title = `${msg.subject || '(no subject)'} – QuteMail`;
  const heading = $('#message-subject');
  if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

function certificatePanel(c, msg, id, failing) {
  const sig = c.signature || 'absent';
  const sigText = { valid: 'Valid', invalid: 'INVALID', absent: 'Not signed' }[sig] || sig;
  const row = (label, ...value) => [h('dt', {}, label), h('dd', {}, ...value)];
  const about = modesCache.data && (modesCache.data.modes || []).find((m) => m.id === c.mode);
  return h('section', { class: `certificate${failing ? ' certificate-bad' : ''}`, id, hidden: true,
    'aria-label': 'Quantum security certificate' },
  h('h2', {}, icon(failing ? 'warning' : 'shield', 'icon small'),
    failing ? 'Quantum security certificate – verification failed' : 'Quantum security certificate'),
  about && about.description && h('p', { class: 'cert-about' }, about.description),
    h('dl', {},
      row('Protection', h('span', { id: 'cert-mode' }, modeName(c.mode)), c.algorithm && h('span', { class: 'muted' }, ` · ${c.algorithm}`)),
      row('Key IDs', (c.key_ids && c.key_ids.length)
        ? h('ul', { class: 'key-ids', id: 'cert-key-ids' }, c.key_ids.map((k) => h('li', {}, h('code', {}, k))))
        : h('span', { class: 'muted' }, 'none (no quantum key)')),
      row('QKD link', c.link_id || '—', (c.source_kme_id || c.target_kme_id) && h('span', { class: 'muted' },
        ` (${c.source_kme_id || '?'} → ${c.target_kme_id || '?'})`)),
      row('QBER at key time', h('span', { id: 'cert-qber', class: typeof c.qber === 'number' && c.qber > 0.11 ? 'bad' : null },
        formatQber(c.qber))),
      row('Secret key rate', formatRate(c.secret_key_rate_bps)),
      row('Sealed', longDate(c.sealed_at) || '—'),
      row('Signature', h('span', { id: 'cert-signature', class: `sig sig-${sig}` },
        icon(sig === 'valid' ? 'shield' : 'warning', 'icon small'), sigText), c.signer && h('span', { class: 'muted' }, ` by ${c.signer}`)),
      row('Integrity', msg.protection && msg.protection.verified === false
        ? h('span', { class: 'sig sig-invalid' }, icon('warning', 'icon small'), 'Failed')
        : h('span', { class: 'sig sig-valid' }, icon('shield', 'icon small'), 'Verified'))));
}

function stepMessage(delta) {
  if (!openMessageData) return;
  const idx = listState.messages.findIndex((m) => m.id === openMessageData.id);
  const next = listState.messages[idx + delta];
  if (idx >= 0 && next) {
    listState.cursor = idx + delta;
    navigate(`#/message/${enc(next.id)}`);
  }
}

/** Fetches with the bearer token (a plain link cannot carry it) and saves through a blob URL. */
async function saveFrom(url, filename) {
  try {
    const resp = await api('GET', url, { raw: true });
    const blob = await resp.blob();
    const href = URL.createObjectURL(blob);
    const a = h('a', { href, download: filename, class: 'visually-hidden' });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60000);
  } catch (err) {
    toast(`The download failed: ${errorText(err)}`, 'error');
  }
}

const downloadAttachment = (msg, a) =>
  saveFrom(`/api/mail/${enc(msg.id)}/attachments/${a.index}/`, a.filename || `attachment-${a.index}`);
const downloadRaw = (msg) => saveFrom(`/api/mail/${enc(msg.id)}/raw/`, `${(msg.subject || 'message').replace(/[^\w.-]+/g, '_').slice(0, 60)}.eml`);

// ---------------------------------------------------------------------------------------------
// Compose
// ---------------------------------------------------------------------------------------------

async function loadModes() {
  if (modesCache.data) return modesCache.data;
  try {
    modesCache.data = await api('GET', '/api/modes/');
  } catch {
    // Without the list the selector still offers the four modes (the server still refuses an OTP
    // message over its limit); not cached, so the next screen asks again.
    return { modes: ['hybrid', 'qaes', 'otp', 'normal'].map((id) => ({ id, name: modeName(id), description: '', max_bytes: null })), default: 'hybrid' };
  }
  return modesCache.data;
}

const utf8Length = (text) => new TextEncoder().encode(text || '').length;

/** Size of the MIME message the server will build, estimated: headers + bodies + base64 attachments. */
function estimateMessageBytes(state) {
  const headers = 600 + utf8Length(state.subject) + utf8Length(state.recipients.join(','));
  const bodies = utf8Length(state.text) + (state.html ? utf8Length(state.html) + 200 : 0);
  const atts = state.attachments.reduce((sum, a) => sum + Math.ceil(a.size / 3) * 4 * (78 / 76) + 200, 0);
  return Math.ceil(headers + bodies + atts);
}

/** Keeps only harmless formatting from the rich editor (no attributes, no styles, no scripts). */
function sanitizeHtml(root) {
  const allowed = new Set(['B', 'STRONG', 'I', 'EM', 'U', 'UL', 'OL', 'LI', 'BR', 'P', 'DIV', 'BLOCKQUOTE']);
  const out = document.createElement('div');
  const walk = (src, dst) => {
    for (const node of src.childNodes) {
      if (node.nodeType === Node.TEXT_NODE) dst.append(document.createTextNode(node.data));
      else if (node.nodeType === Node.ELEMENT_NODE) {
        if (allowed.has(node.tagName)) {
          const copy = document.createElement(node.tagName.toLowerCase());
          walk(node, copy);
          dst.append(copy);
        } else if (node.tagName !== 'SCRIPT' && node.tagName !== 'STYLE') {
          walk(node, dst);
        }
      }
    }
  };
  walk(root, out);
  return out.innerHTML;
}

async function showCompose(params) {
  document.title = 'Compose – QuteMail';
  setMain(h('p', { class: 'empty', role: 'status' }, 'Opening the editor…'));
  const modes = await loadModes();
  const draft = { to: '', cc: '', bcc: '', subject: '', text: '', inReplyTo: null, draftId: null, attachments: [] };
  let forwardFrom = null;
  const sourceId = params.get('reply') || params.get('replyall') || params.get('forward') || params.get('draft');
  if (sourceId) {
    try {
      const src = await api('GET', `/api/mail/${enc(sourceId)}/decrypt/`);
      const me = session.account ? session.account.address : '';
      const quoted = (src.text || '').split('\n').map((l) => `> ${l}`).join('\n');
      const header = `On ${longDate(src.date)}, ${addrText(src.from)} wrote:`;
      if (params.get('draft')) {
        Object.assign(draft, { to: (src.to || []).map((a) => a.address).join(', '), cc: (src.cc || []).map((a) => a.address).join(', '),
          subject: src.subject || '', text: src.text || '', draftId: src.id });
      } else if (params.get('forward')) {
        draft.subject = /^fwd?:/i.test(src.subject || '') ? src.subject : `Fwd: ${src.subject || ''}`;
        draft.text = `\n\n---------- Forwarded message ---------\nFrom: ${addrText(src.from)}\nDate: ${longDate(src.date)}\nSubject: ${src.subject || ''}\nTo: ${(src.to || []).map(addrText).join(', ')}\n\n${src.text || ''}`;
        forwardFrom = src;
      } else {
        draft.subject = /^re:/i.test(src.subject || '') ? src.subject : `Re: ${src.subject || ''}`;
        draft.to = src.from ? src.from.address : '';
        if (params.get('replyall')) {
          draft.cc = [...(src.to || []), ...(src.cc || [])].map((a) => a.address)
            .filter((a) => a !== me && a !== draft.to).join(', ');
        }
        draft.text = `\n\n${header}\n${quoted}`;
        draft.inReplyTo = src.id;
      }
    } catch (err) {
      toast(`The original message could not be opened: ${errorText(err)}`, 'error');
    }
  } else if (params.get('to')) {
    draft.to = params.get('to');
  }
  if (parseHash().name !== 'compose') return;
  renderCompose(draft, modes, forwardFrom);
}

function renderCompose(draft, modes, forwardFrom) {
  const account = session.account || {};
  const defaultMode = account.default_mode || modes.default || 'hybrid';
  const uploads = []; // {upload_id, filename, size, content_type, pending}
  let richMode = true;

  const to = h('input', { type: 'text', id: 'compose-to', name: 'to', value: draft.to, autocomplete: 'email',
    spellcheck: 'false', autocapitalize: 'off', placeholder: 'name@site.example' });
  const cc = h('input', { type: 'text', id: 'compose-cc', name: 'cc', value: draft.cc, spellcheck: 'false', autocapitalize: 'off' });
  const bcc = h('input', { type: 'text', id: 'compose-bcc', name: 'bcc', value: draft.bcc, spellcheck: 'false', autocapitalize: 'off' });
  const ccRow = h('div', { class: 'compose-row', hidden: !draft.cc }, h('label', { for: 'compose-cc' }, 'Cc'), cc);
  const bccRow = h('div', { class: 'compose-row', hidden: !draft.bcc }, h('label', { for: 'compose-bcc' }, 'Bcc'), bcc);
  const subject = h('input', { type: 'text', id: 'compose-subject', name: 'subject', value: draft.subject });
  const editor = h('div', { class: 'editor', id: 'compose-body', contenteditable: 'true', role: 'textbox',
    'aria-multiline': 'true', 'aria-label': 'Message body', spellcheck: 'true' });
  editor.textContent = draft.text;
  const plain = h('textarea', { class: 'editor plain', id: 'compose-plain', 'aria-label': 'Message body (plain text)', hidden: true });
  const keyStatus = h('p', { class: 'key-status muted', id: 'key-status', 'aria-live': 'polite' });
  const sizeWarning = h('p', { class: 'alert alert-danger small', id: 'otp-warning', role: 'alert', hidden: true });
  const serverError = h('div', { class: 'alert alert-danger', id: 'compose-error', role: 'alert', hidden: true });
  const attachList = h('ul', { class: 'upload-list', id: 'upload-list', 'aria-label': 'Attachments' });
  const fileInput = h('input', { type: 'file', id: 'compose-file', multiple: true, class: 'visually-hidden',
    onchange: (ev) => {
      Array.from(ev.target.files || []).forEach(uploadFile);
      ev.target.value = '';
    } });
  const sendButton = h('button', { type: 'submit', class: 'btn primary', id: 'send-button' }, icon('send', 'icon small'), 'Send');

  // One row of choices; the explanation of the chosen mode (from GET /api/modes/) sits under it.
  const modeHelp = h('p', { class: 'mode-help', id: 'mode-help', 'aria-live': 'polite' });
  const describeMode = () => {
    const m = modes.modes.find((x) => x.id === selectedMode());
    modeHelp.replaceChildren(m ? h('strong', {}, `${m.name || modeName(m.id)}: `) : '', m ? m.description || '' : '',
      m && m.max_bytes ? ` Limit: ${formatBytes(m.max_bytes)} per message.` : '');
  };
  const modeOptions = modes.modes.map((m) => {
    const radio = h('input', { type: 'radio', name: 'mode', value: m.id, id: `mode-${m.id}`,
      'data-max-bytes': m.max_bytes ?? null,
      checked: m.id === defaultMode, 'aria-describedby': 'mode-help', onchange: () => {
        describeMode();
        if (!checkSize()) sizeWarning.scrollIntoView({ block: 'nearest' });
      } });
    return h('label', { class: `mode-option mode-${m.id}`, for: `mode-${m.id}`, title: m.description || '' }, radio,
      h('span', { class: 'mode-name' }, m.name || modeName(m.id)));
  });
  if (!modes.modes.some((m) => m.id === defaultMode) && modeOptions[0]) $('input', modeOptions[0]).checked = true;
  const modeSet = h('fieldset', { class: 'modes', id: 'mode-selector' },
    h('legend', {}, 'Protection'), h('div', { class: 'mode-options' }, modeOptions), modeHelp);

  const selectedMode = () => {
    const r = $('input[name=mode]:checked', modeSet);
    return r ? r.value : null;
  };

  const bodyState = () => {
    if (richMode) {
      const html = sanitizeHtml(editor);
      const text = editor.innerText.replace(/\u00a0/g, ' ');
      const hasFormatting = /<(b|strong|i|em|u|ul|ol|blockquote)>/.test(html);
      return { text, html: hasFormatting ? `<!doctype html><html><body>${html}</body></html>` : null };
    }
    return { text: plain.value, html: null };
  };

  function state() {
    const body = bodyState();
    return {
      recipients: [...parseAddresses(to.value), ...parseAddresses(cc.value), ...parseAddresses(bcc.value)],
      subject: subject.value,
      text: body.text,
      html: body.html,
      attachments: uploads.filter((u) => !u.pending && !u.error),
    };
  }

  function checkSize() {
    const mode = modes.modes.find((m) => m.id === selectedMode());
    serverError.hidden = true;
    if (!mode || !mode.max_bytes) {
      sizeWarning.hidden = true;
      return true;
    }
    const estimate = estimateMessageBytes(state());
    if (estimate > mode.max_bytes) {
      sizeWarning.textContent = `This message is about ${formatBytes(estimate)}, over the ${formatBytes(mode.max_bytes)} a One-Time Pad can protect (it needs as much key as message). Remove attachments or text, or choose Hybrid or Quantum-Aided AES.`;
      sizeWarning.hidden = false;
      return false;
    }
    sizeWarning.hidden = true;
    return true;
  }

  function renderUploads() {
    attachList.replaceChildren(...uploads.map((u) => h('li', { class: `upload${u.pending ? ' pending' : ''}${u.error ? ' failed' : ''}` },
      icon('attach', 'icon small'),
      h('span', { class: 'name' }, u.filename),
      h('span', { class: 'muted' }, u.error ? u.error : u.pending ? 'uploading…' : formatBytes(u.size)),
      h('button', { type: 'button', class: 'icon-btn small', 'aria-label': `Remove ${u.filename}`, onclick: () => {
        uploads.splice(uploads.indexOf(u), 1);
        renderUploads();
      } }, icon('close')))));
    checkSize();
  }

  async function uploadBlob(blob, filename) {
    const entry = { filename, size: blob.size, pending: true };
    uploads.push(entry);
    renderUploads();
    const fd = new FormData();
    fd.append('file', blob, filename);
    try {
      const res = await api('POST', '/api/mail/attachments/', { body: fd });
      Object.assign(entry, res, { pending: false });
    } catch (err) {
      entry.pending = false;
      entry.error = err.code === 'payload_too_large' ? `too large: ${err.message}` : errorText(err);
    }
    renderUploads();
  }
  const uploadFile = (file) => uploadBlob(file, file.name);

  if (forwardFrom && (forwardFrom.attachments || []).length) {
    // Forwarding keeps the attachments: fetch each and upload it again for the new message.
    for (const a of forwardFrom.attachments) {
      api('GET', `/api/mail/${enc(forwardFrom.id)}/attachments/${a.index}/`, { raw: true })
        .then((r) => r.blob())
        .then((blob) => uploadBlob(blob, a.filename || `attachment-${a.index}`))
        .catch((err) => toast(`${a.filename} could not be forwarded: ${errorText(err)}`, 'error'));
    }
  }

  let keyCheck = null;
  async function checkKeys() {
    const first = parseAddresses(to.value)[0];
    if (!first || !looksLikeAddress(first)) {
      keyStatus.textContent = '';
      return;
    }
    const ticket = (keyCheck = {});
    try {
      const k = await api('POST', '/api/qkd/request_key/', { json: { recipient: first } });
      if (ticket !== keyCheck) return;
      keyStatus.replaceChildren(icon(k.ready ? 'key' : 'warning', 'icon small'), k.ready
        ? `QKD link to ${k.peer_domain} ready: ${k.available_keys} keys available. Sent now: ${modeName(k.mode_if_sent_now)}.`
        : `No quantum keys ready for ${k.peer_domain || first.split('@')[1]}. Sent now: ${modeName(k.mode_if_sent_now)}.`);
    } catch {
      if (ticket === keyCheck) keyStatus.textContent = '';
    }
  }

  const fmt = (cmd, label, iconName) => h('button', { type: 'button', class: 'icon-btn small', 'aria-label': label, title: label,
    onmousedown: (ev) => ev.preventDefault(),
    onclick: () => {
      editor.focus();
      // execCommand is deprecated but remains the only built-in rich-text editing in browsers.
      document.execCommand(cmd, false);
    } }, icon(iconName));
  const fmtBar = h('div', { class: 'format-bar', role: 'toolbar', 'aria-label': 'Formatting' },
    fmt('bold', 'Bold (Ctrl+B)', 'bold'), fmt('italic', 'Italic (Ctrl+I)', 'italic'), fmt('underline', 'Underline (Ctrl+U)', 'underline'),
    fmt('insertUnorderedList', 'Bulleted list', 'bullets'), fmt('insertOrderedList', 'Numbered list', 'numbers'),
    h('span', { class: 'spacer' }),
    h('button', { type: 'button', class: 'link-btn', id: 'plain-toggle', 'aria-pressed': 'false', onclick: (ev) => {
      richMode = !richMode;
      if (richMode) {
        editor.textContent = plain.value;
      } else {
        plain.value = editor.innerText;
      }
      editor.hidden = !richMode;
      plain.hidden = richMode;
      $$('.icon-btn', fmtBar).forEach((b) => { b.disabled = !richMode; });
      ev.currentTarget.setAttribute('aria-pressed', String(!richMode));
      ev.currentTarget.textContent = richMode ? 'Plain text' : 'Rich text';
      (richMode ? editor : plain).focus();
    } }, 'Plain text'));

  const form = h('form', { class: 'compose', id: 'compose-form', novalidate: true, 'aria-labelledby': 'compose-title' },
    h('div', { class: 'compose-head' }, h('h1', { id: 'compose-title' }, draft.inReplyTo ? 'Reply' : forwardFrom ? 'Forward' : 'New message'),
      iconButton('close', 'Discard and close', () => navigate(listState.hash || '#/inbox'))),
    h('div', { class: 'compose-row' }, h('label', { for: 'compose-to' }, 'To'), to,
      h('span', { class: 'cc-toggles' },
        h('button', { type: 'button', class: 'link-btn', onclick: () => { ccRow.hidden = false; cc.focus(); } }, 'Cc'),
        h('button', { type: 'button', class: 'link-btn', onclick: () => { bccRow.hidden = false; bcc.focus(); } }, 'Bcc'))),
    ccRow, bccRow,
    h('div', { class: 'compose-row' }, h('label', { for: 'compose-subject' }, 'Subject'), subject),
    keyStatus,
    fmtBar, editor, plain,
    attachList,
    modeSet,
    sizeWarning, serverError,
    h('div', { class: 'compose-actions' },
      sendButton,
      h('label', { class: 'btn', for: 'compose-file', tabindex: '0', role: 'button', id: 'attach-button',
        onkeydown: (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); fileInput.click(); } } },
      icon('attach', 'icon small'), 'Attach files'), fileInput,
      h('button', { type: 'button', class: 'btn subtle', id: 'save-draft', onclick: saveDraft }, 'Save draft'),
      h('span', { class: 'spacer' }),
      iconButton('trash', 'Discard', () => navigate(listState.hash || '#/inbox'))));

  to.addEventListener('change', checkKeys);
  to.addEventListener('blur', checkKeys);
  for (const el of [to, cc, bcc, subject, editor, plain]) el.addEventListener('input', () => checkSize());

  function payload() {
    const st = state();
    return {
      to: parseAddresses(to.value), cc: parseAddresses(cc.value), bcc: parseAddresses(bcc.value),
      subject: subject.value, text: st.text, html: st.html, mode: selectedMode(),
      attachments: st.attachments.map((u) => u.upload_id),
      ...(draft.inReplyTo ? { in_reply_to: draft.inReplyTo } : {}),
      ...(draft.draftId ? { draft_id: draft.draftId } : {}),
    };
  }

  async function saveDraft() {
    try {
      const body = payload();
      const res = draft.draftId
        ? await api('PUT', `/api/mail/drafts/${enc(draft.draftId)}`, { json: body })
        : await api('POST', '/api/mail/drafts/', { json: body });
      if (res && res.id) draft.draftId = res.id;
      toast('Draft saved.');
      loadFolders();
    } catch (err) {
      toast(`The draft could not be saved: ${errorText(err)}`, 'error');
    }
  }

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    serverError.hidden = true;
    const body = payload();
    const all = [...body.to, ...body.cc, ...body.bcc];
    const bad = all.filter((a) => !looksLikeAddress(a));
    if (!all.length) return showServerError('Add at least one recipient.');
    if (bad.length) return showServerError(`Not an email address: ${bad.join(', ')}`);
    if (uploads.some((u) => u.pending)) return showServerError('Wait until the attachments have finished uploading.');
    if (uploads.some((u) => u.error)) return showServerError('Remove the attachments that failed to upload first.');
    if (!checkSize()) {
      sizeWarning.focus();
      return;
    }
    if (!body.subject.trim() && !window.confirm('Send this message without a subject?')) return;
    sendButton.disabled = true;
    sendButton.lastChild.textContent = 'Sending…';
    try {
      const res = await api('POST', '/api/mail/compose/', { json: body });
      const used = res && res.mode ? modeName(res.mode) : modeName(body.mode);
      const secured = res && ['hybrid', 'qaes', 'otp'].includes(res.mode);
      toast(`Message sent · ${used}${secured ? ' · Quantum Secured' : ''}`, 'success',
        res && res.id ? { label: 'View message', run: () => navigate(`#/message/${enc(res.id)}`) } : null);
      loadFolders();
      navigate(listState.hash && !listState.hash.startsWith('#/compose') ? listState.hash : '#/inbox');
    } catch (err) {
      if (err.code === 'otp_too_large') {
        const d = err.details || {};
        showServerError(`${err.message}${d.limit_bytes ? ` (message ${formatBytes(d.message_bytes)}, One-Time Pad limit ${formatBytes(d.limit_bytes)})` : ''} Choose Hybrid or Quantum-Aided AES.`);
      } else if (err.code === 'mode_unavailable') {
        showServerError(`${err.message} Choose another protection mode.`);
      } else {
        showServerError(`The message was not sent: ${errorText(err)}`);
      }
    } finally {
      sendButton.disabled = false;
      sendButton.lastChild.textContent = 'Send';
    }
  });

  function showServerError(text) {
    serverError.textContent = text;
    serverError.hidden = false;
    serverError.scrollIntoView({ block: 'nearest' });
  }

  editor.addEventListener('keydown', (ev) => {
    if ((ev.ctrlKey || ev.metaKey) && ev.key === 'Enter') {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener('keydown', (ev) => {
    if ((ev.ctrlKey || ev.metaKey) && ev.key === 'Enter') {
      ev.preventDefault();
      form.requestSubmit();
    }
  });

  setMain(form);
  describeMode();
  (draft.to ? (draft.inReplyTo ? editor : subject) : to).focus();
  if (draft.inReplyTo) {
    const range = document.createRange();
    range.setStart(editor, 0);
    range.collapse(true);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }
  if (draft.to) checkKeys();
  checkSize();
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

async function showSettings() {
  document.title = 'Settings – QuteMail';
  const modes = await loadModes();
  let account = session.account || {};
  try {
    account = await api('GET', '/api/account/');
    session.account = account;
  } catch (err) {
    toast(`Your settings could not be loaded: ${errorText(err)}`, 'error');
  }
  const display = h('input', { type: 'text', id: 'settings-display-name', value: account.display_name || '' });
  const mode = h('select', { id: 'settings-default-mode' },
    modes.modes.map((m) => h('option', { value: m.id, selected: m.id === (account.default_mode || modes.default) }, m.name || modeName(m.id))));
  const recovery = h('input', { type: 'email', id: 'settings-recovery', value: account.recovery_address || '' });
  const general = h('form', { class: 'card settings-form', id: 'settings-form', novalidate: true },
    h('h2', {}, 'General'),
    h('p', { class: 'muted' }, `Signed in as ${account.address || ''}`),
    field('Name shown to recipients', display),
    field('Default protection for new messages', mode, 'Hybrid is safe if either the quantum key or ML-KEM holds.'),
    field('Recovery address', recovery, 'Password reset tokens are sent here. Use a mailbox outside this account.'),
    h('p', { class: 'form-error', role: 'alert', hidden: true }),
    h('button', { type: 'submit', class: 'btn primary' }, 'Save changes'));
  general.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearFormError(general);
    if (recovery.value.trim() && !looksLikeAddress(recovery.value.trim())) return formError(general, 'The recovery address is not an email address.');
    try {
      session.account = await api('PUT', '/api/account/settings/', { json: {
        display_name: display.value.trim(), default_mode: mode.value, recovery_address: recovery.value.trim() || null } });
      toast('Settings saved.', 'success');
    } catch (err) {
      formError(general, err);
    }
  });
  const current = h('input', { type: 'password', id: 'pw-current', autocomplete: 'current-password' });
  const next = h('input', { type: 'password', id: 'pw-new', autocomplete: 'new-password' });
  const again = h('input', { type: 'password', id: 'pw-again', autocomplete: 'new-password' });
  const pwForm = h('form', { class: 'card settings-form', id: 'password-form', novalidate: true },
    h('h2', {}, 'Change password'),
    // Lets password managers file the new password under the right account.
    h('input', { type: 'text', name: 'username', autocomplete: 'username', value: account.address || '', hidden: true, readonly: true }),
    field('Current password', current),
    field('New password', next, 'At least 10 characters. Your other sessions are signed out.'),
    field('Repeat the new password', again),
    h('p', { class: 'form-error', role: 'alert', hidden: true }),
    h('button', { type: 'submit', class: 'btn primary' }, 'Change password'));
  pwForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearFormError(pwForm);
    if (next.value.length < 10) return formError(pwForm, 'The new password needs at least 10 characters.');
    if (next.value !== again.value) return formError(pwForm, 'The two new passwords differ.');
    try {
      await api('POST', '/api/auth/password/', { json: { current_password: current.value, new_password: next.value } });
      pwForm.reset();
      toast('Password changed. Other sessions were signed out.', 'success');
    } catch (err) {
      formError(pwForm, err.code === 'invalid_credentials' ? 'The current password is wrong.' : err);
    }
  });
  setMain(h('section', { class: 'page' }, h('h1', {}, 'Settings'), general, pwForm,
    h('section', { class: 'card' }, h('h2', {}, 'Keyboard shortcuts'), shortcutTable())));
}

// ---------------------------------------------------------------------------------------------
// Admin console
// ---------------------------------------------------------------------------------------------

const CHART_W = 600;
const CHART_H = 160;
const PAD = { l: 56, r: 12, t: 12, b: 24 };

/** A line chart of `series` ([{t, v}] per link) as an SVG with axes and an accessible summary. */
function lineChart(title, series, { format = (v) => String(v), threshold = null, id } = {}) {
  const points = series.flatMap((s) => s.points);
  const last = series.map((s) => (s.points.length ? `${s.name}: ${format(s.points[s.points.length - 1].v)}` : null)).filter(Boolean);
  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${CHART_W} ${CHART_H}`, role: 'img', id,
    'aria-label': `${title}. ${last.length ? `Now ${last.join(', ')}.` : 'No samples yet.'}` },
  s('title', {}, title));
  const x0 = PAD.l;
  const x1 = CHART_W - PAD.r;
  const y0 = CHART_H - PAD.b;
  const y1 = PAD.t;
  svg.append(s('line', { x1: x0, y1: y0, x2: x1, y2: y0, class: 'axis' }), s('line', { x1: x0, y1, x2: x0, y2: y0, class: 'axis' }));
  if (!points.length) {
    svg.append(s('text', { x: (x0 + x1) / 2, y: (y0 + y1) / 2, class: 'chart-empty', 'text-anchor': 'middle' }, 'Waiting for samples…'));
    return svg;
  }
  const tMin = Math.min(...points.map((p) => p.t));
  const tMax = Math.max(...points.map((p) => p.t));
  let vMin = Math.min(0, ...points.map((p) => p.v));
  let vMax = Math.max(...points.map((p) => p.v), threshold ?? -Infinity);
  if (vMax === vMin) vMax = vMin + 1;
  vMax += (vMax - vMin) * 0.08;
  const sx = (t) => (tMax === tMin ? x1 : x0 + ((t - tMin) / (tMax - tMin)) * (x1 - x0));
  const sy = (v) => y0 - ((v - vMin) / (vMax - vMin)) * (y0 - y1);
  for (const frac of [0, 0.5, 1]) {
    const v = vMin + (vMax - vMin) * frac;
    svg.append(s('line', { x1: x0, y1: sy(v), x2: x1, y2: sy(v), class: 'grid' }),
      s('text', { x: x0 - 6, y: sy(v) + 4, class: 'tick', 'text-anchor': 'end' }, format(v)));
  }
  const time = (t) => new Date(t).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  svg.append(s('text', { x: x0, y: CHART_H - 6, class: 'tick' }, time(tMin)),
    s('text', { x: x1, y: CHART_H - 6, class: 'tick', 'text-anchor': 'end' }, time(tMax)));
  if (threshold !== null) {
    svg.append(s('line', { x1: x0, y1: sy(threshold), x2: x1, y2: sy(threshold), class: 'threshold' }),
      s('text', { x: x1 - 4, y: sy(threshold) - 4, class: 'tick threshold-label', 'text-anchor': 'end' }, `limit ${format(threshold)}`));
  }
  series.forEach((ser, i) => {
    if (!ser.points.length) return;
    const d = ser.points.map((p, j) => `${j ? 'L' : 'M'}${sx(p.t).toFixed(1)},${sy(p.v).toFixed(1)}`).join(' ');
    svg.append(s('path', { d, class: `series series-${i % 4}` }));
    const lastP = ser.points[ser.points.length - 1];
    svg.append(s('circle', { cx: sx(lastP.t), cy: sy(lastP.v), r: 3, class: `dot series-${i % 4}` }));
  });
  return svg;
}

function table(columns, rows, { empty = 'Nothing here.', id, caption } = {}) {
  if (!rows.length) return h('p', { class: 'muted', id }, empty);
  return h('div', { class: 'table-wrap' }, h('table', { class: 'data', id },
    caption && h('caption', { class: 'visually-hidden' }, caption),
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c.label)))),
    h('tbody', {}, rows.map((r) => h('tr', {}, columns.map((c) => h('td', { 'data-label': c.label }, c.render ? c.render(r) : String(r[c.key] ?? '—'))))))));
}

function alarmText(a) {
  if (typeof a === 'string') return a;
  if (a && typeof a === 'object') return a.message || a.description || a.kind || a.name || JSON.stringify(a);
  return String(a);
}

async function showAdmin() {
  document.title = 'Admin console – QuteMail';
  if (!(session.account && session.account.is_admin)) {
    return setMain(h('div', { class: 'empty error-state', role: 'alert' }, 'The admin console is for operators. Your account is not an administrator.'));
  }
  renderFolders();
  const linksBox = h('div', { id: 'admin-links', class: 'link-cards', 'aria-live': 'polite' }, h('p', { class: 'muted' }, 'Loading links…'));
  const chartsBox = h('div', { id: 'admin-charts', class: 'charts' });
  const linksError = h('p', { class: 'alert alert-danger', role: 'alert', hidden: true });
  const alarmsBox = h('div', { id: 'admin-alarms' });
  const saesBox = h('div', { id: 'admin-saes' }, h('p', { class: 'muted' }, 'Loading…'));
  const usersBox = h('div', { id: 'admin-users' }, h('p', { class: 'muted' }, 'Loading…'));
  const queueBox = h('div', { id: 'admin-queue' }, h('p', { class: 'muted' }, 'Loading…'));
  const updated = h('span', { class: 'muted', id: 'admin-updated', 'aria-live': 'off' });

  const newAddress = h('input', { type: 'email', id: 'new-user-address', placeholder: 'carol@site.example', autocomplete: 'off' });
  const newPassword = h('input', { type: 'password', id: 'new-user-password', autocomplete: 'new-password' });
  const createForm = h('form', { class: 'inline-form', id: 'create-user-form', novalidate: true },
    field('Address', newAddress), field('Initial password', newPassword, 'At least 10 characters.'),
    h('button', { type: 'submit', class: 'btn primary' }, 'Create user'),
    h('p', { class: 'form-error', role: 'alert', hidden: true }));
  createForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearFormError(createForm);
    if (!looksLikeAddress(newAddress.value.trim())) return formError(createForm, 'Enter the new user’s full address.');
    if (newPassword.value.length < 10) return formError(createForm, 'The password needs at least 10 characters.');
    try {
      await api('POST', '/api/admin/users/', { json: { address: newAddress.value.trim(), password: newPassword.value } });
      toast(`User ${newAddress.value.trim()} created.`, 'success');
      createForm.reset();
      loadUsers();
    } catch (err) {
      formError(createForm, err);
    }
  });

  const nav = h('nav', { class: 'admin-tabs', 'aria-label': 'Admin sections' },
    ['links', 'alarms', 'saes', 'users', 'queue'].map((sec) => h('a', { href: `#/admin`, 'data-section': sec,
      onclick: (ev) => {
        ev.preventDefault();
        const target = $(`#section-${sec}`);
        if (target) {
          target.scrollIntoView({ block: 'start' });
          target.focus({ preventScroll: true });
        }
      } }, { links: 'QKD links', alarms: 'Alarms', saes: 'SAEs', users: 'Users', queue: 'Mail queue' }[sec])));

  const section = (id, title, ...content) => h('section', { class: 'card admin-section', id: `section-${id}`, tabindex: '-1',
    'aria-labelledby': `section-${id}-title` }, h('h2', { id: `section-${id}-title` }, title), ...content);

  setMain(h('div', { class: 'page admin', id: 'admin-console' },
    h('div', { class: 'page-head' }, h('h1', {}, 'Admin console'), updated),
    nav,
    section('links', 'QKD links and key pools', linksError, linksBox, chartsBox),
    section('alarms', 'Device alarms', alarmsBox),
    section('saes', 'Enrolled SAEs', saesBox),
    section('users', 'Users', createForm, usersBox),
    section('queue', 'Mail queue', queueBox)));

  let stopped = false;
  async function loadLinks() {
    try {
      const data = await api('GET', '/api/admin/links/');
      if (stopped) return;
      const links = data.links || [];
      const history = data.history || [];
      linksBox.replaceChildren(...(links.length ? links.map((l) => {
        const peak = Math.max(l.keys_available || 0, ...history.filter((x) => x.link_id === l.link_id).map((x) => x.keys_available || 0), 1);
        const healthy = (l.state || '').toLowerCase();
        return h('article', { class: `link-card state-${healthy.replace(/[^a-z]/g, '') || 'unknown'}`, 'data-link': l.link_id },
          h('h3', {}, l.link_id, h('span', { class: 'muted' }, ` · peer kmd ${l.peer || 'unknown'}`)),
          h('p', { class: 'link-state' }, h('span', { class: 'dot' }), l.state || 'unknown'),
          h('p', { class: 'pool' }, h('span', { class: 'big pool-level', 'data-keys': String(l.keys_available ?? '') }, String(l.keys_available ?? '—')), ' keys in pool'),
          h('meter', { min: 0, max: peak, value: l.keys_available || 0, low: peak * 0.1, optimum: peak, 'aria-label': `Key pool of ${l.link_id}` }),
          h('dl', { class: 'link-stats' },
            h('dt', {}, 'Key rate'), h('dd', {}, formatRate(l.key_rate_bps)),
            h('dt', {}, 'QBER'), h('dd', { class: typeof l.qber === 'number' && l.qber > 0.11 ? 'bad' : null }, formatQber(l.qber)),
            h('dt', {}, 'Alarms'), h('dd', { class: (l.alarms || []).length ? 'bad' : null }, String((l.alarms || []).length))));
      }) : [h('p', { class: 'muted' }, 'No QKD link data yet.')]));
      linksError.replaceChildren(data.error ? `kmd’s metrics: ${data.error}` : '');
      linksError.hidden = !data.error;
      const byLink = (key, scale = 1) => links.map((l) => ({ name: l.link_id,
        points: history.filter((x) => x.link_id === l.link_id && typeof x[key] === 'number').map((x) => ({ t: x.t, v: x[key] * scale })) }));
      chartsBox.replaceChildren();
      append(chartsBox, [
        h('figure', {}, h('figcaption', {}, 'Keys in pool'), lineChart('Keys in pool over time', byLink('keys_available'), { format: (v) => v.toFixed(0), id: 'chart-keys' })),
        h('figure', {}, h('figcaption', {}, 'Secret key rate (bit/s)'), lineChart('Secret key rate over time', byLink('key_rate_bps'), { format: (v) => (v >= 1000 ? `${(v / 1000).toFixed(1)}k` : v.toFixed(0)), id: 'chart-rate' })),
        h('figure', {}, h('figcaption', {}, 'QBER (%)'), lineChart('Quantum bit error rate over time', byLink('qber', 100), { format: (v) => v.toFixed(1), threshold: 11, id: 'chart-qber' })),
        links.length > 1 && h('p', { class: 'legend' }, links.map((l, i) => h('span', { class: `legend-item series-${i % 4}` }, l.link_id)))]);
      const alarms = links.flatMap((l) => (l.alarms || []).map((a) => ({ link: l.link_id, text: alarmText(a), raw: a })));
      alarmsBox.replaceChildren(alarms.length
        ? h('ul', { class: 'alarms', role: 'list' }, alarms.map((a) => h('li', { class: 'alarm' }, icon('warning', 'icon small'),
          h('strong', {}, a.link), ` ${a.text}`, a.raw && a.raw.since && h('span', { class: 'muted' }, ` since ${longDate(a.raw.since)}`))))
        : h('p', { class: 'ok-state' }, icon('shield', 'icon small'), 'No device alarms.'));
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (!stopped) linksBox.replaceChildren(h('p', { class: 'alert alert-danger', role: 'alert' }, `Links could not be loaded: ${errorText(err)}`));
    }
  }

  async function loadUsers() {
    try {
      const data = await api('GET', '/api/admin/users/');
      if (stopped) return;
      usersBox.replaceChildren(table([
        { label: 'Address', render: (u) => u.address },
        { label: 'Name', render: (u) => u.display_name || '' },
        { label: 'Role', render: (u) => (u.is_admin ? 'admin' : 'user') },
        { label: 'Status', render: (u) => h('span', { class: u.disabled ? 'bad' : 'good' }, u.disabled ? 'disabled' : 'active') },
        { label: 'Storage', render: (u) => formatBytes(u.quota_used) },
        { label: 'Actions', render: (u) => h('span', { class: 'actions' },
          h('button', { type: 'button', class: 'btn small', onclick: async () => {
            try {
              await api('PATCH', `/api/admin/users/${enc(u.address)}`, { json: { disabled: !u.disabled } });
              toast(`${u.address} ${u.disabled ? 'enabled' : 'disabled'}.`, 'success');
              loadUsers();
            } catch (err) {
              toast(errorText(err), 'error');
            }
          } }, u.disabled ? 'Enable' : 'Disable'),
          h('button', { type: 'button', class: 'btn small', onclick: async (ev) => {
            try {
              const t = await api('POST', `/api/admin/users/${enc(u.address)}/reset-token`);
              ev.target.closest('td').append(h('p', { class: 'reset-token' }, 'Reset token (give it to the user; valid until ',
                longDate(t.expires_at), '): ', h('code', {}, t.token)));
            } catch (err) {
              toast(errorText(err), 'error');
            }
          } }, 'Reset password')) },
      ], data.users || [], { empty: 'No users.', id: 'users-table', caption: 'Users' }));
    } catch (err) {
      if (!stopped) usersBox.replaceChildren(h('p', { class: 'alert alert-danger', role: 'alert' }, errorText(err)));
    }
  }

  async function loadQueue() {
    try {
      const data = await api('GET', '/api/admin/queue/');
      if (stopped) return;
      queueBox.replaceChildren(table([
        { label: 'Queue ID', render: (e) => h('code', {}, e.queue_id) },
        { label: 'Recipient', render: (e) => e.recipient },
        { label: 'State', render: (e) => h('span', { class: `queue-state state-${e.state}` }, e.state) },
        { label: 'Attempts', render: (e) => String(e.attempts ?? 0) },
        { label: 'Next attempt', render: (e) => longDate(e.next_attempt) || '—' },
        { label: 'Last error', render: (e) => e.last_error || '' },
      ], data.entries || [], { empty: 'The queue is empty: every message was delivered.', id: 'queue-table', caption: 'Mail queue' }));
    } catch (err) {
      if (!stopped) queueBox.replaceChildren(h('p', { class: 'alert alert-danger', role: 'alert' }, errorText(err)));
    }
  }

  async function loadSaes() {
    try {
      const data = await api('GET', '/api/admin/saes/');
      if (stopped) return;
      const list = Array.isArray(data) ? data : Object.values(data || {}).find(Array.isArray) || [];
      if (!list.length) {
        saesBox.replaceChildren(h('p', { class: 'muted' }, 'No SAEs reported by kmd.'));
        return;
      }
      const keys = Array.from(new Set(list.flatMap((x) => (x && typeof x === 'object' ? Object.keys(x) : ['value']))));
      saesBox.replaceChildren(table(keys.map((k) => ({ label: k.replace(/_/g, ' '),
        render: (x) => { const v = typeof x === 'object' ? x[k] : x; return v === null || v === undefined ? '—' : typeof v === 'object' ? JSON.stringify(v) : String(v); } })),
      list, { id: 'saes-table', caption: 'SAEs' }));
    } catch (err) {
      if (!stopped) saesBox.replaceChildren(h('p', { class: 'muted' }, err.status === 404 ? 'kmd does not report its SAEs here.' : errorText(err)));
    }
  }

  loadLinks();
  loadUsers();
  loadQueue();
  loadSaes();
  const timer = setInterval(() => {
    if (document.hidden) return;
    loadLinks();
    loadQueue();
  }, 5000);
  currentView = {
    dispose() {
      stopped = true;
      clearInterval(timer);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Keyboard shortcuts (as in Gmail)
// ---------------------------------------------------------------------------------------------

const SHORTCUTS = [
  ['c', 'Compose a new message'],
  ['/', 'Search mail'],
  ['j / k', 'Next (older) / previous (newer) message'],
  ['o or Enter', 'Open the selected message'],
  ['u', 'Back to the message list'],
  ['r', 'Reply'],
  ['a', 'Reply all'],
  ['f', 'Forward'],
  ['e', 'Archive'],
  ['#', 'Delete (move to Trash)'],
  ['x', 'Select the message under the cursor'],
  ['s', 'Star or unstar'],
  ['Shift+I / Shift+U', 'Mark as read / unread'],
  ['g then i', 'Go to Inbox'],
  ['g then s', 'Go to Sent'],
  ['Ctrl+Enter', 'Send (while writing)'],
  ['Esc', 'Leave the search box or close this help'],
  ['?', 'Show these shortcuts'],
];

function shortcutTable() {
  return h('table', { class: 'shortcuts' }, h('caption', { class: 'visually-hidden' }, 'Keyboard shortcuts'),
    h('tbody', {}, SHORTCUTS.map(([keys, what]) => h('tr', {}, h('th', { scope: 'row' }, keys.split(' ').map((k) => (['/', 'or', 'then'].includes(k) && k !== keys ? ` ${k} ` : h('kbd', {}, k)))), h('td', {}, what)))));
}

function showShortcuts() {
  let dialog = $('#shortcuts-dialog');
  if (!dialog) {
    dialog = h('dialog', { id: 'shortcuts-dialog', class: 'dialog', 'aria-labelledby': 'shortcuts-title' },
      h('div', { class: 'dialog-head' }, h('h2', { id: 'shortcuts-title' }, 'Keyboard shortcuts'),
        h('button', { type: 'button', class: 'icon-btn', 'aria-label': 'Close', onclick: () => dialog.close() }, icon('close'))),
      shortcutTable());
    document.body.append(dialog);
  }
  if (!dialog.open) dialog.showModal();
}

let pendingG = null;

function onKeyDown(ev) {
  if (ev.defaultPrevented || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  const typing = t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
  if (typing) {
    if (ev.key === 'Escape' && t.id === 'search-input') {
      t.blur();
      shell.main && shell.main.focus();
    }
    return;
  }
  if (!session.access || !shell.mounted || PUBLIC_ROUTES.has(parseHash().name)) return;
  const route = parseHash().name;
  const inList = isListRoute();
  const inMessage = route === 'message';
  const key = ev.key;
  if (pendingG) {
    clearTimeout(pendingG);
    pendingG = null;
    if (key === 'i') return go(ev, '#/inbox');
    if (key === 's') {
      const sent = folderByRole('sent');
      return go(ev, sent ? `#/folder/${enc(sent.name)}` : '#/inbox');
    }
    if (key === 'd') {
      const d = folderByRole('drafts');
      return go(ev, d ? `#/folder/${enc(d.name)}` : '#/inbox');
    }
    return;
  }
  const m = inMessage ? openMessageData : listState.messages[listState.cursor];
  switch (key) {
    case 'c': return go(ev, '#/compose');
    case '/': {
      ev.preventDefault();
      const search = $('#search-input');
      if (search) {
        search.focus();
        search.select();
      }
      return;
    }
    case '?': ev.preventDefault(); return showShortcuts();
    case 'g':
      pendingG = setTimeout(() => { pendingG = null; }, 1200);
      return;
    case 'j': ev.preventDefault(); return inMessage ? stepMessage(1) : inList && moveCursor(1);
    case 'k': ev.preventDefault(); return inMessage ? stepMessage(-1) : inList && moveCursor(-1);
    case 'o':
    case 'Enter':
      if (inList && m && !(t && t.tagName === 'BUTTON' && key === 'Enter')) {
        ev.preventDefault();
        return openMessage(m);
      }
      return;
    case 'u':
      if (route !== 'inbox' && route !== 'folder') return go(ev, listState.hash || '#/inbox');
      return;
    case 'x':
      if (inList && m) {
        ev.preventDefault();
        if (listState.selected.has(m.id)) listState.selected.delete(m.id);
        else listState.selected.add(m.id);
        renderList(null);
        moveCursor(0);
      }
      return;
    default:
      break;
  }
  if (!m || !(inList || inMessage)) return;
  if (key === 's') {
    ev.preventDefault();
    const button = inMessage ? $('.reader-head .star') : $('#message-list .row.cursor .star');
    return toggleStar(m, button);
  }
  if (key === 'r') return go(ev, `#/compose?reply=${enc(m.id)}`);
  if (key === 'a') return go(ev, `#/compose?replyall=${enc(m.id)}`);
  if (key === 'f') return go(ev, `#/compose?forward=${enc(m.id)}`);
  if (key === '#') {
    ev.preventDefault();
    return deleteMessages(inMessage ? [m] : selectedOrCursor());
  }
  if (key === 'e') {
    ev.preventDefault();
    return archiveMessages(inMessage ? [m] : selectedOrCursor());
  }
  if (key === 'I') {
    ev.preventDefault();
    return markMessages(inMessage ? [m] : selectedOrCursor(), true);
  }
  if (key === 'U') {
    ev.preventDefault();
    return markMessages(inMessage ? [m] : selectedOrCursor(), false);
  }
}

function go(ev, hash) {
  ev.preventDefault();
  navigate(hash);
}

// ---------------------------------------------------------------------------------------------
// Start
// ---------------------------------------------------------------------------------------------

// A CSP violation means part of the UI silently did not work: say so in the console, and count
// them on <html data-csp-violations> where the browser tests look.
document.addEventListener('securitypolicyviolation', (ev) => {
  const root = document.documentElement;
  root.dataset.cspViolations = String(Number(root.dataset.cspViolations || 0) + 1);
  console.error(`Content-Security-Policy blocked ${ev.blockedURI || 'an inline resource'} (${ev.violatedDirective})`);
});
window.addEventListener('hashchange', () => {
  route().catch((err) => toast(errorText(err), 'error'));
});
document.addEventListener('keydown', onKeyDown);
route().catch((err) => toast(errorText(err), 'error'));
