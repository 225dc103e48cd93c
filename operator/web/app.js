// Atelier's page: plain JavaScript against the REST API, authenticated by the session cookie.
// Every state-changing request sends the session's CSRF token in X-CSRF-Token.
'use strict';

const $ = (selector) => document.querySelector(selector);
const state = { csrf: null, me: null, tenant: null, presets: { tenant: [], mine: [] }, nextBefore: null, events: null, job: null };

// Messages for the error reasons a person can do something about.
const MESSAGES = {
  QuotaExceeded: 'Your daily image quota is used up. It resets tomorrow, or a tenant admin can reset it.',
  NotAMember: 'You are not a member of this tenant. Ask its administrator to add you or your group.',
  RateLimited: 'Too many requests; please wait a moment.',
  SourceNotAllowed: 'This tenant does not accept requests from your network.',
  OutputsUnavailable: 'Your image history is not reachable right now. Try again in a minute.',
  provider_unavailable: 'The login provider is not reachable right now. Try again in a few minutes.',
  provider_refused: 'The login was refused by the identity provider.',
  session_expired: 'Your session has expired. Please log in again.',
};

function showMessage(text, isError = true) {
  const box = $('#message');
  box.textContent = text;
  box.className = isError ? 'error' : '';
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, reason, message) {
    super(message);
    this.status = status;
    this.reason = reason;
  }
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = state.csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, { method, headers, credentials: 'same-origin', body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, 'Network', 'The server cannot be reached.');
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const reason = data.error?.reason || String(response.status);
    if (response.status === 401) {
      showLogin(MESSAGES.session_expired);
    }
    throw new ApiError(response.status, reason, MESSAGES[reason] || data.error?.message || response.statusText);
  }
  return data;
}

function report(error) {
  showMessage(error.message || String(error));
}

function tenantPath(suffix) {
  return `/api/v1/tenants/${encodeURIComponent(state.tenant.name)}${suffix}`;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === 'onclick') node.addEventListener('click', value);
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showLogin(message) {
  $('#login-view').hidden = false;
  $('#app-view').hidden = true;
  $('#account').hidden = true;
  if (message) showMessage(message);
}

// ---- start ----

async function start() {
  const params = new URLSearchParams(location.search);
  const error = params.get('error');
  if (error) {
    showMessage(MESSAGES[error] || `Login failed (${error}).`);
    history.replaceState(null, '', '/');
  }
  let session;
  try {
    session = await (await fetch('/auth/session', { credentials: 'same-origin' })).json();
  } catch {
    showMessage('The server cannot be reached.');
    return;
  }
  if (!session.authenticated) {
    showLogin();
    return;
  }
  state.csrf = session.csrfToken;
  $('#logout-csrf').value = state.csrf;
  $('#user').textContent = session.user;
  $('#account').hidden = false;
  try {
    state.me = await api('GET', '/api/v1/me');
  } catch (error) {
    report(error);
    return;
  }
  if (state.me.tenants.length === 0) {
    showMessage(MESSAGES.NotAMember.replace('this tenant', 'any tenant'));
    return;
  }
  const select = $('#tenant');
  select.replaceChildren(...state.me.tenants.map((t) => el('option', { value: t.name, text: t.displayName || t.name })));
  const saved = localStorage.getItem('atelier.tenant');
  if (state.me.tenants.some((t) => t.name === saved)) select.value = saved;
  select.addEventListener('change', () => selectTenant(select.value));
  $('#app-view').hidden = false;
  selectTenant(select.value);
}

function selectTenant(name) {
  state.tenant = state.me.tenants.find((t) => t.name === name);
  localStorage.setItem('atelier.tenant', name);
  $('#admin-tab').hidden = state.tenant.role !== 'admin';
  $('#steps').max = state.tenant.limits.maxSteps;
  $('#num-images').max = state.tenant.limits.maxImages;
  showQuota(state.tenant.quota);
  if (!state.tenant.sourceAllowed) showMessage(MESSAGES.SourceNotAllowed);
  loadPresets().catch(report);
  resetGallery();
  showTab('generate');
}

function showQuota(quota) {
  $('#quota').textContent = `${quota.remaining} of ${quota.limit} images left today (${quota.day}).`;
  $('#submit').disabled = quota.remaining === 0;
  if (quota.remaining === 0) showMessage(MESSAGES.QuotaExceeded);
}

async function refreshQuota() {
  state.me = await api('GET', '/api/v1/me');
  state.tenant = state.me.tenants.find((t) => t.name === state.tenant.name) || state.tenant;
  showQuota(state.tenant.quota);
}

function showTab(name) {
  for (const tab of document.querySelectorAll('.tab')) tab.classList.toggle('active', tab.dataset.tab === name);
  for (const panel of ['generate', 'gallery', 'admin']) $(`#tab-${panel}`).hidden = panel !== name;
  if (name === 'gallery' && $('#gallery').children.length === 0) loadImages().catch(report);
  if (name === 'admin') loadAdmin().catch(report);
}

// ---- generate ----

