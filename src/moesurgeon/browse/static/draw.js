// draw.js — canvas primitives: sizing for sharp pixels, colour scales, heatmaps, bars, matrices, colour bars.
// Every canvas that reacts to the mouse gets canvas._hit(x, y) -> {text, layer?, expert?} (see main.js).
"use strict";

const LEGEND_W = 74;  // right margin of each track: the colour bar or value axis

function prepCanvas(canvas, cssHeight, cssWidth) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(120, Math.floor(cssWidth || canvas.clientWidth || canvas.parentNode.clientWidth || 800));
  canvas.style.height = cssHeight + "px";
  if (cssWidth) canvas.style.width = cssWidth + "px";
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(cssHeight * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, cssHeight);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx: ctx, w: w, h: cssHeight };
}

// viridis, sampled at 9 stops (perceptually uniform, readable in greyscale)
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                 [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
// blue - white - red for signed values (cosine similarity, signed changes)
const DIVERGING = [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247], [253, 219, 199],
                   [239, 138, 98], [178, 24, 43]];

function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * f));
  return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
}

function makeScale(values, kind) {
  // kind "seq": min..max of the finite values; "cos": fixed -1..1 diverging; "share": 0..max
  let lo = Infinity, hi = -Infinity;
  for (const v of values) if (v !== null && v !== undefined && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (kind === "cos") { lo = -1; hi = 1; }
  if (kind === "offdiag") { const m = Math.max(Math.abs(lo), Math.abs(hi), 0.05); lo = -m; hi = m; }
  if (kind === "share") lo = Math.min(0, lo);
  const stops = kind === "cos" || kind === "offdiag" ? DIVERGING : VIRIDIS;
  if (hi === lo) {  // every value equal (an unchanged diff): one colour, and the legend says so
    return { lo: lo, hi: hi, kind: kind, flat: true, color: () => ramp(stops, 0), stops: stops };
  }
  return { lo: lo, hi: hi, kind: kind, color: (v) => ramp(stops, (v - lo) / (hi - lo)), stops: stops };
}

const EMPTY = "#eceef2";

function drawHeat(ctx, x0, y0, w, h, rows, cols, get, scale) {
  // rows x cols cells; get(r, c) -> value | null | undefined (undefined: no such cell, drawn blank)
  const cw = w / cols, rh = h / rows;
  for (let c = 0; c < cols; c++) {
    for (let r = 0; r < rows; r++) {
      const v = get(r, c);
      if (v === undefined) continue;
      ctx.fillStyle = v === null || !isFinite(v) ? EMPTY : scale.color(v);
      ctx.fillRect(x0 + c * cw, y0 + r * rh, Math.ceil(cw), Math.ceil(rh));
    }
  }
}

function drawColorBar(ctx, x, y, w, h, scale, label) {
  // vertical bar, maximum at the top; labelled with the exact ends of the range
  if (scale.flat) {
    ctx.fillStyle = ramp(scale.stops, 0);
    ctx.fillRect(x, y + h / 2 - 5, 10, 10);
    ctx.fillStyle = "#333";
    ctx.textBaseline = "middle";
    ctx.fillText("all " + fmtShort(scale.lo), x + 13, y + h / 2);
    return;
  }
  const steps = 32;
  for (let i = 0; i < steps; i++) {
    ctx.fillStyle = ramp(scale.stops, 1 - i / (steps - 1));
    ctx.fillRect(x, y + (i * h) / steps, 10, Math.ceil(h / steps));
  }
  ctx.strokeStyle = "#999";
  ctx.strokeRect(x + 0.5, y + 0.5, 10, h - 1);
  ctx.fillStyle = "#333";
  ctx.textBaseline = "top";
  ctx.fillText(fmtShort(scale.hi), x + 13, y);
  ctx.textBaseline = "bottom";
  ctx.fillText(fmtShort(scale.lo), x + 13, y + h);
  if (label) { ctx.textBaseline = "middle"; ctx.fillText(label, x + 13, y + h / 2); }
}

function drawBars(ctx, x0, y0, w, h, values, opts) {
  // one bar per value (null: a grey stub); opts: {color(i), lo, hi, highlight}
  const n = values.length;
  let lo = opts && opts.lo !== undefined ? opts.lo : 0;
  let hi = opts && opts.hi !== undefined ? opts.hi : -Infinity;
  for (const v of values) if (v !== null && v !== undefined && isFinite(v)) { hi = Math.max(hi, v); lo = Math.min(lo, v); }
  const flat = isFinite(hi) && hi === lo;  // every value equal (an unchanged diff): say so instead of an axis
  if (!isFinite(hi) || hi === lo) hi = lo + 1;
  const bw = w / Math.max(1, n);
  const zero = y0 + h - ((0 - lo) / (hi - lo)) * h;
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (v === undefined) continue;
    if (v === null || !isFinite(v)) {
      ctx.fillStyle = EMPTY;
      ctx.fillRect(x0 + i * bw + 1, y0 + h - 3, Math.max(1, bw - 2), 3);
      continue;
    }
    const y = y0 + h - ((v - lo) / (hi - lo)) * h;
    ctx.fillStyle = opts && opts.color ? opts.color(i, v) : "#4c6ef5";
    ctx.fillRect(x0 + i * bw + (bw > 4 ? 1 : 0), Math.min(y, zero), Math.max(1, bw - (bw > 4 ? 2 : 0)), Math.max(1, Math.abs(zero - y)));
  }
  if (opts && opts.highlight !== null && opts.highlight !== undefined) {
    ctx.strokeStyle = "#d9480f";
    ctx.lineWidth = 2;
    ctx.strokeRect(x0 + opts.highlight * bw + 1, y0 + 1, Math.max(2, bw - 2), h - 2);
    ctx.lineWidth = 1;
  }
  const label = (opts && opts.format) || fmtShort;
  ctx.fillStyle = "#333";
  if (flat) {
    ctx.textBaseline = "bottom";
    ctx.fillText("all " + label(lo), x0 + w + 4, y0 + h);
    return { lo: lo, hi: hi, bw: bw };
  }
  ctx.textBaseline = "top";
  ctx.fillText(label(hi), x0 + w + 4, y0);
  ctx.textBaseline = "bottom";
  ctx.fillText(label(lo), x0 + w + 4, y0 + h);
  return { lo: lo, hi: hi, bw: bw };
}

