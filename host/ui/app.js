// The status page: asks for the admin token once (kept in this tab's
// session storage), then reads GET /v1/status every two seconds and draws
// it. Everything the host or a guest wrote goes in as text, never as markup.
'use strict';

const TOKEN_KEY = 'lichen.admin-token';
const REFRESH_MS = 2000;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  // The function whose detail is open.
  selected: null,
  timer: null,
  // The previous answer's forward counts and when it came, for rates.
  forwards: null,
  lastGood: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === 'class') node.className = value;
    else if (key === 'data') for (const [k, v] of Object.entries(value)) node.dataset[k] = v;
    else if (key === 'on') for (const [k, v] of Object.entries(value)) node.addEventListener(k, v);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function cell(col, value, cls) {
  return el('td', { class: cls, data: { col } }, value);
}

// Formatting.
const fmt = {
  count: (n) => (n ?? 0).toLocaleString('en-US'),
  rate: (r) => (r >= 10 ? r.toFixed(0) : r >= 1 ? r.toFixed(1) : r > 0 ? r.toFixed(2) : '0'),
  ms: (ms) => (ms === null || ms === undefined ? '–' : ms >= 100 ? `${ms.toFixed(0)} ms` : ms >= 1 ? `${ms.toFixed(1)} ms` : `${(ms * 1000).toFixed(0)} µs`),
  bytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  },
  duration(s) {
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  },
  ago(unix) {
    if (!unix) return '–';
    const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
    return `${fmt.duration(s)} ago`;
  },
  iso: (unix) => (unix ? new Date(unix * 1000).toISOString() : ''),
  clock: (ms) => new Date(ms).toLocaleTimeString('en-GB', { hour12: false }) + `.${String(ms % 1000).padStart(3, '0')}`,
  short: (sha) => (sha || '').slice(0, 12),
};

function sum(obj, keys) {
  return keys.reduce((n, k) => n + (obj[k] || 0), 0);
}

// A line of requests per ten seconds over the last ten minutes.
function sparkline(history) {
  const ns = 'http://www.w3.org/2000/svg';
  const width = 120;
  const height = 24;
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('width', width);
  svg.setAttribute('height', height);
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const values = history && history.length ? history : [0];
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 1 - (v / max) * (height - 3)).toFixed(1)}`);
  const base = document.createElementNS(ns, 'line');
  base.setAttribute('x1', 0);
  base.setAttribute('x2', width);
  base.setAttribute('y1', height - 0.5);
  base.setAttribute('y2', height - 0.5);
  const line = document.createElementNS(ns, 'polyline');
  line.setAttribute('points', points.join(' '));
  const title = document.createElementNS(ns, 'title');
  title.textContent = `requests per 10 s, last 10 minutes (peak ${max})`;
  svg.append(title, base, line);
  return svg;
}

function show(id, visible) {
  $(id).hidden = !visible;
}

// The token.

function promptForToken(message) {
  clearTimeout(state.timer);
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  show('dashboard', false);
  show('sign-out', false);
  $('node').textContent = '';
  show('prompt', true);
  $('prompt-error').textContent = message || '';
  show('prompt-error', Boolean(message));
  $('token').value = '';
  $('token').focus();
}

async function signIn(event) {
  event.preventDefault();
  const token = $('token').value.trim();
  if (!token) return;
  let response;
  try {
    response = await fetchStatus(token, null);
  } catch (error) {
    promptForToken(`Cannot reach the host: ${error.message}`);
    return;
  }
  if (response.status === 401 || response.status === 403) {
    promptForToken('The host refused that token.');
    return;
  }
  if (!response.ok) {
    promptForToken(`The host answered ${response.status}: ${await errorText(response)}`);
    return;
  }
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token').value = '';
  openDashboard(await response.json());
  schedule();
}

function openDashboard(status) {
  show('prompt', false);
  show('dashboard', true);
  show('sign-out', true);
  render(status);
}

// Reading the host.

function fetchStatus(token, fn) {
  const query = fn ? `?function=${encodeURIComponent(fn)}` : '';
  return fetch(`/v1/status${query}`, {
    headers: { Authorization: `Bearer ${token}` },
    cache: 'no-store',
    credentials: 'omit',
  });
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || response.statusText;
  } catch {
    return response.statusText;
  }
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(refresh, REFRESH_MS);
}

async function refresh() {
  if (!state.token) return;
  try {
    let response = await fetchStatus(state.token, state.selected);
    if (response.status === 404 && state.selected) {
      // The function was deleted while its detail was open.
      state.selected = null;
      response = await fetchStatus(state.token, null);
    }
    if (response.status === 401 || response.status === 403) {
      promptForToken('The host no longer accepts the token.');
      return;
    }
    if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
    openDashboard(await response.json());
    show('stale', false);
  } catch (error) {
    const since = state.lastGood ? ` Figures as of ${new Date(state.lastGood).toLocaleTimeString('en-GB')}.` : '';
    $('stale').textContent = `Cannot read the host's status (${error.message}).${since}`;
    show('stale', true);
  }
  schedule();
}

