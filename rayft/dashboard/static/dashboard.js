// The rayft dashboard page: polls the dashboard's JSON API and draws jobs, curves (its own SVG),
// replicas and events. Every value is written as text (textContent, setAttribute), never as HTML:
// job names, errors and completions are user input.
"use strict";

const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh")) || 2000;
// a metric's column in a job's rows: [step, loss, tokens_per_s, padding, eval_loss]
const COLUMN = { loss: 1, tokens_per_s: 2, padding: 3, eval_loss: 4 };
const TERMINAL = new Set(["done", "failed", "cancelled"]);
const PALETTE = ["#1d6fd1", "#d1661d", "#1c9a5a", "#b3261e", "#7a4fd1", "#9a6b00", "#0f8a96", "#c2408f",
                 "#4a5263", "#5b8f1d"];
const GIB = 1024 ** 3;

const series = new Map(); // job id -> {rows, last, final}
const plotted = new Set(); // jobs the user chose to plot; empty and untouched: all of them
let plotTouched = false;
const confirming = new Map(); // job id -> timer of a cancel waiting for its confirming click

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svgEl(tag, attrs = {}, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

async function api(path, options = {}) {
  const response = await fetch(path.startsWith("/") ? path : BASE + path,
    { ...options, headers: { "Content-Type": "application/json" } });
  let body;
  try { body = await response.json(); } catch { body = {}; }
  if (!response.ok) {
    const error = typeof body.error === "string" ? body.error : (body.error && body.error.message);
    throw new Error(error || `HTTP ${response.status}`);
  }
  return body;
}

function show(message, ok = false) {
  const m = $("#message");
  m.textContent = message || "";
  m.className = ok ? "ok" : "";
  m.hidden = !message;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "-";
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 1000 ? Math.round(value).toLocaleString("en-US") : value.toPrecision(digits);
}

function colour(index) { return PALETTE[index % PALETTE.length]; }

// ---- jobs -------------------------------------------------------------------------------------

function jobRow(tbody, job) {
  let tr = [...tbody.rows].find((r) => r.dataset.job === job.id);
  if (tr) return tr;
  tr = el("tr", { "data-job": job.id });
  const plot = el("input", { type: "checkbox", class: "plot", "aria-label": `plot ${job.id}` });
  plot.checked = !plotTouched || plotted.has(job.id);
  plot.addEventListener("change", () => {
    if (!plotTouched) { plotTouched = true; document.querySelectorAll("#jobs tbody tr").forEach((r) => plotted.add(r.dataset.job)); }
    if (plot.checked) plotted.add(job.id); else plotted.delete(job.id);
    drawCharts(lastJobs);
  });
  const cells = ["plot", "job", "state", "progress", "priority", "replica", "loss", "tps", "detail", "actions"]
    .map((name) => el("td", { class: name }));
  cells[0].append(plot);
  cells[1].append(el("span", { class: "swatch" }), el("span", { class: "id" }));
  cells[3].append(el("span", { class: "bar" }), el("span", { class: "steps" }));
  cells[3].querySelector(".bar").append(el("span"));
  const input = el("input", { type: "number", step: "1", "aria-label": `priority of ${job.id}` });
  const set = el("button", { type: "button", class: "set-priority" }, "set");
  set.addEventListener("click", () => setPriority(job.id, input.value));
  cells[4].append(input, set);
  const cancel = el("button", { type: "button", class: "cancel danger" }, "cancel");
  cancel.addEventListener("click", () => cancelJob(job.id, cancel));
  cells[9].append(cancel);
  cells[6].classList.add("num");
  cells[7].classList.add("num");
  tr.append(...cells);
  tbody.append(tr);
  return tr;
}

let lastJobs = [];

function renderJobs(jobs) {
  lastJobs = jobs;
  const tbody = $("#jobs tbody");
  const ids = new Set(jobs.map((j) => j.id));
  [...tbody.rows].forEach((r) => { if (!ids.has(r.dataset.job)) r.remove(); });
  jobs.forEach((job, index) => {
    const tr = jobRow(tbody, job);
    tr.querySelector(".swatch").style.background = colour(index);
    tr.querySelector(".id").textContent = job.id;
    tr.querySelector(".id").title = `${job.name} (adapter ${job.adapter})`;
    const state = tr.querySelector("td.state");
    state.textContent = job.state;
    state.className = `state state-${job.state}`;
    const total = job.total_steps || 0;
    tr.querySelector(".bar > span").style.width = `${total ? Math.min(100, (100 * job.step) / total) : 0}%`;
    tr.querySelector(".steps").textContent = ` ${job.step}/${total || "?"}`;
    const input = tr.querySelector(".priority input");
    if (document.activeElement !== input) input.value = job.priority;
    tr.querySelector("td.replica").textContent = job.replica || "-";
    tr.querySelector("td.loss").textContent = fmt(job.loss);
    tr.querySelector("td.tps").textContent = fmt(job.tokens_per_s);
    const detail = tr.querySelector("td.detail");
    detail.textContent = job.error || job.adapter_path || "";
    detail.className = job.error ? "detail error" : "detail";
    const over = TERMINAL.has(job.state);
    tr.querySelector(".cancel").disabled = over;
    tr.querySelector(".set-priority").disabled = over;
    input.disabled = over;
  });
}

async function cancelJob(id, button) {
  if (!confirming.has(id)) { // the first click asks; a second within 4 s cancels
    button.textContent = "confirm cancel";
    confirming.set(id, setTimeout(() => { confirming.delete(id); button.textContent = "cancel"; }, 4000));
    return;
  }
  clearTimeout(confirming.get(id));
  confirming.delete(id);
  button.textContent = "cancel";
  try {
    const r = await api(`api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST", body: "{}" });
    show(`${r.job}: ${r.state}`, true);
  } catch (e) { show(`cancel ${id}: ${e.message}`); }
  refreshSoon();
}

async function setPriority(id, value) {
  const priority = Number(value);
  if (!Number.isInteger(priority)) { show(`priority of ${id}: ${JSON.stringify(value)} is not an integer`); return; }
  try {
    const r = await api(`api/jobs/${encodeURIComponent(id)}/priority`, { method: "POST", body: JSON.stringify({ priority }) });
    show(`${r.job}: priority ${r.priority}`, true);
  } catch (e) { show(`priority of ${id}: ${e.message}`); }
  refreshSoon();
}

// ---- curves -----------------------------------------------------------------------------------

async function fetchMetrics(jobs) {
  await Promise.all(jobs.map(async (job) => {
    const s = series.get(job.id) || { rows: [], last: -1, final: false };
    series.set(job.id, s);
    if (s.final) return;
    const over = TERMINAL.has(job.state); // one fetch after it ended, then none
    const got = await api(`api/jobs/${encodeURIComponent(job.id)}/metrics?after=${s.last}`);
    for (const row of got.rows) {
      if (row[0] > s.last) { s.rows.push(row); s.last = row[0]; }
    }
    s.final = over;
  }));
}

function drawCharts(jobs) {
  const chosen = jobs.map((job, index) => ({ job, index }))
    .filter(({ job }) => !plotTouched || plotted.has(job.id));
  document.querySelectorAll("svg.chart").forEach((chart) => drawChart(chart, chosen));
  const legend = $("#legend");
  legend.replaceChildren(...chosen.map(({ job, index }) => {
    const item = el("span", { class: "item" });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour(index);
    item.append(swatch, document.createTextNode(job.id));
    return item;
  }));
}

function drawChart(chart, chosen) {
  const column = COLUMN[chart.dataset.metric];
  const W = 480, H = 190, L = 52, R = 10, T = 10, B = 24;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const lines = chosen.map(({ job, index }) => ({
    job, index,
    points: (series.get(job.id)?.rows || []).filter((r) => r[column] !== null && r[column] !== undefined)
      .map((r) => [r[0], r[column]]),
  })).filter((l) => l.points.length);
  const parts = [];
  if (!lines.length) {
    parts.push(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    chart.replaceChildren(...parts);
    chart.dataset.points = "0";
    return;
  }
  const xs = lines.flatMap((l) => l.points.map((p) => p[0]));
  const ys = lines.flatMap((l) => l.points.map((p) => p[1]));
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  parts.push(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  parts.push(svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const f of [0, 0.5, 1]) {
    const y = y0 + f * (y1 - y0);
    parts.push(svgEl("text", { x: L - 4, y: Y(y) + 3, "text-anchor": "end" }, fmt(y)));
  }
  parts.push(svgEl("text", { x: L, y: H - 8 }, `step ${Math.ceil(x0)}`));
  parts.push(svgEl("text", { x: W - R, y: H - 8, "text-anchor": "end" }, `step ${Math.floor(x1)}`));
  let total = 0;
  for (const line of lines) {
    const d = line.points.map((p, k) => `${k ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    const path = svgEl("path", { class: "line", d, stroke: colour(line.index), "data-job": line.job.id,
                                 "data-points": line.points.length });
    path.append(svgEl("title", {}, `${line.job.id}: ${line.points.length} steps`));
    parts.push(path);
    total += line.points.length;
  }
  chart.replaceChildren(...parts);
  chart.dataset.points = String(total);
}

// ---- replicas and events ------------------------------------------------------------------------

function renderReplicas(replicas) {
  const rows = replicas.map((r) => {
    const tr = el("tr", { "data-replica": r.name });
    tr.append(el("td", {}, r.name), el("td", {}, (r.nodes || [r.node]).map((n) => n.slice(0, 8)).join(", ")),
      el("td", {}, `${r.gpu ? "GPU" : "CPU"}${r.stages > 1 ? ` × ${r.stages} stages` : ""}`),
      el("td", {}, r.ready ? "ready" : "starting"), el("td", {}, (r.jobs || []).join(", ") || "-"));
    const memory = el("td", { class: "memory" });
    const m = r.memory || { stages: [], budget: null };
    if (!m.stages.length) memory.textContent = m.budget ? `idle (budget ${fmt(m.budget / GIB)} GiB)` : "idle";
    m.stages.forEach((bytes, s) => {
      const line = el("div");
      const bar = el("span", { class: "bar" });
      const fill = el("span");
      const share = m.budget ? bytes / m.budget : 0;
      fill.style.width = `${Math.min(100, 100 * share)}%`;
      if (share > 1) bar.classList.add("over");
      bar.append(fill);
      const label = `${m.stages.length > 1 ? `stage ${s}: ` : ""}${fmt(bytes / GIB)} / ${m.budget ? fmt(m.budget / GIB) : "?"} GiB`;
      line.append(bar, document.createTextNode(` ${label}`));
      memory.append(line);
    });
    tr.append(memory);
    return tr;
  });
  $("#replicas tbody").replaceChildren(...rows);
}

function renderEvents(events) {
  $("#events").replaceChildren(...events.slice(-50).reverse().map((e) => el("li", {}, e)));
}

// ---- the playground -----------------------------------------------------------------------------

let serveBase = null; // where completions go: the dashboard's proxy, or the Serve app it is mounted in

async function setUpPlayground() {
  let config;
  try { config = await api("api/config"); } catch (e) { config = { serve: null }; }
  const off = $("#playground-off");
  if (!config.serve) {
    off.textContent = "No Serve app: start one (`rayft serve`) and pass its address (`rayft dashboard --serve-url`).";
    off.hidden = false;
    return;
  }
  serveBase = config.serve === "proxy"
    ? { models: "api/serve/models", completions: "api/serve/completions" }
    : { models: new URL("../v1/models", location.origin + BASE).pathname,
        completions: new URL("../v1/completions", location.origin + BASE).pathname };
  try {
    const models = await api(serveBase.models);
    const select = $("#playground-model");
    select.replaceChildren(...models.data.map((m) => el("option", { value: m.id }, m.parent ? m.id : `${m.id} (base)`)));
    $("#playground-form").hidden = false;
  } catch (e) {
    off.textContent = `The Serve app cannot be reached: ${e.message}`;
    off.hidden = false;
  }
  $("#playground-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = $("#playground-output");
    out.textContent = "…";
    const body = { model: $("#playground-model").value, prompt: $("#playground-prompt").value,
                   max_tokens: Number($("#playground-tokens").value) || 32 };
    try {
      const r = await api(serveBase.completions, { method: "POST", body: JSON.stringify(body) });
      out.textContent = r.choices[0].text;
      out.dataset.done = String(Date.now());
    } catch (e) { out.textContent = `error: ${e.message}`; out.dataset.done = String(Date.now()); }
  });
}

// ---- the loop -----------------------------------------------------------------------------------

let timer = null;

function refreshSoon() { clearTimeout(timer); timer = setTimeout(refresh, 100); }

async function refresh() {
  clearTimeout(timer);
  try {
    const st = await api("api/state");
    renderJobs(st.jobs);
    renderReplicas(st.replicas);
    renderEvents(st.events || []);
    $("#storage").textContent = st.storage ? `storage ${st.storage}` : "";
    await fetchMetrics(st.jobs);
    drawCharts(st.jobs);
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    if ($("#message").textContent.startsWith("dashboard: ")) show("");
  } catch (e) {
    show(`dashboard: ${e.message}`);
  } finally {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => { refresh(); setUpPlayground(); });
