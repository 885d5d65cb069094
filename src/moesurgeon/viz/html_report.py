"""One self-contained interactive HTML page for router usage (no CDN, works offline).

The statistics are embedded as JSON in a ``<script type="application/json">`` tag
and drawn with ``<canvas>`` by inline vanilla JS: a layer x expert heatmap with a
group selector and a "difference vs mean of other groups" view, hover tooltips,
an optional per-layer co-activation matrix, and plain metric tables. The page can
be mailed or archived with a run and opened years later without network access.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .heatmaps import check_usage

__all__ = ["write_usage_html", "embedded_data"]

_DATA_TAG = '<script type="application/json" id="data">'


def _nested(a: np.ndarray) -> Any:
    """Nested lists for JSON: integral arrays as ints, floats to 6 significant digits, NaN/inf as null."""
    a = np.asarray(a, dtype=float)
    finite = np.isfinite(a)
    if finite.all() and np.array_equal(a, np.round(a)):
        return a.astype(np.int64).tolist()
    flat = [float(f"{v:.6g}") if ok else None for v, ok in zip(a.ravel().tolist(), finite.ravel().tolist())]
    return np.array(flat, dtype=object).reshape(a.shape).tolist()


def _cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def write_usage_html(
    path: Path | str,
    *,
    title: str,
    usage: np.ndarray,
    group_names: list[str],
    layer_names: list[str],
    coact: np.ndarray | None = None,
    coact_layer: int = 0,
    extra_tables: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """Write the page. ``usage`` is ``[G, L, E]``; ``coact`` (optional) is ``[L, E, E]``
    co-selection counts whose diagonal holds each expert's selection count; the page opens on layer
    position ``coact_layer`` (the layer of the co-activation PNG written next to it)."""
    usage = check_usage(usage, group_names, layer_names)
    g, n_layers, n_experts = usage.shape
    if coact is not None:
        coact = np.asarray(coact, dtype=float)
        if coact.shape != (n_layers, n_experts, n_experts):
            raise ValueError(
                f"coact must have shape [layers, experts, experts] = {(n_layers, n_experts, n_experts)} "
                f"to match usage {usage.shape}, got shape {coact.shape}"
            )
        if not 0 <= coact_layer < n_layers:
            raise ValueError(f"coact_layer={coact_layer}: expected a layer position in [0, {n_layers - 1}]")
    data = {
        "title": title,
        "groups": [str(n) for n in group_names],
        "layers": [str(n) for n in layer_names],
        "usage": _nested(usage),
        "coact": None if coact is None else _nested(coact),
        "coact_layer": int(coact_layer),
        "tables": {
            str(name): [{str(k): _cell(v) for k, v in row.items()} for row in rows]
            for name, rows in (extra_tables or {}).items()
        },
    }
    # Escaping <, > and & keeps "</script>" inside a string from closing the tag;
    # \u003c etc. are ordinary JSON escapes, so JSON.parse reads them back unchanged.
    payload = json.dumps(data, allow_nan=False, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def embedded_data(page: str) -> dict[str, Any]:
    """The JSON embedded in a page written by ``write_usage_html`` (for tests and re-plotting)."""
    start = page.index(_DATA_TAG) + len(_DATA_TAG)
    return json.loads(page[start : page.index("</script>", start)])


_TEMPLATE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:20px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin:28px 0 6px}
.controls{display:flex;gap:18px;align-items:center;flex-wrap:wrap;margin:6px 0 10px}
.legend{display:flex;align-items:center;gap:6px;font-size:12px}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:5px 8px;border-radius:4px;
font-size:12px;display:none;white-space:pre;z-index:9}
table{border-collapse:collapse;margin:6px 0 18px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2;cursor:pointer}
td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:12px}
</style></head><body>
<h1>__TITLE__</h1>
<h2>Router usage (layer &times; expert)</h2>
<div class="controls">
<label>Group <select id="group"></select></label>
<label>View <select id="mode"><option value="share">share of routed tokens</option>
<option value="diff">difference vs mean of other groups</option></select></label>
<span class="legend"><span id="lo"></span><canvas id="bar" width="160" height="12"></canvas><span id="hi"></span></span>
</div>
<canvas id="usage"></canvas>
<section id="coact-sec"><h2>Expert co-activation P(j | i)</h2>
<div class="controls"><label>Layer <select id="layer"></select></label>
<span class="legend"><span id="clo"></span><canvas id="cbar" width="160" height="12"></canvas><span id="chi"></span></span>
<span class="note">row i: tokens that selected expert i; cell: share of them that also selected j;
grey: diagonal or never selected</span></div>
<canvas id="coact"></canvas></section>
<section id="tables"></section>
<div id="tip"></div>
"""
    + _DATA_TAG
    + """__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const G = D.groups.length, L = D.layers.length, E = L ? D.usage[0][0].length : 0;
const tip = document.getElementById("tip"), $ = id => document.getElementById(id);
const VIR = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
const DIV = [[33,102,172],[146,197,222],[247,247,247],[244,165,130],[178,24,43]];
const fmt = v => v === null || v === undefined || Number.isNaN(v) ? "n/a"
  : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v);
function ramp(stops, t) {
  if (t === null || Number.isNaN(t)) return [200, 200, 200];
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  return stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f));
}
function options(sel, names) { names.forEach((n, i) => sel.add(new Option(n, i))); }
// Draw a rows x cols grid; color(r, c) gives [r,g,b]; hover(r, c) gives tooltip text.
function heat(canvas, rows, cols, rowLabels, cw, ch, color, hover) {
  const ctx = canvas.getContext("2d"); ctx.font = "11px system-ui,sans-serif";
  const left = 8 + Math.max(...rowLabels.map(s => ctx.measureText(s).width)), top = 18;
  const dpr = window.devicePixelRatio || 1, w = left + cols * cw + 4, h = top + rows * ch + 4;
  canvas.width = w * dpr; canvas.height = h * dpr; canvas.style.width = w + "px"; canvas.style.height = h + "px";
  ctx.scale(dpr, dpr); ctx.font = "11px system-ui,sans-serif"; ctx.fillStyle = "#333";
  const rstep = Math.ceil(12 / ch), cstep = Math.ceil(22 / cw);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let r = 0; r < rows; r += rstep) ctx.fillText(rowLabels[r], left - 4, top + (r + 0.5) * ch);
  ctx.textAlign = "center"; ctx.textBaseline = "bottom";
  for (let c = 0; c < cols; c += cstep) ctx.fillText(String(c), left + (c + 0.5) * cw, top - 2);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    ctx.fillStyle = "rgb(" + color(r, c).join(",") + ")"; ctx.fillRect(left + c * cw, top + r * ch, cw, ch);
  }
  canvas.onmousemove = ev => {
    const b = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - b.left - left) / cw), r = Math.floor((ev.clientY - b.top - top) / ch);
    if (r < 0 || c < 0 || r >= rows || c >= cols) { tip.style.display = "none"; return; }
    tip.textContent = hover(r, c); tip.style.display = "block";
    tip.style.left = ev.clientX + 14 + "px"; tip.style.top = ev.clientY + 14 + "px";
  };
  canvas.onmouseleave = () => { tip.style.display = "none"; };
}
function legend(stops, lo, hi, ids = ["bar", "lo", "hi"]) {
  const ctx = $(ids[0]).getContext("2d");
  for (let x = 0; x < 160; x++) {
    ctx.fillStyle = "rgb(" + ramp(stops, x / 159).join(",") + ")"; ctx.fillRect(x, 0, 1, 12);
  }
  $(ids[1]).textContent = fmt(lo); $(ids[2]).textContent = fmt(hi);
}
// null (a NaN in Python) stays NaN here so it is drawn grey rather than as 0.
const U = (g, l, e) => D.usage[g][l][e] ?? NaN;
const others = (g, l, e) => {
  let s = 0; for (let h = 0; h < G; h++) if (h !== g) s += U(h, l, e); return s / (G - 1);
};
let shareMax = 0, diffMax = 0;
for (let g = 0; g < G; g++) for (let l = 0; l < L; l++) for (let e = 0; e < E; e++) {
  shareMax = Math.max(shareMax, U(g, l, e) || 0);
  if (G > 1) diffMax = Math.max(diffMax, Math.abs(U(g, l, e) - others(g, l, e)) || 0);
}
function drawUsage() {
  const g = +$("group").value, diff = $("mode").value === "diff";
  const cw = Math.max(3, Math.min(24, Math.floor(900 / E))), ch = Math.max(4, Math.min(20, Math.floor(560 / L)));
  const val = (l, e) => diff ? U(g, l, e) - others(g, l, e) : U(g, l, e);
  const span = diff ? (diffMax || 1e-12) : (shareMax || 1e-12);
  legend(diff ? DIV : VIR, diff ? -span : 0, span);
  heat($("usage"), L, E, D.layers, cw, ch,
    (l, e) => diff ? ramp(DIV, (val(l, e) + span) / (2 * span)) : ramp(VIR, val(l, e) / span),
    (l, e) => "group: " + D.groups[g] + "\\nlayer: " + D.layers[l] + "\\nexpert: " + e
      + "\\nshare: " + fmt(U(g, l, e))
      + (diff ? "\\nmean of others: " + fmt(others(g, l, e)) + "\\ndifference: " + fmt(val(l, e)) : ""));
}
function drawCoact() {
  const C = D.coact[+$("layer").value], cell = Math.max(3, Math.min(18, Math.floor(640 / E)));
  const p = (i, j) => i === j || !C[i][i] ? null : C[i][j] / C[i][i];
  legend(VIR, 0, 1, ["cbar", "clo", "chi"]);  // P(j | i) is drawn on a fixed 0..1 scale
  heat($("coact"), E, E, [...Array(E).keys()].map(String), cell, cell, (i, j) => ramp(VIR, p(i, j)),
    (i, j) => "layer: " + D.layers[+$("layer").value] + "\\nexpert i: " + i + " (selected " + fmt(C[i][i])
      + " times)\\nexpert j: " + j + "\\nco-selected: " + fmt(C[i][j]) + "\\nP(j | i): " + fmt(p(i, j)));
}
function tables() {
  for (const [name, rows] of Object.entries(D.tables)) {
    const cols = [...new Set(rows.flatMap(r => Object.keys(r)))], h = document.createElement("h2");
    h.textContent = name; $("tables").append(h);
    const t = document.createElement("table"), head = t.createTHead().insertRow(), body = t.createTBody();
    const fill = list => { body.replaceChildren(); for (const r of list) { const tr = body.insertRow();
      for (const c of cols) tr.insertCell().textContent = fmt(r[c]); } };
    cols.forEach(c => { const th = document.createElement("th"); th.textContent = c; head.append(th);
      let asc = true; th.onclick = () => { asc = !asc; fill([...rows].sort((a, b) => {
        const x = a[c], y = b[c];
        const o = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return asc ? o : -o; })); }; });
    fill(rows); $("tables").append(t);
  }
}
options($("group"), D.groups);
if (G < 2) $("mode").options[1].disabled = true;
$("group").onchange = $("mode").onchange = drawUsage;
if (L && E) drawUsage();
if (D.coact) {
  options($("layer"), D.layers); $("layer").value = String(D.coact_layer); $("layer").onchange = drawCoact; drawCoact();
}
else $("coact-sec").style.display = "none";
tables();
</script></body></html>
"""
)