// Drawing.

function render(status) {
  state.lastGood = Date.now();
  renderHost(status.host, status.cluster);
  renderFunctions(status.functions);
  renderTriggers(status.functions);
  renderDetail(status.function);
  renderCluster(status.cluster);
}

function renderHost(host, cluster) {
  $('node').textContent = cluster ? `node ${cluster.node_id}` : '';
  const facts = [
    ['Version', host.version],
    ['Uptime', fmt.duration(host.uptime_seconds)],
    ['State', host.draining ? 'draining' : 'serving'],
    ['Invocations/s', fmt.rate(host.invocations_per_second)],
    ['Loaded functions', `${host.loaded_functions} / ${host.max_loaded_functions}`],
    ['Deployed functions', host.functions],
    ['CPU', `${host.cpu_seconds.toFixed(1)} s`],
    ['Memory (RSS)', fmt.bytes(host.rss_bytes)],
  ];
  $('host').replaceChildren(...facts.map(([name, value]) => el('div', { data: { fact: name } }, el('dt', {}, name), el('dd', {}, value))));
}

function renderFunctions(functions) {
  const rows = functions.map((f) => {
    const inv = f.invocations || {};
    const requests = Object.values(inv).reduce((a, b) => a + b, 0);
    const errors = sum(inv, ['guest_error', 'timeout', 'forward_failed']);
    const traps = inv.trap || 0;
    const rejected = inv.rejected || 0;
    const name = el('button', {
      class: 'link',
      type: 'button',
      title: 'Show its policy, versions, invocations and log',
      on: { click: () => select(f.name) },
    }, f.name);
    const access = f.public === null ? el('span', { class: 'badge bad' }, 'no valid policy')
      : f.public ? el('span', { class: 'badge ok' }, 'public') : el('span', { class: 'badge' }, 'private');
    return el('tr', { data: { function: f.name }, class: f.name === state.selected ? 'selected' : null },
      el('td', { data: { col: 'name' } }, name, f.policy_error ? el('span', { class: 'badge bad', title: f.policy_error }, ' policy error') : null),
      cell('version', f.version),
      cell('abi', f.abi),
      el('td', { class: 'mono', title: f.sha256, data: { col: 'sha256' } }, fmt.short(f.sha256)),
      cell('size', fmt.bytes(f.size), 'num'),
      el('td', { title: fmt.iso(f.created_unix), data: { col: 'deployed' } }, fmt.ago(f.created_unix)),
      el('td', { data: { col: 'access' } }, access),
      cell('rate', fmt.rate(f.requests_per_second), 'num'),
      cell('p50', fmt.ms(f.p50_ms), 'num'),
      cell('p99', fmt.ms(f.p99_ms), 'num'),
      cell('requests', fmt.count(requests), 'num'),
      cell('errors', fmt.count(errors), errors ? 'num error-cell' : 'num'),
      cell('traps', fmt.count(traps), traps ? 'num error-cell' : 'num'),
      cell('rejected', fmt.count(rejected), rejected ? 'num warn-cell' : 'num'),
      cell('in_flight', fmt.count(f.in_flight), 'num'),
      cell('queued', fmt.count(f.queued), 'num'),
      cell('memory_peak', f.memory_peak_bytes ? fmt.bytes(f.memory_peak_bytes) : '–', 'num'),
      el('td', { data: { col: 'history' } }, sparkline(f.history)),
    );
  });
  $('functions').tBodies[0].replaceChildren(...rows);
  show('no-functions', functions.length === 0);
}

