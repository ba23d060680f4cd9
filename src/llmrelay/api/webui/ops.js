// llmrelay's web console, part 3: the operations view's live charts (plain SVG), the models
// loaded on demand with load / unload / pin buttons and each host's memory against its budget,
// and each API key's usage and 429s today. Reads
// GET /api/ops/series (the API server samples its table and metrics every few seconds),
// /api/ops/models and /api/ops/keys; app.js's Operations tab calls loadOpsLive every 2 s.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fdf", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0b7285", "#c2255c"];
const CHARTS = [
  // id, title, where the lines come from, the value of one line in one sample
  ["chart-tokens", "Tokens per second, per model", "models", (r) => r.tokens_per_s],
  ["chart-ttft", "Time to first token p50 / p95 (s, last minute), per model", "ttft", null],
  ["chart-queue", "Queue, per worker", "workers", (r) => r.queue],
  ["chart-running", "Requests running, per worker", "workers", (r) => r.running],
];
const ops = { samples: [], last: 0 };

function svgEl(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

// The lines of one chart: name -> [[t, value], ...].
function linesOf(kind, pick) {
  const lines = new Map();
  const add = (name, t, v) => {
    if (v === null || v === undefined) return;
    if (!lines.has(name)) lines.set(name, []);
    lines.get(name).push([t, v]);
  };
  for (const s of ops.samples) {
    if (kind === "workers") {
      for (const w of s.workers) add(w.models.join(",") + " @ " + w.address, s.t, pick(w));
    } else {
      for (const [model, r] of Object.entries(s.models)) {
        if (kind === "ttft") { add(model + " p50", s.t, r.ttft_p50); add(model + " p95", s.t, r.ttft_p95); }
        else add(model, s.t, pick(r));
      }
    }
  }
  return lines;
}

function drawChart(box, title, lines) {
  const W = 460, H = 170, L = 44, R = 8, T = 22, B = 20;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  svg.setAttribute("aria-label", title);
  const head = svgEl("text", { x: 4, y: 14, class: "chart-title" });
  head.textContent = title;
  svg.append(head);
  const all = [...lines.values()].flat();
  const t1 = all.length ? Math.max(...all.map((p) => p[0])) : Date.now() / 1000;
  const t0 = Math.min(t1 - 60, ...all.map((p) => p[0]));
  const vmax = Math.max(0, ...all.map((p) => p[1]));
  const top = vmax > 0 ? vmax * 1.1 : 1;
  const x = (t) => L + (W - L - R) * (t - t0) / Math.max(1, t1 - t0);
  const y = (v) => H - B - (H - T - B) * v / top;
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    const label = svgEl("text", { x: L - 4, y: y(v) + 4, class: "axis", "text-anchor": "end" });
    label.textContent = v >= 10 ? v.toFixed(0) : v.toFixed(2);
    svg.append(label);
  }
  const span = svgEl("text", { x: W - R, y: H - 4, class: "axis", "text-anchor": "end" });
  span.textContent = "last " + Math.round((t1 - t0) / 60 * 10) / 10 + " min";
  svg.append(span);
  let i = 0;
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const [name, points] of lines) {
    const color = COLORS[i++ % COLORS.length];
    const d = points.map((p, k) => (k ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
    svg.append(svgEl("path", { d, stroke: color, fill: "none", "stroke-width": 1.8, "data-name": name }));
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = color;  // CSSOM, allowed by the page's style policy
    item.append(swatch, document.createTextNode(name));
    legend.append(item);
  }
  svg.dataset.max = String(vmax);
  svg.dataset.lines = String(lines.size);
  box.replaceChildren(svg, legend);
}

function drawCharts() {
  const holder = $("ops-charts");
  for (const [id, title, kind, pick] of CHARTS) {
    let box = $(id);
    if (!box) { box = document.createElement("figure"); box.id = id; holder.append(box); }
    drawChart(box, title, linesOf(kind, pick));
  }
}

function cellRow(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.append(c); else td.textContent = c == null ? "-" : String(c);
    tr.append(td);
  }
  return tr;
}

function mib(bytes) {  // MiB below a GiB, GiB with one decimal from there
  if (!bytes) return "-";
  return bytes < 1073741824 ? (bytes / 1048576).toFixed(0) + " MiB" : (bytes / 1073741824).toFixed(1) + " GiB";
}

