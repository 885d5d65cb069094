// panels.js — the zoomed-in views: one layer (per-expert bars, similarity and router matrices, usage, diff)
// and one expert (its tensors, nearest neighbours, usage and change).
"use strict";

// panels are built off-document; their canvases are drawn once render() has put them in the page
// (a canvas needs its laid-out width), all in the same task, so what is drawn is deterministic
const DRAWS = [];
function later(fn) { DRAWS.push(fn); }
function flushDraws() { while (DRAWS.length) DRAWS.shift()(); }

function barPanel(title, values, opts) {
  // a per-expert bar chart; click selects the expert
  const canvas = el("canvas");
  const box = el("div", { class: "bars" }, [el("h3", { text: title }), canvas]);
  later(() => {
    const { ctx, w, h } = prepCanvas(canvas, 64);
    const plot = w - LEGEND_W;
    const r = drawBars(ctx, 0, 2, plot, h - 4, values, { highlight: STATE.expert, lo: opts && opts.lo, hi: opts && opts.hi,
      color: (i) => (values[i] !== null && opts && opts.mark && opts.mark(i) ? "#d9480f" : "#4c6ef5") });
    canvas._hit = (x) => {
      const e = Math.floor(x / r.bw);
      if (e < 0 || e >= values.length) return null;
      return { text: title + "\nexpert " + e + ": " + ((opts && opts.format) || fmt)(values[e]), expert: e };
    };
  });
  return box;
}

function matrixFigure(title, entry, caption) {
  const canvas = el("canvas");
  const labels = entry.experts || entry.matrix.map((_, i) => i);
  later(() => drawMatrix(canvas, entry.matrix, labels, { title: title, highlight: STATE.expert }));
  return el("figure", {}, [el("h3", { text: title }), canvas, el("figcaption", { text: caption || "" })]);
}

function neighbours(entry, e, k) {
  if (!entry || !entry.matrix) return [];
  const labels = entry.experts || entry.matrix.map((_, i) => i);
  const pos = labels.indexOf(e);
  if (pos < 0) return [];
  return entry.matrix[pos].map((v, j) => [labels[j], v]).filter(([j]) => j !== e).sort((a, b) => b[1] - a[1]).slice(0, k);
}

function renderLayer(box, l) {
  const moe = MOE.has(l);
  box.appendChild(el("h2", { id: "layer-title", text: "Layer " + l + (moe ? " — MoE, " + (MODEL.experts_present[l] || 0) + " experts (" + MODEL.storage[l] + " on disk)" : " — dense (no router)") }));
  if (!moe) return;
  if (DATA.pending) { box.appendChild(el("p", { class: "muted", text: "Statistics are still being computed; reload when the run ends." })); return; }
  const ex = expertLayer(l);
  const panel = el("div", { class: "panel grid" });
  if (ex) {
    for (const [m, label] of [["norm", "Frobenius norm"], ["rms", "RMS"], ["maxabs", "max |w|"], ["nearzero", "near-zero share"]]) {
      panel.appendChild(barPanel(label + " per expert", ex[m], { format: m === "nearzero" ? fmtPct : fmt }));
    }
    for (const [p, vals] of Object.entries(ex.sigma1)) panel.appendChild(barPanel("σ₁ " + p + " per expert", vals));
    if (ex.missing && ex.missing.length) panel.appendChild(el("p", { class: "muted wide", text: "not read: " + ex.missing.slice(0, 6).join("; ") + (ex.missing.length > 6 ? " …" : "") }));
  }
  box.appendChild(panel);
  const figs = el("div", { class: "matrices" });
  const sim = DATA.similarity[l], osim = DATA.output_similarity[l], router = DATA.router[l];
  if (sim) figs.appendChild(matrixFigure("weight cosine", sim, (sim.exact ? "exact, " : "estimated from a strided sample of ") + sim.weights + " weights per expert (" + sim.parts.join(", ") + "); colours span ± the largest off-diagonal value"));
  if (osim) figs.appendChild(matrixFigure("output cosine", osim, "expert outputs on " + (osim.tokens || "?") + " calibration tokens"));
  if (router && router.matrix) figs.appendChild(matrixFigure("router row cosine", router, "rows of " + router.weight));
  box.appendChild(el("h3", { text: "Expert × expert similarity (click a row: select that expert)" }));
  box.appendChild(figs);
  if (router) {
    const rp = el("div", { class: "panel grid" });
    if (router.row_norm) rp.appendChild(barPanel("router row norm |W_e|", router.row_norm));
    for (const [k, v] of Object.entries(router.vectors || {})) rp.appendChild(barPanel("router " + k, v, { lo: Math.min(0, ...v.filter((x) => x !== null)) }));
    for (const note of router.notes || []) rp.appendChild(el("p", { class: "muted wide", text: note }));
    box.appendChild(el("h3", { text: "Router geometry" }));
    box.appendChild(rp);
  }
  const usage = DATA.overlays.filter((o) => o.layers[l]);
  if (usage.length) {
    const up = el("div", { class: "panel grid" });
    for (const o of usage) up.appendChild(barPanel(o.name, o.layers[l], { format: o.name.indexOf("share") >= 0 ? fmtPct : fmt }));
    box.appendChild(el("h3", { text: "Usage overlays" }));
    box.appendChild(up);
  }
  const d = DATA.diff && DATA.diff.layers[l];
  if (d) {
    const dp = el("div", { class: "panel grid" });
    dp.appendChild(barPanel("relative change per expert (vs compare_to)", d.expert_rel, { mark: (i) => d.expert_equal[i] === false }));
    for (const [k, v] of Object.entries(d.router_rows || {})) dp.appendChild(barPanel("router " + k + " change per row", v));
    dp.appendChild(el("p", { class: "muted wide", text: "expert map: " + (d.map_source || "n/a") }));
    box.appendChild(el("h3", { text: "Diff against " + DATA.diff.other }));
    box.appendChild(dp);
  }
}