function renderTriggers(functions) {
  const rows = functions.flatMap((f) => (f.triggers || []).map((t) => {
    const last = t.runs[0];
    if (t.kind === 'nats') {
      const handled = Object.entries(t.handled).map(([outcome, n]) => `${n} ${outcome}`).join(', ');
      return el('tr', { data: { function: f.name, trigger: `nats-${t.index}` } },
        cell('function', f.name),
        cell('index', `nats ${t.index}`, 'num'),
        el('td', { class: 'mono', data: { col: 'schedule' } }, `${t.stream}${t.subject ? ` ${t.subject}` : ''} (${t.durable})`),
        cell('next', t.error ? t.error : `${t.pending} pending, ${t.ack_pending} unacknowledged`, t.error ? 'error-cell' : null),
        cell('last', last ? `${last.id} on ${last.host}${handled ? `; here: ${handled}` : ''}` : '–'),
        cell('status', last ? last.status : '–', last && (last.status < 200 || last.status >= 300) ? 'num error-cell' : 'num'),
        cell('late', last ? `delivery ${last.delivered}` : '–', 'num'),
      );
    }
    return el('tr', { data: { function: f.name, trigger: t.index } },
      cell('function', f.name),
      cell('index', t.index, 'num'),
      el('td', { class: 'mono', title: t.timezone, data: { col: 'schedule' } }, `${t.schedule} (${t.timezone})`),
      cell('next', t.next ?? '–'),
      cell('last', last ? `${last.tick} on ${last.host}` : '–'),
      cell('status', last ? last.status : '–', last && last.status >= 300 ? 'num error-cell' : 'num'),
      cell('late', last ? fmt.ms(last.late_ms) : '–', 'num'),
    );
  }));
  $('triggers-table').tBodies[0].replaceChildren(...rows);
  show('triggers', rows.length > 0);
}

function select(name) {
  state.selected = state.selected === name ? null : name;
  if (!state.selected) show('detail', false);
  clearTimeout(state.timer);
  refresh();
}

function renderDetail(detail) {
  if (!detail || detail.name !== state.selected) {
    show('detail', false);
    return;
  }
  show('detail', true);
  $('detail-title').replaceChildren(`Function ${detail.name}`, ' ', el('button', { type: 'button', on: { click: () => select(detail.name) } }, 'Close'));

  const policy = detail.policy;
  const defaults = policy.loaded_unix === 0 ? '# No policy file: the defaults apply.\n' : '';
  $('policy').textContent = policy.in_force_toml === null ? 'None: the policy file has never loaded, so the function does not run.' : defaults + policy.in_force_toml;
  const error = policy.error ? `The policy file does not load; the last good policy stays in force.\n${policy.error}` : '';
  $('policy-error').textContent = error;
  show('policy-error', Boolean(error));

  const applyError = detail.apply_error ? `The cluster's active version does not apply here yet; this host serves what it had.\n${detail.apply_error}` : '';
  $('apply-error').textContent = applyError;
  show('apply-error', Boolean(applyError));

  $('versions').tBodies[0].replaceChildren(...[...detail.versions].reverse().map((v) => el('tr', { class: v.active ? 'selected' : null },
    el('td', { class: 'mono' }, v.active ? `${v.version} (active)` : v.version),
    el('td', {}, v.abi ?? '–'),
    el('td', { class: 'mono', title: v.sha256 }, fmt.short(v.sha256)),
    el('td', { class: 'num' }, fmt.bytes(v.size)),
    el('td', { title: fmt.iso(v.created_unix) }, fmt.ago(v.created_unix)),
    el('td', {}, v.origin),
    el('td', { class: 'mono' }, v.superseded_by ?? '–'),
    el('td', {}, v.oci ? v.oci.reference : 'upload'),
  )));

  $('invocations').tBodies[0].replaceChildren(...detail.invocations.map((i) => el('tr', { data: { outcome: i.outcome } },
    el('td', {}, fmt.clock(i.at_unix_ms)),
    el('td', { class: 'mono' }, i.request_id),
    el('td', { class: i.status >= 500 ? 'num error-cell' : 'num' }, i.status),
    el('td', { class: 'num' }, fmt.ms(i.duration_us / 1000)),
    el('td', {}, el('span', { class: `badge ${i.outcome === 'ok' ? 'ok' : 'bad'}` }, i.outcome)),
  )));

  const lines = detail.log.map((l) => `${fmt.clock(l.at_unix_ms)} ${l.request_id} ${l.stream}: ${l.line}`);
  $('log').textContent = lines.length ? lines.join('\n') : 'No log lines yet.';
}