// One line per host: the estimated memory its models hold against its budget, with a bar.
function drawHostMemory(hosts) {
  const lines = hosts.map((h) => {
    const p = document.createElement("p");
    p.className = "host-memory";
    p.dataset.host = h.host;
    p.dataset.held = String(h.held_bytes);
    p.dataset.budget = h.budget_bytes == null ? "" : String(h.budget_bytes);
    const bar = document.createElement("meter");
    bar.min = 0; bar.max = h.budget_bytes || 1; bar.value = Math.min(h.held_bytes, bar.max);
    bar.optimum = 0; bar.high = bar.max * 0.9;
    const text = h.budget_bytes == null
      ? mib(h.held_bytes) + " held (budget unknown)"
      : (h.held_bytes ? mib(h.held_bytes) : "0 MiB") + " held of a " + mib(h.budget_bytes) +
        " budget (the models' estimates), " + mib(Math.max(0, h.budget_bytes - h.held_bytes)) + " free";
    p.append(document.createTextNode("Host " + h.host + ": "), bar, document.createTextNode(" " + text));
    return p;
  });
  $("host-memory").replaceChildren(...lines);
}

async function modelAction(action, model) {
  const resp = await fetch("/api/ops/models/" + action, {
    method: "POST", headers: authHeaders(), body: JSON.stringify({ model }),
  });
  $("ondemand-summary").textContent = !resp.ok ? action + " " + model + ": " + await errorMessage(resp)
    : action + " " + model + (action.endsWith("pin") ? ": done" : ": asked");
  loadOpsLive();
}

async function loadDeclared() {
  const resp = await fetch("/api/ops/models", { headers: authHeaders() });
  if (!resp.ok) return;
  const data = await resp.json();
  if (!data.models.length) $("ondemand-summary").textContent = "No model is declared on demand.";
  else if (!data.admin_buttons && !$("ondemand-summary").textContent) {
    $("ondemand-summary").textContent = "Start the API server with --host-admin-key (or " +
      "LLMRELAY_ADMIN_KEY) to load, unload and pin from here.";
  }
  const rows = data.models.map((m) => {
    const buttons = document.createElement("span");
    for (const action of ["load", "unload"]) {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = action; b.className = "small " + action;
      b.disabled = !data.admin_buttons || (action === "load") === (m.state === "loaded");
      b.addEventListener("click", () => modelAction(action, m.model));
      buttons.append(b);
    }
    const pin = document.createElement("button");  // a pinned model stays loaded, never evicted
    pin.type = "button"; pin.textContent = m.pin ? "unpin" : "pin"; pin.className = "small pin";
    pin.disabled = !data.admin_buttons;
    pin.addEventListener("click", () => modelAction(m.pin ? "unpin" : "pin", m.model));
    buttons.append(pin);
    let state = m.state;
    if (m.download) state += " " + Math.round(m.download.percent || 0) + "% of " + mib(m.download.total_bytes);
    if (m.error) state += " (" + m.error + ")";
    const tr = cellRow([m.model, state, mib(m.bytes), m.load, m.pin ? "yes" : "no", m.host, buttons]);
    tr.dataset.model = m.model;
    tr.dataset.state = m.state;
    tr.dataset.pin = String(m.pin);
    return tr;
  });
  drawHostMemory(data.hosts || []);
  document.querySelector("#ondemand-table tbody").replaceChildren(...rows);
  $("ondemand-table").hidden = !rows.length;
}

// Today's 429s of a key: the total, and by limit when there are any ("3 (requests 2, tokens 1)").
function refusals(byLimit) {
  const parts = Object.entries(byLimit || {});
  const total = parts.reduce((sum, [, n]) => sum + n, 0);
  return total ? total + " (" + parts.map(([limit, n]) => limit + " " + n).join(", ") + ")" : "0";
}

async function loadKeys() {
  const resp = await fetch("/api/ops/keys", { headers: authHeaders() });
  if (!resp.ok) return;
  const data = await resp.json();
  const rows = data.keys.map((k) => cellRow([
    k.key, k.requests, k.prompt_tokens, k.completion_tokens,
    Object.entries(k.limits || {}).map(([n, v]) => n + " " + v).join(", ") || "none",
    refusals(k.rate_limited)]));
  document.querySelector("#keys-table tbody").replaceChildren(...rows);
}

async function loadOpsLive() {
  const resp = await fetch("/api/ops/series?since=" + ops.last, { headers: authHeaders() });
  if (!resp.ok) return;  // 401/403: the workers' table says why
  const data = await resp.json();
  ops.samples = ops.samples.concat(data.samples).slice(-300);
  if (ops.samples.length) ops.last = ops.samples[ops.samples.length - 1].t;
  drawCharts();
  loadDeclared();
  loadKeys();
}
