// tracks.js — the genome-browser view: one coordinate axis (decoder layers) and tracks stacked under it.
// A "heat" track is experts (rows) x layers (columns); a "bars" track has one value per layer.
"use strict";

function vectorTrack(id, group, label, desc, perLayer, kind) {
  const rows = " · rows: experts 0–" + Math.max(0, expertCount() - 1);
  return { id: id, group: group, label: label, desc: desc + rows, type: "heat", kind: kind || "seq", heat: perLayer };
}

function layerTrack(id, group, label, desc, perLayer, kind) {
  return { id: id, group: group, label: label, desc: desc, type: "bars", kind: kind || "seq", bars: perLayer };
}

function buildTracks() {
  const tracks = [];
  const lb = layerBytes();
  tracks.push(Object.assign(layerTrack("bytes", "Inventory", "bytes per layer", "all tensors of the layer; red: something unreadable",
    (l) => lb.bytes[l]), { color: (l) => (lb.bad[l] ? "#c92a2a" : MOE.has(l) ? "#4c6ef5" : "#adb5bd"), format: fmtBytes }));
  const labels = DATA.experts.labels || {};
  const ex = (l) => expertLayer(l);
  const names = { norm: "expert norm", rms: "expert RMS", maxabs: "expert max |w|", nearzero: "near-zero share" };
  for (const m of ["norm", "rms", "maxabs", "nearzero"]) {
    if (!MOE.size || DATA.pending) break;
    tracks.push(vectorTrack("x-" + m, "Expert weights", names[m], labels[m] || "", (l) => (ex(l) ? ex(l)[m] : undefined)));
  }
  const nonfinite = Object.values(DATA.experts.layers).some((r) => (r.nonfinite || []).some((v) => v > 0));
  if (nonfinite) tracks.push(vectorTrack("x-nonfinite", "Expert weights", "NaN / inf count", "values that are not finite", (l) => (ex(l) ? ex(l).nonfinite : undefined)));
  const parts = new Set();
  for (const r of Object.values(DATA.experts.layers)) for (const p of Object.keys(r.sigma1 || {})) parts.add(p);
  for (const p of parts) {
    tracks.push(vectorTrack("s-" + p, "Expert weights", "σ₁ " + p, "top singular value (Lanczos estimate, a lower bound)",
      (l) => (ex(l) && ex(l).sigma1[p] ? ex(l).sigma1[p] : undefined)));
  }
  const sim = DATA.similarity, osim = DATA.output_similarity;
  if (Object.keys(sim).length) {
    tracks.push(layerTrack("sim-max", "Similarity", "weight cosine, closest pair", "max over expert pairs of the weight cosine", (l) => (sim[l] ? sim[l].summary.max : undefined)));
    tracks.push(layerTrack("sim-mean", "Similarity", "weight cosine, mean", "mean over expert pairs", (l) => (sim[l] ? sim[l].summary.mean : undefined)));
  }
  if (Object.keys(osim).length) {
    tracks.push(layerTrack("osim-mean", "Similarity", "output cosine, mean", "expert outputs on calibration tokens", (l) => (osim[l] ? osim[l].summary.mean : undefined)));
  }
  const router = DATA.router;
  if (Object.keys(router).length) {
    tracks.push(vectorTrack("r-norm", "Router", "router row norm", "|W_e| of each expert's router row", (l) => (router[l] ? router[l].row_norm : undefined)));
    tracks.push(layerTrack("r-cos", "Router", "router rows, closest pair", "max cosine between two experts' router rows", (l) => (router[l] && router[l].summary ? router[l].summary.max : undefined)));
    const vecs = new Set();
    for (const r of Object.values(router)) for (const k of Object.keys(r.vectors || {})) vecs.add(k);
    for (const k of vecs) tracks.push(vectorTrack("r-" + k, "Router", "router " + k, "per-expert value of " + k, (l) => (router[l] ? router[l].vectors[k] : undefined)));
  }
  DATA.overlays.forEach((o, i) => {
    const t = vectorTrack("u-" + i, "Usage — " + o.source.split("/").slice(-2).join("/"), o.name, o.description,
      (l) => o.layers[l], o.name.indexOf("share") >= 0 ? "share" : "seq");
    // one track per label group and kind is a lot: only the selection shares start open
    t.defaultHidden = o.name.indexOf("usage share") !== 0;
    tracks.push(t);
  });
  const diff = DATA.diff;
  if (diff) {
    tracks.push(layerTrack("d-layer", "Diff", "relative change per layer", "|A − B| / |B| over the layer's compared tensors", (l) => diff.layer_rel[l]));
    tracks.push(vectorTrack("d-expert", "Diff", "relative change per expert", "through the expert map", (l) => (diff.layers[l] ? diff.layers[l].expert_rel : undefined)));
    const locals = new Set();
    for (const r of Object.values(diff.layers)) for (const k of Object.keys(r.router_rows || {})) locals.add(k);
    for (const k of locals) tracks.push(vectorTrack("d-router-" + k, "Diff", "router " + k + " change per row", "|ΔW_e| / |W_e| per expert row", (l) => (diff.layers[l] ? diff.layers[l].router_rows[k] : undefined)));
  }
  return tracks;
}

