// main.js — wire it together: header, banners, hash-driven render, tooltips, clicks, zoom and search.
"use strict";

const TRACKS = buildTracks();

function summaryText() {
  const m = MODEL;
  const parts = [m.model_type, NUM_LAYERS + " layers (" + MOE.size + " MoE)"];
  if (m.num_experts) parts.push(m.num_experts + " experts" + (m.top_k ? ", top-" + m.top_k : ""));
  parts.push(fmtBytes(DATA.total_bytes) + " in " + DATA.shards.length + " shard" + (DATA.shards.length === 1 ? "" : "s"));
  parts.push(DATA.tensors.name.length + " tensors");
  return parts.join(" · ");
}

function renderBanner() {
  const box = clear(document.getElementById("banner"));
  if (DATA.pending) box.appendChild(el("div", { class: "pending", text: "Inventory from the shard headers; weight statistics are being computed — reload this page when the run ends." }));
  for (const p of DATA.problems) box.appendChild(el("div", { class: "problem", text: p }));
  for (const n of MODEL.notes) box.appendChild(el("div", { class: "note", text: n }));
  if (DATA.diff) {
    const s = DATA.diff.summary;
    box.appendChild(el("div", { class: "note", text: "Compared with " + DATA.diff.other + " (" + DATA.diff.other_model_type + "): " + s.changed + " of " + s.compared + " compared tensors changed, " + s.not_compared + " not comparable." }));
    for (const n of DATA.diff.notes) box.appendChild(el("div", { class: "note", text: n }));
    const gone = Object.entries(s.other_experts_unmatched || {});
    if (gone.length) {
      const same = gone.every(([, v]) => JSON.stringify(v) === JSON.stringify(gone[0][1]));
      box.appendChild(el("div", { class: "note", text: "Experts of compare_to with no counterpart here (removed?): " +
        (same && gone.length === MOE.size ? "experts " + gone[0][1].join(", ") + " in every MoE layer" : gone.map(([l, v]) => "layer " + l + ": " + v.join(", ")).join("; ")) +
        " — expert map " + (DATA.diff.layers[gone[0][0]].map_source || "") + "." }));
    }
  }
}

function renderCrumbs() {
  const box = clear(document.getElementById("crumbs"));
  box.appendChild(el("a", { text: "whole model", onclick: () => setState({ layer: null, lo: 0, hi: NUM_LAYERS - 1 }) }));
  if (STATE.layer !== null) {
    box.appendChild(document.createTextNode(" › "));
    box.appendChild(el("a", { text: "layer " + STATE.layer, onclick: () => setState({ expert: null }) }));
  }
  if (STATE.expert !== null) box.appendChild(document.createTextNode(" › expert " + STATE.expert));
  box.appendChild(el("span", { class: "legend", text: "   (click a heatmap cell, bar or table row to zoom in; the address keeps the view)" }));
}

function searchMatches() {
  const q = STATE.q.toLowerCase(), out = new Set();
  if (!q) return out;
  DATA.tensors.name.forEach((n, i) => { if (n.toLowerCase().indexOf(q) >= 0 && DATA.tensors.layer[i] !== null) out.add(DATA.tensors.layer[i]); });
  return out;
}

function render() {
  try {
    readHash();
    document.getElementById("search").value = STATE.q;
    document.getElementById("fold").textContent = STATE.fold ? "unfold tracks" : "fold tracks";
    renderBanner();
    renderCrumbs();
    drawAxis(document.getElementById("axis"), searchMatches());
    renderTracks(document.getElementById("tracks"), TRACKS);
    const detail = clear(document.getElementById("detail"));
    if (STATE.layer !== null) renderLayer(detail, STATE.layer);
    if (STATE.expert !== null && MOE.has(STATE.layer) && !DATA.pending) renderExpert(detail, STATE.layer, STATE.expert);
    renderInventory(clear(document.getElementById("inventory")), STATE.q);
    flushDraws();
    if (location.search.indexOf("probe") >= 0) probeCanvases();
    // what is drawn, for tests and for people reading the DOM
    document.body.setAttribute("data-view", "layer=" + STATE.layer + ";expert=" + STATE.expert + ";lo=" + STATE.lo + ";hi=" + STATE.hi);
  } catch (err) {
    window.__browseRecordError(err && err.stack ? err.stack : String(err));
  }
}