function formParams() {
  const [width, height] = $('#size').value.split('x').map(Number);
  const params = {
    prompt: $('#prompt').value,
    width,
    height,
    steps: Number($('#steps').value),
    guidance: Number($('#guidance').value),
    numImages: Number($('#num-images').value),
  };
  if (!$('#random-seed').checked && $('#seed').value !== '') params.seed = Number($('#seed').value);
  return params;
}

function applyParams(params) {
  if (params.prompt !== undefined) $('#prompt').value = params.prompt;
  if (params.width && params.height) {
    const value = `${params.width}x${params.height}`;
    if (![...$('#size').options].some((o) => o.value === value)) {
      $('#size').append(el('option', { value, text: `${params.width}×${params.height}` }));
    }
    $('#size').value = value;
  }
  if (params.steps) $('#steps').value = params.steps;
  if (params.guidance !== undefined) $('#guidance').value = params.guidance;
  if (params.numImages) $('#num-images').value = params.numImages;
  const hasSeed = params.seed !== undefined && params.seed !== null;
  $('#random-seed').checked = !hasSeed;
  $('#seed').disabled = !hasSeed;
  $('#seed').value = hasSeed ? params.seed : '';
}

async function generate(event) {
  event.preventDefault();
  showMessage('');
  $('#submit').disabled = true;
  try {
    const job = await api('POST', tenantPath('/generations'), formParams());
    follow(job);
  } catch (error) {
    report(error);
  } finally {
    $('#submit').disabled = state.tenant.quota.remaining === 0;
  }
}

function follow(job) {
  if (state.events) state.events.close();
  state.job = job;
  $('#job').hidden = false;
  $('#job-images').replaceChildren();
  showJob(job);
  const source = new EventSource(tenantPath(`/generations/${encodeURIComponent(job.name)}/events`));
  state.events = source;
  source.addEventListener('job', (message) => {
    const update = JSON.parse(message.data);
    state.job = update;
    showJob(update);
    if (['Succeeded', 'Failed', 'Cancelled', 'Rejected'].includes(update.phase)) {
      source.close();
      refreshQuota().catch(() => {});
      resetGallery();
    }
  });
  source.addEventListener('deleted', () => source.close());
  source.onerror = () => {
    // The browser reconnects by itself; a finished job closes the stream on purpose.
    if (source.readyState === EventSource.CLOSED) $('#job-detail').textContent += ' (live updates stopped)';
  };
}

function showJob(job) {
  const finished = ['Succeeded', 'Failed', 'Cancelled', 'Rejected'].includes(job.phase);
  $('#job-phase').textContent = job.phase;
  let detail = '';
  if (job.phase === 'Queued' && job.queuePosition) detail = `position ${job.queuePosition} in the queue`;
  if (job.progress) detail = `step ${job.progress.step} of ${job.progress.totalSteps}`;
  if (job.message && (finished || job.phase === 'Pending')) detail = job.message;
  $('#job-detail').textContent = detail;
  const progress = $('#job-progress');
  if (job.progress && job.progress.totalSteps) {
    progress.max = job.progress.totalSteps;
    progress.value = job.progress.step;
  } else if (job.phase === 'Succeeded') {
    progress.max = 1;
    progress.value = 1;
  } else {
    progress.removeAttribute('value');
  }
  $('#cancel').hidden = finished;
  $('#job-images').replaceChildren(...job.outputs.map((output) => el('a', { href: output.url, target: '_blank' },
    el('img', { src: output.url, alt: job.prompt, width: output.width, height: output.height }))));
}

async function cancelJob(name) {
  try {
    await api('DELETE', tenantPath(`/generations/${encodeURIComponent(name)}`));
  } catch (error) {
    report(error);
  }
}

// ---- presets ----

async function loadPresets() {
  state.presets = await api('GET', tenantPath('/presets'));
  const select = $('#preset');
  const group = (label, presets, kind) => el('optgroup', { label }, ...presets.map((p) => el('option', { value: `${kind}:${p.name}`, text: p.name })));
  select.replaceChildren(el('option', { value: '', text: '—' }), group('Tenant', state.presets.tenant, 'tenant'), group('Mine', state.presets.mine, 'mine'));
}

function choosePreset() {
  const [kind, ...rest] = $('#preset').value.split(':');
  const preset = (state.presets[kind] || []).find((p) => p.name === rest.join(':'));
  if (preset) applyParams(preset.params);
}

async function savePreset() {
  const name = prompt('Name of the preset');
  if (!name) return;
  try {
    state.presets = await api('PUT', tenantPath(`/presets/mine/${encodeURIComponent(name.trim())}`), formParams());
    await loadPresets();
    showMessage(`Preset “${name.trim()}” saved.`, false);
  } catch (error) {
    report(error);
  }
}

// ---- gallery ----

function resetGallery() {
  state.nextBefore = null;
  $('#gallery').replaceChildren();
  $('#more').hidden = true;
  $('#gallery-empty').hidden = true;
  if (!$('#tab-gallery').hidden) loadImages().catch(report);
}