function renderCluster(cluster) {
  show('cluster', Boolean(cluster));
  if (!cluster) return;
  const now = Date.now();
  const before = state.forwards;
  const seconds = before ? (now - before.at) / 1000 : 0;
  const rows = cluster.peers.map((p) => {
    const previous = before && before.counts.get(p.node_id);
    const rate = seconds > 0 && previous !== undefined ? Math.max(0, p.forwarded - previous) / seconds : 0;
    return el('tr', { data: { peer: p.node_id } },
      cell('node', p.node_id),
      el('td', { class: 'mono', data: { col: 'api' } }, p.api ?? '–'),
      el('td', { data: { col: 'alive' } }, el('span', { class: `badge ${p.alive ? 'ok' : 'bad'}` }, p.alive ? 'alive' : 'dead')),
      cell('load', p.load ?? '–', 'num'),
      cell('free_slots', p.free_slots ?? '–', 'num'),
      cell('functions', p.functions ?? '–', 'num'),
      el('td', { class: 'num', title: `${p.forwarded} forwarded in all`, data: { col: 'forwards' } }, fmt.rate(rate)),
      el('td', { class: p.clock_off ? 'num error-cell' : 'num', title: p.clock_off ? 'more than 10 s off: changes made apart are ordered by the clocks' : null, data: { col: 'clock' } },
        p.clock_offset_ms === null ? '–' : `${p.clock_offset_ms} ms`),
    );
  });
  state.forwards = { at: now, counts: new Map(cluster.peers.map((p) => [p.node_id, p.forwarded])) };
  $('peers').tBodies[0].replaceChildren(...rows);
  show('no-peers', cluster.peers.length === 0);

  const errors = Object.entries(cluster.apply_errors).sort(([a], [b]) => a.localeCompare(b));
  $('apply-errors-table').tBodies[0].replaceChildren(...errors.map(([name, why]) => el('tr', {},
    el('td', {}, name),
    el('td', { class: 'error-cell' }, why),
  )));
  show('apply-errors', errors.length > 0);

  const head = (h) => (h.target === null ? `delete by ${h.origin}` : `${h.target} by ${h.origin}`);
  $('conflicts-table').tBodies[0].replaceChildren(...[...cluster.conflicts].reverse().map((c) => el('tr', {},
    el('td', {}, fmt.clock(c.seen_ms)),
    el('td', {}, c.function),
    el('td', { class: 'mono' }, head(c.winner)),
    el('td', { class: 'mono' }, head(c.loser)),
  )));
  show('conflicts', cluster.conflicts.length > 0);
}

// Start.

$('token-form').addEventListener('submit', signIn);
$('sign-out').addEventListener('click', () => promptForToken(''));
if (state.token) {
  show('prompt', false);
  refresh();
} else {
  promptForToken('');
}