// ---- tooltips and clicks on every canvas with a _hit function
const tooltip = document.getElementById("tooltip");
function canvasHit(ev) {
  const c = ev.target;
  if (!(c instanceof HTMLCanvasElement) || !c._hit) return null;
  const r = c.getBoundingClientRect();
  return c._hit(ev.clientX - r.left, ev.clientY - r.top);
}
document.addEventListener("mousemove", (ev) => {
  const hit = canvasHit(ev);
  if (!hit) { tooltip.hidden = true; return; }
  tooltip.textContent = hit.text;
  tooltip.hidden = false;
  tooltip.style.left = Math.min(window.innerWidth - 300, ev.clientX + 14) + "px";
  tooltip.style.top = ev.clientY + 14 + "px";
});
let dragFrom = null;
document.addEventListener("mousedown", (ev) => {
  if (ev.target.id === "axis") { const h = canvasHit(ev); dragFrom = h ? h.layer : null; }
});
document.addEventListener("mouseup", (ev) => {
  const hit = canvasHit(ev);
  if (ev.target.id === "axis" && hit && dragFrom !== null && hit.layer !== dragFrom) {
    setState({ lo: Math.min(dragFrom, hit.layer), hi: Math.max(dragFrom, hit.layer) });
    dragFrom = null;
    return;
  }
  dragFrom = null;
  if (!hit) return;
  if (hit.layer !== undefined) selectLayer(hit.layer, hit.expert);
  else if (hit.expert !== undefined && STATE.layer !== null) setState({ expert: hit.expert });
});
document.getElementById("overview").addEventListener("wheel", (ev) => {
  const c = ev.target;
  if (!(c instanceof HTMLCanvasElement) || !c._hit) return;
  ev.preventDefault();
  const hit = canvasHit(ev);
  zoom(ev.deltaY > 0 ? 1.5 : 1 / 1.5, hit && hit.layer !== undefined ? hit.layer : undefined);
}, { passive: false });

// ---- controls
document.getElementById("zoom-in").addEventListener("click", () => zoom(1 / 2));
document.getElementById("zoom-out").addEventListener("click", () => zoom(2));
document.getElementById("zoom-all").addEventListener("click", () => setState({ layer: null, lo: 0, hi: NUM_LAYERS - 1, q: "" }));
document.getElementById("fold").addEventListener("click", () => setState({ fold: !STATE.fold, show: new Set(), hide: new Set() }));
const search = document.getElementById("search");
let searchTimer = null;
search.addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => setState({ q: search.value.trim() }), 250);
});
search.addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter") return;
  const q = search.value.trim().toLowerCase();
  const i = DATA.tensors.name.findIndex((n) => n.toLowerCase().indexOf(q) >= 0);
  if (i >= 0 && DATA.tensors.layer[i] !== null) { STATE.q = search.value.trim(); selectLayer(DATA.tensors.layer[i], DATA.tensors.expert[i]); }
});
window.addEventListener("hashchange", render);
let resizeTimer = null;
window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(render, 150); });

// ?probe in the address (tests): after each render, count the inked pixels of every canvas
// and fingerprint them into body[data-canvas-ink] / body[data-canvas-sum], so a headless browser's DOM dump
// shows that something was drawn and whether two views draw differently
function probeCanvases() {
  let ink = 0, sum = 0;
  for (const c of document.querySelectorAll("canvas")) {
    if (!c.width || !c.height) continue;
    const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    for (let i = 3; i < px.length; i += 4) {
      if (px[i] === 0) continue;
      ink += 1;
      sum = (sum * 31 + px[i - 3] * 7 + px[i - 2] * 3 + px[i - 1] + i) % 1000000007;
    }
  }
  document.body.setAttribute("data-canvas-ink", String(ink));
  document.body.setAttribute("data-canvas-sum", String(sum));
}

document.getElementById("summary").textContent = summaryText();
render();
// ?probe=HASH (tests): after the first view is drawn and fingerprinted (kept in data-first-sum), go to #HASH
// the way a user's link or click does, through a hash change
const PROBE_HASH = new URLSearchParams(location.search).get("probe");
if (PROBE_HASH && PROBE_HASH !== "1" && !location.hash) {
  document.body.setAttribute("data-first-sum", document.body.getAttribute("data-canvas-sum") || "");
  location.hash = "#" + PROBE_HASH;
}
