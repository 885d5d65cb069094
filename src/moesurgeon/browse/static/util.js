// util.js — number formatting, DOM helpers and the data accessors every other script uses.
"use strict";

const DATA = JSON.parse(document.getElementById("browse-data").textContent);

function fmt(v, digits) {
  // exact enough for a tooltip: 6 significant digits, exponent for very small/large values
  if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "n/a";
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  const d = digits || 6;
  const a = Math.abs(v);
  if (a >= 1e6 || a < 1e-4) return v.toExponential(d - 1);
  return String(Number(v.toPrecision(d)));
}

function fmtShort(v) { return fmt(v, 3); }

function fmtPct(v) { return v === null || v === undefined ? "n/a" : fmt(100 * v, 4) + " %"; }

function fmtBytes(n) {
  if (n === null || n === undefined) return "n/a";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, x = n;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
  return (i === 0 ? String(x) : x.toFixed(x >= 100 ? 0 : x >= 10 ? 1 : 2)) + " " + units[i];
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of [].concat(children || [])) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

// ---- data accessors (dict keys of the JSON are strings)
const MODEL = DATA.model;
const MOE = new Set(MODEL.moe_layers);
const NUM_LAYERS = Math.max(1, MODEL.num_layers);

function expertCount() {
  // rows of the expert heatmaps: the most experts any layer holds on disk (pruned exports hold fewer)
  let n = MODEL.num_experts || 0;
  for (const v of Object.values(MODEL.experts_present || {})) n = Math.max(n, v);
  return n;
}

function layerEntry(obj, layer) { return obj ? obj[String(layer)] : undefined; }

function expertLayer(layer) { return layerEntry(DATA.experts.layers, layer); }

function tensorIndex() {
  // per layer: indices into DATA.tensors columns (built once)
  if (tensorIndex.cache) return tensorIndex.cache;
  const byLayer = new Map();
  DATA.tensors.name.forEach((_, i) => {
    const l = DATA.tensors.layer[i];
    const key = l === null ? "model" : String(l);
    if (!byLayer.has(key)) byLayer.set(key, []);
    byLayer.get(key).push(i);
  });
  tensorIndex.cache = byLayer;
  return byLayer;
}

function layerBytes() {
  const out = new Array(NUM_LAYERS).fill(0);
  const bad = new Array(NUM_LAYERS).fill(false);
  DATA.tensors.name.forEach((_, i) => {
    const l = DATA.tensors.layer[i];
    if (l === null || l >= NUM_LAYERS) return;
    out[l] += DATA.tensors.bytes[i] || 0;
    if (DATA.tensors.error[i] || DATA.tensors.dtype[i] === null) bad[l] = true;
  });
  return { bytes: out, bad: bad };
}