function layerX(l, w) { const n = STATE.hi - STATE.lo + 1; return ((l - STATE.lo) / n) * w; }

function layerAt(x, w) {
  const n = STATE.hi - STATE.lo + 1;
  const l = STATE.lo + Math.floor((x / w) * n);
  return l < STATE.lo || l > STATE.hi ? null : l;
}

function drawAxis(canvas, matches) {
  const { ctx, w } = prepCanvas(canvas, 34);
  const plot = w - LEGEND_W, n = STATE.hi - STATE.lo + 1, cw = plot / n;
  for (let l = STATE.lo; l <= STATE.hi; l++) {
    const x = layerX(l, plot);
    ctx.fillStyle = MOE.has(l) ? "#dbe4ff" : "#f1f3f5";
    ctx.fillRect(x, 0, Math.max(1, cw - 1), 20);
    if (matches.has(l)) { ctx.fillStyle = "#f76707"; ctx.fillRect(x, 20, Math.max(2, cw - 1), 4); }
  }
  const step = Math.max(1, Math.ceil(28 / cw));
  ctx.fillStyle = "#1d2330";
  ctx.textBaseline = "middle";
  ctx.textAlign = "center";
  for (let l = STATE.lo; l <= STATE.hi; l += step) ctx.fillText(String(l), layerX(l, plot) + cw / 2, 10);
  ctx.textAlign = "left";
  ctx.fillStyle = "#5d6678";
  ctx.fillText(STATE.lo + "–" + STATE.hi + " of " + NUM_LAYERS, plot + 4, 10);
  if (STATE.layer !== null) outlineColumn(ctx, STATE.layer, plot, 34);
  canvas._hit = (x) => {
    const l = layerAt(x, plot);
    if (l === null) return null;
    return { text: "layer " + l + (MOE.has(l) ? " (MoE)" : " (dense)") + (matches.has(l) ? "\nmatches the search" : ""), layer: l };
  };
  canvas._plotWidth = plot;
}

function outlineColumn(ctx, l, plot, h) {
  if (l < STATE.lo || l > STATE.hi) return;
  const cw = plot / (STATE.hi - STATE.lo + 1);
  ctx.strokeStyle = "#d9480f";
  ctx.lineWidth = 2;
  ctx.strokeRect(layerX(l, plot) + 1, 1, Math.max(2, cw - 2), h - 2);
  ctx.lineWidth = 1;
}

function drawTrack(track, canvas) {
  const E = Math.max(1, expertCount());
  const height = track.type === "heat" ? Math.max(48, Math.min(180, E * 4)) : 46;
  const { ctx, w, h } = prepCanvas(canvas, height);
  const plot = w - LEGEND_W, n = STATE.hi - STATE.lo + 1;
  const layers = [];
  for (let l = STATE.lo; l <= STATE.hi; l++) layers.push(l);
  const fmtV = track.format || fmt;
  if (track.type === "heat") {
    const cols = layers.map((l) => track.heat(l));
    const scale = makeScale([].concat(...cols.filter(Boolean)), track.kind);
    drawHeat(ctx, 0, 0, plot, h, E, n, (r, c) => (cols[c] ? (r < cols[c].length ? cols[c][r] : undefined) : undefined), scale);
    drawColorBar(ctx, plot + 6, 1, 10, h - 2, scale);
    if (STATE.expert !== null) {
      ctx.strokeStyle = "rgba(217,72,15,.85)";
      ctx.strokeRect(0, (STATE.expert * h) / E, plot, Math.max(1, h / E));
    }
    canvas._hit = (x, y) => {
      const l = layerAt(x, plot);
      if (l === null) return null;
      const e = Math.floor((y / h) * E);
      const col = track.heat(l);
      if (!col) return { text: "layer " + l + ": no MoE block", layer: l };
      return { text: track.label + "\nlayer " + l + " · expert " + e + "\n" + fmtV(col[e]), layer: l, expert: e };
    };
  } else {
    const values = layers.map((l) => track.bars(l));
    const opts = { color: track.color ? (i) => track.color(layers[i]) : undefined, format: track.format };
    if (track.kind === "cos") { opts.lo = -1; opts.hi = 1; }
    drawBars(ctx, 0, 2, plot, h - 4, values, opts);
    canvas._hit = (x) => {
      const l = layerAt(x, plot);
      if (l === null) return null;
      return { text: track.label + "\nlayer " + l + ": " + fmtV(track.bars(l)), layer: l };
    };
  }
  if (STATE.layer !== null) outlineColumn(ctx, STATE.layer, plot, h);
}

function renderTracks(container, tracks) {
  clear(container);
  let group = null;
  for (const t of tracks) {
    if (t.group !== group) { container.appendChild(el("div", { class: "group-title", text: t.group })); group = t.group; }
    const collapsed = isCollapsed(t);
    const canvas = el("canvas", { "data-track": t.id });
    const label = el("div", { class: "label", title: "click to " + (collapsed ? "show" : "hide") + " this track" }, [t.label, el("small", { text: t.desc })]);
    label.addEventListener("click", () => toggleTrack(t));
    const row = el("div", { class: "track" + (collapsed ? " collapsed" : ""), id: "track-" + t.id }, [label, canvas]);
    container.appendChild(row);
    if (!collapsed) drawTrack(t, canvas);
  }
}