async function loadImages() {
  const query = new URLSearchParams({ limit: '12' });
  if (state.nextBefore) query.set('before', state.nextBefore);
  const page = await api('GET', tenantPath(`/images?${query}`));
  state.nextBefore = page.nextBefore;
  $('#more').hidden = !page.nextBefore;
  $('#gallery-empty').hidden = $('#gallery').children.length + page.images.length > 0;
  for (const image of page.images) $('#gallery').append(imageCard(image));
}

function imageCard(image) {
  const m = image.metadata || {};
  const reuse = () => {
    applyParams({ prompt: m.prompt, width: m.width, height: m.height, steps: m.steps, guidance: m.guidance, seed: m.seed, numImages: 1 });
    showTab('generate');
    window.scrollTo(0, 0);
  };
  return el('div', { class: 'card' },
    el('a', { href: image.url, target: '_blank' }, el('img', { src: image.url, alt: m.prompt || image.file, loading: 'lazy' })),
    el('div', { class: 'meta' },
      el('p', { text: m.prompt || image.file }),
      el('p', { class: 'muted', text: `${m.width || '?'}×${m.height || '?'} · ${m.steps || '?'} steps · guidance ${m.guidance ?? '?'} · seed ${m.seed ?? '?'}` }),
      el('p', { class: 'muted', text: image.createdAt ? new Date(image.createdAt).toLocaleString() : '' })),
    el('button', { type: 'button', class: 'secondary', onclick: reuse, text: 'Reuse parameters' }));
}

// ---- admin ----

async function loadAdmin() {
  const status = await api('GET', tenantPath('/status'));
  const models = status.models.map((m) => `${m.pod || m.endpoint}: ${m.model ? m.model.state : m.error}`).join(', ') || 'no inference pod running';
  $('#admin-summary').replaceChildren(
    el('p', { text: `Phase ${status.phase || 'unknown'} · replicas ${status.readyReplicas}/${status.replicas} · GPUs ${status.gpusInUse}/${status.gpusMax} · queued ${status.queued} · running ${status.running}` }),
    el('p', { class: 'muted', text: `Model: ${models}` }));
  $('#admin-usage').href = tenantPath('/usage?format=csv');
  $('#admin-queue tbody').replaceChildren(...status.queue.map((job) => el('tr', {},
    el('td', { text: job.name }), el('td', { text: job.user }), el('td', { text: job.phase + (job.queuePosition ? ` #${job.queuePosition}` : '') }),
    el('td', { text: job.progress ? `${job.progress.step}/${job.progress.totalSteps}` : '' }),
    el('td', {}, el('button', { type: 'button', class: 'secondary', text: 'Cancel', onclick: async () => { await cancelJob(job.name); loadAdmin().catch(report); } })))));
  if (status.queue.length === 0) $('#admin-queue tbody').append(el('tr', {}, el('td', { colspan: '5', class: 'muted', text: 'The queue is empty.' })));
  $('#admin-usage-table tbody').replaceChildren(...status.usage.map((u) => el('tr', {},
    el('td', { text: u.user }), el('td', { text: `${u.images} / ${status.imagesPerUserPerDay}` }),
    el('td', {}, el('button', { type: 'button', class: 'secondary', text: 'Reset quota', onclick: () => resetQuota(u.user) })))));
  if (status.usage.length === 0) $('#admin-usage-table tbody').append(el('tr', {}, el('td', { colspan: '3', class: 'muted', text: 'No images today.' })));
}

async function resetQuota(user) {
  try {
    await api('POST', tenantPath('/quota/reset'), { user });
    showMessage(`Quota of ${user} reset.`, false);
    await loadAdmin();
    if (user === state.me.user) await refreshQuota();
  } catch (error) {
    report(error);
  }
}

async function adminAction(path, done) {
  try {
    const result = await api('POST', tenantPath(path));
    showMessage(done(result), false);
    await loadAdmin();
  } catch (error) {
    report(error);
  }
}

// ---- wiring ----

document.addEventListener('DOMContentLoaded', () => {
  $('#generate').addEventListener('submit', generate);
  $('#random-seed').addEventListener('change', () => {
    $('#seed').disabled = $('#random-seed').checked;
  });
  $('#cancel').addEventListener('click', () => state.job && cancelJob(state.job.name));
  $('#preset').addEventListener('change', choosePreset);
  $('#save-preset').addEventListener('click', savePreset);
  $('#more').addEventListener('click', () => loadImages().catch(report));
  for (const tab of document.querySelectorAll('.tab')) tab.addEventListener('click', () => showTab(tab.dataset.tab));
  $('#admin-refresh').addEventListener('click', () => loadAdmin().catch(report));
  $('#admin-restart').addEventListener('click', () => adminAction('/restart', (r) => `Deleted ${r.deleted.length} inference pod(s); they are being replaced.`));
  $('#admin-offload').addEventListener('click', () => adminAction('/offload', (r) => r.models.map((m) => `${m.pod || m.endpoint}: ${m.error || m.model.state}`).join('; ') || 'No inference pod is running.'));
  start();
});