function drawMatrix(canvas, matrix, labels, opts) {
  // square E x E heatmap with a colour bar; opts: {size, title, highlight, kind}
  const n = matrix.length;
  const size = opts.size || Math.min(320, Math.max(220, n * 12));
  const { ctx } = prepCanvas(canvas, size + 22, size + 70);
  // the colour range is +-(largest |off-diagonal| value): the diagonal (1) would flatten everything else
  const off = [];
  matrix.forEach((row, r) => row.forEach((v, c) => { if (r !== c) off.push(v); }));
  const scale = makeScale(off, "offdiag");
  drawHeat(ctx, 0, 0, size, size, n, n, (r, c) => matrix[r][c], scale);
  if (opts.highlight !== null && opts.highlight !== undefined) {
    const pos = labels.indexOf(opts.highlight);
    if (pos >= 0) {
      const cell = size / n;
      ctx.strokeStyle = "#d9480f";
      ctx.lineWidth = 2;
      ctx.strokeRect(0, pos * cell, size, cell);
      ctx.strokeRect(pos * cell, 0, cell, size);
      ctx.lineWidth = 1;
    }
  }
  drawColorBar(ctx, size + 8, 0, 10, size, scale);
  ctx.fillStyle = "#5d6678";
  ctx.textBaseline = "top";
  ctx.fillText("expert →  (rows: expert ↓)", 0, size + 6);
  canvas._hit = (x, y) => {
    if (x < 0 || y < 0 || x >= size || y >= size) return null;
    const r = Math.floor((y / size) * n), c = Math.floor((x / size) * n);
    return { text: (opts.title || "") + "\nexpert " + labels[r] + " × expert " + labels[c] + ": " + fmt(matrix[r][c]),
             expert: labels[r] };
  };
}