function renderExpert(box, l, e) {
  const ex = expertLayer(l);
  box.appendChild(el("h2", { id: "expert-title", text: "Layer " + l + " · expert " + e }));
  if (!ex || !ex.detail || !ex.detail[e]) { box.appendChild(el("p", { class: "muted", text: "no statistics for this expert" })); return; }
  const rows = ex.detail[e].map((p) => el("tr", { class: p.error ? "bad" : null }, [
    el("td", { class: "name", text: p.tensor + (p.fused ? " [" + e + "]" : "") }), el("td", { text: p.part }),
    el("td", { text: p.error ? p.error : fmt(p.norm) }), el("td", { text: fmt(p.rms) }), el("td", { text: fmt(p.maxabs) }),
    el("td", { text: fmtPct(p.nearzero) }), el("td", { text: p.sigma1 !== undefined ? fmt(p.sigma1) + " (Δ " + fmtShort(p.sigma_change) + ")" : "n/a" })]));
  const head = el("tr", {}, ["tensor", "part", "norm", "RMS", "max |w|", "near-zero", "σ₁ (last change)"].map((t, i) => el("th", { class: i === 0 ? "name" : null, text: t })));
  box.appendChild(el("div", { class: "panel" }, [el("table", {}, [head].concat(rows))]));
  const facts = [];
  for (const [label, entry] of [["weights", DATA.similarity[l]], ["outputs", DATA.output_similarity[l]], ["router rows", DATA.router[l]]]) {
    const nb = neighbours(entry, e, 3);
    if (nb.length) facts.push("closest by " + label + ": " + nb.map(([j, v]) => "expert " + j + " (" + fmtShort(v) + ")").join(", "));
  }
  for (const o of DATA.overlays) if (o.layers[l]) facts.push(o.name + ": " + (o.name.indexOf("share") >= 0 ? fmtPct : fmt)(o.layers[l][e]));
  const d = DATA.diff && DATA.diff.layers[l];
  if (d) {
    const j = d.expert_map[e];
    facts.push(j === null || j === undefined ? "compare_to: no counterpart" : "compare_to: expert " + j + (d.expert_equal[e] ? ", identical bytes" : ", relative change " + fmt(d.expert_rel[e])));
  }
  box.appendChild(el("ul", {}, facts.map((f) => el("li", { text: f }))));
}

function renderInventory(box, query) {
  const T = DATA.tensors, q = query.toLowerCase();
  const idx = [];
  T.name.forEach((n, i) => {
    if (q && n.toLowerCase().indexOf(q) < 0) return;
    if (!q && STATE.layer !== null && T.layer[i] !== STATE.layer) return;
    if (STATE.expert !== null && T.expert[i] !== null && T.expert[i] !== STATE.expert && !q) return;
    idx.push(i);
  });
  const limit = renderInventory.limit || 300;
  const diff = DATA.diff ? DATA.diff.tensors : null;
  const cols = ["tensor", "shape", "dtype", "bytes", "shard", "norm", "RMS", "max |w|", "near-zero", "σ₁"].concat(diff ? ["change"] : []);
  const head = el("tr", {}, cols.map((t, i) => el("th", { class: i === 0 ? "name" : null, text: t })));
  const rows = idx.slice(0, limit).map((i) => {
    const bad = T.error[i] || T.dtype[i] === null;
    const dv = diff ? diff[T.name[i]] : null;
    const tr = el("tr", { class: "clickable" + (bad ? " bad" : "") + (dv && !dv.equal ? " changed" : ""), title: T.error[i] || "" }, [
      el("td", { class: "name", text: T.name[i] }), el("td", { text: T.shape[i] ? "[" + T.shape[i].join(", ") + "]" : "unreadable" }),
      el("td", { text: T.dtype[i] || "?" }), el("td", { text: fmtBytes(T.bytes[i]) }), el("td", { text: DATA.shards[T.shard[i]] ? DATA.shards[T.shard[i]].name : "?" }),
      el("td", { text: T.error[i] ? T.error[i] : fmt(T.norm[i]) }), el("td", { text: fmt(T.rms[i]) }), el("td", { text: fmt(T.maxabs[i]) }),
      el("td", { text: fmtPct(T.nearzero[i]) }), el("td", { text: fmt(T.sigma1[i]) })].concat(diff ? [el("td", { class: "diff", text: dv ? (dv.equal ? "identical" : fmt(dv.rel)) : (DATA.diff.uncompared[T.name[i]] || "—") })] : []));
    tr.addEventListener("click", () => { if (T.layer[i] !== null) selectLayer(T.layer[i], T.expert[i]); });
    return tr;
  });
  box.appendChild(el("h2", { text: "Tensors " + (q ? "matching “" + query + "”" : STATE.layer !== null ? "of layer " + STATE.layer : "") + " (" + idx.length + ")" }));
  box.appendChild(el("table", { id: "tensor-table" }, [head].concat(rows)));
  if (idx.length > limit) box.appendChild(el("button", { text: "show " + Math.min(idx.length - limit, 1000) + " more", onclick: () => { renderInventory.limit = limit + 1000; render(); } }));
}
